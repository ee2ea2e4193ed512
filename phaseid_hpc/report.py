"""``RESULTS/report.html``: one static page a crew lead works from; opens offline (no CDN, no tile server).

Sections, top to bottom:

1. **Summary**: data period, run date, store and its fingerprint, counts in words.
2. **Worklist**: the confident corrections (``corrections.csv``) apart from the review items
   (``review.csv``: the inference disagrees with GIS but is not confident, GIS kept), each a sortable,
   filterable table (plain inline JavaScript) with service type and location where the store has them.
3. **Maps**: where meters have coordinates, per feeder, meters coloured by recommended phase with
   corrections and review items marked (matplotlib, no tiles).
4. **Confidence**: histograms of phase and transformer confidence (log count axis, class thresholds drawn).
5. **Feeders**: per-feeder 2-D projection (PCA of the standardised, first-differenced voltages) of the meters
   coloured by recommended phase (tight, separated clusters mean confident assignments).
6. **Transformers**: peak loading and hot-spot histograms with the 1.0 pu and hot-spot limit lines, and the
   flagged transformers with the columns that matter.

Plots are PNG data URIs; the page links the CSV and Parquet files beside it.
"""

from __future__ import annotations

import base64
import datetime as _dt
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

#: Worklist columns shown in the page, in order, with their headers.
_WORKLIST_COLUMNS = {
    "feeder_id": "feeder",
    "transformer_id": "transformer (GIS)",
    "meter_id": "meter",
    "correction": "change",
    "phase_gis": "phase (GIS)",
    "phase": "phase (inferred)",
    "phase_confidence": "phase confidence",
    "phase_class": "phase class",
    "transformer": "transformer (inferred)",
    "transformer_confidence": "transformer confidence",
    "transformer_class": "transformer class",
    "service_type": "service type",
    "lat": "lat [deg]",
    "lon": "lon [deg]",
    "reasons": "findings",
}

#: Transformer columns shown in the flagged-transformer table, with their headers.
_TRANSFORMER_COLUMNS = {
    "feeder_id": "feeder",
    "transformer_id": "transformer",
    "kva_rating": "rating [kVA]",
    "phases": "phases",
    "n_meters_gis": "meters (GIS)",
    "n_meters": "meters (inferred)",
    "meters_changed": "meters changed",
    "peak_loading_pu": "peak loading [pu]",
    "imbalance": "imbalance [-]",
    "max_hot_spot_c": "max hot spot [°C]",
    "loss_of_life_h": "loss of life [h]",
    "flag_codes": "flags",
    "flag_reasons": "why",
}

#: Intervals (the most recent) a feeder projection is computed from: a month at 15 min shows the clusters
#: as well as a year does, and bounds the memory of a 4000-meter feeder to ~100 MB.
_PROJECTION_SAMPLES = 2976

