"""Tests of phaseid_hpc/ingest_service.py: payload parsing, credentials, config, and (against a real RabbitMQ,
guest/guest: AMQP at 127.0.0.1:5672 and its STOMP plugin at 127.0.0.1:61613, each broker test run over both
transports) batching, dead-lettering, SIGTERM and crash-redelivery with exactly-once results."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phaseid_hpc.errors import ConfigError, ContractError, StoreError
from phaseid_hpc.ingest_service import (
    BrokerError,
    IngestServiceConfig,
    MalformedMessageError,
    load_service_config,
    parse_message,
    resolve_amqp_url,
    run_ingest_service,
)

REPO = Path(__file__).resolve().parents[1]
BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
STOMP_URL = "stomp://guest:guest@127.0.0.1:61613/%2F"
T0 = pd.Timestamp("2026-01-01 00:15:00")


def _broker_reason() -> str | None:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError as exc:
        return f"no RabbitMQ broker reachable at 127.0.0.1:5672 ({exc}); start one with `rabbitmq-server -detached`"
    try:
        import pika

        pika.BlockingConnection(pika.URLParameters(BROKER_URL)).close()
    except Exception as exc:  # noqa: BLE001 - any failure means: skip
        return f"RabbitMQ at 127.0.0.1:5672 refuses guest/guest ({exc!r})"
    return None


_BROKER_SKIP = _broker_reason()
requires_rabbitmq = [
    pytest.mark.requires_rabbitmq,
    pytest.mark.skipif(_BROKER_SKIP is not None, reason=_BROKER_SKIP or ""),
]


def _stomp_reason() -> str | None:
    """Why the STOMP tests cannot run here (they also need AMQP, to read queue depths), or None."""
    if _BROKER_SKIP is not None:
        return _BROKER_SKIP
    try:
        import stomp
    except ImportError:
        return "stomp.py is not installed (pip install 'phaseid-hpc[stomp]')"
    try:
        socket.create_connection(("127.0.0.1", 61613), timeout=1).close()
    except OSError as exc:
        return (f"RabbitMQ's STOMP plugin is not listening on 127.0.0.1:61613 ({exc}); "
                "enable it with `rabbitmq-plugins enable rabbitmq_stomp`")
    try:
        conn = stomp.Connection12([("127.0.0.1", 61613)], vhost="/", auto_decode=False)
        conn.connect("guest", "guest", wait=True)
        conn.disconnect()
    except Exception as exc:  # noqa: BLE001 - any failure means: skip
        return f"STOMP at 127.0.0.1:61613 refuses guest/guest ({exc!r})"
    return None


_STOMP_SKIP = _stomp_reason()


class Broker:
    """One protocol's way to reach the test broker: the service's URL, publishing and draining a queue."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.url = STOMP_URL if protocol == "stomp" else BROKER_URL

    def publish(self, queue: str, bodies: list[tuple[bytes, str | None]]) -> None:
        if self.protocol == "amqp":
            _publish(queue, bodies)
            return
        import stomp

        done = threading.Event()

        class Receipts(stomp.ConnectionListener):
            def on_receipt(self, frame):
                done.set()

        conn = stomp.Connection12([("127.0.0.1", 61613)], vhost="/", auto_decode=False)
        conn.set_listener("r", Receipts())
        conn.connect("guest", "guest", wait=True)
        for i, (body, ctype) in enumerate(bodies):
            headers = {"persistent": "true", "timestamp": str(int(time.time()))}
            if ctype:
                headers["content-type"] = ctype
            conn.send(f"/queue/{queue}", body, headers=headers,
                      receipt="last" if i == len(bodies) - 1 else None)
        assert done.wait(10), "the broker did not confirm the published messages"
        conn.disconnect()

    def drain(self, queue: str) -> list[tuple[bytes, dict]]:
        if self.protocol == "amqp":
            return _drain(queue)
        import queue as queue_module

        import stomp

        got: queue_module.Queue = queue_module.Queue()

        class Collect(stomp.ConnectionListener):
            def on_message(self, frame):
                got.put((frame.body, dict(frame.headers)))

        conn = stomp.Connection12([("127.0.0.1", 61613)], vhost="/", auto_decode=False)
        conn.set_listener("c", Collect())
        conn.connect("guest", "guest", wait=True)
        conn.subscribe(f"/queue/{queue}", id="drain", ack="auto",
                       headers={"durable": "true", "auto-delete": "false"})
        out = []
        while True:
            try:
                out.append(got.get(timeout=1.0))
            except queue_module.Empty:
                break
        conn.disconnect()
        return out


