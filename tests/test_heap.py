"""``settle_heap``: start-up's objects frozen, generation 0's threshold raised but never lowered, and the
console script settling each worker once started."""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from prequal_middleware.heap import YOUNG_THRESHOLD, settle_heap
from tests.apps import make_backend
from tests.servers import serve
from tests.test_cli import _clean_env, _served, one_pool_config


@pytest.fixture
def gc_state() -> Iterator[None]:
    """The collector as it was before the test: unfrozen, its thresholds back."""
    thresholds = gc.get_threshold()
    enabled = gc.isenabled()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        if enabled:
            gc.enable()


@pytest.mark.usefixtures("gc_state")
def test_settling_freezes_the_survivors_and_raises_the_young_threshold() -> None:
    gc.set_threshold(700, 10, 10)
    made_at_start = [[1]]  # a container, so the collector tracks it
    assert any(o is made_at_start for o in gc.get_objects())
    frozen = settle_heap()
    assert frozen == gc.get_freeze_count() > 1_000  # the interpreter's own objects, and ours
    assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
    assert not any(o is made_at_start for o in gc.get_objects())  # frozen: in no generation any more


@pytest.mark.usefixtures("gc_state")
def test_a_higher_threshold_and_a_disabled_collector_are_kept() -> None:
    gc.set_threshold(50_000, 5, 5)
    settle_heap()
    assert gc.get_threshold() == (50_000, 5, 5)
    gc.set_threshold(0, 10, 10)  # automatic collection off
    settle_heap()
    assert gc.get_threshold() == (0, 10, 10)


def test_a_threshold_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="young_threshold must be >= 1"):
        settle_heap(0)


def test_the_console_script_settles_each_workers_heap_once_started(tmp_path: Path) -> None:
    app, _ = make_backend("b1")
    with serve(app) as backend:
        config = one_pool_config(tmp_path, backend.url)
        with _served(["--config", str(config)], _clean_env(), tmp_path) as served:
            assert httpx.get(served.url + "/api/x", timeout=10).status_code == 200
    log = served.err.read_text()
    found = re.findall(r"heap settled: (\d+) start-up objects frozen, generation 0 collected every (\d+)", log)
    assert len(found) == 1, log  # one worker, settled once
    frozen, young = map(int, found[0])
    assert frozen > 10_000 and young == YOUNG_THRESHOLD
