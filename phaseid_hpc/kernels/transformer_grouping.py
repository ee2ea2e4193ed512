"""Array kernels for meter-to-transformer verification: signals, group pools and (meter, group) pairs.

Pure functions of arrays: the namespace ``xp`` is taken from the inputs
(:func:`phaseid_hpc._compat.array_namespace`), so the same code runs on NumPy, CuPy and array-api-strict.
No per-pair regression and no Python loop over meters; the decision steps built on these kernels are in
:mod:`phaseid_hpc.kernels.transformer_mapping`.

Signals
-------
* **Shape** (:func:`differenced_signals`): differenced voltage with the per-phase feeder common mode
  projected out (the upstream source and feeder-wide loading move every meter of a phase together; what is
  left is lateral, transformer and service drop). Rows are centred and scaled to unit norm over the valid
  samples, missing samples contribute 0. The correlation of meter ``i`` with group ``g`` is taken against the
  *pooled* signal ``P_g = sum_j w_j z_j`` over the group's members, leaving meter ``i`` out of its own group
  (leave-one-out pooling, :func:`loo_correlations`).
* **Level** (:func:`level_signals`): a meter sits below its transformer by its own service drop,
  ``V_meter - V_transformer ~ -(R P + X Q) / V``. Against a candidate group's mean level the residual of
  ``V_i - Vbar_g = a + b I_i`` (``I_i = 1000 (P_i + Q_i X/R) / V_i``) is small for the right group; ``-b``
  estimates the service resistance [ohm].

Cost
----
Pools are sums over each group's member rows (:func:`group_sums`: ``O(n_meters n_time)`` for all groups,
the members of a few groups at a time), and a group's pool can be re-summed alone. Meter-by-group quantities
are formed only for the listed (meter, group) pairs (:func:`pair_dots`, :func:`level_consistency_pairs`).
The dense forms over every (meter, group) pair, by GEMMs against the one-hot membership matrix
(:func:`membership_matrix`, :func:`pool_by_transformer`, :func:`group_correlations`,
:func:`level_consistency`), cost ``O(n_meters n_groups n_time)``; they are the references the pair kernels
are tested against.
"""

from __future__ import annotations

from typing import Any

from .._compat import array_namespace

__all__ = [
    "centred_filled",
    "differenced_signals",
    "group_correlations",
    "group_sums",
    "level_consistency",
    "level_consistency_pairs",
    "level_row_stats",
    "level_signals",
    "loo_correlations",
    "membership_matrix",
    "pair_dots",
    "pairwise_correlations",
    "partial_correlations",
    "pool_by_transformer",
]


def membership_matrix(group_index: Any, n_groups: int, weights: Any | None = None, dtype: Any = None) -> Any:
    """Weighted one-hot membership matrix.

    Parameters
    ----------
    group_index : array of int, shape (n_meters,)
        Group of each meter in ``0 .. n_groups - 1``; ``-1`` means no group.
    n_groups : int
        Number of groups.
    weights : array of float, shape (n_meters,), optional
        Weight of each meter in its group's pool (0 excludes it). Default 1.
    dtype : dtype, optional
        Floating dtype of the result (default float64).

    Returns
    -------
    H : array, shape (n_meters, n_groups)
        ``H[i, g] = weights[i]`` where ``group_index[i] == g``, else 0.
    """
    xp = array_namespace(group_index)
    gi = xp.asarray(group_index)
    cols = xp.arange(n_groups, dtype=gi.dtype)
    dt = xp.float64 if dtype is None else dtype
    hot = xp.astype(gi[:, None] == cols[None, :], dt)
    if weights is not None:
        hot = hot * xp.astype(xp.asarray(weights), dt)[:, None]
    return hot


