// Inferences: serve a finished result (and the chain above it) on Kafka topics, with typed limits or limits
// chosen from a target (picked on the chain's exit frontier); live exit distribution per tier, predicted vs
// observed shares and agreement with the top exit (the drift flag), latency and the latest predictions.

import { all, del, get, post } from "../api.js";
import { shareBars } from "../charts.js";
import {
  TARGET_KINDS, TARGET_LABELS, X_MODES, axisToggle, choose, entryFrontier, frontierChart, inferenceMarks,
  observedShares, pointSummary, prob, seconds, share, targetFor,
} from "../frontier.js";
import {
  badge, busy, card, confirmButton, empty, field, formError, h, link, num, pageHeader, pct, table, when,
} from "../dom.js";

const POLL_MS = 2000;

function tierChain(inf) {
  return inf.tiers.map((t) => t.model_name).join(" → ");
}

function actions(ctx, inf, after) {
  const out = [];
  if (inf.status === "running") {
    out.push(confirmButton("Stop", "Confirm stop", async () => {
      try {
        await post(`/inferences/${inf.id}/stop`);
        ctx.flash(`Inference #${inf.id} stopped; its tier workloads are removed.`, "warn");
        await after("stopped");
      } catch (err) {
        ctx.flash(err.message, "error");
      }
    }, { class: "btn btn-danger btn-sm" }));
  }
  out.push(confirmButton("Delete", "Confirm delete", async () => {
    try {
      await del(`/inferences/${inf.id}`);
      ctx.flash(`Inference #${inf.id} deleted.`);
      await after("deleted");
    } catch (err) {
      ctx.flash(err.message, "error");
    }
  }, { class: "btn btn-danger btn-sm" }));
  return out;
}

export async function list(ctx) {
  const holder = h("div", {});
  const load = async () => {
    const infs = await all("/inferences");
    if (!infs.length) {
      holder.replaceChildren(empty("No inferences yet. Deploy a finished training result for inference.",
        link("#/inferences/new", "New inference", { class: "btn btn-primary" })));
      return;
    }
    holder.replaceChildren(table([
      { label: "ID", cell: (i) => link(`#/inferences/${i.id}`, `#${i.id}`), class: "num" },
      { label: "Tiers", cell: (i) => h("span", { class: "chain" }, tierChain(i)) },
      { label: "Limits", cell: (i) => [i.tiers.map((t) => (t.top ? "top" : t.limit)).join(" / "), i.target
        ? h("div", { class: "muted small" }, `from ${Object.entries(i.target).map(([k, v]) => `${k} ${v}`).join("")}`)
        : null] },
      { label: "Topics", cell: (i) => h("span", { class: "mono small" }, `${i.input_topic} → ${i.output_topic}`) },
      { label: "Status", cell: (i) => badge(i.status) },
      { label: "Created", cell: (i) => when(i.created_at) },
      { label: "", class: "row-actions", cell: (i) => [
        link(`#/inferences/${i.id}`, "Open", { class: "btn btn-secondary btn-sm" }),
        ...actions(ctx, i, load)] },
    ], [...infs].reverse()));
  };
  await load();
  return h("div", {},
    pageHeader("Inferences", "Trained chains served on Kafka: each tier answers what it is confident about " +
      "and forwards the rest up.", link("#/inferences/new", "New inference", { class: "btn btn-primary" })),
    card(null, holder));
}

const LIMIT_HINT_TYPED = "A tier answers when max(probabilities) ≥ its limit, else forwards up (Kafka-ML).";
const PICK_HINT = "A click on a point fills a target, not typed limits: the frontier's limits are on the " +
  "calibrated confidence max(softmax(log p / T)), which a tier compares only when its limits come from a target; " +
  "a typed limit compares the raw max(p), as Kafka-ML does, so the same number would answer other inputs. The " +
  "value filled in is the point's own one-sided 90% bound, the number the decider checks; the line above the " +
  "chart says which point that target selects.";

