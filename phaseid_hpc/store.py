"""The Zarr v3 store: schema, creation, block writes, opening, validation, feeder partitions, transactions.

Layout of a store directory ``STORE``::

    STORE/zarr.json                 root group (consolidated metadata, attrs interval_s, phaseid_store_version)
    STORE/voltage, kw, kvar         (meter, time) data arrays
    STORE/meter, time, ...          coordinates (see docs/ARCHITECTURE.md "Store schema")
    STORE/quarantine/*.parquet      rows the ingest could not use, with a ``reason`` column
    STORE/_phaseid/                 bookkeeping (per-meter sampling statistics, seen batches, lock, staging)

``quarantine`` and ``_phaseid`` carry an empty Zarr group ``zarr.json`` so that Zarr and xarray walk past
them silently; ``xarray.open_zarr(STORE)`` sees only the schema variables.

Chunking
--------
Zarr v3 has only regular chunk grids, so storage chunks along ``meter`` cannot follow feeder boundaries.
The storage chunk is therefore small along ``meter`` (``meter_chunk`` meters, a power of two, about
``min(block_bytes, 4 MB)`` per chunk) and fixed along ``time`` (``time_chunk`` samples). Feeder alignment
lives one level up: :func:`open_store` chunks the Dask arrays along ``meter`` by :func:`feeder_blocks`
(whole feeders, about ``block_bytes`` each), so every Dask task holds whole feeders and reads at most two
partial storage chunks at its edges. Sharding was not used: chunks of a few MB already keep the file count
low (1 M meters x 35 days: ~8 k files per variable) and a sharded partial write rewrites the whole shard,
which would make :func:`~phaseid_hpc.ingest.ingest_frame` upserts slower.

Transactions
------------
Every change after creation goes through :class:`StoreTransaction`: new chunk files, metadata and
side files are written to ``STORE/_phaseid/txn-<id>/`` (mirroring the store's paths), fsynced (chunk files
by the thread that wrote them, :meth:`StoreTransaction.write_synced`; the rest at commit), then a
``COMMITTED`` marker is renamed into place (the commit point), then each staged file is moved over its
target with :func:`os.replace` (in a thread pool: order does not matter after the commit point). A crash before the marker leaves the old store (the staging folder is
deleted on the next open); a crash after it is rolled forward by :func:`recover_store` (called by every
writer and by :func:`open_store`).

Writers serialise on an exclusive ``flock`` of ``STORE/_phaseid/lock`` (mode 0644), taken *before* a
transaction reads anything of the store, so two writers never merge into stale state: the second waits
(or, given ``lock_timeout_s``, fails with a :class:`~phaseid_hpc.errors.StoreError` naming the holder,
whose pid, host and start time the lock file holds). On Linux NFS clients ``flock`` is emulated with
byte-range locks, so writers on several hosts of one shared file system serialise too.

Integrity
---------
Stores of version 2 (:data:`STORE_VERSION`) end every chunk of every array with a CRC-32C (the Zarr v3
``crc32c`` codec) and hold every chunk of the (meter, time) data variables (chunks of fill values
included), so a flipped byte, a truncated or garbage chunk and a deleted chunk are all detectable:
:func:`read_meter_block` raises a one-line :class:`StoreError` naming the chunk, and
``validate_store(deep=True)`` (``phaseid validate-store --deep``) reads every chunk and names each bad one.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import json
import os
import shutil
import socket
import struct
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from . import contract
from .errors import ContractError, StoreError

__all__ = [
    "DATA_VARIABLES",
    "STORE_VERSION",
    "FeederBlock",
    "StoreTransaction",
    "encode_voltage",
    "feeder_blocks",
    "initialize_store",
    "open_store",
    "read_lock",
    "recover_store",
    "sort_meters",
    "validate_store",
    "write_meter_block",
]

#: Version of the store layout written into the root attributes (2: CRC-32C on every chunk, every data
#: chunk present; 1: neither).
STORE_VERSION = 2
#: (meter, time) data variables a store may hold.
DATA_VARIABLES: tuple[str, ...] = ("voltage", "kw", "kvar")
#: Coordinates along ``meter`` holding strings / floats.
METER_STR_COORDS: tuple[str, ...] = ("feeder_id", "transformer_id", "phase_gis", "service_type")
METER_FLOAT_COORDS: tuple[str, ...] = ("nominal_v", "lat", "lon", "sampling_interval_s", "off_grid_fraction")
#: int16 deci-volt encoding.
DECIVOLT_SCALE = 0.1
INT16_FILL = -32768
_SIDE_GROUPS = ("quarantine", "_phaseid")
_GROUP_JSON = {"zarr_format": 3, "node_type": "group", "attributes": {}}
_EPOCH_UNITS = "seconds since 1970-01-01"
#: CF-style ``units`` (UDUNITS spelling; ``"1"``: dimensionless, identifiers and labels included) and
#: ``long_name`` of every variable and coordinate a store can hold. ``time`` takes its units from its
#: encoding (:data:`_EPOCH_UNITS`), which xarray decodes to datetimes.
CF_ATTRIBUTES: dict[str, dict[str, str]] = {
    "voltage": {"units": "V", "long_name": "meter voltage magnitude"},
    "kw": {"units": "kW", "long_name": "meter real power"},
    "kvar": {"units": "kvar", "long_name": "meter reactive power"},
    "meter": {"units": "1", "long_name": "meter identifier"},
    "time": {"long_name": "end of the reading interval (UTC)", "standard_name": "time"},
    "feeder_id": {"units": "1", "long_name": "feeder of the meter (GIS)"},
    "transformer_id": {"units": "1", "long_name": "service transformer of the meter (GIS)"},
    "phase_gis": {"units": "1", "long_name": "phase connection of the meter (GIS)"},
    "service_type": {"units": "1", "long_name": "service type of the meter (GIS)"},
    "nominal_v": {"units": "V", "long_name": "nominal service voltage of the meter"},
    "lat": {"units": "degrees_north", "long_name": "meter latitude", "standard_name": "latitude"},
    "lon": {"units": "degrees_east", "long_name": "meter longitude", "standard_name": "longitude"},
    "sampling_interval_s": {"units": "s", "long_name": "median spacing of the meter's raw timestamps"},
    "off_grid_fraction": {"units": "1", "long_name": "share of the meter's raw reads off the time grid (quarantined)"},
    "transformer": {"units": "1", "long_name": "transformer identifier"},
    "kva_rating": {"units": "kVA", "long_name": "transformer nameplate rating"},
    "n_phases": {"units": "1", "long_name": "number of phases of the transformer"},
    "transformer_feeder_id": {"units": "1", "long_name": "feeder of the transformer"},
    "reference": {"units": "1", "long_name": "feeder-head reference series (feeder/phase)"},
    "reference_feeder_id": {"units": "1", "long_name": "feeder of the reference series"},
    "reference_phase": {"units": "1", "long_name": "phase of the reference series"},
    "reference_voltage": {"units": "V", "long_name": "feeder-head reference voltage magnitude"},
}


# --------------------------------------------------------------------------------------------- meters
def sort_meters(meters: pd.DataFrame, *, source: str = "meters") -> pd.DataFrame:
    """Check a contract meter table and sort it by feeder, transformer, meter id (stable).

    Parameters
    ----------
    meters : DataFrame
        Columns ``meter_id, feeder_id, transformer_id, phase`` and optionally ``service_type, nominal_v
        [V], lat, lon [deg]``.
    source : str
        Name used in error messages (the file).

    Returns
    -------
    DataFrame
        All contract columns (optional ones filled: ``""`` / NaN), string ids, a fresh RangeIndex.

    Raises
    ------
    ContractError
        Missing column, empty or duplicated meter id, unknown phase label (message names row and column).
    """
    missing = [c for c in contract.METERS_REQUIRED if c not in meters.columns]
    if missing:
        raise ContractError(f"{source}: missing required column(s) {missing}; found {list(meters.columns)}")
    out = pd.DataFrame(index=pd.RangeIndex(len(meters)))
    for c in ("meter_id", "feeder_id", "transformer_id", "phase", "service_type"):
        col = meters[c] if c in meters.columns else pd.Series([""] * len(meters))
        vals = col.to_numpy(dtype=object)
        bad = pd.isna(vals) if c != "service_type" else np.zeros(len(vals), bool)
        if c != "service_type" and bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ContractError(
                f"{source}: row {row + 2}, column {c!r}: empty value (expected an identifier)"
            )
        out[c] = _str_array(vals)
    for c in ("nominal_v", "lat", "lon"):
        if c in meters.columns:
            v = pd.to_numeric(meters[c], errors="coerce").to_numpy(np.float64)
            bad = np.flatnonzero(meters[c].notna().to_numpy() & np.isnan(v))
            if len(bad):
                raise ContractError(
                    f"{source}: row {bad[0] + 2}, column {c!r}: expected a number, got {meters[c].iloc[bad[0]]!r}"
                )
            out[c] = v
        else:
            out[c] = np.nan
    bad_phase = ~out["phase"].isin(contract.PHASE_LABELS)
    if bad_phase.any():
        row = int(np.flatnonzero(bad_phase.to_numpy())[0])
        raise ContractError(
            f"{source}: row {row + 2}, column 'phase': expected one of {list(contract.PHASE_LABELS)}, "
            f"got {out['phase'].iloc[row]!r}"
        )
    dup = out["meter_id"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise ContractError(
            f"{source}: row {row + 2}, column 'meter_id': duplicate id {out['meter_id'].iloc[row]!r}"
        )
    out = out.sort_values(["feeder_id", "transformer_id", "meter_id"], kind="stable").reset_index(drop=True)
    return out


def _meter_chunk(block_bytes: float, time_chunk: int, itemsize: int = 4) -> int:
    """Storage chunk length along ``meter``: a power of two, ~min(block_bytes, 4 MB) per chunk."""
    target = min(float(block_bytes), 4e6) / max(1, time_chunk * itemsize)
    return int(2 ** max(0, int(np.floor(np.log2(max(target, 1.0))))))


# --------------------------------------------------------------------------------------------- encoding
def encode_voltage(values: np.ndarray, encoding: str) -> np.ndarray:
    """Encode voltages [V] (NaN = missing) to the stored dtype.

    ``"float32"``: float32 with NaN. ``"int16_decivolt"``: ``round(v / 0.1)`` as int16, NaN -> -32768.
    Values outside +-3276.7 V cannot be stored as deci-volts: the caller must quarantine them first
    (they are stored as the fill value, i.e. missing).
    """
    values = np.asarray(values)
    if encoding == "float32":
        return values.astype(np.float32)
    if encoding == "int16_decivolt":
        q = np.rint(values.astype(np.float64) / DECIVOLT_SCALE)
        bad = ~np.isfinite(q) | (q < -32767) | (q > 32767)
        q[bad] = INT16_FILL
        return q.astype(np.int16)
    raise StoreError(f"unknown voltage encoding {encoding!r}: expected 'float32' or 'int16_decivolt'")


def _compressors(dtype: np.dtype) -> tuple[Any, ...]:
    # Byte shuffle + blosc's zstd at clevel 2: against clevel 3, chunks 1-3% bigger, encoded 1.7-5x faster
    # (int16 deci-volts of the generator 175 -> 873 MB/s, full-precision float32 593 -> 1,095 MB/s on one
    # core) and decoded as fast; clevel 1 is 3-7% bigger and decodes slower. Plain zstd is bigger on
    # full-precision float32 (benchmarks/store_encoding.py). The CRC-32C (4 bytes a chunk) makes any
    # corruption of a chunk file detectable.
    return (
        zarr.codecs.BloscCodec(cname="zstd", clevel=2, shuffle="shuffle", typesize=np.dtype(dtype).itemsize),
        zarr.codecs.Crc32cCodec(),
    )


def _coordinate_compressors() -> tuple[Any, ...]:
    return (zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec())


class ChunkChecksumError(ValueError):
    """A chunk's stored CRC-32C does not match its bytes."""


