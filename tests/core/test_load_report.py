"""The load report's wire format (``core.load_report``): what a backend writes is what the gateway reads."""

from __future__ import annotations

import random

import pytest

from prequal_middleware.core.load_report import (
    LATENCY_HEADER,
    MAX_LATENCY_US,
    MAX_LOAD_DIGITS,
    MAX_RIF,
    RIF_HEADER,
    encode_report,
    parse_load_value,
    read_report,
)


@pytest.mark.parametrize(("rif", "latency_s"), [(0, 0.0), (3, 0.012345), (MAX_RIF, MAX_LATENCY_US / 1e6)])
def test_a_report_reads_back_as_written(rif: int, latency_s: float) -> None:
    assert read_report([(b"content-type", b"text/plain"), *encode_report(rif, latency_s)]) == (rif, latency_s)


def test_a_missing_latency_reads_as_zero_and_a_missing_rif_as_no_report() -> None:
    assert read_report([(RIF_HEADER, b"4")]) == (4, 0.0)
    assert read_report([(LATENCY_HEADER, b"10")]) is None
    assert read_report([]) is None


@pytest.mark.parametrize(
    "headers",
    [
        [(RIF_HEADER, b"1"), (RIF_HEADER, b"1")],
        [(RIF_HEADER, b"1"), (LATENCY_HEADER, b"5"), (LATENCY_HEADER, b"5")],
        [(RIF_HEADER, b"-1")],
        [(RIF_HEADER, b"+1")],
        [(RIF_HEADER, b"1_0")],
        [(RIF_HEADER, str(MAX_RIF + 1).encode())],
        [(RIF_HEADER, b"1"), (LATENCY_HEADER, str(MAX_LATENCY_US + 1).encode())],
        [(RIF_HEADER, b"1" * 13)],
        [(RIF_HEADER, b"0" * 12 + b"1")],  # a small value, but more digits than any value needs
        [(RIF_HEADER, "١".encode())],
        [(RIF_HEADER, b"")],
        [(RIF_HEADER, b"1"), (LATENCY_HEADER, b"1.5")],
    ],
)
def test_a_bad_report_is_no_report(headers: list[tuple[bytes, bytes]]) -> None:
    assert read_report(headers) is None


def test_field_whitespace_is_allowed() -> None:
    assert read_report([(RIF_HEADER, b" 2\t"), (LATENCY_HEADER, b"\t7 ")]) == (2, 7e-06)


def test_header_names_in_any_case_are_read() -> None:
    assert read_report([(b"X-Prequal-Rif", b"2"), (b"X-PREQUAL-LATENCY-US", b"9")]) == (2, 9e-06)
    assert read_report([(b"x-prequal-rif", b"2"), (b"X-Prequal-Rif", b"2")]) is None, "twice, in two spellings"


def _reference_value(value: bytes, limit: int) -> int | None:
    """The rule as the module docstring states it, written independently of both of its paths."""
    stripped = value.strip(b" \t")
    if not 1 <= len(stripped) <= MAX_LOAD_DIGITS or any(not 48 <= c <= 57 for c in stripped):
        return None
    number = int(stripped)
    return number if number <= limit else None


@pytest.mark.parametrize("seed", range(3))
def test_values_parse_as_the_rule_says_in_this_build(seed: int) -> None:
    """Compiled, ``parse_load_value`` reads digits in its own loop; plain, with ``isdigit`` and ``int``.
    Whichever this session runs must agree with the rule on crafted values (CI runs both builds)."""
    rng = random.Random(seed)
    alphabet = b"0123456789  \t\t+-_.x\x00\xff" + "١".encode()
    values = [b"", b" ", b"\t\t", b"0", b"000000000000", b"0000000000000", b" 12 ", b"\t7", b"1 2"]
    values += [bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 16))) for _ in range(4000)]
    values += [str(rng.randrange(0, 10**13)).encode() for _ in range(1000)]
    for value in values:
        for limit in (MAX_RIF, MAX_LATENCY_US):
            assert parse_load_value(value, limit) == _reference_value(value, limit), value
