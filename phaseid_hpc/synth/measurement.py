"""Seeded measurement model of an AMI meter: accuracy class, resolution, missing data, clock offsets.

Applied to simulated (noise-free) voltages by the generator and by the accuracy benchmark on
``../shared/data/epri-ckt5``, which ships noise-free voltages on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MeasurementModel", "apply_measurement_model"]

#: One-sigma relative error per accuracy class [-]. A class-c meter's error limit is c% of reading;
#: taking that as a 3-sigma bound and rounding gives class 0.5 ~ 0.07% (one sigma), per shared/README.
_SIGMA_PER_CLASS = {0.1: 0.00014, 0.2: 0.00028, 0.5: 0.0007, 1.0: 0.0014}


@dataclass(frozen=True)
class MeasurementModel:
    """Parameters of the meter measurement model.

    Attributes
    ----------
    accuracy_class : float
        Meter accuracy class (0.1, 0.2, 0.5, 1.0) [% of reading].
    resolution_v : float
        Display/register resolution; readings are rounded to this step. ``0`` keeps full precision [V].
    missing_fraction : float
        Share of samples missing in total, half as isolated samples and half as bursts [-].
    burst_mean_len : int
        Mean length of a missing burst [samples].
    clock_offset_fraction : float
        Share of meters whose clock is offset [-].
    clock_offset_max_s : float
        Largest clock offset, drawn uniformly in [-max, max] for offset meters [s].
    interval_averaged : bool
        Kept for the record: the simulated series are already interval means when True.
    """

    accuracy_class: float = 0.5
    resolution_v: float = 0.1
    missing_fraction: float = 0.0
    burst_mean_len: int = 12
    clock_offset_fraction: float = 0.0
    clock_offset_max_s: float = 300.0
    interval_averaged: bool = True

    @property
    def sigma(self) -> float:
        """One-sigma relative error of the accuracy class [-]."""
        try:
            return _SIGMA_PER_CLASS[float(self.accuracy_class)]
        except KeyError:
            return float(self.accuracy_class) / 100.0 / 7.0


def _shift(voltage: np.ndarray, shift_samples: np.ndarray) -> np.ndarray:
    """Delay each row by a fractional number of samples (linear interpolation, edges held)."""
    n = voltage.shape[1]
    t = np.arange(n, dtype=np.float64)
    out = voltage.copy()
    for i in np.flatnonzero(shift_samples):
        out[i] = np.interp(t - shift_samples[i], t, voltage[i])
    return out


def apply_measurement_model(
    voltage: np.ndarray,
    model: MeasurementModel,
    *,
    interval_s: float,
    random_state: int | np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn true voltages into what meters report.

    Parameters
    ----------
    voltage : ndarray, shape (n_meters, n_time)
        True interval voltages. [V]
    model : MeasurementModel
        Accuracy class, resolution, missing data and clock offsets.
    interval_s : float
        Sampling interval. [s]
    random_state : int or numpy.random.Generator
        Seed or generator; the same seed gives the same output.

    Returns
    -------
    measured : ndarray, shape (n_meters, n_time), float64
        Reported voltage, NaN where missing. [V]
    clock_offset_s : ndarray, shape (n_meters,)
        True clock offset applied to each meter (positive: meter clock late). [s]
    """
    rng = np.random.default_rng(random_state)
    v = np.asarray(voltage, dtype=np.float64)
    n_m, n_t = v.shape
    offsets = np.zeros(n_m)
    if model.clock_offset_fraction > 0:
        hit = rng.random(n_m) < model.clock_offset_fraction
        offsets[hit] = rng.uniform(-model.clock_offset_max_s, model.clock_offset_max_s, hit.sum())
        v = _shift(v, offsets / interval_s)
    out = v * (1.0 + model.sigma * rng.standard_normal((n_m, n_t)))
    if model.resolution_v > 0:
        out = np.round(out / model.resolution_v) * model.resolution_v
    if model.missing_fraction > 0:
        mask = rng.random((n_m, n_t)) < model.missing_fraction / 2
        n_bursts = rng.poisson(model.missing_fraction / 2 * n_t / max(model.burst_mean_len, 1), n_m)
        for i in np.flatnonzero(n_bursts):
            starts = rng.integers(0, n_t, n_bursts[i])
            lengths = rng.geometric(1.0 / max(model.burst_mean_len, 1), n_bursts[i])
            for s, length in zip(starts, lengths):
                mask[i, s : s + length] = True
        out[mask] = np.nan
    return out, offsets
