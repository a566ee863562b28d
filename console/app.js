// The operator console: one page, five views (#overview, #apps, #usage, #sessions,
// #audit), each drawn from the JSON routes the API documents. Plain script, no build step,
// nothing from another host. The session cookie is HttpOnly; the CSRF token this script
// gets from /console/session goes with every state-changing request.
"use strict";

const PAGES = ["overview", "apps", "usage", "sessions", "audit"];
let csrf = null;
let tokens = [];

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c !== null && c !== undefined) node.append(c);
  }
  return node;
}

function say(text) {
  $("status").textContent = text;
}

/// A JSON call; state changes carry the CSRF token. A 401 sends the operator to sign-in.
async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrf || "";
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  let data = null;
  try {
    data = await res.json();
  } catch (_) {
    data = { ok: false, error: `HTTP ${res.status}`, code: "unknown" };
  }
  if (res.status === 401 && !path.startsWith("/console/")) {
    showSignIn();
  }
  if (!res.ok) {
    const err = new Error(data.error || `HTTP ${res.status}`);
    err.status = res.status;
    err.code = data.code;
    err.retryAfter = res.headers.get("Retry-After");
    throw err;
  }
  return data;
}

// ---- formatting -------------------------------------------------------------------------

const usd = (v) => (v === null || v === undefined ? "—" : `$${Number(v).toFixed(2)}`);
const when = (t) => (t ? t.replace("T", " ").replace(/\.\d+Z$/, " UTC").replace(/Z$/, " UTC") : "—");
const dash = (v) => (v === null || v === undefined || v === "" ? "—" : String(v));

/// A table that turns into labelled cards on a narrow screen (see app.css).
function table(caption, columns, rows) {
  if (rows.length === 0) return el("p", { text: `${caption}: none.` });
  const head = el("tr", {}, ...columns.map((c) => el("th", { scope: "col", text: c.label })));
  const body = rows.map((r) =>
    el(
      "tr",
      {},
      ...columns.map((c) => {
        const v = c.value(r);
        const td = el("td", { "data-label": c.label });
        if (v instanceof Node) td.append(v);
        else td.textContent = dash(v);
        return td;
      }),
    ),
  );
  return el("table", {}, el("caption", { text: caption }), el("thead", {}, head), el("tbody", {}, ...body));
}

function tokenName(id) {
  const t = tokens.find((t) => t.id === id);
  return t ? t.name : id || "—";
}

async function loadTokens() {
  tokens = (await api("GET", "/admin/tokens")).tokens;
  for (const id of ["sessions-app", "audit-app"]) {
    const select = $(id);
    const keep = select.value;
    select.replaceChildren(el("option", { value: "", text: "All apps" }));
    for (const t of tokens) select.append(el("option", { value: t.id, text: t.name }));
    select.value = keep;
  }
}

function monthOf(date) {
  return date.toISOString().slice(0, 7);
}

function monthRange(month) {
  const [y, m] = month.split("-").map(Number);
  const last = new Date(Date.UTC(y, m, 0)).getUTCDate();
  const today = new Date().toISOString().slice(0, 10);
  let to = `${month}-${String(last).padStart(2, "0")}`;
  if (to > today && `${month}-01` <= today) to = today;
  return { from: `${month}-01`, to, days: last };
}

// ---- sign-in ----------------------------------------------------------------------------

function showSignIn() {
  csrf = null;
  $("nav").hidden = true;
  for (const p of document.querySelectorAll(".page")) p.hidden = p.id !== "page-sign-in";
  $("page-sign-in").querySelector("h1").focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = $("admin-token");
  $("sign-in-error").textContent = "";
  try {
    const s = await api("POST", "/console/sign-in", { token: input.value });
    csrf = s.csrf_token;
    input.value = "";
    $("nav").hidden = false;
    if (!location.hash || location.hash === "#sign-in") location.hash = "#overview";
    else route();
  } catch (e) {
    input.value = "";
    $("sign-in-error").textContent =
      e.status === 429
        ? `Too many failed sign-ins from this address; try again in ${e.retryAfter || 60} s.`
        : e.status === 401
          ? "That is not the admin token."
          : e.message;
  }
}

