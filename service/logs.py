"""Logging of the entry point (text or JSON lines), request ids, and the access log.

Every request gets an id: the client's ``X-Request-Id`` when it is a plausible id, a new one
otherwise (asgi-correlation-id). It is echoed in the response's ``X-Request-Id``, and every log
record written while the request is served carries it (``request_id``), the access-log line
included (``service.middleware.MetricsMiddleware`` writes it), so one request's lines can be
found in the logs of a busy server.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

from asgi_correlation_id import CorrelationIdFilter
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

REQUEST_ID = "X-Request-Id"
# A client's id is kept if it is short and plain (a UUID, a trace id, "job-7/step-3"); anything
# else (a 10 kB header, control characters for the logs) is replaced by a fresh id.
_PLAIN_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
NO_REQUEST = "-"  # the request id of records written outside a request (start-up, flushes)


def is_plain_id(value: str) -> bool:
    """Whether a client's request id is kept as it is."""
    return _PLAIN_ID.fullmatch(value) is not None


def configure_logging(level: str, log_format: Literal["text", "json"]) -> None:
    """Configure the root logger once, at the entry point: text lines or JSON objects.

    JSON: one object per line with ``time``, ``level``, ``logger``, ``message``, ``request_id``
    and any ``extra`` fields (the access log's method, path, status, duration_s).
    """
    handler = logging.StreamHandler()
    handler.addFilter(CorrelationIdFilter(default_value=NO_REQUEST))
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(correlation_id)s",
                # uvicorn's ANSI-coloured copy of its message is no field for a log shipper
                reserved_attrs=[*RESERVED_ATTRS, "color_message"],
                rename_fields={
                    "asctime": "time",
                    "levelname": "level",
                    "name": "logger",
                    "correlation_id": "request_id",
                },
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(correlation_id)s] %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
