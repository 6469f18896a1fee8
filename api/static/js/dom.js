// Small DOM helpers: elements are built with h() (text is always set as text, never parsed as HTML).

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "value") el.value = value;
    else if (key === "checked" || key === "selected" || key === "disabled") el[key] = Boolean(value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

export const STATUS_CLASS = {
  created: "neutral", queued: "neutral", deployed: "info", training: "info", running: "ok", finished: "ok",
  failed: "bad", stopped: "warn", rejected: "bad", accepted: "ok",
};

export function badge(status, title) {
  return h("span", { class: `badge badge-${STATUS_CLASS[status] || "neutral"}`, title, "data-status": status },
    status);
}

export function shape(s) {
  if (!Array.isArray(s)) return "–";
  return "(" + s.map((d) => (d === null ? "None" : d)).join(", ") + ")";
}

export function num(x, digits = 4) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (Number.isInteger(x)) return x.toLocaleString("en");
  return Number(x).toFixed(digits);
}

export function pct(x) {
  return x === null || x === undefined ? "–" : `${(x * 100).toFixed(1)} %`;
}

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString("en-GB", { dateStyle: "short", timeStyle: "medium" });
}

export function pageHeader(title, subtitle, ...actions) {
  return h("div", { class: "page-header" },
    h("div", {}, h("h1", {}, title), subtitle ? h("p", { class: "subtitle" }, subtitle) : null),
    h("div", { class: "actions" }, ...actions));
}

export function card(title, ...children) {
  return h("section", { class: "card" }, title ? h("h2", { class: "card-title" }, title) : null, ...children);
}

export function empty(text, ...extra) {
  return h("div", { class: "empty" }, h("p", {}, text), ...extra);
}

/** A table from column specs {label, cell(row) -> node|text, class?}; rows get data-id. */
export function table(columns, rows, { rowClass } = {}) {
  return h("div", { class: "table-wrap" },
    h("table", { class: "table" },
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.class }, c.label)))),
      h("tbody", {}, rows.map((row) => h("tr", { "data-id": row.id, class: rowClass ? rowClass(row) : null },
        columns.map((c) => h("td", { class: c.class, "data-label": c.label }, c.cell(row))))))));
}

export function link(href, text, attrs = {}) {
  return h("a", { href, ...attrs }, text);
}

export function button(text, onclick, { kind = "secondary", ...attrs } = {}) {
  return h("button", { type: "button", class: `btn btn-${kind}`, onclick, ...attrs }, text);
}

/** A button that asks for a second click before it acts (no modal dialogs). */
export function confirmButton(text, confirmText, action, attrs = {}) {
  let armed = false;
  let timer = null;
  const btn = button(text, async () => {
    if (!armed) {
      armed = true;
      btn.textContent = confirmText;
      btn.classList.add("btn-armed");
      timer = setTimeout(() => {
        armed = false;
        btn.textContent = text;
        btn.classList.remove("btn-armed");
      }, 4000);
      return;
    }
    clearTimeout(timer);
    btn.disabled = true;
    try {
      await action();
    } finally {
      btn.disabled = false;
      armed = false;
      btn.textContent = text;
      btn.classList.remove("btn-armed");
    }
  }, { kind: "danger", ...attrs });
  return btn;
}

export function field(label, control, hint) {
  const id = control.id || `f-${control.getAttribute("name") || Math.random().toString(36).slice(2)}`;
  control.id = id;
  return h("div", { class: "field", "data-field": control.getAttribute("name") },
    h("label", { for: id }, label), control, hint ? h("p", { class: "hint" }, hint) : null);
}

