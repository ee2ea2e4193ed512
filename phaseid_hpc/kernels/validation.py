"""Transformer validation kernels: gap filling, power per transformer and phase, loading, thermal summary,
voltage-level steps and correlation loss.

Functions of arrays; the namespace (NumPy, CuPy, array-api-strict) is taken from the inputs and no
``(n_meters, n_time)`` array leaves it. Small per-meter and per-transformer index tables (meter order,
group bounds, pair codes) are NumPy arrays on the host; results per transformer come back in the
inputs' namespace, shape ``(n_transformers,)``. The labelled entry point is
:func:`phaseid_hpc.validation.validate_transformers`, which documents the method and the flags.

Meters are handled in the order ``order`` (mapped meters sorted by transformer), in chunks of whole
transformers (:func:`meter_chunks`): ``(i0, i1, g0, g1)`` are the positions ``i0:i1`` in that order and the
non-empty transformer groups ``g0:g1``. Sums over the meters of a group are one sparse product on NumPy
(scipy's CSR product reads the block once, row by row) and one dense one-hot GEMM elsewhere
(:func:`weighted_row_sums`).

Units: power [kW], [kvar], [kVA]; voltage [V] or [pu]; temperatures [degC]; times as sample indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from .._compat import array_namespace, to_numpy
from . import thermal
from .correlation import fisher_z

__all__ = [
    "MeterGroups",
    "fill_time_gaps",
    "level_step",
    "level_steps",
    "loading_statistics",
    "longest_lost_run",
    "lost_windows",
    "meter_chunks",
    "minus_load_part",
    "neighbourhood_median",
    "pair_power",
    "reference_of_transformer",
    "row_quantile",
    "set_rows",
    "siblings_agree",
    "take_rows",
    "thermal_summary",
    "transformer_health",
    "transformer_levels",
    "transformer_loading",
    "transformer_power",
    "usual_correlation",
    "weighted_row_sums",
    "window_correlation",
]

#: Transformers per call of the thermal model (float32; bounds the temporaries to ~12 MB each).
THERMAL_CHUNK = 1024
#: Meters per chunk of the per-meter passes (whole transformers; keeps the temporaries in cache).
METER_CHUNK = 512


# ---------------------------------------------------------------------------------------------------------
# small helpers


def _is_numpy(x: Any) -> bool:
    return isinstance(x, np.ndarray)


def _host(x: Any) -> np.ndarray:
    """A small array (per transformer or per meter) on the host as NumPy."""
    return to_numpy(x)


def _index(xp: Any, idx: np.ndarray) -> Any:
    """A host index vector in namespace ``xp`` (as int64)."""
    return xp.asarray(np.asarray(idx, dtype=np.int64))


def take_rows(x: Any, rows: np.ndarray) -> Any:
    """Rows ``rows`` (host index vector) of ``x``."""
    xp = array_namespace(x)
    return xp.take(x, _index(xp, rows), axis=0)


def set_rows(x: Any, rows: np.ndarray, values: Any) -> Any:
    """``x`` with rows ``rows`` (host, unique) replaced by ``values``: in place on NumPy and CuPy, else by
    one take and ``where`` (namespaces without integer-array assignment, e.g. array-api-strict)."""
    xp = array_namespace(x)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return x
    if _is_numpy(x) or type(x).__module__.startswith("cupy"):
        x[_index(xp, rows)] = values
        return x
    pos = np.full(x.shape[0], -1, dtype=np.int64)
    pos[rows] = np.arange(rows.size)
    hit = xp.asarray(pos >= 0)
    values = xp.broadcast_to(xp.asarray(values, dtype=x.dtype), (rows.size, *x.shape[1:]))
    src = xp.take(values, _index(xp, np.maximum(pos, 0)), axis=0)
    return xp.where(xp.reshape(hit, (-1,) + (1,) * (x.ndim - 1)), src, x)


def _mean64(x: Any, axis: int) -> Any:
    """Mean along ``axis`` accumulated in float64."""
    if _is_numpy(x):
        return x.mean(axis=axis, dtype=np.float64)
    xp = array_namespace(x)
    return xp.mean(xp.astype(x, xp.float64), axis=axis)


def _count(mask: Any, axis: int) -> Any:
    xp = array_namespace(mask)
    return xp.astype(xp.count_nonzero(mask, axis=axis), xp.int64)


def _take_cols(x: Any, cols: Any) -> Any:
    """``x[i, cols[i]]`` for each row ``i``."""
    xp = array_namespace(x)
    return xp.take_along_axis(x, cols[:, None], axis=1)[:, 0]


def meter_chunks(
    group_start: np.ndarray, n_items: int, size: int = METER_CHUNK
) -> list[tuple[int, int, int, int]]:
    """Split contiguous groups into chunks of about ``size`` items made of whole groups.

    Parameters
    ----------
    group_start : ndarray of int, shape (n_groups,)
        First item of each non-empty group, ascending (host).
    n_items : int
        Items in all.
    size : int
        Items per chunk (a group larger than that is a chunk of its own).

    Returns
    -------
    list of (item_start, item_stop, group_start, group_stop)
    """
    out = []
    g = 0
    n_g = group_start.size
    while g < n_g:
        i0 = int(group_start[g])
        g1 = max(int(np.searchsorted(group_start, i0 + size, side="left")), g + 1)
        i1 = int(group_start[g1]) if g1 < n_g else n_items
        out.append((i0, i1, g, g1))
        g = g1
    return out


@dataclass(frozen=True)
class MeterGroups:
    """The mapped meters of a block sorted by transformer (host index tables).

    Attributes
    ----------
    order : ndarray of int, shape (n_mapped,)
        Row of each mapped meter in the block, sorted by transformer (stable).
    identity : bool
        ``order`` is ``arange(n_mapped)`` (rows are then read as views).
    tx_sorted : ndarray of int, shape (n_mapped,)
        Transformer of each meter in ``order``.
    n_meters : ndarray of int, shape (n_tx,)
        Meters per transformer.
    group_tx, group_start, sizes : ndarray of int, shape (n_groups,)
        Transformer, first position in ``order`` and size of each non-empty group.
    chunks : list of (i0, i1, g0, g1)
        :func:`meter_chunks`: positions ``i0:i1`` in ``order`` holding the whole groups ``g0:g1``.
    """

    order: np.ndarray
    identity: bool
    tx_sorted: np.ndarray
    n_meters: np.ndarray
    group_tx: np.ndarray
    group_start: np.ndarray
    sizes: np.ndarray
    chunks: list[tuple[int, int, int, int]]

    @classmethod
    def from_assignment(cls, tx_of_meter: np.ndarray, n_tx: int, chunk: int = METER_CHUNK) -> MeterGroups:
        """From each block row's transformer index (-1: not mapped)."""
        key = np.where(tx_of_meter >= 0, tx_of_meter, n_tx)
        n_map = int((tx_of_meter >= 0).sum())
        order = np.argsort(key, kind="stable")[:n_map]
        tx_sorted = key[order]
        n_meters = np.bincount(tx_sorted, minlength=n_tx)[:n_tx]
        group_tx = np.flatnonzero(n_meters)
        group_start = (np.cumsum(n_meters) - n_meters)[group_tx]
        return cls(
            order=order,
            identity=bool(np.array_equal(order, np.arange(n_map))),
            tx_sorted=tx_sorted,
            n_meters=n_meters,
            group_tx=group_tx,
            group_start=group_start,
            sizes=n_meters[group_tx],
            chunks=meter_chunks(group_start, n_map, chunk),
        )

    @property
    def n_tx(self) -> int:
        return int(self.n_meters.size)

    def rows(self, x: Any, i0: int, i1: int) -> Any:
        """Rows ``order[i0:i1]`` of the block array ``x`` (a view when the order is the identity)."""
        return x[i0:i1, ...] if self.identity else take_rows(x, self.order[i0:i1])

    def local_group(self, g0: int, g1: int) -> np.ndarray:
        """Group of each meter of groups ``g0:g1``, counted from 0 (host)."""
        return np.repeat(np.arange(g1 - g0), self.sizes[g0:g1])


