"""File ingest: contract readings (CSV / Parquet, long format) -> the Zarr v3 store.

Two entry points:

* :func:`ingest_files` builds a store from contract files (or extends an existing one), streaming each
  readings file in batches of ``IngestConfig.batch_rows`` rows so memory stays bounded. All files and
  batches of one call are one transaction: every file is checked first (readable, not empty, required
  columns, no boolean value column: else a one-line :class:`~phaseid_hpc.errors.DataError` naming it),
  then every batch is staged, and the store changes only when all are in;
* :func:`ingest_frame` upserts one DataFrame of reads into an existing store (used by the broker
  consumer). Each call is one :class:`~phaseid_hpc.store.StoreTransaction`: durable (fsynced, committed)
  when it returns, all or nothing on failure, idempotent on (meter, timestamp).

Row policy (every row read is counted exactly once: ``accepted + quarantined + duplicates == read``):

* accepted: written (new or changed cell) or unchanged (the store already held the same encoded value);
* identical duplicates (same meter, grid time and values) inside one call: dropped, counted;
* quarantined with a ``reason`` into ``STORE/quarantine/<source>-<hash>.parquet``: ``unknown_meter``,
  ``invalid_timestamp`` (unparsable, or outside 1900..2200: never wrapped), ``invalid_value`` (voltage
  not a finite number; text and booleans are not numbers), ``conflicting_duplicate`` (same
  meter and grid time, different values: every row of the group), ``off_grid`` (farther than
  ``snap_tolerance_s`` from the grid), ``before_store_start`` (the time axis only grows at the end),
  ``time_out_of_range`` (more than ``max_extend_steps`` after the store's end), ``out_of_range`` (beyond
  the +-3276.7 V of the int16 deci-volt encoding).

Timestamps: ISO 8601 strings (or ``[ingest] timestamp_format``, a strftime format) with offsets and tz-aware
datetimes (any zone, DST included) are converted to UTC; naive timestamps are wall times in ``[ingest]
timezone`` (default UTC, stated in the report; times a DST change skips or repeats do not parse). They mark
interval ends. Timestamps that do not parse are counted per file with examples: more than half of a file's
is a :class:`DataError` naming the file, the column and the key to set (nothing written), fewer a note.

Inputs as utilities have them (:mod:`phaseid_hpc.input_formats`): a file or meters table lacking required
columns gets a one-line error with its real header and the TOML that fixes it (``column_map = { MeterID =
"meter_id", ... }`` or ``meters_column_map`` in ``[ingest]``); an MDM channel export (``[ingest]
readings_layout = "channel"``) is read whole, pivoted to wide rows and then streamed like any file (its
memory is that of the file); phase spellings of the meters table are normalised to the contract labels
(``IngestReport.phase_labels``). The meters table may
also be a GeoPackage / GeoJSON file or a PostgreSQL table (:mod:`phaseid_hpc.gis`).

Grid: epoch-anchored multiples of ``interval_s`` (``IngestConfig.interval_s``, or the dominant spacing of
the readings when a store is created). Off-grid reads are never moved silently: within
``snap_tolerance_s`` they are snapped and counted (``snapped``); beyond it they are quarantined
(``off_grid``). Per meter the store records ``off_grid_fraction`` (reads beyond the tolerance / raw reads)
and ``sampling_interval_s`` (median spacing of the meter's distinct raw timestamps, accumulated across
calls as a spacing histogram, including the spacing across consecutive calls). Each raw read counts once
per (meter, raw timestamp), however a feed is split into batches or redelivered: an accepted read counts
when it fills a missing ``voltage`` cell; a read that fills no cell (off grid, rejected) counts when its key
is not in a log of such keys kept in ``_phaseid/meter_stats.npz`` (the latest ``_UNPLACED_KEYS_MAX``).
No per-batch list is kept (earlier versions appended every batch's fingerprint to
``_phaseid/seen_batches.txt``, read and rewritten in full on every call; that file is no longer used).

kV detection: per meter and call, if the median voltage x 1000 lies within [0.5, 2] x ``nominal_v`` (or
60..1000 V where ``nominal_v`` is unknown) the meter's reads of that call are scaled by 1000 and a note
is added to the report.

Throughput: the cost of a call is dominated by the storage chunks it touches (each is read, merged,
re-encoded and fsynced, then renamed into place), not by the number of reads. Touched chunks are decoded
and encoded with the store's Blosc codec directly on the chunk files in a thread pool, each staged chunk
fsynced by its encoder (the commit only fsyncs the metadata), and published by parallel renames.
Measured on a shared 2-core machine (medians, ``benchmarks/amqp_ingest.py``; noisy, +-30%):

* 10k meters x 100 intervals, 200k-read batches (default ``time_chunk`` = 2976): ``ingest_frame``
  ~240k reads/s (was ~110k);
* a head-end stream, one interval of 100k meters per batch: with ``time_chunk`` = 2976 (256 meters a
  chunk) each batch rewrites ~400 chunks per variable: ~15k reads/s (was ~7k). With ``time_chunk`` = 96
  (one day of 15-minute reads; ~8k meters a chunk, same ~3 MB per chunk) it rewrites ~13: ~140k reads/s
  through the broker (was ~93k); 1M meters, one interval a batch: ``ingest_frame`` ~220-240k reads/s
  (was ~200k: at this size the layout, not the code, is the lever).

Create stores that a broker feeds interval by interval with ``time_chunk=96`` (``IngestConfig.time_chunk``
or :func:`~phaseid_hpc.store.initialize_store`). Trade-off: a batch of one interval still rewrites each
touched chunk in full (write amplification ~96x in bytes, bounded by the chunk, not the store length),
and the wider meter chunk (~8k meters against ~8.4k-meter feeder blocks of 100 MB) means a feeder block
reads up to two partly-used chunks at its edges (at most ~2x read amplification for analysis; the file
count stays ~8k per variable for 1M meters x 35 days since chunks keep ~3 MB). The alternative, a
write-ahead landing log (append-only Parquet of accepted reads, compacted into Zarr later), writes each
read once but leaves the store behind the feed until compaction and needs every reader to merge the log;
it is not implemented.
Per-call costs that scale with the store, not the batch, remain: the statistics file
(``_phaseid/meter_stats.npz``, ~50 bytes a meter) and the two per-meter coordinates are read and
rewritten on each call that brings new reads (~0.1 s at 100k meters, ~0.8 s at 1M).

New meters: a store's meter order is fixed at creation (feeders are contiguous slices). Reads of meters
the store does not know are quarantined (``unknown_meter``); :func:`ingest_files` given a meters file
with meters the store lacks (or with a changed feeder / transformer) raises :class:`StoreError` naming
them: ingest everything into a new store to add meters.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import shutil
import time as _time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from . import contract
from .config import IngestConfig
from .errors import ContractError, DataError, PhaseIDError, StoreError
from .input_formats import (
    CHANNEL_COLUMNS,
    channel_columns,
    column_map_help,
    guess_column_map,
    guess_timestamp_format,
    normalise_phases,
    pivot_channels,
)
from .store import (
    DECIVOLT_SCALE,
    INT16_FILL,
    ChunkCodec,
    StoreTransaction,
    _damaged,
    _fsync_path,
    _line,
    _strings,
    exclusive_lock,
    initialize_store,
    open_store,
    sort_meters,
    write_fill_chunks,
)

__all__ = ["QUARANTINE_REASONS", "IngestReport", "ingest_files", "ingest_frame"]

QUARANTINE_REASONS: tuple[str, ...] = (
    "unknown_meter",
    "invalid_timestamp",
    "invalid_value",
    "off_grid",
    "before_store_start",
    "time_out_of_range",
    "out_of_range",
    "conflicting_duplicate",
)
_R = {r: i + 1 for i, r in enumerate(QUARANTINE_REASONS)}
_NAT = np.iinfo(np.int64).min
#: Accepted timestamps [UTC]: anything outside is ``invalid_timestamp`` (never wrapped onto the grid).
_TS_RANGE = ("1900-01-01", "2200-01-01")
_STATS = "_phaseid/meter_stats.npz"
#: Keys (meter, raw timestamp) of counted reads that wrote no cell, kept to count each once [keys].
_UNPLACED_KEYS_MAX = 1_000_000
#: Voltages beyond this are quarantined as ``out_of_range`` [V] (no meter reads 1 MV; keeps float32 finite).
_MAX_ABS_V = 1e6
_WRITE_THREADS = 4


@dataclass
class IngestReport:
    """What one ingest did. Counts are rows of the input unless named otherwise."""

    store: str
    sources: list[str] = field(default_factory=list)
    #: Rows read from the input.
    rows_read: int = 0
    #: Accepted rows that set a new or changed cell.
    rows_written: int = 0
    #: Accepted rows whose cell already held the same value (re-ingest).
    rows_unchanged: int = 0
    #: Identical duplicate rows dropped (same meter, grid time and values).
    duplicates_identical: int = 0
    #: Quarantined rows by reason.
    quarantined: dict[str, int] = field(default_factory=dict)
    #: Accepted rows moved onto the grid (within ``snap_tolerance_s``).
    snapped: int = 0
    #: Meters whose reads were scaled from kV to V.
    kv_scaled_meters: list[str] = field(default_factory=list)
    #: Distinct meters with accepted rows.
    meters: int = 0
    #: Meters added to the store (only when ``ingest_files`` created it).
    new_meters: int = 0
    #: First and last grid time of accepted rows (UTC).
    time_start: pd.Timestamp | None = None
    time_end: pd.Timestamp | None = None
    #: Time steps appended to the store.
    time_steps_added: int = 0
    #: Quarantine files written (relative to the store).
    quarantine_files: list[str] = field(default_factory=list)
    #: Human-readable lines (kV scaling, ignored columns, store creation).
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: Time zone naive timestamps were read in (``[ingest] timezone``).
    timezone: str = "UTC"
    #: Phase labels of the meters table rewritten to contract names: ``{as found: contract label}``.
    phase_labels: dict[str, str] = field(default_factory=dict)
    #: Channel layout: rows of the exports read, before the pivot to interval rows (``rows_read``).
    channel_rows_read: int = 0
    #: Channel layout: rows identical to another (meter, channel, interval end, value) dropped.
    channel_duplicates_identical: int = 0
    #: Channel layout: rows of channels listed in ``[ingest] channel_ignore``, by channel.
    channel_rows_ignored: dict[str, int] = field(default_factory=dict)
    #: Timestamps that did not parse (quarantined as ``invalid_timestamp``) and a few of them as found.
    timestamps_unparsed: int = 0
    timestamp_examples: list[str] = field(default_factory=list, repr=False)

    @property
    def rows_accepted(self) -> int:
        return self.rows_written + self.rows_unchanged

    @property
    def rows_quarantined(self) -> int:
        return int(sum(self.quarantined.values()))

    @property
    def reads_per_s(self) -> float:
        return self.rows_read / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    def merge(self, other: IngestReport) -> IngestReport:
        """Add ``other``'s counts to this report (in place) and return it."""
        self.sources += [s for s in other.sources if s not in self.sources]
        for k in (
            "rows_read",
            "rows_written",
            "rows_unchanged",
            "duplicates_identical",
            "snapped",
            "time_steps_added",
            "channel_rows_read",
            "channel_duplicates_identical",
            "timestamps_unparsed",
        ):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for r, n in other.quarantined.items():
            self.quarantined[r] = self.quarantined.get(r, 0) + n
        for r, n in other.channel_rows_ignored.items():
            self.channel_rows_ignored[r] = self.channel_rows_ignored.get(r, 0) + n
        self.phase_labels.update(other.phase_labels)
        self.timestamp_examples += [e for e in other.timestamp_examples if e not in self.timestamp_examples][
            : max(0, 5 - len(self.timestamp_examples))
        ]
        self.kv_scaled_meters += [m for m in other.kv_scaled_meters if m not in self.kv_scaled_meters]
        self.meters = max(self.meters, other.meters)
        if other.time_start is not None:
            self.time_start = (
                other.time_start if self.time_start is None else min(self.time_start, other.time_start)
            )
            self.time_end = other.time_end if self.time_end is None else max(self.time_end, other.time_end)
        self.quarantine_files += other.quarantine_files
        self.notes += other.notes
        self.elapsed_s += other.elapsed_s
        return self

    def summary(self) -> str:
        """A few lines for logs."""
        q = ", ".join(f"{k}={v}" for k, v in sorted(self.quarantined.items())) or "none"
        return (
            f"ingest into {self.store}: read {self.rows_read}, written {self.rows_written}, unchanged "
            f"{self.rows_unchanged}, identical duplicates {self.duplicates_identical}, quarantined "
            f"{self.rows_quarantined} ({q}), snapped {self.snapped}, meters {self.meters}, time "
            f"{self.time_start} .. {self.time_end} (+{self.time_steps_added} steps), "
            f"{self.reads_per_s:,.0f} reads/s"
        )


