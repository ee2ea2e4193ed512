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

import numpy as np
import scipy.sparse as sp

from .topology import FeederTopology

__all__ = ["V_LN_MV", "feeder_drops", "substation_bus_voltage"]

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
    zb = Z_BACKBONE * rot
    n = len(top.node_parent)
    kp = np.zeros((n, 3, 3))
    kq = np.zeros((n, 3, 3))
    three = top.node_three_phase
    kp[three] = zb.real[None] * top.node_length_km[three, None, None]
    kq[three] = zb.imag[None] * top.node_length_km[three, None, None]
    for p in range(3):
        single = ~three & top.node_phases[:, p]
        kp[single, p, p] = Z_LATERAL.real * top.node_length_km[single]
        kq[single, p, p] = Z_LATERAL.imag * top.node_length_km[single]
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
    n_m, n_t = kw.shape
    n_x = len(top.xfmr_kva)
    n_nodes = len(top.node_parent)
    w = meter_phase_weights(top.meter_phase)
    mx = top.meter_xfmr
    # (3 * n_x, n_m) sparse: row p * n_x + t sums the phase-p share of transformer t's meters.
    rows, cols = np.nonzero(w.T)
    m2xp = sp.csr_matrix((w.T[rows, cols], (rows * n_x + mx[cols], cols)), shape=(3 * n_x, n_m))
    x2n = sp.csr_matrix((np.ones(n_x), (top.xfmr_node, np.arange(n_x))), shape=(n_nodes, n_x))
    d = _path_matrix(top.node_parent)
    dt_x2n = (d.T @ x2n).tocsr()  # transformer load -> section through-flow
    kp, kq = _section_sensitivity(top)
    xp = (m2xp @ kw).reshape(3, n_x, n_t)  # per-phase transformer load [kW]
    xq = (m2xp @ kvar).reshape(3, n_x, n_t)
    flow_p = [dt_x2n @ xp[p] for p in range(3)]  # section through-flow (n_nodes, T) [kW]
    flow_q = [dt_x2n @ xq[p] for p in range(3)]
    scale = 1000.0 / V_LN_MV**2  # kW*ohm -> pu
    x_node = top.xfmr_node
    at_x = sp.csr_matrix((np.ones(n_x), (np.arange(n_x), x_node)), shape=(n_x, n_nodes)) @ d
    head = top.node_parent == 0
    feeder_p = np.stack([flow_p[p][head].sum(axis=0) for p in range(3)])
    feeder_q = np.stack([flow_q[p][head].sum(axis=0) for p in range(3)])

    # Transformer series impedance [pu of rating]; banks are per phase on a third of the rating.
    bank = top.xfmr_phase == "ABC"
    r_t = np.where(bank, rng.uniform(0.008, 0.012, n_x), rng.uniform(0.009, 0.016, n_x))
    x_t = np.where(bank, rng.uniform(0.025, 0.045, n_x), rng.uniform(0.012, 0.024, n_x))
    s_phase = np.where(bank, top.xfmr_kva / 3, top.xfmr_kva)
    tot = np.empty((3, n_x, n_t), dtype=np.float32)  # drop at each transformer secondary [pu]
    for p in range(3):
        sec = kp[:, p, 0, None] * flow_p[0]
        for q in range(3):
            if q:
                sec += kp[:, p, q, None] * flow_p[q]
            sec += kq[:, p, q, None] * flow_q[q]
        sec *= scale
        tot[p] = at_x @ sec  # MV drop at the transformer's node [pu]
        tot[p] *= top.xfmr_tap[:, None]
        tot[p] += (r_t[:, None] * xp[p] + x_t[:, None] * xq[p]) / s_phase[:, None]
    del flow_p, flow_q
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
    sec_main = xp.sum(axis=0) + 0.3 * xq.sum(axis=0)
    sec_main *= (top.xfmr_sec_ohm * 1000.0)[:, None]
    serv = kvar * np.float32(0.3)
    serv += kw
    serv *= (top.meter_service_ohm * 1000.0).astype(np.float32)[:, None]
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
    n_t = upstream_pu.shape[1]
    peak = load_p.sum(axis=0).max()
    s_rating = max(1.3 * peak, 1000.0) / 3.0
    r, x = 0.005, rng.uniform(0.07, 0.09)
    drop = (r * load_p + x * load_q) / s_rating
    v0 = upstream_pu - drop  # bus voltage at neutral tap, (3, T)
    mean0 = v0.mean(axis=0)
    half = bandwidth_pu / 2
    tap = np.zeros(n_t, dtype=np.int64)
    ratio = np.empty(n_t)
    moved_share = max(0.0, 1.0 - delay_s / interval_s)  # share of the interval on the new tap
    k = int(np.clip(np.round((set_point_pu - mean0[0]) / step_pu), -16, 16))
    for t in range(n_t):
        err = mean0[t] * (1 + k * step_pu) - set_point_pu
        k_new = k
        if abs(err) > half:
            k_new = int(np.clip(k - np.sign(err) * max(1, int(abs(err) // step_pu)), -16, 16))
        ratio[t] = 1 + step_pu * (k + moved_share * (k_new - k))
        tap[t] = k = k_new
    v0 *= ratio[None, :]
    return v0, tap
