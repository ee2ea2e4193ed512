"""The README's per-feeder identification tables from the CSV rows of ``benchmarks/feeders.py``.

Usage::

    python benchmarks/feeders_tables.py benchmarks/results/feeders-main.csv [more.csv ...]

Prints one Markdown table per file (percentages with two decimals; ``synth:NAME`` rows as ``gen: NAME``).
"""

from __future__ import annotations

import argparse
import math

import pandas as pd

HEADER = ("| feeder | days | meters | GIS as given | kNN-10 vote of GIS | phase (recommended) | confident precision "
          "| share confident | corrections (right %) | transformer: GIS -> ours (corrections, right %) "
          "| clock false alarms |\n" + "| --- " * 11 + "|")


def _pct(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.2f}"


def row(r: pd.Series) -> str:
    """One table row of a feeders.py CSV row."""
    name = str(r["feeder"]).replace("synth:", "gen: ")
    xf_corr = int(r["xf_corr"]) if pd.notna(r["xf_corr"]) else 0
    return (f"| {name} | {int(r['days'])} | {int(r['meters'])} | {_pct(r['gis'])} | {_pct(r['knn10'])} | "
            f"**{_pct(r['phase'])}** | {_pct(r['conf_prec'])} | {_pct(r['conf_share'])} | "
            f"{int(r['corr'])} ({_pct(r['corr_prec'])}) | {_pct(r['xf_gis'])} -> {_pct(r['xf'])} "
            f"({xf_corr}, {_pct(r['xf_corr_prec']) if xf_corr else '-'}) | {_pct(r['clock_fa'])} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="+")
    for path in p.parse_args(argv).csv:
        df = pd.read_csv(path)
        print(f"<!-- {path} -->\n{HEADER}")
        for _, r in df.iterrows():
            print(row(r))
        print()


if __name__ == "__main__":
    main()