async function signOut() {
  try {
    await api("POST", "/console/sign-out");
  } catch (_) {
    // Signed out already (expired): the sign-in form is the right place either way.
  }
  say("Signed out.");
  showSignIn();
}

// ---- Overview ---------------------------------------------------------------------------

async function drawOverview() {
  const body = $("overview-body");
  body.replaceChildren(el("p", { text: "Running the doctor's checks…" }));
  const s = await api("GET", "/admin/status");
  const check = (name) => s.checks.find((c) => c.name === name);
  const login = check("login");
  const disk = check("disk");
  const facts = [
    ["Version", s.version],
    ["Ready", s.ready ? "yes: every check passed" : "no: see the problems below"],
    ["claude", s.claude_present ? s.claude_version : "not found"],
    ["acpx", s.acpx_present ? s.acpx_version : "not found"],
    ["Login", login ? (login.ok ? `logged in (${login.detail})` : `not logged in: ${login.detail}`) : "unknown"],
    ["Warm pool", `${s.warm_pool.idle} idle of ${s.warm_pool.size} (hits ${s.warm_pool.hits}, misses ${s.warm_pool.misses})`],
    [
      "Warm sessions",
      s.warm_sessions
        ? `${s.warm_sessions.agents} agents, ${s.warm_sessions.pooled} pooled, limit ${s.warm_sessions.limit}`
        : "not reported by this server",
    ],
    ["Processes running", `${s.processes_running} of ${s.max_concurrent}`],
    ["Queue depth", String(s.queue_depth)],
    ["Free disk", disk ? disk.detail : "unknown"],
    ["Uptime", `${s.uptime_secs} s`],
  ];
  const dl = el("dl", { class: "facts" });
  for (const [k, v] of facts) dl.append(el("dt", { text: k }), el("dd", { text: dash(v) }));
  const problems = s.checks.filter((c) => c.fix);
  body.replaceChildren(
    dl,
    el("h2", { text: "Checks" }),
    table("The doctor's checks", [
      { label: "Check", value: (c) => c.name },
      { label: "Status", value: (c) => el("span", { class: `badge ${c.status}`, text: c.status }) },
      { label: "Detail", value: (c) => c.detail },
      { label: "Fix", value: (c) => c.fix },
    ], s.checks),
    problems.length ? el("p", { text: `${problems.length} check(s) name a fix.` }) : el("p", { text: "No problems." }),
  );
}

// ---- Apps -------------------------------------------------------------------------------

/// The policy fields the forms edit: [key, label, kind].
const POLICY = [
  ["ip_cidrs", "CIDRs (comma-separated)", "list"],
  ["budget_usd_per_day", "Daily budget (USD)", "number"],
  ["budget_usd_per_month", "Monthly budget (USD)", "number"],
  ["max_concurrent", "Max concurrent", "integer"],
  ["rate_per_min", "Rate per minute", "integer"],
  ["allowed_models", "Allowed models (comma-separated)", "list"],
  ["default_model", "Default model", "text"],
];

function fieldText(kind, v) {
  if (v === null || v === undefined) return "";
  return kind === "list" ? v.join(", ") : String(v);
}

function fieldValue(kind, text) {
  const t = text.trim();
  if (t === "") return null;
  if (kind === "list") return t.split(",").map((s) => s.trim()).filter(Boolean);
  if (kind === "number") return Number(t);
  if (kind === "integer") return parseInt(t, 10);
  return t;
}

function policyInputs(container, prefix, values) {
  container.replaceChildren();
  for (const [key, label, kind] of POLICY) {
    const id = `${prefix}-${key}`;
    const input = el("input", {
      id,
      name: key,
      type: kind === "number" || kind === "integer" ? "number" : "text",
      step: kind === "number" ? "0.01" : kind === "integer" ? "1" : undefined,
      min: kind === "number" || kind === "integer" ? "0" : undefined,
      inputmode: kind === "number" ? "decimal" : undefined,
      value: fieldText(kind, values[key]),
    });
    container.append(el("div", { class: "field" }, el("label", { for: id, text: label }), input));
  }
}

