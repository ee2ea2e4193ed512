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
    the common voltage level of its meters (relative to the rest of the feeder) steps by more than
    ``tap_fault_steps`` tap steps of ``tap_step_pu``: tap or winding problem.
``correlation_loss``
    all its meters lose correlation with the feeder reference in the same windows (at least
    ``health_min_lost_windows`` windows of ``health_window`` samples) while the rest of the feeder does
    not: winding or connection problem.
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

import math
import warnings
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
# Transformers per call of the thermal kernel: bounds memory to ~6 arrays of chunk x n_time float64.
_THERMAL_CHUNK = 4096


def _fill_time_gaps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation along time of NaN samples, constant at the ends, 0 for rows without data.

    Returns the filled array and the boolean mask of real samples, both (n_rows, n_time).
    """
    valid = ~np.isnan(x)
    if valid.all():
        return x, valid
    n_t = x.shape[1]
    flat = x.ravel()
    good = np.flatnonzero(valid)
    holes = np.flatnonzero(~valid)
    row = holes // n_t
    pos = np.searchsorted(good, holes)
    prev = good[np.clip(pos - 1, 0, max(good.size - 1, 0))] if good.size else np.zeros_like(holes)
    nxt = good[np.clip(pos, 0, max(good.size - 1, 0))] if good.size else np.zeros_like(holes)
    has_prev = (pos > 0) & (prev // n_t == row) if good.size else np.zeros(holes.size, bool)
    has_next = (pos < good.size) & (nxt // n_t == row) if good.size else np.zeros(holes.size, bool)
    both = has_prev & has_next
    span = np.where(both, nxt - prev, 1)
    x_prev, x_next = flat[prev] if good.size else 0.0, flat[nxt] if good.size else 0.0
    fill = np.where(
        both,
        x_prev + (x_next - x_prev) * (holes - prev) / span,
        np.where(has_prev, x_prev, np.where(has_next, x_next, 0.0)),
    )
    out = flat.copy()
    out[holes] = fill
    return out.reshape(x.shape), valid


def _indicator(rows: np.ndarray, n_rows: int, weights: np.ndarray | None = None) -> sparse.csr_array:
    """Sparse (n_rows, n_items) matrix with a 1 (or the weight) at (rows[j], j); rows < 0 are dropped."""
    keep = rows >= 0
    cols = np.flatnonzero(keep)
    data = np.ones(cols.size) if weights is None else weights[keep]
    return sparse.csr_array((data, (rows[keep], cols)), shape=(n_rows, rows.size))


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


def _thermal_summary(
    loading: np.ndarray, ambient: np.ndarray | float, interval_min: float, config: ValidationConfig
) -> dict[str, np.ndarray]:
    """Max top oil / hot spot, hours above the limits, F_EQA and loss of life per row of ``loading``."""
    model = thermal.iec_temperatures if config.thermal_standard == "iec" else thermal.ieee_temperatures
    params = _thermal_parameters(config)
    n = loading.shape[0]
    out = {k: np.full(n, np.nan) for k in ("max_top_oil_c", "max_hot_spot_c", "f_eqa", "loss_of_life_h")}
    out["hours_above_normal"] = np.zeros(n)
    out["hours_above_emergency"] = np.zeros(n)
    ok = np.flatnonzero(np.isfinite(loading).all(axis=1))
    interval_h = interval_min / 60.0
    for start in range(0, ok.size, _THERMAL_CHUNK):
        rows = ok[start : start + _THERMAL_CHUNK]
        # float32 halves the memory traffic; temperatures stay within ~1e-4 degC of float64 (tests check 0.01)
        k = np.ascontiguousarray(loading[rows], dtype=np.float32)
        amb = ambient[rows] if isinstance(ambient, np.ndarray) and ambient.ndim == 2 else ambient
        top_oil, hot_spot = model(k, amb, interval_min, **params)
        rate = thermal.relative_aging_rate(hot_spot, config.insulation)
        out["max_top_oil_c"][rows] = top_oil.max(axis=1)
        out["max_hot_spot_c"][rows] = hot_spot.max(axis=1)
        out["f_eqa"][rows] = thermal.equivalent_aging_factor(rate)
        out["loss_of_life_h"][rows] = thermal.loss_of_life_hours(rate, interval_h)
        out["hours_above_normal"][rows] = (hot_spot > config.hot_spot_normal_c).sum(axis=1) * interval_h
        out["hours_above_emergency"][rows] = (hot_spot > config.hot_spot_emergency_c).sum(axis=1) * interval_h
    return out


def _window_sums(x: np.ndarray, valid: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums and counts of the valid samples of every length-``w`` window start, shape (n, n_time - w + 1)."""
    cs = np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(np.where(valid, x, 0.0), axis=1)], axis=1)
    cn = np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(valid, axis=1)], axis=1)
    return cs[:, w:] - cs[:, :-w], cn[:, w:] - cn[:, :-w]


