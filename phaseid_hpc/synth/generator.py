"""Synthetic utility with ground truth, written in the data contract, substation by substation on Dask.

The unit of work is a *substation*: its feeders share the bus, whose voltage (sub-transmission AR(1)
variation, substation transformer drop, discrete LTC tap steps with a deadband) is the head voltage of
every feeder on it. The run has two steps, each a set of Dask tasks over blocks of whole substations:
(1) the meter and transformer tables (topology and GIS only), from which the client creates the store;
(2) the simulation: a task holds one substation's arrays at a time (bounded memory), writes its readings
part file and the store chunks that lie wholly inside its rows straight to their chunk files; the client
writes the few chunks shared by two neighbouring blocks as soon as both are in.

Random streams are keyed by ``numpy.random.SeedSequence(seed, spawn_key=...)`` on (stream, substation or
feeder index), so a feeder's data do not depend on the number of workers, the blocking, or which other
feeders are generated: the same seed gives byte-identical files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .._memory import heap_for_arrays
from ..contract import TRUTH_COLUMNS
from .gis_errors import corrupt_labels
from .loads import ar1_filter, customer_loads, weather_temperature
from .measurement import MeasurementModel, apply_measurement_model, collector_distance_m
from .powerflow import V_LN_MV, feeder_drops, substation_bus_voltage
from .topology import FeederTopology, build_feeder_topology, xy_to_latlon

__all__ = [
    "FeederSimulation",
    "SynthResult",
    "generate_utility",
    "plan_utility",
    "simulate_feeder",
    "simulate_substation",
]

#: Stream keys of the SeedSequence tree.
_S_PLAN, _S_REGION, _S_SUB, _S_FEEDER, _S_GIS, _S_MEAS = range(6)
#: Local standard time of the synthetic utility relative to UTC [h].
_UTC_OFFSET_H = -5.0
_LAT0, _LON0 = 35.0, -90.0
#: Default meter model: class 0.5, 0.1 V (immutable, so a safe default argument).
_DEFAULT_MODEL = MeasurementModel()
#: Above this many meters the readings are written as a directory of part files by default.
_PARTITION_ABOVE = 200_000


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(key)))


@dataclass(frozen=True)
class TimeGrid:
    """The regular time grid: ``times`` are interval ENDs, UTC."""

    start: pd.Timestamp
    interval_s: float
    n_time: int

    @property
    def times(self) -> pd.DatetimeIndex:
        step = pd.Timedelta(seconds=self.interval_s)
        return pd.date_range(self.start + step, periods=self.n_time, freq=step, tz="UTC")

    def local_calendar(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local hour of the interval midpoint [h], day index and weekday (0 = Monday)."""
        mid = self.times - pd.Timedelta(seconds=self.interval_s / 2) + pd.Timedelta(hours=_UTC_OFFSET_H)
        hours = (mid.hour + mid.minute / 60 + mid.second / 3600).to_numpy(dtype=float)
        day0 = mid[0].normalize()
        day = ((mid.normalize() - day0).days).to_numpy()
        return hours, day, mid.day_of_week.to_numpy()


def _make_grid(start: str | pd.Timestamp, days: float, interval: str | pd.Timedelta) -> TimeGrid:
    ts = pd.Timestamp(start)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    step = pd.Timedelta(interval).total_seconds()
    return TimeGrid(ts, step, round(days * 86400 / step))


@dataclass
class _Region:
    temperature: np.ndarray
    irradiance: np.ndarray
    upstream: np.ndarray


def _region(seed: int, grid: TimeGrid) -> _Region:
    """Series shared by the whole utility: weather, sun, transmission voltage."""
    rng = _rng(seed, _S_REGION)
    hours, day, _ = grid.local_calendar()
    temp = weather_temperature(rng, hours, day)
    clear = np.clip(np.sin(np.pi * (hours - 6.0) / 14.0), 0, None)
    n_days = int(day.max()) + 1
    cloud = np.clip(rng.uniform(0.3, 1.0, n_days)[day] + 0.15 * rng.standard_normal(grid.n_time), 0, 1)
    # Transmission voltage: slow AR(1), time constant 8 h, s.d. 0.3%.
    up = _ar1(rng, grid.n_time, np.exp(-grid.interval_s / (8 * 3600)), 0.003)
    return _Region(temp, clear * cloud, up)


def _ar1(rng: np.random.Generator, n: int, phi: float, sd: float, rows: int | None = None) -> np.ndarray:
    """Stationary AR(1) series with marginal s.d. ``sd``; shape (n,) or (rows, n)."""
    shape = (n,) if rows is None else (rows, n)
    e = rng.standard_normal(shape) * sd * np.sqrt(1 - phi**2)
    e[..., 0] = rng.standard_normal(shape[:-1]) * sd
    return ar1_filter(e, phi)


def plan_utility(
    n_meters: int, seed: int, feeder_meters: tuple[int, int] = (300, 4000)
) -> list[list[tuple[int, int]]]:
    """Split ``n_meters`` into substations of 1-4 feeders of ``feeder_meters`` (default ~300-4000) meters.

    Returns
    -------
    list of substations, each a list of ``(feeder_index, n_meters_on_feeder)``.
    """
    rng = _rng(seed, _S_PLAN)
    sizes: list[int] = []
    left = n_meters
    while left > 0:
        lo, hi = feeder_meters
        k = int(np.clip(rng.lognormal(np.log(np.sqrt(lo * hi) if (lo, hi) != (300, 4000) else 1500), 0.45), lo, hi))
        if left - k < lo // 2:
            k = left
        sizes.append(k)
        left -= k
    subs: list[list[tuple[int, int]]] = []
    i = 0
    while i < len(sizes):
        k = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.35, 0.35, 0.15]))
        subs.append([(j, sizes[j]) for j in range(i, min(i + k, len(sizes)))])
        i += k
    return subs