def weighted_row_sums(x: Any, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, n_rows: int) -> Any:
    """``M @ x`` for the sparse ``(n_rows, x.shape[0])`` matrix ``M`` with ``weights`` at ``(rows, cols)``.

    Parameters
    ----------
    x : array, shape (n, n_time)
    rows, cols : ndarray of int, shape (n_entries,)
        Host; the entries of a row are summed in the order given.
    weights : ndarray, shape (n_entries,)
        Host; their dtype is the dtype of the sums.
    n_rows : int

    Returns
    -------
    array, shape (n_rows, n_time)
        On NumPy scipy's CSR product (each row's entries accumulated in order); elsewhere a dense
        ``(n_rows, n)`` matrix product.
    """
    n = x.shape[0]
    if _is_numpy(x):
        return sparse.csr_array((weights, (rows, cols)), shape=(n_rows, n)) @ x
    xp = array_namespace(x)
    dense = np.zeros((n_rows, n), dtype=weights.dtype)
    np.add.at(dense, (rows, cols), weights)
    return xp.asarray(dense) @ xp.astype(x, xp.asarray(dense).dtype)


def _group_sums(x: Any, group: np.ndarray, n_groups: int, dtype: Any) -> Any:
    """Sum of the rows of ``x`` by ``group`` (host labels ``0..n_groups-1``), accumulated in ``dtype``."""
    return weighted_row_sums(x, group, np.arange(group.size), np.ones(group.size, dtype=dtype), n_groups)


def _segment_sums(x: Any, start: np.ndarray) -> Any:
    """Sums of the contiguous row segments of ``x`` starting at ``start`` (exact for integer counts)."""
    xp = array_namespace(x)
    if x.shape[1] == 0:
        return xp.zeros((start.size, 0), dtype=x.dtype)
    cs = xp.cumulative_sum(x, axis=0, include_initial=True)
    bounds = np.append(start, x.shape[0])
    return take_rows(cs, bounds[1:]) - take_rows(cs, bounds[:-1])


# ---------------------------------------------------------------------------------------------------------
# power


def fill_time_gaps(x: Any) -> tuple[Any, Any]:
    """Linear interpolation along time of NaN samples, constant at the ends, 0 for rows without data.

    Parameters
    ----------
    x : array, shape (n_rows, n_time)
        NaN = missing. [any unit]

    Returns
    -------
    filled : array, shape (n_rows, n_time)
        A copy with every NaN filled, in the input's float dtype (float64 for other dtypes).
    n_valid : array of int, shape (n_rows,)
        Real (not NaN) samples per row.

    Notes
    -----
    Works on the runs of consecutive NaN samples (after one ``isnan`` pass, the cost is in the number of
    holes): a hole in a run between samples ``p`` and ``q`` gets ``x[p] + (x[q] - x[p]) (i - p) / (q - p)``.
    """
    xp = array_namespace(x)
    n, n_t = x.shape
    dt = x.dtype if x.dtype in (xp.float32, xp.float64) else xp.float64
    out = xp.astype(x, dt, copy=True)
    miss = xp.isnan(out)
    n_valid = n_t - _count(miss, 1)
    flat_miss = xp.reshape(miss, (-1,))
    holes = xp.nonzero(flat_miss)[0]
    if holes.shape[0] == 0:
        return out, n_valid
    flat = xp.reshape(out, (-1,))
    row = holes // max(n_t, 1)
    first_of_run = xp.concat(
        [xp.ones((1,), dtype=xp.bool), (holes[1:] - holes[:-1] != 1) | (row[1:] != row[:-1])]
    )
    run = xp.cumulative_sum(xp.astype(first_of_run, xp.int64)) - 1
    last_of_run = xp.concat([first_of_run[1:], xp.ones((1,), dtype=xp.bool)])
    first, last = holes[first_of_run], holes[last_of_run]
    has_prev = (first % n_t) != 0
    has_next = (last % n_t) != n_t - 1
    prev = xp.where(has_prev, first - 1, 0)
    nxt = xp.where(has_next, last + 1, 0)
    both = has_prev & has_next
    span = xp.where(both, nxt - prev, 1)
    hp, hn, hb = (xp.take(a, run) for a in (has_prev, has_next, both))
    x_prev, x_next = xp.take(xp.take(flat, prev), run), xp.take(xp.take(flat, nxt), run)
    frac = xp.astype(holes - xp.take(prev, run), xp.float64) / xp.astype(xp.take(span, run), xp.float64)
    fill = xp.where(hb, x_prev + (x_next - x_prev) * frac, xp.where(hp, x_prev, xp.where(hn, x_next, 0.0)))
    flat[flat_miss] = xp.astype(fill, dt)
    return xp.reshape(flat, (n, n_t)), n_valid


def pair_power(
    kw: Any,
    kvar: Any | None,
    groups: MeterGroups,
    pairs: dict[str, np.ndarray],
    *,
    tan_phi: float,
) -> tuple[Any, Any | None, Any]:
    """Active and reactive power of each loaded (transformer, phase) pair, gaps filled.

    Parameters
    ----------
    kw, kvar : array, shape (n_meters, n_time)
        Meter power, NaN = missing (``kvar`` may be None). [kW], [kvar]
    groups : MeterGroups
        The mapped meters sorted by transformer.
    pairs : dict of host arrays
        ``entry_meter, entry_pair, entry_weight`` (one entry per meter and phase it loads, by meter
        position in ``groups.order``, ascending) and ``codes`` (``3 * transformer + phase`` of each pair,
        ascending).
    tan_phi : float
        ``tan(acos(power factor))`` for meters without kvar. [-]

    Returns
    -------
    p_pair : array, shape (n_pairs, n_time)
        ``sum_m w_m P_m`` (``w``: 1, 1/2 or 1/3 by the meter's phases). [kW]
    q_pair : array, shape (n_pairs, n_time) or None
        The same for Q (``P tan_phi`` for a meter without any kvar sample); None without ``kvar``. [kvar]
    kw_real : array of int, shape (n_mapped,)
        Real kW samples of each meter, in ``order``.
    """
    xp = array_namespace(kw)
    n_t = kw.shape[1]
    work = xp.float32 if kw.dtype == xp.float32 else xp.float64
    codes, group_tx = pairs["codes"], groups.group_tx
    e_meter, e_pair, e_weight = pairs["entry_meter"], pairs["entry_pair"], pairs["entry_weight"]
    w_host = e_weight.astype(np.float32 if work == xp.float32 else np.float64)
    p_pair = xp.zeros((codes.size, n_t), dtype=work)
    q_pair = None if kvar is None else xp.zeros((codes.size, n_t), dtype=work)
    kw_real = []
    for i0, i1, g0, g1 in groups.chunks:
        p0, p1 = (int(v) for v in np.searchsorted(codes, [3 * group_tx[g0], 3 * (group_tx[g1 - 1] + 1)]))
        e0, e1 = (int(v) for v in np.searchsorted(e_meter, [i0, i1]))
        ent = (e_pair[e0:e1] - p0, e_meter[e0:e1] - i0, w_host[e0:e1], p1 - p0)
        p, n_real = fill_time_gaps(xp.astype(groups.rows(kw, i0, i1), work, copy=False))
        kw_real.append(n_real)
        p_pair[p0:p1, ...] = weighted_row_sums(p, *ent)
        if q_pair is not None:
            kv = xp.astype(groups.rows(kvar, i0, i1), work, copy=False)
            has_q = xp.any(xp.isfinite(kv), axis=1)
            q, _ = fill_time_gaps(kv)
            q_pair[p0:p1, ...] = weighted_row_sums(
                xp.where(has_q[:, None], q, p * xp.asarray(tan_phi, dtype=work)), *ent
            )
    kw_real = xp.concat(kw_real) if kw_real else xp.zeros((0,), dtype=xp.int64)
    return p_pair, q_pair, kw_real


