"""Broker ingest: meter reads from the head-end's broker (RabbitMQ over AMQP or STOMP) into the store.

``phaseid ingest-service`` consumes one queue and upserts the reads into the same Zarr store as file ingest
(through :func:`phaseid_hpc.ingest.ingest_frame`). The protocol is a transport
(:mod:`phaseid_hpc.broker_transport`): AMQP 0-9-1 on port 5672 (``amqp://`` URLs) or STOMP 1.2 on
RabbitMQ's STOMP plugin, port 61613 (``stomp://`` URLs, ``--stomp``); batching, acknowledgement and
dead-lettering below are the same for both. Delivery is at-least-once from the broker and exactly-once
in the store:

* a message is acknowledged only after the batch holding it is durably in the store (``ingest_frame``
  returns after publishing), with one cumulative ack up to the batch's last delivery (AMQP
  ``basic.ack(multiple=True)``, STOMP ``ACK`` in ``ack: client`` mode);
* a store cell is keyed by (meter, timestamp), so a redelivered message rewrites the same cells with the same
  values and duplicates nothing. A crash between the write and the ack only causes a redelivery.

Payload schema
--------------
One message carries one read or a batch. ``content_type`` picks the parser (``application/json``,
``text/csv``; absent: sniffed from the first byte); ``content_encoding: gzip`` is decompressed first.

JSON, any of::

    {"meter_id": "M1", "timestamp": "2026-01-01T00:15:00Z", "voltage_v": 241.3, "kw": 1.2, "kvar": 0.3}
    [{"meter_id": ..., ...}, ...]                              # a batch of reads
    {"reads": [{"meter_id": ..., ...}, ...], ...}              # an envelope (other keys ignored)
    {"meter_id": ["M1", ...], "timestamp": [...], "voltage_v": [...]}   # columnar batch (fastest)

CSV: a header row naming at least ``meter_id,timestamp,voltage_v`` (``kw``, ``kvar`` optional; other
columns ignored), one read per row, UTF-8.

Fields: ``meter_id`` string (JSON integers are accepted and turned into their decimal string);
``timestamp`` ISO 8601 string, the END of the interval, converted to UTC (no offset: taken as UTC);
``voltage_v`` [V], ``kw`` [kW], ``kvar`` [kvar] numbers (``null`` / empty = missing).

Malformed messages, quarantine and the dead-letter queue
--------------------------------------------------------
* A message that cannot be turned into typed rows (undecodable, not JSON/CSV, a required field missing,
  an empty ``meter_id``, an unparseable timestamp or a non-numeric value, too large) is *malformed*: it is
  published unchanged to ``<queue>.dlq`` (durable, publisher-confirmed: AMQP confirms, a STOMP receipt) with
  headers ``reason`` (text),
  ``source_queue`` and ``rejected_at``, and then acknowledged with its batch. Never a crash, never a drop.
* A typed row that the store cannot take (unknown meter, timestamp outside the store's time axis or off its
  grid, ...) is quarantined by ``ingest_frame`` with a reason and counted in ``ServiceStats.rows_quarantined``.
* Any exception while decoding or parsing a message (not only the expected ones) dead-letters it with the
  exception as the reason. Bodies are bounded (``max_message_bytes``, after decompression; gzip bodies are
  decompressed only up to that bound) and so is JSON nesting (:data:`MAX_JSON_DEPTH` levels: the schema needs
  three). Timestamps outside [1900, 2200) and booleans where numbers belong are malformed.
* If ``ingest_frame`` raises for a batch, the batch is retried one message at a time. Every message that
  fails is dead-lettered with reason ``rejected by store: <exception>``, so one bad message can never stop
  the service (no crash loop under ``Restart=on-failure``). Two cases are systemic instead: a
  ``StoreError``/``OSError``/``ConfigError`` (the store, the disk, the setup), and two or more messages that
  all fail with the very same error (a bug or an outage, not the data). Then the service stops with the
  error and acknowledges nothing unwritten (the broker redelivers after a restart; nothing is
  dead-lettered because of a bug or a full disk).

Batching, backpressure, metrics, shutdown
----------------------------------------
A batch closes at ``service.batch_max_reads`` reads, after ``service.batch_max_seconds``, or when the
broker can send no more (``prefetch_count`` messages unacknowledged). One writer thread writes batch *n*
while the consumer thread parses batch *n+1*; at most one write is in flight, so memory is bounded by the
prefetch and the broker holds the rest (backpressure). Every ``service.metrics_interval_s`` one log line
``ingest-service metrics`` gives ``reads_per_s`` (written to the store over the interval), ``queue_depth``
(messages ready in the queue; AMQP only), ``lag_s`` (now minus the ``timestamp`` property of the newest
acknowledged message, when publishers set it), ``rejected`` (dead-lettered messages) and ``quarantined``
(rows). SIGTERM/SIGINT (:func:`stop_on_signals`) write and acknowledge the open batch, return prefetched
messages to the queue and close the connection. A lost connection is retried with backoff: unacknowledged
messages are redelivered and rewritten idempotently.

Dead-lettering is itself at-least-once: a crash between the dead-letter publish and the ack puts the message
in ``<queue>.dlq`` twice. Within one batch, two reads of the same (meter, timestamp) keep the last delivered.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import json
import logging
import os
import re
import signal
import stat
import threading
import time
import tomllib
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .broker_transport import BrokerError, Delivery, Transport, make_transport, redacted_url
from .config import RunConfig, build_section, load_config, read_config_file
from .contract import READINGS_OPTIONAL, READINGS_REQUIRED
from .errors import ConfigError, ContractError, PhaseIDError, StoreError
from .logging_utils import log_event

__all__ = [
    "BrokerError",
    "IngestServiceConfig",
    "MalformedMessageError",
    "ServiceStats",
    "add_broker_arguments",
    "broker_url_from_args",
    "build_parser",
    "load_service_config",
    "main",
    "main_from_cli",
    "parse_csv_reads",
    "parse_json_reads",
    "parse_message",
    "resolve_amqp_url",
    "resolve_broker_url",
    "run_ingest_service",
]

_LOGGER = logging.getLogger("phaseid_hpc.run.ingest_service")

#: Environment variables read by :func:`resolve_broker_url` (only through its ``environ`` argument).
ENV_AMQP_URL = "PHASEID_AMQP_URL"
ENV_AMQP_URL_FILE = "PHASEID_AMQP_URL_FILE"
ENV_STOMP_URL = "PHASEID_STOMP_URL"
ENV_STOMP_URL_FILE = "PHASEID_STOMP_URL_FILE"
#: Per protocol: the URL and URL-file variables, and the schemes a URL may have.
_BROKER_ENV = {
    "amqp": (ENV_AMQP_URL, ENV_AMQP_URL_FILE, ("amqp://", "amqps://"), "amqp://user:pass@host:5672/vhost"),
    "stomp": (ENV_STOMP_URL, ENV_STOMP_URL_FILE, ("stomp://", "stomp+ssl://"),
              "stomp://user:pass@host:61613/vhost"),
}

_READ_COLUMNS = READINGS_REQUIRED + READINGS_OPTIONAL
#: Deepest JSON nesting accepted (the envelope ``{"reads": [{...}]}`` has three levels).
MAX_JSON_DEPTH = 8
#: Accepted timestamps [UTC]; outside, a message is malformed (never wrapped onto another time).
_TS_RANGE = ("1900-01-01", "2200-01-01")


class MalformedMessageError(ContractError):
    """A broker message that cannot be turned into typed reads; ``reason`` goes into the dead-letter header."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class IngestServiceConfig:
    """How the broker ingest service consumes, batches and reports (``[service]`` table of its config)."""

    #: Unacknowledged messages the broker may hand over at once (backpressure; bounds memory; AMQP
    #: ``basic.qos``, RabbitMQ STOMP ``prefetch-count``).
    prefetch_count: int = 64
    #: Write a batch once it holds this many reads [reads].
    batch_max_reads: int = 200_000
    #: ... or once its first message is this old [s].
    batch_max_seconds: float = 2.0
    #: Interval between metrics lines in the log [s].
    metrics_interval_s: float = 30.0
    #: Dead-letter queue name = queue name + this suffix.
    dead_letter_suffix: str = ".dlq"
    #: Declare the queue (durable) if it does not exist yet; ``false``: it must exist (STOMP: subscribe to
    #: ``/amq/queue/NAME`` instead of ``/queue/NAME``).
    declare_queue: bool = True
    #: Largest accepted message body (after decompression) [bytes]; larger ones are dead-lettered.
    max_message_bytes: int = 256 * 1024 * 1024
    #: Heartbeat interval of the broker connection (AMQP heartbeat, STOMP heart-beat both ways) [s].
    heartbeat_s: int = 60
    #: Longest wait between reconnect attempts after a lost connection [s]; ``0``: stop with an error instead.
    reconnect_max_s: float = 30.0


