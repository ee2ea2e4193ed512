"""Meter-to-transformer verification: does each meter move with its GIS transformer group?

Labelled layer over :mod:`phaseid_hpc.kernels.transformer_mapping` and
:mod:`phaseid_hpc.kernels.transformer_grouping`: it checks the inputs, turns labels into group and phase
indices, calls the kernels step by step and names the results. One call handles one block of whole feeders;
every feeder is scored on its own (candidates never cross a feeder).

Method (per feeder, :func:`_map_feeder`)
----------------------------------------
1. **Signals** (:func:`_feeder_signals`): differenced voltage, per-phase feeder common mode projected out,
   unit-norm rows, float32 (``differenced_signals``); centred voltage and load-current proxy for the level
   check (``level_signals``). Neighbouring transformers on one lateral share the common mode, not the
   residual, so the residual separates them.
2. **Candidates** (:func:`_candidate_space`, :func:`_best_candidates`): each meter's correlation with every
   candidate group's pooled signal, leaving the meter out of its own group. Candidates: same feeder, a group
   serving the meter's phase (the phase result), within ``max_distance_m`` when lat/lon exist. The pools and
   the meter-by-group dot products are kept up to date round by round (``GroupPools``).
3. **Rounds** (:func:`_rounds`, one :func:`_judge_round` each), in Fisher-z units of one standard error
   ``se = 1 / sqrt(n - 6)``:

   * a meter **moves** to transformer ``b`` when ``b`` beats the GIS group by ``flag_margin_se``
     (``weak_gis_margin_se`` when the GIS label is already in doubt: phase mismatch, or no correlation with
     an otherwise coherent GIS group), is significant (``min_corr_se``), clearly beats the runner-up
     (``ambiguity_se``), and the level check (service drop ``V_meter - V_transformer ~ -(R P + X Q) / V``,
     ``level_consistency_pairs``) is no worse than ``level_tolerance`` times the reference. A meter that
     moves with its GIS group as well as the group's other members do never moves (the stray is on the
     other side). A target with one meter must be matched like the feeder's same-transformer pairs
     (``pair_fit_fraction``) (``move_candidates``);
   * a meter **alone on its GIS transformer** has no group to be tested against: from the second round on
     (after strays of multi-meter groups, possibly its lost sibling, have moved) it joins a group of two or
     more only when it fits it as the group's own members do (``singleton_fit_se``), and no worse than the
     feeder's typical same-transformer pair (a group whose members hardly hold together sets no bar), also after the
     runner-up's pool is partialled out (``shares_own_signal``: sharing the lateral is not enough), and
     passes the level check;
   * a meter that does **not move with its GIS group** (own-group z below ``unrelated_se`` while the rest of
     the group is coherent, or split off by the group's Fiedler cut, ``split_off``) and fits no GIS
     transformer is an orphan.

   Moves are applied greedily, strongest first, never two that rely on each other in one round
   (``apply_moves``); pools are rebuilt and everything re-judged, up to ``n_iterations`` rounds, so swapped
   pairs and strays clean up.
4. **New groups** (:func:`_propose_new_groups`): orphans of one phase that move together
   (``orphan_components``), or a lone orphan whose phase differs from its GIS group's, form a transformer
   missing from GIS (``{feeder}-NEW{k:03d}``, numbered by smallest meter id). A lone orphan without that
   keeps its label, with the reason and a low confidence.
5. **Confidence** (:func:`_confidence`): ``Phi(d / sqrt 2)`` with ``d`` the assigned group's Fisher-z lead
   over the best alternative (or over the threshold it would need) in standard errors
   (``assignment_lead``); classes from ``confident_threshold`` and ``suspect_threshold``. A moved meter's
   lead is at most how well the target's members it moves with hold together with the target's other
   usable members (``anchoring_lead``): a meter following true siblings that GIS files under another
   transformer would otherwise carry their wrong label with full confidence (on the shared and generated
   feeders 5 of the 8 wrong transformer corrections of the README's table were such moves). Then the reasons
   (:func:`_reasons`) and the transformer table (:func:`_transformer_rows`).

The ``(n_meters, n_time)`` signals stay in the namespace of ``voltage`` (NumPy, CuPy); per-meter and
per-group tables are NumPy. Cost figures: README and ``benchmarks/transformer_speed.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import contract
from ._compat import array_namespace, to_numpy
from .confidence import confidence_class
from .config import TransformerConfig
from .errors import ContractError
from .kernels import transformer_grouping as tg
from .kernels import transformer_mapping as tk
from .kernels.preprocess import zero_step_share

__all__ = [
    "REASON_TX_AMBIGUOUS",
    "REASON_TX_CONSISTENT",
    "REASON_TX_MOVED",
    "REASON_TX_NEW",
    "REASON_TX_PHASE_MISMATCH",
    "REASON_TX_SINGLETON",
    "REASON_TX_THREE_PHASE_ON_SINGLE",
    "REASON_TX_UNANCHORED",
    "REASON_TX_UNRELATED",
    "map_transformers",
    "recommend_transformers",
    "three_phase_on_single_phase",
]

REASON_TX_CONSISTENT = "Moves With GIS Transformer Group"
REASON_TX_MOVED = "Moves With Another Transformer"
REASON_TX_NEW = "Transformer Missing From GIS (New Group Proposed)"
REASON_TX_UNRELATED = "Does Not Move With GIS Transformer Group"
REASON_TX_SINGLETON = "Alone On GIS Transformer (Checked Against Neighbours Only)"
REASON_TX_PHASE_MISMATCH = "Phase Differs From GIS Transformer Phase"
REASON_TX_AMBIGUOUS = "Ambiguous Between Transformers"
REASON_TX_UNANCHORED = "Moves With Meters That Do Not Move With Their Transformer"
#: GIS files a three-phase service under a transformer it records as single-phase (``n_phases`` 1): the
#: records contradict each other, whatever the voltage says (review list; GIS kept).
REASON_TX_THREE_PHASE_ON_SINGLE = "Three-Phase Service On Single-Phase GIS Transformer"

_TX_COLUMNS = [
    "transformer_id",
    "feeder_id",
    "n_meters_gis",
    "n_meters_inferred",
    "phases",
    "meters_changed",
    "group_coherence",
    "proposed_new",
]


def _phase_column(sub: pd.DataFrame, col: str) -> np.ndarray:
    """Phase letters of a column as an object array, stripped and upper-cased; NaN where missing or empty."""
    if col not in sub:
        return np.full(len(sub), np.nan, dtype=object)
    x = sub[col].astype(object)
    txt = x.where(x.isna(), x.astype(str)).astype("string").str.strip().str.upper()
    return txt.where(txt.notna() & (txt != ""), np.nan).astype(object).to_numpy()


def _letter_bits(letters: frozenset, alphabet) -> int:
    """The letters of a phase label as bits, in the order of ``alphabet`` (``"ABC"``: A 1, B 2, C 4)."""
    return sum(1 << k for k, c in enumerate(alphabet) if c in letters)


def _contract_phase_name(letters) -> str | None:
    """Contract label of a set of phase letters (pairs as ``AB``, ``BC``, ``CA``); ``None`` when empty."""
    key = "".join(sorted(letters))
    return {"AC": "CA"}.get(key, key) or None


def map_transformers(
    voltage: Any,
    meters: pd.DataFrame,
    config: TransformerConfig = TransformerConfig(),  # noqa: B008 (frozen, immutable default)
    *,
    kw: Any | None = None,
    kvar: Any | None = None,
    interval_s: float = 900,
    xp: Any | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Verify every meter's transformer and propose the right one, for a block of whole feeders.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage, NaN where missing. [V]
    meters : DataFrame, rows aligned with ``voltage``
        ``meter_id, feeder_id, transformer_id`` (GIS), ``phase`` (phase-identification result, may be
        None), ``phase_gis``, ``usable`` (bool); optional ``lat, lon`` [deg].
    config : TransformerConfig
    kw, kvar : array, shape (n_meters, n_time), optional
        Meter active / reactive load, NaN where missing. [kW], [kvar]
    interval_s : float
        Sampling interval: the length of the means of a coarse resolution (``config.coarse_aggregate_s``)
        in readings. [s]
    xp : array namespace, optional
        Namespace for the kernels (``numpy``, ``cupy``); default: that of ``voltage``.

    Returns
    -------
    meters_result : DataFrame, index and rows aligned with ``meters``
        ``transformer`` (proposed), ``transformer_confidence`` [-], ``transformer_class``
        (``confident``/``suspect``/``low``/``insufficient_data``), ``transformer_changed`` (bool),
        ``reasons`` (list[str]); ``attrs["diagnostics"]``: per-meter evidence in standard errors (audit only).
    transformers_result : DataFrame, one row per transformer (GIS and proposed), sorted by feeder, id
        ``transformer_id, feeder_id, n_meters_gis, n_meters_inferred, phases, meters_changed,
        group_coherence, proposed_new``.
    """
    _check_inputs(voltage, meters, kw, kvar)
    n = len(meters)
    xp = array_namespace(voltage) if xp is None else xp
    m = meters.reset_index(drop=True)
    out_tx = m["transformer_id"].astype(object).to_numpy(copy=True)
    out_conf = np.zeros(n)
    out_cls = np.array([contract.CLASS_INSUFFICIENT] * n, dtype=object)
    out_reasons: list[list[str]] = [[] for _ in range(n)]
    tx_rows: list[dict[str, Any]] = []
    diagnostics: list[pd.DataFrame] = []
    feeders = m["feeder_id"].astype(str).to_numpy()
    for feeder in sorted(set(feeders)):
        idx = np.flatnonzero(feeders == feeder)
        kw_f, kvar_f = (None if a is None else _rows_of(a, idx) for a in (kw, kvar))
        res = _map_feeder(feeder, m.iloc[idx], xp.asarray(_rows_of(voltage, idx)), kw_f, kvar_f, config,
                          interval_s)
        out_tx[idx], out_conf[idx], out_cls[idx] = res.transformer, res.confidence, res.klass
        for i, r in zip(idx, res.reasons):
            out_reasons[i] = r
        tx_rows += res.transformers
        diagnostics.append(res.diagnostics)
    gis = m["transformer_id"].astype(object).to_numpy()
    meters_result = pd.DataFrame(
        {
            "transformer": out_tx,
            "transformer_confidence": out_conf,
            "transformer_class": out_cls,
            "transformer_changed": out_tx != gis,
            "reasons": out_reasons,
        },
        index=meters.index,
    )
    # per-meter evidence in standard errors (z_*: Fisher-z / se), for audit; not part of the contract
    meters_result.attrs["diagnostics"] = (
        pd.concat(diagnostics, ignore_index=True) if diagnostics else pd.DataFrame()
    )
    tx = pd.DataFrame(tx_rows, columns=_TX_COLUMNS)
    if len(tx):
        tx = tx.sort_values(["feeder_id", "transformer_id"], kind="stable").reset_index(drop=True)
        tx = tx.astype({"n_meters_gis": "int64", "n_meters_inferred": "int64", "meters_changed": "int64"})
    return meters_result, tx


