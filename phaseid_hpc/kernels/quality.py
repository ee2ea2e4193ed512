"""Per-meter data-quality kernels: units, plausibility, flat lines, gap filling, clock offsets.

Pure functions of ``(n_meters, n_time)`` arrays. The array namespace is taken from the inputs
(NumPy, CuPy or any array-API namespace such as array-api-strict); nothing here imports pandas,
xarray or CuPy. Every function is vectorised over meters; the only Python loops run over a few
lags, gap lengths or feeders.

The labelled entry point is :func:`phaseid_hpc.quality.assess_quality`; :func:`quality_block` is what it
calls for a block of whole feeders.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .._compat import array_namespace, to_numpy

__all__ = [
    "STANDARD_BASES_V",
    "UNITS_DOUBLE_BASE",
    "UNITS_HALF_BASE",
    "UNITS_KV",
    "UNITS_LINE_TO_LINE",
    "UNITS_LINE_TO_NEUTRAL",
    "UNITS_NAMES",
    "UNITS_OK",
    "UNITS_UNKNOWN",
    "QualityArrays",
    "clock_offset_flag",
    "detect_kilovolts",
    "detect_units",
    "estimate_clock_offsets",
    "fill_short_gaps",
    "flat_run_mask",
    "nanmedian",
    "quality_block",
    "sampling_consistency",
    "shift_rows",
]

#: Unit findings of :func:`detect_units` (integer codes, one per meter).
UNITS_OK = 0  #: readings agree with the nominal voltage
UNITS_KV = 1  #: readings are in kV; rescaled by 1000
UNITS_LINE_TO_LINE = 2  #: readings ~sqrt(3) above a line-to-neutral nominal (line-to-line values)
UNITS_LINE_TO_NEUTRAL = 3  #: readings ~sqrt(3) below a line-to-line nominal (line-to-neutral values)
UNITS_DOUBLE_BASE = 4  #: readings ~2x the nominal (240 V on a 120 V base)
UNITS_HALF_BASE = 5  #: readings ~0.5x the nominal (120 V on a 240 V base)
UNITS_UNKNOWN = 6  #: no plausible base found
UNITS_NAMES: tuple[str, ...] = (
    "V",
    "kV",
    "line-to-line",
    "line-to-neutral",
    "double-base",
    "half-base",
    "unknown",
)

#: Service voltages tried when a meter's nominal voltage is unknown [V].
STANDARD_BASES_V: tuple[float, ...] = (120.0, 208.0, 240.0, 277.0, 480.0)

_SQRT3 = math.sqrt(3.0)


# ---------------------------------------------------------------------------------------------------------
# small array-API helpers


def _shift(x: Any, k: int, fill: Any, xp: Any) -> Any:
    """``y[:, n] = x[:, n - k]`` along the last axis (a delay by ``k`` samples), ``fill`` outside."""
    n = x.shape[-1]
    if k == 0:
        return x
    if abs(k) >= n:
        return xp.full(x.shape, fill, dtype=x.dtype)
    pad = xp.full((*x.shape[:-1], abs(k)), fill, dtype=x.dtype)
    if k > 0:
        return xp.concat([pad, x[..., : n - k]], axis=-1)
    return xp.concat([x[..., -k:], pad], axis=-1)


def _host(x: Any) -> np.ndarray:
    """A small array (group labels, per-meter flags) on the host as NumPy."""
    return to_numpy(x)


def _count(mask: Any, axis: int) -> Any:
    """Number of True along ``axis`` as int64 (without materialising an integer copy of the mask)."""
    xp = array_namespace(mask)
    return xp.astype(xp.count_nonzero(mask, axis=axis), xp.int64)


#: Most order positions :func:`nanmedian` selects with ``np.partition`` before it sorts instead.
_MAX_PARTITION_KTH = 32


def nanmedian(x: Any, axis: int = -1) -> Any:
    """Median along ``axis`` ignoring NaN; NaN where a slice has no finite value.

    Parameters
    ----------
    x : array, shape (..., n)
        Values; NaN or +-inf are ignored.
    axis : int
        Axis to reduce.

    Returns
    -------
    array
        The median, shape of ``x`` without ``axis``.
    """
    xp = array_namespace(x)
    if isinstance(x, np.ndarray) and x.size and x.shape[axis] and bool(np.isfinite(x).all()):
        # NumPy, nothing to ignore (the usual case): NumPy's own median takes the same two middle
        # elements and their mean, with one selection along the axis instead of a masked copy and two
        return np.median(x, axis=axis)
    x = xp.moveaxis(x, axis, -1)
    ok = xp.isfinite(x)
    filled = xp.where(ok, x, xp.asarray(xp.inf, dtype=x.dtype))
    n = _count(ok, -1)
    lo = xp.clip((n - 1) // 2, 0, None)
    hi = xp.clip(n // 2, 0, None)
    kth = range(int(xp.min(lo)), int(xp.max(hi)) + 1) if n.size else range(0)
    if isinstance(filled, np.ndarray) and 0 < len(kth) <= _MAX_PARTITION_KTH:
        # NumPy: only the positions the medians can take need to be in order (a selection, not a sort);
        # the same elements, so the same result
        s = np.partition(filled, kth, axis=-1)
    else:
        s = xp.sort(filled, axis=-1)
    a = xp.take_along_axis(s, lo[..., None], axis=-1)[..., 0]
    b = xp.take_along_axis(s, hi[..., None], axis=-1)[..., 0]
    med = (a + b) / 2
    return xp.where(n > 0, med, xp.asarray(xp.nan, dtype=x.dtype))


# ---------------------------------------------------------------------------------------------------------
# units and nominal voltage


def _in_band(pu: Any, min_pu: float, max_pu: float) -> Any:
    """``min_pu <= pu <= max_pu`` (False for NaN)."""
    xp = array_namespace(pu)
    return xp.isfinite(pu) & (pu >= min_pu) & (pu <= max_pu)


def _known_nominal(nominal_v: Any) -> tuple[Any, Any]:
    """``(known, nominal)``: a zero, negative or NaN nominal is unknown (NaN in ``nominal``)."""
    xp = array_namespace(nominal_v)
    known = xp.isfinite(nominal_v) & (nominal_v > 0)
    return known, xp.where(known, nominal_v, xp.full_like(nominal_v, xp.nan))


def _nearest_standard_base(median_v: Any, *, min_pu: float, max_pu: float) -> tuple[Any, Any]:
    """The standard base nearest (in ``|log pu|``) to each median, in V or in kV, among those in band.

    Returns ``(base_v, scale)``: the base [V] (NaN where none is in band) and 1 or 1000 (the median read
    as kV). Ties go to the first of :data:`STANDARD_BASES_V`, V before kV.
    """
    xp = array_namespace(median_v)
    dt = median_v.dtype
    one = xp.ones_like(median_v)
    err_best = xp.full_like(median_v, xp.inf)
    base = xp.full_like(median_v, xp.nan)
    scale = one
    for s in (1.0, 1000.0):
        for b in STANDARD_BASES_V:
            pu = s * median_v / b
            ok = _in_band(pu, min_pu, max_pu)
            err = xp.abs(xp.log(xp.where(ok, pu, one)))
            better = ok & (err < err_best)
            err_best = xp.where(better, err, err_best)
            base = xp.where(better, xp.asarray(b, dtype=dt), base)
            scale = xp.where(better, xp.asarray(s, dtype=dt), scale)
    return base, scale


def detect_kilovolts(median_v: Any, nominal_v: Any, *, min_pu: float, max_pu: float) -> Any:
    """Meters whose readings are in kV (1000x too small): the one kV rule of the package.

    Parameters
    ----------
    median_v : array, shape (n_meters,)
        Median of each meter's readings, NaN if none. [V as reported]
    nominal_v : array, shape (n_meters,)
        Nominal voltage, NaN (or <= 0) where unknown. [V]
    min_pu, max_pu : float
        Plausible band (``QualityConfig.min_pu``, ``max_pu``). [pu]

    Returns
    -------
    array of bool, shape (n_meters,)
        Known nominal ``N``: ``median / N`` is outside the band and ``1000 median / N`` inside it.
        Unknown nominal: no standard base (:data:`STANDARD_BASES_V`) holds the median in band, and one
        holds ``1000 median``. False without readings.

    Examples
    --------
    >>> import numpy as np
    >>> detect_kilovolts(np.array([0.241, 241.0, 0.12, 0.5]), np.array([240.0, 240.0, np.nan, 240.0]),
    ...                  min_pu=0.8, max_pu=1.1).tolist()
    [True, False, True, False]
    """
    xp = array_namespace(median_v, nominal_v)
    known, nom = _known_nominal(nominal_v)
    kv_known = ~_in_band(median_v / nom, min_pu, max_pu) & _in_band(1000.0 * median_v / nom, min_pu, max_pu)
    _, inf_scale = _nearest_standard_base(median_v, min_pu=min_pu, max_pu=max_pu)
    has = xp.isfinite(median_v) & (median_v > 0)
    return has & xp.where(known, kv_known, inf_scale > 1.0)


def detect_units(median_v: Any, nominal_v: Any, *, min_pu: float, max_pu: float) -> tuple[Any, Any, Any, Any]:
    """Find each meter's unit scale and the voltage base its readings are consistent with.

    Parameters
    ----------
    median_v : array, shape (n_meters,)
        Median of each meter's readings, NaN if none. [V as reported]
    nominal_v : array, shape (n_meters,)
        Nominal voltage from the GIS, NaN where unknown. [V]
    min_pu, max_pu : float
        Plausible band. [pu]

    Returns
    -------
    scale : array, shape (n_meters,)
        Factor applied to the readings (1000 for kV, else 1). [-]
    base_v : array, shape (n_meters,)
        Voltage base the (scaled) readings are judged against; NaN where none fits. [V]
    code : array of int, shape (n_meters,)
        One of the ``UNITS_*`` codes.
    inferred : array of bool, shape (n_meters,)
        True where ``nominal_v`` was unknown and the base was inferred from the median.

    Notes
    -----
    kV readings are those of :func:`detect_kilovolts` (the only case rescaled, since it is unambiguous).
    With a known nominal ``N`` and median ``m``: ``m/N`` in band -> OK; kV; otherwise, among the bases
    ``sqrt(3) N``, ``N/sqrt(3)``, ``2N`` and ``N/2`` whose band holds ``m``, the one closest to 1 pu in log
    terms is taken (line-to-line / line-to-neutral / 120-vs-240 base confusions). The readings are then kept
    as they are and judged against that base, because the per-unit series (all that identification uses) is
    the same either way. With unknown ``N`` the nearest of :data:`STANDARD_BASES_V` (and the same bases for
    ``1000 m``, i.e. kV) is taken when it lies in band.
    """
    xp = array_namespace(median_v, nominal_v)
    m = median_v
    known, nom = _known_nominal(nominal_v)
    has = xp.isfinite(m) & (m > 0)
    one = xp.ones_like(m)
    nan = xp.full_like(m, xp.nan)
    kv = detect_kilovolts(m, nominal_v, min_pu=min_pu, max_pu=max_pu)

    # known nominal: V, kV, else the nearest of the confused bases
    ok1 = _in_band(m / nom, min_pu, max_pu)
    best_err = xp.full_like(m, xp.inf)
    best_code = xp.full(m.shape, UNITS_UNKNOWN, dtype=xp.int64)
    best_base = nan
    for c, f in (
        (UNITS_LINE_TO_LINE, _SQRT3),
        (UNITS_LINE_TO_NEUTRAL, 1.0 / _SQRT3),
        (UNITS_DOUBLE_BASE, 2.0),
        (UNITS_HALF_BASE, 0.5),
    ):
        pu = m / (nom * f)
        in_band = _in_band(pu, min_pu, max_pu)
        err = xp.abs(xp.log(xp.where(in_band, pu, one)))
        better = in_band & (err < best_err)
        best_err = xp.where(better, err, best_err)
        best_code = xp.where(better, c, best_code)
        best_base = xp.where(better, nom * f, best_base)
    other = ~ok1 & ~kv
    kv_or_ok = xp.where(kv, xp.asarray(UNITS_KV, dtype=xp.int64), xp.asarray(UNITS_OK, dtype=xp.int64))
    code = xp.where(other, best_code, kv_or_ok)
    base = xp.where(other, best_base, nom)

    # unknown nominal: nearest standard base, in V or in kV
    inf_base, _ = _nearest_standard_base(m, min_pu=min_pu, max_pu=max_pu)
    inf_code = xp.where(xp.isfinite(inf_base), kv_or_ok, UNITS_UNKNOWN)
    scale = xp.where(kv, 1000.0 * one, one)
    base = xp.where(known, base, inf_base)
    code = xp.where(known, code, inf_code)
    # no readings: nothing to say
    code = xp.where(has, code, UNITS_OK)
    base = xp.where(has | known, base, nan)
    inferred = ~known & has & xp.isfinite(base)
    return scale, base, code, inferred


# ---------------------------------------------------------------------------------------------------------
# flat lines


def _window_reduce(a: Any, width: int, op: Any) -> Any:
    """``out[..., j] = op-reduce(a[..., j : j + width])`` for ``j = 0 .. n - width`` (boolean and / or).

    Built by doubling (``log2(width)`` elementwise ops on shifted views), not a cumulative sum.
    """
    n = a.shape[-1]
    L = n - width + 1
    out = None
    pos = 0  # out[j] reduces a[j : j + pos]
    p, w = a, 1  # p[j] reduces a[j : j + w]
    r = int(width)
    while True:
        if r & 1:
            part = p[..., pos : pos + L]
            out = part if out is None else op(out, part)
            pos += w
        r >>= 1
        if not r:
            return out
        p = op(p[..., : p.shape[-1] - w], p[..., w:])
        w *= 2


def flat_run_mask(voltage: Any, max_flat_run: int, *, ok: Any | None = None) -> tuple[Any, Any]:
    """Samples inside runs of identical consecutive readings longer than ``max_flat_run``.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Readings, NaN = missing (a NaN breaks a run). [V]
    max_flat_run : int
        Longest allowed run of identical readings; ``<= 0`` disables the run check. [samples]
    ok : array of bool, shape (n_meters, n_time), optional
        ``~isnan(voltage)`` when the caller has it already.

    Returns
    -------
    mask : array of bool, shape (n_meters, n_time)
        True for samples in a run of more than ``max_flat_run`` identical readings.
    constant : array of bool, shape (n_meters,)
        True where a meter has at least two readings and all of them are equal (zero variance).

    Notes
    -----
    ``eq[n] = v[n] == v[n-1]``; a run of more than ``R`` samples holds ``R`` consecutive true ``eq``
    (a sliding AND of width ``R``); the samples such windows cover are marked with a sliding OR of
    width ``R + 1``. Both are built by doubling; on NumPy only the rows with such a window are marked.
    """
    xp = array_namespace(voltage)
    n_m, n_t = voltage.shape
    is_np = isinstance(voltage, np.ndarray)
    if ok is None:
        ok = ~xp.isnan(voltage)
    n_ok = _count(ok, 1)
    if is_np:  # fmin/fmax skip NaN; an all-NaN row gives NaN (and n_ok < 2)
        with np.errstate(invalid="ignore"):
            vmin = np.fmin.reduce(voltage, axis=1) if n_t else np.full(n_m, np.nan)
            vmax = np.fmax.reduce(voltage, axis=1) if n_t else np.full(n_m, np.nan)
    else:
        big = xp.asarray(xp.inf, dtype=voltage.dtype)
        vmin = xp.min(xp.where(ok, voltage, big), axis=1)
        vmax = xp.max(xp.where(ok, voltage, -big), axis=1)
    constant = (n_ok >= 2) & (vmin == vmax)
    R = int(max_flat_run)
    if R <= 0 or n_t <= R:
        return xp.zeros(voltage.shape, dtype=xp.bool), constant
    eq = voltage[:, 1:] == voltage[:, :-1]  # eq[:, n - 1]: v[n] == v[n-1]
    n_eq = _count(eq, 1)
    cand = n_eq >= R
    if not bool(xp.any(cand)):  # no row has R equal pairs at all
        return xp.zeros(voltage.shape, dtype=xp.bool), constant
    rows = None
    if is_np and not bool(np.all(cand)):
        rows = np.flatnonzero(cand)
        eq = eq[rows]
    # full[:, j]: eq[:, j : j + R] all true, i.e. samples j .. j + R identical (j = 0 .. n_t - 1 - R)
    full = _window_reduce(eq, R, xp.logical_and)
    if not bool(xp.any(full)):
        return xp.zeros(voltage.shape, dtype=xp.bool), constant
    if is_np:
        has = np.any(full, axis=1)
        if not bool(np.all(has)):
            sel = np.flatnonzero(has)
            full = full[sel]
            rows = sel if rows is None else rows[sel]
    m = full.shape[0]
    # sample k is marked iff a full window starts at j with j <= k <= j + R: OR of full[k - R .. k]
    fp = xp.concat([xp.zeros((m, R), dtype=xp.bool), full, xp.zeros((m, R), dtype=xp.bool)], axis=1)
    sub = _window_reduce(fp, R + 1, xp.logical_or)  # (m, n_t)
    if rows is None:
        return sub, constant
    mask = np.zeros(voltage.shape, dtype=bool)
    mask[rows] = sub
    return mask, constant


# ---------------------------------------------------------------------------------------------------------
# gaps


def fill_short_gaps(voltage: Any, max_gap: int) -> tuple[Any, Any, Any, Any]:
    """Linearly interpolate interior gaps of at most ``max_gap`` missing samples.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Readings, NaN = missing. [V]
    max_gap : int
        Longest gap filled. [samples]

    Returns
    -------
    filled : array, shape (n_meters, n_time)
        Readings with short interior gaps interpolated; longer gaps and gaps at either end stay NaN. [V]
    n_filled : array of int, shape (n_meters,)
        Samples filled.
    n_gaps_filled : array of int, shape (n_meters,)
        Gaps filled.
    n_long_gaps : array of int, shape (n_meters,)
        Runs of more than ``max_gap`` missing samples (anywhere, ends included).

    Notes
    -----
    A missing sample with nearest valid neighbours ``dp`` samples before and ``dn`` after lies in a gap of
    ``dp + dn - 1`` samples; it is filled with ``v[n-dp] + (v[n+dn] - v[n-dp]) dp / (dp + dn)`` when that
    length is at most ``max_gap``. ``dp`` and ``dn`` are found with ``max_gap`` shifted comparisons.
    """
    xp = array_namespace(voltage)
    n_m, n_t = voltage.shape
    miss = xp.isnan(voltage)
    G = int(max_gap)
    zeros_i = xp.zeros((n_m,), dtype=xp.int64)
    flat = xp.reshape(voltage, (-1,))
    flat_miss = xp.reshape(miss, (-1,))
    idx = xp.nonzero(flat_miss)[0]  # only the missing samples are looked at
    if idx.shape[0] == 0:
        return voltage, zeros_i, zeros_i, zeros_i
    col = idx % n_t
    size = n_m * n_t

    def valid_at(k: int) -> tuple[Any, Any]:
        """(inside the row and not missing, value) at offset ``k`` from each missing sample."""
        inside = (col + k >= 0) & (col + k < n_t)
        j = xp.clip(idx + k, 0, size - 1)
        return inside & ~xp.take(flat_miss, j), xp.take(flat, j)

    zi = xp.zeros(idx.shape, dtype=xp.int64)
    dp, dn = zi, zi
    pv = xp.zeros(idx.shape, dtype=voltage.dtype)
    nv = pv
    for k in range(1, G + 1):
        okp, vp = valid_at(-k)
        have = (dp == 0) & okp
        dp = xp.where(have, k, dp)
        pv = xp.where(have, vp, pv)
        okn, vn = valid_at(k)
        have = (dn == 0) & okn
        dn = xp.where(have, k, dn)
        nv = xp.where(have, vn, nv)
    fill = (dp > 0) & (dn > 0) & ((dp + dn - 1) <= G)
    dpf = xp.astype(dp, voltage.dtype)
    w = dpf / xp.where(fill, dpf + xp.astype(dn, voltage.dtype), xp.ones_like(dpf))
    vals = xp.where(fill, pv + (nv - pv) * w, xp.full_like(pv, xp.nan))
    out = xp.reshape(xp.asarray(voltage, copy=True), (-1,))
    out[flat_miss] = vals
    filled = xp.reshape(out, (n_m, n_t))
    # events at missing samples, summed per row through a boolean image of the block
    starts = (col == 0) | ~xp.take(flat_miss, xp.clip(idx - 1, 0, size - 1))  # a gap starts here
    long_start = starts
    for k in range(1, G + 1):  # ... and its next G samples are missing too
        inside = col + k < n_t
        long_start = long_start & inside & xp.take(flat_miss, xp.clip(idx + k, 0, size - 1))

    def per_row(event: Any) -> Any:
        img = xp.zeros((size,), dtype=xp.bool)
        img[flat_miss] = event
        return _count(xp.reshape(img, (n_m, n_t)), 1)

    n_filled = per_row(fill)
    n_gaps_filled = per_row(fill & starts)
    n_long = per_row(long_start)
    return filled, n_filled, n_gaps_filled, n_long


# ---------------------------------------------------------------------------------------------------------
# clock offsets


def _group_rows(groups: Any) -> list[np.ndarray]:
    """Row indices (host) of each group, in ascending label order."""
    g = _host(groups)
    labels, inv = np.unique(g, return_inverse=True)
    if labels.size <= 1:
        return [np.arange(g.size)]
    order = np.argsort(inv, kind="stable")
    bounds = np.cumsum(np.bincount(inv, minlength=labels.size))[:-1]
    return np.split(order, bounds)


def estimate_clock_offsets(
    voltage_pu: Any,
    groups: Any,
    *,
    max_lag: int,
    include: Any | None = None,
    min_pairs: int,
    min_correlation: float,
    min_meters: int,
    max_common_meters: int = 256,
    exclude_above: float | None = None,
    n_refine: int = 1,
    references: Any | None = None,
    reference_groups: Any | None = None,
    diff: Any | None = None,
) -> tuple[Any, Any, Any]:
    """Clock offset of each meter against its feeder's common signal, at sub-interval resolution.

    Parameters
    ----------
    voltage_pu : array, shape (n_meters, n_time)
        Per-unit voltage, NaN = missing. [pu]
    groups : array of int, shape (n_meters,)
        Feeder index per row; a block of several feeders is handled in one call.
    max_lag : int
        Integer lags searched, ``-max_lag .. max_lag``. [samples]
    include : array of bool, shape (n_meters,), optional
        Meters that form the common signal (default: all).
    min_pairs : int
        Fewest valid differenced samples for an estimate.
    min_correlation : float
        Lowest correlation with the common signal at the best lag for an estimate. [-]
    min_meters : int
        Fewest contributing meters on a feeder for its common signal to be trusted.
    max_common_meters : int
        The common signal is the median over at most this many contributing meters, evenly spaced in row
        order (a robust statistic needs no more; it bounds the sort). [meters]
    exclude_above : float, optional
        If given, a second pass rebuilds each common signal without the meters whose first-pass
        ``|offset|`` exceeds this (or is not estimable), so that offset meters do not smear the reference;
        rows the second pass cannot estimate keep their first-pass value. [samples]
    n_refine : int
        Number of such passes (each costs as much as the first).
    references : array, shape (n_refs, n_time), optional
        Feeder-head voltages (any scale, e.g. per unit; NaN = missing). A feeder with references is
        measured against them instead of its median: each meter against the reference row (phase) it
        correlates with best. Feeders without a reference row keep the median common mode. [pu]
    reference_groups : array of int, shape (n_refs,), optional
        Feeder index (same codes as ``groups``) of each reference row; required with ``references``.
    diff : array, shape (n_meters, n_time - 1), optional
        ``voltage_pu[:, 1:] - voltage_pu[:, :-1]`` where the caller has it already (then only the shape
        and dtype of ``voltage_pu`` are used). [pu]

    Returns
    -------
    offset_samples : array, shape (n_meters,)
        Estimated delay, positive = the meter's series is late (its clock lags), NaN where not
        estimable. [samples]
    correlation : array, shape (n_meters,)
        Correlation of the meter's differenced series with the common signal at the best integer lag. [-]
    standard_error : array, shape (n_meters,)
        Standard error of ``offset_samples`` from the fit's residual, NaN where no estimate. [samples]

    Notes
    -----
    With ``d`` the meter's first-differenced per-unit series and ``c`` the feeder's common mode (median over
    meters of the differenced series), the integer lag ``L`` maximises the normalised cross-correlation
    ``sum d[n] c[n-L]``. A three-tap least-squares fractional-delay filter is then fitted,
    ``d[n] ~ h_- c[n-L+1] + h_0 c[n-L] + h_+ c[n-L-1]``, and the offset is its centroid
    ``L + (h_+ - h_-) / (h_- + h_0 + h_+)``. For a series delayed by linear interpolation (the measurement
    model, and the exact effect of a shifted interval-average on piecewise-constant load) the filter is
    exactly ``(1-f, f)`` on two taps, so the centroid recovers the delay without bias; unrelated local
    variation and noise only add variance. A symmetric difference in smoothing between the meter and the
    common signal (a zero-phase filter) leaves the centroid at zero; maximising the correlation with a
    linearly interpolated template instead would read such smoothing as a delay of about half an interval
    (and would not return ~0 after a correction). The Gram matrix uses each meter's own missing-data mask. All
    products are computed per feeder as one matrix product of the block with the few shifted common
    signals (BLAS), so the cost is a few passes over the block.

    The median is robust to a minority of offset meters at each time, but they still blur the common signal
    (a net delay of the offset meters' mix biases every meter's estimate), hence ``exclude_above``. A
    feeder-head reference is not blurred by offset meters and carries no meter noise.

    Standard error (delta method on the least-squares taps): with residual variance
    ``s^2 = (d'd - h'x) / (n - 3)``, the taps' covariance ``s^2 G^-1`` and the gradient of the centroid
    ``F = (h_+ - h_-)/g`` with respect to ``(h_-, h_0, h_+)``, ``(-1 - F, -F, 1 - F) / g``,
    ``se^2 = s^2 grad' G^-1 grad``. The residual holds meter noise and the meter's own load variation, so
    ``se`` measures what the common signal cannot explain. Where the meter's response to the feeder head is
    not a pure delay the offset is estimated short (``benchmarks/clock_offset.py`` measures both), so ``se`` is a
    yardstick for "clearly non-zero", not a confidence interval on the size.
    """
    xp = array_namespace(voltage_pu)
    n_m, n_t = voltage_pu.shape
    nan = xp.full((n_m,), xp.nan, dtype=voltage_pu.dtype)
    if n_m == 0 or n_t < 3:
        return nan, nan, nan
    kw = {
        "max_lag": max_lag,
        "min_pairs": min_pairs,
        "min_correlation": min_correlation,
        "min_meters": min_meters,
        "max_common_meters": max_common_meters,
    }
    diffs = _differenced(voltage_pu[:, 1:] - voltage_pu[:, :-1] if diff is None else diff)
    rows_list = _group_rows(groups)
    ref_rows = _reference_rows_of_groups(groups, references, reference_groups, len(rows_list))
    est = (nan, nan, nan)
    if any(not r for r in ref_rows):  # a feeder without reference rows: its median common mode
        est = _median_offsets(diffs, rows_list, include, exclude_above, n_refine, kw, xp)
    return _reference_offsets(est, diffs, rows_list, ref_rows, references, include, kw, xp)


def _take(keep: Any, new: tuple[Any, ...], old: tuple[Any, ...], xp: Any) -> tuple[Any, ...]:
    """Each array of ``new`` where ``keep`` (bool, shape (n_meters,)), else the one of ``old``."""
    return tuple(xp.where(keep, a, b) for a, b in zip(new, old))


def _median_offsets(
    diffs: tuple[Any, ...],
    rows_list: list[np.ndarray],
    include: Any | None,
    exclude_above: float | None,
    n_refine: int,
    kw: dict[str, Any],
    xp: Any,
) -> tuple[Any, Any, Any]:
    """``(offset [samples], correlation [-], standard error [samples])`` against each group's median.

    With ``exclude_above`` [samples], each of ``n_refine`` passes rebuilds the medians from the included
    meters whose last offset is finite and within it; rows a pass cannot estimate keep their earlier values.
    ``kw`` holds the thresholds of :func:`_clock_offsets_once`.
    """
    est = _clock_offsets_once(diffs, rows_list, include=include, **kw)
    if exclude_above is None:
        return est
    inc = xp.ones(est[0].shape, dtype=xp.bool) if include is None else include
    used = _host(inc).astype(bool)  # the contributors behind each group's current estimates
    for _ in range(n_refine):
        inc2 = inc & xp.isfinite(est[0]) & (xp.abs(est[0]) <= exclude_above)
        inc2_h = _host(inc2).astype(bool)
        # a group's estimates depend only on its own contributors: a group whose set did not change would
        # give the same numbers again, so only the others are recomputed
        redo = [rows for rows in rows_list if not np.array_equal(inc2_h[rows], used[rows])]
        if not redo:
            break
        new = _clock_offsets_once(diffs, redo, include=inc2, **kw)
        est = _take(xp.isfinite(new[0]), new, est, xp)
        used = inc2_h
    return est


def _reference_offsets(
    est: tuple[Any, Any, Any],
    diffs: tuple[Any, ...],
    rows_list: list[np.ndarray],
    ref_rows: list[list[int]],
    references: Any | None,
    include: Any | None,
    kw: dict[str, Any],
    xp: Any,
) -> tuple[Any, Any, Any]:
    """``est`` (offset, correlation, standard error) replaced where a reference row correlates best.

    Each meter of a feeder with rows in ``references`` (shape (n_refs, n_time), NaN = missing) [pu] takes
    the estimate against the row it correlates with best; other meters keep ``est``.
    """
    n_cand = max((len(r) for r in ref_rows), default=0)
    if not n_cand:
        return est
    d = diffs[0]
    rd = references[:, 1:] - references[:, :-1]
    rd = xp.where(xp.isnan(rd), xp.zeros_like(rd), xp.astype(rd, d.dtype))
    best_r = xp.full((d.shape[0],), -xp.inf, dtype=d.dtype)
    for k in range(n_cand):  # k-th reference row of each feeder (a feeder with fewer repeats its last)
        sig = [None if not r else rd[r[min(k, len(r) - 1)], :][None, :] for r in ref_rows]
        new = _clock_offsets_once(diffs, rows_list, include=include, signals=sig, **kw)
        take = xp.isfinite(new[1]) & (new[1] > best_r)
        best_r = xp.where(take, new[1], best_r)
        est = _take(take, new, est, xp)
    return est


def _differenced(d: Any) -> tuple[Any, Any, Any, Any, Any]:
    """``(d, d0, mask, n_pairs, dd)`` of the differenced series ``d`` (n_meters, n_time - 1): ``d0`` with NaN
    as 0, the float mask of valid samples (None where every sample is valid), valid samples and ``d0 . d0``
    per meter.

    On NumPy, row sums find the rows that may hold a NaN (a NaN always propagates) and the ``d0 . d0`` row
    sums run in cache-sized chunks (the same pairwise sums as a whole-block product, without the temporary).
    """
    xp = array_namespace(d)
    n_m, n_t = d.shape[0], d.shape[1] + 1
    if not isinstance(d, np.ndarray):
        md = ~xp.isnan(d)
        if bool(xp.all(md)):  # nothing missing: d0 is d and every meter's mask is all ones (mf None)
            return d, d, None, _count(md, 1), xp.sum(d * d, axis=1)
        d0 = xp.where(md, d, xp.zeros_like(d))
        return d, d0, xp.astype(md, d.dtype), _count(md, 1), xp.sum(d0 * d0, axis=1)
    suspect = np.flatnonzero(~np.isfinite(d.sum(axis=1)))
    n_pairs = np.full(n_m, n_t - 1, dtype=np.int64)
    if suspect.size:
        md = ~np.isnan(d)
        d0 = np.where(md, d, 0.0).astype(d.dtype, copy=False)
        mf = md.astype(d.dtype)
        n_pairs[suspect] = _count(md[suspect], 1)
        del md
    else:
        d0, mf = d, None
    dd = np.empty(n_m, dtype=d.dtype)
    ch = max(1, (1 << 18) // max(n_t, 1))
    tmp = np.empty((min(ch, n_m), n_t - 1), dtype=d.dtype)
    for i in range(0, n_m, ch):
        blk = d0[i : i + ch]
        t = tmp[: blk.shape[0]]
        np.multiply(blk, blk, out=t)
        dd[i : i + ch] = t.sum(axis=1)
    return d, d0, mf, n_pairs, dd


def _reference_rows_of_groups(
    groups: Any, references: Any | None, reference_groups: Any | None, n_groups: int
) -> list[list[int]]:
    """Rows of ``references`` of each group (in ascending label order, as :func:`_group_rows`)."""
    ref_rows: list[list[int]] = [[] for _ in range(n_groups)]
    if references is None:
        return ref_rows
    if reference_groups is None:
        raise ValueError("reference_groups is required with references")
    labels = np.unique(_host(groups))
    for j, lab in enumerate(_host(reference_groups).reshape(-1).tolist()):
        hit = np.flatnonzero(labels == lab)
        if hit.size:
            ref_rows[int(hit[0])].append(j)
    return ref_rows


def _clock_offsets_once(
    diffs: tuple[Any, ...],
    rows_list: list[np.ndarray],
    *,
    signals: list[Any] | None = None,
    max_lag: int,
    include: Any | None,
    min_pairs: int,
    min_correlation: float,
    min_meters: int,
    max_common_meters: int,
) -> tuple[Any, Any, Any]:
    """One pass of :func:`estimate_clock_offsets` with a fixed set of contributing meters.

    ``signals[g]`` (shape (1, n_time - 1), differenced), where given and not None, replaces group ``g``'s
    median common mode; such a group needs no contributing meters.
    """
    d, d0, mf, n_pairs, dd = diffs
    xp = array_namespace(d)
    dt = d.dtype
    n_m, n_t = d.shape[0], d.shape[1] + 1
    K = max(int(max_lag), 0)
    lags = list(range(-K - 1, K + 2))  # taps needed: integer search -K..K, refinement one either side
    nl = len(lags)
    inc_h = np.ones(n_m, dtype=bool) if include is None else _host(include).astype(bool)
    Xs, Es, P1s, P2s, ncs = [], [], [], [], []
    for gi, rows in enumerate(rows_list):
        blk = slice(int(rows[0]), int(rows[-1]) + 1) if rows[-1] - rows[0] + 1 == rows.size else None
        contrib = rows[inc_h[rows]]
        if contrib.size > max_common_meters:  # evenly spaced, deterministic subset
            contrib = contrib[np.linspace(0, contrib.size - 1, max_common_meters).round().astype(np.int64)]
        own = signals is not None and signals[gi] is not None
        if own:
            c = signals[gi]
        elif contrib.size:
            c = nanmedian(xp.take(d, xp.asarray(contrib), axis=0), axis=0)
            c = xp.where(xp.isnan(c), xp.zeros_like(c), c)[None, :]
        else:
            c = xp.zeros((1, n_t - 1), dtype=dt)
        S = [_shift(c, j, 0.0, xp)[0, :] for j in lags]  # S[i][n] = c[n - lags[i]]
        Cs = xp.stack(S, axis=1)  # (n_t - 1, nl)
        Q = xp.concat(
            [Cs * Cs, Cs[:, :-1] * Cs[:, 1:], Cs[:, :-2] * Cs[:, 2:]], axis=1
        )  # (n_t - 1, 3 nl - 3)
        if blk is not None:
            Dg = d0[blk, :]
            Mg = None if mf is None else mf[blk, :]
        else:
            ix = xp.asarray(rows)
            Dg = xp.take(d0, ix, axis=0)
            Mg = None if mf is None else xp.take(mf, ix, axis=0)
        Xs.append(Dg @ Cs)
        if Mg is None:  # all-ones masks: one Gram row for the whole group
            Gg = xp.broadcast_to(xp.ones((1, n_t - 1), dtype=dt) @ Q, (rows.size, Q.shape[1]))
        else:
            Gg = Mg @ Q
        Es.append(Gg[:, :nl])
        P1s.append(Gg[:, nl : 2 * nl - 1])
        P2s.append(Gg[:, 2 * nl - 1 :])
        n_c = np.iinfo(np.int64).max if own else int(np.count_nonzero(inc_h[rows]))
        ncs.append(np.full(rows.size, n_c, dtype=np.int64))
    order = np.concatenate(rows_list)
    X, E, P1, P2 = (xp.concat(a, axis=0) for a in (Xs, Es, P1s, P2s))
    n_contrib = np.concatenate(ncs)
    if order.size < n_m:  # some groups only: their rows' estimates, NaN elsewhere
        ix = xp.asarray(order)
        part = _centroid_fit(X, E, P1, P2, xp.take(dd, ix, axis=0), xp.take(n_pairs, ix, axis=0),
                             xp.asarray(n_contrib), K, min_pairs, min_correlation, min_meters)
        pos = np.full(n_m, -1, dtype=np.int64)
        pos[order] = np.arange(order.size)
        have = xp.asarray(pos >= 0)
        gather = xp.asarray(np.maximum(pos, 0))
        return tuple(xp.where(have, xp.take(a, gather, axis=0), xp.full((n_m,), xp.nan, dtype=a.dtype))
                     for a in part)
    if np.array_equal(order, np.arange(n_m)):
        back = None
    else:
        back = xp.asarray(np.argsort(order, kind="stable"))
    if back is not None:
        X, E, P1, P2 = (xp.take(a, back, axis=0) for a in (X, E, P1, P2))
        n_contrib = n_contrib[np.argsort(order, kind="stable")]
    n_contrib = xp.asarray(n_contrib)
    return _centroid_fit(X, E, P1, P2, dd, n_pairs, n_contrib, K, min_pairs, min_correlation, min_meters)


def _centroid_fit(
    X: Any,
    E: Any,
    P1: Any,
    P2: Any,
    dd: Any,
    n_pairs: Any,
    n_contrib: Any,
    K: int,
    min_pairs: int,
    min_correlation: float,
    min_meters: int,
) -> tuple[Any, Any, Any]:
    """The best integer lag, the three-tap least-squares fit around it and its centroid, with its standard
    error (see :func:`estimate_clock_offsets`). ``X`` holds the products of each meter with the shifted
    common signals, ``E, P1, P2`` the Gram rows (lags, neighbouring lags, lags two apart)."""
    xp = array_namespace(X)
    dt = X.dtype
    # integer lag: columns 1 .. nl-2 of X are lags -K .. K
    tiny = xp.asarray(1e-300 if dt == xp.float64 else 1e-30, dtype=dt)
    r = X[:, 1:-1] / xp.sqrt(xp.maximum(E[:, 1:-1] * dd[:, None], tiny))
    best = xp.argmax(r, axis=1)  # lag = best - K; the taps L-1, L, L+1 are columns best, best+1, best+2

    def col(A: Any, j: Any) -> Any:
        return xp.take_along_axis(A, j[:, None], axis=1)[:, 0]

    rbest = col(r, best)
    x0, x1, x2 = col(X, best), col(X, best + 1), col(X, best + 2)
    g00, g11, g22 = col(E, best), col(E, best + 1), col(E, best + 2)
    g01, g12, g02 = col(P1, best), col(P1, best + 1), col(P2, best)
    # Cramer's rule for the symmetric 3x3 normal equations G h = x
    m00 = g11 * g22 - g12 * g12
    m01 = g01 * g22 - g12 * g02
    m02 = g01 * g12 - g11 * g02
    det = g00 * m00 - g01 * m01 + g02 * m02
    ok_det = xp.abs(det) > tiny
    det = xp.where(ok_det, det, xp.ones_like(det))
    h_m = (x0 * m00 - g01 * (x1 * g22 - g12 * x2) + g02 * (x1 * g12 - g11 * x2)) / det
    h_0 = (g00 * (x1 * g22 - x2 * g12) - x0 * m01 + g02 * (g01 * x2 - x1 * g02)) / det
    h_p = (g00 * (g11 * x2 - g12 * x1) - g01 * (g01 * x2 - x1 * g02) + x0 * m02) / det
    gain = h_m + h_0 + h_p
    ok_gain = gain > tiny
    frac = (h_p - h_m) / xp.where(ok_gain, gain, xp.ones_like(gain))
    off = xp.astype(best, dt) - K + frac
    valid = (
        ok_det
        & ok_gain
        & (xp.abs(frac) <= 1.0)
        & (n_pairs >= min_pairs)
        & (rbest >= min_correlation)
        & (n_contrib >= min_meters)
    )
    # standard error of the centroid: se^2 = s^2 grad' G^-1 grad, G^-1 = adj(G) / det
    rss = xp.maximum(dd - (h_m * x0 + h_0 * x1 + h_p * x2), xp.zeros_like(dd))
    dof = xp.astype(xp.maximum(n_pairs - 3, xp.ones_like(n_pairs)), dt)
    a00, a11, a22 = m00, g00 * g22 - g02 * g02, g00 * g11 - g01 * g01
    a01, a02, a12 = -m01, m02, -(g00 * g12 - g01 * g02)
    gm, g0, gp = -1.0 - frac, -frac, 1.0 - frac
    quad = (
        gm * gm * a00 + g0 * g0 * a11 + gp * gp * a22 + 2.0 * (gm * g0 * a01 + gm * gp * a02 + g0 * gp * a12)
    )
    se = xp.sqrt(xp.maximum(rss / dof * quad / det, xp.zeros_like(quad))) / xp.where(
        ok_gain, gain, xp.ones_like(gain)
    )
    nan = xp.full_like(off, xp.nan)
    return xp.where(valid, off, nan), xp.where(n_pairs > 0, rbest, nan), xp.where(valid, se, nan)


def shift_rows(voltage: Any, delay_samples: Any, *, max_shift: int) -> Any:
    """Undo a per-row delay: ``y[:, n] = v[:, n + delay]`` by linear interpolation (NaN outside).

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Readings. [V]
    delay_samples : array, shape (n_meters,)
        Delay to remove (positive: series late), NaN or 0 leaves a row unchanged. [samples]
    max_shift : int
        Bound on ``|delay|`` (rows beyond it are left unchanged). [samples]

    Returns
    -------
    array, shape (n_meters, n_time)
        Shifted readings. [V]
    """
    xp = array_namespace(voltage)
    dt = voltage.dtype
    dly = xp.where(xp.isfinite(delay_samples), delay_samples, xp.zeros_like(delay_samples))
    dly = xp.where(xp.abs(dly) <= max_shift, dly, xp.zeros_like(dly))
    base = xp.floor(dly)
    f = (dly - base)[:, None]
    Li = xp.astype(base, xp.int64)
    out = voltage
    M = int(max_shift) + 1
    for L in range(-M, M + 1):
        a = _shift(voltage, -L, xp.nan, xp)  # v[n + L]
        b = _shift(voltage, -L - 1, xp.nan, xp)  # v[n + L + 1]
        y = xp.where(f == 0, a, (1 - f) * a + f * b)
        out = xp.where(((Li == L) & (dly != 0))[:, None], y, out)
    return xp.astype(out, dt)


# ---------------------------------------------------------------------------------------------------------
# the whole block


class QualityArrays(NamedTuple):
    """Arrays returned by :func:`quality_block` (per meter unless noted)."""

    voltage: Any  #: (n_meters, n_time) cleaned voltage [V]
    usable: Any  #: bool
    usable_fraction: Any  #: [-]
    n_readings: Any  #: raw finite readings
    n_implausible: Any  #: samples outside the band (set to NaN)
    n_flat: Any  #: samples in over-long flat runs (set to NaN)
    n_filled: Any  #: samples interpolated
    n_gaps_filled: Any
    n_long_gaps: Any
    units_code: Any  #: ``UNITS_*``
    unit_scale: Any  #: factor applied [-]
    base_v: Any  #: base used for per-unit checks [V]
    nominal_inferred: Any  #: bool
    no_readings: Any  #: bool
    sampling_bad: Any  #: bool
    implausible: Any  #: bool (meter mostly outside the band)
    flat_line: Any  #: bool
    insufficient: Any  #: bool
    long_gaps: Any  #: bool
    clock_offset_s: Any  #: [s], NaN where not estimable
    clock_offset_se_s: Any  #: standard error of ``clock_offset_s`` [s], NaN where not estimable
    clock_correlation: Any  #: [-]
    clock_flag: Any  #: bool
    clock_corrected: Any  #: bool


#: Columns of the evenly strided subsample whose median decides a meter's units (plenty for a scale).
_UNITS_SAMPLE = 128
#: Elements of the row-chunk buffers of the NumPy paths (cache-sized; no whole-block temporaries).
_CHUNK_ELEMENTS = 1 << 16


def quality_block(
    voltage: Any,
    nominal_v: Any,
    sampling_interval_s: Any,
    off_grid_fraction: Any,
    groups: Any,
    *,
    interval_s: float,
    max_interp_gap: int,
    min_usable_fraction: float,
    min_usable_samples: int,
    min_pu: float,
    max_pu: float,
    max_flat_run: int,
    max_clock_offset_s: float,
    max_off_grid_fraction: float,
    sampling_rel_tol: float,
    inconsistent_sampling_unusable: bool,
    max_implausible_fraction: float,
    clock_search_s: float,
    clock_min_correlation: float,
    clock_min_meters: int,
    correct_clock_offset: bool,
    clock_flag_z: float,
    references: Any | None = None,
    reference_groups: Any | None = None,
) -> QualityArrays:
    """All quality checks for a block of whole feeders (see :func:`phaseid_hpc.quality.assess_quality`).

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Readings, NaN = missing. [V]
    nominal_v, sampling_interval_s, off_grid_fraction : array, shape (n_meters,)
        Nominal voltage [V], median raw sampling interval [s], share of off-grid reads [-]; NaN = unknown.
    groups : array of int, shape (n_meters,)
        Feeder index per row.
    interval_s : float
        Grid step. [s]
    max_interp_gap, min_usable_fraction, ..., clock_flag_z
        Thresholds, required: the fields of :class:`phaseid_hpc.config.QualityConfig` of the same names
        (where their defaults and units are documented). A clock offset is flagged when
        ``|offset| - max_clock_offset_s > clock_flag_z * se``.
    references : array, shape (n_refs, n_time), optional
        Feeder-head voltages, the clock reference of their feeders (see :func:`estimate_clock_offsets`). [V]
    reference_groups : array of int, shape (n_refs,), optional
        Feeder index (codes of ``groups``) of each reference row.

    Returns
    -------
    QualityArrays

    Notes
    -----
    The steps, each a function: :func:`_clean_copy`, :func:`sampling_consistency`, :func:`_rescale_units`
    (:func:`detect_units`), :func:`_flat_samples` (:func:`flat_run_mask`), :func:`_implausible_samples`,
    :func:`_remove_and_fill` (:func:`fill_short_gaps`), :func:`_clock_offsets_s`
    (:func:`estimate_clock_offsets`) and, with ``correct_clock_offset``, :func:`shift_rows`. (The function
    is long only by its 17 required keywords and the 24 fields of its result; the work is in the steps.)
    """
    xp = array_namespace(voltage)
    v, raw_ok = _clean_copy(voltage)
    n_readings = _count(raw_ok, 1)
    no_readings = n_readings == 0
    sampling_bad = ~no_readings & sampling_consistency(
        sampling_interval_s,
        off_grid_fraction,
        interval_s=interval_s,
        sampling_rel_tol=sampling_rel_tol,
        max_off_grid_fraction=max_off_grid_fraction,
    )
    stride = max(1, voltage.shape[1] // _UNITS_SAMPLE)
    v, scale, base, units_code, inferred = _rescale_units(
        v, xp.astype(nominal_v, v.dtype), stride, min_pu=min_pu, max_pu=max_pu
    )
    v, counts, n_ok, constant = _screen_samples(
        v, base, raw_ok, max_flat_run, max_interp_gap, min_pu=min_pu, max_pu=max_pu
    )
    findings = _meter_findings(
        n_readings,
        counts,
        n_ok,
        constant,
        sampling_bad,
        n_time=voltage.shape[1],
        max_implausible_fraction=max_implausible_fraction,
        min_usable_fraction=min_usable_fraction,
        min_usable_samples=min_usable_samples,
        inconsistent_sampling_unusable=inconsistent_sampling_unusable,
    )
    v, clock = _check_clocks(
        v,
        base,
        groups,
        findings.usable,
        no_readings,
        references,
        reference_groups,
        stride,
        interval_s=interval_s,
        clock_search_s=clock_search_s,
        min_usable_samples=min_usable_samples,
        clock_min_correlation=clock_min_correlation,
        clock_min_meters=clock_min_meters,
        max_clock_offset_s=max_clock_offset_s,
        clock_flag_z=clock_flag_z,
        correct_clock_offset=correct_clock_offset,
    )
    return QualityArrays(
        voltage=v,
        n_readings=n_readings,
        units_code=units_code,
        unit_scale=scale,
        base_v=base,
        nominal_inferred=inferred,
        no_readings=no_readings,
        sampling_bad=sampling_bad,
        **counts._asdict(),  # n_implausible, n_flat, n_filled, n_gaps_filled, n_long_gaps
        **findings._asdict(),  # usable, usable_fraction, implausible, flat_line, insufficient, long_gaps
        **clock._asdict(),  # clock_{offset_s, offset_se_s, correlation, flag, corrected}
    )


def _clean_copy(voltage: Any) -> tuple[Any, Any]:
    """Step 1: a private float copy of the readings with +-inf as NaN, and the mask of finite readings.

    NumPy gets one private copy that the next steps clean in place (fewer full-block passes and
    temporaries); other namespaces get new arrays.
    """
    xp = array_namespace(voltage)
    dt = voltage.dtype if voltage.dtype in (xp.float32, xp.float64) else xp.float64
    if isinstance(voltage, np.ndarray):
        v = np.array(voltage, dtype=dt, copy=True)
        raw_ok = np.isfinite(v)
        if not raw_ok.all():
            v[~raw_ok] = np.nan
        return v, raw_ok
    v = xp.astype(voltage, dt)
    v = xp.where(xp.isfinite(v), v, xp.asarray(xp.nan, dtype=dt))
    return v, ~xp.isnan(v)


def sampling_consistency(
    sampling_interval_s: Any,
    off_grid_fraction: Any,
    *,
    interval_s: float,
    sampling_rel_tol: float,
    max_off_grid_fraction: float,
) -> Any:
    """Meters whose raw sampling does not match the grid.

    Parameters
    ----------
    sampling_interval_s : array, shape (n_meters,)
        Median spacing of each meter's raw timestamps, NaN = unknown. [s]
    off_grid_fraction : array, shape (n_meters,)
        Share of each meter's raw reads off the grid, NaN = unknown. [-]
    interval_s : float
        Grid step. [s]
    sampling_rel_tol, max_off_grid_fraction : float
        Largest relative difference of the interval, largest off-grid share. [-]

    Returns
    -------
    array of bool, shape (n_meters,)
        ``|sampling_interval_s - interval_s| > sampling_rel_tol * interval_s`` or
        ``off_grid_fraction > max_off_grid_fraction``; NaN inputs are not flagged.
    """
    xp = array_namespace(sampling_interval_s, off_grid_fraction)
    si = xp.astype(sampling_interval_s, xp.float64)
    og = xp.astype(off_grid_fraction, xp.float64)
    bad_interval = xp.isfinite(si) & (xp.abs(si - interval_s) > sampling_rel_tol * interval_s)
    bad_grid = xp.isfinite(og) & (og > max_off_grid_fraction)
    return bad_interval | bad_grid


def _rescale_units(
    v: Any, nominal_v: Any, stride: int, *, min_pu: float, max_pu: float
) -> tuple[Any, Any, Any, Any, Any]:
    """Step 3: units from the median of every ``stride``-th column; kV readings rescaled to V.

    Returns ``(v, scale, base_v, units_code, inferred)`` (see :func:`detect_units`); on NumPy ``v`` (the
    private copy of :func:`_clean_copy`) is rescaled in place.
    """
    med = nanmedian(v[:, ::stride], axis=1)
    scale, base, code, inferred = detect_units(med, nominal_v, min_pu=min_pu, max_pu=max_pu)
    if isinstance(v, np.ndarray):
        if not bool(np.all(scale == 1)):
            v *= scale[:, None]
    else:
        v = v * scale[:, None]
    return v, scale, base, code, inferred


class _SampleCounts(NamedTuple):
    """Samples per meter removed or filled by :func:`_screen_samples` (fields of :class:`QualityArrays`)."""

    n_implausible: Any
    n_flat: Any
    n_filled: Any
    n_gaps_filled: Any
    n_long_gaps: Any


def _screen_samples(
    v: Any, base_v: Any, raw_ok: Any, max_flat_run: int, max_interp_gap: int, *, min_pu: float, max_pu: float
) -> tuple[Any, _SampleCounts, Any, Any]:
    """Steps 4-6: find flat-line and implausible samples, remove them, fill the short gaps.

    Returns ``(v, counts, n_ok, constant)``: the cleaned readings (on NumPy ``v`` itself, cleaned in place),
    the counts per meter, the finite samples left per meter and the constant meters.
    """
    flat_mask, constant = _flat_samples(v, raw_ok, max_flat_run)
    n_flat = _count(flat_mask, 1)
    implaus_s = _implausible_samples(v, base_v, raw_ok, min_pu=min_pu, max_pu=max_pu)
    n_implausible = _count(implaus_s, 1)
    v, n_filled, n_gaps_filled, n_long_gaps, n_ok = _remove_and_fill(v, implaus_s, flat_mask, max_interp_gap)
    counts = _SampleCounts(n_implausible, n_flat, n_filled, n_gaps_filled, n_long_gaps)
    return v, counts, n_ok, constant


def _flat_samples(v: Any, raw_ok: Any, max_flat_run: int) -> tuple[Any, Any]:
    """Step 4: samples to remove as flat lines (over-long runs, every reading of a constant meter).

    Returns the mask, shape (n_meters, n_time), and the constant meters, shape (n_meters,).
    """
    flat_mask, constant = flat_run_mask(v, max_flat_run, ok=raw_ok)
    if isinstance(v, np.ndarray):
        if bool(constant.any()):
            flat_mask[constant] |= raw_ok[constant]
        return flat_mask, constant
    return flat_mask | (constant[:, None] & raw_ok), constant


def _implausible_samples(v: Any, base_v: Any, raw_ok: Any, *, min_pu: float, max_pu: float) -> Any:
    """Step 5: readings outside ``[min_pu, max_pu]`` of their base (every reading where the base is NaN).

    On NumPy in row chunks through a cache-sized buffer (no whole-block per-unit temporary).
    """
    xp = array_namespace(v)
    if not isinstance(v, np.ndarray):
        pu = v / base_v[:, None]
        return raw_ok & ~((pu >= min_pu) & (pu <= max_pu))
    n_m, n_t = v.shape
    # a NaN sample fails both comparisons
    ch = max(1, _CHUNK_ELEMENTS // max(n_t, 1))
    out = np.empty((n_m, n_t), dtype=bool)
    tpu = np.empty((min(ch, n_m), n_t), dtype=v.dtype)
    tb = np.empty((min(ch, n_m), n_t), dtype=bool)
    for i in range(0, n_m, ch):
        k = min(ch, n_m - i)
        np.divide(v[i : i + k], base_v[i : i + k, None], out=tpu[:k])
        np.less(tpu[:k], min_pu, out=out[i : i + k])
        np.greater(tpu[:k], max_pu, out=tb[:k])
        out[i : i + k] |= tb[:k]
    nb = xp.isnan(base_v)
    if bool(nb.any()):
        out[nb] = raw_ok[nb]
    return out


def _remove_and_fill(v: Any, implausible: Any, flat: Any, max_interp_gap: int) -> tuple[Any, ...]:
    """Step 6: remove implausible and flat samples (NaN), then fill short gaps (a spike is interpolated).

    Returns ``(v, n_filled, n_gaps_filled, n_long_gaps, n_finite)``, the counts per meter. On NumPy only
    rows with a missing sample go through :func:`fill_short_gaps`, and ``v`` is cleaned in place.
    """
    xp = array_namespace(v)
    n_m, n_t = v.shape
    if not isinstance(v, np.ndarray):
        v = xp.where(implausible | flat, xp.asarray(xp.nan, dtype=v.dtype), v)
        v, n_filled, n_gaps_filled, n_long_gaps = fill_short_gaps(v, max_interp_gap)
        return v, n_filled, n_gaps_filled, n_long_gaps, _count(~xp.isnan(v), 1)
    remove = implausible | flat
    if bool(remove.any()):
        v[remove] = np.nan
    del remove
    miss_rows = np.flatnonzero(np.isnan(v).any(axis=1)) if n_t else np.zeros(0, dtype=np.int64)
    n_filled = np.zeros(n_m, dtype=np.int64)
    n_gaps_filled, n_long_gaps = n_filled.copy(), n_filled.copy()
    n_ok = np.full(n_m, n_t, dtype=np.int64)
    if miss_rows.size:
        sub, f1, f2, f3 = fill_short_gaps(v[miss_rows], max_interp_gap)
        v[miss_rows] = sub
        n_filled[miss_rows], n_gaps_filled[miss_rows], n_long_gaps[miss_rows] = f1, f2, f3
        n_ok[miss_rows] = _count(~np.isnan(sub), 1)
    return v, n_filled, n_gaps_filled, n_long_gaps, n_ok


class _MeterFindings(NamedTuple):
    """Per-meter findings of :func:`_meter_findings` (fields of :class:`QualityArrays`)."""

    usable: Any
    usable_fraction: Any
    implausible: Any
    flat_line: Any
    insufficient: Any
    long_gaps: Any


def _meter_findings(
    n_readings: Any,
    counts: _SampleCounts,
    n_ok: Any,
    constant: Any,
    sampling_bad: Any,
    *,
    n_time: int,
    max_implausible_fraction: float,
    min_usable_fraction: float,
    min_usable_samples: int,
    inconsistent_sampling_unusable: bool,
) -> _MeterFindings:
    """Per-meter findings from the counts of steps 1-6, and whether the meter is usable.

    A meter without readings has no finding but is not usable; ``sampling_bad`` makes a meter unusable only
    with ``inconsistent_sampling_unusable``.
    """
    xp = array_namespace(n_readings)
    no_readings = n_readings == 0
    denom = xp.astype(xp.maximum(n_readings, xp.ones_like(n_readings)), xp.float64)
    share = xp.astype(counts.n_implausible, xp.float64) / denom
    implausible = ~no_readings & (share > max_implausible_fraction)
    usable_fraction = xp.astype(n_ok, xp.float64) / max(n_time, 1)
    insufficient = ~no_readings & ((usable_fraction < min_usable_fraction) | (n_ok < min_usable_samples))
    usable = ~no_readings & ~insufficient & ~implausible & ~constant
    if inconsistent_sampling_unusable:
        usable = usable & ~sampling_bad
    return _MeterFindings(
        usable=usable,
        usable_fraction=usable_fraction,
        implausible=implausible,
        flat_line=counts.n_flat > 0,
        insufficient=insufficient,
        long_gaps=(counts.n_long_gaps > 0) & ~no_readings,
    )


class _ClockFindings(NamedTuple):
    """Clock results of :func:`_check_clocks` (fields of :class:`QualityArrays`)."""

    clock_offset_s: Any
    clock_offset_se_s: Any
    clock_correlation: Any
    clock_flag: Any
    clock_corrected: Any


def _check_clocks(
    v: Any,
    base_v: Any,
    groups: Any,
    usable: Any,
    no_readings: Any,
    references: Any | None,
    reference_groups: Any | None,
    stride: int,
    *,
    interval_s: float,
    clock_search_s: float,
    min_usable_samples: int,
    clock_min_correlation: float,
    clock_min_meters: int,
    max_clock_offset_s: float,
    clock_flag_z: float,
    correct_clock_offset: bool,
) -> tuple[Any, _ClockFindings]:
    """Steps 7-8: clock offsets, their flag and, with ``correct_clock_offset``, the flagged rows shifted back.

    Offsets from :func:`_clock_offsets_s`, the flag from :func:`clock_offset_flag`, the shift by
    :func:`shift_rows`. Returns ``(v, clock)``: the readings (corrected or as they were) and the findings.
    """
    xp = array_namespace(v)
    max_lag = max(1, math.ceil(clock_search_s / interval_s)) if interval_s > 0 else 1
    off, offset_s, offset_se_s, corr = _clock_offsets_s(
        v,
        base_v,
        groups,
        usable,
        no_readings,
        references,
        reference_groups,
        stride,
        interval_s=interval_s,
        max_lag=max_lag,
        min_pairs=min_usable_samples,
        min_correlation=clock_min_correlation,
        min_meters=clock_min_meters,
        exclude_above=max_clock_offset_s / interval_s,
    )
    flag = clock_offset_flag(offset_s, offset_se_s, limit_s=max_clock_offset_s, z=clock_flag_z)
    corrected = xp.zeros((v.shape[0],), dtype=xp.bool)
    if correct_clock_offset:
        v = shift_rows(v, xp.where(flag, off, xp.zeros_like(off)), max_shift=max_lag + 1)
        corrected = flag
    return v, _ClockFindings(offset_s, offset_se_s, corr, flag, corrected)


def _clock_offsets_s(
    v: Any,
    base_v: Any,
    groups: Any,
    usable: Any,
    no_readings: Any,
    references: Any | None,
    reference_groups: Any | None,
    stride: int,
    *,
    interval_s: float,
    **params: Any,
) -> tuple[Any, Any, Any, Any]:
    """Step 7 in seconds: :func:`_clock_offsets_samples` (with ``params``) times ``interval_s``.

    Returns ``(offset_samples, offset_s, offset_se_s, correlation)``; the offsets are NaN for meters without
    readings, the standard error wherever the offset is.
    """
    xp = array_namespace(v)
    off, corr, se = _clock_offsets_samples(
        v, base_v, groups, usable, references, reference_groups, stride, **params
    )
    off = xp.where(no_readings, xp.full_like(off, xp.nan), off)
    offset_s = xp.astype(off, xp.float64) * interval_s
    se_s = xp.astype(se, xp.float64) * interval_s
    offset_se_s = xp.where(xp.isfinite(offset_s), se_s, xp.full_like(se_s, xp.nan))
    return off, offset_s, offset_se_s, corr


def _clock_offsets_samples(
    v: Any,
    base_v: Any,
    groups: Any,
    usable: Any,
    references: Any | None,
    reference_groups: Any | None,
    stride: int,
    **params: Any,
) -> tuple[Any, Any, Any]:
    """Step 7: clock offsets [samples], correlations and standard errors against the common signals.

    Per unit of the meter's base (a NaN base counts as 1); references are scaled by the median of every
    ``stride``-th sample. ``params``: ``max_lag, min_pairs, min_correlation, min_meters, exclude_above``
    of :func:`estimate_clock_offsets` (two refinement passes).
    """
    xp = array_namespace(v)
    dt = v.dtype
    n_m, n_t = v.shape
    base_safe = xp.where(xp.isfinite(base_v), base_v, xp.ones_like(base_v))
    refs_pu = None
    if references is not None and references.shape[0] > 0:
        refs = xp.astype(references, dt)
        refs = xp.where(xp.isfinite(refs), refs, xp.asarray(xp.nan, dtype=dt))
        rmed = nanmedian(refs[:, ::stride], axis=1)
        rmed = xp.where(xp.isfinite(rmed) & (rmed != 0), rmed, xp.ones_like(rmed))
        refs_pu = refs / rmed[:, None]
    d_pu = None
    if isinstance(v, np.ndarray):  # the differenced per-unit series straight from v, in row chunks
        v_pu = v
        if n_t >= 3 and n_m:
            ch = max(1, _CHUNK_ELEMENTS // max(n_t, 1))
            tpu = np.empty((min(ch, n_m), n_t), dtype=dt)
            d_pu = np.empty((n_m, n_t - 1), dtype=dt)
            for i in range(0, n_m, ch):
                k = min(ch, n_m - i)
                np.divide(v[i : i + k], base_safe[i : i + k, None], out=tpu[:k])
                np.subtract(tpu[:k, 1:], tpu[:k, :-1], out=d_pu[i : i + k])
    else:
        v_pu = v / base_safe[:, None]
    return estimate_clock_offsets(
        v_pu,
        groups,
        diff=d_pu,
        include=usable,
        n_refine=2,
        references=refs_pu,
        reference_groups=reference_groups if refs_pu is not None else None,
        **params,
    )


def clock_offset_flag(offset_s: Any, offset_se_s: Any, *, limit_s: float, z: float) -> Any:
    """Clock offsets significantly above the limit: ``|offset| - limit_s > z * se`` (``se`` NaN: 0).

    Parameters
    ----------
    offset_s, offset_se_s : array, shape (n_meters,)
        Estimated offset and its standard error, NaN where not estimable. [s]
    limit_s : float
        Largest acceptable offset (``QualityConfig.max_clock_offset_s``). [s]
    z : float
        Margin in standard errors (``QualityConfig.clock_flag_z``). [-]

    Returns
    -------
    array of bool, shape (n_meters,)
    """
    xp = array_namespace(offset_s, offset_se_s)
    ok_se = xp.isfinite(offset_se_s)
    margin = xp.where(ok_se, z * offset_se_s, xp.zeros_like(offset_se_s))
    return xp.isfinite(offset_s) & ((xp.abs(offset_s) - limit_s) > margin)