@dataclass
class ServiceStats:
    """Counters of one :func:`run_ingest_service` call."""

    messages: int = 0
    reads_received: int = 0
    reads_written: int = 0
    rows_quarantined: int = 0
    messages_dead_lettered: int = 0
    batches: int = 0
    reconnects: int = 0
    elapsed_s: float = 0.0
    dead_letter_reasons: Counter = field(default_factory=Counter)

    @property
    def reads_per_s(self) -> float:
        """Reads written to the store per second of wall time [reads/s]."""
        return self.reads_written / self.elapsed_s if self.elapsed_s > 0 else 0.0


# ----------------------------------------------------------------------------------------------- parsing


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python value it holds (for readable reasons)."""
    return value.item() if isinstance(value, np.generic) else value


def _typed_reads(df: pd.DataFrame, what: str) -> pd.DataFrame:
    """Contract columns with contract dtypes; raise :class:`MalformedMessageError` on the first bad value."""
    if len(df) == 0:
        raise MalformedMessageError(f"{what}: no reads")
    missing = [c for c in READINGS_REQUIRED if c not in df.columns]
    if missing:
        raise MalformedMessageError(f"{what}: missing required field(s) {missing}; found {list(df.columns)}")
    out = {}
    meter = df["meter_id"]
    bad = meter.isna().to_numpy()
    if not bad.any():
        meter = meter.astype(str)
        bad = (meter.str.len() == 0).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MalformedMessageError(f"{what}: read {i}: empty meter_id")
    out["meter_id"] = meter.to_numpy(dtype=object)

    ts_raw = df["timestamp"]
    if ts_raw.dtype.kind in "biuf":
        raise MalformedMessageError(f"{what}: timestamps are numbers, expected ISO 8601 strings")
    try:
        ts = pd.to_datetime(ts_raw, utc=True, format="ISO8601", errors="coerce")
    except (TypeError, ValueError, OverflowError) as exc:  # mixed types that pandas refuses outright
        raise MalformedMessageError(f"{what}: timestamps are not ISO 8601 strings ({exc})") from None
    bad = ts.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MalformedMessageError(
            f"{what}: read {i}: timestamp {_plain(ts_raw.iloc[i])!r} is not an ISO 8601 date-time"
        )
    local = np.asarray(ts.dt.tz_convert(None).to_numpy())
    unit = np.datetime_data(local.dtype)[0]
    lo, hi = (np.datetime64(d, unit) for d in _TS_RANGE)
    bad = (local < lo) | (local >= hi)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MalformedMessageError(
            f"{what}: read {i}: timestamp {_plain(ts_raw.iloc[i])!r} is outside {_TS_RANGE[0]} .. {_TS_RANGE[1]}"
        )
    out["timestamp"] = local.astype("datetime64[ns]")

    for name in ("voltage_v",) + READINGS_OPTIONAL:
        if name not in df.columns:
            continue
        raw = df[name]
        if raw.dtype.kind in "fiu":
            out[name] = raw.to_numpy(dtype=np.float64)
            continue
        if raw.dtype.kind == "b":
            raise MalformedMessageError(f"{what}: {name} holds booleans, expected numbers")
        if raw.dtype == object:
            is_bad = np.fromiter(
                (isinstance(v, (bool, np.bool_, list, dict)) for v in raw.to_numpy()), bool, len(raw)
            )
            if is_bad.any():
                i = int(np.flatnonzero(is_bad)[0])
                raise MalformedMessageError(f"{what}: read {i}: {name} {_plain(raw.iloc[i])!r} is not a number")
        num = pd.to_numeric(raw, errors="coerce")
        bad = (num.isna() & raw.notna()).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise MalformedMessageError(f"{what}: read {i}: {name} {_plain(raw.iloc[i])!r} is not a number")
        out[name] = num.to_numpy(dtype=np.float64)
    return pd.DataFrame(out)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in b'"[]{}')
_ESCAPE = re.compile(rb"\\.", re.DOTALL)


def _json_depth(body: bytes | str) -> int:
    """Deepest bracket nesting of a JSON text, brackets inside strings excluded (no parse, no recursion).

    Escapes are dropped first (so every remaining quote opens or closes a string), then everything but
    quotes and brackets, at C speed; the short rest is scanned with NumPy.
    """
    data = body.encode() if isinstance(body, str) else bytes(body)
    if b"\\" in data:
        data = _ESCAPE.sub(b"", data)
    kept = np.frombuffer(data.translate(None, _NOT_STRUCTURAL), dtype=np.uint8)
    if not len(kept):
        return 0
    quote = kept == ord('"')
    in_string = (np.cumsum(quote) % 2 == 1) | quote
    step = np.zeros(len(kept), np.int64)
    step[(kept == ord("[")) | (kept == ord("{"))] = 1
    step[(kept == ord("]")) | (kept == ord("}"))] = -1
    step[in_string] = 0
    return int(np.cumsum(step).max(initial=0))


def parse_json_reads(body: bytes | str) -> pd.DataFrame:
    """Parse a JSON message (one read, a list, a ``{"reads": [...]}`` envelope or columnar lists).

    Returns
    -------
    DataFrame
        Columns ``meter_id`` (str), ``timestamp`` (datetime64[ns], UTC), ``voltage_v`` [V] and, where present,
        ``kw`` [kW], ``kvar`` [kvar] (float64, NaN = missing).

    Raises
    ------
    MalformedMessageError
        With a reason naming the read and the field.
    """
    depth = _json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise MalformedMessageError(f"JSON message: nested {depth} levels deep, more than {MAX_JSON_DEPTH}")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedMessageError(f"JSON message: not valid JSON ({_one_line(exc)})") from None
    if isinstance(doc, dict) and "reads" in doc:
        doc = doc["reads"]
    if isinstance(doc, dict):
        if isinstance(doc.get("meter_id"), list):  # columnar
            cols = {k: v for k, v in doc.items() if k in _READ_COLUMNS}
            lengths = {k: len(v) if isinstance(v, list) else -1 for k, v in cols.items()}
            if len(set(lengths.values())) != 1:
                raise MalformedMessageError(f"JSON columnar message: columns must be lists of one length, got {lengths}")
            return _typed_reads(pd.DataFrame(cols), "JSON columnar message")
        doc = [doc]
    if not isinstance(doc, list):
        raise MalformedMessageError(
            f"JSON message: expected an object, a list of objects or {{\"reads\": [...]}}, got {type(doc).__name__}"
        )
    for i, rec in enumerate(doc):
        if not isinstance(rec, dict):
            raise MalformedMessageError(f"JSON message: read {i} is a {type(rec).__name__}, expected an object")
    frame = pd.DataFrame.from_records(doc)
    return _typed_reads(frame, "JSON message")


def parse_csv_reads(body: bytes | str) -> pd.DataFrame:
    """Parse a CSV batch (header row with contract names). Same return and errors as :func:`parse_json_reads`."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    data = body.encode() if isinstance(body, str) else body
    try:
        header = next(csv.reader([data.split(b"\n", 1)[0].decode("utf-8")]), [])
    except UnicodeDecodeError as exc:
        raise MalformedMessageError(f"CSV message: header is not UTF-8 ({exc})") from None
    header = [h.strip() for h in header]
    missing = [c for c in READINGS_REQUIRED if c not in header]
    if missing:
        raise MalformedMessageError(f"CSV message: missing required column(s) {missing}; header is {header}")
    types = {"meter_id": pa.string(), "timestamp": pa.string()}
    types.update({c: pa.float64() for c in ("voltage_v",) + READINGS_OPTIONAL})
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(
                column_names=header, skip_rows=1, use_threads=False,
                block_size=min(max(len(data) + 1, 1 << 16), 1 << 26),  # one block: no per-block overhead
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={k: v for k, v in types.items() if k in header},
                include_columns=[c for c in _READ_COLUMNS if c in header],
                strings_can_be_null=True,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise MalformedMessageError(f"CSV message: {exc}") from None
    return _typed_reads(table.to_pandas(), "CSV message")


def parse_message(body: bytes, content_type: str | None = None, content_encoding: str | None = None,
                  *, max_bytes: int | None = None) -> pd.DataFrame:
    """Parse one broker message into typed reads (see the module docstring for the schema).

    Parameters
    ----------
    body : bytes
        The message body.
    content_type : str, optional
        ``application/json`` or ``text/csv`` (parameters such as ``; charset=utf-8`` are ignored). ``None``:
        JSON if the first non-blank byte is ``{`` or ``[``, CSV otherwise.
    content_encoding : str, optional
        ``gzip`` or ``None``/``identity``.
    max_bytes : int, optional
        Largest accepted body after decompression [bytes].

    Raises
    ------
    MalformedMessageError
        For any problem with the message, whatever the exception behind it (its type and first line are
        the reason).
    """
    try:
        return _parse_message(body, content_type, content_encoding, max_bytes=max_bytes)
    except MalformedMessageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a message must never stop the service: it is malformed
        raise MalformedMessageError(f"message cannot be parsed ({_one_line(exc)})") from None


def _gunzip(body: bytes, max_bytes: int | None) -> bytes:
    """Decompress gzip members, never producing more than ``max_bytes`` + 1 bytes (zip bombs stay small)."""
    limit = (max_bytes + 1) if max_bytes is not None else -1
    out, rest = [], body
    size = 0
    while rest:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        chunk = d.decompress(rest, max(0, limit - size) if limit > 0 else 0)
        out.append(chunk)
        size += len(chunk)
        if limit > 0 and size >= limit:
            break
        if not d.eof:
            raise MalformedMessageError("content_encoding gzip: cannot decompress (truncated gzip data)")
        rest = d.unused_data
    return b"".join(out)


def _parse_message(body: bytes, content_type: str | None, content_encoding: str | None,
                   *, max_bytes: int | None) -> pd.DataFrame:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise MalformedMessageError(f"message body is a {type(body).__name__}, expected bytes")
    body = bytes(body)
    enc = (content_encoding or "identity").strip().lower()
    if enc == "gzip":
        try:
            body = _gunzip(body, max_bytes)
        except (OSError, EOFError, zlib.error) as exc:
            raise MalformedMessageError(f"content_encoding gzip: cannot decompress ({exc})") from None
    elif enc not in ("identity", "utf-8", "utf8"):
        raise MalformedMessageError(f"unsupported content_encoding {content_encoding!r}; expected gzip or none")
    if max_bytes is not None and len(body) > max_bytes:
        raise MalformedMessageError(f"message of {len(body)} bytes exceeds max_message_bytes={max_bytes}")
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if not kind:
        kind = "application/json" if body.lstrip()[:1] in (b"{", b"[") else "text/csv"
    if kind in ("application/json", "text/json"):
        return parse_json_reads(body)
    if kind in ("text/csv", "application/csv"):
        return parse_csv_reads(body)
    raise MalformedMessageError(f"unsupported content_type {content_type!r}; expected application/json or text/csv")


# ------------------------------------------------------------------------------------ configuration


def resolve_broker_url(url: str | None = None, *, url_file: str | os.PathLike[str] | None = None,
                       environ: Mapping[str, str] | None = None, protocol: str = "amqp") -> str:
    """The broker URL of ``protocol`` (``amqp`` or ``stomp``), from (in order) ``url``, ``url_file``,
    ``$PHASEID_<PROTOCOL>_URL``, ``$PHASEID_<PROTOCOL>_URL_FILE``.

    A URL file holds one line (``amqp://user:pass@host:5672/vhost``, ``stomp://user:pass@host:61613/vhost``);
    it must not be readable by group or others (``chmod 600``; systemd ``LoadCredential=`` files qualify)
    and is refused otherwise. Production deployments should use the environment or the file, never a URL on
    the command line (it shows in ``ps`` and shell history).
    """
    if protocol not in _BROKER_ENV:
        raise ConfigError(f"unknown broker protocol {protocol!r}; expected one of {sorted(_BROKER_ENV)}")
    env_url, env_file, schemes, example = _BROKER_ENV[protocol]
    env = os.environ if environ is None else environ
    if url:
        return url
    path = url_file or env.get(env_file) or None
    if url_file is None and env.get(env_url):
        return env[env_url]
    if path is None:
        raise ConfigError(
            f"no broker URL ({protocol.upper()}): pass --{protocol}-url-file PATH, or set ${env_url} or ${env_file}"
        )
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"broker URL file {str(p)!r} cannot be read: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"broker URL file {str(p)!r} has mode {stat.S_IMODE(mode):04o}: it holds credentials and must not be "
            f"accessible to group or others; run chmod 600 {str(p)!r}"
        )
    text = p.read_text().strip()
    if not text.startswith(schemes):
        raise ConfigError(f"broker URL file {str(p)!r}: expected one line {example}")
    return text