/** Show an API error on a form: a summary at the top and, when it names a field, next to that field. */
export function showFormError(form, err) {
  clearFormError(form);
  const box = form.querySelector(".form-error");
  const where = err.field ? ` (field: ${err.field})` : "";
  box.replaceChildren(h("strong", {}, errorTitle(err)), " ", err.message + where);
  box.hidden = false;
  const base = err.field ? String(err.field).split(/[.[]/)[0] : null;
  const wrap = base && form.querySelector(`[data-field="${base}"]`);
  if (wrap) {
    wrap.classList.add("invalid");
    wrap.append(h("p", { class: "field-error" }, err.message));
    // A build error that names a line marks it in the editor's gutter.
    const line = /\bline (\d+)\b/.exec(err.message);
    const gutter = wrap.querySelector(".code-gutter");
    if (line && gutter && gutter.children[Number(line[1]) - 1]) {
      gutter.children[Number(line[1]) - 1].classList.add("error-line");
    }
  }
}

export function clearFormError(form) {
  const box = form.querySelector(".form-error");
  if (box) box.hidden = true;
  form.querySelectorAll(".field.invalid").forEach((f) => f.classList.remove("invalid"));
  form.querySelectorAll(".field-error").forEach((e) => e.remove());
  form.querySelectorAll(".error-line").forEach((e) => e.classList.remove("error-line"));
}

export function errorTitle(err) {
  return {
    401: "Not authorised.", 404: "Not found.", 409: "Conflict.", 413: "Too large.", 422: "Invalid.",
    503: "Unavailable.",
  }[err.status] || "Error.";
}

export function formError() {
  return h("div", { class: "alert alert-error form-error", role: "alert", hidden: true });
}

/** Run a form's submit action with the button busy; errors land on the form. */
export async function busy(form, label, action) {
  const submit = form.querySelector("button[type=submit]");
  const before = submit ? submit.textContent : "";
  if (submit) {
    submit.disabled = true;
    submit.replaceChildren(h("span", { class: "spinner" }), label);
  }
  clearFormError(form);
  try {
    return await action();
  } catch (err) {
    showFormError(form, err);
    return undefined;
  } finally {
    if (submit) {
      submit.disabled = false;
      submit.textContent = before;
    }
  }
}

/** A code editor: a monospace textarea with line numbers, Tab/Shift+Tab indenting and auto-indent. */
export function codeEditor(name, value = "", { rows = 18, placeholder = "" } = {}) {
  const area = h("textarea", { name, class: "code-input", rows, spellcheck: "false", autocomplete: "off",
    autocapitalize: "off", wrap: "off", placeholder });
  area.value = value;
  const gutter = h("div", { class: "code-gutter", "aria-hidden": "true" });
  const status = h("div", { class: "code-status" });
  const refresh = () => {
    const lines = area.value.split("\n").length;
    if (gutter.childElementCount !== lines) {
      gutter.replaceChildren(...Array.from({ length: lines }, (_, i) => h("div", {}, String(i + 1))));
    }
    const before = area.value.slice(0, area.selectionStart).split("\n");
    status.textContent = `Ln ${before.length}, Col ${before[before.length - 1].length + 1} · ${lines} lines`;
  };
  area.addEventListener("input", refresh);
  area.addEventListener("keyup", refresh);
  area.addEventListener("click", refresh);
  area.addEventListener("scroll", () => { gutter.scrollTop = area.scrollTop; });
  area.addEventListener("keydown", (e) => {
    const { selectionStart: start, selectionEnd: end, value: text } = area;
    if (e.key === "Tab") {
      e.preventDefault();
      const lineStart = text.lastIndexOf("\n", start - 1) + 1;
      if (e.shiftKey) {
        const cut = text.slice(lineStart, lineStart + 4).match(/^ {0,4}/)[0].length;
        area.setRangeText("", lineStart, lineStart + cut, "preserve");
        area.setSelectionRange(Math.max(lineStart, start - cut), Math.max(lineStart, end - cut));
      } else if (start !== end && text.slice(start, end).includes("\n")) {
        const block = text.slice(lineStart, end).replace(/^/gm, "    ");
        area.setRangeText(block, lineStart, end, "select");
      } else {
        area.setRangeText("    ", start, end, "end");
      }
      refresh();
    } else if (e.key === "Enter" && !e.ctrlKey && !e.metaKey) {
      e.preventDefault();
      const lineStart = text.lastIndexOf("\n", start - 1) + 1;
      const line = text.slice(lineStart, start);
      let indent = line.match(/^\s*/)[0];
      if (/[:([{,]\s*$/.test(line) && !/,\s*$/.test(line)) indent += "    ";
      area.setRangeText("\n" + indent, start, end, "end");
      refresh();
    }
  });
  refresh();
  const wrap = h("div", { class: "code-editor" }, gutter, area);
  return { element: h("div", { class: "code-box" }, wrap, status), area, refresh };
}
