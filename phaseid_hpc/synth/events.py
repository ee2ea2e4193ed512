"""Connection changes and transformer faults spliced into generated or physics-based readings.

* :func:`splice_phase_changes`: meters reconnected to another phase at a restoration. After the
  restoration a spliced meter reads the voltage of a donor meter of the new phase whose voltage follows
  the meter's own most closely (same transformer where one serves that phase, else the nearest in voltage
  shape: its regulator zone and place on the feeder), scaled to the meter's own level; an outage of
  ``outage_hours`` before it is missing. Returns the ``events.csv`` rows (an outage and a restoration per
  spliced meter, and as many for unchanged control meters) and the truth of each change.
* :func:`inject_tap_change`: a voltage step on every meter of a transformer.
* :func:`inject_winding_fault`: from a time on, a common multiplicative noise on every meter of a
  transformer: they stay correlated with each other and lose the feeder's fluctuations.
* :func:`write_events`: ``events.csv`` in the contract (``meter_id, timestamp, event``).

All randomness comes from the ``random_state`` passed in; the inputs are not modified.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .. import contract

__all__ = ["inject_tap_change", "inject_winding_fault", "splice_phase_changes", "write_events"]


def _donor(voltage: np.ndarray, i: int, candidates: np.ndarray, same_transformer: np.ndarray) -> int:
    """The candidate on the meter's transformer, else the one whose raw voltage correlates best with it."""
    on_tx = candidates[same_transformer[candidates]]
    pool = on_tx if on_tx.size else candidates
    x = voltage[pool]
    y = voltage[i]
    ok = ~np.isnan(y)
    xc = np.where(np.isnan(x), 0.0, x - np.nanmean(x, axis=1, keepdims=True)) * ok
    yc = np.where(ok, y - np.nanmean(y), 0.0)
    corr = xc @ yc / np.maximum(np.linalg.norm(xc, axis=1) * np.linalg.norm(yc), 1e-12)
    return int(pool[int(np.argmax(corr))])


