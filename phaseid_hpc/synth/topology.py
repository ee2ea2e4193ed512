"""Random but plausible distribution-feeder topology: backbone, laterals, service transformers, meters.

A feeder is a tree of medium-voltage (MV) nodes rooted at the substation bus (node 0):

* a three-phase backbone (trunk plus a few three-phase branches), sections of 100-300 m;
* single-phase laterals tapped off backbone nodes, one transformer per lateral node, sections of 40-150 m,
  so neighbouring transformers sit on one lateral;
* single-phase pole/pad transformers (1-15 meters, a share alone, a few crowded) on laterals, and
  three-phase 208Y/120 banks (commercial services) on backbone nodes;
* meters: mostly ``1ph-240`` on single-phase transformers, and on banks ``3ph-208Y`` (phase ``ABC``) and
  phase-to-phase ``2ph-208`` (``AB``, ``BC``, ``CA``) services.

Scenario variants (:class:`FeederLayout`) change the mix: every meter alone on its transformer, more or
longer branches, long single-phase laterals (where line regulators go), three-phase services only on the
banks. :func:`add_line_regulators` and :func:`add_capacitors` place voltage-control equipment on a drawn
feeder; :func:`build_lv_network` draws a European low-voltage (LV) network below one MV/LV transformer.

Everything is drawn from one :class:`numpy.random.Generator`; nothing here depends on time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

__all__ = [
    "PHASE_INDEX",
    "CapacitorBanks",
    "FeederLayout",
    "FeederTopology",
    "LineRegulators",
    "add_capacitors",
    "add_line_regulators",
    "build_feeder_topology",
    "build_lv_network",
    "latlon_to_xy",
    "main_path",
    "node_distance_km",
]

PHASE_INDEX = {"A": 0, "B": 1, "C": 2}
#: Meters per single-phase transformer: 1 (alone) .. 15 (crowded) [-].
_SIZES = np.arange(1, 16)
_SIZE_P = np.array([14, 15, 16, 15, 12, 9, 6, 4, 3, 2, 1.2, 0.9, 0.7, 0.6, 0.5])
_SIZE_P = _SIZE_P / _SIZE_P.sum()
#: Metres per degree of latitude [m].
_M_PER_DEG = 111_320.0


@dataclass(frozen=True)
class LineRegulators:
    """Single-phase step voltage regulators, each with its own tap controller.

    A regulator sits at the sending end of the section into ``node`` and regulates phase ``phase`` only.

    Attributes
    ----------
    node : ndarray, shape (n_reg,), int
    phase : ndarray, shape (n_reg,), int
        0, 1, 2 for A, B, C.
    set_point_pu, bandwidth_pu : ndarray, shape (n_reg,)
        Controller set point and total bandwidth (deadband) of the output voltage [pu].
    delay_s : ndarray, shape (n_reg,)
        Time delay before a tap change [s].
    step_pu : float
        Tap step: 0.625% (32 steps over +-10%) [pu].
    """

    node: np.ndarray
    phase: np.ndarray
    set_point_pu: np.ndarray
    bandwidth_pu: np.ndarray
    delay_s: np.ndarray
    step_pu: float = 0.00625


@dataclass(frozen=True)
class CapacitorBanks:
    """Switched shunt capacitor banks.

    Attributes
    ----------
    node : ndarray, shape (n_cap,), int
    phases : ndarray, shape (n_cap, 3), bool
    kvar : ndarray, shape (n_cap,)
        Rating per connected phase [kvar].
    control : ndarray, shape (n_cap,), str
        ``"var"``: on when the feeder-head reactive power exceeds ``on_level``, off below ``off_level``
        [kvar, three phases]; ``"time"``: on from ``on_level`` to ``off_level`` local hour on weekdays.
    on_level, off_level : ndarray, shape (n_cap,)
    """

    node: np.ndarray
    phases: np.ndarray
    kvar: np.ndarray
    control: np.ndarray
    on_level: np.ndarray
    off_level: np.ndarray


@dataclass(frozen=True)
class FeederLayout:
    """How a feeder is drawn; the defaults are the utility generator's mixed feeder.

    Attributes
    ----------
    bank_share : float
        Share of transformer groups that are three-phase banks [-].
    bank_meters : (int, int)
        Meters per bank, ``low`` to ``high - 1``.
    bank_services : tuple of 4 floats
        Probabilities of ``ABC``, ``AB``, ``BC``, ``CA`` services on banks.
    three_phase_service : str
        ``service_type`` of ``ABC`` services (``"3ph-208Y"``; ``"3ph"`` as in EPRI ckt7).
    single_meter : bool
        Every meter alone on its transformer (IEEE 8500, EPRI K1), no banks.
    backbone_section_km : (float, float)
        Backbone section length range [km].
    trunk_prob : float
        Chance that a backbone node extends the trunk rather than starting a branch [-].
    meters_per_backbone_node : int
        Single-phase transformers per backbone node (sets the backbone length) [-].
    long_laterals : int
        Long single-phase laterals (20-40 transformers, 0.1-0.25 km sections), one per phase in turn,
        tapped on the far half of the backbone: where line regulators go [-].
    """

    bank_share: float = 0.04
    bank_meters: tuple[int, int] = (1, 7)
    bank_services: tuple[float, float, float, float] = (0.5, 1 / 6, 1 / 6, 1 / 6)
    three_phase_service: str = "3ph-208Y"
    single_meter: bool = False
    backbone_section_km: tuple[float, float] = (0.10, 0.30)
    trunk_prob: float = 0.85
    meters_per_backbone_node: int = 20
    long_laterals: int = 0


_DEFAULT_LAYOUT = FeederLayout()


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
    v_ln_base : float
        Nominal line-to-neutral voltage of the network the nodes belong to [V].
    z_three_phase : ndarray, shape (3, 3), complex, optional
        Phase impedance matrix of three-phase sections [ohm/km] (default: the MV backbone line).
    z_single : complex, optional
        Impedance of single-phase sections [ohm/km] (default: the MV lateral).
    node_z_scale : ndarray, shape (n_nodes,), optional
        Multiplier of each section's impedance [-] (conductor size: a heavy trunk, light branches).
    xfmr_r_pu, xfmr_x_pu : ndarray, shape (n_xfmr,), optional
        Series resistance / reactance of each transformer [pu of its rating per phase]; drawn in the
        power flow when absent; zero for the service points of an LV network.
    regulators : LineRegulators, optional
    capacitors : CapacitorBanks, optional
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
    v_ln_base: float = 12_470.0 / np.sqrt(3)
    z_three_phase: np.ndarray | None = None
    z_single: complex | None = None
    node_z_scale: np.ndarray | None = None
    xfmr_r_pu: np.ndarray | None = None
    xfmr_x_pu: np.ndarray | None = None
    regulators: LineRegulators | None = field(default=None)
    capacitors: CapacitorBanks | None = field(default=None)

    @property
    def n_meters(self) -> int:
        return len(self.meter_xfmr)


def _meters_per_transformer(
    rng: np.random.Generator, n_meters: int, layout: FeederLayout = _DEFAULT_LAYOUT
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``n_meters`` into transformer groups; ~4% of groups are three-phase banks (1-6 meters).

    Returns the group sizes and bank flags (the last group is cut to fit).
    """
    k = max(n_meters, 1)
    bank = rng.random(k) < layout.bank_share
    sizes = np.where(bank, rng.integers(*layout.bank_meters, k), rng.choice(_SIZES, k, p=_SIZE_P))
    if layout.single_meter:
        bank[:] = False
        sizes[:] = 1
    cs = np.cumsum(sizes)
    m = int(np.searchsorted(cs, n_meters)) + 1  # groups needed to reach n_meters
    sizes = sizes[:m].copy()
    sizes[-1] -= cs[m - 1] - n_meters
    return sizes, bank[:m]