def _check_inputs(voltage: Any, meters: pd.DataFrame, kw: Any, kvar: Any) -> None:
    """Raise :class:`~phaseid_hpc.errors.ContractError` naming the field when the inputs do not line up."""
    missing = [c for c in ("meter_id", "feeder_id", "transformer_id") if c not in meters.columns]
    if missing:
        raise ContractError(f"meters table lacks column(s) {missing} (has {list(meters.columns)})")
    if len(voltage.shape) != 2 or voltage.shape[0] != len(meters):
        raise ContractError(
            f"voltage has shape {tuple(voltage.shape)} but meters has {len(meters)} rows; "
            "expected (n_meters, n_time) aligned with the meters table"
        )
    for name, arr in (("kw", kw), ("kvar", kvar)):
        if arr is not None and tuple(arr.shape) != tuple(voltage.shape):
            raise ContractError(f"{name} has shape {tuple(arr.shape)} but voltage has {tuple(voltage.shape)}")


def _rows_of(x, idx):
    """Rows ``idx`` of ``x``: a view when they are one contiguous run (a whole-feeder block), else a copy."""
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx):
        return x[int(idx[0]) : int(idx[-1]) + 1, ...]
    xp = array_namespace(x)
    return xp.take(x, xp.asarray(idx), axis=0)


