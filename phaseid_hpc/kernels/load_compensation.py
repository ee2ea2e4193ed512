"""Load compensation: the part of a meter's voltage that its own load and its transformer's load explain.

A meter's voltage is its phase's primary voltage less the drop across its transformer (driven by the
summed load of every meter on it) and across its service drop (its own load). Phase identification wants
the primary part: it is what meters of one phase share along a lateral, while the transformer drop is
private to one transformer and hides its phase where its load swings are large (a transformer of a dozen
customers, a service with an electric vehicle, PV). Both drops are linear in load to first order::

    v_i(t) / v_nom = p(t) + a_i kw_i(t) + c_i kw_siblings(t) + noise

with ``a_i, c_i <= 0`` [pu/kW]. Fitting ``a, c`` on the meter's voltage alone would also absorb the primary
drop that the transformer's own load causes upstream (on a lateral where one transformer carries much of
the load, that is the phase signal itself: EPRI M1). The coefficients are therefore fitted on the meter's
differenced voltage *less the mean of its most similar meters on other transformers* (which share the
primary voltage, not the transformer), then applied to the meter's own voltage.

All functions take ``(n_meters, n_time)`` arrays (NaN where missing) of any array-API namespace.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._compat import array_namespace

__all__ = ["compensated_differences", "fit_load_coefficients", "load_drop", "neighbour_mean", "sibling_load"]


def sibling_load(kw: Any, group: Any) -> tuple[Any, Any]:
    """Each meter's load with gaps filled, and the summed load of the other meters of its group.

    Parameters
    ----------
    kw : array, shape (n_meters, n_time)
        Active power, NaN where missing. [kW]
    group : array of int, shape (n_meters,)
        Group code per meter (its transformer); codes need not be contiguous.

    Returns
    -------
    own : array, shape (n_meters, n_time)
        ``kw`` with missing samples replaced by the row's mean (0 for a row with none). [kW]
    siblings : array, shape (n_meters, n_time)
        Sum of ``own`` over the other meters of the same group (0 for a meter alone). [kW]
    """
    xp = array_namespace(kw)
    kw = xp.asarray(kw, dtype=xp.float64)
    obs = ~xp.isnan(kw)
    k0 = xp.where(obs, kw, 0.0)
    n_obs = xp.sum(xp.astype(obs, xp.float64), axis=1)
    mean = xp.sum(k0, axis=1) / xp.where(n_obs > 0, n_obs, 1.0)
    own = xp.where(obs, kw, mean[:, None])
    g = np.asarray(group).astype(np.int64)
    if g.size == 0:
        return own, xp.zeros_like(own)
    if isinstance(own, np.ndarray):  # one sparse product: group totals, no sorted copy
        from scipy import sparse

        code, g = np.unique(g, return_inverse=True)
        member = sparse.csr_matrix((np.ones(g.size), g, np.arange(g.size + 1)), shape=(g.size, code.size))
        return own, np.asarray(member @ (member.T @ own)) - own
    order = np.argsort(g, kind="stable")
    gs = g[order]
    start = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
    stop = np.r_[start[1:], gs.size]
    csum = xp.cumulative_sum(xp.take(own, xp.asarray(order), axis=0), axis=0, include_initial=True)
    totals = xp.take(csum, xp.asarray(stop), axis=0) - xp.take(csum, xp.asarray(start), axis=0)
    slot = np.empty(g.size, dtype=np.int64)
    slot[order] = np.repeat(np.arange(start.size), stop - start)
    return own, xp.take(totals, xp.asarray(slot), axis=0) - own


def neighbour_mean(x: Any, index: Any, weights: Any | None = None) -> Any:
    """Mean over each row's neighbour rows, NaN-aware.

    Parameters
    ----------
    x : array, shape (n_rows, n_samples)
        Signals, NaN where missing.
    index : array of int, shape (n_meters, k)
        Rows of ``x`` to average for each meter.
    weights : array, shape (n_meters, k), optional
        1 for a neighbour, 0 for padding (default: all 1).

    Returns
    -------
    array, shape (n_meters, n_samples)
        The mean of the observed neighbour samples; NaN where none is observed.
    """
    xp = array_namespace(x)
    idx = xp.asarray(index)
    w = xp.ones(idx.shape, dtype=x.dtype) if weights is None else xp.asarray(weights, dtype=x.dtype)
    return _mean_of_filled(xp, *_filled(xp, x), idx, w)


def _filled(xp: Any, x: Any) -> tuple[Any, Any]:
    """``x`` with NaN as 0, and its observed mask as float32 (counts of it are small integers: exact)."""
    obs = ~xp.isnan(x)
    return xp.where(obs, x, 0.0), xp.astype(obs, xp.float32)


def _mean_of_filled(xp: Any, x0: Any, seen: Any, index: Any, weights: Any) -> Any:
    """:func:`neighbour_mean` from :func:`_filled`'s arrays (rows ``index`` of them, ``weights`` 0/1)."""
    from .neighbours import neighbour_sums

    acc = neighbour_sums(x0, index, weights)
    cnt = xp.astype(neighbour_sums(seen, index, weights), x0.dtype)
    return xp.where(cnt > 0, acc / xp.where(cnt > 0, cnt, 1.0), xp.nan)