def differenced_signals(
    voltage: Any,
    phase_index: Any,
    n_phases: int = 3,
    *,
    weights: Any | None = None,
    ridge: float = 1e-9,
    dtype: Any = None,
    block_rows: int | None = 256,
) -> tuple[Any, Any]:
    """Unit-norm differenced voltage with the per-phase common mode removed.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage, NaN where missing. [V]
    phase_index : array of int, shape (n_meters,)
        Phase of each meter as ``0 .. n_phases - 1`` (``-1``: unknown; such a meter does not enter the
        common mode but still has it removed).
    n_phases : int
        Number of common-mode signals (phases).
    weights : array, shape (n_meters,), optional
        Weight of each meter in its phase's common mode. Pass ``1 / size of the meter's GIS group`` so that
        every transformer counts once and a crowded transformer cannot project its own signal away.
    ridge : float
        Tikhonov term of the projection, relative to the trace. [-]
    dtype : dtype, optional
        Working and output precision (default float64). float32 halves the memory traffic; the
        ``(n_phases, n_phases)`` projection system is solved in float64 either way.
    block_rows : int or None
        Meters per block of the element-wise work (a block's temporaries stay in cache); ``None``: all
        at once (fewer, larger operations, e.g. on a GPU).

    Returns
    -------
    z : array, shape (n_meters, n_time - 1)
        Residual signal, centred and scaled to unit norm; 0 at missing differences and for flat meters.
    n_valid : array, shape (n_meters,), float64
        Number of valid differences per meter. [samples]

    Notes
    -----
    With ``X`` the centred differences and ``M`` the ``(n_time - 1, n_phases)`` phase means of the unit-norm
    rows, the residual is ``X - X M (M^T M)^{-1} M^T`` (an orthogonal projection, by GEMM).
    """
    xp = array_namespace(voltage)
    dt = xp.float64 if dtype is None else dtype
    v = xp.asarray(voltage)
    n, t = v.shape
    step = n if not block_rows else max(int(block_rows), 1)
    h = membership_matrix(phase_index, n_phases, weights, dt)
    x = xp.empty((n, t - 1), dtype=dt)
    gap = xp.empty((n, t - 1), dtype=xp.bool)
    n_valid = xp.empty((n,), dtype=xp.float64)
    inv = xp.empty((n,), dtype=dt)
    msum = xp.zeros((t - 1, n_phases), dtype=xp.float64)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        vb = v[r0:r1, :]
        if vb.dtype != dt:
            vb = xp.astype(vb, dt)
        xb = vb[:, 1:] - vb[:, :-1]
        gb = xp.isnan(xb)
        nv = xp.astype((t - 1) - xp.count_nonzero(gb, axis=1), xp.float64)
        xb[gb] = 0.0
        xb -= xp.astype(xp.sum(xb, axis=1, dtype=xp.float64) / xp.maximum(nv, 1.0), dt)[:, None]
        xb[gb] = 0.0
        ib = _inverse_norms(xb)
        # phase means of the unit rows: the row scaling goes into the membership weights
        msum = msum + xp.astype(xb.T @ (h[r0:r1, :] * ib[:, None]), xp.float64)
        x[r0:r1, :] = xb
        gap[r0:r1, :] = gb
        n_valid[r0:r1] = nv
        inv[r0:r1] = ib
    counts = xp.astype(xp.sum(h, axis=0), xp.float64)
    keep = counts > 0
    coef = None
    if bool(xp.any(keep)):
        m = msum / xp.where(keep, counts, 1.0)[None, :]
        # drop empty phases by zeroing their column and regularising
        m = xp.where(keep[None, :], m, 0.0)
        a = m.T @ m
        eye = xp.eye(n_phases, dtype=xp.float64)
        scale = xp.maximum(xp.sum(m * m), 1e-300)
        a = a + eye * (ridge * scale) + (1.0 - xp.astype(keep, xp.float64))[:, None] * eye
        coef = xp.astype(xp.linalg.solve(a, m.T), dt)  # (k, T)
        m = xp.astype(m, dt)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        xb = x[r0:r1, :]
        if coef is not None:
            xb = xb - (xb @ m) @ coef
            xb[gap[r0:r1, :]] = 0.0
            x[r0:r1, :] = xb * _inverse_norms(xb)[:, None]
        else:
            x[r0:r1, :] = xb * inv[r0:r1][:, None]
    return x, n_valid