def splice_phase_changes(
    voltage: np.ndarray,
    meters: pd.DataFrame,
    times: pd.DatetimeIndex,
    *,
    share: float = 0.01,
    control_share: float = 0.01,
    min_before_days: float = 3.0,
    min_after_days: float = 3.0,
    outage_hours: float = 2.0,
    n_restorations: int = 1,
    random_state: int | np.random.Generator = 0,
) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Move ``share`` of the single-phase meters to another phase at a random restoration time.

    Parameters
    ----------
    voltage : ndarray, shape (n_meters, n_time)
        True (noise-free) meter voltage. [V]
    meters : DataFrame, n_meters rows
        The truth: ``meter_id, feeder_id, transformer_id, phase``.
    times : DatetimeIndex, length n_time
        Interval ends, UTC.
    share : float
        Share of the single-phase meters moved (at least one) [-].
    control_share : float
        Share of other single-phase meters that get an outage and restoration but stay on their phase [-].
    min_before_days, min_after_days : float
        The restoration falls uniformly between these many days after the start and before the end. [d]
    outage_hours : float
        Length of the outage before the restoration (missing readings). [h]
    n_restorations : int
        Distinct restoration times (one outage restores many customers at once); each affected meter gets
        one of them at random.
    random_state : int or Generator

    Returns
    -------
    voltage : ndarray, shape (n_meters, n_time)
        A copy with the spliced meters' readings after the restoration taken from their donors (scaled to
        the meter's mean level before it) and NaN during the outages. [V]
    events : DataFrame
        ``meter_id, timestamp, event`` (``outage``, ``restoration``), sorted by time and meter.
    changes : DataFrame
        One row per spliced or control meter: ``meter_id, feeder_id, phase_before, phase_after,
        changed_at, donor_id, moved`` (bool).

    Raises
    ------
    ValueError
        When the period is shorter than ``min_before_days + min_after_days`` or no meter can move.
    """
    rng = random_state if isinstance(random_state, np.random.Generator) else np.random.default_rng(random_state)
    _n, n_t = voltage.shape
    step_s = float((times[1] - times[0]).total_seconds())
    lo = int(np.ceil(min_before_days * 86400 / step_s))
    hi = n_t - int(np.ceil(min_after_days * 86400 / step_s))
    if hi <= lo:
        raise ValueError(f"splice_phase_changes: {n_t} samples of {step_s:g} s leave no restoration time with "
                         f"{min_before_days} days before and {min_after_days} after")
    phase = meters["phase"].astype(str).to_numpy()
    feeder = meters["feeder_id"].astype(str).to_numpy()
    tx = meters["transformer_id"].astype(str).to_numpy()
    single = np.isin(phase, contract.SINGLE_PHASES)
    n_phases = pd.DataFrame({"f": feeder, "p": phase})[single].groupby("f")["p"].nunique()
    movable = np.flatnonzero(single & (pd.Series(feeder).map(n_phases).fillna(0).to_numpy() >= 2))
    if movable.size == 0:
        raise ValueError("splice_phase_changes: no feeder has single-phase meters on two phases")
    n_move = max(1, round(share * single.sum()))
    moved = np.sort(rng.choice(movable, size=min(n_move, movable.size), replace=False))
    rest = np.setdiff1d(np.flatnonzero(single), moved)
    n_ctrl = min(rest.size, round(control_share * single.sum()))
    control = np.sort(rng.choice(rest, size=n_ctrl, replace=False)) if n_ctrl else np.zeros(0, dtype=np.int64)
    out = np.array(voltage, dtype=np.float64, copy=True)
    outage_n = max(1, round(outage_hours * 3600 / step_s))
    ev_rows, ch_rows = [], []
    restore_at = np.sort(rng.integers(lo, hi, size=max(1, n_restorations)))
    used: list[int] = []
    for i in np.concatenate([moved, control]):
        k = int(rng.choice(restore_at))
        is_moved = bool(np.isin(i, moved))
        new_phase, donor = phase[i], ""
        if is_moved:
            others = [p for p in contract.SINGLE_PHASES if p != phase[i]
                      and ((feeder == feeder[i]) & (phase == p)).any()]
            new_phase = str(rng.choice(others))
            cand = np.flatnonzero((feeder == feeder[i]) & (phase == new_phase))
            # one donor per moved meter: two meters carrying the same donor's readings would be copies of
            # each other (same load, same noise), which no pair of real customers is
            fresh = cand[~np.isin(cand, used)]
            cand = fresh if fresh.size else cand
            j = _donor(voltage[:, :k], i, cand, tx == tx[i])
            level = np.nanmean(voltage[i, :k]) / np.nanmean(voltage[j, :k])
            out[i, k:] = voltage[j, k:] * level
            donor = str(meters["meter_id"].iloc[j])
            used.append(j)
        out[i, max(0, k - outage_n):k] = np.nan
        mid = str(meters["meter_id"].iloc[i])
        # readings are interval ends: the outage starts with the first missing interval
        ev_rows.append((mid, times[max(0, k - outage_n)] - pd.Timedelta(seconds=step_s), "outage"))
        ev_rows.append((mid, times[k] - pd.Timedelta(seconds=step_s), "restoration"))
        ch_rows.append((mid, feeder[i], phase[i], new_phase, times[k] - pd.Timedelta(seconds=step_s), donor,
                        is_moved))
    events = pd.DataFrame(ev_rows, columns=["meter_id", "timestamp", "event"])
    events = events.sort_values(["timestamp", "meter_id", "event"], kind="stable").reset_index(drop=True)
    changes = pd.DataFrame(ch_rows, columns=["meter_id", "feeder_id", "phase_before", "phase_after", "changed_at",
                                             "donor_id", "moved"])
    return out, events, changes


def inject_tap_change(voltage: np.ndarray, rows: np.ndarray, start: int, step_pct: float) -> np.ndarray:
    """A copy of ``voltage`` with the meters ``rows`` stepped by ``step_pct`` from sample ``start`` on.

    Parameters
    ----------
    voltage : ndarray, shape (n_meters, n_time) [V]
    rows : ndarray of int
        The transformer's meters.
    start : int
        First sample after the tap change.
    step_pct : float
        Step [%] (signed).
    """
    out = np.array(voltage, dtype=np.float64, copy=True)
    out[np.asarray(rows), start:] *= 1.0 + step_pct / 100.0
    return out


def inject_winding_fault(voltage: np.ndarray, rows: np.ndarray, start: int, noise_pct: float,
                         random_state: int | np.random.Generator = 0) -> np.ndarray:
    """A copy of ``voltage`` with a common multiplicative noise on the meters ``rows`` from ``start`` on.

    Parameters
    ----------
    voltage : ndarray, shape (n_meters, n_time) [V]
    rows : ndarray of int
        The transformer's meters.
    start : int
        First faulty sample.
    noise_pct : float
        One sigma of the common noise [%]: the unit's meters keep following each other and lose their
        correlation with the rest of the feeder.
    random_state : int or Generator
    """
    rng = random_state if isinstance(random_state, np.random.Generator) else np.random.default_rng(random_state)
    out = np.array(voltage, dtype=np.float64, copy=True)
    noise = 1.0 + noise_pct / 100.0 * rng.standard_normal(out.shape[1] - start)
    out[np.asarray(rows), start:] *= noise[None, :]
    return out


def write_events(events: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``events.csv`` (``meter_id, timestamp, event``; ISO 8601 UTC timestamps)."""
    p = Path(path)
    ev = events[["meter_id", "timestamp", "event"]].copy()
    ev["timestamp"] = pd.DatetimeIndex(ev["timestamp"]).tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
    ev.to_csv(p, index=False)
    return p