export async function create(ctx) {
  const results = (await all("/results")).filter((r) => r.status === "finished");
  const byId = new Map(results.map((r) => [r.id, r]));
  const entry = h("select", { name: "result_id" }, results.map((r) =>
    h("option", { value: r.id }, `#${r.id} ${r.model_name} (deployment #${r.deployment_id})`)));
  if (ctx.query.get("result")) entry.value = ctx.query.get("result");
  const inputTopic = h("input", { name: "input_topic", required: true });
  const outputTopic = h("input", { name: "output_topic", required: true });
  const limit = h("input", { name: "limit", type: "number", min: 0, max: 1.01, step: 0.01, value: 0.8 });
  const replicas = h("input", { name: "replicas", type: "number", min: 1, value: 1 });
  const format = h("select", { name: "input_format" }, h("option", { value: "RAW" }, "RAW"),
    h("option", { value: "AVRO" }, "AVRO"));
  const config = h("textarea", { name: "input_config", class: "code-input code-small", rows: 6,
    spellcheck: "false" });
  const prefill = h("p", { class: "hint" });
  const tiersBox = h("div", { class: "tiers-form", "data-field": "tiers" });
  const mode = h("select", { name: "limits_from" },
    h("option", { value: "typed" }, "typed limits (the raw max(p), as Kafka-ML)"),
    h("option", { value: "target" }, "a target (tierflow chooses the limits)"));
  const kind = h("select", { name: "target_kind" }, TARGET_KINDS.map((k) => h("option", { value: k }, k)));
  const value = h("input", { name: "target_value", type: "number", step: "any", min: 0, max: 1, value: 0.01 });
  const shadow = h("input", { name: "shadow_fraction", type: "number", step: "any", min: 0, max: 1,
    placeholder: "0.02 (default)" });
  const kindHint = h("p", { class: "hint" });
  const limitField = field("Default limit", limit, LIMIT_HINT_TYPED);
  const targetFields = h("div", { class: "grid-2 target-fields", "data-field": "target" },
    h("div", { class: "field" }, h("label", { for: "f-target_kind" }, "Target"), kind, kindHint),
    field("Value", value, "Met with a one-sided 90% bound over the validation samples."));
  kind.id = "f-target_kind";
  const preview = h("p", { class: "target-preview small" });
  const frontierBox = h("div", { class: "frontier-box" });
  const fr = { exits: null, reason: null, entryIndex: 0, front: null, testFront: null, xMode: "early",
    selected: null, names: [] };

  const costInputs = () => [...tiersBox.querySelectorAll(".tier-cost")];
  const recompute = () => {
    fr.front = null;
    fr.testFront = null;
    if (!fr.exits || !fr.exits.frontier) return;
    const measured = fr.exits.frontier.costs_s.slice(fr.entryIndex);
    const costs = measured.map((c, k) => {
      const input = costInputs()[k];
      return input && input.value !== "" && Number(input.value) >= 0 ? Number(input.value) / 1000 : c;
    });
    fr.front = entryFrontier(fr.exits.frontier, fr.entryIndex, { costs });
    fr.testFront = fr.front && fr.front.hasTest
      ? entryFrontier(fr.exits.frontier, fr.entryIndex, { costs, split: "test" }) : null;
  };

  const render = () => {
    const targeted = mode.value === "target";
    limitField.hidden = targeted;
    targetFields.hidden = !targeted;
    mode.querySelector("option[value=target]").disabled = !fr.front;
    kindHint.textContent = TARGET_LABELS[kind.value];
    tiersBox.querySelectorAll(".tier-limit").forEach((i) => { i.hidden = targeted; });
    tiersBox.querySelectorAll(".tier-cost").forEach((i) => { i.disabled = !targeted; });
    let chosen = null;
    const v = Number(value.value);
    if (targeted && fr.front && value.value !== "" && Number.isFinite(v)) {
      chosen = choose(fr.front, kind.value, v);
      const pt = chosen === null ? null : fr.front.points[chosen];
      preview.replaceChildren(pt === null
        ? h("span", { class: "warn-text" }, `No point meets ${kind.value} ${v} with 90% confidence: the API will ` +
          "refuse it and name the best reachable value.")
        : h("span", {}, `${kind.value} ${v} selects point ${chosen}: limits `, h("b", {}, pt.limits.join(", ") ||
          "none"), ` on the calibrated confidence; predicted on the validation split: accuracy ${prob(pt.accuracy)} ` +
          `(top exit alone ${prob(fr.front.topAccuracy)}), ${share(pt.early)} answered below the top, ` +
          `${seconds(pt.cost)} per input.`, fr.selected !== null && fr.selected !== chosen
          ? ` The picked point ${fr.selected} meets it too; point ${chosen} does so ` +
            (kind.value === "max_top_share" ? "more accurately." : "more cheaply.") : ""));
      preview.dataset.point = chosen === null ? "" : String(chosen);
    } else {
      preview.replaceChildren();
      preview.dataset.point = "";
    }
    tiersBox.querySelectorAll(".tier-chosen").forEach((cell, k) => {
      const pt = chosen === null ? null : fr.front.points[chosen];
      cell.textContent = targeted ? (pt && k < pt.limits.length ? `${pt.limits[k]} (calibrated)` : "—") : "";
      cell.hidden = !targeted;
    });
    if (!fr.exits) {
      frontierBox.replaceChildren(h("p", { class: "muted small" }, fr.reason
        ? `No exit frontier for this chain, so no target: ${fr.reason}` : "Loading the exit frontier…"));
      return;
    }
    if (!fr.front) {
      frontierBox.replaceChildren(h("p", { class: "muted small" }, `No exit frontier for this chain, so no target: ${
        fr.exits.reason || "none was reported"}`));
      return;
    }
    const marks = [];
    if (chosen !== null) {
      const pt = fr.front.points[chosen];
      marks.push({ kind: "preview", x: X_MODES[fr.xMode].of(pt), y: pt.accuracy,
        title: `the target selects point ${chosen}` });
    }
    frontierBox.replaceChildren(
      h("div", { class: "toolbar" }, axisToggle(fr.xMode, (x) => { fr.xMode = x; render(); })),
      frontierChart({ front: fr.front, xMode: fr.xMode, selected: fr.selected, marks, onPick: pick,
        title: `Exit frontier entering at ${fr.names[0] || "this tier"}` }),
      h("p", { class: "hint" }, PICK_HINT),
      fr.selected === null ? null : pointSummary(fr.front, fr.selected, fr.names, fr.testFront));
  };

  function pick(p) {
    if (!fr.front) return;
    let v = targetFor(fr.front, p, kind.value);
    if (v === null) {
      const other = TARGET_KINDS.find((k) => targetFor(fr.front, p, k) !== null);
      if (other) {
        kind.value = other;
        v = targetFor(fr.front, p, other);
      }
    }
    fr.selected = p;
    if (v === null) {
      // It answers nothing below the top: typed limits above 1 do exactly that on any confidence.
      mode.value = "typed";
      tiersBox.querySelectorAll(".tier-limit").forEach((i, k) => { i.value = String(fr.front.points[p].limits[k]); });
    } else {
      mode.value = "target";
      value.value = String(v);
    }
    render();
  }

  const fill = async () => {
    const r = byId.get(Number(entry.value));
    if (!r) return;
    const slug = r.model_name.replace(/[^A-Za-z0-9._-]/g, "-");
    inputTopic.value = `tierflow.infer.${slug}.${r.id}.in`;
    outputTopic.value = `tierflow.infer.${slug}.${r.id}.out`;
    const sources = await all(`/datasources?deployment_id=${r.deployment_id}`);
    const latest = sources[sources.length - 1];
    if (latest) {
      format.value = latest.input_format;
      config.value = JSON.stringify(latest.input_config, null, 1);
      prefill.textContent = `Pre-filled from datasource #${latest.id} of deployment #${r.deployment_id}, ` +
        "as the training data was sent.";
    } else {
      config.value = "{}";
      prefill.textContent = `Deployment #${r.deployment_id} has no datasource; set the input format yourself.`;
    }
    const chain = r.chain && r.chain.length ? r.chain.slice(r.chain.indexOf(r.id)) : [r.id];
    const [allResults, exits] = await Promise.all([all(`/deployments/${r.deployment_id}/results`),
      get(`/results/${r.id}/exits`).catch((err) => {
        if (err.status !== 409) throw err;
        return { error: err.message };
      })]);
    fr.exits = exits.error ? null : exits;
    fr.reason = exits.error || null;
    fr.entryIndex = fr.exits ? Math.max(0, fr.exits.chain.indexOf(r.id)) : 0;
    fr.selected = null;
    const names = new Map(allResults.map((x) => [x.id, x.model_name]));
    fr.names = chain.map((rid) => names.get(rid) || `#${rid}`);
    const measured = fr.exits && fr.exits.frontier ? fr.exits.frontier.costs_s.slice(fr.entryIndex) : [];
    tiersBox.replaceChildren(table([
      { label: "Tier", cell: (t) => `${t.i}` , class: "num" },
      { label: "Model", cell: (t) => h("b", {}, names.get(t.rid) || `#${t.rid}`) },
      { label: "Limit", cell: (t) => (t.top ? h("span", { class: "muted" }, "top: always answers")
        : [h("input", { type: "number", class: "tier-limit", "data-result": t.rid, min: 0, max: 1.01, step: 0.01,
          placeholder: "default", "aria-label": `limit of tier ${t.i}` }),
        h("span", { class: "tier-chosen mono small", "data-result": t.rid, hidden: true })]) },
      { label: "Compute / sample", cell: (t) => h("input", { type: "number", class: "tier-cost", "data-result": t.rid,
        min: 0, step: "any", disabled: true, placeholder: typeof measured[t.i] === "number"
          ? `${(measured[t.i] * 1000).toPrecision(3)} ms (measured)` : "ms",
        "aria-label": `compute per sample of tier ${t.i}, ms`,
        title: "With a target: this tier's compute per sample on its device, in ms (the trainer's CPU is not " +
          "the device's); empty keeps the measured one." }) },
      { label: "Kafka cluster", cell: (t) => h("input", { class: "tier-servers", "data-result": t.rid,
        placeholder: "same as the API's", "aria-label": `bootstrap servers of tier ${t.i}` }) },
    ], chain.map((rid, i) => ({ id: rid, rid, i, top: i === chain.length - 1 }))));
    tiersBox.querySelectorAll(".tier-cost").forEach((i) => i.addEventListener("change", () => {
      recompute();
      render();
    }));
    recompute();
    if (!fr.front) mode.value = "typed";
    render();
  };
  entry.addEventListener("change", () => fill().catch((e) => ctx.flash(e.message, "error")));
  mode.addEventListener("change", render);
  kind.addEventListener("change", () => {
    if (fr.selected !== null) {
      const v = targetFor(fr.front, fr.selected, kind.value);
      if (v !== null) value.value = String(v);
    }
    render();
  });
  value.addEventListener("input", render);
  await fill();
  const point = ctx.query.get("point");
  if (point !== null && fr.front && fr.front.points[Number(point)]) {
    if (TARGET_KINDS.includes(ctx.query.get("kind"))) kind.value = ctx.query.get("kind");
    pick(Number(point));
  }

  const form = h("form", { class: "form", novalidate: true },
    formError(),
    results.length ? null : h("div", { class: "alert alert-info" },
      "No finished training result yet: train a deployment first."),
    h("div", { class: "grid-3" }, field("Entry result", entry,
      "Its chain from there up is served, one tier per sub-model."), field("Replicas", replicas),
    field("Shadow fraction", shadow, "Share of its answers a non-top tier also sends to the top, to measure its " +
      "live agreement.")),
    h("div", { class: "grid-2" }, field("Input topic", inputTopic), field("Output topic", outputTopic)),
    h("div", { class: "grid-2" }, field("Input format", format), field("Input config (JSON)", config)),
    prefill,
    h("div", { class: "grid-3" }, field("Limits from", mode, "A target needs the chain's exit frontier (trained " +
      "with validation samples)."), limitField),
    targetFields,
    preview,
    h("div", { class: "field", "data-field": "tiers" }, h("label", {}, "Tiers"), tiersBox),
    h("div", { class: "field" }, h("label", {}, "Exit trade-off"), frontierBox),
    h("div", { class: "form-actions" },
      h("button", { type: "submit", class: "btn btn-primary", disabled: !results.length }, "Deploy for inference"),
      link("#/inferences", "Cancel", { class: "btn btn-ghost" })));
  render();
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(form, "Deploying…", async () => {
      let inputConfig;
      try {
        inputConfig = JSON.parse(config.value || "{}");
      } catch (err) {
        const bad = new Error(`'input_config' is not valid JSON: ${err.message}`);
        bad.field = "input_config";
        bad.status = 422;
        throw bad;
      }
      const targeted = mode.value === "target";
      const tiers = [...tiersBox.querySelectorAll("tbody tr")].map((row) => {
        const rid = Number(row.dataset.id);
        const t = { result_id: rid };
        const l = row.querySelector(".tier-limit");
        const c = row.querySelector(".tier-cost");
        const s = row.querySelector(".tier-servers");
        if (!targeted && l && l.value !== "") t.limit = Number(l.value);
        if (targeted && c && c.value !== "") t.cost_s = Number(c.value) / 1000;
        if (s && s.value.trim()) t.bootstrap_servers = s.value.trim();
        return t;
      }).filter((t) => Object.keys(t).length > 1);
      const body = { result_id: Number(entry.value), input_topic: inputTopic.value.trim(),
        output_topic: outputTopic.value.trim(), replicas: Number(replicas.value),
        input_format: format.value, input_config: inputConfig };
      if (targeted) body.target = { [kind.value]: value.value === "" ? null : Number(value.value) };
      else body.limit = Number(limit.value);
      if (shadow.value !== "") body.shadow_fraction = Number(shadow.value);
      if (tiers.length) body.tiers = tiers;
      const inf = await post("/inferences", body);
      ctx.flash(`Inference #${inf.id} deployed: ${tierChain(inf)}${inf.target ? ` (limits ${inf.tiers
        .filter((t) => !t.top).map((t) => t.limit).join(", ")} from ${Object.entries(inf.target)
        .map(([k, v]) => `${k} ${v}`).join("")})` : ""}.`);
      ctx.go(`#/inferences/${inf.id}`);
    });
  });
  return h("div", {}, pageHeader("New inference", "Serve a trained result on Kafka topics."), card(null, form));
}