def _inverse_norms(x: Any) -> Any:
    xp = array_namespace(x)
    norm = xp.sqrt(xp.vecdot(x, x, axis=-1))
    return xp.where(norm > 0, 1.0 / xp.where(norm > 0, norm, 1.0), 0.0)


def pool_by_transformer(z: Any, group_index: Any, n_groups: int, weights: Any | None = None) -> Any:
    """Pooled signal of every group, by one GEMM.

    Parameters
    ----------
    z : array, shape (n_meters, n_time)
        Unit-norm meter signals (from :func:`differenced_signals`).
    group_index, n_groups, weights
        As in :func:`membership_matrix`.

    Returns
    -------
    pooled : array, shape (n_time, n_groups)
        ``sum_j weights_j z_j`` over each group's members.
    """
    h = membership_matrix(group_index, n_groups, weights)
    return z.T @ h


def group_sums(
    x: Any,
    group_index: Any,
    n_groups: int,
    weights: Any | None = None,
    *,
    columns: Any | None = None,
    chunk: int = 16,
) -> Any:
    """Weighted sum of the rows of every group (or of the listed groups), chunk by chunk of groups.

    Parameters
    ----------
    x : array, shape (n_meters, n_time)
    group_index : array of int, shape (n_meters,)
        Group of each meter in ``0 .. n_groups - 1`` (``-1``: none).
    n_groups : int
    weights : array, shape (n_meters,), optional
        Weight of each row in its group's sum (default 1).
    columns : array of int, shape (k,), optional
        Sorted, distinct groups to sum (default: all ``n_groups``).
    chunk : int
        Groups per one-hot GEMM.

    Returns
    -------
    sums : array, shape (k, n_time), dtype of ``x``
        ``sums[c] = sum_j weights_j x_j`` over the members of group ``columns[c]``.

    Notes
    -----
    One dense GEMM against the full one-hot membership matrix costs ``O(n_meters n_groups n_time)``; taking
    the members of ``chunk`` groups at a time costs ``O(n_meters chunk n_time)`` in all.
    """
    xp = array_namespace(x)
    gi = xp.asarray(group_index)
    n, t = x.shape
    dt = x.dtype
    w = xp.ones((n,), dtype=dt) if weights is None else xp.astype(xp.asarray(weights), dt)
    cols = (
        xp.arange(n_groups, dtype=gi.dtype) if columns is None else xp.astype(xp.asarray(columns), gi.dtype)
    )
    k = cols.shape[0]
    if k == 0:
        return xp.zeros((0, t), dtype=dt)
    # local column of each row's group (-1: not requested), rows sorted by it
    loc = xp.searchsorted(cols, gi)
    found = xp.take(cols, xp.clip(loc, 0, k - 1)) == gi
    loc = xp.where(found & (gi >= 0), loc, -1)
    order = xp.argsort(loc, stable=True)
    loc_sorted = xp.take(loc, order)
    starts = xp.searchsorted(loc_sorted, xp.arange(0, k + chunk, chunk, dtype=loc.dtype))
    starts = [int(v) for v in starts]  # one host sync per call
    out = []
    for c, c0 in enumerate(range(0, k, chunk)):
        c1 = min(c0 + chunk, k)
        r0, r1 = starts[c], starts[c + 1]
        if r1 == r0:
            out.append(xp.zeros((c1 - c0, t), dtype=dt))
            continue
        rows = order[r0:r1]
        hot = membership_matrix(loc_sorted[r0:r1] - c0, c1 - c0, xp.take(w, rows), dt)
        out.append(hot.T @ xp.take(x, rows, axis=0))
    return xp.concat(out, axis=0) if len(out) > 1 else out[0]


