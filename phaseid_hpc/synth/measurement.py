"""Seeded measurement model of an AMI meter: accuracy class, resolution, missing data, clock offsets.

Applied to simulated (noise-free) voltages by the generator and by the accuracy benchmark on
``../shared/data/epri-ckt5``, which ships noise-free voltages on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MeasurementModel", "apply_measurement_model", "collector_distance_m"]

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
    missing_hop_m : float
        RF-mesh hop length [m]. ``0``: every meter misses the same share. ``> 0``: a meter's share of
        missing samples grows in proportion to its hop count ``1 + floor(distance / hop)`` from the
        collector (packet loss compounds over hops), the mean staying ``missing_fraction``; needs
        ``distance_m`` (see :func:`collector_distance_m`).
    """

    accuracy_class: float = 0.5
    resolution_v: float = 0.1
    missing_fraction: float = 0.0
    burst_mean_len: int = 12
    clock_offset_fraction: float = 0.0
    clock_offset_max_s: float = 300.0
    interval_averaged: bool = True
    missing_hop_m: float = 0.0

    @property
    def sigma(self) -> float:
        """One-sigma relative error of the accuracy class [-]."""
        try:
            return _SIGMA_PER_CLASS[float(self.accuracy_class)]
        except KeyError:
            return float(self.accuracy_class) / 100.0 / 7.0


def _shift(voltage: np.ndarray, shift_samples: np.ndarray) -> np.ndarray:
    """Delay each row by a fractional number of samples (linear interpolation, edges held).

    Vectorised over the shifted rows; equal to ``np.interp(t - s, t, row)`` for each row.
    """
    n = voltage.shape[1]
    out = voltage.copy()
    rows = np.flatnonzero(shift_samples)
    if len(rows) == 0 or n < 2:
        return out
    pos = np.clip(np.arange(n, dtype=np.float64)[None, :] - shift_samples[rows, None], 0, n - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n - 2)
    f = pos - i0
    v = voltage[rows]
    out[rows] = (1 - f) * np.take_along_axis(v, i0, axis=1) + f * np.take_along_axis(v, i0 + 1, axis=1)
    return out


def _missing_rate(model: MeasurementModel, n_meters: int, distance_m: np.ndarray | None) -> np.ndarray:
    """Share of missing samples of each meter [-], shape (n_meters,); mean ``model.missing_fraction``."""
    if model.missing_hop_m <= 0:
        return np.full(n_meters, model.missing_fraction)
    if distance_m is None or len(distance_m) != n_meters:
        raise ValueError(
            f"missing_hop_m={model.missing_hop_m} needs distance_m, one distance per meter ({n_meters})"
        )
    hops = 1.0 + np.floor(np.asarray(distance_m, dtype=float) / model.missing_hop_m)
    return np.minimum(model.missing_fraction * hops / hops.mean(), 0.95)


def collector_distance_m(
    xy_m: np.ndarray, *, meters_per_collector: int = 1500, random_state: int | np.random.Generator = 0
) -> np.ndarray:
    """Distance of each meter to the nearest data collector of an RF mesh [m].

    Collectors are put on ``ceil(n / meters_per_collector)`` meters' sites chosen at random (seeded).

    Parameters
    ----------
    xy_m : ndarray, shape (n_meters, 2)
        Meter positions east/north [m] (from lat/lon: ``(lon - lon0) * 111320 * cos(lat0)``,
        ``(lat - lat0) * 111320``).
    meters_per_collector : int
    random_state : int or numpy.random.Generator

    Returns
    -------
    ndarray, shape (n_meters,)
    """
    rng = np.random.default_rng(random_state)
    xy = np.asarray(xy_m, dtype=float)
    k = max(1, -(-len(xy) // meters_per_collector))
    sites = xy[rng.choice(len(xy), k, replace=False)]
    return np.min(np.hypot(*(xy[:, None, :] - sites[None, :, :]).transpose(2, 0, 1)), axis=1)


def apply_measurement_model(
    voltage: np.ndarray,
    model: MeasurementModel,
    *,
    interval_s: float,
    random_state: int | np.random.Generator,
    distance_m: np.ndarray | None = None,
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
    distance_m : ndarray, shape (n_meters,), optional
        Distance of each meter from its data collector [m]; needed when ``model.missing_hop_m > 0``.

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
    # v * (1 + sigma * z), then rounded to the resolution: in place on the noise array (one buffer).
    out = rng.standard_normal((n_m, n_t))
    out *= model.sigma
    out += 1.0
    out *= v
    if model.resolution_v > 0:
        out /= model.resolution_v
        np.rint(out, out=out)
        out *= model.resolution_v
    if model.missing_fraction > 0:
        rate = _missing_rate(model, n_m, distance_m)
        mask = rng.random((n_m, n_t)) < (rate / 2)[:, None]
        n_bursts = rng.poisson(rate / 2 * n_t / max(model.burst_mean_len, 1), n_m)
        owner = np.repeat(np.arange(n_m), n_bursts)
        starts = rng.integers(0, n_t, len(owner))
        stops = np.minimum(starts + rng.geometric(1.0 / max(model.burst_mean_len, 1), len(owner)), n_t)
        # Bursts as +1/-1 edges of a per-row difference array: no loop over bursts.
        edges = np.zeros((n_m, n_t + 1), dtype=np.int32)
        np.add.at(edges, (owner, starts), 1)
        np.add.at(edges, (owner, stops), -1)
        mask |= np.cumsum(edges[:, :n_t], axis=1) > 0
        out[mask] = np.nan
    return out, offsets