#: Decimals shown per column (others: 3).
_DIGITS = {"lat": 6, "lon": 6, "kva_rating": 1, "max_hot_spot_c": 1, "loss_of_life_h": 2, "imbalance": 2,
           "peak_loading_pu": 2}

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1500px}
h2{border-bottom:2px solid #4477aa;margin-top:32px}
table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top;white-space:nowrap}
td:last-child{white-space:normal;min-width:220px}
th{background:#eee;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th.asc::after{content:" \\25B2"}table.sortable th.desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{max-height:520px;overflow:auto;border:1px solid #ddd;display:inline-block;max-width:100%}
.grid{display:flex;flex-wrap:wrap;gap:8px}
.facts td:first-child{font-weight:600}
.filter{margin:6px 0;padding:3px 6px;width:320px}
.muted{color:#777}
"""

# Plain inline JavaScript (no library, no network): click a header to sort (numbers numerically, again to
# reverse); type in the box above a table to keep the rows containing the text in any cell.
_JS = """
function phaseidSort(th){
  var table=th.closest('table'),tbody=table.tBodies[0],col=th.cellIndex;
  var asc=!th.classList.contains('asc');
  Array.prototype.forEach.call(th.parentNode.cells,function(c){c.classList.remove('asc','desc');});
  th.classList.add(asc?'asc':'desc');
  var rows=Array.prototype.slice.call(tbody.rows);
  rows.sort(function(a,b){
    var x=a.cells[col].getAttribute('data-v'),y=b.cells[col].getAttribute('data-v');
    var nx=parseFloat(x),ny=parseFloat(y),r;
    if(!isNaN(nx)&&!isNaN(ny)){r=nx-ny;}else if(!isNaN(nx)){r=-1;}else if(!isNaN(ny)){r=1;}
    else{r=x<y?-1:(x>y?1:0);}
    return asc?r:-r;
  });
  rows.forEach(function(r){tbody.appendChild(r);});
}
function phaseidFilter(input){
  var table=document.getElementById(input.getAttribute('data-table')),q=input.value.toLowerCase(),n=0;
  Array.prototype.forEach.call(table.tBodies[0].rows,function(r){
    var show=r.textContent.toLowerCase().indexOf(q)>=0;r.style.display=show?'':'none';if(show){n++;}
  });
  document.getElementById(input.getAttribute('data-count')).textContent=n;
}
document.addEventListener('DOMContentLoaded',function(){
  document.querySelectorAll('table.sortable th').forEach(function(th){
    th.addEventListener('click',function(){phaseidSort(th);});});
  document.querySelectorAll('input.filter').forEach(function(i){
    i.addEventListener('input',function(){phaseidFilter(i);});});
});
"""


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
    with np.errstate(invalid="ignore"):
        cnt = np.isfinite(d).sum(axis=1, keepdims=True)
        mu = np.where(cnt > 0, np.nansum(d, axis=1, keepdims=True) / np.maximum(cnt, 1), np.nan)
        sd = np.sqrt(np.where(cnt > 0, np.nansum((d - mu) ** 2, axis=1, keepdims=True) / np.maximum(cnt, 1),
                              np.nan))
    ok = np.isfinite(sd[:, 0]) & (sd[:, 0] > 0)
    z = np.where(np.isfinite(d), (d - mu) / np.where(sd > 0, sd, 1.0), 0.0)
    out = np.full((d.shape[0], 2), np.nan)
    if ok.sum() >= 3:
        zc = z[ok] - z[ok].mean(axis=0, keepdims=True)
        u, s = _top_two_components(zc)
        scores = u[:, :2] * s[:2]
        # canonical sign: the largest |loading| of each component is positive (deterministic pictures)
        sign = np.sign(scores[np.argmax(np.abs(scores), axis=0), np.arange(scores.shape[1])])
        out[ok, : scores.shape[1]] = scores * np.where(sign == 0, 1, sign)
    return out


def _top_two_components(zc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and singular values of the two largest components of ``zc`` (n, t).

    Single-threaded BLAS (a report is drawn beside other work; threads only contend) and, past small
    sizes, a truncated SVD (ARPACK from a fixed start vector): two components of a 4000 x 3000 feeder in
    well under a second, where a full SVD takes many.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        if min(zc.shape) > 40:
            from scipy.sparse.linalg import svds

            u, s, _ = svds(zc, k=2, v0=np.ones(min(zc.shape)), random_state=0)
            order = np.argsort(s)[::-1]
            return u[:, order], s[order]
        u, s, _ = np.linalg.svd(zc, full_matrices=False)
        return u, s


# ----------------------------------------------------------------------------------------------------------
# Inputs of the page
# ----------------------------------------------------------------------------------------------------------
def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"feeder_id": str,
                                                                         "transformer_id": str,
                                                                         "meter_id": str})


def _store_facts(store: str | os.PathLike[str] | None) -> tuple[Any, dict[str, Any], pd.DataFrame | None]:
    """The opened store (or None), its period and version, and its per-meter location table."""
    if store is None or not Path(store).exists():
        return None, {}, None
    import dask

    from .store import open_store

    ds = open_store(store)
    facts: dict[str, Any] = {"store_version": ds.attrs.get("phaseid_store_version")}
    times = pd.DatetimeIndex(ds["time"].values)
    if len(times):
        facts.update(start=times[0], end=times[-1], n_time=len(times), interval_s=ds.attrs.get("interval_s"))
    cols = {"meter_id": np.asarray(ds["meter"].values).astype(str)}
    with dask.config.set(scheduler="threads"):  # small coordinates: read here, not shipped to a cluster
        for c in ("service_type", "lat", "lon"):
            if c in ds.coords:
                cols[c] = np.asarray(ds[c].values)
    return ds, facts, pd.DataFrame(cols)


def _run_date(rdir: Path) -> str:
    ref = rdir / "summary.json" if (rdir / "summary.json").exists() else rdir / "meters.parquet"
    return _dt.datetime.fromtimestamp(ref.stat().st_mtime, tz=_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# ----------------------------------------------------------------------------------------------------------
# HTML pieces
# ----------------------------------------------------------------------------------------------------------
def _png(fig: Any) -> str:
    buf = io.BytesIO()
    # fixed margins (set where each figure is made), not bbox_inches="tight": that draws every figure twice
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(uri: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{uri}">'


def _n(k: int, one: str, many: str | None = None) -> str:
    return f"{k:,} {one if k == 1 else (many or one + 's')}"


def _pct(k: int, n: int) -> str:
    return f" ({100.0 * k / n:.1f}%)" if n else ""


def _cell(v: Any, col: str) -> str:
    """One ``<td>``: the shown text and, for sorting, the raw value in ``data-v``."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)) or v is pd.NA or v is pd.NaT:
        return "<td data-v=''></td>"
    if isinstance(v, (bool, np.bool_)):
        return f"<td data-v='{int(v)}'>{'yes' if v else ''}</td>"
    if isinstance(v, (int, np.integer)):
        return f"<td class='num' data-v='{int(v)}'>{int(v):,}</td>"
    if isinstance(v, (float, np.floating)):
        digits = _DIGITS.get(col, 3)
        return f"<td class='num' data-v='{float(v)!r}'>{float(v):.{digits}f}</td>"
    text = html.escape(str(v))
    return f"<td data-v='{text}'>{text}</td>"


def _table(df: pd.DataFrame, headers: dict[str, str], table_id: str, max_rows: int) -> str:
    """A sortable, filterable table of the ``headers`` columns of ``df`` (first ``max_rows`` rows)."""
    cols = [c for c in headers if c in df]
    shown = df.head(max_rows)
    head = "".join(f"<th title='{html.escape(c)}'>{html.escape(headers[c])}</th>" for c in cols)
    body = []
    for row in shown[cols].itertuples(index=False, name=None):
        body.append("<tr>" + "".join(_cell(v, c) for v, c in zip(row, cols)) + "</tr>")
    more = (f" <span class='muted'>(first {max_rows:,} of {len(df):,} rows)</span>"
            if len(df) > max_rows else "")
    return (
        f"<div><input class='filter' type='search' placeholder='filter: feeder, meter, phase, finding…' "
        f"data-table='{table_id}' data-count='{table_id}-n'> <span id='{table_id}-n'>{len(shown)}</span> "
        "rows "
        f"shown{more}</div><div class='scroll'><table class='sortable' id='{table_id}'><thead><tr>{head}</tr>"
        f"</thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _summary_html(rdir: Path, summary: dict, meters: pd.DataFrame, corr: pd.DataFrame | None,
                  review: pd.DataFrame | None, xf: pd.DataFrame | None, facts: dict, store: Any) -> str:
    n = len(meters)
    counts = summary.get("counts", {})
    parts = ["<h2>Summary</h2><table class='facts'>"]

    def fact(k: str, v: str) -> None:
        parts.append(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>")

    if "start" in facts:
        span = facts["end"] - facts["start"]
        step = facts.get("interval_s")
        step_txt = f", {_n(int(facts['n_time']), 'interval')} of {int(step) // 60} min" if step else ""
        fact("data period", f"{facts['start']:%Y-%m-%d %H:%M} to {facts['end']:%Y-%m-%d %H:%M} UTC "
                            f"({span / pd.Timedelta(days=1):.1f} days{step_txt}; times mark interval ends)")
    fact("run date", html.escape(_run_date(rdir)))
    inputs = summary.get("inputs", {})
    store_txt = html.escape(str(inputs.get("store", store or "")))
    fp = str(inputs.get("store_fingerprint", ""))
    version = facts.get("store_version")
    fact("store", f"{store_txt}" + (f" (store format version {html.escape(str(version))})" if version else "")
         + (f"<br><span class='muted'>fingerprint {html.escape(fp[:16])}…</span>" if fp else ""))
    fact("software", f"phaseid-hpc {html.escape(str(summary.get('phaseid_hpc_version', '')))}, config "
                     f"fingerprint {html.escape(str(summary.get('config_fingerprint', ''))[:12])}…")
    parts.append("</table>")

    n_feeders = meters["feeder_id"].nunique() if n else 0
    words = [f"<b>{_n(n, 'meter')}</b> on {_n(n_feeders, 'feeder')} analysed."]
    cls_words = {"confident": "confident", "suspect": "suspect", "low": "low confidence",
                 "insufficient_data": "without enough usable data"}
    cls = [f"{counts.get(c, 0):,}{_pct(counts.get(c, 0), n)} {w}" for c, w in cls_words.items()]
    words.append("Phase assignments: " + ", ".join(cls) + ".")
    n_corr = 0 if corr is None else len(corr)
    if corr is not None and n_corr:
        kinds = corr["correction"].astype(str)
        words.append(
            f"<b>{_n(n_corr, 'confident correction')}</b> for the field: "
            f"{int(kinds.str.contains('phase').sum()):,} phase, "
            f"{int(kinds.str.contains('transformer').sum()):,} transformer "
            f"({int((kinds == 'phase+transformer').sum()):,} both)."
        )
    else:
        words.append("<b>No confident corrections</b>: every confident assignment agrees with GIS.")
    if review is not None:
        words.append(f"{_n(len(review), 'meter')} to review: the inference disagrees with GIS but is not "
                     "confident, so GIS is kept.")
    if xf is not None and len(xf) and "flag_codes" in xf:
        flagged = int((xf["flag_codes"].fillna("").astype(str).str.len() > 0).sum())
        words.append(f"{_n(len(xf), 'transformer')} checked, {flagged:,} flagged for a look.")
    parts.append("<p>" + " ".join(words) + "</p>")
    if summary.get("reasons"):
        parts.append("<details><summary>Findings per meter (quality, phase, transformer)</summary>"
                     "<table><tr><th>finding</th><th>meters</th></tr>")
        for k, v in summary["reasons"].items():
            parts.append(f"<tr><td>{html.escape(k)}</td><td class='num'>{int(v):,}</td></tr>")
        parts.append("</table></details>")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------
def _confidence_hist(meters: pd.DataFrame, thresholds: dict[str, tuple[float, float]]) -> str:
    import matplotlib.pyplot as plt

    cols = [c for c in ("phase_confidence", "transformer_confidence") if c in meters]
    fig, axes = plt.subplots(1, len(cols), figsize=(5.2 * len(cols), 3.4), squeeze=False)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.16, top=0.9, wspace=0.25)
    bins = np.linspace(0, 1, 41)
    for ax, c, colour in zip(axes[0], cols, ("#4477aa", "#aa7744")):
        stage = c.split("_")[0]
        ax.hist(meters[c].dropna(), bins=bins, color=colour, label="meters")
        ax.set_yscale("log")
        suspect, confident = thresholds.get(stage, (0.70, 0.85))
        ax.axvline(suspect, color="orange", ls="--", lw=1.2, label=f"suspect from {suspect:.2f}")
        ax.axvline(confident, color="green", ls="--", lw=1.2, label=f"confident from {confident:.2f}")
        ax.set(title=f"{stage} confidence", xlabel="confidence [-]", ylabel="meters (log scale)", xlim=(0, 1))
        ax.legend(fontsize=7, loc="upper left")
    return _img(_png(fig), "confidence histograms")


def _phase_order(phases: np.ndarray) -> list[str]:
    """Phases present, in contract order (A, B, C, AB, BC, CA, ABC), anything else after."""
    order = list(_PHASE_COLOURS)
    return sorted(set(phases), key=lambda p: (order.index(p) if p in order else len(order), str(p)))


def _feeder_plot(fid: str, proj: np.ndarray, rows: pd.DataFrame) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.92)
    phases = rows["phase"].astype(object).where(rows["phase"].notna(), "none").to_numpy()
    for ph in _phase_order(phases):
        sel = phases == ph
        ax.scatter(proj[sel, 0], proj[sel, 1], s=9, c=_PHASE_COLOURS.get(ph, "#bbbbbb"), label=ph, alpha=0.8)
    mism = rows["changed"].to_numpy(dtype=bool)
    if mism.any():
        ax.scatter(proj[mism, 0], proj[mism, 1], s=60, facecolors="none", edgecolors="k", linewidths=1.2,
                   label="phase correction")
    ax.set(title=f"feeder {fid}: PCA of differenced voltage", xlabel="principal component 1 [-]",
           ylabel="principal component 2 [-]")
    ax.legend(fontsize=7, markerscale=1.5, loc="best", title="recommended phase", title_fontsize=7)
    return _img(_png(fig), f"feeder {fid} projection")


def _feeder_map(fid: str, rows: pd.DataFrame, corr_ids: set[str], review_ids: set[str]) -> str | None:
    """Meters of one feeder at their coordinates, coloured by recommended phase; work marked."""
    import matplotlib.pyplot as plt

    ok = rows["lat"].notna() & rows["lon"].notna()
    if not ok.any():
        return None
    rows = rows[ok]
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.12, top=0.92)
    phases = rows["phase"].astype(object).where(rows["phase"].notna(), "none").to_numpy()
    lon, lat = rows["lon"].to_numpy(dtype=float), rows["lat"].to_numpy(dtype=float)
    for ph in _phase_order(phases):
        sel = phases == ph
        ax.scatter(lon[sel], lat[sel], s=10, c=_PHASE_COLOURS.get(ph, "#bbbbbb"), label=ph, alpha=0.85)
    ids = rows["meter_id"].astype(str).to_numpy()
    c_sel = np.fromiter((i in corr_ids for i in ids), dtype=bool, count=ids.size)  # set lookups, no sort
    r_sel = np.fromiter((i in review_ids for i in ids), dtype=bool, count=ids.size)
    if c_sel.any():
        ax.scatter(lon[c_sel], lat[c_sel], s=80, facecolors="none", edgecolors="k", linewidths=1.4,
                   label=f"correction ({int(c_sel.sum())})")
    if r_sel.any():
        ax.scatter(lon[r_sel], lat[r_sel], s=70, marker="s", facecolors="none", edgecolors="#888888",
                   linewidths=1.0, label=f"review ({int(r_sel.sum())})")
    ax.set_aspect(1.0 / max(np.cos(np.deg2rad(np.nanmean(lat))), 0.1), adjustable="datalim")
    ax.set(title=f"feeder {fid}: meters by recommended phase", xlabel="longitude [deg]",
           ylabel="latitude [deg]")
    ax.ticklabel_format(useOffset=False, style="plain")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, markerscale=1.3, loc="best", title="phase / work", title_fontsize=7)
    return _img(_png(fig), f"feeder {fid} map")