# ---------------------------------------------------------------------------------------------------------
# one feeder: the steps of the method
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FeederResult:
    """Outputs of one feeder, rows in the order of the feeder's meters."""

    transformer: np.ndarray  # proposed transformer id (object)
    confidence: np.ndarray  # [-]
    klass: np.ndarray  # confidence class (object)
    reasons: list[list[str]]
    transformers: list[dict[str, Any]]  # rows of the transformer table
    diagnostics: pd.DataFrame


@dataclass(frozen=True)
class _Labels:
    """A feeder's labels as indices: GIS groups and the phase each meter serves."""

    feeder: str
    meter_id: np.ndarray  # (n,) object
    gis: np.ndarray  # (n,) GIS transformer id as str
    groups: np.ndarray  # (n_g,) sorted GIS transformer ids (object)
    gis_index: np.ndarray  # (n,) position of the GIS transformer in ``groups``
    phase_code: np.ndarray  # (n,) 0, 1, 2 for a single phase A, B, C; -1 otherwise
    pmask: np.ndarray  # (n,) phase letters A, B, C as bits 1, 2, 4 (0: unknown)
    letters: np.ndarray  # (n, 3) 1 where the meter serves A, B, C
    letter_bits: np.ndarray  # (n,) every letter of the phase label as a bit (0: unknown)
    codes: np.ndarray  # (n,) index of the meter's phase label in ``phase_sets`` (-1: none)
    phase_sets: list[frozenset]  # letters of each distinct phase label; last: the empty set
    usable: np.ndarray  # (n,) bool, from the ``usable`` column
    lat: np.ndarray | None  # (n,) [deg]
    lon: np.ndarray | None

    @property
    def n_groups(self) -> int:
        return len(self.groups)


@dataclass(frozen=True)
class _Signals:
    """Step 1: the signals of a feeder and the per-meter quantities derived from them."""

    z: Any  # (n, n_time - 1) float32 unit-norm shape signal (array namespace of the voltage)
    vc: Any  # (n, n_time) centred voltage [V]
    ic: Any | None  # (n, n_time) centred load-current proxy [A]
    level_stats: tuple[Any, Any, Any]  # (vc.vc, ic.ic, ic.vc)
    n_valid: np.ndarray  # (n,) valid differences [samples]
    usable: np.ndarray  # (n,) bool: usable and enough samples
    se: np.ndarray  # (n,) standard error of the Fisher z [-]
    zz: np.ndarray  # (n,) ||z_i||^2 (1, or 0 for a flat meter)


@dataclass(frozen=True)
class _CandidateSpace:
    """Step 2, static part: where candidates may be (distance) and the phase blocks of ``S``."""

    distance_penalty: Any | None  # (n, n_g) float32: NaN where too far, else 0 (namespace of the signals)
    row_blocks: list  # [(phase bit or 0, meter rows, z rows)]


@dataclass(frozen=True)
class _Evidence:
    """Step 3: the evidence of one round and the moves it asks for (arrays shape (n,))."""

    best: np.ndarray
    runner_up: np.ndarray
    zb: np.ndarray  # Fisher z of the best candidate (-inf: none)
    z2: np.ndarray  # Fisher z of the runner-up (0: none)
    zo: np.ndarray  # Fisher z with the GIS group's own remaining members (NaN: alone)
    kappa: np.ndarray  # (n_g,) mean Fisher z of each group's members
    kappa_gis_loo: np.ndarray  # mean Fisher z of the GIS group's other members
    phase_mismatch: np.ndarray
    unrelated: np.ndarray  # does not move with its GIS group and does not move
    desired: np.ndarray  # group wanted
    strength: np.ndarray  # order of the moves [std. errors]


@dataclass(frozen=True)
class _Rounds:
    """Result of the rounds: final assignment and pool weights, the last round's evidence and pools."""

    assign: np.ndarray
    weights: np.ndarray
    evidence: _Evidence
    pools: tk.GroupPools


