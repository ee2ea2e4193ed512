"""Array kernels of the meter-to-transformer decision (the steps above :mod:`.transformer_grouping`).

:mod:`phaseid_hpc.transformer_mapping` calls these in the order of its method: group pools
(:class:`GroupPools`), each meter's evidence against its own and its GIS group (:func:`loo_fisher_z`,
:func:`group_mean`, :func:`leave_one_out_group_mean`), the best and runner-up candidate
(:func:`candidate_correlations`, :func:`best_two`), the move rules (:func:`move_candidates`,
:func:`level_evidence`, :func:`level_consistent`, :func:`shares_own_signal`, :func:`apply_moves`), the
sub-groups split off a GIS group before the first round (:func:`split_off`), orphans linked into new groups
(:func:`orphan_components`), the confidence (:func:`assignment_lead`, :func:`lead_confidence`) and the
coherence of the final groups (:func:`final_coherence`).

Two kinds of array meet here:

* **signals** ``z`` (unit-norm differenced voltage), ``vc``/``ic`` (centred level signals), shape
  ``(n_meters, n_time)``, in any array-API namespace (NumPy, CuPy, array-api-strict); they are only gathered,
  summed and multiplied in their own namespace, never copied whole to the host;
* **tables**, one value per meter or per group (assignment, weights, standard errors, Fisher z): small, and
  the greedy decisions walk them, so :class:`GroupPools`, :func:`split_off` and :func:`shares_own_signal`
  keep them as NumPy arrays on the host. The meter-by-group products ``S`` of :class:`GroupPools` and the
  candidate matrix built from them stay with the signals. The table kernels (:func:`group_mean`,
  :func:`best_two`, :func:`move_candidates`, ...) take the namespace from their inputs like every other
  kernel.

Correlations are compared in Fisher-z units of one standard error ``se = 1 / sqrt(n - 6)``
(:func:`phaseid_hpc.kernels.correlation.fisher_z`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._compat import array_namespace, to_numpy
from . import transformer_grouping as tg
from .correlation import fisher_z

__all__ = [
    "GroupPools",
    "MoveCandidates",
    "apply_moves",
    "assignment_lead",
    "best_two",
    "candidate_correlations",
    "far_from_groups",
    "final_coherence",
    "fisher_se",
    "fisher_z_or",
    "group_mean",
    "group_medians",
    "group_phase_mask",
    "group_sum",
    "lead_confidence",
    "leave_one_out_group_mean",
    "level_consistent",
    "level_evidence",
    "loo_fisher_z",
    "median",
    "move_candidates",
    "orphan_components",
    "pair_reference",
    "partial_from_dots",
    "phase_disjoint",
    "set_block",
    "set_pairs",
    "set_rows",
    "shares_own_signal",
    "split_off",
    "unrelated_to_gis",
]


# ---------------------------------------------------------------------------------------------------------
# helpers for repeated idioms
# ---------------------------------------------------------------------------------------------------------


def _native(xp: Any) -> bool:
    """Whether ``xp`` has NumPy's ``bincount`` and in-place integer-array assignment (NumPy, CuPy)."""
    from array_api_compat import is_cupy_namespace, is_numpy_namespace

    return is_numpy_namespace(xp) or is_cupy_namespace(xp)


def group_sum(index: Any, n_groups: int, weights: Any | None = None) -> Any:
    """Sum of ``weights`` (count without) per group.

    Parameters
    ----------
    index : array of int, shape (n,)
        Group of each element in ``0 .. n_groups - 1``.
    n_groups : int
    weights : array of float, shape (n,), optional

    Returns
    -------
    array, shape (n_groups,)
        float64 sums with ``weights``, int64 counts without; summed in element order (``bincount``) where the
        namespace has it.
    """
    xp = array_namespace(index)
    if _native(xp):
        return xp.bincount(index, weights=weights, minlength=n_groups)
    hot = index[:, None] == xp.arange(n_groups, dtype=index.dtype)[None, :]
    if weights is None:
        return xp.sum(xp.astype(hot, xp.int64), axis=0)
    w = xp.astype(weights, xp.float64)
    return xp.sum(xp.where(hot, w[:, None], 0.0), axis=0)


def group_mean(values: Any, index: Any, include: Any, n_groups: int) -> tuple[Any, Any, Any]:
    """Mean of ``values`` over the included members of every group.

    Parameters
    ----------
    values : array of float, shape (n,)
    index : array of int, shape (n,)
        Group of each element.
    include : array of bool, shape (n,)
        Elements that count (the others may be NaN).
    n_groups : int

    Returns
    -------
    mean : array, shape (n_groups,)
        NaN for a group without an included element.
    total, count : array, shape (n_groups,)
        Sum and number of the included values.
    """
    xp = array_namespace(values, index)
    total = group_sum(index[include], n_groups, values[include])
    count = group_sum(index[include], n_groups)
    mean = xp.where(count > 0, total / xp.astype(xp.maximum(count, 1), total.dtype), xp.nan)
    return mean, total, count


def leave_one_out_group_mean(values: Any, index: Any, include: Any, n_groups: int) -> Any:
    """Mean of ``values`` over the *other* included members of each element's group (NaN: none).

    Parameters
    ----------
    values, index, include, n_groups
        As in :func:`group_mean`.

    Returns
    -------
    array, shape (n,)
    """
    xp = array_namespace(values, index)
    _, total, count = group_mean(values, index, include, n_groups)
    rest = xp.take(count, index) - xp.astype(include, count.dtype)
    own = xp.where(include, values, 0.0)
    return xp.where(
        rest > 0, (xp.take(total, index) - own) / xp.astype(xp.maximum(rest, 1), total.dtype), xp.nan
    )