@pytest.fixture(params=["amqp", pytest.param("stomp", marks=pytest.mark.requires_stomp)])
def broker(request):
    """Each broker test over AMQP and over STOMP (skipped, with the reason, where one is unreachable)."""
    reason = _BROKER_SKIP if request.param == "amqp" else _STOMP_SKIP
    if reason is not None:
        pytest.skip(reason)
    return Broker(request.param)


def _reads(meters: list[str], n_times: int, start: int = 0) -> pd.DataFrame:
    """Long-format reads; voltage encodes (meter, interval) so a wrong cell is detectable."""
    m = np.repeat(np.arange(len(meters)), n_times)
    k = np.tile(np.arange(start, start + n_times), len(meters))
    return pd.DataFrame({
        "meter_id": np.asarray(meters, dtype=object)[m],
        "timestamp": T0 + pd.to_timedelta(k * 900, unit="s"),
        "voltage_v": 200.0 + m + k / 1000.0,
    })


def _json_batch(df: pd.DataFrame) -> bytes:
    out = df.assign(timestamp=df["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return json.dumps(out.to_dict(orient="records")).encode()


def _csv_batch(df: pd.DataFrame) -> bytes:
    out = df.assign(timestamp=df["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return out.to_csv(index=False).encode()


# ------------------------------------------------------------------------------------------- parsing


def test_parse_json_forms_agree():
    df = _reads(["M1", "M2"], 3)
    records = _json_batch(df)
    forms = {
        "list": records,
        "envelope": json.dumps({"source": "headend-1", "reads": json.loads(records)}).encode(),
        "columnar": json.dumps({
            "meter_id": df["meter_id"].tolist(),
            "timestamp": [t.isoformat() + "Z" for t in df["timestamp"]],
            "voltage_v": df["voltage_v"].tolist(),
        }).encode(),
        "csv": _csv_batch(df),
        "csv_gzip": gzip.compress(_csv_batch(df)),
    }
    for name, body in forms.items():
        ctype = "text/csv" if name.startswith("csv") else "application/json"
        enc = "gzip" if name.endswith("gzip") else None
        got = parse_message(body, ctype, enc)
        pd.testing.assert_frame_equal(
            got[["meter_id", "timestamp", "voltage_v"]].astype({"meter_id": object}),
            df.astype({"meter_id": object}),
            check_dtype=False,
            obj=name,
        )
        assert got["timestamp"].dtype == "datetime64[ns]"


def test_parse_single_read_offset_to_utc_and_optional_columns():
    body = b'{"meter_id": 17, "timestamp": "2026-01-01T01:15:00+01:00", "voltage_v": "240.5", "kw": null, "x": 1}'
    got = parse_message(body)  # no content_type: sniffed as JSON
    assert got["meter_id"].tolist() == ["17"]
    assert got["timestamp"].iloc[0] == pd.Timestamp("2026-01-01 00:15:00")
    assert got["voltage_v"].iloc[0] == 240.5
    assert np.isnan(got["kw"].iloc[0])
    assert "x" not in got.columns


@pytest.mark.parametrize(
    ("body", "ctype", "reason"),
    [
        (b"{not json", "application/json", "not valid JSON"),
        (b"[1, 2]", "application/json", "read 0 is a int"),
        (b'{"meter_id": "M1", "voltage_v": 1}', "application/json", "missing required field(s) ['timestamp']"),
        (b'{"meter_id": "M1", "timestamp": "yesterday", "voltage_v": 1}', None, "timestamp 'yesterday'"),
        (b'[{"meter_id": "M1", "timestamp": "2026-01-01T00:00Z", "voltage_v": "high"}]', None, "voltage_v 'high'"),
        (b'{"meter_id": "", "timestamp": "2026-01-01T00:00Z", "voltage_v": 1}', None, "empty meter_id"),
        (b"[]", "application/json", "no reads"),
        (b"meter_id,voltage_v\nM1,240\n", "text/csv", "missing required column(s) ['timestamp']"),
        (b"meter_id,timestamp,voltage_v\nM1,2026-01-01T00:00Z,abc\n", "text/csv", "invalid value 'abc'"),
        (b"\x1f\x8b garbage", "text/csv", "cannot decompress"),
        (b"<xml/>", "application/xml", "unsupported content_type"),
    ],
)
def test_malformed_messages_raise_with_reason(body, ctype, reason):
    enc = "gzip" if body.startswith(b"\x1f\x8b") else None
    with pytest.raises(MalformedMessageError) as info:
        parse_message(body, ctype, enc)
    assert reason in info.value.reason
    assert isinstance(info.value, ContractError)


def test_oversized_message_is_malformed():
    with pytest.raises(MalformedMessageError, match="exceeds max_message_bytes"):
        parse_message(_json_batch(_reads(["M1"], 10)), max_bytes=100)
    bomb = gzip.compress(b"[" + b" " * 50_000_000 + b"]")  # 50 MB of blanks in ~50 kB: never inflated in full
    with pytest.raises(MalformedMessageError, match="exceeds max_message_bytes"):
        parse_message(bomb, "application/json", "gzip", max_bytes=1_000_000)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"meter_id": "M1", "timestamp": "9999-12-31T23:45:00Z", "voltage_v": 240}', "outside 1900-01-01"),
        (b'{"meter_id": "M1", "timestamp": "2610-01-01T00:00:00Z", "voltage_v": 240}', "outside 1900-01-01"),
        (b'{"meter_id": "M1", "timestamp": "2026-01-01T00:15:00Z", "voltage_v": true}', "holds booleans"),
        ((b'[{"meter_id": "M1", "timestamp": "2026-01-01T00:15:00Z", "voltage_v": 240},'
          b' {"meter_id": "M1", "timestamp": "2026-01-01T00:30:00Z", "voltage_v": false}]'), "False is not a number"),
        (b'{"meter_id": "M1", "timestamp": 1767225600, "voltage_v": 240}', "timestamps are numbers"),
        (b'{"meter_id": "M1", "timestamp": "2026-01-01T00:15:00Z", "voltage_v": {"v": 1}}', "is not a number"),
        (b"[" * 100_000 + b"]" * 100_000, "nested 100000 levels deep"),
        (b'{"reads": ' + b"[" * 10 + b"]" * 10 + b"}", "nested 11 levels deep"),
    ],
)
def test_poison_messages_of_the_issue_are_malformed(body, reason):
    with pytest.raises(MalformedMessageError) as info:
        parse_message(body)
    assert reason in info.value.reason and "\n" not in info.value.reason


def test_nesting_inside_strings_does_not_count():
    body = json.dumps({"meter_id": "[[[[[[[[[[{{{{{{{{{{\\\"", "timestamp": "2026-01-01T00:15:00Z", "voltage_v": 1})
    assert len(parse_message(body.encode())) == 1


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["meter_id", "timestamp", "voltage_v", "kw", "kvar", "reads", "x"]), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=700, deadline=None)
@given(doc=_JSON_VALUES, ctype=st.sampled_from([None, "application/json", "text/csv"]))
def test_generated_json_messages_parse_or_are_malformed(doc, ctype):
    """Any JSON document: typed reads or MalformedMessageError with a reason, never another exception."""
    body = json.dumps(doc).encode()
    try:
        df = parse_message(body, ctype)
    except MalformedMessageError as exc:
        assert exc.reason
    else:
        assert list(df.columns[:3]) == ["meter_id", "timestamp", "voltage_v"] and len(df)


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=300), ctype=st.sampled_from([None, "application/json", "text/csv"]),
       enc=st.sampled_from([None, "gzip"]))
