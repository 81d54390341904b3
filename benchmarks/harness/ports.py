"""Free loopback ports, and waiting until one accepts connections."""

from __future__ import annotations

import random
import socket
import time

# Below Linux's default ephemeral range (32768-60999): no outgoing connection takes such a port meanwhile.
FIXED_PORTS = (20000, 32000)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's choice, from the ephemeral range)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_fixed_port(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A bindable port below the ephemeral range, for a server restarted on the same port.

    A port from ``free_port`` may be taken by an outgoing connection while its server is down; one
    outside the ephemeral range is not.
    """
    rng = random.Random()
    for _ in range(attempts):
        port = rng.randrange(*FIXED_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def wait_port(port: int, timeout_s: float, host: str = "127.0.0.1") -> bool:
    """Poll until ``host:port`` accepts a connection; False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.05)
    return False