class ChunkCodec:
    """Encode and decode whole chunks of a ``bytes(little) -> blosc [-> crc32c]`` array without Zarr's
    per-call machinery (the bytes are identical to what Zarr writes and reads).

    Use :meth:`of` to get one for an array (``None`` for any other codec chain).
    """

    def __init__(self, blosc: Any, crc32c: bool) -> None:
        self.blosc = blosc
        self.crc32c = crc32c

    @classmethod
    def of(cls, arr: zarr.Array) -> ChunkCodec | None:
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

        codecs = tuple(getattr(arr.metadata, "codecs", ()))
        crc = len(codecs) == 3 and isinstance(codecs[2], Crc32cCodec)
        if (
            sys.byteorder == "little"
            and len(codecs) in (2, 3)
            and (len(codecs) == 2 or crc)
            and isinstance(codecs[0], BytesCodec)
            and str(getattr(codecs[0].endian, "value", codecs[0].endian)) in ("little", "None")
            and isinstance(codecs[1], BloscCodec)
            and getattr(arr.metadata, "chunk_key_encoding", None) is not None
        ):
            return cls(codecs[1]._blosc_codec, crc)
        return None

    def encode(self, block: np.ndarray) -> bytes:
        """Chunk file bytes of ``block`` (a whole chunk, C order)."""
        data = bytes(self.blosc.encode(np.ascontiguousarray(block)))
        if self.crc32c:
            import google_crc32c

            data += struct.pack("<I", google_crc32c.value(data))
        return data

    def decode(self, data: bytes, out: np.ndarray) -> None:
        """Decode chunk file bytes into ``out`` (a whole chunk); :class:`ChunkChecksumError` on a bad CRC."""
        if self.crc32c:
            import google_crc32c

            if len(data) < 4:
                raise ChunkChecksumError(f"chunk of {len(data)} bytes is shorter than its 4-byte checksum")
            stored = struct.unpack("<I", data[-4:])[0]
            data = bytes(data[:-4])
            if google_crc32c.value(data) != stored:
                raise ChunkChecksumError("stored and computed CRC-32C differ")
        try:
            self.blosc.decode(data, out=out)
        except Exception as exc:  # noqa: BLE001 - blosc raises RuntimeError/ValueError on any bad input
            raise ChunkChecksumError(f"blosc cannot decode it ({exc})") from None