function predictedOf(inf, stats, k) {
  const fromStats = stats && stats.tiers && stats.tiers[k] && stats.tiers[k].predicted;
  return fromStats || (inf.tiers[k] && inf.tiers[k].predicted) || null;
}

function statsView(inf, stats) {
  const names = new Map(inf.tiers.map((t) => [t.index, t.model_name]));
  const lat = stats.latency_ms || {};
  return h("div", { class: "stats" },
    h("div", { class: "kpis" },
      kpi("Answers in window", num(stats.window)),
      kpi("Throughput", stats.throughput_per_s ? `${num(stats.throughput_per_s, 1)} /s` : "–"),
      kpi("Latency p50", lat.p50 === null || lat.p50 === undefined ? "–" : `${num(lat.p50, 1)} ms`),
      kpi("Latency p95", lat.p95 === null || lat.p95 === undefined ? "–" : `${num(lat.p95, 1)} ms`),
      kpi("Latency p99", lat.p99 === null || lat.p99 === undefined ? "–" : `${num(lat.p99, 1)} ms`)),
    h("h3", {}, "Exit distribution per tier"),
    shareBars(stats.tiers.map((t, k) => {
      const predicted = predictedOf(inf, stats, k);
      return {
        index: t.index, share: t.share, label: `${t.index} · ${t.model_name || names.get(t.index)}`,
        predicted: predicted && typeof predicted.share === "number" ? predicted.share : null,
        value: `${pct(t.share)} (${num(t.answered)})${t.latency_ms && t.latency_ms.p50 !== null
          ? ` · p50 ${num(t.latency_ms.p50, 1)} ms` : ""}${typeof t.lag === "number"
          ? ` · backlog ${num(t.lag)}` : ""}`,
      };
    })),
    stats.window ? null : h("p", { class: "muted small" }, `No answers yet. Send one sample's raw bytes to ` +
      `'${inf.input_topic}'; answers appear on '${inf.output_topic}'.`),
    (stats.unreachable || []).map((u) => h("p", { class: "alert alert-error" }, `Cluster unreachable: ${u}`)),
    h("h3", {}, "Predicted and live, per tier"),
    liveTable(inf, stats));
}

