"""Features for phase identification: per-unit first differences, robust row scaling, common mode.

All functions take ``(n_meters, n_time)`` arrays with NaN for missing samples and return arrays of the
same namespace (NumPy, CuPy, array-api-strict).
"""

from __future__ import annotations

from typing import Any

from .._compat import array_namespace

__all__ = [
    "common_mode_residual",
    "per_unit_base",
    "per_unit_differences",
    "remove_common_mode",
    "standardize_rows",
    "standardized_differences",
    "unit_rows",
    "zero_step_share",
]


def _nan_to_zero(xp: Any, x: Any) -> tuple[Any, Any]:
    observed = ~xp.isnan(x)
    return xp.where(observed, x, xp.zeros((), dtype=x.dtype)), observed


def per_unit_base(voltage: Any, nominal_v: Any) -> Any:
    """The voltage each meter's per-unit values refer to: its nominal, or its own mean where that is missing
    or not positive (1 where neither is).

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage magnitude, NaN where missing. [V]
    nominal_v : array, shape (n_meters,)
        Nominal voltage of each meter; NaN or <= 0: not known. [V]

    Returns
    -------
    array, shape (n_meters,)
        [V]
    """
    xp = array_namespace(voltage)
    v = xp.asarray(voltage, dtype=xp.float64)
    nom = xp.asarray(nominal_v, dtype=xp.float64)
    good_nom = (~xp.isnan(nom)) & (nom > 0)
    if bool(xp.all(good_nom)):  # the own mean voltage only where the nominal is unusable
        return nom
    v0, obs_v = _nan_to_zero(xp, v)
    cnt = xp.astype(xp.count_nonzero(obs_v, axis=1), xp.float64)
    own_mean = xp.sum(v0, axis=1) / xp.where(cnt > 0, cnt, xp.ones_like(cnt))
    nom = xp.where(good_nom, nom, own_mean)
    return xp.where(nom > 0, nom, xp.ones_like(nom))


def per_unit_differences(voltage: Any, nominal_v: Any) -> Any:
    """First differences of per-unit voltage.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage magnitude, NaN where missing. [V]
    nominal_v : array, shape (n_meters,)
        Nominal voltage of each meter; NaN or <= 0 uses the meter's own mean voltage. [V]

    Returns
    -------
    array, shape (n_meters, n_time - 1)
        ``v[t] / v_nom - v[t-1] / v_nom``; NaN where either sample is missing. [pu]

    Notes
    -----
    Differencing removes the slow, shared daily shape (which makes raw voltages of all phases correlate
    0.9+) and leaves the interval-to-interval changes that are driven by each phase's load.
    """
    xp = array_namespace(voltage)
    v = xp.asarray(voltage, dtype=xp.float64)
    pu = v / per_unit_base(v, nominal_v)[:, None]
    return pu[:, 1:] - pu[:, :-1]


def standardize_rows(x: Any, clip: float = 6.0) -> tuple[Any, Any]:
    """Centre and scale each row (NaN-aware), then clip outliers.

    Parameters
    ----------
    x : array, shape (n_meters, n_samples)
        Features, NaN where missing.
    clip : float
        Samples beyond ``clip`` standard deviations are clipped (steps from tap changes, events). [-]

    Returns
    -------
    z : array, shape (n_meters, n_samples)
        Row-standardised features, NaN kept where missing. [-]
    n_obs : array, shape (n_meters,)
        Observed samples per row.
    """
    xp = array_namespace(x)
    x0, obs = _nan_to_zero(xp, x)
    obs_f = xp.astype(obs, x0.dtype)
    n_obs = xp.sum(obs_f, axis=1)
    denom = xp.where(n_obs > 0, n_obs, xp.ones_like(n_obs))
    mean = xp.sum(x0, axis=1) / denom
    dev = x0 - mean[:, None]
    dev *= obs_f
    sd = xp.sqrt(xp.vecdot(dev, dev, axis=-1) / denom)
    sd = xp.where(sd > 0, sd, xp.ones_like(sd))
    dev /= sd[:, None]
    z = xp.clip(dev, -clip, clip)
    return xp.where(obs, z, xp.full((), float("nan"), dtype=z.dtype)), n_obs


