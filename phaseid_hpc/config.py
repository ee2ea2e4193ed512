"""Typed, validated run configuration: one place, loaded once at the start of a run.

A run config is a TOML or YAML file (see ``configs/default.toml``) with one table per stage. Every key is
checked against the dataclasses below: an unknown key or a value of the wrong type or outside its allowed
set raises :class:`~phaseid_hpc.errors.ConfigError` naming the key. Environment variables of the form
``PHASEID__SECTION__KEY=value`` override file values (parsed as TOML scalars). Cluster sizing stays in
Dask's own configuration; nothing here reads global state at import time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

__all__ = [
    "ChangesConfig",
    "IngestConfig",
    "JobConfig",
    "PTConfig",
    "PhaseConfig",
    "QualityConfig",
    "RunConfig",
    "TransformerConfig",
    "ValidationConfig",
    "config_fingerprint",
    "config_to_dict",
    "load_config",
    "read_config_file",
    "build_section",
]


#: Quantities a channel of an MDM interval export may map to (``[ingest] channel_map``).
CHANNEL_QUANTITIES: tuple[str, ...] = ("voltage_v", "kv", "kw", "w", "kvar", "var", "kwh", "wh", "kvarh", "varh")


@dataclass(frozen=True)
class IngestConfig:
    """How contract files are read into the store."""

    #: Column names of the readings files mapped to the contract names, as a TOML table
    #: ``[ingest.column_map]`` with lines such as ``MeterID = "meter_id"``, ``ReadTime = "timestamp"``,
    #: ``Voltage = "voltage_v"``. In the channel layout the contract names are ``meter_id, channel, uom,
    #: timestamp, value, multiplier``.
    column_map: dict[str, str] = field(default_factory=dict)
    #: Column names of the meters (GIS) table mapped to the contract names (``[ingest.meters_column_map]``,
    #: e.g. ``XfmrID = "transformer_id"``); a missing required column's error shows the table's header and
    #: the lines to add.
    meters_column_map: dict[str, str] = field(default_factory=dict)
    #: strftime format of the readings' timestamps (``"%m/%d/%Y %H:%M"``); ``""``: ISO 8601 (offsets read).
    timestamp_format: str = ""
    #: IANA time zone of timestamps without an offset (``"America/Chicago"``); the ingest report states it.
    #: Local times that do not exist or occur twice at a DST change are quarantined as invalid_timestamp; a
    #: head-end writing standard time all year is a fixed-offset zone (``"Etc/GMT+6"`` is UTC-6).
    timezone: str = "UTC"
    #: Layout of the readings files: ``"wide"`` (one row per meter and interval end with ``voltage_v`` and
    #: optional ``kw``, ``kvar``) or ``"channel"`` (an MDM interval export: one row per meter, channel,
    #: interval end, ``value`` and optional ``uom``, ``multiplier``; pivoted to the wide form at ingest).
    readings_layout: Literal["wide", "channel"] = "wide"
    #: Channel layout: channel name (or, when the name is not listed, unit of measure) -> quantity: one of
    #: ``voltage_v``, ``kv``, ``kw``, ``w``, ``kvar``, ``var`` (demand), ``kwh``, ``wh``, ``kvarh``, ``varh``
    #: (energy per interval, divided by the interval length [h]); values are multiplied by ``multiplier``.
    channel_map: dict[str, str] = field(default_factory=dict)
    #: Channel layout: channel names or units not ingested on purpose (counted in the report); any other
    #: channel that ``channel_map`` does not name is an error.
    channel_ignore: list[str] = field(default_factory=list)
    #: Meters from PostgreSQL when ``--meters`` is not given: libpq keywords (``host``, ``port``, ``dbname``,
    #: ``user``, ``sslmode``, ...) and ``table`` (``"schema.table"``) or ``query``; ``password_env`` names the
    #: environment variable with the password (else ``$PGPASSWORD`` or ``~/.pgpass``; never a password here).
    meters_database: dict[str, Any] = field(default_factory=dict)
    #: Read meters with a database role that can write to the table (or any table of its schema), with a
    #: warning; ``false`` refuses such a role (use one with SELECT only).
    meters_allow_write_role: bool = False
    #: Rows read per batch when streaming a readings file (bounds memory).
    batch_rows: int = 2_000_000
    #: Target size of one feeder block (chunk along ``meter``) [bytes].
    block_bytes: int = 100_000_000
    #: Storage chunk length along time [samples] (``0``: the default 2976, 31 days of 15-min data).
    time_chunk: int = 2976
    #: Voltage encoding in the store: ``"float32"`` (lossless) or ``"int16_decivolt"`` (0.1 V steps, ~25%
    #: smaller on ckt5, reads no faster; see benchmarks/store_encoding.py). Use int16 only for 0.1 V meters.
    voltage_encoding: Literal["float32", "int16_decivolt"] = "float32"
    #: Store grid step [s]; ``0`` means the dominant spacing of the readings.
    interval_s: int = 0
    #: Reads within this distance of a grid point are snapped to it [s]; farther ones are quarantined.
    snap_tolerance_s: float = 0.0
    #: Detect meters reporting kV instead of V (median ~1000x below nominal) and scale them.
    kv_detection: bool = True
    #: Reads more than this many grid steps after the store's last time are quarantined [samples].
    max_extend_steps: int = 35136

    def __post_init__(self) -> None:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"config key 'ingest.timezone': {self.timezone!r} is not an IANA time zone name "
                "(e.g. 'UTC', 'America/Chicago', 'Etc/GMT+6')"
            ) from None
        bad = {k: v for k, v in self.channel_map.items() if v not in CHANNEL_QUANTITIES}
        if bad:
            raise ConfigError(
                f"config key 'ingest.channel_map': {bad} maps to no known quantity; expected one of "
                f"{list(CHANNEL_QUANTITIES)}"
            )
        if not isinstance(self.channel_ignore, (list, tuple)) or not all(
            isinstance(c, str) for c in self.channel_ignore
        ):
            raise ConfigError(f"config key 'ingest.channel_ignore': expected a list of strings, got {self.channel_ignore!r}")
        if "password" in self.meters_database or "passfile" in self.meters_database:
            raise ConfigError(
                "config key 'ingest.meters_database': holds a password; a config file is no place for one: set "
                "the variable named by 'password_env' (default $PGPASSWORD) or use ~/.pgpass (mode 0600)"
            )


@dataclass(frozen=True)
class QualityConfig:
    """Per-meter data-quality checks run before identification."""

    #: Longest gap filled by linear interpolation [intervals].
    max_interp_gap: int = 3
    #: Lowest fraction of usable samples for a meter to be identified [-].
    min_usable_fraction: float = 0.5
    #: Fewest usable samples for a meter to be identified [samples].
    min_usable_samples: int = 96
    #: Plausible voltage band [pu of nominal].
    min_pu: float = 0.8
    max_pu: float = 1.1
    #: Longest run of identical readings before the meter is called stuck [samples].
    max_flat_run: int = 96
    #: Clock offsets above this are flagged, when they exceed it by ``clock_flag_z`` standard errors [s].
    max_clock_offset_s: float = 60.0
    #: Margin, in standard errors of the estimate, by which ``|clock_offset_s|`` must exceed
    #: ``max_clock_offset_s`` to be flagged (0: flag every estimate above the limit) [-].
    #: 2.0: with the zone check, false alarms <= 0.4% of clean meters on the shared feeders, 8-62% of
    #: meters offset by more than 90 s caught at 7-14 days (``benchmarks/feeders.py --clock-offsets 0.3``).
    clock_flag_z: float = 2.0
    #: Measure clock offsets against the feeder-head references where given (else the feeder median).
    clock_use_references: bool = True
    #: Fraction of reads off the store's time grid above which sampling is called inconsistent [-].
    max_off_grid_fraction: float = 0.05
    #: Relative difference between a meter's sampling interval and the grid step that is inconsistent [-].
    sampling_rel_tol: float = 0.01
    #: Meters with inconsistent sampling are excluded from identification (``usable`` False).
    inconsistent_sampling_unusable: bool = True
    #: Share of a meter's readings outside [min_pu, max_pu] above which it is implausible [-].
    max_implausible_fraction: float = 0.5
    #: Clock offsets are searched over +- this span (at least one interval; estimates reach one more) [s].
    clock_search_s: float = 900.0
    #: Lowest correlation with the feeder's common signal for a clock offset to be estimated [-].
    clock_min_correlation: float = 0.2
    #: Fewest usable meters on a feeder for its common signal (and so any clock offset) [meters].
    clock_min_meters: int = 3
    #: A clock flag stands only where the offset also holds against the median of the meter's this many most
    #: similar meters of its feeder (a group sharing a lag is physics, not clocks); 0: no such check [meters].
    clock_nearest_meters: int = 3
    #: Shift meters whose offset exceeds ``max_clock_offset_s`` back onto the grid in the cleaned voltage.
    correct_clock_offset: bool = False


@dataclass(frozen=True)
class PhaseConfig:
    """Phase identification (``phaseid_hpc.phase_identification.identify_phases``).

    ``phase_confidence`` is the winning phase's share of the neighbour votes above chance (1: every
    neighbour agrees), scaled down where the meter does not correlate significantly with the neighbours
    that voted for it. A meter's recommended phase differs from GIS only when its class is ``confident``;
    the thresholds were set on the shared feeders and the generator's scenarios so that the confident class
    keeps a precision of 99.9% or better (``benchmarks/feeders.py``).
    """

    #: Confidence at or above which a meter is ``confident`` [-].
    confident_threshold: float = 0.85
    #: Confidence at or above which a meter is ``suspect`` (below it: ``low``) [-].
    suspect_threshold: float = 0.70
    #: Fewest observed (differenced) samples for a meter to be identified [samples].
    min_samples: int = 48
    #: Most correlated meters (outside the meter's own GIS transformer-and-phase group) that vote [-].
    n_neighbours: int = 20
    #: Most vote rounds: the first with GIS labels, each further one with the previous round's answers,
    #: stopping when the answers no longer change [-].
    vote_rounds: int = 6
    #: GIS groups (transformer and phase) larger than this are not pooled and do not exclude each other
    #: from the vote: one three-phase transformer serving a whole LV feeder has no local structure [meters].
    max_group_size: int = 30
    #: A meter is averaged with its GIS group when its denoised similarity with the rest of the group
    #: exceeds this (virtual meters); below it, it keeps its own signal. 1.0 (default) turns pooling off:
    #: on EPRI M1 and ckt7 it lowered the confident share (benchmarks/feeders.py) [-].
    pool_similarity: float = 1.0
    #: Principal directions kept to denoise the signals before the neighbour search [-].
    denoise_rank: int = 20
    #: Where the block has kW, identification also runs on each meter's voltage with the drops its own and
    #: its transformer's load explain added back, fitted on its voltage changes less those of this many of
    #: its most similar meters on other transformers (``kernels.load_compensation``); each meter takes the
    #: more confident of the two answers. 0 turns the second pass off. On the generated feeders (7 days)
    #: accuracy rose from 98.9-99.9% to 99.4-100%, at about 2.4 times the phase stage's CPU [meters].
    load_neighbours: int = 10
    #: Correlation with the voting neighbours' pooled signal, in standard errors (1 / sqrt(n_samples)),
    #: below which the evidence is scaled down (and reason ``Low Correlation Coefficient`` given) [-].
    min_strength_se: float = 4.0
    #: The answer's phase neighbourhood must beat every other phase's by this many standard errors of
    #: correlation for full confidence (less scales the confidence down) [-].
    min_margin_se: float = 2.0
    #: A change of phase is held back (not confident) when the meter's most similar meters that GIS puts on
    #: its GIS phase are more similar than its most similar meters that GIS puts on the new phase by more
    #: than this (means of the ``nearest_gis_count`` best denoised similarities; own GIS group excluded):
    #: a small cluster of correctly labelled meters inside a larger neighbourhood of another phase is then
    #: not moved with confidence. It also holds back the correction of two or three adjacent mislabelled
    #: transformers (they look the same locally): corrections must be right first. ``inf`` turns it off [-].
    nearest_gis_tolerance: float = 0.02
    #: Meters of each GIS phase whose similarities are averaged for that check [-].
    nearest_gis_count: int = 3
    #: The same check again on the raw signals (not denoised), the meter as a virtual meter (averaged with
    #: its group-mates of the same answer), with this tolerance: a transformer whose own load dominates its
    #: voltage projects onto the feeder's principal directions almost at random, so its denoised
    #: neighbours can be of another phase while its raw ones are of its own. Raw similarities are small
    #: (0.2-0.4 for such a meter), hence half the slack of the denoised check; ``inf`` turns it off [-].
    nearest_gis_raw_tolerance: float = 0.01
    #: In that check, a meter of another GIS group whose raw similarity with the meter reaches this share
    #: of the meter's mean raw similarity with its own GIS group-mates is taken for a physical sibling (a
    #: transformer error in GIS) and does not count; above 1 (or a meter alone in its group) nobody is [-].
    nearest_gis_sibling_ratio: float = 0.9
    #: A change of phase is confident only where at least this share of the meter's physical siblings in its
    #: GIS group (same transformer and GIS phase; raw similarity at least ``nearest_gis_sibling_ratio`` of
    #: the group's typical best match) get the same answer: one transformer's meters are on one phase, so a
    #: vote that splits them is not evidence of a GIS error. 0 turns the check off [-].
    sibling_agreement: float = 0.75
    #: The margin of a change of phase over the GIS phase is also measured as a batch-means t statistic over
    #: consecutive blocks of this length (half a day each), and the smaller of the two counts: a meter
    #: whose residual is autocorrelated (its own load swings) has fewer independent samples than readings.
    #: Off with fewer than 4 blocks in the window, or 0 [s].
    margin_batch_s: float = 43200.0
    #: A meter's series is shifted by whole intervals when its correlation with the feeder's common
    #: signal at the best lag beats lag 0 by this many standard errors; 0 turns the check off [-].
    clock_lag_se: float = 6.0
    #: Meters per zone (a neighbourhood of one phase) for local comparisons, e.g. the clock check [meters].
    zone_meters: int = 40
    #: Where the readings' resolution swallows most steps (the median meter of a feeder has more than this
    #: share of exact-zero differences between consecutive readings: 1 V on feeders whose 15-minute steps
    #: are 0.3-0.5 V), the feeder is identified a second time on means over ``coarse_aggregate_s``, and a
    #: meter that second pass calls confident takes that confidence where the first pass gave the same
    #: phase (class 1.0, 1 V, 30 days, shared feeders, three measurement seeds: M1 96.7-97.5 -> 99.2-99.4%,
    #: no wrong row). 1 turns it off [-].
    coarse_zero_share: float = 0.3
    #: Length of the means of that second pass [s].
    coarse_aggregate_s: float = 3600.0
    #: Seed of every random choice in identification.
    random_state: int = 0


@dataclass(frozen=True)
class TransformerConfig:
    """Meter-to-transformer verification."""

    enabled: bool = True
    #: Confidence at or above which an assignment is ``confident`` [-].
    confident_threshold: float = 0.85
    #: Confidence at or above which an assignment is ``suspect`` (below it: ``low``) [-].
    suspect_threshold: float = 0.70
    #: Fewest valid differenced samples for a meter to be checked [samples].
    min_samples: int = 288
    #: Fisher-z margin of the best other transformer over the GIS one needed to move a meter [std. errors].
    flag_margin_se: float = 6.0
    #: The same margin when the GIS label is already in doubt: the meter's phase differs from its GIS
    #: transformer's, or it does not move with an otherwise coherent GIS group [std. errors].
    weak_gis_margin_se: float = 4.0
    #: Fisher-z of a target transformer's correlation must exceed this [std. errors].
    min_corr_se: float = 6.0
    #: Best target must beat the runner-up by this much (else ambiguous, not moved) [std. errors]. Over 592
    #: transformer corrections on the shared and generated feeders, the three wrong ones had the three
    #: smallest leads (2.2-2.9); the nominal error is about 1.6 times too small (see ``[phase] margin_batch_s``).
    ambiguity_se: float = 3.0
    #: Own-group Fisher-z below this: the meter does not move with its GIS group [std. errors].
    unrelated_se: float = 3.0
    #: A meter alone on its GIS transformer moves only if it fits the target like the target's own
    #: members do: its Fisher-z may fall short of theirs (mean) by at most this [std. errors].
    singleton_fit_se: float = 4.0
    #: A meter moves to a transformer with one meter only if it correlates with it at least this fraction of
    #: the feeder's median same-transformer pair (Fisher-z) [-].
    pair_fit_fraction: float = 0.4
    #: A moved meter's target must hold together with the meters it moves with there: the mean
    #: correlation between the two sides (the members it moves with, and the rest) must reach this share
    #: of the geometric mean of the sides' own mean correlations, else the move is not confident (the
    #: siblings it follows may be the ones GIS files wrongly). Right moves on the shared and generated
    #: feeders score 0.70-1.46, the wrong one 0.15 [-].
    anchor_ratio: float = 0.5
    #: Level check: residual at the target may exceed the reference residual by at most this factor [-].
    level_tolerance: float = 1.5
    #: Reactance-to-resistance ratio of a service drop, for kvar in the level model [-].
    service_x_over_r: float = 0.5
    #: Candidate transformers farther than this from the meter are ruled out (needs lat/lon) [m].
    max_distance_m: float = 3000.0
    #: Restrict candidates to transformers serving the meter's phase.
    use_phase: bool = True
    #: Propose transformers missing from GIS for meters that move with no GIS group.
    propose_new_groups: bool = True
    #: Most rounds of re-pooling after moving meters (stops early when nothing changes) [-].
    n_iterations: int = 10
    #: A feeder's transformer corrections are recommended only when at least this share of its meters
    #: have a GIS sibling (another meter on their GIS transformer): without siblings (every meter alone,
    #: IEEE 8500, EPRI K1) neighbouring transformers on one lateral correlate like siblings and nothing
    #: calibrates a move, so the GIS label stays and the inference goes to the review list [-].
    min_sibling_share: float = 0.5
    #: Whether a three-phase service may be moved to another transformer with confidence. A three-phase
    #: meter's voltage follows every three-phase bank of its line alike: on the physics-based ckt7 feeder
    #: 7 of its 33 confident moves (four conditions) named the wrong bank; off, they go to the review list,
    #: and so does a single-phase meter's move to a transformer whose other meters are all three-phase.
    correct_three_phase: bool = False
    #: Where the readings' resolution swallows most steps (the median meter of a feeder has more than this
    #: share of exact-zero differences between consecutive readings; 1 V on a feeder whose 15-minute steps
    #: are 0.3-0.5 V: about half, 0.1 V: under 11%), the shape signals are means over
    #: ``coarse_aggregate_s`` (class 1.0, 1 V, 10% wrong labels, 30 days: ckt5 95.5 -> 97.5%, M1 94.1 ->
    #: 98.4%, ckt7 90.0 -> 93.8% on the right transformer, every correction right) [-]. 1 turns it off.
    coarse_zero_share: float = 0.3
    #: Length of those means [s].
    coarse_aggregate_s: float = 3600.0
    #: Seed of every random choice (none at present; kept for the contract).
    random_state: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.coarse_zero_share <= 1 or self.coarse_aggregate_s < 0:
            raise ConfigError(
                "config keys transformer.coarse_zero_share must lie in [0, 1] and "
                f"transformer.coarse_aggregate_s be >= 0, got {self.coarse_zero_share} and "
                f"{self.coarse_aggregate_s}"
            )
        if not 0 <= self.suspect_threshold <= self.confident_threshold <= 1:
            raise ConfigError(
                "config keys transformer.suspect_threshold <= transformer.confident_threshold must lie in "
                f"[0, 1], got {self.suspect_threshold} and {self.confident_threshold}"
            )
        if self.n_iterations < 1:
            raise ConfigError(f"config key transformer.n_iterations must be >= 1, got {self.n_iterations}")
        if not 0 <= self.anchor_ratio <= 1:
            raise ConfigError(f"config key transformer.anchor_ratio must lie in [0, 1], got {self.anchor_ratio}")


@dataclass(frozen=True)
class ValidationConfig:
    """Transformer loading, imbalance, thermal model, ageing and health flags (``validate_transformers``)."""

    enabled: bool = True
    #: Ambient temperature when no series is given [degC].
    ambient_c: float = 30.0
    #: Thermal model standard: ``"iec"`` (IEC 60076-7) or ``"ieee"`` (IEEE C57.91 Clause 7).
    thermal_standard: Literal["iec", "ieee"] = "iec"
    #: Top-oil rise over ambient at rated load [K] (ONAN distribution: 55).
    top_oil_rise_k: float = 55.0
    #: Hot-spot rise over top oil at rated load, ``H g_r`` [K]; ``None``: 23 (IEC distribution, 98 degC at
    #: 20 degC ambient) or 25 (IEEE 65 degC-rise unit, 80 K hot-spot rise over ambient).
    hot_spot_gradient_k: float | None = None
    #: Ratio of load losses at rated current to no-load losses, ``R`` [-].
    loss_ratio: float = 5.0
    #: Oil exponent ``x`` (IEC) / ``n`` (IEEE) [-].
    oil_exponent: float = 0.8
    #: Winding exponent ``y`` (IEC) / ``2 m`` (IEEE) [-].
    winding_exponent: float = 1.6
    #: Oil and winding time constants [min] (IEC 60076-7 Table 4, distribution ONAN).
    oil_time_constant_min: float = 180.0
    winding_time_constant_min: float = 4.0
    #: Insulation ageing law: ``"thermally_upgraded"`` (F_AA = 1 at 110 degC, IEEE C57.91 / IEC 60076-7 eq. 3)
    #: or ``"normal"`` Kraft paper (IEC 60076-7 eq. 2, V = 2^((theta_h - 98)/6)).
    insulation: Literal["thermally_upgraded", "normal"] = "thermally_upgraded"
    #: Hot-spot limit for normal cyclic loading [degC].
    hot_spot_normal_c: float = 120.0
    #: Hot-spot limit for emergency loading [degC].
    hot_spot_emergency_c: float = 140.0
    #: Load imbalance above which a 3-phase bank is flagged [-].
    max_imbalance: float = 0.3
    #: Power factor assumed when no kvar is given [-].
    default_power_factor: float = 0.95
    #: Loading that the mapping may imply before it contradicts the rating: the 99th percentile of the load
    #: above this [pu] means the meters cannot all be on this unit (manual audit, not acceptance).
    max_plausible_loading_pu: float = 2.0
    #: ... or a mean load above this [pu].
    max_plausible_mean_loading_pu: float = 1.0
    #: Transformer voltage health: one tap step [pu] and the step size, in tap steps, that is flagged.
    tap_step_pu: float = 0.00625
    tap_fault_steps: float = 2.0
    #: Length of each of the two windows compared by the step detector [samples] (96 = 1 day at 15 min).
    health_window: int = 96
    #: Correlation (differenced voltage vs the feeder reference) below which a meter has lost it, in a window.
    health_min_correlation: float = 0.3
    #: Fewest meters on a transformer for the health checks (a lone meter's change is the meter's) [-].
    health_min_meters: int = 2
    #: Fewest consecutive windows in which its meters lose correlation together before ``correlation_loss`` [-].
    health_min_lost_windows: int = 2
    #: A window is lost when its transformer's correlation with the reference falls below half the unit's
    #: usual one (its best window out of at most 8, else the upper quartile of its windows, at least the
    #: second-best) and its Fisher z this many standard errors (``1 / sqrt(health_window - 3)``) below it [-].
    health_loss_se: float = 3.0
    #: A window is also lost when the typical size of its transformer's differenced mean, relative to the
    #: reference's in the same window, exceeds this many times the unit's usual ratio (its quietest window out
    #: of at most 8, else the lower quartile of its windows): a noisy winding or loose connection adds a
    #: fluctuation of its own that a unit whose own load dominates its voltage hides from the correlation.
    #: 0 turns the rule off [-].
    health_noise_factor: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.default_power_factor <= 1:
            raise ConfigError(
                f"config key 'validation.default_power_factor' must lie in (0, 1], got {self.default_power_factor}"
            )
        if not self.hot_spot_normal_c <= self.hot_spot_emergency_c:
            raise ConfigError(
                "config keys 'validation.hot_spot_normal_c' <= 'validation.hot_spot_emergency_c' expected, "
                f"got {self.hot_spot_normal_c} and {self.hot_spot_emergency_c}"
            )
        if self.health_noise_factor < 0:
            raise ConfigError(
                "config key 'validation.health_noise_factor' must be >= 0 (0: off), "
                f"got {self.health_noise_factor}"
            )
        if self.health_window < 2:
            raise ConfigError(f"config key 'validation.health_window' must be >= 2, got {self.health_window}")

    def thermal_parameters(self) -> dict[str, float]:
        """Every keyword of the thermal model of ``thermal_standard`` (``phaseid_hpc.kernels.thermal``).

        The fields above, the standard's hot-spot gradient where ``hot_spot_gradient_k`` is None, and for
        IEC the thermal model constants of IEC 60076-7 Table 4 (distribution ONAN: k11 = 1, k21 = 1,
        k22 = 2).
        """
        params = {
            "top_oil_rise_k": self.top_oil_rise_k,
            "hot_spot_gradient_k": self.hot_spot_gradient_k
            if self.hot_spot_gradient_k is not None
            else _HOT_SPOT_GRADIENT_K[self.thermal_standard],
            "loss_ratio": self.loss_ratio,
            "oil_exponent": self.oil_exponent,
            "winding_exponent": self.winding_exponent,
            "oil_time_constant_min": self.oil_time_constant_min,
            "winding_time_constant_min": self.winding_time_constant_min,
        }
        if self.thermal_standard == "iec":
            params.update(k11=1.0, k21=1.0, k22=2.0)
        return params


#: Hot-spot to top-oil gradient at rated load by thermal standard [K]: IEC distribution ONAN (98 degC hot spot
#: at 20 degC ambient with a 55 K top-oil rise), IEEE 65 degC-rise unit (80 K hot-spot rise over ambient).
_HOT_SPOT_GRADIENT_K: dict[str, float] = {"iec": 23.0, "ieee": 25.0}


@dataclass(frozen=True)
class PTConfig:
    """Meter PT deviation: a meter's voltage level against its transformer siblings or its neighbours.

    See :mod:`phaseid_hpc.pt_deviation`.
    """

    enabled: bool = True
    #: Deviation of the drop-corrected level, in every window and with one sign, that is flagged [%].
    threshold_pct: float = 1.0
    #: Consecutive windows the deviation must persist in (each at least ``min_samples`` valid samples) [-].
    n_windows: int = 2
    min_samples: int = 96
    #: Fewest meters of one transformer and phase compared with each other (the median is robust from 3);
    #: a meter in a smaller group is compared with its feeder neighbours only [-].
    min_group_size: int = 3
    #: Neighbours (nearest drop-corrected voltage shape, other transformers) of a meter without siblings [-].
    n_neighbours: int = 6
    #: Readings are averaged to this interval before the PT check (levels and load slopes need no finer
    #: resolution; the cost falls in proportion) [s].
    aggregate_s: float = 3600.0
    #: A meter checked against neighbours only needs a drop slope at least this share of the feeder's
    #: median slope: a meter whose voltage does not follow its own load (a large, stiff service) has a level
    #: that its neighbours do not explain [-].
    min_load_response: float = 0.2
    #: A meter whose mean load, at the feeder's median drop slope, drops its voltage by at most this share
    #: of ``threshold_pct`` meets ``min_load_response`` whatever its own slope: an idle or lightly loaded
    #: meter's slope is noise, but its level needs (almost) no drop correction [-].
    idle_drop_share: float = 0.1
    #: Meters compared with neighbours only are flagged above ``max(threshold_pct, this x the robust
    #: spread of that comparison on the feeder)``: where healthy meters scatter, a small deviation is not
    #: evidence; 0 turns the widening off [-].
    neighbour_spread_factor: float = 4.0
    #: Meters compared with neighbours only are also flagged only beyond this multiple of the 90th
    #: percentile of that comparison's distance from its median on the feeder: where a minority of
    #: transformers sit on another tap, a lone meter's level differs from its neighbours' by the tap
    #: (a mixture the median absolute deviation does not see); 0 turns it off [-].
    neighbour_tail_factor: float = 1.5
    #: Meters that do not follow their own load are compared with the median of this many others of them
    #: whose mean load is within ``cohort_load_ratio`` of theirs (a constant load's own drop sets their
    #: level: on ieee8500 the ~11 kW services sit ~2.2% below their neighbours, the ~3 kW ones level with
    #: them); fewer such: compared with the cohort as a whole; 0 turns the matching off [-].
    cohort_load_neighbours: int = 5
    #: Largest ratio of mean loads for two such meters to count as alike [-].
    cohort_load_ratio: float = 1.5

    def __post_init__(self) -> None:
        if self.cohort_load_neighbours < 0 or not self.cohort_load_ratio >= 1:
            raise ConfigError(
                "config keys 'pt.cohort_load_neighbours' >= 0 and 'pt.cohort_load_ratio' >= 1 required, got "
                f"{self.cohort_load_neighbours} and {self.cohort_load_ratio}"
            )
        if not (self.neighbour_spread_factor >= 0 and self.neighbour_tail_factor >= 0):
            raise ConfigError(
                "config keys 'pt.neighbour_spread_factor' and 'pt.neighbour_tail_factor' must be >= 0, got "
                f"{self.neighbour_spread_factor} and {self.neighbour_tail_factor}"
            )
        if not self.threshold_pct > 0:
            raise ConfigError(f"config key 'pt.threshold_pct' must be > 0, got {self.threshold_pct}")
        if self.n_windows < 1 or self.min_samples < 1 or self.min_group_size < 3 or self.n_neighbours < 1:
            raise ConfigError(
                "config keys 'pt.n_windows' >= 1, 'pt.min_samples' >= 1, 'pt.min_group_size' >= 3 and "
                f"'pt.n_neighbours' >= 1 required, got {self.n_windows}, {self.min_samples}, "
                f"{self.min_group_size} and {self.n_neighbours}"
            )
        if self.min_load_response < 0:
            raise ConfigError(f"config key 'pt.min_load_response' must be >= 0, got {self.min_load_response}")
        if not self.idle_drop_share >= 0:
            raise ConfigError(f"config key 'pt.idle_drop_share' must be >= 0, got {self.idle_drop_share}")


@dataclass(frozen=True)
class ChangesConfig:
    """Connection changes over time: phase moved at a restoration, or a change point without an event.

    See :mod:`phaseid_hpc.changes`.
    """

    enabled: bool = True
    #: ``events.csv`` (``meter_id, timestamp, event``) whose restorations split a meter's period; ``""``: none
    #: (``phaseid run --events`` sets it).
    events_file: str = ""
    #: Event name that marks a restoration (the reconnection) in ``events.csv``.
    restoration_event: str = "restoration"
    #: Fewest days after a restoration (and before it) for the two windows to be identified separately [d].
    min_after_days: float = 3.0
    min_before_days: float = 2.0
    #: Search meters without events for a change point in their correlation structure.
    change_point: bool = True
    #: Length of one window of the change-point search [s].
    window_s: float = 86400.0
    #: Nearest meters of each phase (whole-period voltage shape, the meter left out) summed into the
    #: template the meter is compared with per window [-].
    n_neighbours: int = 10
    #: A switch that holds on both sides of the split by this many standard errors (t statistic) makes the
    #: meter a candidate, confirmed by identification before and after the split [-].
    change_point_se: float = 2.5
    #: Distinct split times confirmed per feeder (most significant first; each costs two identification
    #: runs of the feeder) [-].
    max_splits_confirmed: int = 3

    def __post_init__(self) -> None:
        if self.min_after_days <= 0 or self.min_before_days <= 0 or self.window_s <= 0:
            raise ConfigError(
                "config keys 'changes.min_after_days', 'changes.min_before_days' and 'changes.window_s' must be "
                f"> 0, got {self.min_after_days}, {self.min_before_days} and {self.window_s}"
            )
        if self.change_point_se <= 0 or self.n_neighbours < 1:
            raise ConfigError("config keys 'changes.change_point_se' > 0 and 'changes.n_neighbours' >= 1 required, "
                              f"got {self.change_point_se} and {self.n_neighbours}")


@dataclass(frozen=True)
class JobConfig:
    """Dask job: partitions, device, determinism."""

    #: ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy workers).
    device: Literal["cpu", "gpu"] = "cpu"
    #: Target size of one partition (whole feeders) [bytes].
    block_bytes: int = 100_000_000
    #: Seed passed down to every stochastic step.
    random_state: int = 0


@dataclass(frozen=True)
class RunConfig:
    """The whole run configuration."""

    ingest: IngestConfig = field(default_factory=IngestConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    phase: PhaseConfig = field(default_factory=PhaseConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    pt: PTConfig = field(default_factory=PTConfig)
    changes: ChangesConfig = field(default_factory=ChangesConfig)
    job: JobConfig = field(default_factory=JobConfig)


def _check_value(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"config key {key!r}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r}: expected a table, got {type(value).__name__}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                return _check_value(key, a, value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    return value


def build_section(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """Build and validate a config dataclass from a table; errors name ``prefix + key``."""
    return _build(cls, data, prefix)


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; allowed in "
            f"[{prefix.rstrip('.') or 'top level'}]: {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {prefix + name!r}: expected a table")
            kwargs[name] = _build(hint, value, prefix + name + ".")
        else:
            kwargs[name] = _check_value(prefix + name, hint, value)
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


def _validate(obj: Any, prefix: str) -> None:
    if isinstance(obj, PhaseConfig):
        if not 0 <= obj.suspect_threshold <= obj.confident_threshold <= 1:
            raise ConfigError(
                f"config keys {prefix}suspect_threshold <= {prefix}confident_threshold must lie in [0, 1], "
                f"got {obj.suspect_threshold} and {obj.confident_threshold}"
            )
        if obj.min_samples < 2 or obj.zone_meters < 3 or obj.n_neighbours < 1 or obj.vote_rounds < 1 or obj.denoise_rank < 2:
            raise ConfigError(
                f"config keys {prefix}min_samples >= 2, {prefix}n_neighbours >= 1, {prefix}vote_rounds >= 1 and "
                f"{prefix}denoise_rank >= 2 required, got {obj.min_samples}, {obj.n_neighbours}, "
                f"{obj.vote_rounds} and {obj.denoise_rank}"
            )
        if obj.min_strength_se <= 0 or obj.min_margin_se <= 0 or obj.clock_lag_se < 0:
            raise ConfigError(
                f"config keys {prefix}min_strength_se > 0, {prefix}min_margin_se > 0 and {prefix}clock_lag_se >= 0 "
                f"required, got {obj.min_strength_se}, {obj.min_margin_se} and {obj.clock_lag_se}"
            )
        if obj.load_neighbours < 0:
            raise ConfigError(f"config key {prefix}load_neighbours >= 0 required (0: no load compensation), "
                              f"got {obj.load_neighbours}")
        if not 0 <= obj.coarse_zero_share <= 1 or obj.coarse_aggregate_s < 0:
            raise ConfigError(
                f"config keys {prefix}coarse_zero_share must lie in [0, 1] and {prefix}coarse_aggregate_s be "
                f">= 0, got {obj.coarse_zero_share} and {obj.coarse_aggregate_s}"
            )
    if isinstance(obj, QualityConfig):
        if obj.max_interp_gap < 0:
            raise ConfigError(f"config key {prefix}max_interp_gap must be >= 0, got {obj.max_interp_gap}")
        if not 0 < obj.min_pu < obj.max_pu:
            raise ConfigError(f"config keys {prefix}min_pu < {prefix}max_pu must be positive")
        if not obj.clock_flag_z >= 0 or not obj.max_clock_offset_s >= 0:
            raise ConfigError(
                f"config keys {prefix}clock_flag_z and {prefix}max_clock_offset_s must be >= 0, "
                f"got {obj.clock_flag_z} and {obj.max_clock_offset_s}"
            )


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in sorted(environ.items()):
        if not k.startswith("PHASEID__"):
            continue
        parts = [p.lower() for p in k[len("PHASEID__") :].split("__")]
        try:
            value = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            value = v
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def read_config_file(
    path: str | os.PathLike[str], *, what: str = "config file", toml_only: bool = False
) -> dict[str, Any]:
    """Parse a TOML (or YAML) configuration file into nested dicts.

    Parameters
    ----------
    path : path-like
        The file. ``.toml`` is read as TOML, ``.yaml``/``.yml`` as YAML.
    what : str
        How the file is named in error messages (``"cluster config"``, ...).
    toml_only : bool
        Read the file as TOML whatever its suffix (deployment and service configs).

    Raises
    ------
    ConfigError
        Naming the file: missing, unparsable, or of an unknown kind.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    text = p.read_text()
    if toml_only or p.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{what} {str(p)!r} is not valid TOML: {exc}") from exc
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {exc}") from exc
    raise ConfigError(f"{what} {str(p)!r}: expected a .toml, .yaml or .yml file")


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """Load and validate a run configuration.

    Parameters
    ----------
    path : path-like, optional
        A ``.toml``, ``.yaml`` or ``.yml`` file. ``None`` gives the defaults.
    overrides : mapping, optional
        Nested ``{section: {key: value}}`` applied after the file.
    environ : mapping, optional
        Environment to read ``PHASEID__SECTION__KEY`` overrides from (default: ``os.environ``).

    Returns
    -------
    RunConfig
    """
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    return _build(RunConfig, data, "")


def config_to_dict(config: Any) -> dict[str, Any]:
    """The configuration as plain, JSON-serialisable nested dicts."""
    return dataclasses.asdict(config)


def config_fingerprint(config: Any) -> str:
    """SHA-256 of the canonical JSON of a configuration (for ``summary.json`` and resume checks)."""
    blob = json.dumps(config_to_dict(config), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
