"""Suite-wide switches.

``PREQUAL_TEST_TRANSPORT=aiohttp`` runs every gateway the tests build without a transport of their own on
``AiohttpTransport`` instead of the default ``H1Transport``, so that one behaviour suite covers both
(``tests/test_transport_aiohttp_suites.py`` does that for the data-plane suites).
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Patched for the whole session (module-scoped servers start before any function fixture).
    if os.environ.get("PREQUAL_TEST_TRANSPORT") == "aiohttp":
        from prequal_middleware.gateway import gateway
        from prequal_middleware.transports.aiohttp import AiohttpTransport

        gateway.H1Transport = AiohttpTransport  # type: ignore[misc]
