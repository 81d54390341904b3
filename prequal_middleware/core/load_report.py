"""The load report's wire format, in one place: what a backend sends and how the gateway reads it.

A backend reports its load in two headers, ``x-prequal-rif`` (requests in flight, an integer) and
``x-prequal-latency-us`` (its latency estimate in microseconds, an integer): the names prequal-rs and
envoy-prequal use. They answer a probe (``GET`` or ``HEAD`` on ``DEFAULT_PROBE_PATH``) and ride on every
response ``LoadReportingMiddleware`` serves (a piggybacked report).

A report is untrusted input (a backend may be compromised or hostile), so it is bounded here, the one
place it is parsed: each value is a plain decimal integer of ASCII digits, at most ``MAX_LOAD_DIGITS``
of them (no sign, no ``_``, no other digit; spaces and tabs around it are the field's own whitespace),
at most ``MAX_RIF`` and ``MAX_LATENCY_US`` respectively, and each header present at most once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from prequal_middleware.core.compiled import is_compiled

DEFAULT_PROBE_PATH: Final = "/_prequal/probe"
RIF_HEADER: Final = b"x-prequal-rif"
LATENCY_HEADER: Final = b"x-prequal-latency-us"
REPORT_HEADERS: Final = frozenset({RIF_HEADER, LATENCY_HEADER})
_RIF_SIZE: Final = len(RIF_HEADER)
_LATENCY_SIZE: Final = len(LATENCY_HEADER)
# A million requests in flight is beyond any single backend; ten minutes is beyond any probe timeout and
# any latency worth balancing on. Both fit a float exactly, so no later arithmetic can overflow.
MAX_RIF: Final = 1_000_000
MAX_LATENCY_US: Final = 600_000_000
# Enough for either bound with a few leading zeros; int() never sees a longer string.
MAX_LOAD_DIGITS: Final = 12
_OWS: Final = b" \t"


_SP: Final = 32  # b" "
_HTAB: Final = 9  # b"\t"
_ZERO: Final = 48  # b"0"
_NINE: Final = 57  # b"9"


def parse_load_value(value: bytes, limit: int) -> int | None:
    """A load header's value as an int in ``[0, limit]``, or None unless it is a plain decimal integer.

    Python's ``int()`` alone accepts ``+5``, `` 5 ``, ``5_0`` and thousands of digits, so the value is
    checked byte by byte first: ASCII digits only (``bytes.isdigit`` knows no other), at most
    ``MAX_LOAD_DIGITS`` of them, after stripping the field's optional whitespace (spaces and tabs).
    """
    if _COMPILED:
        return _parse_digits(value, limit)
    if not (len(value) <= MAX_LOAD_DIGITS and value.isdigit()):  # the plain case needs no strip
        value = value.strip(_OWS)
        if not (0 < len(value) <= MAX_LOAD_DIGITS and value.isdigit()):
            return None
    number = int(value)
    return number if number <= limit else None


def _parse_digits(value: bytes, limit: int) -> int | None:
    """``parse_load_value``, byte by byte (the compiled build's path; the same answers)."""
    start, end = 0, len(value)
    while start < end and (value[start] == _SP or value[start] == _HTAB):
        start += 1
    while end > start and (value[end - 1] == _SP or value[end - 1] == _HTAB):
        end -= 1
    if start == end or end - start > MAX_LOAD_DIGITS:
        return None
    number = 0
    for i in range(start, end):
        digit = value[i]
        if digit < _ZERO or digit > _NINE:
            return None
        number = number * 10 + (digit - _ZERO)
    return number if number <= limit else None


def encode_report(rif: int, latency_s: float) -> list[tuple[bytes, bytes]]:
    """The two report headers for ``rif`` requests in flight and a latency estimate of ``latency_s``."""
    return [(RIF_HEADER, str(rif).encode()), (LATENCY_HEADER, str(round(latency_s * 1e6)).encode())]


# Whether this module runs compiled: there the digits are read in a loop that compiles to native code,
# cheaper than the method calls and ``int()`` in ``parse_load_value``; in plain Python those are cheaper.
_COMPILED: Final = is_compiled(encode_report)


def read_report(headers: Iterable[tuple[bytes, bytes]]) -> tuple[int, float] | None:
    """A piggybacked report from a response's raw headers (names in any case): ``(rif, latency_s)``.

    ``None`` when there is none, or when it is not a valid report (a header twice, a value out of
    bounds, a latency without a RIF): a bad report is no report, never a failure of the response.
    A missing latency reads as 0, as on a probe answer.
    """
    rif_value: bytes | None = None
    latency_value: bytes | None = None
    for name, value in headers:
        # Names may come in any case (aiohttp keeps the backend's); the length test spares the rest a lower().
        size = len(name)
        # The exact name first: backends (ours among them) send it in lower case, and a comparison is
        # cheaper than the copy ``lower()`` makes.
        if size == _RIF_SIZE and (name == RIF_HEADER or name.lower() == RIF_HEADER):
            if rif_value is not None:
                return None
            rif_value = value
        elif size == _LATENCY_SIZE and (name == LATENCY_HEADER or name.lower() == LATENCY_HEADER):
            if latency_value is not None:
                return None
            latency_value = value
    if rif_value is None:
        return None
    rif = parse_load_value(rif_value, MAX_RIF)
    latency_us = 0 if latency_value is None else parse_load_value(latency_value, MAX_LATENCY_US)
    if rif is None or latency_us is None:
        return None
    return rif, latency_us / 1e6