# ----------------------------------------------------------------------------------------------- state
@dataclass
class _StoreState:
    interval_ns: int
    t0_ns: int | None
    n_time: int
    n_meters: int
    meter_index: pd.Index
    nominal_v: np.ndarray
    meter_ids: pa.Array  # the same ids as Arrow strings (hash lookups of large batches in C++)
    arrays: dict[str, dict[str, Any]]  # name -> zarr metadata of (meter|reference, time) arrays
    n_time_main: int = 0  # time steps of the committed store (``n_time`` grows with staged batches)
    complete_chunks: bool = False  # store version >= 2: every data chunk exists (a missing one is damage)


_INDEX_CACHE: dict[tuple[str, int, int], tuple[pd.Index, np.ndarray, pa.Array]] = {}


def _store_state(path: Path) -> _StoreState:
    root = path / "zarr.json"
    if not root.is_file():
        raise StoreError(f"no Zarr store at {str(path)!r} (missing zarr.json); create it with ingest_files")
    try:
        meta = json.loads(root.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"store {str(path)!r}: zarr.json cannot be read ({_line(exc)})") from None
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    if "interval_s" not in attrs or "phaseid_store_version" not in attrs:
        raise StoreError(
            f"{str(path)!r} is a Zarr store but not a phaseid store (root attributes 'interval_s' and "
            "'phaseid_store_version' missing): give a store made by 'phaseid ingest' or a new path"
        )
    nodes = (meta.get("consolidated_metadata") or {}).get("metadata", {})
    arrays = {k: v for k, v in nodes.items() if v.get("node_type") == "array" and "/" not in k}
    if "voltage" not in arrays or "meter" not in arrays:
        raise StoreError(f"store {str(path)!r}: no 'voltage' or 'meter' array in the consolidated metadata")
    n_meters, n_time = arrays["voltage"]["shape"]
    mstat = (path / "meter" / "zarr.json").stat()
    key = (str(path.resolve()), mstat.st_mtime_ns, n_meters)
    if key not in _INDEX_CACHE:
        ids = _strings(zarr.open_array(str(path / "meter"), mode="r")[:])
        nominal = zarr.open_array(str(path / "nominal_v"), mode="r")[:].astype(np.float64)
        _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = (pd.Index(ids), nominal, pa.array(ids, type=pa.string()))
    index, nominal, ids_arrow = _INDEX_CACHE[key]
    t0 = None
    if n_time:
        t0 = int(zarr.open_array(str(path / "time"), mode="r")[0]) * 10**9
    time_arrays = {
        k: v
        for k, v in arrays.items()
        if v.get("dimension_names", [None, None])[-1] == "time" and len(v["shape"]) == 2
    }
    return _StoreState(
        int(attrs["interval_s"]) * 10**9, t0, n_time, n_meters, index, nominal, ids_arrow, time_arrays,
        n_time_main=n_time, complete_chunks=int(attrs["phaseid_store_version"]) >= 2,
    )


# ----------------------------------------------------------------------------------------------- parsing
def _apply_column_map(df: pd.DataFrame, column_map: dict[str, str], source: str) -> pd.DataFrame:
    header = [str(c) for c in df.columns]
    if column_map:
        df = df.rename(columns=column_map)
    missing = [c for c in contract.READINGS_REQUIRED if c not in df.columns]
    if missing:
        raise ContractError(column_map_help(source, header, missing, contract.READINGS_OPTIONAL, "column_map"))
    return df


def _original_name(config: IngestConfig, name: str) -> str:
    """The header name that ``[ingest] column_map`` maps onto contract column ``name``."""
    return next((k for k, v in config.column_map.items() if v == name), name)


def _timestamp_help(what: str, column: str, n_bad: int, n: int, examples: Sequence[str],
                    config: IngestConfig) -> str:
    """Message for timestamps that did not parse: how many, examples, the file and column, the key to set."""
    shown = ", ".join(repr(e) for e in examples[:5])
    now = (f'[ingest] timestamp_format = "{config.timestamp_format}"' if config.timestamp_format
           else "ISO 8601 ([ingest] timestamp_format unset)")
    fmts = guess_timestamp_format(examples)
    fix = (f'set [ingest] timestamp_format = "{fmts[0]}"'
           + (f" (or {', '.join(repr(f) for f in fmts[1:3])}: the examples fit several)" if len(fmts) > 1 else "")
           if fmts else 'set [ingest] timestamp_format to their strftime format (e.g. "%m/%d/%Y %H:%M")')
    return (
        f"{what}, column {column!r}: {n_bad:,} of {n:,} timestamps did not parse as {now} (e.g. {shown}); {fix}, "
        f"and [ingest] timezone (now {config.timezone!r}) if they carry no UTC offset"
    )


@dataclass
class _TimestampTally:
    """Unparsable timestamps of one file: counted, with a few examples."""

    n: int = 0
    n_bad: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, raw: pd.Series, ts: np.ndarray) -> None:
        bad = ts == _NAT
        self.n += len(ts)
        self.n_bad += int(bad.sum())
        if bad.any() and len(self.examples) < 5:
            for v in raw[bad].head(20).astype(str):
                if v not in self.examples and len(self.examples) < 5:
                    self.examples.append(v)

    def check(self, path: Path, config: IngestConfig) -> None:
        """Raise :class:`DataError` when more than half of the file's timestamps did not parse."""
        if self.n and self.n_bad * 2 > self.n:
            raise DataError(_timestamp_help(f"readings file {str(path)!r}", _original_name(config, "timestamp"),
                                            self.n_bad, self.n, self.examples, config)
                            + "; nothing was written")


#: A time of day followed by a UTC offset (``Z``, ``+02:00``, ``-0500``): the string carries its own zone.
_HAS_OFFSET = r"\d:\d\d(?::\d\d(?:[.,]\d+)?)?\s*(?:Z|[+-]\d\d(?::?\d\d)?)$"


def _localize(naive: pd.Series, tz: str) -> pd.Series:
    """Naive wall times in ``tz`` -> naive UTC; times a DST change skips or repeats -> NaT."""
    if tz == "UTC":
        return naive
    try:
        aware = naive.dt.tz_localize(tz, ambiguous="NaT", nonexistent="NaT")
    except (OverflowError, ValueError, pd.errors.OutOfBoundsDatetime):
        return pd.Series(pd.NaT, index=naive.index, dtype="datetime64[ns]")
    return aware.dt.tz_convert("UTC").dt.tz_localize(None)


def _to_datetime(s: pd.Series, **kw: Any) -> pd.Series:
    try:
        return pd.to_datetime(s, errors="coerce", **kw)
    except (TypeError, ValueError, OverflowError):  # objects pandas refuses outright (lists, dicts, ...)
        return pd.to_datetime(s.astype(str), errors="coerce", **kw)


