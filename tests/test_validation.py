"""Tests of phaseid_hpc/validation.py on a small seeded synthetic block of two feeders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phaseid_hpc.config import ValidationConfig, load_config
from phaseid_hpc.validation import (
    VALIDATION_FLAGS,
    feeder_phase_imbalance,
    summarize_validation,
    validate_transformers,
)

N_DAYS = 8
STEPS_PER_DAY = 96  # 15-minute grid
N_TIME = N_DAYS * STEPS_PER_DAY

# transformer_id -> (feeder_id, kva_rating, n_phases, meter phases, mean kW per meter)
UNITS: dict[str, tuple[str, float, int, list[str], float]] = {
    "T_ok1": ("F1", 25.0, 1, ["A"] * 4, 1.2),
    "T_ok2": ("F1", 25.0, 1, ["B"] * 3, 1.5),
    "T_ok3": ("F1", 50.0, 1, ["C"] * 5, 1.8),
    "T_hot": ("F1", 10.0, 1, ["A"] * 3, 3.0),  # overload: peaks well above rating, mean below
    "T_ok4": ("F2", 25.0, 1, ["A"] * 3, 1.3),
    "T_tap": ("F2", 25.0, 1, ["B"] * 4, 1.2),  # gets a tap step in the fault tests
    "T_bank": ("F2", 75.0, 3, ["A"] * 6 + ["B"] + ["C"], 2.0),  # 3-phase bank, load mostly on A
    "T_ok5": ("F2", 25.0, 1, ["C"] * 3, 1.4),
}


def make_block(seed: int = 0) -> dict:
    """Meters, power and voltage with a simple radial-drop model: head -> transformer -> meter."""
    rng = np.random.default_rng(seed)
    t = np.arange(N_TIME)
    times = pd.date_range("2026-06-01 00:15", periods=N_TIME, freq="15min").to_numpy()
    hour = (t % STEPS_PER_DAY) / 4.0
    shape = 0.55 + 0.45 * np.sin((hour - 12.0) / 24.0 * 2 * np.pi) + 0.5 * np.exp(-((hour - 19.0) ** 2) / 4.0)
    heads = {}
    for fid in ("F1", "F2"):
        ar = np.zeros(N_TIME)
        e = rng.normal(0, 0.002, N_TIME)
        for i in range(1, N_TIME):
            ar[i] = 0.97 * ar[i - 1] + e[i]
        heads[fid] = 1.02 + ar
    rows, kw, volts = [], [], []
    for tid, (fid, kva, nph, phases, mean_kw) in UNITS.items():
        loads = [mean_kw * shape * (1 + 0.15 * rng.standard_normal(N_TIME)).clip(0.2) for _ in phases]
        tx_load = sum(loads)
        v_tx = heads[fid] - 0.02 * tx_load / kva  # 2% impedance drop at rated load
        for j, (ph, load) in enumerate(zip(phases, loads)):
            rows.append({"meter_id": f"{tid}_m{j}", "feeder_id": fid, "transformer_id": tid, "phase": ph})
            kw.append(load)
            volts.append(240.0 * (v_tx - 0.004 * load / 5.0 + rng.normal(0, 0.0007, N_TIME)))
    meters = pd.DataFrame(rows)
    transformers = pd.DataFrame(
        [
            {"transformer_id": k, "feeder_id": v[0], "kva_rating": v[1], "n_phases": v[2]}
            for k, v in UNITS.items()
        ]
    )
    refs = pd.concat(
        [
            pd.DataFrame(
                {"feeder_id": fid, "phase": ph, "timestamp": times, "voltage_v": 7200.0 * heads[fid]}
            )
            for fid in heads
            for ph in "ABC"
        ],
        ignore_index=True,
    )
    return {
        "kw": np.array(kw),
        "voltage": np.array(volts),
        "meters": meters,
        "transformers": transformers,
        "times": times,
        "references": refs,
    }


@pytest.fixture(scope="module")
def block() -> dict:
    return make_block()


DEFAULT = ValidationConfig()


def _run(b: dict, config: ValidationConfig = DEFAULT, **kw) -> pd.DataFrame:
    args = {"references": b["references"]}
    args.update(kw)
    return validate_transformers(
        b["kw"], None, b["voltage"], b["meters"], b["transformers"], b["times"], config, **args
    ).set_index("transformer_id")


@pytest.fixture(scope="module")
def clean(block) -> pd.DataFrame:
    return _run(block)


def test_table_shape_sorted_and_units(clean, block):
    assert list(clean.index) == sorted(UNITS, key=lambda k: (UNITS[k][0], k))
    assert clean.loc["T_ok1", "n_meters"] == 4
    # 1-phase kVA is the apparent power at the default power factor when no kvar is given
    expected = block["kw"][:4].sum(axis=0) / 0.95
    assert clean.loc["T_ok1", "peak_kva"] == pytest.approx(expected.max(), rel=1e-9)
    assert clean.loc["T_ok1", "mean_loading_pu"] == pytest.approx(expected.mean() / 25.0, rel=1e-9)
    assert clean.loc["T_ok1", "kw_coverage"] == 1.0
    assert np.isnan(clean.loc["T_ok1", "imbalance"])
    assert set(clean.columns) >= {
        "max_top_oil_c",
        "max_hot_spot_c",
        "f_eqa",
        "loss_of_life_h",
        "flag_codes",
        "flag_reasons",
    }
    assert "flags" not in clean.columns  # a column named flags would hide pandas' DataFrame.flags


def test_clean_units_have_no_flags(clean):
    for tid in ("T_ok1", "T_ok2", "T_ok3", "T_ok4", "T_ok5", "T_tap"):
        assert clean.loc[tid, "flag_codes"] == [], (tid, clean.loc[tid, "flag_reasons"])
        assert clean.loc[tid, "max_hot_spot_c"] < 110.0
        assert clean.loc[tid, "f_eqa"] < 1.0


def test_synthetic_overload_is_flagged(clean):
    r = clean.loc["T_hot"]
    assert r["peak_loading_pu"] > 1.3 and r["mean_loading_pu"] < 1.0
    assert "overload" in r["flag_codes"] and "mapping_contradicts_rating" not in r["flag_codes"]
    assert r["max_hot_spot_c"] > 120.0 and r["hours_above_normal"] > 0
    assert r["f_eqa"] > 1.0 and r["loss_of_life_h"] == pytest.approx(r["f_eqa"] * N_TIME * 0.25)
    assert any("normal-cyclic" in s for s in r["flag_reasons"])


def test_emergency_limit_is_configurable(block):
    out = _run(block, ValidationConfig(hot_spot_normal_c=100.0, hot_spot_emergency_c=120.0))
    assert {"overload", "emergency_overload"} <= set(out.loc["T_hot", "flag_codes"])


def test_mapping_contradicts_rating(block):
    """Moving all of feeder F1's meters onto one 10 kVA unit is an impossible mapping."""
    meters = block["meters"].copy()
    meters.loc[meters["feeder_id"] == "F1", "transformer_id"] = "T_hot"
    out = _run(dict(block, meters=meters))
    r = out.loc["T_hot"]
    assert "mapping_contradicts_rating" in r["flag_codes"]
    assert any("manual audit" in s for s in r["flag_reasons"])
    assert out.loc["T_ok1", "n_meters"] == 0 and out.loc["T_ok1", "peak_kva"] == 0.0


