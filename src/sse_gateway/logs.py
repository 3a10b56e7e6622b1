"""Logging set-up: human-readable lines by default, one JSON object per line on request.

Structured fields travel as `extra=` on the log call (`event`, `brand`, `player`, `conn`,
`reason`, `duration`, and any other), never parsed back out of the message: the text format
prints the message alone, the JSON format prints the fields as keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

#: Keys every JSON line has, in this order; a field that does not apply is null.
STABLE_KEYS = (
    "ts",
    "level",
    "event",
    "logger",
    "message",
    "pid",
    "brand",
    "player",
    "conn",
    "reason",
    "duration",
)
#: The event of a line whose call names none.
DEFAULT_EVENT = "log"

# What every LogRecord has: anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}
_OWN_KEYS = frozenset(STABLE_KEYS)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: STABLE_KEYS first, then the other `extra=`
    fields, then `exc` (the traceback, as one string) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "event": fields.get("event") or DEFAULT_EVENT,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key in STABLE_KEYS[6:]:
            entry[key] = fields.get(key)
        for key, value in fields.items():
            if key not in _RECORD_ATTRS and key not in _OWN_KEYS:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd `extra=` value must not cost the line.
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s[%(process)d] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Python's own warnings go through the same handler, so that JSON mode stays one object
    # per line.
    logging.captureWarnings(True)
    # redis-py and asyncio chatter is not ours to print at INFO.
    logging.getLogger("asyncio").setLevel(logging.WARNING)
