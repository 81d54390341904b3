"""Lines a named logger wrote while a block ran (from any thread: the gateway runs in uvicorn's)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.records.append(record)

    @property
    def messages(self) -> list[str]:
        with self._lock2:
            return [r.getMessage() for r in self.records]


@contextlib.contextmanager
def captured(name: str, level: int = logging.INFO) -> Iterator[Lines]:
    logger = logging.getLogger(name)
    lines = Lines()
    old = logger.level
    logger.addHandler(lines)
    logger.setLevel(level)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(old)