def test_generated_binary_messages_parse_or_are_malformed(body, ctype, enc):
    try:
        parse_message(body, ctype, enc)
    except MalformedMessageError as exc:
        assert exc.reason


# ----------------------------------------------------------------------------------- credentials, config


def test_url_from_env_and_restricted_file(tmp_path):
    assert resolve_amqp_url(environ={"PHASEID_AMQP_URL": "amqp://a:b@h/v"}) == "amqp://a:b@h/v"
    f = tmp_path / "url"
    f.write_text("amqp://u:secret@h:5672/v\n")
    f.chmod(0o600)
    assert resolve_amqp_url(environ={"PHASEID_AMQP_URL_FILE": str(f)}) == "amqp://u:secret@h:5672/v"
    f.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        resolve_amqp_url(url_file=f, environ={})
    with pytest.raises(ConfigError, match="no broker URL"):
        resolve_amqp_url(environ={})


def test_stomp_url_from_env_or_restricted_file_never_the_command_line(tmp_path):
    import argparse

    from phaseid_hpc.ingest_service import broker_url_from_args, build_parser, resolve_broker_url

    env = {"PHASEID_STOMP_URL": "stomp://a:b@h:61613/v", "PHASEID_AMQP_URL": "amqp://x:y@h/v"}
    assert resolve_broker_url(environ=env, protocol="stomp") == "stomp://a:b@h:61613/v"
    f = tmp_path / "stomp-url"
    f.write_text("stomp://u:secret@h:61613/v\n")
    f.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        resolve_broker_url(url_file=f, environ={}, protocol="stomp")
    f.chmod(0o600)
    args = build_parser().parse_args(["--stomp-url-file", str(f), "--queue", "q", "--store", "s"])
    assert broker_url_from_args(args, environ=env) == "stomp://u:secret@h:61613/v"  # the file wins, STOMP implied
    args = build_parser().parse_args(["--stomp", "--queue", "q", "--store", "s"])
    assert broker_url_from_args(args, environ=env) == "stomp://a:b@h:61613/v"  # not the AMQP variable
    assert broker_url_from_args(argparse.Namespace(amqp=None), environ=env) == "amqp://x:y@h/v"
    with pytest.raises(ConfigError, match=r"no broker URL \(STOMP\).*PHASEID_STOMP_URL"):
        broker_url_from_args(args, environ={"PHASEID_AMQP_URL": "amqp://x:y@h/v"})
    f.write_text("amqp://u:secret@h/v\n")
    with pytest.raises(ConfigError, match="expected one line stomp://"):
        resolve_broker_url(url_file=f, environ={}, protocol="stomp")
    with pytest.raises(ConfigError, match="exclude each other"):
        broker_url_from_args(argparse.Namespace(stomp=True, stomp_url_file=None, amqp="amqp://h", amqp_url_file=None))
    with pytest.raises(SystemExit):  # no option takes a STOMP URL (with its password) on the command line
        build_parser().parse_args(["--stomp", "stomp://u:p@h", "--queue", "q", "--store", "s"])


