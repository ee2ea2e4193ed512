"""Tests of phaseid_hpc/logging_utils.py: one event is one line, whatever the ids hold."""

from __future__ import annotations

import json

from phaseid_hpc.logging_utils import get_run_logger, log_event


def test_text_log_escapes_control_characters_and_quotes(tmp_path):
    log = tmp_path / "run.log"
    logger = get_run_logger(log)
    forged = 'F1\n2026-01-01T00:00:00Z INFO    run_done meter=x\r\x1b[31m\u2028'
    log_event(logger, "block_done\nforged", feeder=forged, meter="m 1", quote='a"b=c', empty="", n=3)
    for h in logger.handlers:
        h.flush()
    lines = log.read_text().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert "block_done\\u000aforged" in line and "\x1b" not in line and "\r" not in line
    value, _ = json.JSONDecoder().raw_decode(line.split(" feeder=", 1)[1])
    assert value == forged  # quoted and escaped: the value reads back exactly
    assert 'meter="m 1"' in line and 'quote="a\\"b=c"' in line and 'empty=""' in line and line.endswith("n=3")


def test_json_log_is_one_line_per_event(tmp_path):
    log = tmp_path / "run.log"
    logger = get_run_logger(log, json_lines=True)
    log_event(logger, "x", feeder="F\n1")
    for h in logger.handlers:
        h.flush()
    (line,) = log.read_text().splitlines()
    assert json.loads(line)["feeder"] == "F\n1"
