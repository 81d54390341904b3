"""The gateway's status page: one self-contained HTML document, served by the admin app at ``{mount}/``.

The page lives in ``admin/static/`` as ``status.html``, ``status.css`` and ``status.js``, edited as the
files they are and read once with ``importlib.resources``; the style and script are put inline into the
document (at ``{{status.css}}`` and ``{{status.js}}``), so the page needs no second request, works
wherever it is mounted (``/_prequal`` or ``/_prequal/``) and its CSP can allow them by hash alone.

The page has no external resources (no CDN, fonts or scripts) and works offline. Its script fetches
``{mount}/backends`` (relative to the page, so ``/_prequal`` and ``/_prequal/`` both work) once a second
and renders it; when a fetch fails it shows an error banner and keeps the last data it had. Every value
from the JSON reaches the DOM through ``textContent`` or ``setAttribute`` (never ``innerHTML``), and the
response carries a Content-Security-Policy that only allows the page's own inline script and style (by
hash) and ``fetch`` to its own origin, so an injected ``onerror=`` handler could not run either.

The JSON contract (``GET {mount}/backends``)::

    {
      "state": "running",                      # the gateway's lifecycle state
      "registry": {                            # null when there is no registry
        "kind": "memory",                      # registry implementation
        "version": 12,                         # membership version
        "stale": false,                        # true: the registry could not be refreshed
        "stale_for_s": null                    # seconds stale, or null
      },
      "pools": [
        {
          "prefix": "/api",                    # the route prefix the pool serves
          "policy": "prequal",                 # policy name
          "in_flight": 3,                      # requests in flight through the pool
          "clients": 1,                        # client connection pools (transports)
          "pool_size": 12,                     # probes pooled now (Prequal only, else null)
          "pool_capacity": 16,                 # probe-pool capacity (Prequal only, else null)
          "rif_threshold": 3.0,                # hot/cold RIF boundary (Prequal only, else null)
          "panic": false,                      # panic mode: choosing over every member
          "selections": {"cold": 10, "hot": 2, "fallback": 1, "panic": 0, "policy": 0},
          "member_count": 1,                   # every member of the pool
          "member_states": {"healthy": 1, "unhealthy": 0, "ejected": 0, "draining": 0},
          "members_offset": 0,                 # the page: members[offset : offset + limit] (limit 100)
          "members": [
            {
              "url": "http://127.0.0.1:8001",  # backend id
              "state": "healthy",              # healthy | unhealthy | ejected | draining
              "probe_mode": "probe",           # probe | local (answers no probes: the gateway's own view)
              "weight": 1.0,
              "rif": 2,                        # last reported requests in flight, or null
              "latency_ms": 12.3,              # latency estimate, or null
              "in_flight": 1,                  # the gateway's requests in flight to it
              "lease_expires_in_s": 8.2,       # registration lease left, or null (static members)
              "ejected_for_s": null,           # ejection time left, or null
              "consecutive_failures": 0,
              "failure_rate": 0.0,             # recent failure rate, 0..1
              "source": "registered",          # where the member came from (registered, static, ...)
              "metadata": {"zone": "a"}        # free-form, from the registration
            }
          ],
          "history": {                         # the last few minutes; null before the first sample
            "window_s": 300, "step_s": 5,
            "age_s": [10.0, 5.0, 0.0],         # each point's age in seconds, oldest first
            "rps": [40.2, 38.0, 41.5],         # requests answered per second over the step
            "p99_ms": [12.0, null, 11.2],      # from the duration histogram's buckets; null: no requests
            "backends": [                      # share of the attempts per point, the busiest by URL,
              {"url": "http://127.0.0.1:8001", "share": [0.5, null, 0.6]},
              {"url": null, "share": [0.5, null, 0.4]}   # the rest as one series ("other")
            ]
          }
        }
      ]
    }

Any numeric field may be null; the page renders null as an em dash. Stable hooks for tests and
scripts: ``#gateway-state``, ``#registry`` (``data-stale``), ``#registry-stale`` (a banner, ``hidden``
when fresh), ``#error-banner`` (``hidden`` when the last fetch succeeded), ``#last-refresh`` (``<time>``),
``#pools``; per pool ``section[data-pool-prefix][data-policy][data-panic]`` with
``[data-selection=<reason>]`` rows (``data-count``, ``data-share``); per member
``tr[data-member-url][data-state][data-probe-mode]`` whose cells carry ``data-field=<json key>``;
per pool ``div.charts[data-points]`` (or ``p.empty[data-field=history]`` before any point) holding
``svg[data-chart=rps|p99|share]`` whose ``path[data-series][data-points]`` are the lines (a backend's
with ``data-series-url`` and its URL as ``<title>``), and the legend ``li[data-series-url]``. The
charts are SVG elements made with ``createElementNS`` (no markup strings), so the CSP holds for them.
"""

from __future__ import annotations

import base64
import hashlib
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response

__all__ = ["STATUS_PAGE_CSP", "STATUS_PAGE_HTML", "status_page"]

_STATIC = files("prequal_middleware.admin").joinpath("static")


def _read(name: str) -> str:
    return _STATIC.joinpath(name).read_text(encoding="utf-8")


def _fill(template: str, marker: str, value: str) -> str:
    # A marker missing or doubled would ship a page without its style or script: fail at import instead.
    if template.count(marker) != 1:
        raise RuntimeError(f"status.html must hold {marker} exactly once")
    return template.replace(marker, value)


_STYLE = _read("status.css")
_SCRIPT = _read("status.js")


def _csp_source(code: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(code.encode()).digest()).decode() + "'"


# The inline blocks are hashed as the browser sees them: from the newline after the opening tag on.
_CSP_DIRECTIVES = [
    "default-src 'none'",
    f"script-src {_csp_source(chr(10) + _SCRIPT)}",
    f"style-src {_csp_source(chr(10) + _STYLE)}",
    "connect-src 'self'",
    "img-src data:",
    "base-uri 'none'",
    "form-action 'none'",
]

STATUS_PAGE_CSP = "; ".join([*_CSP_DIRECTIVES, "frame-ancestors 'none'"])
"""The Content-Security-Policy ``status_page`` sends: only the page's own inline script and style (by hash)."""


def _page() -> str:
    page = _read("status.html")
    fills = (("{{csp}}", "; ".join(_CSP_DIRECTIVES)), ("{{status.css}}", _STYLE), ("{{status.js}}", _SCRIPT))
    for marker, value in fills:
        page = _fill(page, marker, value)
    return page


STATUS_PAGE_HTML = _page()
"""The whole status page: self-contained, no external resources."""

_BODY = STATUS_PAGE_HTML.encode()
_HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": STATUS_PAGE_CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


async def status_page(request: Request) -> Response:
    """Starlette endpoint: the status page as ``text/html; charset=utf-8``, never cached."""
    return Response(_BODY, media_type="text/html; charset=utf-8", headers=_HEADERS)