def test_transport_follows_the_url_scheme():
    from phaseid_hpc.broker_transport import AmqpTransport, StompTransport, make_transport, redacted_url

    kw = {"prefetch_count": 8, "heartbeat_s": 30, "declare_queue": True, "dead_letter_queue": "q.dlq"}
    assert isinstance(make_transport(BROKER_URL, "q", **kw), AmqpTransport)
    if _STOMP_SKIP is None or "stomp.py" not in _STOMP_SKIP:
        t = make_transport("stomp://ops:pw@broker.example:61614/grid", "q", **kw)
        assert isinstance(t, StompTransport) and (t.host, t.port, t.vhost, t.user) == (
            "broker.example", 61614, "grid", "ops")
        assert make_transport("stomp://h", "q", **kw).vhost == "/"
    with pytest.raises(BrokerError, match="unknown scheme 'mqtt'") as info:
        make_transport("mqtt://u:pw@h", "q", **kw)
    assert "pw" not in str(info.value)
    assert redacted_url("stomp://u:pw@h:61613/v") == "stomp://u:***@h:61613/v"


def test_example_config_loads_and_unknown_keys_fail(tmp_path):
    run, svc = load_service_config(REPO / "configs" / "ingest-service.example.toml", environ={})
    assert svc == IngestServiceConfig()
    assert run.ingest.voltage_encoding == "float32"
    _, svc = load_service_config(None, environ={"PHASEID__SERVICE__PREFETCH_COUNT": "7"})
    assert svc.prefetch_count == 7
    bad = tmp_path / "bad.toml"
    bad.write_text("[service]\nprefetch = 3\n")
    with pytest.raises(ConfigError, match="service.prefetch"):
        load_service_config(bad, environ={})
    bad.write_text("[service]\nbatch_max_reads = 0\n")
    with pytest.raises(ConfigError, match="batch_max_reads"):
        load_service_config(bad, environ={})


def test_systemd_unit_keeps_credentials_off_the_command_line():
    unit = (REPO / "configs" / "voltage-ingest.service").read_text()
    exec_start = unit.split("ExecStart=", 1)[1].split("\n\n", 1)[0]
    assert "--amqp " not in exec_start and "amqp://" not in exec_start
    assert "LoadCredential=" in unit and "PHASEID_AMQP_URL_FILE" in unit


# ------------------------------------------------------------------------------------------ broker


@pytest.fixture
def queue():
    name = f"phaseid-test-{uuid.uuid4().hex[:12]}"
    yield name
    if _BROKER_SKIP is None:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        ch = conn.channel()
        for q in (name, name + ".dlq"):
            ch.queue_delete(q)
        conn.close()


def _publish(queue: str, bodies: list[tuple[bytes, str | None]]) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    ch = conn.channel()
    ch.queue_declare(queue, durable=True)
    ch.confirm_delivery()
    for body, ctype in bodies:
        ch.basic_publish("", queue, body, pika.BasicProperties(
            content_type=ctype, delivery_mode=2, timestamp=int(time.time())))
    conn.close()


def _drain(queue: str) -> list[tuple[bytes, dict]]:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    ch = conn.channel()
    out = []
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append((body, props.headers or {}))
    conn.close()
    return out


def _depth(queue: str, *, missing_ok: bool = False) -> int:
    """Messages ready in ``queue`` (read over AMQP whatever the protocol under test); a queue that does not
    exist counts as empty when ``missing_ok`` (the STOMP transport creates its dead-letter queue at the
    first dead letter)."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        n = conn.channel().queue_declare(queue, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404 and missing_ok:
            return 0
        raise
    finally:
        if conn.is_open:
            conn.close()
    return n


class DictSink:
    """A fake store: upsert keyed by (meter_id, timestamp); remembers each call's size."""

    def __init__(self, fail_on: str | None = None, error: type[Exception] = ContractError) -> None:
        self.cells: dict[tuple[str, pd.Timestamp], float] = {}
        self.calls: list[int] = []
        self.fail_on, self.error = fail_on, error

    def __call__(self, store, reads, *, config, source):
        if self.fail_on is not None and (self.fail_on == "*" or (reads["meter_id"] == self.fail_on).any()):
            raise self.error(f"meter {self.fail_on!r} cannot be stored")
        self.calls.append(len(reads))
        self.cells.update(zip(zip(reads["meter_id"], reads["timestamp"]), reads["voltage_v"]))


