"""Suite-wide switches.

``PREQUAL_TEST_TRANSPORT=h1`` runs every gateway the tests build without a transport of their own on
``H1Transport`` instead of the default ``AiohttpTransport``, so that one behaviour suite covers both.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Patched for the whole session (module-scoped servers start before any function fixture).
    if os.environ.get("PREQUAL_TEST_TRANSPORT") == "h1":
        from prequal_middleware import gateway
        from prequal_middleware.transport_h1 import H1Transport

        gateway.AiohttpTransport = H1Transport  # type: ignore[misc]
