"""Figures recorded by the reliability cases, and the command that writes docs/reliability.md.

Each case records rows (case number, what was done, the load, what happened, the figure); at its end
the session renders them, in case order, into ``RESULT`` (``build/reliability/reliability.md``, or
``$PREQUAL_RELIABILITY_REPORT``) and only when every case ran and passed (or failed as an expected,
reported bug). The tests never write under docs/; the committed page is written by

    python -m benchmarks.reliability                    # runs pytest tests/reliability, then copies
    python -m benchmarks.reliability --from build/reliability/reliability.md

The 10-minute soak section is written by ``python -m benchmarks.soak --minutes 10 --doc
docs/reliability.md`` between the markers below and kept as it is by both.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"  # only read here (its long soak section); benchmarks.reliability writes it
RESULT_ENV = "PREQUAL_RELIABILITY_REPORT"
WRITE_COMMAND = "python -m benchmarks.reliability"


def result_path() -> Path:
    """Where the suite renders its report: ``$PREQUAL_RELIABILITY_REPORT`` or build/ (never docs/)."""
    return Path(os.environ.get(RESULT_ENV) or REPO / "build" / "reliability" / "reliability.md")


CASES = {
    1: "Backend SIGKILLed under load",
    2: "Backend hangs",
    3: "Backend resets the connection mid-body",
    4: "Client disconnects",
    5: "Slow reader, large body",
    6: "Fast-failing backend reporting zero load",
    7: "Redis stopped and restarted under load",
    8: "Registration fuzzing",
    9: "Request smuggling and header abuse",
    10: "Soak (1 minute)",
}
LONG_SOAK_START = "<!-- soak-long:start -->"
LONG_SOAK_END = "<!-- soak-long:end -->"
LONG_SOAK_PLACEHOLDER = (
    "Not run yet: `python -m benchmarks.soak --minutes 10 --doc docs/reliability.md` writes it here."
)


@dataclass(frozen=True, slots=True)
class Row:
    case: int
    order: int
    what: str
    load: str
    happened: str
    figure: str
    expected_failure: str | None = None


class Report:
    """Collects rows and free-form sections for the document."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.sections: dict[tuple[int, str], str] = {}

    def record(
        self,
        case: int,
        what: str,
        *,
        load: str,
        happened: str,
        figure: str,
        order: int = 0,
        expected_failure: str | None = None,
    ) -> None:
        assert case in CASES, case
        self.rows.append(Row(case, order, what, load, happened, figure, expected_failure))
        print(f"\n[case {case}] {what} | {load} | {happened} | {figure}")

    def section(self, case: int, title: str, markdown: str) -> None:
        self.sections[(case, title)] = markdown.strip()

    def cases(self) -> set[int]:
        return {r.case for r in self.rows}

    def render(self, runtime_s: float, previous: str | None) -> str:
        rows = sorted(self.rows, key=lambda r: (r.case, r.order, r.what))
        out = [
            "# Reliability",
            "",
            "Figures of the reliability suite (`pytest tests/reliability`, part of every CI run): real",
            "processes on loopback (gateway and backends under uvicorn, a real `redis-server`), every run",
            "bounded in time and count, each figure asserted by its test. The suite only checks (its own",
            "copy goes to `build/reliability/reliability.md`); this page is written by",
            f"`{WRITE_COMMAND}`, which runs the suite and copies the page here only when every case",
            "ran; do not edit by hand. The figures are from the last run on the machine below; the bounds the",
            "tests assert are in the *figure* column next to what was measured.",
            "",
            f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()} on {sys.platform};"
            f" suite runtime {runtime_s:.0f} s.",
            "",
            "| # | case | load | what happened | figure (bound) |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            happened = r.happened
            if r.expected_failure:
                happened += f" **Known bug (xfail):** {r.expected_failure}"
            out.append(f"| {r.case} | {_cell(r.what)} | {_cell(r.load)} | {_cell(happened)} | {_cell(r.figure)} |")
        for (case, title), markdown in sorted(self.sections.items()):
            out += ["", f"## {case}. {title}", "", markdown]
        out += ["", "## Soak, long run", "", LONG_SOAK_START, _long_soak(previous), LONG_SOAK_END, ""]
        return "\n".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _long_soak(previous: str | None) -> str:
    if previous:
        match = re.search(re.escape(LONG_SOAK_START) + r"\n(.*?)\n?" + re.escape(LONG_SOAK_END), previous, re.S)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return LONG_SOAK_PLACEHOLDER
