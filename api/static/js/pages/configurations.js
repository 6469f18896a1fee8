// Configurations: named sets of models deployed together (a chain's top model brings its whole chain).

import { all, del, post } from "../api.js";
import { busy, card, confirmButton, empty, field, formError, h, link, pageHeader, table, when } from "../dom.js";

/** The configuration's models grouped into chains (bottom first); single models stand alone. */
function groups(ids, byId) {
  const set = new Set(ids);
  const out = [];
  for (const id of ids) {
    const m = byId.get(id);
    if (m && m.lower_id && set.has(m.lower_id)) continue; // not the bottom of its chain here
    const chain = [id];
    let cursor = m;
    while (cursor && cursor.upper_id && set.has(cursor.upper_id) && !chain.includes(cursor.upper_id)) {
      chain.push(cursor.upper_id);
      cursor = byId.get(cursor.upper_id);
    }
    out.push(chain);
  }
  return out;
}

export async function list(ctx) {
  const holder = h("div", {});
  const load = async () => {
    const [confs, models] = await Promise.all([all("/configurations"), all("/models")]);
    const byId = new Map(models.map((m) => [m.id, m]));
    if (!confs.length) {
      holder.replaceChildren(empty("No configurations yet. Choose the models to deploy together.",
        link("#/configurations/new", "New configuration", { class: "btn btn-primary" })));
      return;
    }
    holder.replaceChildren(table([
      { label: "ID", cell: (c) => `#${c.id}`, class: "num" },
      { label: "Name", cell: (c) => h("div", {}, h("b", {}, c.name),
        c.description ? h("div", { class: "muted small" }, c.description) : null) },
      { label: "Models", cell: (c) => h("div", { class: "tags" }, groups(c.model_ids, byId).map((g) =>
        h("span", { class: g.length > 1 ? "tag tag-dist" : "tag", "data-models": g.join(",") },
          g.map((mid) => (byId.get(mid) ? byId.get(mid).name : `#${mid}`)).join(" → ")))) },
      { label: "Version", cell: (c) => `v${c.version}`, class: "num" },
      { label: "Created", cell: (c) => when(c.created_at) },
      { label: "", class: "row-actions", cell: (c) => [
        link(`#/deployments/new?configuration=${c.id}`, "Deploy", { class: "btn btn-primary btn-sm" }),
        confirmButton("Delete", "Confirm delete", async () => {
          try {
            await del(`/configurations/${c.id}`);
            ctx.flash(`Configuration '${c.name}' deleted.`);
            await load();
          } catch (err) {
            ctx.flash(err.message, "error");
          }
        }, { class: "btn btn-danger btn-sm" }),
      ] },
    ], confs));
  };
  await load();
  return h("div", {},
    pageHeader("Configurations", "Models to deploy for training together.",
      link("#/configurations/new", "New configuration", { class: "btn btn-primary" })),
    card(null, holder));
}

export async function create(ctx) {
  const models = await all("/models");
  const byId = new Map(models.map((m) => [m.id, m]));
  const name = h("input", { name: "name", required: true, maxlength: 64, placeholder: "e.g. thesis" });
  const description = h("input", { name: "description", placeholder: "optional" });
  const chainBelow = (m) => {
    const out = [m.name];
    let cursor = m.lower_id ? byId.get(m.lower_id) : null;
    while (cursor && !out.includes(cursor.name)) {
      out.unshift(cursor.name);
      cursor = cursor.lower_id ? byId.get(cursor.lower_id) : null;
    }
    return out;
  };
  const picks = h("div", { class: "check-list", "data-field": "model_ids" },
    models.length ? models.map((m) => h("label", { class: "check-row" },
      h("input", { type: "checkbox", name: "model", value: m.id }),
      h("span", {}, h("b", {}, m.name), ` #${m.id}`),
      h("span", { class: "muted small" }, m.distributed
        ? (m.lower_id ? `brings ${chainBelow(m).join(" → ")}` : (m.upper_id ? "bottom of a chain" : "distributed"))
        : "single model")))
      : h("p", { class: "muted" }, "Register a model first."));
  const form = h("form", { class: "form", novalidate: true },
    formError(),
    h("div", { class: "grid-2" }, field("Name", name), field("Description", description)),
    h("div", { class: "field", "data-field": "model_ids" }, h("label", {}, "Models"), picks,
      h("p", { class: "hint" }, "Choosing a chain's top model brings its whole lower chain (edge → fog → cloud).")),
    h("div", { class: "form-actions" },
      h("button", { type: "submit", class: "btn btn-primary" }, "Create configuration"),
      link("#/configurations", "Cancel", { class: "btn btn-ghost" })));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(form, "Creating…", async () => {
      const ids = [...picks.querySelectorAll("input:checked")].map((i) => Number(i.value));
      const conf = await post("/configurations", { name: name.value.trim(), description: description.value,
        model_ids: ids });
      ctx.flash(`Configuration '${conf.name}' created with models ${conf.model_ids.map((i) => `#${i}`).join(", ")}.`);
      ctx.go("#/configurations");
    });
  });
  return h("div", {}, pageHeader("New configuration", "Pick the models to train together."), card(null, form));
}