def resolve_amqp_url(url: str | None = None, *, url_file: str | os.PathLike[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> str:
    """:func:`resolve_broker_url` for AMQP (``$PHASEID_AMQP_URL``, ``$PHASEID_AMQP_URL_FILE``)."""
    return resolve_broker_url(url, url_file=url_file, environ=environ, protocol="amqp")


def load_service_config(path: str | os.PathLike[str] | None = None, *,
                        environ: Mapping[str, str] | None = None) -> tuple[RunConfig, IngestServiceConfig]:
    """Load an ingest-service config file (``configs/ingest-service.example.toml``).

    The ``[service]`` table fills :class:`IngestServiceConfig`; every other table is a run config section
    (``[ingest]`` is what the store writes use) and is validated by :func:`phaseid_hpc.config.load_config`,
    including ``PHASEID__SECTION__KEY`` environment overrides. ``PHASEID__SERVICE__KEY`` overrides
    ``[service]`` keys.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_config_file(path, toml_only=True)
    env = dict(os.environ if environ is None else environ)
    service = dict(data.pop("service", {}) or {})
    for k, v in env.items():
        if k.startswith("PHASEID__SERVICE__"):
            try:
                service[k[len("PHASEID__SERVICE__"):].lower()] = tomllib.loads(f"v = {v}")["v"]
            except tomllib.TOMLDecodeError:
                service[k[len("PHASEID__SERVICE__"):].lower()] = v
    run_env = {k: v for k, v in env.items() if not k.startswith("PHASEID__SERVICE__")}
    run = load_config(None, overrides=data, environ=run_env)
    svc = build_section(IngestServiceConfig, service, "service.")
    _validate_service_config(svc)
    return run, svc


def _validate_service_config(svc: IngestServiceConfig) -> None:
    for key in ("prefetch_count", "batch_max_reads", "max_message_bytes", "heartbeat_s"):
        if getattr(svc, key) < 1:
            raise ConfigError(f"config key 'service.{key}' must be >= 1, got {getattr(svc, key)}")
    for key in ("batch_max_seconds", "metrics_interval_s"):
        if not getattr(svc, key) > 0:
            raise ConfigError(f"config key 'service.{key}' must be > 0, got {getattr(svc, key)}")
    if svc.reconnect_max_s < 0:
        raise ConfigError(f"config key 'service.reconnect_max_s' must be >= 0, got {svc.reconnect_max_s}")
    if not svc.dead_letter_suffix:
        raise ConfigError("config key 'service.dead_letter_suffix' must not be empty")


_redacted = redacted_url


# ----------------------------------------------------------------------------------------- consumer


@dataclass
class _Pending:
    """One consumed message waiting for its batch to be written."""

    delivery: Delivery
    reads: pd.DataFrame | None  # None: already dead-lettered


class _Batch:
    def __init__(self) -> None:
        self.items: list[_Pending] = []
        self.n_reads = 0
        self.started = 0.0

    def add(self, item: _Pending, now: float) -> None:
        if not self.items:
            self.started = now
        self.items.append(item)
        if item.reads is not None:
            self.n_reads += len(item.reads)


def _default_sink() -> Callable[..., Any]:
    from .ingest import ingest_frame  # imported lazily: the store stack is heavy

    return ingest_frame


def _count_quarantined(report: Any) -> int:
    """Rows the sink quarantined (``IngestReport.rows_quarantined``; 0 for sinks that report nothing)."""
    return int(getattr(report, "rows_quarantined", 0) or 0)


class _Consumer:
    """One connection's worth of consuming through ``transport``; :func:`run_ingest_service` reconnects
    around it."""

    def __init__(self, transport: Transport, store: Any, run: RunConfig, svc: IngestServiceConfig,
                 sink: Callable[..., Any], stats: ServiceStats, stop: threading.Event,
                 stop_when_idle_s: float | None, executor: concurrent.futures.Executor) -> None:
        self.transport, self.queue, self.store, self.run, self.svc = transport, transport.queue, store, run, svc
        self.sink, self.stats, self.stop = sink, stats, stop
        self.stop_when_idle_s = stop_when_idle_s
        self.dlq = transport.dead_letter_queue
        self.last_metrics = time.monotonic()
        self.metrics_reads = 0
        self.last_latency_s: float | None = None
        self.executor = executor
        self.inflight: tuple[concurrent.futures.Future, _Batch] | None = None

    def dead_letter(self, item: _Pending, reason: str) -> None:
        """Publish ``item`` unchanged to the dead-letter queue (confirmed) with a ``reason`` header."""
        self.transport.dead_letter(item.delivery, {
            "reason": reason[:4000],
            "source_queue": self.queue,
            "rejected_at": datetime.now(UTC).isoformat(timespec="seconds"),
        })
        item.reads = None
        self.stats.messages_dead_lettered += 1
        self.stats.dead_letter_reasons[reason.split(":", 1)[0]] += 1
        log_event(_LOGGER, "message dead-lettered", logging.WARNING, queue=self.queue, dlq=self.dlq, reason=reason)

    # -- batching
    def write(self, items: list[_Pending]) -> tuple[int, int]:
        """Upsert the reads of ``items`` (writer thread); return (reads written, rows quarantined)."""
        frames = [it.reads for it in items if it.reads is not None]
        if not frames:
            return 0, 0
        reads = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        if len(frames) > 1:  # the same (meter, timestamp) twice in one batch: the last delivered wins
            reads = reads.drop_duplicates(["meter_id", "timestamp"], keep="last", ignore_index=True)
        report = self.sink(self.store, reads, config=self.run.ingest,
                           source=f"{self.transport.scheme}:{self.queue}")
        q = _count_quarantined(report)
        return len(reads) - q, q

    def submit(self, batch: _Batch) -> None:
        """Hand ``batch`` to the writer thread (after settling the one before: one write in flight)."""
        self.settle(block=True)
        if batch.items:
            self.inflight = (self.executor.submit(self.write, batch.items), batch)

    def settle(self, *, block: bool) -> None:
        """Acknowledge the in-flight batch once its write has returned (consumer thread only)."""
        if self.inflight is None:
            return
        future, batch = self.inflight
        if not block and not future.done():
            return
        while not future.done():  # keep heartbeats flowing during a long write (deliveries are buffered)
            self.transport.keepalive(0.2)
        self.inflight = None
        try:
            written, quarantined = future.result()
        except (ConfigError, StoreError, OSError):
            raise  # the store or the setup, not the data: stop, acknowledge nothing, redeliver after restart
        except Exception as exc:  # noqa: BLE001 - decided below: poison message or systemic failure
            written, quarantined = self.isolate(batch, exc)
        # Durable in the store (or dead-lettered with a confirm): now, and only now, acknowledge.
        self.transport.ack_through(batch.items[-1].delivery)
        self.stats.batches += 1
        self.stats.reads_written += written
        self.stats.rows_quarantined += quarantined
        self.metrics_reads += written
        ts = batch.items[-1].delivery.timestamp
        if ts:
            self.last_latency_s = max(0.0, time.time() - ts)

    def isolate(self, batch: _Batch, exc: Exception) -> tuple[int, int]:
        """The sink raised for a batch: write it message by message and dead-letter the messages that fail.

        Every failing message is dead-lettered with the exception as the reason, except when the failure is
        systemic: a ``StoreError``/``OSError``/``ConfigError``, or two or more messages that all fail with
        the very same error and none succeeds (a bug or an outage). That is re-raised with nothing
        acknowledged.
        """
        log_event(_LOGGER, "batch rejected by store; retrying message by message", logging.WARNING,
                  queue=self.queue, messages=len(batch.items), error=repr(exc))
        written = quarantined = 0
        failed: list[tuple[_Pending, Exception]] = []
        any_ok = False
        for it in batch.items:
            if it.reads is None:
                continue
            try:
                w, q = self.write([it])
            except (ConfigError, StoreError, OSError):
                raise
            except Exception as exc1:  # noqa: BLE001 - see the docstring
                failed.append((it, exc1))
            else:
                any_ok = True
                written, quarantined = written + w, quarantined + q
        signatures = {(type(e), str(e)) for _, e in failed if not isinstance(e, ContractError)}
        if not any_ok and len(failed) >= 2 and len(signatures) == 1 and len(failed) == len(
            [e for _, e in failed if not isinstance(e, ContractError)]
        ):
            raise failed[0][1]
        for it, exc1 in failed:
            self.dead_letter(it, f"rejected by store: {_one_line(exc1)}")
        return written, quarantined

    def wait_inflight(self) -> None:
        """After a lost connection: let the running write finish (its messages will be redelivered)."""
        if self.inflight is not None:
            concurrent.futures.wait([self.inflight[0]])
            self.inflight = None

    def metrics(self, now: float, force: bool = False) -> None:
        dt = now - self.last_metrics
        if not force and dt < self.svc.metrics_interval_s:
            return
        depth = None
        try:
            depth = self.transport.queue_depth()
        except Exception as exc:  # noqa: BLE001 - metrics must never stop the service
            _LOGGER.debug("queue depth unavailable: %r", exc)
        log_event(
            _LOGGER, "ingest-service metrics", queue=self.queue,
            reads_per_s=round(self.metrics_reads / dt, 1) if dt > 0 else 0.0,
            reads_written=self.stats.reads_written, messages=self.stats.messages, batches=self.stats.batches,
            rejected=self.stats.messages_dead_lettered, quarantined=self.stats.rows_quarantined,
            queue_depth=depth,
            lag_s=None if self.last_latency_s is None else round(self.last_latency_s, 3),
        )
        self.last_metrics, self.metrics_reads = now, 0

    def consume(self) -> None:
        svc = self.svc
        tick = min(svc.batch_max_seconds, 0.25)
        batch = _Batch()
        last_message = time.monotonic()
        for delivery in self.transport.deliveries(tick):
            now = time.monotonic()
            self.settle(block=False)
            if delivery is not None:
                last_message = now
                self.stats.messages += 1
                item = _Pending(delivery, None)
                try:
                    item.reads = parse_message(delivery.body, delivery.content_type, delivery.content_encoding,
                                               max_bytes=svc.max_message_bytes)
                    self.stats.reads_received += len(item.reads)
                except MalformedMessageError as exc:
                    item.reads = None
                    self.dead_letter(item, exc.reason)
                except Exception as exc:  # noqa: BLE001 - never a crash (loop) over one message
                    item.reads = None
                    self.dead_letter(item, f"message cannot be parsed ({_one_line(exc)})")
                batch.add(item, now)
            unacked = len(batch.items) + (len(self.inflight[1].items) if self.inflight else 0)
            if batch.items and (
                batch.n_reads >= svc.batch_max_reads
                or unacked >= svc.prefetch_count  # the broker sends no more until we ack
                or now - batch.started >= svc.batch_max_seconds
                or self.stop.is_set()
            ):
                self.submit(batch)
                batch = _Batch()
            if self.inflight is not None and len(self.inflight[1].items) >= svc.prefetch_count:
                self.settle(block=True)  # nothing more can arrive before this ack: do not wait for a tick
            self.metrics(now)
            if self.stop.is_set():
                break
            if self.stop_when_idle_s is not None and now - last_message >= self.stop_when_idle_s:
                break
        self.submit(batch)
        self.settle(block=True)


def run_ingest_service(
    broker_url: str,
    queue: str,
    store: str | os.PathLike[str],
    *,
    config: RunConfig | None = None,
    service_config: IngestServiceConfig | None = None,
    stop_event: threading.Event | None = None,
    sink: Callable[..., Any] | None = None,
    stop_when_idle_s: float | None = None,
) -> ServiceStats:
    """Consume meter reads from ``queue`` into ``store`` until ``stop_event`` is set.

    Parameters
    ----------
    broker_url : str
        ``amqp://user:pass@host:5672/vhost`` (AMQP) or ``stomp://user:pass@host:61613/vhost`` (STOMP); the
        scheme picks the transport (see :func:`resolve_broker_url` for where to keep the URL).
    queue : str
        Queue to consume; declared durable if missing (``service.declare_queue``). Malformed messages go to
        ``queue + service.dead_letter_suffix``.
    store : path-like
        An existing store (created by ``phaseid ingest`` / ``initialize_store``).
    config : RunConfig, optional
        ``config.ingest`` is passed to the sink.
    service_config : IngestServiceConfig, optional
        Prefetch, batching, metrics, reconnects.
    stop_event : threading.Event, optional
        Set it (e.g. from a SIGTERM handler) for a clean stop: the open batch is written and acknowledged,
        prefetched messages are returned to the queue, the connection is closed.
    sink : callable, optional
        ``sink(store, reads, *, config, source) -> report``, durable on return; default
        :func:`phaseid_hpc.ingest.ingest_frame`.
    stop_when_idle_s : float, optional
        Also stop once no message has arrived for this long [s] (drain mode for backfills and tests).

    Returns
    -------
    ServiceStats

    Raises
    ------
    BrokerError
        The first connection fails, the credentials are refused, or a reconnect is not allowed.
    StoreError, OSError
        The store cannot be written; nothing unwritten was acknowledged.
    """
    run = config or RunConfig()
    svc = service_config or IngestServiceConfig()
    _validate_service_config(svc)
    stop = stop_event or threading.Event()
    stats = ServiceStats()
    sink = sink or _default_sink()
    t0 = time.monotonic()
    backoff = 0.5
    connected_once = False
    log_event(_LOGGER, "ingest-service starting", broker=_redacted(broker_url), queue=queue, store=str(store),
              prefetch=svc.prefetch_count, batch_max_reads=svc.batch_max_reads,
              batch_max_seconds=svc.batch_max_seconds)
    # One writer thread: the next batch is parsed while the previous one is written (one write in flight).
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="phaseid-store-writer")
    try:
        while not stop.is_set():
            transport = make_transport(broker_url, queue, prefetch_count=svc.prefetch_count,
                                       heartbeat_s=svc.heartbeat_s, declare_queue=svc.declare_queue,
                                       dead_letter_queue=queue + svc.dead_letter_suffix)
            consumer = _Consumer(transport, store, run, svc, sink, stats, stop, stop_when_idle_s, writer)
            try:
                transport.connect()
                connected_once, backoff = True, 0.5
                consumer.consume()
                consumer.metrics(time.monotonic(), force=True)
                transport.close()
                break
            except transport.errors as exc:
                fatal = transport.fatal(exc)
                if fatal is not None:
                    raise fatal from exc
                # Unacknowledged messages (written or not) are redelivered; the upsert makes that harmless.
                if not connected_once or svc.reconnect_max_s == 0:
                    raise BrokerError(f"broker {_redacted(broker_url)} unreachable or connection lost: {exc!r}") from exc
                stats.reconnects += 1
                log_event(_LOGGER, "broker connection lost; reconnecting", logging.WARNING,
                          error=repr(exc), retry_in_s=backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, svc.reconnect_max_s)
            finally:
                consumer.wait_inflight()
                transport.abort()
    finally:
        writer.shutdown(wait=True)
        stats.elapsed_s = time.monotonic() - t0
        log_event(_LOGGER, "ingest-service stopped", queue=queue, reads_written=stats.reads_written,
                  messages=stats.messages, rejected=stats.messages_dead_lettered,
                  quarantined=stats.rows_quarantined, elapsed_s=round(stats.elapsed_s, 3))
    return stats


# ----------------------------------------------------------------------------------------------- CLI


def stop_on_signals(stop_event: threading.Event, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Install handlers that set ``stop_event`` (call from the main thread)."""

    def _handler(signum: int, _frame: Any) -> None:
        log_event(_LOGGER, "stop requested", signal=signal.Signals(signum).name)
        stop_event.set()

    for s in signals:
        signal.signal(s, _handler)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``phaseid ingest-service`` (added to ``parser`` when given)."""
    p = parser or argparse.ArgumentParser(prog="phaseid ingest-service", description=__doc__.split("\n", 1)[0])
    add_broker_arguments(p)
    p.add_argument("--queue", required=True, help="queue to consume")
    p.add_argument("--store", required=True, help="existing Zarr store")
    p.add_argument("--config", default=None, help="ingest-service TOML ([service] + run config tables)")
    p.add_argument("--batch-reads", type=int, default=None, help="override service.batch_max_reads")
    p.add_argument("--batch-seconds", type=float, default=None, help="override service.batch_max_seconds")
    p.add_argument("--stop-when-idle", type=float, default=None, metavar="SECONDS",
                   help="stop after this many seconds without messages (drain mode)")
    return p


def add_broker_arguments(p: argparse.ArgumentParser) -> None:
    """The broker options of ``phaseid ingest-service``: protocol and where its URL comes from."""
    p.add_argument("--amqp", default=None,
                   help="AMQP broker URL (development only: prefer $PHASEID_AMQP_URL or --amqp-url-file)")
    p.add_argument("--amqp-url-file", default=None, help="file holding the AMQP broker URL, mode 0600")
    p.add_argument("--stomp", action="store_true",
                   help="consume over STOMP (RabbitMQ's STOMP plugin, port 61613) instead of AMQP; the URL "
                        "stomp://user:pass@host:61613/vhost comes from $PHASEID_STOMP_URL, "
                        "$PHASEID_STOMP_URL_FILE or --stomp-url-file, never from the command line")
    p.add_argument("--stomp-url-file", default=None, help="file holding the STOMP broker URL, mode 0600 "
                                                           "(implies --stomp)")


def broker_url_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str:
    """The broker URL that the ``ingest-service`` options ask for (see :func:`add_broker_arguments`).

    Raises
    ------
    ConfigError
        AMQP and STOMP options mixed, or no URL found (the message names the variables and the option).
    """
    stomp = bool(getattr(args, "stomp", False) or getattr(args, "stomp_url_file", None))
    if stomp and (getattr(args, "amqp", None) or getattr(args, "amqp_url_file", None)):
        raise ConfigError("--stomp/--stomp-url-file and --amqp/--amqp-url-file exclude each other: pick one broker")
    if stomp:
        return resolve_broker_url(None, url_file=getattr(args, "stomp_url_file", None), environ=environ,
                                  protocol="stomp")
    return resolve_broker_url(getattr(args, "amqp", None), url_file=getattr(args, "amqp_url_file", None),
                              environ=environ, protocol="amqp")


def main_from_cli(args: argparse.Namespace, config: RunConfig | None = None) -> int:
    """Run ``phaseid ingest-service`` from parsed arguments (see :func:`build_parser`); return the exit code.

    Sets up the log on stderr (journald), SIGTERM/SIGINT handlers for a clean stop, reads the config
    (``args.config`` through :func:`load_service_config`; ``config`` is used for the run tables only when no
    file is given) and the broker URL (:func:`broker_url_from_args`). Exit code 0 after a clean stop, 1
    after an error (logged).
    """
    import dataclasses

    from .logging_utils import get_run_logger

    get_run_logger(None, echo=True)
    try:
        run, svc = load_service_config(args.config)
        if config is not None and args.config is None:
            run = config
        over = {"batch_max_reads": getattr(args, "batch_reads", None),
                "batch_max_seconds": getattr(args, "batch_seconds", None)}
        svc = dataclasses.replace(svc, **{k: v for k, v in over.items() if v is not None})
        url = broker_url_from_args(args)
        stop = threading.Event()
        stop_on_signals(stop)
        run_ingest_service(url, args.queue, args.store, config=run, service_config=svc, stop_event=stop,
                           stop_when_idle_s=getattr(args, "stop_when_idle", None))
    except PhaseIDError as exc:
        log_event(_LOGGER, "ingest-service failed", logging.ERROR, error=str(exc))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m phaseid_hpc.ingest_service ...``: same as ``phaseid ingest-service``."""
    return main_from_cli(build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
