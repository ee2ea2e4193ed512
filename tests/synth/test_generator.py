"""Tests of phaseid_hpc/synth: determinism, truth consistency, contract columns, each physical effect."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from phaseid_hpc import contract
from phaseid_hpc.synth import MeasurementModel, generate_utility, simulate_feeder
from phaseid_hpc.synth.powerflow import feeder_drops

SHARED_TRUTH = Path(__file__).resolve().parents[3] / "shared" / "data" / "epri-ckt5" / "truth.csv"


@pytest.fixture(scope="module")
def feeder():
    """One 600-meter feeder, 14 days, true voltages (no measurement model)."""
    return simulate_feeder(600, days=14, seed=11)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


MODEL = MeasurementModel(
    accuracy_class=0.5, resolution_v=0.1, missing_fraction=0.04, clock_offset_fraction=0.2
)


@pytest.fixture(scope="module")
def utility(tmp_path_factory):
    out = tmp_path_factory.mktemp("utility")
    res = generate_utility(out, n_meters=700, days=2, seed=5, measurement=MODEL)
    return out, res


def test_same_seed_gives_byte_identical_files(utility, tmp_path):
    out, _ = utility
    generate_utility(tmp_path / "again", n_meters=700, days=2, seed=5, measurement=MODEL)
    generate_utility(tmp_path / "other", n_meters=700, days=2, seed=6, measurement=MODEL)
    assert _digest(out) == _digest(tmp_path / "again")
    assert _digest(out)["readings.parquet"] != _digest(tmp_path / "other")["readings.parquet"]


def test_partitioned_layout_and_dask_client_give_same_rows(utility, tmp_path):
    distributed = pytest.importorskip("distributed")
    out, _ = utility
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as c:
        generate_utility(
            tmp_path / "p",
            n_meters=700,
            days=2,
            seed=5,
            measurement=MODEL,
            client=c,
            readings_layout="partitioned",
            meters_per_block=300,
        )
    a = pd.read_parquet(out / "readings.parquet")
    b = pd.read_parquet(tmp_path / "p" / "readings.parquet")
    pd.testing.assert_frame_equal(a, b)
    for name in ("meters.csv", "truth.csv", "transformers.csv"):
        assert (out / name).read_bytes() == (tmp_path / "p" / name).read_bytes()


def test_contract_columns_and_types(utility):
    out, res = utility
    rd = pd.read_parquet(out / "readings.parquet")
    assert list(rd.columns) == ["meter_id", "timestamp", "voltage_v", "kw", "kvar"]
    assert str(rd.timestamp.dt.tz) == "UTC"
    assert rd.timestamp.min() == pd.Timestamp("2026-06-01 00:15", tz="UTC")  # interval ends
    meters = pd.read_csv(out / "meters.csv")
    assert list(meters.columns) == list(contract.METERS_REQUIRED + contract.METERS_OPTIONAL)
    assert set(meters.phase) <= set(contract.PHASE_LABELS)
    assert {"1ph-240", "2ph-208", "3ph-208Y"} >= set(meters.service_type) >= {"1ph-240"}
    xf = pd.read_csv(out / "transformers.csv")
    assert list(xf.columns) == list(contract.TRANSFORMERS_REQUIRED)
    assert set(meters.transformer_id) <= set(xf.transformer_id)
    refs = pd.read_parquet(out / "references.parquet")
    assert list(refs.columns) == list(contract.REFERENCES_REQUIRED)
    assert len(refs) == 3 * res.n_feeders * res.n_time
    assert refs.voltage_v.between(6800, 7900).all()  # 12.47 kV line-to-neutral [V]
    truth = pd.read_csv(out / "truth.csv")
    assert tuple(truth.columns) == contract.TRUTH_COLUMNS
    if SHARED_TRUTH.exists():
        assert list(truth.columns) == list(pd.read_csv(SHARED_TRUTH, nrows=1).columns)
    assert rd.meter_id.nunique() == res.n_meters == len(truth)


def test_truth_flags_match_label_differences_and_rates():
    sim = simulate_feeder(2500, days=1, seed=3)
    m, t = sim.meters, sim.truth
    assert (t.meter_id.to_numpy() == m.meter_id.to_numpy()).all()
    assert (t.phase_label_corrupted == (m.phase != t.phase)).all()
    assert (t.transformer_label_corrupted == (m.transformer_id != t.transformer_id)).all()
    assert abs(t.phase_label_corrupted.mean() - 0.08) < 0.01
    assert abs(t.transformer_label_corrupted.mean() - 0.03) < 0.01
    # Wrong transformer labels point at real transformers, mostly a neighbour (close by).
    assert set(m.transformer_id) <= set(sim.transformers.transformer_id)
    ids = t.transformer_id.to_numpy()
    # topology transformer index of every transformer id (via the meters the id holds in truth)
    k_of = dict(zip(ids, sim.topology.meter_xfmr[sim.order]))
    bad = t.transformer_label_corrupted.to_numpy()
    gis_k = [k_of.get(g) for g in m.transformer_id[bad]]
    true_k = [k_of[g] for g in ids[bad]]
    xy = sim.topology.xfmr_xy
    dist = [np.hypot(*(xy[a] - xy[b])) for a, b in zip(gis_k, true_k) if a is not None]
    assert np.median(dist) < 250.0  # [m] next pole on the lateral, or the nearest transformer
    # Three-phase services are never given a wrong phase.
    assert not t.phase_label_corrupted[t.phase == "ABC"].any()


def test_zero_error_rates_give_clean_gis():
    sim = simulate_feeder(300, days=1, seed=2, phase_error_rate=0.0, transformer_error_rate=0.0)
    assert not sim.truth.phase_label_corrupted.any()
    assert not sim.truth.transformer_label_corrupted.any()


def test_ltc_tap_steps_visible_in_reference(feeder):
    taps = feeder.tap
    moves = np.flatnonzero(np.diff(taps) != 0) + 1
    assert 0.5 < len(moves) / 14 < 40  # tap operations per day
    ref = feeder.references.to_numpy().mean(axis=0)
    jump = np.abs(np.diff(ref))
    # A tap step (0.625% of ~7.2 kV = 45 V, less the time-delay share) stands out of the usual change.
    assert np.median(jump[moves - 1]) > 3 * np.median(jump)
    # Phases differ (unbalance, coupling) but follow the same upstream.
    r = feeder.references.to_numpy()
    assert not np.allclose(r[0], r[1])
    assert np.corrcoef(np.diff(r[0]), np.diff(r[1]))[0, 1] > 0.5


def test_daily_and_weekly_load_shape(feeder):
    kw = pd.DataFrame(feeder.kw.T, index=feeder.times).sum(axis=1)
    local = kw.tz_convert("America/Chicago")
    by_hour = local.groupby(local.index.hour).mean()
    assert by_hour.loc[17:21].mean() > 1.4 * by_hour.loc[2:5].mean()  # evening peak over night
    res = feeder.meters.service_type.to_numpy() == "1ph-240"
    com = pd.Series(feeder.kw[~res].sum(axis=0), index=local.index)
    midday = com[(com.index.hour >= 10) & (com.index.hour < 16)]
    weekend = midday.index.day_of_week >= 5
    assert midday[~weekend].mean() > 1.2 * midday[weekend].mean()  # businesses close at weekends


def test_appliance_events_make_load_jumps(feeder):
    d = np.diff(feeder.kw, axis=1)
    assert (np.abs(d) > 1.0).mean() > 0.01  # [kW] steps of switching appliances
    z = (d - d.mean()) / d.std()
    assert (z**4).mean() > 6  # heavy tails: not Gaussian noise


def test_mutual_coupling_moves_other_phases(feeder):
    top = feeder.topology
    n_t = 24
    kw = np.zeros((top.n_meters, n_t), np.float32)
    on_b = top.meter_phase == "B"
    kw[on_b] = np.linspace(0.5, 4.0, n_t)[None, :]
    kvar = 0.3 * kw
    _w, drop, fp, _ = feeder_drops(top, kw, kvar, np.random.default_rng(0))
    assert np.allclose(fp[[0, 2]], 0) and (fp[1] > 0).all()
    on_a = top.meter_phase == "A"
    dv_a = np.ptp(drop[on_a], axis=1)
    dv_b = np.ptp(drop[on_b], axis=1)
    assert np.median(np.abs(dv_a)) > 0.02  # [V] load on B moves A through the mutual impedance
    assert np.median(np.abs(dv_a)) < np.median(dv_b)


def test_voltages_are_plausible_and_transformer_mates_correlate(feeder):
    v = feeder.voltage
    ratio = v / feeder.meters.nominal_v.to_numpy()[:, None]
    assert 0.90 < np.percentile(ratio, 1) and np.percentile(ratio, 99) < 1.07
    d = np.diff(v, axis=1)
    d = (d - d.mean(1, keepdims=True)) / d.std(1, keepdims=True)
    c = d @ d.T / d.shape[1]
    tr = feeder.truth.transformer_id.to_numpy()
    same = tr[:, None] == tr[None, :]
    np.fill_diagonal(same, False)
    other = ~same
    np.fill_diagonal(other, False)
    assert 0.9 < c[same].mean() < 0.995  # close, not identical: own service drops and appliances
    assert c[other].mean() < 0.8


def test_measurement_effects_missing_and_clock_offsets(utility):
    out, res = utility
    rd = pd.read_parquet(out / "readings.parquet", columns=["meter_id", "voltage_v"])
    missing = 1 - len(rd) / (res.n_meters * res.n_time)
    assert 0.02 < missing < 0.07
    assert np.allclose(np.round(rd.voltage_v * 10), rd.voltage_v * 10, atol=1e-3)  # 0.1 V resolution
    sim = simulate_feeder(500, days=1, seed=4, measurement=MODEL)
    assert 0.12 < (sim.clock_offset_s != 0).mean() < 0.28
    shifted = sim.clock_offset_s != 0
    assert np.isnan(sim.measured).mean() == pytest.approx(0.04, abs=0.02)
    assert not np.isnan(sim.voltage).any()
    assert shifted.any()


def test_store_matches_readings(tmp_path):
    store_mod = pytest.importorskip("phaseid_hpc.store")
    out = tmp_path / "u"
    res = generate_utility(
        out, n_meters=1500, days=1, seed=17, store=out / "store.zarr", meters_per_block=500
    )
    assert res.n_substations >= 2
    assert store_mod.validate_store(out / "store.zarr") == []
    ds = store_mod.open_store(out / "store.zarr")
    ids = [str(x) for x in ds.meter.values]
    rd = pd.read_parquet(out / "readings.parquet", columns=["meter_id", "timestamp", "voltage_v"])
    wide = rd.pivot(index="meter_id", columns="timestamp", values="voltage_v").reindex(ids)
    np.testing.assert_allclose(ds.voltage.values, wide.to_numpy(np.float32), atol=1e-3)  # int16 deci-volts
    assert np.isfinite(ds.reference_voltage.values).all()


def test_single_file_is_the_same_with_a_dask_client(utility, tmp_path):
    distributed = pytest.importorskip("distributed")
    out, _ = utility
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as c:
        generate_utility(
            tmp_path / "c", n_meters=700, days=2, seed=5, measurement=MODEL, client=c, meters_per_block=300
        )
    assert _digest(out) == _digest(tmp_path / "c")


def test_rooftop_pv_lowers_midday_net_load():
    base = simulate_feeder(300, days=3, seed=7)
    pv = simulate_feeder(300, days=3, seed=7, pv_fraction=0.6)
    local_hour = (base.times - pd.Timedelta(hours=5)).hour
    noon = (local_hour >= 11) & (local_hour < 15)
    assert pv.kw[:, noon].sum() < 0.8 * base.kw[:, noon].sum()
    assert (pv.kw < 0).any()  # export at noon
    night = local_hour < 4
    np.testing.assert_allclose(pv.kw[:, night], base.kw[:, night], rtol=1e-5)


def test_store_bytes_do_not_depend_on_blocking_or_the_client(tmp_path):
    """Whole chunks written by the tasks, block-edge chunks assembled by the client: the same bytes for any
    block size, run here or on a Dask client (threads of one process, tasks finishing in any order)."""
    distributed = pytest.importorskip("distributed")
    kw = {"n_meters": 1400, "days": 1, "seed": 23, "feeder_meters": (100, 300), "write_readings": False}
    generate_utility(tmp_path / "a", store=tmp_path / "a" / "s.zarr", meters_per_block=5000, **kw)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as c:
        generate_utility(tmp_path / "b", store=tmp_path / "b" / "s.zarr", meters_per_block=150, client=c, **kw)
    digest = {k: v for k, v in _digest(tmp_path / "a").items() if "_phaseid" not in k}
    assert len([k for k in digest if k.startswith("s.zarr/voltage/c/")]) >= 4
    assert digest == {k: v for k, v in _digest(tmp_path / "b").items() if "_phaseid" not in k}
    from phaseid_hpc.store import read_meter_block, validate_store

    assert validate_store(tmp_path / "b" / "s.zarr", deep=True) == []
    v = read_meter_block(tmp_path / "b" / "s.zarr", 0, 1400, ("voltage",))["voltage"]
    assert np.isfinite(v).all() and 200 < np.nanmean(v) < 260


def test_tree_sums_equal_the_path_matrix_products():
    from phaseid_hpc.synth.powerflow import _path_matrix, path_sums, subtree_sums

    rng = np.random.default_rng(3)
    parent = np.concatenate([[-1], [rng.integers(0, k) for k in range(1, 60)]])
    d = _path_matrix(parent).toarray()
    load = rng.normal(size=(60, 4))
    np.testing.assert_allclose(subtree_sums(parent, load.copy())[1:], (d.T @ load)[1:], rtol=1e-12)
    load[0] = 0.0  # the bus has no section of its own (zero impedance in the generator's topologies)
    np.testing.assert_allclose(path_sums(parent, load.copy()), d @ load, rtol=1e-12, atol=1e-12)


def test_ar1_filter_equals_its_reference():
    from phaseid_hpc.synth.loads import _ar1_filter_reference, ar1_filter

    e = np.random.default_rng(1).standard_normal((7, 50)).astype(np.float32)
    for phi in (0.9, np.exp(-0.125)):  # a Python float and a NumPy float64 promote differently
        np.testing.assert_array_equal(ar1_filter(e, phi), _ar1_filter_reference(e, phi))
