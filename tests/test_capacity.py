"""Capacity mode: generated blocks through the job's per-block code, streamed consolidation, scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phaseid_hpc.capacity import combine_scores, consolidate_parts, plan_blocks, run_capacity
from phaseid_hpc.config import load_config
from phaseid_hpc.score import score_frames


def _one_block_per_substation():
    return load_config(overrides={"job": {"block_bytes": 1}}, environ={})


def test_capacity_equals_the_job_on_the_generated_store(tmp_path):
    """Same seed: capacity mode's rows are exactly those of ``run_job`` on the store the generator writes."""
    from phaseid_hpc.pipeline import run_job
    from phaseid_hpc.synth import generate_utility

    kw = {"n_meters": 420, "days": 5, "seed": 11, "feeder_meters": (100, 160)}
    cfg = _one_block_per_substation()
    generate_utility(tmp_path / "export", write_readings=False, store=tmp_path / "store.zarr", **kw)
    run_job(tmp_path / "store.zarr", tmp_path / "job", config=cfg, report=False)
    summary = run_capacity(tmp_path / "cap", config=cfg, **kw)

    job = pd.read_parquet(tmp_path / "job" / "meters.parquet")
    cap = pd.read_parquet(tmp_path / "cap" / "meters.parquet")
    pd.testing.assert_frame_equal(cap, job)
    assert summary.n_meters == len(job) == 420
    assert summary.n_blocks >= 2
    assert not list((tmp_path / "cap" / "partitions").glob("*.parquet")), "part files are removed"
    assert pq.read_metadata(tmp_path / "cap" / "transformers.parquet").num_rows > 0
    assert summary.client_peak_rss > 0 and summary.per_meter_us > 0
    assert {"generate", "quality", "phase"} <= set(summary.block_timings_s)

    whole = score_frames(job, pd.read_csv(tmp_path / "export" / "truth.csv", dtype=str))
    for key in ("meters", "accuracy", "coverage", "gis_accuracy", "accuracy_identified", "corrections"):
        assert summary.score["phase"][key] == pytest.approx(whole["phase"][key]), key
    assert summary.score["transformer"]["accuracy"] == pytest.approx(whole["transformer"]["accuracy"])


def test_plan_blocks_covers_every_meter_with_whole_substations():
    from phaseid_hpc.synth.generator import plan_utility

    blocks = plan_blocks(25_000, 4, 2880, 20e6)
    subs = [s for b in blocks for s in b]
    assert subs == list(enumerate(plan_utility(25_000, 4)))
    sizes = [sum(n for _, feeders in b for _, n in feeders) for b in blocks]
    assert sum(sizes) == 25_000 and len(blocks) > 3
    per_block = 20e6 / (4 * 2880)
    assert all(s >= per_block for s in sizes[:-1])  # closed only once the target is reached
    assert all(s - max(n for _, f in b for _, n in f) < per_block + 16_000 for s, b in zip(sizes, blocks))


def test_consolidate_parts_streams_in_order_and_unifies_types(tmp_path):
    a = pa.table({"meter_id": ["m1", "m2"], "flag": pa.nulls(2), "x": [1.0, 2.0]})
    b = pa.table({"meter_id": ["m3"], "flag": ["late clock"], "x": [3.0], "extra": [7]})
    pq.write_table(a, tmp_path / "p0.parquet")
    pq.write_table(b, tmp_path / "p1.parquet")
    n = consolidate_parts([tmp_path / "p0.parquet", tmp_path / "p1.parquet", tmp_path / "absent.parquet"],
                          tmp_path / "all.parquet")
    out = pq.read_table(tmp_path / "all.parquet")
    assert n == 3 and out.num_rows == 3
    assert out.schema.field("flag").type == pa.string()
    assert out.column("meter_id").to_pylist() == ["m1", "m2", "m3"]
    assert out.column("flag").to_pylist() == [None, None, "late clock"]
    assert out.column("extra").to_pylist() == [None, None, 7]


def test_combine_scores_equals_the_score_of_all_rows():
    rng = np.random.default_rng(0)
    n = 500
    truth = pd.DataFrame({"meter_id": [f"m{i}" for i in range(n)], "phase": rng.choice(list("ABC"), n),
                          "transformer_id": rng.choice(["t1", "t2", "t3"], n)})
    gis = np.where(rng.random(n) < 0.1, rng.choice(list("ABC"), n), truth["phase"])
    pred = np.where(rng.random(n) < 0.9, truth["phase"], rng.choice(list("ABC"), n)).astype(object)
    pred[rng.random(n) < 0.05] = None
    res = pd.DataFrame({"meter_id": truth["meter_id"], "phase_gis": gis, "phase": pred,
                        "phase_class": rng.choice(["confident", "probable", "unresolved"], n),
                        "changed": pd.notna(pred) & (pred != gis),
                        "transformer_id": truth["transformer_id"],
                        "transformer": np.where(rng.random(n) < 0.95, truth["transformer_id"], "t9"),
                        "transformer_changed": rng.random(n) < 0.03})
    parts = [score_frames(res.iloc[s], truth) for s in (slice(0, 123), slice(123, 400), slice(400, n))]
    whole = score_frames(res, truth)
    combined = combine_scores(parts)
    for key, value in combined["phase"].items():
        assert value == pytest.approx(whole["phase"][key]), key
    for key, value in combined["transformer"].items():
        assert value == pytest.approx(whole["transformer"][key]), key


def test_capacity_rejects_an_empty_utility(tmp_path: Path):
    from phaseid_hpc.errors import PhaseIDError

    with pytest.raises(PhaseIDError, match="n_meters"):
        run_capacity(tmp_path / "c", n_meters=0)


def test_cli_capacity_prints_the_figures(tmp_path, capsys):
    from phaseid_hpc.cli import main

    assert main(["capacity", "--n-meters", "150", "--days", "1", "--out", str(tmp_path / "c"),
                 "--workers", "0", "--seed", "2"]) == 0
    line = capsys.readouterr().out
    assert "150 meters x 96 samples" in line and "us per meter" in line and "phase accuracy" in line
    assert pq.read_metadata(tmp_path / "c" / "meters.parquet").num_rows == 150