@dataclass
class _NodeTree:
    """MV nodes drawn so far, in topological order; node 0 is the substation bus at the origin."""

    parent: list[int] = field(default_factory=lambda: [-1])
    length_km: list[float] = field(default_factory=lambda: [0.0])
    three_phase: list[bool] = field(default_factory=lambda: [True])
    phases: list[np.ndarray] = field(default_factory=lambda: [np.ones(3, bool)])
    xy: list[np.ndarray] = field(default_factory=lambda: [np.zeros(2)])

    def add(self, parent: int, seg_km: float, angle: float, phase: int | None = None) -> int:
        """Append a section of ``seg_km`` [km] heading ``angle`` [rad] from ``parent``; return its node.

        ``phase`` is ``None`` for a three-phase section, else the phase index of a single-phase one.
        """
        ph_vec = np.ones(3, bool)
        if phase is not None:
            ph_vec = np.zeros(3, bool)
            ph_vec[phase] = True
        self.parent.append(parent)
        self.length_km.append(seg_km)
        self.three_phase.append(phase is None)
        self.phases.append(ph_vec)
        self.xy.append(self.xy[parent] + 1000 * seg_km * np.array([np.cos(angle), np.sin(angle)]))
        return len(self.parent) - 1


def _draw_backbone(rng: np.random.Generator, n_bb: int, layout: FeederLayout) -> _NodeTree:
    """Three-phase trunk of ``n_bb`` sections from the substation, with occasional right-angle branches."""
    tree = _NodeTree()
    heading = rng.uniform(0, 2 * np.pi)
    for k in range(1, n_bb + 1):
        p = k - 1 if (k < 3 or rng.random() < layout.trunk_prob) else int(rng.integers(1, k))
        seg = rng.uniform(*layout.backbone_section_km)
        ang = heading + (rng.normal(0, 0.25) if p == k - 1 else rng.choice([-1, 1]) * np.pi / 2)
        tree.add(p, seg, ang)
    return tree


