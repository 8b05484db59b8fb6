// The fazt console: sign-in (session cookie), a live overview pushed over the system
// WebSocket channel, jobs with filters and keyset pages, a job page with a live log
// tail and actions, and the apps view. No dependencies: the server has no internet.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const view = () => $("#view");
// Replaces the view's content; null and undefined parts are left out.
function show(...kids) { view().replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined)); }

function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

// Every change sends the console's header: with the cookie alone the server refuses it
// (a cross-site form cannot set a custom header).
async function api(method, path, body) {
  const opts = { method, credentials: "same-origin", headers: { "X-Fazt-Console": "1" } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  let data;
  try { data = JSON.parse(text); } catch { data = text; }
  if (r.status === 401) { showSignIn(); throw new Error("signed out"); }
  if (!r.ok) throw new Error((data && data.error) || r.statusText);
  return { data, next: r.headers.get("X-Next-Cursor") };
}

function fmtBytes(n) { return (n / 1048576).toFixed(0) + " MB"; }
function fmtTime(ms) { return ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : ""; }
function fmtDur(a, b) { return a && b ? ((b - a) / 1000).toFixed(2) + " s" : ""; }
function bar(pct, warn) {
  const inner = h("div");
  inner.style.width = Math.max(0, Math.min(100, pct)) + "%";
  return h("span", { class: "bar" + (warn ? " warn" : ""), role: "progressbar",
    "aria-valuenow": Math.round(pct), "data-pct": Math.round(pct) }, inner);
}
function statusCell(s) { return h("span", { class: "status-" + s }, s); }
function jobLink(j) { return h("a", { href: "#/job/" + encodeURIComponent(j.id), class: "job-link" }, j.id); }

// ---- sign-in -------------------------------------------------------------------
function showSignIn() {
  closeSocket();
  $("#nav").hidden = true;
  $("#signin").hidden = false;
  show();
}

async function signIn(ev) {
  ev.preventDefault();
  const token = $("#token").value.trim();
  $("#token").value = "";
  try {
    await api("POST", "/api/session", { token });
    $("#signin-error").textContent = "";
    $("#signin").hidden = true;
    $("#nav").hidden = false;
    route();
  } catch (e) {
    $("#signin-error").textContent = e.message;
  }
}

async function signOut() {
  try { await api("DELETE", "/api/session"); } catch { /* signed out anyway */ }
  showSignIn();
}

// ---- live overview over the system channel ---------------------------------------
let socket = null;
let lastOverview = null;
function openSocket() {
  if (socket) return;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(proto + "//" + location.host + "/_ws");
  socket.onopen = () => {
    socket.send(JSON.stringify({ type: "subscribe", channel: "overview" }));
    $("#live").textContent = "live";
  };
  socket.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    if (m.type !== "message" || m.channel !== "overview") return;
    lastOverview = typeof m.data === "string" ? JSON.parse(m.data) : m.data;
    if (currentView === "overview") renderOverview(lastOverview);
  };
  socket.onclose = () => {
    socket = null;
    $("#live").textContent = "reconnecting…";
    setTimeout(() => { if (!$("#nav").hidden) openSocket(); }, 1000);
  };
}
function closeSocket() {
  if (socket) { socket.onclose = null; socket.close(); socket = null; }
  $("#live").textContent = "";
}

function chart(minutes) {
  const W = 600, H = 120, n = 60, ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const max = Math.max(1, ...minutes.map((m) => m.done + m.failed));
  const bw = W / n;
  const last = minutes.length ? minutes[minutes.length - 1].t : 0;
  for (const m of minutes) {
    const x = (n - 1 - (last - m.t)) * bw;
    const hd = (m.done / max) * (H - 14), hf = (m.failed / max) * (H - 14);
    for (const [y, hh, color] of [[H - hd, hd, "#3b7ddd"], [H - hd - hf, hf, "#b3261e"]]) {
      const r = document.createElementNS(ns, "rect");
      r.setAttribute("x", x + 1); r.setAttribute("y", y);
      r.setAttribute("width", bw - 2); r.setAttribute("height", hh);
      r.setAttribute("fill", color);
      svg.append(r);
    }
  }
  const t = document.createElementNS(ns, "text");
  t.setAttribute("x", 4); t.setAttribute("y", 12); t.setAttribute("font-size", 11);
  t.textContent = `jobs per minute, last hour (max ${max}): done blue, failed red`;
  svg.append(t);
  return svg;
}

