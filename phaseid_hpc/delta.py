"""Delta runs: recompute only the feeders touched by outage/restoration events, copy the rest.

Field crews restoring service after an outage sometimes reconnect a customer to another phase without
updating GIS. A nightly delta run takes the previous results and an events file and:

1. finds the feeders of the meters with events (:func:`affected_feeders`) and why each is recomputed
   (:func:`delta_plan`);
2. recomputes only those feeders' rows of the store, not the whole blocks they sit in
   (:func:`affected_blocks`), with ``[changes] events_file`` set to the events, so that the window after a
   restoration decides the answer of a meter with one (:mod:`phaseid_hpc.changes`; the change-point search
   of meters without events is left to the full run unless asked for);
3. copies every other feeder's rows from the previous results unchanged, and writes to ``run.log`` and
   ``summary.json`` which feeders and meters were recomputed and why (:func:`run_delta`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .changes import EVENT_COLUMNS, read_events
from .config import RunConfig
from .errors import ContractError

__all__ = ["EVENT_COLUMNS", "affected_blocks", "affected_feeders", "delta_plan", "read_events", "run_delta"]


def affected_feeders(events: pd.DataFrame, meter_table: pd.DataFrame) -> list[str]:
    """Feeders holding at least one meter with an event (sorted).

    Raises
    ------
    ContractError
        When an event names a meter that is not in the store.
    """
    return sorted(delta_plan(events, meter_table)["feeder_id"].unique().tolist())


def delta_plan(events: pd.DataFrame, meter_table: pd.DataFrame) -> pd.DataFrame:
    """One row per meter with events: ``feeder_id, meter_id, events`` (e.g. ``outage 2026-06-03T02:00Z;
    restoration 2026-06-03T04:00Z``), sorted by feeder and meter.

    Parameters
    ----------
    events : DataFrame
        ``meter_id, timestamp, event`` (:func:`~phaseid_hpc.changes.read_events`).
    meter_table : DataFrame
        ``meter_id`` (or ``meter``) and ``feeder_id`` of every meter of the store.

    Raises
    ------
    ContractError
        When an event names a meter that is not in the store.
    """
    ids = meter_table["meter_id"] if "meter_id" in meter_table else meter_table["meter"]
    lookup = pd.Series(meter_table["feeder_id"].astype(str).to_numpy(), index=ids.astype(str).to_numpy())
    unknown = sorted(set(events["meter_id"].astype(str)) - set(lookup.index))
    if unknown:
        raise ContractError(f"events name meter(s) not in the store: {unknown[:5]}")
    ev = events.assign(meter_id=events["meter_id"].astype(str)).sort_values(["meter_id", "timestamp"], kind="stable")
    rows = []
    for mid, g in ev.groupby("meter_id", sort=True):
        what = "; ".join(f"{e} {pd.Timestamp(t).strftime('%Y-%m-%dT%H:%MZ')}" for e, t in zip(g["event"], g["timestamp"]))
        rows.append((lookup[mid], mid, what))
    plan = pd.DataFrame(rows, columns=["feeder_id", "meter_id", "events"])
    return plan.sort_values(["feeder_id", "meter_id"], kind="stable").reset_index(drop=True)


def affected_blocks(meter_table: pd.DataFrame, blocks: Sequence[Any], feeders: Iterable[str]) -> list[Any]:
    """The store rows of ``feeders``: each block cut down to its runs of consecutive affected feeders.

    Parameters
    ----------
    meter_table : DataFrame
        ``feeder_id`` of every meter, in store order (feeders contiguous).
    blocks : sequence of FeederBlock
        ``(start, stop, feeder_ids)`` of the full run (:func:`phaseid_hpc.store.feeder_blocks`).
    feeders : iterable of str
        The affected feeders.

    Returns
    -------
    list of FeederBlock
        Blocks of the same type, holding only affected feeders, in store order: a delta run reads and
        computes those feeders' meters only, however many other feeders share their block.
    """
    wanted = set(map(str, feeders))
    fid = meter_table["feeder_id"].astype(str).to_numpy()
    span = pd.Series(range(len(fid))).groupby(fid, sort=False).agg(["min", "max"])
    out = []
    for b in blocks:
        run: list[str] = []
        for f in [*map(str, b.feeder_ids), None]:
            if f is not None and f in wanted:
                run.append(f)
            elif run:
                out.append(type(b)(int(span.loc[run[0], "min"]), int(span.loc[run[-1], "max"]) + 1, tuple(run)))
                run = []
    return out


def _log_plan(out_dir: Path, plan: pd.DataFrame, meters: pd.DataFrame) -> None:
    """Append which feeders and meters were recomputed, and why, to ``run.log`` (the run's logger)."""
    from .logging_utils import _LOGGER_NAME, log_event

    logger = logging.getLogger(_LOGGER_NAME)
    if not logger.handlers:  # the run's handler was closed: append to its file
        from .logging_utils import _KeyValueFormatter

        handler = logging.FileHandler(out_dir / "run.log", mode="a", encoding="utf-8")
        handler.setFormatter(_KeyValueFormatter())
        logger.addHandler(handler)
    res = meters.set_index("meter_id")
    for feeder, g in plan.groupby("feeder_id", sort=True):
        n = int((meters["feeder_id"].astype(str) == feeder).sum())
        log_event(logger, "delta_feeder_recomputed", feeder=feeder, meters=n,
                  why=f"events on meter(s) {','.join(g['meter_id'])}")
    for feeder, mid, what in zip(plan["feeder_id"], plan["meter_id"], plan["events"]):
        r = res.loc[mid] if mid in res.index else None
        fields = {"feeder": feeder, "meter": mid, "why": what}
        if r is not None:
            for c in ("phase_before", "phase_after", "phase", "changed_at"):
                if c in res.columns and pd.notna(r[c]):
                    fields[c] = str(r[c])
        log_event(logger, "delta_meter_recomputed", **fields)


def run_delta(
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    since: str | os.PathLike[str] | None,
    events: str | os.PathLike[str] | None,
    config: RunConfig | None = None,
    change_points: bool = False,
    **kwargs: Any,
) -> Any:
    """Recompute the feeders with events and merge with the previous results into ``out``.

    Parameters
    ----------
    store, out : path-like
        Store and the new results folder.
    since : path-like
        Previous results folder.
    events : path-like
        ``events.csv`` (see :func:`~phaseid_hpc.changes.read_events`); copied into ``out`` as
        ``events-<sha256>.csv``, which becomes ``[changes] events_file``.
    config : RunConfig, optional
    change_points : bool
        Also search the recomputed feeders' meters without events for change points (``[changes]
        change_point``). Off by default: the full run does it, and a delta run answers the events.
    **kwargs
        Passed to :func:`~phaseid_hpc.pipeline.run_job` (client, progress, ...).

    Returns
    -------
    RunSummary
        Of the merged results; ``summary.json`` has ``delta`` with the recomputed feeders, the meters with
        events and their events.
    """
    from .pipeline import run_job
    from .store import open_store

    if since is None or events is None:
        raise ContractError("a delta run needs both --since PREVIOUS_RESULTS and --events events.csv")
    ds = open_store(store)
    meter_table = pd.DataFrame({"meter_id": ds["meter"].values.astype(str),
                                "feeder_id": ds["feeder_id"].values.astype(str)})
    plan = delta_plan(read_events(events), meter_table)
    feeders = sorted(plan["feeder_id"].unique().tolist())
    config = config or RunConfig()
    # the events travel with the results under a name of their content: the blocks' partition keys (through
    # the config fingerprint) then change with the events, not with where the file was
    data = Path(events).read_bytes()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = out_dir / f"events-{hashlib.sha256(data).hexdigest()[:16]}.csv"
    kept.write_bytes(data)
    config = dataclasses.replace(config, changes=dataclasses.replace(
        config.changes, events_file=str(kept.resolve()), change_point=change_points))
    summary = run_job(store, out, feeders=feeders, previous=since, config=config, **kwargs)
    meters = pd.read_parquet(out_dir / "meters.parquet")
    _log_plan(out_dir, plan, meters)
    path = out_dir / "summary.json"
    doc = json.loads(path.read_text())
    doc.setdefault("delta", {})["event_meters"] = [
        {"feeder_id": f, "meter_id": m, "events": e} for f, m, e in zip(plan["feeder_id"], plan["meter_id"],
                                                                      plan["events"])
    ]
    doc["delta"]["recomputed_meters"] = int(meters["feeder_id"].astype(str).isin(feeders).sum())
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return summary