def transformer_power(p_pair: Any, pair_tx: np.ndarray, n_tx: int) -> Any:
    """Active power of each transformer, the sum of its pairs' (zero without a loaded pair).

    Parameters
    ----------
    p_pair : array, shape (n_pairs, n_time)
        From :func:`pair_power`. [kW]
    pair_tx : ndarray of int, shape (n_pairs,)
        Transformer of each pair, ascending (host).
    n_tx : int

    Returns
    -------
    array, shape (n_tx, n_time), dtype of ``p_pair`` [kW]
        One sparse product on NumPy; elsewhere a sum over each transformer's (at most three) pairs, so no
        ``(n_tx, n_pairs)`` matrix is formed.
    """
    if _is_numpy(p_pair):
        return _group_sums(p_pair, pair_tx, n_tx, p_pair.dtype.type)
    xp = array_namespace(p_pair)
    first = np.searchsorted(pair_tx, np.arange(n_tx))
    count = np.searchsorted(pair_tx, np.arange(n_tx), side="right") - first
    out = xp.zeros((n_tx, p_pair.shape[1]), dtype=p_pair.dtype)
    last = max(p_pair.shape[0] - 1, 0)
    for k in range(int(count.max()) if count.size else 0):
        has = xp.asarray(count > k)[:, None]
        out = xp.where(has, out + take_rows(p_pair, np.minimum(first + k, last)), out)
    return out


def _multi_pair_sums(
    p_pair: Any, q_pair: Any | None, pair_tx: np.ndarray, multi: np.ndarray, tan_phi: float
) -> Any:
    """``|sum_p P_p + j sum_p Q_p|`` of the transformers ``multi`` (several loaded pairs), rows in order.

    A transformer's pairs (at most three) are added as ``P_a + (P_b + P_c)``, the order of NumPy's
    ``add.reduceat``.
    """
    xp = array_namespace(p_pair)
    first = np.searchsorted(pair_tx, multi)
    n_pairs = np.searchsorted(pair_tx, multi, side="right") - first

    def total(x: Any) -> Any:
        tail = take_rows(x, first + n_pairs - 1)
        for k in range(int(n_pairs.max()) - 2, 0, -1):
            has = xp.asarray(n_pairs > k + 1)[:, None]
            tail = xp.where(has, take_rows(x, np.minimum(first + k, x.shape[0] - 1)) + tail, tail)
        return take_rows(x, first) + tail

    p_sum = total(p_pair)
    q_sum = p_sum * xp.asarray(tan_phi, dtype=p_pair.dtype) if q_pair is None else total(q_pair)
    return xp.hypot(p_sum, q_sum)


def _multi_pair_max(s_pair: Any, pair_tx: np.ndarray, multi: np.ndarray) -> Any:
    """``max_p S_p`` of the transformers ``multi``, rows in order."""
    xp = array_namespace(s_pair)
    first = np.searchsorted(pair_tx, multi)
    n_pairs = np.searchsorted(pair_tx, multi, side="right") - first
    out = take_rows(s_pair, first)
    for k in range(1, int(n_pairs.max())):
        out = xp.maximum(out, take_rows(s_pair, np.where(n_pairs > k, first + k, first)))
    return out


def transformer_loading(
    p_pair: Any,
    q_pair: Any | None,
    pair_tx: np.ndarray,
    n_tx: int,
    three_phase: np.ndarray,
    rating_kva: np.ndarray,
    *,
    tan_phi: float,
) -> dict[str, Any]:
    """Load and loading of each transformer from its pairs' power.

    Parameters
    ----------
    p_pair, q_pair : array, shape (n_pairs, n_time)
        From :func:`pair_power` (``p_pair`` may be overwritten). [kW], [kvar]
    pair_tx : ndarray of int, shape (n_pairs,)
        Transformer of each pair, ascending (host).
    n_tx : int
    three_phase : ndarray of bool, shape (n_tx,)
        3-phase banks (host).
    rating_kva : ndarray, shape (n_tx,)
        Rating, NaN where unusable (host). [kVA]
    tan_phi : float

    Returns
    -------
    dict
        ``loading`` (n_tx, n_time) [pu] (NaN rows without rating), ``peak_kva, mean_kva`` (n_tx,) [kVA] and
        ``pair_mean`` (n_pairs,) [kVA], the mean ``S_p`` of each pair.

    Notes
    -----
    ``S = |sum P + j sum Q|``; loading ``S / rating`` (single-phase) or ``3 max_p S_p / rating`` (bank).
    Without ``q_pair`` ``Q = P tan_phi`` everywhere, so ``S_p = |P_p| / cos(phi)`` (computed in place).
    """
    xp = array_namespace(p_pair)
    work = p_pair.dtype
    n_pairs, n_t = p_pair.shape
    n_pairs_tx = np.bincount(pair_tx, minlength=n_tx)[:n_tx]
    multi = np.flatnonzero(n_pairs_tx > 1)
    s_multi = _multi_pair_sums(p_pair, q_pair, pair_tx, multi, tan_phi) if multi.size and n_t else None
    if q_pair is None:
        if _is_numpy(p_pair):
            s_pair = np.abs(p_pair, out=p_pair)
            s_pair *= work.type(math.hypot(1.0, tan_phi))
        else:
            s_pair = xp.abs(p_pair) * xp.asarray(math.hypot(1.0, tan_phi), dtype=work)
    else:
        s_pair = xp.hypot(p_pair, q_pair)
    pair_mean = _mean64(s_pair, 1) if n_t else xp.zeros((n_pairs,), dtype=xp.float64)
    pair_max = (
        xp.astype(xp.max(s_pair, axis=1), xp.float64, copy=False)
        if n_t and n_pairs
        else xp.zeros((n_pairs,), dtype=xp.float64)
    )
    pair_first = np.searchsorted(pair_tx, np.arange(n_tx))
    scale = np.where(three_phase, 3.0, 1.0) / rating_kva
    one = np.flatnonzero(n_pairs_tx == 1)  # one pair: S is that pair's S_p
    peak_kva = set_rows(xp.zeros((n_tx,), dtype=xp.float64), one, take_rows(pair_max, pair_first[one]))
    mean_kva = set_rows(xp.zeros((n_tx,), dtype=xp.float64), one, take_rows(pair_mean, pair_first[one]))
    if one.size == n_tx:  # every unit has one loaded pair (single-phase feeders): scale S in place
        loading = s_pair
        loading *= xp.asarray(scale.astype(np.float32 if work == xp.float32 else np.float64))[:, None]
    else:
        loading = xp.zeros((n_tx, n_t), dtype=work)
        s_one = take_rows(s_pair, pair_first[one]) * xp.astype(xp.asarray(scale[one, None]), work)
        loading = set_rows(loading, one, s_one)
    if s_multi is not None:
        peak_kva = set_rows(peak_kva, multi, xp.astype(xp.max(s_multi, axis=1), xp.float64))
        mean_kva = set_rows(mean_kva, multi, _mean64(s_multi, 1))
        s_max = _multi_pair_max(s_pair, pair_tx, multi)
        bank = xp.asarray(three_phase[multi, None])
        loading = set_rows(
            loading, multi, xp.where(bank, s_max, s_multi) * xp.astype(xp.asarray(scale[multi, None]), work)
        )
    no_rating = np.isnan(rating_kva)
    if no_rating.any():
        loading = set_rows(loading, np.flatnonzero(no_rating), xp.asarray(float("nan"), dtype=work))
    return {"loading": loading, "peak_kva": peak_kva, "mean_kva": mean_kva, "pair_mean": pair_mean}


