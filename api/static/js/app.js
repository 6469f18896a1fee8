// The single-page app: hash routes -> page renderers, the token field, flash messages, the health dot.

import { ApiError, authHeaders, getToken, setToken } from "./api.js";
import { h } from "./dom.js";
import * as models from "./pages/models.js";
import * as configurations from "./pages/configurations.js";
import * as deployments from "./pages/deployments.js";
import * as datasources from "./pages/datasources.js";
import * as inferences from "./pages/inferences.js";
import * as exits from "./pages/exits.js";

const ROUTES = [
  [/^\/models$/, models.list, "models"],
  [/^\/models\/new$/, models.edit, "models"],
  [/^\/models\/(\d+)\/edit$/, models.edit, "models"],
  [/^\/configurations$/, configurations.list, "configurations"],
  [/^\/configurations\/new$/, configurations.create, "configurations"],
  [/^\/deployments$/, deployments.list, "deployments"],
  [/^\/deployments\/new$/, deployments.create, "deployments"],
  [/^\/deployments\/(\d+)$/, deployments.detail, "deployments"],
  [/^\/results\/(\d+)\/exits$/, exits.detail, "deployments"],
  [/^\/datasources$/, datasources.list, "datasources"],
  [/^\/inferences$/, inferences.list, "inferences"],
  [/^\/inferences\/new$/, inferences.create, "inferences"],
  [/^\/inferences\/(\d+)$/, inferences.detail, "inferences"],
];

const view = document.getElementById("view");
const flashBox = document.getElementById("flash");
let cleanups = [];
let generation = 0;

let flashTimer = null;

export function flash(message, kind = "ok") {
  clearTimeout(flashTimer);
  // Confirmations fade after a while; errors stay until dismissed or replaced.
  if (kind !== "error") flashTimer = setTimeout(() => { flashBox.hidden = true; }, 8000);
  flashBox.className = `flash flash-${kind}`;
  flashBox.replaceChildren(h("span", {}, message), h("button", {
    type: "button", class: "flash-close", "aria-label": "dismiss", onclick: () => { flashBox.hidden = true; },
  }, "×"));
  flashBox.hidden = false;
}

function parse() {
  const raw = location.hash.replace(/^#/, "") || "/models";
  const [path, qs] = raw.split("?");
  return { path, query: new URLSearchParams(qs || "") };
}

async function render() {
  for (const fn of cleanups) fn();
  cleanups = [];
  const mine = ++generation;
  const { path, query } = parse();
  const match = ROUTES.map(([re, page, nav]) => [path.match(re), page, nav]).find(([m]) => m);
  document.querySelectorAll("[data-nav]").forEach((a) => {
    a.classList.toggle("active", Boolean(match) && a.dataset.nav === match[2]);
  });
  if (!match) {
    view.replaceChildren(h("div", { class: "empty" }, h("p", {}, `No page at ${path}.`),
      h("a", { href: "#/models" }, "Go to Models")));
    return;
  }
  const [m, page] = match;
  const ctx = {
    params: m.slice(1),
    query,
    go: (hash) => { location.hash = hash; },
    flash,
    alive: () => mine === generation,
    /** Call fn now and then every `ms` (after each call finishes) until the page is left. */
    every(ms, fn) {
      let timer = null;
      const tick = async () => {
        if (mine !== generation) return;
        try {
          await fn();
        } catch (err) {
          if (mine === generation) flash(err.message, "error");
        }
        if (mine === generation) timer = setTimeout(tick, ms);
      };
      cleanups.push(() => clearTimeout(timer));
      timer = setTimeout(tick, ms);
    },
  };
  view.replaceChildren(h("div", { class: "loading" }, h("span", { class: "spinner" }), "Loading…"));
  try {
    const node = await page(ctx);
    if (mine === generation) view.replaceChildren(node);
  } catch (err) {
    if (mine !== generation) return;
    const message = err instanceof ApiError ? err.message : `The page failed: ${err.message}`;
    view.replaceChildren(h("div", { class: "alert alert-error", role: "alert" }, message));
  }
}

function setupToken() {
  const input = document.getElementById("token");
  const form = document.getElementById("token-form");
  const state = document.getElementById("token-state");
  const show = () => {
    state.textContent = getToken() ? "token set" : "no token";
    state.className = getToken() ? "token-state set" : "token-state";
  };
  input.value = getToken();
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    setToken(input.value.trim());
    show();
    flash(getToken() ? "API token kept for this tab." : "API token cleared.");
    if (view.querySelector(".alert-error")) render(); // a page that could not load without it: load it now
  });
  show();
}

/** Links to API documents (OpenAPI, metrics) need the token too: fetch them with it and show the text. */
function setupAuthedLinks() {
  document.querySelectorAll("a[data-authed]").forEach((a) => {
    a.addEventListener("click", async (e) => {
      e.preventDefault();
      try {
        const r = await fetch(a.getAttribute("href"), { headers: authHeaders({ Accept: "*/*" }) });
        const text = await r.text();
        if (!r.ok) throw new Error(`HTTP ${r.status}: ${text}`);
        const type = (r.headers.get("Content-Type") || "text/plain").split(";")[0];
        window.open(URL.createObjectURL(new Blob([text], { type })), "_blank", "noopener");
      } catch (err) {
        flash(`Could not open ${a.getAttribute("href")}: ${err.message}`, "error");
      }
    });
  });
}

/** The failing checks of /readyz, one line each; the worker's agents are checks of their own. */
function failingChecks(checks) {
  const flat = Object.entries(checks || {}).flatMap(([name, check]) =>
    name === "agents" ? Object.entries(check).map(([agent, c]) => [`agent ${agent}`, c]) : [[name, check]]);
  return flat.filter(([, c]) => !c.ok).map(([name, c]) => `${name}: ${c.error || JSON.stringify(c)}`);
}

/** The sandbox isolation in force (as the worker reports it in /readyz), in the footer; a warning when model
 * code runs without isolation or the sandbox refuses to run it. */
function showIsolation(sandbox) {
  const el = document.getElementById("isolation");
  if (!sandbox || !sandbox.level) {
    el.hidden = true;
    return "";
  }
  const problem = sandbox.error || sandbox.warning || (sandbox.level === "none" ? "model code runs without isolation" : "");
  el.hidden = false;
  el.className = `isolation${problem ? " warn" : ""}`;
  el.textContent = `model code sandbox: ${sandbox.level}${problem ? " (!)" : ""}`;
  el.title = Object.entries(sandbox).map(([k, v]) => `${k}: ${v}`).join("\n");
  return `sandbox: ${sandbox.level}${problem ? ` (${problem})` : ""}`;
}

async function health() {
  const dot = document.getElementById("health");
  try {
    const r = await fetch("/readyz", { headers: { Accept: "application/json" } });
    const data = await r.json();
    const sandbox = showIsolation(data.sandbox);
    dot.className = `health ${data.ready ? "ok" : "bad"}`;
    dot.textContent = data.ready ? "ready" : "not ready";
    dot.title = [data.ready ? "broker, Postgres, projector and the worker's agents are fine"
      : failingChecks(data.checks).join("\n"), sandbox].filter(Boolean).join("\n");
  } catch (err) {
    dot.className = "health bad";
    dot.textContent = "API unreachable";
    dot.title = String(err);
  }
  setTimeout(health, 5000);
}

window.addEventListener("hashchange", render);
setupToken();
setupAuthedLinks();
health();
render();