def _transformer_plot(xf: pd.DataFrame, limits: tuple[float, float]) -> str | None:
    import matplotlib.pyplot as plt

    cols = [c for c in ("peak_loading_pu", "max_hot_spot_c") if c in xf]
    if not cols:
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(5.2 * len(cols), 3.4), squeeze=False)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.16, top=0.9, wspace=0.25)
    for ax, c in zip(axes[0], cols):
        vals = pd.to_numeric(xf[c], errors="coerce").dropna()
        ax.hist(vals, bins=40, color="#66aa55", label="transformers")
        ax.set_yscale("log")
        if c == "peak_loading_pu":
            ax.axvline(1.0, color="red", ls="--", lw=1.2, label="nameplate rating (1.0 pu)")
            ax.set(title="peak loading", xlabel="peak loading [pu of kVA rating]",
                   ylabel="transformers (log)")
        else:
            normal, emergency = limits
            ax.axvline(normal, color="orange", ls="--", lw=1.2, label=f"normal cyclic limit ({normal:g} °C)")
            ax.axvline(emergency, color="red", ls="--", lw=1.2, label=f"emergency limit ({emergency:g} °C)")
            ax.set(title="maximum winding hot spot", xlabel="hot-spot temperature [°C]",
                   ylabel="transformers (log)")
        ax.legend(fontsize=7, loc="upper right")
    return _img(_png(fig), "transformer loading and hot spot")


