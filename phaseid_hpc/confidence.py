"""Confidence classes of the identification stages (phase and transformer) from a confidence score.

One ladder for every stage: ``confident`` at or above ``confident_threshold``, ``suspect`` at or above
``suspect_threshold``, ``low`` below (the class names are those of :mod:`phaseid_hpc.contract`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import contract

__all__ = ["confidence_class"]


def confidence_class(confidence: Any, *, confident_threshold: float, suspect_threshold: float) -> np.ndarray:
    """Class of each confidence score.

    Parameters
    ----------
    confidence : array-like of float, shape (n,)
        Confidence score; NaN counts as below every threshold. [-]
    confident_threshold, suspect_threshold : float
        The stage's thresholds (``PhaseConfig`` or ``TransformerConfig``), ``suspect <= confident``. [-]

    Returns
    -------
    ndarray of object, shape (n,)
        :data:`~phaseid_hpc.contract.CLASS_CONFIDENT`, :data:`~phaseid_hpc.contract.CLASS_SUSPECT` or
        :data:`~phaseid_hpc.contract.CLASS_LOW`.

    Examples
    --------
    >>> confidence_class([0.9, 0.85, 0.7, 0.2, float("nan")], confident_threshold=0.85, suspect_threshold=0.7).tolist()
    ['confident', 'confident', 'suspect', 'low', 'low']
    """
    conf = np.asarray(confidence, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(
            conf >= confident_threshold,
            contract.CLASS_CONFIDENT,
            np.where(conf >= suspect_threshold, contract.CLASS_SUSPECT, contract.CLASS_LOW),
        ).astype(object)
