"""Array kernels for meter-to-transformer verification.

Pure functions of arrays: the namespace ``xp`` is taken from the inputs
(:func:`phaseid_hpc._compat.array_namespace`), so the same code runs on NumPy, CuPy and array-api-strict.
Everything is a handful of GEMMs against a weighted one-hot membership matrix ``H`` of shape
``(n_meters, n_groups)``: no per-pair regression, no Python loop over meters.

Signals
-------
* **Shape**: differenced voltage with the per-phase feeder common mode projected out (the upstream source and
  feeder-wide loading move every meter of a phase together; what is left is lateral, transformer and service
  drop). Rows are centred and scaled to unit norm over the valid samples, missing samples contribute 0.
  The correlation of meter ``i`` with group ``g`` is taken against the *pooled* signal
  ``P[:, g] = sum_j H[j, g] z_j``, leaving meter ``i`` out of its own group (leave-one-out pooling).
* **Level**: a meter sits below its transformer by its own service drop,
  ``V_meter - V_transformer ~ -(R P + X Q) / V``. Against a candidate group's mean level the residual of
  ``V_i - Vbar_g = a + b I_i`` (``I_i = 1000 (P_i + Q_i X/R) / V_i`` approximated by ``1000 P_i / V_i``)
  is small for the right group; ``-b`` estimates the service resistance [ohm].
"""

from __future__ import annotations

from typing import Any

from .._compat import array_namespace

__all__ = [
    "differenced_signals",
    "group_correlations",
    "level_consistency",
    "membership_matrix",
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
    voltage: Any, phase_index: Any, n_phases: int = 3, *, weights: Any | None = None, ridge: float = 1e-9
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

    Returns
    -------
    z : array, shape (n_meters, n_time - 1), float64
        Residual signal, centred and scaled to unit norm; 0 at missing differences and for flat meters.
    n_valid : array, shape (n_meters,), float64
        Number of valid differences per meter. [samples]

    Notes
    -----
    With ``X`` the centred differences and ``M`` the ``(n_time - 1, n_phases)`` phase means of the unit-norm
    rows, the residual is ``X - X M (M^T M)^{-1} M^T`` (an orthogonal projection, by GEMM).
    """
    xp = array_namespace(voltage)
    v = xp.astype(xp.asarray(voltage), xp.float64)
    d = v[:, 1:] - v[:, :-1]
    ok = ~xp.isnan(d)
    n_valid = xp.sum(xp.astype(ok, xp.float64), axis=1)
    d0 = xp.where(ok, d, 0.0)
    mean = xp.sum(d0, axis=1) / xp.maximum(n_valid, 1.0)
    x = xp.where(ok, d - mean[:, None], 0.0)
    z = _unit_rows(x)
    h = membership_matrix(phase_index, n_phases, weights)
    counts = xp.sum(h, axis=0)
    keep = counts > 0
    if bool(xp.any(keep)):
        m = (z.T @ h) / xp.where(keep, counts, 1.0)[None, :]  # (T, k)
        # drop empty phases by zeroing their column and regularising
        m = xp.where(keep[None, :], m, 0.0)
        a = m.T @ m
        eye = xp.eye(n_phases, dtype=xp.float64)
        scale = xp.maximum(xp.sum(m * m), 1e-300)
        a = a + eye * (ridge * scale) + (1.0 - xp.astype(keep, xp.float64))[:, None] * eye
        coef = xp.linalg.solve(a, m.T)  # (k, T)
        x = x - (x @ m) @ coef
        x = xp.where(ok, x, 0.0)
    return _unit_rows(x), n_valid


def _unit_rows(x: Any) -> Any:
    xp = array_namespace(x)
    norm = xp.sqrt(xp.sum(x * x, axis=1))
    return xp.where(norm[:, None] > 0, x / xp.where(norm > 0, norm, 1.0)[:, None], 0.0)


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
    own = membership_matrix(gi, n_groups, None, dt)  # unweighted: where the meter is
    # leave-one-out: remove w_i z_i from its own pool
    s_loo = s - own * (w * zz)[:, None]
    n2 = pn2[None, :] - own * (2.0 * w[:, None] * s - (w * w * zz)[:, None])
    valid = n2 > 1e-5 * xp.maximum(pn2[None, :], 1.0)
    valid = valid & (zz[:, None] > 0)
    corr = xp.where(valid, s_loo / xp.sqrt(xp.where(valid, n2, 1.0)), xp.nan)
    if allowed is not None:
        corr = xp.where(xp.asarray(allowed), corr, xp.nan)
    return xp.clip(corr, -1.0, 1.0)


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

    Returns
    -------
    rms : array, shape (n_meters, n_groups)
        Root-mean-square residual of ``V_i - Vbar_g = a + b I_i``. [V]; NaN where the group has no
        other member.
    dtype : dtype, optional
        Working precision of the GEMMs after centring (default float64; float32 halves the cost).
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