def row_quantile(x: Any, q: float, nan_rows: Any) -> Any:
    """Quantile ``q`` of each row of ``x`` (linear method, as ``numpy.quantile``), NaN for ``nan_rows``.

    Parameters
    ----------
    x : array, shape (n, n_time)
    q : float
        In [0, 1].
    nan_rows : array of bool, shape (n,)
        Rows holding a NaN (their result is NaN).

    Returns
    -------
    array, float64, shape (n,)
        From the two order statistics around ``q (n_time - 1)`` (one ``partition`` on NumPy, a sort
        elsewhere).
    """
    xp = array_namespace(x)
    n_t = x.shape[1]
    pos = q * (n_t - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n_t - 1)
    part = np.partition(x, sorted({lo, hi}), axis=1) if _is_numpy(x) else xp.sort(x, axis=1, stable=False)
    a, b = xp.astype(part[:, lo], xp.float64), xp.astype(part[:, hi], xp.float64)
    return xp.where(nan_rows, xp.nan, a + (b - a) * (pos - lo))


def loading_statistics(loading: Any) -> dict[str, Any]:
    """Peak, 99th percentile and mean of each row of ``loading``.

    Parameters
    ----------
    loading : array, shape (n_tx, n_time)
        NaN rows for units without a rating. [pu]

    Returns
    -------
    dict of float64 arrays, shape (n_tx,)
        ``peak``, ``p99`` (:func:`row_quantile`) and ``mean`` [pu]; NaN on NaN rows (``peak`` and ``p99``
        are None without samples).
    """
    xp = array_namespace(loading)
    n, n_t = loading.shape
    if n_t == 0:
        return {"peak": None, "p99": None, "mean": xp.full((n,), xp.nan, dtype=xp.float64)}
    mean = _mean64(loading, 1)
    return {
        "peak": xp.astype(xp.max(loading, axis=1), xp.float64),
        "p99": row_quantile(loading, 0.99, xp.isnan(mean)),
        "mean": mean,
    }


# ---------------------------------------------------------------------------------------------------------
# thermal


def thermal_summary(
    loading: Any,
    ok: Any,
    ambient_c: Any,
    interval_min: float,
    *,
    standard: str,
    insulation: str,
    hot_spot_normal_c: float,
    hot_spot_emergency_c: float,
    params: dict[str, float],
) -> dict[str, Any]:
    """Thermal model and ageing of the rows ``ok`` of ``loading``, in chunks of :data:`THERMAL_CHUNK` rows.

    Parameters
    ----------
    loading : array, shape (n_tx, n_time)
        Load factor, finite on the rows ``ok``. [pu]
    ok : array of bool, shape (n_tx,)
    ambient_c : float or array, shape (n_time,)
        Ambient temperature. [degC]
    interval_min : float
        Grid step. [min]
    standard : {"iec", "ieee"}
        :func:`~phaseid_hpc.kernels.thermal.iec_temperatures` or
        :func:`~phaseid_hpc.kernels.thermal.ieee_temperatures`.
    insulation : {"thermally_upgraded", "normal"}
        Ageing law (:func:`~phaseid_hpc.kernels.thermal.relative_aging_rate`).
    hot_spot_normal_c, hot_spot_emergency_c : float
        Limits whose exceedance is counted. [degC]
    params : dict
        Every keyword of the thermal model (:func:`~phaseid_hpc.kernels.thermal.thermal_parameters`).

    Returns
    -------
    dict of arrays, shape (n_tx,)
        ``max_top_oil_c, max_hot_spot_c`` [degC], ``hours_above_normal, hours_above_emergency`` [h], ``f_eqa``
        [-], ``loss_of_life_h`` [h]; NaN (hours: 0) outside ``ok``. The model runs in float32.
    """
    xp = array_namespace(loading)
    model = {"iec": thermal.iec_temperatures, "ieee": thermal.ieee_temperatures}[standard]
    n, n_t = loading.shape
    rows_ok = np.flatnonzero(_host(ok))
    interval_h = interval_min / 60.0
    parts: dict[str, list[Any]] = {k: [] for k in _THERMAL_KEYS}
    limits = (("hours_above_normal", hot_spot_normal_c), ("hours_above_emergency", hot_spot_emergency_c))
    for start in range(0, rows_ok.size, THERMAL_CHUNK):
        k = xp.astype(take_rows(loading, rows_ok[start : start + THERMAL_CHUNK]), xp.float32, copy=False)
        top_oil, hot_spot = model(k, ambient_c, interval_min, **params)
        hot_max = xp.max(hot_spot, axis=1)
        parts["max_top_oil_c"].append(xp.astype(xp.max(top_oil, axis=1), xp.float64))
        parts["max_hot_spot_c"].append(xp.astype(hot_max, xp.float64))
        for key, limit in limits:
            hours = xp.zeros((k.shape[0],), dtype=xp.float64)
            hot = hot_max > limit  # only units that get there need the count
            if bool(xp.any(hot)):
                hours[hot] = xp.astype(_count(hot_spot[hot] > limit, 1), xp.float64) * interval_h
            parts[key].append(hours)
        rate = thermal.relative_aging_rate(hot_spot, insulation)
        f_eqa = _mean64(rate, 1)
        bad = xp.isnan(f_eqa)
        if bool(xp.any(bad)):  # NaN-aware mean where a sample is NaN
            f_eqa[bad] = xp.astype(thermal.equivalent_aging_factor(rate[bad]), xp.float64)
        parts["f_eqa"].append(f_eqa)
        parts["loss_of_life_h"].append(f_eqa * (n_t * interval_h))
    ok_mask = xp.asarray(np.isin(np.arange(n), rows_ok))
    out = {}
    for key, chunks in parts.items():
        fill = 0.0 if key.startswith("hours") else float("nan")
        full = xp.full((n,), fill, dtype=xp.float64)
        if chunks:
            full[ok_mask] = xp.concat(chunks)
        out[key] = full
    return out


_THERMAL_KEYS = (
    "max_top_oil_c",
    "max_hot_spot_c",
    "hours_above_normal",
    "hours_above_emergency",
    "f_eqa",
    "loss_of_life_h",
)


