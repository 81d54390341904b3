"""The gateway's status page: one self-contained HTML document, served by the admin app at ``{mount}/``.

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
          ]
        }
      ]
    }

Any numeric field may be null; the page renders null as an em dash. Stable hooks for tests and
scripts: ``#gateway-state``, ``#registry`` (``data-stale``), ``#registry-stale`` (a banner, ``hidden``
when fresh), ``#error-banner`` (``hidden`` when the last fetch succeeded), ``#last-refresh`` (``<time>``),
``#pools``; per pool ``section[data-pool-prefix][data-policy][data-panic]`` with
``[data-selection=<reason>]`` rows (``data-count``, ``data-share``); per member
``tr[data-member-url][data-state][data-probe-mode]`` whose cells carry ``data-field=<json key>``.
"""

from __future__ import annotations

import base64
import hashlib

from starlette.requests import Request
from starlette.responses import Response

__all__ = ["STATUS_PAGE_CSP", "STATUS_PAGE_HTML", "status_page"]

_STYLE = """
:root {
  color-scheme: light dark;
  --bg: #f7f8fa; --fg: #1d2330; --muted: #5d6678; --card: #ffffff; --line: #dde1e8; --head: #eef1f5;
  --ok: #1a7f37; --ok-bg: #dcf5e3; --bad: #c62828; --bad-bg: #fde2e1; --warn: #a15c00; --warn-bg: #fff1d6;
  --info: #2a5db0; --info-bg: #dfe9fb; --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #14171c; --fg: #e3e6eb; --muted: #9aa3b2; --card: #1c2027; --line: #2e343e; --head: #232831;
    --ok: #56d37a; --ok-bg: #173823; --bad: #ff7b72; --bad-bg: #42191a; --warn: #f0b455; --warn-bg: #3b2a0e;
    --info: #82aaff; --info-bg: #1b2a46;
  }
}
* { box-sizing: border-box; }
body {
  margin: 0; padding: 1rem 1.5rem 2rem; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
body.registry-stale { border-top: 6px solid var(--bad); }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: .4rem 1.5rem; margin-bottom: .75rem; }
h1 { font-size: 1.35rem; margin: 0; }
h2 { font-size: 1.1rem; margin: 0; }
h3 { font-size: .8rem; margin: .9rem 0 .35rem; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
header p { margin: 0; color: var(--muted); }
.mono, td.url, .prefix { font-family: var(--mono); }
.banner { border-radius: 6px; padding: .6rem .9rem; margin: 0 0 .75rem; font-weight: 600; }
.banner-error { background: var(--bad-bg); color: var(--bad); border: 1px solid var(--bad); }
.banner-stale {
  background: var(--bad); color: #fff; font-size: 1.05rem; text-transform: none; border: 2px solid var(--bad);
}
[hidden] { display: none !important; }
body.fetch-error main { opacity: .6; }
.badge {
  display: inline-block; padding: 0 .45rem; border-radius: 999px; font-size: .8rem; font-weight: 600;
  background: var(--head); color: var(--muted); border: 1px solid var(--line); white-space: nowrap;
}
.badge.fresh, .badge.healthy, .badge.running { background: var(--ok-bg); color: var(--ok); border-color: var(--ok); }
.badge.stale, .badge.unhealthy, .badge.panic-on {
  background: var(--bad-bg); color: var(--bad); border-color: var(--bad);
}
.badge.ejected { background: var(--warn-bg); color: var(--warn); border-color: var(--warn); }
.badge.draining { background: var(--info-bg); color: var(--info); border-color: var(--info); }
.badge.local { background: var(--warn-bg); color: var(--warn); border-color: var(--warn); cursor: help; }
.badge.probe { cursor: help; }
section.pool {
  background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: .8rem 1rem; margin-bottom: 1rem;
}
section.pool[data-panic="true"] { border-color: var(--bad); box-shadow: 0 0 0 2px var(--bad-bg); }
.pool-head { display: flex; flex-wrap: wrap; align-items: center; gap: .5rem; }
.stats { display: flex; flex-wrap: wrap; gap: .5rem 1.75rem; margin: .6rem 0 0; }
.stats div { min-width: 6rem; }
.stats dt { font-size: .75rem; color: var(--muted); }
.stats dd { margin: 0; font-size: 1.05rem; font-weight: 600; font-variant-numeric: tabular-nums; }
.bar {
  display: flex; height: 6px; width: 8rem; margin-top: 3px; border-radius: 3px; overflow: hidden;
  background: var(--head);
}
.bar span { display: block; height: 100%; background: var(--info); }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: var(--head); font-size: .75rem; font-weight: 600; color: var(--muted); }
th[title] { cursor: help; text-decoration: underline dotted; }
th:first-child, td:first-child, td.url, td.text, th.text { text-align: left; }
td.url { max-width: 28rem; overflow: hidden; text-overflow: ellipsis; }
td.text { color: var(--muted); }
td.meta { white-space: normal; min-width: 12rem; max-width: 24rem; overflow-wrap: anywhere; }
table.selections { width: auto; }
table.selections td.share { min-width: 10rem; }
table.selections .bar { width: 6rem; display: inline-flex; vertical-align: middle; margin: 0 0 0 .5rem; }
tr.member td:first-child { border-left: 4px solid transparent; }
tr.member[data-state="healthy"] td:first-child { border-left-color: var(--ok); }
tr.member[data-state="unhealthy"] td:first-child { border-left-color: var(--bad); }
tr.member[data-state="ejected"] td:first-child { border-left-color: var(--warn); }
tr.member[data-state="draining"] td:first-child { border-left-color: var(--info); }
tr.member[data-state="unhealthy"] { background: var(--bad-bg); }
tr.member[data-state="ejected"] { background: var(--warn-bg); }
tr.member[data-state="draining"] { color: var(--muted); }
.empty { color: var(--muted); font-style: italic; }
footer { margin-top: 1.5rem; color: var(--muted); font-size: .85rem; }
footer dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: .4rem 0 0; }
footer dt { font-weight: 600; }
footer dd { margin: 0; }
"""

