"""Structured run log: one line per event, with feeder and meter ids, as text or JSON lines."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

__all__ = ["get_run_logger", "log_event"]

_LOGGER_NAME = "phaseid_hpc.run"


#: Characters that make a text-log value ambiguous (field separators, quotes) or forge lines (controls).
_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _text_value(value: Any) -> str:
    """A field value for a text log line: quoted and escaped (JSON string) if it holds a space, a quote,
    ``=``, a backslash or any control character, so that one event is always exactly one line."""
    text = value if isinstance(value, str) else str(value)
    if text == "" and isinstance(value, str):
        return '""'
    return json.dumps(text) if _NEEDS_QUOTES.search(text) else text


def _escape_controls(text: str) -> str:
    """Control characters of a message as ``\\uXXXX`` (line breaks included)."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        head = (f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}Z {record.levelname:<7} "
                f"{_escape_controls(record.getMessage())}")
        tail = " ".join(f"{_escape_controls(str(k))}={_text_value(v)}" for k, v in fields.items())
        if record.exc_info:
            tail += " exception=" + _text_value(self.formatException(record.exc_info))
        return f"{head} {tail}".rstrip()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + "Z",
            "level": record.levelname,
            "event": record.getMessage(),
        }
        payload.update(getattr(record, "fields", {}))
        return json.dumps(payload, sort_keys=False, default=str)


def get_run_logger(log_path: str | Path | None, *, json_lines: bool = False, echo: bool = False) -> logging.Logger:
    """A logger writing structured events to ``log_path`` (and to stderr when ``echo``).

    Calling it again replaces the previous handlers, so one process can run several jobs.
    """
    import time

    logger = logging.getLogger(_LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt: logging.Formatter = _JsonFormatter() if json_lines else _KeyValueFormatter()
    fmt.converter = time.gmtime
    if log_path is not None:
        fh = logging.FileHandler(log_path, mode="w", encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    if echo:
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        logger.addHandler(sh)
    return logger


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with key=value fields (e.g. ``feeder=``, ``meter=``, ``reason=``)."""
    logger.log(level, event, extra={"fields": fields})
