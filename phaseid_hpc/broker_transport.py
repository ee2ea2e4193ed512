"""Broker transports of the ingest service: AMQP 0-9-1 (pika) and STOMP 1.2 (stomp.py), one interface.

:mod:`phaseid_hpc.ingest_service` batches, writes, acknowledges and dead-letters through a
:class:`Transport`; everything protocol-specific lives here. A transport offers:

* ``connect()`` / ``close()`` (clean: prefetched, unacknowledged messages return to the queue) /
  ``abort()`` (after an error; never raises);
* ``deliveries(tick_s)``: the consumed messages as :class:`Delivery`, and ``None`` after every ``tick_s``
  [s] without one (so the caller can close batches by time);
* ``ack_through(delivery)``: acknowledge this delivery and every earlier one of the subscription
  (AMQP ``basic.ack(multiple=True)``; STOMP ``ack: client`` mode, where an ACK is cumulative);
* ``dead_letter(delivery, headers)``: publish the body unchanged, with ``headers``, to the dead-letter
  queue and return only once the broker confirmed it (AMQP publisher confirms; STOMP a ``receipt`` on the
  SEND, which RabbitMQ issues after its own publisher confirm), else :class:`BrokerError`;
* ``keepalive(seconds)``: let the connection breathe during a long store write;
* ``queue_depth()``: messages ready in the queue, or ``None`` where the protocol cannot tell;
* ``errors`` (exception types of the protocol) and ``fatal(exc)``: the :class:`BrokerError` to stop with
  (refused credentials, a missing queue), or ``None`` for a lost connection that is worth a reconnect.

Broker URLs: ``amqp://user:pass@host:5672/vhost`` (``amqps://`` for TLS) and
``stomp://user:pass@host:61613/vhost`` (``stomp+ssl://`` for TLS; vhost ``%2F`` or empty = ``/``).
"""

from __future__ import annotations

import queue as queue_module
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import PhaseIDError

__all__ = [
    "AmqpTransport",
    "BrokerConnectionLost",
    "BrokerError",
    "Delivery",
    "StompTransport",
    "Transport",
    "make_transport",
    "redacted_url",
]

#: URL schemes of each transport.
AMQP_SCHEMES = ("amqp", "amqps")
STOMP_SCHEMES = ("stomp", "stomp+ssl")


class BrokerError(PhaseIDError):
    """The broker cannot be reached, refuses the credentials, or a dead-letter publish was not confirmed."""


class BrokerConnectionLost(BrokerError):
    """The connection dropped (or could not be made): unacknowledged messages will be redelivered."""


@dataclass
class Delivery:
    """One consumed message, whatever the protocol.

    Attributes
    ----------
    tag : object
        The transport's handle for acknowledging it (AMQP delivery tag, STOMP ``ack`` header).
    body : bytes
        The body as published.
    content_type, content_encoding : str or None
        As published (``application/json``, ``text/csv``; ``gzip``).
    timestamp : float or None
        Publish time set by the publisher [s since 1970-01-01 UTC], for the lag metric.
    headers : dict
        Application headers (copied to the dead letter).
    properties : object
        The protocol's own message properties (AMQP ``BasicProperties``; STOMP: the frame headers).
    """

    tag: Any
    body: bytes
    content_type: str | None
    content_encoding: str | None
    timestamp: float | None
    headers: dict[str, Any]
    properties: Any = None


class Transport(Protocol):
    """What :mod:`phaseid_hpc.ingest_service` needs from a broker protocol (see the module docstring)."""

    scheme: str
    queue: str
    dead_letter_queue: str
    errors: tuple[type[BaseException], ...]

    def connect(self) -> None: ...
    def deliveries(self, tick_s: float) -> Any: ...
    def ack_through(self, delivery: Delivery) -> None: ...
    def dead_letter(self, delivery: Delivery, headers: dict[str, str]) -> None: ...
    def keepalive(self, seconds: float) -> None: ...
    def queue_depth(self) -> int | None: ...
    def fatal(self, exc: BaseException) -> BrokerError | None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def describe(self) -> str: ...