def _plan_lateral(
    rng: np.random.Generator, lat: int, remaining: int, w: np.ndarray, n_bb: int, layout: FeederLayout
) -> tuple[int, int, int, bool]:
    """Draw lateral ``lat``: transformer count, phase index, backbone tap node, and whether it is long.

    The first ``layout.long_laterals`` laterals are long: one per phase in turn, from the far half of
    the backbone. ``w`` holds the phase weights [-].
    """
    k = min(int(rng.integers(2, 13)), remaining)
    ph = int(rng.choice(3, p=w))
    tap_node = int(rng.integers(1, n_bb + 1))
    long_lateral = lat < layout.long_laterals
    if long_lateral:
        k = min(int(rng.integers(20, 41)), remaining)
        ph = lat % 3
        tap_node = int(rng.integers(n_bb // 2, n_bb + 1))
    return k, ph, tap_node, long_lateral


def _grow_lateral(
    rng: np.random.Generator, tree: _NodeTree, tap_node: int, ph: int, k: int, long_lateral: bool
) -> list[int]:
    """Append a straight chain of ``k`` single-phase sections from ``tap_node``; return its nodes in order."""
    ang = rng.uniform(0, 2 * np.pi)
    nodes = [tap_node]
    for _ in range(k):
        seg = rng.uniform(0.10, 0.25) if long_lateral else rng.uniform(0.04, 0.15)
        nodes.append(tree.add(nodes[-1], seg, ang, phase=ph))
    return nodes[1:]


def _place_transformers(
    rng: np.random.Generator, tree: _NodeTree, bank: np.ndarray, n_bb: int, layout: FeederLayout
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hang single-phase transformers on new laterals (grown into ``tree``) and banks on backbone nodes.

    Returns
    -------
    xfmr_node, xfmr_phase, xfmr_lateral, xfmr_pos : ndarray, shape (n_xfmr,)
        As in :class:`FeederTopology`; ``xfmr_phase`` still of dtype object.
    """
    n_x = len(bank)
    # Load is unbalanced by a few percent across phases, as on real feeders.
    w = rng.dirichlet([30, 30, 30])
    singles = np.flatnonzero(~bank)
    xfmr_node = np.zeros(n_x, int)
    xfmr_phase = np.empty(n_x, object)
    xfmr_lat = np.full(n_x, -1)
    xfmr_pos = np.zeros(n_x, int)
    i = lat = 0
    while i < len(singles):
        k, ph, tap_node, long_lateral = _plan_lateral(rng, lat, len(singles) - i, w, n_bb, layout)
        t = singles[i : i + k]
        xfmr_node[t] = _grow_lateral(rng, tree, tap_node, ph, k, long_lateral)
        xfmr_phase[t] = "ABC"[ph]
        xfmr_lat[t] = lat
        xfmr_pos[t] = np.arange(k)
        i += k
        lat += 1
    for t in np.flatnonzero(bank):
        xfmr_node[t] = int(rng.integers(1, n_bb + 1))
        xfmr_phase[t] = "ABC"
        xfmr_pos[t] = xfmr_node[t]
    return xfmr_node, xfmr_phase, xfmr_lat, xfmr_pos


def _transformer_ratings(
    rng: np.random.Generator, sizes: np.ndarray, bank: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rating [kVA], secondary-main loop resistance [ohm] and fixed tap [pu] of each transformer."""
    n_x = len(sizes)
    kva = np.where(
        bank,
        np.select([sizes <= 2, sizes <= 4], [75.0, 112.5], 150.0),
        np.select(
            [sizes <= 1, sizes <= 3, sizes <= 6, sizes <= 10],
            [rng.choice([15.0, 25.0], n_x), 25.0, 37.5, 50.0],
            75.0,
        ),
    )
    # Secondary main shared by the transformer's meters: 0-60 m of 4/0 triplex (0.56 ohm/km loop).
    sec = np.where((sizes > 1) & ~bank, rng.uniform(0.0, 0.060, n_x) * 0.56, 0.0)
    tap = 1.0 + 0.025 * rng.choice([-1, 0, 0, 0, 1], n_x)
    return kva, sec, tap


def _draw_meters(
    rng: np.random.Generator,
    sizes: np.ndarray,
    bank: np.ndarray,
    xfmr_phase: np.ndarray,
    xfmr_xy: np.ndarray,
    layout: FeederLayout,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw the meters of each transformer: services, service drops and positions.

    Returns ``meter_xfmr``, ``meter_phase``, ``meter_service`` (both of dtype object),
    ``meter_nominal_v`` [V], ``meter_service_ohm`` [ohm] and ``meter_xy`` [m] as in :class:`FeederTopology`.
    """
    m_x = np.repeat(np.arange(len(sizes)), sizes)
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
        kind = rng.choice(np.array(["ABC", "AB", "BC", "CA"], object), nb, p=list(layout.bank_services))
        m_phase[on_bank] = kind
        m_serv[on_bank] = np.where(kind == "ABC", layout.three_phase_service, "2ph-208")
        m_nom[on_bank] = np.where(kind == "ABC", 120.0, 208.0)
    # Service drop: 10-50 m of 1/0 triplex (1.1 ohm/km loop); banks feed short, heavy services.
    m_serv_ohm = np.where(on_bank, rng.uniform(0.005, 0.02, n_m) * 0.35, rng.uniform(0.010, 0.050, n_m) * 1.1)
    m_xy = xfmr_xy[m_x] + rng.normal(0, 20, (n_m, 2))
    return m_x, m_phase, m_serv, m_nom, m_serv_ohm, m_xy


def build_feeder_topology(
    rng: np.random.Generator, feeder_id: str, n_meters: int, layout: FeederLayout = _DEFAULT_LAYOUT
) -> FeederTopology:
    """Draw a feeder with ``n_meters`` meters.

    Parameters
    ----------
    rng : numpy.random.Generator
    feeder_id : str
    n_meters : int
        Number of meters on the feeder (>= 1).
    layout : FeederLayout, optional
        Scenario variant; the default draws exactly what the utility generator always drew.

    Returns
    -------
    FeederTopology
    """
    sizes, bank = _meters_per_transformer(rng, n_meters, layout)
    n_single = int((~bank).sum())
    n_bb = max(3, int(np.ceil(n_single / layout.meters_per_backbone_node)) + 2)
    tree = _draw_backbone(rng, n_bb, layout)
    xfmr_node, xfmr_phase, xfmr_lat, xfmr_pos = _place_transformers(rng, tree, bank, n_bb, layout)
    xfmr_xy = np.array(tree.xy)[xfmr_node] + rng.normal(0, 8, (len(sizes), 2))
    kva, sec, tap = _transformer_ratings(rng, sizes, bank)
    meters = _draw_meters(rng, sizes, bank, xfmr_phase, xfmr_xy, layout)
    m_x, m_phase, m_serv, m_nom, m_serv_ohm, m_xy = meters
    return FeederTopology(
        feeder_id=feeder_id,
        node_parent=np.array(tree.parent),
        node_phases=np.array(tree.phases),
        node_length_km=np.array(tree.length_km),
        node_three_phase=np.array(tree.three_phase),
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


def latlon_to_xy(lat: np.ndarray, lon: np.ndarray, lat0: float, lon0: float) -> np.ndarray:
    """Latitude/longitude [deg] to east/north offsets [m] around (lat0, lon0), shape (n, 2)."""
    lat, lon = np.asarray(lat, dtype=float), np.asarray(lon, dtype=float)
    return np.column_stack([(lon - lon0) * _M_PER_DEG * np.cos(np.deg2rad(lat0)), (lat - lat0) * _M_PER_DEG])


def xy_to_latlon(xy: np.ndarray, lat0: float, lon0: float) -> tuple[np.ndarray, np.ndarray]:
    """Local east/north offsets [m] to latitude/longitude [deg] around (lat0, lon0)."""
    lat = lat0 + xy[:, 1] / _M_PER_DEG
    lon = lon0 + xy[:, 0] / (_M_PER_DEG * np.cos(np.deg2rad(lat0)))
    return lat, lon


def node_distance_km(top: FeederTopology) -> np.ndarray:
    """Length of the path from the substation to each node [km], shape (n_nodes,)."""
    dist = np.zeros(len(top.node_parent))
    for k in range(1, len(dist)):  # nodes are in topological order
        dist[k] = dist[top.node_parent[k]] + top.node_length_km[k]
    return dist


def main_path(top: FeederTopology) -> np.ndarray:
    """Backbone nodes from the substation to the farthest backbone node (the trunk), in order."""
    dist = node_distance_km(top)
    trunk = np.flatnonzero(top.node_three_phase & (np.arange(len(dist)) > 0))
    path = [int(trunk[np.argmax(dist[trunk])])]
    while top.node_parent[path[-1]] > 0:
        path.append(int(top.node_parent[path[-1]]))
    return np.array(path[::-1])


def add_line_regulators(
    top: FeederTopology,
    rng: np.random.Generator,
    *,
    backbone: dict[int, float] | None = None,
    min_lateral_transformers: int = 20,
) -> FeederTopology:
    """Place single-phase line regulators: on chosen backbone phases and at the start of long laterals.

    Parameters
    ----------
    top : FeederTopology
    rng : numpy.random.Generator
        Draws the controller settings.
    backbone : dict of {phase index: fraction}, optional
        One regulator on that phase of the main path (substation to the farthest backbone node), at
        that fraction of its length, so each phase can be regulated at a different place.
    min_lateral_transformers : int
        Laterals with at least this many transformers get a regulator on their first section.

    Returns
    -------
    FeederTopology
        A copy with ``regulators`` set: set point 1.020-1.030 pu, bandwidth 1.5-2 V on 120 V, time
        delay 30-90 s, 0.625% steps.
    """
    nodes, phases = [], []
    dist = node_distance_km(top)
    path = main_path(top)
    for ph, frac in sorted((backbone or {}).items()):
        nodes.append(int(path[np.argmin(np.abs(dist[path] - frac * dist[path[-1]]))]))
        phases.append(ph)
    lat_ids, counts = np.unique(top.xfmr_lateral[top.xfmr_lateral >= 0], return_counts=True)
    for lat in lat_ids[counts >= min_lateral_transformers]:
        first = np.flatnonzero((top.xfmr_lateral == lat) & (top.xfmr_pos == 0))[0]
        nodes.append(int(top.xfmr_node[first]))
        phases.append(PHASE_INDEX[top.xfmr_phase[first]])
    n = len(nodes)
    regs = LineRegulators(
        node=np.array(nodes, int),
        phase=np.array(phases, int),
        set_point_pu=rng.uniform(1.020, 1.030, n),
        bandwidth_pu=rng.uniform(1.5, 2.0, n) / 120.0,
        delay_s=rng.uniform(30.0, 90.0, n),
    )
    return replace(top, regulators=regs)


def add_capacitors(
    top: FeederTopology,
    rng: np.random.Generator,
    head_q_kvar: np.ndarray,
    *,
    n_banks: int = 3,
) -> FeederTopology:
    """Place three-phase switched capacitor banks on the backbone, sized and set for the feeder's load.

    Parameters
    ----------
    top : FeederTopology
    rng : numpy.random.Generator
    head_q_kvar : ndarray, shape (n_time,)
        The customers' total reactive load [kvar] (sets sizes and var thresholds, as a planner would).
    n_banks : int
        The first bank is on a time clock (07:00-21:00 on weekdays), the others on var control with
        staggered thresholds.

    Returns
    -------
    FeederTopology
        A copy with ``capacitors`` set.
    """
    dist = node_distance_km(top)
    trunk = np.flatnonzero(top.node_three_phase & (np.arange(len(dist)) > 0))
    order = trunk[np.argsort(dist[trunk], kind="stable")]
    # Spread along the backbone: 35-85% of the path length.
    pick = order[np.clip((np.linspace(0.35, 0.85, n_banks) * len(order)).astype(int), 0, len(order) - 1)]
    # Each bank a quarter to 40% of the feeder's high reactive load, in 150 kvar steps.
    q_high = float(np.quantile(head_q_kvar, 0.9))
    size3 = np.clip(np.round(rng.uniform(0.25, 0.4, n_banks) * q_high / 150.0) * 150.0, 150.0, 1200.0)
    control = np.array(["time"] + ["var"] * (n_banks - 1), object)[:n_banks]
    on = np.empty(n_banks)
    off = np.empty(n_banks)
    on[0], off[0] = 7.0, 21.0
    # Var banks close one after the other as the load rises: bank i closes when the load reaches its
    # quantile, measured with the banks before it already closed.
    levels = np.quantile(head_q_kvar, np.linspace(0.35, 0.75, max(n_banks - 1, 1)))
    for i in range(1, n_banks):
        on[i] = levels[i - 1] - size3[1:i].sum()
        off[i] = on[i] - 1.3 * size3[i]
    caps = CapacitorBanks(
        node=pick.astype(int),
        phases=np.ones((n_banks, 3), bool),
        kvar=size3 / 3.0,
        control=control.astype(str),
        on_level=on,
        off_level=off,
    )
    return replace(top, capacitors=caps)


#: Kron-reduced 4-core 150 mm2 aluminium LV cable with a full-size neutral [ohm/km]: the neutral is
#: the return path of every single-phase load, so a load on one phase shifts the neutral point and
#: raises the other two phases (mutual term ``Z_n`` with the 120-degree rotation).
_R_LV, _RN_LV, _X_LV, _XM_LV = 0.206, 0.206, 0.080, 0.030
Z_LV_CABLE = np.full((3, 3), _RN_LV + 1j * _XM_LV) + np.eye(3) * (_R_LV + 1j * (_X_LV - _XM_LV))
#: Nominal line-to-neutral voltage of a European LV network [V].
V_LN_LV = 230.0


def build_lv_network(
    rng: np.random.Generator,
    feeder_id: str,
    n_customers: int,
    *,
    three_phase_share: float = 0.15,
) -> FeederTopology:
    """A European LV network below one three-phase MV/LV transformer (node 0 = its LV busbar).

    Four-wire cables (``Z_LV_CABLE``) leave the busbar in 1-8 radial cables of 25-45 m sections;
    each node is a service point (a "transformer" of the topology with no impedance: the real
    transformer is the network's head) feeding 1-4 customers through their own service cable.
    Single-phase customers (230 V) are spread over A, B and C; a share are three-phase (``ABC``).

    Parameters
    ----------
    rng : numpy.random.Generator
    feeder_id : str
    n_customers : int
    three_phase_share : float
        Share of three-phase customers [-].

    Returns
    -------
    FeederTopology
        ``v_ln_base`` 230 V; ``xfmr_*`` arrays describe the service points.
    """
    per_sp = rng.choice([1, 1, 2, 2, 3, 4], max(n_customers, 1))
    cs = np.cumsum(per_sp)
    n_sp = int(np.searchsorted(cs, n_customers)) + 1
    sizes = per_sp[:n_sp].copy()
    sizes[-1] -= cs[n_sp - 1] - n_customers
    # Outgoing cables of ~6-14 service points each (300-500 m), up to eight per substation.
    n_cables = int(np.clip(np.ceil(n_sp / rng.uniform(6, 14)), 1, 8))
    parent, length, xy = [-1], [0.0], [np.zeros(2)]
    ends = []
    for c in range(n_cables):
        ang = 2 * np.pi * c / n_cables + rng.normal(0, 0.3)
        ends.append((0, ang))
    sp_node = np.empty(n_sp, int)
    for i in range(n_sp):
        c = i % n_cables
        prev, ang = ends[c]
        if prev > 0 and rng.random() < 0.2:  # a branch off an earlier node of any cable
            prev = int(rng.integers(1, len(parent)))
            ang = ang + rng.choice([-1, 1]) * np.pi / 2
        seg = rng.uniform(0.025, 0.045)
        parent.append(prev)
        length.append(seg)
        xy.append(xy[prev] + 1000 * seg * np.array([np.cos(ang), np.sin(ang)]))
        sp_node[i] = len(parent) - 1
        ends[c] = (sp_node[i], ang)
    n_nodes = len(parent)
    node_xy = np.array(xy)
    m_x = np.repeat(np.arange(n_sp), sizes)
    n_m = len(m_x)
    three = rng.random(n_m) < three_phase_share
    phase = np.where(three, "ABC", np.array(list("ABC"))[rng.integers(0, 3, n_m)]).astype(object)
    serv_len = rng.uniform(0.010, 0.040, n_m)
    # Single-phase service: 2 x 25 mm2 Cu loop (phase + neutral); three-phase: one phase conductor.
    serv_ohm = np.where(three, 0.727, 2 * 0.727) * serv_len
    return FeederTopology(
        feeder_id=feeder_id,
        node_parent=np.array(parent),
        node_phases=np.ones((n_nodes, 3), bool),
        node_length_km=np.array(length),
        node_three_phase=np.ones(n_nodes, bool),
        xfmr_node=sp_node,
        xfmr_phase=np.full(n_sp, "ABC"),
        xfmr_kva=np.full(n_sp, 1000.0),
        xfmr_lateral=np.full(n_sp, -1),
        xfmr_pos=sp_node.copy(),
        xfmr_sec_ohm=np.zeros(n_sp),
        xfmr_tap=np.ones(n_sp),
        xfmr_xy=node_xy[sp_node],
        meter_xfmr=m_x,
        meter_phase=phase.astype(str),
        meter_service=np.where(three, "3ph", "1ph-230").astype(str),
        meter_nominal_v=np.full(n_m, V_LN_LV),
        meter_service_ohm=serv_ohm,
        meter_xy=node_xy[sp_node][m_x] + rng.normal(0, 10, (n_m, 2)),
        v_ln_base=V_LN_LV,
        z_three_phase=Z_LV_CABLE,
        xfmr_r_pu=np.zeros(n_sp),
        xfmr_x_pu=np.zeros(n_sp),
    )
