"""What the ``phaseid`` commands print when they finish: one short, readable summary per command.

Each ``format_*`` function takes the object a library entry point returns and gives plain text: counts in
words, the data period, the elapsed time and where the outputs went. No dataclass or dict reprs.
:func:`progress_bar` is the one progress display of the package (tqdm): a bar with rate and ETA on a
terminal, plain dated lines when stderr is a file or a pipe.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["format_duration", "format_ingest", "format_period", "format_run", "format_synth", "progress_bar"]

#: Plain-line progress (stderr not a terminal): one line per this many seconds at most, and the last one.
PLAIN_PROGRESS_INTERVAL_S = 10.0
_PLAIN_FORMAT = ("{desc}: {n_fmt}/{total_fmt} {unit}s ({percentage:.0f}%), {elapsed} elapsed, "
                 "{rate_fmt}, ETA {remaining}")


class _PlainLines:
    """Progress as whole lines (no ``\\r`` frames) for logs and pipes; the text comes from tqdm's formatter.

    A line at the start, then at most one per ``interval_s`` [s], and one at :meth:`close`.
    """

    def __init__(self, total: int, desc: str, unit: str, file: IO[str], interval_s: float) -> None:
        self.total, self.desc, self.unit, self.file, self.interval_s = total, desc, unit, file, interval_s
        self.n = 0
        self.t0 = self.last = time.monotonic()
        self._closed = False
        self._line()

    def _line(self) -> None:
        from tqdm import tqdm

        text = tqdm.format_meter(self.n, self.total, time.monotonic() - self.t0, prefix=self.desc,
                                 unit=self.unit, bar_format=_PLAIN_FORMAT)
        self.file.write(text + "\n")
        self.file.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval_s and self.n < self.total:
            self.last = now
            self._line()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._line()


def progress_bar(total: int, desc: str, unit: str = "block", *, enabled: bool = True,
                 file: IO[str] | None = None, interval_s: float = PLAIN_PROGRESS_INTERVAL_S) -> Any:
    """A progress display on ``file`` (default stderr) with count, rate and ETA; ``update(n)``, ``close()``.

    Parameters
    ----------
    total : int
        Units of work expected.
    desc : str
        What is counted, as the line's prefix (``"identify"``).
    unit : str
        Name of one unit (``"block"``, ``"row"``).
    enabled : bool
        ``False``: nothing is shown (an object whose methods do nothing).
    file : text stream, optional
        Where to write; default ``sys.stderr``. A terminal gets a tqdm bar redrawn in place; anything else
        (a log file, a pipe, CI) gets plain lines (no ``\\r``) every ``interval_s`` [s] and at the end.
    """
    from tqdm import tqdm

    stream = sys.stderr if file is None else file
    if not enabled:
        return tqdm(total=total, disable=True)
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, smoothing=0.1)
    return _PlainLines(total, desc, unit, stream, interval_s)


def format_duration(seconds: float) -> str:
    """``0.4 s``, ``12.3 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def format_period(start: Any, end: Any, interval_s: float | None = None) -> str:
    """``2026-06-01 00:15 to 2026-06-08 00:00 UTC (7.0 days, 15-min intervals)``; ``unknown`` if no times."""
    import pandas as pd

    if start is None or end is None or pd.isna(start) or pd.isna(end):
        return "unknown"
    start, end = pd.Timestamp(start), pd.Timestamp(end)
    days = (end - start) / pd.Timedelta(days=1)
    step = ""
    if interval_s:
        step = (f", {int(interval_s) // 60}-min intervals" if interval_s % 60 == 0
                else f", {interval_s:g}-s intervals")
    return f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC ({days:.1f} days{step})"


def _n(k: int, one: str, many: str | None = None) -> str:
    return f"{k:,} {one if k == 1 else (many or one + 's')}"


def _rel(path: Any) -> str:
    """A path as the user would type it: relative to the working directory when below it."""
    p = Path(path)
    try:
        return os.path.relpath(p) if p.resolve().is_relative_to(Path.cwd().resolve()) else str(p)
    except (OSError, ValueError):
        return str(p)


def store_period(store: str | os.PathLike[str]) -> str:
    """The data period of a store (its time coordinate), as :func:`format_period` writes it."""
    from .store import open_store

    try:
        ds = open_store(store)
    except Exception:  # noqa: BLE001 - a summary line must never fail a command that succeeded
        return "unknown"
    t = ds["time"].values
    if not len(t):
        return "empty"
    return format_period(t[0], t[-1], ds.attrs.get("interval_s"))


