"""Inject the GIS errors a utility really has: wrong phase labels, meters hung on a neighbouring transformer.

* Transformer labels: a share of meters point at the wrong transformer, mostly (85%) a neighbour on the
  same lateral (next pole) or the nearest transformer, otherwise any transformer on the same feeder. Half
  of these meters also take that transformer's phase in the GIS (the GIS is self-consistent), the other
  half keep their own phase.
* Phase labels: topped up to the target share of meters, half as whole single-phase transformers whose
  phase was recorded wrongly (a re-phased lateral tap), half as single meters. Phase-to-phase services
  get another pair; three-phase services are never mislabelled.

Rates are met exactly per feeder up to stochastic rounding, so small feeders stay unbiased.
"""

from __future__ import annotations

import numpy as np

from .topology import FeederTopology

__all__ = ["corrupt_labels"]

_OTHER = {
    "A": ("B", "C"),
    "B": ("A", "C"),
    "C": ("A", "B"),
    "AB": ("BC", "CA"),
    "BC": ("AB", "CA"),
    "CA": ("AB", "BC"),
}


def _stochastic_round(rng: np.random.Generator, x: float) -> int:
    lo = int(np.floor(x))
    return lo + int(rng.random() < x - lo)


def _neighbour(top: FeederTopology, t: int, rng: np.random.Generator) -> int:
    """A transformer next to ``t``: adjacent on its lateral, else the nearest of the same kind."""
    lat = top.xfmr_lateral[t]
    if lat >= 0:
        same = np.flatnonzero((top.xfmr_lateral == lat) & (np.abs(top.xfmr_pos - top.xfmr_pos[t]) == 1))
        if len(same):
            return int(rng.choice(same))
    d = np.hypot(*(top.xfmr_xy - top.xfmr_xy[t]).T)
    d[t] = np.inf
    kind = (top.xfmr_phase == "ABC") == (top.xfmr_phase[t] == "ABC")
    d[~kind] = d[~kind] + 1e9
    return int(np.argmin(d))


def corrupt_labels(
    top: FeederTopology,
    rng: np.random.Generator,
    phase_error_rate: float,
    transformer_error_rate: float,
) -> tuple[np.ndarray, np.ndarray]:
    """GIS transformer index and phase label of every meter.

    Parameters
    ----------
    top : FeederTopology
    rng : numpy.random.Generator
    phase_error_rate, transformer_error_rate : float
        Target share of meters with a wrong phase / transformer label [-].

    Returns
    -------
    gis_xfmr : ndarray, shape (n_meters,), int
    gis_phase : ndarray, shape (n_meters,), str
    """
    n = top.n_meters
    n_x = len(top.xfmr_kva)
    gis_x = top.meter_xfmr.copy()
    gis_ph = top.meter_phase.astype(object).copy()
    if n_x > 1 and transformer_error_rate > 0:
        k = min(n, _stochastic_round(rng, transformer_error_rate * n))
        for m in np.sort(rng.choice(n, k, replace=False)):
            t = top.meter_xfmr[m]
            if rng.random() < 0.85:
                new = _neighbour(top, t, rng)
            else:
                new = int(rng.choice(np.delete(np.arange(n_x), t)))
            gis_x[m] = new
            wrong_kind = (top.xfmr_phase[new] == "ABC") != (top.xfmr_phase[t] == "ABC")
            if not wrong_kind and top.xfmr_phase[new] != "ABC" and rng.random() < 0.5:
                gis_ph[m] = top.xfmr_phase[new]
    if phase_error_rate > 0:
        target = _stochastic_round(rng, phase_error_rate * n)
        eligible = np.array([p in _OTHER for p in top.meter_phase])
        need = target - int((gis_ph != top.meter_phase).sum())
        # Half as whole single-phase transformers relabelled together.
        group_budget = need // 2
        # Meters are grouped by transformer in the topology: slice bounds of each transformer's meters.
        bounds = np.searchsorted(top.meter_xfmr, np.arange(n_x + 1))
        clean = eligible & (gis_ph == top.meter_phase)
        for t in rng.permutation(n_x):
            if group_budget <= 0:
                break
            members = bounds[t] + np.flatnonzero(clean[bounds[t] : bounds[t + 1]])
            if top.xfmr_phase[t] == "ABC" or len(members) == 0 or len(members) > group_budget:
                continue
            gis_ph[members] = rng.choice(_OTHER[top.xfmr_phase[t]])
            clean[members] = False
            group_budget -= len(members)
        need = target - int((gis_ph != top.meter_phase).sum())
        pool = np.flatnonzero(eligible & (gis_ph == top.meter_phase))
        if need > 0 and len(pool):
            for m in np.sort(rng.choice(pool, min(need, len(pool)), replace=False)):
                gis_ph[m] = rng.choice(_OTHER[top.meter_phase[m]])
    return gis_x, gis_ph.astype(str)
