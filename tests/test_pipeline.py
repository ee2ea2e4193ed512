"""End to end: synthetic utility -> ingest -> job (in process, LocalCluster) -> outputs, resume, faults."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from phaseid_hpc.config import load_config
from phaseid_hpc.errors import PhaseIDError
from phaseid_hpc.pipeline import run_job

DETERMINISTIC = ("meters.parquet", "corrections.csv", "transformers.parquet")


@pytest.fixture(scope="module")
def utility(tmp_path_factory):
    """A small synthetic utility (several feeders), ingested into a store."""
    from phaseid_hpc.ingest import ingest_files
    from phaseid_hpc.synth import generate_utility

    root = tmp_path_factory.mktemp("utility")
    export = root / "export"
    generate_utility(export, n_meters=600, days=7, seed=3, feeder_meters=(100, 200))
    store = root / "store.zarr"
    ingest_files(
        sorted(str(p) for p in export.glob("readings*.parquet")),
        export / "meters.csv",
        store,
        transformers_path=export / "transformers.csv",
        references_path=export / "references.parquet",
    )
    return {"export": export, "store": store}


def _small_blocks():
    # tiny blocks so the job has several partitions even on a small store
    return load_config(overrides={"job": {"block_bytes": 1}}, environ={})


def _same_outputs(a: Path, b: Path) -> None:
    for name in DETERMINISTIC:
        if (a / name).exists() or (b / name).exists():
            assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_run_in_process_writes_every_output(utility, tmp_path):
    out = tmp_path / "r"
    summary = run_job(utility["store"], out, config=_small_blocks())
    assert summary.n_blocks > 1
    meters = pd.read_parquet(out / "meters.parquet")
    truth = pd.read_csv(utility["export"] / "truth.csv")
    assert sorted(meters["meter_id"]) == sorted(truth["meter_id"])  # no meter disappears
    for col in ("meter_id", "feeder_id", "transformer_id", "phase_gis", "phase", "phase_confidence",
                "phase_class", "changed", "reasons", "clock_offset_s", "usable_fraction"):
        assert col in meters
    assert meters["phase_confidence"].between(0, 1).all()
    assert set(meters["phase_class"]) <= {"confident", "suspect", "low", "insufficient_data"}
    corr = pd.read_csv(out / "corrections.csv")
    assert list(corr[["feeder_id", "transformer_id", "meter_id"]].itertuples(index=False)) == sorted(
        corr[["feeder_id", "transformer_id", "meter_id"]].itertuples(index=False)
    )
    # the worklist holds confident changes only; disagreements that are not confident go to review.csv
    assert set(corr.loc[corr["correction"].str.contains("phase"), "phase_class"]) <= {"confident"}
    review = pd.read_csv(out / "review.csv")
    assert not set(review["meter_id"]) & set(corr["meter_id"])
    rec = meters.set_index("meter_id")
    assert (rec.loc[review["meter_id"], "phase"] == rec.loc[review["meter_id"], "phase_gis"]).all()
    summary_json = json.loads((out / "summary.json").read_text())
    assert summary_json["counts"]["meters"] == len(meters)
    assert summary_json["inputs"]["store_fingerprint"]
    assert (out / "run.log").read_text().count("run_done") == 1

    from phaseid_hpc.score import score_results

    score = score_results(out, utility["export"] / "truth.csv")
    # the job must beat the GIS labels it was given (which carry injected errors)
    assert score["phase"]["accuracy"] > score["phase"]["gis_accuracy"]


def test_rerun_reuses_partitions_and_is_identical(utility, tmp_path):
    cfg = _small_blocks()
    a = run_job(utility["store"], tmp_path / "a", config=cfg)
    b = run_job(utility["store"], tmp_path / "a", config=cfg)
    assert b.n_blocks_reused == a.n_blocks
    c = run_job(utility["store"], tmp_path / "c", config=cfg)
    _same_outputs(tmp_path / "a", tmp_path / "c")
    assert c.n_blocks_reused == 0


def test_identical_across_worker_counts(utility, tmp_path):
    from phaseid_hpc.cluster import ClusterSpec
    from phaseid_hpc.jobs import run_with_cluster

    cfg = _small_blocks()
    run_job(utility["store"], tmp_path / "serial", config=cfg)
    run_with_cluster(utility["store"], tmp_path / "two", config=cfg, progress=False, echo=lambda s: None,
                     spec=ClusterSpec(kind="local", n_workers=2, dashboard_address=None))
    _same_outputs(tmp_path / "serial", tmp_path / "two")


def test_unwritable_output_fails_at_start(utility, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): permissions cannot be tested")
        with pytest.raises(PhaseIDError, match="not writable"):
            run_job(utility["store"], ro / "out")
    finally:
        ro.chmod(0o700)


def test_missing_store_is_named(tmp_path):
    with pytest.raises(PhaseIDError, match="does not exist"):
        run_job(tmp_path / "nope.zarr", tmp_path / "out")


def test_kill_9_mid_run_then_resume_is_byte_identical(utility, tmp_path):
    reference = tmp_path / "reference"
    run_job(utility["store"], reference, config=_small_blocks())
    out = tmp_path / "interrupted"
    env = dict(os.environ, PHASEID__JOB__BLOCK_BYTES="1")
    cmd = [sys.executable, "-m", "phaseid_hpc.cli", "run", "--store", str(utility["store"]), "--results", str(out),
           "--workers", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "partitions"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("block-*[0-9a-f].parquet"))) < 1:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("block-*[0-9a-f].parquet")))
    n_blocks = len(list((reference / "partitions").glob("block-*[0-9a-f].parquet")))
    assert 1 <= done_before < n_blocks, "the kill must land mid-run"
    summary = run_job(utility["store"], out, config=_small_blocks())
    assert summary.n_blocks_reused == done_before
    _same_outputs(reference, out)


def test_worker_killed_mid_run_still_completes_identically(utility, tmp_path):
    from distributed import Client, LocalCluster

    reference = tmp_path / "reference"
    cfg = _small_blocks()
    run_job(utility["store"], reference, config=cfg)
    n_blocks = len(list((reference / "partitions").glob("block-*[0-9a-f].parquet")))
    out = tmp_path / "faulty"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        result: dict = {}
        th = threading.Thread(target=lambda: result.update(s=run_job(utility["store"], out, config=cfg,
                                                                      client=client)))
        th.start()
        # kill a worker while it is running a block: that block must be recomputed elsewhere
        deadline = time.monotonic() + 120
        victim = None
        while time.monotonic() < deadline and victim is None:
            busy = {w: ts for w, ts in client.processing().items() if ts}
            victim = sorted(busy)[0] if busy else None
            time.sleep(0.005)
        assert victim is not None, "no block ever started"
        done_at_kill = len(list((out / "partitions").glob("block-*[0-9a-f].parquet")))
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        th.join(timeout=240)
        assert not th.is_alive() and "s" in result
    assert done_at_kill < n_blocks, "the worker must be killed mid-run"
    _same_outputs(reference, out)


def test_delta_run_recomputes_only_event_feeders(utility, tmp_path):
    from phaseid_hpc.delta import run_delta

    cfg = _small_blocks()
    prev = tmp_path / "prev"
    run_job(utility["store"], prev, config=cfg)
    meters = pd.read_parquet(prev / "meters.parquet")
    feeder = sorted(meters["feeder_id"].unique())[0]
    meter = meters.loc[meters["feeder_id"] == feeder, "meter_id"].iloc[0]
    ev = tmp_path / "events.csv"
    ev.write_text(f"meter_id,timestamp,event\n{meter},2026-06-03T04:00:00Z,restoration\n")
    # tamper with the previous result of another feeder: a delta run must copy it, not recompute it
    other = meters["feeder_id"] != feeder
    meters.loc[other, "phase_confidence"] = 0.123
    meters.to_parquet(prev / "meters.parquet", index=False)
    summary = run_delta(utility["store"], tmp_path / "delta", since=prev, events=ev, config=cfg)
    new = pd.read_parquet(tmp_path / "delta" / "meters.parquet")
    assert len(new) == len(meters)
    assert (new.loc[new["feeder_id"] != feeder, "phase_confidence"] == 0.123).all()
    assert (new.loc[new["feeder_id"] == feeder, "phase_confidence"] != 0.123).all()
    assert json.loads((tmp_path / "delta" / "summary.json").read_text())["delta"]["recomputed_feeders"] == [feeder]
    assert summary.n_blocks < len(list((prev / "partitions").glob("block-*[0-9a-f].parquet")))


def test_report_renders_offline(utility, tmp_path):
    from phaseid_hpc.report import write_report

    out = tmp_path / "r"
    run_job(utility["store"], out, config=_small_blocks())
    path = write_report(out, store=utility["store"])
    text = path.read_text()
    assert text.count("data:image/png;base64,") >= 2
    assert "http://" not in text and "https://" not in text  # nothing fetched from the network
    assert "Corrections worklist" in text


def test_report_screenshot_in_headless_chromium(utility, tmp_path):
    """The page renders in a real browser (Debian package chromium); skipped where none is installed."""
    import shutil as _shutil

    from phaseid_hpc.report import write_report

    browser = _shutil.which("chromium") or _shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium not installed (Debian package 'chromium')")
    out = tmp_path / "r"
    run_job(utility["store"], out, config=_small_blocks())
    page = write_report(out, store=utility["store"])
    png = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", f"--screenshot={png}",
         page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    from matplotlib.image import imread

    img = imread(png)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    # a rendered page with plots is far from a blank screen: many distinct colours
    assert len({tuple(px) for px in (img[::8, ::8, :3] * 255).astype(int).reshape(-1, 3)}) > 50


def test_output_under_a_file_fails_at_start_with_the_path(utility, tmp_path):
    """Works as root too: nothing can create a folder below a regular file."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(PhaseIDError, match="not-a-folder.*not writable"):
        run_job(utility["store"], blocker / "out")


