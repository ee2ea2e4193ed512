"""Transformer validation: loading, phase imbalance, thermal model, insulation ageing and health flags.

The last step of the job. For one block of whole feeders it aggregates the meters' power to their INFERRED
transformer and phase, runs the thermal model (:mod:`phaseid_hpc.kernels.thermal`, vectorised across the
block's transformers) and flags what needs a field audit:

``overload``
    hot spot above the normal-cyclic limit (``hot_spot_normal_c``, 120 degC).
``emergency_overload``
    hot spot above the emergency limit (``hot_spot_emergency_c``, 140 degC).
``mapping_contradicts_rating``
    the load the inferred mapping puts on the unit is impossible for its rating (99th percentile above
    ``max_plausible_loading_pu`` or mean above ``max_plausible_mean_loading_pu``): send to manual audit,
    do not accept the mapping; the unit's thermal figures are then not physical.
``high_imbalance``
    3-phase bank whose phase loads differ by more than ``max_imbalance``.
``voltage_level_step``
    the common voltage level of its meters (relative to the median of the other transformers of the
    feeder, less the part its own load explains through its impedance) steps by more than
    ``tap_fault_steps`` tap steps of ``tap_step_pu``: tap or winding problem.
``correlation_loss``
    the mean of its meters (their own noise averaged out) loses correlation with the feeder reference
    (the feeder head of their phase, else the median of the other transformers of the feeder) in at least
    ``health_min_lost_windows`` consecutive windows of ``health_window`` samples (windows end at the last
    sample), while every one of its meters still follows its siblings (a cause common to the unit) and
    the rest of the feeder does not lose it too: winding or connection problem. Lost: correlation below
    ``health_min_correlation``, or below half the unit's usual one (its best window out of at most 8, else
    the upper quartile of its windows, at least the second-best) and ``health_loss_se`` standard errors of
    Fisher z below it. The reference of the level step is the median of the 8 transformers of the feeder
    whose fluctuations follow the unit's most closely (its regulator zone or lateral).
``no_rating``
    no usable ``kva_rating``: loading and thermal figures are NaN.
``no_load_data``
    no kW sample on any of its meters.

Units: power in [kW], [kvar], [kVA]; voltage in [V]; temperatures in [degC]; times UTC with timestamps at
the END of each interval (the store's convention).

Missing data: short and long gaps in a meter's ``kw``/``kvar`` are filled by linear interpolation in time
between the neighbouring samples (constant extrapolation at the ends), so energy and peaks are kept as
well as the data allow; a meter with no kW sample at all contributes nothing and ``kw_coverage`` (the
share of real kW samples of the transformer's meters) tells how much was filled. Gaps in ``kvar`` are
filled the same way; with no ``kvar`` array, or for a meter without any kvar sample, it is
``kw * tan(acos(default_power_factor))``. The thermal model runs in float32 (within ~1e-4 degC of float64).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from .config import ValidationConfig
from .kernels import thermal

__all__ = ["VALIDATION_FLAGS", "feeder_phase_imbalance", "summarize_validation", "validate_transformers"]

#: Flags that ``validate_transformers`` may set, in the order they are listed.
VALIDATION_FLAGS: tuple[str, ...] = (
    "overload",
    "emergency_overload",
    "mapping_contradicts_rating",
    "high_imbalance",
    "voltage_level_step",
    "correlation_loss",
    "no_rating",
    "no_load_data",
)

_PHASE_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "A": (1.0, 0.0, 0.0),
    "B": (0.0, 1.0, 0.0),
    "C": (0.0, 0.0, 1.0),
    "AB": (0.5, 0.5, 0.0),
    "BC": (0.0, 0.5, 0.5),
    "CA": (0.5, 0.0, 0.5),
    "ABC": (1 / 3, 1 / 3, 1 / 3),
}
_UNKNOWN_PHASE = (1 / 3, 1 / 3, 1 / 3)
#: Default configuration (frozen, so one shared instance is safe as an argument default).
_DEFAULT_CONFIG = ValidationConfig()
# Transformers per call of the thermal kernel (float32; bounds the temporaries to ~12 MB each).
_THERMAL_CHUNK = 1024


# Transformers whose median is a transformer's reference in the health checks (its neighbourhood).
_NEIGHBOUR_TRANSFORMERS = 8

# Meters per chunk of the per-meter passes (whole transformers; keeps the temporaries in cache).
_METER_CHUNK = 512
# Contract names of the phase sets (bit 1 = A, 2 = B, 4 = C): pairs as AB, BC, CA (never AC).
_PHASES_ON_NAMES = np.array(["", "A", "B", "AB", "C", "CA", "BC", "ABC"], dtype=object)


def _fill_time_gaps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation along time of NaN samples, constant at the ends, 0 for rows without data.

    Works on the runs of consecutive NaN samples (O(number of holes) after one ``isnan`` pass) and keeps
    the input's float dtype. Returns the filled copy, shape (n_rows, n_time), and the number of real
    samples per row, shape (n_rows,).
    """
    n, n_t = x.shape
    out = np.array(x, dtype=x.dtype if x.dtype in (np.float32, np.float64) else np.float64, copy=True)
    holes = np.flatnonzero(np.isnan(out))
    row = holes // max(n_t, 1)
    n_valid = n_t - np.bincount(row, minlength=n)
    if holes.size == 0:
        return out, n_valid
    flat = out.reshape(-1)
    new_run = np.ones(holes.size, dtype=bool)
    new_run[1:] = (np.diff(holes) != 1) | (row[1:] != row[:-1])
    run = np.cumsum(new_run) - 1
    first = holes[new_run]
    last = holes[np.append(new_run[1:], True)]
    has_prev = (first % n_t) != 0
    has_next = (last % n_t) != n_t - 1
    prev = np.where(has_prev, first - 1, 0)
    nxt = np.where(has_next, last + 1, 0)
    x_prev, x_next = flat[prev], flat[nxt]
    both = has_prev & has_next
    span = np.where(both, nxt - prev, 1)
    hp, hn, hb = has_prev[run], has_next[run], both[run]
    xp_, xn = x_prev[run], x_next[run]
    fill = np.where(
        hb,
        xp_ + (xn - xp_) * ((holes - prev[run]) / span[run]),
        np.where(hp, xp_, np.where(hn, xn, 0.0)),
    )
    flat[holes] = fill
    return out, n_valid


