"""report.html written by the run itself; what a crew lead needs is in it; the outputs load cleanly."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from phaseid_hpc import contract
from phaseid_hpc.config import load_config
from phaseid_hpc.pipeline import run_job


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small synthetic utility (two feeders, with coordinates), ingested and run once (report included)."""
    from phaseid_hpc.ingest import ingest_files
    from phaseid_hpc.synth import generate_utility

    root = tmp_path_factory.mktemp("report")
    export = root / "export"
    generate_utility(export, n_meters=240, days=4, seed=5, feeder_meters=(100, 140))
    store = root / "store.zarr"
    ingest_files(sorted(str(p) for p in export.glob("readings*.parquet")), export / "meters.csv", store,
                 transformers_path=export / "transformers.csv", references_path=export / "references.parquet")
    out = root / "results"
    summary = run_job(store, out, config=load_config(environ={}))
    return {"store": store, "out": out, "summary": summary, "export": export,
            "html": (out / "report.html").read_text(encoding="utf-8")}


def _table_rows(page: str, table_id: str) -> int:
    m = re.search(rf"<table class='sortable' id='{table_id}'>.*?<tbody>(.*?)</tbody>", page, re.DOTALL)
    assert m, f"no table {table_id}"
    return m.group(1).count("<tr>")


def test_run_writes_the_report(run):
    assert run["summary"].files["report"] == str(run["out"] / "report.html")
    assert "report_failed" not in (run["out"] / "run.log").read_text()


def test_report_is_offline(run):
    page = run["html"]
    assert "http://" not in page and "https://" not in page
    assert "<script src" not in page and "<link" not in page  # inline JS and CSS only, no CDN
    assert "<script>" in page and "function phaseidSort" in page


def test_summary_has_period_run_date_store_and_counts_in_words(run):
    page = run["html"]
    import json

    summary = json.loads((run["out"] / "summary.json").read_text())
    assert re.search(r"data period</td><td>\d{4}-\d\d-\d\d \d\d:\d\d to \d{4}-\d\d-\d\d \d\d:\d\d UTC", page)
    assert re.search(r"run date</td><td>\d{4}-\d\d-\d\d \d\d:\d\d UTC", page)
    assert summary["inputs"]["store_fingerprint"][:16] in page
    n = summary["counts"]["meters"]
    assert f"<b>{n:,} meters</b> on 2 feeders analysed" in page
    assert f"{summary['counts']['confident']:,} (" in page
    assert "phase_changed" not in page  # no raw keys


def test_worklist_tables_match_the_csvs_and_carry_location(run):
    page = run["html"]
    corr = pd.read_csv(run["out"] / "corrections.csv")
    review = pd.read_csv(run["out"] / "review.csv")
    assert len(corr) > 0
    assert _table_rows(page, "corrections") == len(corr)
    if len(review):
        assert _table_rows(page, "review") == len(review)
    # confident corrections apart from review items
    assert page.index("Confident corrections") < page.index("Review items")
    assert "<a href='corrections.csv'>" in page and "<a href='review.csv'>" in page
    for header in ("service type", "lat [deg]", "lon [deg]", "phase confidence"):
        assert f">{header}</th>" in page
    # a meter's location in the page is its GIS location
    meters_gis = pd.read_csv(run["export"] / "meters.csv").set_index("meter_id")
    mid = str(corr["meter_id"].iloc[0])
    row = re.search(rf"<tr><td[^>]*>{corr['feeder_id'].iloc[0]}</td>.*?{mid}.*?</tr>", page)
    assert row and f"{meters_gis.loc[mid, 'lat']:.6f}" in row.group(0)


def test_plots_maps_and_transformer_table(run):
    page = run["html"]
    assert "<h2>Maps (2 of 2 feeders)</h2>" in page
    assert page.count('alt="feeder F') == 4  # a map and a projection per feeder
    assert 'alt="confidence histograms"' in page and 'alt="transformer loading and hot spot"' in page
    m = re.search(r"<table class='sortable' id='transformers'><thead><tr>(.*?)</tr>", page, re.DOTALL)
    if m:  # flagged transformers exist: the table has the columns that matter, not 30 of them
        headers = re.findall(r">([^<]+)</th>", m.group(1))
        assert headers[:3] == ["feeder", "transformer", "rating [kVA]"] and len(headers) <= 14
        assert "phases_x" not in page and "1.000</td><td class='num' data-v='1'" not in page


