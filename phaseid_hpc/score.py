"""Score a results folder against ground truth (``truth.csv`` of the generator or of a benchmark set)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .contract import CLASS_CONFIDENT, PHASE_CLASSES, TRUTH_COLUMNS
from .errors import ContractError

__all__ = ["format_score_table", "score_frames", "score_results"]


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def score_frames(results: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """Accuracy of a ``meters.parquet`` table against truth.

    Parameters
    ----------
    results : DataFrame
        ``meters.parquet`` rows (meter_id, phase_gis, phase, phase_class, changed, and optionally
        transformer_id, transformer, transformer_changed).
    truth : DataFrame
        ``truth.csv`` rows (meter_id, transformer_id, phase, ...).

    Returns
    -------
    dict
        ``phase``: accuracy over all meters and over identified meters, coverage, precision and share per
        class, GIS-label accuracy for comparison, corrections precision and recall; ``transformer``: the same
        for the transformer mapping where present. Ratios are ``None`` where the denominator is zero.
    """
    missing = [c for c in ("meter_id", "phase") if c not in truth]
    if missing:
        raise ContractError(f"truth table lacks column(s) {missing}")
    t = truth.set_index("meter_id")
    r = results.set_index("meter_id")
    unknown = r.index.difference(t.index)
    if len(unknown):
        raise ContractError(f"{len(unknown)} result meter(s) are not in the truth, e.g. {list(unknown[:3])}")
    t = t.loc[r.index]
    true_phase = t["phase"].astype(str).to_numpy()
    pred = r["phase"].astype(object).to_numpy()
    identified = pd.notna(pred)
    correct = identified & (pred.astype(str) == true_phase)
    gis = r["phase_gis"].astype(str).to_numpy()
    gis_wrong = gis != true_phase
    changed = r["changed"].to_numpy(dtype=bool)
    phase: dict[str, Any] = {
        "meters": len(r),
        "accuracy": _ratio(int(correct.sum()), len(r)),
        "accuracy_identified": _ratio(int(correct.sum()), int(identified.sum())),
        "coverage": _ratio(int(identified.sum()), len(r)),
        "gis_accuracy": _ratio(int((~gis_wrong).sum()), len(r)),
        "corrections": int(changed.sum()),
        "correction_precision": _ratio(int((changed & correct).sum()), int(changed.sum())),
        "correction_recall": _ratio(int((changed & correct & gis_wrong).sum()), int(gis_wrong.sum())),
        "gis_errors": int(gis_wrong.sum()),
        "classes": {},
    }
    # never below GIS as given: the recommendation against the labels it started from
    phase["gain_over_gis"] = None if not len(r) else (int(correct.sum()) - int((~gis_wrong).sum())) / len(r)
    if "phase_inferred" in r:
        raw = r["phase_inferred"].astype(object).to_numpy()
        raw_ok = pd.notna(raw) & (raw.astype(str) == true_phase)
        review = pd.notna(raw) & (raw.astype(str) != gis) & ~changed
        phase["inferred_accuracy"] = _ratio(int(raw_ok.sum()), len(r))
        phase["review"] = int(review.sum())
        phase["review_precision"] = _ratio(int((review & raw_ok).sum()), int(review.sum()))
    cls = r["phase_class"].astype(str).to_numpy()
    for c in PHASE_CLASSES:
        sel = cls == c
        phase["classes"][c] = {
            "meters": int(sel.sum()),
            "share": _ratio(int(sel.sum()), len(r)),
            "precision": _ratio(int((sel & correct).sum()), int((sel & identified).sum())),
        }
    phase["confident_precision"] = phase["classes"][CLASS_CONFIDENT]["precision"]
    out: dict[str, Any] = {"phase": phase}
    if "transformer" in r and "transformer_id" in t:
        true_x = t["transformer_id"].astype(str).to_numpy()
        pred_x = r["transformer"].astype(object).to_numpy()
        ok = pd.notna(pred_x) & (pred_x.astype(str) == true_x)
        gis_x_wrong = r["transformer_id"].astype(str).to_numpy() != true_x
        flagged = r["transformer_changed"].to_numpy(dtype=bool)
        out["transformer"] = {
            "meters": len(r),
            "accuracy": _ratio(int(ok.sum()), len(r)),
            "gis_accuracy": _ratio(int((~gis_x_wrong).sum()), len(r)),
            "flags": int(flagged.sum()),
            "flag_precision": _ratio(int((flagged & gis_x_wrong).sum()), int(flagged.sum())),
            "flag_recall": _ratio(int((flagged & gis_x_wrong).sum()), int(gis_x_wrong.sum())),
            "correction_precision": _ratio(int((flagged & ok).sum()), int(flagged.sum())),
            "gis_errors": int(gis_x_wrong.sum()),
            "gain_over_gis": (int(ok.sum()) - int((~gis_x_wrong).sum())) / len(r) if len(r) else None,
        }
    return out


def score_results(results: str | os.PathLike[str], truth: str | os.PathLike[str]) -> dict[str, Any]:
    """Score ``RESULTS/meters.parquet`` against a ``truth.csv`` file (see :func:`score_frames`)."""
    rpath = Path(results)
    mfile = rpath / "meters.parquet" if rpath.is_dir() else rpath
    if not mfile.is_file():
        raise ContractError(f"no results at {str(mfile)!r}; run 'phaseid run' first")
    tpath = Path(truth)
    if not tpath.is_file():
        raise ContractError(f"truth file {str(tpath)!r} does not exist")
    truth_df = pd.read_csv(tpath, dtype={"meter_id": str, "transformer_id": str, "feeder_id": str})
    extra = [c for c in TRUTH_COLUMNS if c not in truth_df]
    if "phase" in extra or "meter_id" in extra:
        raise ContractError(f"truth file {str(tpath)!r} lacks column(s) {extra}")
    return score_frames(pd.read_parquet(mfile), truth_df)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{100 * v:.2f}%"
    return str(v)


def format_score_table(score: dict[str, Any]) -> str:
    """A markdown table of a score (what ``phaseid score`` prints)."""
    p = score["phase"]
    rows = [
        ("phase accuracy (all meters)", p["accuracy"]),
        ("phase accuracy (identified meters)", p["accuracy_identified"]),
        ("coverage (meters given a phase)", p["coverage"]),
        ("GIS phase labels correct", p["gis_accuracy"]),
        ("confident-class precision", p["confident_precision"]),
        ("confident share", p["classes"][CLASS_CONFIDENT]["share"]),
        ("phase corrections (corrections.csv)", p["corrections"]),
        ("correction precision (worklist rows right)", p["correction_precision"]),
        ("correction recall", p["correction_recall"]),
        ("accuracy gain over GIS as given", p["gain_over_gis"]),
    ]
    if "review" in p:
        rows += [("phase review items (review.csv)", p["review"]),
                 ("review items right", p["review_precision"])]
    if "transformer" in score:
        x = score["transformer"]
        rows += [
            ("meters on the right transformer", x["accuracy"]),
            ("GIS transformer labels correct", x["gis_accuracy"]),
            ("transformer flags", x["flags"]),
            ("transformer flag precision", x["flag_precision"]),
            ("transformer flag recall", x["flag_recall"]),
            ("transformer accuracy gain over GIS", x["gain_over_gis"]),
        ]
    lines = ["| metric | value |", "| --- | --- |"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


def dumps(score: dict[str, Any]) -> str:
    """JSON text of a score, with NaN-free floats rounded to 6 places."""

    def _clean(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: _clean(v) for k, v in o.items()}
        if isinstance(o, float):
            return None if np.isnan(o) else round(o, 6)
        return o

    return json.dumps(_clean(score), indent=2, sort_keys=True)