function showPlaintext(name, token) {
  $("minted-name").textContent = name;
  $("minted-token").textContent = token;
  $("minted-copy").textContent = "Copy";
  $("minted").hidden = false;
  $("minted-copy").focus();
}

function hidePlaintext() {
  $("minted-token").textContent = "";
  $("minted").hidden = true;
}

async function copyPlaintext() {
  const text = $("minted-token").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    // No clipboard API (plain HTTP on a LAN address): select the text for Ctrl+C.
    const range = document.createRange();
    range.selectNodeContents($("minted-token"));
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    document.execCommand("copy");
  }
  $("minted-copy").textContent = "Copied";
  say("Token copied.");
}

async function drawApps() {
  policyInputs($("mint-fields"), "mint", {});
  const nameField = el("div", { class: "field" },
    el("label", { for: "mint-name", text: "Name" }),
    el("input", { id: "mint-name", name: "name", type: "text", required: true, maxlength: "200" }));
  $("mint-fields").prepend(nameField);
  await loadTokens();
  const range = monthRange(monthOf(new Date()));
  const usage = await api("GET", `/admin/usage?from=${range.from}&to=${range.to}`);
  const spent = {};
  for (const r of usage.rows) spent[r.token_id] = (spent[r.token_id] || 0) + r.cost_usd;
  const policyText = (t) =>
    POLICY.filter(([k]) => t[k] !== null && t[k] !== undefined && !(Array.isArray(t[k]) && t[k].length === 0))
      .map(([k, label, kind]) => `${label.replace(/ \(.*\)$/, "")}: ${fieldText(kind, t[k])}`)
      .join("; ") || "no limits";
  const actions = (t) => {
    if (t.revoked_at) return el("span", { class: "badge fail", text: "revoked" });
    return el("span", { class: "actions" },
      el("button", { type: "button", "aria-label": `Edit policy of ${t.name}`, text: "Edit policy", onclick: () => editPolicy(t) }),
      el("button", { type: "button", "aria-label": `Rotate ${t.name}`, text: "Rotate", onclick: () => rotate(t) }),
      el("button", { type: "button", "aria-label": `Revoke ${t.name}`, class: "danger", text: "Revoke", onclick: () => revoke(t) }));
  };
  $("apps-body").replaceChildren(
    table("App tokens", [
      { label: "Name", value: (t) => t.name },
      { label: "Id", value: (t) => el("code", { text: t.id }) },
      { label: "Policy", value: policyText },
      { label: "Last used", value: (t) => when(t.last_used_at) },
      { label: "Spent this month", value: (t) => usd(spent[t.id] || 0) },
      { label: "Actions", value: actions },
    ], tokens),
  );
}

async function mint(event) {
  event.preventDefault();
  $("mint-error").textContent = "";
  const form = $("mint-form");
  const body = { name: form.elements.name.value };
  for (const [key, , kind] of POLICY) {
    const v = fieldValue(kind, form.elements[key].value);
    if (v !== null) body[key] = v;
  }
  try {
    const t = await api("POST", "/admin/tokens", body);
    form.reset();
    await drawApps();
    showPlaintext(t.name, t.token);
    say(`Minted a token for ${t.name}.`);
  } catch (e) {
    $("mint-error").textContent = e.message;
  }
}

let editing = null;

function editPolicy(t) {
  editing = t;
  $("edit-title").textContent = `Edit policy of ${t.name}`;
  policyInputs($("edit-fields"), "edit", t);
  $("edit-form").hidden = false;
  $("edit-error").textContent = "";
  $("edit-title").focus();
}

/// PATCH semantics: only changed fields are sent; an emptied field is sent as null.
async function savePolicy(event) {
  event.preventDefault();
  const form = $("edit-form");
  const patch = {};
  for (const [key, , kind] of POLICY) {
    const now = form.elements[key].value;
    if (now.trim() !== fieldText(kind, editing[key])) patch[key] = fieldValue(kind, now);
  }
  if (Object.keys(patch).length === 0) {
    $("edit-error").textContent = "Nothing changed.";
    return;
  }
  try {
    await api("PATCH", `/admin/tokens/${encodeURIComponent(editing.id)}`, patch);
    form.hidden = true;
    say(`Saved the policy of ${editing.name}: ${Object.keys(patch).join(", ")}.`);
    editing = null;
    await drawApps();
  } catch (e) {
    $("edit-error").textContent = e.message;
  }
}