def write_fill_chunks(
    directory: Path, arr: zarr.Array, chunks: Sequence[tuple[int, ...]], *, synced: bool = False
) -> None:
    """Write chunk files of fill values for the chunk indices ``chunks`` of ``arr`` under ``directory``.

    ``directory`` is the array's folder (in the store or in a transaction's stage); ``arr`` gives the
    metadata (open on either). ``synced``: fsync each file.
    """
    if not len(chunks):
        return
    codec = ChunkCodec.of(arr)
    if codec is None:  # any other codec chain: through Zarr, forcing the write of all-fill chunks
        target = zarr.open_array(str(directory), mode="r+", config={"write_empty_chunks": True})
        shape = target.chunks
        for idx in chunks:
            sel = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, shape, target.shape))
            target[sel] = target.fill_value
        return
    data = codec.encode(np.full(arr.chunks, arr.fill_value, dtype=arr.dtype))

    def write(idx: tuple[int, ...]) -> None:
        _write_file(directory / arr.metadata.encode_chunk_key(idx), data, synced=synced)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, [tuple(int(i) for i in idx) for idx in chunks]))


def _write_file(p: Path, data: bytes, *, synced: bool = False, mode: int = 0o644) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if synced:
            os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- creation
def _write_group_markers(path: Path) -> None:
    for g in _SIDE_GROUPS:
        (path / g).mkdir(parents=True, exist_ok=True)
        (path / g / "zarr.json").write_text(json.dumps(_GROUP_JSON))


def _consolidate(path: Path) -> None:
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not (yet) part of the v3 spec; xarray relies on it.
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(str(path))


def _str_array(values: Sequence[Any]) -> np.ndarray:
    """``str(v)`` of each value, ``""`` for missing ones, as an object array (vectorised: 1 M ids in ~0.2 s)."""
    vals = np.asarray(values, dtype=object)
    if vals.ndim != 1:
        vals = np.array(list(values) if vals.ndim else [], dtype=object)
    out = vals.astype(str).astype(object) if len(vals) else np.array([], dtype=object)
    out[pd.isna(vals)] = ""
    return out


def initialize_store(
    path: str | os.PathLike[str],
    meters: pd.DataFrame,
    times: Sequence[Any] | pd.DatetimeIndex,
    *,
    interval_s: int,
    transformers: pd.DataFrame | None = None,
    references: pd.DataFrame | None = None,
    variables: Sequence[str] = ("voltage", "kw"),
    block_bytes: float = 100e6,
    voltage_encoding: str = "float32",
    time_chunk: int = 2976,
    overwrite: bool = False,
) -> None:
    """Create an empty store (all data NaN) with the schema of docs/ARCHITECTURE.md.

    Parameters
    ----------
    path : path-like
        Store directory (must not exist unless ``overwrite``).
    meters : DataFrame
        Contract meter table (``meter_id, feeder_id, transformer_id, phase[, service_type, nominal_v [V],
        lat, lon]``); sorted here by feeder, transformer, meter id.
    times : sequence of datetime-like, shape (n_time,)
        The regular UTC grid (interval ends); tz-aware values are converted to UTC, naive ones are UTC.
    interval_s : int
        Grid step [s]; ``times`` must be spaced by exactly this.
    transformers : DataFrame, optional
        ``transformer_id, feeder_id, kva_rating [kVA], n_phases``.
    references : DataFrame, optional
        Long format ``feeder_id, phase, timestamp, voltage_v [V]``; reads off the grid are dropped.
    variables : sequence of str
        Subset of ``("voltage", "kw", "kvar")``; ``voltage`` is always created.
    block_bytes : float
        Target bytes of one feeder block [bytes]; sets the storage chunk along ``meter``.
    voltage_encoding : {"float32", "int16_decivolt"}
        Stored dtype of ``voltage`` (decoded to float32 [V] either way).
    time_chunk : int
        Storage chunk length along ``time`` [samples].
    overwrite : bool
        Replace an existing directory.

    Notes
    -----
    Data arrays are created empty: chunks that were never written read as NaN and take no space.
    """
    path = Path(path)
    _clear_store_path(path, overwrite)
    m, t, variables = _validated_schema(meters, times, interval_s, variables, voltage_encoding)
    coords = _meter_coords(m, t)
    data_vars: dict[str, Any] = {}
    if transformers is not None:
        coords.update(_transformer_coords(transformers))
    if references is not None:
        ref_coords, ref_voltage = _reference_coords(references, t)
        coords.update(ref_coords)
        data_vars["reference_voltage"] = ref_voltage
    n_time_chunk = max(1, int(time_chunk))
    _write_coordinates(path, _coordinate_dataset(coords, data_vars, interval_s), n_time_chunk)
    chunks = (min(_meter_chunk(block_bytes, n_time_chunk), max(len(m), 1)), n_time_chunk)
    group = zarr.open_group(str(path), mode="a")
    for var in variables:
        _create_data_array(group, path, var, (len(m), len(t)), chunks, voltage_encoding)
    _write_group_markers(path)
    _consolidate(path)


def _clear_store_path(path: Path, overwrite: bool) -> None:
    """Remove an existing store directory at ``path`` if ``overwrite``, else refuse to touch it."""
    if path.exists():
        if not overwrite:
            raise StoreError(f"store {str(path)!r} already exists (pass overwrite=True to replace it)")
        shutil.rmtree(path)


def _validated_schema(
    meters: pd.DataFrame,
    times: Sequence[Any] | pd.DatetimeIndex,
    interval_s: int,
    variables: Sequence[str],
    voltage_encoding: str,
) -> tuple[pd.DataFrame, pd.DatetimeIndex, list[str]]:
    """Check the arguments of :func:`initialize_store`; return sorted meters, UTC times [ns], variables.

    ``voltage`` is put first in the returned variables.
    """
    if voltage_encoding not in ("float32", "int16_decivolt"):
        raise StoreError(
            f"unknown voltage encoding {voltage_encoding!r}: expected 'float32' or 'int16_decivolt'"
        )
    m = sort_meters(meters)
    t = _to_utc_naive(times)
    if len(t) > 1 and not (np.diff(t.asi8) == int(interval_s) * 10**9).all():
        raise StoreError(f"initialize_store: times are not a regular grid of {interval_s} s")
    variables = ["voltage"] + [v for v in variables if v != "voltage"]
    unknown = sorted(set(variables) - set(DATA_VARIABLES))
    if unknown:
        raise StoreError(f"initialize_store: unknown variable(s) {unknown}; allowed {list(DATA_VARIABLES)}")
    return m, t, variables


def _meter_coords(m: pd.DataFrame, t: pd.DatetimeIndex) -> dict[str, Any]:
    """Coordinates along ``meter`` (ids, GIS columns, NaN sampling statistics) and ``time``."""
    coords: dict[str, Any] = {
        "meter": ("meter", _str_array(m["meter_id"])),
        "feeder_id": ("meter", _str_array(m["feeder_id"])),
        "transformer_id": ("meter", _str_array(m["transformer_id"])),
        "phase_gis": ("meter", _str_array(m["phase"])),
        "service_type": ("meter", _str_array(m["service_type"])),
        "time": ("time", t.values),
    }
    for c in ("nominal_v", "lat", "lon"):
        coords[c] = ("meter", m[c].to_numpy(np.float64))
    coords["sampling_interval_s"] = ("meter", np.full(len(m), np.nan))
    coords["off_grid_fraction"] = ("meter", np.full(len(m), np.nan))
    return coords


def _transformer_coords(transformers: pd.DataFrame) -> dict[str, Any]:
    """Coordinates along ``transformer`` (sorted by feeder, transformer id); ``kva_rating`` [kVA]."""
    tr = transformers
    miss = [c for c in contract.TRANSFORMERS_REQUIRED if c not in tr.columns]
    if miss:
        raise ContractError(f"transformers: missing required column(s) {miss}; found {list(tr.columns)}")
    tr = tr.sort_values(["feeder_id", "transformer_id"], kind="stable")
    return {
        "transformer": ("transformer", _str_array(tr["transformer_id"])),
        "kva_rating": (
            "transformer",
            pd.to_numeric(tr["kva_rating"], errors="coerce").to_numpy(np.float64),
        ),
        "n_phases": ("transformer", pd.to_numeric(tr["n_phases"]).to_numpy(np.int64)),
        "transformer_feeder_id": ("transformer", _str_array(tr["feeder_id"])),
    }


