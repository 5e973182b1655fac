// edgefleet dashboard: a small hash-routed page over the /api/v1 JSON routes.
//
// Safety rule: nothing here assigns HTML. Every element is built with h(),
// which turns strings into text nodes, so a device that reports
// "<script>..." as an event message or a tag shows exactly that text.
// The token lives in sessionStorage (gone with the tab); a 401 from any call
// drops it and returns to the sign-in form.
"use strict";

const TOKEN_KEY = "edgefleet.token";
const POLL_MS = 2500;
const SVG_NS = "http://www.w3.org/2000/svg";

const state = { me: null, refresh: null, timer: null, busy: false, route: "" };

// ----------------------------------------------------------------- DOM helpers
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

const $ = (id) => document.getElementById(id);

// ----------------------------------------------------------------- formatting
function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toLocaleString();
}

function ago(iso) {
  if (!iso) return "never";
  const sec = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
  if (sec < 60) return `${Math.round(sec)} s ago`;
  if (sec < 3600) return `${Math.round(sec / 60)} min ago`;
  if (sec < 86400) return `${Math.round(sec / 3600)} h ago`;
  return `${Math.round(sec / 86400)} d ago`;
}

function num(v, digits = 2) {
  return v === null || v === undefined ? "–" : Number(v).toFixed(digits);
}