def pair_dots(x: Any, sums: Any, rows: Any | None, cols: Any, *, block: int = 4096) -> Any:
    """``x[rows[k]] . sums[cols[k]]`` for a list of (meter, group) pairs.

    Parameters
    ----------
    x : array, shape (n_meters, n_time)
    sums : array, shape (n_groups, n_time)
        Group sums (from :func:`group_sums`).
    rows : array of int, shape (m,), or None
        Meter of each pair (``None``: every meter in order, ``m = n_meters``).
    cols : array of int, shape (m,)
        Group of each pair.
    block : int
        Pairs per gathered block (bounds the temporary memory at ``2 block n_time`` elements).

    Returns
    -------
    dots : array, shape (m,)
    """
    xp = array_namespace(x)
    cols = xp.asarray(cols)
    m = cols.shape[0]
    out = []
    rows = None if rows is None else xp.asarray(rows)
    for a in range(0, m, block):
        e = min(a + block, m)
        xr = x[a:e, :] if rows is None else xp.take(x, rows[a:e], axis=0)
        out.append(xp.vecdot(xr, xp.take(sums, cols[a:e], axis=0), axis=-1))
    if not out:
        return xp.zeros((0,), dtype=x.dtype)
    return xp.concat(out) if len(out) > 1 else out[0]


def loo_correlations(dots: Any, pooled_norm2: Any, own: Any, weights: Any, zz: Any) -> Any:
    """Correlation with a pooled signal from ``z_i . P_g``, leaving meter ``i`` out where it is a member.

    Parameters
    ----------
    dots : array, shape (...)
        ``z_i . P_g`` with ``P_g = sum_j w_j z_j`` over the members of ``g`` (``i`` included when a member).
    pooled_norm2 : array, broadcastable to ``dots``
        ``||P_g||^2``.
    own : array of bool, broadcastable to ``dots``
        Whether ``i`` is a member of ``g``.
    weights, zz : array, broadcastable to ``dots``
        ``w_i`` and ``||z_i||^2`` (1, or 0 for a flat meter).

    Returns
    -------
    corr : array, shape of ``dots``
        ``z_i . P_g^{(-i)} / ||P_g^{(-i)}||`` in ``[-1, 1]``; NaN where the pool without ``i`` is empty or
        the meter is flat.
    """
    xp = array_namespace(dots)
    dt = dots.dtype
    ownf = xp.astype(xp.asarray(own), dt)
    w = xp.astype(xp.asarray(weights), dt)
    zz = xp.astype(xp.asarray(zz), dt)
    pn2 = xp.astype(xp.asarray(pooled_norm2), dt)
    s_loo = dots - ownf * (w * zz)
    n2 = pn2 - ownf * (2.0 * w * dots - w * w * zz)
    valid = (n2 > 1e-5 * xp.maximum(pn2, 1.0)) & (zz > 0)
    corr = xp.where(valid, s_loo / xp.sqrt(xp.where(valid, n2, 1.0)), xp.nan)
    return xp.minimum(xp.maximum(corr, -1.0), 1.0)