def test_a_run_reads_one_version_of_the_store(utility, tmp_path):
    """A run that starts during a write waits for its commit, and a writer waits for the run's reads."""
    import threading

    from phaseid_hpc.store import exclusive_lock

    lock_file = Path(utility["store"]) / "_phaseid" / "lock"
    events = []
    with exclusive_lock(lock_file, "test writer"):
        t = threading.Thread(target=lambda: events.append(run_job(utility["store"], tmp_path / "r",
                                                                  config=_small_blocks())))
        t.start()
        t.join(timeout=3)
        assert t.is_alive() and not events  # the run waits for the writer
    t.join(timeout=240)
    assert events and (tmp_path / "r" / "meters.parquet").exists()
    assert "store_busy" in (tmp_path / "r" / "run.log").read_text()


def test_a_three_phase_service_on_a_single_phase_transformer_goes_to_review(tmp_path):
    """GIS contradicting itself reaches review.csv even where the voltage gave no other answer."""
    from phaseid_hpc.pipeline import _write_outputs
    from phaseid_hpc.transformer_mapping import REASON_TX_THREE_PHASE_ON_SINGLE

    meters = pd.DataFrame({
        "meter_id": ["M1", "M2", "M3"], "feeder_id": "F1", "transformer_id": ["T1", "T1", "T2"],
        "phase_gis": ["ABC", "A", "B"], "phase": ["ABC", "A", "B"], "phase_inferred": ["ABC", "A", "B"],
        "phase_confidence": [0.1, 0.99, 0.99], "phase_class": ["low", "confident", "confident"],
        "changed": False, "transformer": ["T1", "T1", "T2"], "transformer_inferred": ["T1", "T1", "T2"],
        "transformer_confidence": [0.0, 0.99, 0.99], "transformer_class": ["low", "confident", "confident"],
        "transformer_changed": False,
        "reasons": [REASON_TX_THREE_PHASE_ON_SINGLE, "", ""],
    })
    _write_outputs(tmp_path, meters, pd.DataFrame())
    review = pd.read_csv(tmp_path / "review.csv")
    assert review["meter_id"].tolist() == ["M1"]
    assert pd.read_csv(tmp_path / "corrections.csv").empty
