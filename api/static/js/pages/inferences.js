// Inferences: serve a finished result (and the chain above it) on Kafka topics; live exit distribution
// per tier, latency and the latest predictions.

import { all, del, get, post } from "../api.js";
import { shareBars } from "../charts.js";
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
      { label: "Limits", cell: (i) => i.tiers.map((t) => (t.top ? "top" : t.limit)).join(" / ") },
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
    const allResults = await all(`/deployments/${r.deployment_id}/results`);
    const names = new Map(allResults.map((x) => [x.id, x.model_name]));
    tiersBox.replaceChildren(table([
      { label: "Tier", cell: (t) => `${t.i}` , class: "num" },
      { label: "Model", cell: (t) => h("b", {}, names.get(t.rid) || `#${t.rid}`) },
      { label: "Limit", cell: (t) => (t.top ? h("span", { class: "muted" }, "top: always answers")
        : h("input", { type: "number", class: "tier-limit", "data-result": t.rid, min: 0, max: 1.01, step: 0.01,
          placeholder: "default", "aria-label": `limit of tier ${t.i}` })) },
      { label: "Kafka cluster", cell: (t) => h("input", { class: "tier-servers", "data-result": t.rid,
        placeholder: "same as the API's", "aria-label": `bootstrap servers of tier ${t.i}` }) },
    ], chain.map((rid, i) => ({ id: rid, rid, i, top: i === chain.length - 1 }))));
  };
  entry.addEventListener("change", () => fill().catch((e) => ctx.flash(e.message, "error")));
  await fill();

  const form = h("form", { class: "form", novalidate: true },
    formError(),
    results.length ? null : h("div", { class: "alert alert-info" },
      "No finished training result yet: train a deployment first."),
    h("div", { class: "grid-3" }, field("Entry result", entry,
      "Its chain from there up is served, one tier per sub-model."), field("Default limit", limit,
      "A tier answers when max(probabilities) ≥ limit, else forwards up."), field("Replicas", replicas)),
    h("div", { class: "grid-2" }, field("Input topic", inputTopic), field("Output topic", outputTopic)),
    h("div", { class: "grid-2" }, field("Input format", format), field("Input config (JSON)", config)),
    prefill,
    h("div", { class: "field", "data-field": "tiers" }, h("label", {}, "Tiers"), tiersBox),
    h("div", { class: "form-actions" },
      h("button", { type: "submit", class: "btn btn-primary", disabled: !results.length }, "Deploy for inference"),
      link("#/inferences", "Cancel", { class: "btn btn-ghost" })));
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
      const tiers = [...tiersBox.querySelectorAll("tbody tr")].map((row) => {
        const rid = Number(row.dataset.id);
        const t = { result_id: rid };
        const l = row.querySelector(".tier-limit");
        const s = row.querySelector(".tier-servers");
        if (l && l.value !== "") t.limit = Number(l.value);
        if (s && s.value.trim()) t.bootstrap_servers = s.value.trim();
        return t;
      }).filter((t) => Object.keys(t).length > 1);
      const body = { result_id: Number(entry.value), input_topic: inputTopic.value.trim(),
        output_topic: outputTopic.value.trim(), limit: Number(limit.value), replicas: Number(replicas.value),
        input_format: format.value, input_config: inputConfig };
      if (tiers.length) body.tiers = tiers;
      const inf = await post("/inferences", body);
      ctx.flash(`Inference #${inf.id} deployed: ${tierChain(inf)}.`);
      ctx.go(`#/inferences/${inf.id}`);
    });
  });
  return h("div", {}, pageHeader("New inference", "Serve a trained result on Kafka topics."), card(null, form));
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
    shareBars(stats.tiers.map((t) => ({
      index: t.index, share: t.share, label: `${t.index} · ${t.model_name || names.get(t.index)}`,
      value: `${pct(t.share)} (${num(t.answered)})${t.latency_ms && t.latency_ms.p50 !== null
        ? ` · p50 ${num(t.latency_ms.p50, 1)} ms` : ""}${typeof t.lag === "number" ? ` · backlog ${num(t.lag)}` : ""}`,
    }))),
    stats.window ? null : h("p", { class: "muted small" }, `No answers yet. Send one sample's raw bytes to ` +
      `'${inf.input_topic}'; answers appear on '${inf.output_topic}'.`),
    (stats.unreachable || []).map((u) => h("p", { class: "alert alert-error" }, `Cluster unreachable: ${u}`)));
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
      link("#/inferences", "All inferences", { class: "btn btn-ghost" }), ...actions(ctx, inf, after)));
    tiers.replaceChildren(table([
      { label: "Tier", cell: (t) => String(t.index), class: "num" },
      { label: "Model", cell: (t) => h("b", {}, t.model_name) },
      { label: "Result", cell: (t) => `#${t.result_id}` },
      { label: "Input topic", cell: (t) => h("span", { class: "mono small" }, t.input_topic) },
      { label: "Upper topic", cell: (t) => h("span", { class: "mono small" }, t.upper_topic || "– (top)") },
      { label: "Limit", cell: (t) => (t.top ? "always answers" : String(t.limit)), class: "num" },
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
  };
  drawHead();
  refresh().catch((e) => ctx.flash(e.message, "error"));
  ctx.every(POLL_MS, refresh);
  return h("div", {}, head, card("Live statistics", statsBox), card("Tiers", tiers),
    card("Latest predictions", predsBox));
}