def group_correlations(
    z: Any, group_index: Any, n_groups: int, weights: Any | None = None, *, allowed: Any | None = None
) -> Any:
    """Correlation of every meter with every group's pooled signal, leaving the meter out of its own group.

    Parameters
    ----------
    z : array, shape (n_meters, n_time)
        Unit-norm, centred meter signals.
    group_index : array of int, shape (n_meters,)
        Current group of each meter (``-1``: none).
    n_groups : int
        Number of groups.
    weights : array, shape (n_meters,), optional
        Pool weights (0: the meter is scored but does not shape its group's pool).
    allowed : array of bool, shape (n_meters, n_groups), optional
        Candidate mask (same feeder, compatible phase, within distance). NaN elsewhere.

    Returns
    -------
    corr : array, shape (n_meters, n_groups), dtype of ``z``
        ``z_i . P_g^{(-i)} / ||P_g^{(-i)}||``; NaN where the pool (without ``i``) is empty or not allowed.
        Pass float32 ``z`` to halve the GEMM cost (correlations stay good to ~1e-6).
    """
    xp = array_namespace(z)
    gi = xp.asarray(group_index)
    n = z.shape[0]
    dt = z.dtype
    w = xp.ones((n,), dtype=dt) if weights is None else xp.astype(xp.asarray(weights), dt)
    h = membership_matrix(gi, n_groups, w, dt)
    pooled = z.T @ h  # (T, g)
    s = z @ pooled  # (n, g)
    pn2 = xp.sum(pooled * pooled, axis=0)  # (g,)
    zz = xp.sum(z * z, axis=1)  # 1 or 0
    own = gi[:, None] == xp.arange(n_groups, dtype=gi.dtype)[None, :]  # where the meter is
    # leave-one-out: remove w_i z_i from its own pool
    corr = loo_correlations(s, pn2[None, :], own, w[:, None], zz[:, None])
    if allowed is not None:
        corr = xp.where(xp.asarray(allowed), corr, xp.nan)
    return corr


def level_consistency(
    voltage: Any,
    current: Any | None,
    group_index: Any,
    n_groups: int,
    weights: Any | None = None,
    *,
    dtype: Any = None,
) -> tuple[Any, Any]:
    """Residual and service-drop slope of each meter's level against each group's mean level.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage, NaN where missing (filled with the meter's mean). [V]
    current : array, shape (n_meters, n_time), optional
        Meter load current proxy ``1000 P / V`` (NaN: missing, filled with the mean). [A]
        ``None``: only the offset is fitted.
    group_index, n_groups, weights
        As in :func:`membership_matrix`; the meter is left out of its own group's mean.
    dtype : dtype, optional
        Working precision of the GEMMs after centring (default float64; float32 halves the cost).

    Returns
    -------
    rms : array, shape (n_meters, n_groups)
        Root-mean-square residual of ``V_i - Vbar_g = a + b I_i``. [V]; NaN where the group has no
        other member.
    slope : array, shape (n_meters, n_groups)
        ``b``; ``-b`` is the apparent service resistance to that group. [ohm]

    Notes
    -----
    All terms are GEMMs against the membership matrix: with row-centred ``V`` and ``I`` and group sums
    ``L = V^T H``, ``||y||^2 = ||V_i||^2 - 2 V_i.L_g / c_g + ||L_g||^2 / c_g^2`` and
    ``y.I_i = V_i.I_i - I_i.L_g / c_g``, corrected for leave-one-out on the own group.
    """
    xp = array_namespace(voltage)
    dt = xp.float64 if dtype is None else dtype
    v = xp.astype(xp.asarray(voltage), xp.float64)
    n, t = v.shape
    vc = xp.astype(_centre_fill(v), dt)
    gi = xp.asarray(group_index)
    w = xp.ones((n,), dtype=dt) if weights is None else xp.astype(xp.asarray(weights), dt)
    h = membership_matrix(gi, n_groups, w, dt)
    own = membership_matrix(gi, n_groups, None, dt)
    cnt = xp.sum(h, axis=0)[None, :] - own * w[:, None]  # (n, g)
    lsum = vc.T @ h  # (T, g)
    vv = xp.sum(vc * vc, axis=1)  # (n,)
    vl = vc @ lsum  # (n, g)
    ll = xp.sum(lsum * lsum, axis=0)[None, :]  # (1, g)
    vl_loo = vl - own * (w * vv)[:, None]
    ll_loo = ll - own * (2.0 * w[:, None] * vl - (w * w * vv)[:, None])
    ok = cnt > 1e-9
    c = xp.where(ok, cnt, 1.0)
    yy = vv[:, None] - 2.0 * vl_loo / c + ll_loo / (c * c)
    if current is not None:
        ic = xp.astype(_centre_fill(xp.astype(xp.asarray(current), xp.float64)), dt)
        ii = xp.sum(ic * ic, axis=1)
        iv = xp.sum(ic * vc, axis=1)
        il = ic @ lsum
        il_loo = il - own * (w * iv)[:, None]
        yi = iv[:, None] - il_loo / c
        ii_safe = xp.where(ii > 0, ii, 1.0)[:, None]
        slope = xp.where(ii[:, None] > 0, yi / ii_safe, 0.0)
        rss = yy - slope * yi
    else:
        slope = xp.zeros((n, n_groups), dtype=dt)
        rss = yy
    rms = xp.sqrt(xp.maximum(rss, 0.0) / t)
    rms = xp.where(ok, rms, xp.nan)
    slope = xp.where(ok, slope, xp.nan)
    return rms, slope


