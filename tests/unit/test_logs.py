"""The log formats: JSON lines with stable keys from `extra=` fields; text lines unchanged."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator

import pytest

from sse_gateway.logs import DEFAULT_EVENT, STABLE_KEYS, JsonFormatter, configure_logging


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("sse_gateway.connection")
    return logger.makeRecord(
        logger.name, logging.INFO, __file__, 1, msg, args, None, extra=extra or None
    )


def test_stable_keys_in_order_and_extra_fields_after() -> None:
    line = JsonFormatter().format(
        record(
            "stream close id=%s",
            "c-1",
            event="stream_close",
            conn="c-1",
            brand="b",
            player="p",
            reason="client",
            duration=1.234,
            receivers=2,
        )
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert list(entry)[: len(STABLE_KEYS)] == list(STABLE_KEYS)
    assert entry["event"] == "stream_close"
    assert entry["message"] == "stream close id=c-1"
    assert entry["logger"] == "sse_gateway.connection"
    assert entry["level"] == "INFO"
    assert (entry["brand"], entry["player"], entry["conn"]) == ("b", "p", "c-1")
    assert (entry["reason"], entry["duration"]) == ("client", 1.234)
    assert entry["receivers"] == 2
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]


def test_a_line_without_fields_has_every_stable_key_null_or_default() -> None:
    entry = json.loads(JsonFormatter().format(record("plain %d", 3)))
    assert set(STABLE_KEYS) <= set(entry)
    assert entry["event"] == DEFAULT_EVENT
    assert entry["message"] == "plain 3"
    assert [entry[k] for k in ("brand", "player", "conn", "reason", "duration")] == [None] * 5
    # Nothing of the LogRecord's own attributes leaks in as a field.
    assert not {"args", "msg", "levelno", "exc_info", "created"} & set(entry)


def test_traceback_newlines_and_odd_values_stay_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        exc_info = sys.exc_info()
    logger = logging.getLogger("sse_gateway")
    rec = logger.makeRecord(
        logger.name, logging.ERROR, __file__, 1, "a\nb", (), exc_info, extra={"odd": object()}
    )
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "a\nb"
    assert "ValueError: boom" in entry["exc"]
    assert entry["odd"].startswith("<object object")


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)


def emit(log_format: str, monkeypatch: pytest.MonkeyPatch) -> str:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging(log_format, "INFO")
    logging.getLogger("sse_gateway.connection").info(
        "stream open id=%s brand=%s player=%s",
        "c-9",
        "b",
        "p",
        extra={"event": "stream_open", "conn": "c-9", "brand": "b", "player": "p"},
    )
    return out.getvalue()


@pytest.mark.usefixtures("restore_root")
def test_text_mode_prints_the_message_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    text = emit("text", monkeypatch)
    tail = f"sse_gateway.connection[{os.getpid()}] stream open id=c-9 brand=b player=p\n"
    assert text.endswith(tail)
    assert "{" not in text


@pytest.mark.usefixtures("restore_root")
def test_json_mode_prints_one_object_per_line(monkeypatch: pytest.MonkeyPatch) -> None:
    text = emit("json", monkeypatch)
    [line] = text.splitlines()
    entry = json.loads(line)
    assert (entry["event"], entry["conn"], entry["brand"]) == ("stream_open", "c-9", "b")