async function rotate(t) {
  if (!confirm(`Rotate the token of ${t.name}? Its current secret stops working at once.`)) return;
  try {
    const r = await api("POST", `/admin/tokens/${encodeURIComponent(t.id)}/rotate`);
    await drawApps();
    showPlaintext(r.name, r.token);
    say(`Rotated the token of ${t.name}.`);
  } catch (e) {
    say(`Could not rotate: ${e.message}`);
  }
}

async function revoke(t) {
  if (!confirm(`Revoke the token of ${t.name}? It stops working at once and its sessions are closed.`)) return;
  try {
    await api("DELETE", `/admin/tokens/${encodeURIComponent(t.id)}`);
    say(`Revoked the token of ${t.name}.`);
    await drawApps();
  } catch (e) {
    say(`Could not revoke: ${e.message}`);
  }
}

// ---- Usage ------------------------------------------------------------------------------

const COLOURS = ["#1f6feb", "#d4731b", "#2da44e", "#a04fd6", "#cf222e", "#1b8a8f", "#8a6d1b", "#57606a"];
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

/// One stacked bar per day of the month, a segment per app.
function chart(month, days, rows) {
  const apps = [...new Set(rows.map((r) => r.token_id))];
  const perDay = Array.from({ length: days }, () => ({}));
  for (const r of rows) {
    const d = Number(r.day.slice(8, 10)) - 1;
    perDay[d][r.token_id] = (perDay[d][r.token_id] || 0) + r.cost_usd;
  }
  const totals = perDay.map((d) => Object.values(d).reduce((a, b) => a + b, 0));
  const max = Math.max(...totals, 0.01);
  const W = 640, H = 240, left = 44, bottom = 24, top = 10;
  const slot = (W - left) / days;
  const y = (v) => top + (H - top - bottom) * (1 - v / max);
  const label = `Spend per day in ${month}, per app`;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, class: "chart" },
    svg("title", {}, label));
  for (const frac of [0, 0.5, 1]) {
    const v = max * frac;
    root.append(svg("line", { x1: left, x2: W, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: left - 4, y: y(v) + 4, "text-anchor": "end", class: "axis" }, `$${v.toFixed(2)}`));
  }
  perDay.forEach((d, i) => {
    let base = 0;
    apps.forEach((app, k) => {
      const v = d[app] || 0;
      if (v <= 0) return;
      const x = left + i * slot + slot * 0.15;
      const rect = svg("rect", {
        x, width: slot * 0.7, y: y(base + v), height: y(base) - y(base + v),
        fill: COLOURS[k % COLOURS.length], class: "bar", "data-day": String(i + 1), "data-app": tokenName(app),
      }, svg("title", {}, `${tokenName(app)}, ${month}-${String(i + 1).padStart(2, "0")}: ${usd(v)}`));
      root.append(rect);
      base += v;
    });
    if (days <= 31 && (i === 0 || (i + 1) % 5 === 0)) {
      root.append(svg("text", { x: left + (i + 0.5) * slot, y: H - 6, "text-anchor": "middle", class: "axis" }, String(i + 1)));
    }
  });
  const legend = el("ul", { class: "legend", "aria-label": "Apps in the chart" },
    ...apps.map((app, k) => {
      const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.background = COLOURS[k % COLOURS.length];
      const sum = perDay.reduce((a, d) => a + (d[app] || 0), 0);
      return el("li", {}, swatch, `${tokenName(app)}: ${usd(sum)}`);
    }));
  return el("figure", {}, root, legend);
}