def test_feeder_figures_drawn_on_a_cluster_give_the_same_page(run):
    """With a client, the workers draw the feeders' maps and projections: the page is byte for byte the same."""
    from distributed import Client, LocalCluster

    from phaseid_hpc.report import write_report

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        path = write_report(run["out"], store=run["store"], client=client)
        tasks = client.run_on_scheduler(
            lambda dask_scheduler: [k for k in dask_scheduler.task_prefixes if "phaseid-report" in str(k)])
    assert tasks  # the figures were drawn there
    assert path.read_text(encoding="utf-8") == run["html"]


def test_report_failure_is_logged_not_fatal(run, monkeypatch):
    import phaseid_hpc.report

    def broken(*args, **kwargs):
        raise RuntimeError("disk full (test)")

    (run["out"] / "report.html").unlink()
    monkeypatch.setattr(phaseid_hpc.report, "write_report", broken)
    lines: list[str] = []
    summary = run_job(run["store"], run["out"], config=load_config(environ={}), echo=lines.append)
    assert summary.n_blocks_reused == summary.n_blocks  # same inputs: nothing recomputed
    assert "report" not in summary.files and not (run["out"] / "report.html").exists()
    log = (run["out"] / "run.log").read_text()
    assert "report_failed" in log and "disk full (test)" in log
    assert any("phaseid report --results" in s for s in lines)
    monkeypatch.undo()
    phaseid_hpc.report.write_report(run["out"])  # the store is found from summary.json
    assert "data period</td>" in (run["out"] / "report.html").read_text()


# ----------------------------------------------------------------------------------------------------------
# transformers.parquet loads cleanly
# ----------------------------------------------------------------------------------------------------------
def test_transformers_parquet_has_no_leftovers_and_integer_counts(run):
    xf = pd.read_parquet(run["out"] / "transformers.parquet")
    assert not [c for c in xf.columns if c.endswith(("_x", "_y"))]
    assert "flags" not in xf.columns and "flag_codes" in xf.columns  # DataFrame.flags stays pandas'
    for c in ("n_meters_gis", "n_meters_inferred", "meters_changed", "n_meters", "n_phases"):
        assert xf[c].dtype == np.int64, c
    assert xf["proposed_new"].dtype == bool
    assert set(xf["phases"].dropna()) <= set(contract.PHASE_LABELS)


def test_merge_keeps_one_phases_column_and_integer_counts():
    from phaseid_hpc.stages import _merge_transformer_tables

    mapping = pd.DataFrame({"transformer_id": ["T1", "T2", "NEW1"], "feeder_id": ["F", "F", "F"],
                            "n_meters_gis": [2, 1, 0], "n_meters_inferred": [2, 1, 1],
                            "phases": ["CA", "B", "A"],
                            "meters_changed": [0, 0, 1], "proposed_new": [False, False, True]})
    validation = pd.DataFrame({"transformer_id": ["T1", "T2", "T9"], "feeder_id": ["F", "F", "F"],
                               "phases": ["CA", "", "C"], "n_phases": [3, 1, 1], "n_meters": [2, 0, 0],
                               "flag_codes": [[], [], ["no_rating"]], "flag_reasons": [[], [], ["x"]]})
    out = _merge_transformer_tables(mapping, validation).set_index("transformer_id")
    assert "phases_x" not in out and "phases_y" not in out and "phases_mapping" not in out
    assert out.loc["NEW1", "phases"] == "A" and out.loc["T9", "phases"] == "C"
    assert out.loc["T1", "phases"] == "CA"
    assert out.loc["T2", "phases"] == "B"  # validation knows no meter there: the mapping's phases fill in
    assert out["n_meters"].dtype == np.int64 and out.loc["NEW1", "n_meters"] == 0
    assert out["n_meters_gis"].dtype == np.int64 and out.loc["T9", "n_meters_gis"] == 0
    assert out["proposed_new"].dtype == bool and not out.loc["T9", "proposed_new"]
    assert out.loc["NEW1", "flag_codes"] == []


def test_pair_phases_use_contract_names():
    from phaseid_hpc.transformer_mapping import _contract_phase_name
    from phaseid_hpc.validation import _PHASES_ON_NAMES

    assert _contract_phase_name({"C", "A"}) == "CA" and _contract_phase_name({"B", "A"}) == "AB"
    assert _contract_phase_name(set()) is None
    assert set(_PHASES_ON_NAMES[1:]) == set(contract.PHASE_LABELS)