def _chunks(group_start: np.ndarray, n_items: int, size: int) -> list[tuple[int, int, int, int]]:
    """Split contiguous groups (``group_start``: first item of each non-empty group, ascending) into chunks
    of about ``size`` items made of whole groups: ``(item_start, item_stop, group_start, group_stop)``."""
    out = []
    g = 0
    n_g = group_start.size
    while g < n_g:
        i0 = int(group_start[g])
        g1 = int(np.searchsorted(group_start, i0 + size, side="left"))
        g1 = max(g1, g + 1)
        i1 = int(group_start[g1]) if g1 < n_g else n_items
        out.append((i0, i1, g, g1))
        g = g1
    return out


def _indicator(rows: np.ndarray, n_rows: int, dtype: Any) -> sparse.csr_array:
    """Sparse one-hot ``(n_rows, rows.size)`` matrix with a 1 at ``(rows[j], j)``: ``M @ x`` sums rows of
    ``x`` into groups (scipy's CSR product reads ``x`` once, row by row; ``np.add.reduceat`` along axis 0
    is several times slower)."""
    return sparse.csr_array(
        (np.ones(rows.size, dtype=dtype), (rows, np.arange(rows.size))), shape=(n_rows, rows.size)
    )


def _rows(x: np.ndarray, order: np.ndarray, identity: bool, i0: int, i1: int) -> np.ndarray:
    """Rows ``order[i0:i1]`` of ``x`` (a view when the order is the identity)."""
    return x[i0:i1] if identity else x[order[i0:i1]]


def _thermal_summary(
    loading: np.ndarray,
    ok: np.ndarray,
    ambient: np.ndarray | float,
    interval_min: float,
    config: ValidationConfig,
) -> dict[str, np.ndarray]:
    """Max top oil / hot spot, hours above the limits, F_EQA and loss of life for the rows ``ok`` of ``loading``."""
    model = thermal.iec_temperatures if config.thermal_standard == "iec" else thermal.ieee_temperatures
    params = _thermal_parameters(config)
    n, n_t = loading.shape
    out = {k: np.full(n, np.nan) for k in ("max_top_oil_c", "max_hot_spot_c", "f_eqa", "loss_of_life_h")}
    out["hours_above_normal"] = np.zeros(n)
    out["hours_above_emergency"] = np.zeros(n)
    ok = np.flatnonzero(ok)
    interval_h = interval_min / 60.0
    for start in range(0, ok.size, _THERMAL_CHUNK):
        rows = ok[start : start + _THERMAL_CHUNK]
        # float32 halves the memory traffic; temperatures stay within ~1e-4 degC of float64 (tests check 0.01)
        k = np.ascontiguousarray(loading[rows], dtype=np.float32)
        amb = ambient[rows] if isinstance(ambient, np.ndarray) and ambient.ndim == 2 else ambient
        top_oil, hot_spot = model(k, amb, interval_min, **params)
        out["max_top_oil_c"][rows] = top_oil.max(axis=1)
        hot_max = hot_spot.max(axis=1)
        out["max_hot_spot_c"][rows] = hot_max
        for key, limit in (
            ("hours_above_normal", config.hot_spot_normal_c),
            ("hours_above_emergency", config.hot_spot_emergency_c),
        ):
            hot = np.flatnonzero(hot_max > limit)  # only units that get there need the count
            if hot.size:
                out[key][rows[hot]] = (hot_spot[hot] > limit).sum(axis=1) * interval_h
        rate = thermal.relative_aging_rate(hot_spot, config.insulation)
        f_eqa = rate.mean(axis=1, dtype=np.float64)
        bad = np.isnan(f_eqa)
        if bad.any():  # NaN-aware mean where a sample is NaN
            f_eqa[bad] = thermal.equivalent_aging_factor(rate[bad])
        out["f_eqa"][rows] = f_eqa
        out["loss_of_life_h"][rows] = f_eqa * (n_t * interval_h)
    return out