def test_imbalance_of_three_phase_bank(clean):
    r = clean.loc["T_bank"]
    assert r["n_phases"] == 3 and r["phases"] == "ABC"
    assert r["imbalance"] > 0.3 and "high_imbalance" in r["flag_codes"]
    # the bank's thermal loading is the most loaded phase on a third of the rating
    assert r["peak_loading_pu"] > r["peak_kva"] / r["kva_rating"]


def test_feeder_phase_imbalance(clean):
    f = feeder_phase_imbalance(clean.reset_index())
    assert list(f["feeder_id"]) == ["F1", "F2"]
    f1 = f.set_index("feeder_id").loc["F1"]
    assert f1["mean_kva_a"] == pytest.approx(clean.loc[["T_ok1", "T_hot"], "mean_kva"].sum())
    assert 0 <= f1["imbalance"] < 2


def _with_tap_step(block: dict, tid: str, size: float) -> dict:
    v = block["voltage"].copy()
    rows = (block["meters"]["transformer_id"] == tid).to_numpy()
    v[rows, N_TIME // 2 :] *= 1.0 + size
    return dict(block, voltage=v)


@pytest.mark.parametrize("with_references", [True, False])
def test_tap_fault_is_found_only_where_it_is(block, with_references):
    b = _with_tap_step(block, "T_tap", 0.025)  # one 2.5% off-circuit tap step
    out = _run(b, references=b["references"] if with_references else None)
    r = out.loc["T_tap"]
    assert "voltage_level_step" in r["flag_codes"], r["flag_reasons"]
    assert r["voltage_step_pu"] == pytest.approx(0.025, abs=0.004)
    assert abs(r["voltage_step_time"] - pd.Timestamp(b["times"][N_TIME // 2])) <= pd.Timedelta("2h")
    others = out.drop(index=["T_tap", "T_hot", "T_bank"])
    assert not any("voltage_level_step" in f for f in others["flag_codes"])


def test_tap_fault_with_store_layout_references(block):
    b = _with_tap_step(block, "T_tap", 0.025)
    heads = (
        b["references"].drop_duplicates(["feeder_id", "phase"])[["feeder_id", "phase"]].reset_index(drop=True)
    )
    values = np.stack(
        [
            b["references"].query("feeder_id == @f and phase == @p")["voltage_v"].to_numpy()
            for f, p in zip(heads["feeder_id"], heads["phase"])
        ]
    )
    out = _run(b, references=(heads, values))
    assert [t for t, f in out["flag_codes"].items() if "voltage_level_step" in f] == ["T_tap"]


def test_small_step_below_threshold_is_not_flagged(block, clean):
    out = _run(_with_tap_step(block, "T_tap", 0.004))
    assert "voltage_level_step" not in out.loc["T_tap", "flag_codes"]
    assert (clean["voltage_step_pu"].dropna() < 0.0125).all()


def test_correlation_loss_of_all_meters_of_one_unit(block):
    """From day 5 the unit's meters follow their own wandering level, not the feeder (a loose winding)."""
    rng = np.random.default_rng(7)
    v = block["voltage"].copy()
    rows = (block["meters"]["transformer_id"] == "T_ok4").to_numpy()
    wander = np.cumsum(rng.normal(0, 0.003, N_TIME))
    later = slice(5 * STEPS_PER_DAY, None)
    v[np.ix_(rows, np.arange(N_TIME)[later])] = 240.0 * (1.0 + wander[later] - wander[later].mean())[
        None, :
    ] + rng.normal(0, 0.1, (rows.sum(), 3 * 96))
    out = _run(dict(block, voltage=v))
    assert "correlation_loss" in out.loc["T_ok4", "flag_codes"]
    assert not any("correlation_loss" in f for f in out.drop(index="T_ok4")["flag_codes"])


def test_missing_kw_is_interpolated(block, clean):
    kw = block["kw"].copy()
    rng = np.random.default_rng(3)
    kw[rng.random(kw.shape) < 0.1] = np.nan
    kw[0] = np.nan  # a meter without any kW sample
    out = _run(dict(block, kw=kw))
    r = out.loc["T_ok3"]
    assert 0.85 < r["kw_coverage"] < 0.95
    assert r["mean_kva"] == pytest.approx(clean.loc["T_ok3", "mean_kva"], rel=0.03)
    assert out.loc["T_ok1", "kw_coverage"] < 0.75
    assert np.isfinite(out["max_hot_spot_c"]).all()


def test_kvar_and_power_factor(block, clean):
    kvar = block["kw"] * 0.5
    out = validate_transformers(
        block["kw"], kvar, None, block["meters"], block["transformers"], block["times"]
    ).set_index("transformer_id")
    expected = (block["kw"][:4].sum(axis=0) * np.hypot(1, 0.5)).max()
    assert out.loc["T_ok1", "peak_kva"] == pytest.approx(expected)
    assert out["voltage_step_pu"].isna().all()


def test_ambient_series_and_standards(block, clean):
    hot = pd.Series(40.0, index=pd.DatetimeIndex(block["times"][::4]))
    warm = _run(block, ambient_c=hot)
    assert (warm["max_hot_spot_c"] - clean["max_hot_spot_c"]).between(9.9, 10.1).all()
    ieee = _run(block, load_config(overrides={"validation": {"thermal_standard": "ieee"}}).validation)
    # hot-spot gradient 25 K (IEEE) against 23 K (IEC) makes IEEE hotter at the same load
    assert (ieee["max_hot_spot_c"] > clean["max_hot_spot_c"]).all()


def test_without_transformer_table_all_units_lack_a_rating(block):
    out = validate_transformers(block["kw"], None, None, block["meters"], None, block["times"])
    assert len(out) == len(UNITS) and all("no_rating" in f for f in out["flag_codes"])
    assert (out["peak_kva"] > 0).all() and out["max_hot_spot_c"].isna().all()


def test_unknown_and_unrated_transformers(block):
    meters = block["meters"].copy()
    meters.loc[0, "transformer_id"] = "T_new"
    meters.loc[1, "transformer_id"] = None
    out = _run(dict(block, meters=meters))
    assert "no_rating" in out.loc["T_new", "flag_codes"]
    assert np.isnan(out.loc["T_new", "max_hot_spot_c"])
    assert out.loc["T_ok1", "n_meters"] == 2


def test_short_block_skips_health_checks(block):
    n = 150  # less than two health windows of 96 samples
    short = dict(block, kw=block["kw"][:, :n], voltage=block["voltage"][:, :n], times=block["times"][:n])
    short["references"] = block["references"][block["references"]["timestamp"] < block["times"][n]]
    out = _run(short)
    assert out["voltage_step_pu"].isna().all() and (out["correlation_lost_windows"] == 0).all()
    assert np.isfinite(out["max_hot_spot_c"]).all()


def test_summary_counts(clean):
    s = summarize_validation(clean.reset_index())
    assert s["transformers"] == len(UNITS)
    assert set(s["flags"]) == set(VALIDATION_FLAGS)
    assert s["flags"]["overload"] == 1 and s["flags"]["high_imbalance"] == 1
    assert s["flagged"] == sum(bool(f) for f in clean["flag_codes"])


@pytest.mark.requires_shared
@pytest.mark.slow
def test_ckt5_tap_faults_found_and_no_false_health_flags(ckt5):
    """Physics-based feeder (../shared ckt5, true mapping, meter noise 0.07% and 0.1 V rounding added):
    three injected 2.5% tap steps are found at the right time and nothing else gets a health flag."""
    d = ckt5  # the shared-dataset fixture of tests/conftest.py (skips where ../shared is absent)
    r = pd.read_parquet(d / "readings.parquet")
    meters = pd.read_csv(d / "truth.csv").sort_values(["feeder_id", "transformer_id", "meter_id"])
    meters = meters.reset_index(drop=True)
    ts = pd.DatetimeIndex(r["timestamp"]).tz_localize(None)
    times = np.unique(ts.to_numpy())
    row = pd.Index(meters["meter_id"]).get_indexer(r["meter_id"])
    col = np.searchsorted(times, ts.to_numpy())
    volts, kw = np.full((len(meters), times.size), np.nan), np.full((len(meters), times.size), np.nan)
    volts[row, col], kw[row, col] = r["voltage_v"].to_numpy(), r["kw"].to_numpy()
    refs = pd.read_parquet(d / "references.parquet")
    refs["timestamp"] = pd.DatetimeIndex(refs["timestamp"]).tz_localize(None)
    rng = np.random.default_rng(0)
    v = np.round(volts * (1 + 0.0007 * rng.standard_normal(volts.shape)), 1)
    counts = meters["transformer_id"].value_counts()
    faulty = sorted(counts[counts >= 3].index)[10:40:10]
    starts = {}
    for j, tid in enumerate(faulty):
        starts[tid] = 1000 + 500 * j
        v[(meters["transformer_id"] == tid).to_numpy(), starts[tid] :] *= 1.025
    out = validate_transformers(
        kw, None, v, meters, pd.read_csv(d / "transformers.csv"), times, references=refs
    ).set_index("transformer_id")
    stepped = sorted(t for t, f in out["flag_codes"].items() if "voltage_level_step" in f)
    assert stepped == faulty
    for tid in faulty:
        assert out.loc[tid, "voltage_step_time"] == pd.Timestamp(times[starts[tid]])
    assert not any("correlation_loss" in f for f in out["flag_codes"])
    assert out["mean_loading_pu"].max() < 1.0 and not any(
        "mapping_contradicts_rating" in f for f in out["flag_codes"]
    )


def test_meter_order_does_not_change_the_table(block, clean):
    """Meters not grouped by transformer (an inferred mapping moves meters) give the same table."""
    perm = np.random.default_rng(4).permutation(len(block["meters"]))
    shuffled = dict(
        block,
        kw=block["kw"][perm],
        voltage=block["voltage"][perm],
        meters=block["meters"].iloc[perm].reset_index(drop=True),
    )
    out = _run(shuffled)
    num = clean.select_dtypes("number").columns
    pd.testing.assert_frame_equal(out[num], clean[num], rtol=1e-6, atol=1e-6)  # float32 sums, other order
    assert list(out["flag_codes"]) == list(clean["flag_codes"])
    assert (out["voltage_step_time"].isna() | (out["voltage_step_time"] == clean["voltage_step_time"])).all()


def test_bank_load_sums_signed_power_before_the_magnitude(block):
    """A meter exporting (negative kW) on a 3-phase bank lowers the bank's total S: S = |sum P| / pf."""
    kw = block["kw"].copy()
    rows = np.flatnonzero((block["meters"]["transformer_id"] == "T_bank").to_numpy())
    kw[rows[-1]] = -2.0  # the C-phase meter exports 2 kW
    out = validate_transformers(
        kw, None, None, block["meters"], block["transformers"], block["times"]
    ).set_index("transformer_id")
    expected = np.abs(kw[rows].sum(axis=0)) / 0.95
    assert out.loc["T_bank", "peak_kva"] == pytest.approx(expected.max(), rel=1e-9)
    assert out.loc["T_bank", "mean_kva_c"] == pytest.approx(2.0 / 0.95, rel=1e-9)


def _codes(table: pd.DataFrame) -> pd.Series:
    """The per-transformer list of flag codes, whatever the column is named."""
    return table["flag_codes"] if "flag_codes" in table else table["flags"]


def test_a_load_switching_on_is_not_a_tap_step(block):
    """T_ok5's meters take 6 kW more each from mid-period: its voltage drops ~2% through its impedance,
    which its own load explains; no tap step."""
    b = dict(block, kw=block["kw"].copy(), voltage=block["voltage"].copy())
    rows = (b["meters"]["transformer_id"] == "T_ok5").to_numpy()
    extra = np.zeros(N_TIME)
    extra[N_TIME // 2 :] = 6.0
    b["kw"][rows] += extra
    b["voltage"][rows] -= 240.0 * (0.02 * extra * rows.sum() / 25.0 + 0.004 * extra / 5.0)
    out = _run(b)
    assert "voltage_level_step" not in _codes(out)["T_ok5"], out.loc["T_ok5", "flag_reasons"]
    assert out.loc["T_ok5", "voltage_step_pu"] < 0.006
    b["voltage"][rows, 3 * N_TIME // 4 :] *= 1.025  # a tap change at another time is still found
    assert "voltage_level_step" in _codes(_run(b))["T_ok5"]


@pytest.mark.parametrize("with_references", [True, False])
def test_winding_noise_of_one_unit_is_a_correlation_loss(block, with_references):
    """From day 4 a common 0.5% noise on T_ok4's meters (they follow each other, not the feeder)."""
    rng = np.random.default_rng(11)
    v = block["voltage"].copy()
    rows = (block["meters"]["transformer_id"] == "T_ok4").to_numpy()
    start = 4 * STEPS_PER_DAY
    v[rows, start:] *= 1 + 0.005 * rng.standard_normal(N_TIME - start)[None, :]
    out = _run(dict(block, voltage=v), references=block["references"] if with_references else None)
    codes = _codes(out)
    assert "correlation_loss" in codes["T_ok4"]
    assert out.loc["T_ok4", "correlation_lost_windows"] >= 3
    assert not any("correlation_loss" in c for c in codes.drop(index="T_ok4"))
    assert not any("voltage_level_step" in c for c in codes.drop(index=["T_hot", "T_bank"]))


def test_one_noisy_meter_is_not_a_winding_fault(block):
    """Only one of T_ok4's meters turns noisy: its siblings do not follow it, so no correlation_loss."""
    rng = np.random.default_rng(12)
    v = block["voltage"].copy()
    row = int(np.flatnonzero((block["meters"]["transformer_id"] == "T_ok4").to_numpy())[0])
    v[row, 4 * STEPS_PER_DAY :] *= 1 + 0.01 * rng.standard_normal(N_TIME - 4 * STEPS_PER_DAY)
    assert not any("correlation_loss" in c for c in _codes(_run(dict(block, voltage=v))))


def test_array_api_strict_block_gives_the_numpy_table(block):
    """The (n_meters, n_time) arrays may come in any array-API namespace (CuPy on a GPU worker)."""
    xps = pytest.importorskip("array_api_strict")
    out = validate_transformers(
        xps.asarray(block["kw"]),
        xps.asarray(0.3 * block["kw"]),
        xps.asarray(block["voltage"]),
        block["meters"],
        block["transformers"],
        block["times"],
        references=block["references"],
    ).set_index("transformer_id")
    ref = validate_transformers(
        block["kw"],
        0.3 * block["kw"],
        block["voltage"],
        block["meters"],
        block["transformers"],
        block["times"],
        references=block["references"],
    ).set_index("transformer_id")
    num = ref.select_dtypes("number").columns
    pd.testing.assert_frame_equal(out[num], ref[num], rtol=1e-6, atol=1e-6)
    assert list(out["flag_codes"]) == list(ref["flag_codes"])
    assert (out["voltage_step_time"].isna() | (out["voltage_step_time"] == ref["voltage_step_time"])).all()