def _map_feeder(
    feeder: str, sub: pd.DataFrame, v: Any, kw: Any, kvar: Any, cfg: TransformerConfig,
    interval_s: float = 900.0,
) -> _FeederResult:
    """Verify the transformers of one feeder (steps 1-5 of the module docstring)."""
    lab = _feeder_labels(feeder, sub)
    sig = _feeder_signals(v, kw, kvar, lab, cfg, interval_s)
    space = _candidate_space(sig, lab, cfg)
    rounds = _rounds(sig, lab, space, cfg)
    ev = rounds.evidence
    # audit evidence of the last round (pools still hold that round's assignment)
    lvl_b, lvl_ref = tk.level_evidence(
        rounds.pools, None, ev.best, lab.gis_index, rounds.pools.assign, rounds.pools.w
    )
    final_id, new_ids = _propose_new_groups(lab, sig, rounds, cfg)
    is_new = np.zeros(len(lab.gis), bool)
    is_new[list(new_ids)] = True
    anchor = _anchoring(lab, sig, rounds, is_new, cfg)
    conf, cls = _confidence(lab, sig, rounds, is_new, anchor, cfg)
    diag = pd.DataFrame(
        {
            "meter_id": sub["meter_id"].to_numpy(),
            "z_gis": ev.zo / sig.se,
            "z_best": ev.zb / sig.se,
            "z_runner_up": ev.z2 / sig.se,
            "best": lab.groups[ev.best],
            "kappa_best": ev.kappa[ev.best] / sig.se,
            "kappa_gis_loo": ev.kappa_gis_loo / sig.se,
            "level_rms_best": lvl_b,
            "level_rms_ref": lvl_ref,
            "phase_mismatch": ev.phase_mismatch,
        }
    )
    return _FeederResult(
        transformer=np.where(sig.usable, final_id, lab.gis.astype(object)),
        confidence=conf,
        klass=cls,
        reasons=_reasons(lab, sig, rounds, is_new, anchor, cfg),
        transformers=_transformer_rows(lab, sig, rounds, final_id, new_ids, is_new),
        diagnostics=diag,
    )


def _feeder_labels(feeder: str, sub: pd.DataFrame) -> _Labels:
    """GIS groups as indices and each meter's phase (inferred where present, else GIS) as codes and bits."""
    gis = sub["transformer_id"].astype(str).to_numpy()
    groups = np.array(sorted(set(gis)), dtype=object)
    ph_inf = _phase_column(sub, "phase")
    ph_gis = _phase_column(sub, "phase_gis")
    phase = np.where(pd.isna(ph_inf), ph_gis, ph_inf)
    codes, uniq = pd.factorize(phase, use_na_sentinel=True)  # NaN/None: -1
    phase_sets = [frozenset(u) for u in uniq] + [frozenset()]  # index -1: no phase
    alphabet = sorted(set().union(*phase_sets))
    pmask = np.array([_letter_bits(ps, "ABC") for ps in phase_sets], dtype=np.int64)[codes]
    lat = lon = None
    if {"lat", "lon"} <= set(sub.columns):
        lat, lon = sub["lat"].to_numpy(dtype=float), sub["lon"].to_numpy(dtype=float)
    return _Labels(
        feeder=feeder,
        meter_id=sub["meter_id"].astype(str).to_numpy(),
        gis=gis,
        groups=groups,
        gis_index=np.searchsorted(groups, gis),
        phase_code=np.array([{"A": 0, "B": 1, "C": 2}.get(u, -1) for u in uniq] + [-1], dtype=np.int64)[
            codes
        ],
        pmask=pmask,
        letters=(pmask[:, None] >> np.arange(3)[None, :]) & 1,
        letter_bits=np.array([_letter_bits(ps, alphabet) for ps in phase_sets], dtype=np.int64)[codes],
        codes=codes,
        phase_sets=phase_sets,
        usable=sub["usable"].to_numpy(dtype=bool) if "usable" in sub else np.ones(len(sub), bool),
        lat=lat,
        lon=lon,
    )


def _coarse_means(v: Any, interval_s: float, cfg: TransformerConfig) -> tuple[Any, int]:
    """Step 1a: the voltage the shape signals are taken from, and how many readings each of its samples
    averages: ``v`` itself (1), or NaN-aware means over ``cfg.coarse_aggregate_s`` where the median meter's
    share of exact-zero differences exceeds ``cfg.coarse_zero_share`` (a resolution that swallows most
    steps: averaging brings back what the meters of one transformer share)."""
    factor = round(cfg.coarse_aggregate_s / interval_s) if interval_s > 0 else 1
    n, n_t = v.shape
    if factor < 2 or n_t // factor < 3 or n == 0:
        return v, 1
    if not float(np.median(to_numpy(zero_step_share(v)))) > cfg.coarse_zero_share:
        return v, 1
    from .kernels.pt_deviation import aggregate_means

    return aggregate_means(v, factor), factor


def _feeder_signals(v: Any, kw: Any, kvar: Any, lab: _Labels, cfg: TransformerConfig,
                    interval_s: float = 900.0) -> _Signals:
    """Step 1: shape and level signals; every GIS transformer counts once in its phase's common mode."""
    xp = array_namespace(v)
    gsize = tk.group_sum(lab.gis_index, lab.n_groups).astype(float)
    v_shape, factor = _coarse_means(v, interval_s, cfg)
    # float32 signals: correlations good to ~1e-6
    z, n_valid = tg.differenced_signals(
        v_shape, xp.asarray(lab.phase_code), 3, weights=xp.asarray(1.0 / gsize[lab.gis_index]),
        dtype=xp.float32,
    )
    n_valid = to_numpy(n_valid)
    vc, ic, level_stats = tg.level_signals(
        v,
        kw,
        None if kw is None else kvar,
        x_over_r=cfg.service_x_over_r,
        dtype=xp.float32,
    )
    return _Signals(
        z=z,
        vc=vc,
        ic=ic,
        level_stats=level_stats,
        n_valid=n_valid,
        usable=lab.usable & (n_valid * factor >= cfg.min_samples),  # min_samples counts readings
        se=tk.fisher_se(n_valid),
        zz=to_numpy(xp.vecdot(z, z, axis=-1)).astype(float),
    )


