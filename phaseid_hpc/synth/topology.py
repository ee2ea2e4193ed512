"""Random but plausible distribution-feeder topology: backbone, laterals, service transformers, meters.

A feeder is a tree of medium-voltage (MV) nodes rooted at the substation bus (node 0):

* a three-phase backbone (trunk plus a few three-phase branches), sections of 100-300 m;
* single-phase laterals tapped off backbone nodes, one transformer per lateral node, sections of 40-150 m,
  so neighbouring transformers sit on one lateral;
* single-phase pole/pad transformers (1-15 meters, a share alone, a few crowded) on laterals, and
  three-phase 208Y/120 banks (commercial services) on backbone nodes;
* meters: mostly ``1ph-240`` on single-phase transformers, and on banks ``3ph-208Y`` (phase ``ABC``) and
  phase-to-phase ``2ph-208`` (``AB``, ``BC``, ``CA``) services.

Everything is drawn from one :class:`numpy.random.Generator`; nothing here depends on time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PHASE_INDEX", "FeederTopology", "build_feeder_topology"]

PHASE_INDEX = {"A": 0, "B": 1, "C": 2}
#: Meters per single-phase transformer: 1 (alone) .. 15 (crowded) [-].
_SIZES = np.arange(1, 16)
_SIZE_P = np.array([14, 15, 16, 15, 12, 9, 6, 4, 3, 2, 1.2, 0.9, 0.7, 0.6, 0.5])
_SIZE_P = _SIZE_P / _SIZE_P.sum()
#: Metres per degree of latitude [m].
_M_PER_DEG = 111_320.0


@dataclass
class FeederTopology:
    """One feeder, arrays aligned by meter, transformer and MV node.

    Attributes
    ----------
    feeder_id : str
    node_parent : ndarray, shape (n_nodes,), int
        Parent MV node (-1 for the substation bus, node 0); nodes are in topological order.
    node_phases : ndarray, shape (n_nodes, 3), bool
        Phases present on the section from the parent to the node.
    node_length_km : ndarray, shape (n_nodes,)
        Section length [km] (0 for node 0).
    node_three_phase : ndarray, shape (n_nodes,), bool
        Section is three-phase (mutually coupled) rather than a single-phase lateral.
    xfmr_node : ndarray, shape (n_xfmr,), int
        MV node each transformer hangs on.
    xfmr_phase : ndarray, shape (n_xfmr,), str
        ``A``/``B``/``C`` or ``ABC`` (bank).
    xfmr_kva : ndarray, shape (n_xfmr,)
        Rating [kVA].
    xfmr_lateral : ndarray, shape (n_xfmr,), int
        Lateral index (-1 for banks on the backbone); transformers of one lateral are neighbours.
    xfmr_pos : ndarray, shape (n_xfmr,), int
        Position along the lateral (or backbone node for banks).
    xfmr_sec_ohm : ndarray, shape (n_xfmr,)
        Loop resistance of the shared secondary main [ohm].
    xfmr_tap : ndarray, shape (n_xfmr,)
        Fixed no-load tap ratio [pu].
    xfmr_xy : ndarray, shape (n_xfmr, 2)
        Position east/north of the substation [m].
    meter_xfmr : ndarray, shape (n_meters,), int
        Transformer index of each meter (meters sorted by transformer).
    meter_phase : ndarray, shape (n_meters,), str
        True phase label (contract labels).
    meter_service : ndarray, shape (n_meters,), str
    meter_nominal_v : ndarray, shape (n_meters,)
        [V]
    meter_service_ohm : ndarray, shape (n_meters,)
        Loop resistance of the meter's own service drop [ohm].
    meter_xy : ndarray, shape (n_meters, 2)
        [m]
    """

    feeder_id: str
    node_parent: np.ndarray
    node_phases: np.ndarray
    node_length_km: np.ndarray
    node_three_phase: np.ndarray
    xfmr_node: np.ndarray
    xfmr_phase: np.ndarray
    xfmr_kva: np.ndarray
    xfmr_lateral: np.ndarray
    xfmr_pos: np.ndarray
    xfmr_sec_ohm: np.ndarray
    xfmr_tap: np.ndarray
    xfmr_xy: np.ndarray
    meter_xfmr: np.ndarray
    meter_phase: np.ndarray
    meter_service: np.ndarray
    meter_nominal_v: np.ndarray
    meter_service_ohm: np.ndarray
    meter_xy: np.ndarray

    @property
    def n_meters(self) -> int:
        return len(self.meter_xfmr)


def _meters_per_transformer(rng: np.random.Generator, n_meters: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``n_meters`` into transformer groups; ~4% of groups are three-phase banks (1-6 meters).

    Returns the group sizes and bank flags (the last group is cut to fit).
    """
    k = max(n_meters, 1)
    bank = rng.random(k) < 0.04
    sizes = np.where(bank, rng.integers(1, 7, k), rng.choice(_SIZES, k, p=_SIZE_P))
    cs = np.cumsum(sizes)
    m = int(np.searchsorted(cs, n_meters)) + 1  # groups needed to reach n_meters
    sizes = sizes[:m].copy()
    sizes[-1] -= cs[m - 1] - n_meters
    return sizes, bank[:m]