@pytest.mark.usefixtures("queue")
class TestBroker:
    pytestmark = requires_rabbitmq

    def test_batches_by_count_and_dead_letters_malformed(self, broker, queue):
        good = [_reads([f"M{i}"], 100) for i in range(10)]
        bodies = [(_json_batch(d), "application/json") for d in good[:5]]
        bodies += [(b"{broken", "application/json"), (b'{"meter_id": "M1"}', None), (b"<x/>", "application/xml")]
        bodies += [(_csv_batch(d), "text/csv") for d in good[5:]]
        broker.publish(queue, bodies)
        sink = DictSink()
        svc = IngestServiceConfig(prefetch_count=50, batch_max_reads=300, batch_max_seconds=30.0)
        stats = run_ingest_service(broker.url, queue, "unused", service_config=svc, sink=sink,
                                   stop_when_idle_s=0.5)
        assert len(sink.cells) == 1000 and stats.reads_written == 1000
        assert sink.calls[:-1] and all(n >= 300 for n in sink.calls[:-1])  # count-triggered batches
        assert stats.messages == 13 and stats.messages_dead_lettered == 3
        dead = broker.drain(queue + ".dlq")
        reasons = sorted(h["reason"] for _, h in dead)
        assert len(dead) == 3 and all(h["source_queue"] == queue for _, h in dead)
        assert any("not valid JSON" in r for r in reasons)
        assert any("missing required field(s)" in r for r in reasons)
        assert any("unsupported content_type" in r for r in reasons)
        assert {b for b, _ in dead} == {b"{broken", b'{"meter_id": "M1"}', b"<x/>"}
        assert _depth(queue) == 0  # everything acknowledged

    def test_time_based_flush(self, broker, queue):
        broker.publish(queue, [(_json_batch(_reads([f"M{i}"], 10)), "application/json") for i in range(3)])
        stop = threading.Event()
        sink = DictSink()
        t0 = time.monotonic()
        flushed_after: list[float] = []

        def sink_then_stop(*a, **k):
            flushed_after.append(time.monotonic() - t0)
            sink(*a, **k)
            stop.set()

        guard = threading.Timer(15.0, stop.set)  # only if the time trigger fails
        guard.start()
        svc = IngestServiceConfig(batch_max_reads=10_000, batch_max_seconds=0.3)
        try:
            run_ingest_service(broker.url, queue, "unused", service_config=svc, sink=sink_then_stop, stop_event=stop)
        finally:
            guard.cancel()
        assert flushed_after and flushed_after[0] < 10.0
        assert sink.calls == [30]  # one batch, closed by time, well before the count limit

    @pytest.mark.parametrize("error", [ContractError, IndexError])
    def test_store_rejection_isolates_the_poison_message(self, broker, queue, error):
        broker.publish(queue, [(_json_batch(_reads([m], 5)), "application/json") for m in ("A", "POISON", "B")])
        sink = DictSink(fail_on="POISON", error=error)
        stats = run_ingest_service(broker.url, queue, "unused", sink=sink, stop_when_idle_s=0.5,
                                   service_config=IngestServiceConfig(batch_max_seconds=0.5))
        assert {m for m, _ in sink.cells} == {"A", "B"}
        dead = broker.drain(queue + ".dlq")
        assert len(dead) == 1 and "rejected by store" in dead[0][1]["reason"]
        assert stats.messages_dead_lettered == 1 and _depth(queue) == 0

    def test_a_lone_poison_message_is_dead_lettered_not_a_crash_loop(self, broker, queue, monkeypatch):
        """Whatever the exception, a message that cannot be parsed or placed goes to the DLQ with a reason."""
        import phaseid_hpc.ingest_service as svc_module

        real = svc_module.parse_message

        def parse(body, *a, **k):
            if b"PARSE-BUG" in body:
                raise RuntimeError("unexpected parser failure")
            return real(body, *a, **k)

        monkeypatch.setattr(svc_module, "parse_message", parse)
        broker.publish(queue, [(_json_batch(_reads(["POISON"], 5)), "application/json")])
        stats = run_ingest_service(broker.url, queue, "unused", sink=DictSink(fail_on="POISON", error=ValueError),
                                   stop_when_idle_s=0.5, service_config=IngestServiceConfig(batch_max_seconds=0.2))
        broker.publish(queue, [(b'{"meter_id": "PARSE-BUG"}', "application/json"),
                         (b'{"meter_id": "M1", "timestamp": "9999-12-31T23:45:00Z", "voltage_v": 1}', None),
                         (b"[" * 200_000 + b"]" * 200_000, None)])
        stats2 = run_ingest_service(broker.url, queue, "unused", sink=DictSink(), stop_when_idle_s=0.5,
                                    service_config=IngestServiceConfig(batch_max_seconds=0.2))
        dead = broker.drain(queue + ".dlq")
        reasons = [h["reason"] for _, h in dead]
        assert stats.messages_dead_lettered == 1 and stats2.messages_dead_lettered == 3, reasons
        assert "rejected by store: ValueError" in reasons[0]
        assert any("RuntimeError: unexpected parser failure" in r for r in reasons)
        assert any("outside 1900-01-01" in r for r in reasons) and any("nested" in r for r in reasons)
        assert _depth(queue) == 0

    def test_broker_errors_name_the_problem_and_hide_the_password(self, broker, queue):
        svc = IngestServiceConfig(declare_queue=False)
        with pytest.raises(BrokerError, match="NOT_FOUND") as info:
            run_ingest_service(broker.url, queue, "unused", sink=DictSink(), service_config=svc, stop_when_idle_s=0.2)
        with pytest.raises(BrokerError, match="refused the credentials") as info:
            run_ingest_service(broker.url.replace("guest:guest", "guest:s3cret"), queue, "unused", sink=DictSink(),
                               stop_when_idle_s=0.2)
        assert "s3cret" not in str(info.value) and "guest:***@" in str(info.value)

    def test_a_dropped_connection_is_reestablished_and_nothing_is_lost(self, broker, queue):
        """The service's own socket is destroyed (``ss -K``) mid-stream: it reconnects and consumes the rest."""
        import shutil

        import psutil

        if shutil.which("ss") is None:
            pytest.skip("ss (iproute2) is needed to drop the service's connection")
        port = 61613 if broker.protocol == "stomp" else 5672

        def my_sockets() -> list[int]:
            return [c.laddr.port for c in psutil.Process().net_connections("tcp")
                    if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]

        sink, stop, result = DictSink(), threading.Event(), {}
        svc = IngestServiceConfig(batch_max_seconds=0.2, reconnect_max_s=1.0)
        service = threading.Thread(target=lambda: result.update(stats=run_ingest_service(
            broker.url, queue, "unused", sink=sink, stop_event=stop, service_config=svc)))
        service.start()
        try:
            broker.publish(queue, [(_json_batch(_reads(["A"], 5)), "application/json")])
            _wait_for(lambda: len(sink.cells) == 5, timeout=20)
            dropped = my_sockets()
            for p in dropped:
                subprocess.run(["ss", "-K", "src", "127.0.0.1", "sport", "=", f":{p}"], capture_output=True,
                               check=False)
            if set(dropped) & set(my_sockets()):
                pytest.skip("this kernel cannot destroy a socket (ss -K needs CONFIG_INET_DIAG_DESTROY)")
            broker.publish(queue, [(_json_batch(_reads(["B"], 5)), "application/json")])
            _wait_for(lambda: len(sink.cells) == 10, timeout=30)
        finally:
            stop.set()
            service.join(30)
        assert dropped and result["stats"].reconnects >= 1
        assert {m for m, _ in sink.cells} == {"A", "B"} and _depth(queue) == 0

    @pytest.mark.parametrize("error", [ValueError, StoreError])
    def test_systemic_store_failure_stops_without_ack_or_dead_letter(self, broker, queue, error):
        broker.publish(queue, [(_json_batch(_reads([m], 5)), "application/json") for m in ("A", "B")])
        with pytest.raises(error):
            run_ingest_service(broker.url, queue, "unused", sink=DictSink(fail_on="*", error=error),
                               stop_when_idle_s=0.5, service_config=IngestServiceConfig(batch_max_seconds=0.3))
        assert _depth(queue) == 2 and _depth(queue + ".dlq", missing_ok=True) == 0  # both back, none dead


