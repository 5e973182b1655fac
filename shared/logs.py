"""Log output for ``edgefleet`` and ``edgefleet-agent``: text lines or JSON lines.

``--log-format json`` (or ``EDGEFLEET_LOG_FORMAT=json``) writes one JSON
object per line to stderr, for log collectors (journald, Loki, Fluent Bit)::

    {"at": "2026-12-01T04:22:57.123Z", "level": "WARNING", "logger": "edgefleet.agent.daemon",
     "message": "...", "exc": "Traceback ..."}

``exc`` is there only when the record carries an exception. Standard library
only: the agent stays lean.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Final

__all__ = ["LOG_FORMATS", "JsonFormatter", "configure_logging"]

LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``at`` (UTC), ``level``, ``logger``, ``message``, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        body: dict[str, object] = {
            "at": f"{at}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            body["exc"] = record.exc_text
        return json.dumps(body, ensure_ascii=False, default=str)


def configure_logging(level: int, log_format: str = "text") -> None:
    """Set up the root logger once: ``level``, stderr, text or JSON lines.

    Raises:
        ValueError: ``log_format`` is not one of :data:`LOG_FORMATS`.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler()
    json_lines = log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
