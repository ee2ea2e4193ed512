from __future__ import annotations

import pandas as pd
import pytest

from phaseid_hpc.errors import ContractError
from phaseid_hpc.score import format_score_table, score_frames, score_results


def _frames():
    truth = pd.DataFrame({
        "meter_id": ["m1", "m2", "m3", "m4"],
        "transformer_id": ["t1", "t1", "t2", "t2"],
        "phase": ["A", "A", "B", "C"],
    })
    res = pd.DataFrame({
        "meter_id": ["m1", "m2", "m3", "m4"],
        "transformer_id": ["t1", "t1", "t2", "t1"],
        "phase_gis": ["A", "B", "B", "C"],
        "phase": ["A", "A", "C", None],
        "phase_class": ["confident", "confident", "suspect", "insufficient_data"],
        "changed": [False, True, True, False],
        "transformer": ["t1", "t1", "t2", "t2"],
        "transformer_changed": [False, False, False, True],
    })
    return res, truth


def test_score_counts_every_case():
    res, truth = _frames()
    s = score_frames(res, truth)
    p = s["phase"]
    assert p["accuracy"] == pytest.approx(2 / 4)
    assert p["accuracy_identified"] == pytest.approx(2 / 3)
    assert p["coverage"] == pytest.approx(3 / 4)
    assert p["confident_precision"] == pytest.approx(1.0)
    assert p["correction_precision"] == pytest.approx(1 / 2)  # m2 right, m3 wrong
    assert p["correction_recall"] == pytest.approx(1.0)  # one GIS error (m2), corrected
    x = s["transformer"]
    assert x["accuracy"] == pytest.approx(1.0)
    assert x["flag_precision"] == pytest.approx(1.0) and x["flag_recall"] == pytest.approx(1.0)
    assert "confident-class precision | 100.00%" in format_score_table(s)


def test_unknown_meter_is_named():
    res, truth = _frames()
    with pytest.raises(ContractError, match="not in the truth"):
        score_frames(res, truth.iloc[:2])


def test_score_results_missing_files(tmp_path):
    with pytest.raises(ContractError, match="phaseid run"):
        score_results(tmp_path, tmp_path / "truth.csv")