def level_consistency_pairs(
    vc: Any,
    ic: Any | None,
    level_sums: Any,
    level_count: Any,
    rows: Any,
    cols: Any,
    own: Any,
    weights: Any,
    *,
    row_stats: tuple[Any, Any, Any] | None = None,
    sums_norm2: Any | None = None,
) -> tuple[Any, Any]:
    """:func:`level_consistency` for a list of (meter, group) pairs only, from precomputed group sums.

    Parameters
    ----------
    vc : array, shape (n_meters, n_time)
        Row-centred voltage, missing samples 0 (:func:`centred_filled`). [V]
    ic : array, shape (n_meters, n_time), optional
        Row-centred current proxy the same way (``None``: offset only). [A]
    level_sums : array, shape (n_groups, n_time)
        ``L_g = sum_j w_j vc_j`` over each group's members (:func:`group_sums`). [V]
    level_count : array, shape (n_groups,)
        ``sum_j w_j`` over each group's members.
    rows : array of int, shape (m,), or None
        Meter of each pair (``None``: every meter in order).
    cols : array of int, shape (m,)
        Group of each pair.
    own : array of bool, shape (m,)
        Whether the meter is a member of the group (it is then left out of the group's mean).
    weights : array, shape (n_meters,)
        Pool weights ``w``.
    row_stats : tuple of array, shape (n_meters,), optional
        ``(vc.vc, ic.ic, ic.vc)`` per meter (:func:`level_row_stats`), to skip recomputing them.
    sums_norm2 : array, shape (n_groups,), optional
        ``L_g . L_g``, likewise.

    Returns
    -------
    rms, slope : array, shape (m,)
        As in :func:`level_consistency`, at the listed pairs. [V], [ohm]
    """
    xp = array_namespace(vc)
    dt = vc.dtype
    cols = xp.asarray(cols)
    t = vc.shape[1]
    ownf = xp.astype(xp.asarray(own), dt)
    wts = xp.astype(xp.asarray(weights), dt)
    w = (wts if rows is None else xp.take(wts, xp.asarray(rows))) * ownf
    cnt = xp.take(xp.astype(xp.asarray(level_count), dt), cols) - w
    lsel = xp.take(level_sums, cols, axis=0)
    vsel = vc if rows is None else xp.take(vc, xp.asarray(rows), axis=0)
    if row_stats is not None:
        vv_all, ii_all, iv_all = row_stats
        pick = (lambda a: a) if rows is None else (lambda a: xp.take(a, xp.asarray(rows)))
        vv = pick(vv_all)
    else:
        vv = xp.vecdot(vsel, vsel, axis=-1)
    vl = xp.vecdot(vsel, lsel, axis=-1)
    ll = xp.vecdot(lsel, lsel, axis=-1) if sums_norm2 is None else xp.take(sums_norm2, cols)
    vl_loo = vl - w * vv
    ll_loo = ll - (2.0 * w * vl - w * w * vv)
    ok = cnt > 1e-9
    c = xp.where(ok, cnt, 1.0)
    yy = vv - 2.0 * vl_loo / c + ll_loo / (c * c)
    if ic is not None:
        isel = ic if rows is None else xp.take(ic, xp.asarray(rows), axis=0)
        if row_stats is not None:
            ii, iv = pick(ii_all), pick(iv_all)
        else:
            ii = xp.vecdot(isel, isel, axis=-1)
            iv = xp.vecdot(isel, vsel, axis=-1)
        il = xp.vecdot(isel, lsel, axis=-1)
        yi = iv - (il - w * iv) / c
        slope = xp.where(ii > 0, yi / xp.where(ii > 0, ii, 1.0), 0.0)
        rss = yy - slope * yi
    else:
        slope = xp.zeros(yy.shape, dtype=dt)
        rss = yy
    rms = xp.sqrt(xp.maximum(rss, 0.0) / t)
    return xp.where(ok, rms, xp.nan), xp.where(ok, slope, xp.nan)


