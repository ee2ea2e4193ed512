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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from .errors import ConfigError

__all__ = [
    "IngestConfig",
    "QualityConfig",
    "PhaseConfig",
    "TransformerConfig",
    "ValidationConfig",
    "JobConfig",
    "RunConfig",
    "load_config",
    "config_to_dict",
    "config_fingerprint",
]


@dataclass(frozen=True)
class IngestConfig:
    """How contract files are read into the store."""

    #: Column names in the readings files, mapped to the contract names.
    column_map: dict[str, str] = field(default_factory=dict)
    #: Rows read per batch when streaming a readings file (bounds memory).
    batch_rows: int = 2_000_000
    #: Target size of one feeder block (chunk along ``meter``) [bytes].
    block_bytes: int = 100_000_000
    #: Time chunk length [samples]; ``0`` means one chunk per ingest batch of time.
    time_chunk: int = 2976
    #: Voltage encoding in the store: ``"float32"`` or ``"int16_decivolt"``.
    voltage_encoding: Literal["float32", "int16_decivolt"] = "float32"


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
    #: Clock offsets above this are flagged [s].
    max_clock_offset_s: float = 60.0
    #: Fraction of reads off the store's time grid above which sampling is called inconsistent [-].
    max_off_grid_fraction: float = 0.05


@dataclass(frozen=True)
class PhaseConfig:
    """Phase identification."""

    #: Confidence at or above which a meter is ``confident`` [-].
    confident_threshold: float = 0.85
    #: Confidence at or above which a meter is ``suspect`` (below it: ``low``) [-].
    suspect_threshold: float = 0.70
    #: Correlation below which a meter "matches no phase" [-].
    low_correlation: float = 0.6
    #: Length of one window of the window ensemble [days].
    window_days: float = 4.0
    #: Use the feeder-head references to name phases where they are trustworthy.
    use_references: bool = True
    #: Seed of every random choice in identification.
    random_state: int = 0


@dataclass(frozen=True)
class TransformerConfig:
    """Meter-to-transformer verification."""

    enabled: bool = True
    confident_threshold: float = 0.85
    suspect_threshold: float = 0.70


@dataclass(frozen=True)
class ValidationConfig:
    """Transformer loading, imbalance and thermal model."""

    enabled: bool = True
    #: Ambient temperature when no series is given [degC].
    ambient_c: float = 30.0
    #: Thermal model standard: ``"iec"`` (IEC 60076-7) or ``"ieee"`` (IEEE C57.91 Clause 7).
    thermal_standard: Literal["iec", "ieee"] = "iec"
    #: Hot-spot limit for normal cyclic loading [degC].
    hot_spot_normal_c: float = 120.0
    #: Hot-spot limit for emergency loading [degC].
    hot_spot_emergency_c: float = 140.0
    #: Load imbalance above which a 3-phase bank is flagged [-].
    max_imbalance: float = 0.3
    #: Power factor assumed when no kvar is given [-].
    default_power_factor: float = 0.95


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
    if isinstance(obj, QualityConfig):
        if obj.max_interp_gap < 0:
            raise ConfigError(f"config key {prefix}max_interp_gap must be >= 0, got {obj.max_interp_gap}")
        if not 0 < obj.min_pu < obj.max_pu:
            raise ConfigError(f"config keys {prefix}min_pu < {prefix}max_pu must be positive")


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
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        text = p.read_text()
        if p.suffix == ".toml":
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from exc
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        else:
            raise ConfigError(f"config file {str(p)!r}: expected a .toml, .yaml or .yml file")
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