# ---------------------------------------------------------------------------------------------------------
# health: voltage-level steps


def transformer_levels(voltage: Any, groups: MeterGroups) -> dict[str, Any]:
    """Pass 1 over the meters: each meter's level and the sums of ``v_pu`` per transformer.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        NaN, zero or negative = missing. [V]
    groups : MeterGroups

    Returns
    -------
    dict
        ``inv_level`` (n_mapped,) float64: 1 / the meter's mean valid voltage (0 without data) [1/V];
        ``tx_sum, tx_cnt`` (n_tx, n_time) float32: the sum of ``v_pu = v * inv_level`` over a transformer's
        meters and how many were valid [pu], [-]; ``clean`` (list of bool): chunks with every sample valid.
    """
    xp = array_namespace(voltage)
    f32 = xp.float32
    n_t = voltage.shape[1]
    tx_sum = xp.zeros((groups.n_tx, n_t), dtype=f32)
    tx_cnt = xp.zeros((groups.n_tx, n_t), dtype=f32)
    inv_level, clean = [], []
    for i0, i1, g0, g1 in groups.chunks:
        v = groups.rows(voltage, i0, i1)
        local = groups.local_group(g0, g1)
        tx = groups.group_tx[g0:g1]
        ok_all = bool(v.shape[0] * n_t) and bool(xp.min(v) > 0) and bool(xp.isfinite(xp.max(v)))
        clean.append(ok_all)
        if ok_all:
            inv = n_t / xp.astype(xp.sum(v, axis=1), xp.float64)
            vpu0 = xp.astype(v * xp.astype(inv, v.dtype)[:, None], f32, copy=False)
            cnt = xp.asarray(groups.sizes[g0:g1].astype(np.float32))[:, None]
            tx_cnt = set_rows(tx_cnt, tx, xp.broadcast_to(cnt, (g1 - g0, n_t)))
        else:
            valid = (v > 0) & (v < xp.inf)
            v0 = xp.where(valid, v, 0.0)
            n_ok = xp.astype(_count(valid, 1), xp.float64)
            total = xp.astype(xp.sum(v0, axis=1), xp.float64)
            inv = xp.where(n_ok > 0, n_ok / xp.where(n_ok > 0, total, 1.0), 0.0)
            vpu0 = xp.astype(v0 * xp.astype(inv, v0.dtype)[:, None], f32, copy=False)
            tx_cnt = set_rows(tx_cnt, tx, _group_sums(xp.astype(valid, f32), local, g1 - g0, np.float32))
        inv_level.append(inv)
        tx_sum = set_rows(tx_sum, tx, _group_sums(vpu0, local, g1 - g0, np.float32))
    inv_level = xp.concat(inv_level) if inv_level else xp.zeros((0,), dtype=xp.float64)
    return {"inv_level": inv_level, "tx_sum": tx_sum, "tx_cnt": tx_cnt, "clean": clean}


def neighbourhood_median(tx_mean: Any, feeder_start: np.ndarray, *, k: int, chunk: int = 32) -> Any:
    """Per transformer and sample, the median of the ``k`` other transformers of its feeder that follow it best.

    Parameters
    ----------
    tx_mean : array, shape (n_tx, n_time)
        Mean ``v_pu`` of each transformer's meters, NaN = missing; transformers sorted by feeder. [pu]
    feeder_start : ndarray of int, shape (n_feeders,)
        First transformer of each feeder (host).
    k : int
        Neighbours whose median is taken.
    chunk : int
        Transformers per correlation product.

    Returns
    -------
    array, shape (n_tx, n_time)
        NaN-aware median of the mean ``v_pu`` of the ``k`` transformers whose differenced mean correlates
        best with the transformer's own; NaN where the feeder has no other. [pu]

    Notes
    -----
    Behind a line regulator, or on a lateral, the neighbourhood is the zone or lateral itself: a
    regulator's tap moves the reference with the unit and is no fault of the unit's.
    """
    xp = array_namespace(tx_mean)
    n_tx, n_t = tx_mean.shape
    out = xp.full(tx_mean.shape, xp.nan, dtype=tx_mean.dtype)
    bounds = np.append(feeder_start, n_tx)
    for f0, f1 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        m = f1 - f0
        if m <= 1:
            continue
        block = tx_mean[f0:f1, ...]
        u = _unit_rows(block[:, 1:] - block[:, :-1] if n_t > 1 else xp.zeros((m, 1), dtype=block.dtype))
        kk = min(k, m - 1)
        for a in range(0, m, chunk):
            b = min(a + chunk, m)
            c = u[a:b, ...] @ u.T
            itself = xp.arange(b - a)[:, None] + a == xp.arange(m)[None, :]
            c = xp.where(itself, -xp.inf, c)  # never itself
            nb = xp.argsort(-c, axis=1, stable=True)[:, :kk]
            out[f0 + a : f0 + b, ...] = _median_of_rows(block, nb)
    return out


def _unit_rows(d: Any) -> Any:
    """Rows of ``d`` centred (NaN-aware, NaN then 0) and scaled to unit norm (zero rows stay zero), float64."""
    xp = array_namespace(d)
    fin = xp.isfinite(d)
    n_fin = xp.astype(xp.maximum(_count(fin, 1), 1), xp.float64)[:, None]
    mean = xp.sum(xp.where(fin, d, 0.0), axis=1, keepdims=True) / n_fin
    d = xp.where(fin, d - mean, 0.0)
    norm = xp.sqrt(xp.sum(d * d, axis=1, keepdims=True))
    return d / xp.where(norm > 0, norm, 1.0)


def _median_of_rows(block: Any, nb: Any) -> Any:
    """``out[i, t]``: NaN-aware median over ``j`` of ``block[nb[i, j], t]`` (NaN where none is finite)."""
    xp = array_namespace(block)
    rows, kk = nb.shape
    n_t = block.shape[1]
    picked = xp.reshape(xp.take(block, xp.reshape(nb, (-1,)), axis=0), (rows, kk, n_t))
    s = xp.sort(picked, axis=1, stable=False)  # NaN last
    nv = _count(xp.isfinite(picked), 1)
    lo, hi = xp.maximum(nv - 1, 0) // 2, xp.minimum(nv // 2, kk - 1)
    med = 0.5 * (
        xp.take_along_axis(s, lo[:, None, :], axis=1) + xp.take_along_axis(s, hi[:, None, :], axis=1)
    )
    return xp.where(nv > 0, med[:, 0, :], xp.nan)