def _thresholds(summary: dict) -> dict[str, tuple[float, float]]:
    cfg = summary.get("config", {})
    out = {}
    for stage in ("phase", "transformer"):
        sec = cfg.get(stage, {})
        out[stage] = (float(sec.get("suspect_threshold", 0.70)), float(sec.get("confident_threshold", 0.85)))
    return out


# ----------------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------------
def _read_results(
    rdir: Path,
) -> tuple[pd.DataFrame, dict, pd.DataFrame | None, pd.DataFrame | None, pd.DataFrame | None]:
    """The run's meters, summary, transformers, corrections and review tables (None where absent)."""
    meters = pd.read_parquet(rdir / "meters.parquet")
    summary = json.loads((rdir / "summary.json").read_text()) if (rdir / "summary.json").exists() else {}
    xf = pd.read_parquet(rdir / "transformers.parquet") if (rdir / "transformers.parquet").exists() else None
    if xf is not None and "flags" in xf and "flag_codes" not in xf:  # results written before the rename
        xf = xf.rename(columns={"flags": "flag_codes"})
    corr, review = _read_csv(rdir / "corrections.csv"), _read_csv(rdir / "review.csv")
    return meters, summary, xf, corr, review


def _located(df: pd.DataFrame | None, locations: pd.DataFrame | None) -> pd.DataFrame | None:
    """``df`` with the store's service type and coordinates of its meters joined on (if both exist)."""
    if df is None or locations is None:
        return df
    return df.merge(locations, on="meter_id", how="left", sort=False)