def fit_load_coefficients(dv: Any, d_own: Any, d_siblings: Any, min_samples: int = 48) -> tuple[Any, Any]:
    """Per-meter least squares of a voltage change on the changes of its own and its siblings' load.

    Solves ``dv ~ a d_own + c d_siblings`` row by row over the samples where all three are observed,
    with the physical sign (more load, less voltage): where the joint fit gives a positive coefficient,
    the other regressor is fitted alone; a coefficient that stays positive is 0.

    Parameters
    ----------
    dv : array, shape (n_meters, n_samples)
        Voltage changes to explain, NaN where missing (e.g. the meter's per-unit differences less its
        neighbours'). [pu]
    d_own, d_siblings : array, shape (n_meters, n_samples)
        Changes of the meter's own load and of its siblings' summed load, NaN where missing. [kW]
    min_samples : int
        Rows with fewer jointly observed samples get ``a = c = 0``. [samples]

    Returns
    -------
    a, c : array, shape (n_meters,)
        Sensitivity of the voltage to the meter's own load and to its siblings' load, <= 0. [pu/kW]
    """
    xp = array_namespace(dv)
    obs = ~(xp.isnan(dv) | xp.isnan(d_own) | xp.isnan(d_siblings))
    y = xp.where(obs, dv, 0.0)
    p = xp.where(obs, d_own, 0.0)
    o = xp.where(obs, d_siblings, 0.0)
    n = xp.sum(xp.astype(obs, xp.float64), axis=1)
    spp, soo, spo = xp.vecdot(p, p, axis=-1), xp.vecdot(o, o, axis=-1), xp.vecdot(p, o, axis=-1)
    spy, soy = xp.vecdot(p, y, axis=-1), xp.vecdot(o, y, axis=-1)
    det = spp * soo - spo * spo
    joint = det > 1e-9 * spp * soo
    safe_det = xp.where(joint, det, 1.0)
    a_joint = (soo * spy - spo * soy) / safe_det
    c_joint = (spp * soy - spo * spy) / safe_det
    a_alone = xp.minimum(spy / xp.where(spp > 0, spp, 1.0), 0.0)
    c_alone = xp.minimum(soy / xp.where(soo > 0, soo, 1.0), 0.0)
    both = joint & (a_joint <= 0) & (c_joint <= 0)
    # the joint fit's sign is wrong for one of them (or the regressors are collinear): the other alone
    use_a = ~both & ((~joint) | (c_joint > 0))
    a = xp.where(both, a_joint, xp.where(use_a, a_alone, 0.0))
    c = xp.where(both, c_joint, xp.where(use_a | ~joint, 0.0, c_alone))
    enough = n >= min_samples
    return xp.where(enough, a, 0.0), xp.where(enough, c, 0.0)