async function drawUsage() {
  const input = $("usage-month");
  if (!input.value) input.value = monthOf(new Date());
  await loadTokens();
  const month = input.value;
  const range = monthRange(month);
  const report = await api("GET", `/admin/usage?from=${range.from}&to=${range.to}`);
  $("usage-chart").replaceChildren(
    report.rows.length ? chart(month, range.days, report.rows) : el("p", { text: `No usage in ${month}.` }),
  );
  const models = {};
  for (const r of report.rows) {
    const m = (models[r.model] ||= { model: r.model, requests: 0, input_tokens: 0, output_tokens: 0, cost_usd: 0 });
    for (const k of ["requests", "input_tokens", "output_tokens", "cost_usd"]) m[k] += r[k];
  }
  $("usage-models").replaceChildren(
    table(`Usage by model in ${month}`, [
      { label: "Model", value: (m) => m.model },
      { label: "Requests", value: (m) => m.requests },
      { label: "Input tokens", value: (m) => m.input_tokens },
      { label: "Output tokens", value: (m) => m.output_tokens },
      { label: "Cost", value: (m) => usd(m.cost_usd) },
    ], Object.values(models)),
  );
  // Budgets are about now: today's and this month's spend, whatever month is shown.
  const now = monthRange(monthOf(new Date()));
  const current = month === monthOf(new Date()) ? report : await api("GET", `/admin/usage?from=${now.from}&to=${now.to}`);
  const today = new Date().toISOString().slice(0, 10);
  const spentMonth = {}, spentToday = {};
  for (const r of current.rows) {
    spentMonth[r.token_id] = (spentMonth[r.token_id] || 0) + r.cost_usd;
    if (r.day === today) spentToday[r.token_id] = (spentToday[r.token_id] || 0) + r.cost_usd;
  }
  const left = (budget, spent) => (budget === null || budget === undefined ? "no budget" : usd(Math.max(0, budget - spent)));
  const live = tokens.filter((t) => !t.revoked_at);
  $("usage-budgets").replaceChildren(
    table("Budgets remaining (UTC)", [
      { label: "App", value: (t) => t.name },
      { label: "Spent today", value: (t) => usd(spentToday[t.id] || 0) },
      { label: "Left today", value: (t) => left(t.budget_usd_per_day, spentToday[t.id] || 0) },
      { label: "Spent this month", value: (t) => usd(spentMonth[t.id] || 0) },
      { label: "Left this month", value: (t) => left(t.budget_usd_per_month, spentMonth[t.id] || 0) },
    ], live),
  );
}

// ---- Sessions ---------------------------------------------------------------------------

async function drawSessions() {
  await loadTokens();
  const q = new URLSearchParams();
  if ($("sessions-status").value) q.set("status", $("sessions-status").value);
  if ($("sessions-app").value) q.set("token_id", $("sessions-app").value);
  const list = (await api("GET", `/admin/sessions?${q}`)).sessions;
  const close = (s) => {
    if (s.status !== "open") return "—";
    return el("button", {
      type: "button", "aria-label": `Close session ${s.session_id}`, text: "Close",
      onclick: async () => {
        if (!confirm(`Close session ${s.session_id} of ${s.token_name}? Its agent is stopped.`)) return;
        try {
          await api("DELETE", `/admin/sessions/${encodeURIComponent(s.session_id)}`);
          say(`Closed session ${s.session_id}.`);
          await drawSessions();
        } catch (e) {
          say(`Could not close: ${e.message}`);
        }
      },
    });
  };
  $("sessions-body").replaceChildren(
    table("Sessions of every app", [
      { label: "Session", value: (s) => el("code", { text: s.session_id }) },
      { label: "App", value: (s) => s.token_name || s.token_id },
      { label: "Agent / model", value: (s) => `${s.agent} / ${s.model}` },
      {
        label: "Status",
        value: (s) => el("span", { class: `badge ${s.busy ? "warn" : s.status === "open" ? "ok" : "skip"}`, text: s.busy ? "busy" : s.status }),
      },
      { label: "Turns", value: (s) => s.turn_count },
      { label: "Last used", value: (s) => when(s.last_used_at) },
      { label: "Action", value: close },
    ], list),
  );
}

// ---- Audit ------------------------------------------------------------------------------

/// The `before` of each page shown so far (null: the newest), for "Newer".
let auditStack = [null];

