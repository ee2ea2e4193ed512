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
        ("synth", ["synth", "--n-meters", "150", "--days", "4", "--seed", "2", "--out", str(root / "export")]),
        ("ingest", ["ingest", "--readings", str(root / "export" / "readings.parquet"), "--meters",
                    str(root / "export" / "meters.csv"),
                    "--transformers", str(root / "export" / "transformers.csv"),
                    "--store", str(root / "store.zarr")]),
        ("run", ["run", "--store", str(root / "store.zarr"), "--results", str(root / "results"),
                 "--workers", "0"]),
    ):
        buf, err = io.StringIO(), io.StringIO()  # stderr a StringIO: not a terminal, so plain progress lines
        cap.setattr(sys, "stdout", buf)
        cap.setattr(sys, "stderr", err)
        try:
            assert main(argv) == 0
        finally:
            cap.undo()
        printed[name] = buf.getvalue()
        printed[name + ".err"] = err.getvalue()
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


def test_run_progress_is_plain_lines_with_rate_and_eta_when_stderr_is_not_a_terminal(utility):
    err = utility["printed"]["run.err"]
    lines = [ln for ln in err.splitlines() if ln.startswith("identify:")]
    assert "\r" not in err
    assert lines and lines[0].startswith("identify: 0/") and "ETA" in lines[0]
    n = lines[-1].split("/", 1)[0].split()[-1]
    assert lines[-1].startswith(f"identify: {n}/{n} blocks (100%)") and "blocks/s" not in lines[-1]
    assert "block/s" in lines[-1] or "s/block" in lines[-1]  # a rate from tqdm's formatter


def test_ingest_progress_counts_every_row_of_the_readings(utility):
    import pyarrow.parquet as pq

    from phaseid_hpc.ingest import count_reading_rows

    readings = utility["root"] / "export" / "readings.parquet"
    n = pq.ParquetFile(readings).metadata.num_rows
    assert count_reading_rows([readings]) == n
    lines = [ln for ln in utility["printed"]["ingest.err"].splitlines() if ln.startswith("ingest:")]
    assert lines[0].startswith(f"ingest: 0/{n} rows")
    assert lines[-1].startswith(f"ingest: {n}/{n} rows (100%)")


def test_count_reading_rows_of_a_csv_without_a_final_newline(tmp_path):
    from phaseid_hpc.ingest import count_reading_rows

    (tmp_path / "a.csv").write_text("meter_id,timestamp,voltage_v\nm1,2026-01-01T00:15Z,240\nm1,2026-01-01T00:30Z,241")
    (tmp_path / "b.csv").write_text("meter_id,timestamp,voltage_v\nm1,2026-01-01T00:15Z,240\n")
    assert count_reading_rows([tmp_path / "a.csv", tmp_path / "b.csv"]) == 3


def test_progress_bar_on_a_terminal_is_a_tqdm_bar_and_plain_lines_elsewhere():
    import io

    from tqdm import tqdm

    from phaseid_hpc.console import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    bar = progress_bar(4, "identify", file=term)
    assert isinstance(bar, tqdm)
    for _ in range(4):
        bar.update()
    bar.close()
    assert "\r" in term.getvalue() and "4/4" in term.getvalue()

    log = io.StringIO()
    bar = progress_bar(1000, "ingest", "row", file=log, interval_s=3600.0)
    for _ in range(10):
        bar.update(100)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()  # the start and the end, nothing between
    assert lines[0].startswith("ingest: 0/1000 rows (0%)") and lines[1].startswith("ingest: 1000/1000 rows (100%)")
    quiet = io.StringIO()
    off = progress_bar(3, "identify", enabled=False, file=quiet)
    off.update()
    off.close()
    assert quiet.getvalue() == ""


@pytest.mark.parametrize(
    ("argv", "old", "new", "dest", "value"),
    [
        (["run", "--store", "s.zarr", "--out", "r/"], "--out", "--results", "results", "r/"),
        (["score", "--out", "r/", "--truth", "t.csv"], "--out", "--results", "results", "r/"),
        (["report", "--out", "r/"], "--out", "--results", "results", "r/"),
        (["synth", "--meters", "12", "--out", "e/"], "--meters", "--n-meters", "n_meters", 12),
        (["demo", "--meters", "12"], "--meters", "--n-meters", "n_meters", 12),
    ],
)
def test_old_flag_names_still_work_with_a_deprecation_note(argv, old, new, dest, value, capsys):
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    assert f"{old} is deprecated" in err and f"use {new}" in err
    args = build_parser().parse_args([new if a == old else a for a in argv])
    assert getattr(args, dest) == value and capsys.readouterr().err == ""  # the new name: no note


def test_one_name_per_concept():
    """``--results`` is the results folder for run, score and report; ``--meters`` is the meters file
    (ingest) and never a count; a count of meters is ``--n-meters``."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("run", "score", "report"):
        results = next(a for a in subparsers.choices[name]._actions if "--results" in a.option_strings)
        assert results.dest == "results" and "deprecated" not in results.help
    for name in ("synth", "demo"):
        meters = next(a for a in subparsers.choices[name]._actions if "--meters" in a.option_strings)
        assert meters.help.startswith("deprecated spelling of --n-meters")
    ingest_meters = next(a for a in subparsers.choices["ingest"]._actions if "--meters" in a.option_strings)
    assert "deprecated" not in (ingest_meters.help or "")


def test_missing_results_folder_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--store", "s.zarr"])
    assert exc.value.code == 64
    assert "required: --results (or its old spelling --out)" in capsys.readouterr().err


def test_checked_in_default_toml_is_generated_from_the_config_docs(capsys):
    from phaseid_hpc.config_docs import default_toml

    assert main(["config", "show", "--toml"]) == 0
    assert capsys.readouterr().out == default_toml()  # the command writes the file byte for byte
    checked_in = (ROOT / "configs" / "default.toml").read_text()
    assert checked_in == default_toml(), (
        "configs/default.toml is out of date: regenerate it with `phaseid config show --toml > configs/default.toml`"
    )


def test_ingest_service_help_offers_stomp_without_a_url_option(capsys):
    with pytest.raises(SystemExit):
        main(["ingest-service", "--help"])
    out = capsys.readouterr().out
    assert "--stomp " in out and "--stomp-url-file" in out and "PHASEID_STOMP_URL" in out
    with pytest.raises(SystemExit) as exc:  # a URL (with its password) is not accepted on the command line
        main(["ingest-service", "--stomp", "stomp://u:pw@h:61613/", "--queue", "q", "--store", "s"])
    assert exc.value.code == 64
