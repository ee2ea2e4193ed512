"""Connection changes over time: a meter moved to another phase at a restoration, or without a logged event.

Crews restoring service after an outage sometimes reconnect a customer to another phase without updating
GIS. One answer over a window that holds both connections is ambiguous, so (per block of whole feeders):

1. **Restorations** (:func:`restoration_splits`). For every meter with a ``restoration`` row in
   ``events.csv`` that leaves at least ``min_after_days`` after it (and ``min_before_days`` before the
   outage that preceded it), the period splits into the window before the outage and the window after the
   restoration.
2. **Identification before and after** (:func:`changes_at_restoration`). The meter's feeder is identified
   on each window with :func:`~phaseid_hpc.phase_identification.identify_phases` (one pair of runs per
   feeder and restoration time). The window after decides the meter's answer; where it is confident and
   differs from the answer before (confident, or agreeing with GIS) the meter gets ``Phase Changed At
   Restoration``.
3. **Change points** (:func:`change_points`). Every other single-phase meter is scored per window
   (``window_s``) against its nearest meters of each phase (labels of the whole-period identification;
   :mod:`phaseid_hpc.kernels.change_point`); a switch of the best-followed phase that holds on both sides
   of a split by ``change_point_se`` standard errors, with ``min_before_days`` and ``min_after_days`` on
   either side, makes the meter a candidate. A candidate is confirmed as in step 2, with its split as the
   restoration (the ``max_splits_confirmed`` most significant split times per feeder, candidates within a
   window of one of them joining it): a change confirmed there gives ``Connection Changed``.
4. **Results** (:func:`apply_connection_changes`). New columns ``phase_before``, ``phase_after`` and
   ``changed_at`` (UTC; from when GIS is stale); the recommended phase of a changed meter is the answer after
   the change.

Transformers are mapped the same way on the two windows of a restoration
(:func:`transformers_at_restoration`; columns ``transformer_before``, ``transformer_after``): a confident
answer after that differs from the one before (confident, or the GIS transformer) gives ``Transformer
Changed At Restoration``, and the recommended transformer is the one after.

The job calls :func:`with_connection_changes` after a block's stages (``pipeline.process_block`` and
``pipeline.process_arrays``); the events reach it through ``[changes] events_file`` of the run config (a
block's partition key follows the file's path through the config fingerprint; ``delta.run_delta`` names the
copy it uses by its content). The windows are identified on the block's voltage as
read (identification does its own clock alignment; the quality stage's gap filling is not reapplied).
"""

from __future__ import annotations

import math
import os
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import contract
from ._compat import array_namespace, to_numpy
from .config import ChangesConfig, PhaseConfig, RunConfig
from .errors import ContractError

__all__ = [
    "EVENT_COLUMNS",
    "ChangeResult",
    "apply_connection_changes",
    "change_points",
    "changes_at_restoration",
    "changes_for_block",
    "connection_changes",
    "read_events",
    "restoration_splits",
    "transformers_at_restoration",
    "with_connection_changes",
]

EVENT_COLUMNS = ("meter_id", "timestamp", "event")
#: Columns added to the meters table.
CHANGE_COLUMNS = ("phase_before", "phase_after", "changed_at")


@dataclass(frozen=True)
class ChangeResult:
    """Connection changes of a block's meters (arrays aligned with its meters table).

    Attributes
    ----------
    phase_before, phase_after : ndarray of object, shape (n_meters,)
        Answers before and after the change (or the restoration); None where not split.
    confidence_after : ndarray, shape (n_meters,)
        Confidence of ``phase_after`` in [0, 1]; NaN where not split.
    class_after : ndarray of object, shape (n_meters,)
        Confidence class of ``phase_after``; None where not split.
    changed_at : DatetimeIndex, length n_meters
        Restoration time, or first window after the change point (UTC); NaT where no change was found.
    reason : ndarray of object, shape (n_meters,)
        ``Phase Changed At Restoration``, ``Connection Changed`` or ``""``.
    statistic : ndarray, shape (n_meters,)
        Change-point t statistic (NaN where not searched).
    transformer_before, transformer_after : ndarray of object, shape (n_meters,), optional
        Transformers mapped before and after a restoration (None where not split or not mapped).
    transformer_reason : ndarray of object, shape (n_meters,), optional
        ``Transformer Changed At Restoration`` or ``""``.
    """

    phase_before: np.ndarray
    phase_after: np.ndarray
    confidence_after: np.ndarray
    class_after: np.ndarray
    changed_at: pd.DatetimeIndex
    reason: np.ndarray
    statistic: np.ndarray
    transformer_before: np.ndarray | None = None
    transformer_after: np.ndarray | None = None
    transformer_reason: np.ndarray | None = None


