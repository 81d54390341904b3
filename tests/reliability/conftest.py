"""Fixtures of the reliability suite: the figures report, a log directory, and a watchdog per test.

- ``report`` (session): every case records its figures there; at the end of the session the page is
  rendered, in case order, into ``report.result_path()`` (build/, never docs/: tests only check) only
  if every reliability test that was collected passed (or failed as an expected, reported bug) and
  every case recorded its figures. ``python -m benchmarks.reliability`` puts it in docs/.
- A watchdog per test (``@pytest.mark.budget(seconds)``, default 120 s): past it, every thread's
  traceback is dumped and the run exits, rather than hang CI (child processes die with it:
  ``PR_SET_PDEATHSIG``).
- ``@pytest.mark.soak``: the long-running soak (one minute); it runs in CI, ``-m "not soak"`` skips it locally.
"""

from __future__ import annotations

import faulthandler
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.reliability.report import CASES, DOC, WRITE_COMMAND, Report, result_path

HERE = Path(__file__).resolve().parent
DEFAULT_BUDGET_S = 120.0
_report_key = pytest.StashKey[Report]()
_outcomes_key = pytest.StashKey[dict[str, str]]()
_items_key = pytest.StashKey[list[str]]()
_seconds_key = pytest.StashKey[list[float]]()  # every phase of every reliability test, for the runtime figure


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: the long-running soak benchmark (still part of every CI run)")
    config.addinivalue_line("markers", "budget(seconds): the watchdog's limit for one reliability test")
    config.stash[_report_key] = Report()
    config.stash[_outcomes_key] = {}
    config.stash[_items_key] = []
    config.stash[_seconds_key] = []


def _ours(path: Path) -> bool:
    return HERE in path.resolve().parents


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[_items_key] = [item.nodeid for item in items if _ours(Path(str(item.path)))]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if _ours(Path(str(item.path))):
        item.config.stash[_seconds_key].append(report.duration)
    outcomes = item.config.stash[_outcomes_key]
    node = report.nodeid
    if outcomes.get(node) != "failed":
        if report.failed:
            outcomes[node] = "failed"
        elif report.skipped:
            outcomes[node] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif report.when == "call" and report.passed:
            outcomes[node] = "xpassed" if hasattr(report, "wasxfail") else "passed"
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    items = config.stash.get(_items_key, [])
    if not items:
        return
    report = config.stash[_report_key]
    outcomes = config.stash[_outcomes_key]
    unfinished = [n for n in items if outcomes.get(n) not in ("passed", "xfailed")]
    missing = sorted(set(CASES) - report.cases())
    if unfinished or missing:
        reason = f"{len(unfinished)} test(s) did not pass" if unfinished else f"no figures for cases {missing}"
        sys.stderr.write(f"\nreliability: no page rendered ({reason})\n")
        return
    seconds: list[float] = config.stash[_seconds_key]
    runtime = sum(seconds)
    # The committed page is only read: its long soak section is carried over into the new one.
    previous = DOC.read_text() if DOC.exists() else None
    out = result_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.render(runtime, previous))
    sys.stderr.write(f"\nreliability: rendered {out}; `{WRITE_COMMAND}` writes {DOC.name} into docs/\n")


@pytest.fixture(scope="session")
def report(pytestconfig: pytest.Config) -> Report:
    return pytestconfig.stash[_report_key]


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture(autouse=True)
def watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    marker = request.node.get_closest_marker("budget")
    budget = float(marker.args[0]) if marker is not None else DEFAULT_BUDGET_S
    faulthandler.dump_traceback_later(budget, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