/** Per tier: the predicted share and agreement with the top exit (from the target's chosen point) next to the
 * observed share and the live agreement of its shadow samples, and the drift flag. "—" where a number is not
 * there (typed limits predict nothing; live agreement needs shadow samples). */
function liveTable(inf, stats) {
  const obs = observedShares(stats);
  const rows = inf.tiers.map((t, k) => {
    const predicted = predictedOf(inf, stats, k);
    const live = stats.tiers[k] && stats.tiers[k].live;
    const drift = live && typeof live.drift === "boolean" ? live.drift : null;
    return { id: t.index, t, predicted, live, drift, observed: obs ? obs[k] : null };
  });
  return table([
    { label: "Tier", cell: (r) => `${r.t.index} · ${r.t.model_name}` },
    { label: "Limit", class: "num", cell: (r) => (r.t.top ? "top" : `${r.t.limit} (${r.t.compare || "raw"})`) },
    { label: "Predicted share", class: "num pred-share", cell: (r) => share(r.predicted && r.predicted.share) },
    { label: "Observed share", class: "num obs-share", cell: (r) => share(r.observed) },
    { label: "Predicted agreement", class: "num pred-agreement", cell: (r) => (r.t.top ? "—"
      : r.predicted && typeof r.predicted.agreement === "number"
        ? `${prob(r.predicted.agreement)} (≥ ${prob(r.predicted.agreement_lower)})` : "—") },
    { label: "Live agreement", class: "num live-agreement", cell: (r) => (r.t.top ? "—"
      : r.live && typeof r.live.agreement === "number"
        ? `${prob(r.live.agreement)} (n ${num(r.live.n)}${typeof r.live.agreement_lower === "number"
          ? `, ≥ ${prob(r.live.agreement_lower)}` : ""})` : "—") },
    { label: "Drift", class: "drift", cell: (r) => (r.t.top || r.drift === null ? "—" : r.drift
      ? h("span", { class: "badge badge-bad", title: "the live agreement fell below the predicted 90% bound" },
        "drift") : h("span", { class: "badge badge-ok" }, "holds")) },
  ], rows);
}

