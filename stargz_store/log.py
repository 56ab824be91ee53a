"""structlog set-up: JSON lines when stderr is not a terminal, a console renderer otherwise.

Events are snake_case names with bound fields::

    log = get_logger(__name__)
    log.info("layer_resolved", ref=ref, key=key, seconds=0.12)

Records from the standard ``logging`` module (pyfuse3, urllib3, ...) go through the same
renderer, so the daemon's stderr has one format.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections import deque
from collections.abc import Iterator, MutableMapping
from typing import IO, Any

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    level: str = "info", fmt: str = "auto", stream: IO[str] | None = None
) -> None:
    """Configure structlog and the standard logging root for the daemon.

    ``fmt`` is ``auto`` (JSON unless ``stream`` is a TTY), ``json`` or ``console``.
    """
    out = stream if stream is not None else sys.stderr
    numeric = LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})")
    if fmt == "auto":
        try:
            as_json = not out.isatty()
        except (AttributeError, ValueError):
            as_json = True
    elif fmt in ("json", "console"):
        as_json = fmt == "json"
    else:
        raise ValueError(f"unknown log format {fmt!r} (auto, json or console)")

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        RECENT_EVENTS,
    ]
    renderer: Any
    if as_json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # Per-request chatter from libraries is noise at info level.
    logging.getLogger("urllib3").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("pyfuse3").setLevel(max(numeric, logging.INFO))


@contextlib.contextmanager
def scoped_logging(
    level: str = "info", fmt: str = "auto", stream: IO[str] | None = None
) -> Iterator[None]:
    """:func:`configure_logging` for the length of one command, then the previous set-up again
    (a command run in-process, e.g. by a test, leaves no handler on a stream it was given)."""
    saved_structlog = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {n: logging.getLogger(n).level for n in ("urllib3", "pyfuse3")}
    configure_logging(level, fmt, stream)
    try:
        yield
    finally:
        structlog.configure(**saved_structlog)
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
        for name, lvl in saved_levels.items():
            logging.getLogger(name).setLevel(lvl)


class RecentEvents:
    """A structlog processor that keeps the latest warning and error events in a bounded ring,
    for ``stargz-store status`` ("last errors") and counts them by level (metrics).

    It sees each event once, as rendered (the same fields as the log line, so nothing a log
    line may not contain), after the level filter. Values are kept as short strings.
    """

    LEVELS = ("warning", "error", "critical")
    _SKIP = frozenset({"event", "level", "timestamp", "logger", "exc_info", "stack_info"})

    def __init__(self, size: int = 50, value_chars: int = 300) -> None:
        self._lock = threading.Lock()
        self._ring: deque[dict[str, Any]] = deque(maxlen=size)
        self._counts = dict.fromkeys(self.LEVELS, 0)
        self._value_chars = value_chars

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        level = str(event_dict.get("level", method_name)).lower()
        if level in self._counts:
            n = self._value_chars
            fields = {
                str(k): str(v)[:n]
                for k, v in event_dict.items()
                if k not in self._SKIP and not str(k).startswith("_")
            }
            item: dict[str, Any] = {
                "time": str(event_dict.get("timestamp", "")),
                "level": level,
                "event": str(event_dict.get("event", ""))[:n],
                "logger": str(event_dict.get("logger", "")),
                "fields": fields,
            }
            with self._lock:
                self._ring.append(item)
                self._counts[level] += 1
        return event_dict

    def recent(self) -> list[dict[str, Any]]:
        """The kept events, oldest first."""
        with self._lock:
            return [dict(e) for e in self._ring]

    def counts(self) -> dict[str, int]:
        """Warning, error and critical events seen since start, by level."""
        with self._lock:
            return dict(self._counts)


RECENT_EVENTS = RecentEvents()
"""The daemon's ring (one process, one ring); :func:`configure_logging` installs it."""


def get_logger(name: str) -> Any:
    """A structlog logger bound to ``name`` (``logger`` field)."""
    return structlog.stdlib.get_logger(name)
