"""Named feeder scenarios with the physics that breaks phase identification, written noise-free.

Each scenario is one substation (one feeder, or for ``lv_european`` several LV networks below one MV
feeder) simulated with the generator's own pieces: topology (:mod:`.topology`), customer loads
(:mod:`.loads`), the linear unbalanced power flow with mutual coupling (:mod:`.powerflow`), the
substation LTC, and GIS errors (:mod:`.gis_errors`, ~8% wrong phases, ~3% wrong transformers).

============================  =======  =====================================================================
scenario                      meters   what it adds
============================  =======  =====================================================================
``regulators``                ~1,400   single-phase line regulators on two backbone phases at different
                                       places and at the start of three long laterals (one per phase),
                                       each with its own tap controller (bandwidth, time delay); switched
                                       capacitors; the reference is the substation bus, UPSTREAM of them
``large``                     ~4,200   one feeder, a heavy trunk with long, light three-phase branches,
                                       substation LTC, four switched capacitor banks, ~250 three-phase
                                       services (``ABC``, ``3ph``)
``late_clocks``               ~3,900   another ``large`` feeder; 10% of the meters label the START of each
                                       interval (their series are one interval early in the export)
``lv_european``               360      seven LV networks of 3-125 customers, each below ONE three-phase
                                       MV/LV transformer (all its meters share its ``transformer_id``),
                                       230 V, single-phase customers on all phases, 15% three-phase,
                                       hourly; no references, no transformer label errors
``single_meter_transformers`` ~1,200   every meter alone on its transformer (IEEE 8500-like), a bank of
                                       three single-phase regulators, capacitors
``regulators_pv``             ~1,400   another ``regulators`` feeder (regulated phases B and C on the
                                       backbone), with rooftop PV (3-9 kW) on 30% of the homes
============================  =======  =====================================================================

Files are those of ``../shared/data/epri-ckt5/`` (``readings.parquet`` with ``meter_id, timestamp,
voltage_v, kw``; ``meters.csv``; ``transformers.csv``; ``references.parquet`` where the feeder has a
head reference; ``truth.csv``), sorted by meter id, timestamps at interval ENDs. Voltages are the true
interval means: the consumer applies the meter model (accuracy class, resolution, missing data)
itself. Only the late clocks are in the files, as a meter would export them; ``truth.csv`` then has a
``clock_shift_intervals`` column (1: the meter's timestamps are one interval early). A
``scenario.json`` records the parameters and the equipment's activity (tap changes, capacitor
switchings).

Applying the meter model, with missing data that grows with the hops from the RF-mesh collector::

    from phaseid_hpc.synth.measurement import MeasurementModel, apply_measurement_model, collector_distance_m
    from phaseid_hpc.synth.topology import latlon_to_xy

    xy = latlon_to_xy(meters.lat, meters.lon, meters.lat.mean(), meters.lon.mean())  # [m]
    model = MeasurementModel(accuracy_class=0.5, resolution_v=0.1, missing_fraction=0.05, missing_hop_m=400)
    dist = collector_distance_m(xy, random_state=seed)
    measured, _ = apply_measurement_model(voltage, model, interval_s=900, random_state=seed, distance_m=dist)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .generator import TimeGrid, _ar1, _region, _tables, truth_table
from .gis_errors import corrupt_labels
from .loads import customer_loads
from .powerflow import (
    V_LN_MV,
    Z_BACKBONE,
    capacitor_states,
    feeder_voltages,
    substation_bus_voltage,
    transformer_secondary_pu,
)
from .topology import (
    FeederLayout,
    FeederTopology,
    add_capacitors,
    add_line_regulators,
    build_feeder_topology,
    build_lv_network,
    main_path,
    xy_to_latlon,
)

__all__ = ["SCENARIOS", "ScenarioResult", "simulate_scenario", "write_scenario"]

_START = "2026-06-09"
_PHASE_ERRORS, _TRANSFORMER_ERRORS = 0.08, 0.03
_LAT0, _LON0 = 35.0, -90.0


@dataclass(frozen=True)
class _Spec:
    """What a scenario draws (see the module table)."""

    prefix: str
    n_meters: int
    layout: FeederLayout = field(default_factory=FeederLayout)
    backbone_regulators: dict[int, float] | None = None
    lateral_regulators: bool = False
    n_capacitors: int = 0
    late_clock_fraction: float = 0.0
    trunk_z: float = 1.0
    branch_z: float = 1.0
    ltc_set_point_pu: float = 1.035
    interval_s: int = 900
    lv: bool = False
    pv_fraction: float = 0.0


_LARGE = FeederLayout(
    bank_share=0.09,
    bank_meters=(1, 6),
    bank_services=(1.0, 0.0, 0.0, 0.0),
    three_phase_service="3ph",
    backbone_section_km=(0.20, 0.50),
    trunk_prob=0.5,
    meters_per_backbone_node=8,
)

_SPECS: dict[str, _Spec] = {
    "regulators": _Spec(
        "RG",
        1400,
        FeederLayout(long_laterals=3),
        backbone_regulators={0: 0.30, 2: 0.55},
        lateral_regulators=True,
        n_capacitors=3,
    ),
    # A heavy trunk and long, light three-phase branches: each branch's own load shapes its voltage.
    "large": _Spec("LG", 4200, _LARGE, n_capacitors=4, trunk_z=0.3, branch_z=2.0, ltc_set_point_pu=1.02),
    "late_clocks": _Spec(
        "LC",
        3900,
        _LARGE,
        n_capacitors=4,
        late_clock_fraction=0.10,
        trunk_z=0.3,
        branch_z=2.0,
        ltc_set_point_pu=1.02,
    ),
    "lv_european": _Spec("LV", 360, interval_s=3600, lv=True),
    "single_meter_transformers": _Spec(
        "SM",
        1200,
        FeederLayout(single_meter=True, bank_share=0.0),
        backbone_regulators={0: 0.45, 1: 0.45, 2: 0.45},
        n_capacitors=3,
    ),
    "regulators_pv": _Spec(
        "RP",
        1400,
        FeederLayout(long_laterals=3),
        backbone_regulators={1: 0.35, 2: 0.6},
        lateral_regulators=True,
        n_capacitors=3,
        pv_fraction=0.3,
    ),
}

#: Scenario names accepted by :func:`write_scenario`.
SCENARIOS: tuple[str, ...] = tuple(_SPECS)

#: Customers of each LV network of ``lv_european`` (3-125).
_LV_SIZES = (3, 12, 25, 45, 60, 90, 125)
#: Random stream keys.
_S_TOP, _S_LOAD, _S_EQUIP, _S_SUB, _S_GIS, _S_CLOCK, _S_PF = range(7)


def _rng(seed: int, scenario: str, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SCENARIOS.index(scenario), *key)))


@dataclass
class ScenarioResult:
    """One simulated scenario, in memory; rows of every table and array in meter-id order.

    Attributes
    ----------
    name : str
    meters : DataFrame
        ``meters.csv`` (GIS view).
    truth : DataFrame
        ``truth.csv`` (with ``clock_shift_intervals`` for late clocks).
    transformers : DataFrame
        ``transformers.csv``.
    references : DataFrame or None
        ``references.parquet`` (long format), or None where there is no head reference.
    voltage : ndarray, shape (n_meters, n_time), float32
        Exported voltage [V] (late clocks applied, no meter noise).
    kw : ndarray, shape (n_meters, n_time), float32
        Exported load [kW].
    times : DatetimeIndex
        Interval ends, UTC.
    equipment : dict
        Per feeder: ``ltc_tap`` (n_time,), ``regulator_tap`` (n_reg, n_time), ``regulator_node``,
        ``regulator_phase``, ``capacitor_on`` (n_cap, n_time); for tests and ``scenario.json``.
    topologies : dict of FeederTopology
        Per feeder id.
    topology_meter : ndarray, shape (n_meters,), int
        Index of each row's meter in its feeder's topology arrays.
    """

    name: str
    meters: pd.DataFrame
    truth: pd.DataFrame
    transformers: pd.DataFrame
    references: pd.DataFrame | None
    voltage: np.ndarray
    kw: np.ndarray
    times: pd.DatetimeIndex
    equipment: dict
    topologies: dict
    topology_meter: np.ndarray


def _grid(days: float, interval_s: int, extra: int = 0) -> TimeGrid:
    ts = pd.Timestamp(_START, tz="UTC")
    return TimeGrid(ts, float(interval_s), round(days * 86400 / interval_s) + extra)


def _upstream(rng: np.random.Generator, region_up: np.ndarray, grid: TimeGrid) -> np.ndarray:
    """Sub-transmission voltage per phase [pu], as the utility generator draws it."""
    return (
        1.0
        + region_up[None, :]
        + _ar1(rng, grid.n_time, np.exp(-grid.interval_s / 7200), 0.0015)[None, :]
        + _ar1(rng, grid.n_time, np.exp(-grid.interval_s / 3600), 0.0005, rows=3)
        + rng.normal(0, 0.004, (3, 1))
    )


def _loads(
    rng, top: FeederTopology, grid: TimeGrid, region, commercial: np.ndarray, pv_fraction: float = 0.0
):
    """Customer loads [kW], [kvar]; rooftop PV (3-9 kW) on a share of the residential customers."""
    hours, _, weekday = grid.local_calendar()
    pv = None
    if pv_fraction > 0:
        n = len(commercial)
        pv = np.where(rng.random(n) < pv_fraction, rng.uniform(3, 9, n), 0.0) * ~commercial
    return customer_loads(
        rng,
        hours,
        weekday,
        region.temperature,
        commercial,
        grid.interval_s / 3600,
        pv_kw=pv,
        irradiance=region.irradiance,
    )


# ------------------------------------------------------------------------------------------------
# MV scenarios: one feeder on its substation
# ------------------------------------------------------------------------------------------------


def _simulate_mv(name: str, spec: _Spec, seed: int, grid: TimeGrid, n_meters: int):
    region = _region(seed, grid)
    hours, _, weekday = grid.local_calendar()
    fid = f"{spec.prefix}000"
    top = build_feeder_topology(_rng(seed, name, _S_TOP), fid, n_meters, spec.layout)
    if (spec.trunk_z, spec.branch_z) != (1.0, 1.0):
        # Conductor sizes relative to 336 ACSR: a heavy trunk (556-795 kcmil), light three-phase
        # branches (1/0-4/0), as on a long, heavily loaded feeder.
        scale = np.where(top.node_three_phase, spec.branch_z, 1.0)
        scale[main_path(top)] = spec.trunk_z
        top.node_z_scale = scale
    commercial = top.meter_service != "1ph-240"
    kw, kvar = _loads(_rng(seed, name, _S_LOAD), top, grid, region, commercial, spec.pv_fraction)
    rng_eq = _rng(seed, name, _S_EQUIP)
    if spec.backbone_regulators or spec.lateral_regulators:
        top = add_line_regulators(
            top,
            rng_eq,
            backbone=spec.backbone_regulators,
            min_lateral_transformers=20 if spec.lateral_regulators else 10**9,
        )
    cap_on = None
    if spec.n_capacitors:
        head_q = kvar.sum(axis=0, dtype=np.float64)
        top = add_capacitors(top, rng_eq, head_q, n_banks=spec.n_capacitors)
        cap_on = capacitor_states(top.capacitors, head_q, hours, weekday)
    fv = feeder_voltages(top, kw, kvar, _rng(seed, name, _S_PF), cap_on=cap_on)
    rng_sub = _rng(seed, name, _S_SUB)
    up = _upstream(rng_sub, region.upstream, grid)
    v_bus, ltc = substation_bus_voltage(
        rng_sub,
        up,
        fv.feeder_p,
        fv.feeder_q,
        interval_s=grid.interval_s,
        set_point_pu=spec.ltc_set_point_pu,
    )
    v, reg_tap = fv.meter_voltage(v_bus, interval_s=grid.interval_s)
    regs = top.regulators
    equipment = {
        "ltc_tap": ltc,
        "regulator_tap": reg_tap,
        "regulator_node": np.array([], int) if regs is None else regs.node,
        "regulator_phase": np.array([], int) if regs is None else regs.phase,
        "capacitor_on": np.zeros((0, grid.n_time), bool) if cap_on is None else cap_on,
    }
    meters, xf, order = _tables(top, fid, seed, SCENARIOS.index(name), _PHASE_ERRORS, _TRANSFORMER_ERRORS)
    refs = pd.DataFrame((v_bus * V_LN_MV).astype(np.float32), index=pd.Index(list("ABC"), name="phase"))
    return [(fid, top, meters, xf, order, v[order], kw[order], refs, equipment)]


# ------------------------------------------------------------------------------------------------
# LV scenario: European LV networks below MV/LV transformers on one MV feeder
# ------------------------------------------------------------------------------------------------


def _lv_tables(top: FeederTopology, fid: str, rng: np.random.Generator, fidx: int):
    """Meters (GIS + truth) and the one transformer of an LV network; phase errors only."""
    n = top.n_meters
    x_id = f"{fid}-T{int(rng.integers(0, 100_000)):05d}"
    m_ids = np.array([f"{fid}-M{k:06d}" for k in rng.permutation(n)])
    _, gis_ph = corrupt_labels(top, rng, _PHASE_ERRORS, 0.0)
    lat, lon = xy_to_latlon(top.meter_xy + np.array([1500.0 * fidx, 0.0]), _LAT0 + 10, _LON0)
    meters = pd.DataFrame(
        {
            "meter_id": m_ids,
            "feeder_id": fid,
            "transformer_id": x_id,
            "phase": gis_ph,
            "service_type": top.meter_service,
            "nominal_v": top.meter_nominal_v,
            "lat": np.round(lat, 6),
            "lon": np.round(lon, 6),
            "true_transformer_id": x_id,
            "true_phase": top.meter_phase,
        }
    )
    order = np.lexsort((meters.meter_id.to_numpy(), meters.transformer_id.to_numpy()))
    return meters.iloc[order].reset_index(drop=True), order


def _simulate_lv(name: str, spec: _Spec, seed: int, grid: TimeGrid, n_meters: int):
    region = _region(seed, grid)
    hours, _, weekday = grid.local_calendar()
    sizes = np.maximum(3, np.round(np.array(_LV_SIZES) * n_meters / spec.n_meters).astype(int))
    rng_eq = _rng(seed, name, _S_EQUIP)
    # Background load of the MV feeder (other LV networks, not exported): 250 customers times 12.
    rng_bg = _rng(seed, name, _S_LOAD, 999)
    bg_kw, bg_kvar = customer_loads(
        rng_bg, hours, weekday, region.temperature, np.zeros(250, bool), grid.interval_s / 3600
    )
    share = rng_eq.dirichlet([40, 40, 40])[:, None]
    bg_p = 12 * share * bg_kw.sum(axis=0, dtype=np.float64)[None, :]
    bg_q = 12 * share * bg_kvar.sum(axis=0, dtype=np.float64)[None, :]
    nets = []
    tot_p, tot_q = bg_p.copy(), bg_q.copy()
    for i, n in enumerate(sizes):
        fid = f"{spec.prefix}{i:03d}"
        top = build_lv_network(_rng(seed, name, _S_TOP, i), fid, int(n))
        commercial = np.zeros(top.n_meters, bool)
        kw, kvar = _loads(_rng(seed, name, _S_LOAD, i), top, grid, region, commercial)
        kw[top.meter_phase == "ABC"] *= 2.5  # three-phase customers: heat pumps, workshops, EV chargers
        kvar[top.meter_phase == "ABC"] *= 2.5
        fv = feeder_voltages(top, kw, kvar, _rng(seed, name, _S_PF, i))
        tot_p += fv.feeder_p
        tot_q += fv.feeder_q
        nets.append((i, fid, top, kw, kvar, fv))
    rng_sub = _rng(seed, name, _S_SUB)
    up = _upstream(rng_sub, region.upstream, grid)
    v_bus, ltc = substation_bus_voltage(rng_sub, up, tot_p, tot_q, interval_s=grid.interval_s)
    # MV drop to each MV/LV transformer: the feeder's load, spread along it (effective half length).
    theta = np.deg2rad([0.0, -120.0, 120.0])
    zb = Z_BACKBONE * np.exp(1j * (theta[None, :] - theta[:, None]))
    out = []
    for i, fid, top, kw, kvar, fv in nets:
        d_eff = 0.5 * rng_eq.uniform(1.0, 8.0)  # [km]
        mv_drop = d_eff * (zb.real @ tot_p + zb.imag @ tot_q) * 1000.0 / V_LN_MV**2
        peak = fv.feeder_p.sum(axis=0).max()
        kva = float(next(s for s in (100, 160, 250, 400, 630, 1000, 1600) if s >= 1.25 * peak))
        tap = 1.0 + 0.025 * rng_eq.choice([0, 1, 1])
        head = transformer_secondary_pu((v_bus - mv_drop) * tap, fv.feeder_p, fv.feeder_q, kva, 0.01, 0.04)
        v, _ = fv.meter_voltage(head, interval_s=grid.interval_s)
        meters, order = _lv_tables(top, fid, _rng(seed, name, _S_GIS, i), i)
        xf = pd.DataFrame(
            {
                "transformer_id": [meters.transformer_id.iloc[0]],
                "feeder_id": fid,
                "kva_rating": kva,
                "n_phases": 3,
            }
        )
        equipment = {
            "ltc_tap": ltc,
            "regulator_tap": np.zeros((0, grid.n_time), np.int64),
            "regulator_node": np.array([], int),
            "regulator_phase": np.array([], int),
            "capacitor_on": np.zeros((0, grid.n_time), bool),
        }
        out.append((fid, top, meters, xf, order, v[order], kw[order], None, equipment))
    return out


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def simulate_scenario(
    name: str,
    *,
    seed: int = 0,
    days: float = 14,
    interval_s: int | None = None,
    n_meters: int | None = None,
) -> ScenarioResult:
    """Simulate a named scenario in memory.

    Parameters
    ----------
    name : str
        One of :data:`SCENARIOS`.
    seed : int
        Seed of everything; the same seed gives the same data.
    days : float
        Length of the series [days].
    interval_s : int, optional
        Interval [s]; default 900, 3600 for ``lv_european``.
    n_meters : int, optional
        Scale the scenario to about this many meters (tests); default the scenario's size.

    Returns
    -------
    ScenarioResult
    """
    if name not in _SPECS:
        raise ValueError(f"unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}")
    spec = _SPECS[name]
    interval_s = int(interval_s or spec.interval_s)
    late = spec.late_clock_fraction > 0
    # Late meters report the interval after: simulate one interval more and cut each meter's window.
    grid = _grid(days, interval_s, extra=int(late))
    n = int(n_meters or spec.n_meters)
    feeders = (_simulate_lv if spec.lv else _simulate_mv)(name, spec, seed, grid, n)
    out_grid = _grid(days, interval_s)
    metas, truths, xfs, refs, volts, kws = [], [], [], [], [], []
    equipment, tops, orders = {}, {}, []
    for fid, top, meters, xf, order, v, kw, ref, eq in feeders:
        shift = np.zeros(len(meters), np.int64)
        if late:
            rng = _rng(seed, name, _S_CLOCK)
            shift[rng.random(len(meters)) < spec.late_clock_fraction] = 1
            rows = np.arange(out_grid.n_time)[None, :] + shift[:, None]
            v = np.take_along_axis(v, rows, axis=1)
            kw = np.take_along_axis(kw, rows, axis=1)
            n_out = out_grid.n_time
            eq = {k: (a[..., :n_out] if a.shape[-1:] == (grid.n_time,) else a) for k, a in eq.items()}
            if ref is not None:
                ref = ref.iloc[:, : out_grid.n_time]
        truth = truth_table(meters, fid)
        if late:
            truth["clock_shift_intervals"] = shift
        metas.append(meters.drop(columns=["true_transformer_id", "true_phase"]))
        truths.append(truth)
        xfs.append(xf)
        if ref is not None:
            refs.append(
                pd.DataFrame(
                    {
                        "feeder_id": fid,
                        "phase": np.repeat(ref.index.to_numpy(), out_grid.n_time),
                        "timestamp": np.tile(out_grid.times, 3),
                        "voltage_v": ref.to_numpy(np.float32).ravel(),
                    }
                )
            )
        volts.append(v)
        kws.append(np.round(kw, 3).astype(np.float32))
        equipment[fid], tops[fid] = eq, top
        orders.append(order)
    meters = pd.concat(metas, ignore_index=True)
    by_id = np.argsort(meters.meter_id.to_numpy(), kind="stable")
    truth = pd.concat(truths, ignore_index=True).iloc[by_id].reset_index(drop=True)
    xfs = pd.concat(xfs, ignore_index=True).sort_values("transformer_id", kind="stable")
    return ScenarioResult(
        name=name,
        meters=meters.iloc[by_id].reset_index(drop=True),
        truth=truth,
        transformers=xfs.reset_index(drop=True),
        references=pd.concat(refs, ignore_index=True) if refs else None,
        voltage=np.concatenate(volts)[by_id],
        kw=np.concatenate(kws)[by_id],
        times=out_grid.times,
        equipment=equipment,
        topologies=tops,
        topology_meter=np.concatenate(orders)[by_id],
    )


def write_scenario(
    name: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    days: int = 14,
    interval_s: int | None = None,
) -> Path:
    """Write a named scenario as a noise-free feeder export (the format of ``../shared/data/epri-ckt5``).

    Parameters
    ----------
    name : str
        One of :data:`SCENARIOS`.
    out_dir : path-like
        Created if needed; receives ``readings.parquet``, ``meters.csv``, ``transformers.csv``,
        ``references.parquet`` (where the scenario has a head reference), ``truth.csv`` and
        ``scenario.json``.
    seed : int
    days : int
        [days]
    interval_s : int, optional
        [s]; default 900, 3600 for ``lv_european``.

    Returns
    -------
    Path
        ``out_dir``.
    """
    res = simulate_scenario(name, seed=seed, days=days, interval_s=interval_s)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, n_t = res.voltage.shape
    t_us = res.times.as_unit("us").asi8
    readings = pa.table(
        {
            "meter_id": pa.array(np.repeat(res.meters.meter_id.to_numpy(), n_t), pa.string()),
            "timestamp": pa.array(np.tile(t_us, n), pa.timestamp("us", tz="UTC")),
            "voltage_v": pa.array(res.voltage.ravel(), pa.float32()),
            "kw": pa.array(res.kw.ravel(), pa.float32()),
        }
    )
    pq.write_table(readings, out / "readings.parquet", compression="zstd", row_group_size=1_000_000)
    res.meters.to_csv(out / "meters.csv", index=False)
    res.transformers.to_csv(out / "transformers.csv", index=False)
    res.truth.to_csv(out / "truth.csv", index=False)
    ref_path = out / "references.parquet"
    if res.references is not None:
        r = res.references
        pq.write_table(
            pa.table(
                {
                    "feeder_id": pa.array(r.feeder_id.to_numpy(), pa.string()),
                    "phase": pa.array(r.phase.to_numpy(), pa.string()),
                    "timestamp": pa.array(
                        pd.DatetimeIndex(r.timestamp).as_unit("us").asi8, pa.timestamp("us", tz="UTC")
                    ),
                    "voltage_v": pa.array(r.voltage_v.to_numpy(np.float32), pa.float32()),
                }
            ),
            ref_path,
            compression="zstd",
        )
    elif ref_path.exists():
        ref_path.unlink()
    summary = {
        "scenario": name,
        "seed": seed,
        "days": days,
        "interval_s": int(res.times[1].timestamp() - res.times[0].timestamp()) if n_t > 1 else None,
        "n_meters": n,
        "n_time": n_t,
        "n_feeders": int(res.meters.feeder_id.nunique()),
        "n_transformers": len(res.transformers),
        "n_phase_corrupted": int(res.truth.phase_label_corrupted.sum()),
        "n_transformer_corrupted": int(res.truth.transformer_label_corrupted.sum()),
        "n_three_phase_services": int((res.meters.service_type.astype(str).str.startswith("3ph")).sum()),
        "n_late_clocks": int(res.truth.get("clock_shift_intervals", pd.Series([0])).sum()),
        "equipment": {
            fid: {
                "ltc_tap_changes": int((np.diff(eq["ltc_tap"]) != 0).sum()),
                "line_regulators": [
                    {
                        "phase": "ABC"[int(p)],
                        "tap_changes": int((np.diff(t) != 0).sum()),
                        "tap_range": [int(t.min()), int(t.max())],
                    }
                    for p, t in zip(eq["regulator_phase"], eq["regulator_tap"], strict=True)
                ],
                "capacitor_switchings": (np.diff(eq["capacitor_on"].astype(int), axis=1) != 0)
                .sum(axis=1)
                .tolist(),
            }
            for fid, eq in res.equipment.items()
        },
    }
    (out / "scenario.json").write_text(json.dumps(summary, indent=1) + "\n")
    return out