def _reference_coords(
    references: pd.DataFrame, t: pd.DatetimeIndex
) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """Coordinates along ``reference`` (one per feeder/phase, sorted) and the ``reference_voltage`` variable.

    The variable, shape (n_reference, n_time), holds the voltages [V] of the reads on the grid ``t``
    (NaN elsewhere); reads off the grid are dropped.
    """
    miss = [c for c in contract.REFERENCES_REQUIRED if c not in references.columns]
    if miss:
        raise ContractError(
            f"references: missing required column(s) {miss}; found {list(references.columns)}"
        )
    r = references.copy()
    r["timestamp"] = _to_utc_naive(r["timestamp"])
    r["feeder_id"] = r["feeder_id"].astype(str)
    r["phase"] = r["phase"].astype(str)
    keys = r[["feeder_id", "phase"]].drop_duplicates().sort_values(["feeder_id", "phase"], kind="stable")
    coords = {
        "reference": ("reference", _str_array(keys["feeder_id"] + "/" + keys["phase"])),
        "reference_feeder_id": ("reference", _str_array(keys["feeder_id"])),
        "reference_phase": ("reference", _str_array(keys["phase"])),
    }
    ref_values = np.full((len(keys), len(t)), np.nan, np.float32)
    row = pd.Index(keys["feeder_id"] + "/" + keys["phase"]).get_indexer(r["feeder_id"] + "/" + r["phase"])
    col = pd.Index(t).get_indexer(pd.DatetimeIndex(r["timestamp"]))
    ok = col >= 0
    ref_values[row[ok], col[ok]] = pd.to_numeric(r["voltage_v"], errors="coerce").to_numpy(np.float32)[ok]
    return coords, (("reference", "time"), ref_values, {"units": "V"})


def _coordinate_dataset(coords: dict[str, Any], data_vars: dict[str, Any], interval_s: int) -> xr.Dataset:
    """The store's coordinates (and ``reference_voltage``) with CF attributes and the root attributes."""
    ds = xr.Dataset(data_vars, coords=coords)
    for name, variable in ds.variables.items():
        variable.attrs.update(CF_ATTRIBUTES[str(name)])
    ds.attrs = {"interval_s": int(interval_s), "phaseid_store_version": STORE_VERSION}
    return ds


def _write_coordinates(path: Path, ds: xr.Dataset, n_time_chunk: int) -> None:
    """Write ``ds`` as a new Zarr v3 store at ``path``: epoch-seconds ``time``, zstd + CRC-32C everywhere.

    ``n_time_chunk`` is the storage chunk along ``time`` [samples] (``time`` itself takes 16 of them).
    """
    encoding: dict[str, Any] = {
        "time": {
            "units": _EPOCH_UNITS,
            "dtype": "int64",
            "calendar": "proleptic_gregorian",
            "chunks": (max(n_time_chunk * 16, 1),),
        },
    }
    for c in ("sampling_interval_s", "off_grid_fraction"):
        encoding[c] = {"chunks": (max(ds.sizes["meter"], 1),)}
    if "reference_voltage" in ds.data_vars:
        encoding["reference_voltage"] = {"chunks": (max(ds.sizes["reference"], 1), n_time_chunk)}
    for name in list(ds.variables):
        encoding.setdefault(str(name), {})["compressors"] = _coordinate_compressors()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_zarr(str(path), zarr_format=3, encoding=encoding, mode="w", consolidated=False)


def _data_array_encoding(var: str, voltage_encoding: str) -> tuple[type[np.generic], float, dict[str, Any]]:
    """Stored dtype, fill value and attributes (``_FillValue``, CF, ``coordinates``) of a data variable."""
    if var == "voltage" and voltage_encoding == "int16_decivolt":
        dtype, fill = np.int16, INT16_FILL
        attrs: dict[str, Any] = {"scale_factor": DECIVOLT_SCALE, "_FillValue": INT16_FILL}
    else:
        dtype, fill = np.float32, np.nan
        # xarray reads a float _FillValue attribute of a v3 array as base64 of a float64.
        from xarray.backends.zarr import FillValueCoder

        attrs = {"_FillValue": FillValueCoder.encode(np.nan, np.dtype(np.float32))}
    attrs.update(CF_ATTRIBUTES[var])
    attrs["coordinates"] = (
        "feeder_id transformer_id phase_gis service_type nominal_v lat lon "
        "sampling_interval_s off_grid_fraction"
    )
    return dtype, fill, attrs


def _create_data_array(
    group: zarr.Group,
    path: Path,
    var: str,
    shape: tuple[int, int],
    chunks: tuple[int, int],
    voltage_encoding: str,
) -> None:
    """Create the (meter, time) array ``var`` of shape ``shape`` with every chunk written as fill values."""
    dtype, fill, attrs = _data_array_encoding(var, voltage_encoding)
    group.create_array(
        var,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill,
        dimension_names=("meter", "time"),
        attributes=attrs,
        compressors=_compressors(np.dtype(dtype)),
    )
    # Every chunk exists from the start (fill values compress to a few bytes), so that a deleted chunk
    # file is detectable instead of reading as missing data.
    arr = group[var]
    write_fill_chunks(path / var, arr, list(np.ndindex(*arr.cdata_shape)))


def _strings(values: Any) -> np.ndarray:
    """Any string array (NumPy StringDType, unicode, object) as an object array of ``str``."""
    return np.asarray(values).astype(object)


def _to_utc_naive(values: Any) -> pd.DatetimeIndex:
    """Datetime-likes to a naive UTC ``DatetimeIndex`` [ns] (naive input is taken as UTC)."""
    idx = pd.DatetimeIndex(
        pd.to_datetime(values, utc=True, format="ISO8601")
        if not isinstance(values, pd.DatetimeIndex) or values.tz is not None
        else values
    )
    if idx.tz is not None:
        idx = idx.tz_convert("UTC").tz_localize(None)
    return idx.as_unit("ns")


# --------------------------------------------------------------------------------------------- block writes
def write_meter_block(
    path: str | os.PathLike[str],
    meter_start: int,
    meter_stop: int,
    arrays: Mapping[str, np.ndarray],
) -> None:
    """Write whole meter rows ``[meter_start, meter_stop)`` of data variables (all times).

    Parameters
    ----------
    path : path-like
        A store made by :func:`initialize_store`.
    meter_start, meter_stop : int
        Row range in store order (see :func:`feeder_blocks`).
    arrays : mapping of str to ndarray, shape (meter_stop - meter_start, n_time)
        ``voltage`` [V], ``kw`` [kW], ``kvar`` [kvar], decoded (NaN = missing); encoded here.

    Notes
    -----
    Used by the synthetic generator to fill a fresh store block by block; not transactional (the store is
    being built). Rows that do not cover whole storage chunks are read-modify-written by Zarr, so blocks
    must be written one after another (not concurrently) unless they start and stop on storage-chunk
    boundaries (``ds.voltage.encoding["preferred_chunks"]``).
    """
    path = Path(path)
    group = _open_group(path)
    for name, values in arrays.items():
        if name not in group.array_keys():
            raise StoreError(
                f"store {str(path)!r} has no variable {name!r} (has {sorted(group.array_keys())})"
            )
        arr = zarr.open_array(str(path / name), mode="r+", config={"write_empty_chunks": True})
        values = np.asarray(values)
        expected = (meter_stop - meter_start, arr.shape[1])
        if values.shape != expected or not 0 <= meter_start <= meter_stop <= arr.shape[0]:
            raise StoreError(
                f"write_meter_block({name!r}): expected shape {expected} within {arr.shape[0]} meters, "
                f"got {values.shape} for rows [{meter_start}, {meter_stop})"
            )
        enc = "int16_decivolt" if arr.dtype == np.int16 else "float32"
        arr[meter_start:meter_stop, :] = (
            encode_voltage(values, enc) if name == "voltage" else values.astype(np.float32)
        )


