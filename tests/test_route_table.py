"""``RouteTable.match``: the longest prefix a raw path is under, found without scanning every route.

The rule is ``request_target.under_prefix`` applied to every route, longest first; the table must give
the same answer for any set of prefixes and any path, hostile ones included.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings, strategies as st

from prequal_middleware.gateway.request_target import under_prefix
from prequal_middleware.gateway.routes import RouteTable

SEGMENT = st.sampled_from(["a", "b", "api", "v1", "%61", "", "x.y", "~"])


def _routes(prefixes: list[str]) -> dict[str, Any]:
    # RouteTable reads only prefix_bytes: a stand-in keeps the test on the matching rule alone.
    return {p: SimpleNamespace(prefix=p, prefix_bytes=p.encode()) for p in prefixes}


def _scan(routes: dict[str, Any], raw: bytes) -> Any:
    for route in sorted(routes.values(), key=lambda r: len(r.prefix_bytes), reverse=True):
        if under_prefix(raw, route.prefix_bytes):
            return route
    return None


prefixes = st.lists(st.lists(SEGMENT, min_size=1, max_size=4), max_size=8).map(
    lambda parts: sorted({"/" + "/".join(p) for p in parts if not "/".join(p).endswith("/")})
)
paths = st.lists(SEGMENT, max_size=7).map(lambda p: ("/" + "/".join(p)).encode())


@settings(max_examples=400, deadline=None)
@given(prefixes, st.booleans(), paths)
def test_the_table_matches_the_longest_prefix_like_a_scan(listed: list[str], root: bool, raw: bytes) -> None:
    routes = _routes(listed + (["/"] if root else []))
    assert RouteTable(routes).match(raw) is _scan(routes, raw)


def test_cases_at_the_edges() -> None:
    routes = _routes(["/", "/api", "/api/v1", "/a/b"])
    table = RouteTable(routes)
    assert table.match(b"/api") is routes["/api"]
    assert table.match(b"/api/") is routes["/api"]
    assert table.match(b"/api/v1/users") is routes["/api/v1"]
    assert table.match(b"/api/v10") is routes["/api"]  # not on a segment boundary of /api/v1
    assert table.match(b"/apix") is routes["/"]
    assert table.match(b"/a/bc") is routes["/"]
    assert table.match(b"/%61pi") is routes["/"]  # raw bytes: no decoding
    assert table.match(b"*") is routes["/"]
    no_root = RouteTable(_routes(["/api"]))
    assert no_root.match(b"/other") is None and no_root.match(b"") is None
    assert RouteTable({}).match(b"/api") is None


def test_a_path_of_many_slashes_is_looked_up_only_as_far_as_the_longest_prefix() -> None:
    looked_up: list[bytes] = []

    class Counting(dict[bytes, Any]):
        def get(self, key: bytes, default: Any = None) -> Any:
            looked_up.append(key)
            return super().get(key, default)

    table = RouteTable(_routes(["/api/v1"]))
    table._by_prefix = Counting(table._by_prefix)  # type: ignore[misc]
    assert table.match(b"/" * 100_000) is None
    assert len(looked_up) <= len("/api/v1") + 1