def format_synth(res: Any) -> str:
    """Summary of :class:`phaseid_hpc.synth.SynthResult`."""
    interval = float(getattr(res, "interval_s", 0) or 0)
    days = res.n_time * interval / 86400 if interval else None
    lines = [
        f"Synthetic utility written to {_rel(res.out_dir)}",
        (f"  {_n(res.n_meters, 'meter')} on {_n(res.n_transformers, 'transformer')}, "
         f"{_n(res.n_feeders, 'feeder')}, {_n(res.n_substations, 'substation')}"),
        f"  {_n(res.n_time, 'interval')} of {interval / 60:g} min" + (f" ({days:.1f} days)" if days else ""),
        (f"  GIS errors injected: {_n(res.n_phase_corrupted, 'phase label')}, "
         f"{_n(res.n_transformer_corrupted, 'transformer label')} (truth in truth.csv)"),
        "  files: " + ", ".join(f"{k} {_rel(v)}" for k, v in sorted(res.paths.items())),
    ]
    return "\n".join(lines)


def format_ingest(rep: Any) -> str:
    """Summary of :class:`phaseid_hpc.ingest.IngestReport`."""
    rows_read = int(getattr(rep, "rows_read", 0))
    accepted = int(getattr(rep, "rows_written", 0)) + int(getattr(rep, "rows_unchanged", 0))
    quarantined = dict(getattr(rep, "quarantined", {}) or {})
    n_q = int(sum(quarantined.values()))
    lines = [
        f"Ingested into {_rel(rep.store)} in {format_duration(getattr(rep, 'elapsed_s', 0.0))}",
        (f"  {rows_read:,} rows read from {_n(len(getattr(rep, 'sources', []) or []), 'file')}: "
         f"{accepted:,} accepted ({int(getattr(rep, 'rows_written', 0)):,} new or changed, "
         f"{int(getattr(rep, 'rows_unchanged', 0)):,} already stored), {n_q:,} quarantined, "
         f"{int(getattr(rep, 'duplicates_identical', 0)):,} identical duplicates dropped"),
        f"  {_n(int(getattr(rep, 'meters', 0)), 'meter')} with data"
        + (f" ({int(getattr(rep, 'new_meters', 0)):,} new)" if getattr(rep, "new_meters", 0) else ""),
        f"  period: {format_period(getattr(rep, 'time_start', None), getattr(rep, 'time_end', None))}"
        + (f"; {int(rep.time_steps_added):,} time steps appended"
           if getattr(rep, "time_steps_added", 0) else ""),
    ]
    if getattr(rep, "snapped", 0):
        lines.append(f"  {int(rep.snapped):,} reads moved onto the time grid")
    if getattr(rep, "kv_scaled_meters", None):
        lines.append(f"  {_n(len(rep.kv_scaled_meters), 'meter')} reported kV and were scaled to V")
    if quarantined:
        why = "; ".join(f"{k}: {v:,}" for k, v in sorted(quarantined.items()))
        where = ", ".join(getattr(rep, "quarantine_files", []) or [])
        lines.append(f"  quarantined by reason: {why}"
                     + (f" (files under the store: {where})" if where else ""))
    for note in getattr(rep, "notes", []) or []:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def format_run(summary: Any, period: str | None = None) -> str:
    """Summary of :class:`phaseid_hpc.pipeline.RunSummary` (``period``: the store's data period)."""
    c = dict(summary.counts)
    n = int(summary.n_meters)

    def share(k: int) -> str:
        return f" ({100.0 * k / n:.1f}%)" if n else ""

    total = float(summary.timings_s.get("total", 0.0)) if summary.timings_s else 0.0
    lines = [(f"Identified {_n(n, 'meter')} in {format_duration(total)} "
              f"({_n(summary.n_blocks, 'block')}, {summary.n_blocks_reused:,} reused from an earlier run)")]
    if period:
        lines.append(f"  data period: {period}")
    lines.append(
        "  phase: " + ", ".join(f"{c.get(k, 0):,}{share(c.get(k, 0))} {w}" for k, w in
                                (("confident", "confident"), ("suspect", "suspect"), ("low", "low"),
                                 ("insufficient_data", "insufficient data")))
    )
    work = f"  corrections: {c.get('phase_changed', 0):,} phase"
    if "transformer_changed" in c:
        work += f", {c['transformer_changed']:,} transformer"
    lines.append(work + " (confident changes only)")
    files = dict(summary.files or {})
    if "review" in files:
        try:
            import pandas as pd

            n_review = len(pd.read_csv(files["review"], usecols=[0]))
            lines.append(f"  review: {_n(n_review, 'meter')} where the inference disagrees with GIS but is "
                         "not confident (GIS kept)")
        except (OSError, ValueError):
            pass
    if "transformers" in c:
        lines.append(f"  transformers checked: {c['transformers']:,}")
    lines.append(f"  results in {_rel(summary.out_dir)}/")
    labels = (("corrections", "field worklist"), ("review", "review list"), ("meters", "every meter"),
              ("transformers", "per transformer"), ("summary", "counts, fingerprints"),
              ("report", "open in a browser"), ("run_log", "log"))
    for key, what in labels:
        if key in files:
            lines.append(f"    {Path(files[key]).name:<22} {what}")
    if "report" not in files:
        lines.append(f"    (no report.html: see run.log; retry with 'phaseid report --results "
                     f"{_rel(summary.out_dir)}')")
    return "\n".join(lines)