def _open_group(path: Path) -> zarr.Group:
    if not (path / "zarr.json").is_file():
        raise StoreError(f"no Zarr store at {str(path)!r} (missing zarr.json)")
    return zarr.open_group(str(path), mode="r+", use_consolidated=False)


# --------------------------------------------------------------------------------------------- opening
def open_store(
    path: str | os.PathLike[str],
    *,
    block_bytes: float | None = 100e6,
    recover: bool = True,
) -> xr.Dataset:
    """Open a store as a lazy, Dask-backed Dataset.

    Parameters
    ----------
    path : path-like
        Store directory.
    block_bytes : float or None
        Dask chunks along ``meter`` are :func:`feeder_blocks` of about this size [bytes] (whole feeders);
        ``None`` keeps the storage chunks.
    recover : bool
        Finish or discard an interrupted transaction first (see :func:`recover_store`).

    Returns
    -------
    Dataset
        ``voltage`` (and ``kw``, ``kvar``) as float32 [V] with NaN for missing data.
    """
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"no Zarr store at {str(path)!r} (missing zarr.json)")
    if recover:
        recover_store(path)
    ds = xr.open_zarr(str(path), consolidated=True, chunks={})
    # Zarr v3 strings load as NumPy StringDType, which ``.astype(str)`` and many libraries reject: use
    # plain object arrays of ``str`` (the tables are 1-D and small next to the data).
    strings = {
        k: (v.dims, _strings(v.values), v.attrs) for k, v in ds.variables.items() if v.dtype.kind == "T"
    }
    if strings:
        ds = ds.assign_coords(strings)
    for v in DATA_VARIABLES:
        if v in ds and ds[v].dtype != np.float32:
            enc = ds[v].encoding
            ds[v] = ds[v].astype(np.float32)
            ds[v].encoding = enc
    if block_bytes is not None and ds.sizes.get("meter", 0) > 0:
        blocks = feeder_blocks(ds, block_bytes)
        ds = ds.chunk({"meter": tuple(b.stop - b.start for b in blocks)})
    return ds


def read_meter_block(
    path: str | os.PathLike[str],
    meter_start: int,
    meter_stop: int,
    variables: Sequence[str] = DATA_VARIABLES,
    last: int | None = None,
) -> dict[str, np.ndarray]:
    """Read rows ``meter_start:meter_stop`` of the data variables straight from Zarr, decoded.

    The hot read of the job: no Dask graph, no xarray index of all meters, one pass over the touched
    chunks. Decoding matches :func:`open_store` (int16 deci-volts -> float32 volts, fill -> NaN).

    Parameters
    ----------
    path : path-like
        Store.
    meter_start, meter_stop : int
        Row range along ``meter``.
    variables : sequence of str
        Data variables to read; those absent from the store are skipped.
    last : int, optional
        Read only the last ``last`` intervals (default: all).

    Returns
    -------
    dict of str to ndarray, shape (meter_stop - meter_start, n_time), float32
        Voltage [V], kw [kW], kvar [kvar], NaN where missing.
    """
    path = Path(path)
    group = zarr.open_group(str(path), mode="r")
    names = set(group.array_keys())
    complete = int(group.attrs.get("phaseid_store_version", 1)) >= 2
    out: dict[str, np.ndarray] = {}
    for name in variables:
        if name not in names:
            continue
        arr = group[name]
        chunks = _row_chunks(arr, meter_start, meter_stop)
        if complete:
            for idx in chunks:
                key = arr.metadata.encode_chunk_key(idx)
                if not (path / name / key).is_file():
                    raise StoreError(_damaged(path, f"chunk {name}/{key} is missing"))
        try:
            raw = arr[meter_start:meter_stop] if last is None else arr[meter_start:meter_stop, -last:]
        except Exception as exc:  # noqa: BLE001 - named below: which chunk, what is wrong
            bad = _bad_chunks(path, name, arr, chunks, require=complete, first_only=True)
            raise StoreError(
                _damaged(path, bad[0] if bad else f"{name} rows {meter_start}:{meter_stop} cannot be read ({_line(exc)})")
            ) from None
        scale = arr.attrs.get("scale_factor")
        if raw.dtype.kind in "iu":
            fill = arr.attrs.get("_FillValue", arr.fill_value)
            # decoded in float64 then rounded to float32, exactly as xarray's CF decoding does
            data64 = raw.astype(np.float64)
            if scale is not None:
                data64 *= float(scale)
            offset = arr.attrs.get("add_offset")
            if offset is not None:
                data64 += float(offset)
            data = data64.astype(np.float32)
            data[raw == fill] = np.nan
        else:
            data = raw.astype(np.float32, copy=False)
        out[name] = data
    return out


def _line(exc: BaseException) -> str:
    """An exception as one short line (type and the first line of its message)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _damaged(path: Path, what: str) -> str:
    return (
        f"store {str(path)!r} is damaged: {what}; restore the store from a backup or rebuild it from the "
        "readings (phaseid validate-store --deep lists every bad chunk)"
    )


def _row_chunks(arr: zarr.Array, start: int, stop: int) -> list[tuple[int, ...]]:
    """Chunk indices of ``arr`` holding rows ``[start, stop)`` of its first dimension (all of the others)."""
    if arr.ndim == 0 or stop <= start:
        return []
    c0 = arr.chunks[0]
    rows = range(start // c0, -(-stop // c0))
    return [(i, *rest) for i in rows for rest in np.ndindex(*arr.cdata_shape[1:])]


def _bad_chunks(
    path: Path,
    name: str,
    arr: zarr.Array,
    chunks: Sequence[tuple[int, ...]],
    *,
    require: bool,
    first_only: bool = False,
) -> list[str]:
    """Problems of chunks ``chunks`` of array ``name``: missing (when ``require``), corrupt (any decoding
    error, a CRC-32C mismatch included). Each problem names the chunk file relative to the store."""
    codec = ChunkCodec.of(arr)
    out: list[str] = []
    buf = np.empty(arr.chunks, dtype=arr.dtype) if codec is not None else None
    for idx in chunks:
        idx = tuple(int(i) for i in idx)
        key = arr.metadata.encode_chunk_key(idx)
        f = path / name / key
        if not f.is_file():
            if require:
                out.append(f"chunk {name}/{key} is missing")
        else:
            try:
                if codec is not None:
                    codec.decode(f.read_bytes(), buf)
                else:
                    arr.blocks[idx]
            except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt chunk
                out.append(f"chunk {name}/{key} is corrupt ({_line(exc)})")
        if out and first_only:
            break
    return out


# --------------------------------------------------------------------------------------------- partitions
class FeederBlock(NamedTuple):
    """A block of whole feeders: rows ``[start, stop)`` of the store's ``meter`` dimension."""

    start: int
    stop: int
    feeder_ids: tuple[str, ...]