def _chosen_feeders(meters: pd.DataFrame, max_feeders: int) -> list[str]:
    """Ids of the feeders drawn: most changed meters first, then by id."""
    by_feeder = meters.groupby("feeder_id", sort=True)["changed"].sum().sort_values(ascending=False,
                                                                                   kind="stable")
    return [str(f) for f in by_feeder.index[:max_feeders]]


def _worklist_parts(rdir: Path, corr: pd.DataFrame | None, review: pd.DataFrame | None,
                    max_rows: int) -> list[str]:
    """The worklist section: links to the files, then the corrections and review tables."""
    links = [f"<a href='{name}'>{name}</a>" for name in ("corrections.csv", "review.csv", "meters.parquet",
                                                          "transformers.parquet", "summary.json", "run.log")
             if (rdir / name).exists()]
    parts = ["<h2>Corrections worklist</h2><p>Files beside this page: " + " · ".join(links)
             + ". Click a column header to sort; type in the box to filter.</p>"]
    if corr is not None:
        parts.append(f"<h3>Confident corrections ({len(corr):,} meters)</h3><p>The recommended phase or "
                     "transformer differs from GIS with a confident assignment: the field worklist "
                     "(<a href='corrections.csv'>corrections.csv</a>).</p>")
        recommended = {k: v.replace("(inferred)", "(recommended)") for k, v in _WORKLIST_COLUMNS.items()}
        parts.append(_table(corr, recommended, "corrections", max_rows) if len(corr) else
                     "<p class='muted'>None.</p>")
    if review is not None:
        parts.append(f"<h3>Review items ({len(review):,} meters)</h3><p>The inference disagrees with GIS but "
                     "is not confident: GIS is kept; worth a look when a crew is nearby "
                     "(<a href='review.csv'>review.csv</a>). The phase and transformer columns show the "
                     "inference.</p>")
        parts.append(_table(review, _WORKLIST_COLUMNS, "review", max_rows) if len(review) else
                     "<p class='muted'>None.</p>")
    return parts


