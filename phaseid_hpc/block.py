"""The block contract: what every stage of the job receives, and what each one gives back.

A *block* is a set of whole feeders (see :mod:`phaseid_hpc.pipeline`): the meters' table, their voltage,
active and reactive power on one time grid, the feeder-head references and the transformer table. Every
stage takes the same frozen :class:`Block` and returns one small frozen dataclass; nothing is filled in
place and no stage reads another stage's private columns.

Names
-----
``transformer_gis`` and ``phase_gis``
    What the GIS (the meters file) says. Never overwritten.
``transformer`` and ``phase``
    The recommendation: the GIS value unless the evidence against it is confident.
``transformer_inferred`` and ``phase_inferred``
    What the data alone say, with ``*_confidence`` and ``*_class``.

Per-meter reasons are lists of reason codes (:mod:`phaseid_hpc.contract`) in every stage result; they are
joined into one ``"; "``-separated string only when a table is written (:func:`join_reasons`).

Arrays stay in the namespace they were read into (NumPy, or CuPy on a GPU worker): a stage converts to the
host only the small per-meter vectors it tabulates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .errors import ContractError

__all__ = [
    "BLOCK_METER_COLUMNS",
    "Block",
    "check_block",
    "join_reasons",
    "union_reasons",
]

#: Columns of :attr:`Block.meters`, in order.
BLOCK_METER_COLUMNS: tuple[str, ...] = (
    "meter_id",
    "feeder_id",
    "transformer_gis",
    "phase_gis",
    "service_type",
    "nominal_v",
    "sampling_interval_s",
    "off_grid_fraction",
    "lat",
    "lon",
)


@dataclass(frozen=True)
class Block:
    """One block of whole feeders, as every stage receives it.

    Attributes
    ----------
    meters : DataFrame, one row per meter
        :data:`BLOCK_METER_COLUMNS`: ids, the GIS transformer and phase, service type, nominal voltage [V],
        sampling interval [s], share of reads off the grid [-], latitude and longitude [deg].
    voltage : array, shape (n_meters, n_time)
        Meter voltage on :attr:`times`, NaN where missing. [V]
    kw, kvar : array, shape (n_meters, n_time), or None
        Active [kW] and reactive [kvar] power, NaN where missing.
    references : tuple of (DataFrame, array) or None
        Feeder-head reference rows (``feeder_id``, ``phase``) and their voltages, shape (n_refs, n_time) [V].
    transformers : DataFrame or None
        The transformer table (``transformer_id``, ``feeder_id``, ``kva_rating``, ``n_phases``, ...).
    times : DatetimeIndex
        Interval ends (UTC).
    interval_s : float
        Grid step. [s]
    """

    meters: pd.DataFrame
    voltage: Any
    kw: Any | None
    kvar: Any | None
    references: tuple[pd.DataFrame, Any] | None
    transformers: pd.DataFrame | None
    times: pd.DatetimeIndex
    interval_s: float

    @property
    def n_meters(self) -> int:
        """Number of meters (rows) in the block."""
        return len(self.meters)

    def column(self, name: str, dtype: Any = object) -> np.ndarray:
        """One column of :attr:`meters` as a host array."""
        return self.meters[name].to_numpy(dtype=dtype)

    def replace(self, **changes: Any) -> Block:
        """A copy with some fields replaced (e.g. clock-aligned arrays)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_tables(cls, voltage: Any, kw: Any | None, kvar: Any | None, tables: Any) -> Block:
        """A block from arrays and a :class:`~phaseid_hpc.pipeline.StoreTables` (GIS ``transformer_id``).

        Parameters
        ----------
        voltage : array, shape (n_meters, n_time)
            Meter voltage. [V]
        kw, kvar : array, shape (n_meters, n_time), or None
            Active [kW] and reactive [kvar] power.
        tables : StoreTables
            Meters (rows aligned with the arrays), references, transformers, times and grid step.
        """
        m = tables.meters.rename(columns={"transformer_id": "transformer_gis"})
        for col in ("service_type",):
            if col not in m:
                m = m.assign(**{col: None})
        for col in ("nominal_v", "sampling_interval_s", "off_grid_fraction", "lat", "lon"):
            if col not in m:
                m = m.assign(**{col: np.nan})
        missing = [c for c in BLOCK_METER_COLUMNS if c not in m]
        if missing:
            raise ContractError(f"block meters table lacks column(s) {missing}; found {list(tables.meters.columns)}")
        meters = m.loc[:, list(BLOCK_METER_COLUMNS)].reset_index(drop=True)
        return cls(meters, voltage, kw, kvar, tables.references, tables.transformers, tables.times,
                   float(tables.interval_s))


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def check_block(block: Block) -> Block:
    """Check that a block's arrays and tables agree, before any stage runs.

    Parameters
    ----------
    block : Block

    Returns
    -------
    Block
        The same block.

    Raises
    ------
    ContractError
        Naming the field and the shapes found: missing meter columns, duplicate meter ids, arrays whose rows
        or columns do not match the meters table or the time grid, references of another length, a
        non-positive grid step.
    """
    missing = [c for c in BLOCK_METER_COLUMNS if c not in block.meters]
    if missing:
        raise ContractError(f"block meters table lacks column(s) {missing}")
    n, n_t = block.n_meters, len(block.times)
    dup = block.meters["meter_id"].astype(str).duplicated()
    if dup.any():
        raise ContractError(f"block holds meter id(s) twice: {sorted(block.meters['meter_id'][dup].astype(str))[:5]}")
    for name in ("voltage", "kw", "kvar"):
        x = getattr(block, name)
        if x is None:
            if name == "voltage":
                raise ContractError("block has no voltage array")
            continue
        if _shape(x) != (n, n_t):
            raise ContractError(
                f"block {name} has shape {_shape(x)}; expected (n_meters, n_time) = ({n}, {n_t}) from the meters "
                "table and the time grid"
            )
    if block.references is not None:
        table, ref_v = block.references
        if _shape(ref_v) != (len(table), n_t):
            raise ContractError(
                f"block references have shape {_shape(ref_v)}; expected ({len(table)}, {n_t}) "
                "(one row per reference, one column per time)"
            )
    if not (block.interval_s > 0):
        raise ContractError(f"block interval_s must be positive; got {block.interval_s!r}")
    return block


def union_reasons(*per_meter: Iterable[Sequence[str]]) -> list[list[str]]:
    """Per meter, the sorted union of several stages' reason lists.

    Parameters
    ----------
    *per_meter : iterables of sequences of str
        One iterable per stage, each with one list of reason codes per meter (same order).

    Returns
    -------
    list of list of str
        Sorted, without duplicates or empty codes.
    """
    return [sorted({r for reasons in rows for r in reasons if r}) for rows in zip(*per_meter)]


def join_reasons(reasons: Iterable[Sequence[str]]) -> list[str]:
    """Reason lists as the ``"; "``-joined strings written to the output tables."""
    return ["; ".join(r) for r in reasons]