def level_signals(
    voltage: Any,
    kw: Any | None = None,
    kvar: Any | None = None,
    *,
    x_over_r: float = 0.5,
    dtype: Any = None,
    block_rows: int | None = 256,
) -> tuple[Any, Any | None, tuple[Any, Any, Any]]:
    """Row-centred voltage and load-current proxy for the level check, with their per-meter products.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage, NaN where missing. [V]
    kw, kvar : array, shape (n_meters, n_time), optional
        Meter active / reactive load, NaN where missing. [kW], [kvar]
    x_over_r : float
        Reactance-to-resistance ratio of the service drop. [-]
    dtype : dtype, optional
        Output precision (default: that of ``voltage``); row means are taken in float64.
    block_rows : int or None
        Meters per block of the element-wise work; ``None``: all at once.

    Returns
    -------
    vc : array, shape (n_meters, n_time)
        :func:`centred_filled` voltage. [V]
    ic : array, shape (n_meters, n_time), or None
        :func:`centred_filled` current ``1000 (P + Q X/R) / V`` (NaN where ``V <= 0``); ``None`` without
        ``kw``. [A]
    row_stats : tuple of array, shape (n_meters,)
        ``(vc.vc, ic.ic, ic.vc)`` (:func:`level_row_stats`).
    """
    xp = array_namespace(voltage)
    v = xp.asarray(voltage)
    dt = v.dtype if dtype is None else dtype
    n, t = v.shape
    step = n if not block_rows else max(int(block_rows), 1)
    kw = None if kw is None else xp.asarray(kw)
    kvar = None if kvar is None else xp.asarray(kvar)
    vc = xp.empty((n, t), dtype=dt)
    ic = None if kw is None else xp.empty((n, t), dtype=dt)
    vv = xp.empty((n,), dtype=dt)
    ii = xp.zeros((n,), dtype=dt)
    iv = xp.zeros((n,), dtype=dt)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        vb = xp.astype(v[r0:r1, :], dt)
        vcb = centred_filled(vb, copy=False) if vb is not v else centred_filled(vb)
        vc[r0:r1, :] = vcb
        vv[r0:r1] = xp.vecdot(vcb, vcb, axis=-1)
        if kw is None:
            continue
        vb = xp.astype(v[r0:r1, :], dt)
        pb = xp.astype(kw[r0:r1, :], dt, copy=True)
        if kvar is not None:
            pb += x_over_r * xp.astype(kvar[r0:r1, :], dt)
        bad = ~(vb > 0)
        vb[bad] = 1.0
        pb *= 1000.0
        pb /= vb
        pb[bad] = xp.nan
        icb = centred_filled(pb, copy=False)
        ic[r0:r1, :] = icb
        ii[r0:r1] = xp.vecdot(icb, icb, axis=-1)
        iv[r0:r1] = xp.vecdot(icb, vcb, axis=-1)
    return vc, ic, (vv, ii, iv)