def _feeder_inputs(ds: Any, meters: pd.DataFrame, mloc: pd.DataFrame | None, corr: pd.DataFrame | None,
                   review: pd.DataFrame | None, chosen: list[str]) -> list[dict[str, Any]]:
    """What :func:`_feeder_figures` needs for each of the ``chosen`` feeders (small tables, no data).

    ``map`` holds the feeder's located meters with its corrections and review items (None without
    coordinates); ``projection`` its meters found in the store, in store order, with their store positions
    (None without a store holding voltage, or under 3 such meters).
    """
    corr_ids = set() if corr is None else set(corr["meter_id"].astype(str))
    review_ids = set() if review is None else set(review["meter_id"].astype(str))
    has_map = mloc is not None and "lat" in mloc and mloc["lat"].notna().any()
    loc_at = mloc["feeder_id"].astype(str).groupby(mloc["feeder_id"].astype(str).to_numpy()).indices \
        if has_map else {}
    has_v = ds is not None and "voltage" in ds
    if has_v:
        ids = ds["meter"].values.astype(str)
        pos = pd.Series(np.arange(len(ids)), index=ids)
        # each feeder's rows by one grouping, meters found in the store by one hash lookup (not per feeder)
        feeder_str = meters["feeder_id"].astype(str).to_numpy()
        at = pd.Series(feeder_str).groupby(feeder_str).indices
        store_pos = pos.reindex(meters["meter_id"].astype(str).to_numpy()).to_numpy()
    out = []
    for fid in chosen:
        item: dict[str, Any] = {"fid": fid, "map": None, "projection": None}
        if has_map:
            rows = mloc.iloc[loc_at.get(fid, [])][["meter_id", "phase", "lat", "lon"]]  # what a map draws
            m_ids = set(rows["meter_id"].astype(str))
            item["map"] = (rows, corr_ids & m_ids, review_ids & m_ids)
        if has_v:
            sel = np.asarray(at.get(fid, []), dtype=np.int64)
            sel = sel[np.isfinite(store_pos[sel])]
            if sel.size >= 3:
                rows = meters.iloc[sel]
                idx = np.sort(store_pos[sel].astype(np.int64))
                rows = rows.set_index(rows["meter_id"].astype(str)).loc[ids[idx]].reset_index(drop=True)
                item["projection"] = (rows[["phase", "changed"]], idx)
        out.append(item)
    return out


