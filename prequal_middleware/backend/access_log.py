"""Keep probes and health checks out of a backend's access log.

Behind a Prequal gateway most of the lines a backend would log are probes (85% in one measurement of
issue 14) and health checks, which drown the requests an operator reads the log for. The server writes
the access log, not the app, so a middleware cannot skip a line itself; it can filter the server's
access logger. This module does that for uvicorn (logger ``uvicorn.access``, whose records carry the
request's full path as their third argument); other servers name their own loggers, and
:func:`quiet_access_log` takes the name.

A line is dropped when its path, without the query string, is one of the quiet paths or ends with one
(an app mounted under a ``root_path`` logs the root path in front; quiet paths start with ``/``, so
the match is on a segment boundary). Nothing else changes:
the requests still reach the server and the app, and every other line is logged as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

UVICORN_ACCESS_LOGGER = "uvicorn.access"


class QuietPathsFilter(logging.Filter):
    """Drops access-log records of requests to ``paths`` (see the module docstring)."""

    def __init__(self, paths: Iterable[str]) -> None:
        super().__init__()
        self.paths = frozenset(paths)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) < 3 or not isinstance(args[2], str):
            return True  # not an access line we know the shape of: keep it
        path = args[2].partition("?")[0]
        if path in self.paths:
            return False
        # Under a root_path: "/<root>/_prequal/probe" (quiet paths start with "/": a segment boundary).
        return not any(path.endswith(quiet) for quiet in self.paths)


def quiet_access_log(paths: Iterable[str], logger_name: str = UVICORN_ACCESS_LOGGER) -> QuietPathsFilter:
    """Install (once per set of paths and logger) a filter that keeps ``paths`` out of the access log."""
    logger = logging.getLogger(logger_name)
    wanted = frozenset(paths)
    for existing in logger.filters:
        if isinstance(existing, QuietPathsFilter) and existing.paths == wanted:
            return existing
    installed = QuietPathsFilter(wanted)
    logger.addFilter(installed)
    return installed