# ASCII only (non-ASCII characters are written as \\u escapes) so the CSP hash is over plain bytes.
_SCRIPT = r"""
"use strict";
(function () {
  const DASH = "\u2014";
  const INTERVAL_MS = 1000;
  const TIMEOUT_MS = 5000;
  const REASONS = ["cold", "hot", "fallback", "panic", "policy"];
  const REASON_HELP = {
    cold: "Prequal: the cold probe (RIF below the threshold) with the lowest latency",
    hot: "Prequal: every probe was hot, so the one with the lowest RIF",
    fallback: "Prequal: fewer than two usable probes, so the backend with the fewest of this client's " +
      "requests in flight (a uniformly random one with fallback=\"random\", the paper's rule)",
    panic: "Too few healthy backends: chosen over every member",
    policy: "Another policy's ordinary choice",
  };
  const STATE_HELP = {
    healthy: "Receives traffic",
    unhealthy: "Failed active health checks: receives no traffic (except in panic)",
    ejected: "Ejected by outlier detection for a while: receives no traffic (except in panic)",
    draining: "Leaving: no new requests, requests in flight finish",
  };
  const PROBE_HELP = {
    probe: "probe: the backend answers Prequal probes; RIF and latency are what it reports",
    local: "local: the backend answers no probes, so the gateway uses its own view " +
      "(its requests in flight to it and the latencies it measured)",
  };
  const COLUMNS = [
    ["url", "URL", "", "text"],
    ["state", "State", "healthy / unhealthy / ejected / draining", "text"],
    ["probe_mode", "Probe mode", "probe: reported by the backend; local: the gateway's own view", "text"],
    ["rif", "RIF", "Requests in flight, as last reported (or the local view)", ""],
    ["latency_ms", "Latency (ms)", "The latency estimate the policy uses", ""],
    ["in_flight", "In flight", "The gateway's requests in flight to this member", ""],
    ["weight", "Weight", "Relative weight (policies that use weights)", ""],
    ["lease_expires_in_s", "Lease (s)", "Seconds until the registration lease expires (none for static members)", ""],
    ["consecutive_failures", "Fails in a row", "Consecutive failures", ""],
    ["failure_rate", "Failure rate", "Recent failure rate", ""],
    ["source", "Source", "Where the member came from", "text"],
    ["metadata", "Metadata", "From the registration", "text"],
  ];

  function endpoint() {
    const base = new URL(location.href);
    base.search = "";
    base.hash = "";
    if (!base.pathname.endsWith("/")) base.pathname += "/";
    return new URL("backends", base);
  }
  const ENDPOINT = endpoint();

  // Every value reaches the DOM as a Text node or an attribute value: never parsed as HTML.
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
    for (const child of children || []) node.append(child);
    return node;
  }
  function isNum(v) { return typeof v === "number" && Number.isFinite(v); }
  function text(v) { return v === null || v === undefined || v === "" ? DASH : String(v); }
  function fixed(v, digits) { return isNum(v) ? v.toFixed(digits) : DASH; }
  function short(v) { return isNum(v) ? String(Number(v.toFixed(3))) : DASH; }
  function percent(v) { return isNum(v) ? (v * 100).toFixed(1) + "%" : DASH; }
  function clock(date) { return date.toLocaleTimeString([], { hour12: false }); }
  function bar(fraction) {
    const fill = el("span");
    fill.style.width = (isNum(fraction) ? Math.max(0, Math.min(1, fraction)) * 100 : 0) + "%";
    return el("div", { class: "bar", "aria-hidden": "true" }, [fill]);
  }
  function metadataText(meta) {
    if (!meta || typeof meta !== "object") return text(meta);
    const parts = Object.entries(meta).map(
      ([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : String(v)),
    );
    return parts.length ? parts.join(", ") : DASH;
  }

  function stat(label, value, extra, attrs) {
    return el("div", attrs, [el("dt", {}, [label]), el("dd", {}, [value].concat(extra || []))]);
  }

  function renderSelections(selections) {
    const counts = selections && typeof selections === "object" ? selections : {};
    const reasons = REASONS.concat(Object.keys(counts).filter((r) => !REASONS.includes(r)));
    const total = reasons.reduce((sum, r) => sum + (isNum(counts[r]) ? counts[r] : 0), 0);
    const rows = reasons.map((reason) => {
      const count = isNum(counts[reason]) ? counts[reason] : 0;
      const share = total > 0 ? count / total : null;
      const shareAttr = share === null ? "" : share.toFixed(4);
      return el("tr", { "data-selection": reason, "data-count": count, "data-share": shareAttr }, [
        el("td", { title: REASON_HELP[reason] || null }, [reason]),
        el("td", { class: "count" }, [String(count)]),
        el("td", { class: "share" }, [percent(share), bar(share)]),
      ]);
    });
    const head = el("tr", {}, [el("th", {}, ["Reason"]), el("th", {}, ["Count"]), el("th", {}, ["Share"])]);
    const foot = el("tr", { "data-selection-total": total }, [
      el("td", {}, ["total"]), el("td", { class: "count" }, [String(total)]), el("td", {}, [""]),
    ]);
    return el("table", { class: "selections" }, [el("thead", {}, [head]), el("tbody", {}, rows.concat([foot]))]);
  }

  function memberCell(field, member) {
    const value = member[field];
    switch (field) {
      case "url":
        return el("td", { class: "url", title: text(value) }, [text(value)]);
      case "state": {
        const state = text(value);
        const label = state === "ejected" && isNum(member.ejected_for_s)
          ? state + " (" + member.ejected_for_s.toFixed(1) + " s left)" : state;
        const badge = el("span", { class: "badge " + state, title: STATE_HELP[state] || null }, [label]);
        return el("td", { class: "text" }, [badge]);
      }
      case "probe_mode": {
        const mode = text(value);
        const badge = el("span", { class: "badge " + mode, title: PROBE_HELP[mode] || null }, [mode]);
        return el("td", { class: "text" }, [badge]);
      }
      case "latency_ms": return el("td", {}, [fixed(value, 1)]);
      case "lease_expires_in_s": return el("td", {}, [fixed(value, 1)]);
      case "failure_rate": return el("td", {}, [percent(value)]);
      case "rif": case "weight": return el("td", {}, [short(value)]);
      case "metadata": return el("td", { class: "text meta" }, [metadataText(value)]);
      case "source": return el("td", { class: "text" }, [text(value)]);
      default: return el("td", {}, [isNum(value) ? String(value) : text(value)]);
    }
  }

  function renderMembers(members) {
    const list = Array.isArray(members) ? members : [];
    if (!list.length) return el("p", { class: "empty" }, ["No members."]);
    const head = el("tr", {}, COLUMNS.map(
      ([, label, help, cls]) => el("th", { title: help || null, class: cls || null }, [label]),
    ));
    const rows = list.map((m) => {
      const member = m && typeof m === "object" ? m : {};
      const row = el("tr", {
        class: "member",
        "data-member-url": text(member.url),
        "data-state": text(member.state),
        "data-probe-mode": text(member.probe_mode),
      });
      for (const [field] of COLUMNS) {
        const cell = memberCell(field, member);
        cell.setAttribute("data-field", field);
        row.append(cell);
      }
      return row;
    });
    return el("div", { class: "table-wrap" }, [
      el("table", { class: "members" }, [el("thead", {}, [head]), el("tbody", {}, rows)]),
    ]);
  }

  function renderShown(pool) {
    // GET /backends lists a page of members; say so when the pool has more than the page holds.
    const shown = Array.isArray(pool.members) ? pool.members.length : 0;
    const total = isNum(pool.member_count) ? pool.member_count : shown;
    if (total <= shown) return "";
    const first = isNum(pool.members_offset) ? pool.members_offset : 0;
    return el("p", { class: "shown", "data-field": "members-shown" }, [
      "Members " + String(first + 1) + "\u2013" + String(first + shown) + " of " + String(total) +
        " (GET backends?pool=&offset=&limit= for the others)",
    ]);
  }

  function renderPool(p) {
    const pool = p && typeof p === "object" ? p : {};
    const panic = pool.panic === true;
    const size = isNum(pool.pool_size) ? pool.pool_size : null;
    const capacity = isNum(pool.pool_capacity) ? pool.pool_capacity : null;
    const poolText = size === null && capacity === null ? DASH : text(size) + " / " + text(capacity);
    const occupancy = size !== null && capacity !== null && capacity > 0 ? size / capacity : null;
    return el("section", {
      class: "pool",
      "data-pool-prefix": text(pool.prefix),
      "data-policy": text(pool.policy),
      "data-panic": String(panic),
    }, [
      el("div", { class: "pool-head" }, [
        el("h2", { class: "prefix" }, [text(pool.prefix)]),
        el("span", { class: "badge policy", "data-field": "policy", title: "policy" }, [text(pool.policy)]),
        panic ? el("span", { class: "badge panic-on", title: REASON_HELP.panic }, ["PANIC"]) : "",
      ]),
      el("dl", { class: "stats" }, [
        stat("In flight", isNum(pool.in_flight) ? String(pool.in_flight) : DASH, [], { "data-field": "in_flight" }),
        stat("Clients", isNum(pool.clients) ? String(pool.clients) : DASH, [], { "data-field": "clients" }),
        stat("Probe pool", poolText, occupancy === null ? [] : [bar(occupancy)], { "data-field": "pool" }),
        stat("RIF threshold", short(pool.rif_threshold), [], { "data-field": "rif_threshold" }),
        stat("Panic", panic ? "yes" : "no", [], { "data-field": "panic" }),
      ]),
      el("h3", {}, ["Selections"]),
      renderSelections(pool.selections),
      el("h3", {}, ["Members"]),
      renderShown(pool),
      renderMembers(pool.members),
    ]);
  }

  function renderRegistry(reg) {
    const line = document.getElementById("registry");
    const banner = document.getElementById("registry-stale");
    if (!reg || typeof reg !== "object") {
      line.setAttribute("data-stale", "unknown");
      line.replaceChildren("Registry: none reported");
      banner.hidden = true;
      document.body.classList.remove("registry-stale");
      return;
    }
    const stale = reg.stale === true;
    const staleFor = isNum(reg.stale_for_s) ? " for " + reg.stale_for_s.toFixed(1) + " s" : "";
    line.setAttribute("data-stale", String(stale));
    line.replaceChildren(
      "Registry: ", el("span", { class: "mono", "data-field": "kind" }, [text(reg.kind)]),
      " \u00b7 version ", el("span", { class: "mono", "data-field": "version" }, [text(reg.version)]), " ",
      el("span", { class: "badge " + (stale ? "stale" : "fresh") }, [stale ? "STALE" + staleFor : "fresh"]),
    );
    banner.hidden = !stale;
    banner.replaceChildren(stale
      ? "\u26a0 Registry is STALE" + staleFor + ": it could not be refreshed, so the members below may be out of date."
      : "");
    document.body.classList.toggle("registry-stale", stale);
  }

  function render(data) {
    const pools = data.pools.map(renderPool);
    const state = text(data.state);
    const badge = document.getElementById("gateway-state");
    badge.className = "badge " + state;
    badge.setAttribute("data-state", state);
    badge.textContent = state;
    renderRegistry(data.registry);
    const main = document.getElementById("pools");
    if (pools.length) main.replaceChildren(...pools);
    else main.replaceChildren(el("p", { class: "empty" }, ["No pools configured."]));
  }

  let lastGood = null;
  function showRefreshed(now) {
    const time = document.getElementById("last-refresh");
    time.setAttribute("datetime", now.toISOString());
    time.textContent = clock(now);
  }
  function showError(message) {
    const banner = document.getElementById("error-banner");
    document.body.classList.toggle("fetch-error", message !== null);
    document.body.setAttribute("data-fetch", message === null ? "ok" : "error");
    if (message === null) {
      banner.hidden = true;
      banner.textContent = "";
      return;
    }
    const kept = lastGood === null
      ? " No data yet."
      : " Showing data from " + clock(lastGood) + " (" + Math.round((Date.now() - lastGood) / 1000) + " s ago).";
    banner.textContent = "Cannot load " + ENDPOINT.pathname + ": " + message + "." + kept;
    banner.hidden = false;
  }

  async function refresh() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    try {
      const response = await fetch(ENDPOINT, {
        cache: "no-store", headers: { Accept: "application/json" }, signal: controller.signal,
      });
      if (!response.ok) {
        throw new Error("HTTP " + response.status + (response.statusText ? " " + response.statusText : ""));
      }
      const data = await response.json();
      if (!data || typeof data !== "object" || !Array.isArray(data.pools)) {
        throw new Error("unexpected response (no pools)");
      }
      render(data);
      lastGood = new Date();
      showRefreshed(lastGood);
      showError(null);
    } catch (err) {
      const aborted = err && err.name === "AbortError";
      showError(aborted ? "timed out after " + TIMEOUT_MS / 1000 + " s" : String((err && err.message) || err));
    } finally {
      clearTimeout(timer);
      setTimeout(refresh, INTERVAL_MS);
    }
  }

  document.getElementById("endpoint").textContent = ENDPOINT.pathname;
  refresh();
})();
"""