def _feeder_figures(store: str, item: dict[str, Any]) -> tuple[str | None, str | None]:
    """One feeder's map and projection (HTML ``<img>`` elements, None where not drawn).

    Self-contained (reads its own rows of the store, draws with Agg), so that a cluster's workers draw the
    feeders side by side: :func:`write_report` with a ``client``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    fmap = proj = None
    if item["map"] is not None:
        fmap = _feeder_map(item["fid"], *item["map"])
    if item["projection"] is not None:
        from .store import read_meter_block

        rows, idx = item["projection"]
        lo = int(idx.min())
        v = read_meter_block(store, lo, int(idx.max()) + 1, ("voltage",), last=_PROJECTION_SAMPLES)["voltage"]
        v = v[idx - lo]
        proj = _feeder_plot(item["fid"], feeder_projection(v), rows)
    return fmap, proj


def _start_feeder_figures(store: Any, inputs: list[dict[str, Any]], client: Any = None) -> Any:
    """:func:`_feeder_figures` of every feeder, in order: drawn here, or started on the ``client``'s workers
    (futures, gathered by :func:`_finish_feeder_figures` once the rest of the page is written)."""
    if client is None or not inputs:
        return [_feeder_figures(str(store), item) for item in inputs]
    import uuid

    run = uuid.uuid4().hex[:12]  # keys of this page only: never another call's results
    return [client.submit(_feeder_figures, str(store), item, pure=False, key=f"phaseid-report-{run}-{i}")
            for i, item in enumerate(inputs)]


def _finish_feeder_figures(started: Any, client: Any = None) -> list[tuple[str | None, str | None]]:
    return started if client is None else client.gather(started)


def _maps_parts(meters: pd.DataFrame, maps: list[str | None]) -> list[str]:
    """The maps section (empty where no meter has coordinates)."""
    maps = [m for m in maps if m]
    if not maps:
        return []
    return [f"<h2>Maps ({len(maps)} of {meters['feeder_id'].nunique()} feeders)</h2>"
            "<p>Meters at "
            "their GIS coordinates, coloured by recommended phase; circles mark confident "
            "corrections, grey squares review items. Feeders with most corrections first.</p>"
            "<div class='grid'>" + "".join(maps) + "</div>"]


def _confidence_part(meters: pd.DataFrame, summary: dict) -> str:
    """The confidence section: histograms with the class thresholds of the run's config."""
    return ("<h2>Confidence</h2><p>Meters per confidence bin (log scale, so small classes stay "
            "visible); dashed lines are the class thresholds.</p>" + _confidence_hist(meters,
                                                                                 _thresholds(summary)))