def read_events(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``events.csv``: ``meter_id, timestamp, event`` (``outage``, ``restoration``, ...).

    Raises
    ------
    ContractError
        Naming the file and the missing columns or the first unparsable timestamp row.
    """
    p = Path(path)
    if not p.is_file():
        raise ContractError(f"events file {str(p)!r} does not exist")
    ev = pd.read_csv(p, dtype={"meter_id": str, "event": str})
    missing = [c for c in EVENT_COLUMNS if c not in ev]
    if missing:
        raise ContractError(f"events file {str(p)!r} lacks column(s) {missing}; expected {list(EVENT_COLUMNS)}")
    ts = pd.to_datetime(ev["timestamp"], utc=True, errors="coerce", format="ISO8601")
    bad = ts.isna()
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise ContractError(
            f"events file {str(p)!r} row {row + 2}: timestamp {ev['timestamp'].iloc[row]!r} is not ISO 8601"
        )
    return ev.assign(timestamp=ts)


# ----------------------------------------------------------------------------------------------------------
# Step 1: restorations
# ----------------------------------------------------------------------------------------------------------
def _naive_utc(times: pd.DatetimeIndex) -> pd.DatetimeIndex:
    """``times`` as naive UTC (the store's grid is naive UTC; an aware index is converted)."""
    times = pd.DatetimeIndex(times)
    return times.tz_convert("UTC").tz_localize(None) if times.tz is not None else times


def restoration_splits(
    events: pd.DataFrame | None, meter_ids: np.ndarray, times: pd.DatetimeIndex, config: ChangesConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Where each meter's period splits at a restoration.

    Parameters
    ----------
    events : DataFrame or None
        ``meter_id, timestamp, event`` (timestamps UTC). Rows of meters not in ``meter_ids`` are ignored.
    meter_ids : ndarray of str, shape (n_meters,)
    times : DatetimeIndex
        The block's time grid (interval ends, UTC).
    config : ChangesConfig

    Returns
    -------
    before_stop, after_start : ndarray of int, shape (n_meters,)
        The window before is ``times[:before_stop]`` (up to the outage preceding the restoration, else the
        restoration), the window after ``times[after_start:]``; ``-1`` where the meter has no restoration
        with ``min_before_days`` before and ``min_after_days`` after it. The latest such restoration counts.
    """
    n = len(meter_ids)
    before_stop = np.full(n, -1, dtype=np.int64)
    after_start = np.full(n, -1, dtype=np.int64)
    if events is None or not len(events) or len(times) < 2:
        return before_stop, after_start
    step_s = float((times[1] - times[0]).total_seconds())
    need_after = math.ceil(config.min_after_days * 86400 / step_s)
    need_before = math.ceil(config.min_before_days * 86400 / step_s)
    pos = pd.Series(np.arange(n), index=pd.Index(np.asarray(meter_ids, dtype=str)))
    ev = events[events["meter_id"].astype(str).isin(pos.index)]
    ev = ev.sort_values(["meter_id", "timestamp"], kind="stable")
    t_ns = _naive_utc(times).as_unit("ns").asi8
    for mid, g in ev.groupby("meter_id", sort=True):
        kinds = g["event"].astype(str).str.lower().to_numpy()
        stamps = _naive_utc(pd.DatetimeIndex(g["timestamp"])).as_unit("ns").asi8
        for j in np.flatnonzero(kinds == config.restoration_event.lower())[::-1]:
            # readings stamp interval ends: the first interval after an event ends after it
            start = int(np.searchsorted(t_ns, stamps[j], side="right"))
            prior = [k for k in range(j) if kinds[k] != config.restoration_event.lower()]
            stop = int(np.searchsorted(t_ns, stamps[prior[-1]], side="right")) if prior else start
            if len(times) - start >= need_after and stop >= need_before:
                before_stop[pos[mid]], after_start[pos[mid]] = stop, start
                break
    return before_stop, after_start


# ----------------------------------------------------------------------------------------------------------
# Step 2: identification before and after a restoration
# ----------------------------------------------------------------------------------------------------------
def changes_at_restoration(
    voltage: np.ndarray,
    meters: pd.DataFrame,
    before_stop: np.ndarray,
    after_start: np.ndarray,
    phase_config: PhaseConfig,
    *,
    interval_s: float = 900,
    kw: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Identify the feeders of meters with a restoration on the windows before and after it.

    Parameters
    ----------
    voltage : ndarray, shape (n_meters, n_time)
        Cleaned meter voltage of the block. [V]
    meters : DataFrame, n_meters rows
        What :func:`~phaseid_hpc.phase_identification.identify_phases` takes (``meter_id, feeder_id,
        transformer_id, phase_gis``, optional ``service_type, nominal_v, usable``).
    before_stop, after_start : ndarray of int, shape (n_meters,)
        From :func:`restoration_splits` (``-1``: no split).
    phase_config : PhaseConfig
    kw : ndarray, shape (n_meters, n_time), optional
        Meter load, for the load compensation of each window. [kW]

    Returns
    -------
    phase_before, phase_after : ndarray of object
    class_before, class_after : ndarray of object
    confidence_after : ndarray
        NaN / None where the meter has no split.
    """
    from .phase_identification import identify_phases

    n = len(meters)
    phase_before = np.full(n, None, dtype=object)
    phase_after = np.full(n, None, dtype=object)
    class_before = np.full(n, None, dtype=object)
    class_after = np.full(n, None, dtype=object)
    conf_after = np.full(n, np.nan)
    split = np.flatnonzero(after_start >= 0)
    if split.size == 0:
        return phase_before, phase_after, class_before, class_after, conf_after
    feeders = meters["feeder_id"].astype(str).to_numpy()
    keys = sorted({(feeders[i], int(before_stop[i]), int(after_start[i])) for i in split})
    # a restoration (or a change point already found) makes a change likely, and a meter reconnected to
    # another phase has left its transformer's phase: each window is judged without three checks that
    # guard GIS corrections of a whole window (the batch-means margin, whose few half-day blocks after a
    # late restoration make t too noisy to confirm anything, the agreement of the meter's siblings, and the
    # raw-signal nearest-GIS check)
    phase_config = dataclasses.replace(phase_config, margin_batch_s=0.0, sibling_agreement=0.0,
                                       nearest_gis_raw_tolerance=float("inf"))
    for feeder, stop, start in keys:  # one pair of runs per feeder and restoration
        rows = np.flatnonzero(feeders == feeder)
        sub = meters.iloc[rows]
        before = identify_phases(voltage[rows, :stop], sub, phase_config, interval_s=interval_s,
                                 kw=None if kw is None else kw[rows, :stop])
        after = identify_phases(voltage[rows, start:], sub, phase_config, interval_s=interval_s,
                                kw=None if kw is None else kw[rows, start:])
        mine = (before_stop[rows] == stop) & (after_start[rows] == start)
        idx = rows[mine]
        phase_before[idx] = before["phase"].to_numpy(dtype=object)[mine]
        class_before[idx] = before["phase_class"].to_numpy(dtype=object)[mine]
        phase_after[idx] = after["phase"].to_numpy(dtype=object)[mine]
        class_after[idx] = after["phase_class"].to_numpy(dtype=object)[mine]
        conf_after[idx] = after["phase_confidence"].to_numpy(dtype=np.float64)[mine]
    return phase_before, phase_after, class_before, class_after, conf_after


def transformers_at_restoration(
    voltage: np.ndarray,
    kw: np.ndarray | None,
    meters: pd.DataFrame,
    before_stop: np.ndarray,
    after_start: np.ndarray,
    phase_before: np.ndarray,
    phase_after: np.ndarray,
    config: Any,
    *,
    interval_s: float = 900,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Map the feeders of meters with a restoration to transformers on the windows before and after it.

    Parameters
    ----------
    voltage : ndarray, shape (n_meters, n_time)
        Meter voltage. [V]
    kw : ndarray, shape (n_meters, n_time), optional
        Meter load. [kW]
    meters : DataFrame
        ``meter_id, feeder_id, transformer_id, phase_gis``, optional ``usable``.
    before_stop, after_start : ndarray of int
        From :func:`restoration_splits`.
    phase_before, phase_after : ndarray of object
        Phases identified on each window (:func:`changes_at_restoration`).
    config : TransformerConfig

    Returns
    -------
    transformer_before, transformer_after, class_before, class_after : ndarray of object
        None where the meter has no split.
    """
    from .transformer_mapping import map_transformers

    n = len(meters)
    out = [np.full(n, None, dtype=object) for _ in range(4)]
    split = np.flatnonzero(after_start >= 0)
    feeders = meters["feeder_id"].astype(str).to_numpy()
    usable = meters["usable"].to_numpy(dtype=bool) if "usable" in meters else np.ones(n, dtype=bool)
    for feeder, stop, start in sorted({(feeders[i], int(before_stop[i]), int(after_start[i])) for i in split}):
        rows = np.flatnonzero(feeders == feeder)
        mine = (before_stop[rows] == stop) & (after_start[rows] == start)
        for sl, phase, (tx_out, cls_out) in ((slice(0, stop), phase_before, (out[0], out[2])),
                                             (slice(start, None), phase_after, (out[1], out[3]))):
            tm = pd.DataFrame({"meter_id": meters["meter_id"].to_numpy()[rows], "feeder_id": feeder,
                               "transformer_id": meters["transformer_id"].astype(str).to_numpy()[rows],
                               "phase_gis": meters["phase_gis"].astype(str).to_numpy()[rows],
                               "usable": usable[rows], "phase": np.asarray(phase, dtype=object)[rows]})
            tm["phase"] = tm["phase"].where(tm["phase"].notna(), tm["phase_gis"])
            res, _ = map_transformers(voltage[rows, sl], tm, config, kw=None if kw is None else kw[rows, sl],
                                      interval_s=interval_s)
            tx_out[rows[mine]] = res["transformer"].to_numpy(dtype=object)[mine]
            cls_out[rows[mine]] = res["transformer_class"].to_numpy(dtype=object)[mine]
    return out[0], out[1], out[2], out[3]


# ----------------------------------------------------------------------------------------------------------
# Step 3: change points without events
# ----------------------------------------------------------------------------------------------------------
def change_points(
    voltage: Any,
    meters: pd.DataFrame,
    labels: np.ndarray,
    searched: np.ndarray,
    config: ChangesConfig,
    *,
    interval_s: float = 900,
    random_state: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Persistent switches of the phase neighbourhood each meter follows, feeder by feeder.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage, NaN where missing. [V]
    meters : DataFrame, n_meters rows
        ``feeder_id``, optional ``nominal_v`` [V] and ``usable`` (bool).
    labels : ndarray of object, shape (n_meters,)
        Whole-period phase answers (``A/B/C``; anything else is not a single-phase answer and neither
        searched nor a neighbour).
    searched : ndarray of bool, shape (n_meters,)
        Meters to search (the others are only neighbours).
    config : ChangesConfig
    interval_s : float
        Grid step. [s]
    random_state : int
        Seed of the principal subspace used to find neighbours.

    Returns
    -------
    split : ndarray of int
        Sample index of the first interval after the change (``-1``: none found).
    before, after : ndarray of object
        Phases followed before and after the change (None where none found).
    statistic : ndarray
        t statistic of the best split (NaN where not searched).

    Notes
    -----
    Features as for identification (per-unit differences, row-standardised, the feeder's common mode
    removed). For each phase ``p`` a meter's template is the similarity-weighted sum of its
    ``n_neighbours`` nearest meters answered ``p`` (in the top 20 principal directions of the feeder), the
    meter itself left out; :func:`~phaseid_hpc.kernels.change_point.window_correlations` scores each window
    against the three templates and :func:`~phaseid_hpc.kernels.change_point.best_split` finds the switch.
    """
    from .kernels.change_point import best_split, window_correlations
    from .kernels.neighbours import neighbour_sums, principal_basis, top_k_neighbours
    from .kernels.preprocess import common_mode_residual, standardized_differences, unit_rows

    xp = array_namespace(voltage)
    n, n_t = voltage.shape
    split = np.full(n, -1, dtype=np.int64)
    before = np.full(n, None, dtype=object)
    after = np.full(n, None, dtype=object)
    stat = np.full(n, np.nan)
    window = max(2, round(config.window_s / interval_s))
    min_b = math.ceil(config.min_before_days * 86400 / config.window_s)
    min_a = math.ceil(config.min_after_days * 86400 / config.window_s)
    if (n_t - 1) // window < min_b + min_a:
        return split, before, after, stat
    codes = pd.Series(np.asarray(labels, dtype=object)).map({p: i for i, p in enumerate(contract.SINGLE_PHASES)})
    codes = codes.fillna(-1).to_numpy(np.int64)
    usable = meters["usable"].to_numpy(dtype=bool) if "usable" in meters else np.ones(n, dtype=bool)
    nominal = meters["nominal_v"].to_numpy(dtype=np.float64) if "nominal_v" in meters else np.full(n, np.nan)
    feeders = meters["feeder_id"].astype(str).to_numpy()
    for feeder in sorted(set(feeders)):
        rows = np.flatnonzero(feeders == feeder)
        single = usable[rows] & (codes[rows] >= 0)
        look = searched[rows] & single
        if not look.any() or np.unique(codes[rows][single]).size < 2:
            continue
        # float32 features, as identification's
        z, observed, _ = standardized_differences(xp.take(xp.asarray(voltage), xp.asarray(rows), axis=0),
                                                  xp.asarray(nominal[rows]), dtype=xp.float32)
        feat, _ = common_mode_residual(z, observed, xp.asarray(single.astype(np.float64)))
        u = unit_rows(feat)
        s_idx = np.flatnonzero(single)
        rank = max(2, min(20, s_idx.size - 1, u.shape[1] - 1))
        y = unit_rows(u @ principal_basis(xp.take(u, xp.asarray(s_idx), axis=0), rank, random_state=random_state))
        own = xp.asarray(np.arange(rows.size, dtype=np.int64))
        scores = []
        for p in range(3):
            cand = np.flatnonzero(single & (codes[rows] == p))
            if cand.size == 0:
                scores.append(xp.zeros((rows.size, (n_t - 1) // window), dtype=u.dtype))
                continue
            idx, sim = top_k_neighbours(y, own, config.n_neighbours, candidates=xp.take(y, xp.asarray(cand), axis=0),
                                        candidate_group=xp.asarray(cand.astype(np.int64)))
            w = xp.where(sim > 0, sim, xp.zeros_like(sim))
            tmpl = neighbour_sums(xp.take(u, xp.asarray(cand), axis=0), idx, w)
            scores.append(window_correlations(u, tmpl, window))
        k, p, q, s = (np.asarray(to_numpy(a)) for a in best_split(xp.stack(scores, axis=-1), min_b, min_a,
                                                                 min_sd=1.0 / math.sqrt(window)))
        stat[rows[look]] = s[look]
        found = look & (s >= config.change_point_se)
        idx_f = rows[found]
        split[idx_f] = k[found] * window + 1  # difference j is times[j + 1] - times[j]
        before[idx_f] = np.array(contract.SINGLE_PHASES, dtype=object)[p[found]]
        after[idx_f] = np.array(contract.SINGLE_PHASES, dtype=object)[q[found]]
    return split, before, after, stat


# ----------------------------------------------------------------------------------------------------------
# The block's entry points
# ----------------------------------------------------------------------------------------------------------
def connection_changes(
    voltage: Any,
    meters: pd.DataFrame,
    times: pd.DatetimeIndex,
    events: pd.DataFrame | None,
    config: RunConfig,
    *,
    labels: np.ndarray,
    interval_s: float = 900,
    kw: Any | None = None,
) -> ChangeResult:
    """Phase changes at restorations (with ``events``) and change points (without) of a block's meters.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage on the grid ``times``, NaN where missing. [V]
    meters : DataFrame, n_meters rows
        ``meter_id, feeder_id, transformer_id, phase_gis``, optional ``service_type, nominal_v, usable``.
    times : DatetimeIndex, length n_time
        Interval ends, UTC.
    events : DataFrame or None
        ``meter_id, timestamp, event`` (:func:`read_events`).
    config : RunConfig
        ``config.changes`` and ``config.phase`` are used.
    labels : ndarray, shape (n_meters,)
        Whole-period phase answers (``phase_inferred``).
    interval_s : float
        Grid step. [s]
    kw : array, shape (n_meters, n_time), optional
        Meter load, for the load compensation of phase identification and the transformer mapping before
        and after a restoration. [kW]

    Returns
    -------
    ChangeResult
    """
    cc = config.changes
    n = len(meters)
    # Step 1: where each meter's period splits at a restoration
    before_stop, after_start = restoration_splits(events, meters["meter_id"].astype(str).to_numpy(), times, cc)
    # Step 2: identification before and after each restoration
    kw_h = None if kw is None else to_numpy(kw)
    pb, pa, cb, ca, conf_a = changes_at_restoration(to_numpy(voltage), meters, before_stop, after_start,
                                                    config.phase, interval_s=interval_s, kw=kw_h)
    reason = np.full(n, "", dtype=object)
    changed_at = np.full(n, np.datetime64("NaT", "ns"))
    # interval starts: changed_at is when the first interval on the new connection began
    step = np.timedelta64(round(interval_s * 1e9), "ns")
    t_start = _naive_utc(times).to_numpy(dtype="datetime64[ns]") - step
    moved = _moved(pb, pa, cb, ca, meters["phase_gis"].astype(str).to_numpy())
    reason[moved] = contract.REASON_PHASE_CHANGED_AT_RESTORATION
    changed_at[moved] = t_start[after_start[moved]]
    tb = ta = None
    tx_reason = np.full(n, "", dtype=object)
    if config.transformer.enabled and (after_start >= 0).any():  # transformers before and after, the same way
        tb, ta, tcb, tca = transformers_at_restoration(to_numpy(voltage), kw_h,
                                                       meters, before_stop, after_start, pb, pa,
                                                       config.transformer, interval_s=interval_s)
        tx_moved = _moved(tb, ta, tcb, tca, meters["transformer_id"].astype(str).to_numpy())
        tx_reason[tx_moved] = contract.REASON_TRANSFORMER_CHANGED_AT_RESTORATION
        changed_at[tx_moved] = t_start[after_start[tx_moved]]
    stat = np.full(n, np.nan)
    # Step 3: change points of the meters without a restoration, confirmed like a restoration
    if cc.change_point:
        k, _, _, stat = change_points(voltage, meters, labels, after_start < 0, cc, interval_s=interval_s,
                                      random_state=config.phase.random_state)
        k = _most_significant_splits(k, stat, meters["feeder_id"].astype(str).to_numpy(), cc.max_splits_confirmed,
                                     snap=round(cc.window_s / interval_s))
        vb, va, vcb, vca, vconf = changes_at_restoration(to_numpy(voltage), meters, k, k, config.phase,
                                                         interval_s=interval_s, kw=kw_h)
        found = (k >= 0) & _moved(vb, va, vcb, vca, meters["phase_gis"].astype(str).to_numpy())
        pb[found], pa[found], ca[found], conf_a[found] = vb[found], va[found], vca[found], vconf[found]
        reason[found] = contract.REASON_CONNECTION_CHANGED
        changed_at[found] = t_start[k[found]]
    return ChangeResult(pb, pa, conf_a, ca, pd.DatetimeIndex(changed_at).tz_localize("UTC"), reason, stat,
                        tb, ta, tx_reason)


def _moved(before: np.ndarray, after: np.ndarray, class_before: np.ndarray, class_after: np.ndarray,
           gis: np.ndarray) -> np.ndarray:
    """A change (of phase or transformer): a confident answer after that differs from the answer before,
    where that one is confident or agrees with GIS (a weak answer before that confirms the GIS label still
    says where the meter was)."""
    held = (class_before == contract.CLASS_CONFIDENT) | (pd.notna(before) & (before == gis))
    return (class_after == contract.CLASS_CONFIDENT) & pd.notna(before) & held & (before != after)


def _most_significant_splits(split: np.ndarray, stat: np.ndarray, feeders: np.ndarray, limit: int,
                             snap: int) -> np.ndarray:
    """The split times confirmed: per feeder the ``limit`` distinct times with the largest statistic (each
    costs two identification runs of the feeder); a candidate at most ``snap`` samples from one of them is
    confirmed at it (one outage restores many meters at once; a window's split is uncertain by about one
    window); ``-1`` for the others."""
    out = np.full_like(split, -1)
    for feeder in sorted(set(feeders[split >= 0])):
        rows = np.flatnonzero((feeders == feeder) & (split >= 0))
        best: dict[int, float] = {}
        for i in rows:
            best[int(split[i])] = max(best.get(int(split[i]), -np.inf), float(stat[i]))
        keep = np.array(sorted(sorted(best, key=lambda t: (-best[t], t))[:limit]))
        # a candidate within ``snap`` samples of a kept split time is confirmed at that time
        near = np.abs(split[rows][:, None] - keep[None, :])
        j = np.argmin(near, axis=1)
        ok = near[np.arange(rows.size), j] <= snap
        out[rows[ok]] = keep[j[ok]]
    return out


def _add_reason(cell: Any, code: str) -> Any:
    """``code`` added to a reasons cell, a list of codes or a ``"; "``-joined string (kept in its form)."""
    if not code:
        return cell
    if isinstance(cell, (list, tuple, np.ndarray)):
        return sorted(set(map(str, cell)) | {code})
    return "; ".join(sorted(set(filter(None, str(cell or "").split("; "))) | {code}))


def apply_connection_changes(out: pd.DataFrame, result: ChangeResult) -> pd.DataFrame:
    """The block's meters table with the changes: new columns, reasons, and the answer after the change.

    Parameters
    ----------
    out : DataFrame
        The block's meters table (``phase_gis, phase, phase_inferred, phase_confidence, phase_class, changed,
        reasons``; reasons as lists of codes or joined strings).
    result : ChangeResult
        Aligned with ``out``'s rows.

    Returns
    -------
    DataFrame
        A copy with ``phase_before``, ``phase_after`` and ``changed_at`` (UTC; NaT where no change: from
        when GIS is stale); for meters split at a restoration, and meters with a change point, the answer
        after the change replaces the whole-period one (``phase_inferred``, ``phase_confidence``,
        ``phase_class``; the recommended ``phase`` where it is confident) and ``changed`` is recomputed.
    """
    from .phase_identification import recommend

    out = out.copy()
    out["phase_before"] = pd.Series(result.phase_before, index=out.index, dtype=object)
    out["phase_after"] = pd.Series(result.phase_after, index=out.index, dtype=object)
    out["changed_at"] = pd.Series(result.changed_at, index=out.index)
    decided = pd.notna(result.phase_after) & pd.notna(result.class_after)
    if decided.any():
        rows = out.index[decided]
        out["phase_inferred"] = out["phase_inferred"].astype(object)
        out.loc[rows, "phase_inferred"] = result.phase_after[decided]
        out.loc[rows, "phase_confidence"] = result.confidence_after[decided].astype(np.float64)
        out.loc[rows, "phase_class"] = result.class_after[decided]
        out["phase"] = recommend(out["phase_gis"].astype(str).to_numpy(),
                                 out["phase_inferred"].to_numpy(dtype=object),
                                 out["phase_class"].to_numpy(dtype=object))
        out["changed"] = out["phase"].notna() & (out["phase"] != out["phase_gis"])
    if result.transformer_after is not None:
        out["transformer_before"] = pd.Series(result.transformer_before, index=out.index, dtype=object)
        out["transformer_after"] = pd.Series(result.transformer_after, index=out.index, dtype=object)
        tx_moved = result.transformer_reason != ""
        if tx_moved.any() and "transformer" in out:
            out.loc[out.index[tx_moved], "transformer"] = result.transformer_after[tx_moved]
            if "transformer_changed" in out:
                out["transformer_changed"] = out["transformer"].to_numpy() != out["transformer_id"].to_numpy()
    for codes in (result.reason, result.transformer_reason):
        if codes is not None and (codes != "").any():
            out["reasons"] = [_add_reason(r, str(x)) for r, x in zip(out["reasons"], codes)]
    return out


def changes_for_block(meters: pd.DataFrame, voltage: Any, times: pd.DatetimeIndex, config: RunConfig, *,
                      interval_s: float = 900, nominal_v: np.ndarray | None = None,
                      service_type: np.ndarray | None = None, events: pd.DataFrame | None = None,
                      kw: Any | None = None) -> pd.DataFrame:
    """:func:`connection_changes` then :func:`apply_connection_changes` on a block's results table.

    Parameters
    ----------
    meters : DataFrame
        The block's meters table (``meter_id, feeder_id, transformer_id, phase_gis, phase_inferred,
        phase_class`` ...).
    voltage : array, shape (n_meters, n_time)
        The block's voltage, NaN where missing. [V]
    times : DatetimeIndex
        Interval ends, UTC.
    config : RunConfig
        ``config.changes.events_file`` is read when ``events`` is not given.
    interval_s : float
        [s]
    nominal_v : ndarray, shape (n_meters,), optional
        [V]; NaN: the meter's mean.
    service_type : ndarray, shape (n_meters,), optional
    events : DataFrame, optional
        Events (:func:`read_events`) instead of the configured file.
    kw : array, shape (n_meters, n_time), optional
        Meter load. [kW]

    Returns
    -------
    DataFrame
        ``meters`` unchanged when ``config.changes.enabled`` is false; else with the changes applied.
    """
    if not config.changes.enabled:
        return meters
    if events is None and config.changes.events_file:
        events = read_events(config.changes.events_file)
    n = len(meters)
    id_meters = pd.DataFrame({
        "meter_id": meters["meter_id"].astype(str).to_numpy(),
        "feeder_id": meters["feeder_id"].astype(str).to_numpy(),
        "transformer_id": meters["transformer_id"].astype(str).to_numpy(),
        "phase_gis": meters["phase_gis"].astype(str).to_numpy(),
        "service_type": np.full(n, None, dtype=object) if service_type is None else np.asarray(service_type),
        "nominal_v": np.full(n, np.nan) if nominal_v is None else np.asarray(nominal_v, dtype=np.float64),
        "usable": (meters["phase_class"].astype(str) != contract.CLASS_INSUFFICIENT).to_numpy(),
    })
    res = connection_changes(voltage, id_meters, times, events, config,
                             labels=meters["phase_inferred"].to_numpy(dtype=object), interval_s=interval_s, kw=kw)
    return apply_connection_changes(meters, res)


def with_connection_changes(block: Any, result: Any, config: RunConfig) -> Any:
    """A block's result with its connection changes (what the job calls after the block's stages).

    Parameters
    ----------
    block : phaseid_hpc.block.Block
        ``meters`` (``nominal_v``, ``service_type``), ``voltage``, ``times``, ``interval_s``.
    result : phaseid_hpc.stages.BlockResult
        ``meters`` and ``timings`` [s] (``changes`` added).
    config : RunConfig

    Returns
    -------
    BlockResult
        ``result`` with :func:`changes_for_block` applied to its meters table.
    """
    import dataclasses
    import time

    if not config.changes.enabled:
        return result
    t0 = time.perf_counter()
    meters = changes_for_block(result.meters, block.voltage, block.times, config, interval_s=block.interval_s,
                               nominal_v=block.meters["nominal_v"].to_numpy(dtype=np.float64),
                               service_type=block.meters["service_type"].to_numpy(dtype=object), kw=block.kw)
    return dataclasses.replace(result, meters=meters,
                               timings={**result.timings, "changes": time.perf_counter() - t0})