def redacted_url(url: str) -> str:
    """``url`` with the password replaced by ``***`` (for logs and error messages)."""
    u = urllib.parse.urlsplit(url)
    host = u.hostname or ""
    netloc = f"{u.username}:***@{host}" if u.username else host
    if u.port:
        netloc += f":{u.port}"
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, "", ""))


def make_transport(url: str, queue: str, *, prefetch_count: int, heartbeat_s: int, declare_queue: bool,
                   dead_letter_queue: str, confirm_timeout_s: float = 30.0) -> Transport:
    """The transport for ``url``'s scheme (``amqp``/``amqps``: :class:`AmqpTransport`; ``stomp``/
    ``stomp+ssl``: :class:`StompTransport`).

    Raises
    ------
    BrokerError
        Unknown scheme.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    kw: dict[str, Any] = {"prefetch_count": prefetch_count, "heartbeat_s": heartbeat_s,
                          "declare_queue": declare_queue, "dead_letter_queue": dead_letter_queue}
    if scheme in AMQP_SCHEMES:
        return AmqpTransport(url, queue, **kw)
    if scheme in STOMP_SCHEMES:
        return StompTransport(url, queue, confirm_timeout_s=confirm_timeout_s, **kw)
    raise BrokerError(f"broker URL {redacted_url(url)!r}: unknown scheme {scheme!r}; expected one of "
                      f"{', '.join(AMQP_SCHEMES + STOMP_SCHEMES)}")


# --------------------------------------------------------------------------------------------- AMQP


class AmqpTransport:
    """AMQP 0-9-1 through pika's ``BlockingConnection`` (RabbitMQ, port 5672)."""

    scheme = "amqp"

    def __init__(self, url: str, queue: str, *, prefetch_count: int, heartbeat_s: int, declare_queue: bool,
                 dead_letter_queue: str) -> None:
        import os

        import pika

        self.url, self.queue, self.dead_letter_queue = url, queue, dead_letter_queue
        self.prefetch_count, self.heartbeat_s, self.declare_queue = prefetch_count, heartbeat_s, declare_queue
        self.errors = (pika.exceptions.AMQPError,)
        self._client_name = f"phaseid-ingest-service {queue} pid={os.getpid()}"
        self.conn: Any = None

    def describe(self) -> str:
        return redacted_url(self.url)

    def connect(self) -> None:
        import pika

        params = pika.URLParameters(self.url)
        params.heartbeat = self.heartbeat_s
        params.client_properties = {"connection_name": self._client_name}
        self.conn = pika.BlockingConnection(params)
        self.ch = self._ensure_queue(self.queue, declare=self.declare_queue)
        self.pub = self._ensure_queue(self.dead_letter_queue, declare=True)
        self.pub.confirm_delivery()
        self.ch.basic_qos(prefetch_count=self.prefetch_count)

    def _ensure_queue(self, name: str, *, declare: bool) -> Any:
        """A channel on which ``name`` exists: an existing queue is used as it is (classic, quorum, with or
        without its own dead-letter arguments); a missing one is declared durable when ``declare``."""
        import pika

        ch = self.conn.channel()
        try:
            ch.queue_declare(name, passive=True)
            return ch
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404 or not declare:
                raise BrokerError(f"queue {name!r} on {self.describe()}: {exc.reply_text} "
                                  f"(service.declare_queue = {str(declare).lower()})") from exc
        ch = self.conn.channel()
        ch.queue_declare(name, durable=True)
        return ch

    def deliveries(self, tick_s: float) -> Any:
        for method, props, body in self.ch.consume(self.queue, inactivity_timeout=tick_s):
            if method is None:
                yield None
                continue
            ts = getattr(props, "timestamp", None)
            yield Delivery(method.delivery_tag, body, props.content_type, props.content_encoding,
                           float(ts) if ts else None, dict(props.headers or {}), props)

    def ack_through(self, delivery: Delivery) -> None:
        self.ch.basic_ack(delivery_tag=delivery.tag, multiple=True)

    def dead_letter(self, delivery: Delivery, headers: dict[str, str]) -> None:
        import pika

        props = delivery.properties
        try:
            self.pub.basic_publish(
                exchange="",
                routing_key=self.dead_letter_queue,
                body=delivery.body,
                properties=pika.BasicProperties(
                    content_type=delivery.content_type,
                    content_encoding=delivery.content_encoding,
                    message_id=getattr(props, "message_id", None),
                    timestamp=getattr(props, "timestamp", None),
                    delivery_mode=2,
                    headers={**delivery.headers, **headers},
                ),
                mandatory=True,
            )
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            raise BrokerError(f"dead-letter publish to {self.dead_letter_queue!r} was not confirmed ({exc!r}); "
                              "the message stays unacknowledged") from exc

    def keepalive(self, seconds: float) -> None:
        self.conn.process_data_events(time_limit=seconds)  # heartbeats; deliveries are buffered

    def queue_depth(self) -> int | None:
        return int(self.pub.queue_declare(self.queue, passive=True).method.message_count)

    def fatal(self, exc: BaseException) -> BrokerError | None:
        import pika

        if isinstance(exc, (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError)):
            return BrokerError(f"broker {self.describe()} refused the credentials or vhost: {exc!r}")
        if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
            return BrokerError(f"broker closed the channel on queue {self.queue!r}: {exc!r}")
        return None

    def close(self) -> None:
        if self.conn is not None and self.conn.is_open:
            try:
                self.ch.cancel()  # requeues prefetched messages that were never handed to us
            finally:
                self.conn.close()

    def abort(self) -> None:
        import pika

        if self.conn is not None and self.conn.is_open:
            try:
                self.conn.close()
            except pika.exceptions.AMQPError:
                pass