# ---------------------------------------------------------------- real processes: SIGTERM and SIGKILL

_CONSUMER = textwrap.dedent(
    """
    import os, signal, sqlite3, sys, threading
    from phaseid_hpc.ingest_service import IngestServiceConfig, run_ingest_service, stop_on_signals
    from phaseid_hpc.logging_utils import get_run_logger
    get_run_logger(None, echo=True)
    url, queue, target, kill_after, idle = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    calls = 0

    if target.endswith(".zarr"):  # the real store
        from phaseid_hpc.ingest import ingest_frame as write
    else:  # a fake store: durable sqlite upsert keyed by (meter, timestamp), counting every row written
        con = sqlite3.connect(target, check_same_thread=False)  # the service writes from its writer thread
        con.execute("create table if not exists reads (meter text, ts text, v real, primary key (meter, ts))")
        con.execute("create table if not exists writes (n integer)")

        def write(store, reads, *, config, source):
            rows = list(zip(reads["meter_id"], reads["timestamp"].astype(str), reads["voltage_v"].astype(float)))
            with con:
                con.execute("insert into writes values (?)", (len(rows),))
                con.executemany("insert into reads values (?, ?, ?) on conflict do update set v = excluded.v", rows)

    def sink(store, reads, *, config, source):
        global calls
        report = write(store, reads, config=config, source=source)
        calls += 1
        with open(target + ".progress", "a") as f:
            f.write(f"{len(reads)}\\n")
        if calls == kill_after:  # die between the durable write and the ack
            os.kill(os.getpid(), signal.SIGKILL)
        return report

    stop = threading.Event()
    stop_on_signals(stop)
    svc = IngestServiceConfig(prefetch_count=32, batch_max_reads=2000, batch_max_seconds=0.2)
    stats = run_ingest_service(url, queue, target, service_config=svc, sink=sink, stop_event=stop,
                               stop_when_idle_s=idle if idle > 0 else None)
    print("STATS", stats.reads_written, stats.rows_quarantined, stats.messages_dead_lettered)
    """
)