def remove_common_mode(x: Any, weights: Any | None = None) -> tuple[Any, Any]:
    """Remove the feeder-wide common mode by per-row least squares.

    Parameters
    ----------
    x : array, shape (n_meters, n_samples)
        Standardised features, NaN where missing.
    weights : array, shape (n_meters,), optional
        Row weights of the common-mode estimate (0 excludes a row, e.g. an unusable meter).

    Returns
    -------
    residual : array, shape (n_meters, n_samples)
        ``x - beta_i * c`` with ``beta_i`` the least-squares loading of row ``i`` on ``c``; NaN kept.
    common : array, shape (n_samples,)
        The common mode ``c`` (weighted mean over rows of the observed samples).

    Notes
    -----
    Source (substation, LTC, upstream grid) variations move all three phases together and dominate the
    differenced voltage of meters near the feeder head; removing them leaves the phase-specific parts,
    which are far more separable.
    """
    xp = array_namespace(x)
    x0, obs = _nan_to_zero(xp, x)
    obs_f = xp.astype(obs, x0.dtype)
    w = xp.ones(x0.shape[0], dtype=x0.dtype) if weights is None else xp.asarray(weights, dtype=x0.dtype)
    wsum = w @ obs_f
    common = (w @ x0) / xp.where(wsum > 0, wsum, xp.ones_like(wsum))
    cc = obs_f @ (common * common)  # |common * obs_i|^2
    beta = (x0 @ common) / xp.where(cc > 0, cc, xp.ones_like(cc))  # x0 is zero where unobserved
    resid = beta[:, None] * common[None, :]
    resid = x0 - resid
    return xp.where(obs, resid, xp.full((), float("nan"), dtype=resid.dtype)), common


#: Rows per chunk of the row-wise reductions here: (256, 2,880) float64 temporaries are 5.9 MB, so a chunk's
#: passes run in cache instead of streaming whole-block temporaries through memory (zero_step_share on a
#: 9,667 x 2,880 block: 3-6x faster, same values).
_ROW_CHUNK = 256


def zero_step_share(voltage: Any) -> Any:
    """Share of each row's observed steps (differences of consecutive readings) that are exactly zero.

    High where the meter's resolution swallows most steps (1 V on a feeder whose 15-minute steps are
    0.3-0.5 V: about half; 0.1 V: under 11%).

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Readings, NaN where missing. [V]

    Returns
    -------
    array, shape (n_meters,), float64 in [0, 1] (0 where a row has no observed step) [-]
    """
    xp = array_namespace(voltage)
    parts = []
    for a in range(0, voltage.shape[0], _ROW_CHUNK):  # row chunks: the temporaries stay in cache
        x = voltage[a : min(a + _ROW_CHUNK, voltage.shape[0]), :]
        d = x[:, 1:] - x[:, :-1]
        fin = xp.isfinite(d)
        n_fin = xp.sum(xp.astype(fin, xp.float64), axis=1)
        parts.append(xp.sum(xp.astype(fin & (d == 0), xp.float64), axis=1) / xp.where(n_fin > 0, n_fin, 1.0))
    return xp.concat(parts) if parts else xp.zeros((0,), dtype=xp.float64)


def unit_rows(x: Any) -> Any:
    """Zero-fill missing samples and scale each row to unit Euclidean norm (zero rows stay zero).

    Parameters
    ----------
    x : array, shape (n_rows, n_samples)

    Returns
    -------
    array, shape (n_rows, n_samples), no NaN
    """
    xp = array_namespace(x)
    x0, _ = _nan_to_zero(xp, x)
    norm = xp.sqrt(xp.vecdot(x0, x0, axis=-1))
    x0 /= xp.where(norm > 0, norm, xp.ones_like(norm))[:, None]
    return x0