# -------------------------------------------------------------------------------------------- STOMP

#: Frame headers that belong to one delivery, not to the message (not copied to a dead letter).
_STOMP_FRAME_HEADERS = frozenset({"subscription", "message-id", "ack", "destination", "redelivered", "receipt",
                                  "content-length", "content-type", "content-encoding"})


class _StompListener:
    """stomp.py callbacks (its receiver thread) turned into events for the consuming thread."""

    def __init__(self, transport: StompTransport) -> None:
        self.t = transport

    def on_message(self, frame: Any) -> None:
        self.t._events.put(("message", frame))

    def on_receipt(self, frame: Any) -> None:
        self.t._receipt(frame.headers.get("receipt-id"), None)

    def on_error(self, frame: Any) -> None:
        body = frame.body.decode("utf-8", "replace") if isinstance(frame.body, bytes) else str(frame.body)
        text = " ".join(f"{frame.headers.get('message', '')} {body}".split())
        self.t._error = text
        self.t._events.put(("error", text))
        self.t._receipt(None, text)

    def on_disconnected(self) -> None:
        self.t._events.put(("disconnected", None))
        self.t._receipt(None, "disconnected")

    def __getattr__(self, name: str) -> Any:  # every other stomp.py callback: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


class StompTransport:
    """STOMP 1.2 through stomp.py (RabbitMQ's STOMP plugin, port 61613).

    Subscribes to ``/queue/QUEUE`` (declared durable when missing) or, with ``declare_queue = false``, to
    ``/amq/queue/QUEUE`` (must exist), in ``ack: client`` mode with RabbitMQ's ``prefetch-count``. Dead
    letters are SENT to ``/queue/QUEUE.dlq`` as persistent messages with a ``receipt``, awaited for
    ``confirm_timeout_s`` [s]. The queues are the broker's own, so AMQP and STOMP clients share them.
    """

    scheme = "stomp"

    def __init__(self, url: str, queue: str, *, prefetch_count: int, heartbeat_s: int, declare_queue: bool,
                 dead_letter_queue: str, confirm_timeout_s: float = 30.0) -> None:
        try:
            import stomp
        except ImportError as exc:
            raise BrokerError("STOMP needs the stomp.py package: pip install 'phaseid-hpc[stomp]'") from exc
        u = urllib.parse.urlsplit(url)
        self.url, self.queue, self.dead_letter_queue = url, queue, dead_letter_queue
        self.prefetch_count, self.heartbeat_s, self.declare_queue = prefetch_count, heartbeat_s, declare_queue
        self.confirm_timeout_s = confirm_timeout_s
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 61613
        self.user = urllib.parse.unquote(u.username) if u.username else None
        self.password = urllib.parse.unquote(u.password) if u.password else None
        self.vhost = urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/"
        self.tls = u.scheme.lower() == "stomp+ssl"
        self.errors = (stomp.exception.StompException, BrokerConnectionLost)
        self.conn: Any = None
        self._sub_id = "phaseid-ingest"
        self._lock = threading.Lock()
        self._receipts: dict[str, list[Any]] = {}
        self._n_receipts = 0
        self._reset()

    def _reset(self) -> None:
        self._events: queue_module.Queue = queue_module.Queue()
        self._error: str | None = None

    def describe(self) -> str:
        return redacted_url(self.url)

    # -- receipts: a SEND/SUBSCRIBE/DISCONNECT the broker has confirmed
    def _new_receipt(self) -> tuple[str, threading.Event]:
        with self._lock:
            self._n_receipts += 1
            rid = f"phaseid-{self._n_receipts}"
            ev = threading.Event()
            self._receipts[rid] = [ev, None]
        return rid, ev

    def _receipt(self, rid: str | None, failure: str | None) -> None:
        """Mark receipt ``rid`` confirmed; with ``failure`` (an ERROR frame, a disconnect): fail all waiting."""
        with self._lock:
            if rid is not None and rid in self._receipts:
                self._receipts[rid][0].set()
            elif failure is not None:
                for entry in self._receipts.values():
                    entry[1] = failure
                    entry[0].set()

    def _await(self, rid: str, ev: threading.Event, what: str) -> None:
        ok = ev.wait(self.confirm_timeout_s)
        with self._lock:
            failure = self._receipts.pop(rid, [None, None])[1]
        if not ok:
            raise BrokerError(f"{what}: no receipt from {self.describe()} within {self.confirm_timeout_s:g} s")
        if failure is not None:
            if failure == "disconnected":
                raise BrokerConnectionLost(f"{what}: connection to {self.describe()} lost")
            raise BrokerError(f"{what}: broker {self.describe()} answered {failure}")

    def _send(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Call ``self.conn.<method>``; a socket that is gone (the receiver thread closed it, the broker
        dropped it) is a lost connection, whatever stomp.py raises for it."""
        import stomp

        try:
            getattr(self.conn, method)(*args, **kwargs)
        except (OSError, stomp.exception.StompException) as exc:
            raise BrokerConnectionLost(f"{method} on {self.describe()} failed: connection lost ({exc!r})") from exc

    # -- the interface
    def connect(self) -> None:
        import stomp

        self._reset()
        hb = int(self.heartbeat_s * 1000)
        conn = stomp.Connection12([(self.host, self.port)], heartbeats=(hb, hb), auto_decode=False,
                                  vhost=self.vhost, reconnect_attempts_max=1)
        if self.tls:
            conn.set_ssl(for_hosts=[(self.host, self.port)])
        conn.set_listener("phaseid", _StompListener(self))
        self.conn = conn
        try:
            conn.connect(self.user, self.password, wait=True)
        except stomp.exception.ConnectFailedException as exc:
            if self._error:
                raise BrokerError(f"broker {self.describe()} refused the credentials or vhost: {self._error}") from exc
            raise BrokerConnectionLost(f"broker {self.describe()} unreachable") from exc
        destination = f"/queue/{self.queue}" if self.declare_queue else f"/amq/queue/{self.queue}"
        rid, ev = self._new_receipt()
        self._send("subscribe", destination, id=self._sub_id, ack="client", receipt=rid,
                   headers={"prefetch-count": str(self.prefetch_count), "durable": "true",
                            "auto-delete": "false"})
        try:
            self._await(rid, ev, f"subscribe to {destination}")
        except BrokerConnectionLost as exc:  # RabbitMQ closes after an ERROR frame: say which
            if self._error:
                raise BrokerError(f"queue {self.queue!r} on {self.describe()}: {self._error} "
                                  f"(service.declare_queue = {str(self.declare_queue).lower()})") from exc
            raise
        except BrokerError as exc:
            raise BrokerError(f"queue {self.queue!r} on {self.describe()}: {exc} "
                              f"(service.declare_queue = {str(self.declare_queue).lower()})") from exc

    def deliveries(self, tick_s: float) -> Any:
        while True:
            try:
                kind, payload = self._events.get(timeout=tick_s)
            except queue_module.Empty:
                yield None
                continue
            if kind == "error":
                raise BrokerError(f"broker {self.describe()} sent an error on queue {self.queue!r}: {payload}")
            if kind == "disconnected":
                raise BrokerConnectionLost(f"connection to {self.describe()} lost")
            h = dict(payload.headers)
            body = payload.body if isinstance(payload.body, bytes) else str(payload.body).encode()
            try:
                ts = float(h["timestamp"]) if h.get("timestamp") else None
            except ValueError:
                ts = None
            yield Delivery(h.get("ack") or h.get("message-id"), body, h.get("content-type"),
                           h.get("content-encoding"), ts,
                           {k: v for k, v in h.items() if k not in _STOMP_FRAME_HEADERS}, h)

    def ack_through(self, delivery: Delivery) -> None:
        if not self.conn.is_connected():
            raise BrokerConnectionLost(f"connection to {self.describe()} lost before an ack")
        self._send("ack", delivery.tag)  # ack: client mode: cumulative

    def dead_letter(self, delivery: Delivery, headers: dict[str, str]) -> None:
        out = {k: str(v) for k, v in {**delivery.headers, **headers}.items()}
        out["persistent"] = "true"
        if delivery.content_type:
            out["content-type"] = delivery.content_type
        if delivery.content_encoding:
            out["content-encoding"] = delivery.content_encoding
        rid, ev = self._new_receipt()
        self._send("send", f"/queue/{self.dead_letter_queue}", delivery.body, headers=out, receipt=rid)
        try:
            self._await(rid, ev, f"dead-letter publish to {self.dead_letter_queue!r}")
        except BrokerConnectionLost:
            raise
        except BrokerError as exc:
            raise BrokerError(f"{exc}; the message stays unacknowledged") from exc

    def keepalive(self, seconds: float) -> None:
        threading.Event().wait(seconds)  # stomp.py's own threads read and send heartbeats

    def queue_depth(self) -> int | None:
        return None  # STOMP has no queue query

    def fatal(self, exc: BaseException) -> BrokerError | None:
        if isinstance(exc, BrokerConnectionLost):
            return None
        if isinstance(exc, BrokerError):
            return exc
        return None

    def close(self) -> None:
        if self.conn is not None and self.conn.is_connected():
            self._send("unsubscribe", self._sub_id)
            # With a receipt, stomp.py returns once the broker has confirmed and its reader has stopped, so
            # the socket is not closed under a later call. Unacknowledged messages return to the queue.
            self._send("disconnect", receipt="phaseid-disconnect")
        self.conn = None

    def abort(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and conn.is_connected():
            try:
                conn.disconnect()
            except Exception:  # noqa: BLE001 - closing after an error must not hide that error
                conn.transport.disconnect_socket()
