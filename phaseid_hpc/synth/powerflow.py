"""Linearised unbalanced power flow of a radial feeder, vectorised over time, and the substation LTC.

Notes
-----
For a radial feeder the voltage drop at MV node ``k`` on phase ``p`` is the sum, over the sections on the
path from the substation to ``k``, of the drop that the section's through-flow causes. Linearised around
nominal voltage with balanced phase angles ``theta = (0, -120, +120) deg``, the drop on phase ``p`` of a
section with phase impedance matrix ``Z`` [ohm] carrying ``P_q, Q_q`` [W, var] on phase ``q`` is::

    dV_p = sum_q ( Re(Z_pq e^{j(theta_q - theta_p)}) P_q + Im(Z_pq e^{j(theta_q - theta_p)}) Q_q ) / V_LN

so the mutual terms ``Z_pq`` (untransposed overhead line, Kersting's 4-wire 336 ACSR example) couple the
phases: load on B moves the voltage of A. With ``D`` the node-by-section path matrix (``D[k, e] = 1`` when
section ``e`` is on the path to ``k``), section flows are ``F = D.T @ S_node`` and node drops are
``dV = D @ (K F)``: the sensitivity form ``V = V_source - D K D.T S`` evaluated with sparse products for all
time steps at once, no per-step solver loop.

Below each MV node, the service transformer (series ``R + jX`` in pu of its rating), an optional shared
secondary main and each meter's own service drop add their linear drops.

References
----------
W. H. Kersting, *Distribution System Modeling and Analysis*, 4th ed., CRC Press, 2017, Example 4.1
(phase impedance matrix) and chapter 6 (approximate/linear voltage drop).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .topology import CapacitorBanks, FeederTopology

__all__ = [
    "V_LN_MV",
    "FeederVoltages",
    "capacitor_states",
    "feeder_drops",
    "feeder_voltages",
    "substation_bus_voltage",
    "tap_controller",
    "transformer_secondary_pu",
]

#: Nominal MV line-to-neutral voltage of a 12.47 kV feeder [V].
V_LN_MV = 12_470.0 / np.sqrt(3)
_MILE = 1.609344
#: Phase impedance matrix of an untransposed 4-wire 336,400 26/7 ACSR line [ohm/km] (Kersting Ex. 4.1).
Z_BACKBONE = (
    np.array(
        [
            [0.4576 + 1.0780j, 0.1560 + 0.5017j, 0.1535 + 0.3849j],
            [0.1560 + 0.5017j, 0.4666 + 1.0482j, 0.1580 + 0.4236j],
            [0.1535 + 0.3849j, 0.1580 + 0.4236j, 0.4615 + 1.0651j],
        ]
    )
    / _MILE
)
#: Single-phase 1/0 ACSR lateral with neutral return [ohm/km] (Kersting Ex. 4.2-type value).
Z_LATERAL = (1.3368 + 1.3343j) / _MILE
_THETA = np.deg2rad([0.0, -120.0, 120.0])


def _aggregation(top: FeederTopology, n_m: int):
    """``(w, mx, m2xp, x2n, d)``: meter phase weights (n_m, 3), meter -> transformer index, the sparse
    (3 * n_x, n_m) sum of each phase's share of a transformer's meters (row ``p * n_x + t``), the sparse
    transformer -> node incidence (n_nodes, n_x) and the path matrix of the node tree."""
    n_x = len(top.xfmr_kva)
    w = meter_phase_weights(top.meter_phase)
    mx = top.meter_xfmr
    m2xp = _meter_to_transformer_phase(w, mx, n_x)
    x2n = sp.csr_matrix((np.ones(n_x), (top.xfmr_node, np.arange(n_x))), shape=(len(top.node_parent), n_x))
    return w, mx, m2xp, x2n, _path_matrix(top.node_parent)


def _meter_to_transformer_phase(w: np.ndarray, mx: np.ndarray, n_x: int) -> sp.csr_matrix:
    """Sparse (3 * n_x, n_m) sum of each phase's share of a transformer's meters (row ``p * n_x + t``)."""
    rows, cols = np.nonzero(w.T)
    return sp.csr_matrix((w.T[rows, cols], (rows * n_x + mx[cols], cols)), shape=(3 * n_x, len(mx)))


def subtree_sums(parent: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Through-flow of the section into each node: the sum of ``load`` over the node's subtree.

    Equal to ``D.T @ load`` with ``D`` the path matrix (:func:`_path_matrix`), node 0 (the bus) included
    as the sum of everything, in ``O(n_nodes)`` row additions instead of ``O(n_nodes * depth)``.

    Parameters
    ----------
    parent : ndarray, shape (n_nodes,), int
        Parent of each node, ``-1`` for node 0; nodes in topological order (``parent[k] < k``).
    load : ndarray, shape (n_nodes, ...)
        Quantity injected at each node. Summed in place (the array is returned).

    Returns
    -------
    ndarray, shape (n_nodes, ...)
    """
    for k in range(len(parent) - 1, 0, -1):
        load[parent[k]] += load[k]
    return load


