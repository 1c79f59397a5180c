// The live dashboard: sign in once, then render the snapshots the gateway streams.
// The key lives in sessionStorage and travels only in the X-API-Key header, never in a URL.
// Everything shown is set with textContent (backend names and errors come from outside).
"use strict";

(() => {
  const STORE = "multiverse.dashboard.key";
  const API = "dashboard/api/";
  const SVG = "http://www.w3.org/2000/svg";
  const SHAPES = { healthy: "●", degraded: "▲", down: "■", unknown: "◆" };
  const $ = (id) => document.getElementById(id);
  let stream = null; // the AbortController of the open stream
  let retry = 1000;
  let clockSkew = 0; // server time minus browser time, seconds

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "class") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    return node;
  }

  function ago(epoch) {
    const seconds = Math.max(0, Date.now() / 1000 + clockSkew - epoch);
    if (seconds < 60) return `${Math.round(seconds)} s ago`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
    return `${Math.round(seconds / 86400)} days ago`;
  }

  function ms(value) {
    if (value === null || value === undefined) return "–";
    return value < 1000 ? `${Math.round(value)} ms` : `${(value / 1000).toFixed(1)} s`;
  }

  function badge(level, text) {
    return el("span", { class: `badge ${level}` }, `${SHAPES[level] || "◆"} ${text || level}`);
  }

  function setConnection(state, text) {
    const node = $("connection");
    node.className = `connection ${state}`;
    node.textContent = `${SHAPES[state === "ok" ? "healthy" : state === "wait" ? "degraded" : "down"]} ${text}`;
  }

  // -- signing in and out ---------------------------------------------------------------

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) { /* not JSON */ }
    return `HTTP ${response.status}`;
  }

  function showLogin(message) {
    if (stream) stream.abort();
    stream = null;
    sessionStorage.removeItem(STORE);
    $("board").hidden = true;
    $("signout").hidden = true;
    $("who").textContent = "";
    $("login").hidden = false;
    const error = $("login-error");
    error.hidden = !message;
    error.textContent = message ? `Sign-in failed: ${message}` : "";
    setConnection("down", "not connected");
    $("key").focus();
  }

  async function signIn(key) {
    setConnection("wait", "signing in…");
    let response;
    try {
      response = await fetch(API + "snapshot", { headers: { "X-API-Key": key }, cache: "no-store" });
    } catch (exc) {
      showLogin(`the gateway cannot be reached (${exc.message})`);
      return;
    }
    if (!response.ok) {
      showLogin(await errorText(response));
      return;
    }
    sessionStorage.setItem(STORE, key);
    $("login").hidden = true;
    $("board").hidden = false;
    $("signout").hidden = false;
    render(await response.json());
    listen(key);
  }

  // -- the live stream: fetch() with the key in a header, read as server-sent events --------

  async function listen(key) {
    const controller = new AbortController();
    stream = controller;
    try {
      const response = await fetch(API + "events", {
        headers: { "X-API-Key": key, Accept: "text/event-stream" },
        cache: "no-store",
        signal: controller.signal,
      });
      if (response.status === 401 || response.status === 403) {
        showLogin(await errorText(response));
        return;
      }
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      setConnection("ok", "live");
      retry = 1000;
      await readEvents(response.body, (event, data) => {
        if (event === "snapshot") render(JSON.parse(data));
      });
      setConnection("wait", "reconnecting…");
    } catch (exc) {
      if (controller.signal.aborted) return;
      setConnection("down", `connection lost: retrying in ${Math.round(retry / 1000)} s`);
      retry = Math.min(retry * 2, 8000);
    }
    if (stream === controller) setTimeout(() => stream === controller && listen(key), retry);
  }

  async function readEvents(body, onEvent) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) onEvent(event, data.join("\n"));
      }
    }
  }

  // -- rendering --------------------------------------------------------------------------

  function render(snap) {
    clockSkew = snap.now - Date.now() / 1000;
    const s = snap.summary;
    const t = snap.traffic;
    $("who").textContent = `signed in as ${snap.caller.name} (${snap.caller.role})`;
    $("rps").textContent = t.rps_10s.toFixed(1);
    $("errors").textContent = `${(t.error_rate_1m * 100).toFixed(0)}%`;
    $("errors").parentElement.className = `tile ${t.failed_1m ? "alert" : ""}`;
    $("inflight").textContent = `${s.in_flight} · ${s.queued}`;
    $("up").textContent = `${s.healthy} / ${s.backends}`;
    $("up").parentElement.className = `tile ${s.down ? "alert" : ""}`;
    $("traffic-window").textContent = `last ${Math.round(t.window_seconds / 60)} min`;
    $("backends").replaceChildren(...(snap.backends.length ? snap.backends.map(backendCard)
      : [el("p", { class: "empty" }, "No backends yet: register one with POST /admin/register.")]));
    $("traffic").replaceChildren(trafficChart(t));
    $("top-models").replaceChildren(...topRows(snap.top.models, (row) => `${row.requests} req`));
    $("top-keys").replaceChildren(...topRows(snap.top.keys,
      (row) => `${row.requests} req${row.tokens ? ` · ${row.tokens} tok` : ""}`));
    $("failures").replaceChildren(...(snap.failures.length ? snap.failures.map(failure)
      : [el("li", { class: "empty" }, "No failed requests. ")]));
  }

  function backendCard(b) {
    const circuits = Object.entries(b.circuits || {});
    const limit = b.max_concurrency === null ? "" : ` / ${b.max_concurrency}`;
    return el("article", { class: `backend ${b.level}`, "data-backend": b.name, "data-level": b.level },
      el("header", {}, el("h3", {}, b.name), badge(b.level)),
      el("p", { class: "why" }, `${b.why} · since ${ago(b.since)}`),
      el("p", { class: "owner" }, b.owner ? `owner: ${b.owner}` : "owner: –"),
      el("p", { class: "models" }, ...b.models.map((m) => el("span", { class: "chip" }, m))),
      el("div", { class: "numbers" },
        el("span", {}, el("b", {}, `${b.in_flight}${limit}`), " in flight"),
        el("span", {}, el("b", {}, String(b.queued)), " queued"),
        el("span", {}, el("b", {}, String(b.served)), " served"),
        el("span", { class: b.failed ? "bad" : "" }, el("b", {}, String(b.failed)), " failed")),
      el("div", { class: "spark-row" }, sparkline(b.latency_ms),
        el("span", { class: "latest" }, b.latency_ms.length ? `${ms(b.latency_ms[b.latency_ms.length - 1])} to first byte` : "no answers yet")),
      circuits.length ? el("p", { class: "circuits" }, "circuit: ",
        ...circuits.map(([endpoint, state]) => el("span", { class: `circuit ${state}` },
          `${state === "closed" ? "●" : state === "open" ? "■" : "▲"} ${endpoint} ${state.replace("_", "-")}`))) : null);
  }

  function sparkline(points) {
    const width = 220, height = 44;
    const chart = svg("svg", { class: "spark", viewBox: `0 0 ${width} ${height}`, role: "img",
      "aria-label": "latency to first byte, recent answers" });
    if (points.length < 2) return chart;
    const top = Math.max(...points) || 1;
    const step = width / (points.length - 1);
    const coords = points.map((p, i) => `${(i * step).toFixed(1)},${(height - 3 - (p / top) * (height - 6)).toFixed(1)}`);
    chart.append(svg("polyline", { points: coords.join(" "), fill: "none", "stroke-width": 3 }));
    return chart;
  }

  function trafficChart(t) {
    const width = 600, height = 160;
    const chart = svg("svg", { class: "traffic", viewBox: `0 0 ${width} ${height}`, role: "img",
      "aria-label": "requests per second over the window" });
    const rows = t.requests_per_second;
    const top = Math.max(1, ...rows);
    const bar = width / rows.length;
    rows.forEach((value, i) => {
      const failed = t.failed_per_second[i];
      const h = (value / top) * (height - 32);
      const hf = (failed / top) * (height - 32);
      chart.append(svg("rect", { class: "ok", x: i * bar + 1, y: height - h, width: bar - 2, height: Math.max(0, h - hf) }));
      chart.append(svg("rect", { class: "bad", x: i * bar + 1, y: height - hf, width: bar - 2, height: hf }));
    });
    const labels = [[4, 22, "start", `−${Math.round(t.window_seconds / 60)} min`],
      [width / 2, 22, "middle", `peak ${top.toFixed(1)} req/s`], [width - 4, 22, "end", "now"]];
    for (const [x, y, anchor, text] of labels) {
      const label = svg("text", { x, y, "text-anchor": anchor, class: "axis" });
      label.textContent = text;
      chart.append(label);
    }
    return chart;
  }

  function topRows(rows, describe) {
    if (!rows.length) return [el("li", { class: "empty" }, "nothing yet")];
    const most = rows[0].requests || 1;
    return rows.map((row) => {
      const bar = el("span", { class: "bar" });
      bar.style.width = `${Math.round((row.requests / most) * 100)}%`; // CSSOM: allowed by the page's CSP
      return el("li", {}, el("span", { class: "name" }, row.name), el("span", { class: "count" }, describe(row)), bar);
    });
  }

  function failure(f) {
    const story = f.attempts.length ? f.attempts.map((a, i) => el("li", { class: `attempt ${a.outcome}` },
      `${i + 1}. ${a.backend}: ${a.outcome}${a.status ? ` (HTTP ${a.status})` : ""}`,
      a.reason ? ` — ${a.reason}` : "", ` · ${ms(a.ms)}`)) : [el("li", { class: "attempt" }, "no backend was tried")];
    return el("li", { class: "failure" },
      el("div", { class: "headline" },
        el("span", { class: "status" }, `■ ${f.status || "—"}`),
        el("span", { class: "model" }, f.model),
        el("span", { class: "key" }, `key: ${f.key}`),
        el("span", { class: "when" }, ago(f.at))),
      el("p", { class: "error" }, f.error),
      el("ol", { class: "story" }, ...story),
      el("p", { class: "rid" }, `request ${f.request_id} · ${ms(f.latency_ms)}`));
  }

  // -- start ------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("key");
      const key = input.value.trim();
      input.value = "";
      if (key) signIn(key);
    });
    $("signout").addEventListener("click", () => showLogin(""));
    const saved = sessionStorage.getItem(STORE);
    if (saved) signIn(saved);
    else showLogin("");
  });
})();
