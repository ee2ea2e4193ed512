"""Transformer thermal models and insulation ageing, vectorised over transformers.

Every time series here has shape ``(n_transformers, n_time)`` on a regular grid whose timestamps mark the
END of each interval: the load ``k[:, i]`` is the per-unit load over ``(t[i-1], t[i]]`` and the
temperatures at index ``i`` are the states at ``t[i]``. Each first-order lag is a blocked scan (matrix
products with a small decay matrix, :func:`_first_order_lag`), so there is no Python loop over time or
over transformers and the work is GEMM-shaped on every backend. The namespace (NumPy, CuPy,
array-api-strict) is taken from the inputs.

Two models:

* :func:`iec_temperatures` - IEC 60076-7:2018 clause 8.2 (dynamic model, difference-equation solution),
  two-component hot-spot rise (k21, k22), the top-oil temperature as the state (ambient inside the lag). The standard's explicit
  step ``D theta = Dt / (k tau) [...]`` needs ``Dt`` well below ``k22 tau_w`` (8 min for distribution
  units) and is unstable for 15-minute AMI data, so each step uses the exact solution for a load constant
  over the interval, ``1 - exp(-Dt / (k tau))``. This is also what the ``transformer-thermal-model``
  library (Alliander) does, so the two agree to rounding (see ``tests/kernels/test_thermal.py``).
* :func:`ieee_temperatures` - IEEE C57.91-2011 Clause 7 exponential equations: top-oil rise over ambient
  and hot-spot rise over top oil are each a first-order lag to their ultimate values; the ambient enters
  without lag. Time constants are held at their rated values (the optional load-dependent top-oil time
  constant for ``n != 1`` is not applied).

Steady state (:func:`steady_state_hot_spot`) is the same in both (the ultimate values of either model):
``theta_h = theta_a + dtheta_or * ((1 + R K^2) / (1 + R))^x + Hg_r * K^y``.

Every model parameter is a required keyword (one mapping from
:meth:`phaseid_hpc.config.ValidationConfig.thermal_parameters`, pvlib's ``**params`` style): the
configuration holds the distribution-ONAN values of both standards.

Ageing (:func:`relative_aging_rate`): thermally upgraded paper, IEEE C57.91 eq. 2 and IEC 60076-7 eq. 3,
``F_AA = exp(15000/383 - 15000/(theta_h + 273))`` (1.0 at 110 degC); non-upgraded Kraft paper, IEC
60076-7 eq. 2, ``V = 2^((theta_h - 98)/6)`` (1.0 at 98 degC). :func:`equivalent_aging_factor` is
``F_EQA`` (IEEE eq. 3) and :func:`loss_of_life_hours` is ``F_EQA * t`` [h] (IEEE eq. 4 without the
normal-life division).

References
----------
IEC 60076-7:2018, Power transformers - Part 7: Loading guide for mineral-oil-immersed power transformers.
IEEE Std C57.91-2011, IEEE Guide for Loading Mineral-Oil-Immersed Transformers and Step-Voltage Regulators.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from .._compat import array_namespace

__all__ = [
    "equivalent_aging_factor",
    "iec_temperatures",
    "ieee_temperatures",
    "loss_of_life_hours",
    "relative_aging_rate",
    "steady_state_hot_spot",
    "steady_state_top_oil_rise",
]

#: Samples per block of the blocked scan in :func:`_first_order_lag` (one small GEMM per block).
_SCAN_BLOCK = 32
#: Decay weights below this are set to 0 (no contribution at any precision; avoids denormals in the GEMM).
_TINY_WEIGHT = 1e-30


def _lag_matrix(xp: Any, gain: float, decay: float, size: int, dtype: Any) -> Any:
    """``(size, size)`` upper-triangular ``T[j, m] = gain * decay^(m - j)`` for ``m >= j``, else 0."""
    idx = xp.arange(size, dtype=dtype)
    expo = idx[None, :] - idx[:, None]
    log_decay = math.log(max(decay, 1e-300))
    w = gain * xp.exp(xp.where(expo >= 0, expo, 0.0) * log_decay)
    return xp.where((expo >= 0) & (w >= _TINY_WEIGHT), w, 0.0)


def _first_order_lag(x: Any, f: float, x0: Any = None, gain: float = 1.0) -> Any:
    """First-order lag along time of the rows of ``x``: ``y[i] = y[i-1] + f (x[i] - y[i-1])``, ``y[0] = x[0]``.

    ``x`` has shape ``(n, n_time)``; ``x0`` (shape ``(n,)``, default ``x[:, 0]``) is the state before the
    first sample (``y[0] = x0 + f (x[0] - x0)``). Returns the lag of ``gain * x`` (the constant is folded
    into the decay matrices, saving a pass over the data). Computed as a blocked scan: within blocks of
    :data:`_SCAN_BLOCK` samples the response to the block's inputs is one matrix product with the
    lower-triangular decay matrix, the states carried between blocks are a second (small) matrix product,
    and the carried state's decay is added in one broadcast. Equal to the sequential recurrence to
    rounding (``~block * eps`` relative) on every array-API backend, without a Python loop over time.
    """
    xp = array_namespace(x)
    n, n_time = x.shape
    if x0 is None:
        x0 = x[:, 0]
    if n == 0 or n_time == 0:
        return xp.zeros((n, n_time), dtype=x.dtype)
    a = 1.0 - f
    size = min(_SCAN_BLOCK, n_time)
    n_blocks = -(-n_time // size)
    pad = n_blocks * size - n_time
    if pad:
        x = xp.concat([x, xp.zeros((n, pad), dtype=x.dtype)], axis=1)
    local = xp.reshape(
        xp.reshape(x, (n * n_blocks, size)) @ _lag_matrix(xp, gain * f, a, size, x.dtype), (n, n_blocks, size)
    )
    # state at the end of block b: a^size * state at the end of block b-1 + local[:, b, -1]
    a_block = a**size
    carry = local[:, :, size - 1] @ _lag_matrix(xp, 1.0, a_block, n_blocks, x.dtype)
    x0 = x0 * gain if gain != 1.0 else x0
    carry = carry + x0[:, None] * _lag_matrix(xp, a_block, a_block, n_blocks, x.dtype)[0:1, :]
    before = xp.concat([x0[:, None], carry[:, : n_blocks - 1]], axis=1)  # state before each block
    decay = _lag_matrix(xp, a, a, size, x.dtype)[0, :]  # a^(m + 1)
    local += before[:, :, None] * decay[None, None, :]
    y = local
    return xp.reshape(y, (n, n_blocks * size))[:, :n_time]


def _ambient_lagged(xp: Any, ambient_c: Any, k: Any, f: float) -> Any:
    """``first_order_lag(ambient)`` for a scalar (itself), ``(n_time,)`` (one row, broadcast) or 2-D ambient."""
    if isinstance(ambient_c, (int, float)):
        return float(ambient_c)
    amb = xp.asarray(ambient_c, dtype=k.dtype)
    if amb.ndim == 1:
        return _first_order_lag(xp.reshape(amb, (1, amb.shape[0])), f)
    return _first_order_lag(xp.broadcast_to(amb, k.shape), f)


def steady_state_top_oil_rise(
    k: Any, *, top_oil_rise_k: float, loss_ratio: float, oil_exponent: float
) -> Any:
    """Ultimate top-oil rise over ambient at constant load.

    Parameters
    ----------
    k : array
        Load factor (load / rated load). [pu]
    top_oil_rise_k : float
        Top-oil rise over ambient at rated load. [K]
    loss_ratio : float
        Load losses at rated current over no-load losses, ``R``. [-]
    oil_exponent : float
        Oil exponent ``x`` (IEC) or ``n`` (IEEE). [-]

    Returns
    -------
    array, shape of ``k``
        ``dtheta_or * ((1 + R K^2) / (1 + R))^x`` [K]
    """
    return top_oil_rise_k * _oil_rise_shape(k, loss_ratio, oil_exponent)


def _oil_rise_shape(k: Any, loss_ratio: float, oil_exponent: float) -> Any:
    """``((1 + R K^2) / (1 + R))^x`` as ``exp(x log(.))`` (the base is >= 1 / (1 + R) > 0; faster than
    ``pow`` in NumPy float32 and equal to rounding)."""
    xp = array_namespace(k)
    return xp.exp(oil_exponent * xp.log((1.0 + loss_ratio * (k * k)) * (1.0 / (1.0 + loss_ratio))))


def steady_state_hot_spot(
    k: Any,
    ambient_c: Any,
    *,
    top_oil_rise_k: float,
    hot_spot_gradient_k: float,
    loss_ratio: float,
    oil_exponent: float,
    winding_exponent: float,
    **_: float,
) -> Any:
    """Steady-state hot-spot temperature (IEC 60076-7 / IEEE C57.91 Clause 7 at t -> infinity).

    Parameters
    ----------
    k : array
        Load factor. [pu]
    ambient_c : float or array broadcastable to ``k``
        Ambient temperature. [degC]
    top_oil_rise_k, hot_spot_gradient_k : float
        Top-oil rise over ambient and hot-spot rise over top oil (``H g_r``) at rated load. [K]
    loss_ratio, oil_exponent, winding_exponent : float
        ``R``, ``x`` (``n``) and ``y`` (``2 m``). [-]

    Returns
    -------
    array, shape of ``k``
        Hot-spot temperature. [degC]

    Examples
    --------
    >>> import numpy as np
    >>> from phaseid_hpc.config import ValidationConfig
    >>> p = ValidationConfig(thermal_standard="ieee").thermal_parameters()
    >>> round(float(steady_state_hot_spot(np.asarray(1.2), 30.0, **p)), 1)
    134.1
    """
    xp = array_namespace(k)
    k = xp.asarray(k)
    rise = steady_state_top_oil_rise(
        k, top_oil_rise_k=top_oil_rise_k, loss_ratio=loss_ratio, oil_exponent=oil_exponent
    )
    return ambient_c + rise + hot_spot_gradient_k * k**winding_exponent


def iec_temperatures(
    k: Any,
    ambient_c: Any,
    interval_min: float,
    *,
    top_oil_rise_k: float,
    hot_spot_gradient_k: float,
    loss_ratio: float,
    oil_exponent: float,
    winding_exponent: float,
    oil_time_constant_min: float,
    winding_time_constant_min: float,
    k11: float,
    k21: float,
    k22: float,
) -> tuple[Any, Any]:
    """Top-oil and hot-spot temperature over time, IEC 60076-7:2018 clause 8.2 (exact-step difference equations).

    Parameters
    ----------
    k : array, shape (n_transformers, n_time)
        Load factor per interval; must be finite (fill gaps before). [pu]
    ambient_c : float or array, shape (n_time,) or (n_transformers, n_time)
        Ambient temperature. [degC]
    interval_min : float
        Grid step. [min]
    top_oil_rise_k, hot_spot_gradient_k : float
        ``dtheta_or`` and ``H g_r`` at rated load. [K]
    loss_ratio, oil_exponent, winding_exponent : float
        ``R``, ``x``, ``y``. [-]
    oil_time_constant_min, winding_time_constant_min : float
        ``tau_o`` and ``tau_w``. [min]
    k11, k21, k22 : float
        Thermal model constants (IEC 60076-7 Table 4). [-]

    Returns
    -------
    top_oil_c, hot_spot_c : array, shape (n_transformers, n_time)
        [degC]. The initial state is the steady state at the first interval's load and ambient.

    Notes
    -----
    Per step, with ``f(tau) = 1 - exp(-Dt / tau)``::

        theta_o[i]  = theta_o[i-1] + f(k11 tau_o) (theta_a[i] + dtheta_or ((1 + R K^2)/(1 + R))^x - theta_o[i-1])
        dth1[i]     = dth1[i-1] + f(k22 tau_w) (k21 H g_r K^y - dth1[i-1])
        dth2[i]     = dth2[i-1] + f(tau_o / k22) ((k21 - 1) H g_r K^y - dth2[i-1])
        theta_h[i]  = theta_o[i] + dth1[i] - dth2[i]
    """
    xp = array_namespace(k)
    k = xp.asarray(k)
    f_oil = 1.0 - math.exp(-interval_min / (k11 * oil_time_constant_min))
    f_w1 = 1.0 - math.exp(-interval_min / (k22 * winding_time_constant_min))
    f_w2 = 1.0 - math.exp(-interval_min * k22 / oil_time_constant_min)
    # The lag is linear and starts in steady state, so lag(ambient + rise) = lag(ambient) + lag(rise), and
    # constant factors go into the lag's matrices.
    top_oil = _first_order_lag(_oil_rise_shape(k, loss_ratio, oil_exponent), f_oil, gain=top_oil_rise_k)
    top_oil += _ambient_lagged(xp, ambient_c, k, f_oil)
    k_y = k**winding_exponent
    if k21 != 1.0:
        hot_spot = top_oil + _first_order_lag(k_y, f_w1, gain=k21 * hot_spot_gradient_k)
        hot_spot -= _first_order_lag(k_y, f_w2, gain=(k21 - 1.0) * hot_spot_gradient_k)
    else:  # distribution units: k21 = 1, no oil-flow overshoot term
        hot_spot = top_oil + _first_order_lag(k_y, f_w1, gain=hot_spot_gradient_k)
    return top_oil, hot_spot


def ieee_temperatures(
    k: Any,
    ambient_c: Any,
    interval_min: float,
    *,
    top_oil_rise_k: float,
    hot_spot_gradient_k: float,
    loss_ratio: float,
    oil_exponent: float,
    winding_exponent: float,
    oil_time_constant_min: float,
    winding_time_constant_min: float,
    **_: float,
) -> tuple[Any, Any]:
    """Top-oil and hot-spot temperature over time, IEEE C57.91-2011 Clause 7 (exponential equations).

    Parameters are those of :func:`iec_temperatures` (``oil_exponent`` is ``n``, ``winding_exponent`` is
    ``2 m``, ``hot_spot_gradient_k`` is ``dtheta_H,R``); ``k11, k21, k22`` are accepted and ignored.

    Returns
    -------
    top_oil_c, hot_spot_c : array, shape (n_transformers, n_time)
        [degC]; initial state is the steady state at the first interval.

    Notes
    -----
    ``dtheta_TO[i] = U_TO[i] + (dtheta_TO[i-1] - U_TO[i]) exp(-Dt / tau_TO)`` with
    ``U_TO = dtheta_TO,R ((K^2 R + 1)/(R + 1))^n``; the same for ``dtheta_H`` with
    ``U_H = dtheta_H,R K^(2m)`` and ``tau_w``; ``theta_H = theta_A + dtheta_TO + dtheta_H``.
    """
    xp = array_namespace(k)
    k = xp.asarray(k)
    d_oil = math.exp(-interval_min / oil_time_constant_min)
    d_w = math.exp(-interval_min / winding_time_constant_min)
    top_oil = _first_order_lag(_oil_rise_shape(k, loss_ratio, oil_exponent), 1.0 - d_oil, gain=top_oil_rise_k)
    if isinstance(ambient_c, (int, float)):
        top_oil += float(ambient_c)
    else:
        top_oil += xp.asarray(ambient_c, dtype=k.dtype)
    hot_spot = top_oil + _first_order_lag(k**winding_exponent, 1.0 - d_w, gain=hot_spot_gradient_k)
    return top_oil, hot_spot


def relative_aging_rate(hot_spot_c: Any, insulation: Literal["thermally_upgraded", "normal"]) -> Any:
    """Relative ageing rate of the insulation.

    Parameters
    ----------
    hot_spot_c : array
        Hot-spot temperature. [degC]
    insulation : {"thermally_upgraded", "normal"}
        ``"thermally_upgraded"``: ``F_AA = exp(15000/383 - 15000/(theta_h + 273))`` (IEEE C57.91 eq. 2,
        IEC 60076-7 eq. 3; 1.0 at 110 degC). ``"normal"`` (non-upgraded Kraft paper):
        ``V = 2^((theta_h - 98)/6)`` (IEC 60076-7 eq. 2; 1.0 at 98 degC).

    Returns
    -------
    array, shape of ``hot_spot_c``
        [-] (hours of normal life consumed per hour).

    Examples
    --------
    >>> import numpy as np
    >>> [round(float(v), 3) for v in relative_aging_rate(np.asarray([110.0, 120.0]), "thermally_upgraded")]
    [1.0, 2.709]
    """
    xp = array_namespace(hot_spot_c)
    if insulation == "thermally_upgraded":
        return xp.exp(15000.0 / 383.0 - 15000.0 / (hot_spot_c + 273.0))
    if insulation == "normal":
        return xp.exp((hot_spot_c - 98.0) * (math.log(2.0) / 6.0))
    raise ValueError(f"insulation must be 'thermally_upgraded' or 'normal', got {insulation!r}")


def equivalent_aging_factor(aging_rate: Any) -> Any:
    """Equivalent ageing factor over the period, ``F_EQA`` (IEEE C57.91 eq. 3), NaN-aware.

    Parameters
    ----------
    aging_rate : array, shape (n_transformers, n_time)
        Relative ageing rate per interval on a regular grid. [-]

    Returns
    -------
    array, shape (n_transformers,)
        Mean ageing rate over the intervals that are not NaN (NaN where none is). [-]
    """
    xp = array_namespace(aging_rate)
    valid = ~xp.isnan(aging_rate)
    total = xp.sum(xp.where(valid, aging_rate, 0.0), axis=-1)
    count = xp.sum(xp.astype(valid, aging_rate.dtype), axis=-1)
    return xp.where(count > 0, total / xp.where(count > 0, count, 1.0), xp.nan)


def loss_of_life_hours(aging_rate: Any, interval_h: float) -> Any:
    """Insulation life consumed over the period, ``F_EQA * t`` [h] (IEEE C57.91 eq. 4 without ``/ normal life``).

    Parameters
    ----------
    aging_rate : array, shape (n_transformers, n_time)
        Relative ageing rate per interval. [-]
    interval_h : float
        Grid step. [h]

    Returns
    -------
    array, shape (n_transformers,)
        [h]; intervals with NaN ageing count at the period's ``F_EQA``.
    """
    return equivalent_aging_factor(aging_rate) * (aging_rate.shape[-1] * interval_h)