def path_sums(parent: np.ndarray, section: np.ndarray) -> np.ndarray:
    """Cumulative sum of ``section`` along the path from the bus to each node (``D @ section``).

    Parameters
    ----------
    parent : ndarray, shape (n_nodes,), int
        As in :func:`subtree_sums`.
    section : ndarray, shape (n_nodes, ...)
        Quantity of the section into each node (row 0, the bus, is ignored). Summed in place.

    Returns
    -------
    ndarray, shape (n_nodes, ...)
        Row 0 is zero.
    """
    section[0] = 0.0
    for k in range(1, len(parent)):
        section[k] += section[parent[k]]
    return section


def _path_matrix(parent: np.ndarray) -> sp.csr_matrix:
    """``D[k, e] = 1`` when the section into node ``e`` lies on the path from the root to node ``k``."""
    n = len(parent)
    child = np.flatnonzero(parent >= 0)
    up = sp.csr_matrix((np.ones(len(child)), (child, parent[child])), shape=(n, n))
    d = sp.identity(n, format="csr")
    cur = d
    while True:
        cur = cur @ up
        if cur.nnz == 0:
            break
        d = d + cur
    d = d.tocsr()
    d[0, 0] = 0.0  # node 0 is the bus: no section into it
    d.eliminate_zeros()
    return d


def _section_sensitivity(top: FeederTopology) -> tuple[np.ndarray, np.ndarray]:
    """Per-section real sensitivity matrices ``KP, KQ``, shape (n_nodes, 3, 3) [ohm]."""
    rot = np.exp(1j * (_THETA[None, :] - _THETA[:, None]))  # e^{j(theta_q - theta_p)} at [p, q]
    zb = (Z_BACKBONE if top.z_three_phase is None else top.z_three_phase) * rot
    z_single = Z_LATERAL if top.z_single is None else top.z_single
    n = len(top.node_parent)
    kp = np.zeros((n, 3, 3))
    kq = np.zeros((n, 3, 3))
    three = top.node_three_phase
    kp[three] = zb.real[None] * top.node_length_km[three, None, None]
    kq[three] = zb.imag[None] * top.node_length_km[three, None, None]
    for p in range(3):
        single = ~three & top.node_phases[:, p]
        kp[single, p, p] = z_single.real * top.node_length_km[single]
        kq[single, p, p] = z_single.imag * top.node_length_km[single]
    if top.node_z_scale is not None:
        kp *= top.node_z_scale[:, None, None]
        kq *= top.node_z_scale[:, None, None]
    return kp, kq


def meter_phase_weights(phase: np.ndarray) -> np.ndarray:
    """Share of each meter's load on phases A, B, C, shape (n_meters, 3)."""
    w = np.zeros((len(phase), 3))
    for j, name in enumerate("ABC"):
        has = np.char.find(phase.astype(str), name) >= 0
        w[has, j] = 1.0
    return w / w.sum(axis=1, keepdims=True)