/** The target and what its chosen point predicts, in one paragraph. */
function targetSummary(inf) {
  const p = inf.predicted;
  if (!inf.target || !p) {
    return h("p", { class: "muted small target-summary" }, "Typed limits: each tier compares the raw max(p), as " +
      "Kafka-ML does; nothing is predicted.");
  }
  const [kind, value] = Object.entries(inf.target)[0];
  return h("p", { class: "small target-summary" }, h("b", {}, `${kind} ${value}`),
    ` selected point ${p.point} of the frontier entering at tier ${p.entry}: limits ${p.limits.join(", ")} on the ` +
    `calibrated confidence. Predicted on ${num(p.n)} validation samples: cascade accuracy ${prob(p.accuracy)} ` +
    `(90% lower bound ${prob(p.accuracy_lower)}; the top exit alone ${prob(p.top_accuracy)}; drop ≤ ` +
    `${prob(p.accuracy_drop_upper)}), ${share(1 - p.shares[p.shares.length - 1])} answered below the top, ` +
    `${seconds(p.cost_s)} per input.${p.test ? ` On the test split (${num(p.test.n)}): accuracy ` +
      `${prob(p.test.accuracy)}, ${share(1 - p.test.shares[p.test.shares.length - 1])} below the top.` : ""}`);
}