def _parse_timestamps(s: pd.Series, fmt: str = "", tz: str = "UTC") -> np.ndarray:
    """UTC epoch [ns] as int64; unparsable or outside [1900, 2200) -> ``_NAT``.

    Strings are parsed with strftime format ``fmt`` (``""``: ISO 8601). Values with a UTC offset (or a
    tz-aware column) are converted to UTC; naive values are wall times in IANA zone ``tz``, and those a
    DST change skips or repeats are unparsable. The range is checked in the parsed values' own resolution,
    before any conversion to nanoseconds, so a far-future date (``9999-12-31``, year 2610) is refused
    instead of wrapping around onto a real time.
    """
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        out = s.dt.tz_convert("UTC").dt.tz_localize(None)
    elif pd.api.types.is_datetime64_dtype(s.dtype):
        out = _localize(s, tz)
    elif pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype):
        return np.full(len(s), _NAT, np.int64)
    elif fmt:
        if "%z" in fmt or "%Z" in fmt:
            out = _to_datetime(s, format=fmt, utc=True).dt.tz_localize(None)
        else:
            out = _localize(_to_datetime(s, format=fmt), tz)
    elif tz == "UTC":
        out = _to_datetime(s, utc=True, format="ISO8601").dt.tz_localize(None)
    else:
        text = s.astype(str).str.strip()
        aware = text.str.contains(_HAS_OFFSET, regex=True).to_numpy()
        res = np.full(len(s), _NAT, np.int64)
        if aware.any():
            res[aware] = _checked_ns(_to_datetime(text[aware], utc=True, format="ISO8601").dt.tz_localize(None))
        if (~aware).any():
            res[~aware] = _checked_ns(_localize(_to_datetime(text[~aware], format="ISO8601"), tz))
        return res
    return _checked_ns(out)


def _checked_ns(out: pd.Series) -> np.ndarray:
    """Naive UTC datetimes -> epoch [ns] as int64, ``_NAT`` outside [1900, 2200) (checked in their own unit)."""
    arr = np.asarray(out.to_numpy())
    if arr.dtype.kind != "M":
        return np.full(len(arr), _NAT, np.int64)
    unit = np.datetime_data(arr.dtype)[0]
    raw = arr.view(np.int64)
    lo, hi = (np.datetime64(d, unit).astype(np.int64) for d in _TS_RANGE)
    ok = ~np.isnat(arr) & (raw >= lo) & (raw < hi)
    res = np.full(len(arr), _NAT, np.int64)
    res[ok] = arr[ok].astype("datetime64[ns]").view(np.int64)
    return res


def _parse_numbers(s: pd.Series) -> np.ndarray:
    """Numbers as float64; anything else (text, booleans, objects) -> NaN."""
    if pd.api.types.is_bool_dtype(s.dtype):
        return np.full(len(s), np.nan)
    if pd.api.types.is_numeric_dtype(s.dtype):
        return np.array(s.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64, copy=True)
    if s.dtype == object and pd.api.types.infer_dtype(s, skipna=True) not in ("string", "floating", "integer",
                                                                              "empty", "decimal"):
        # mixed objects (e.g. JSON true/false among numbers): booleans and containers are not numbers
        vals = s.to_numpy()
        bad = np.fromiter((isinstance(v, (bool, np.bool_, list, dict, tuple, set)) for v in vals), bool, len(vals))
        s = pd.Series(np.where(bad, None, vals), dtype=object)
    try:
        num = pd.to_numeric(s, errors="coerce")
    except (TypeError, ValueError):
        num = pd.to_numeric(s.astype(str), errors="coerce")
    return np.array(pd.Series(num).to_numpy(dtype=np.float64, na_value=np.nan), copy=True)


def _check_value_types(df: pd.DataFrame, source: str) -> None:
    """Refuse a whole value column of booleans (a Parquet bool column would otherwise read as 1.0 V)."""
    for c in ("voltage_v",) + contract.READINGS_OPTIONAL:
        if c in df.columns and pd.api.types.is_bool_dtype(df[c].dtype):
            raise DataError(f"{source}: column {c!r} holds booleans, expected numbers; nothing was written")


def _meter_positions(meter_id: pd.Series, index: pd.Index, ids: pa.Array | None = None) -> np.ndarray:
    """Store row of each meter id (-1: unknown or missing), as int64.

    String columns (Arrow-backed ``str`` from the parsers) never become per-row Python strings: a batch
    of at least a quarter as many rows as the store has meters is looked up with Arrow's hash join
    (``index_in`` against ``ids``, the store's ids); a smaller one is dictionary-encoded and only its
    distinct ids are looked up in ``index``.
    """
    if isinstance(meter_id.dtype, pd.StringDtype) or meter_id.dtype == object:
        try:
            arr = pa.array(meter_id, from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError):
            arr = None
        if arr is not None and (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            if isinstance(arr, pa.ChunkedArray):
                arr = arr.combine_chunks()
            if ids is not None and 4 * len(arr) >= len(ids):
                arr = arr.cast(pa.string()) if pa.types.is_large_string(arr.type) else arr
                found = pc.index_in(arr, value_set=ids)
                return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)
            enc = pc.dictionary_encode(arr)
            codes = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
            uniq = enc.dictionary.to_numpy(zero_copy_only=False)
            pos = np.append(index.get_indexer(uniq), -1).astype(np.int64)  # code -1 -> the trailing -1
            return pos[codes]
    mi = index.get_indexer(meter_id.astype(str).to_numpy(dtype=object)).astype(np.int64)
    mi[meter_id.isna().to_numpy()] = -1
    return mi


def _safe_name(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source)[:80] or "frame"


# ----------------------------------------------------------------------------------------------- frame
def ingest_frame(
    path: str | os.PathLike[str],
    readings: pd.DataFrame,
    *,
    config: IngestConfig | None = None,
    source: str = "frame",
    row_offset: int = 0,
    lock_timeout_s: float | None = None,
) -> IngestReport:
    """Upsert long-format reads into an existing store (one all-or-nothing transaction).

    Parameters
    ----------
    path : path-like
        Store made by :func:`ingest_files` or :func:`~phaseid_hpc.store.initialize_store`.
    readings : DataFrame
        Columns ``meter_id, timestamp, voltage_v [V]`` and optionally ``kw [kW], kvar [kvar]`` (after
        ``config.column_map``); values may be strings (parsed here).
    config : IngestConfig, optional
        Defaults to ``IngestConfig()``.
    source : str
        Name of the input (file, queue) used in the report, the quarantine file name and messages.
    row_offset : int
        Row number of the frame's first row in its source (quarantine ``row`` column).
    lock_timeout_s : float, optional
        Wait at most this long [s] for another writer of the store (then :class:`StoreError` naming it);
        ``None``: wait as long as it takes.

    Returns
    -------
    IngestReport

    Raises
    ------
    ContractError
        A required column is missing; :class:`DataError`: a value column of booleans.
    StoreError
        The path is not a phaseid store, a chunk it must rewrite is damaged, or the lock timed out.
    """
    t_start = _time.perf_counter()
    config = IngestConfig() if config is None else config
    path = Path(path)
    df = _apply_column_map(readings, config.column_map, source)
    _check_value_types(df, source)
    report = IngestReport(store=str(path), sources=[source], rows_read=len(df))
    if len(df) == 0:
        _store_state(path)  # still a clear error for a path that is not a store
        report.elapsed_s = _time.perf_counter() - t_start
        return report
    # The lock is taken before the store's state is read: a concurrent writer's commit is never overwritten.
    with StoreTransaction(path, lock_timeout_s=lock_timeout_s) as tx:
        _ingest_batch(tx, _store_state(path), df, report, config, source, row_offset)
    report.elapsed_s = _time.perf_counter() - t_start
    return report


def _ingest_batch(
    tx: StoreTransaction,
    st: _StoreState,
    df: pd.DataFrame,
    report: IngestReport,
    config: IngestConfig,
    source: str,
    row_offset: int,
) -> _StoreState:
    """Stage one batch of reads (columns mapped) into ``tx``; fill ``report``; return the state after it.

    ``st`` is the store as this transaction sees it (earlier batches of the same transaction included).
    Each row gets a quarantine reason code (``reason``, 0: accepted) from checks in a fixed order (a row
    keeps the first reason it gets): meter, timestamp, value, grid, time range, encoding, duplicates. The
    transaction is then written in this order: data chunks, time axis, sampling statistics, quarantine.
    """
    n = len(df)
    if n == 0:
        return st
    reason = np.zeros(n, np.int8)
    mi = _meter_positions(df["meter_id"], st.meter_index, st.meter_ids)
    reason[mi < 0] = _R["unknown_meter"]
    ts = _batch_timestamps(df["timestamp"], reason, report, config)
    raw = (mi >= 0) & (ts != _NAT)  # a raw read of a known meter (counts for the sampling statistics)
    volt = _batch_voltages(df["voltage_v"], reason)
    extra = _optional_values(df, st, report, source)
    if config.kv_detection:
        _scale_kv_meters(volt, mi, reason, st, report, source)
    grid, off, snapped = _snap_to_grid(ts, reason, st.interval_ns, config.snap_tolerance_s)
    t0 = st.t0_ns if st.t0_ns is not None else _first_grid_time(grid, reason)
    ti = _time_steps(grid, t0, reason, st, config.max_extend_steps)
    venc = _encode_voltage(volt, reason, st)
    report.snapped = int((snapped & (reason == 0)).sum())
    accepted = reason == 0
    n_time_new = max(st.n_time, int(ti[accepted].max()) + 1) if accepted.any() else st.n_time
    keep = _drop_duplicates(mi, ti, venc, extra, reason, n_time_new, report)
    new_read = _write_kept(tx, st, mi, ti, venc, extra, keep, n_time_new, t0, report)
    if n_time_new != st.n_time or st.t0_ns is None:
        _extend_time(tx, st, t0, n_time_new)
        report.time_steps_added = n_time_new - st.n_time
    # Raw reads that wrote no cell (off grid, rejected values, conflicts): counted once per (meter, raw
    # timestamp) via the bounded key log of the statistics file; rows identical to a kept row are not
    # reads of their own.
    unplaced = raw & (reason > 0)
    _update_sampling_stats(tx.path, tx, st, mi, ts, off, new_read, unplaced)
    _write_quarantine(tx, df, reason, report, source, row_offset)
    t0_new = st.t0_ns if st.t0_ns is not None or n_time_new == 0 else t0
    return dataclasses.replace(st, n_time=n_time_new, t0_ns=t0_new)


def _batch_timestamps(
    timestamps: pd.Series, reason: np.ndarray, report: IngestReport, config: IngestConfig
) -> np.ndarray:
    """Parse the timestamps; mark unparsable ones ``invalid_timestamp``; count them (examples) in ``report``.

    Returns
    -------
    ndarray of int64, shape (n_rows,)
        Raw timestamps [ns since epoch, UTC]; ``_NAT`` where unparsable.
    """
    ts = _parse_timestamps(timestamps, config.timestamp_format, config.timezone)
    reason[(reason == 0) & (ts == _NAT)] = _R["invalid_timestamp"]
    report.timezone = config.timezone
    bad_ts = ts == _NAT
    report.timestamps_unparsed = int(bad_ts.sum())
    if report.timestamps_unparsed:
        report.timestamp_examples = list(dict.fromkeys(timestamps[bad_ts].head(20).astype(str)))[:5]
    return ts