def _finish(p: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for a consumer subprocess; return its exit code and output (closing its pipe)."""
    out = p.communicate(timeout=timeout)[0].decode()
    return p.returncode, out


def _progress(target: Path) -> int:
    """Reads the consumer subprocess has written so far (all runs, redeliveries included)."""
    f = Path(str(target) + ".progress")
    return sum(int(x) for x in f.read_text().split()) if f.exists() else 0


def _start_consumer(tmp_path: Path, queue: str, db: Path, kill_after: int = 0, idle: float = 0.0,
                    url: str = BROKER_URL):
    script = tmp_path / "consumer.py"
    script.write_text(_CONSUMER)
    return subprocess.Popen(
        [sys.executable, str(script), url, queue, str(db), str(kill_after), str(idle)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def _db_counts(db: Path) -> tuple[int, int]:
    if not db.exists():
        return 0, 0
    con = sqlite3.connect(db)
    try:
        rows = con.execute("select count(*) from reads").fetchone()[0]
        written = con.execute("select coalesce(sum(n), 0) from writes").fetchone()[0]
    except sqlite3.OperationalError:
        return 0, 0
    finally:
        con.close()
    return rows, written


def _wait_for(pred, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the consumer")


@pytest.mark.requires_rabbitmq
@pytest.mark.skipif(_BROKER_SKIP is not None, reason=_BROKER_SKIP or "")
def test_sigkill_mid_stream_then_restart_is_exactly_once(tmp_path, broker, queue):
    meters = [f"M{i:04d}" for i in range(120)]
    df = _reads(meters, 100)  # 12,000 reads in 60 messages
    broker.publish(queue, [(_csv_batch(df.iloc[i : i + 200]), "text/csv") for i in range(0, len(df), 200)])
    db = tmp_path / "store.sqlite"

    # 1) dies by its own SIGKILL right after the 3rd durable write, before acknowledging it
    p = _start_consumer(tmp_path, queue, db, kill_after=3, url=broker.url)
    rc, out = _finish(p, 30)
    assert rc == -signal.SIGKILL, out
    # 2) killed from outside mid-stream
    p = _start_consumer(tmp_path, queue, db, url=broker.url)
    _wait_for(lambda: _progress(db) > 7_000, timeout=30)
    p.send_signal(signal.SIGKILL)
    _finish(p, 10)
    rows_mid, _ = _db_counts(db)
    assert rows_mid < len(df), "the consumer finished before it could be killed mid-stream"
    # 3) restarted: drains the rest
    p = _start_consumer(tmp_path, queue, db, idle=1.0, url=broker.url)
    rc, out = _finish(p, 60)
    assert rc == 0, out

    con = sqlite3.connect(db)
    got = pd.read_sql("select meter, ts, v from reads", con)
    written = con.execute("select sum(n) from writes").fetchone()[0]
    con.close()
    assert len(got) == len(df)  # every read, once
    assert written > len(df)  # some reads were redelivered and rewritten, yet counted once
    expect = dict(zip(zip(df["meter_id"], df["timestamp"].astype(str)), df["voltage_v"]))
    assert all(abs(expect[(m, t)] - v) < 1e-9 for m, t, v in got.itertuples(index=False))
    assert _depth(queue) == 0


@pytest.mark.requires_rabbitmq
@pytest.mark.skipif(_BROKER_SKIP is not None, reason=_BROKER_SKIP or "")
def test_sigterm_writes_and_acks_the_open_batch(tmp_path, broker, queue):
    df = _reads([f"M{i}" for i in range(100)], 100)  # 10,000 reads in 100 messages
    broker.publish(queue, [(_json_batch(df.iloc[i : i + 100]), "application/json") for i in range(0, len(df), 100)])
    db = tmp_path / "store.sqlite"
    p = _start_consumer(tmp_path, queue, db, url=broker.url)
    _wait_for(lambda: _progress(db) > 0, timeout=30)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=15)[0].decode()
    assert p.returncode == 0, out
    assert "stop requested" in out and "ingest-service stopped" in out
    rows, written = _db_counts(db)
    assert rows == written  # nothing was written twice: every written batch was acknowledged
    assert rows + 100 * _depth(queue) == len(df)  # the rest is back in the queue, nothing lost


@pytest.mark.slow
@pytest.mark.requires_rabbitmq
@pytest.mark.skipif(_BROKER_SKIP is not None, reason=_BROKER_SKIP or "")
@pytest.mark.parametrize("broker", ["amqp"], indirect=True)  # STOMP: the same path, shown by the sqlite test
def test_real_store_survives_sigkill_exactly_once_with_quarantine_and_dead_letters(tmp_path, broker, queue):
    store_mod = pytest.importorskip("phaseid_hpc.store", reason="phaseid_hpc/store.py not available")
    pytest.importorskip("phaseid_hpc.ingest", reason="phaseid_hpc/ingest.py not available")
    import xarray as xr

    meters = [f"M{i:03d}" for i in range(120)]
    n_times = 96
    table = pd.DataFrame({"meter_id": meters, "feeder_id": "F1",
                          "transformer_id": [f"T{i // 4:02d}" for i in range(120)], "phase": "A"})
    store = tmp_path / "store.zarr"
    store_mod.initialize_store(store, table, pd.date_range(T0, periods=n_times, freq="15min"), interval_s=900)
    df = _reads(meters, n_times)  # 11,520 reads, 96 per message
    df["kw"] = np.round(df["voltage_v"] / 100.0, 3)  # optional column: stored too
    bodies = [(_csv_batch(df.iloc[i : i + 96]), "text/csv") if (i // 96) % 2 else
              (_json_batch(df.iloc[i : i + 96]), "application/json") for i in range(0, len(df), 96)]
    bodies.insert(10, (_json_batch(_reads(["UNKNOWN"], 2)), "application/json"))  # rows -> quarantine
    bodies.insert(20, (b'{"meter_id": "M001", "timestamp": "soon", "voltage_v": 1}', None))  # -> dead letter
    broker.publish(queue, bodies)

    p = _start_consumer(tmp_path, queue, store, kill_after=2, url=broker.url)  # dies after a durable write, before its ack
    rc, out = _finish(p, 40)
    assert rc == -signal.SIGKILL, out
    p = _start_consumer(tmp_path, queue, store, url=broker.url)
    _wait_for(lambda: _progress(store) > 5_000, timeout=40)
    p.send_signal(signal.SIGKILL)  # killed from outside, mid-stream
    _finish(p, 10)
    assert _depth(queue) > 0, "the consumer finished before it could be killed mid-stream"
    p = _start_consumer(tmp_path, queue, store, idle=1.0, url=broker.url)
    out = p.communicate(timeout=60)[0].decode()
    assert p.returncode == 0, out

    assert _progress(store) > len(df)  # some reads were written twice (redelivered) ...
    ds = xr.open_zarr(store, consolidated=False)
    v = ds["voltage"].values
    assert int(np.isfinite(v).sum()) == len(df)  # ... yet every read is in the store exactly once
    expect = df.pivot(index="meter_id", columns="timestamp", values="voltage_v")
    got = pd.DataFrame(v, index=ds["meter"].values, columns=ds["time"].values).loc[expect.index, expect.columns]
    np.testing.assert_allclose(got.to_numpy(), expect.to_numpy(), rtol=1e-6)
    kw = pd.DataFrame(ds["kw"].values, index=ds["meter"].values, columns=ds["time"].values)
    expect_kw = df.pivot(index="meter_id", columns="timestamp", values="kw")
    np.testing.assert_allclose(kw.loc[expect_kw.index, expect_kw.columns].to_numpy(), expect_kw.to_numpy(), rtol=1e-6)
    assert list((store / "quarantine").glob("*.parquet")), "the UNKNOWN meter's rows were not quarantined"
    dead = broker.drain(queue + ".dlq")
    assert len(dead) >= 1 and all("timestamp 'soon'" in h["reason"] for _, h in dead)
    assert _depth(queue) == 0