async function drawAudit() {
  await loadTokens();
  const before = auditStack[auditStack.length - 1];
  const q = new URLSearchParams({ limit: $("audit-limit").value });
  for (const [param, id] of [["token_id", "audit-app"], ["kind", "audit-kind"], ["outcome", "audit-outcome"]]) {
    if ($(id).value) q.set(param, $(id).value);
  }
  if (before !== null) q.set("before", before);
  const page = await api("GET", `/admin/audit?${q}`);
  $("audit-body").replaceChildren(
    table("Audit log, newest first", [
      { label: "Id", value: (r) => r.id },
      { label: "Time", value: (r) => when(r.at) },
      { label: "App", value: (r) => (r.token_id ? tokenName(r.token_id) : "—") },
      { label: "Kind", value: (r) => r.kind },
      { label: "Model", value: (r) => r.model },
      { label: "Outcome", value: (r) => el("span", { class: `badge ${r.outcome === "ok" ? "ok" : "fail"}`, text: r.outcome }) },
      { label: "Duration", value: (r) => (r.duration_ms === null ? null : `${r.duration_ms} ms`) },
      { label: "Tokens in / out", value: (r) => (r.input_tokens === null ? null : `${r.input_tokens} / ${r.output_tokens}`) },
      { label: "Cost", value: (r) => (r.cost_usd === null ? null : usd(r.cost_usd)) },
      { label: "Subject", value: (r) => r.subject },
      { label: "Detail", value: (r) => r.detail },
    ], page.rows),
  );
  $("audit-page").textContent = `Page ${auditStack.length}`;
  $("audit-newer").disabled = auditStack.length === 1;
  const older = $("audit-older");
  older.disabled = page.next_before === null;
  older.dataset.next = page.next_before === null ? "" : String(page.next_before);
}

// ---- routing ----------------------------------------------------------------------------

const DRAW = { overview: drawOverview, apps: drawApps, usage: drawUsage, sessions: drawSessions, audit: drawAudit };

async function route() {
  if (!csrf) return showSignIn();
  const name = PAGES.includes(location.hash.slice(1)) ? location.hash.slice(1) : "overview";
  for (const p of document.querySelectorAll(".page")) p.hidden = p.id !== `page-${name}`;
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.getAttribute("href") === `#${name}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const page = $(`page-${name}`);
  page.setAttribute("aria-busy", "true");
  page.querySelector("h1").focus();
  try {
    await DRAW[name]();
    page.removeAttribute("aria-busy");
    page.dataset.ready = "true";
  } catch (e) {
    page.removeAttribute("aria-busy");
    if (e.status !== 401) say(`Could not load ${name}: ${e.message}`);
  }
}

async function start() {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("overview-refresh").addEventListener("click", () => drawOverview().catch((e) => say(e.message)));
  $("mint-form").addEventListener("submit", mint);
  $("edit-form").addEventListener("submit", savePolicy);
  $("edit-cancel").addEventListener("click", () => { $("edit-form").hidden = true; editing = null; });
  $("minted-copy").addEventListener("click", copyPlaintext);
  $("minted-done").addEventListener("click", hidePlaintext);
  $("usage-form").addEventListener("submit", (e) => { e.preventDefault(); drawUsage().catch((x) => say(x.message)); });
  $("sessions-form").addEventListener("submit", (e) => { e.preventDefault(); drawSessions().catch((x) => say(x.message)); });
  $("audit-form").addEventListener("submit", (e) => { e.preventDefault(); auditStack = [null]; drawAudit().catch((x) => say(x.message)); });
  $("audit-older").addEventListener("click", () => {
    auditStack.push(Number($("audit-older").dataset.next));
    drawAudit().catch((x) => say(x.message));
  });
  $("audit-newer").addEventListener("click", () => {
    if (auditStack.length > 1) auditStack.pop();
    drawAudit().catch((x) => say(x.message));
  });
  window.addEventListener("hashchange", () => {
    // Leaving Apps forgets a plaintext still on screen: it is shown once.
    hidePlaintext();
    route();
  });
  try {
    csrf = (await api("GET", "/console/session")).csrf_token;
    $("nav").hidden = false;
    route();
  } catch (_) {
    showSignIn();
  }
}

start();