def _candidate_space(sig: _Signals, lab: _Labels, cfg: TransformerConfig) -> _CandidateSpace:
    """Step 2, static part: the distance mask (GIS group centres) and the phase blocks of ``S``.

    A meter of unknown phase is in every block; ``S`` is computed on (phase block rows) x (groups serving
    that phase) only.
    """
    xp = array_namespace(sig.z)
    pen = None
    if lab.lat is not None:
        far = tk.far_from_groups(lab.lat, lab.lon, lab.gis_index, lab.n_groups, cfg.max_distance_m)
        if far is not None and far.any():
            pen = xp.asarray(np.where(far, np.float32(np.nan), np.float32(0.0)))
    if not cfg.use_phase:
        return _CandidateSpace(pen, [(0, np.arange(len(lab.gis)), sig.z)])
    blocks = []
    for k in range(3):
        rows = np.flatnonzero(((lab.pmask >> k) & 1 == 1) | (lab.pmask == 0))
        if len(rows):
            blocks.append((1 << k, rows, xp.take(sig.z, xp.asarray(rows), axis=0)))
    return _CandidateSpace(pen, blocks)


def _rounds(sig: _Signals, lab: _Labels, space: _CandidateSpace, cfg: TransformerConfig) -> _Rounds:
    """Step 3: judge, move, rebuild the pools; until nothing changes (at least two rounds)."""
    pools = tk.GroupPools(sig.z, sig.vc, lab.n_groups, space.row_blocks, ic=sig.ic, row_stats=sig.level_stats)
    pools_gis = tk.GroupPools(sig.z, None, lab.n_groups, [])
    assign = lab.gis_index.copy()
    # meters of a sub-group that does not move with the rest of its GIS group start outside the pools
    cut = tk.split_off(
        sig.z,
        lab.gis_index,
        sig.usable,
        sig.n_valid,
        unrelated_se=cfg.unrelated_se,
        min_corr_se=cfg.min_corr_se,
    )
    w = sig.usable.astype(float) * ~cut
    for it in range(max(cfg.n_iterations, 2)):
        ev = _judge_round(it, assign, w, pools, pools_gis, sig, lab, space, cfg)
        new_assign = tk.apply_moves(assign, ev.desired, ev.strength)
        new_w = np.where(ev.unrelated, 0.0, sig.usable.astype(float))
        done = it > 0 and np.array_equal(new_assign, assign) and np.array_equal(new_w, w)
        assign, w = new_assign, new_w
        if done:
            break
    return _Rounds(assign, w, ev, pools)


def _judge_round(
    it: int,
    assign: np.ndarray,
    w: np.ndarray,
    pools: tk.GroupPools,
    pools_gis: tk.GroupPools,
    sig: _Signals,
    lab: _Labels,
    space: _CandidateSpace,
    cfg: TransformerConfig,
) -> _Evidence:
    """One round: evidence against the current and GIS groups, the move rules, the level check."""
    n_g, se, o = lab.n_groups, sig.se, lab.gis_index
    gmask = tk.group_phase_mask(lab.letters, assign, w, n_g)
    pools.update(assign, w, gmask)
    corr_own, zc_own = tk.loo_fisher_z(pools.own, pools.pn2[assign], w, sig.zz)
    kappa, _, _ = tk.group_mean(zc_own, assign, (w > 0) & np.isfinite(zc_own), n_g)
    best, zb, runner_up, z2 = _best_candidates(corr_own, assign, gmask, pools, sig, lab, space, cfg)
    zo, kappa_o_loo = _gis_evidence(it, assign, w, gmask, pools, pools_gis, sig, lab)
    phase_mis = tk.phase_disjoint(lab.pmask, gmask[o])
    n_members = tk.group_sum(assign[w > 0], n_g)
    pair_ref = tk.pair_reference(zc_own / se, assign, w, n_g)
    mc = tk.move_candidates(
        zb=zb,
        z2=z2,
        zo=zo,
        se=se,
        kappa_best=kappa[best],
        kappa_gis_loo=kappa_o_loo,
        phase_mismatch=phase_mis,
        lone_target=n_members[best] == 1,
        pair_reference_se=pair_ref * cfg.pair_fit_fraction,
        min_corr_se=cfg.min_corr_se,
        unrelated_se=cfg.unrelated_se,
        ambiguity_se=cfg.ambiguity_se,
        flag_margin_se=cfg.flag_margin_se,
        weak_gis_margin_se=cfg.weak_gis_margin_se,
        singleton_fit_se=cfg.singleton_fit_se,
        fit_floor_se=pair_ref,
    )
    # level check (service drop), only where it can decide a move
    level_ok = np.ones(len(assign), bool)
    need = np.flatnonzero(sig.usable & (mc.multi | mc.single & (it > 0)))
    if len(need):
        lvl_b, lvl_ref = tk.level_evidence(pools, need, best, o, assign, w)
        level_ok[need] = tk.level_consistent(lvl_b, lvl_ref, cfg.level_tolerance)
    move_multi, move_single = mc.multi & level_ok, mc.single & level_ok
    # a meter alone on its GIS transformer may only move once the strays of multi-meter groups have moved
    # (its lost sibling may be one of them and come back): never in the first round; it must share the
    # target's own signal, not only the lateral's
    if it > 0 and move_single.any():
        move_single &= tk.shares_own_signal(
            sig.z, np.flatnonzero(move_single), best, runner_up, assign, w, se,
            min_corr_se=cfg.min_corr_se, singleton_fit_se=cfg.singleton_fit_se,
        )  # fmt: skip
    move = sig.usable & (move_multi | (move_single & (it > 0)))
    unrelated = sig.usable & ~move
    unrelated &= tk.unrelated_to_gis(
        zo, kappa_o_loo, se, unrelated_se=cfg.unrelated_se, min_corr_se=cfg.min_corr_se
    )
    return _Evidence(
        best=best,
        runner_up=runner_up,
        zb=zb,
        z2=z2,
        zo=zo,
        kappa=kappa,
        kappa_gis_loo=kappa_o_loo,
        phase_mismatch=phase_mis,
        unrelated=unrelated,
        desired=np.where(move, best, lab.gis_index),
        strength=mc.strength,
    )


