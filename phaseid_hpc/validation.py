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
    the common voltage level of its meters (relative to the median of the other transformers of the
    feeder, less the part its own load explains through its impedance) steps by more than
    ``tap_fault_steps`` tap steps of ``tap_step_pu``: tap or winding problem.
``correlation_loss``
    the mean of its meters (their own noise averaged out) loses correlation with the feeder reference
    (the feeder head of their phase, else the median of the other transformers of the feeder) in at least
    ``health_min_lost_windows`` consecutive windows of ``health_window`` samples (windows end at the last
    sample), while every one of its meters still follows its siblings (a cause common to the unit) and
    the rest of the feeder does not lose it too: winding or connection problem. Lost: correlation below
    ``health_min_correlation``, or below half the unit's usual one (its best window out of at most 8, else
    the upper quartile of its windows, at least the second-best) and ``health_loss_se`` standard errors of
    Fisher z below it; or, with ``health_noise_factor``, its typical differenced step against the
    reference's above that many times its usual ratio (a noisy winding in a unit whose own load dominates
    its voltage). The reference of the level step is the median of the 8 transformers of the feeder
    whose fluctuations follow the unit's most closely (its regulator zone or lateral).
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
from typing import Any

import numpy as np
import pandas as pd

from ._compat import array_namespace, to_numpy
from .config import ValidationConfig
from .kernels import validation as kv

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
#: Transformers whose median is a transformer's reference in the health checks (its neighbourhood).
_NEIGHBOUR_TRANSFORMERS = 8
#: Contract names of the phase sets (bit 1 = A, 2 = B, 4 = C): pairs as AB, BC, CA (never AC).
_PHASES_ON_NAMES = np.array(["", "A", "B", "AB", "C", "CA", "BC", "ABC"], dtype=object)
#: Per-transformer columns of the thermal summary, in table order.
_THERMAL_COLUMNS = kv._THERMAL_KEYS


