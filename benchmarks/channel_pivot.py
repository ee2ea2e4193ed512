"""Cost of the MDM channel layout: a long export (meter, channel, interval end, value) pivoted to wide rows.

Builds an export of ``--meters`` meters x ``--intervals`` 15-minute intervals x three channels (kWh, kvarh,
V; US wall-clock timestamps read in America/Chicago; seeded values) and times
:func:`phaseid_hpc.input_formats.pivot_channels` as :mod:`phaseid_hpc.ingest` calls it (median of
``--repeats``).

Usage::

    .venv/bin/python benchmarks/channel_pivot.py [--meters 2000] [--intervals 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd

from phaseid_hpc.ingest import _parse_timestamps
from phaseid_hpc.input_formats import pivot_channels


def channel_export(n_meters: int, n_intervals: int, seed: int = 0) -> pd.DataFrame:
    """A long channel export as an MDM writes it: text columns, one row per meter, channel and interval."""
    rng = np.random.default_rng(seed)
    ends = pd.date_range("2026-05-31 00:15", periods=n_intervals, freq="15min").strftime("%m/%d/%Y %H:%M")
    meters = np.repeat([f"M{i:07d}" for i in range(n_meters)], n_intervals)
    stamps = np.tile(np.asarray(ends, dtype=object), n_meters)
    n = n_meters * n_intervals
    parts = [
        pd.DataFrame({"meter_id": meters, "timestamp": stamps, "channel": ch, "uom": uom,
                      "value": np.round(lo + rng.uniform(0, 1, n) * span, 3).astype(str), "multiplier": "1"})
        for ch, uom, lo, span in (("1", "KWH", 0.0, 1.0), ("2", "KVARH", 0.0, 0.3), ("3", "V", 235.0, 10.0))
    ]
    return pd.concat(parts, ignore_index=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meters", type=int, default=2000)
    ap.add_argument("--intervals", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    df = channel_export(args.meters, args.intervals)
    channel_map = {"KWH": "kwh", "KVARH": "kvarh", "V": "voltage_v"}
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        piv = pivot_channels(df, channel_map, [], "bench",
                             parse_ns=lambda s: _parse_timestamps(s, "%m/%d/%Y %H:%M", "America/Chicago"))
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    print(f"{len(df):,} channel rows -> {len(piv.wide):,} interval rows: {dt:.2f} s median of {args.repeats} "
          f"({len(df) / dt:,.0f} channel rows/s)")


if __name__ == "__main__":
    main()