def feeder_blocks(
    ds_or_meter_table: xr.Dataset | pd.DataFrame,
    target_bytes: float,
    *,
    bytes_per_meter: float | None = None,
    multiple_of: int = 1,
) -> list[FeederBlock]:
    """Partition the meters into consecutive blocks of whole feeders of about ``target_bytes``.

    Parameters
    ----------
    ds_or_meter_table : Dataset or DataFrame
        A store Dataset, or a meter table in store order (column ``feeder_id``; feeders contiguous).
    target_bytes : float
        Target size of one block [bytes]. Feeders are packed greedily; a feeder larger than the target
        is a block of its own.
    bytes_per_meter : float, optional
        [bytes]; default ``4 * n_time`` for a Dataset (float32 voltage), ``4 * 2976`` for a table.
    multiple_of : int
        Aim at a number of blocks that is a multiple of this (the workers of a cluster), of equal size: the
        count ``ceil(total / target_bytes)`` is rounded up to a multiple, the size is the total over the
        count, and each block ends at the feeder boundary nearest that size (so no worker waits on a last,
        lone block). 1 (default): blocks of at most ``target_bytes``, closed greedily.

    Returns
    -------
    list of FeederBlock
        ``(start, stop, feeder_ids)`` covering ``[0, n_meters)`` without gaps or overlaps.

    Raises
    ------
    StoreError
        A feeder's meters are not contiguous.
    """
    if isinstance(ds_or_meter_table, xr.Dataset):
        feeders = _strings(ds_or_meter_table["feeder_id"].values)
        if bytes_per_meter is None:
            bytes_per_meter = 4.0 * max(1, ds_or_meter_table.sizes.get("time", 1))
    else:
        feeders = _strings(ds_or_meter_table["feeder_id"].astype(str).to_numpy())
        if bytes_per_meter is None:
            bytes_per_meter = 4.0 * 2976
    n = len(feeders)
    if n == 0:
        return []
    change = np.flatnonzero(feeders[1:] != feeders[:-1]) + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [n]])
    run_ids = feeders[starts]
    if len(set(run_ids)) != len(run_ids):
        dup = pd.Series(run_ids)[pd.Series(run_ids).duplicated()].iloc[0]
        raise StoreError(f"feeder {dup!r} is not a contiguous slice of meters (store not sorted by feeder)")
    per_block = max(1.0, float(target_bytes) / float(bytes_per_meter))
    balanced = multiple_of > 1
    count = 1
    if balanced:
        count = int(np.ceil(n / per_block))
        count = int(np.ceil(count / multiple_of)) * multiple_of
        per_block = max(1.0, n / count)
    blocks: list[FeederBlock] = []
    cur_start, cur_ids = int(starts[0]), []
    for s, e, f in zip(starts, stops, run_ids):
        if cur_ids:
            if balanced:
                # close at the feeder boundary nearest the block's cumulative end (the k-th of ``count``
                # equal shares), never opening more than ``count`` blocks: sizes do not drift
                end = (len(blocks) + 1) * per_block
                close = len(blocks) < count - 1 and abs(s - end) <= abs(e - end)
            else:  # greedy: close before exceeding
                close = e - cur_start > per_block
            if close:
                blocks.append(FeederBlock(cur_start, int(s), tuple(cur_ids)))
                cur_start, cur_ids = int(s), []
        cur_ids.append(str(f))
    blocks.append(FeederBlock(cur_start, n, tuple(cur_ids)))
    return blocks


# --------------------------------------------------------------------------------------------- validation
def validate_store(
    path: str | os.PathLike[str], *, deep: bool = False, raise_on_error: bool = False
) -> list[str]:
    """Check a store against the schema; return the list of problems (empty: valid).

    Checks: the store opens; attributes ``interval_s`` and ``phaseid_store_version``; every schema variable
    present with the right dimensions; meter ids unique and sorted by feeder, transformer, meter (so each
    feeder is a contiguous slice); Dask chunks of :func:`open_store` made of whole feeders; storage chunks
    of all data variables identical; the time axis strictly increasing on a regular ``interval_s`` grid;
    no interrupted transaction left in ``_phaseid``; no leftover of a killed store creation beside it.

    Parameters
    ----------
    path : path-like
    deep : bool
        Also read and decode every chunk of every array (CRC-32C checked in version-2 stores) and, in
        version-2 stores, require every chunk of the data variables: one problem per bad chunk, naming it.
    raise_on_error : bool
        Raise :class:`StoreError` listing every problem instead of returning them.
    """
    path = Path(path)
    problems = _leftover_problems(path)
    if not (path / "zarr.json").is_file():
        problems.append(f"store {str(path)!r} does not open: no Zarr store there (missing zarr.json)")
        return _finish(problems, path, raise_on_error)
    try:
        problems += _pending_transaction_problems(path)
        ds = open_store(path, recover=False, block_bytes=None)
    except Exception as exc:  # noqa: BLE001 - reported as a problem
        problems.append(f"store {str(path)!r} does not open: {exc}")
        return _finish(problems, path, raise_on_error)
    problems += _attribute_problems(ds)
    problems += _variable_problems(ds)
    problems += _meter_order_problems(ds)
    problems += _storage_chunk_problems(ds)
    problems += _time_axis_problems(ds)
    if deep:
        problems += _deep_chunk_problems(path, int(ds.attrs.get("phaseid_store_version", 1)))
    return _finish(problems, path, raise_on_error)


def _leftover_problems(path: Path) -> list[str]:
    """A problem naming the leftovers of a killed store creation beside ``path`` (``<name>.init-*``)."""
    leftovers = sorted(q.name for q in path.parent.glob(f"{glob.escape(path.name)}.init-*"))
    if not leftovers:
        return []
    return [(f"leftover(s) of a killed store creation beside the store: {leftovers} "
             "(removed by the next ingest)")]


def _pending_transaction_problems(path: Path) -> list[str]:
    """A problem naming the interrupted transactions (``_phaseid/txn-*``) of the store at ``path``, if any."""
    pending = [p.name for p in _txn_root(path).glob("txn-*")] if (path / "_phaseid").is_dir() else []
    if not pending:
        return []
    return [f"interrupted transaction(s) {sorted(pending)} in _phaseid (run recover_store)"]


def _attribute_problems(ds: xr.Dataset) -> list[str]:
    """One problem per store attribute (``interval_s``, ``phaseid_store_version``) missing from ``ds``."""
    return [f"missing attribute {a!r}" for a in ("interval_s", "phaseid_store_version") if a not in ds.attrs]


def _variable_problems(ds: xr.Dataset) -> list[str]:
    """Schema variables missing or with the wrong dimensions; a voltage that does not decode to floats."""
    expected = {
        "voltage": ("meter", "time"),
        "meter": ("meter",),
        "time": ("time",),
        **{c: ("meter",) for c in METER_STR_COORDS + METER_FLOAT_COORDS},
    }
    optional = {
        "kw": ("meter", "time"),
        "kvar": ("meter", "time"),
        "reference_voltage": ("reference", "time"),
        "reference_feeder_id": ("reference",),
        "reference_phase": ("reference",),
        "kva_rating": ("transformer",),
        "n_phases": ("transformer",),
        "transformer_feeder_id": ("transformer",),
    }
    problems: list[str] = []
    for name, dims in expected.items():
        if name not in ds.variables:
            problems.append(f"missing variable {name!r} (expected dims {dims})")
        elif ds[name].dims != dims:
            problems.append(f"variable {name!r} has dims {ds[name].dims}, expected {dims}")
    for name, dims in optional.items():
        if name in ds.variables and ds[name].dims != dims:
            problems.append(f"variable {name!r} has dims {ds[name].dims}, expected {dims}")
    if "voltage" in ds and not np.issubdtype(ds["voltage"].dtype, np.floating):
        problems.append(f"voltage decodes to {ds['voltage'].dtype}, expected float32")
    return problems