def _batch_voltages(values: pd.Series, reason: np.ndarray) -> np.ndarray:
    """Parse the voltages [V]; mark ``invalid_value`` (not a finite number) and ``out_of_range`` (> 1 MV)."""
    volt = _parse_numbers(values)
    reason[(reason == 0) & ~np.isfinite(volt)] = _R["invalid_value"]
    with np.errstate(invalid="ignore"):
        reason[(reason == 0) & (np.abs(volt) > _MAX_ABS_V)] = _R["out_of_range"]
    return volt


def _optional_values(
    df: pd.DataFrame, st: _StoreState, report: IngestReport, source: str
) -> dict[str, np.ndarray]:
    """The optional columns (``kw [kW]``, ``kvar [kvar]``) the store holds, as stored (float32; NaN: none).

    A column the store has no variable for is ignored with a note in ``report``.
    """
    extra: dict[str, np.ndarray] = {}
    for c in contract.READINGS_OPTIONAL:
        if c in df.columns:
            if c in st.arrays:
                v = _parse_numbers(df[c])
                v[~np.isfinite(v) | (np.abs(v) > 1e30)] = np.nan  # beyond float32: not a number
                extra[c] = v.astype(np.float32)  # the stored dtype: compare and deduplicate as stored
            else:
                report.notes.append(f"{source}: column {c!r} ignored (the store has no {c!r} variable)")
    return extra


def _scale_kv_meters(
    volt: np.ndarray, mi: np.ndarray, reason: np.ndarray, st: _StoreState, report: IngestReport, source: str
) -> None:
    """Scale x1000 (in place) the accepted reads of meters whose median voltage of this batch looks like kV.

    A meter looks like kV when its median x 1000 lies within [0.5, 2] x ``nominal_v`` (60..1000 V where
    the nominal voltage is unknown); each is listed in ``report`` (a note for the first 20).
    """
    ok = reason == 0
    if ok.any():
        med = pd.Series(np.abs(volt[ok])).groupby(mi[ok]).median()
        nom = st.nominal_v[med.index.to_numpy()]
        kv = med.to_numpy() * 1000.0
        ratio = kv / nom
        is_kv = np.where(np.isfinite(nom), (ratio >= 0.5) & (ratio <= 2.0), (kv >= 60) & (kv <= 1000))
        for m_idx in med.index.to_numpy()[is_kv]:
            rows = ok & (mi == m_idx)
            volt[rows] *= 1000.0
            name = str(st.meter_index[m_idx])
            report.kv_scaled_meters.append(name)
            if len(report.kv_scaled_meters) <= 20:
                report.notes.append(
                    f"{source}: meter {name}: median {med[m_idx]:.4g} looks like kV "
                    f"(nominal {st.nominal_v[m_idx]:g} V): {int(rows.sum())} reads scaled x1000"
                )