def level_row_stats(vc: Any, ic: Any | None) -> tuple[Any, Any, Any]:
    """Per-meter ``(vc.vc, ic.ic, ic.vc)`` for :func:`level_consistency_pairs` (zeros without ``ic``)."""
    xp = array_namespace(vc)
    vv = xp.vecdot(vc, vc, axis=-1)
    if ic is None:
        return vv, xp.zeros_like(vv), xp.zeros_like(vv)
    return vv, xp.vecdot(ic, ic, axis=-1), xp.vecdot(ic, vc, axis=-1)


def centred_filled(x: Any, dtype: Any = None, *, copy: bool = True) -> Any:
    """Rows centred on their mean over valid samples, missing samples 0.

    Parameters
    ----------
    x : array, shape (n_meters, n_time)
        NaN where missing.
    dtype : dtype, optional
        Output precision (default: that of ``x``); the means are taken in float64.
    copy : bool
        ``False``: overwrite ``x`` when it already has ``dtype`` (saves a full-size temporary).

    Returns
    -------
    xc : array, shape (n_meters, n_time)
    """
    xp = array_namespace(x)
    dt = x.dtype if dtype is None else dtype
    out = xp.astype(x, dt, copy=copy)
    gap = xp.isnan(out)
    cnt = xp.astype(out.shape[1] - xp.count_nonzero(gap, axis=1), xp.float64)
    out[gap] = 0.0
    mean = xp.sum(out, axis=1, dtype=xp.float64) / xp.maximum(cnt, 1.0)
    out -= xp.astype(mean, dt)[:, None]
    out[gap] = 0.0
    return out


def _centre_fill(x: Any) -> Any:
    xp = array_namespace(x)
    ok = ~xp.isnan(x)
    cnt = xp.sum(xp.astype(ok, xp.float64), axis=1)
    mean = xp.sum(xp.where(ok, x, 0.0), axis=1) / xp.maximum(cnt, 1.0)
    return xp.where(ok, x - mean[:, None], 0.0)


def pairwise_correlations(z: Any) -> Any:
    """Meter-by-meter correlation of unit-norm signals, ``z z^T`` (for a small set of orphans).

    Parameters
    ----------
    z : array, shape (n_meters, n_time)

    Returns
    -------
    corr : array, shape (n_meters, n_meters)
    """
    return z @ z.T


def partial_correlations(x: Any, target: Any, control: Any) -> Any:
    """Row-wise correlation of ``x`` with ``target`` after both are cleared of ``control``.

    Tells a meter that shares a transformer's *own* signal from one that only shares the lateral the
    transformer sits on: the control is the pool of the neighbouring (runner-up) transformer.

    Parameters
    ----------
    x : array, shape (m, n_time)
        Meter signals.
    target : array, shape (m, n_time)
        Candidate group's pooled signal for each row (leave-one-out where the row is a member).
    control : array, shape (m, n_time)
        Signal to partial out (the runner-up group's pool).

    Returns
    -------
    r : array, shape (m,)
        ``(r_xt - r_xc r_tc) / sqrt((1 - r_xc^2)(1 - r_tc^2))``; NaN where undefined.
    """
    xp = array_namespace(x, target, control)

    def _r(a, b):
        na = xp.sqrt(xp.sum(a * a, axis=1))
        nb = xp.sqrt(xp.sum(b * b, axis=1))
        ok = (na > 0) & (nb > 0)
        return xp.where(ok, xp.sum(a * b, axis=1) / xp.where(ok, na * nb, 1.0), xp.nan)

    r_xt, r_xc, r_tc = _r(x, target), _r(x, control), _r(target, control)
    den = (1.0 - r_xc * r_xc) * (1.0 - r_tc * r_tc)
    ok = den > 1e-12
    return xp.where(ok, (r_xt - r_xc * r_tc) / xp.sqrt(xp.where(ok, den, 1.0)), xp.nan)
