// Models: the list with a filter, the create/edit form (upper-model picker, code editor), delete.

import { all, del, get, post, put } from "../api.js";
import {
  busy, card, codeEditor, confirmButton, empty, field, formError, h, link, num, pageHeader, shape, table,
} from "../dom.js";

function chainOf(model, byId) {
  // The models above `model`, following upper links (stops on a cycle, which the API forbids anyway).
  const names = [];
  const seen = new Set();
  let cursor = model.upper_id ? byId.get(model.upper_id) : null;
  while (cursor && !seen.has(cursor.id)) {
    seen.add(cursor.id);
    names.push(cursor.name);
    cursor = cursor.upper_id ? byId.get(cursor.upper_id) : null;
  }
  return names;
}

function kind(m, byId) {
  if (!m.distributed) return h("span", { class: "tag" }, "single");
  const position = m.upper_id ? (m.lower_id ? "middle" : "bottom") : "top";
  return h("span", { class: "tag tag-dist", title: `distributed: ${position} of its chain` },
    `distributed · ${position}`);
}

export async function list(ctx) {
  const nameFilter = h("input", { type: "search", name: "filter", placeholder: "Filter by name…",
    value: ctx.query.get("name") || "", "aria-label": "filter models by name" });
  const kindFilter = h("select", { name: "kind", "aria-label": "filter models by kind" },
    h("option", { value: "" }, "All models"), h("option", { value: "true" }, "Distributed"),
    h("option", { value: "false" }, "Single"));
  kindFilter.value = ctx.query.get("distributed") || "";
  const holder = h("div", { class: "list-holder" });

  const load = async () => {
    const q = new URLSearchParams();
    if (nameFilter.value.trim()) q.set("name", nameFilter.value.trim());
    if (kindFilter.value) q.set("distributed", kindFilter.value);
    const [shown, everything] = await Promise.all([all(`/models?${q}`), all("/models")]);
    const byId = new Map(everything.map((m) => [m.id, m]));
    if (!shown.length) {
      holder.replaceChildren(everything.length
        ? empty("No model matches the filter.")
        : empty("No models yet. Register Keras code to get started.",
          link("#/models/new", "Register a model", { class: "btn btn-primary" })));
      return;
    }
    holder.replaceChildren(table([
      { label: "ID", cell: (m) => `#${m.id}`, class: "num" },
      { label: "Name", cell: (m) => h("div", {}, h("b", {}, m.name),
        m.description ? h("div", { class: "muted small" }, m.description) : null) },
      { label: "Kind", cell: (m) => kind(m, byId) },
      { label: "Chain above", cell: (m) => {
        const above = chainOf(m, byId);
        return above.length ? h("span", { class: "chain" }, [m.name, ...above].join(" → ")) : "–";
      } },
      { label: "Input", cell: (m) => h("code", {}, shape(m.input_shape)) },
      { label: "Outputs", cell: (m) => h("code", {}, (m.output_shapes || []).map(shape).join(" ")) },
      { label: "Params", cell: (m) => num(m.params), class: "num" },
      { label: "Version", cell: (m) => `v${m.version}`, class: "num" },
      { label: "", class: "row-actions", cell: (m) => [
        link(`#/models/${m.id}/edit`, "Edit", { class: "btn btn-secondary btn-sm" }),
        confirmButton("Delete", "Confirm delete", async () => {
          try {
            await del(`/models/${m.id}`);
            ctx.flash(`Model '${m.name}' deleted.`);
            await load();
          } catch (err) {
            ctx.flash(err.message, "error");
          }
        }, { class: "btn btn-danger btn-sm" }),
      ] },
    ], shown));
  };

  let debounce = null;
  nameFilter.addEventListener("input", () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => load().catch((e) => ctx.flash(e.message, "error")), 200);
  });
  kindFilter.addEventListener("change", () => load().catch((e) => ctx.flash(e.message, "error")));
  await load();
  return h("div", {},
    pageHeader("Models", "Keras code per tier. A distributed model names its upper model (the next tier up).",
      link("#/models/new", "New model", { class: "btn btn-primary" })),
    h("div", { class: "toolbar" }, nameFilter, kindFilter),
    card(null, holder));
}