def _level_step(offset: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest difference between the means of two adjacent windows of ``w`` samples (two-window detector).

    Returns the absolute step [pu] (NaN where too few samples) and the index of the first sample after it.
    """
    n, n_t = offset.shape
    if n_t < 2 * w:
        return np.full(n, np.nan), np.full(n, -1)
    valid = np.isfinite(offset)
    s, c = _window_sums(offset, valid, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(c >= w // 2, s / c, np.nan)
    d = np.abs(m[:, w:] - m[:, : m.shape[1] - w])  # window ending at split vs window starting at split
    any_ok = np.isfinite(d).any(axis=1)
    split = np.argmax(np.where(np.isfinite(d), d, -1.0), axis=1)
    step = np.where(any_ok, d[np.arange(n), split], np.nan)
    return step, np.where(any_ok, split + w, -1)


def _windowed_correlation(a: np.ndarray, b: np.ndarray, w: int) -> np.ndarray:
    """Pearson correlation of rows of ``a`` and ``b`` in consecutive windows of ``w`` samples, NaN-aware.

    Shapes (n, n_time) -> (n, n_time // w); NaN where a window has fewer than w/2 common samples.
    """
    n, n_t = a.shape
    nw = n_t // w
    a = a[:, : nw * w].reshape(n, nw, w)
    b = b[:, : nw * w].reshape(n, nw, w)
    valid = np.isfinite(a) & np.isfinite(b)
    a0 = np.where(valid, a, 0.0)
    b0 = np.where(valid, b, 0.0)
    cnt = valid.sum(axis=2)
    sa, sb = a0.sum(axis=2), b0.sum(axis=2)
    sab = np.einsum("ijk,ijk->ij", a0, b0)
    saa = np.einsum("ijk,ijk->ij", a0, a0)
    sbb = np.einsum("ijk,ijk->ij", b0, b0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (cnt * sab - sa * sb) / np.sqrt((cnt * saa - sa * sa) * (cnt * sbb - sb * sb))
    return np.where(cnt >= w // 2, r, np.nan)


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


def _health(
    voltage: np.ndarray,
    tx_of_meter: np.ndarray,
    feeder_of_tx: np.ndarray,
    n_tx: int,
    meters: pd.DataFrame,
    ref_pu: dict[tuple[str, str], np.ndarray],
    config: ValidationConfig,
) -> dict[str, np.ndarray]:
    """Voltage-level step and correlation loss per transformer (see module docstring)."""
    v = np.asarray(voltage, dtype=np.float64)
    valid = np.isfinite(v) & (v > 0)
    n_ok = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        level = np.where(n_ok > 0, np.where(valid, v, 0.0).sum(axis=1) / n_ok, np.nan)
        vpu = np.where(valid, v / level[:, None], np.nan)
    valid = np.isfinite(vpu)
    v0 = np.where(valid, vpu, 0.0)
    w = config.health_window
    n_m = v.shape[0]

    # Level: transformer mean minus the rest of its feeder (leave-this-transformer-out mean).
    M = _indicator(tx_of_meter, n_tx)
    tx_sum, tx_cnt = M @ v0, M @ valid.astype(np.float64)
    feeder_codes, feeder_names = pd.factorize(feeder_of_tx)
    F = _indicator(feeder_codes, len(feeder_names))  # (n_feeders, n_tx)
    fd_sum, fd_cnt = F @ tx_sum, F @ tx_cnt
    rest_cnt = fd_cnt[feeder_codes] - tx_cnt
    with np.errstate(invalid="ignore", divide="ignore"):
        tx_mean = np.where(tx_cnt > 0, tx_sum / tx_cnt, np.nan)
        rest_mean = np.where(rest_cnt > 0, (fd_sum[feeder_codes] - tx_sum) / rest_cnt, np.nan)
    n_meters = np.bincount(tx_of_meter[tx_of_meter >= 0], minlength=n_tx)
    step, split = _level_step(tx_mean - rest_mean, w)

    # Correlation: each meter's differenced voltage vs its feeder-head reference (its phase), else vs the
    # mean of the other transformers' meters on its feeder.
    dv = np.diff(vpu, axis=1)
    ref_rows = np.full((n_m, v.shape[1]), np.nan)
    feeder_m = meters["feeder_id"].astype(str).to_numpy()
    phase_m = meters["phase"].astype(str).to_numpy()
    have_ref = np.zeros(n_m, dtype=bool)
    for (fid, ph), series in ref_pu.items():
        sel = (feeder_m == fid) & (phase_m == ph)
        ref_rows[sel] = series
        have_ref |= sel
    tx_safe = np.clip(tx_of_meter, 0, None)
    fallback = rest_mean[tx_safe]
    ref_rows = np.where(have_ref[:, None], ref_rows, fallback)
    r = _windowed_correlation(dv, np.diff(ref_rows, axis=1), w)  # (n_m, n_win)
    usable = tx_of_meter >= 0
    with warnings.catch_warnings():  # meters without any valid window: NaN baseline, not usable
        warnings.simplefilter("ignore", RuntimeWarning)
        baseline = np.nanmedian(r, axis=1) if r.shape[1] else np.full(n_m, np.nan)
    baseline_ok = baseline >= config.health_min_correlation
    baseline_ok &= usable
    ok_valid = baseline_ok[:, None] & np.isfinite(r)
    lost = ok_valid & (r < config.health_min_correlation)
    c_ok, c_lost = M @ ok_valid.astype(np.float64), M @ lost.astype(np.float64)  # (n_tx, n_win)
    f_ok, f_lost = F @ c_ok, F @ c_lost
    rest_ok, rest_lost = f_ok[feeder_codes] - c_ok, f_lost[feeder_codes] - c_lost
    with np.errstate(invalid="ignore", divide="ignore"):
        rest_frac = np.where(rest_ok > 0, rest_lost / rest_ok, 0.0)
    win_lost = (c_ok >= config.health_min_meters) & (c_lost == c_ok) & (rest_frac < 0.5)
    enough = n_meters >= config.health_min_meters
    return {
        "voltage_step_pu": np.where(enough, step, np.nan),
        "voltage_step_index": np.where(enough, split, -1),
        "correlation_lost_windows": np.where(enough, win_lost.sum(axis=1), 0),
        "correlation_first_lost": (
            np.where(win_lost.any(axis=1), np.argmax(win_lost, axis=1), -1)
            if win_lost.shape[1]
            else np.full(n_tx, -1)
        ),
    }


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
        ``flags`` (list of :data:`VALIDATION_FLAGS`), ``flag_reasons`` (list of str, one per flag).

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
    unknown = mapped & ~meter_tx.isin(tx_table["transformer_id"]).to_numpy()
    extra = meters.loc[unknown, ["transformer_id", "feeder_id"]].astype(str).drop_duplicates("transformer_id")
    tx = pd.concat([tx_table, extra], ignore_index=True)
    tx["feeder_id"] = tx["feeder_id"].astype(str)
    tx = tx.sort_values(["feeder_id", "transformer_id"], kind="stable").reset_index(drop=True)
    n_tx = len(tx)
    tx_pos = pd.Index(tx["transformer_id"])
    tx_of_meter = np.where(mapped, tx_pos.get_indexer(meter_tx.fillna("")), -1)

    # Power per meter, gaps filled; kvar from the power factor where missing.
    p, p_valid = _fill_time_gaps(np.asarray(kw, dtype=np.float64))
    tan_phi = math.tan(math.acos(config.default_power_factor))
    if kvar is None:
        q = p * tan_phi
    else:
        kvar = np.asarray(kvar, dtype=np.float64)
        has_q = np.isfinite(kvar).any(axis=1)
        q, _ = _fill_time_gaps(kvar)
        q = np.where(has_q[:, None], q, p * tan_phi)

    # Per-phase sums by sparse aggregation: row 3 * transformer + phase.
    weights = np.array([_PHASE_WEIGHTS.get(str(ph), _UNKNOWN_PHASE) for ph in meters["phase"]]).reshape(
        n_m, 3
    )
    rows = np.repeat(tx_of_meter[:, None] * 3, 3, axis=1) + np.arange(3)
    rows = np.where(tx_of_meter[:, None] >= 0, rows, -1)
    W = sparse.csr_array(
        (weights[rows >= 0], (rows[rows >= 0], np.repeat(np.arange(n_m), 3)[rows.ravel() >= 0])),
        shape=(3 * n_tx, n_m),
    )
    p_ph = (W @ p).reshape(n_tx, 3, n_t)
    q_ph = (W @ q).reshape(n_tx, 3, n_t)
    s_ph = np.hypot(p_ph, q_ph)
    s_tot = np.hypot(p_ph.sum(axis=1), q_ph.sum(axis=1))

    M = _indicator(tx_of_meter, n_tx)
    n_meters = np.bincount(tx_of_meter[tx_of_meter >= 0], minlength=n_tx)
    with np.errstate(invalid="ignore", divide="ignore"):
        kw_coverage = (M @ p_valid.sum(axis=1).astype(np.float64)) / (n_meters * n_t)
    phases_on = (M @ (weights > 0).astype(np.float64)) > 0  # (n_tx, 3)

    rating = pd.to_numeric(tx.get("kva_rating"), errors="coerce").to_numpy(dtype=np.float64)
    rating = np.where(rating > 0, rating, np.nan)
    n_ph = pd.to_numeric(tx.get("n_phases"), errors="coerce").to_numpy(dtype=np.float64)
    three = np.where(np.isfinite(n_ph), n_ph == 3, phases_on.sum(axis=1) >= 2) if n_tx else np.zeros(0, bool)
    loading = np.where(
        three[:, None], 3.0 * s_ph.max(axis=1) / rating[:, None], s_tot / rating[:, None]
    )  # NaN rows where no rating

    mean_ph = s_ph.mean(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mbar = mean_ph.mean(axis=1)
        imbalance = np.where(three & (mbar > 0), np.abs(mean_ph - mbar[:, None]).max(axis=1) / mbar, np.nan)

    ambient = _ambient_series(ambient_c, times, config.ambient_c)
    th = _thermal_summary(loading, ambient, interval_min, config)

    if voltage is not None:
        hl = _health(
            np.asarray(voltage),
            tx_of_meter,
            tx["feeder_id"].to_numpy(),
            n_tx,
            meters,
            _reference_pu(references, times, pd.Index(tx["feeder_id"].unique())),
            config,
        )
    else:
        hl = {
            "voltage_step_pu": np.full(n_tx, np.nan),
            "voltage_step_index": np.full(n_tx, -1),
            "correlation_lost_windows": np.zeros(n_tx, dtype=int),
            "correlation_first_lost": np.full(n_tx, -1),
        }

    out = pd.DataFrame(
        {
            "transformer_id": tx["transformer_id"].to_numpy(),
            "feeder_id": tx["feeder_id"].to_numpy(),
            "phases": ["".join(c for c, on in zip("ABC", row) if on) for row in phases_on],
            "n_phases": np.where(three, 3, 1),
            "n_meters": n_meters,
            "kva_rating": rating,
            "kw_coverage": kw_coverage,
            "peak_kva": s_tot.max(axis=1) if n_t else np.nan,
            "mean_kva": s_tot.mean(axis=1) if n_t else np.nan,
            "mean_kva_a": mean_ph[:, 0],
            "mean_kva_b": mean_ph[:, 1],
            "mean_kva_c": mean_ph[:, 2],
            "peak_loading_pu": loading.max(axis=1),
            "p99_loading_pu": np.quantile(loading, 0.99, axis=1) if n_t else np.nan,
            "mean_loading_pu": loading.mean(axis=1),
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
            "voltage_step_time": pd.DatetimeIndex(
                [times[i] if i >= 0 else np.datetime64("NaT") for i in hl["voltage_step_index"]]
            ),
            "correlation_lost_windows": hl["correlation_lost_windows"].astype(int),
        }
    )
    flags: list[list[str]] = []
    reasons: list[list[str]] = []
    step_limit = config.tap_fault_steps * config.tap_step_pu
    for i, r in enumerate(out.itertuples(index=False)):
        f: list[str] = []
        why: list[str] = []
        if not np.isfinite(r.kva_rating):
            f.append("no_rating")
            why.append("no usable kva_rating: loading and thermal model not computed")
        if r.n_meters > 0 and not r.kw_coverage > 0:
            f.append("no_load_data")
            why.append("none of its meters has a kW sample")
        if r.max_hot_spot_c > config.hot_spot_normal_c:
            f.append("overload")
            why.append(
                f"hot spot {r.max_hot_spot_c:.1f} degC above the normal-cyclic limit "
                f"{config.hot_spot_normal_c:g} degC for {r.hours_above_normal:.2f} h "
                f"(peak loading {r.peak_loading_pu:.2f} pu)"
            )
        if r.max_hot_spot_c > config.hot_spot_emergency_c:
            f.append("emergency_overload")
            why.append(
                f"hot spot {r.max_hot_spot_c:.1f} degC above the emergency limit "
                f"{config.hot_spot_emergency_c:g} degC for {r.hours_above_emergency:.2f} h"
            )
        if (
            r.p99_loading_pu > config.max_plausible_loading_pu
            or r.mean_loading_pu > config.max_plausible_mean_loading_pu
        ):
            f.append("mapping_contradicts_rating")
            why.append(
                f"the inferred mapping puts {r.n_meters} meters with mean {r.mean_kva:.1f} kVA "
                f"(99th percentile {r.p99_loading_pu:.2f} pu, mean {r.mean_loading_pu:.2f} pu) on a "
                f"{r.kva_rating:g} kVA unit: impossible, send to manual audit"
            )
        if r.imbalance > config.max_imbalance:
            f.append("high_imbalance")
            why.append(
                f"phase imbalance {r.imbalance:.2f} above {config.max_imbalance:g} (mean kVA A/B/C "
                f"{r.mean_kva_a:.1f}/{r.mean_kva_b:.1f}/{r.mean_kva_c:.1f})"
            )
        if r.voltage_step_pu > step_limit:
            f.append("voltage_level_step")
            why.append(
                f"common voltage level of its meters steps by {100 * r.voltage_step_pu:.2f}% "
                f"(> {config.tap_fault_steps:g} tap steps of {100 * config.tap_step_pu:g}%) at "
                f"{r.voltage_step_time}: check tap position and windings"
            )
        if r.correlation_lost_windows >= max(config.health_min_lost_windows, 1):
            first = hl["correlation_first_lost"][i]
            why_t = times[min(first * config.health_window, n_t - 1)] if first >= 0 else None
            f.append("correlation_loss")
            why.append(
                f"all its meters lost correlation with the feeder reference together in "
                f"{r.correlation_lost_windows} window(s) from {why_t}: check windings and connections"
            )
        flags.append(f)
        reasons.append(why)
    out["flags"] = flags
    out["flag_reasons"] = reasons
    return out


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
    for fl in table["flags"]:
        for f in fl:
            counts[f] = counts.get(f, 0) + 1
    return {
        "transformers": len(table),
        "flagged": int(sum(1 for fl in table["flags"] if fl)),
        "flags": counts,
        "max_hot_spot_c": float(np.nanmax(table["max_hot_spot_c"]))
        if table["max_hot_spot_c"].notna().any()
        else None,
    }