def feeder_drops(
    top: FeederTopology,
    kw: np.ndarray,
    kvar: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Voltage drops of every meter relative to the feeder head, and the feeder's phase loads.

    Parameters
    ----------
    top : FeederTopology
    kw, kvar : ndarray, shape (n_meters, n_time)
        Meter loads [kW], [kvar].
    rng : numpy.random.Generator
        Draws transformer impedances.

    Returns
    -------
    head_weight : ndarray, shape (n_meters, 3)
        How the meter's voltage combines the head phases [-]: one-hot for single-phase, halves for
        phase-to-phase (linearised ``|V_a - V_b|``), thirds for 3ph-208Y (mean of the three).
    drop_v : ndarray, shape (n_meters, n_time), float32
        Meter voltage = ``nominal * tap * (head_weight @ v_head_pu) - drop_v`` [V], ``tap`` being
        ``top.xfmr_tap[top.meter_xfmr]``.
    feeder_p, feeder_q : ndarray, shape (3, n_time)
        Per-phase load at the feeder head [kW], [kvar].
    """
    n_t = kw.shape[1]
    n_x = len(top.xfmr_kva)
    n_nodes = len(top.node_parent)
    w = meter_phase_weights(top.meter_phase)
    mx = top.meter_xfmr
    # float32 throughout, like the loads and the stored data: the drops are a few percent of nominal, so
    # float32's 6e-8 relative rounding is far below a meter's resolution.
    f32 = np.float32
    m2xp = _meter_to_transformer_phase(w, mx, n_x).astype(f32)
    kp, kq = _section_sensitivity(top)
    xp = (m2xp @ kw.astype(f32, copy=False)).reshape(3, n_x, n_t)  # per-phase transformer load [kW]
    xq = (m2xp @ kvar.astype(f32, copy=False)).reshape(3, n_x, n_t)
    # Load at each node, (n_nodes, 6, T): P on phases A, B, C then Q on A, B, C [kW], [kvar]; the
    # section through-flow into each node is the sum over its subtree (D.T @ load).
    x2n = sp.csr_matrix((np.ones(n_x, f32), (top.xfmr_node, np.arange(n_x))), shape=(n_nodes, n_x))
    node_load = np.empty((n_nodes, 6, n_t), f32)
    for j, x_load in enumerate((*xp, *xq)):
        node_load[:, j] = x2n @ x_load
    flow = subtree_sums(top.node_parent, node_load)
    head = top.node_parent == 0
    feeder_p = flow[head, :3].sum(axis=0)
    feeder_q = flow[head, 3:].sum(axis=0)
    # Drop of each section [pu], (n_nodes, 3, T): sum_q KP[p, q] P_q + KQ[p, q] Q_q; cumulated from the
    # head down to each node (D @ drop).
    sec = np.matmul(np.concatenate([kp, kq], axis=2).astype(f32) * f32(1000.0 / V_LN_MV**2), flow)  # [pu]
    del flow
    node_drop = path_sums(top.node_parent, sec)
    del sec

    # Transformer series impedance [pu of rating]; banks are per phase on a third of the rating.
    bank = top.xfmr_phase == "ABC"
    r_t = np.where(bank, rng.uniform(0.008, 0.012, n_x), rng.uniform(0.009, 0.016, n_x))
    x_t = np.where(bank, rng.uniform(0.025, 0.045, n_x), rng.uniform(0.012, 0.024, n_x))
    s_phase = np.where(bank, top.xfmr_kva / 3, top.xfmr_kva)
    tot = np.empty((3, n_x, n_t), dtype=np.float32)  # drop at each transformer secondary [pu]
    at_x = node_drop[top.xfmr_node]  # MV drop at each transformer's node, (n_x, 3, T) [pu]
    del node_drop
    tap, r_x, x_x = (top.xfmr_tap.astype(f32)[:, None], (r_t / s_phase).astype(f32)[:, None],
                     (x_t / s_phase).astype(f32)[:, None])
    for p in range(3):
        np.multiply(at_x[:, p], tap, out=tot[p])
        tot[p] += r_x * xp[p]
        tot[p] += x_x * xq[p]
    del at_x
    nom = top.meter_nominal_v.astype(np.float32)
    one = w.max(axis=1) == 1.0
    ph = w.argmax(axis=1)
    tot_flat = tot.reshape(3 * n_x, n_t)
    drop = tot_flat[ph * n_x + mx]  # single-phase meters: own phase only
    multi = np.flatnonzero(~one)
    if len(multi):
        drop[multi] = np.einsum("mp,pmt->mt", w[multi].astype(np.float32), tot[:, mx[multi]])
    drop *= nom[:, None]
    # Shared secondary main (single-phase transformers) and own service drop [V]: (R P + X Q) / V,
    # the current per conductor being P / V for 240 V and 208 V services and P / (3 * 120) for 3ph-208Y.
    v_sec = np.where(nom > 200, nom, 3 * nom)
    sec_main = xp.sum(axis=0)
    sec_main += f32(0.3) * xq.sum(axis=0)
    sec_main *= (top.xfmr_sec_ohm * 1000.0).astype(f32)[:, None]
    serv = kvar * f32(0.3)
    serv += kw
    serv *= (top.meter_service_ohm * 1000.0).astype(f32)[:, None]
    serv += sec_main[mx]
    serv /= v_sec[:, None]
    drop += serv
    return w, drop, feeder_p, feeder_q


def substation_bus_voltage(
    rng: np.random.Generator,
    upstream_pu: np.ndarray,
    load_p: np.ndarray,
    load_q: np.ndarray,
    *,
    interval_s: float,
    set_point_pu: float = 1.035,
    bandwidth_pu: float = 0.0167,
    step_pu: float = 0.00625,
    delay_s: float = 45.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Substation bus (feeder-head) voltage under an on-load tap changer.

    Parameters
    ----------
    rng : numpy.random.Generator
    upstream_pu : ndarray, shape (3, n_time)
        Sub-transmission voltage per phase [pu].
    load_p, load_q : ndarray, shape (3, n_time)
        Total substation load per phase [kW], [kvar].
    interval_s : float
        Interval length [s].
    set_point_pu, bandwidth_pu, step_pu : float
        LTC set point, total bandwidth (deadband) and tap step [pu]; 0.625% steps (+-16, 32 steps
        over +-10%) and a 2 V-on-120 V band are the usual settings.
    delay_s : float
        LTC time delay [s]; a tap change made inside an interval shows in that interval's average
        by the remaining share of the interval.

    Returns
    -------
    v_bus : ndarray, shape (3, n_time)
        Interval-mean bus line-to-neutral voltage [pu].
    tap : ndarray, shape (n_time,), int
        Tap position at the end of each interval.

    Notes
    -----
    The transformer drop is ``(R P_p + X Q_p) / (S / 3)`` with ``R = 0.5%, X = 8%`` on a rating ``S``
    sized at 1.3 times the peak load. The controller watches the mean of the three phases; it is the
    one sequential loop of the generator (one scalar step per interval per substation).
    """
    peak = load_p.sum(axis=0).max()
    s_rating = max(1.3 * peak, 1000.0) / 3.0
    r, x = 0.005, rng.uniform(0.07, 0.09)
    drop = (r * load_p + x * load_q) / s_rating
    v0 = upstream_pu - drop  # bus voltage at neutral tap, (3, T)
    ratio, tap = tap_controller(
        v0.mean(axis=0),
        set_point_pu=set_point_pu,
        bandwidth_pu=bandwidth_pu,
        step_pu=step_pu,
        delay_s=delay_s,
        interval_s=interval_s,
    )
    v0 *= ratio[None, :]
    return v0, tap


def tap_controller(
    v_in_pu: np.ndarray,
    *,
    set_point_pu: float,
    bandwidth_pu: float,
    step_pu: float,
    delay_s: float,
    interval_s: float,
    max_steps: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Tap positions of a voltage regulator (LTC or line regulator) that holds its output in a band.

    Parameters
    ----------
    v_in_pu : ndarray, shape (n_time,)
        Interval-mean voltage the regulator would output at neutral tap [pu].
    set_point_pu, bandwidth_pu, step_pu : float
        Set point, total bandwidth (deadband) and tap step [pu].
    delay_s : float
        Time delay [s]: a tap change made inside an interval shows in that interval's mean by the
        share of the interval left after the delay.
    interval_s : float
        Interval length [s].
    max_steps : int
        Tap range, +-``max_steps`` steps.

    Returns
    -------
    ratio : ndarray, shape (n_time,)
        Interval-mean voltage ratio ``1 + step * tap`` [-].
    tap : ndarray, shape (n_time,), int
        Tap position at the end of each interval.

    Notes
    -----
    When the output ``v_in * (1 + k * step)`` leaves ``set_point +- bandwidth / 2``, the tap moves by
    as many steps as the error holds (at least one). The controller is the one sequential loop of the
    generator (one scalar step per interval per regulator).
    """
    n_t = len(v_in_pu)
    half = bandwidth_pu / 2
    tap = np.zeros(n_t, dtype=np.int64)
    ratio = np.empty(n_t)
    moved_share = max(0.0, 1.0 - delay_s / interval_s)  # share of the interval on the new tap
    k = int(np.clip(np.round((set_point_pu - v_in_pu[0]) / step_pu), -max_steps, max_steps))
    for t in range(n_t):
        err = v_in_pu[t] * (1 + k * step_pu) - set_point_pu
        k_new = k
        if abs(err) > half:
            k_new = int(np.clip(k - np.sign(err) * max(1, int(abs(err) // step_pu)), -max_steps, max_steps))
        ratio[t] = 1 + step_pu * (k + moved_share * (k_new - k))
        tap[t] = k = k_new
    return ratio, tap


# ------------------------------------------------------------------------------------------------
# Feeders with voltage-control equipment: switched capacitors and single-phase line regulators
# ------------------------------------------------------------------------------------------------


def capacitor_states(
    caps: CapacitorBanks,
    head_q_kvar: np.ndarray,
    hours: np.ndarray,
    weekday: np.ndarray,
) -> np.ndarray:
    """On/off state of every switched capacitor bank in every interval.

    Parameters
    ----------
    caps : CapacitorBanks
    head_q_kvar : ndarray, shape (n_time,)
        Feeder-head reactive load of the customers, three phases, without the capacitors [kvar].
    hours : ndarray, shape (n_time,)
        Local hour of the interval [h].
    weekday : ndarray, shape (n_time,), int
        0 = Monday.

    Returns
    -------
    ndarray, shape (n_cap, n_time), bool

    Notes
    -----
    A var-controlled bank measures the head reactive power *with* the banks already on, so switching
    one on lowers what the others see; the hysteresis ``on_level - off_level`` exceeds its own rating,
    so it does not hunt.
    """
    n_c, n_t = len(caps.node), len(head_q_kvar)
    on = np.zeros((n_c, n_t), bool)
    timed = caps.control == "time"
    if timed.any():
        h = hours[None, :]
        on[timed] = (
            (h >= caps.on_level[timed, None]) & (h < caps.off_level[timed, None]) & (weekday[None, :] < 5)
        )
    var = np.flatnonzero(caps.control == "var")
    size = caps.kvar * caps.phases.sum(axis=1)
    state = np.zeros(n_c, bool)
    for t in range(n_t):
        state[timed] = on[timed, t]
        for c in var:
            q = head_q_kvar[t] - (size * state).sum()
            if not state[c] and q > caps.on_level[c]:
                state[c] = True
            elif state[c] and q < caps.off_level[c]:
                state[c] = False
        on[var, t] = state[var]
    return on


def transformer_secondary_pu(
    v_primary_pu: np.ndarray, p_kw: np.ndarray, q_kvar: np.ndarray, kva: float, r_pu: float, x_pu: float
) -> np.ndarray:
    """Secondary voltage of a three-phase transformer, linearised drop per phase.

    Parameters
    ----------
    v_primary_pu : ndarray, shape (3, n_time)
        Primary voltage per phase (times the fixed tap ratio) [pu].
    p_kw, q_kvar : ndarray, shape (3, n_time)
        Load per phase [kW], [kvar].
    kva : float
        Rating [kVA].
    r_pu, x_pu : float
        Series resistance and reactance [pu].

    Returns
    -------
    ndarray, shape (3, n_time)
        ``v_primary - (r P_p + x Q_p) / (S / 3)`` [pu].
    """
    return v_primary_pu - (r_pu * p_kw + x_pu * q_kvar) / (kva / 3.0)


def _regulator_ancestors(top: FeederTopology) -> np.ndarray:
    """Nearest line regulator at or above each node, per phase, shape (n_nodes, 3) (-1: none)."""
    n = len(top.node_parent)
    at = np.full((n, 3), -1)
    regs = top.regulators
    if regs is not None:
        at[regs.node, regs.phase] = np.arange(len(regs.node))
    anc = at.copy()
    for k in range(1, n):  # nodes are in topological order
        none = anc[k] < 0
        anc[k, none] = anc[top.node_parent[k], none]
    return anc


def feeder_voltages(
    top: FeederTopology,
    kw: np.ndarray,
    kvar: np.ndarray,
    rng: np.random.Generator,
    *,
    cap_on: np.ndarray | None = None,
) -> FeederVoltages:
    """Linear unbalanced power flow of a feeder with switched capacitors and line regulators.

    The drops are those of :func:`feeder_drops` (same sensitivity form, mutual coupling, transformer,
    secondary and service drops); in addition capacitor banks inject reactive power at their nodes and
    line regulators scale the voltage of everything downstream on their phase. The result is completed
    by :meth:`FeederVoltages.meter_voltage` once the head voltage is known (it depends on the whole
    substation's load through the LTC).

    Parameters
    ----------
    top : FeederTopology
        With ``v_ln_base``, optional impedances, ``regulators`` and ``capacitors``.
    kw, kvar : ndarray, shape (n_meters, n_time)
        Meter loads [kW], [kvar].
    rng : numpy.random.Generator
        Draws transformer impedances where the topology has none.
    cap_on : ndarray, shape (n_cap, n_time), bool, optional
        Capacitor states (:func:`capacitor_states`); all off when omitted.

    Returns
    -------
    FeederVoltages
    """
    n_m, n_t = kw.shape
    n_x = len(top.xfmr_kva)
    n_nodes = len(top.node_parent)
    w, mx, m2xp, x2n, d = _aggregation(top, n_m)
    dt = d.T.tocsr()
    kp, kq = _section_sensitivity(top)
    xp = (m2xp @ kw).reshape(3, n_x, n_t)  # per-phase transformer load [kW]
    xq = (m2xp @ kvar).reshape(3, n_x, n_t)
    node_p = [x2n @ xp[p] for p in range(3)]  # load at each node [kW]
    node_q = [x2n @ xq[p] for p in range(3)]
    caps = top.capacitors
    if caps is not None and cap_on is not None:
        n_c = len(caps.node)
        c2n = sp.csr_matrix((np.ones(n_c), (caps.node, np.arange(n_c))), shape=(n_nodes, n_c))
        for p in range(3):
            node_q[p] = node_q[p] - c2n @ (cap_on * (caps.kvar * caps.phases[:, p])[:, None])
    flow_p = [dt @ node_p[p] for p in range(3)]  # section through-flow (n_nodes, T) [kW]
    flow_q = [dt @ node_q[p] for p in range(3)]
    head = top.node_parent == 0
    feeder_p = np.stack([flow_p[p][head].sum(axis=0) for p in range(3)])
    feeder_q = np.stack([flow_q[p][head].sum(axis=0) for p in range(3)])
    scale = 1000.0 / top.v_ln_base**2  # kW*ohm -> pu
    node_drop = np.empty((3, n_nodes, n_t))
    for p in range(3):
        sec = sum(kp[:, p, q, None] * flow_p[q] + kq[:, p, q, None] * flow_q[q] for q in range(3))
        node_drop[p] = d @ (sec * scale)  # cumulative drop from the head to each node [pu]
    del flow_p, flow_q

    # Transformer series impedance [pu of rating]; banks are per phase on a third of the rating.
    bank = top.xfmr_phase == "ABC"
    if top.xfmr_r_pu is None:
        r_t = np.where(bank, rng.uniform(0.008, 0.012, n_x), rng.uniform(0.009, 0.016, n_x))
        x_t = np.where(bank, rng.uniform(0.025, 0.045, n_x), rng.uniform(0.012, 0.024, n_x))
    else:
        r_t, x_t = top.xfmr_r_pu, top.xfmr_x_pu
    s_phase = np.where(bank, top.xfmr_kva / 3, top.xfmr_kva)
    xfmr_drop = (r_t[None, :, None] * xp + x_t[None, :, None] * xq) / s_phase[None, :, None]  # [pu]
    # Shared secondary main and own service drop [V]: (R P + X Q) / V, the current per conductor being
    # P / V for single-phase and phase-to-phase services and P / (3 V) for three-phase services.
    nom = top.meter_nominal_v
    v_sec = nom * np.where(top.meter_phase == "ABC", 3.0, 1.0)
    sec_main = xp.sum(axis=0) + 0.3 * xq.sum(axis=0)
    sec_main *= (top.xfmr_sec_ohm * 1000.0)[:, None]
    serv = (kw + np.float32(0.3) * kvar) * (top.meter_service_ohm * 1000.0)[:, None]
    serv += sec_main[mx]
    serv /= v_sec[:, None]
    return FeederVoltages(top, w, node_drop, xfmr_drop, serv.astype(np.float32), feeder_p, feeder_q)


@dataclass
class FeederVoltages:
    """A feeder's drops, waiting for the head voltage; see :func:`feeder_voltages`.

    Attributes
    ----------
    top : FeederTopology
    head_weight : ndarray, shape (n_meters, 3)
        Share of each phase in the meter's voltage [-].
    node_drop : ndarray, shape (3, n_nodes, n_time)
        Drop from the feeder head to each node per phase, regulators aside [pu].
    xfmr_drop : ndarray, shape (3, n_xfmr, n_time)
        Series drop of each transformer per phase [pu].
    service_drop : ndarray, shape (n_meters, n_time), float32
        Secondary main and service drop [V].
    feeder_p, feeder_q : ndarray, shape (3, n_time)
        Per-phase load at the feeder head, capacitors included [kW], [kvar].
    """

    top: FeederTopology
    head_weight: np.ndarray
    node_drop: np.ndarray
    xfmr_drop: np.ndarray
    service_drop: np.ndarray
    feeder_p: np.ndarray
    feeder_q: np.ndarray

    def node_voltage(self, head_pu: np.ndarray, *, interval_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Voltage of every node per phase, line regulators under their own tap control.

        Parameters
        ----------
        head_pu : ndarray, shape (3, n_time)
            Feeder-head voltage per phase [pu].
        interval_s : float
            [s]

        Returns
        -------
        v_node : ndarray, shape (3, n_nodes, n_time)
            [pu]
        reg_tap : ndarray, shape (n_reg, n_time), int
            Tap position of each line regulator at the end of each interval.

        Notes
        -----
        A regulator ``r`` at the sending end of the section into node ``n_r`` on phase ``p`` outputs
        ``a_r(t) V_p(parent(n_r))``, so for every node ``k`` whose nearest regulator upstream on phase
        ``p`` is ``r``: ``V_p(k) = c_r(t) - drop_p(k)`` with ``c_r = a_r V_p(parent(n_r)) +
        drop_p(parent(n_r))``, and ``c = head`` without a regulator. Regulators are solved from the
        head down; the change of the through-current with the ratio is neglected (second order).
        """
        top = self.top
        regs = top.regulators
        anc = _regulator_ancestors(top)
        n_r = 0 if regs is None else len(regs.node)
        c = np.zeros((3, n_r + 1, head_pu.shape[1]))
        c[:, n_r] = head_pu  # index -1: the head
        taps = np.zeros((n_r, head_pu.shape[1]), np.int64)
        for r in np.argsort(regs.node, kind="stable") if n_r else []:
            p, node = regs.phase[r], regs.node[r]
            up = top.node_parent[node]
            v_in = c[p, anc[up, p]] - self.node_drop[p, up]
            ratio, taps[r] = tap_controller(
                v_in,
                set_point_pu=float(regs.set_point_pu[r]),
                bandwidth_pu=float(regs.bandwidth_pu[r]),
                step_pu=regs.step_pu,
                delay_s=float(regs.delay_s[r]),
                interval_s=interval_s,
            )
            c[p, r] = ratio * v_in + self.node_drop[p, up]
        v = np.empty_like(self.node_drop)
        for p in range(3):
            v[p] = c[p, anc[:, p]] - self.node_drop[p]
        return v, taps

    def meter_voltage(self, head_pu: np.ndarray, *, interval_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Meter voltages [V], shape (n_meters, n_time) float32, and line regulator taps."""
        top = self.top
        v_node, taps = self.node_voltage(head_pu, interval_s=interval_s)
        v_x = v_node[:, top.xfmr_node] * top.xfmr_tap[None, :, None] - self.xfmr_drop  # (3, n_x, T) [pu]
        mx = top.meter_xfmr
        w = self.head_weight
        one = w.max(axis=1) == 1.0
        v = np.empty(self.service_drop.shape, np.float64)
        ph = w.argmax(axis=1)
        v[one] = v_x[ph[one], mx[one]]
        multi = np.flatnonzero(~one)
        if len(multi):
            v[multi] = np.einsum("mp,pmt->mt", w[multi], v_x[:, mx[multi]])
        v *= top.meter_nominal_v[:, None]
        v -= self.service_drop
        return v.astype(np.float32), taps