function kpi(label, value) {
  return h("div", { class: "kpi" }, h("div", { class: "kpi-value" }, value), h("div", { class: "kpi-label" }, label));
}

function predictionsView(inf, preds) {
  if (!preds.items.length) return empty("No predictions on the output topic yet.");
  const names = new Map(inf.tiers.map((t) => [t.index, t.model_name]));
  return table([
    { label: "Time", cell: (p) => (p.timestamp_ms ? new Date(p.timestamp_ms).toLocaleTimeString("en-GB") : "–") },
    { label: "Tier", cell: (p) => (p.tier === null || p.tier === undefined ? "–"
      : `${p.tier} · ${names.get(p.tier) || ""}`) },
    { label: "Class", cell: (p) => h("b", {}, p.class === null || p.class === undefined ? "–" : String(p.class)),
      class: "num" },
    { label: "Confidence", cell: (p) => pct(p.confidence), class: "num" },
    { label: "Latency", cell: (p) => (typeof p.latency_ms === "number" ? `${num(p.latency_ms, 1)} ms` : "–"),
      class: "num" },
    { label: "Origin", cell: (p) => h("span", { class: "mono small" }, p.origin && typeof p.origin === "object"
      ? `${p.origin.topic ?? ""}:${p.origin.partition ?? ""}@${p.origin.offset ?? ""}` : (p.origin ?? "–")) },
  ], preds.items.slice(0, 25).map((p, i) => ({ ...p, id: i })));
}

