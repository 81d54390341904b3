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

  // The routes that lead to a pool, when they say more than its name (a pool named by its one prefix).
  function routesOf(pool) {
    const routes = Array.isArray(pool.routes) ? pool.routes.filter((r) => typeof r === "string") : [];
    if (routes.length === 0 || (routes.length === 1 && routes[0] === pool.name)) return "";
    return el("span", { class: "badge routes", "data-field": "routes", title: "routes" }, [routes.join(" ")]);
  }

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

  // --- history charts: inline SVG built node by node (no library, no markup strings) ----------------

  const SVG_NS = "http://www.w3.org/2000/svg";
  const CHART_W = 320;
  const CHART_H = 90;
  const CHART_PAD = 4;
  function svg(tag, attrs, children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
    for (const child of children || []) node.append(child);
    return node;
  }
  function numbers(list) { return Array.isArray(list) ? list.map((v) => (isNum(v) ? v : null)) : []; }

  // One line per series; x by age (now at the right edge), y from 0 to `top`. A null value breaks the line.
  function pathOf(ages, values, windowS, top) {
    let d = "";
    let pen = "M";
    let count = 0;
    values.forEach((v, i) => {
      const age = ages[i];
      if (v === null || age === null) { pen = "M"; return; }
      const x = CHART_W - CHART_PAD - Math.max(0, Math.min(1, age / windowS)) * (CHART_W - 2 * CHART_PAD);
      const y = CHART_H - CHART_PAD - (top > 0 ? Math.min(1, v / top) : 0) * (CHART_H - 2 * CHART_PAD);
      d += pen + x.toFixed(1) + " " + y.toFixed(1) + " ";
      pen = "L";
      count += 1;
    });
    return { d: d.trim(), count: count };
  }

  function chart(kind, title, ages, windowS, series, top, topLabel) {
    const lines = series.map((s, i) => {
      const { d, count } = pathOf(ages, s.values, windowS, top);
      return svg("path", {
        class: "line " + s.cls, d: d || null, "data-series": s.key, "data-series-url": s.url, "data-points": count,
      }, [svg("title", {}, [s.label])]);
    });
    const frame = svg("svg", {
      class: "chart-svg", viewBox: "0 0 " + CHART_W + " " + CHART_H, width: CHART_W, height: CHART_H,
      role: "img", "aria-label": title, "data-chart": kind,
    }, [
      svg("rect", { class: "chart-frame", x: 0.5, y: 0.5, width: CHART_W - 1, height: CHART_H - 1 }),
      svg("text", { class: "chart-top", x: CHART_PAD + 2, y: 12 }, [topLabel]),
      svg("text", { class: "chart-top", x: CHART_PAD + 2, y: CHART_H - 6 }, ["\u2212" + spanText(windowS)]),
      svg("text", { class: "chart-top", x: CHART_W - CHART_PAD - 2, y: CHART_H - 6, "text-anchor": "end" }, ["now"]),
    ].concat(lines));
    return el("figure", { class: "chart", "data-chart": kind }, [el("figcaption", {}, [title]), frame]);
  }

  function spanText(seconds) {
    return seconds >= 120 ? Math.round(seconds / 60) + " min" : Math.round(seconds) + " s";
  }

  function lastOf(values) {
    for (let i = values.length - 1; i >= 0; i -= 1) if (values[i] !== null) return values[i];
    return null;
  }

  function renderHistory(h) {
    const history = h && typeof h === "object" ? h : {};
    const ages = numbers(history.age_s);
    if (!ages.length) return el("p", { class: "empty", "data-field": "history" }, ["No history yet."]);
    const windowS = isNum(history.window_s) && history.window_s > 0 ? history.window_s : Math.max(1, ...ages);
    const rps = numbers(history.rps);
    const p99 = numbers(history.p99_ms);
    const rpsTop = Math.max(0, ...rps.filter((v) => v !== null));
    const p99Top = Math.max(0, ...p99.filter((v) => v !== null));
    const backends = Array.isArray(history.backends) ? history.backends.filter((b) => b && typeof b === "object") : [];
    const shares = backends.map((b, i) => {
      const other = b.url === null || b.url === undefined;
      return {
        key: other ? "other" : "backend", url: other ? null : String(b.url), values: numbers(b.share),
        label: other ? "other backends" : String(b.url), cls: other ? "series-other" : "series-" + (i % 6),
      };
    });
    const legend = el("ul", { class: "chart-legend" }, shares.map((s) => el("li", {
      "data-series": s.key, "data-series-url": s.url,
    }, [
      el("span", { class: "swatch " + s.cls, "aria-hidden": "true" }),
      el("span", { class: s.url === null ? "" : "mono" }, [s.label]),
      " " + percent(lastOf(s.values)),
    ])));
    return el("div", { class: "charts", "data-field": "history", "data-points": ages.length }, [
      chart("rps", "Requests per second (now " + short(lastOf(rps)) + ")", ages, windowS,
        [{ key: "rps", url: null, values: rps, label: "requests per second", cls: "series-0" }],
        rpsTop, short(rpsTop)),
      chart("p99", "p99 latency, ms (now " + fixed(lastOf(p99), 1) + ")", ages, windowS,
        [{ key: "p99", url: null, values: p99, label: "p99 latency (ms)", cls: "series-1" }],
        p99Top, fixed(p99Top, 1)),
      el("div", { class: "share-chart" }, [
        chart("share", "Share of requests by backend", ages, windowS, shares, 1, "100%"),
        legend,
      ]),
      el("p", { class: "chart-note" }, ["Last " + spanText(windowS) + ", one point per " + short(history.step_s) + " s; " +
        "p99 from the duration histogram's buckets."]),
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
      "data-pool-name": text(pool.name === undefined ? pool.prefix : pool.name),
      "data-policy": text(pool.policy),
      "data-panic": String(panic),
    }, [
      el("div", { class: "pool-head" }, [
        el("h2", { class: "prefix" }, [text(pool.name === undefined ? pool.prefix : pool.name)]),
        routesOf(pool),
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
      el("h3", {}, ["History"]),
      renderHistory(pool.history),
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
