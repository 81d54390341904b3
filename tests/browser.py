"""Render a page in headless Chromium and read the DOM after its scripts ran (no Selenium, no Playwright).

``dump_dom(url)`` runs ``chromium --headless --dump-dom`` with a virtual-time budget, so timers and
fetches get to run, and returns the serialized DOM. ``parse_dom(html)`` turns that into a small tree
of ``Element`` for assertions. Without a Chromium binary the test is skipped, or fails when ``CI`` is
set (CI installs it: ``apt-get install chromium``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser")

# Quiet, isolated, offline-friendly: without the background-networking flags Chromium keeps trying to
# reach Google services, which on a machine with a closed network means a stream of failing connections.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def find_chromium() -> str | None:
    """The Chromium binary on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium() -> str:
    """The Chromium binary; skips the test without one, or fails it when ``CI`` is set."""
    path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on PATH (CI must install it: apt-get install chromium)", pytrace=False)
        pytest.skip("no chromium: apt-get install chromium")
    return path


def chromium_command(binary: str, url: str, user_data_dir: str, budget_ms: int) -> list[str]:
    return [
        binary,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={user_data_dir}",
        f"--virtual-time-budget={budget_ms}",
        "--dump-dom",
        url,
    ]


def dump_dom(url: str, *, budget_ms: int = 3000, timeout_s: float = 60.0) -> str:
    """Load ``url`` in a fresh headless Chromium profile and return the DOM after ``budget_ms`` of virtual time.

    Virtual time runs timers as fast as the page lets it, but waits for network requests, so a page
    that polls every second gets about ``budget_ms / 1000`` polls in.
    """
    binary = require_chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile:
        command = chromium_command(binary, url, profile, budget_ms)
        # Its own session, so a hung browser is killed with its renderer and helper processes.
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "HOME": profile},
        )
        try:
            out, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise AssertionError(f"chromium did not finish within {timeout_s} s: {' '.join(command)}") from None
    dom = out.decode("utf-8", "replace")
    if process.returncode != 0 or "<html" not in dom:
        tail = err.decode("utf-8", "replace")[-2000:]
        raise AssertionError(f"chromium failed (exit {process.returncode}) on {url}:\n{tail}")
    return dom


_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)


@dataclass(eq=False)
class Element:
    """A parsed element: tag, attributes (entity-decoded), children (elements and text, in order)."""

    tag: str
    attrs: dict[str, str | None] = field(default_factory=dict)
    children: list[Element | str] = field(default_factory=list)
    parent: Element | None = field(default=None, repr=False)

    @property
    def text(self) -> str:
        """All text below this element, concatenated."""
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def iter(self) -> Iterator[Element]:
        """This element and every element below it, in document order."""
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.iter()

    def find_all(self, tag: str | None = None, **attrs: str | Callable[[str | None], bool] | None) -> list[Element]:
        """Elements below (and including) this one with ``tag`` and attributes.

        Attribute names use ``_`` for ``-`` (``data_state="healthy"``, ``class_="x"``); a value of ``None`` only
        asks for the attribute to exist, a callable is called with the attribute's value.
        """
        wanted = {name.rstrip("_").replace("_", "-"): value for name, value in attrs.items()}

        def matches(node: Element) -> bool:
            if tag is not None and node.tag != tag:
                return False
            for name, value in wanted.items():
                if name not in node.attrs:
                    return False
                actual = node.attrs[name]
                if callable(value):
                    if not value(actual):
                        return False
                elif value is not None and actual != value:
                    return False
            return True

        return [node for node in self.iter() if matches(node)]

    def find(self, tag: str | None = None, **attrs: str | Callable[[str | None], bool] | None) -> Element:
        """The single element ``find_all`` finds; AssertionError when there are none or several."""
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag or '*'} {attrs}>, found {len(found)}"
        return found[0]

    def by_id(self, element_id: str) -> Element:
        return self.find(id=element_id)

    def is_hidden(self) -> bool:
        """Has it or an ancestor the ``hidden`` attribute (the page's stylesheet makes that display: none)."""
        node: Element | None = self
        while node is not None:
            if "hidden" in node.attrs:
                return True
            node = node.parent
        return False


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document")
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Element(tag, dict(attrs), parent=self.stack[-1])
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Element(tag, dict(attrs), parent=self.stack[-1])
        self.stack[-1].children.append(node)

    def handle_endtag(self, tag: str) -> None:
        # Close up to the matching open element; an unmatched end tag is ignored.
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse_dom(html: str) -> Element:
    """Parse serialized HTML (such as ``dump_dom``'s) into an ``Element`` tree rooted at ``#document``."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root