function bytes(v) {
  if (v === null || v === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let x = Number(v), i = 0;
  while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
  return `${x.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function pill(text, cls) {
  return h("span", { class: `pill ${cls || text || ""}` }, text || "–");
}

function versionOf(d) {
  return d.active ? `${d.active.model}@${d.active.version}` : null;
}

function deviceStatus(d) {
  if (d.state === "failed" || d.last_error) return "failed";
  return d.online ? "online" : "offline";
}

function link(href, text) {
  return h("a", { href }, text);
}

function enc(v) {
  return encodeURIComponent(v);
}

// ----------------------------------------------------------------- API
class SignedOut extends Error {}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) throw new SignedOut("no token");
  const headers = { Accept: "application/json", Authorization: `Bearer ${token}` };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    cache: "no-store",
  });
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    throw new SignedOut("the token was refused");
  }
  const payload = await response.json().catch(() => null);
  if (!response.ok) {
    const msg = payload && payload.error ? `${payload.error.code}: ${payload.error.message}` : `HTTP ${response.status}`;
    throw new Error(msg);
  }
  return payload;
}

// Every device, following the route's `next` cursor (1000 a page, up to 20 pages).
async function allDevices() {
  let out = [], after = null;
  for (let page = 0; page < 20; page++) {
    const q = after === null ? "" : `?after=${enc(after)}`;
    const reply = await api(`/api/v1/devices${q}`);
    out = out.concat(reply.devices);
    if (!reply.next) break;
    after = reply.next;
  }
  return out;
}

function canOperate() {
  return state.me && (state.me.role === "operator" || state.me.role === "admin");
}

// ----------------------------------------------------------------- charts (inline SVG)
// lineChart: series = [{name, cls: "s1".."s4", points: [[Date, number|null], ...]}]
function lineChart(title, series, unit, fmt = (v) => num(v, 2)) {
  const W = 520, H = 180, L = 48, R = 8, T = 10, B = 24;
  const all = series.flatMap((x) => x.points.filter((p) => p[1] !== null && p[1] !== undefined));
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  const box = h("div", { class: "card chart-card", "data-chart": title }, h("h2", {}, title), svg);
  if (!all.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet"));
    return box;
  }
  const xs = all.map((p) => p[0].getTime());
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x1 === x0) { x0 -= 30000; x1 += 30000; }
  let y1 = Math.max(...all.map((p) => p[1]));
  const y0 = 0;
  if (y1 <= y0) y1 = y0 + 1;
  y1 *= 1.1;
  const X = (t) => L + ((t - x0) / (x1 - x0)) * (W - L - R);
  const Y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  svg.append(
    s("line", { class: "axis", x1: L, y1: Y(y0), x2: W - R, y2: Y(y0) }),
    s("line", { class: "axis", x1: L, y1: T, x2: L, y2: Y(y0) }),
    s("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, fmt(y1)),
    s("text", { x: L - 4, y: Y(y0), "text-anchor": "end" }, fmt(y0)),
    s("text", { x: L, y: H - 6 }, new Date(x0).toLocaleTimeString()),
    s("text", { x: W - R, y: H - 6, "text-anchor": "end" }, new Date(x1).toLocaleTimeString()),
  );
  for (const line of series) {
    const pts = line.points.filter((p) => p[1] !== null && p[1] !== undefined);
    if (!pts.length) continue;
    const d = pts.map((p, i) => `${i ? "L" : "M"}${X(p[0].getTime()).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    svg.append(s("path", { class: line.cls, d }));
    if (pts.length === 1) {
      const [p] = pts;
      svg.append(s("circle", { class: line.cls, cx: X(p[0].getTime()), cy: Y(p[1]), r: 3 }));
    }
  }
  box.append(
    h("div", { class: "legend" },
      series.map((x) => h("span", {}, h("span", { class: `sw ${x.cls}` }), `${x.name}${unit ? ` (${unit})` : ""}`))),
  );
  return box;
}

// barChart: bars = [{label, value, cls}]
function barChart(title, bars, fmt) {
  const rowH = 24, L = 170, R = 90, W = 560;
  const H = Math.max(1, bars.length) * rowH + 8;
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  const known = bars.filter((b) => b.value !== null && b.value !== undefined);
  const max = Math.max(1e-12, ...known.map((b) => b.value));
  bars.forEach((b, i) => {
    const y = 4 + i * rowH;
    const label = b.label.length > 22 ? `${b.label.slice(0, 21)}…` : b.label;
    svg.append(s("text", { x: L - 6, y: y + 14, "text-anchor": "end" }, label));
    if (b.value === null || b.value === undefined) {
      svg.append(s("text", { x: L, y: y + 14 }, "not measured"));
      return;
    }
    const w = Math.max(1, (b.value / max) * (W - L - R));
    svg.append(
      s("rect", { class: b.cls, x: L, y: y + 3, width: w.toFixed(1), height: rowH - 8, rx: 2 }, s("title", {}, `${b.label}: ${fmt(b.value)}`)),
      s("text", { x: L + w + 4, y: y + 14 }, fmt(b.value)),
    );
  });
  return h("div", { class: "card chart-card", "data-chart": title }, h("h2", {}, title), svg);
}

// progressBar: parts = [{cls, n}]
function progressBar(parts, total) {
  const W = 300, H = 12;
  const svg = s("svg", { class: "chart progress-bar", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  svg.append(s("rect", { x: 0, y: 0, width: W, height: H, rx: 6, fill: "#eaeef2" }));
  let x = 0;
  const colors = { updated: "#1a7f37", active: "#d4a72c", failed: "#cf222e" };
  for (const p of parts) {
    if (!total || !p.n) continue;
    const w = (p.n / total) * W;
    svg.append(s("rect", { x: x.toFixed(1), y: 0, width: w.toFixed(1), height: H, fill: colors[p.cls] }));
    x += w;
  }
  return svg;
}

// ----------------------------------------------------------------- pages
// Each page builds its frame once and returns refresh(), which the poller
// calls every POLL_MS to redraw only the data parts (inputs keep focus).

function table(headers, rows, attrs = {}) {
  return h("div", { class: "table-wrap" },
    h("table", attrs, h("thead", {}, h("tr", {}, headers)), h("tbody", {}, rows)));
}

function pageOverview(root) {
  const body = h("div", { id: "overview" });
  root.append(h("h1", {}, "Fleet overview"), body);
  return async () => {
    const [fleet, devices, rolls] = await Promise.all([
      api("/api/v1/fleet"),
      allDevices(),
      api("/api/v1/rollouts"),
    ]);
    const failing = devices.filter((d) => deviceStatus(d) === "failed");
    const perProfile = {};
    for (const d of devices) {
      const p = d.profile || "(unmatched)";
      const v = versionOf(d) || "(nothing)";
      perProfile[p] = perProfile[p] || {};
      perProfile[p][v] = (perProfile[p][v] || 0) + 1;
    }
    const open = rolls.rollouts.filter((r) => ["created", "running", "paused"].includes(r.status));
    const stat = (n, l, id) => h("div", { class: "stat", "data-stat": id }, h("div", { class: "n" }, n), h("div", { class: "l" }, l));
    replace(body,
      h("div", { class: "stats" },
        stat(fleet.devices, "devices", "devices"),
        stat(fleet.online, "online", "online"),
        stat(fleet.offline, "offline", "offline"),
        stat(fleet.failed, "failing", "failed"),
        stat(open.length, "open rollouts", "rollouts"),
        stat(fleet.inferences, "inferences", "inferences"),
      ),
      h("div", { class: "grid" },
        h("section", { class: "card", id: "versions" },
          h("h2", {}, "Versions per profile"),
          table([h("th", {}, "profile"), h("th", {}, "running"), h("th", {}, "devices")],
            Object.entries(perProfile).sort().flatMap(([p, vs]) =>
              Object.entries(vs).sort().map(([v, n]) => h("tr", {}, h("td", {}, p), h("td", {}, v), h("td", {}, n)))))),
        h("section", { class: "card", id: "failing" },
          h("h2", {}, `Failing devices (${failing.length})`),
          failing.length
            ? table([h("th", {}, "device"), h("th", {}, "error")],
              failing.map((d) => h("tr", {},
                h("td", {}, link(`#/device/${enc(d.id)}`, d.id)),
                h("td", {}, d.last_error ? `${d.last_error.code}: ${d.last_error.message}` : d.state))))
            : h("p", { class: "muted" }, "none")),
        h("section", { class: "card", id: "open-rollouts" },
          h("h2", {}, `Open rollouts (${open.length})`),
          open.length
            ? table([h("th", {}, "rollout"), h("th", {}, "model"), h("th", {}, "status")],
              open.map((r) => h("tr", {},
                h("td", {}, link(`#/rollout/${enc(r.id)}`, r.id)),
                h("td", {}, `${r.model}@${r.version}`),
                h("td", {}, pill(r.status)))))
            : h("p", { class: "muted" }, "none")),
      ),
      h("section", { class: "card", id: "all-devices" },
        h("h2", {}, "Devices"),
        h("p", { class: "chips" }, devices.map((d) => h("span", { class: "chip" }, link(`#/device/${enc(d.id)}`, d.id), " ", pill(deviceStatus(d)))))),
    );
  };
}

const DEVICE_COLUMNS = [
  ["id", "device", (d) => d.id],
  ["status", "status", (d) => deviceStatus(d)],
  ["profile", "profile", (d) => d.profile || ""],
  ["version", "running", (d) => versionOf(d) || ""],
  ["state", "agent state", (d) => d.state || ""],
  ["p50", "p50 ms", (d) => (d.p50_ms === null || d.p50_ms === undefined ? -1 : d.p50_ms)],
  ["seen", "last seen", (d) => d.last_seen || ""],
];

function pageDevices(root) {
  const sort = { key: "id", dir: 1 };
  const search = h("input", { type: "search", id: "device-search", placeholder: "search id, tag, version…", "aria-label": "search" });
  const status = h("select", { id: "device-status", "aria-label": "status" },
    ["", "online", "offline", "failed", "idle", "downloading", "installing"].map((v) => h("option", { value: v }, v || "any status")));
  const profile = h("select", { id: "device-profile", "aria-label": "profile" }, h("option", { value: "" }, "any profile"));
  const tag = h("select", { id: "device-tag", "aria-label": "tag" }, h("option", { value: "" }, "any tag"));
  const body = h("div", { id: "devices" });
  let last = [];
  const draw = () => {
    const q = search.value.trim().toLowerCase();
    const col = DEVICE_COLUMNS.find((c) => c[0] === sort.key);
    const rows = last
      .filter((d) => !status.value || deviceStatus(d) === status.value || d.state === status.value || (status.value === "online" && d.online) || (status.value === "offline" && !d.online))
      .filter((d) => !profile.value || d.profile === profile.value)
      .filter((d) => !tag.value || d.tags.includes(tag.value))
      .filter((d) => !q || [d.id, d.profile, versionOf(d), d.state, ...d.tags].some((x) => x && String(x).toLowerCase().includes(q)))
      .sort((a, b) => {
        const x = col[2](a), y = col[2](b);
        return (x < y ? -1 : x > y ? 1 : 0) * sort.dir;
      });
    replace(body,
      h("p", { class: "muted", id: "device-count" }, `${rows.length} of ${last.length} devices`),
      table(
        DEVICE_COLUMNS.map(([key, label]) => h("th", {
          class: `sortable${["state", "seen"].includes(key) ? " hide-narrow" : ""}`,
          "data-sort": key,
          onclick: () => { sort.dir = sort.key === key ? -sort.dir : 1; sort.key = key; draw(); },
        }, label, sort.key === key ? (sort.dir > 0 ? " ▲" : " ▼") : "")).concat([h("th", { class: "hide-narrow" }, "tags")]),
        rows.map((d) => h("tr", { "data-device": d.id },
          h("td", {}, link(`#/device/${enc(d.id)}`, d.id)),
          h("td", {}, pill(deviceStatus(d))),
          h("td", {}, d.profile || "–"),
          h("td", {}, versionOf(d) || "–"),
          h("td", { class: "hide-narrow" }, d.state || "–"),
          h("td", {}, num(d.p50_ms, 3)),
          h("td", { class: "hide-narrow" }, ago(d.last_seen)),
          h("td", { class: "hide-narrow" }, d.tags.map((t) => h("span", { class: "tag" }, t))),
        )),
        { id: "device-table" },
      ));
  };
  const fillSelect = (sel, values) => {
    const want = ["", ...values];
    const have = [...sel.options].map((o) => o.value);
    if (want.join("\u0000") === have.join("\u0000")) return;
    const keep = sel.value;
    replace(sel, want.map((v) => h("option", { value: v }, v || sel.options[0].textContent)));
    sel.value = want.includes(keep) ? keep : "";
  };
  for (const el of [search, status, profile, tag]) el.addEventListener("input", draw);
  root.append(h("h1", {}, "Devices"), h("div", { class: "filters" }, search, status, profile, tag), body);
  return async () => {
    last = await allDevices();
    fillSelect(profile, [...new Set(last.map((d) => d.profile).filter(Boolean))].sort());
    fillSelect(tag, [...new Set(last.flatMap((d) => d.tags))].sort());
    draw();
  };
}

function pageDevice(root, id) {
  const head = h("div", { id: "device-head" });
  const charts = h("div", { class: "charts", id: "device-charts" });
  const events = h("ul", { class: "timeline", id: "events" });
  root.append(h("h1", {}, "Device ", h("code", {}, id)), head, charts,
    h("section", { class: "card" }, h("h2", {}, "Event timeline"), events));
  return async () => {
    const [d, lat] = await Promise.all([
      api(`/api/v1/devices/${enc(id)}?events=100&minutes=120`),
      api(`/api/v1/dashboard/devices/${enc(id)}/latency?minutes=120`),
    ]);
    replace(head, h("section", { class: "card" },
      h("dl", { class: "kv" },
        h("dt", {}, "status"), h("dd", {}, pill(deviceStatus(d)), " ", d.state || ""),
        h("dt", {}, "running"), h("dd", {}, versionOf(d) || "nothing"),
        h("dt", {}, "desired"), h("dd", {}, d.desired ? `${d.desired.model}@${d.desired.version} (generation ${d.desired.generation})` : "nothing"),
        h("dt", {}, "profile"), h("dd", {}, d.profile || "not matched yet"),
        h("dt", {}, "hardware"), h("dd", {}, `${d.hardware_class} ${d.arch || ""}`),
        h("dt", {}, "tags"), h("dd", {}, d.tags.length ? d.tags.map((t) => h("span", { class: "tag" }, t)) : "none"),
        h("dt", {}, "last seen"), h("dd", {}, `${ago(d.last_seen)} (${fmtTime(d.last_seen)})`),
        h("dt", {}, "last error"), h("dd", { id: "last-error" }, d.last_error ? `${d.last_error.code}: ${d.last_error.message}` : "none"),
      )));
    const at = (p) => new Date(p.minute);
    const lm = lat.minutes;
    // The rollups are the history; minutes not rolled up yet come from the raw windows.
    const rolled = new Set(d.telemetry.map((p) => at(p).getTime()));
    const tel = d.telemetry.concat(lm.filter((p) => !rolled.has(at(p).getTime())))
      .sort((a, b) => at(a) - at(b));
    replace(charts,
      lineChart("Latency", [
        { name: "p50", cls: "s1", points: lm.map((p) => [at(p), p.p50_ms]) },
        { name: "p95", cls: "s2", points: lm.map((p) => [at(p), p.p95_ms]) },
        { name: "p99", cls: "s3", points: lm.map((p) => [at(p), p.p99_ms]) },
      ], "ms", (v) => num(v, 2)),
      lineChart("Error rate", [
        { name: "errors / requests", cls: "s3", points: tel.map((p) => [at(p), p.requests ? p.errors / p.requests * 100 : 0]) },
      ], "%", (v) => num(v, 1)),
      lineChart("Memory (RSS)", [
        { name: "RSS max", cls: "s4", points: tel.map((p) => [at(p), p.rss_bytes === undefined ? null : p.rss_bytes / 1048576]) },
      ], "MiB", (v) => num(v, 0)),
      lineChart("CPU", [
        { name: "CPU mean", cls: "s1", points: tel.map((p) => [at(p), p.cpu_percent === undefined ? null : p.cpu_percent]) },
      ], "%", (v) => num(v, 0)),
    );
    replace(events, d.events.length ? d.events.map((e) => h("li", { "data-event": e.id },
      h("span", { class: "when" }, fmtTime(e.at)),
      pill(e.kind, e.error ? "bad" : ""),
      e.deployment_id ? h("span", { class: "muted" }, ` deployment ${e.deployment_id}`) : null,
      e.error ? h("div", { class: "event-error" }, `${e.error.code}: ${e.error.message}`) : null,
      e.detail ? h("div", { class: "event-detail muted" }, typeof e.detail === "string" ? e.detail : JSON.stringify(e.detail)) : null,
    )) : h("li", { class: "muted" }, "no events yet"));
  };
}

function pageRollouts(root) {
  const form = h("div", { id: "new-rollout" });
  const body = h("div", { id: "rollouts" });
  root.append(h("h1", {}, "Rollouts"), form, body);
  if (canOperate()) {
    const model = h("select", { id: "rollout-model", "aria-label": "model version" });
    const canary = h("input", { id: "rollout-canary", value: "1", size: 4, "aria-label": "canary" });
    // Blank: the engine's defaults (60 s each). A demo fleet can use a few seconds.
    const observe = h("input", { id: "rollout-observe", type: "number", min: "0", size: 5, placeholder: "60", "aria-label": "observe seconds" });
    const soak = h("input", { id: "rollout-soak", type: "number", min: "0", size: 5, placeholder: "60", "aria-label": "soak seconds" });
    const msg = h("span", { class: "error", id: "rollout-msg" });
    const go = h("button", {
      class: "primary", id: "rollout-create", type: "button",
      onclick: async () => {
        if (!model.value) return;
        const [name, version] = JSON.parse(model.value);
        go.disabled = true;
        try {
          const strategy = {};
          if (observe.value !== "") strategy.observe_s = Number(observe.value);
          if (soak.value !== "") strategy.soak_s = Number(soak.value);
          const r = await api("/api/v1/rollouts", { method: "POST", body: { model: name, version, selector: { all: true }, canary: canary.value, strategy } });
          location.hash = `#/rollout/${enc(r.id)}`;
        } catch (e) { onError(e, msg); } finally { go.disabled = false; }
      },
    }, "Start rollout to all devices");
    replace(form, h("section", { class: "card" }, h("h2", {}, "New rollout"),
      h("div", { class: "filters" }, model, h("label", {}, "canary ", canary),
        h("label", {}, "observe s ", observe), h("label", {}, "soak s ", soak), go), msg));
    api("/api/v1/models").then((ms) => {
      replace(model, ms.models.map((m) => h("option", { value: JSON.stringify([m.name, m.version]) }, `${m.name}@${m.version}`)));
    }).catch((e) => onError(e, msg));
  }
  return async () => {
    const rs = (await api("/api/v1/rollouts")).rollouts;
    replace(body, h("section", { class: "card" }, rs.length ? table(
      [h("th", {}, "rollout"), h("th", {}, "model"), h("th", {}, "status"), h("th", {}, "wave"), h("th", { class: "hide-narrow" }, "created")],
      rs.map((r) => h("tr", { "data-rollout": r.id },
        h("td", {}, link(`#/rollout/${enc(r.id)}`, r.id)),
        h("td", {}, `${r.model}@${r.version}`),
        h("td", {}, pill(r.status)),
        h("td", {}, r.wave),
        h("td", { class: "hide-narrow" }, fmtTime(r.created_at)))),
      { id: "rollout-table" }) : h("p", { class: "muted" }, "no rollouts yet")));
  };
}

const ACTIVE_STATES = ["in_flight", "observing", "rolling_back"];
const FAILED_STATES = ["failed", "timed_out", "rolled_back", "expired"];

function countsParts(counts) {
  const c = counts || {};
  const sum = (keys) => keys.reduce((a, k) => a + (c[k] || 0), 0);
  return [
    { cls: "updated", n: c.updated || 0 },
    { cls: "active", n: sum(ACTIVE_STATES) },
    { cls: "failed", n: sum(FAILED_STATES) },
  ];
}

function pageRollout(root, id) {
  const head = h("div", { id: "rollout-head" });
  const controls = h("div", { class: "actions", id: "rollout-actions" });
  const msg = h("p", { class: "error", id: "action-msg" });
  const waves = h("div", { id: "waves" });
  const devices = h("div", { id: "rollout-devices" });
  const story = h("ol", { class: "timeline", id: "story" });
  root.append(h("h1", {}, "Rollout ", h("code", {}, id)), head, controls, msg,
    h("div", { class: "grid" },
      h("section", { class: "card" }, h("h2", {}, "Waves"), waves),
      h("section", { class: "card" }, h("h2", {}, "Devices"), devices)),
    h("section", { class: "card" }, h("h2", {}, "Decisions"), story));
  const act = (verb) => async () => {
    for (const b of controls.querySelectorAll("button")) b.disabled = true;
    try {
      await api(`/api/v1/rollouts/${enc(id)}/${verb}`, { method: "POST", body: { reason: `from the dashboard by ${state.me ? state.me.name : "?"}` } });
      replace(msg);
      await refresh();
    } catch (e) { onError(e, msg); }
  };
  const refresh = async () => {
    const [r, st] = await Promise.all([
      api(`/api/v1/rollouts/${enc(id)}`),
      api(`/api/v1/rollouts/${enc(id)}/story`),
    ]);
    const total = r.devices || r.device_states.length;
    replace(head, h("section", { class: "card" },
      h("dl", { class: "kv" },
        h("dt", {}, "status"), h("dd", { id: "rollout-status" }, pill(r.status)),
        h("dt", {}, "model"), h("dd", {}, `${r.model}@${r.version}`),
        h("dt", {}, "reason"), h("dd", {}, r.reason || "–"),
        h("dt", {}, "wave"), h("dd", {}, String(r.wave)),
        h("dt", {}, "devices"), h("dd", {}, `${(r.counts || {}).updated || 0} of ${total} updated`),
        h("dt", {}, "next wave"), h("dd", {}, r.next_wave_at ? fmtTime(r.next_wave_at) : "–"),
      ),
      progressBar(countsParts(r.counts), total)));
    if (canOperate()) {
      const open = ["created", "running", "paused"].includes(r.status);
      replace(controls,
        h("button", { id: "btn-pause", type: "button", onclick: act("pause"), disabled: r.status !== "running" }, "Pause"),
        h("button", { id: "btn-resume", type: "button", onclick: act("resume"), disabled: r.status !== "paused" }, "Resume"),
        h("button", { id: "btn-abort", class: "danger", type: "button", onclick: act("abort"), disabled: !open }, "Abort"));
    } else {
      replace(controls, h("span", { class: "muted" }, `Signed in as ${state.me ? state.me.role : "viewer"}: pausing, resuming and aborting need an operator token.`));
    }
    replace(waves, r.waves.length ? r.waves.map((w) => h("div", { class: "wave", "data-wave": w.wave },
      h("div", {}, w.wave < 0 ? `Not in a wave yet: ${w.devices} device(s)` : `Wave ${w.wave}: ${w.devices} device(s)`, w.p95_ms !== null ? h("span", { class: "muted" }, ` · p95 ${num(w.p95_ms, 2)} ms`) : null),
      progressBar(countsParts(w.counts), w.devices),
      h("div", { class: "muted" }, Object.entries(w.counts || {}).map(([k, n]) => `${k} ${n}`).join(" · ")))) : h("p", { class: "muted" }, "no wave started yet"));
    replace(devices, table(
      [h("th", {}, "device"), h("th", {}, "wave"), h("th", {}, "state"), h("th", { class: "hide-narrow" }, "p95 ms")],
      r.device_states.map((d) => h("tr", {},
        h("td", {}, link(`#/device/${enc(d.device_id)}`, d.device_id)),
        h("td", {}, d.wave === null ? "–" : d.wave),
        h("td", {}, pill(d.state), d.reason ? h("div", { class: "muted" }, d.reason) : null),
        h("td", { class: "hide-narrow" }, num(d.observed_p95_ms, 2))))));
    replace(story, st.decisions.length ? st.decisions.slice().reverse().map((d) => h("li", { "data-decision": d.kind },
      h("span", { class: "when" }, fmtTime(d.at)),
      pill(d.kind, ""), " ",
      d.device_id ? h("code", {}, d.device_id) : null,
      d.wave !== null ? h("span", { class: "muted" }, ` wave ${d.wave}`) : null,
      h("div", { class: "reason" }, d.reason),
      h("div", { class: "muted" }, `by ${d.actor}`))) : h("li", { class: "muted" }, "no decisions yet"));
  };
  return refresh;
}

function pageModels(root) {
  const body = h("div", { id: "models" });
  root.append(h("h1", {}, "Models"), body);
  return async () => {
    const ms = (await api("/api/v1/models")).models;
    replace(body, h("section", { class: "card" }, ms.length ? table(
      [h("th", {}, "model"), h("th", {}, "release"), h("th", {}, "variants"), h("th", { class: "hide-narrow" }, "registered")],
      ms.map((m) => h("tr", { "data-model": `${m.name}@${m.version}` },
        h("td", {}, link(`#/model/${enc(m.name)}/${enc(m.version)}`, `${m.name}@${m.version}`)),
        h("td", {}, m.release),
        h("td", {}, m.variants.map((v) => h("span", { class: "tag" }, `${v.hardware_class} ${v.precision}`))),
        h("td", { class: "hide-narrow" }, fmtTime(m.created_at))))) : h("p", { class: "muted" }, "no models registered")));
  };
}

function candidateClass(c) {
  return c.status === "chosen" ? "b-chosen" : c.status === "eligible" ? "b-eligible" : "b-other";
}

function pageModel(root, name, version) {
  const body = h("div", { id: "model" });
  root.append(h("h1", {}, "Model ", h("code", {}, `${name}@${version}`)), body);
  let drawn = "";
  return async () => {
    const m = await api(`/api/v1/models/${enc(name)}/${enc(version)}`);
    const key = JSON.stringify(m.variants.map((v) => v.id));
    if (key === drawn) return; // a model version never changes once its variants are in
    drawn = key;
    replace(body,
      h("section", { class: "card" }, h("dl", { class: "kv" },
        h("dt", {}, "release"), h("dd", {}, m.release),
        h("dt", {}, "description"), h("dd", {}, m.description || "–"),
        h("dt", {}, "inputs"), h("dd", {}, m.inputs.map((t) => `${t.name} ${JSON.stringify(t.shape)} ${t.dtype || ""}`).join(", ")),
        h("dt", {}, "source sha256"), h("dd", {}, h("code", {}, m.source_sha256)))),
      m.variants.map((v) => {
        const rep = v.report;
        const cands = rep && Array.isArray(rep.candidates) ? rep.candidates : [];
        const profile = rep && rep.profile ? rep.profile.name : v.hardware_class;
        return h("section", { class: "card variant", "data-variant": v.hardware_class },
          h("h2", {}, `Profile ${profile}: ${v.precision} on ${v.runtime}`),
          h("dl", { class: "kv" },
            h("dt", {}, "bundle"), h("dd", {}, h("code", {}, v.target)),
            h("dt", {}, "size"), h("dd", {}, bytes(v.length)),
            h("dt", {}, "chosen"), h("dd", {}, rep && rep.chosen ? rep.chosen.join(", ") : "–")),
          cands.length ? [
            h("div", { class: "legend" },
              h("span", {}, h("span", { class: "sw b-chosen" }), "chosen"),
              h("span", {}, h("span", { class: "sw b-eligible" }), "eligible"),
              h("span", {}, h("span", { class: "sw b-other" }), "rejected / failed / skipped")),
            h("div", { class: "charts" },
              barChart("Size", cands.map((c) => ({ label: c.name, value: c.size_bytes, cls: candidateClass(c) })), bytes),
              barChart("Latency p50", cands.map((c) => ({ label: c.name, value: c.latency ? c.latency.p50_ms : null, cls: candidateClass(c) })), (x) => `${num(x, 3)} ms`),
              barChart("Accuracy score", cands.map((c) => ({ label: c.name, value: c.accuracy ? c.accuracy.score : null, cls: candidateClass(c) })), (x) => num(x, 4))),
            table([h("th", {}, "candidate"), h("th", {}, "status"), h("th", {}, "reason")],
              cands.map((c) => h("tr", {}, h("td", {}, c.name), h("td", {}, pill(c.status, c.status === "chosen" ? "ok" : "")), h("td", {}, c.reason)))),
          ] : h("p", { class: "muted" }, "no compile report (registered without compiling)"));
      }));
  };
}

// ----------------------------------------------------------------- routing
function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  switch (parts[0]) {
    case "devices": return ["devices", (r) => pageDevices(r)];
    case "device": return ["devices", (r) => pageDevice(r, parts[1] || "")];
    case "rollouts": return ["rollouts", (r) => pageRollouts(r)];
    case "rollout": return ["rollouts", (r) => pageRollout(r, parts[1] || "")];
    case "models": return ["models", (r) => pageModels(r)];
    case "model": return ["models", (r) => pageModel(r, parts[1] || "", parts.slice(2).join("/"))];
    default: return ["overview", (r) => pageOverview(r)];
  }
}

function onError(err, where) {
  if (err instanceof SignedOut) { showSignIn("Your token was refused or has been revoked; sign in again."); return; }
  const target = where || $("banner");
  target.hidden = false;
  replace(target, String(err.message || err));
}

async function tick() {
  if (!state.refresh || state.busy || document.hidden) return;
  state.busy = true;
  const refresh = state.refresh;
  try {
    await refresh();
    if (state.refresh !== refresh) return; // the page changed meanwhile
    $("banner").hidden = true;
    document.body.dataset.loaded = state.route;
  } catch (e) {
    onError(e);
  } finally {
    state.busy = false;
  }
}

function render() {
  const [nav, make] = route();
  state.route = location.hash || "#/";
  delete document.body.dataset.loaded;
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("current", a.dataset.nav === nav);
  const page = $("page");
  page.replaceChildren();
  state.refresh = make(page);
  state.busy = false;
  tick();
}

function showSignIn(message) {
  clearInterval(state.timer);
  state.timer = null;
  state.refresh = null;
  state.me = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("page").replaceChildren();
  $("nav").hidden = true;
  $("signout").hidden = true;
  replace($("who"));
  $("signin").hidden = false;
  replace($("signin-error"), message || "");
  $("token").focus();
}

async function signedIn() {
  try {
    state.me = await api("/api/v1/dashboard/me");
  } catch (e) {
    showSignIn(e instanceof SignedOut ? "That token was refused (unknown or revoked)." : String(e.message || e));
    return;
  }
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("signout").hidden = false;
  replace($("who"), `${state.me.name} · ${state.me.role}`);
  document.body.dataset.role = state.me.role;
  render();
  clearInterval(state.timer);
  state.timer = setInterval(tick, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    signedIn();
  });
  $("signout").addEventListener("click", () => showSignIn("Signed out."));
  window.addEventListener("hashchange", () => { if (state.me) render(); });
  if (sessionStorage.getItem(TOKEN_KEY)) signedIn();
  else showSignIn("");
});
