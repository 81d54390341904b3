"""A member URL pinned to an address: ``http://api.internal:8000/base#10.0.0.5``.

DNS discovery turns one upstream name into one member per address. Each member must connect to its
address yet still present the name (``Host``, TLS SNI and certificate checks), so its URL keeps the
name and carries the address as its fragment, which HTTP never sends. Registered URLs carry no
fragment (registration refuses one), so only discovery makes these.
"""

from __future__ import annotations

import ipaddress


def pin_address(url: str, address: str) -> str:
    """``url`` (no fragment) pinned to the IP ``address``."""
    ipaddress.ip_address(address)  # ValueError for anything but an IP literal
    return f"{url}#{address}"


def pinned_address(fragment: str) -> str | None:
    """The address a URL's fragment pins it to; ``None`` for no fragment; ``ValueError`` for another one."""
    if not fragment:
        return None
    return str(ipaddress.ip_address(fragment))