function renderOverview(o) {
  const mem = o.memory;
  const memPct = (mem.rssBytes / (mem.budgetBytes + mem.baselineBytes)) * 100;
  const cards = h("div", { class: "cards" },
    h("div", { class: "card" }, h("div", {}, "Slots in use"),
      h("div", { class: "big", id: "slots" }, `${o.slots.used} / ${o.slots.total}`),
      h("div", { class: "muted" }, `per app: ${o.limits.perAppRunning} running, ${o.limits.perAppDaemons} daemons`)),
    h("div", { class: "card" }, h("div", {}, "Queued"), h("div", { class: "big" }, o.queued)),
    h("div", { class: "card" }, h("div", {}, "Memory"),
      h("div", {}, "reserved ", bar((mem.reservedBytes / mem.budgetBytes) * 100), ` ${fmtBytes(mem.reservedBytes)} of ${fmtBytes(mem.budgetBytes)}`),
      h("div", {}, "RSS ", bar(memPct, mem.warning), ` ${fmtBytes(mem.rssBytes)}`),
      mem.warning ? h("div", { class: "warning", id: "mem-warning" }, "RSS is over 80 % of the budget") : null),
    h("div", { class: "card" }, h("div", {}, "Store"),
      h("div", { class: o.store.writable ? "" : "warning" }, o.store.writable ? "writable" : "DEGRADED: " + (o.store.reason || ""))));
  const running = h("table", { id: "running" },
    h("tr", {}, ["Job", "App", "Path", "Progress", "Started", ""].map((c) => h("th", {}, c))),
    o.running.map((j) => h("tr", { "data-id": j.id },
      h("td", {}, jobLink(j)), h("td", {}, j.app), h("td", {}, j.path),
      h("td", {}, bar(j.progress), " ", j.progress + "%"), h("td", {}, fmtTime(j.startedAt)),
      h("td", {}, h("button", { class: "action cancel", onclick: () => act("POST", `/api/jobs/${j.id}/cancel`) }, "Cancel")))));
  const apps = h("table", {},
    h("tr", {}, ["App", "queued", "running", "done", "failed", "cancelled", "stopped"].map((c) => h("th", {}, c))),
    Object.entries(o.apps).map(([app, c]) => h("tr", {}, h("td", {}, app),
      ["queued", "running", "done", "failed", "cancelled", "stopped"].map((s) => h("td", {}, c[s] || 0)))));
  const daemons = h("table", {},
    h("tr", {}, ["Daemon", "App", "Path", "Status", "Restarts", "State"].map((c) => h("th", {}, c))),
    o.daemons.map((d) => h("tr", {}, h("td", {}, jobLink(d)), h("td", {}, d.app), h("td", {}, d.path),
      h("td", {}, statusCell(d.status)), h("td", {}, d.restarts),
      h("td", {}, d.status === "queued" && d.restarts > 0 ? "backing off after a failure" : d.status))));
  show(h("h1", {}, "Overview"), cards,
    h("h2", {}, "Throughput"), chart(o.minutes),
    h("h2", {}, `Running jobs (${o.running.length})`), running,
    h("h2", {}, "Jobs by app"), apps,
    h("h2", {}, "Daemons"), daemons,
    h("p", { class: "muted" }, "updated " + fmtTime(o.time)));
}

async function act(method, path, confirmText) {
  if (confirmText && !confirm(confirmText)) return null;
  try {
    const r = await api(method, path);
    return r.data;
  } catch (e) {
    alert(e.message);
    return null;
  }
}

