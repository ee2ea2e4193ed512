"""Delta runs: recompute only the feeders touched by outage/restoration events, copy the rest.

Field crews restoring service after an outage sometimes reconnect a customer to another phase without
updating GIS. A nightly delta run takes the previous results and an events file and recomputes only the
feeders of the meters with events; every other feeder's rows are copied unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import ContractError
from .pipeline import RunSummary, run_job

__all__ = ["affected_feeders", "read_events", "run_delta"]

EVENT_COLUMNS = ("meter_id", "timestamp", "event")


def read_events(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``events.csv``: ``meter_id, timestamp, event`` (``outage``, ``restoration``, ...).

    Raises
    ------
    ContractError
        Naming the file and the missing columns or the first unparsable timestamp row.
    """
    p = Path(path)
    if not p.is_file():
        raise ContractError(f"events file {str(p)!r} does not exist")
    ev = pd.read_csv(p, dtype={"meter_id": str, "event": str})
    missing = [c for c in EVENT_COLUMNS if c not in ev]
    if missing:
        raise ContractError(f"events file {str(p)!r} lacks column(s) {missing}; expected {list(EVENT_COLUMNS)}")
    ts = pd.to_datetime(ev["timestamp"], utc=True, errors="coerce", format="ISO8601")
    bad = ts.isna() & ev["timestamp"].notna()
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise ContractError(
            f"events file {str(p)!r} row {row + 2}: timestamp {ev['timestamp'].iloc[row]!r} is not ISO 8601"
        )
    return ev.assign(timestamp=ts)


def affected_feeders(events: pd.DataFrame, meter_table: pd.DataFrame) -> list[str]:
    """Feeders holding at least one meter with an event (sorted).

    Raises
    ------
    ContractError
        When an event names a meter that is not in the store.
    """
    lookup = meter_table.set_index("meter_id")["feeder_id"].astype(str)
    unknown = sorted(set(events["meter_id"]) - set(lookup.index))
    if unknown:
        raise ContractError(f"events name meter(s) not in the store: {unknown[:5]}")
    return sorted(set(lookup.loc[events["meter_id"]].tolist()))


def run_delta(
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    since: str | os.PathLike[str] | None,
    events: str | os.PathLike[str] | None,
    **kwargs: Any,
) -> RunSummary:
    """Recompute the feeders with events and merge with the previous results into ``out``.

    Parameters
    ----------
    store, out : path-like
        Store and the new results folder.
    since : path-like
        Previous results folder.
    events : path-like
        ``events.csv`` (see :func:`read_events`).
    **kwargs
        Passed to :func:`~phaseid_hpc.pipeline.run_job` (config, client, progress, ...).
    """
    from .store import open_store

    if since is None or events is None:
        raise ContractError("a delta run needs both --since PREVIOUS_RESULTS and --events events.csv")
    ds = open_store(store)
    meter_table = pd.DataFrame({"meter_id": ds["meter"].values.astype(str),
                                "feeder_id": ds["feeder_id"].values.astype(str)})
    feeders = affected_feeders(read_events(events), meter_table)
    return run_job(store, out, feeders=feeders, previous=since, **kwargs)