@dataclass
class FeederSimulation:
    """One simulated feeder, rows in output order (feeder, GIS transformer, meter id).

    Attributes
    ----------
    meters : DataFrame
        Contract ``meters.csv`` columns (GIS view) plus ``true_transformer_id``, ``true_phase``.
    truth : DataFrame
        ``truth.csv`` columns.
    transformers : DataFrame
        ``transformers.csv`` columns.
    references : DataFrame
        Index phase ``A/B/C``; feeder-head line-to-neutral voltage, shape (3, n_time) [V].
    voltage : ndarray, shape (n_meters, n_time), float32
        True interval-mean voltage [V].
    measured : ndarray, shape (n_meters, n_time), float32
        Reported voltage after the measurement model, NaN where missing [V].
    kw, kvar : ndarray, shape (n_meters, n_time), float32
        Meter load [kW], [kvar].
    clock_offset_s : ndarray, shape (n_meters,)
        True clock offset of each meter [s].
    tap : ndarray, shape (n_time,), int
        Substation LTC tap position.
    times : DatetimeIndex
    """

    feeder_id: str
    meters: pd.DataFrame
    truth: pd.DataFrame
    transformers: pd.DataFrame
    references: pd.DataFrame
    voltage: np.ndarray
    measured: np.ndarray
    kw: np.ndarray
    kvar: np.ndarray
    clock_offset_s: np.ndarray
    tap: np.ndarray
    times: pd.DatetimeIndex
    topology: FeederTopology = field(repr=False, default=None)
    #: Row ``i`` of the tables is row ``order[i]`` of the topology's meter arrays.
    order: np.ndarray = field(repr=False, default=None)


def _feeder_id(i: int) -> str:
    return f"F{i:05d}"