export async function detail(ctx) {
  const id = Number(ctx.params[0]);
  let inf = await get(`/inferences/${id}`);
  const head = h("div", {});
  const tiers = h("div", {});
  const statsBox = h("div", {}, h("p", { class: "muted" }, "Loading statistics…"));
  const predsBox = h("div", {}, h("p", { class: "muted" }, "Loading predictions…"));
  const after = async (what) => {
    if (what === "deleted") ctx.go("#/inferences");
    else await refresh();
  };
  const drawHead = () => {
    head.replaceChildren(pageHeader(h("span", {}, `Inference #${id} `, badge(inf.status)),
      `${tierChain(inf)} · ${inf.input_topic} → ${inf.output_topic} · ${inf.input_format}`,
      link("#/inferences", "All inferences", { class: "btn btn-ghost" }), ...actions(ctx, inf, after)),
    targetSummary(inf));
    tiers.replaceChildren(table([
      { label: "Tier", cell: (t) => String(t.index), class: "num" },
      { label: "Model", cell: (t) => h("b", {}, t.model_name) },
      { label: "Result", cell: (t) => `#${t.result_id}` },
      { label: "Input topic", cell: (t) => h("span", { class: "mono small" }, t.input_topic) },
      { label: "Upper topic", cell: (t) => h("span", { class: "mono small" }, t.upper_topic || "– (top)") },
      { label: "Limit", cell: (t) => (t.top ? "always answers" : String(t.limit)), class: "num" },
      { label: "Compares", cell: (t) => (t.compare === "calibrated"
        ? `calibrated confidence (T ${num(t.temperature, 3)})` : "raw max(p)") },
      { label: "Replicas", cell: (t) => String(t.replicas), class: "num" },
      { label: "Cluster", cell: (t) => t.bootstrap_servers || "default" },
    ], inf.tiers.map((t) => ({ ...t, id: t.index }))));
  };
  let lastHead = "";
  const refresh = async () => {
    const [fresh, stats, preds] = await Promise.all([get(`/inferences/${id}`), get(`/inferences/${id}/stats`),
      get(`/inferences/${id}/predictions?limit=25`)]);
    inf = fresh;
    const snapshot = JSON.stringify(inf);
    if (snapshot !== lastHead) {
      lastHead = snapshot;
      drawHead();
    }
    statsBox.replaceChildren(statsView(inf, stats));
    predsBox.replaceChildren(predictionsView(inf, preds));
    lastStats = stats;
    drawFrontier();
  };
  // The chain's frontier, with the chosen point and the live one (limits from a target only).
  const frontierBox = h("div", {});
  const chart = { front: null, xMode: "early" };
  let lastStats = null;
  const drawFrontier = () => {
    if (!chart.front) return;
    frontierBox.replaceChildren(
      h("div", { class: "toolbar" }, axisToggle(chart.xMode, (x) => { chart.xMode = x; drawFrontier(); })),
      frontierChart({ front: chart.front, xMode: chart.xMode, marks: inferenceMarks(inf, lastStats, chart.front,
        chart.xMode), title: `Exit frontier entering at ${inf.tiers[0].model_name}` }),
      h("p", { class: "hint" }, "The ring is the point the target chose (validation split). The diamond is the " +
        "live one: the shares answered per tier as observed, and an estimated accuracy (live inputs have no " +
        "labels): the predicted accuracy less the agreement with the top exit lost live."));
  };
  if (inf.predicted) {
    get(`/results/${inf.result_id}/exits`).then((exits) => {
      chart.front = entryFrontier(exits.frontier, inf.predicted.entry ?? 0, { costs: inf.predicted.costs_s });
      drawFrontier();
    }).catch((e) => frontierBox.replaceChildren(h("p", { class: "muted small" },
      `The chain's frontier cannot be shown: ${e.message}`)));
  }
  drawHead();
  refresh().catch((e) => ctx.flash(e.message, "error"));
  ctx.every(POLL_MS, refresh);
  return h("div", {}, head, card("Live statistics", statsBox),
    inf.predicted ? card("Chosen and live point on the exit frontier", frontierBox) : null, card("Tiers", tiers),
    card("Latest predictions", predsBox));
}