// ---- jobs ----------------------------------------------------------------------
async function renderJobs(params) {
  const q = new URLSearchParams(params);
  const input = (name, ph) => h("input", { name, placeholder: ph, value: q.get(name) || "" });
  const status = h("select", { name: "status" },
    ["", "queued", "running", "done", "failed", "cancelled", "stopped"].map((s) =>
      h("option", { value: s, selected: q.get("status") === s }, s || "any status")));
  const form = h("form", { class: "filters", onsubmit: (ev) => {
    ev.preventDefault();
    const f = new URLSearchParams(new FormData(form));
    for (const [k, v] of [...f]) if (!v) f.delete(k);
    location.hash = "#/jobs?" + f.toString();
  } }, input("app", "app"), status, input("path", "workers/x.js"), input("q", "text in error"),
    h("button", { type: "submit" }, "Filter"));
  const list = new URLSearchParams(q);
  if (!list.get("limit")) list.set("limit", "50");
  const { data: jobs, next } = await api("GET", "/api/jobs?" + list.toString());
  const table = h("table", { id: "jobs" },
    h("tr", {}, ["Job", "App", "Path", "Status", "Progress", "Attempt", "Created", "Error"].map((c) => h("th", {}, c))),
    jobs.map((j) => h("tr", { "data-id": j.id }, h("td", {}, jobLink(j)), h("td", {}, j.app), h("td", {}, j.path),
      h("td", {}, statusCell(j.status)), h("td", {}, j.progress + "%"), h("td", {}, j.attempt),
      h("td", {}, fmtTime(j.createdAt)), h("td", { class: "error" }, j.error || ""))));
  const pager = h("p", {});
  if (q.get("before")) pager.append(h("a", { href: "#/jobs?" + (() => { const p = new URLSearchParams(q); p.delete("before"); return p; })() }, "« newest"), " ");
  if (next) { const p = new URLSearchParams(q); p.set("before", next); pager.append(h("a", { href: "#/jobs?" + p, id: "next-page" }, "older »")); }
  const bulk = q.get("app") ? h("p", {},
    h("button", { class: "action", id: "bulk-retry", onclick: async () => {
      const r = await act("POST", `/api/apps/${q.get("app")}/jobs/retry?status=failed`, `Retry every failed job of ${q.get("app")}?`);
      if (r) route();
    } }, `Retry all failed jobs of ${q.get("app")}`),
    h("button", { class: "action", onclick: async () => {
      const r = await act("DELETE", `/api/apps/${q.get("app")}/jobs?status=failed`, `Delete every failed job of ${q.get("app")}?`);
      if (r) route();
    } }, `Delete all failed jobs of ${q.get("app")}`)) : null;
  show(h("h1", {}, "Jobs"), form, bulk, table, pager);
}

let tail = null;
async function renderJob(id) {
  const { data: j } = await api("GET", "/api/jobs/" + encodeURIComponent(id));
  const pre = (v) => h("pre", {}, v === null || v === undefined ? "—" : JSON.stringify(v, null, 2));
  const actions = h("p", {},
    ["queued", "running"].includes(j.status)
      ? h("button", { class: "action", id: "cancel", onclick: async () => { await act("POST", `/api/jobs/${id}/cancel`); renderJob(id); } }, "Cancel")
      : [h("button", { class: "action", id: "retry", onclick: async () => { await act("POST", `/api/jobs/${id}/retry`); renderJob(id); } }, "Retry"),
         h("button", { class: "action", id: "delete", onclick: async () => { if (await act("DELETE", `/api/jobs/${id}`, `Delete job ${id} and its log?`)) location.hash = "#/jobs"; } }, "Delete")]);
  const log = h("pre", { id: "log" });
  show(
    h("h1", {}, "Job ", h("code", {}, j.id)),
    h("p", {}, statusCell(j.status), " ", bar(j.progress), ` ${j.progress}% · ${j.app} · ${j.path}` + (j.daemon ? " · daemon" : "")),
    actions,
    h("table", {},
      h("tr", {}, h("th", {}, "Attempt"), h("td", {}, j.attempt), h("th", {}, "Restarts"), h("td", {}, j.restarts)),
      h("tr", {}, h("th", {}, "Created"), h("td", {}, fmtTime(j.createdAt)), h("th", {}, "Started"), h("td", {}, fmtTime(j.startedAt))),
      h("tr", {}, h("th", {}, "Done"), h("td", {}, fmtTime(j.doneAt)), h("th", {}, "Ran"), h("td", {}, fmtDur(j.startedAt, j.doneAt)))),
    j.error ? h("p", { class: "error", id: "job-error" }, j.error) : null,
    h("h2", {}, "Data"), pre(j.data), h("h2", {}, "Result"), pre(j.result),
    h("h2", {}, "Log"), log);
  startTail(id, log, j.status);
}