def load_drop(own: Any, siblings: Any, a: Any, c: Any) -> Any:
    """The per-unit voltage change that a meter's own load and its siblings' load explain.

    Parameters
    ----------
    own, siblings : array, shape (n_meters, n_time)
        Loads from :func:`sibling_load` (gaps filled). [kW]
    a, c : array, shape (n_meters,)
        Coefficients from :func:`fit_load_coefficients`. [pu/kW]

    Returns
    -------
    array, shape (n_meters, n_time)
        ``a own + c siblings`` (<= 0 for loads >= 0); subtracted from the per-unit voltage, it leaves the
        voltage with those drops added back (the ``less`` of
        :func:`~phaseid_hpc.kernels.preprocess.standardized_differences`). [pu]
    """
    drop = a[:, None] * own
    drop += c[:, None] * siblings
    return drop


def compensated_differences(voltage: Any, nominal_v: Any, kw: Any, group: Any, index: Any, weights: Any,
                            sibling_rows: Any, *, min_samples: int = 48, dtype: Any | None = None,
                            chunk: int = 128) -> tuple[Any, Any, Any]:
    """Standardised differences of each meter's per-unit voltage less the drops its own load and its
    group's load explain: the whole compensation in one call, row chunk by row chunk.

    For each meter: the coefficients of :func:`fit_load_coefficients`, fitted on its per-unit voltage
    changes less the mean of its neighbours' (``index``, :func:`neighbour_mean`), its own load changes and
    its siblings' (:func:`sibling_load` over ``group``); then
    :func:`~phaseid_hpc.kernels.preprocess.standardized_differences` of its voltage with
    :func:`load_drop` as ``less``. The same values as those calls on whole arrays; the row chunks keep the
    float64 temporaries in cache (only the per-unit differences, the neighbours' rows, are whole arrays).

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage, NaN where missing. [V]
    nominal_v : array, shape (n_meters,)
        Nominal voltage; NaN or <= 0 uses the meter's own mean. [V]
    kw : array, shape (n_meters, n_time)
        Active power, NaN where missing. [kW]
    group : array of int, shape (n_meters,)
        Group code per meter (its transformer).
    index : array of int, shape (n_meters, k)
        Rows (of ``voltage``) whose differences are averaged for each meter.
    weights : array, shape (n_meters, k)
        1 for a neighbour, 0 for padding. [-]
    sibling_rows : array, shape (n_meters,)
        1 where the siblings' load is compensated, 0 where only the meter's own is. [-]
    min_samples : int
        Fewest jointly observed samples to fit coefficients (else none). [samples]
    dtype : dtype, optional
        Of ``z`` (default float64).
    chunk : int
        Rows per chunk.

    Returns
    -------
    z, observed, n_obs
        As :func:`~phaseid_hpc.kernels.preprocess.standardized_differences`.
    """
    from .preprocess import per_unit_differences, standardized_differences

    xp = array_namespace(voltage)
    n = voltage.shape[0]
    nom = xp.asarray(nominal_v, dtype=xp.float64)
    dv = per_unit_differences(voltage, nom)
    dv0, seen = _filled(xp, dv)  # once: every chunk gathers its neighbours' rows from them
    own, sib = sibling_load(kw, group)
    kw = xp.asarray(kw, dtype=xp.float64)
    index = xp.asarray(index)
    weights = xp.asarray(weights, dtype=dv.dtype)
    sibling_rows = xp.asarray(sibling_rows, dtype=xp.float64)
    parts = []
    for a in range(0, max(n, 1), chunk):
        b = min(a + chunk, n)
        target = dv[a:b, :] - _mean_of_filled(xp, dv0, seen, index[a:b, :], weights[a:b, :])
        k, s = kw[a:b, :], sib[a:b, :]
        a_own, c_sib = fit_load_coefficients(target, k[:, 1:] - k[:, :-1], s[:, 1:] - s[:, :-1], min_samples)
        drop = load_drop(own[a:b, :], s, a_own, c_sib * sibling_rows[a:b])
        parts.append(standardized_differences(voltage[a:b, :], nom[a:b], dtype=dtype, less=drop))
    if len(parts) == 1:
        return parts[0]
    return tuple(xp.concat([p[i] for p in parts], axis=0) for i in range(3))
