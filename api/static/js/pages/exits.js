// A chain's calibrated exits (#/results/{id}/exits): the calibration table per exit and the exit frontier of
// the chain entered at the result's tier, against the share answered early or the compute per input; the
// chosen and the live observed point of an inference serving it; a picked point leads to the inference form,
// pre-filled with the target that selects it.

import { all, get } from "../api.js";
import {
  TARGET_KINDS, TARGET_LABELS, axisToggle, calibrationTable, choose, entryFrontier, frontierChart, inferenceMarks,
  pointSummary, targetFor,
} from "../frontier.js";
import { card, h, link, pageHeader } from "../dom.js";

export async function detail(ctx) {
  const id = Number(ctx.params[0]);
  let exits;
  try {
    exits = await get(`/results/${id}/exits`);
  } catch (err) {
    if (err.status !== 409) throw err;
    return h("div", {}, pageHeader(`Exits of result #${id}`, "Calibration and exit frontier"),
      h("div", { class: "alert alert-info", role: "status" }, err.message));
  }
  const names = exits.exits.map((e) => e.model_name || `#${e.result_id}`);
  const chainText = names.join(" → ");
  const state = { entry: Math.max(0, exits.chain.indexOf(id)), xMode: "early", split: "validation",
    selected: null, inference: "" };
  const body = h("div", {});
  const inferences = (await all("/inferences")).filter((i) => i.predicted && exits.chain.includes(i.result_id));

  const entrySelect = h("select", { name: "entry" }, exits.chain.map((rid, k) =>
    h("option", { value: k }, `tier ${k}: ${names[k]} (result #${rid})`)));
  entrySelect.value = String(state.entry);
  entrySelect.addEventListener("change", () => {
    state.entry = Number(entrySelect.value);
    state.selected = null;
    draw();
  });
  const splitSelect = h("select", { name: "split" }, h("option", { value: "validation" }, "validation split"),
    h("option", { value: "test" }, "test split"));
  splitSelect.addEventListener("change", () => {
    state.split = splitSelect.value;
    draw();
  });
  const infSelect = h("select", { name: "inference" }, h("option", { value: "" }, "none"),
    inferences.map((i) => h("option", { value: i.id }, `#${i.id} (${i.status}, ${Object.entries(i.target || {})
      .map(([k, v]) => `${k} ${v}`).join("")})`)));
  infSelect.addEventListener("change", () => {
    state.inference = infSelect.value;
    draw();
  });

  let drawing = 0;
  async function draw() {
    const mine = ++drawing;
    const frontier = exits.frontier;
    const front = entryFrontier(frontier, state.entry);
    if (!front) {
      body.replaceChildren(h("div", { class: "alert alert-info" }, exits.reason || "No frontier for this entry."));
      return;
    }
    const shown = state.split === "test" ? entryFrontier(frontier, state.entry, { split: "test" }) || front : front;
    const testFront = front.hasTest ? entryFrontier(frontier, state.entry, { split: "test" }) : null;
    const tierNames = names.slice(state.entry);
    let marks = [];
    const inf = inferences.find((i) => String(i.id) === state.inference);
    if (inf && (inf.predicted.entry ?? 0) === state.entry) {
      const stats = await get(`/inferences/${inf.id}/stats`).catch(() => null);
      if (mine !== drawing) return;
      marks = inferenceMarks(inf, stats, shown, state.xMode);
    }
    const chart = frontierChart({ front: shown, xMode: state.xMode, selected: state.selected, marks,
      onPick: (p) => { state.selected = p; draw(); } });
    const picked = state.selected === null ? h("p", { class: "muted small picked-hint" },
      "Click a point of the frontier (or use the slider) to see what it does and to deploy it.")
      : pickedPanel(front, testFront, state.selected, tierNames, exits.chain[state.entry]);
    body.replaceChildren(
      h("div", { class: "toolbar frontier-toolbar" }, axisToggle(state.xMode, (x) => { state.xMode = x; draw(); }),
        h("label", { class: "inline-label" }, "entry ", entrySelect),
        h("label", { class: "inline-label" }, "split ", splitSelect),
        inferences.length ? h("label", { class: "inline-label" }, "mark inference ", infSelect) : null),
      chart, picked);
  }
  await draw();
  return h("div", {},
    pageHeader(`Exits of ${chainText}`, `result #${id} · the chain's calibration per exit and its exit frontier`,
      link("#/deployments", "Deployments", { class: "btn btn-ghost" })),
    card("Calibration per exit", calibrationTable(exits.exits),
      h("p", { class: "hint" }, "T is fitted on the validation split; accuracy and expected calibration error " +
        "(ECE, 15 bins) are measured on the test split. A tier serving limits from a target compares " +
        "max(softmax(log p / T)). docs/exits.md says what each number means.")),
    card("Exit frontier", body,
      h("p", { class: "hint" }, "Each point is one limit per non-top tier on the calibrated confidence; the " +
        "frontier keeps the points no other beats on both accuracy and the x axis. A target picks the cheapest " +
        "point whose one-sided 90% bound (over the validation samples) meets it.")));
}

function pickedPanel(front, testFront, p, tierNames, entryResult) {
  const rows = TARGET_KINDS.map((kind) => {
    const value = targetFor(front, p, kind);
    const chosen = value === null ? null : choose(front, kind, value);
    const verdict = value === null ? "no target of this kind selects it"
      : chosen === p ? "selects this point" : `selects point ${chosen} instead (it meets the same target ` +
        (kind === "max_top_share" ? "more accurately)" : "more cheaply)");
    return h("tr", { "data-kind": kind },
      h("td", {}, h("code", {}, kind), h("div", { class: "muted small" }, TARGET_LABELS[kind])),
      h("td", { class: "num" }, value === null ? "—" : String(value)),
      h("td", {}, verdict),
      h("td", { class: "row-actions" }, value === null ? null : link(
        `#/inferences/new?result=${entryResult}&point=${p}&kind=${kind}`, "Deploy with this target",
        { class: "btn btn-primary btn-sm", "data-kind": kind })));
  });
  return h("div", { class: "picked" }, pointSummary(front, p, tierNames, testFront),
    h("h3", {}, "Targets that select it"),
    h("table", { class: "table table-compact targets" },
      h("thead", {}, h("tr", {}, h("th", {}, "Target"), h("th", { class: "num" }, "Value"), h("th", {}, "The decider"),
        h("th", {}, ""))), h("tbody", {}, rows)));
}