def median(x: Any) -> Any:
    """Median of a 1-D array without NaN (the mean of the two middle values for an even count)."""
    xp = array_namespace(x)
    s = xp.sort(x)
    n = s.shape[0]
    if n % 2:
        return s[n // 2]
    return (s[n // 2 - 1] + s[n // 2]) / 2


def group_medians(values: Any, index: Any, n_groups: int) -> Any:
    """NaN-skipping median of ``values`` per group ``0 .. n_groups - 1`` (NaN for a group without a value).

    Parameters
    ----------
    values : array of float, shape (n,)
    index : array of int, shape (n,)
    n_groups : int

    Returns
    -------
    array of float64, shape (n_groups,)
    """
    xp = array_namespace(values, index)
    v = xp.astype(values, xp.float64)
    ok = ~xp.isnan(v)
    v, g = v[ok], index[ok]
    # by group, then by value: a stable sort on the value, then on the group
    by_value = xp.argsort(v, stable=True)
    order = xp.take(by_value, xp.argsort(xp.take(g, by_value), stable=True))
    s = xp.take(v, order)
    count = group_sum(g, n_groups)
    start = xp.cumulative_sum(count) - count
    has = count > 0
    last = max(s.shape[0] - 1, 0)
    lo = xp.clip(start + (count - 1) // 2, 0, last)
    hi = xp.clip(start + count // 2, 0, last)
    if s.shape[0] == 0:
        return xp.full((n_groups,), xp.nan, dtype=xp.float64)
    mid = (xp.take(s, hi) + xp.take(s, lo)) / 2
    return xp.where(has, xp.where(count % 2 == 1, xp.take(s, hi), mid), xp.nan)


def set_pairs(a: Any, cols: Any, values: Any, rows: Any | None = None) -> Any:
    """``a[rows[k], cols[k]] = values[k]`` (``rows`` default: every row in order); returns the result.

    Parameters
    ----------
    a : array, shape (n, m)
    cols : array of int, shape (k,)
    values : array, shape (k,), or float
    rows : array of int, shape (k,), optional
        Distinct rows.

    Notes
    -----
    NumPy and CuPy assign in place; other namespaces build a new array with ``where`` (the small index
    arrays are taken to the host for that).
    """
    xp = array_namespace(a)
    if _native(xp):
        a[xp.arange(a.shape[0]) if rows is None else rows, cols] = values
        return a
    n, m = a.shape
    if rows is None:
        col_of = cols
        vals = values if isinstance(values, float) else xp.astype(values, a.dtype)
    else:
        rows_h = to_numpy(rows).astype(np.int64)
        col_h = np.full(n, -1, np.int64)
        col_h[rows_h] = to_numpy(cols)
        col_of = xp.asarray(col_h)
        if isinstance(values, float):
            vals = values
        else:
            pos = np.zeros(n, np.int64)
            pos[rows_h] = np.arange(len(rows_h))
            vals = xp.take(xp.astype(values, a.dtype), xp.asarray(pos))
    hit = xp.reshape(col_of, (-1, 1)) == xp.arange(m, dtype=col_of.dtype)[None, :]
    return xp.where(hit, vals if isinstance(vals, float) else vals[:, None], a)


def set_rows(a: Any, rows: np.ndarray, values: Any) -> Any:
    """``a[rows] = values`` along the first axis, ``rows`` a host array of distinct indices; returns the result.

    NumPy and CuPy assign in place; other namespaces build a new array with ``where``.
    """
    xp = array_namespace(a)
    if _native(xp):
        a[xp.asarray(rows)] = values
        return a
    n = a.shape[0]
    pos = np.zeros(n, np.int64)
    hit = np.zeros(n, bool)
    pos[rows] = np.arange(len(rows))
    hit[rows] = True
    mask = xp.reshape(xp.asarray(hit), (n,) + (1,) * (a.ndim - 1))
    return xp.where(mask, xp.take(values, xp.asarray(pos), axis=0), a)


def set_block(a: Any, rows: np.ndarray | None, cols: np.ndarray, values: Any) -> Any:
    """``a[rows x cols] = values`` (the block of the listed rows and columns; ``rows`` None: all rows).

    Parameters
    ----------
    a : array, shape (n, m)
    rows : ndarray of int, shape (r,), or None
        Distinct rows (host).
    cols : ndarray of int, shape (c,)
        Distinct columns (host).
    values : array, shape (r, c), or float

    Returns
    -------
    array, shape (n, m)
        ``a`` itself on NumPy and CuPy (assigned in place), else a new array.
    """
    xp = array_namespace(a)
    n, m = a.shape
    if _native(xp):
        if rows is None:
            a[:, xp.asarray(cols)] = values
        else:
            a[xp.ix_(xp.asarray(rows), xp.asarray(cols))] = values
        return a
    rows_h = np.arange(n) if rows is None else np.asarray(rows)
    rpos, cpos = np.zeros(n, np.int64), np.zeros(m, np.int64)
    rhit, chit = np.zeros(n, bool), np.zeros(m, bool)
    rpos[rows_h], cpos[cols] = np.arange(len(rows_h)), np.arange(len(cols))
    rhit[rows_h], chit[cols] = True, True
    mask = xp.asarray(rhit)[:, None] & xp.asarray(chit)[None, :]
    if isinstance(values, float):
        return xp.where(mask, values, a)
    spread = xp.take(xp.take(xp.astype(values, a.dtype), xp.asarray(rpos), axis=0), xp.asarray(cpos), axis=1)
    return xp.where(mask, spread, a)


def _row_pick(a: Any, cols: Any) -> Any:
    """``a[i, cols[i]]`` for every row ``i``."""
    xp = array_namespace(a)
    return xp.take_along_axis(a, xp.reshape(cols, (-1, 1)), axis=1)[:, 0]


def fisher_se(n_valid: Any) -> Any:
    """Standard error of a Fisher z from ``n`` valid samples: ``1 / sqrt(max(n - 6, 10))`` [-].

    Six degrees of freedom go to the three-phase common mode and the centring, ``sqrt(n - 3)`` being Fisher's.
    """
    xp = array_namespace(n_valid)
    return 1.0 / xp.sqrt(xp.maximum(n_valid - 6.0, 10.0))


def fisher_z_or(r: Any, fill: float) -> Any:
    """:func:`~phaseid_hpc.kernels.correlation.fisher_z` of ``r`` where it is finite, else ``fill``."""
    xp = array_namespace(r)
    return xp.where(xp.isfinite(r), fisher_z(r, xp=xp), fill)


def unrelated_to_gis(zo: Any, kappa_gis_loo: Any, se: Any, *, unrelated_se: float, min_corr_se: float) -> Any:
    """Meters that do not move with their GIS group while the group's other members do (arrays (n,)).

    ``zo`` below ``unrelated_se`` standard errors and the others' mean ``kappa_gis_loo`` above ``min_corr_se``;
    False where either is NaN.
    """
    xp = array_namespace(zo)
    return xp.isfinite(zo) & (zo < unrelated_se * se) & (kappa_gis_loo > min_corr_se * se)


def level_consistent(level_best: Any, level_ref: Any, tolerance: float) -> Any:
    """The level check: the residual at the target is at most ``tolerance`` times the reference (or undefined).

    Parameters
    ----------
    level_best, level_ref : array, shape (m,)
        :func:`level_evidence`. [V]
    tolerance : float
        [-]
    """
    xp = array_namespace(level_best, level_ref)
    return ~(xp.isfinite(level_best) & xp.isfinite(level_ref)) | (level_best <= tolerance * level_ref)


# ---------------------------------------------------------------------------------------------------------
# group pools
# ---------------------------------------------------------------------------------------------------------


class GroupPools:
    """Pooled signal (and level) sums of every group for the current assignment, rebuilt only where it changed.

    Holds ``P_g = sum_j w_j z_j`` and ``L_g = sum_j w_j vc_j`` (rows: groups, in the namespace of ``z``),
    every meter's dot with its own group's pool (``own``), ``||P_g||^2`` (``pn2``) and, when ``row_blocks``
    are given, the meter-by-group dot products ``S = z P^T`` on the phase-compatible (meter, group) blocks
    (NaN elsewhere; also in the namespace of ``z``). The assignment, weights, ``own`` and ``pn2`` are host
    tables. After meters move only the groups that gained or lost a meter (or a pool weight) are
    re-summed and only their columns of ``S`` recomputed: a round costs ``O(n_meters n_time n_changed)``
    instead of ``O(n_meters n_time n_groups)``.

    Parameters
    ----------
    z : array, shape (n_meters, n_time)
        Unit-norm shape signals (:func:`.transformer_grouping.differenced_signals`).
    vc : array, shape (n_meters, n_time), or None
        Centred level voltage (:func:`.transformer_grouping.level_signals`) [V]; ``None``: no level sums.
    n_groups : int
    row_blocks : list of (int, ndarray, array)
        ``(phase bit or 0, meter rows, z rows)`` blocks on which ``S`` is kept: groups whose phase mask has
        the bit (or no phase) are computed; an empty list keeps no ``S``.
    ic : array, shape (n_meters, n_time), optional
        Centred load-current proxy [A].
    row_stats : tuple of array, optional
        ``(vc.vc, ic.ic, ic.vc)`` per meter.
    """

    def __init__(self, z, vc, n_groups, row_blocks, *, ic=None, row_stats=None):
        self.z, self.vc, self.ic, self.n_g = z, vc, ic, n_groups
        self.xp = array_namespace(z)
        self.row_stats = row_stats
        self.ln2 = None
        self.row_blocks = row_blocks
        n = z.shape[0]
        self.s = self.xp.full((n, n_groups), np.nan, dtype=self.xp.float32) if row_blocks else None
        self.own = np.full(n, np.nan)
        self.pn2 = np.zeros(n_groups)
        self.lcnt = np.zeros(n_groups)
        self.pool = None
        self.lsum = None
        self.assign = None
        self.w = None

    def update(self, assign, w, gmask, same_as=None, dots=True):
        """Rebuild for assignment ``assign`` and pool weights ``w`` (host arrays, shape (n_meters,)).

        Parameters
        ----------
        gmask : ndarray of int, shape (n_groups,)
            Phase bits of every group (:func:`group_phase_mask`), to pick the ``S`` columns of a row block.
        same_as : GroupPools, optional
            Pools already built for the same ``assign`` and ``w`` (copied on the first update).
        dots : bool
            ``False``: only the own-group dots are kept current (``S`` is dropped).

        Returns
        -------
        dirty : ndarray of int
            Groups re-summed.
        """
        if not dots:
            self.s = None
        dirty = self._dirty(assign, w)
        self.assign, self.w = assign.copy(), w.copy()
        self.lcnt = np.bincount(assign, weights=w, minlength=self.n_g).astype(float)
        if len(dirty):
            if same_as is not None and self.pool is None and self.vc is None:
                self.pool = self.xp.asarray(same_as.pool, copy=True)
                self.pn2 = same_as.pn2.copy()
                self.own = same_as.own.copy()
                return dirty
            self._resum(dirty)
            if self.s is not None:
                self._recompute_s(dirty, gmask)
            flag = np.zeros(self.n_g, bool)
            flag[dirty] = True
            redo = np.flatnonzero(flag[assign] & np.isnan(self.own) if self.s is not None else flag[assign])
        else:
            redo = np.zeros(0, np.int64)
        self._own_dots(redo)
        return dirty

    def _dirty(self, assign, w):
        """Groups that gained or lost a meter or a pool weight since the last update (all on the first)."""
        if self.assign is None:
            return np.arange(self.n_g)
        ch = (assign != self.assign) | (w != self.w)
        return np.unique(np.concatenate([assign[ch], self.assign[ch]]))

    def _resum(self, dirty):
        """Re-sum the pools (and level sums) of groups ``dirty`` and their squared norms."""
        xp = self.xp
        gi, wx, cols = xp.asarray(self.assign), xp.asarray(self.w), xp.asarray(dirty)
        p = tg.group_sums(self.z, gi, self.n_g, wx, columns=cols)
        lv = None if self.vc is None else tg.group_sums(self.vc, gi, self.n_g, wx, columns=cols)
        if self.pool is None:
            self.pool, self.lsum = p, lv
        else:
            self.pool = set_rows(self.pool, dirty, p)
            if lv is not None:
                self.lsum = set_rows(self.lsum, dirty, lv)
        self.pn2[dirty] = to_numpy(xp.vecdot(p, p, axis=-1))
        if lv is not None:
            ln2 = xp.vecdot(lv, lv, axis=-1)
            if self.ln2 is None:
                self.ln2 = ln2
            else:
                self.ln2 = set_rows(self.ln2, dirty, ln2)

    def _recompute_s(self, dirty, gmask):
        """Columns ``dirty`` of ``S`` on every phase block; ``own`` read off ``S`` (NaN off the blocks)."""
        xp = self.xp
        self.s = set_block(self.s, None, dirty, float("nan"))
        for bit, rows, zrows in self.row_blocks:
            c = dirty if bit == 0 else dirty[((gmask[dirty] & bit) != 0) | (gmask[dirty] == 0)]
            if len(c):
                self.s = set_block(self.s, rows, c, zrows @ xp.take(self.pool, xp.asarray(c), axis=0).T)
        self.own = to_numpy(_row_pick(self.s, xp.asarray(self.assign))).astype(float)

    def _own_dots(self, redo):
        """Every listed meter's dot with its own group, also where the pair is not phase-compatible."""
        if not len(redo):
            return
        xp = self.xp
        assign = self.assign
        rows = None if len(redo) == len(assign) else xp.asarray(redo)
        self.own[redo] = to_numpy(tg.pair_dots(self.z, self.pool, rows, xp.asarray(assign[redo])))
        if self.s is not None:
            self.s = set_pairs(
                self.s, xp.asarray(assign[redo]), xp.asarray(self.own[redo]), rows=xp.asarray(redo)
            )

    def level(self, rows, cols):
        """Level residual [V] of meters ``rows`` (``None``: all) against groups ``cols`` (host arrays)."""
        xp = self.xp
        cols = np.asarray(cols, dtype=np.int64)
        if len(cols) == 0:
            return np.zeros(0)
        own = (self.assign if rows is None else self.assign[rows]) == cols
        rms, _slope = tg.level_consistency_pairs(
            self.vc,
            self.ic,
            self.lsum,
            xp.asarray(self.lcnt),
            None if rows is None else xp.asarray(np.asarray(rows, dtype=np.int64)),
            xp.asarray(cols),
            xp.asarray(own),
            xp.asarray(self.w),
            row_stats=self.row_stats,
            sums_norm2=self.ln2,
        )
        return to_numpy(rms).astype(float)


# ---------------------------------------------------------------------------------------------------------
# evidence of one round
# ---------------------------------------------------------------------------------------------------------


def loo_fisher_z(dots: Any, pooled_norm2: Any, weights: Any, zz: Any) -> tuple[Any, Any]:
    """Each meter's leave-one-out correlation with its own group's pool and its Fisher z.

    Parameters
    ----------
    dots : array, shape (n_meters,)
        ``z_i . P_g`` with ``g`` the meter's group (pool including the meter).
    pooled_norm2 : array, shape (n_meters,)
        ``||P_g||^2`` of that group.
    weights, zz : array, shape (n_meters,)
        Pool weights and ``||z_i||^2``.

    Returns
    -------
    corr, z : array, shape (n_meters,)
        Correlation in ``[-1, 1]`` and ``atanh`` of it; NaN where undefined. [-]
    """
    xp = array_namespace(dots)
    corr = tg.loo_correlations(dots, pooled_norm2, True, weights, zz)  # in [-1, 1]
    return corr, fisher_z(corr, xp=xp)


def candidate_correlations(
    s: Any,
    pooled_norm2: Any,
    own_corr: Any,
    assign: Any,
    gis_index: Any,
    zz: Any,
    *,
    distance_penalty: Any | None = None,
    own_excluded: Any | None = None,
) -> Any:
    """Correlation of every meter with every candidate group (NaN: not a candidate).

    Parameters
    ----------
    s : array of float32, shape (n_meters, n_groups)
        ``z_i . P_g`` (NaN off the phase-compatible blocks; not modified).
    pooled_norm2 : array, shape (n_groups,)
        ``||P_g||^2``.
    own_corr : array, shape (n_meters,)
        Leave-one-out correlation with the meter's current group (:func:`loo_fisher_z`).
    assign, gis_index : array of int, shape (n_meters,)
        Current and GIS group; the GIS group is never a candidate (it is the reference).
    zz : array, shape (n_meters,)
        ``||z_i||^2``; a flat meter (0) has no candidate.
    distance_penalty : array of float32, shape (n_meters, n_groups), optional
        NaN where the group is too far, else 0.
    own_excluded : array of bool, shape (n_meters,), optional
        Meters whose current group is not a candidate (its phase does not fit).

    Returns
    -------
    alt : array of float32, shape (n_meters, n_groups)
        ``z_i . P_g / ||P_g||`` (leave-one-out on the own group); ``-inf`` where not a candidate.
    """
    xp = array_namespace(s)
    ok = pooled_norm2 > 1e-5 * xp.maximum(pooled_norm2, 1.0)
    inv = xp.where(ok, 1.0 / xp.sqrt(xp.where(ok, pooled_norm2, 1.0)), xp.nan)
    alt = s * xp.astype(inv, xp.float32)[None, :]
    alt = set_pairs(alt, assign, xp.astype(own_corr, xp.float32))
    if distance_penalty is not None:
        alt += distance_penalty
    if own_excluded is not None:
        rows = xp.nonzero(own_excluded)[0]
        alt = set_pairs(alt, xp.take(assign, rows), float("nan"), rows=rows)
    alt[zz <= 0] = xp.nan
    alt = set_pairs(alt, gis_index, float("nan"))
    alt[xp.isnan(alt)] = -xp.inf
    return alt


def best_two(alt: Any) -> tuple[Any, Any, Any, Any]:
    """Best and runner-up candidate of every meter.

    Parameters
    ----------
    alt : array, shape (n_meters, n_groups)
        Candidate correlations, ``-inf`` where not a candidate (:func:`candidate_correlations`); the best
        entry of each row is set to ``-inf`` where the namespace allows in-place assignment.

    Returns
    -------
    best, best_corr, runner_up, runner_up_corr : array, shape (n_meters,)
        Group index (the first of equal ones) and correlation (float64, ``-inf``: none).
    """
    xp = array_namespace(alt)
    b = xp.argmax(alt, axis=1)
    cb = xp.astype(_row_pick(alt, b), xp.float64)
    alt = set_pairs(alt, b, -xp.inf)
    c2 = xp.argmax(alt, axis=1)
    c2v = xp.astype(_row_pick(alt, c2), xp.float64)
    return b, cb, c2, c2v


def group_phase_mask(letters: Any, assign: Any, weights: Any, n_groups: int) -> Any:
    """Phase bits (A 1, B 2, C 4) of every group: the letters at least half as common as its commonest.

    Parameters
    ----------
    letters : array of int, shape (n_meters, 3)
        1 where the meter serves phase A, B, C.
    assign : array of int, shape (n_meters,)
    weights : array, shape (n_meters,)
        Only members with a positive weight count.
    n_groups : int

    Returns
    -------
    array of int64, shape (n_groups,)
        0 for a group without members.
    """
    xp = array_namespace(letters, assign)
    mem = weights > 0
    a = assign[mem]
    cnt = xp.stack([group_sum(a, n_groups, letters[:, k][mem]) for k in range(3)], axis=1)
    top = xp.max(cnt, axis=1, keepdims=True)
    keep = (cnt > 0) & (cnt >= 0.5 * top)
    bits = xp.asarray([1, 2, 4], dtype=xp.int64)
    return xp.sum(xp.astype(keep, xp.int64) * bits[None, :], axis=1)


def phase_disjoint(a: Any, b: Any) -> Any:
    """Whether two phase sets, as bits (0: unknown), are both known and share no phase (broadcasting)."""
    return (a != 0) & (b != 0) & ((a & b) == 0)


def far_from_groups(lat: Any, lon: Any, group_index: Any, n_groups: int, max_distance_m: float) -> Any | None:
    """Which groups are farther than ``max_distance_m`` from each meter (group centre: median lat/lon).

    Parameters
    ----------
    lat, lon : array of float, shape (n_meters,)
        Meter position, NaN where unknown. [deg]
    group_index : array of int, shape (n_meters,)
    n_groups : int
    max_distance_m : float
        [m]

    Returns
    -------
    far : array of bool, shape (n_meters, n_groups), or None
        ``None`` when no meter has a position.

    Notes
    -----
    Great-circle distance ``d`` on a sphere of radius ``r = 6,371 km``: with unit vectors ``u``,
    ``sin^2(d / 2r) = (1 - u_m . u_g) / 2``, so ``d > D  <=>  u_m . u_g < cos(D / r)``.
    """
    xp = array_namespace(lat, group_index)
    if not bool(xp.any(xp.isfinite(lat))):
        return None

    def unit(phi, lam):
        return xp.stack([xp.cos(phi) * xp.cos(lam), xp.cos(phi) * xp.sin(lam), xp.sin(phi)], axis=1)

    rad = math.pi / 180.0
    glat = group_medians(lat, group_index, n_groups) * rad
    glon = group_medians(lon, group_index, n_groups) * rad
    u_m, u_g = unit(lat * rad, lon * rad), unit(glat, glon)
    return (u_m @ u_g.T) < math.cos(min(max_distance_m / 6_371_000.0, math.pi))


def pair_reference(zs_own: Any, assign: Any, weights: Any, n_groups: int) -> float:
    """Median Fisher z [std. errors] of members of two-meter groups (all groups when fewer than 10 such).

    Parameters
    ----------
    zs_own : array, shape (n_meters,)
        Each meter's Fisher z with its own group's leave-one-out pool. [std. errors]
    assign : array of int, shape (n_meters,)
    weights : array, shape (n_meters,)
        Members with a positive weight count.
    n_groups : int

    Returns
    -------
    float
        ``inf`` without any finite value.
    """
    xp = array_namespace(zs_own, assign)
    mem = weights > 0
    n_members = group_sum(assign[mem], n_groups)
    vals = zs_own[mem]
    keep = xp.isfinite(vals)
    pair = keep & (xp.take(n_members, assign[mem]) == 2)
    use = vals[pair] if int(xp.sum(xp.astype(pair, xp.int64))) >= 10 else vals[keep]
    return float(median(use)) if use.shape[0] else math.inf


@dataclass(frozen=True)
class MoveCandidates:
    """Which meters may move this round, before the level check.

    Attributes
    ----------
    multi : array of bool, shape (n_meters,)
        Meters with a GIS group to compare against that move with another group clearly better.
    single : array of bool, shape (n_meters,)
        Meters alone on their GIS group (or cut off it) that fit another group as its members do.
    strength : array, shape (n_meters,)
        Lead of the best candidate over the GIS group [std. errors]: the order in which moves are applied.
    """

    multi: Any
    single: Any
    strength: Any


def move_candidates(
    *,
    zb: Any,
    z2: Any,
    zo: Any,
    se: Any,
    kappa_best: Any,
    kappa_gis_loo: Any,
    phase_mismatch: Any,
    lone_target: Any,
    pair_reference_se: float,
    min_corr_se: float,
    unrelated_se: float,
    ambiguity_se: float,
    flag_margin_se: float,
    weak_gis_margin_se: float,
    singleton_fit_se: float,
    fit_floor_se: float | None = None,
) -> MoveCandidates:
    """The move rules in Fisher-z units (all arrays shape (n_meters,); ``*_se`` thresholds in std. errors).

    Parameters
    ----------
    zb, z2 : array
        Fisher z of the best (``-inf``: none) and runner-up (0: none) candidate.
    zo : array
        Fisher z with the GIS group's own remaining members (NaN: alone on it).
    se : array
        Standard error of the Fisher z. [-]
    kappa_best : array
        Mean Fisher z of the best candidate's members with their pool (NaN: fewer than two).
    kappa_gis_loo : array
        Mean Fisher z of the GIS group's other members.
    phase_mismatch : array of bool
        The meter's phase differs from its GIS group's.
    lone_target : array of bool
        The best candidate has one member.
    pair_reference_se : float
        Fisher z a lone target must reach (:func:`pair_reference` times ``pair_fit_fraction``).
    fit_floor_se : float, optional
        Least fit a meter alone on its GIS group is held to, whatever its target's members show
        (:func:`pair_reference`: the feeder's median same-transformer pair) [std. errors]. On the generated
        regulator feeders, meters rightly alone on their transformer joined a neighbour whose members were
        two transformers' (a stray among them) with confidence 0.93-0.96 (and on M1 at 30 days).

    Returns
    -------
    MoveCandidates

    Notes
    -----
    A meter with a GIS group moves when the best candidate is significant, clearly beats the runner-up,
    beats the GIS group by the margin (``weak_gis_margin_se`` when the GIS label is in doubt), and the meter
    does not move with its GIS group as the group's other members do. A meter alone on its GIS group
    joins a candidate only when it fits the candidate as the candidate's own members do.
    """
    xp = array_namespace(zb, zo)
    has_own = xp.isfinite(zo)
    weak_gis = phase_mismatch | unrelated_to_gis(
        zo, kappa_gis_loo, se, unrelated_se=unrelated_se, min_corr_se=min_corr_se
    )
    margin = xp.where(weak_gis, xp.asarray(weak_gis_margin_se, dtype=xp.float64), flag_margin_se) * se
    sig_b = xp.isfinite(zb) & (zb > min_corr_se * se)
    clear_b = (zb - z2) > ambiguity_se * se
    lone_target_ok = ~lone_target | (zb / se >= pair_reference_se)
    kappa_ref = xp.where(xp.isfinite(kappa_gis_loo), kappa_gis_loo, -xp.inf)
    fits_own = has_own & (zo > min_corr_se * se) & (zo >= kappa_ref - singleton_fit_se * se)
    lead = zb - xp.where(has_own, zo, 0.0)
    multi = has_own & ~fits_own & sig_b & clear_b & (lead > margin) & lone_target_ok
    # the bar a lone meter must clear: how its target's members hold together, and no lower than the
    # feeder's typical same-transformer pair (a target whose members hardly hold together sets no bar)
    bar = kappa_best if fit_floor_se is None else xp.maximum(kappa_best, fit_floor_se * se)
    fit_b = xp.isfinite(kappa_best) & (zb >= bar - singleton_fit_se * se)
    single = (~has_own | phase_mismatch & (zo < unrelated_se * se)) & sig_b & clear_b & fit_b
    return MoveCandidates(multi=multi, single=single, strength=lead / se)


def apply_moves(assign: Any, desired: Any, strength: Any) -> Any:
    """Apply wanted moves greedily, strongest first, without letting two moves rely on each other.

    A group that receives a meter is frozen for the rest of the round (no further arrivals or departures),
    and a group that lost a meter receives none: of two meters that would swap into each other's group only
    the stronger moves, and the pools are rebuilt before the other is judged again. A group may lose several
    strays in one round. Ties in ``strength`` go to the lower meter index; NaN is weakest, infinities rank
    as the largest finite values.

    Parameters
    ----------
    assign, desired : array of int, shape (n_meters,)
        Current and wanted group.
    strength : array of float, shape (n_meters,)

    Returns
    -------
    array of int, shape (n_meters,)
        The new assignment (a copy).
    """
    xp = array_namespace(assign, strength)
    change = xp.nonzero(desired != assign)[0]
    s = xp.take(strength, change)
    big = float(xp.finfo(s.dtype).max)
    s = xp.where(s == xp.inf, big, xp.where(s == -xp.inf, -big, s))
    key = -xp.where(xp.isnan(s), -xp.inf, s)
    order = to_numpy(xp.take(change, xp.argsort(key, stable=True))).tolist()
    src_all, dst_all = to_numpy(assign), to_numpy(desired)
    out = src_all.copy()
    received: set[int] = set()
    lost: set[int] = set()
    for i in order:
        src, dst = int(src_all[i]), int(dst_all[i])
        if src in received or dst in received or dst in lost:
            continue
        out[i] = dst
        received.add(dst)
        lost.add(src)
    return xp.asarray(out)


# ---------------------------------------------------------------------------------------------------------
# partial correlation of lone meters
# ---------------------------------------------------------------------------------------------------------


def partial_from_dots(xt: Any, xc: Any, tc: Any, xx: Any, tt: Any, cc: Any) -> Any:
    """Partial correlation of ``x`` with ``t`` given ``c``, from dot products (float64).

    Parameters
    ----------
    xt, xc, tc, xx, tt, cc : array (broadcastable) or float
        ``x.t, x.c, t.c, x.x, t.t, c.c``.

    Returns
    -------
    array
        ``(r_xt - r_xc r_tc) / sqrt((1 - r_xc^2)(1 - r_tc^2))`` with ``r_ab = a.b / sqrt(a.a b.b)``; NaN where
        a norm is 0 or ``x`` or ``t`` is (nearly) collinear with ``c``.
    """
    first = next((a for a in (xt, xc, tc, xx, tt, cc) if not isinstance(a, (int, float))), np.float64(0.0))
    xp = array_namespace(first)

    def as64(a):
        return a if getattr(a, "dtype", None) == xp.float64 else xp.asarray(a, dtype=xp.float64)

    xt, xc, tc, xx, tt, cc = (as64(a) for a in (xt, xc, tc, xx, tt, cc))

    def _r(ab, aa, bb):
        ok = (aa > 0) & (bb > 0)
        return xp.where(ok, ab / xp.sqrt(xp.where(ok, aa * bb, 1.0)), xp.nan)

    r_xt, r_xc, r_tc = _r(xt, xx, tt), _r(xc, xx, cc), _r(tc, tt, cc)
    den = (1.0 - r_xc * r_xc) * (1.0 - r_tc * r_tc)
    ok = den > 1e-12
    return xp.where(ok, (r_xt - r_xc * r_tc) / xp.sqrt(xp.where(ok, den, 1.0)), xp.nan)


def shares_own_signal(
    z: Any,
    cand: np.ndarray,
    best: np.ndarray,
    runner_up: np.ndarray,
    assign: np.ndarray,
    weights: np.ndarray,
    se: np.ndarray,
    *,
    min_corr_se: float,
    singleton_fit_se: float,
) -> np.ndarray:
    """For candidate meters ``cand``: does the meter share group ``best``'s own signal beyond the runner-up's?

    The meter's correlation with its target's pool, partialled on the runner-up's pool, must be significant
    (``min_corr_se``) and no more than ``singleton_fit_se`` below the mean of the target's members (each taken
    against the target's pool without it, same control).

    Parameters
    ----------
    z : array, shape (n_meters, n_time)
        Unit-norm signals.
    cand : ndarray of int
        Meters to test.
    best, runner_up, assign : ndarray of int, shape (n_meters,)
        Target, control group and current group of every meter.
    weights : ndarray, shape (n_meters,)
        Pool weights (members with a positive weight make the pools).
    se : ndarray, shape (n_meters,)

    Returns
    -------
    ndarray of bool, shape (n_meters,)

    Notes
    -----
    The rows of the candidates and of the members of every group involved are gathered once (float64, in
    the namespace of ``z``); the pools and dot products are formed there, one candidate at a time
    (:func:`partial_from_dots`), and only the decisions come to the host.
    """
    xp = array_namespace(z)
    ok = np.zeros(len(assign), bool)
    cand = np.asarray(cand)
    if not len(cand):
        return ok
    rows = np.flatnonzero(weights > 0)
    order = rows[np.argsort(assign[rows], kind="stable")]
    a_sorted = assign[order]
    need_g = np.unique(np.concatenate([best[cand], runner_up[cand]]))
    lo = np.searchsorted(a_sorted, need_g)
    hi = np.searchsorted(a_sorted, need_g, side="right")
    involved = np.unique(np.concatenate([cand, *[order[l_:h_] for l_, h_ in zip(lo, hi)]]))
    zrow = xp.astype(xp.take(z, xp.asarray(involved), axis=0), xp.float64)
    nrm2 = xp.vecdot(zrow, zrow, axis=-1)
    members = {}
    for g, l_, h_ in zip(need_g, lo, hi):
        k = np.searchsorted(involved, order[l_:h_])
        members[int(g)] = (order[l_:h_], k, xp.sum(xp.take(zrow, xp.asarray(k), axis=0), axis=0))
    for i in cand:
        ok[i] = _shares_one(
            i, members[int(best[i])], members[int(runner_up[i])], involved, zrow, nrm2, se[i],
            min_corr_se=min_corr_se, singleton_fit_se=singleton_fit_se,
        )  # fmt: skip
    return ok


def _shares_one(i, target, control, involved, zrow, nrm2, se_i, *, min_corr_se, singleton_fit_se) -> bool:
    """:func:`shares_own_signal` for one meter ``i``; ``target``/``control``: (members, rows, pool)."""
    xp = array_namespace(zrow)
    se_i = float(se_i)
    mem, kb, pool_b = target
    cmem, _kc, pool_c = control
    ki = int(np.searchsorted(involved, i))
    zi = zrow[ki, :]
    if i in mem:
        kb = kb[mem != i]
        pool_b = pool_b - zi
    if i in cmem:
        cmem = cmem[cmem != i]
        pool_c = pool_c - zi
    if len(cmem) == 0 or len(kb) == 0:
        return False
    bb, cc, bc = pool_b @ pool_b, pool_c @ pool_c, pool_b @ pool_c
    r_i = partial_from_dots(zi @ pool_b, zi @ pool_c, bc, nrm2[ki], bb, cc)
    z_i = fisher_z(r_i, xp=xp)
    if not bool(xp.isfinite(r_i)) or bool(z_i < min_corr_se * se_i):
        return False
    if len(kb) >= 2:
        zt = xp.take(zrow, xp.asarray(kb), axis=0)
        xb, xc, xx = zt @ pool_b, zt @ pool_c, xp.take(nrm2, xp.asarray(kb))
        # member j against its group's pool without it: target pool_b - z_j, control pool_c
        r_m = partial_from_dots(xb - xx, xc, bc - xc, xx, bb - 2 * xb + xx, cc)
        r_m = r_m[xp.isfinite(r_m)]
        if r_m.shape[0]:
            ref = float(xp.mean(fisher_z(r_m, xp=xp)))
            if bool(z_i < ref - singleton_fit_se * se_i):
                return False
    return True


# ---------------------------------------------------------------------------------------------------------
# sub-groups that do not move with the rest of their GIS group
# ---------------------------------------------------------------------------------------------------------


def split_off(
    z: Any,
    gis_index: np.ndarray,
    usable: np.ndarray,
    n_valid: np.ndarray,
    *,
    unrelated_se: float,
    min_corr_se: float,
) -> np.ndarray:
    """Meters of a GIS group that form a block of their own, uncorrelated with the rest of the group.

    A few meters of a transformer missing from GIS, labelled to one GIS transformer, prop each other up
    in the group's pool; the leave-one-out test does not see them. For every group of 4 or more usable
    meters the within-group correlation matrix is cut in two by its Fiedler vector (:func:`_fiedler_cut`);
    the smaller block is split off when the two blocks' pools are uncorrelated (Fisher z below
    ``unrelated_se``) while each block is coherent (above ``min_corr_se``, :func:`_coherent`). Groups of one
    size are done together (batched GEMM and eigensolver, in the namespace of ``z``).

    Parameters
    ----------
    z : array, shape (n_meters, n_time)
        Unit-norm signals.
    gis_index : ndarray of int, shape (n_meters,)
    usable : ndarray of bool, shape (n_meters,)
    n_valid : ndarray, shape (n_meters,)
        Valid samples per meter (the standard error uses the group's smallest). [samples]
    unrelated_se, min_corr_se : float
        Thresholds in standard errors.

    Returns
    -------
    ndarray of bool, shape (n_meters,)
        Meters split off.
    """
    xp = array_namespace(z)
    out = np.zeros(len(gis_index), bool)
    if not len(gis_index):
        return out
    rows_u = np.flatnonzero(usable)
    order = rows_u[np.argsort(gis_index[rows_u], kind="stable")]  # usable meters by group, then position
    g_sorted = gis_index[order]
    counts = np.bincount(g_sorted, minlength=int(gis_index.max()) + 1)
    big = np.flatnonzero(counts >= 4)
    for k in np.unique(counts[big]):
        gs = big[counts[big] == k]
        mem = order[np.searchsorted(g_sorted, gs)[:, None] + np.arange(k)[None, :]]  # (B, k)
        zm = xp.reshape(xp.take(z, xp.asarray(mem.reshape(-1)), axis=0), (len(gs), int(k), z.shape[1]))
        c = zm @ xp.matrix_transpose(zm)  # (B, k, k)
        se = fisher_se(n_valid[mem].min(1))  # (B,)
        small, rank_order, cand = _fiedler_cut(c, xp.asarray(se))
        if not len(cand):
            continue
        r_between = _between_correlation(c, small, cand)
        split = cand[fisher_z(r_between) / se[cand] < unrelated_se]
        c_split = to_numpy(xp.take(c, xp.asarray(split), axis=0))  # (B', k, k): a small host table
        for j, cj in zip(split, c_split):
            ro = rank_order[j]
            # block order as the one-group cut lists it (Fiedler order)
            s_idx, l_idx = ro[small[j][ro]], ro[~small[j][ro]]
            if _coherent(cj, l_idx, se[j], min_corr_se) and _coherent(cj, s_idx, se[j], min_corr_se):
                out[mem[j][s_idx]] = True
    return out


def _fiedler_cut(c: Any, se: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each ``(k, k)`` correlation matrix of a batch in two at the largest gap of its Fiedler vector.

    Parameters
    ----------
    c : array, shape (B, k, k)
        Within-group correlations.
    se : array, shape (B,)
        Standard error of each group's Fisher z.

    Returns
    -------
    small : ndarray of bool, shape (B, k)
        Members on the smaller side of the cut.
    rank_order : ndarray of int, shape (B, k)
        Members in Fiedler order (sign fixed so that the largest entry is positive).
    cand : ndarray of int
        Batch entries whose two sides differ in size.

    Notes
    -----
    Affinity: the positive Fisher z in standard errors, zero diagonal; graph Laplacian ``D - A``.
    """
    xp = array_namespace(c)
    k = c.shape[1]
    zz = fisher_z(c, xp=xp) / xp.astype(se, c.dtype)[:, None, None]
    diag = xp.eye(k, dtype=xp.bool)[None, :, :]
    aff = xp.where(diag, 0.0, xp.maximum(zz, 0.0))
    lap = xp.where(diag, xp.sum(aff, axis=2)[:, :, None], -aff)
    _, vec = xp.linalg.eigh(lap)
    f = vec[:, :, 1]
    big_abs = _row_pick(f, xp.argmax(xp.abs(f), axis=1))
    f = f * xp.where(big_abs > 0, xp.asarray(1.0, dtype=f.dtype), -1.0)[:, None]  # canonical sign
    rank_order = xp.argsort(f, axis=1, stable=True)
    gap = xp.argmax(xp.diff(xp.take_along_axis(f, rank_order, axis=1), axis=1), axis=1) + 1  # (B,)
    # side of the cut of every member: first ``gap`` in Fiedler order, or the rest
    rank_of = xp.argsort(rank_order, axis=1, stable=True)
    first = rank_of < gap[:, None]
    small = xp.where((gap < k - gap)[:, None], first, ~first)
    cand = xp.nonzero(gap != k - gap)[0]
    return to_numpy(small), to_numpy(rank_order), to_numpy(cand)


def _between_correlation(c: Any, small: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Correlation of the small side's pool with the large side's, for the batch entries ``cand``."""
    xp = array_namespace(c)
    cs = xp.astype(xp.take(c, xp.asarray(cand), axis=0), xp.float64)
    sm = xp.asarray(small[cand].astype(np.float64))
    lg = 1.0 - sm

    def quad(a, m, b_):
        return xp.sum(a[:, :, None] * m * b_[:, None, :], axis=(1, 2))

    s_small, s_large, s_cross = quad(sm, cs, sm), quad(lg, cs, lg), quad(sm, cs, lg)
    return to_numpy(s_cross / xp.sqrt(xp.maximum(s_small * s_large, 1e-12)))


def _coherent(c: np.ndarray, block: np.ndarray, se: float, min_corr_se: float) -> bool:
    """Whether a block's members move with the block's pool (mean leave-one-out Fisher z > ``min_corr_se``).

    ``c``: the group's ``(k, k)`` correlation matrix (host); ``block``: member positions in it.
    """
    if len(block) < 2:
        return True
    sub = c[np.ix_(block, block)]
    tot = sub.sum(0)  # z_j . pool, pool including j
    loo = (tot - 1.0) / np.sqrt(np.maximum(sub.sum() - 2 * tot + 1.0, 1e-12))
    return float(np.mean(fisher_z(loo))) / se > min_corr_se


# ---------------------------------------------------------------------------------------------------------
# new groups and confidence
# ---------------------------------------------------------------------------------------------------------


def orphan_components(corr: Any, se: Any, phase_bits: Any, *, min_corr_se: float) -> np.ndarray:
    """Connected components of orphans that move together (significant pairwise Fisher z).

    Parameters
    ----------
    corr : array, shape (m, m)
        Pairwise correlations of the orphans' signals.
    se : array, shape (m,)
        Standard errors; a pair links when its Fisher z exceeds ``min_corr_se`` times the larger one.
    phase_bits : array of int, shape (m,)
        Phase letters as bits (0: unknown); two orphans with known, disjoint phases never link.
    min_corr_se : float

    Returns
    -------
    ndarray of int, shape (m,)
        Component of every orphan, numbered in order of each component's first orphan.
    """
    xp = array_namespace(corr)
    thr = min_corr_se * xp.maximum(se[:, None], se[None, :])
    disjoint = phase_disjoint(phase_bits[:, None], phase_bits[None, :])
    link = to_numpy((fisher_z(corr, xp=xp) > thr) & ~disjoint)
    m = link.shape[0]
    np.fill_diagonal(link, True)
    comp = -np.ones(m, int)
    ncomp = 0
    for s in range(m):
        if comp[s] >= 0:
            continue
        stack = [s]
        comp[s] = ncomp
        while stack:
            u = stack.pop()
            for v in np.flatnonzero(link[u] & (comp < 0)):
                comp[v] = ncomp
                stack.append(v)
        ncomp += 1
    return comp


def lead_confidence(lead_se: Any) -> np.ndarray:
    """Confidence ``Phi(d / sqrt 2)`` of a lead ``d`` in standard errors (the difference of two estimates).

    Parameters
    ----------
    lead_se : array, shape (n,)
        [std. errors]

    Returns
    -------
    ndarray of float64, shape (n,)
        In ``[0, 1]``; 0.5 at no lead. Evaluated with :func:`math.erf` element by element (the values are
        written to the outputs and must not depend on the backend).
    """
    root2 = math.sqrt(2.0)
    return np.array([0.5 * (1.0 + math.erf(float(x) / root2 / root2)) for x in to_numpy(lead_se)])


def level_evidence(
    pools: GroupPools,
    rows: np.ndarray | None,
    best: np.ndarray,
    gis_index: np.ndarray,
    assign: np.ndarray,
    weights: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Level residual [V] of meters ``rows`` at their best target and the reference to compare it with.

    Parameters
    ----------
    pools : GroupPools
        Pools of the current assignment (with level sums).
    rows : ndarray of int, or None
        Meters to evaluate (``None``: all).
    best, gis_index, assign : ndarray of int, shape (n_meters,)
        Best candidate, GIS group and current group of every meter.
    weights : ndarray, shape (n_meters,)
        Pool weights.

    Returns
    -------
    level_best, level_ref : ndarray, shape (len(rows),)
        Residual at the target and the reference: the residual at the GIS group, or where that is undefined
        (the meter is alone on it) the median residual of the target's own members. [V]
    """
    n_g = pools.n_g
    b_r, o_r = (best, gis_index) if rows is None else (best[rows], gis_index[rows])
    lvl_b = pools.level(rows, b_r)
    lvl_o = pools.level(rows, o_r)
    lvl_ref = lvl_o
    lack = ~np.isfinite(lvl_o)
    if lack.any():
        flag = np.zeros(n_g, bool)
        flag[b_r[lack]] = True
        mem = np.flatnonzero((weights > 0) & flag[assign])
        if rows is None:
            # a member still on its GIS group has that residual already (lvl_o)
            at_o = assign[mem] == gis_index[mem]
            lvl_mem = np.empty(len(mem))
            lvl_mem[at_o] = lvl_o[mem[at_o]]
            lvl_mem[~at_o] = pools.level(mem[~at_o], assign[mem[~at_o]])
        else:
            lvl_mem = pools.level(mem, assign[mem])
        med = group_medians(lvl_mem, assign[mem], n_g)
        lvl_ref = np.where(lack, med[b_r], lvl_o)
    return lvl_b, lvl_ref


def assignment_lead(
    *,
    is_new: Any,
    moved: Any,
    zb: Any,
    z2: Any,
    zo: Any,
    best: Any,
    assign: Any,
    kappa: Any,
    se: Any,
    unrelated_se: float,
    min_corr_se: float,
    singleton_fit_se: float,
) -> Any:
    """Lead ``d`` [std. errors] of each meter's final assignment over the best alternative (arrays (n_meters,)).

    Parameters
    ----------
    is_new, moved : array of bool
        The meter founds a proposed new group; the meter moved off its GIS group.
    zb, z2, zo : array
        Fisher z of the best candidate (``-inf``: none), the runner-up (0: none), the GIS group (NaN: none).
    best, assign : array of int
        Best candidate and final group.
    kappa : array, shape (n_groups,)
        Mean Fisher z of each group's members with their pool.
    se : array
        Standard error of the Fisher z.

    Returns
    -------
    array
        New group: how far the GIS z lies below ``unrelated_se`` (and the best z below ``min_corr_se``);
        moved: the lead over the runner-up and the GIS group; on its GIS group: the lead over the best
        candidate; alone: how far the best candidate falls short of the z it would need (3 without one).
    """
    xp = array_namespace(zb, zo)
    has_own = xp.isfinite(zo)
    fin_b = xp.isfinite(zb)
    kappa_b = xp.take(kappa, best)
    d_new = (unrelated_se * se - zo) / se
    d_new = xp.where(fin_b, xp.minimum(d_new, (min_corr_se * se - zb) / se), d_new)
    d_moved = xp.where(best == assign, (zb - xp.maximum(z2, xp.where(has_own, zo, -xp.inf))) / se, 0.0)
    d_own = (zo - xp.where(fin_b, zb, 0.0)) / se
    need = xp.where(
        xp.isnan(kappa_b - singleton_fit_se * se),
        min_corr_se * se,
        xp.maximum(min_corr_se * se, kappa_b - singleton_fit_se * se),
    )
    thr_b = xp.where(fin_b, need, xp.inf)
    d_single = xp.where(fin_b, (thr_b - zb) / se, 3.0)
    return xp.where(is_new, d_new, xp.where(moved, d_moved, xp.where(has_own, d_own, d_single)))


def anchoring_lead(
    z: Any,
    moved_rows: np.ndarray,
    assign: np.ndarray,
    usable: np.ndarray,
    se: np.ndarray,
    *,
    unrelated_se: float,
    min_corr_se: float,
    ratio: float = 0.5,
) -> np.ndarray:
    """Whether each moved meter's target group holds together with the meters it follows there.

    A meter whose true siblings are themselves filed under another GIS transformer follows them there:
    the move names the siblings' wrong label, not the meter's. The target's members are split into the
    ones the meter moves with (Fisher z above ``min_corr_se``) and the rest. The move is not borne by the
    target transformer where the rest form no block with the meter's side: the sides' pools are
    uncorrelated (Fisher z below ``unrelated_se``, the test of :func:`split_off`), or, with two or more
    meters on each side, their mean correlation is below ``ratio`` times the geometric mean of the sides'
    own mean correlations (members of one transformer with different noise score about 1; two
    transformers of one lateral, whose residuals correlate a little, far less, however long the window).

    Parameters
    ----------
    z : array, shape (n_meters, n_time)
        Unit-norm signals.
    moved_rows : ndarray of int, shape (m,)
        Meters moved off their GIS group.
    assign : ndarray of int, shape (n_meters,)
        Final group of every meter.
    usable : ndarray of bool, shape (n_meters,)
        Members that count: every usable meter of the target, also one that does not move with the rest
        (a target whose own members do not hold together bears no move).
    se : ndarray, shape (n_meters,)
        Standard error of each meter's Fisher z. [-]
    unrelated_se, min_corr_se : float
        Thresholds in standard errors.
    ratio : float
        Least ratio of the between-sides to the within-sides mean correlation [-].

    Returns
    -------
    ndarray of float, shape (m,)
        How far the pools of the two sides correlate above ``unrelated_se`` [std. errors], at most 0 where
        the ratio test fails; ``+inf`` where the meter moves with every other member (or none, or the
        target has fewer than two others).
    """
    xp = array_namespace(z)
    out = np.full(len(moved_rows), np.inf)
    for k, i in enumerate(moved_rows):
        mem = np.flatnonzero((assign == assign[i]) & usable)
        mem = mem[mem != i]
        if len(mem) < 2:
            continue
        idx = np.concatenate([[i], mem])
        zi = xp.take(z, xp.asarray(idx), axis=0)
        c = to_numpy(zi @ xp.matrix_transpose(zi)).astype(np.float64)
        follows = fisher_z(c[0, 1:]) / se[i] > min_corr_se
        if follows.all() or not follows.any():
            continue
        side = np.concatenate([[True], follows])
        a, b = side.astype(np.float64), (~side).astype(np.float64)
        cross = a @ c @ b / np.sqrt(max((a @ c @ a) * (b @ c @ b), 1e-12))
        out[k] = float(fisher_z(cross)) / se[i] - unrelated_se
        a_idx, b_idx = np.flatnonzero(side), np.flatnonzero(~side)
        if len(a_idx) >= 2 and len(b_idx) >= 2:
            within = [c[np.ix_(x, x)][np.triu_indices(len(x), 1)].mean() for x in (a_idx, b_idx)]
            between = c[np.ix_(a_idx, b_idx)].mean()
            if min(within) <= 0 or between < ratio * math.sqrt(within[0] * within[1]):
                out[k] = min(out[k], 0.0)
    return out


def final_coherence(z: Any, group_index: np.ndarray, n_groups: int, usable: np.ndarray) -> np.ndarray:
    """Mean leave-one-out correlation of each group's usable members with the group's pool.

    Parameters
    ----------
    z : array, shape (n_meters, n_time)
        Unit-norm signals.
    group_index : ndarray of int, shape (n_meters,)
    n_groups : int
    usable : ndarray of bool, shape (n_meters,)

    Returns
    -------
    ndarray, shape (n_groups,)
        ``tanh`` of the mean Fisher z; NaN for a group with fewer than two usable members. [-]
    """
    xp = array_namespace(z)
    wts = usable.astype(float)
    pooled = tg.group_sums(z, xp.asarray(group_index), n_groups, xp.asarray(wts))
    pn2 = to_numpy(xp.vecdot(pooled, pooled, axis=-1)).astype(float)
    s_own = to_numpy(tg.pair_dots(z, pooled, None, xp.asarray(group_index))).astype(float)
    zz = to_numpy(xp.vecdot(z, z, axis=-1)).astype(float)
    _, zc = loo_fisher_z(s_own, pn2[group_index], wts, zz)
    mean, _, _ = group_mean(zc, group_index, usable & np.isfinite(zc), n_groups)
    return np.tanh(mean)