def _snap_to_grid(
    ts: np.ndarray, reason: np.ndarray, interval_ns: int, tolerance_s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Snap timestamps within ``tolerance_s`` [s] of the grid onto it; mark the others ``off_grid``.

    Returns
    -------
    grid : ndarray of int64, shape (n_rows,)
        Timestamp on the grid [ns since epoch, UTC] (meaningless where ``off``).
    off : ndarray of bool, shape (n_rows,)
        Farther than the tolerance from the grid.
    snapped : ndarray of bool, shape (n_rows,)
        Moved onto the grid.
    """
    iv = interval_ns
    tol = round(tolerance_s * 1e9)
    rem = np.where(ts != _NAT, np.mod(ts, iv), 0)
    on = rem == 0
    snap_down = ~on & (rem <= tol)
    snap_up = ~on & ~snap_down & (iv - rem <= tol)
    off = ~(on | snap_down | snap_up)
    grid = np.where(snap_up, ts - rem + iv, ts - rem)
    reason[(reason == 0) & off & (ts != _NAT)] = _R["off_grid"]
    return grid, off, snap_up | snap_down


def _first_grid_time(grid: np.ndarray, reason: np.ndarray) -> int:
    """Start of a store without a time axis yet: the earliest accepted grid time [ns] (0 if none)."""
    cand = grid[reason == 0]
    return int(cand.min()) if len(cand) else 0


def _time_steps(
    grid: np.ndarray, t0: int, reason: np.ndarray, st: _StoreState, max_extend_steps: int
) -> np.ndarray:
    """Grid time index of each accepted row (0 elsewhere) from the store start ``t0`` [ns].

    Marks ``before_store_start`` and ``time_out_of_range`` (more than ``max_extend_steps`` after the end).
    """
    ti = np.where(reason == 0, (grid - t0) // st.interval_ns, 0)
    reason[(reason == 0) & (ti < 0)] = _R["before_store_start"]
    limit = max(st.n_time, 1) - 1 + int(max_extend_steps)
    reason[(reason == 0) & (ti > limit)] = _R["time_out_of_range"]
    return ti


def _encode_voltage(volt: np.ndarray, reason: np.ndarray, st: _StoreState) -> np.ndarray:
    """Voltages [V] in the store's encoding (float32 or int16 deci-volts; fill where rejected).

    For int16 marks ``out_of_range`` the reads beyond +-3276.7 V.
    """
    v_dtype = np.dtype(st.arrays["voltage"]["data_type"])
    if v_dtype == np.int16:
        with np.errstate(invalid="ignore"):
            reason[(reason == 0) & (np.abs(volt) > 32767 * DECIVOLT_SCALE)] = _R["out_of_range"]
        safe = np.where(reason == 0, volt, 0.0)
        return np.where(reason == 0, np.rint(safe / DECIVOLT_SCALE), INT16_FILL).astype(np.int16)
    return np.where(reason == 0, volt, 0.0).astype(np.float32)


def _drop_duplicates(
    mi: np.ndarray,
    ti: np.ndarray,
    venc: np.ndarray,
    extra: dict[str, np.ndarray],
    reason: np.ndarray,
    n_time_new: int,
    report: IngestReport,
) -> np.ndarray:
    """Resolve accepted rows sharing a (meter, grid time) cell; return the rows to write.

    Identical rows (same encoded values) keep their first and are counted in ``report``; a group with
    different values is marked ``conflicting_duplicate`` (every row of it).

    Returns
    -------
    ndarray of int, shape (n_keep,)
        Row positions to write, sorted by (meter, time).
    """
    acc = np.flatnonzero(reason == 0)
    if not len(acc):
        return acc
    key = mi[acc].astype(np.int64) * (n_time_new + 1) + ti[acc]
    order = np.argsort(key, kind="stable")
    acc = acc[order]
    key = key[order]
    same = np.empty(len(acc), bool)
    same[0] = False
    same[1:] = key[1:] == key[:-1]
    equal = _equal_to_previous(acc, [venc] + [extra[c] for c in extra])
    group = np.cumsum(~same) - 1
    conflict_group = np.zeros(group[-1] + 1, bool)
    np.logical_or.at(conflict_group, group[same & ~equal], True)
    conflict = conflict_group[group]
    reason[acc[conflict]] = _R["conflicting_duplicate"]
    dup = same & ~conflict
    report.duplicates_identical = int(dup.sum())
    return acc[~conflict & ~dup]


def _equal_to_previous(acc: np.ndarray, columns: list[np.ndarray]) -> np.ndarray:
    """Whether row ``acc[i]`` has the same values as ``acc[i - 1]`` in every column (NaN equals NaN).

    The first row counts as equal.
    """
    equal = np.ones(len(acc), bool)
    for vals in columns:
        a, b = vals[acc[1:]], vals[acc[:-1]]
        eq = (a == b) | (np.isnan(a) & np.isnan(b)) if vals.dtype.kind == "f" else a == b
        equal[1:] &= eq
    return equal


def _write_kept(
    tx: StoreTransaction,
    st: _StoreState,
    mi: np.ndarray,
    ti: np.ndarray,
    venc: np.ndarray,
    extra: dict[str, np.ndarray],
    keep: np.ndarray,
    n_time_new: int,
    t0: int,
    report: IngestReport,
) -> np.ndarray:
    """Stage the cells of the ``keep`` rows; written / unchanged rows, meters and time span to ``report``.

    Returns
    -------
    ndarray of bool, shape (n_rows,)
        Kept rows whose ``voltage`` cell was missing: reads the store had not seen.
    """
    new_read = np.zeros(len(mi), bool)
    if not len(keep):
        return new_read
    changed, was_empty = _write_cells(
        tx.path, tx, st, mi[keep], ti[keep], venc[keep], {c: v[keep] for c, v in extra.items()}, n_time_new
    )
    new_read[keep] = was_empty
    report.rows_written = int(changed.sum())
    report.rows_unchanged = len(keep) - report.rows_written
    report.meters = int((np.bincount(mi[keep], minlength=1) > 0).sum())
    report.time_start = pd.Timestamp(t0 + int(ti[keep].min()) * st.interval_ns)
    report.time_end = pd.Timestamp(t0 + int(ti[keep].max()) * st.interval_ns)
    return new_read


def _write_quarantine(
    tx: StoreTransaction,
    df: pd.DataFrame,
    reason: np.ndarray,
    report: IngestReport,
    source: str,
    row_offset: int,
) -> None:
    """Stage the rejected rows (as text, with ``row``, ``reason``, ``source``) as one quarantine Parquet file.

    The file is named by the source and the hash of its bytes; counts per reason go to ``report``.
    """
    bad = np.flatnonzero(reason > 0)
    if not len(bad):
        return
    names = np.array(("",) + QUARANTINE_REASONS, dtype=object)
    q = df.iloc[bad].astype(str).reset_index(drop=True)
    q.insert(0, "row", bad + row_offset)
    q["reason"] = names[reason[bad]]
    q["source"] = source
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(q, preserve_index=False), buf)
    data = buf.getvalue()
    rel = f"quarantine/{_safe_name(source)}-{hashlib.sha256(data).hexdigest()[:16]}.parquet"
    tx.write_file(rel, data)
    report.quarantine_files.append(rel)
    counts = np.bincount(reason[bad], minlength=len(names))
    report.quarantined = {names[i]: int(counts[i]) for i in range(1, len(names)) if counts[i]}


def _write_cells(
    path: Path,
    tx: StoreTransaction,
    st: _StoreState,
    mi: np.ndarray,
    ti: np.ndarray,
    venc: np.ndarray,
    extra: dict[str, np.ndarray],
    n_time_new: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Read-modify-write the storage chunks holding the cells.

    Returns
    -------
    changed : ndarray of bool, shape (n,)
        The row set a new or changed cell (of any variable).
    was_empty : ndarray of bool, shape (n,)
        The row's ``voltage`` cell was missing before this call (a read the store has not seen).

    Notes
    -----
    Only the touched chunks are read, merged and re-encoded, in a thread pool (Blosc releases the GIL).
    For the store's own codec chain (little-endian bytes + Blosc) a chunk is decoded and encoded with
    Zarr's own Blosc codec object directly on the chunk files, skipping Zarr's per-call machinery (the
    bytes are identical to what Zarr writes); each staged chunk is fsynced by the worker that wrote it, so
    the I/O overlaps the encoding of other chunks. Other codec chains go through the Zarr array API.
    """
    cm, ct = st.arrays["voltage"]["chunk_grid"]["configuration"]["chunk_shape"]
    order, starts, stops = _chunk_runs(mi, ti, cm, ct, n_time_new)
    columns = [("voltage", venc[order])] + [(c, v[order]) for c, v in extra.items()]
    w = _CellWrite(
        path, tx, st, mi[order], ti[order], cm, ct, n_time_new, starts, stops,
        changed_row=np.zeros(len(mi), bool), was_empty=np.zeros(len(mi), bool),
    )
    for name, values in columns:
        _rewrite_chunks(w, _open_chunk_var(path, tx, name, values, n_time_new))
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return w.changed_row[inverse], w.was_empty[inverse]


@dataclass(frozen=True, eq=False)
class _CellWrite:
    """One :func:`_write_cells` call as its chunk workers share it.

    ``mi``, ``ti`` are the cells sorted by storage chunk (``cm`` x ``ct`` cells), chunk ``k`` holding
    sorted rows ``starts[k]:stops[k]``; the workers set ``changed_row`` / ``was_empty`` (sorted rows).
    """

    path: Path
    tx: StoreTransaction
    st: _StoreState
    mi: np.ndarray
    ti: np.ndarray
    cm: int
    ct: int
    n_time_new: int
    starts: np.ndarray
    stops: np.ndarray
    changed_row: np.ndarray
    was_empty: np.ndarray


@dataclass(frozen=True, eq=False)
class _ChunkVar:
    """One (meter, time) variable being written: committed and staged array, codec, sorted new values."""

    name: str
    values: np.ndarray
    main: Any  # the committed zarr.Array (read only)
    staged: Any  # the staged zarr.Array, grown to the new time length
    codec: ChunkCodec | None
    fill: Any
    dtype: Any


def _chunk_runs(
    mi: np.ndarray, ti: np.ndarray, cm: int, ct: int, n_time_new: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable order of the cells by storage chunk, and where each chunk's run starts and stops in it.

    Returns
    -------
    order : ndarray of int, shape (n,)
        Cell positions sorted by chunk (stable: input order within a chunk).
    starts, stops : ndarray of int, shape (n_chunks,)
        The sorted cells of the k-th touched chunk are ``order[starts[k]:stops[k]]``.
    """
    cid = (mi // cm).astype(np.int64) * (n_time_new // ct + 2) + ti // ct
    order = np.argsort(cid, kind="stable")
    cid = cid[order]
    bounds = np.flatnonzero(np.diff(cid)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [len(cid)]])
    return order, starts, stops


def _open_chunk_var(
    path: Path, tx: StoreTransaction, name: str, values: np.ndarray, n_time_new: int
) -> _ChunkVar:
    """Open variable ``name`` for writing ``values``: its staged array is grown to ``n_time_new`` steps."""
    main = zarr.open_array(str(path / name), mode="r")
    staged = tx.array(name)
    if staged.shape[1] != n_time_new:
        staged.resize((staged.shape[0], n_time_new))
    return _ChunkVar(name, values, main, staged, _direct_codec(main), main.fill_value, main.dtype)


def _rewrite_chunks(w: _CellWrite, var: _ChunkVar) -> None:
    """Update every touched chunk of ``var``, in parallel: chunks are independent, codecs release the GIL."""
    with ThreadPoolExecutor(max_workers=_WRITE_THREADS) as pool:
        list(pool.map(lambda s, e: _update_chunk(w, var, s, e), w.starts.tolist(), w.stops.tolist()))


def _update_chunk(w: _CellWrite, var: _ChunkVar, s: int, e: int) -> None:
    """Read the chunk holding sorted cells ``s:e``, merge them in and stage the chunk if a cell changed."""
    ci, cj = int(w.mi[s] // w.cm), int(w.ti[s] // w.ct)
    m0, t0 = ci * w.cm, cj * w.ct
    m1, t1 = min(m0 + w.cm, w.st.n_meters), min(t0 + w.ct, w.n_time_new)
    key = var.main.metadata.encode_chunk_key((ci, cj))
    block = _read_chunk(w, var, key, (m0, t0, m1, t1))
    changed = _merge_cells(w, var, block, s, e, m0, t0)
    if len(changed):
        if var.codec is not None:
            w.tx.write_synced(f"{var.name}/{key}", var.codec.encode(block))
        else:
            var.staged[m0:m1, t0:t1] = block
        w.changed_row[changed] = True


def _read_chunk(w: _CellWrite, var: _ChunkVar, key: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """Chunk ``key`` of ``var`` (cells ``box`` = m0, t0, m1, t1) as this transaction sees it.

    That is the chunk staged by an earlier batch, or the committed one (whose content is trusted up to the
    committed end of the array only). A missing chunk that must exist, or one that does not decode, is a
    :class:`StoreError` naming it.
    """
    m0, t0, m1, t1 = box
    staged_file = w.tx.files / var.name / key
    in_stage = staged_file.is_file()
    src = staged_file if in_stage else w.path / var.name / key
    old_t1 = min(t1, w.st.n_time if in_stage else w.st.n_time_main)
    if not in_stage and old_t1 > t0 and w.st.complete_chunks and not src.is_file():
        raise StoreError(_damaged(w.path, f"chunk {var.name}/{key} is missing"))
    try:
        if var.codec is not None:  # the whole (padded) chunk, decoded in place
            block = np.empty((w.cm, w.ct), dtype=var.dtype)
            if old_t1 > t0 and src.is_file():
                var.codec.decode(src.read_bytes(), out=block)
                if old_t1 < t0 + w.ct:  # beyond the old end of the array: fill (never trust padding)
                    block[:, old_t1 - t0 :] = var.fill
            else:
                block[...] = var.fill
        else:
            block = np.full((m1 - m0, t1 - t0), var.fill, dtype=var.dtype)
            if old_t1 > t0:
                block[:, : old_t1 - t0] = (var.staged if in_stage else var.main)[m0:m1, t0:old_t1]
    except Exception as exc:  # noqa: BLE001 - a chunk that does not decode: name it, write nothing
        raise StoreError(_damaged(w.path, f"chunk {var.name}/{key} is corrupt ({_line(exc)})")) from None
    return block


def _merge_cells(
    w: _CellWrite, var: _ChunkVar, block: np.ndarray, s: int, e: int, m0: int, t0: int
) -> np.ndarray:
    """Write sorted cells ``s:e`` of ``var`` into ``block`` (origin ``m0, t0``); note missing voltages.

    An optional variable's missing value never erases a stored one. Sets ``w.was_empty`` for voltage.

    Returns
    -------
    ndarray of int
        Sorted rows whose cell was new or changed.
    """
    lm, lt = w.mi[s:e] - m0, w.ti[s:e] - t0
    new = var.values[s:e]
    if var.name != "voltage":
        has = ~np.isnan(new)
        lm, lt, new, idx = lm[has], lt[has], new[has], np.arange(s, e)[has]
    else:
        idx = np.arange(s, e)
    cur = block[lm, lt]
    if block.dtype.kind == "f":
        empty = np.isnan(cur)
        diff = ~((cur == new) | (empty & np.isnan(new)))
    else:
        empty = cur == var.fill
        diff = cur != new
    if var.name == "voltage":
        w.was_empty[idx] = empty
    if diff.any():
        block[lm[diff], lt[diff]] = new[diff]
    return idx[diff]


def _direct_codec(arr: zarr.Array) -> ChunkCodec | None:
    """Whole-chunk codec of ``arr`` when its chunks are ``bytes(little) -> blosc [-> crc32c]`` (else None)."""
    return ChunkCodec.of(arr)


def _extend_time(tx: StoreTransaction, st: _StoreState, t0: int, n_time_new: int) -> None:
    """Grow the time axis to ``n_time_new`` steps; stage fill chunks for every new chunk column that no
    write of this transaction created (every chunk of a store exists, so a deleted one is detectable)."""
    times = tx.array("time")
    times.resize((n_time_new,))
    times[:] = (t0 + np.arange(n_time_new, dtype=np.int64) * st.interval_ns) // 10**9
    for name in st.arrays:
        arr = tx.array(name)
        if arr.shape[1] != n_time_new:
            arr.resize((arr.shape[0], n_time_new))
        ct = arr.chunks[1]
        new_cols = range(-(-st.n_time // ct), -(-n_time_new // ct))
        todo = [
            (ci, cj)
            for cj in new_cols
            for ci in range(arr.cdata_shape[0])
            if not (tx.files / name / arr.metadata.encode_chunk_key((ci, cj))).is_file()
        ]
        if not todo:
            continue
        codec = _direct_codec(arr)
        if codec is None:
            write_fill_chunks(tx.files / name, arr, todo)
            continue
        data = codec.encode(np.full(arr.chunks, arr.fill_value, dtype=arr.dtype))
        with ThreadPoolExecutor(max_workers=_WRITE_THREADS) as pool:
            list(pool.map(lambda idx, name=name, arr=arr, data=data: tx.write_synced(
                f"{name}/{arr.metadata.encode_chunk_key(idx)}", data), todo))


def _current_array(tx: StoreTransaction, name: str) -> np.ndarray:
    """A one-chunk array as this transaction sees it (staged by an earlier batch, or committed)."""
    if (tx.files / name / "c").exists():
        return tx.array(name)[:]
    return zarr.open_array(str(tx.path / name), mode="r")[:]


def _unique_pairs(mi: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (meter, timestamp) pairs sorted by meter then time."""
    order = np.lexsort((ts, mi))
    m, t = mi[order].astype(np.int64), ts[order]
    keep = np.ones(len(m), bool)
    keep[1:] = (m[1:] != m[:-1]) | (t[1:] != t[:-1])
    return m[keep], t[keep]


def _update_sampling_stats(
    path: Path,
    tx: StoreTransaction,
    st: _StoreState,
    mi: np.ndarray,
    ts: np.ndarray,
    off: np.ndarray,
    new_read: np.ndarray,
    unplaced: np.ndarray,
) -> None:
    """Accumulate raw-read counts and the spacing histogram; rewrite the two per-meter coordinates.

    A raw read is counted once per (meter, raw timestamp), however batches are split or redelivered:
    rows that wrote a missing ``voltage`` cell (``new_read``) are new by construction; rows that wrote no
    cell (``unplaced``: off grid, rejected values, conflicts) are looked up in a log of the keys already
    counted, kept in the statistics file and bounded to the latest :data:`_UNPLACED_KEYS_MAX` keys.

    Parameters
    ----------
    mi, ts, off, new_read, unplaced : ndarray, shape (n_rows,)
        Store row of the meter, raw timestamp [ns since epoch, UTC], off grid (beyond the snap tolerance),
        and the two masks above.
    """
    n = st.n_meters
    f = tx.current(_STATS)
    if f.is_file():
        with np.load(f) as z:
            n_raw, n_off, last = z["n_raw"].copy(), z["n_off"].copy(), z["last_ns"].copy()
            h_m, h_s, h_c = z["h_meter"], z["h_spacing"], z["h_count"]
            u_m = z["u_meter"] if "u_meter" in z.files else np.zeros(0, np.int64)
            u_t = z["u_ts"] if "u_ts" in z.files else np.zeros(0, np.int64)
    else:
        n_raw, n_off, last = np.zeros(n, np.int64), np.zeros(n, np.int64), np.full(n, _NAT, np.int64)
        h_m, h_s, h_c = (np.zeros(0, np.int64),) * 3
        u_m = u_t = np.zeros(0, np.int64)
    rows_u = np.flatnonzero(unplaced)
    if len(rows_u) and len(u_m):
        known = pd.MultiIndex.from_arrays([u_m, u_t])
        rows_u = rows_u[~pd.MultiIndex.from_arrays([mi[rows_u], ts[rows_u]]).isin(known)]
    rows = np.concatenate([np.flatnonzero(new_read), rows_u])
    if not len(rows):  # nothing this store has not counted already (e.g. a redelivered batch)
        return
    # distinct (meter, raw timestamp) pairs, sorted by meter then time
    order = np.lexsort((ts[rows], mi[rows]))
    rows = rows[order]
    km, kt = mi[rows].astype(np.int64), ts[rows]
    keep = np.ones(len(rows), bool)
    keep[1:] = (km[1:] != km[:-1]) | (kt[1:] != kt[:-1])
    rows, km, kt = rows[keep], km[keep], kt[keep]
    n_raw += np.bincount(km, minlength=n)
    n_off += np.bincount(km[off[rows]], minlength=n)
    first = np.ones(len(km), bool)
    first[1:] = km[1:] != km[:-1]
    sp_m = km[~first]
    sp_s = (kt[1:] - kt[:-1])[~first[1:]]
    # the spacing from the previous call's last read to this call's first read (sequential feeds)
    fm, ft = km[first], kt[first]
    cross = (last[fm] != _NAT) & (ft > last[fm])
    sp_m = np.concatenate([sp_m, fm[cross]])
    sp_s = np.concatenate([sp_s, ft[cross] - last[fm[cross]]])
    lastm = np.ones(len(km), bool)
    lastm[:-1] = km[1:] != km[:-1]
    last[km[lastm]] = np.maximum(last[km[lastm]], kt[lastm])
    if len(sp_m):
        # Merge into the histogram (sorted by meter, spacing; one row per pair) without re-sorting it:
        # spacings take few distinct values, so (meter, rank of spacing) packs into one sorted int64 key.
        values = np.unique(np.concatenate([np.unique(h_s), np.unique(sp_s)]))
        width = np.int64(len(values))
        old_key = h_m * width + np.searchsorted(values, h_s)
        new_key, new_count = np.unique(sp_m * width + np.searchsorted(values, sp_s), return_counts=True)
        pos = np.searchsorted(old_key, new_key)
        found = pos < len(old_key)
        found[found] = old_key[pos[found]] == new_key[found]
        h_c = h_c.copy()
        np.add.at(h_c, pos[found], new_count[found])
        ins = ~found
        all_key = np.insert(old_key, pos[ins], new_key[ins])
        h_c = np.insert(h_c, pos[ins], new_count[ins])
        h_m, h_s = all_key // width, values[all_key % width]
    # median spacing per meter from the histogram (mean of the two middle values, as numpy.median)
    interval = np.full(n, np.nan)
    if len(h_m):
        cum = np.cumsum(h_c)
        starts = np.flatnonzero(np.r_[True, h_m[1:] != h_m[:-1]])
        meters = h_m[starts]
        before = np.r_[0, cum][starts]
        total = np.add.reduceat(h_c, starts)
        lo = np.searchsorted(cum, before + (total - 1) // 2, side="right")
        hi = np.searchsorted(cum, before + total // 2, side="right")
        interval[meters] = (h_s[lo] + h_s[hi]) / 2.0 / 1e9
    # Meters this ingest has never seen keep what the store holds (e.g. written by the generator).
    old_interval = _current_array(tx, "sampling_interval_s")
    old_frac = _current_array(tx, "off_grid_fraction")
    interval = np.where(np.isnan(interval), old_interval, interval)
    frac = np.where(n_raw > 0, n_off / np.maximum(n_raw, 1), old_frac)
    tx.array("sampling_interval_s")[:] = interval
    tx.array("off_grid_fraction")[:] = frac
    if len(rows_u):
        u_m = np.concatenate([u_m, mi[rows_u].astype(np.int64)])[-_UNPLACED_KEYS_MAX:]
        u_t = np.concatenate([u_t, ts[rows_u]])[-_UNPLACED_KEYS_MAX:]
    buf = io.BytesIO()
    np.savez(
        buf, n_raw=n_raw, n_off=n_off, last_ns=last, h_meter=h_m, h_spacing=h_s, h_count=h_c,
        u_meter=u_m, u_ts=u_t,
    )
    tx.write_file(_STATS, buf.getvalue())


# ----------------------------------------------------------------------------------------------- files
def _read_table(path: Path, what: str, column_map: dict[str, str] | None = None) -> pd.DataFrame:
    """A CSV or Parquet table; identifier and phase columns of a CSV (also under their mapped names) as text."""
    if not path.is_file():
        raise ContractError(f"{what} file {str(path)!r} does not exist")
    text_columns = ("meter_id", "feeder_id", "transformer_id", "phase")
    dtype = dict.fromkeys(text_columns, str)
    dtype.update({k: str for k, v in (column_map or {}).items() if v in text_columns})
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=dtype)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ContractError(f"{what} file {str(path)!r} cannot be read: {exc}") from exc


def _iter_batches(
    path: Path, config: IngestConfig, columns: Sequence[str] | None = None, pivots: list[Any] | None = None
) -> Iterator[pd.DataFrame]:
    """Stream a readings file in batches of ``config.batch_rows`` rows (columns mapped).

    A channel-layout file (``[ingest] readings_layout = "channel"``) is read whole, pivoted to wide rows
    (:func:`~phaseid_hpc.input_formats.pivot_channels`) and handed out in batches; what the pivot did is
    appended to ``pivots`` when given.
    """
    if config.readings_layout == "channel":
        yield from _channel_batches(path, config, columns, pivots)
        return
    inverse = {v: k for k, v in config.column_map.items()}
    if path.suffix.lower() in (".parquet", ".pq"):
        pf = pq.ParquetFile(path)
        cols = None
        if columns is not None:
            cols = [inverse.get(c, c) for c in columns if inverse.get(c, c) in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=config.batch_rows, columns=cols):
            yield batch.to_pandas().rename(columns=config.column_map)
    else:
        usecols = None
        if columns is not None:
            header = pd.read_csv(path, nrows=0).columns
            usecols = [c for c in header if config.column_map.get(c, c) in columns]
        for chunk in pd.read_csv(path, chunksize=config.batch_rows, dtype=str, usecols=usecols):
            yield chunk.rename(columns=config.column_map)


def _channel_batches(
    path: Path, config: IngestConfig, columns: Sequence[str] | None, pivots: list[Any] | None
) -> Iterator[pd.DataFrame]:
    if path.suffix.lower() in (".parquet", ".pq"):
        raw = pd.read_parquet(path)
    else:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    raw = raw.rename(columns=config.column_map)
    if "timestamp" in raw.columns:  # timestamps that do not parse: say so before anything needs them
        tally = _TimestampTally()
        tally.add(raw["timestamp"], _parse_timestamps(raw["timestamp"], config.timestamp_format, config.timezone))
        tally.check(path, config)
    piv = pivot_channels(
        raw, config.channel_map, config.channel_ignore, f"readings file {str(path)!r}",
        parse_ns=lambda s: _parse_timestamps(s, config.timestamp_format, config.timezone),
        interval_s=config.interval_s,
    )
    if pivots is not None:
        pivots.append(piv)
    wide = piv.wide if columns is None else piv.wide[[c for c in piv.wide.columns if c in columns]]
    for start in range(0, len(wide), config.batch_rows):
        yield wide.iloc[start : start + config.batch_rows].reset_index(drop=True)


def _columns_of(path: Path, config: IngestConfig) -> list[str]:
    if config.readings_layout == "channel":
        return ["meter_id", "timestamp", *channel_columns(config.channel_map)]
    if path.suffix.lower() in (".parquet", ".pq"):
        names = pq.ParquetFile(path).schema_arrow.names
    else:
        names = list(pd.read_csv(path, nrows=0).columns)
    return [config.column_map.get(c, c) for c in names]


def _scan_grid(paths: Sequence[Path], meter_ids: pd.Index, config: IngestConfig) -> tuple[int, int, int]:
    """First pass: dominant interval [s] and the first and last grid time [ns] of known meters' reads."""
    spacing: dict[int, int] = {}
    tmin, tmax = None, None
    stamps: list[np.ndarray] = []
    for p in paths:
        tally = _TimestampTally()
        for b in _batches(p, config, columns=("meter_id", "timestamp")):
            if "timestamp" not in b.columns or "meter_id" not in b.columns:
                raise ContractError(column_map_help(
                    f"readings file {str(p)!r}", list(b.columns),
                    [c for c in ("meter_id", "timestamp") if c not in b.columns], (), "column_map"))
            ts = _parse_timestamps(b["timestamp"], config.timestamp_format, config.timezone)
            tally.add(b["timestamp"], ts)
            mi = meter_ids.get_indexer(b["meter_id"].astype(str).to_numpy(dtype=object))
            ok = (ts != _NAT) & (mi >= 0)
            ts, mi = ts[ok], mi[ok]
            if not len(ts):
                continue
            km, kt = _unique_pairs(mi, ts)
            same = km[1:] == km[:-1]
            d = (kt[1:] - kt[:-1])[same]
            vals, cnt = np.unique(d[d > 0], return_counts=True)
            for v, c in zip(vals.tolist(), cnt.tolist()):
                spacing[v] = spacing.get(v, 0) + c
            stamps.append(np.unique(ts))
        tally.check(p, config)
    if config.interval_s > 0:
        iv = int(config.interval_s) * 10**9
    elif spacing:
        best = max(spacing.values())
        iv = min(v for v, c in spacing.items() if c == best)
        if iv % 10**9:
            raise ContractError(
                f"dominant read spacing {iv / 1e9} s is not a whole number of seconds; set interval_s"
            )
    else:
        raise ContractError(
            f"cannot find the sampling interval: fewer than 2 valid reads per meter in {[str(p) for p in paths]}; "
            "set [ingest] interval_s"
        )
    if not stamps:
        raise ContractError(
            f"no valid reads of known meters in {[str(p) for p in paths]} (every read's meter is missing from "
            "the meters table, or its timestamp did not parse)"
        )
    allts = np.unique(np.concatenate(stamps))
    rem = np.mod(allts, iv)
    tol = round(config.snap_tolerance_s * 1e9)
    grid = np.where(rem <= tol, allts - rem, np.where(iv - rem <= tol, allts - rem + iv, _NAT))
    grid = grid[grid != _NAT]
    if not len(grid):
        raise ContractError(f"no read falls on a {iv // 10**9} s grid in {[str(p) for p in paths]}")
    tmin, tmax = int(grid.min()), int(grid.max())
    return iv // 10**9, tmin, tmax


def _check_readings_file(path: Path, config: IngestConfig) -> None:
    """Cheap first look at a readings file (Parquet footer and schema / CSV header) before any write.

    Raises :class:`DataError` with one line naming the file: empty, not Parquet/CSV (garbage, truncated),
    no rows, a required column missing, a value column of booleans.
    """
    name = str(path)
    if not path.is_file():
        raise ContractError(f"readings file {name!r} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"readings file {name!r} is empty (0 bytes)")
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            meta = pq.ParquetFile(path)
            schema, n_rows = meta.schema_arrow, meta.metadata.num_rows
        except Exception as exc:  # noqa: BLE001 - any failure to read the footer: garbage or truncated
            raise DataError(f"readings file {name!r} is not a readable Parquet file ({_line(exc)})") from None
        header = list(schema.names)
        columns = [config.column_map.get(c, c) for c in header]
        types = {config.column_map.get(f.name, f.name): f.type for f in schema}
        if n_rows == 0:
            raise DataError(f"readings file {name!r} holds no rows")
        for c in ("voltage_v",) + contract.READINGS_OPTIONAL:
            if c in types and pa.types.is_boolean(types[c]):
                raise DataError(f"readings file {name!r}: column {c!r} is of type bool, expected numbers")
    else:
        try:
            with open(path, "rb") as fh:
                head = fh.read(1 << 16)
            if b"\x00" in head:
                raise ValueError("it holds NUL bytes (binary data)")
            header = [str(c) for c in pd.read_csv(path, nrows=0).columns]
            columns = [config.column_map.get(c, c) for c in header]
        except Exception as exc:  # noqa: BLE001 - any failure to read the header: not a CSV file
            raise DataError(f"readings file {name!r} is not a readable CSV file ({_line(exc)})") from None
    required, optional = _layout_columns(config)
    missing = [c for c in required if c not in columns]
    if config.readings_layout == "channel" and "channel" not in columns and "uom" not in columns:
        missing.append("channel")  # or uom: one of the two names the channel
    if missing:
        msg = column_map_help(f"readings file {name!r}", header, missing, optional, "column_map")
        channel_like = guess_column_map(header, ("channel", "uom", "value"))
        if config.readings_layout == "wide" and "value" in channel_like.values() and len(channel_like) > 1:
            msg += (
                '. Its header looks like an MDM channel export (one row per meter, channel and interval): set '
                '[ingest] readings_layout = "channel" and map meter_id, channel and/or uom, timestamp, value and '
                "multiplier"
            )
        raise DataError(msg)


def _layout_columns(config: IngestConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Required and optional contract columns of a readings file in the configured layout."""
    if config.readings_layout == "channel":
        return CHANNEL_COLUMNS
    return contract.READINGS_REQUIRED, contract.READINGS_OPTIONAL


def _batches(path: Path, config: IngestConfig, columns: Sequence[str] | None = None,
             pivots: list[Any] | None = None) -> Iterator[pd.DataFrame]:
    """:func:`_iter_batches`, with any failure to read the file turned into one :class:`DataError` line."""
    it = _iter_batches(path, config, columns, pivots)
    rows = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except PhaseIDError:
            raise
        except Exception as exc:  # noqa: BLE001 - a truncated or garbled file fails in many ways
            raise DataError(
                f"readings file {str(path)!r} cannot be read after row {rows} ({_line(exc)}); nothing was written"
            ) from None
        rows += len(batch)
        yield batch


def _refuse_readings_before_start(paths: Sequence[Path], meters: pd.DataFrame, store: Path,
                                  config: IngestConfig) -> None:
    """Raise :class:`StoreError` when a store created by another writer starts after these readings."""
    _, tmin, _ = _scan_grid(paths, pd.Index(meters["meter_id"]), config)
    start = pd.Timestamp(open_store(store, block_bytes=None, recover=False)["time"].values[0])
    first = pd.Timestamp(int(tmin), unit="ns")
    if first < start:
        raise StoreError(
            f"store {str(store)!r} was created by another ingest while this one waited for it, starting at "
            f"{start} UTC, after the first reading of {', '.join(p.name for p in paths)} ({first} UTC); a "
            "store's time axis only grows at the end, so nothing was written: ingest all these files in one "
            "command (or the earliest first)"
        )


def _creation_lock(store: Path) -> Path:
    """The lock file beside ``store`` that serialises its creation (the store folder does not exist yet)."""
    return store.parent / f".{store.name}.phaseid-create.lock"


def _remove_creation_leftovers(store: Path) -> list[str]:
    """Delete ``STORE.init-*`` folders of killed creations (call with the creation lock held)."""
    gone = []
    for q in sorted(store.parent.glob(f"{glob.escape(store.name)}.init-*")):
        shutil.rmtree(q, ignore_errors=True)
        gone.append(q.name)
    return gone


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (retired transaction stages, being deleted, skipped)."""
    files, dirs = [], [root]
    for d, dn, fn in os.walk(root):
        dn[:] = [x for x in dn if not x.startswith("done-")]
        files += [Path(d) / f for f in fn]
        dirs += [Path(d) / x for x in dn]

    def sync(p: Path, directory: bool = False) -> None:
        try:
            _fsync_path(p, directory=directory)
        except FileNotFoundError:
            pass

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(sync, files))
        list(pool.map(lambda d: sync(d, directory=True), dirs))


def count_reading_rows(paths: Iterable[str | os.PathLike[str]]) -> int:
    """Rows of readings files, as :func:`ingest_files` reports them to its ``progress`` callback.

    Parquet: from the footers (nothing else is read); CSV: the file's line count less its header.
    """
    total = 0
    for p in map(Path, paths):
        if p.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            total += int(pq.ParquetFile(p).metadata.num_rows)
            continue
        with open(p, "rb") as fh:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 24), b""))
            fh.seek(max(0, p.stat().st_size - 1))
            last = fh.read(1)
        total += max(0, lines + (1 if last not in (b"\n", b"") else 0) - 1)
    return total


def ingest_files(
    readings_paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    meters_path: str | os.PathLike[str] | None,
    store: str | os.PathLike[str],
    *,
    transformers_path: str | os.PathLike[str] | None = None,
    references_path: str | os.PathLike[str] | None = None,
    config: IngestConfig | None = None,
    lock_timeout_s: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> IngestReport:
    """Build a store from contract files, or upsert more readings into an existing one: one transaction.

    All files and all their batches form one transaction: every file is checked (Parquet footer and schema,
    CSV header) before anything is staged, every batch is staged, and the store changes only when the
    last batch is in (kill -9 at any moment leaves the old store or the new one). A new store is built and
    filled beside its path (``STORE.init-<id>``) and renamed into place at the end; creations of one path
    serialise on ``.STORE.phaseid-create.lock`` beside it, and the next writer removes the leftovers of a
    killed creation. Writers of an existing store serialise on its lock (see :mod:`phaseid_hpc.store`).

    Parameters
    ----------
    readings_paths : path-like or iterable of path-like
        Readings files (``.parquet`` or CSV), long format; streamed in ``config.batch_rows`` batches.
    meters_path : path-like, str or None
        Meter table: CSV or Parquet; GeoPackage / GeoJSON (extra ``gis``; points give lat/lon); a
        ``postgresql://host/db?table=schema.meters`` URL, or ``None`` for ``config.meters_database`` (extra
        ``postgres``; read-only role, see :mod:`phaseid_hpc.gis`). Column names are mapped with
        ``config.meters_column_map``; phase spellings (``bc``, ``C-B``, OpenDSS ``2``) are normalised to the
        contract labels and the mapping reported (``IngestReport.phase_labels``).
    store : path-like
        Store directory; created when absent.
    transformers_path, references_path : path-like, optional
        Transformer table and feeder-head references; used when the store is created.
    config : IngestConfig, optional
        Defaults to ``IngestConfig()``.
    lock_timeout_s : float, optional
        Wait at most this long [s] for another writer (then :class:`StoreError` naming it); ``None``: wait.
    progress : callable, optional
        Called with the number of input rows staged after each batch (a file read whole, as a channel
        export is, reports its rows when done); the total to expect is :func:`count_reading_rows`.

    Returns
    -------
    IngestReport
        Counts summed over all batches.

    Raises
    ------
    ContractError
        A file is missing or lacks a required column (message names the file and column);
        :class:`DataError`: a file is empty, garbage, truncated or has a value column of booleans.
    StoreError
        The path holds something that is not a phaseid store, the meters file has meters the existing
        store lacks, or a meter changed feeder or transformer.
    """
    t_start = _time.perf_counter()
    config = IngestConfig() if config is None else config
    if isinstance(readings_paths, (str, os.PathLike)):
        readings_paths = [readings_paths]
    paths = [Path(p) for p in readings_paths]
    for p in paths:
        _check_readings_file(p, config)
    store = Path(store)
    report = IngestReport(store=str(store), timezone=config.timezone)
    meters, meters_path = _read_meters(meters_path, config, report)
    report.notes.append(
        "timestamps: " + (f"format {config.timestamp_format!r}" if config.timestamp_format else "ISO 8601")
        + f"; those without a UTC offset read as {config.timezone} ([ingest] timezone)"
    )
    if not (store / "zarr.json").is_file():
        if store.exists() and (not store.is_dir() or any(store.iterdir())):
            raise StoreError(
                f"{str(store)!r} exists but is not a Zarr store (no zarr.json): give a store or a new path"
            )
        with exclusive_lock(_creation_lock(store), f"creation of store {str(store)!r}", timeout_s=lock_timeout_s):
            _remove_creation_leftovers(store)
            if not (store / "zarr.json").is_file():
                _create_store(paths, meters, store, report, config, transformers_path, references_path, progress)
                report.meters = int(_count_meters_with_data(store))
                report.elapsed_s = _time.perf_counter() - t_start
                return report
        # another process created it while this one waited: extend it like any existing store, unless
        # these readings start before it does (the time axis only grows at the end): then fail, loudly
        _refuse_readings_before_start(paths, meters, store, config)
    elif any(store.parent.glob(f"{glob.escape(store.name)}.init-*")):
        with exclusive_lock(_creation_lock(store), "", blocking=False) as held:
            if held:  # no creation is running: what is there was left by a killed one
                _remove_creation_leftovers(store)
    if transformers_path or references_path:
        report.notes.append(
            f"store {str(store)!r} exists: transformers/references files are used only when a store is created"
        )
    with StoreTransaction(store, lock_timeout_s=lock_timeout_s) as tx:
        st = _store_state(store)
        _check_meters_match(store, meters, meters_path)
        _stage_files(tx, st, paths, report, config, progress)
    report.meters = int(_count_meters_with_data(store))
    report.elapsed_s = _time.perf_counter() - t_start
    return report


def _read_meters(
    source: str | os.PathLike[str] | None, config: IngestConfig, report: IngestReport
) -> tuple[pd.DataFrame, str]:
    """The meters table from a file or the GIS database, in contract form; notes and phase mapping to ``report``.

    Returns the sorted table (:func:`~phaseid_hpc.store.sort_meters`) and the source's name for messages.
    """
    from . import gis

    if gis.is_gis_source(source):
        got = gis.read_meters_source(source, config)
        table, name = got.table, got.description
        report.notes += got.notes
    else:
        name = str(source)
        table = _read_table(Path(source), "meters", config.meters_column_map)
    header = [str(c) for c in table.columns]
    table = table.rename(columns=config.meters_column_map)
    missing = [c for c in contract.METERS_REQUIRED if c not in table.columns]
    if missing:
        raise ContractError(column_map_help(f"meters table {name!r}", header, missing, contract.METERS_OPTIONAL,
                                            "meters_column_map"))
    phase, mapping = normalise_phases(table["phase"], table["meter_id"].astype(str), f"meters table {name!r}")
    table = table.assign(phase=phase)
    if mapping:
        report.phase_labels = mapping
        report.notes.append(f"phase labels normalised: {', '.join(f'{k!r} -> {v}' for k, v in mapping.items())}")
    return sort_meters(table, source=name), name


def _check_meters_match(store: Path, meters: pd.DataFrame, meters_path: Any) -> None:
    """The meters file must not add meters nor move one to another feeder or transformer."""
    have = pd.DataFrame(
        {
            "meter_id": _strings(zarr.open_array(str(store / "meter"), mode="r")[:]),
            "feeder_id": _strings(zarr.open_array(str(store / "feeder_id"), mode="r")[:]),
            "transformer_id": _strings(zarr.open_array(str(store / "transformer_id"), mode="r")[:]),
        }
    ).set_index("meter_id")
    new = meters.loc[~meters["meter_id"].isin(have.index), "meter_id"]
    if len(new):
        raise StoreError(
            f"{meters_path}: {len(new)} meter(s) not in store {str(store)!r} (first: {new.head(3).tolist()}); "
            "a store's meter order is fixed at creation: ingest all files into a new store to add meters"
        )
    cur = have.loc[meters["meter_id"]]
    moved = (cur["feeder_id"].to_numpy() != meters["feeder_id"].to_numpy()) | (
        cur["transformer_id"].to_numpy() != meters["transformer_id"].to_numpy()
    )
    if moved.any():
        raise StoreError(
            f"{meters_path}: {int(moved.sum())} meter(s) changed feeder or transformer (first: "
            f"{meters['meter_id'][moved].head(3).tolist()}); rebuild the store from all files"
        )


def _stage_files(
    tx: StoreTransaction, st: _StoreState, paths: Sequence[Path], report: IngestReport, config: IngestConfig,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Stage every batch of every file into ``tx`` (one transaction), merging counts into ``report``."""
    batch_config = dataclasses.replace(config, column_map={})
    for p in paths:
        reported = 0
        offset = 0
        tally = _TimestampTally()
        pivots: list[Any] = []
        for i, batch in enumerate(_batches(p, config, pivots=pivots)):
            source = f"{p.name}.{i}"
            df = _apply_column_map(batch, {}, str(p))
            _check_value_types(df, str(p))
            r = IngestReport(store=report.store, sources=[p.name], rows_read=len(df))
            st = _ingest_batch(tx, st, df, r, batch_config, source, offset)
            tally.n += len(df)
            tally.n_bad += r.timestamps_unparsed
            tally.examples += [e for e in r.timestamp_examples if e not in tally.examples][: 5 - len(tally.examples)]
            report.merge(r)
            offset += len(batch)
            if progress is not None and not pivots:  # rows of the file itself (a pivoted file: at its end)
                progress(len(batch))
                reported += len(batch)
        if offset == 0:
            raise DataError(f"readings file {str(p)!r} holds no readings (a header only); nothing was written")
        if progress is not None and pivots:
            progress(max(0, count_reading_rows([p]) - reported))
        tally.check(p, config)
        if tally.n_bad:
            report.notes.append(_timestamp_help(p.name, _original_name(config, "timestamp"), tally.n_bad, tally.n,
                                                tally.examples, config) + ": those rows are quarantined")
        for piv in pivots:
            report.channel_rows_read += piv.rows_read
            report.channel_duplicates_identical += piv.duplicates_identical
            for k, v in piv.ignored.items():
                report.channel_rows_ignored[k] = report.channel_rows_ignored.get(k, 0) + v
            report.notes.append(piv.note(p.name))
        if _FAULT_HOOK is not None:
            _FAULT_HOOK("file", p.name)


#: Test hook: called as ``hook(step, detail)`` between the steps of :func:`ingest_files`.
_FAULT_HOOK: Any = None


def _create_store(
    paths: Sequence[Path],
    meters: pd.DataFrame,
    store: Path,
    report: IngestReport,
    config: IngestConfig,
    transformers_path: Any,
    references_path: Any,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Build the store beside ``store``, stage every reading into it, and rename it into place."""
    interval_s, tmin, tmax = _scan_grid(paths, pd.Index(meters["meter_id"]), config)
    times = pd.date_range(pd.Timestamp(tmin), pd.Timestamp(tmax), freq=pd.Timedelta(seconds=interval_s))
    cols = set().union(*(_columns_of(p, config) for p in paths))
    variables = ["voltage"] + [c for c in contract.READINGS_OPTIONAL if c in cols]
    tr = _read_table(Path(transformers_path), "transformers") if transformers_path else None
    ref = _read_table(Path(references_path), "references") if references_path else None
    tmp = store.with_name(f"{store.name}.init-{uuid.uuid4().hex[:8]}")
    try:
        initialize_store(
            tmp,
            meters,
            times,
            interval_s=interval_s,
            transformers=tr,
            references=ref,
            variables=variables,
            block_bytes=config.block_bytes,
            voltage_encoding=config.voltage_encoding,
            time_chunk=config.time_chunk or 2976,
        )
        with StoreTransaction(tmp) as tx:
            _stage_files(tx, _store_state(tmp), paths, report, config, progress)
        for done in (tmp / "_phaseid").glob("done-*"):  # the retired stage: not part of the new store
            shutil.rmtree(done, ignore_errors=True)
        _fsync_tree(tmp)
        if _FAULT_HOOK is not None:
            _FAULT_HOOK("create", store.name)
        os.rename(tmp, store)  # the commit point of a creation
        _fsync_path(store.parent, directory=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    report.store = str(store)
    report.new_meters = len(meters)
    report.notes.append(
        f"created store {str(store)!r}: {len(meters)} meters, {len(times)} steps of {interval_s} s "
        f"from {times[0]} to {times[-1]} (UTC), variables {variables}, voltage {config.voltage_encoding}"
    )


def _count_meters_with_data(store: Path) -> int:
    f = store / _STATS
    if not f.is_file():
        return 0
    with np.load(f) as z:
        return int((z["n_raw"] > 0).sum())
