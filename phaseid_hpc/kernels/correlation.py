"""NaN-aware Pearson correlation by masked GEMMs (pairwise-complete observations).

For rows ``x_i`` and ``y_j`` with observation masks ``m``, every sum over the jointly observed samples
is a matrix product of zero-filled data and masks, so the whole ``(n, m)`` correlation matrix costs six
GEMMs and runs on any array-API backend (NumPy, CuPy).
"""

from __future__ import annotations

from typing import Any

from .._compat import array_namespace

__all__ = ["fisher_z", "nan_corr_counts", "nan_corrcoef"]


def nan_corr_counts(x: Any, y: Any | None = None, *, min_periods: int = 3) -> tuple[Any, Any]:
    """Pairwise-complete correlation between the rows of ``x`` and the rows of ``y``.

    Parameters
    ----------
    x : array, shape (n, n_samples)
        NaN where missing.
    y : array, shape (m, n_samples), optional
        NaN where missing; ``None`` correlates ``x`` with itself.
    min_periods : int
        Pairs with fewer jointly observed samples give NaN.

    Returns
    -------
    corr : array, shape (n, m)
        Pearson correlation over the jointly observed samples; NaN where undefined (too few samples or
        a constant series). [-]
    n_joint : array, shape (n, m)
        Number of jointly observed samples.

    Notes
    -----
    With masks ``Mx, My`` and zero-filled data ``X, Y`` (all matrix products over samples)::

        n = Mx My^T,  sx = X My^T,  sy = Mx Y^T,  sxx = X^2 My^T,  syy = Mx (Y^2)^T,  sxy = X Y^T
        r = (n sxy - sx sy) / sqrt((n sxx - sx^2) (n syy - sy^2))
    """
    xp = array_namespace(x) if y is None else array_namespace(x, y)
    x = xp.asarray(x, dtype=xp.float64)
    y = x if y is None else xp.asarray(y, dtype=xp.float64)
    mx = ~xp.isnan(x)
    my = ~xp.isnan(y)
    zero = xp.zeros((), dtype=x.dtype)
    y0 = xp.where(my, y, zero)
    myf = xp.astype(my, y0.dtype)
    m = y0.shape[0]
    if bool(xp.all(mx)):  # fully observed x (the common case): no mask GEMMs over x
        x0 = x
        row = xp.ones((1, x.shape[0]), dtype=x.dtype).T
        n = row @ xp.sum(myf, axis=1)[None, :]
        sy = row @ xp.sum(y0, axis=1)[None, :]
        syy = row @ xp.sum(y0 * y0, axis=1)[None, :]
    else:
        x0 = xp.where(mx, x, zero)
        by_mask = xp.astype(mx, x0.dtype) @ xp.concat([myf, y0, y0 * y0], axis=0).T  # (n, 3m)
        n, sy, syy = by_mask[:, :m], by_mask[:, m : 2 * m], by_mask[:, 2 * m :]
    # Stacked right-hand sides: each (n, n_samples) operand is read once.
    by_data = x0 @ xp.concat([myf, y0], axis=0).T  # (n, 2m)
    sx, sxy = by_data[:, :m], by_data[:, m:]
    if bool(xp.all(my)):
        sxx = xp.vecdot(x0, x0, axis=-1)[:, None] * xp.ones((1, m), dtype=x.dtype)
    else:
        sxx = (x0 * x0) @ myf.T
    vx = n * sxx - sx * sx
    vy = n * syy - sy * sy
    cov = n * sxy - sx * sy
    good = (n >= min_periods) & (vx > 0) & (vy > 0)
    one = xp.ones_like(vx)
    r = cov / xp.sqrt(xp.where(good, vx, one) * xp.where(good, vy, one))
    r = xp.clip(r, -1.0, 1.0)
    return xp.where(good, r, xp.full_like(r, float("nan"))), n


def nan_corrcoef(x: Any, y: Any | None = None, *, min_periods: int = 3) -> Any:
    """Pairwise-complete Pearson correlation of rows; equals ``numpy.corrcoef`` on complete data.

    Parameters
    ----------
    x : array, shape (n, n_samples)
    y : array, shape (m, n_samples), optional
    min_periods : int

    Returns
    -------
    array, shape (n, m) (``(n, n)`` when ``y`` is None) [-]

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 4.0, np.nan, 8.0]])
    >>> np.round(nan_corrcoef(x), 6).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    return nan_corr_counts(x, y, min_periods=min_periods)[0]


def fisher_z(r: Any, *, limit: float = 0.999999, xp: Any = None) -> Any:
    """Fisher z-transform ``atanh(r)`` of correlations clipped to ``[-limit, limit]`` (finite at ``|r| = 1``).

    Parameters
    ----------
    r : array
        Correlations; NaN stays NaN. [-]
    limit : float
        Largest ``|r|`` transformed as is; the result is bounded by ``atanh(limit)`` (7.25 for the
        default). [-]
    xp : array namespace, optional
        Default: that of ``r``.

    Returns
    -------
    array, shape and dtype of ``r``
        ``atanh(clip(r, -limit, limit))``. [-]

    Notes
    -----
    Under bivariate normality ``atanh(r)`` of ``n`` samples is close to normal with standard error
    ``1 / sqrt(n - 3)`` (Fisher, 1921).

    Examples
    --------
    >>> import numpy as np
    >>> np.round(fisher_z(np.array([0.0, 0.5, 1.0])), 4).tolist()
    [0.0, 0.5493, 7.2543]
    """
    xp = array_namespace(r) if xp is None else xp
    return xp.atanh(xp.minimum(xp.maximum(r, -limit), limit))  # clip, without a wrapper's overhead