def _best_candidates(corr_own, assign, gmask, pools, sig, lab, space, cfg):
    """Best and runner-up candidate of every meter and their Fisher z (``-inf`` / 0 where none).

    The Fisher z is monotone, so the best two are found on the correlations; the own group's entry is its
    leave-one-out correlation, and it is no candidate where the meter's phase does not fit the group's.
    """
    xp = array_namespace(sig.z)
    excluded = None
    if cfg.use_phase:
        excluded = xp.asarray(tk.phase_disjoint(lab.pmask, gmask[assign]))
    alt = tk.candidate_correlations(
        pools.s, xp.asarray(pools.pn2), xp.asarray(corr_own), xp.asarray(assign), xp.asarray(lab.gis_index),
        xp.asarray(sig.zz), distance_penalty=space.distance_penalty, own_excluded=excluded,
    )  # fmt: skip
    best, cb, runner_up, c2v = (to_numpy(a) for a in tk.best_two(alt))
    return best, tk.fisher_z_or(cb, -np.inf), runner_up, tk.fisher_z_or(c2v, 0.0)


def _gis_evidence(it, assign, w, gmask, pools, pools_gis, sig, lab):
    """Fisher z of each meter with its GIS group's own remaining members, and the others' mean.

    Meters moved in from elsewhere shape the target pools, not this test.
    """
    o = lab.gis_index
    w_gis = w * (assign == o)
    pools_gis.update(o, w_gis, gmask, same_as=pools if it == 0 else None)
    _, zo = tk.loo_fisher_z(pools_gis.own, pools_gis.pn2[o], w_gis, sig.zz)
    kappa_o_loo = tk.leave_one_out_group_mean(zo, o, (w_gis > 0) & np.isfinite(zo), lab.n_groups)
    return zo, kappa_o_loo


def _propose_new_groups(lab: _Labels, sig: _Signals, rounds: _Rounds, cfg: TransformerConfig):
    """Step 4: orphans that move together (or a lone orphan of another phase) found a new group.

    Returns
    -------
    final_id : ndarray of object, shape (n,)
        Final transformer of every meter (GIS ids, or ``{feeder}-NEW{k:03d}``).
    new_ids : dict of int to str
        Meter position to the new group it founds.
    """
    xp = array_namespace(sig.z)
    ev = rounds.evidence
    final_id = lab.groups[rounds.assign].astype(object)
    new_ids: dict[int, str] = {}
    oi = np.flatnonzero(ev.unrelated & cfg.propose_new_groups)
    if not len(oi):
        return final_id, new_ids
    corr = to_numpy(tg.pairwise_correlations(xp.take(sig.z, xp.asarray(oi), axis=0)))
    comp = tk.orphan_components(corr, sig.se[oi], lab.letter_bits[oi], min_corr_se=cfg.min_corr_se)
    # a lone orphan has only negative evidence (it does not move with its GIS group; a weak meter may
    # not either): it founds a new group only when its phase also differs from the GIS group's
    keep = [
        c for c in range(comp.max() + 1) if (comp == c).sum() >= 2 or ev.phase_mismatch[oi[comp == c]].all()
    ]
    first = {c: min(lab.meter_id[oi[comp == c]]) for c in keep}
    for k, c in enumerate(sorted(keep, key=lambda c: first[c]), start=1):
        tid = f"{lab.feeder}-NEW{k:03d}"
        for j in oi[comp == c]:
            final_id[j] = tid
            new_ids[j] = tid
    return final_id, new_ids


def _anchoring(lab: _Labels, sig: _Signals, rounds: _Rounds, is_new: np.ndarray, cfg: TransformerConfig):
    """Step 5a: lead of each moved meter's target holding together with the meters it follows (else inf)."""
    out = np.full(len(lab.gis), np.inf)
    moved = np.flatnonzero((rounds.assign != lab.gis_index) & ~is_new & sig.usable)
    if len(moved):
        out[moved] = tk.anchoring_lead(
            sig.z, moved, rounds.assign, sig.usable, sig.se,
            unrelated_se=cfg.unrelated_se, min_corr_se=cfg.min_corr_se, ratio=cfg.anchor_ratio,
        )  # fmt: skip
    return out


def _confidence(
    lab: _Labels, sig: _Signals, rounds: _Rounds, is_new: np.ndarray, anchor: np.ndarray, cfg: TransformerConfig
):
    """Step 5: confidence ``Phi(d / sqrt 2)`` of the lead ``d`` and its class (0 / insufficient if unusable)."""
    ev = rounds.evidence
    d = tk.assignment_lead(
        is_new=is_new,
        moved=rounds.assign != lab.gis_index,
        zb=ev.zb,
        z2=ev.z2,
        zo=ev.zo,
        best=ev.best,
        assign=rounds.assign,
        kappa=ev.kappa,
        se=sig.se,
        unrelated_se=cfg.unrelated_se,
        min_corr_se=cfg.min_corr_se,
        singleton_fit_se=cfg.singleton_fit_se,
    )
    d = np.minimum(np.asarray(to_numpy(d), dtype=np.float64), anchor)
    conf = tk.lead_confidence(d)
    cls = confidence_class(
        conf, confident_threshold=cfg.confident_threshold, suspect_threshold=cfg.suspect_threshold
    )
    conf[~sig.usable] = 0.0
    cls[~sig.usable] = contract.CLASS_INSUFFICIENT
    return conf, cls