def standardized_differences(voltage: Any, nominal_v: Any, clip: float = 6.0,
                             dtype: Any | None = None, less: Any | None = None) -> tuple[Any, Any, Any]:
    """``standardize_rows(per_unit_differences(voltage, nominal_v), clip)`` in few passes, zero-filled.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage magnitude, NaN where missing. [V]
    nominal_v : array, shape (n_meters,)
        Nominal voltage; NaN or <= 0 uses the meter's own mean voltage. [V]
    clip : float
        Clipping of the standardised differences. [-]
    dtype : dtype, optional
        Of ``z`` (computed in float64 either way); default float64.
    less : array, shape (n_meters, n_time), optional
        Subtracted from the per-unit voltage before differencing (the load drops of
        :func:`~phaseid_hpc.kernels.load_compensation.load_drop`). [pu]

    Returns
    -------
    z : array, shape (n_meters, n_time - 1)
        Standardised differences with 0 (not NaN) where missing. [-]
    observed : array of bool, shape (n_meters, n_time - 1)
    n_obs : array, shape (n_meters,)
        Observed samples per row.

    Notes
    -----
    The same arithmetic as the two-step version (equal results), but the pipeline of phase
    identification keeps zero-filled data and the mask instead of re-inserting NaN and re-deriving the
    mask at every step; a fully observed block skips the masking passes altogether.
    """
    xp = array_namespace(voltage)
    v = xp.asarray(voltage, dtype=xp.float64)
    pu = v / per_unit_base(v, nominal_v)[:, None]
    if less is not None:
        pu -= less
    x = pu[:, 1:] - pu[:, :-1]
    obs = ~xp.isnan(x)
    complete = bool(xp.all(obs))
    if complete:
        n_obs = xp.full(x.shape[0], float(x.shape[1]), dtype=x.dtype)
        denom = n_obs
        dev = x - (xp.sum(x, axis=1) / denom)[:, None]
    else:
        x0 = xp.where(obs, x, xp.zeros((), dtype=x.dtype))
        n_obs = xp.astype(xp.count_nonzero(obs, axis=1), x.dtype)
        denom = xp.where(n_obs > 0, n_obs, xp.ones_like(n_obs))
        dev = x0 - (xp.sum(x0, axis=1) / denom)[:, None]
        dev = xp.where(obs, dev, xp.zeros((), dtype=x.dtype))
    sd = xp.sqrt(xp.vecdot(dev, dev, axis=-1) / denom)
    sd = xp.where(sd > 0, sd, xp.ones_like(sd))
    dev /= sd[:, None]
    z = xp.clip(dev, -clip, clip)
    return (z if dtype is None else xp.astype(z, dtype)), obs, n_obs


def common_mode_residual(z: Any, observed: Any, weights: Any | None = None) -> tuple[Any, Any]:
    """:func:`remove_common_mode` on zero-filled data with its mask; returns the zero-filled residual.

    Parameters
    ----------
    z : array, shape (n_meters, n_samples)
        Standardised features, 0 where missing (as from :func:`standardized_differences`).
    observed : array of bool, shape (n_meters, n_samples)
    weights : array, shape (n_meters,), optional
        Row weights of the common-mode estimate.

    Returns
    -------
    residual : array, shape (n_meters, n_samples)
        ``z - beta_i * c`` where observed, 0 elsewhere.
    common : array, shape (n_samples,)
    """
    xp = array_namespace(z)
    w = xp.ones(z.shape[0], dtype=z.dtype) if weights is None else xp.asarray(weights, dtype=z.dtype)
    complete = bool(xp.all(observed))
    obs_f = None if complete else xp.astype(observed, z.dtype)
    wsum = w @ obs_f if obs_f is not None else xp.full(z.shape[1], float(xp.sum(w)), dtype=z.dtype)
    common = (w @ z) / xp.where(wsum > 0, wsum, xp.ones_like(wsum))
    cc = obs_f @ (common * common) if obs_f is not None else xp.full(z.shape[0], float(xp.sum(common * common)), dtype=z.dtype)
    beta = (z @ common) / xp.where(cc > 0, cc, xp.ones_like(cc))
    resid = beta[:, None] * common[None, :]
    resid = z - resid
    if not complete:
        resid = xp.where(observed, resid, xp.zeros((), dtype=z.dtype))
    return resid, common