def build_feeder_topology(rng: np.random.Generator, feeder_id: str, n_meters: int) -> FeederTopology:
    """Draw a feeder with ``n_meters`` meters.

    Parameters
    ----------
    rng : numpy.random.Generator
    feeder_id : str
    n_meters : int
        Number of meters on the feeder (>= 1).

    Returns
    -------
    FeederTopology
    """
    sizes, bank = _meters_per_transformer(rng, n_meters)
    n_x = len(sizes)
    n_single = int((~bank).sum())

    # --- backbone: trunk with occasional three-phase branches --------------------------------------
    n_bb = max(3, int(np.ceil(n_single / 20)) + 2)
    parent = [-1]
    length = [0.0]
    three = [True]
    xy = [np.zeros(2)]
    heading = rng.uniform(0, 2 * np.pi)
    for k in range(1, n_bb + 1):
        p = k - 1 if (k < 3 or rng.random() < 0.85) else int(rng.integers(1, k))
        seg = rng.uniform(0.10, 0.30)
        ang = heading + (rng.normal(0, 0.25) if p == k - 1 else rng.choice([-1, 1]) * np.pi / 2)
        parent.append(p)
        length.append(seg)
        three.append(True)
        xy.append(xy[p] + 1000 * seg * np.array([np.cos(ang), np.sin(ang)]))
    phases = [np.ones(3, bool) for _ in parent]

    # --- laterals: single-phase chains of transformers ---------------------------------------------
    # Load is unbalanced by a few percent across phases, as on real feeders.
    w = rng.dirichlet([30, 30, 30])
    singles = np.flatnonzero(~bank)
    xfmr_node = np.zeros(n_x, int)
    xfmr_phase = np.empty(n_x, object)
    xfmr_lat = np.full(n_x, -1)
    xfmr_pos = np.zeros(n_x, int)
    i = 0
    lat = 0
    while i < len(singles):
        k = min(int(rng.integers(2, 13)), len(singles) - i)
        ph = int(rng.choice(3, p=w))
        tap_node = int(rng.integers(1, n_bb + 1))
        prev = tap_node
        ang = rng.uniform(0, 2 * np.pi)
        for j in range(k):
            seg = rng.uniform(0.04, 0.15)
            parent.append(prev)
            length.append(seg)
            three.append(False)
            ph_vec = np.zeros(3, bool)
            ph_vec[ph] = True
            phases.append(ph_vec)
            xy.append(xy[prev] + 1000 * seg * np.array([np.cos(ang), np.sin(ang)]))
            node = len(parent) - 1
            t = singles[i + j]
            xfmr_node[t] = node
            xfmr_phase[t] = "ABC"[ph]
            xfmr_lat[t] = lat
            xfmr_pos[t] = j
            prev = node
        i += k
        lat += 1
    for t in np.flatnonzero(bank):
        xfmr_node[t] = int(rng.integers(1, n_bb + 1))
        xfmr_phase[t] = "ABC"
        xfmr_pos[t] = xfmr_node[t]
    node_xy = np.array(xy)
    xfmr_xy = node_xy[xfmr_node] + rng.normal(0, 8, (n_x, 2))

    # --- transformers -------------------------------------------------------------------------------
    sizes_a = sizes
    kva = np.where(
        bank,
        np.select([sizes_a <= 2, sizes_a <= 4], [75.0, 112.5], 150.0),
        np.select(
            [sizes_a <= 1, sizes_a <= 3, sizes_a <= 6, sizes_a <= 10],
            [rng.choice([15.0, 25.0], n_x), 25.0, 37.5, 50.0],
            75.0,
        ),
    )
    # Secondary main shared by the transformer's meters: 0-60 m of 4/0 triplex (0.56 ohm/km loop).
    sec = np.where((sizes_a > 1) & ~bank, rng.uniform(0.0, 0.060, n_x) * 0.56, 0.0)
    tap = 1.0 + 0.025 * rng.choice([-1, 0, 0, 0, 1], n_x)

    # --- meters -------------------------------------------------------------------------------------
    m_x = np.repeat(np.arange(n_x), sizes_a)
    n_m = len(m_x)
    m_phase = np.empty(n_m, object)
    m_serv = np.empty(n_m, object)
    m_nom = np.empty(n_m)
    on_bank = bank[m_x]
    m_phase[~on_bank] = xfmr_phase[m_x[~on_bank]]
    m_serv[~on_bank] = "1ph-240"
    m_nom[~on_bank] = 240.0
    nb = int(on_bank.sum())
    if nb:
        kind = rng.choice(np.array(["ABC", "AB", "BC", "CA"], object), nb, p=[0.5, 1 / 6, 1 / 6, 1 / 6])
        m_phase[on_bank] = kind
        m_serv[on_bank] = np.where(kind == "ABC", "3ph-208Y", "2ph-208")
        m_nom[on_bank] = np.where(kind == "ABC", 120.0, 208.0)
    # Service drop: 10-50 m of 1/0 triplex (1.1 ohm/km loop); banks feed short, heavy services.
    m_serv_ohm = np.where(on_bank, rng.uniform(0.005, 0.02, n_m) * 0.35, rng.uniform(0.010, 0.050, n_m) * 1.1)
    m_xy = xfmr_xy[m_x] + rng.normal(0, 20, (n_m, 2))

    return FeederTopology(
        feeder_id=feeder_id,
        node_parent=np.array(parent),
        node_phases=np.array(phases),
        node_length_km=np.array(length),
        node_three_phase=np.array(three),
        xfmr_node=xfmr_node,
        xfmr_phase=xfmr_phase.astype(str),
        xfmr_kva=kva,
        xfmr_lateral=xfmr_lat,
        xfmr_pos=xfmr_pos,
        xfmr_sec_ohm=sec,
        xfmr_tap=tap,
        xfmr_xy=xfmr_xy,
        meter_xfmr=m_x,
        meter_phase=m_phase.astype(str),
        meter_service=m_serv.astype(str),
        meter_nominal_v=m_nom,
        meter_service_ohm=m_serv_ohm,
        meter_xy=m_xy,
    )


def xy_to_latlon(xy: np.ndarray, lat0: float, lon0: float) -> tuple[np.ndarray, np.ndarray]:
    """Local east/north offsets [m] to latitude/longitude [deg] around (lat0, lon0)."""
    lat = lat0 + xy[:, 1] / _M_PER_DEG
    lon = lon0 + xy[:, 0] / (_M_PER_DEG * np.cos(np.deg2rad(lat0)))
    return lat, lon