def _reasons(
    lab: _Labels, sig: _Signals, rounds: _Rounds, is_new: np.ndarray, anchor: np.ndarray, cfg: TransformerConfig
):
    """Reason codes of every meter (a meter that moves with its GIS group has none)."""
    ev, se = rounds.evidence, sig.se
    moved = rounds.assign != lab.gis_index
    has_own = np.isfinite(ev.zo)
    unrel = has_own & (ev.zo < cfg.unrelated_se * se)
    sig_b = np.isfinite(ev.zb) & (ev.zb > cfg.min_corr_se * se)
    ambig = has_own & ~unrel & sig_b & (ev.zb >= ev.zo)
    out: list[list[str]] = []
    for i in range(len(moved)):
        if not sig.usable[i]:
            out.append([contract.REASON_INSUFFICIENT_DATA])
            continue
        reasons = [REASON_TX_PHASE_MISMATCH] if ev.phase_mismatch[i] else []
        if is_new[i]:
            reasons += [REASON_TX_UNRELATED, REASON_TX_NEW]
        elif moved[i]:
            reasons.append(REASON_TX_MOVED)
            if anchor[i] < 0:
                reasons.append(REASON_TX_UNANCHORED)
        elif has_own[i]:
            # REASON_TX_CONSISTENT stays exported for readers of older outputs
            if unrel[i]:
                reasons.append(REASON_TX_UNRELATED)
            elif ambig[i]:
                reasons.append(REASON_TX_AMBIGUOUS)
        else:
            reasons.append(REASON_TX_SINGLETON)
        out.append(reasons)
    return out


def _transformer_rows(lab, sig, rounds, final_id, new_ids, is_new) -> list[dict[str, Any]]:
    """Rows of the transformer table: counts, phases and coherence of every GIS and proposed transformer.

    Coherence of the final groups: the last round's pools updated to the final membership (GIS ids), and
    the proposed new groups on their own.
    """
    n_g, assign, usable = lab.n_groups, rounds.assign, sig.usable
    w_fin = (usable & ~is_new).astype(float)
    rounds.pools.update(assign, w_fin, None, dots=False)
    _, zc_fin = tk.loo_fisher_z(rounds.pools.own, rounds.pools.pn2[assign], w_fin, sig.zz)
    mean, _, _ = tk.group_mean(zc_fin, assign, (w_fin > 0) & np.isfinite(zc_fin), n_g)
    coherence = dict(zip(lab.groups, np.tanh(mean).tolist()))
    if is_new.any():
        rows = np.flatnonzero(is_new)
        ids = np.array(sorted(set(final_id[rows])), dtype=object)
        gi = np.searchsorted(ids, final_id[rows])
        xp = array_namespace(sig.z)
        zs = xp.take(sig.z, xp.asarray(rows), axis=0)
        coherence.update(zip(ids, tk.final_coherence(zs, gi, len(ids), usable[rows]).tolist()))
    all_ids = np.array(sorted(set(lab.groups) | set(new_ids.values())), dtype=object)
    n_all = len(all_ids)
    g_ix = np.searchsorted(all_ids, lab.gis.astype(object))
    f_ix = np.searchsorted(all_ids, np.asarray(final_id, dtype=object))
    changed = f_ix != g_ix
    inferred = usable | ~changed  # an unusable meter counts where GIS has it (its label is kept)
    n_gis = tk.group_sum(g_ix, n_all)
    n_inf = tk.group_sum(f_ix[inferred], n_all)
    n_changed = tk.group_sum(g_ix[changed], n_all) + tk.group_sum(f_ix[changed & inferred], n_all)
    letters: list[set] = [set() for _ in range(n_all)]
    for g_, c_ in set(zip(f_ix[inferred].tolist(), lab.codes[inferred].tolist())):
        letters[g_] |= lab.phase_sets[c_]
    gis_set = set(lab.groups)
    return [
        {
            "transformer_id": tid,
            "feeder_id": lab.feeder,
            "n_meters_gis": int(n_gis[k]),
            "n_meters_inferred": int(n_inf[k]),
            "phases": _contract_phase_name(sorted(letters[k])),
            "meters_changed": int(n_changed[k]),
            "group_coherence": coherence.get(tid, np.nan),
            "proposed_new": tid not in gis_set,
        }
        for k, tid in enumerate(all_ids)
    ]


def recommend_transformers(
    meters: pd.DataFrame, inferred: Any, transformer_class: Any, config: TransformerConfig
) -> np.ndarray:
    """The decision policy for transformers: the GIS label stays unless the evidence is confident.

    Parameters
    ----------
    meters : DataFrame
        ``feeder_id``, ``transformer_id`` (GIS) per meter.
    inferred : array of str, shape (n_meters,)
        Inferred transformer per meter (``map_transformers(...)["transformer"]``).
    transformer_class : array of str, shape (n_meters,)
        Class of that inference.
    config : TransformerConfig
        ``min_sibling_share``: feeders where fewer meters than this share a GIS transformer with another
        meter get no transformer corrections at all; ``correct_three_phase``: whether a three-phase
        service (GIS or inferred phase ``ABC``, or service type ``3ph...``) may be moved.

    Returns
    -------
    ndarray of object, shape (n_meters,)
        The recommended transformer: ``inferred`` where it is ``confident``, on a feeder with siblings, and
        a transformer GIS knows on that feeder (a proposed new transformer goes to the review list), else
        the GIS transformer. Three-phase services keep the GIS transformer unless
        ``config.correct_three_phase`` (their change goes to the review list): a three-phase meter's
        voltage follows every three-phase bank of its line alike, and on the physics-based ckt7 feeder 21%
        of their confident moves named the wrong bank (7 of 33 over four conditions; single-phase: 0 of 47).
        For the same reason a single-phase meter does not join a transformer whose other meters are all
        three-phase services (on the generated feeders the one such confident move was wrong). Moves both
        ways between two transformers that outnumber the meters staying on them (:func:`_ambiguous_swaps`)
        go to the review list too.
    """
    gis = meters["transformer_id"].astype(object).to_numpy()
    feeder = meters["feeder_id"].astype(str).to_numpy()
    size = meters.groupby(["feeder_id", "transformer_id"], sort=False)["transformer_id"].transform("size")
    has_sibling = pd.Series(size.to_numpy() >= 2, index=meters.index)
    share = has_sibling.groupby(feeder).transform("mean").to_numpy()
    inferred = np.asarray(inferred, dtype=object)
    take = (np.asarray(transformer_class, dtype=object) == contract.CLASS_CONFIDENT) & pd.notna(inferred)
    take &= share >= config.min_sibling_share
    if not config.correct_three_phase:
        three = _three_phase_services(meters, ("phase_gis", "phase"))
        take &= ~three
        # nor may a single-phase meter join a transformer whose other meters are all three-phase services
        inf_key = pd.Series(list(zip(feeder, inferred.astype(str))))
        others = inf_key.map(inf_key.value_counts()).to_numpy() - 1
        others_three = inf_key.map(inf_key[three].value_counts()).fillna(0).to_numpy()  # i is not one
        take &= ~(~three & (others >= 1) & (others_three == others))
    # a transformer missing from GIS is a field survey item, not a correction GIS can take: review list
    known = set(zip(feeder, gis.astype(str)))
    take &= np.array([(f, str(t)) in known for f, t in zip(feeder, inferred)], dtype=bool)
    take &= ~_ambiguous_swaps(feeder, gis, np.where(take, inferred, gis))
    return np.where(take, inferred, gis)