# ----------------------------------------------------------------------------------------------------------
# In a real browser: the page renders, sorts and filters (Debian package chromium; skipped without it)
# ----------------------------------------------------------------------------------------------------------
_HARNESS = """<!doctype html><html><body><pre id="out">pending</pre>
<iframe id="f" src="report.html" style="width:1200px;height:800px"></iframe>
<script>
document.getElementById('f').addEventListener('load', function () {
  var d = document.getElementById('f').contentDocument, out = [];
  var t = d.getElementById('corrections'), ths = t.tHead.rows[0].cells, col = -1;
  function column() {
    return Array.prototype.map.call(t.tBodies[0].rows,
                                    function (r) { return r.cells[col].getAttribute('data-v'); });
  }
  for (var i = 0; i < ths.length; i++) { if (ths[i].textContent === 'phase confidence') { col = i; } }
  ths[col].click();
  out.push('asc=' + column().join(','));
  ths[col].click();
  out.push('desc=' + column().join(','));
  var box = d.querySelector("input[data-table='corrections']");
  box.value = 'METER_TO_FIND';
  box.dispatchEvent(new Event('input'));
  var shown = Array.prototype.filter.call(t.tBodies[0].rows,
                                          function (r) { return r.style.display !== 'none'; });
  out.push('shown=' + shown.length + ' count=' + d.getElementById('corrections-n').textContent);
  document.getElementById('out').textContent = out.join('\\n');
});
</script></body></html>"""


def test_worklist_sorts_and_filters_in_headless_chromium(run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium not installed (Debian package 'chromium')")
    corr = pd.read_csv(run["out"] / "corrections.csv")
    target = str(corr["meter_id"].iloc[len(corr) // 2])
    page = run["out"] / "harness.html"
    page.write_text(_HARNESS.replace("METER_TO_FIND", target))
    try:
        res = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--allow-file-access-from-files", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000",
             "--dump-dom", page.as_uri()],
            check=True, capture_output=True, timeout=120, text=True,
        )
    finally:
        page.unlink()
    out = re.search(r'<pre id="out">(.*?)</pre>', res.stdout, re.DOTALL).group(1)
    lines = dict(line.split("=", 1) for line in out.splitlines() if line.startswith(("asc=", "desc=")))
    asc = [float(x) for x in lines["asc"].split(",")]
    desc = [float(x) for x in lines["desc"].split(",")]
    assert asc == sorted(corr["phase_confidence"].tolist())  # numeric sort, all rows kept
    assert desc == sorted(asc, reverse=True)
    assert "shown=1 count=1" in out


def test_feeder_projection_matches_a_full_svd():
    """The truncated SVD of the report gives the plain PCA scores (up to the canonical sign)."""
    from phaseid_hpc.report import feeder_projection

    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 400)).cumsum(axis=1)
    v = 240 + np.repeat(base, [30, 40, 20], axis=0) + 0.5 * rng.standard_normal((90, 400)).cumsum(axis=1)
    v[5, :] = np.nan  # a meter without data stays NaN
    got = feeder_projection(v)
    d = np.diff(np.delete(v, 5, axis=0), axis=1)
    z = (d - d.mean(axis=1, keepdims=True)) / d.std(axis=1, keepdims=True)
    u, s, _ = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
    ref = u[:, :2] * s[:2]
    assert np.isnan(got[5]).all()
    np.testing.assert_allclose(np.abs(np.delete(got, 5, axis=0)), np.abs(ref), atol=1e-8)


def test_minimal_results_without_store_transformers_or_work(tmp_path):
    """Only meters.parquet and empty worklists (no store, no coordinates, no transformer stages): a page."""
    import warnings

    from phaseid_hpc.report import write_report

    meters = pd.DataFrame({"meter_id": ["m1", "m2", "m3"], "feeder_id": ["F", "F", "F"],
                           "transformer_id": ["T", "T", "T"], "phase_gis": ["A", "B", "C"],
                           "phase": ["A", "B", "C"], "phase_confidence": [0.9, np.nan, 0.2],
                           "phase_class": ["confident", "insufficient_data", "low"],
                           "changed": [False, False, False], "reasons": ["", "No Readings", ""]})
    meters.to_parquet(tmp_path / "meters.parquet", index=False)
    header = ("feeder_id,transformer_id,meter_id,correction,phase_gis,phase,phase_confidence,phase_class,"
              "reasons\n")
    (tmp_path / "corrections.csv").write_text(header)
    (tmp_path / "review.csv").write_text(header)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = write_report(tmp_path).read_text()
    assert "No confident corrections" in page and "Maps" not in page and "Transformers</h2>" not in page
    assert "<b>3 meters</b> on 1 feeder analysed" in page