export async function edit(ctx) {
  const id = ctx.params[0] ? Number(ctx.params[0]) : null;
  const [model, models] = await Promise.all([id ? get(`/models/${id}`) : null, all("/models")]);
  const byId = new Map(models.map((m) => [m.id, m]));
  const name = h("input", { name: "name", required: true, maxlength: 64, value: model?.name || "",
    placeholder: "e.g. edge" });
  const description = h("input", { name: "description", value: model?.description || "",
    placeholder: "optional" });
  const distributed = h("input", { type: "checkbox", name: "distributed", checked: model?.distributed });
  const upper = h("select", { name: "upper_id" });
  const chainPreview = h("p", { class: "hint chain-preview" });
  // An upper model is distributed and has no other lower model (a chain does not branch).
  const candidates = models.filter((m) => m.distributed && m.id !== id && (!m.lower_id || m.lower_id === id));
  upper.append(h("option", { value: "" }, "— none: this is the top of its chain —"),
    ...candidates.map((m) => h("option", { value: m.id },
      `${m.name} (#${m.id}) · takes ${shape(m.input_shape)}`)));
  upper.value = model?.upper_id ? String(model.upper_id) : "";
  const imports = h("textarea", { name: "imports", class: "code-input code-small", rows: 2, spellcheck: "false",
    placeholder: "optional, e.g. import numpy as np" });
  imports.value = model?.imports || "";
  const editor = codeEditor("code", model?.code || "", {
    placeholder: "model = keras.Sequential([...])   # tf and keras are available without imports",
  });

  const syncUpper = () => {
    upper.disabled = !distributed.checked;
    if (!distributed.checked) upper.value = "";
    const me = name.value.trim() || "this model";
    const above = upper.value ? [byId.get(Number(upper.value)).name,
      ...chainOf(byId.get(Number(upper.value)), byId)] : [];
    chainPreview.textContent = distributed.checked
      ? `Chain: ${[me, ...above].join(" → ")}${above.length ? "" : " (top)"}. A model with an upper model ` +
        "has two outputs [tensor_to_upper, probabilities]; the top model has one."
      : "A single model has one output (probabilities).";
  };
  distributed.addEventListener("change", syncUpper);
  upper.addEventListener("change", syncUpper);
  name.addEventListener("input", syncUpper);
  syncUpper();

  const form = h("form", { class: "form", novalidate: true },
    formError(),
    h("div", { class: "grid-2" },
      field("Name", name),
      field("Description", description)),
    h("div", { class: "grid-2" },
      h("div", { class: "field", "data-field": "distributed" },
        h("label", { class: "check" }, distributed, " Distributed (part of an edge → fog → cloud chain)")),
      field("Upper model (next tier up)", upper)),
    chainPreview,
    field("Imports", imports),
    h("div", { class: "field", "data-field": "code" },
      h("label", {}, "Keras code"), editor.element,
      h("p", { class: "hint" }, "Built in a sandbox when you save: syntax, imports and the model's shapes are " +
        "checked, and errors are shown here. Tab indents, Shift+Tab outdents.")),
    h("div", { class: "form-actions" },
      h("button", { type: "submit", class: "btn btn-primary" }, model ? "Save changes" : "Register model"),
      link("#/models", "Cancel", { class: "btn btn-ghost" })));

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(form, "Validating the code…", async () => {
      const body = {
        name: name.value.trim(), description: description.value, imports: imports.value,
        code: editor.area.value, distributed: distributed.checked,
        upper_id: upper.value ? Number(upper.value) : null,
      };
      if (model) {
        // Unchanged code is not sent, so it is not rebuilt in the sandbox (a rebuild costs seconds).
        if (body.code === model.code) delete body.code;
        if (body.imports === (model.imports || "")) delete body.imports;
      }
      const saved = model
        ? await put(`/models/${model.id}`, { ...body, expected_version: model.version })
        : await post("/models", body);
      ctx.flash(`Model '${saved.name || body.name}' ${model ? "saved" : "registered"}` +
        (saved.input_shape ? `: input ${shape(saved.input_shape)}, ${num(saved.params)} parameters.` : "."));
      ctx.go("#/models");
    });
  });
  return h("div", {},
    pageHeader(model ? `Edit model '${model.name}'` : "New model",
      model ? `Version ${model.version}; saving creates version ${model.version + 1}.`
        : "Register Keras code (Kafka-ML snippets work as written)."),
    card(null, form),
    model ? h("p", { class: "muted small" }, `Current build: input ${shape(model.input_shape)} · outputs ${
      (model.output_shapes || []).map(shape).join(" ")} · ${num(model.params)} parameters`) : null);
}