def _three_phase_services(meters: pd.DataFrame, phase_columns: tuple[str, ...]) -> np.ndarray:
    """Meters that are three-phase services: phase ``ABC`` in any of ``phase_columns``, or service type
    ``3ph...``."""
    three = np.zeros(len(meters), dtype=bool)
    for col in phase_columns:
        if col in meters:
            three |= meters[col].astype(object).to_numpy() == contract.THREE_PHASE
    if "service_type" in meters:
        st = pd.Series(meters["service_type"].to_numpy(dtype=object), dtype=object)
        three |= st.where(st.map(type) == str, "").str.lower().str.startswith("3ph").to_numpy(dtype=bool)
    return three


def three_phase_on_single_phase(meters: pd.DataFrame, transformers: pd.DataFrame | None) -> np.ndarray:
    """Three-phase services that GIS files under a transformer it records as single-phase.

    A three-phase service needs a three-phase bank, so such a record pair is wrong on one side whatever the
    voltage shows: on the physics-based ckt7 feeder every one of the 14 such meters had a wrong GIS
    transformer (14 of its 33 wrong transformer labels; 2 other three-phase services were misfiled on
    three-phase banks). Voltage cannot name the right bank with the confidence a correction needs (a
    three-phase meter follows every bank of its line alike: the most correlated bank was right for 8 of the
    14), so these meters go to the review list with the reason, and GIS is kept.

    Parameters
    ----------
    meters : DataFrame
        ``feeder_id``, ``transformer_id`` (GIS), ``phase_gis`` and optional ``service_type`` per meter
        (a three-phase service: GIS phase ``ABC`` or service type ``3ph...``).
    transformers : DataFrame or None
        The GIS transformer table (``transformer_id``, ``feeder_id``, ``n_phases``); None or without
        ``n_phases``: nothing is flagged.

    Returns
    -------
    ndarray of bool, shape (n_meters,)
        True for a three-phase service whose GIS transformer has ``n_phases == 1``.
    """
    n = len(meters)
    if transformers is None or not len(transformers) or "n_phases" not in transformers or n == 0:
        return np.zeros(n, dtype=bool)
    three = _three_phase_services(meters, ("phase_gis",))
    n_phases = pd.to_numeric(transformers["n_phases"], errors="coerce").to_numpy(dtype=np.float64)
    tx = transformers["transformer_id"].astype(str).to_numpy()
    if "feeder_id" in transformers:
        key = pd.Index(list(zip(transformers["feeder_id"].astype(str).to_numpy(), tx)))
        mkey = pd.Index(list(zip(meters["feeder_id"].astype(str).to_numpy(),
                                 meters["transformer_id"].astype(str).to_numpy())))
    else:
        key, mkey = pd.Index(tx), pd.Index(meters["transformer_id"].astype(str).to_numpy())
    first = ~key.duplicated()  # a transformer listed twice: its first row
    pos = key[first].get_indexer(mkey)
    n_phases = n_phases[first]
    single = np.zeros(n, dtype=bool)
    single[pos >= 0] = n_phases[pos[pos >= 0]] == 1
    return three & single


def _ambiguous_swaps(feeder: np.ndarray, gis: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Moves that are one side of a swap no voltage can orient: True for each meter so moved.

    Where meters move from GIS transformer A to B and others from B to A, the moves pair each mover with
    the meters that stay on the other transformer. If the movers are at least as many as those that stay
    on A and B together, moving the stayers instead explains the data with no more changes (two meters
    each misfiled on the other's two-meter transformer: which pair keeps which transformer id is a coin
    flip to the voltage). Such moves go to the review list. On 70 runs (generated seeds 0-4 and the shared
    feeders, 7 and 14 days) this held two wrong moves (`late_clocks`, fifth realisation, 7 days) and the
    same two moves, right, at 14 days; no other.
    """
    moved = rec.astype(str) != gis.astype(str)
    held = np.zeros(gis.size, dtype=bool)
    if not moved.any():
        return held
    src = pd.Series(feeder.astype(str)) + "|" + pd.Series(gis.astype(str))
    dst = pd.Series(feeder.astype(str)) + "|" + pd.Series(rec.astype(str))
    stay = src[~moved].value_counts()
    flows = (src[moved] + "\x00" + dst[moved]).value_counts()
    for i in np.flatnonzero(moved):
        a, b = src.iloc[i], dst.iloc[i]
        back = flows.get(b + "\x00" + a, 0)
        if back and flows.get(a + "\x00" + b, 0) + back >= stay.get(a, 0) + stay.get(b, 0):
            held[i] = True
    return held
