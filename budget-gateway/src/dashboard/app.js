// The dashboard: signs in with the admin key (kept in sessionStorage, for
// this tab only), then reads /v1/agents every second and each agent's
// history every two, and draws them. Every text from the API goes in
// through textContent, never as HTML.
"use strict";

const KEY = "agent-budget-admin-key";
const REFRESH_MS = 1000;
const HISTORY_EVERY = 2; // refreshes
const $ = (id) => document.getElementById(id);

let timer = null;
let ticks = 0;
const histories = new Map();

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function say(text, error) {
  const message = $("message");
  message.textContent = text;
  message.className = error ? "error" : "";
}

async function api(path) {
  const key = sessionStorage.getItem(KEY);
  const response = await fetch(path, {
    headers: { Authorization: "Bearer " + key },
    cache: "no-store",
  });
  if (response.status === 401 || response.status === 403) {
    const error = new Error("denied");
    error.denied = response.status;
    throw error;
  }
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

function signedIn(on) {
  $("sign-out").hidden = !on;
  $("admin-key").value = "";
}

function signOut(text, error) {
  sessionStorage.removeItem(KEY);
  if (timer) clearInterval(timer);
  timer = null;
  histories.clear();
  $("agents").replaceChildren();
  $("updated").textContent = "";
  signedIn(false);
  say(text || "", error);
}

async function refresh() {
  let agents;
  try {
    agents = await api("/v1/agents");
  } catch (e) {
    if (e.denied) {
      signOut(e.denied === 403
        ? "Wrong admin key: that key is not the admin key (403)."
        : "Wrong admin key: no key was sent (401).", true);
    } else {
      say("Cannot reach the gateway: " + e.message, true);
    }
    return false;
  }
  if (ticks++ % HISTORY_EVERY === 0) {
    await Promise.all(agents.map(async (a) => {
      try {
        histories.set(a.agent_id, await api("/v1/agents/" + a.agent_id + "/history"));
      } catch (_) { /* drawn without it */ }
    }));
  }
  draw(agents);
  say("");
  $("updated").textContent = agents.length + " agents · updated " + new Date().toLocaleTimeString();
  return true;
}

function start() {
  refresh().then((ok) => {
    if (ok) {
      signedIn(true);
      if (timer) clearInterval(timer);
      timer = setInterval(refresh, REFRESH_MS);
    }
  });
}

// Numbers a person reads at a glance: 1.2k, 3.4M; dollars with cents.
function amount(resource, n) {
  if (n === undefined || n === null) return "–";
  if (resource === "spend_usd" || resource.endsWith("_usd")) return "$" + Number(n).toFixed(2);
  if (n >= 1e15) return "∞";
  if (n >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return String(n);
}

function duration(secs) {
  if (secs >= 86400) return Math.floor(secs / 86400) + "d " + Math.floor((secs % 86400) / 3600) + "h";
  if (secs >= 3600) return Math.floor(secs / 3600) + "h " + Math.floor((secs % 3600) / 60) + "m";
  if (secs >= 60) return Math.floor(secs / 60) + "m " + (secs % 60) + "s";
  return secs + "s";
}

// Every numeric field of the limit is a resource it limits (requests,
// tokens, spend_usd, and whatever comes next).
function resources(spec) {
  return Object.keys(spec).filter((k) => typeof spec[k] === "number");
}

function limitBox(state) {
  const spec = state.limit || {};
  const kind = spec.window ? "window " + spec.window : spec.refill ? "refill " + spec.refill : "limit";
  const head = el("div", { class: "limit-head" },
    el("span", { text: kind + (spec.model ? " · model " + spec.model : "") }),
    el("span", { class: "resets", text: (spec.refill ? "full in " : "resets in ") + duration(state.resets_in_secs || 0) }));
  const box = el("div", { class: "limit" }, head);
  for (const resource of resources(spec)) {
    const limit = spec[resource];
    const used = (state.used || {})[resource] ?? 0;
    const remaining = (state.remaining || {})[resource];
    const share = limit > 0 ? used / limit : 1;
    const refused = used >= limit || remaining === 0;
    const level = refused ? "bad" : share > 0.8 ? "warn" : "ok";
    const fill = el("div", { class: "fill " + level });
    fill.style.width = Math.min(100, share * 100).toFixed(1) + "%";
    const bar = el("div", {
      class: "bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": String(limit),
      "aria-valuenow": String(used), "aria-label": resource,
    }, fill);
    box.append(el("div", {
      class: "resource", "data-resource": resource, "data-used": String(used),
      "data-limit": String(limit), "data-level": level,
    }, el("span", { text: resource.replace("_usd", " $") }), bar,
      el("span", { class: "amount", text: amount(resource, used) + " / " + amount(resource, limit) })));
  }
  return box;
}

function chart(history) {
  const wrap = el("div", { class: "chart" });
  if (!history) return wrap;
  const n = history.admitted.length;
  const max = Math.max(1, ...history.admitted.map((a, i) => a + history.refused[i]));
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 " + n * 4 + " 40");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  for (let i = 0; i < n; i++) {
    const a = (history.admitted[i] / max) * 38;
    const r = (history.refused[i] / max) * 38;
    for (const [cls, h, y] of [["a", a, 40 - a], ["r", r, 40 - a - r]]) {
      if (h <= 0) continue;
      const rect = document.createElementNS(ns, "rect");
      rect.setAttribute("class", cls);
      rect.setAttribute("x", String(i * 4));
      rect.setAttribute("y", String(y));
      rect.setAttribute("width", "3");
      rect.setAttribute("height", String(Math.max(h, 0.8)));
      svg.append(rect);
    }
  }
  const admitted = history.admitted.reduce((s, x) => s + x, 0);
  const refused = history.refused.reduce((s, x) => s + x, 0);
  svg.setAttribute("aria-label", admitted + " admitted, " + refused + " refused in the last hour");
  wrap.append(svg, el("div", { class: "legend" },
    el("span", { text: "last hour" }),
    el("span", {
      class: "totals", "data-admitted": String(admitted), "data-refused": String(refused),
      text: admitted + " admitted · " + refused + " refused",
    }),
    el("span", { text: "now" })));
  return wrap;
}

function card(agent, labels) {
  const label = agent.metrics_label || agent.agent_id.slice(0, 8);
  const title = el("h2", { text: label });
  title.append(el("span", { class: "badge", text: agent.source }));
  if (agent.enforce === false) title.append(el("span", { class: "badge shadow", text: "shadow: not enforced" }));
  const ids = el("div", { class: "ids", text: agent.agent_id });
  const section = el("section", { class: "agent", "data-agent-id": agent.agent_id }, title, ids);
  if (agent.parent) {
    section.append(el("div", {
      class: "ids parent", text: "parent: " + (labels.get(agent.parent) || agent.parent),
    }));
  }
  for (const state of agent.limits || []) section.append(limitBox(state));
  section.append(chart(histories.get(agent.agent_id)));
  return section;
}

function draw(agents) {
  const labels = new Map(agents.map((a) => [a.agent_id, a.metrics_label || a.agent_id]));
  $("agents").replaceChildren(...agents.map((a) => card(a, labels)));
}

$("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("admin-key").value.trim();
  if (!key) {
    say("Type the admin key first.", true);
    return;
  }
  sessionStorage.setItem(KEY, key);
  say("Signing in…");
  start();
});
$("sign-out").addEventListener("click", () => signOut("Signed out."));
if (sessionStorage.getItem(KEY)) start();