def _level_step(offset: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest difference between the means of two adjacent windows of ``w`` samples (two-window detector).

    Window sums come from one float64 cumulative sum per row. Returns the absolute step [pu] (NaN where
    too few samples) and the index of the first sample after it.
    """
    n, n_t = offset.shape
    if n_t < 2 * w:
        return np.full(n, np.nan), np.full(n, -1)
    valid = np.isfinite(offset)
    all_valid = bool(valid.all())
    cs = np.zeros((n, n_t + 1))
    np.cumsum(offset if all_valid else np.where(valid, offset, 0.0), axis=1, dtype=np.float64, out=cs[:, 1:])
    if all_valid:  # every window full: |S(i, i+w) - S(i-w, i)| = |2 cs[i] - cs[i-w] - cs[i+w]|, scaled once
        d = cs[:, w : n_t + 1 - w] * 2.0
        d -= cs[:, : n_t + 1 - 2 * w]
        d -= cs[:, 2 * w :]
        np.abs(d, out=d)
        split = np.argmax(d, axis=1)
        return d[np.arange(n), split] / w, split + w
    cn = np.zeros((n, n_t + 1), dtype=np.int64)
    np.cumsum(valid, axis=1, out=cn[:, 1:])
    s, c = cs[:, w:] - cs[:, :-w], cn[:, w:] - cn[:, :-w]
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(c >= w // 2, s / c, np.nan)
    d = np.abs(m[:, w:] - m[:, : m.shape[1] - w])  # window ending at split vs window starting at split
    fin = np.isfinite(d)
    any_ok = fin.any(axis=1)
    split = np.argmax(np.where(fin, d, -1.0), axis=1)
    step = np.where(any_ok, d[np.arange(n), split], np.nan)
    return step, np.where(any_ok, split + w, -1)


def _row_quantile(x: np.ndarray, q: float, nan_rows: np.ndarray) -> np.ndarray:
    """``np.quantile(x, q, axis=1)`` (linear method) from one ``np.partition`` on the two order statistics;
    NaN for the rows ``nan_rows`` (those holding a NaN)."""
    n_t = x.shape[1]
    pos = q * (n_t - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n_t - 1)
    part = np.partition(x, sorted({lo, hi}), axis=1)
    a, b = part[:, lo].astype(np.float64), part[:, hi].astype(np.float64)
    return np.where(nan_rows, np.nan, a + (b - a) * (pos - lo))


def _nanmedian_rows(r: np.ndarray) -> np.ndarray:
    """``np.nanmedian(r, axis=1)`` without warnings (NaN for rows without a finite value) via one sort."""
    n, k = r.shape
    if k == 0:
        return np.full(n, np.nan)
    s = np.sort(r, axis=1)  # NaN last
    nv = (~np.isnan(r)).sum(axis=1)
    lo, hi = np.maximum(nv - 1, 0) // 2, nv // 2
    rows = np.arange(n)
    hi = np.minimum(hi, k - 1)
    return np.where(nv > 0, 0.5 * (s[rows, lo] + s[rows, hi]), np.nan)


def _health(
    voltage: np.ndarray,
    order: np.ndarray,
    identity: bool,
    group_start: np.ndarray,
    group_tx: np.ndarray,
    n_meters: np.ndarray,
    feeder_of_tx: np.ndarray,
    ref_of_meter: np.ndarray,
    ref_pu: list[np.ndarray],
    config: ValidationConfig,
    tx_load: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Voltage-level step and correlation loss per transformer (see module docstring).

    ``order`` lists the mapped meters sorted by transformer (``group_start``/``group_tx``: first position
    and transformer of each non-empty group); ``ref_of_meter`` (aligned with ``order``) is the row of
    ``ref_pu`` (feeder-head reference in pu) of each meter, -1 where the rest of its feeder is the reference.
    ``tx_load`` (n_tx, n_time), the load of each transformer [kW], lets the step detector remove the part of
    the level its own load explains (a large load switching is not a tap change).
    Per-meter work runs in chunks of whole transformers in float32; sums over a feeder in float64.
    """
    n_t = voltage.shape[1]
    n_tx = n_meters.size
    n_map = order.size
    w = config.health_window
    f32 = np.float32
    empty = {
        "voltage_step_pu": np.full(n_tx, np.nan),
        "voltage_step_index": np.full(n_tx, -1),
        "correlation_lost_windows": np.zeros(n_tx, dtype=int),
        "correlation_first_lost": np.full(n_tx, -1),
    }
    if n_tx == 0 or n_t == 0:
        return empty
    chunks = _chunks(group_start, n_map, _METER_CHUNK)

    # Pass 1: each meter's level (mean of valid samples) and the per-transformer sums of v_pu.
    codes, _ = pd.factorize(feeder_of_tx)  # transformers are sorted by feeder
    tx_sum = np.zeros((n_tx, n_t), dtype=f32)
    tx_cnt = np.zeros((n_tx, n_t), dtype=f32)
    inv_level = np.zeros(n_map)
    sizes = np.diff(np.append(group_start, n_map))
    clean = []  # per chunk: every sample valid (then the masks below are skipped)
    for i0, i1, g0, g1 in chunks:
        m_tx = _indicator(np.repeat(np.arange(g1 - g0), sizes[g0:g1]), g1 - g0, f32)
        v = _rows(voltage, order, identity, i0, i1)
        ok_all = bool(v.size) and bool(v.min() > 0) and bool(np.isfinite(v.max()))
        clean.append(ok_all)
        if ok_all:
            inv = n_t / v.sum(axis=1).astype(np.float64)
            vpu0 = (v * inv.astype(v.dtype)[:, None]).astype(f32, copy=False)
            tx_part = m_tx @ vpu0
            tx_cnt[group_tx[g0:g1]] = sizes[g0:g1, None]
        else:
            valid = (v > 0) & (v < np.inf)
            v0 = np.where(valid, v, 0.0)
            n_ok = valid.sum(axis=1)
            total = v0.sum(axis=1).astype(np.float64)
            inv = np.where(n_ok > 0, n_ok / np.where(n_ok > 0, total, 1.0), 0.0)
            vpu0 = (v0 * inv.astype(v0.dtype)[:, None]).astype(f32, copy=False)
            tx_part = m_tx @ vpu0
            valid_f = valid.astype(f32)
            cnt_part = m_tx @ valid_f
            tx_cnt[group_tx[g0:g1]] = cnt_part
        inv_level[i0:i1] = inv
        tx_sum[group_tx[g0:g1]] = tx_part

    # Per transformer: its mean and the median of the rest of its feeder.
    f_start = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    enough = n_meters >= config.health_min_meters
    step = np.full(n_tx, np.nan)
    split = np.full(n_tx, -1)
    # differenced references: rows 0..n_tx-1 the rest of the transformer's feeder, then the feeder heads
    table = np.empty((n_tx + len(ref_pu), max(n_t - 1, 0)), dtype=f32)
    tx_diff = np.empty((n_tx, max(n_t - 1, 0)), dtype=f32)  # differenced mean v_pu of each transformer
    for k, series in enumerate(ref_pu):
        table[n_tx + k] = np.diff(series)
    with np.errstate(invalid="ignore", divide="ignore"):
        tx_mean = np.where(tx_cnt > 0, tx_sum / np.where(tx_cnt > 0, tx_cnt, f32(1)), f32(np.nan))
    # its neighbourhood: the median of the means of the other transformers of its feeder that follow it most
    # closely (same regulator zone, same lateral; one failing unit cannot drag its neighbours' reference)
    rest_level = _neighbourhood_median(tx_mean, f_start)
    table[:n_tx] = np.diff(rest_level, axis=1)
    tx_diff[:] = np.diff(tx_mean, axis=1)
    e = np.flatnonzero(enough)
    for a in range(0, e.size, _METER_CHUNK):
        rows = e[a : a + _METER_CHUNK]
        offset = tx_mean[rows] - rest_level[rows]
        if tx_load is not None:
            offset = _minus_load_part(offset, tx_load[rows])
        step[rows], split[rows] = _level_step(offset, w)

    # Pass 2: per window of w samples, the correlation of each transformer's mean (differenced v_pu, its
    # meters' noise averaged) with its reference, and of each meter with the mean of its siblings.
    # windows end at the last sample (an ongoing fault is seen in full windows); the first samples that
    # do not fill a window are left out
    n_win = (n_t - 1) // w
    span = n_win * w
    lead = n_t - 1 - span
    tx_of_sorted = np.repeat(group_tx, sizes)
    # a transformer's reference: the feeder head of its meters' phase when they share one, else the rest of
    # its feeder
    ref_tx = np.arange(n_tx)
    if n_map and len(ref_pu):
        lo = np.full(n_tx, np.iinfo(np.int64).max)
        hi = np.full(n_tx, -1)
        np.minimum.at(lo, tx_of_sorted, ref_of_meter)
        np.maximum.at(hi, tx_of_sorted, ref_of_meter)
        shared = (lo == hi) & (hi >= 0)
        ref_tx = np.where(shared, n_tx + hi, ref_tx)
    if n_win:
        r_tx = _window_correlation(tx_diff[:, lead:], table[ref_tx, lead:], w)
    else:
        r_tx = np.zeros((n_tx, 0))
    agree = np.ones((n_tx, n_win), dtype=bool)  # every meter still follows its siblings (a common cause)
    if n_win and n_map:
        for ci, (i0, i1, g0, g1) in enumerate(chunks):
            v = _rows(voltage, order, identity, i0, i1)[:, lead:]
            if not clean[ci]:
                v = np.where((v > 0) & (v < np.inf), v, np.nan)
            vpu = (v * inv_level[i0:i1, None]).astype(f32, copy=False)
            g = tx_of_sorted[i0:i1]
            with np.errstate(invalid="ignore", divide="ignore"):
                own = np.where(np.isfinite(vpu), vpu, f32(0))
                rest_cnt = tx_cnt[g, lead:] - np.isfinite(vpu)
                sib = np.where(rest_cnt > 0, (tx_sum[g, lead:] - own) / rest_cnt, f32(np.nan))
            r_m = _window_correlation(np.diff(vpu, axis=1), np.diff(sib, axis=1), w)
            follows = ~(r_m < config.health_min_correlation)  # NaN (no sibling, no data) does not object
            m_tx = _indicator(np.repeat(np.arange(g1 - g0), sizes[g0:g1]), g1 - g0, np.float64)
            agree[group_tx[g0:g1]] = (m_tx @ (~follows).astype(np.float64)) == 0
    # lost: the unit's mean no longer follows its reference, while its meters still follow each other (a
    # common cause, not one meter): correlation below health_min_correlation, or its Fisher z
    # health_loss_se standard errors and below half the unit's usual, where that is high
    finite = np.isfinite(r_tx)
    n_fin = finite.sum(axis=1)
    usual = np.full(n_tx, np.nan)
    if n_win:
        ranked = np.sort(np.where(finite, r_tx, np.inf), axis=1)  # finite first
        # its best window out of a week or so (a fault may cover most of it), else the upper quartile of its
        # windows (at least the second-best)
        top = np.where(n_fin <= 8, 1, np.maximum(2, np.ceil(0.25 * n_fin).astype(int)))
        rank = np.maximum(n_fin - top, 0)
        usual = np.where(n_fin > 0, ranked[np.arange(n_tx), rank], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        z_drop = np.arctanh(np.clip(usual, -0.999, 0.999))[:, None] - np.arctanh(np.clip(r_tx, -0.999, 0.999))
    ok = enough[:, None] & finite
    z_se = config.health_loss_se / math.sqrt(max(w - 3, 1))
    fell = (usual >= config.health_min_correlation)[:, None] & (z_drop > z_se) & (r_tx < 0.5 * usual[:, None])
    lost = ok & agree & ((r_tx < config.health_min_correlation) | fell)
    if n_win:
        f_ok = np.add.reduceat(ok.astype(np.float64), f_start, axis=0)
        f_lost = np.add.reduceat(lost.astype(np.float64), f_start, axis=0)
    else:
        f_ok = f_lost = np.zeros((f_start.size, 0))
    rest_ok, rest_lost = f_ok[codes] - ok, f_lost[codes] - lost
    with np.errstate(invalid="ignore", divide="ignore"):
        rest_frac = np.where(rest_ok > 0, rest_lost / rest_ok, 0.0)
    win_lost = lost & (rest_frac < 0.5)
    # a fault persists: the longest run of consecutive lost windows (and where it starts) is what counts
    run = np.zeros(n_tx, dtype=int)
    longest = np.zeros(n_tx, dtype=int)
    run_start = np.full(n_tx, -1)
    for j in range(n_win):
        run = np.where(win_lost[:, j], run + 1, 0)
        better = run > longest
        run_start = np.where(better, j - run + 1, run_start)
        longest = np.where(better, run, longest)
    return {
        "voltage_step_pu": np.where(enough, step, np.nan),
        "voltage_step_index": np.where(enough, split, -1),
        "correlation_lost_windows": np.where(enough, longest, 0),
        "correlation_first_lost": np.where(longest > 0, lead + 1 + w * run_start, -1),  # its first sample
    }


def _neighbourhood_median(
    tx_mean: np.ndarray, f_start: np.ndarray, k: int = _NEIGHBOUR_TRANSFORMERS, chunk: int = 32
) -> np.ndarray:
    """Per transformer and sample, the median of the mean v_pu of the ``k`` other transformers of its feeder
    whose differenced mean correlates best with its own (NaN-aware; NaN where there is no other).

    Behind a line regulator, or on a lateral, the neighbourhood is the zone or lateral itself: a regulator's
    tap moves the reference with the unit and is no fault of the unit's.
    """
    n_tx, n_t = tx_mean.shape
    out = np.full(tx_mean.shape, np.nan, dtype=tx_mean.dtype)
    bounds = np.append(f_start, n_tx)
    for f0, f1 in itertools.pairwise(bounds):
        block = tx_mean[f0:f1]
        m = f1 - f0
        if m <= 1:
            continue
        kk = min(k, m - 1)
        d = np.diff(block, axis=1) if n_t > 1 else np.zeros((m, 1), dtype=block.dtype)
        fin = np.isfinite(d)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(fin, d, 0).sum(axis=1, keepdims=True) / np.maximum(fin.sum(axis=1, keepdims=True), 1)
        d = np.where(fin, d - mean, 0)
        norm = np.linalg.norm(d, axis=1, keepdims=True)
        u = d / np.where(norm > 0, norm, 1.0)
        for a in range(0, m, chunk):
            b = min(a + chunk, m)
            c = u[a:b] @ u.T
            c[np.arange(b - a), np.arange(a, b)] = -np.inf  # never itself
            nb = np.argsort(-c, axis=1, kind="stable")[:, :kk]
            s = np.sort(block[nb], axis=1)  # (rows, kk, n_t), NaN last
            nv = np.isfinite(block[nb]).sum(axis=1)
            lo, hi = np.maximum(nv - 1, 0) // 2, np.minimum(nv // 2, kk - 1)
            med = 0.5 * (np.take_along_axis(s, lo[:, None, :], axis=1) + np.take_along_axis(s, hi[:, None, :], axis=1))
            out[f0 + a : f0 + b] = np.where(nv > 0, med[:, 0, :], np.nan)
    return out


def _window_correlation(a: np.ndarray, b: np.ndarray, w: int) -> np.ndarray:
    """Pearson correlation of rows of ``a`` and ``b`` (same shape (n, n_win * w), NaN = missing) in each
    window of ``w`` samples: (n, n_win), NaN where fewer than ``w // 2`` samples of a window are valid in both."""
    n, span = a.shape
    both = np.isfinite(a) & np.isfinite(b)
    a = np.where(both, a, 0).astype(np.float32, copy=False)
    b = np.where(both, b, 0).astype(np.float32, copy=False)
    cnt = both.reshape(-1, w).sum(axis=1).astype(np.float64)
    A, B = a.reshape(-1, w), b.reshape(-1, w)
    sa, sb = A.sum(axis=1, dtype=np.float64), B.sum(axis=1, dtype=np.float64)
    sab = np.einsum("ij,ij->i", A, B).astype(np.float64)
    saa = np.einsum("ij,ij->i", A, A).astype(np.float64)
    sbb = np.einsum("ij,ij->i", B, B).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rc = (cnt * sab - sa * sb) / np.sqrt((cnt * saa - sa * sa) * (cnt * sbb - sb * sb))
    return np.where(cnt >= w // 2, rc, np.nan).reshape(n, span // w if w else 0)


def _minus_load_part(offset: np.ndarray, load: np.ndarray) -> np.ndarray:
    """``offset`` less its least-squares fit on ``load`` (per row; NaN-aware): the level the unit's own load
    explains through its impedance, so that a load switching on or off is not read as a tap step."""
    ok = np.isfinite(offset) & np.isfinite(load)
    n_ok = ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        lm = np.where(ok, load, 0.0).sum(axis=1) / n_ok
        om = np.where(ok, offset, 0.0).sum(axis=1) / n_ok
        dl = np.where(ok, load - lm[:, None], 0.0)
        do = np.where(ok, offset - om[:, None], 0.0)
        slope = (dl * do).sum(axis=1) / (dl * dl).sum(axis=1)
    slope = np.where(np.isfinite(slope), slope, 0.0)
    return offset - (slope[:, None] * np.where(np.isfinite(load), load - np.nan_to_num(lm)[:, None], 0.0)).astype(
        offset.dtype
    )


def _ambient_series(ambient_c: Any, times: np.ndarray, default: float) -> np.ndarray | float:
    if ambient_c is None:
        return float(default)
    if isinstance(ambient_c, (int, float)):
        return float(ambient_c)
    if isinstance(ambient_c, pd.Series):
        s = ambient_c.sort_index()
        s = s[~s.index.duplicated()]
        grid = pd.DatetimeIndex(times)
        out = s.reindex(s.index.union(grid)).interpolate(method="time").reindex(grid)
        return out.bfill().ffill().to_numpy(dtype=np.float64)
    arr = np.asarray(ambient_c, dtype=np.float64)
    if arr.shape != (len(times),):
        raise ValueError(f"ambient_c: expected a scalar, a Series or shape ({len(times)},), got {arr.shape}")
    return arr


def _thermal_parameters(config: ValidationConfig) -> dict[str, float]:
    base = dict(
        thermal.IEC_DISTRIBUTION_ONAN if config.thermal_standard == "iec" else thermal.IEEE_DISTRIBUTION_ONAN
    )
    base.update(
        top_oil_rise_k=config.top_oil_rise_k,
        loss_ratio=config.loss_ratio,
        oil_exponent=config.oil_exponent,
        winding_exponent=config.winding_exponent,
        oil_time_constant_min=config.oil_time_constant_min,
        winding_time_constant_min=config.winding_time_constant_min,
    )
    if config.hot_spot_gradient_k is not None:
        base["hot_spot_gradient_k"] = config.hot_spot_gradient_k
    return base


def _reference_pu(references: Any, times: np.ndarray, feeders: pd.Index) -> dict[tuple[str, str], np.ndarray]:
    """Feeder-head references -> {(feeder_id, phase): voltage / its mean}.

    Accepts the store's layout, a tuple ``(DataFrame[feeder_id, phase], ndarray (n_references, n_time))``
    aligned with ``times``, or the contract's long format ``feeder_id, phase, timestamp, voltage_v``.
    """
    if references is None:
        return {}
    if isinstance(references, tuple):
        meta, values = references
        values = np.asarray(values, dtype=np.float64).reshape(len(meta), -1)
        if values.shape[1] != len(times):
            raise ValueError(f"references: {values.shape[1]} samples per row, expected {len(times)} (times)")
        keys = list(zip(meta["feeder_id"].astype(str), meta["phase"].astype(str)))
        rows = dict(zip(keys, values))
    else:
        if len(references) == 0:
            return {}
        ref = references[references["feeder_id"].astype(str).isin(feeders)]
        wide = ref.pivot_table(
            index=["feeder_id", "phase"], columns="timestamp", values="voltage_v", aggfunc="mean"
        )
        wide = wide.reindex(columns=pd.DatetimeIndex(times))
        rows = {(str(k[0]), str(k[1])): row.to_numpy(dtype=np.float64) for k, row in wide.iterrows()}
    out = {}
    for key, v in rows.items():
        if key[0] not in feeders:
            continue
        ok = np.isfinite(v) & (v > 0)
        out[key] = v / np.mean(v[ok]) if ok.any() else np.full(v.shape, np.nan)
    return out


def validate_transformers(
    kw: np.ndarray,
    kvar: np.ndarray | None,
    voltage: np.ndarray | None,
    meters: pd.DataFrame,
    transformers: pd.DataFrame | None,
    times: Any,
    config: ValidationConfig = _DEFAULT_CONFIG,
    *,
    references: pd.DataFrame | tuple[pd.DataFrame, np.ndarray] | None = None,
    ambient_c: float | np.ndarray | pd.Series | None = None,
) -> pd.DataFrame:
    """Check each transformer of a block of whole feeders against physics and flag what needs an audit.

    Parameters
    ----------
    kw : ndarray, shape (n_meters, n_time)
        Active power of each meter, NaN = missing. [kW]
    kvar : ndarray, shape (n_meters, n_time), optional
        Reactive power, NaN = missing; ``None``: from ``config.default_power_factor``. [kvar]
    voltage : ndarray, shape (n_meters, n_time), optional
        Voltage magnitude (cleaned), NaN = missing; ``None`` skips the health checks. [V]
    meters : DataFrame, n_meters rows aligned with the arrays
        ``meter_id``, ``feeder_id``, ``transformer_id`` (the INFERRED one) and ``phase`` (inferred: ``A``,
        ``B``, ``C``, ``AB``, ``BC``, ``CA``, ``ABC``; anything else is spread over the three phases).
    transformers : DataFrame or None
        ``transformer_id``, ``feeder_id``, ``kva_rating`` [kVA], ``n_phases``. Units with no meter get a
        row with zero load; meters on a unit absent from it (or every unit, when ``None``) get a row
        flagged ``no_rating``.
    times : array of datetime64, shape (n_time,)
        Regular grid, timestamps at the END of each interval (UTC).
    config : ValidationConfig
    references : DataFrame or (DataFrame, ndarray), optional
        Feeder-head voltages [V]: the store's layout ``(DataFrame[feeder_id, phase], ndarray (n_references,
        n_time))`` or the contract's long format (``feeder_id, phase, timestamp, voltage_v``); without it
        the rest of the feeder is the reference of the health checks.
    ambient_c : float, ndarray (n_time,) or Series indexed by time, optional
        Ambient temperature [degC]; ``None``: ``config.ambient_c``.

    Returns
    -------
    DataFrame
        One row per transformer, sorted by ``feeder_id, transformer_id``: ``transformer_id, feeder_id,
        phases`` (phases its meters are on), ``n_phases, n_meters, kva_rating`` [kVA], ``kw_coverage`` [-],
        ``peak_kva, mean_kva`` [kVA], ``mean_kva_a, mean_kva_b, mean_kva_c`` [kVA], ``peak_loading_pu,
        p99_loading_pu, mean_loading_pu`` [pu], ``imbalance`` [-] (3-phase banks), ``max_top_oil_c,
        max_hot_spot_c`` [degC], ``hours_above_normal, hours_above_emergency`` [h], ``f_eqa`` [-],
        ``loss_of_life_h`` [h], ``voltage_step_pu`` [pu], ``voltage_step_time``, ``correlation_lost_windows``,
        ``flag_codes`` (list of :data:`VALIDATION_FLAGS`; not ``flags``, which would hide
        ``DataFrame.flags``), ``flag_reasons`` (list of str, one per flag).

    Notes
    -----
    Transformer load: ``S(t) = sqrt((sum P)^2 + (sum Q)^2)`` over its meters. Per phase, a meter counts in
    full on ``A``/``B``/``C``, half on each phase of ``AB``/``BC``/``CA`` and a third on each of ``ABC``.
    The loading driving the thermal model is ``S / kva_rating`` for single-phase units and the most loaded
    phase ``3 S_p / kva_rating`` for 3-phase banks (the hot spot is in that phase's winding; conservative
    for the top oil). ``imbalance = max_p |mean S_p - mean S| / mean S`` (NEMA definition on the period's
    mean phase loads). Health: see :mod:`phaseid_hpc.validation`; steps are searched with two adjacent
    windows of ``health_window`` samples of ``mean(v_pu of its meters) - mean(v_pu of the rest of the
    feeder)``, ``v_pu`` being each meter's voltage over its own mean.
    """
    kw = np.asarray(kw)
    n_m, n_t = kw.shape
    times = np.asarray(times, dtype="datetime64[ns]")
    if len(meters) != n_m or times.shape != (n_t,):
        raise ValueError(
            f"validate_transformers: kw is {kw.shape}, meters has {len(meters)} rows and times "
            f"{times.shape}; expected (n_meters, n_time), n_meters rows and (n_time,)"
        )
    interval_min = (
        float(np.median(np.diff(times)).astype("timedelta64[s]").astype(float)) / 60 if n_t > 1 else 15.0
    )

    # Transformer index: the table plus any unit the mapping names that the table lacks.
    if transformers is None:
        transformers = pd.DataFrame(columns=["transformer_id", "feeder_id", "kva_rating", "n_phases"])
    tx_table = transformers.copy()
    tx_table["transformer_id"] = tx_table["transformer_id"].astype(str)
    mapped = meters["transformer_id"].notna().to_numpy()
    meter_tx = meters["transformer_id"].astype(str).where(mapped, None)
    table_ids = pd.Index(tx_table["transformer_id"])
    if table_ids.is_unique:
        unknown = mapped & (table_ids.get_indexer(meter_tx) < 0)
    else:
        unknown = mapped & ~meter_tx.isin(table_ids).to_numpy()
    extra = meters.loc[unknown, ["transformer_id", "feeder_id"]].astype(str).drop_duplicates("transformer_id")
    tx = pd.concat([tx_table, extra], ignore_index=True)
    tx["feeder_id"] = tx["feeder_id"].astype(str)
    tx = tx.sort_values(["feeder_id", "transformer_id"], kind="stable").reset_index(drop=True)
    n_tx = len(tx)
    tx_pos = pd.Index(tx["transformer_id"])
    tx_of_meter = np.where(mapped, tx_pos.get_indexer(meter_tx.fillna("")), -1)

    # Mapped meters sorted by transformer (already so, up to the inferred mapping, in a store block): every
    # per-meter pass below reads them in chunks of whole transformers and aggregates with reduceat.
    key = np.where(tx_of_meter >= 0, tx_of_meter, n_tx)
    n_map = int((tx_of_meter >= 0).sum())
    order = np.argsort(key, kind="stable")[:n_map]
    identity = bool(np.array_equal(order, np.arange(n_map)))
    tx_sorted = key[order]
    n_meters = np.bincount(tx_sorted, minlength=n_tx)[:n_tx]
    group_tx = np.flatnonzero(n_meters)
    group_start = (np.cumsum(n_meters) - n_meters)[group_tx]
    chunks = _chunks(group_start, n_map, _METER_CHUNK)

    # Phase weights per meter and the (transformer, phase) pairs that carry load: row 3 * transformer + phase.
    codes, names = pd.factorize(meters["phase"])  # missing: code -1, the last (unknown) row of the table
    lut = np.array([_PHASE_WEIGHTS.get(str(ph), _UNKNOWN_PHASE) for ph in names] + [_UNKNOWN_PHASE])
    weights = lut[codes][order] if n_map else np.zeros((0, 3))  # aligned with the sorted mapped meters
    m_idx, ph_idx = np.nonzero(weights > 0)
    pair_code_all = 3 * tx_sorted[m_idx] + ph_idx
    pair_codes, pair_row = np.unique(pair_code_all, return_inverse=True)
    n_pairs = pair_codes.size
    pair_tx, pair_ph = pair_codes // 3, pair_codes % 3

    # Power per meter, gaps filled; kvar from the power factor where missing; summed per pair, per chunk.
    work = np.float32 if kw.dtype == np.float32 else np.float64
    tan_phi = math.tan(math.acos(config.default_power_factor))
    W = sparse.csr_array((weights[m_idx, ph_idx].astype(work), (pair_row, m_idx)), shape=(n_pairs, n_map))
    p_pair = np.zeros((n_pairs, n_t), dtype=work)
    q_pair = None if kvar is None else np.zeros((n_pairs, n_t), dtype=work)
    kw_real = np.zeros(n_map)
    for i0, i1, g0, g1 in chunks:
        p0, p1 = np.searchsorted(pair_codes, [3 * group_tx[g0], 3 * (group_tx[g1 - 1] + 1)])
        Wc = W[p0:p1][:, i0:i1]
        p, kw_real[i0:i1] = _fill_time_gaps(_rows(kw, order, identity, i0, i1).astype(work, copy=False))
        p_pair[p0:p1] = Wc @ p
        if q_pair is not None:
            kv = _rows(np.asarray(kvar), order, identity, i0, i1).astype(work, copy=False)
            has_q = np.isfinite(kv).any(axis=1)
            q, _ = _fill_time_gaps(kv)
            q_pair[p0:p1] = Wc @ np.where(has_q[:, None], q, p * work(tan_phi))
    # Active power of each transformer [kW] (the health checks remove the voltage its own load explains).
    tx_kw = _indicator(pair_tx, n_tx, work) @ p_pair if voltage is not None and n_pairs else None
    # Units with several loaded pairs (3-phase banks, 2-phase meters): their total P (and Q) before |.|.
    n_pairs_tx = np.bincount(pair_tx, minlength=n_tx)[:n_tx]
    multi = np.flatnonzero(n_pairs_tx > 1)
    sub = np.flatnonzero(n_pairs_tx[pair_tx] > 1)
    local = np.cumsum(n_pairs_tx[multi]) - n_pairs_tx[multi]
    if multi.size and n_t:
        p_sum = np.add.reduceat(p_pair[sub], local, axis=0)
        q_sum = p_sum * work(tan_phi) if q_pair is None else np.add.reduceat(q_pair[sub], local, axis=0)
    if q_pair is None:  # Q = P tan(phi) on every meter: S = |P| / cos(phi), in place
        s_pair = np.abs(p_pair, out=p_pair)
        s_pair *= work(math.hypot(1.0, tan_phi))
    else:
        s_pair = np.hypot(p_pair, q_pair)

    with np.errstate(invalid="ignore", divide="ignore"):
        kw_coverage = np.bincount(tx_sorted, weights=kw_real, minlength=n_tx)[:n_tx] / (n_meters * n_t)
    phases_on = np.zeros((n_tx, 3), dtype=bool)
    phases_on[pair_tx, pair_ph] = True
    mean_ph = np.zeros((n_tx, 3))
    pair_mean = s_pair.mean(axis=1, dtype=np.float64) if n_t else np.zeros(n_pairs)
    pair_max = s_pair.max(axis=1).astype(np.float64) if n_t and n_pairs else np.zeros(n_pairs)
    mean_ph[pair_tx, pair_ph] = pair_mean

    rating = pd.to_numeric(tx.get("kva_rating"), errors="coerce").to_numpy(dtype=np.float64)
    rating = np.where(rating > 0, rating, np.nan)
    n_ph = pd.to_numeric(tx.get("n_phases"), errors="coerce").to_numpy(dtype=np.float64)
    three = np.where(np.isfinite(n_ph), n_ph == 3, phases_on.sum(axis=1) >= 2) if n_tx else np.zeros(0, bool)

    # Transformer load S = |sum P + j sum Q|; loading = S / rating (1-phase) or 3 max_p S_p / rating (bank).
    pair_first = np.searchsorted(pair_tx, np.arange(n_tx))
    peak_kva = np.zeros(n_tx)
    mean_kva = np.zeros(n_tx)
    scale = np.where(three, 3.0, 1.0) / rating
    one = np.flatnonzero(n_pairs_tx == 1)  # one pair: S is that pair's S_p
    peak_kva[one], mean_kva[one] = pair_max[pair_first[one]], pair_mean[pair_first[one]]
    if one.size == n_tx:  # every unit has one loaded pair (single-phase feeders): scale S in place
        loading = s_pair
        loading *= scale.astype(work)[:, None]
    else:
        loading = np.zeros((n_tx, n_t), dtype=work)
        loading[one] = s_pair[pair_first[one]] * scale[one, None].astype(work)
    if multi.size and n_t:
        s_tot = np.hypot(p_sum, q_sum)
        peak_kva[multi], mean_kva[multi] = s_tot.max(axis=1), s_tot.mean(axis=1, dtype=np.float64)
        s_max = np.maximum.reduceat(s_pair[sub], local, axis=0)
        loading[multi] = np.where(three[multi, None], s_max, s_tot) * scale[multi, None].astype(work)
    loading[np.isnan(rating)] = np.nan

    with np.errstate(invalid="ignore", divide="ignore"):
        mbar = mean_ph.mean(axis=1)
        imbalance = np.where(three & (mbar > 0), np.abs(mean_ph - mbar[:, None]).max(axis=1) / mbar, np.nan)
    mean_loading = loading.mean(axis=1, dtype=np.float64) if n_t else np.full(n_tx, np.nan)

    ambient = _ambient_series(ambient_c, times, config.ambient_c)
    th = _thermal_summary(loading, np.isfinite(mean_loading), ambient, interval_min, config)

    if voltage is not None and n_map:
        ref_pu = _reference_pu(references, times, pd.Index(tx["feeder_id"].unique()))
        ref_of_meter = np.full(n_map, -1)
        if ref_pu:
            sel = meters.iloc[order] if not identity else meters.iloc[:n_map]
            wanted = pd.MultiIndex.from_arrays([sel["feeder_id"].astype(str), sel["phase"].astype(str)])
            ref_of_meter = pd.MultiIndex.from_tuples(list(ref_pu)).get_indexer(wanted)
        hl = _health(
            np.asarray(voltage),
            order,
            identity,
            group_start,
            group_tx,
            n_meters,
            tx["feeder_id"].to_numpy(),
            ref_of_meter,
            list(ref_pu.values()),
            config,
            tx_load=tx_kw,
        )
    else:
        hl = {
            "voltage_step_pu": np.full(n_tx, np.nan),
            "voltage_step_index": np.full(n_tx, -1),
            "correlation_lost_windows": np.zeros(n_tx, dtype=int),
            "correlation_first_lost": np.full(n_tx, -1),
        }

    step_idx = hl["voltage_step_index"]
    step_time = np.where(
        step_idx >= 0,
        times[np.clip(step_idx, 0, max(n_t - 1, 0))] if n_t else np.datetime64("NaT"),
        np.datetime64("NaT"),
    ).astype("datetime64[ns]")
    out = pd.DataFrame(
        {
            "transformer_id": tx["transformer_id"].to_numpy(),
            "feeder_id": tx["feeder_id"].to_numpy(),
            "phases": _PHASES_ON_NAMES[phases_on @ np.array([1, 2, 4])] if n_tx else [],
            "n_phases": np.where(three, 3, 1),
            "n_meters": n_meters,
            "kva_rating": rating,
            "kw_coverage": kw_coverage,
            "peak_kva": peak_kva if n_t else np.nan,
            "mean_kva": mean_kva if n_t else np.nan,
            "mean_kva_a": mean_ph[:, 0],
            "mean_kva_b": mean_ph[:, 1],
            "mean_kva_c": mean_ph[:, 2],
            "peak_loading_pu": loading.max(axis=1).astype(np.float64) if n_t else np.nan,
            "p99_loading_pu": _row_quantile(loading, 0.99, np.isnan(mean_loading)) if n_t else np.nan,
            "mean_loading_pu": mean_loading,
            "imbalance": imbalance,
            **{
                k: th[k]
                for k in (
                    "max_top_oil_c",
                    "max_hot_spot_c",
                    "hours_above_normal",
                    "hours_above_emergency",
                    "f_eqa",
                    "loss_of_life_h",
                )
            },
            "voltage_step_pu": hl["voltage_step_pu"],
            "voltage_step_time": pd.DatetimeIndex(step_time),
            "correlation_lost_windows": hl["correlation_lost_windows"].astype(int),
        }
    )
    out["flag_codes"], out["flag_reasons"] = _flags(out, hl["correlation_first_lost"], times, config)
    return out


def _flags(
    out: pd.DataFrame, first_lost: np.ndarray, times: np.ndarray, config: ValidationConfig
) -> tuple[list[list[str]], list[list[str]]]:
    """Flags and their reasons per row; masks are vectorised, strings are built for flagged rows only."""
    n = len(out)
    n_t = times.size
    col = {c: out[c].to_numpy() for c in out.columns if c not in ("voltage_step_time",)}
    step_time = out["voltage_step_time"]
    hot = col["max_hot_spot_c"]
    with np.errstate(invalid="ignore"):
        masks = {
            "no_rating": ~np.isfinite(col["kva_rating"].astype(float)),
            "no_load_data": (col["n_meters"] > 0) & ~(col["kw_coverage"] > 0),
            "overload": hot > config.hot_spot_normal_c,
            "emergency_overload": hot > config.hot_spot_emergency_c,
            "mapping_contradicts_rating": (col["p99_loading_pu"] > config.max_plausible_loading_pu)
            | (col["mean_loading_pu"] > config.max_plausible_mean_loading_pu),
            "high_imbalance": col["imbalance"] > config.max_imbalance,
            "voltage_level_step": col["voltage_step_pu"] > config.tap_fault_steps * config.tap_step_pu,
            "correlation_loss": col["correlation_lost_windows"] >= max(config.health_min_lost_windows, 1),
        }
    flags: list[list[str]] = [[] for _ in range(n)]
    reasons: list[list[str]] = [[] for _ in range(n)]
    any_flag = np.zeros(n, dtype=bool)
    for m in masks.values():
        any_flag |= m
    for i in np.flatnonzero(any_flag):  # flagged units only (a handful per block)
        f, why = flags[i], reasons[i]
        if masks["no_rating"][i]:
            f.append("no_rating")
            why.append("no usable kva_rating: loading and thermal model not computed")
        if masks["no_load_data"][i]:
            f.append("no_load_data")
            why.append("none of its meters has a kW sample")
        if masks["overload"][i]:
            f.append("overload")
            why.append(
                f"hot spot {hot[i]:.1f} degC above the normal-cyclic limit "
                f"{config.hot_spot_normal_c:g} degC for {col['hours_above_normal'][i]:.2f} h "
                f"(peak loading {col['peak_loading_pu'][i]:.2f} pu)"
            )
        if masks["emergency_overload"][i]:
            f.append("emergency_overload")
            why.append(
                f"hot spot {hot[i]:.1f} degC above the emergency limit "
                f"{config.hot_spot_emergency_c:g} degC for {col['hours_above_emergency'][i]:.2f} h"
            )
        if masks["mapping_contradicts_rating"][i]:
            f.append("mapping_contradicts_rating")
            why.append(
                f"the inferred mapping puts {col['n_meters'][i]} meters with mean {col['mean_kva'][i]:.1f} kVA "
                f"(99th percentile {col['p99_loading_pu'][i]:.2f} pu, mean {col['mean_loading_pu'][i]:.2f} pu) on a "
                f"{col['kva_rating'][i]:g} kVA unit: impossible, send to manual audit"
            )
        if masks["high_imbalance"][i]:
            f.append("high_imbalance")
            why.append(
                f"phase imbalance {col['imbalance'][i]:.2f} above {config.max_imbalance:g} (mean kVA A/B/C "
                f"{col['mean_kva_a'][i]:.1f}/{col['mean_kva_b'][i]:.1f}/{col['mean_kva_c'][i]:.1f})"
            )
        if masks["voltage_level_step"][i]:
            f.append("voltage_level_step")
            why.append(
                f"common voltage level of its meters steps by {100 * col['voltage_step_pu'][i]:.2f}% "
                f"(> {config.tap_fault_steps:g} tap steps of {100 * config.tap_step_pu:g}%) at "
                f"{step_time.iloc[i]}: check tap position and windings"
            )
        if masks["correlation_loss"][i]:
            first = first_lost[i]
            why_t = times[min(first, n_t - 1)] if first >= 0 else None
            f.append("correlation_loss")
            why.append(
                f"its meters lost correlation with the feeder reference together, still following each other, "
                f"in {col['correlation_lost_windows'][i]} consecutive window(s) from {why_t}: check windings "
                "and connections"
            )
    return flags, reasons


def feeder_phase_imbalance(table: pd.DataFrame) -> pd.DataFrame:
    """Phase imbalance per feeder from the transformer table of :func:`validate_transformers`.

    Parameters
    ----------
    table : DataFrame
        With ``feeder_id, mean_kva_a, mean_kva_b, mean_kva_c`` [kVA].

    Returns
    -------
    DataFrame
        One row per feeder (sorted): ``feeder_id, mean_kva_a, mean_kva_b, mean_kva_c`` [kVA] and
        ``imbalance = max_p |S_p - mean S| / mean S`` [-] (NaN for a feeder without load).
    """
    cols = ["mean_kva_a", "mean_kva_b", "mean_kva_c"]
    g = table.groupby("feeder_id", sort=True)[cols].sum().reset_index()
    s = g[cols].to_numpy(dtype=np.float64)
    m = s.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        g["imbalance"] = np.where(m > 0, np.abs(s - m[:, None]).max(axis=1) / m, np.nan)
    return g


def summarize_validation(table: pd.DataFrame) -> dict[str, Any]:
    """Counts for ``summary.json``: transformers checked and how many carry each flag."""
    counts = {flag: 0 for flag in VALIDATION_FLAGS}
    for fl in table["flag_codes"]:
        for f in fl:
            counts[f] = counts.get(f, 0) + 1
    return {
        "transformers": len(table),
        "flagged": int(sum(1 for fl in table["flag_codes"] if fl)),
        "flags": counts,
        "max_hot_spot_c": float(np.nanmax(table["max_hot_spot_c"]))
        if table["max_hot_spot_c"].notna().any()
        else None,
    }