def _feeders_parts(ds: Any, meters: pd.DataFrame, plots: list[str | None]) -> list[str]:
    """The feeder-projection section (empty without a store holding voltage)."""
    plots = [p for p in plots if p]
    if not plots:
        return []
    return [f"<h2>Feeders ({len(plots)} of {meters['feeder_id'].nunique()} shown)</h2>"
            "<p>Each point is a meter, coloured by recommended phase; circled points are phase "
            "corrections. Tight, separated clusters mean confident assignments. (The last "
            f"{min(_PROJECTION_SAMPLES, ds.sizes['time']):,} intervals of the record.)</p>"
            "<div class='grid'>" + "".join(plots) + "</div>"]


def _transformers_parts(xf: pd.DataFrame | None, summary: dict, max_rows: int) -> list[str]:
    """The transformers section: loading and hot-spot histograms, then the flagged transformers."""
    if xf is None or not len(xf):
        return []
    val = summary.get("config", {}).get("validation", {})
    limits = (float(val.get("hot_spot_normal_c", 120.0)), float(val.get("hot_spot_emergency_c", 140.0)))
    parts = ["<h2>Transformers</h2>"]
    plot = _transformer_plot(xf, limits)
    if plot:
        parts.append(plot)
    if "flag_codes" in xf:
        flagged = xf[xf["flag_codes"].fillna("").astype(str).str.len() > 0]
        parts.append(f"<h3>Flagged transformers ({len(flagged):,} of {len(xf):,})</h3><p>All columns are "
                     "in <a href='transformers.parquet'>transformers.parquet</a>.</p>")
        parts.append(_table(flagged, _TRANSFORMER_COLUMNS, "transformers", max_rows) if len(flagged)
                     else "<p class='muted'>None.</p>")
    return parts


def _write_atomically(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it, so readers never see half a page."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_report(
    results: str | os.PathLike[str],
    *,
    store: str | os.PathLike[str] | None = None,
    max_feeders: int = 12,
    max_rows: int = 5000,
    client: Any = None,
) -> Path:
    """Write ``results/report.html``.

    Parameters
    ----------
    results : path-like
        A results folder written by ``phaseid run``.
    store : path-like, optional
        The store the results came from: data period, service type and location of meters, per-feeder
        projections. Defaults to the store named in ``summary.json`` when it still exists.
    max_feeders : int
        Feeders shown with a map and a projection (those with most corrections first, then by id).
    max_rows : int
        Rows of each worklist table shown in the page (the full lists are the CSV files).
    client : distributed.Client, optional
        Draw the feeders' maps and projections on its workers, side by side (each reads its own rows of
        the store); the page is the same.

    Returns
    -------
    pathlib.Path
        Path of the report.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    rdir = Path(results)
    meters, summary, xf, corr, review = _read_results(rdir)
    if store is None:
        store = summary.get("inputs", {}).get("store")
    ds, facts, locations = _store_facts(store)
    corr, review, mloc = (_located(df, locations) for df in (corr, review, meters))
    chosen = _chosen_feeders(meters, max_feeders)
    started = _start_feeder_figures(store, _feeder_inputs(ds, meters, mloc, corr, review, chosen), client)
    head = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>phaseid-hpc report</title>",
        f"<style>{_CSS}</style><script>{_JS}</script></head><body>",
        "<h1>phaseid-hpc: phase and transformer identification</h1>",
        _summary_html(rdir, summary, meters, corr, review, xf, facts, store),
        *_worklist_parts(rdir, corr, review, max_rows),
    ]
    confidence = _confidence_part(meters, summary)
    transformers = _transformers_parts(xf, summary, max_rows)
    figures = _finish_feeder_figures(started, client)
    parts = [
        *head,
        *_maps_parts(meters, [m for m, _ in figures]),
        confidence,
        *_feeders_parts(ds, meters, [p for _, p in figures]),
        *transformers,
        "</body></html>",
    ]
    return _write_atomically(rdir / "report.html", "\n".join(parts))