def _tables(
    top: FeederTopology,
    fid: str,
    seed: int,
    fidx: int,
    phase_error_rate: float,
    transformer_error_rate: float,
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Meters (GIS + truth) and transformers tables, and the output order of the meters."""
    rng = _rng(seed, _S_GIS, fidx)
    n, n_x = top.n_meters, len(top.xfmr_kva)
    x_ids = np.array([f"{fid}-T{k:05d}" for k in rng.permutation(n_x)])
    m_ids = np.array([f"{fid}-M{k:06d}" for k in rng.permutation(n)])
    gis_x, gis_ph = corrupt_labels(top, rng, phase_error_rate, transformer_error_rate)
    lat, lon = xy_to_latlon(top.meter_xy + 40_000 * np.array([fidx % 50, fidx // 50]), _LAT0, _LON0)
    meters = pd.DataFrame(
        {
            "meter_id": m_ids,
            "feeder_id": fid,
            "transformer_id": x_ids[gis_x],
            "phase": gis_ph,
            "service_type": top.meter_service,
            "nominal_v": top.meter_nominal_v,
            "lat": np.round(lat, 6),
            "lon": np.round(lon, 6),
            "true_transformer_id": x_ids[top.meter_xfmr],
            "true_phase": top.meter_phase,
        }
    )
    order = np.lexsort((meters.meter_id.to_numpy(), meters.transformer_id.to_numpy()))
    meters = meters.iloc[order].reset_index(drop=True)
    xf = (
        pd.DataFrame(
            {
                "transformer_id": x_ids,
                "feeder_id": fid,
                "kva_rating": top.xfmr_kva,
                "n_phases": np.where(top.xfmr_phase == "ABC", 3, 1),
            }
        )
        .sort_values("transformer_id", kind="stable")
        .reset_index(drop=True)
    )
    return meters, xf, order


@dataclass
class _FeederLoads:
    """One feeder before its substation's bus voltage is known (see :func:`_feeder_loads`)."""

    fidx: int
    top: FeederTopology
    #: Meter loads, shape (n_meters, n_time), float32, topology order [kW], [kvar].
    kw: np.ndarray
    kvar: np.ndarray
    #: Head-phase weights of each meter, shape (n_meters, 3) [-].
    head_weight: np.ndarray
    #: Voltage drop of each meter below its head, shape (n_meters, n_time) [V].
    drop: np.ndarray
    #: Per-phase load at the feeder head, shape (3, n_time) [kW], [kvar].
    feeder_p: np.ndarray
    feeder_q: np.ndarray


def _feeder_loads(
    seed: int,
    fidx: int,
    n_meters: int,
    grid: TimeGrid,
    *,
    hours: np.ndarray,
    weekday: np.ndarray,
    region: _Region,
    pv_fraction: float,
) -> _FeederLoads:
    """Topology, customer loads (with rooftop PV) and voltage drops of one feeder.

    Every draw comes from the feeder's own stream ``(_S_FEEDER, fidx)``, in the order topology, PV,
    loads, transformer impedances.

    Parameters
    ----------
    hours, weekday : ndarray, shape (n_time,)
        Local hour of the interval midpoint [h] and weekday (0 = Monday).
    pv_fraction : float
        Share of residential customers with rooftop PV [-].
    """
    rng = _rng(seed, _S_FEEDER, fidx)
    top = build_feeder_topology(rng, _feeder_id(fidx), n_meters)
    commercial = top.meter_service != "1ph-240"
    pv = np.where(rng.random(n_meters) < pv_fraction, rng.uniform(3, 9, n_meters), 0.0) * ~commercial
    kw, kvar = customer_loads(
        rng,
        hours,
        weekday,
        region.temperature,
        commercial,
        grid.interval_s / 3600,
        pv_kw=pv if pv_fraction > 0 else None,
        irradiance=region.irradiance,
    )
    w, drop, fp, fq = feeder_drops(top, kw, kvar, rng)
    return _FeederLoads(fidx, top, kw.astype(np.float32), kvar.astype(np.float32), w, drop, fp, fq)


def _substation_load(loads: list[_FeederLoads], n_time: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-phase load on the substation bus, shape (3, n_time) [kW], [kvar], summed in feeder order."""
    tot_p = np.zeros((3, n_time))
    tot_q = np.zeros((3, n_time))
    for part in loads:
        tot_p += part.feeder_p
        tot_q += part.feeder_q
    return tot_p, tot_q


def _subtransmission_voltage(rng_sub: np.random.Generator, region: _Region, grid: TimeGrid) -> np.ndarray:
    """Sub-transmission voltage per phase at the substation, shape (3, n_time) [pu].

    The regional component + this substation's own AR(1) (2 h, 0.15%) + a small per-phase unbalance
    (1 h, 0.05%) + a fixed per-phase offset, drawn from ``rng_sub`` in that order.
    """
    return (
        1.0
        + region.upstream[None, :]
        + _ar1(rng_sub, grid.n_time, np.exp(-grid.interval_s / 7200), 0.0015)[None, :]
        + _ar1(rng_sub, grid.n_time, np.exp(-grid.interval_s / 3600), 0.0005, rows=3)
        + rng_sub.normal(0, 0.004, (3, 1))
    )


def _measured_voltage(
    v: np.ndarray,
    measurement: MeasurementModel | None,
    meter_xy: np.ndarray,
    *,
    seed: int,
    fidx: int,
    interval_s: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Reported voltage, shape (n_meters, n_time), float32 [V], and clock offsets, shape (n_meters,) [s].

    ``measurement=None`` reports ``v`` itself with zero offsets. ``meter_xy`` [m] is in the row order of
    ``v``; it sets the hops to the collector when the model loses readings with distance.
    """
    if measurement is None:
        return v, np.zeros(len(v))
    dist = None
    if measurement.missing_hop_m > 0:  # RF-mesh loss grows with the hops to the collector
        dist = collector_distance_m(meter_xy, random_state=_rng(seed, _S_MEAS, fidx, 1))
    meas, off = apply_measurement_model(
        v,
        measurement,
        interval_s=interval_s,
        random_state=_rng(seed, _S_MEAS, fidx),
        distance_m=dist,
    )
    return meas.astype(np.float32), off


def _finish_feeder(
    part: _FeederLoads,
    v_bus: np.ndarray,
    tap: np.ndarray,
    grid: TimeGrid,
    *,
    seed: int,
    measurement: MeasurementModel | None,
    phase_error_rate: float,
    transformer_error_rate: float,
    keep_topology: bool,
) -> FeederSimulation:
    """Meter voltages under the bus ``v_bus``, shape (3, n_time) [pu]; tables and readings in output order."""
    fid, top = _feeder_id(part.fidx), part.top
    tap_x = top.xfmr_tap[top.meter_xfmr]
    v = (top.meter_nominal_v * tap_x)[:, None] * (part.head_weight @ v_bus) - part.drop
    meters, xf, order = _tables(top, fid, seed, part.fidx, phase_error_rate, transformer_error_rate)
    v = v[order].astype(np.float32)
    # What a meter register reports [kW], [kvar].
    kw, kvar = np.round(part.kw[order], 3), np.round(part.kvar[order], 3)
    meas, off = _measured_voltage(
        v, measurement, top.meter_xy[order], seed=seed, fidx=part.fidx, interval_s=grid.interval_s
    )
    truth = truth_table(meters, fid)
    refs = pd.DataFrame((v_bus * V_LN_MV).astype(np.float32), index=pd.Index(list("ABC"), name="phase"))
    return FeederSimulation(
        fid,
        meters,
        truth,
        xf,
        refs,
        v,
        meas,
        kw,
        kvar,
        off,
        tap,
        grid.times,
        top if keep_topology else None,
        order,
    )


def simulate_substation(
    sub_index: int,
    feeders: list[tuple[int, int]],
    grid: TimeGrid,
    *,
    seed: int,
    measurement: MeasurementModel | None,
    phase_error_rate: float,
    transformer_error_rate: float,
    pv_fraction: float,
    region: _Region | None = None,
    keep_topology: bool = False,
) -> list[FeederSimulation]:
    """Simulate every feeder of one substation (pure, in memory).

    Parameters
    ----------
    sub_index : int
        Substation number (keys its random stream).
    feeders : list of (feeder_index, n_meters)
    grid : TimeGrid
    seed : int
    measurement : MeasurementModel or None
        ``None`` reports the true voltages (no noise, no rounding, nothing missing).
    phase_error_rate, transformer_error_rate, pv_fraction : float
        Shares of meters [-].
    region : _Region, optional
        Shared series (computed from ``seed`` when omitted).

    Returns
    -------
    list of FeederSimulation
    """
    region = region if region is not None else _region(seed, grid)
    hours, _, weekday = grid.local_calendar()
    loads = [
        _feeder_loads(
            seed, fidx, n_m, grid, hours=hours, weekday=weekday, region=region, pv_fraction=pv_fraction
        )
        for fidx, n_m in feeders
    ]
    rng_sub = _rng(seed, _S_SUB, sub_index)
    up = _subtransmission_voltage(rng_sub, region, grid)
    tot_p, tot_q = _substation_load(loads, grid.n_time)
    v_bus, tap = substation_bus_voltage(rng_sub, up, tot_p, tot_q, interval_s=grid.interval_s)
    return [
        _finish_feeder(
            part,
            v_bus,
            tap,
            grid,
            seed=seed,
            measurement=measurement,
            phase_error_rate=phase_error_rate,
            transformer_error_rate=transformer_error_rate,
            keep_topology=keep_topology,
        )
        for part in loads
    ]


def simulate_feeder(
    n_meters: int = 300,
    days: float = 7,
    *,
    interval: str = "15min",
    seed: int = 0,
    start: str = "2026-06-01",
    measurement: MeasurementModel | None = None,
    phase_error_rate: float = 0.08,
    transformer_error_rate: float = 0.03,
    pv_fraction: float = 0.0,
) -> FeederSimulation:
    """One feeder alone on its substation, in memory (for tests and notebooks).

    ``measurement=None`` returns the true voltages also as ``measured``.

    Examples
    --------
    >>> sim = simulate_feeder(60, days=2, seed=1)
    >>> sim.voltage.shape
    (60, 192)
    """
    grid = _make_grid(start, days, interval)
    return simulate_substation(
        0,
        [(0, n_meters)],
        grid,
        seed=seed,
        measurement=measurement,
        phase_error_rate=phase_error_rate,
        transformer_error_rate=transformer_error_rate,
        pv_fraction=pv_fraction,
        keep_topology=True,
    )[0]


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def _readings_table(sim: FeederSimulation) -> pa.Table:
    n, n_t = sim.measured.shape
    t_us = sim.times.as_unit("us").asi8
    valid = ~np.isnan(sim.measured).ravel()
    idx = np.repeat(np.arange(n, dtype=np.int32), n_t)[valid]
    # Dictionary of the meters present, in order of appearance (what re-encoding the column gives).
    has = np.bincount(idx, minlength=n) > 0
    present = np.flatnonzero(has)
    idx = (np.cumsum(has) - 1)[idx]
    ids = pa.array(sim.meters.meter_id.to_numpy()[present], pa.string())
    cols = {
        "meter_id": pa.DictionaryArray.from_arrays(idx.astype(np.int32), ids),
        "timestamp": pa.array(np.tile(t_us, n)[valid], pa.timestamp("us", tz="UTC")),
        "voltage_v": pa.array(sim.measured.ravel()[valid], pa.float32()),
        "kw": pa.array(np.round(sim.kw, 3).ravel()[valid], pa.float32()),
        "kvar": pa.array(np.round(sim.kvar, 3).ravel()[valid], pa.float32()),
    }
    return pa.table(cols)


#: Rows per Parquet row group of ``readings.parquet``.
_ROW_GROUP = 4_000_000


class _Sink:
    """A Parquet file written table by table (opened at the first table)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: pq.ParquetWriter | None = None

    def write(self, tab: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, tab.schema, compression="zstd", store_schema=False)
        self.writer.write_table(tab, row_group_size=_ROW_GROUP)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _block_tables(
    subs: list[tuple[int, list[tuple[int, int]]]], params: dict
) -> dict[str, pd.DataFrame]:
    """Meters (GIS view and truth) and transformers of a block's feeders, from topology and GIS only.

    Cheap next to the simulation (no time series); what the store is created from before the blocks run.
    """
    meters, xfs = [], []
    for _, feeders in subs:
        for fidx, n_m in feeders:
            top = build_feeder_topology(_rng(params["seed"], _S_FEEDER, fidx), _feeder_id(fidx), n_m)
            m, x, _ = _tables(
                top,
                _feeder_id(fidx),
                params["seed"],
                fidx,
                params["phase_error_rate"],
                params["transformer_error_rate"],
            )
            meters.append(m)
            xfs.append(x)
    return {"meters": pd.concat(meters, ignore_index=True), "transformers": pd.concat(xfs, ignore_index=True)}


def _run_block(
    block: int,
    subs: list[tuple[int, list[tuple[int, int]]]],
    grid: TimeGrid,
    params: dict,
    parts_dir: str | None,
    store: dict | None,
    sink: _Sink | None = None,
) -> dict[str, Any]:
    """One Dask task: simulate some substations, write their readings part file and store rows.

    With a store, rows of the block that fill whole storage chunks are written here; the rows in the
    partial chunks at the block's two edges are returned encoded (``edges``) for the caller to write once
    both neighbours are in, since two tasks writing one chunk would race.

    Returns
    -------
    dict
        ``references``: list of ``(feeder_id, ndarray shape (3, n_time) float32 [V])`` in block order;
        ``edges``: list of ``(row0, row1, {variable: encoded rows})``.
    """
    with heap_for_arrays():
        return _simulate_block(block, subs, grid, params, parts_dir, store, sink)


def _simulate_block(
    block: int,
    subs: list[tuple[int, list[tuple[int, int]]]],
    grid: TimeGrid,
    params: dict,
    parts_dir: str | None,
    store: dict | None,
    sink: _Sink | None,
) -> dict[str, Any]:
    region = _region(params["seed"], grid)
    refs: list[tuple[str, np.ndarray]] = []
    rows = None
    if store is not None:
        fids = [_feeder_id(f) for _, feeders in subs for f, _ in feeders]
        b0 = store["offsets"][fids[0]]
        b1 = store["offsets"][fids[-1]] + store["sizes"][fids[-1]]
        c = store["meter_chunk"]
        in0, in1 = -(-b0 // c) * c, (b1 // c) * c
        if in1 <= in0:
            in0 = in1 = b1
        rows = _StoreRows(store["path"], in0, in1)
    path = None if parts_dir is None else Path(parts_dir) / f"part-{block:05d}.parquet"
    own_sink = sink is None and path is not None
    if own_sink:
        sink = _Sink(path)
    for sub_index, feeders in subs:
        for sim in simulate_substation(sub_index, feeders, grid, region=region, **params):
            refs.append((sim.feeder_id, sim.references.to_numpy(np.float32)))
            if sink is not None:
                sink.write(_readings_table(sim))
            if rows is not None:
                rows.add(store["offsets"][sim.feeder_id], {"voltage": sim.measured, "kw": sim.kw})
            del sim
    if own_sink:
        sink.close()
    return {"references": refs, "edges": rows.close() if rows is not None else []}


def _store_arrays(path: Path, variables: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
    """``{variable: (zarr array, ChunkCodec or None)}`` of a store's (meter, time) arrays."""
    import zarr

    from ..store import ChunkCodec

    group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    return {v: (group[v], ChunkCodec.of(group[v])) for v in variables}


def _encode_rows(name: str, arr: Any, values: np.ndarray) -> np.ndarray:
    """Decoded rows [V], [kW] (NaN = missing) in the array's stored dtype."""
    from ..store import encode_voltage

    if name == "voltage" and arr.dtype == np.int16:
        return encode_voltage(values, "int16_decivolt")
    return values.astype(arr.dtype, copy=False)


def _write_whole_chunks(path: Path, name: str, arr: Any, codec: Any, row0: int, rows: np.ndarray) -> None:
    """Write encoded rows ``[row0, row0 + len(rows))``, whole storage chunks along ``meter`` (the last one
    may stop at the array's end), straight to their chunk files: the bytes Zarr writes for them, each
    chunk padded with the fill value beyond the array's shape."""
    from ..store import _write_file

    c0, c1 = arr.chunks
    if codec is None:  # another codec chain: through Zarr
        import zarr

        target = zarr.open_array(str(path / name), mode="r+", config={"write_empty_chunks": True})
        target[row0 : row0 + len(rows), :] = rows
        return
    buf = np.empty(arr.chunks, dtype=arr.dtype)
    for i in range(0, len(rows), c0):
        block = rows[i : i + c0]
        for j in range(arr.cdata_shape[1]):
            part = block[:, j * c1 : (j + 1) * c1]
            if part.shape != buf.shape:
                buf.fill(arr.fill_value)
            buf[: part.shape[0], : part.shape[1]] = part
            key = arr.metadata.encode_chunk_key(((row0 + i) // c0, j))
            _write_file(path / name / key, codec.encode(buf))


class _StoreRows:
    """Rows of one block, written to the store as whole storage chunks straight to their chunk files.

    Feeders arrive in store order. Rows inside ``[in0, in1)`` (whole storage chunks along ``meter``) are
    encoded to the stored dtype, buffered until a chunk is complete, then compressed and written (see
    :func:`_write_whole_chunks`); rows outside it are kept, encoded, as ``edges`` for the client
    (:class:`_EdgeChunks`).
    """

    def __init__(self, path: str, in0: int, in1: int, variables: tuple[str, ...] = ("voltage", "kw")) -> None:
        self.path = Path(path)
        self.in0, self.in1 = in0, in1
        self.arrays = _store_arrays(self.path, variables)
        self.chunk = int(next(iter(self.arrays.values()))[0].chunks[0])
        self.pending: dict[str, list[np.ndarray]] = {v: [] for v in variables}
        self.next_row = in0  # first row not yet written
        self.n_pending = 0
        self.edges: list[tuple[int, int, dict[str, np.ndarray]]] = []

    def add(self, lo: int, arrays: dict[str, np.ndarray]) -> None:
        """Rows ``[lo, lo + n)`` in store order: ``voltage`` [V] and ``kw`` [kW], decoded (NaN = missing)."""
        hi = lo + len(next(iter(arrays.values())))
        for r0, r1 in ((lo, min(hi, self.in0)), (max(lo, self.in1), hi)):
            if r0 < r1:
                self.edges.append(
                    (r0, r1, {k: _encode_rows(k, self.arrays[k][0], v[r0 - lo : r1 - lo]).copy()
                              for k, v in arrays.items()})
                )
        a, b = max(lo, self.in0), min(hi, self.in1)
        if a >= b:
            return
        if a != self.next_row + self.n_pending:
            raise ValueError(f"rows [{a}, {b}) do not follow row {self.next_row + self.n_pending}")
        for k, v in arrays.items():
            self.pending[k].append(_encode_rows(k, self.arrays[k][0], v[a - lo : b - lo]))
        self.n_pending += b - a
        if self.n_pending >= self.chunk:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        n_whole = self.n_pending if final else (self.n_pending // self.chunk) * self.chunk
        if n_whole == 0:
            return
        for k, parts in self.pending.items():
            rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
            arr, codec = self.arrays[k]
            _write_whole_chunks(self.path, k, arr, codec, self.next_row, rows[:n_whole])
            self.pending[k] = [rows[n_whole:]] if n_whole < len(rows) else []
        self.next_row += n_whole
        self.n_pending -= n_whole

    def close(self) -> list[tuple[int, int, dict[str, np.ndarray]]]:
        """Write what is left inside ``[in0, in1)``; return the edge rows (encoded)."""
        if self.n_pending:
            self._flush(final=True)
        if self.in0 < self.in1 and self.next_row != self.in1:
            raise ValueError(f"block rows [{self.in0}, {self.in1}) stopped at row {self.next_row}")
        return self.edges


class _EdgeChunks:
    """The client's side of the block edges: encoded rows collected per storage chunk, each chunk written
    as soon as all its rows are in, so at most the chunks of unfinished neighbours are held."""

    def __init__(self, path: str, variables: tuple[str, ...] = ("voltage", "kw")) -> None:
        self.path = Path(path)
        self.arrays = _store_arrays(self.path, variables)
        arr = next(iter(self.arrays.values()))[0]
        self.chunk, self.n_rows = int(arr.chunks[0]), int(arr.shape[0])
        self.parts: dict[int, list[tuple[int, int, dict[str, np.ndarray]]]] = {}

    def add(self, edges: list[tuple[int, int, dict[str, np.ndarray]]]) -> None:
        c = self.chunk
        for r0, r1, arrays in edges:
            for k in range(r0 // c, -(-r1 // c)):
                a, b = max(r0, k * c), min(r1, (k + 1) * c)
                self.parts.setdefault(k, []).append((a, b, {v: x[a - r0 : b - r0] for v, x in arrays.items()}))
                self._write_if_complete(k)

    def _write_if_complete(self, k: int) -> None:
        c = self.chunk
        parts = sorted(self.parts[k], key=lambda e: e[0])
        if sum(b - a for a, b, _ in parts) < min(c, self.n_rows - k * c):
            return
        for v, (arr, codec) in self.arrays.items():
            rows = np.concatenate([x[v] for _, _, x in parts])
            _write_whole_chunks(self.path, v, arr, codec, k * c, rows)
        del self.parts[k]

    def close(self) -> None:
        if self.parts:
            raise ValueError(f"storage chunks {sorted(self.parts)[:5]} along 'meter' were left incomplete")


@dataclass
class SynthResult:
    """What :func:`generate_utility` wrote.

    Attributes
    ----------
    out_dir : Path
    paths : dict
        ``readings``, ``meters``, ``transformers``, ``references``, ``truth`` (and ``store``) paths.
    n_meters, n_feeders, n_substations, n_transformers, n_time : int
    n_phase_corrupted, n_transformer_corrupted : int
        GIS labels made wrong on purpose.
    interval_s : float
    """

    out_dir: Path
    paths: dict[str, Path]
    n_meters: int
    n_feeders: int
    n_substations: int
    n_transformers: int
    n_time: int
    n_phase_corrupted: int
    n_transformer_corrupted: int
    interval_s: float


def generate_utility(
    out_dir: str | Path,
    *,
    n_meters: int,
    days: float,
    interval: str = "15min",
    seed: int = 0,
    start: str = "2026-06-01",
    measurement: MeasurementModel | None = _DEFAULT_MODEL,
    phase_error_rate: float = 0.08,
    transformer_error_rate: float = 0.03,
    pv_fraction: float = 0.0,
    write_readings: bool = True,
    store: str | Path | None = None,
    client: Any = None,
    readings_layout: str = "auto",
    meters_per_block: int = 20_000,
    feeder_meters: tuple[int, int] = (300, 4000),
) -> SynthResult:
    """Generate a synthetic utility with ground truth and write it in the data contract.

    Parameters
    ----------
    out_dir : path-like
        Created if needed; receives ``readings.parquet``, ``meters.csv``, ``transformers.csv``,
        ``references.parquet``, ``truth.csv``.
    n_meters : int
        Total meters (split into feeders of ~300-4000 and substations of 1-4 feeders).
    days : float
        Length of the series [days].
    interval : str
        Interval, a pandas Timedelta string (``"15min"``, ``"1h"``, ``"5min"``).
    seed : int
        Seed of everything; the same seed gives byte-identical files.
    start : str
        First interval start (UTC).
    measurement : MeasurementModel or None
        Meter measurement model (accuracy class, resolution, missing data, clock offsets); ``None``
        writes the true voltages.
    phase_error_rate, transformer_error_rate : float
        Share of meters whose GIS phase / transformer label is wrong [-].
    pv_fraction : float
        Share of residential customers with rooftop PV [-].
    write_readings : bool
        Write ``readings.parquet`` (turn off when writing only the store at scale).
    store : path-like, optional
        Also write a Zarr store (``voltage``, ``kw``, references, transformers) directly with
        ``phaseid_hpc.store.initialize_store``, then chunk files written by the tasks (the bytes Zarr
        writes); voltage as lossless int16 deci-volts when the resolution is a multiple of 0.1 V. Replaced
        if it exists.
    client : distributed.Client, optional
        Run the substation blocks on this cluster; ``None`` runs them one after the other here.
    readings_layout : {"auto", "file", "partitioned"}
        One ``readings.parquet`` file, or a ``readings.parquet/`` directory of part files (one per
        block of substations); ``auto`` partitions above 200,000 meters.
    meters_per_block : int
        Approximate meters per Dask task [-].
    feeder_meters : (int, int)
        Smallest and largest feeder [meters] (small feeders make many partitions in tests).

    Returns
    -------
    SynthResult
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = _make_grid(start, days, interval)
    plan = plan_utility(n_meters, seed, feeder_meters)
    blocks = _substation_blocks(plan, meters_per_block)
    params = {
        "seed": seed,
        "measurement": measurement,
        "phase_error_rate": phase_error_rate,
        "transformer_error_rate": transformer_error_rate,
        "pv_fraction": pv_fraction,
    }
    readings = None
    if write_readings:
        readings = _prepare_readings(out, _readings_layout(readings_layout, n_meters), client)
    # Step 1: the meter and transformer tables (topology and GIS only), block by block on the cluster.
    meters, xfs = _utility_tables(blocks, params, client)
    truth = truth_table(meters, meters["feeder_id"])
    store_info = None
    if store is not None:
        encoding = _voltage_encoding(measurement)
        store_info = _initialize_store(str(store), grid, _gis_view(meters), xfs, encoding)
    # Step 2: simulate and write each block; edges and references are taken in as blocks finish.
    ref_ids, ref_values = _simulate_blocks(blocks, grid, params, client, readings, store_info)
    if store_info is not None:
        _finish_store(store_info["path"], ref_ids, ref_values, grid)
    paths = _write_tables(out, meters, truth, xfs, _references_table(ref_ids, ref_values, grid))
    if readings is not None:
        _finish_readings(readings)
        paths["readings"] = readings.path
    if store_info is not None:
        paths["store"] = Path(store_info["path"])
    return SynthResult(
        out_dir=out,
        paths=paths,
        n_meters=len(meters),
        n_feeders=meters.feeder_id.nunique(),
        n_substations=len(plan),
        n_transformers=len(xfs),
        n_time=grid.n_time,
        n_phase_corrupted=int(truth.phase_label_corrupted.sum()),
        n_transformer_corrupted=int(truth.transformer_label_corrupted.sum()),
        interval_s=grid.interval_s,
    )


def _substation_blocks(
    plan: list[list[tuple[int, int]]], meters_per_block: int
) -> list[list[tuple[int, list[tuple[int, int]]]]]:
    """Group the planned substations, in order, into blocks of about ``meters_per_block`` meters.

    Returns
    -------
    list of blocks, each a list of ``(substation_index, [(feeder_index, n_meters), ...])``.
    """
    blocks: list[list[tuple[int, list[tuple[int, int]]]]] = [[]]
    size = 0
    for s in enumerate(plan):
        if size >= meters_per_block:
            blocks.append([])
            size = 0
        blocks[-1].append(s)
        size += sum(n for _, n in s[1])
    return blocks


def _readings_layout(readings_layout: str, n_meters: int) -> str:
    """Resolve ``"auto"``: partitioned above ``_PARTITION_ABOVE`` meters, else one file."""
    if readings_layout == "auto":
        return "partitioned" if n_meters > _PARTITION_ABOVE else "file"
    return readings_layout


@dataclass(frozen=True)
class _ReadingsTarget:
    """Where the readings go.

    ``path`` is ``readings.parquet``; unless ``direct`` (one file that the blocks, run here in order,
    append to), the blocks write part files into ``parts_dir``, which ``merge`` joins into ``path``.
    """

    path: Path
    parts_dir: Path
    direct: bool
    merge: bool


def _prepare_readings(out: Path, layout: str, client: Any) -> _ReadingsTarget:
    """Remove old readings and create the part-file directory the blocks will write into, if any."""
    readings = out / "readings.parquet"
    if readings.is_dir():
        shutil.rmtree(readings)
    elif readings.exists():
        readings.unlink()
    parts_dir = readings if layout == "partitioned" else out / ".readings_parts"
    # One file without a cluster: blocks run here in order and append to it (no merge pass).
    direct = layout == "file" and client is None
    if not direct:
        parts_dir.mkdir(parents=True, exist_ok=True)
    return _ReadingsTarget(readings, parts_dir, direct, merge=layout == "file" and not direct)


def _utility_tables(
    blocks: list[list[tuple[int, list[tuple[int, int]]]]], params: dict, client: Any
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Meters (GIS view and truth) and transformers of every block, on the cluster when there is one."""
    if client is not None:
        tabs = client.gather(client.map(_block_tables, [[s for s in blk] for blk in blocks],
                                        params=params, pure=False))
    else:
        tabs = [_block_tables(blk, params) for blk in blocks]
    meters = pd.concat([t["meters"] for t in tabs], ignore_index=True)
    xfs = pd.concat([t["transformers"] for t in tabs], ignore_index=True)
    return meters, xfs


def _gis_view(meters: pd.DataFrame) -> pd.DataFrame:
    """The contract ``meters.csv`` columns: the meters table without its truth columns."""
    return meters.drop(columns=["true_transformer_id", "true_phase"])


def _voltage_encoding(measurement: MeasurementModel | None) -> str:
    """Store voltage encoding: ``"int16_decivolt"`` when the meters' resolution is a multiple of 0.1 V
    (lossless), else ``"float32"``."""
    lossless_decivolt = (
        measurement is not None
        and measurement.resolution_v > 0
        and abs(measurement.resolution_v / 0.1 - round(measurement.resolution_v / 0.1)) < 1e-9
    )
    return "int16_decivolt" if lossless_decivolt else "float32"


def _simulate_blocks(
    blocks: list[list[tuple[int, list[tuple[int, int]]]]],
    grid: TimeGrid,
    params: dict,
    client: Any,
    readings: _ReadingsTarget | None,
    store_info: dict | None,
) -> tuple[list[str], np.ndarray]:
    """Simulate and write every block, on the cluster or here in order.

    Returns
    -------
    feeder_ids : list of str
        In block order.
    references : ndarray, shape (n_feeders, 3, n_time), float32
        Feeder-head line-to-neutral voltage [V].
    """
    parts_dir = None if readings is None or readings.direct else str(readings.parts_dir)
    edge_chunks = None if store_info is None else _EdgeChunks(store_info["path"])
    refs_by_block: dict[int, list[tuple[str, np.ndarray]]] = {}

    def take(b: int, res: dict[str, Any]) -> None:
        refs_by_block[b] = res["references"]
        if edge_chunks is not None:
            edge_chunks.add(res["edges"])

    if client is not None:
        _run_blocks_on_cluster(client, blocks, grid, params, parts_dir, store_info, take)
    else:
        sink = _Sink(readings.path) if readings is not None and readings.direct else None
        for b, blk in enumerate(blocks):
            take(b, _run_block(b, blk, grid, params, parts_dir, store_info, sink))
        if sink is not None:
            sink.close()
    ref_ids = [fid for b in sorted(refs_by_block) for fid, _ in refs_by_block[b]]
    ref_values = np.stack([v for b in sorted(refs_by_block) for _, v in refs_by_block[b]])  # (n_feeders, 3, T)
    refs_by_block.clear()
    if edge_chunks is not None:
        edge_chunks.close()
    return ref_ids, ref_values


def _run_blocks_on_cluster(
    client: Any,
    blocks: list[list[tuple[int, list[tuple[int, int]]]]],
    grid: TimeGrid,
    params: dict,
    parts_dir: str | None,
    store_info: dict | None,
    take: Any,
) -> None:
    """Submit one task per block and hand each result to ``take(block, result)`` as it completes."""
    from distributed import as_completed

    futures = {
        client.submit(_run_block, b, blk, grid, params, parts_dir, store_info, pure=False): b
        for b, blk in enumerate(blocks)
    }
    for fut in as_completed(list(futures)):
        take(futures[fut], fut.result())
        fut.release()


def _references_table(feeder_ids: list[str], references: np.ndarray, grid: TimeGrid) -> pa.Table:
    """``references.parquet`` rows from references, shape (n_feeders, 3, n_time) [V], in long form."""
    n_f, n_t = len(feeder_ids), grid.n_time
    return pa.table(
        {
            "feeder_id": pa.array(np.repeat(np.array(feeder_ids, dtype=object), 3 * n_t), pa.string()),
            "phase": pa.array(np.tile(np.repeat(np.array(list("ABC"), dtype=object), n_t), n_f), pa.string()),
            "timestamp": pa.array(np.tile(grid.times.as_unit("us").asi8, 3 * n_f), pa.timestamp("us", tz="UTC")),
            "voltage_v": pa.array(references.reshape(-1), pa.float32()),
        }
    )


def _write_tables(
    out: Path, meters: pd.DataFrame, truth: pd.DataFrame, transformers: pd.DataFrame, references: pa.Table
) -> dict[str, Path]:
    """Write ``meters.csv``, ``truth.csv``, ``transformers.csv`` and ``references.parquet``.

    Returns
    -------
    dict
        Their paths, keyed ``meters``, ``transformers``, ``references``, ``truth``.
    """
    paths = {
        "meters": out / "meters.csv",
        "transformers": out / "transformers.csv",
        "references": out / "references.parquet",
        "truth": out / "truth.csv",
    }
    _gis_view(meters).to_csv(paths["meters"], index=False)
    truth.to_csv(paths["truth"], index=False)
    transformers.to_csv(paths["transformers"], index=False)
    pq.write_table(references, paths["references"], compression="zstd", store_schema=False)
    return paths


def _finish_readings(readings: _ReadingsTarget) -> None:
    """Merge the part files into the one ``readings.parquet`` file where that layout was asked for."""
    if readings.merge:
        _merge_parts(readings.parts_dir, readings.path)
        shutil.rmtree(readings.parts_dir)


def _merge_parts(parts_dir: Path, dest: Path) -> None:
    """Concatenate part files (in block order) into one Parquet file, row group by row group."""
    writer = None
    for part in sorted(parts_dir.glob("part-*.parquet")):
        f = pq.ParquetFile(part)
        for i in range(f.num_row_groups):
            rg = f.read_row_group(i)
            # Back to the dictionary-typed column the direct path writes, so the bytes are the same.
            rg = rg.set_column(0, "meter_id", pc.dictionary_encode(rg.column("meter_id")))
            if writer is None:
                writer = pq.ParquetWriter(dest, rg.schema, compression="zstd", store_schema=False)
            writer.write_table(rg, row_group_size=_ROW_GROUP)
    if writer is not None:
        writer.close()


def _initialize_store(
    store: str, grid: TimeGrid, meters: pd.DataFrame, transformers: pd.DataFrame, voltage_encoding: str
) -> dict[str, Any]:
    """Create the store from the meter and transformer tables before the blocks run.

    Voltage is stored as int16 deci-volts when the meters' resolution is a multiple of 0.1 V (lossless),
    else float32; the store holds ``voltage`` and ``kw`` (kvar stays in the readings file).

    Returns the store path, the row offset and size of each feeder in store order and the storage chunk
    along ``meter``.
    """
    from ..store import initialize_store

    fids = sorted(meters.feeder_id.unique())
    # Reference rows are created empty (one NaN read per feeder and phase) and filled after the run.
    refs = pd.DataFrame(
        {
            "feeder_id": np.repeat(fids, 3),
            "phase": np.tile(list("ABC"), len(fids)),
            "timestamp": grid.times[0],
            "voltage_v": np.nan,
        }
    )
    initialize_store(
        store,
        meters,
        grid.times,
        interval_s=int(grid.interval_s),
        transformers=transformers,
        references=refs,
        variables=("voltage", "kw"),
        voltage_encoding=voltage_encoding,
        overwrite=True,
    )
    import zarr

    chunk = int(zarr.open_group(store, mode="r")["voltage"].chunks[0])
    sizes = meters.groupby("feeder_id", sort=True).size()
    starts = sizes.cumsum() - sizes
    return {
        "path": store,
        "meter_chunk": chunk,
        "offsets": {k: int(v) for k, v in starts.items()},
        "sizes": {k: int(v) for k, v in sizes.items()},
    }


def _finish_store(store: str, feeder_ids: list[str], references: np.ndarray, grid: TimeGrid) -> None:
    """Write the references, shape (n_feeders, 3, n_time) [V], and the per-meter sampling statistics."""
    import zarr

    group = zarr.open_group(store, mode="a")
    keys = [str(k) for k in group["reference"][:]]
    row = {f"{fid}/{ph}": (i, j) for i, fid in enumerate(feeder_ids) for j, ph in enumerate("ABC")}
    wide = np.full((len(keys), grid.n_time), np.nan, np.float32)
    for r, key in enumerate(keys):
        if key in row:
            wide[r] = references[row[key]]
    group["reference_voltage"][:] = wide
    # Every read of a generated meter falls on the grid.
    n = group["sampling_interval_s"].shape[0]
    group["sampling_interval_s"][:] = np.full(n, grid.interval_s)
    group["off_grid_fraction"][:] = np.zeros(n)


def truth_table(meters: pd.DataFrame, feeder_id: str | pd.Series) -> pd.DataFrame:
    """``truth.csv`` rows of a feeder's meters (``true_phase``, ``true_transformer_id`` beside the GIS view)."""
    return pd.DataFrame(
        {
            "meter_id": meters.meter_id,
            "feeder_id": feeder_id,
            "transformer_id": meters.true_transformer_id,
            "phase": meters.true_phase,
            "phase_label_corrupted": meters.phase != meters.true_phase,
            "transformer_label_corrupted": meters.transformer_id != meters.true_transformer_id,
        }
    )[list(TRUTH_COLUMNS)]
