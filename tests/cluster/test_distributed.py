"""The job on a real multi-process cluster: a ``dask scheduler`` and two ``dask worker`` processes started
from the command line (memory limits, one thread each), one worker SIGKILLed mid-run.

The run must complete, and its deterministic outputs must be byte-identical to an in-process run.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phaseid_hpc.config import load_config
from phaseid_hpc.pipeline import run_job

DETERMINISTIC = ("meters.parquet", "corrections.csv", "transformers.parquet")


def _dask_cli() -> str:
    """Path of the ``dask`` command (beside this interpreter first), or skip the test."""
    here = Path(sys.executable).with_name("dask")
    found = str(here) if here.is_file() else shutil.which("dask")
    if found is None:
        pytest.skip("the 'dask' command (distributed's CLI) is not installed")
    return found


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A small generated store: 6 feeders, 7 days."""
    from phaseid_hpc.synth import generate_utility

    root = tmp_path_factory.mktemp("dist")
    path = root / "store.zarr"
    generate_utility(root / "export", n_meters=900, days=7, seed=5, feeder_meters=(120, 200),
                     write_readings=False, store=path)
    return path


@pytest.fixture
def cluster(tmp_path) -> Iterator[dict]:
    """``dask scheduler`` + 2 ``dask worker`` subprocesses (1 thread, 1.5 GiB each); torn down after."""
    dask = _dask_cli()
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                          "--scheduler-file", str(sched_file)], env=env, cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ]
    try:
        deadline = time.monotonic() + 30
        while not sched_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sched_file.is_file(), "dask scheduler did not start within 30 s"
        for i in range(2):
            procs.append(subprocess.Popen(
                [dask, "worker", "--scheduler-file", str(sched_file), "--nthreads", "1", "--nworkers", "1",
                 "--memory-limit", "1.5GiB", "--no-dashboard", "--name", f"w{i}", "--local-directory",
                 str(tmp_path / f"w{i}")],
                env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
        yield {"scheduler_file": str(sched_file), "procs": procs}
    finally:
        for p in reversed(procs):  # the whole session of each: a worker's nanny and its worker process
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_job_survives_a_sigkilled_worker_on_a_cli_cluster(store, cluster, tmp_path):
    from distributed import Client

    cfg = load_config(overrides={"job": {"block_bytes": 1}}, environ={})  # one block per feeder
    reference = tmp_path / "reference"
    ref = run_job(store, reference, config=cfg, report=False)
    assert ref.n_blocks >= 4
    out = tmp_path / "cluster"
    with Client(scheduler_file=cluster["scheduler_file"], timeout="30s") as client:
        client.wait_for_workers(2, timeout=30)
        assert len(client.scheduler_info()["workers"]) == 2
        limits = [w["memory_limit"] for w in client.scheduler_info()["workers"].values()]
        assert all(0 < m <= 1.6 * 2**30 for m in limits)
        result: dict = {}
        th = threading.Thread(target=lambda: result.update(
            s=run_job(store, out, config=cfg, client=client, report=False)))
        th.start()
        deadline = time.monotonic() + 30
        victim = None
        while time.monotonic() < deadline and victim is None:
            busy = sorted(w for w, ts in client.processing().items() if ts)
            victim = busy[0] if busy else None
            time.sleep(0.005)
        assert victim is not None, "no block ever started on the cluster"
        pid = client.run(os.getpid, workers=[victim])[victim]
        done_at_kill = len(list((out / "partitions").glob("block-*[0-9a-f].parquet")))
        os.kill(pid, signal.SIGKILL)
        th.join(timeout=60)
        assert not th.is_alive() and "s" in result, "the run did not complete after the worker was killed"
    assert done_at_kill < ref.n_blocks, "the worker must be killed mid-run"
    assert result["s"].n_meters == ref.n_meters == 900
    for name in DETERMINISTIC:
        if (reference / name).exists() or (out / name).exists():
            assert filecmp.cmp(reference / name, out / name, shallow=False), name
