"""Suite-wide switches.

``PREQUAL_TEST_TRANSPORT=aiohttp`` runs every gateway the tests build without a transport of their own on
``AiohttpTransport`` instead of the default ``H1Transport``, so that one behaviour suite covers both
(``tests/test_transport_aiohttp_suites.py`` does that for the data-plane suites).

The sans-IO core runs compiled when ``python tools/build_core.py build`` put mypyc's extension modules in
the tree (``tox`` does, for the ``py`` env): the header says which build the session runs, and a session
whose compiled modules are older than their sources stops before it starts.
"""

from __future__ import annotations

import os

import pytest

from tools import build_core


def pytest_configure(config: pytest.Config) -> None:
    # Before anything imports the package: compiled modules older than their sources would be tested
    # in their place (an extension module shadows the .py beside it).
    stale = build_core.problems()
    if stale:
        pytest.exit(
            "the compiled sans-IO core in this tree is stale ("
            + "; ".join(stale)
            + "): run python tools/build_core.py build or clean",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
    # Patched for the whole session (module-scoped servers start before any function fixture).
    if os.environ.get("PREQUAL_TEST_TRANSPORT") == "aiohttp":
        from prequal_middleware.gateway import gateway
        from prequal_middleware.transports.aiohttp import AiohttpTransport

        gateway.H1Transport = AiohttpTransport  # type: ignore[misc]


def pytest_report_header(config: pytest.Config) -> str:
    from prequal_middleware.core.compiled import compiled_modules, describe

    return f"sans-IO core: {describe(compiled_modules())}"