def _meter_order_problems(ds: xr.Dataset) -> list[str]:
    """Duplicate meter ids; meters not sorted by feeder, transformer, meter id; else feeder-misaligned chunks.

    Nothing is checked unless ``meter``, ``feeder_id`` and ``transformer_id`` are all present.
    """
    if not all(c in ds.variables for c in ("meter", "feeder_id", "transformer_id")):
        return []
    table = pd.DataFrame({c: _strings(ds[c].values) for c in ("meter", "feeder_id", "transformer_id")})
    problems: list[str] = []
    if table["meter"].duplicated().any():
        duplicates = table["meter"][table["meter"].duplicated()]
        problems.append(f"duplicate meter id(s) {duplicates.head(3).tolist()}")
    order = table.sort_values(["feeder_id", "transformer_id", "meter"], kind="stable").index.to_numpy()
    if not (order == np.arange(len(order))).all():
        row = int(np.flatnonzero(order != np.arange(len(order)))[0])
        problems.append(
            f"meters not sorted by feeder, transformer, meter id: first out of place at row {row} "
            f"(meter {table['meter'].iloc[row]!r})"
        )
        return problems
    return problems + _feeder_alignment_problems(ds, table)


def _feeder_alignment_problems(ds: xr.Dataset, table: pd.DataFrame) -> list[str]:
    """The first Dask chunk boundary of :func:`open_store` that splits a feeder (``table``: meters in store
    order, column ``feeder_id``), or the :class:`StoreError` of :func:`feeder_blocks`, as a problem."""
    try:
        blocks = feeder_blocks(ds, 100e6)
        # the meter chunks open_store gives the Dataset are exactly these blocks (asking the rechunked
        # Dataset for them failed on a store whose variables are chunked differently along time, which
        # _storage_chunk_problems reports)
        bounds = np.cumsum((0,) + tuple(b.stop - b.start for b in blocks)) if len(table) else np.zeros(1, int)
        feeders = table["feeder_id"].to_numpy()
        for b in bounds[1:-1]:
            if feeders[b - 1] == feeders[b]:
                return [f"chunks not aligned to feeders: boundary at row {b} splits feeder {feeders[b]!r}"]
    except StoreError as exc:
        return [str(exc)]
    return []


def _storage_chunk_problems(ds: xr.Dataset) -> list[str]:
    """A problem if the data variables present (voltage, kw, kvar) do not share one storage chunk shape."""
    data_vars = [v for v in DATA_VARIABLES if v in ds]
    storage_chunks = {
        v: ds[v].encoding.get("chunks") or ds[v].encoding.get("preferred_chunks") for v in data_vars
    }
    if len({str(c) for c in storage_chunks.values()}) > 1:
        return [f"data variables have different storage chunks: {storage_chunks}"]
    return []


def _time_axis_problems(ds: xr.Dataset) -> list[str]:
    """Problems of the ``time`` coordinate: a time zone; not strictly increasing, else off the ``interval_s``
    grid (not checked when ``interval_s`` is missing or 0)."""
    if "time" not in ds.variables:
        return []
    problems: list[str] = []
    t = pd.DatetimeIndex(ds["time"].values)
    if t.tz is not None:
        problems.append("time coordinate carries a time zone (expected naive UTC)")
    if len(t) > 1:
        d = np.diff(t.asi8)
        step = int(ds.attrs.get("interval_s", 0)) * 10**9
        if (d <= 0).any():
            problems.append(f"time not strictly increasing at index {int(np.flatnonzero(d <= 0)[0]) + 1}")
        elif step and (d != step).any():
            i = int(np.flatnonzero(d != step)[0])
            problems.append(
                f"non-regular time grid: step {d[i] / 1e9:g} s at index {i + 1}, "
                f"expected interval_s={step // 10**9}"
            )
    return problems


def _deep_chunk_problems(path: Path, version: int) -> list[str]:
    group = zarr.open_group(str(path), mode="r")
    problems: list[str] = []
    for name, arr in sorted(group.arrays(), key=lambda kv: kv[0]):
        chunks = list(np.ndindex(*arr.cdata_shape))
        problems += _bad_chunks(path, name, arr, chunks, require=version >= 2 and name in DATA_VARIABLES)
    if version < 2:
        problems.append(f"store version {version} has no chunk checksums: a flipped byte may go undetected "
                        "(rebuild the store with this version of phaseid-hpc to add them)")
    return problems


def _finish(problems: list[str], path: Path, raise_on_error: bool) -> list[str]:
    if problems and raise_on_error:
        raise StoreError(f"store {str(path)!r} is not valid:\n  - " + "\n  - ".join(problems))
    return problems


# --------------------------------------------------------------------------------------------- transactions
def _txn_root(path: Path) -> Path:
    return path / "_phaseid"


#: Bytes of holder information at the start of a lock file (fixed, so the file's size never changes).
_LOCK_INFO_BYTES = 256


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, _LOCK_INFO_BYTES, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "an unknown process"


@contextlib.contextmanager
def exclusive_lock(
    lock_file: Path, what: str, *, blocking: bool = True, timeout_s: float | None = None
) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created with mode 0644); yield whether it is held.

    ``blocking=False``: yield ``False`` at once when another process holds it. ``timeout_s``: wait at most
    this long [s], then raise :class:`StoreError` naming ``what`` and the holder (pid, host, program and
    start time, written into the file by every holder). ``None``: wait as long as it takes.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        writable = True
    except PermissionError:  # another user's store: locking works on a read-only descriptor too
        fd, writable = os.open(lock_file, os.O_RDONLY), False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                yield False
                return
            if timeout_s is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                deadline, pause = time.monotonic() + float(timeout_s), 0.02
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise StoreError(
                                f"{what} is locked by another writer ({_lock_holder(fd)}); waited "
                                f"{float(timeout_s):g} s: retry when it has finished"
                            ) from None
                        time.sleep(pause)
                        pause = min(0.5, pause * 2)
        try:
            if writable:
                info = (
                    f"pid {os.getpid()} on {socket.gethostname()} ({os.path.basename(sys.argv[0] or 'python')}) "
                    f"since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
                )
                os.pwrite(fd, info.encode()[:_LOCK_INFO_BYTES].ljust(_LOCK_INFO_BYTES), 0)
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def read_lock(store: str | os.PathLike[str], *, on_wait: Any = None) -> Iterator[None]:
    """Hold a shared lock on a store for as long as a run reads it: one consistent version.

    Writers take the same lock file exclusively (:func:`exclusive_lock`), so an ingest waits until the run
    has read what it needs, and a run that starts during an ingest waits for its commit. Several runs may
    read at once. ``on_wait()`` is called once when the lock is not free at first (e.g. to say so).
    A store without a transaction folder (never written by phaseid) is read without a lock.
    """
    root = _txn_root(Path(store))
    if not root.is_dir():
        yield
        return
    lock_file = root / "lock"
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:  # another user's store: a read-only descriptor locks too
        fd = os.open(lock_file, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(_lock_holder(fd))
            fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _store_lock(path: Path, *, blocking: bool = True, timeout_s: float | None = None) -> contextlib.AbstractContextManager[bool]:
    return exclusive_lock(
        _txn_root(path) / "lock", f"store {str(path)!r}", blocking=blocking, timeout_s=timeout_s
    )


def _fsync_path(p: Path, directory: bool = False) -> None:
    fd = os.open(p, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(path: Path, stage: Path) -> None:
    """Move every staged file over its target (idempotent: already-moved files are skipped)."""
    manifest = json.loads((stage / "COMMITTED").read_text())
    files = manifest["files"]
    dirs = sorted({(path / rel).parent for rel in files})
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)

    def move(i: int) -> None:
        rel = files[i]
        src, dst = stage / "files" / rel, path / rel
        if _FAULT_HOOK is not None:
            _FAULT_HOOK("publish", i)
        if src.exists():
            os.replace(src, dst)

    # Renames (and the directory fsyncs) are independent and wait on the file system: run them in a pool.
    # Order does not matter: the COMMITTED marker is the commit point and a re-run skips moved files.
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(move, range(len(files))))
        list(pool.map(functools.partial(_fsync_path, directory=True), dirs))
    # The stage is empty now; one rename retires it (removing its folders is slow on some file systems
    # and not needed for consistency: recovery ignores ``done-*``, the next transaction deletes them).
    done = stage.with_name("done-" + stage.name[len("txn-") :])
    os.replace(stage, done)
    threading.Thread(target=shutil.rmtree, args=(done,), kwargs={"ignore_errors": True}, daemon=True).start()


