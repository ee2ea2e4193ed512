"""The command line as a new user meets it: summaries, usage errors, help, config, packaging."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from phaseid_hpc.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def utility(tmp_path_factory):
    """synth -> ingest -> run through the command line; what each command printed."""
    root = tmp_path_factory.mktemp("cli")
    printed: dict[str, str] = {}
    cap = pytest.MonkeyPatch()
    import io

    for name, argv in (
        ("synth", ["synth", "--meters", "150", "--days", "4", "--seed", "2", "--out", str(root / "export")]),
        ("ingest", ["ingest", "--readings", str(root / "export" / "readings.parquet"), "--meters",
                    str(root / "export" / "meters.csv"),
                    "--transformers", str(root / "export" / "transformers.csv"),
                    "--store", str(root / "store.zarr")]),
        ("run", ["run", "--store", str(root / "store.zarr"), "--out", str(root / "results"), "--workers", "0",
                 "--no-progress"]),
    ):
        buf = io.StringIO()
        cap.setattr(sys, "stdout", buf)
        try:
            assert main(argv) == 0
        finally:
            cap.undo()
        printed[name] = buf.getvalue()
    return {"root": root, "printed": printed}


@pytest.mark.parametrize("command", ["synth", "ingest", "run"])
def test_each_command_prints_a_readable_summary(utility, command):
    text = utility["printed"][command]
    for repr_start in ("SynthResult(", "IngestReport(", "RunSummary(", "{'", "elapsed_s="):
        assert repr_start not in text, text
    assert len(text.splitlines()) <= 20
    assert "150 meters" in text


def test_ingest_and_run_summaries_name_period_time_and_outputs(utility):
    ingest, run = utility["printed"]["ingest"], utility["printed"]["run"]
    assert "period: 2026-" in ingest and " UTC (4.0 days)" in ingest
    assert "Ingested into" in ingest and " s\n" in ingest.splitlines()[0] + "\n"
    assert "data period: 2026-" in run and "15-min intervals" in run
    assert "confident" in run and "corrections:" in run
    for name in ("corrections.csv", "review.csv", "meters.parquet", "report.html"):
        assert name in run
    assert (utility["root"] / "results" / "report.html").exists()  # phaseid run writes the report


@pytest.mark.parametrize("value", ["-1", "two"])
def test_negative_workers_is_a_usage_error(value, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "r"), "--workers", value])
    assert exc.value.code == 64  # usage errors apart from data errors (2)
    err = capsys.readouterr().err
    assert "argument --workers" in err and (">= 0" in err)
    assert not (tmp_path / "r").exists()  # nothing started


def test_every_option_has_help_and_defaults_are_shown(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.help is None and not isinstance(action, argparse._SubParsersAction):
                missing.append(f"{name} {action.option_strings}")
    assert not missing
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    out = capsys.readouterr().out
    assert "(default: 2000)" in out and "example:" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "phaseid run --store" in out


def test_python_dash_m_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "phaseid_hpc", "--version"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, check=False)
    assert res.returncode == 0 and res.stdout.startswith("phaseid-hpc ")


def test_configs_ship_in_the_package():
    base = resources.files("phaseid_hpc") / "configs"
    assert (base / "default.toml").is_file()
    assert (base / "default.toml").read_text() == (ROOT / "configs" / "default.toml").read_text()
    for name in ("cluster-local.toml", "cluster-slurm.toml", "cluster-gpu.toml", "cluster-tls.toml"):
        assert (base / name).is_file(), name
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'phaseid_hpc = ["configs/*.toml"' in pyproject  # what puts them in the wheel


def test_packaged_config_names_resolve():
    from phaseid_hpc.cli import _config_path
    from phaseid_hpc.cluster import load_cluster_spec

    assert load_cluster_spec(_config_path("cluster-local")).kind == "local"
    assert _config_path("no-such-config.toml") == "no-such-config.toml"  # left for the loader to name


def test_config_show_prints_every_key_default_and_doc(capsys):
    import dataclasses

    from phaseid_hpc.config import RunConfig
    from phaseid_hpc.config_docs import config_keys

    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    cfg = RunConfig()
    n = 0
    for sec in dataclasses.fields(cfg):
        assert f"[{sec.name}]" in out
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            assert f"\n  {f.name} = " in out, f"{sec.name}.{f.name}"
            n += 1
    keys = config_keys()
    assert len(keys) == n and all(k.doc for k in keys)  # every key documented
    assert "confident_threshold = 0.85" in out and "Confidence at or above which a meter is" in out


def test_config_show_toml_round_trips(capsys, tmp_path):
    from phaseid_hpc.config import RunConfig, load_config

    assert main(["config", "show", "--toml"]) == 0
    p = tmp_path / "all.toml"
    p.write_text(capsys.readouterr().out)
    assert load_config(p, environ={}) == RunConfig()
    assert p.read_text().count("\n# ") > 60  # documented