def minus_load_part(offset: Any, load: Any) -> Any:
    """``offset`` less its least-squares fit on ``load``, per row (NaN-aware).

    Parameters
    ----------
    offset : array, shape (n, n_time)
        Voltage level of a transformer relative to its neighbourhood. [pu]
    load : array, shape (n, n_time)
        Its active power. [kW]

    Returns
    -------
    array, shape (n, n_time), dtype of ``offset``
        ``offset - b (load - mean load)`` with ``b`` the least-squares slope over the samples where both
        are finite (0 where undefined): the level the unit's own load explains through its impedance is
        removed, so that a load switching on or off is not read as a tap step. [pu]
    """
    xp = array_namespace(offset, load)
    ok = xp.isfinite(offset) & xp.isfinite(load)
    n_ok = xp.astype(_count(ok, 1), xp.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        lm = xp.sum(xp.where(ok, load, 0.0), axis=1) / n_ok
        om = xp.sum(xp.where(ok, offset, 0.0), axis=1) / n_ok
        dl = xp.where(ok, load - lm[:, None], 0.0)
        do = xp.where(ok, offset - om[:, None], 0.0)
        slope = xp.sum(dl * do, axis=1) / xp.sum(dl * dl, axis=1)
    slope = xp.where(xp.isfinite(slope), slope, 0.0)
    lm0 = xp.where(xp.isnan(lm), 0.0, lm)
    fit = slope[:, None] * xp.where(xp.isfinite(load), load - lm0[:, None], 0.0)
    return offset - xp.astype(fit, offset.dtype, copy=False)


def level_step(offset: Any, window: int) -> tuple[Any, Any]:
    """Largest difference between the means of two adjacent windows (two-window step detector).

    Parameters
    ----------
    offset : array, shape (n, n_time)
        Level per sample, NaN = missing. [pu]
    window : int
        Samples per window. [samples]

    Returns
    -------
    step : array, float64, shape (n,)
        ``max_i |mean(offset[i : i + w]) - mean(offset[i - w : i])|`` over windows with at least ``w // 2``
        valid samples; NaN where there is none (or ``n_time < 2 w``). [pu]
    index : array of int, shape (n,)
        The split ``i`` (first sample after the step), -1 where ``step`` is NaN.

    Notes
    -----
    Window sums come from one float64 cumulative sum per row; with every sample valid
    ``|S(i, i + w) - S(i - w, i)| = |2 cs[i] - cs[i - w] - cs[i + w]|``, scaled once.
    """
    xp = array_namespace(offset)
    w = window
    n, n_t = offset.shape
    if n_t < 2 * w:
        return xp.full((n,), xp.nan, dtype=xp.float64), xp.full((n,), -1, dtype=xp.int64)
    valid = xp.isfinite(offset)
    all_valid = bool(xp.all(valid))
    x = offset if all_valid else xp.where(valid, offset, 0.0)
    cs = xp.cumulative_sum(x, axis=1, dtype=xp.float64, include_initial=True)
    if all_valid:
        d = xp.abs(cs[:, w : n_t + 1 - w] * 2.0 - cs[:, : n_t + 1 - 2 * w] - cs[:, 2 * w :])
        split = xp.argmax(d, axis=1)
        return _take_cols(d, split) / w, split + w
    cn = xp.cumulative_sum(xp.astype(valid, xp.int64), axis=1, include_initial=True)
    s, c = cs[:, w:] - cs[:, :-w], xp.astype(cn[:, w:] - cn[:, :-w], xp.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = xp.where(c >= w // 2, s / c, xp.nan)
    d = xp.abs(m[:, w:] - m[:, : m.shape[1] - w])  # window ending at split vs window starting at split
    fin = xp.isfinite(d)
    any_ok = xp.any(fin, axis=1)
    split = xp.argmax(xp.where(fin, d, -1.0), axis=1)
    step = xp.where(any_ok, _take_cols(d, split), xp.nan)
    return step, xp.where(any_ok, split + w, -1)


def level_steps(
    tx_mean: Any,
    rest_level: Any,
    tx_load: Any | None,
    rows: np.ndarray,
    *,
    window: int,
    chunk: int = METER_CHUNK,
) -> tuple[Any, Any]:
    """:func:`level_step` of ``tx_mean - rest_level`` (less the load's part) for the transformers ``rows``.

    Returns ``(step, index)`` of shape (n_tx,): NaN and -1 outside ``rows``. Rows go in chunks of ``chunk``.
    """
    xp = array_namespace(tx_mean)
    n_tx = tx_mean.shape[0]
    step = xp.full((n_tx,), xp.nan, dtype=xp.float64)
    split = xp.full((n_tx,), -1, dtype=xp.int64)
    for a in range(0, rows.size, chunk):
        sel = rows[a : a + chunk]
        offset = take_rows(tx_mean, sel) - take_rows(rest_level, sel)
        if tx_load is not None:
            offset = minus_load_part(offset, take_rows(tx_load, sel))
        s, i = level_step(offset, window)
        step, split = set_rows(step, sel, s), set_rows(split, sel, i)
    return step, split


# ---------------------------------------------------------------------------------------------------------
# health: correlation loss


def window_correlation(a: Any, b: Any, window: int) -> Any:
    """Pearson correlation of the rows of ``a`` and ``b`` in consecutive windows.

    Parameters
    ----------
    a, b : array, shape (n, n_win * window)
        NaN = missing.
    window : int
        Samples per window.

    Returns
    -------
    array, float64, shape (n, n_win)
        Over the samples valid in both; NaN where fewer than ``window // 2`` are (or a series is constant).
        Products in float32, sums in float64.
    """
    xp = array_namespace(a, b)
    w = window
    n, span = a.shape
    both = xp.isfinite(a) & xp.isfinite(b)
    A = xp.reshape(xp.astype(xp.where(both, a, 0.0), xp.float32, copy=False), (-1, w))
    B = xp.reshape(xp.astype(xp.where(both, b, 0.0), xp.float32, copy=False), (-1, w))
    cnt = xp.astype(_count(xp.reshape(both, (-1, w)), 1), xp.float64)
    sa, sb = xp.sum(A, axis=1, dtype=xp.float64), xp.sum(B, axis=1, dtype=xp.float64)
    if _is_numpy(A):
        sab, saa, sbb = (np.einsum("ij,ij->i", x, y).astype(np.float64) for x, y in ((A, B), (A, A), (B, B)))
    else:
        sab, saa, sbb = (xp.astype(xp.vecdot(x, y, axis=-1), xp.float64) for x, y in ((A, B), (A, A), (B, B)))
    with np.errstate(invalid="ignore", divide="ignore"):
        rc = (cnt * sab - sa * sb) / xp.sqrt((cnt * saa - sa * sa) * (cnt * sbb - sb * sb))
    return xp.reshape(xp.where(cnt >= w // 2, rc, xp.nan), (n, span // w if w else 0))


def reference_of_transformer(tx_sorted: np.ndarray, ref_of_meter: np.ndarray, n_tx: int) -> np.ndarray:
    """Row of the reference table of each transformer (host): ``n_tx + r`` where all its meters share the
    feeder-head reference ``r``, else itself (the rest of its feeder, row ``tx``).

    ``ref_of_meter`` (aligned with ``tx_sorted``) is -1 for a meter without a feeder-head reference.
    """
    ref_tx = np.arange(n_tx)
    if tx_sorted.size == 0:
        return ref_tx
    lo = np.full(n_tx, np.iinfo(np.int64).max)
    hi = np.full(n_tx, -1)
    np.minimum.at(lo, tx_sorted, ref_of_meter)
    np.maximum.at(hi, tx_sorted, ref_of_meter)
    shared = (lo == hi) & (hi >= 0)
    return np.where(shared, n_tx + hi, ref_tx)


def siblings_agree(
    voltage: Any,
    groups: MeterGroups,
    levels: dict[str, Any],
    *,
    window: int,
    lead: int,
    min_correlation: float,
) -> Any:
    """Pass 2 over the meters: per transformer and window, whether every meter still follows its siblings.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        [V]
    groups : MeterGroups
    levels : dict
        From :func:`transformer_levels`.
    window, lead : int
        Samples per window and differenced samples before the first window.
    min_correlation : float
        A meter whose differenced ``v_pu`` correlates less than this with the mean of its siblings'
        (NaN: no sibling or no data, does not object) does not follow them. [-]

    Returns
    -------
    array of bool, shape (n_tx, n_win)
        True where no meter of the transformer departs (a cause common to the unit).
    """
    xp = array_namespace(voltage)
    f32 = xp.float32
    n_t = voltage.shape[1]
    n_win = (n_t - 1) // window
    agree = xp.ones((groups.n_tx, n_win), dtype=xp.bool)
    if n_win == 0:
        return agree
    tx_sum, tx_cnt, inv_level = levels["tx_sum"], levels["tx_cnt"], levels["inv_level"]
    for ci, (i0, i1, g0, g1) in enumerate(groups.chunks):
        v = groups.rows(voltage, i0, i1)[:, lead:]
        if not levels["clean"][ci]:
            v = xp.where((v > 0) & (v < xp.inf), v, xp.nan)
        vpu = xp.astype(v * inv_level[i0:i1, None], f32, copy=False)
        g = groups.tx_sorted[i0:i1]
        fin = xp.isfinite(vpu)
        own = xp.where(fin, vpu, 0.0)
        rest_cnt = take_rows(tx_cnt, g)[:, lead:] - xp.astype(fin, f32)
        with np.errstate(invalid="ignore", divide="ignore"):
            sib = xp.where(rest_cnt > 0, (take_rows(tx_sum, g)[:, lead:] - own) / rest_cnt, xp.nan)
        r_m = window_correlation(vpu[:, 1:] - vpu[:, :-1], sib[:, 1:] - sib[:, :-1], window)
        departs = xp.astype(r_m < min_correlation, xp.float64)
        n_departs = _group_sums(departs, groups.local_group(g0, g1), g1 - g0, np.float64)
        agree = set_rows(agree, groups.group_tx[g0:g1], n_departs == 0)
    return agree


def window_scale(d: Any, window: int) -> Any:
    """Typical size of each row in consecutive windows: the median absolute value (NaN ignored).

    Parameters
    ----------
    d : array, shape (n, n_time)
        Differenced series, NaN = missing. [any unit]
    window : int
        Samples per window; the last ``n_time % window`` samples are left out (pass the series from the first
        window's start).

    Returns
    -------
    array, shape (n, n_time // window)
        NaN where a window has no finite sample. [unit of ``d``]
    """
    from .change_point import windowed
    from .quality import nanmedian

    return nanmedian(windowed(array_namespace(d).abs(d), window), axis=-1)


def noisy_windows(scale_tx: Any, scale_ref: Any, factor: float) -> Any:
    """Windows in which a transformer fluctuates more than usual against its reference.

    Parameters
    ----------
    scale_tx, scale_ref : array, shape (n_tx, n_win)
        :func:`window_scale` of each transformer's differenced mean and of its reference's. [pu]
    factor : float
        A window is noisy where ``scale_tx / scale_ref`` exceeds ``factor`` times the unit's usual ratio: its
        quietest window out of at most 8, else the lower quartile of its windows (the mirror of
        :func:`usual_correlation`). 0: none is. [-]

    Returns
    -------
    array of bool, shape (n_tx, n_win)

    Notes
    -----
    A winding or connection that adds noise of its own (0.5% per sample) raises a unit's typical step
    several fold, in every window from the fault on; a unit whose own load dominates its voltage (correlation
    with the feeder head 0.3-0.6 when healthy) loses too little correlation for :func:`lost_windows` alone.
    The reference's own size in the same window takes out what moves the whole feeder (weather, an LTC).
    """
    xp = array_namespace(scale_tx)
    if factor <= 0 or scale_tx.shape[1] == 0:
        return xp.zeros(scale_tx.shape, dtype=xp.bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = xp.where(scale_ref > 0, scale_tx / xp.where(scale_ref > 0, scale_ref, 1.0), xp.nan)
    usual = -usual_correlation(-ratio)
    return xp.isfinite(ratio) & (usual > 0)[:, None] & (ratio > factor * usual[:, None])


def usual_correlation(r_tx: Any) -> Any:
    """A transformer's usual correlation with its reference: its best window out of at most 8, else the
    upper quartile of its windows (at least the second-best); NaN without a finite window.

    Parameters
    ----------
    r_tx : array, shape (n_tx, n_win)
        Correlation per window, NaN = undefined. [-]

    Returns
    -------
    array, shape (n_tx,) [-]
    """
    xp = array_namespace(r_tx)
    finite = xp.isfinite(r_tx)
    n_fin = _count(finite, 1)
    if r_tx.shape[1] == 0:
        return xp.full((r_tx.shape[0],), xp.nan, dtype=xp.float64)
    ranked = xp.sort(xp.where(finite, r_tx, xp.inf), axis=1, stable=False)  # finite first
    top = xp.where(
        n_fin <= 8, 1, xp.maximum(2, xp.astype(xp.ceil(0.25 * xp.astype(n_fin, xp.float64)), xp.int64))
    )
    rank = xp.maximum(n_fin - top, 0)
    return xp.where(n_fin > 0, _take_cols(ranked, rank), xp.nan)


def lost_windows(
    r_tx: Any,
    agree: Any,
    enough: Any,
    feeder_start: np.ndarray,
    feeder_code: np.ndarray,
    *,
    window: int,
    min_correlation: float,
    loss_se: float,
    noisy: Any | None = None,
) -> Any:
    """Windows in which a transformer lost correlation with its reference for a cause of its own.

    Parameters
    ----------
    r_tx : array, shape (n_tx, n_win)
        Correlation of each transformer's differenced mean with its reference per window. [-]
    agree : array of bool, shape (n_tx, n_win)
        :func:`siblings_agree`.
    enough : array of bool, shape (n_tx,)
        Transformers with enough meters for the check.
    feeder_start, feeder_code : ndarray of int
        First transformer of each feeder, feeder of each transformer (host; transformers sorted by feeder).
    window : int
        Samples per window (the standard error of Fisher z is ``1 / sqrt(window - 3)``).
    min_correlation, loss_se : float
        See :class:`phaseid_hpc.config.ValidationConfig` (``health_min_correlation``, ``health_loss_se``).
    noisy : array of bool, shape (n_tx, n_win), optional
        :func:`noisy_windows`: such a window is lost too (same conditions on siblings and feeder).

    Returns
    -------
    array of bool, shape (n_tx, n_win)
        Lost: correlation below ``min_correlation``, or (where the unit's usual correlation
        :func:`usual_correlation` reaches ``min_correlation``) below half of it and ``loss_se`` standard
        errors of Fisher z below it; while its meters still follow each other, and in a window that less
        than half of the rest of its feeder lost too.
    """
    xp = array_namespace(r_tx)
    usual = usual_correlation(r_tx)
    z_drop = fisher_z(usual, limit=0.999)[:, None] - fisher_z(r_tx, limit=0.999)
    ok = enough[:, None] & xp.isfinite(r_tx)
    z_se = loss_se / math.sqrt(max(window - 3, 1))
    fell = (usual >= min_correlation)[:, None] & (z_drop > z_se) & (r_tx < 0.5 * usual[:, None])
    lost = ok & agree & ((r_tx < min_correlation) | fell | (False if noisy is None else noisy))
    ok_f, lost_f = xp.astype(ok, xp.float64), xp.astype(lost, xp.float64)
    rest_ok = take_rows(_segment_sums(ok_f, feeder_start), feeder_code) - ok_f
    rest_lost = take_rows(_segment_sums(lost_f, feeder_start), feeder_code) - lost_f
    with np.errstate(invalid="ignore", divide="ignore"):
        rest_frac = xp.where(rest_ok > 0, rest_lost / rest_ok, 0.0)
    return lost & (rest_frac < 0.5)


def longest_lost_run(win_lost: Any) -> tuple[Any, Any]:
    """Longest run of consecutive lost windows per transformer and the window it starts in (-1: none).

    Parameters
    ----------
    win_lost : array of bool, shape (n_tx, n_win)

    Returns
    -------
    longest : array of int, shape (n_tx,)
    start : array of int, shape (n_tx,)
        The first such run where several are as long.
    """
    xp = array_namespace(win_lost)
    n_tx, n_win = win_lost.shape
    run = xp.zeros((n_tx,), dtype=xp.int64)
    longest = xp.zeros((n_tx,), dtype=xp.int64)
    start = xp.full((n_tx,), -1, dtype=xp.int64)
    for j in range(n_win):  # windows are few (days); vectorised over transformers
        run = xp.where(win_lost[:, j], run + 1, 0)
        better = run > longest
        start = xp.where(better, j - run + 1, start)
        longest = xp.where(better, run, longest)
    return longest, start


def _reference_windows(tx_mean: Any, rest_level: Any, groups: MeterGroups, ref_of_meter: np.ndarray,
                       references_pu: Any, lead: int, *, window: int, noise_factor: float) -> tuple[Any, Any]:
    """Each transformer's differenced mean against its reference, per window from sample ``lead + 1``: the
    correlation (:func:`window_correlation`, shape (n_tx, n_win)) and, with ``noise_factor``, the
    :func:`noisy_windows` (None without). The reference is the feeder head of its meters' phase where they
    share one (:func:`reference_of_transformer`), else its neighbourhood ``rest_level``. [pu]"""
    xp = array_namespace(tx_mean)
    n_tx, n_t = tx_mean.shape
    if (n_t - 1) // window == 0:
        return xp.zeros((n_tx, 0), dtype=xp.float64), None
    refs = references_pu[:, 1:] - references_pu[:, :-1]
    table = xp.concat([rest_level[:, 1:] - rest_level[:, :-1], xp.astype(refs, rest_level.dtype)], axis=0)
    ref_tx = (reference_of_transformer(groups.tx_sorted, ref_of_meter, n_tx) if refs.shape[0]
              else np.arange(n_tx))
    tx_diff = (tx_mean[:, 1:] - tx_mean[:, :-1])[:, lead:]
    ref_diff = take_rows(table, ref_tx)[:, lead:]
    r_tx = window_correlation(tx_diff, ref_diff, window)
    if noise_factor <= 0:
        return r_tx, None
    return r_tx, noisy_windows(window_scale(tx_diff, window), window_scale(ref_diff, window), noise_factor)


def transformer_health(
    voltage: Any,
    groups: MeterGroups,
    feeder_code: np.ndarray,
    ref_of_meter: np.ndarray,
    references_pu: Any,
    tx_load: Any | None,
    *,
    window: int,
    min_meters: int,
    min_correlation: float,
    loss_se: float,
    neighbours: int,
    noise_factor: float = 0.0,
) -> dict[str, Any]:
    """Voltage-level step and correlation loss of each transformer.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage, NaN (or <= 0) = missing. [V]
    groups : MeterGroups
        The mapped meters by transformer (transformers sorted by feeder).
    feeder_code : ndarray of int, shape (n_tx,)
        Feeder of each transformer (host; equal codes contiguous).
    ref_of_meter : ndarray of int, shape (n_mapped,)
        Row of ``references_pu`` of each meter in ``groups.order`` (the feeder head of its phase), -1: none.
    references_pu : array, shape (n_refs, n_time)
        Feeder-head voltages over their means. [pu]
    tx_load : array, shape (n_tx, n_time), optional
        Active power of each transformer (its part of the level is removed before the step search). [kW]
    window, min_meters, min_correlation, loss_se
        ``health_window``, ``health_min_meters``, ``health_min_correlation``, ``health_loss_se`` of
        :class:`phaseid_hpc.config.ValidationConfig`.
    neighbours : int
        Transformers of the feeder whose median is the level reference (:func:`neighbourhood_median`).
    noise_factor : float
        ``health_noise_factor`` (:func:`noisy_windows`; 0: off).

    Returns
    -------
    dict of arrays, shape (n_tx,)
        ``voltage_step_pu`` [pu] and ``voltage_step_index`` (first sample after the step, -1: none),
        ``correlation_lost_windows`` (longest run of lost windows) and ``correlation_first_lost`` (its first
        sample, -1: none); transformers with fewer than ``min_meters`` meters get NaN / -1 / 0.

    Notes
    -----
    The steps: :func:`transformer_levels` (pass 1 over the meters: each transformer's mean ``v_pu``),
    :func:`neighbourhood_median` (its level reference), :func:`level_steps`, :func:`_reference_windows`
    (the correlation of its differenced mean with its reference, and the noisy windows, in windows ending at
    the last sample),
    :func:`siblings_agree` (pass 2), :func:`lost_windows` and :func:`longest_lost_run`.
    """
    xp = array_namespace(voltage)
    n_t = voltage.shape[1]
    n_tx = groups.n_tx
    if n_tx == 0 or n_t == 0:
        return {
            "voltage_step_pu": xp.full((n_tx,), xp.nan, dtype=xp.float64),
            "voltage_step_index": xp.full((n_tx,), -1, dtype=xp.int64),
            "correlation_lost_windows": xp.zeros((n_tx,), dtype=xp.int64),
            "correlation_first_lost": xp.full((n_tx,), -1, dtype=xp.int64),
        }
    levels = transformer_levels(voltage, groups)
    tx_sum, tx_cnt = levels["tx_sum"], levels["tx_cnt"]
    feeder_start = np.flatnonzero(np.r_[True, feeder_code[1:] != feeder_code[:-1]])
    enough_h = groups.n_meters >= min_meters
    enough = xp.asarray(enough_h)
    with np.errstate(invalid="ignore", divide="ignore"):
        tx_mean = xp.where(tx_cnt > 0, tx_sum / xp.where(tx_cnt > 0, tx_cnt, 1.0), xp.nan)
    rest_level = neighbourhood_median(tx_mean, feeder_start, k=neighbours)
    step, split = level_steps(tx_mean, rest_level, tx_load, np.flatnonzero(enough_h), window=window)
    # windows end at the last sample (an ongoing fault is seen in full windows)
    lead = n_t - 1 - ((n_t - 1) // window) * window
    r_tx, noisy = _reference_windows(tx_mean, rest_level, groups, ref_of_meter, references_pu, lead,
                                     window=window, noise_factor=noise_factor)
    agree = siblings_agree(voltage, groups, levels, window=window, lead=lead, min_correlation=min_correlation)
    win_lost = lost_windows(
        r_tx,
        agree,
        enough,
        feeder_start,
        feeder_code,
        window=window,
        min_correlation=min_correlation,
        loss_se=loss_se,
        noisy=noisy,
    )
    longest, start = longest_lost_run(win_lost)
    return {
        "voltage_step_pu": xp.where(enough, step, xp.nan),
        "voltage_step_index": xp.where(enough, split, -1),
        "correlation_lost_windows": xp.where(enough, longest, 0),
        "correlation_first_lost": xp.where(longest > 0, lead + 1 + window * start, -1),
    }