def _csp_source(code: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(code.encode()).digest()).decode() + "'"


_CSP_DIRECTIVES = [
    "default-src 'none'",
    f"script-src {_csp_source(_SCRIPT)}",
    f"style-src {_csp_source(_STYLE)}",
    "connect-src 'self'",
    "img-src data:",
    "base-uri 'none'",
    "form-action 'none'",
]

STATUS_PAGE_CSP = "; ".join([*_CSP_DIRECTIVES, "frame-ancestors 'none'"])
"""The Content-Security-Policy ``status_page`` sends: only the page's own inline script and style (by hash)."""

STATUS_PAGE_HTML = (
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<meta http-equiv="Content-Security-Policy" content=\""""
    + "; ".join(_CSP_DIRECTIVES)
    + """\">
<title>Prequal gateway status</title>
<link rel="icon" href="data:,">
<style>"""
    + _STYLE
    + """</style>
</head>
<body data-fetch="pending">
<header>
  <h1>Prequal gateway <span id="gateway-state" class="badge" data-state="unknown">&hellip;</span></h1>
  <p id="registry" data-stale="unknown">Registry: &hellip;</p>
  <p>Last refresh: <time id="last-refresh">never</time></p>
</header>
<div id="registry-stale" class="banner banner-stale" role="alert" hidden></div>
<div id="error-banner" class="banner banner-error" role="alert" hidden></div>
<main id="pools"><p class="empty">Loading&hellip;</p></main>
<footer id="legend">
  <h3>Legend</h3>
  <dl>
    <dt>healthy</dt><dd>receives traffic</dd>
    <dt>unhealthy</dt><dd>failed active health checks; no traffic except in panic mode</dd>
    <dt>ejected</dt><dd>ejected for a while by outlier detection (too many failures);
      no traffic except in panic mode</dd>
    <dt>draining</dt><dd>leaving: no new requests, requests in flight finish</dd>
    <dt>probe</dt><dd>the backend answers Prequal probes; RIF and latency are what it reports</dd>
    <dt>local</dt><dd>the backend answers no probes; the gateway uses its own view
      (its requests in flight to it and the latencies it measured)</dd>
    <dt>cold / hot</dt><dd>Prequal chose the lowest-latency cold probe / every probe was hot, so the lowest RIF</dd>
    <dt>fallback</dt><dd>fewer than two usable probes, so the backend with the fewest of this client's requests
      in flight (a uniformly random one with <code>fallback="random"</code>, the paper's rule)</dd>
    <dt>panic</dt><dd>too few healthy backends, so the choice was made over every member</dd>
    <dt>policy</dt><dd>a non-Prequal policy's ordinary choice</dd>
    <dt>&mdash;</dt><dd>no value (no probe pool for this policy, no lease for static members, no report yet)</dd>
  </dl>
  <p>Data: <span id="endpoint" class="mono">backends</span>, refreshed every second.</p>
</footer>
<script>"""
    + _SCRIPT
    + """</script>
</body>
</html>
"""
)
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