def validate_transformers(
    kw: Any,
    kvar: Any | None,
    voltage: Any | None,
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
    kw : array, shape (n_meters, n_time)
        Active power of each meter, NaN = missing (NumPy, CuPy or another array-API namespace; the
        ``(n_meters, n_time)`` arrays stay in it). [kW]
    kvar : array, shape (n_meters, n_time), optional
        Reactive power, NaN = missing; ``None``: from ``config.default_power_factor``. [kvar]
    voltage : array, shape (n_meters, n_time), optional
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
        ``flag_codes`` (list of :data:`VALIDATION_FLAGS`; not ``flags``, which would hide
        ``DataFrame.flags``), ``flag_reasons`` (list of str, one per flag).

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

    The steps: :func:`_transformer_table` (which units), :class:`~phaseid_hpc.kernels.validation.MeterGroups`
    (meters by unit), :func:`_phase_pairs` and :func:`~phaseid_hpc.kernels.validation.pair_power` (power per
    unit and phase), :func:`_loading` (loading and imbalance), :func:`~phaseid_hpc.kernels.validation.thermal_summary`,
    :func:`_health` and :func:`_flags`.
    """
    xp, kw, times = _checked_inputs(kw, meters, times)
    n_t = kw.shape[1]
    tx, groups, pairs = _meter_groups(meters, transformers)
    tan_phi = math.tan(math.acos(config.default_power_factor))
    p_pair, q_pair, kw_real = kv.pair_power(
        kw, None if kvar is None else xp.asarray(kvar), groups, pairs, tan_phi=tan_phi
    )
    tx_load = _transformer_load(p_pair, pairs, len(tx), voltage)
    cols = _loading(p_pair, q_pair, kw_real, groups, pairs, tx, n_t, tan_phi)
    loading = cols.pop("loading")
    cols.update(_thermal_columns(loading, cols["mean_loading_pu"], times, ambient_c, config, xp))
    hl = _health(voltage, meters, tx, groups, references, times, config, tx_load)
    cols.update(_health_columns(hl, times))
    out = pd.DataFrame(cols)
    out["flag_codes"], out["flag_reasons"] = _flags(out, hl["correlation_first_lost"], times, config)
    return out


def _checked_inputs(kw: Any, meters: pd.DataFrame, times: Any) -> tuple[Any, Any, np.ndarray]:
    """The array namespace of ``kw``, ``kw`` in it and ``times`` as datetime64[ns], shapes checked.

    Raises
    ------
    ValueError
        ``kw`` is not (n_meters, n_time) with ``len(meters)`` rows and ``times`` of shape (n_time,).
    """
    xp = array_namespace(kw)
    kw = xp.asarray(kw)
    times = np.asarray(times, dtype="datetime64[ns]")
    n_m, n_t = kw.shape
    if len(meters) != n_m or times.shape != (n_t,):
        raise ValueError(
            f"validate_transformers: kw is {tuple(kw.shape)}, meters has {len(meters)} rows and times "
            f"{times.shape}; expected (n_meters, n_time), n_meters rows and (n_time,)"
        )
    return xp, kw, times


def _interval_min(times: np.ndarray) -> float:
    """Sampling interval [min]: the median step of ``times``; 15 with fewer than two samples."""
    n_t = times.size
    return float(np.median(np.diff(times)).astype("timedelta64[s]").astype(float)) / 60 if n_t > 1 else 15.0


def _meter_groups(
    meters: pd.DataFrame, transformers: pd.DataFrame | None
) -> tuple[pd.DataFrame, kv.MeterGroups, dict[str, np.ndarray]]:
    """The block's transformer table, its meters grouped by unit and the loaded (unit, phase) pairs; see
    :func:`_transformer_table` and :func:`_phase_pairs`."""
    tx, tx_of_meter = _transformer_table(meters, transformers)
    groups = kv.MeterGroups.from_assignment(tx_of_meter, len(tx))
    return tx, groups, _phase_pairs(meters, groups)


def _transformer_load(
    p_pair: Any, pairs: dict[str, np.ndarray], n_tx: int, voltage: Any | None
) -> Any | None:
    """Active power of each transformer (n_tx, n_time) [kW], which the health checks use to remove the voltage
    its own load explains; ``None`` without voltage or without a loaded pair."""
    if voltage is None or not pairs["codes"].size:
        return None
    return kv.transformer_power(p_pair, pairs["tx"], n_tx)


def _thermal_columns(
    loading: Any,
    mean_loading_pu: np.ndarray,
    times: np.ndarray,
    ambient_c: Any,
    config: ValidationConfig,
    xp: Any,
) -> dict[str, np.ndarray]:
    """Thermal columns of the result (host arrays, shape (n_tx,)) from ``loading`` (n_tx, n_time) [pu] and
    ``ambient_c`` [degC]; units without a finite mean loading are skipped. See
    :func:`~phaseid_hpc.kernels.validation.thermal_summary`."""
    ambient = _ambient_series(ambient_c, times, config.ambient_c)
    th = kv.thermal_summary(
        loading,
        xp.asarray(np.isfinite(mean_loading_pu)),
        ambient,
        _interval_min(times),
        standard=config.thermal_standard,
        insulation=config.insulation,
        hot_spot_normal_c=config.hot_spot_normal_c,
        hot_spot_emergency_c=config.hot_spot_emergency_c,
        params=config.thermal_parameters(),
    )
    return {k: to_numpy(th[k]) for k in _THERMAL_COLUMNS}


def _health_columns(hl: dict[str, np.ndarray], times: np.ndarray) -> dict[str, Any]:
    """Health columns of the result: ``voltage_step_pu`` [pu], ``voltage_step_time`` (NaT: no step) and
    ``correlation_lost_windows``, from the host arrays of :func:`_health`."""
    n_t = times.size
    step_idx = hl["voltage_step_index"]
    step_time = np.where(
        step_idx >= 0,
        times[np.clip(step_idx, 0, max(n_t - 1, 0))] if n_t else np.datetime64("NaT"),
        np.datetime64("NaT"),
    ).astype("datetime64[ns]")
    return {
        "voltage_step_pu": hl["voltage_step_pu"],
        "voltage_step_time": pd.DatetimeIndex(step_time),
        "correlation_lost_windows": hl["correlation_lost_windows"].astype(int),
    }


def _transformer_table(
    meters: pd.DataFrame, transformers: pd.DataFrame | None
) -> tuple[pd.DataFrame, np.ndarray]:
    """The block's transformers (the table plus any unit the mapping names that the table lacks), sorted by
    ``feeder_id, transformer_id``, and each meter's row in it (-1: not mapped)."""
    if transformers is None:
        transformers = pd.DataFrame(columns=["transformer_id", "feeder_id", "kva_rating", "n_phases"])
    tx_table = transformers.copy()
    tx_table["transformer_id"] = tx_table["transformer_id"].astype(str)
    mapped = meters["transformer_id"].notna().to_numpy()
    meter_tx = meters["transformer_id"].astype(str).where(mapped, None)
    table_ids = pd.Index(tx_table["transformer_id"])
    if table_ids.is_unique:
        unknown = mapped & (table_ids.get_indexer(meter_tx) < 0)
    else:
        unknown = mapped & ~meter_tx.isin(table_ids).to_numpy()
    extra = meters.loc[unknown, ["transformer_id", "feeder_id"]].astype(str).drop_duplicates("transformer_id")
    tx = pd.concat([tx_table, extra], ignore_index=True)
    tx["feeder_id"] = tx["feeder_id"].astype(str)
    tx = tx.sort_values(["feeder_id", "transformer_id"], kind="stable").reset_index(drop=True)
    tx_pos = pd.Index(tx["transformer_id"])
    return tx, np.where(mapped, tx_pos.get_indexer(meter_tx.fillna("")), -1)


def _phase_pairs(meters: pd.DataFrame, groups: kv.MeterGroups) -> dict[str, np.ndarray]:
    """The (transformer, phase) pairs that carry load, pair ``3 * transformer + phase`` (host tables).

    Returns ``entry_meter, entry_pair, entry_weight`` (one entry per meter, by position in ``groups.order``,
    and phase it loads: 1, 1/2 or 1/3), ``codes`` (ascending) and each pair's ``tx`` and ``phase``.
    """
    order = groups.order
    n_map = order.size
    codes, names = pd.factorize(meters["phase"])  # missing: code -1, the last (unknown) row of the table
    lut = np.array([_PHASE_WEIGHTS.get(str(ph), _UNKNOWN_PHASE) for ph in names] + [_UNKNOWN_PHASE])
    weights = lut[codes][order] if n_map else np.zeros((0, 3))  # aligned with the sorted mapped meters
    m_idx, ph_idx = np.nonzero(weights > 0)
    pair_codes, pair_row = np.unique(3 * groups.tx_sorted[m_idx] + ph_idx, return_inverse=True)
    return {
        "entry_meter": m_idx,
        "entry_pair": pair_row,
        "entry_weight": weights[m_idx, ph_idx],
        "codes": pair_codes,
        "tx": pair_codes // 3,
        "phase": pair_codes % 3,
    }


def _loading(
    p_pair: Any,
    q_pair: Any | None,
    kw_real: Any,
    groups: kv.MeterGroups,
    pairs: dict[str, np.ndarray],
    tx: pd.DataFrame,
    n_t: int,
    tan_phi: float,
) -> dict[str, Any]:
    """Columns of the result from rating to imbalance, and ``loading`` (n_tx, n_time) [pu] for the thermal
    model (see :func:`~phaseid_hpc.kernels.validation.transformer_loading`)."""
    n_tx = len(tx)
    pair_tx, pair_ph = pairs["tx"], pairs["phase"]
    with np.errstate(invalid="ignore", divide="ignore"):
        kw_coverage = np.bincount(
            groups.tx_sorted, weights=to_numpy(kw_real).astype(np.float64), minlength=n_tx
        )[:n_tx] / (groups.n_meters * n_t)
    phases_on = np.zeros((n_tx, 3), dtype=bool)
    phases_on[pair_tx, pair_ph] = True
    rating = pd.to_numeric(tx.get("kva_rating"), errors="coerce").to_numpy(dtype=np.float64)
    rating = np.where(rating > 0, rating, np.nan)
    n_ph = pd.to_numeric(tx.get("n_phases"), errors="coerce").to_numpy(dtype=np.float64)
    three = np.where(np.isfinite(n_ph), n_ph == 3, phases_on.sum(axis=1) >= 2) if n_tx else np.zeros(0, bool)
    load = kv.transformer_loading(p_pair, q_pair, pair_tx, n_tx, three, rating, tan_phi=tan_phi)
    mean_ph = np.zeros((n_tx, 3))
    mean_ph[pair_tx, pair_ph] = to_numpy(load["pair_mean"])
    with np.errstate(invalid="ignore", divide="ignore"):
        mbar = mean_ph.mean(axis=1)
        imbalance = np.where(three & (mbar > 0), np.abs(mean_ph - mbar[:, None]).max(axis=1) / mbar, np.nan)
    loading = load["loading"]
    stats = kv.loading_statistics(loading)
    return {
        "transformer_id": tx["transformer_id"].to_numpy(),
        "feeder_id": tx["feeder_id"].to_numpy(),
        "phases": _PHASES_ON_NAMES[phases_on @ np.array([1, 2, 4])] if n_tx else [],
        "n_phases": np.where(three, 3, 1),
        "n_meters": groups.n_meters,
        "kva_rating": rating,
        "kw_coverage": kw_coverage,
        "peak_kva": to_numpy(load["peak_kva"]) if n_t else np.nan,
        "mean_kva": to_numpy(load["mean_kva"]) if n_t else np.nan,
        "mean_kva_a": mean_ph[:, 0],
        "mean_kva_b": mean_ph[:, 1],
        "mean_kva_c": mean_ph[:, 2],
        "peak_loading_pu": to_numpy(stats["peak"]) if n_t else np.nan,
        "p99_loading_pu": to_numpy(stats["p99"]) if n_t else np.nan,
        "mean_loading_pu": to_numpy(stats["mean"]),
        "imbalance": imbalance,
        "loading": loading,
    }


def _health(
    voltage: Any | None,
    meters: pd.DataFrame,
    tx: pd.DataFrame,
    groups: kv.MeterGroups,
    references: Any,
    times: np.ndarray,
    config: ValidationConfig,
    tx_load: Any | None,
) -> dict[str, np.ndarray]:
    """Voltage-level step and correlation loss per transformer (host arrays, shape (n_tx,)); see
    :func:`~phaseid_hpc.kernels.validation.transformer_health`. Without voltage: no step, no loss."""
    n_tx = len(tx)
    n_map = groups.order.size
    if voltage is None or n_map == 0:
        return {
            "voltage_step_pu": np.full(n_tx, np.nan),
            "voltage_step_index": np.full(n_tx, -1),
            "correlation_lost_windows": np.zeros(n_tx, dtype=int),
            "correlation_first_lost": np.full(n_tx, -1),
        }
    xp = array_namespace(voltage)
    voltage = xp.asarray(voltage)
    ref_pu = _reference_pu(references, times, pd.Index(tx["feeder_id"].unique()))
    ref_of_meter = np.full(n_map, -1)
    if ref_pu:
        sel = meters.iloc[groups.order] if not groups.identity else meters.iloc[:n_map]
        wanted = pd.MultiIndex.from_arrays([sel["feeder_id"].astype(str), sel["phase"].astype(str)])
        ref_of_meter = pd.MultiIndex.from_tuples(list(ref_pu)).get_indexer(wanted)
    n_t = voltage.shape[1]
    ref_rows = np.stack(list(ref_pu.values())) if ref_pu else np.zeros((0, n_t))
    feeder_code, _ = pd.factorize(tx["feeder_id"].to_numpy())  # transformers are sorted by feeder
    hl = kv.transformer_health(
        voltage,
        groups,
        feeder_code,
        ref_of_meter,
        xp.asarray(ref_rows),
        tx_load,
        window=config.health_window,
        min_meters=config.health_min_meters,
        min_correlation=config.health_min_correlation,
        loss_se=config.health_loss_se,
        neighbours=_NEIGHBOUR_TRANSFORMERS,
        noise_factor=config.health_noise_factor,
    )
    return {k: to_numpy(v) for k, v in hl.items()}


def _ambient_series(ambient_c: Any, times: np.ndarray, default: float) -> np.ndarray | float:
    """Ambient temperature on the grid [degC]: a scalar as is, a Series interpolated in time, an array checked."""
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


def _reference_pu(references: Any, times: np.ndarray, feeders: pd.Index) -> dict[tuple[str, str], np.ndarray]:
    """Feeder-head references -> {(feeder_id, phase): voltage / its mean}.

    Accepts the store's layout, a tuple ``(DataFrame[feeder_id, phase], ndarray (n_references, n_time))``
    aligned with ``times``, or the contract's long format ``feeder_id, phase, timestamp, voltage_v``.
    """
    if references is None:
        return {}
    if isinstance(references, tuple):
        meta, values = references
        values = np.asarray(to_numpy(values), dtype=np.float64).reshape(len(meta), -1)
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


def _flags(
    out: pd.DataFrame, first_lost: np.ndarray, times: np.ndarray, config: ValidationConfig
) -> tuple[list[list[str]], list[list[str]]]:
    """Flags and their reasons per row; masks are vectorised, strings are built for flagged rows only."""
    n = len(out)
    n_t = times.size
    col = {c: out[c].to_numpy() for c in out.columns if c not in ("voltage_step_time",)}
    step_time = out["voltage_step_time"]
    hot = col["max_hot_spot_c"]
    with np.errstate(invalid="ignore"):
        masks = {
            "no_rating": ~np.isfinite(col["kva_rating"].astype(float)),
            "no_load_data": (col["n_meters"] > 0) & ~(col["kw_coverage"] > 0),
            "overload": hot > config.hot_spot_normal_c,
            "emergency_overload": hot > config.hot_spot_emergency_c,
            "mapping_contradicts_rating": (col["p99_loading_pu"] > config.max_plausible_loading_pu)
            | (col["mean_loading_pu"] > config.max_plausible_mean_loading_pu),
            "high_imbalance": col["imbalance"] > config.max_imbalance,
            "voltage_level_step": col["voltage_step_pu"] > config.tap_fault_steps * config.tap_step_pu,
            "correlation_loss": col["correlation_lost_windows"] >= max(config.health_min_lost_windows, 1),
        }
    flags: list[list[str]] = [[] for _ in range(n)]
    reasons: list[list[str]] = [[] for _ in range(n)]
    any_flag = np.zeros(n, dtype=bool)
    for m in masks.values():
        any_flag |= m
    for i in np.flatnonzero(any_flag):  # flagged units only (a handful per block)
        f, why = flags[i], reasons[i]
        if masks["no_rating"][i]:
            f.append("no_rating")
            why.append("no usable kva_rating: loading and thermal model not computed")
        if masks["no_load_data"][i]:
            f.append("no_load_data")
            why.append("none of its meters has a kW sample")
        if masks["overload"][i]:
            f.append("overload")
            why.append(
                f"hot spot {hot[i]:.1f} degC above the normal-cyclic limit "
                f"{config.hot_spot_normal_c:g} degC for {col['hours_above_normal'][i]:.2f} h "
                f"(peak loading {col['peak_loading_pu'][i]:.2f} pu)"
            )
        if masks["emergency_overload"][i]:
            f.append("emergency_overload")
            why.append(
                f"hot spot {hot[i]:.1f} degC above the emergency limit "
                f"{config.hot_spot_emergency_c:g} degC for {col['hours_above_emergency'][i]:.2f} h"
            )
        if masks["mapping_contradicts_rating"][i]:
            f.append("mapping_contradicts_rating")
            why.append(
                f"the inferred mapping puts {col['n_meters'][i]} meters with mean {col['mean_kva'][i]:.1f} kVA "
                f"(99th percentile {col['p99_loading_pu'][i]:.2f} pu, mean {col['mean_loading_pu'][i]:.2f} pu) on a "
                f"{col['kva_rating'][i]:g} kVA unit: impossible, send to manual audit"
            )
        if masks["high_imbalance"][i]:
            f.append("high_imbalance")
            why.append(
                f"phase imbalance {col['imbalance'][i]:.2f} above {config.max_imbalance:g} (mean kVA A/B/C "
                f"{col['mean_kva_a'][i]:.1f}/{col['mean_kva_b'][i]:.1f}/{col['mean_kva_c'][i]:.1f})"
            )
        if masks["voltage_level_step"][i]:
            f.append("voltage_level_step")
            why.append(
                f"common voltage level of its meters steps by {100 * col['voltage_step_pu'][i]:.2f}% "
                f"(> {config.tap_fault_steps:g} tap steps of {100 * config.tap_step_pu:g}%) at "
                f"{step_time.iloc[i]}: check tap position and windings"
            )
        if masks["correlation_loss"][i]:
            first = first_lost[i]
            why_t = times[min(first, n_t - 1)] if first >= 0 else None
            f.append("correlation_loss")
            why.append(
                "its meters lost correlation with the feeder reference (or fluctuated more than usual "
                f"against it) together, still following each other, in {col['correlation_lost_windows'][i]} "
                f"consecutive window(s) from {why_t}: check windings and connections"
            )
    return flags, reasons


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
    for fl in table["flag_codes"]:
        for f in fl:
            counts[f] = counts.get(f, 0) + 1
    return {
        "transformers": len(table),
        "flagged": int(sum(1 for fl in table["flag_codes"] if fl)),
        "flags": counts,
        "max_hot_spot_c": float(np.nanmax(table["max_hot_spot_c"]))
        if table["max_hot_spot_c"].notna().any()
        else None,
    }
