"""Features for phase identification: per-unit first differences, robust row scaling, common mode.

All functions take ``(n_meters, n_time)`` arrays with NaN for missing samples and return arrays of the
same namespace (NumPy, CuPy, array-api-strict).
"""

from __future__ import annotations

from typing import Any

from .._compat import array_namespace

__all__ = ["per_unit_differences", "remove_common_mode", "standardize_rows", "unit_rows"]


def _nan_to_zero(xp: Any, x: Any) -> tuple[Any, Any]:
    observed = ~xp.isnan(x)
    return xp.where(observed, x, xp.zeros_like(x)), observed


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
    nom = xp.asarray(nominal_v, dtype=xp.float64)
    v0, obs = _nan_to_zero(xp, v)
    n_obs = xp.sum(xp.astype(obs, xp.float64), axis=1)
    own_mean = xp.sum(v0, axis=1) / xp.where(n_obs > 0, n_obs, xp.ones_like(n_obs))
    good_nom = (~xp.isnan(nom)) & (nom > 0)
    nom = xp.where(good_nom, nom, own_mean)
    nom = xp.where(nom > 0, nom, xp.ones_like(nom))
    pu = v / nom[:, None]
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
    dev = (x0 - mean[:, None]) * obs_f
    sd = xp.sqrt(xp.sum(dev * dev, axis=1) / denom)
    sd = xp.where(sd > 0, sd, xp.ones_like(sd))
    z = xp.clip(dev / sd[:, None], -clip, clip)
    nan = xp.full_like(z, float("nan"))
    return xp.where(obs, z, nan), n_obs


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
    wsum = xp.sum(obs_f * w[:, None], axis=0)
    common = xp.sum(x0 * w[:, None], axis=0) / xp.where(wsum > 0, wsum, xp.ones_like(wsum))
    cm = common[None, :] * obs_f
    cc = xp.sum(cm * cm, axis=1)
    beta = xp.sum(x0 * cm, axis=1) / xp.where(cc > 0, cc, xp.ones_like(cc))
    resid = x0 - beta[:, None] * cm
    return xp.where(obs, resid, xp.full_like(resid, float("nan"))), common


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
    norm = xp.sqrt(xp.sum(x0 * x0, axis=1))
    return x0 / xp.where(norm > 0, norm, xp.ones_like(norm))[:, None]
