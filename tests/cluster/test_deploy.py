from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from phaseid_hpc.cluster import ClusterSpec, get_client, load_cluster_spec
from phaseid_hpc.errors import BackendUnavailableError, ClusterError, ConfigError


def _square(x: int) -> int:
    return x * x


def _malloc_arenas() -> str | None:
    import os

    return os.environ.get("MALLOC_ARENA_MAX")


def test_local_cluster_runs_tasks():
    with get_client(ClusterSpec(kind="local", n_workers=1, dashboard_address=None)) as client:
        assert client.submit(_square, 7).result() == 49
        # one malloc arena per worker: the block's arrays come from the heap heap_for_arrays keeps
        assert set(client.run(_malloc_arenas).values()) == {"1"}


def test_unreachable_scheduler_fails_fast_with_address():
    with pytest.raises((ClusterError, OSError), match="127.0.0.1:1"):
        with get_client(ClusterSpec(kind="scheduler", address="tcp://127.0.0.1:1"), timeout_s=2):
            pass


def test_backends_are_lazy_and_missing_ones_are_named():
    assert "dask_jobqueue" not in sys.modules and "cupy" not in sys.modules
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match=r"phaseid-hpc\[hpc\]"):
            with get_client(ClusterSpec(kind="slurm")):
                pass


def test_cluster_configs_in_repo_parse():
    from pathlib import Path

    for p in sorted((Path(__file__).parents[2] / "configs").glob("cluster-*.toml")):
        spec = load_cluster_spec(p)
        assert spec.kind in ("local", "scheduler", "slurm", "gpu")


def test_bad_cluster_config(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[cluster]\nkind = 'k8s'\n")
    with pytest.raises(ConfigError, match="kind"):
        load_cluster_spec(p)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_local_cluster_with_self_signed_certificates(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    spec = ClusterSpec(kind="local", n_workers=1, dashboard_address=None,
                       tls={"ca_file": str(cert), "cert": str(cert), "key": str(key)})
    with get_client(spec) as client:
        assert client.scheduler.address.startswith("tls://")
        assert client.submit(_square, 5).result() == 25


def test_tls_missing_file_is_named(tmp_path):
    spec = ClusterSpec(kind="local", tls={"ca_file": str(tmp_path / "ca.pem"), "cert": "x", "key": "y"})
    with pytest.raises(ConfigError, match="ca_file"), get_client(spec):
        pass
