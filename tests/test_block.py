"""The block contract (phaseid_hpc.block) and the stages run on it (phaseid_hpc.stages)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phaseid_hpc.block import BLOCK_METER_COLUMNS, Block, check_block, join_reasons, union_reasons
from phaseid_hpc.config import RunConfig
from phaseid_hpc.errors import ContractError, PhaseIDError
from phaseid_hpc.phase_identification import shift_rows
from phaseid_hpc.pipeline import StoreTables
from phaseid_hpc.stages import run_block


def small_block(n_per_group: int = 5, days: float = 4, seed: int = 0, wrong: int = 2) -> tuple[Block, np.ndarray]:
    """Two feeders x 2 transformers x 3 phases of meters following their phase's voltage, plus noise.

    Returns the block (GIS phase wrong on ``wrong`` meters) and the true phase of each meter.
    """
    rng = np.random.default_rng(seed)
    n_t = int(days * 96)
    times = pd.date_range("2026-06-01", periods=n_t, freq="15min", tz="UTC")
    rows, volts, kws, truth = [], [], [], []
    for f in range(2):
        phase_signal = np.cumsum(rng.normal(0, 0.4, (3, n_t)), axis=1)
        for t in range(2):
            xf_signal = np.cumsum(rng.normal(0, 0.15, n_t))
            for p, ph in enumerate("ABC"):
                for k in range(n_per_group):
                    i = len(rows)
                    rows.append({"meter_id": f"m{i:03d}", "feeder_id": f"F{f}", "transformer_id": f"F{f}T{t}{ph}",
                                 "phase_gis": ph, "service_type": "1ph", "nominal_v": 240.0,
                                 "sampling_interval_s": 900.0, "off_grid_fraction": 0.0,
                                 "lat": 40.0 + 0.001 * i, "lon": -80.0})
                    volts.append(240.0 + phase_signal[p] + 0.5 * xf_signal + rng.normal(0, 0.05, n_t))
                    kws.append(np.abs(rng.normal(1.0, 0.3, n_t)))
                    truth.append(ph)
    meters = pd.DataFrame(rows)
    truth = np.array(truth, dtype=object)
    for i in rng.choice(len(meters), size=wrong, replace=False):
        meters.loc[i, "phase_gis"] = {"A": "B", "B": "C", "C": "A"}[truth[i]]
    tables = StoreTables(meters, None, None, times, 900.0)
    return Block.from_tables(np.array(volts), np.array(kws), None, tables), truth


def test_from_tables_renames_gis_transformer_and_orders_columns():
    block, _ = small_block()
    assert tuple(block.meters.columns) == BLOCK_METER_COLUMNS
    assert block.meters["transformer_gis"].iloc[0] == "F0T0A"
    assert check_block(block) is block


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("voltage", np.zeros((3, 4)), "voltage has shape"),
        ("kw", np.zeros((1, 1)), "kw has shape"),
        ("interval_s", 0.0, "interval_s must be positive"),
        ("references", (pd.DataFrame({"feeder_id": ["F0"], "phase": ["A"]}), np.zeros((1, 3))), "references have"),
    ],
)
def test_check_block_names_the_field(field, value, message):
    block, _ = small_block()
    with pytest.raises(ContractError, match=message):
        check_block(block.replace(**{field: value}))


def test_check_block_rejects_duplicate_meters_and_missing_columns():
    block, _ = small_block()
    dup = block.meters.copy()
    dup.loc[1, "meter_id"] = dup.loc[0, "meter_id"]
    with pytest.raises(ContractError, match="twice"):
        check_block(block.replace(meters=dup))
    with pytest.raises(ContractError, match="lacks column"):
        check_block(block.replace(meters=block.meters.drop(columns="phase_gis")))


def test_contract_errors_are_the_projects_own():
    # the command line maps every PhaseIDError to exit status 2: a shape mismatch is one of them
    block, _ = small_block()
    with pytest.raises(PhaseIDError):
        run_block(block.replace(voltage=block.voltage[:-1]), RunConfig())


def test_reasons_stay_lists_until_joined():
    merged = union_reasons([["b", "a"], []], [["a"], ["", "c"]])
    assert merged == [["a", "b"], ["c"]]
    assert join_reasons(merged) == ["a; b", "c"]


@pytest.mark.parametrize("lag", [1, -1, 2, 500])
def test_shift_rows_moves_only_the_shifted_rows(lag):
    x = np.arange(12, dtype=np.float64).reshape(2, 6)
    out = shift_rows(x, np.array([lag, 0]))
    np.testing.assert_array_equal(out[1], x[1])
    expected = np.full(6, np.nan)
    if lag > 0 and lag < 6:
        expected[: 6 - lag] = x[0, lag:]
    elif lag < 0:
        expected[-lag:] = x[0, :lag]
    np.testing.assert_array_equal(out[0], expected)


def test_shift_rows_array_api_strict_matches_numpy():
    xps = pytest.importorskip("array_api_strict")
    x = np.random.default_rng(1).normal(size=(4, 9))
    lag = np.array([0, 1, -2, 0])
    got = np.asarray(shift_rows(xps.asarray(x), lag))
    np.testing.assert_array_equal(got, shift_rows(x, lag))
