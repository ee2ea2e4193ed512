"""Tests of phaseid_hpc/confidence.py."""

from __future__ import annotations

import numpy as np
import pytest

from phaseid_hpc import contract
from phaseid_hpc.confidence import confidence_class


def test_confidence_ladder_boundaries_belong_to_the_upper_class():
    conf = np.array([1.0, 0.85, 0.8499, 0.7, 0.6999, 0.0, np.nan])
    got = confidence_class(conf, confident_threshold=0.85, suspect_threshold=0.7)
    assert got.dtype == object
    assert got.tolist() == [contract.CLASS_CONFIDENT] * 2 + [contract.CLASS_SUSPECT] * 2 + [contract.CLASS_LOW] * 3


@pytest.mark.parametrize(("confident", "suspect"), [(0.85, 0.7), (0.5, 0.5), (1.0, 0.0)])
def test_confidence_class_is_monotone(confident, suspect):
    conf = np.sort(np.random.default_rng(0).random(200))
    rank = {contract.CLASS_LOW: 0, contract.CLASS_SUSPECT: 1, contract.CLASS_CONFIDENT: 2}
    got = [rank[c] for c in confidence_class(conf, confident_threshold=confident, suspect_threshold=suspect)]
    assert got == sorted(got)
