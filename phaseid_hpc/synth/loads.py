"""Per-customer load profiles: daily and weekly shape, shared weather, appliance events, customer noise.

White-noise loads make every phase-identification method look perfect, because the meter's own voltage
drop then carries an independent fingerprint at every step. Real customer loads are smooth most of the
time, share the daily rhythm and the weather with everyone, and jump when an appliance switches.

Model (per customer ``i``, interval ``t``, kW)::

    p_i(t) = ( base_i * shape_{c_i}(hour - shift_i, weekday)     # residential/commercial archetype
               + ac_i * clip((T(t) - Tset_i) / 10, 0, 1.5) )   # cooling driven by the shared weather
             * exp(ar1_i(t))                                    # customer noise, AR(1) in log, ~2 h
             + sum of appliance events (rectangles, 1-7 kW, 15 min - 3 h)  # dryer, oven, EV, pump

``q_i(t) = p_i(t) * tan(acos(pf_i))`` with a lower power factor on the cooling part.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ar1_filter", "customer_loads", "weather_temperature"]


def ar1_filter(e: np.ndarray, phi: float) -> np.ndarray:
    """``x[..., t] = phi * x[..., t-1] + e[..., t]`` along the last axis (a new array, dtype of ``e``).

    A loop over time, vectorised over rows. Rows are first laid out time-major, so each step reads and
    writes one contiguous row of ``n_rows`` values instead of a strided column (the same arithmetic, in the
    same order, as :func:`_ar1_filter_reference`).
    """
    e = np.asarray(e)
    if e.ndim < 2:
        return _ar1_filter_reference(e, phi)
    xt = np.ascontiguousarray(np.moveaxis(e, -1, 0))  # (n_time, ...), a copy
    tmp = np.empty(xt.shape[1:], np.result_type(xt, phi))  # the promoted type NumPy computes ``phi * x`` in
    for t in range(1, xt.shape[0]):
        np.multiply(xt[t - 1], phi, out=tmp)
        xt[t] += tmp
    return np.ascontiguousarray(np.moveaxis(xt, 0, -1))


def _ar1_filter_reference(e: np.ndarray, phi: float) -> np.ndarray:
    """Plain form of :func:`ar1_filter` (one strided column per step), kept to test the fast one against."""
    x = np.array(e, copy=True)
    for t in range(1, x.shape[-1]):
        x[..., t] += phi * x[..., t - 1]
    return x


def weather_temperature(rng: np.random.Generator, hours: np.ndarray, day_index: np.ndarray) -> np.ndarray:
    """Outdoor temperature shared by a whole region [degC].

    Parameters
    ----------
    rng : numpy.random.Generator
    hours : ndarray, shape (n_time,)
        Local hour of day (fractional) of each interval.
    day_index : ndarray, shape (n_time,), int
        Day number of each interval (0-based).

    Returns
    -------
    ndarray, shape (n_time,)
    """
    n_days = int(day_index.max()) + 1
    daily_mean = np.empty(n_days)
    x = 0.0
    for d in range(n_days):  # AR(1) day-to-day weather, a few values only
        x = 0.7 * x + rng.normal(0, 2.0)
        daily_mean[d] = 24.0 + x
    swing = rng.uniform(4, 7, n_days)[day_index]
    cloud = np.cumsum(rng.normal(0, 0.25, len(hours)))
    cloud -= np.convolve(cloud, np.ones(9) / 9, mode="same")
    return daily_mean[day_index] + swing * np.cos(2 * np.pi * (hours - 15.0) / 24) + cloud


def _shape(hours: np.ndarray, weekend: np.ndarray, commercial: np.ndarray) -> np.ndarray:
    """Archetype daily shape (mean ~1), residential double hump or commercial business hours."""
    h = hours
    res = (
        0.55
        + 0.35 * np.exp(-0.5 * ((h - 7.5) / 1.3) ** 2)
        + 0.75 * np.exp(-0.5 * ((h - 19.0) / 2.2) ** 2)
        + 0.15 * weekend * np.exp(-0.5 * ((h - 12.5) / 3.0) ** 2)
    )
    open_ = 1 / (1 + np.exp(-(h - 7.5) * 2)) * 1 / (1 + np.exp((h - 18.5) * 2))
    com = 0.35 + 0.9 * open_ * (1 - 0.6 * weekend)
    return np.where(commercial, com, res)


def customer_loads(
    rng: np.random.Generator,
    hours: np.ndarray,
    weekday: np.ndarray,
    temperature: np.ndarray,
    commercial: np.ndarray,
    interval_h: float,
    *,
    pv_kw: np.ndarray | None = None,
    irradiance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Active and reactive load of every customer.

    Parameters
    ----------
    rng : numpy.random.Generator
    hours : ndarray, shape (n_time,)
        Local hour of day of the interval [h].
    weekday : ndarray, shape (n_time,), int
        0 = Monday.
    temperature : ndarray, shape (n_time,)
        Shared outdoor temperature [degC].
    commercial : ndarray, shape (n_meters,), bool
        Commercial archetype (business hours, larger, lower power factor).
    interval_h : float
        Interval length [h].
    pv_kw : ndarray, shape (n_meters,), optional
        Rooftop PV size [kW] (0: none); subtracted from the load as ``pv_kw * irradiance``.
    irradiance : ndarray, shape (n_time,), optional
        Shared clear-sky-times-clouds profile [0..1].

    Returns
    -------
    kw, kvar : ndarray, shape (n_meters, n_time), float32
        Net interval-mean active [kW] and reactive [kvar] load.
    """
    n = len(commercial)
    n_t = len(hours)
    f32 = np.float32
    base = rng.lognormal(np.log(1.1), 0.45, n) * np.where(commercial, 6.0, 1.0)
    # Customer-specific time shift of the daily rhythm, in whole intervals (at most +-3 h): the shape is
    # evaluated once per archetype on an extended grid and each customer takes a shifted window of it.
    k_max = max(1, round(3.0 / interval_h))
    shift = np.clip(np.round(rng.normal(0, 1.2, n) / interval_h), -k_max, k_max).astype(np.int64)
    h_ext = (
        np.concatenate(
            [
                hours[0] - interval_h * np.arange(k_max, 0, -1),
                hours,
                hours[-1] + interval_h * np.arange(1, k_max + 1),
            ]
        )
        % 24
    )
    wd_ext = np.concatenate([np.repeat(weekday[0], k_max), weekday, np.repeat(weekday[-1], k_max)])
    we_ext = (wd_ext >= 5).astype(float)
    shapes = np.stack([_shape(h_ext, we_ext, np.bool_(c)) for c in (False, True)]).astype(f32)
    windows = np.lib.stride_tricks.sliding_window_view(shapes, n_t, axis=1)  # (2, 2k+1, T)
    p = windows[commercial.astype(np.int64), k_max - shift]
    p *= base.astype(f32)[:, None]
    # Customer noise: AR(1) in log, time constant ~2 h (multiplies the whole behind-the-meter load).
    phi = np.exp(-interval_h / 2.0)
    sig = rng.uniform(0.06, 0.18, n)
    e = rng.standard_normal((n, n_t), dtype=f32)
    e *= (sig * np.sqrt(1 - phi**2)).astype(f32)[:, None]
    e[:, 0] = rng.standard_normal(n) * sig
    ar = ar1_filter(e, phi)
    ar -= (0.5 * sig**2).astype(f32)[:, None]
    noise = np.exp(ar, out=ar)
    # Cooling: thermostat set point and AC size; duty cycling follows the customer noise.
    ac = np.where(rng.random(n) < 0.8, rng.uniform(1.5, 4.5, n), 0.0) * np.where(commercial, 4.0, 1.0)
    tset = rng.normal(24.5, 1.5, n)
    cool = temperature.astype(f32)[None, :] - tset.astype(f32)[:, None]
    cool *= f32(0.1)
    np.clip(cool, 0, 1.5, out=cool)
    cool *= ac.astype(f32)[:, None]
    p += cool
    p *= noise
    cool *= noise
    del noise, ar
    # Appliance events: Poisson number per customer, rectangles added through a difference array.
    n_days = n_t * interval_h / 24.0
    n_ev = rng.poisson(rng.uniform(0.8, 3.0, n) * n_days)
    owner = np.repeat(np.arange(n), n_ev)
    k = len(owner)
    # Events prefer waking hours: draw a day and an hour from a diurnal density.
    day = rng.integers(0, max(int(np.ceil(n_days)), 1), k)
    hour = rng.normal(18.0, 4.0, k) % 24
    start = ((day * 24 + hour) / interval_h).astype(np.int64)
    dur = np.maximum(1, np.round(rng.lognormal(np.log(0.75), 0.7, k) / interval_h)).astype(np.int64)
    kw_ev = rng.choice([1.2, 2.0, 3.5, 4.5, 7.2], k, p=[0.3, 0.25, 0.2, 0.15, 0.1]) * rng.uniform(
        0.85, 1.15, k
    )
    stop = np.minimum(start + dur, n_t)
    ok = start < n_t
    step = np.zeros((n, n_t + 1), dtype=f32)
    np.add.at(step, (owner[ok], start[ok]), kw_ev[ok].astype(f32))
    np.add.at(step, (owner[ok], stop[ok]), -kw_ev[ok].astype(f32))
    p += np.cumsum(step[:, :n_t], axis=1, dtype=f32)
    del step
    pf = np.clip(rng.normal(0.96, 0.02, n) - 0.04 * commercial, 0.8, 0.995)
    q = p * np.tan(np.arccos(pf)).astype(f32)[:, None]
    cool *= f32(0.35)
    q += cool
    if pv_kw is not None and irradiance is not None:
        p -= pv_kw.astype(f32)[:, None] * irradiance.astype(f32)[None, :]
    return p, q
