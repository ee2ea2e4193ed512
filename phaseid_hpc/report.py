"""``RESULTS/report.html``: one static page that opens offline (plots embedded as PNG data URIs).

What a field engineer reads: per feeder, a 2-D projection (PCA of the standardised, first-differenced
voltages) of the meters coloured by inferred phase, with GIS mismatches marked (tight, separated clusters
mean confident assignments); confidence histograms; the corrections worklist; transformer loading and
hot-spot plots when validation ran.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["feeder_projection", "write_report"]

_PHASE_COLOURS = {"A": "#d62728", "B": "#2ca02c", "C": "#1f77b4", "AB": "#9467bd", "BC": "#17becf",
                  "CA": "#ff7f0e", "ABC": "#7f7f7f"}


def feeder_projection(voltage: np.ndarray) -> np.ndarray:
    """2-D PCA projection of meters from their standardised first-differenced voltage.

    Parameters
    ----------
    voltage : ndarray, shape (n_meters, n_time)
        Meter voltages, NaN where missing. [V]

    Returns
    -------
    ndarray, shape (n_meters, 2)
        Scores on the first two principal components (rows with no data are NaN). [-]
    """
    d = np.diff(np.asarray(voltage, dtype=np.float64), axis=1)
    mu = np.nanmean(d, axis=1, keepdims=True)
    sd = np.nanstd(d, axis=1, keepdims=True)
    ok = np.isfinite(sd[:, 0]) & (sd[:, 0] > 0)
    z = np.where(np.isfinite(d), (d - mu) / np.where(sd > 0, sd, 1.0), 0.0)
    out = np.full((d.shape[0], 2), np.nan)
    if ok.sum() >= 3:
        zc = z[ok] - z[ok].mean(axis=0, keepdims=True)
        u, s, _ = np.linalg.svd(zc, full_matrices=False)
        scores = u[:, :2] * s[:2]
        # canonical sign: the largest |loading| of each component is positive (deterministic pictures)
        sign = np.sign(scores[np.argmax(np.abs(scores), axis=0), np.arange(scores.shape[1])])
        out[ok, : scores.shape[1]] = scores * np.where(sign == 0, 1, sign)
    return out


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(uri: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{uri}">'


def _confidence_hist(meters: pd.DataFrame) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if "transformer_confidence" in meters else 1, figsize=(9, 3), squeeze=False)
    bins = np.linspace(0, 1, 41)
    axes[0, 0].hist(meters["phase_confidence"].dropna(), bins=bins, color="#4477aa")
    axes[0, 0].set(title="phase confidence", xlabel="confidence [-]", ylabel="meters")
    if "transformer_confidence" in meters:
        axes[0, 1].hist(meters["transformer_confidence"].dropna(), bins=bins, color="#aa7744")
        axes[0, 1].set(title="transformer confidence", xlabel="confidence [-]")
    return _img(_png(fig), "confidence histograms")


def _feeder_plot(fid: str, proj: np.ndarray, rows: pd.DataFrame) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    phases = rows["phase"].astype(object).where(rows["phase"].notna(), "none").to_numpy()
    for ph in sorted(set(phases)):
        sel = phases == ph
        ax.scatter(proj[sel, 0], proj[sel, 1], s=9, c=_PHASE_COLOURS.get(ph, "#bbbbbb"), label=ph, alpha=0.8)
    mism = rows["changed"].to_numpy(dtype=bool)
    if mism.any():
        ax.scatter(proj[mism, 0], proj[mism, 1], s=60, facecolors="none", edgecolors="k", linewidths=1.2,
                   label="GIS mismatch")
    ax.set(title=f"feeder {fid}: PCA of differenced voltage", xlabel="PC 1", ylabel="PC 2")
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    return _img(_png(fig), f"feeder {fid} projection")


def _transformer_plot(xf: pd.DataFrame) -> str | None:
    import matplotlib.pyplot as plt

    cols = [c for c in ("peak_loading_pu", "max_hot_spot_c") if c in xf]
    if not cols:
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(4.5 * len(cols), 3), squeeze=False)
    for ax, c in zip(axes[0], cols):
        vals = pd.to_numeric(xf[c], errors="coerce").dropna()
        ax.hist(vals, bins=40, color="#66aa55")
        ax.set(title=c.replace("_", " "), ylabel="transformers")
        if c == "max_hot_spot_c":
            ax.axvline(120, color="orange", ls="--", lw=1)
            ax.axvline(140, color="red", ls="--", lw=1)
    return _img(_png(fig), "transformer loading and hot spot")


def write_report(
    results: str | os.PathLike[str],
    *,
    store: str | os.PathLike[str] | None = None,
    max_feeders: int = 12,
    max_rows: int = 500,
) -> Path:
    """Write ``results/report.html``.

    Parameters
    ----------
    results : path-like
        A results folder written by ``phaseid run``.
    store : path-like, optional
        The store the results came from; needed for the per-feeder projections.
    max_feeders : int
        Feeders shown with a projection (those with most corrections first, then by id).
    max_rows : int
        Corrections rows shown in the page (the full list is ``corrections.csv``).

    Returns
    -------
    pathlib.Path
        Path of the report.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    rdir = Path(results)
    meters = pd.read_parquet(rdir / "meters.parquet")
    summary = json.loads((rdir / "summary.json").read_text()) if (rdir / "summary.json").exists() else {}
    xf = pd.read_parquet(rdir / "transformers.parquet") if (rdir / "transformers.parquet").exists() else None
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>phaseid-hpc report</title>",
        "<style>body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}th{background:#eee}.grid{display:flex;flex-wrap:wrap;gap:8px}"
        "h2{border-bottom:2px solid #4477aa}</style></head><body>",
        "<h1>phaseid-hpc: phase and transformer identification</h1>",
    ]
    counts = summary.get("counts", {})
    parts.append("<h2>Summary</h2><table><tr><th>metric</th><th>value</th></tr>")
    for k, v in counts.items():
        parts.append(f"<tr><td>{html.escape(str(k))}</td><td>{v}</td></tr>")
    parts.append("</table>")
    if summary.get("reasons"):
        parts.append("<h3>Findings per meter (quality, phase, transformer)</h3>"
                     "<table><tr><th>reason</th><th>meters</th></tr>")
        for k, v in summary["reasons"].items():
            parts.append(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Confidence</h2>" + _confidence_hist(meters))

    if store is not None:
        from .store import open_store

        ds = open_store(store)
        ids = ds["meter"].values.astype(str)
        pos = pd.Series(np.arange(len(ids)), index=ids)
        by_feeder = meters.groupby("feeder_id", sort=True)["changed"].sum().sort_values(ascending=False,
                                                                                       kind="stable")
        chosen = list(by_feeder.index[:max_feeders])
        parts.append(f"<h2>Feeders ({len(chosen)} of {meters['feeder_id'].nunique()} shown)</h2>"
                     "<p>Each point is a meter, coloured by inferred phase; circled points disagree with GIS. "
                     "Tight, separated clusters mean confident assignments.</p><div class='grid'>")
        for fid in chosen:
            rows = meters[meters["feeder_id"] == fid]
            idx = np.sort(pos.loc[rows["meter_id"].to_numpy()].to_numpy())
            v = ds["voltage"].isel(meter=slice(int(idx.min()), int(idx.max()) + 1)).values
            v = v[idx - idx.min()]
            rows = rows.set_index("meter_id").loc[ids[idx]].reset_index()
            parts.append(_feeder_plot(str(fid), feeder_projection(v), rows))
        parts.append("</div>")

    corr_path = rdir / "corrections.csv"
    if corr_path.exists():
        corr = pd.read_csv(corr_path, keep_default_na=False)
        parts.append(f"<h2>Corrections worklist ({len(corr)} meters)</h2>")
        if len(corr) > max_rows:
            parts.append(f"<p>First {max_rows} rows; the full list is corrections.csv.</p>")
        parts.append(corr.head(max_rows).to_html(index=False, float_format=lambda x: f"{x:.3f}", border=0))
    if xf is not None and len(xf):
        parts.append("<h2>Transformers</h2>")
        plot = _transformer_plot(xf)
        if plot:
            parts.append(plot)
        if "flags" in xf:
            flagged = xf[xf["flags"].astype(str).str.len() > 0]
            parts.append(f"<h3>Flagged transformers ({len(flagged)})</h3>")
            parts.append(flagged.head(max_rows).to_html(index=False, float_format=lambda x: f"{x:.3f}", border=0))
    parts.append(f"<p style='color:#888'>phaseid-hpc {html.escape(str(summary.get('phaseid_hpc_version', '')))}; "
                 f"config fingerprint {html.escape(str(summary.get('config_fingerprint', ''))[:12])}</p>")
    parts.append("</body></html>")
    path = rdir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