def recover_store(path: str | os.PathLike[str]) -> list[str]:
    """Finish committed and discard uncommitted transactions left by a crash.

    Returns the actions taken (``"rolled forward txn-..."`` / ``"rolled back txn-..."``). Does nothing
    while another process holds the store's write lock.
    """
    path = Path(path)
    actions: list[str] = []
    root = _txn_root(path)
    if not root.is_dir() or not any(root.glob("txn-*")):
        return actions
    with _store_lock(path, blocking=False) as locked:
        if not locked:
            return actions
        actions = _recover_locked(path)
    return actions


def _recover_locked(path: Path) -> list[str]:
    actions = []
    for done in _txn_root(path).glob("done-*"):
        shutil.rmtree(done, ignore_errors=True)
    for stage in sorted(_txn_root(path).glob("txn-*")):
        if (stage / "COMMITTED").is_file():
            _publish(path, stage)
            actions.append(f"rolled forward {stage.name}")
        else:
            shutil.rmtree(stage, ignore_errors=True)
            actions.append(f"rolled back {stage.name}")
    return actions


#: Test hook: called as ``hook(stage_name, index)`` at each step of a publish; raise to simulate a crash.
_FAULT_HOOK: Any = None


class StoreTransaction:
    """All-or-nothing change of a store: stage files, commit, publish.

    Use as a context manager; inside, :meth:`array` gives a Zarr array in the staging area whose metadata
    is a copy of the store's (resize it, write whole chunks to it), and :meth:`write_file` stages any side
    file. Leaving the block without an exception commits and publishes; an exception discards the stage.

    Writes to staged arrays must cover whole storage chunks (the stage holds no copy of the old chunks).
    """

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout_s: float | None = None) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self.stage = _txn_root(self.path) / f"txn-{uuid.uuid4().hex}"
        self.files = self.stage / "files"
        self._lock: Any = None
        self._arrays: dict[str, zarr.Array] = {}
        self._synced: set[str] = set()
        self._synced_lock = threading.Lock()

    def __enter__(self) -> Self:
        if not (self.path / "zarr.json").is_file():
            raise StoreError(f"no Zarr store at {str(self.path)!r} (missing zarr.json)")
        # The lock comes first: everything this transaction reads of the store is read while it is held.
        self._lock = _store_lock(self.path, timeout_s=self.lock_timeout_s)
        self._lock.__enter__()
        try:
            _recover_locked(self.path)
            self._stage_metadata()
        except BaseException:
            shutil.rmtree(self.stage, ignore_errors=True)
            self._lock.__exit__(None, None, None)
            raise
        return self

    def _stage_metadata(self) -> None:
        self.files.mkdir(parents=True)
        # Mirror every metadata document so that the staged hierarchy opens and consolidates on its own.
        # The hierarchy is flat (root group + one level of arrays and side groups).
        metas = [self.path / "zarr.json"] + [
            d / "zarr.json" for d in self.path.iterdir() if (d / "zarr.json").is_file()
        ]
        for meta in metas:
            rel = meta.relative_to(self.path)
            (self.files / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(meta, self.files / rel)

    def current(self, rel: str) -> Path:
        """Where ``STORE/rel`` reads as of now inside this transaction: the staged file if there is one."""
        staged = self.files / rel
        return staged if staged.exists() else self.path / rel

    def array(self, name: str) -> zarr.Array:
        """The staged Zarr array ``name`` (writes land in the stage; unwritten chunks read as fill)."""
        if name not in self._arrays:
            self._arrays[name] = zarr.open_array(
                str(self.files / name), mode="r+", config={"write_empty_chunks": True}
            )
        return self._arrays[name]

    def write_file(self, rel: str, data: bytes) -> None:
        """Stage a side file at ``STORE/rel`` (mode 0644)."""
        _write_file(self.files / rel, data)

    def write_synced(self, rel: str, data: bytes) -> None:
        """Stage a file at ``STORE/rel`` and fsync it now (thread-safe; the commit skips its fsync).

        Used for chunk files written from a pool of encoders, so that the fsyncs overlap the encoding
        instead of queueing up at the commit.
        """
        _write_file(self.files / rel, data, synced=True)
        with self._synced_lock:
            self._synced.add(rel)

    def set_attrs(self, **attrs: Any) -> None:
        """Update root attributes."""
        meta = json.loads((self.files / "zarr.json").read_text())
        meta.setdefault("attributes", {}).update(attrs)
        (self.files / "zarr.json").write_text(json.dumps(meta))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is not None:
                shutil.rmtree(self.stage, ignore_errors=True)
                return
            try:
                self._commit()
            except BaseException:
                if not (self.stage / "COMMITTED").is_file():
                    shutil.rmtree(self.stage, ignore_errors=True)
                raise
        finally:
            self._lock.__exit__(None, None, None)

    def _commit(self) -> None:
        _consolidate(self.files)
        files = []
        for p in sorted(self.files.rglob("*")):
            if not p.is_file():
                continue
            rel = str(p.relative_to(self.files))
            target = self.path / rel
            if p.name == "zarr.json" and target.is_file() and target.read_bytes() == p.read_bytes():
                continue
            files.append(rel)
        # Files staged by ``write_synced`` are already durable; fsync the rest (fsync releases the GIL).
        todo = [self.files / rel for rel in files if rel not in self._synced]
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(_fsync_path, todo))
        tmp = self.stage / "COMMITTED.tmp"
        tmp.write_text(json.dumps({"files": files}))
        _fsync_path(tmp)
        if _FAULT_HOOK is not None:
            _FAULT_HOOK("commit", 0)
        os.replace(tmp, self.stage / "COMMITTED")
        _fsync_path(self.stage, directory=True)
        _publish(self.path, self.stage)
