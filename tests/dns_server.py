"""A real DNS server on loopback for discovery tests: dnslib's UDP server with records the test changes.

    with DnsServer() as dns:
        dns.set("api.test.", a=["127.0.0.1", "127.0.0.2"], ttl=1)
        dns.set_srv("_http._tcp.api.test.", [(0, 1, 8001, "node1.test.")])
        ... resolver pointed at dns.address ("127.0.0.1:<port>") ...

Unknown names are NXDOMAIN; ``failing = True`` answers SERVFAIL to everything; ``queries`` counts what was asked.
"""

from __future__ import annotations

import threading
from collections import Counter
from types import TracebackType
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from tests.servers import free_port


class _Records(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: dict[str, dict[str, Any]] = {}
        self.failing = False
        self.queries: Counter[tuple[str, str]] = Counter()

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).lower()
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries[(qname, qtype)] += 1
            if self.failing:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            entry = self.names.get(qname)
            if entry is None:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            ttl = entry["ttl"]
            if qtype == "A":
                for address in entry.get("a", []):
                    reply.add_answer(RR(qname, QTYPE.A, ttl=ttl, rdata=A(address)))
            elif qtype == "AAAA":
                for address in entry.get("aaaa", []):
                    reply.add_answer(RR(qname, QTYPE.AAAA, ttl=ttl, rdata=AAAA(address)))
            elif qtype == "SRV":
                for priority, weight, port, target in entry.get("srv", []):
                    rdata = SRV(priority=priority, weight=weight, port=port, target=target)
                    reply.add_answer(RR(qname, QTYPE.SRV, ttl=ttl, rdata=rdata))
        return reply


class DnsServer:
    """An authoritative-only DNS server on 127.0.0.1 (UDP), in a daemon thread, stopped on exit."""

    def __init__(self) -> None:
        self.records = _Records()
        self.port = free_port()
        logger = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        self.server = DNSServer(self.records, port=self.port, address="127.0.0.1", logger=logger)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, *, a: list[str] | None = None, aaaa: list[str] | None = None, ttl: int = 30) -> None:
        with self.records.lock:
            self.records.names[name.lower()] = {"a": a or [], "aaaa": aaaa or [], "ttl": ttl}

    def set_srv(self, name: str, targets: list[tuple[int, int, int, str]], ttl: int = 30) -> None:
        with self.records.lock:
            self.records.names[name.lower()] = {"srv": targets, "ttl": ttl}

    def remove(self, name: str) -> None:
        with self.records.lock:
            self.records.names.pop(name.lower(), None)

    @property
    def failing(self) -> bool:
        return self.records.failing

    @failing.setter
    def failing(self, value: bool) -> None:
        with self.records.lock:
            self.records.failing = value

    def count(self, name: str, qtype: str) -> int:
        with self.records.lock:
            return self.records.queries[(name.lower(), qtype)]

    def __enter__(self) -> DnsServer:
        self.server.start_thread()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.server.stop()
        self.server.server.server_close()