function startTail(id, el, status) {
  if (tail) clearTimeout(tail.timer);
  const t = { after: 0, timer: null };
  tail = t;
  const step = async () => {
    if (tail !== t) return;
    try {
      const { data: lines } = await api("GET", `/api/jobs/${encodeURIComponent(id)}/logs?after=${t.after}`);
      for (const l of lines) {
        t.after = Math.max(t.after, l.id);
        el.append(`${fmtTime(l.ts)} [${l.level}] ${l.msg}\n`);
      }
      if (lines.length) el.scrollTop = el.scrollHeight;
      // While the job is live, refresh its header too (status, progress).
      if (["queued", "running"].includes(status)) {
        const { data: j } = await api("GET", `/api/jobs/${encodeURIComponent(id)}`);
        if (j.status !== status && tail === t) return renderJob(id);
        const b = view().querySelector(".bar > div");
        if (b) b.style.width = j.progress + "%";
      }
    } catch { /* shown on the next navigation */ }
    if (tail === t) t.timer = setTimeout(step, 1000);
  };
  step();
}

// ---- apps ----------------------------------------------------------------------
async function renderApps() {
  const { data: apps } = await api("GET", "/api/console/apps");
  const statuses = ["queued", "running", "done", "failed", "cancelled", "stopped"];
  show(h("h1", {}, "Apps"), h("table", { id: "apps" },
    h("tr", {}, ["App", "Version", "Deployed", "Files", "Handler calls", "5xx rate", "Jobs", ""].map((c) => h("th", {}, c))),
    apps.map((a) => h("tr", {}, h("td", {}, h("a", { href: "#/jobs?app=" + a.name }, a.name)), h("td", {}, a.version),
      h("td", {}, fmtTime(a.updated_at || a.created_at)), h("td", {}, `${a.files} (${a.bytes} bytes)`), h("td", {}, a.handlerCalls),
      h("td", {}, a.handlerCalls ? ((a.handlerErrors / a.handlerCalls) * 100).toFixed(1) + " %" : "—"),
      h("td", {}, statuses.filter((s) => a.jobs[s]).map((s) => `${s} ${a.jobs[s]}`).join(", ") || "none"),
      h("td", {}, h("button", { class: "action", onclick: async () => {
        if (await act("DELETE", "/api/apps/" + a.name, `Remove app ${a.name}? Its files, data and jobs are deleted.`)) renderApps();
      } }, "Remove"))))));
}

// ---- health banner (open /health: shown before sign-in too) ----------------------
async function checkHealth() {
  try {
    const h = await (await fetch("/health")).json();
    const banner = $("#degraded");
    banner.textContent = h.status === "degraded" ? "DEGRADED: " + h.reason : "";
    banner.hidden = h.status !== "degraded";
  } catch { /* the server is restarting; the next check tells */ }
}

// ---- routing -------------------------------------------------------------------
let currentView = "";
async function route() {
  if (tail) { clearTimeout(tail.timer); tail = null; }
  const hash = location.hash.slice(1) || "/";
  const [path, query] = hash.split("?");
  try {
    if (path.startsWith("/job/")) { currentView = "job"; await renderJob(decodeURIComponent(path.slice(5))); }
    else if (path === "/jobs") { currentView = "jobs"; await renderJobs(query || ""); }
    else if (path === "/apps") { currentView = "apps"; await renderApps(); }
    else {
      currentView = "overview";
      openSocket();
      if (lastOverview) renderOverview(lastOverview);
      else { const { data } = await api("GET", "/api/console/overview"); lastOverview = data; renderOverview(data); }
    }
  } catch (e) {
    if (e.message !== "signed out") show(h("p", { class: "error" }, e.message));
  }
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", async () => {
  $("#signin").addEventListener("submit", signIn);
  $("#signout").addEventListener("click", signOut);
  checkHealth();
  setInterval(checkHealth, 5000);
  const { data } = await api("GET", "/api/session").catch(() => ({ data: {} }));
  if (data.signedIn) { $("#nav").hidden = false; openSocket(); route(); }
  else showSignIn();
});
