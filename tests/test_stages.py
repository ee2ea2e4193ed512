"""The stages of one block (phaseid_hpc.stages): the README's steps on a Block, one dataclass each."""

from __future__ import annotations

import pandas as pd
import pytest

from phaseid_hpc import contract
from phaseid_hpc.block import join_reasons
from phaseid_hpc.config import RunConfig
from phaseid_hpc.pipeline import StoreTables, process_arrays
from phaseid_hpc.stages import BlockResult, run_block

from .test_block import small_block


def test_run_block_corrects_wrong_gis_and_returns_one_dataclass():
    block, truth = small_block(wrong=2)
    res = run_block(block, RunConfig())
    assert isinstance(res, BlockResult)
    m = res.meters
    assert [c for c in m.columns if c in contract.METER_RESULT_COLUMNS] == list(contract.METER_RESULT_COLUMNS)
    assert (m["phase"].to_numpy() == truth).all()
    assert int(m["changed"].sum()) == 2
    assert all(isinstance(r, list) for r in m["reasons"])
    assert {"quality", "phase", "transformer", "validation"} <= set(res.timings)
    # the GIS columns are never overwritten
    assert (m["transformer_id"] == block.meters["transformer_gis"]).all()
    assert (m["phase_gis"] == block.meters["phase_gis"]).all()


def test_process_arrays_is_run_block_with_joined_reasons():
    block, _ = small_block(wrong=1, seed=2)
    tables = StoreTables(block.meters.rename(columns={"transformer_gis": "transformer_id"}), None, None,
                         block.times, block.interval_s)
    a = process_arrays(block.voltage, block.kw, None, tables, RunConfig())
    b = run_block(block, RunConfig())
    cols = [c for c in b.meters.columns if c != "reasons"]
    pd.testing.assert_frame_equal(a["meters"][cols], b.meters[cols])
    assert a["meters"]["reasons"].tolist() == join_reasons(b.meters["reasons"])


def test_run_block_on_array_api_strict_equals_numpy():
    # every stage takes its namespace from the block's arrays: the array-API reference namespace runs the
    # whole block (what lets CuPy run it) and gives the same tables as NumPy
    xps = pytest.importorskip("array_api_strict")
    block, _ = small_block(wrong=2, seed=5)
    on_numpy = run_block(block, RunConfig())
    strict = block.replace(voltage=xps.asarray(block.voltage), kw=xps.asarray(block.kw))
    on_strict = run_block(strict, RunConfig())
    pd.testing.assert_frame_equal(on_numpy.meters, on_strict.meters)
    pd.testing.assert_frame_equal(on_numpy.transformers, on_strict.transformers)
