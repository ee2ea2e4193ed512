"""The public data contract: column names, phase labels, reason codes, output columns.

Every module that reads or writes a contract file takes its names from here, so the README, the
ingest, the generator and the outputs cannot drift apart.
"""

from __future__ import annotations

#: Single-phase, phase-to-phase and three-phase service labels.
SINGLE_PHASES: tuple[str, ...] = ("A", "B", "C")
PAIR_PHASES: tuple[str, ...] = ("AB", "BC", "CA")
THREE_PHASE: str = "ABC"
PHASE_LABELS: tuple[str, ...] = SINGLE_PHASES + PAIR_PHASES + (THREE_PHASE,)

#: Readings (CSV or Parquet, long format).
READINGS_REQUIRED: tuple[str, ...] = ("meter_id", "timestamp", "voltage_v")
READINGS_OPTIONAL: tuple[str, ...] = ("kw", "kvar")

#: Meters (GIS view).
METERS_REQUIRED: tuple[str, ...] = ("meter_id", "feeder_id", "transformer_id", "phase")
METERS_OPTIONAL: tuple[str, ...] = ("service_type", "nominal_v", "lat", "lon")

#: Transformers (optional file).
TRANSFORMERS_REQUIRED: tuple[str, ...] = ("transformer_id", "feeder_id", "kva_rating", "n_phases")
TRANSFORMERS_OPTIONAL: tuple[str, ...] = ("cooling",)

#: Feeder-head references (optional file).
REFERENCES_REQUIRED: tuple[str, ...] = ("feeder_id", "phase", "timestamp", "voltage_v")

#: Ground truth written by the generator (same columns as ../shared/data/epri-ckt5/truth.csv).
TRUTH_COLUMNS: tuple[str, ...] = (
    "meter_id",
    "feeder_id",
    "transformer_id",
    "phase",
    "phase_label_corrupted",
    "transformer_label_corrupted",
)

#: Confidence classes of a phase or transformer assignment.
CLASS_CONFIDENT = "confident"
CLASS_SUSPECT = "suspect"
CLASS_LOW = "low"
CLASS_INSUFFICIENT = "insufficient_data"
PHASE_CLASSES: tuple[str, ...] = (CLASS_CONFIDENT, CLASS_SUSPECT, CLASS_LOW, CLASS_INSUFFICIENT)

#: Per-meter reason codes (stable strings: they appear in meters.parquet and run.log).
REASON_INCONSISTENT_SAMPLING = "Inconsistent Sampling Frequency"
REASON_LOW_CORRELATION = "Low Correlation Coefficient (< 0.6)"
REASON_INSUFFICIENT_DATA = "Insufficient Usable Data"
REASON_CLOCK_OFFSET = "Clock Offset Above Limit"
#: The meter's series was a whole number of intervals off the others' and was shifted back before
#: identification (e.g. a meter that stamps the start instead of the end of each interval).
REASON_CLOCK_SHIFTED = "Clock Shifted By Whole Intervals"
REASON_IMPLAUSIBLE_VOLTAGE = "Implausible Voltage"
REASON_FLAT_LINE = "Flat-Lined Or Stuck Readings"
REASON_WRONG_UNITS = "Wrong Units"
REASON_LONG_GAPS = "Long Gaps Excluded"
REASON_NO_READINGS = "No Readings"
#: The meter's voltage level departs from its transformer siblings' (after its own service drop) by more
#: than ``[pt] threshold_pct`` in every window: its internal PT has drifted; ``pt_deviation_pct`` says how far.
REASON_PT_DEVIATION = "Meter PT Deviation"
#: The same finding for a meter without enough siblings (alone, or one of two, on its transformer and
#: phase), judged against its feeder neighbours of nearest voltage shape only.
REASON_PT_DEVIATION_NEIGHBOURS = "Meter PT Deviation (Checked Against Neighbours Only)"

#: The meter was reconnected at a restoration (``events.csv``): identified separately before and after it,
#: the answers differ; ``phase_before``, ``phase_after`` and ``changed_at`` say how and when (GIS stale since).
REASON_PHASE_CHANGED_AT_RESTORATION = "Phase Changed At Restoration"
#: The same finding without an event: the phase the meter follows switches persistently at ``changed_at``.
REASON_CONNECTION_CHANGED = "Connection Changed"
#: Mapped separately before and after a restoration, the meter's transformer differs (``transformer_before``,
#: ``transformer_after``).
REASON_TRANSFORMER_CHANGED_AT_RESTORATION = "Transformer Changed At Restoration"

#: Columns of RESULTS/meters.parquet, in order.
METER_RESULT_COLUMNS: tuple[str, ...] = (
    "meter_id",
    "feeder_id",
    "transformer_id",
    "phase_gis",
    "phase",
    "phase_confidence",
    "phase_class",
    "changed",
    "reasons",
    "clock_offset_s",
    "usable_fraction",
)
