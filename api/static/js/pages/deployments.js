// Deployments: training runs of configurations; per result (one per model, i.e. per exit) the live status
// and per-epoch charts of loss and accuracy, polled while the page is open.

import { all, del, get, post } from "../api.js";
import { lineChart } from "../charts.js";
import {
  badge, busy, button, card, confirmButton, empty, field, formError, h, link, num, pageHeader, table, when,
} from "../dom.js";

const TERMINAL = new Set(["finished", "failed", "stopped"]);
const POLL_MS = 1500;
const SPLIT_RANK = { train: 0, validation: 1, test: 2 };

function epochsOf(d) {
  return (d.fit_options && d.fit_options.epochs) || 1;
}

function statusSummary(results) {
  return h("div", { class: "tags" }, results.map((r) => h("span", { class: "result-pill" },
    `${r.model_name} `, badge(r.status))));
}

export async function list(ctx) {
  const holder = h("div", {});
  let last = "";
  const load = async () => {
    const [deps, confs, results] = await Promise.all([all("/deployments"), all("/configurations"),
      all("/results")]);
    const snapshot = JSON.stringify([deps, confs, results.map((r) => [r.id, r.status])]);
    if (snapshot === last) return;
    last = snapshot;
    const confName = new Map(confs.map((c) => [c.id, c.name]));
    const byDep = new Map();
    for (const r of results) byDep.set(r.deployment_id, [...(byDep.get(r.deployment_id) || []), r]);
    if (!deps.length) {
      holder.replaceChildren(empty("Nothing deployed yet. Deploy a configuration to train it.",
        link("#/deployments/new", "New deployment", { class: "btn btn-primary" })));
      return;
    }
    holder.replaceChildren(table([
      { label: "ID", cell: (d) => link(`#/deployments/${d.id}`, `#${d.id}`), class: "num" },
      { label: "Configuration", cell: (d) => confName.get(d.configuration_id) || `#${d.configuration_id}` },
      { label: "Training", class: "nowrap", cell: (d) => `batch ${d.batch} · ${epochsOf(d)} epochs · ${d.optimizer}` },
      { label: "Results", cell: (d) => statusSummary(byDep.get(d.id) || []) },
      { label: "Created", cell: (d) => when(d.created_at) },
      { label: "", class: "row-actions", cell: (d) => [
        link(`#/deployments/${d.id}`, "Results", { class: "btn btn-secondary btn-sm" }),
        confirmButton("Delete", "Confirm delete", async () => {
          try {
            await del(`/deployments/${d.id}`);
            ctx.flash(`Deployment #${d.id} deleted.`);
            await load();
          } catch (err) {
            ctx.flash(err.message, "error");
          }
        }, { class: "btn btn-danger btn-sm" }),
      ] },
    ], [...deps].reverse()));
  };
  await load();
  ctx.every(2000, load);
  return h("div", {},
    pageHeader("Deployments", "Configurations deployed for training; statuses update live.",
      link("#/deployments/new", "New deployment", { class: "btn btn-primary" })),
    card(null, holder));
}

export async function create(ctx) {
  const confs = await all("/configurations");
  const conf = h("select", { name: "configuration_id", required: true },
    confs.map((c) => h("option", { value: c.id }, `${c.name} (#${c.id}) · ${c.model_ids.length} model(s)`)));
  if (ctx.query.get("configuration")) conf.value = ctx.query.get("configuration");
  const batch = h("input", { name: "batch", type: "number", min: 1, value: 64 });
  const epochs = h("input", { name: "fit_options", type: "number", min: 1, value: 5 });
  const optimizer = h("select", { name: "optimizer" }, ["adam", "adamw", "sgd", "rmsprop", "adagrad", "adadelta",
    "adamax", "nadam", "ftrl"].map((o) => h("option", { value: o }, o)));
  const lr = h("input", { name: "learning_rate", type: "number", step: "any", min: 0, placeholder: "optimizer default" });
  const loss = h("input", { name: "loss", value: "sparse_categorical_crossentropy" });
  const metrics = h("input", { name: "metrics", value: "accuracy" });
  const weights = h("input", { name: "loss_weights", placeholder: "e.g. 1, 0.5, 0.25 (one per exit, bottom first)" });
  const form = h("form", { class: "form", novalidate: true },
    formError(),
    confs.length ? null : h("div", { class: "alert alert-info" }, "Create a configuration first."),
    h("div", { class: "grid-3" }, field("Configuration", conf), field("Batch size", batch), field("Epochs", epochs)),
    h("div", { class: "grid-3" }, field("Optimizer", optimizer), field("Learning rate", lr),
      field("Loss", loss)),
    h("div", { class: "grid-2" }, field("Metrics", metrics, "Comma-separated Keras metric names."),
      field("Loss weights", weights, "Optional; empty weighs every exit the same.")),
    h("div", { class: "form-actions" },
      h("button", { type: "submit", class: "btn btn-primary", disabled: !confs.length }, "Deploy for training"),
      link("#/deployments", "Cancel", { class: "btn btn-ghost" })));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(form, "Deploying…", async () => {
      const body = {
        configuration_id: Number(conf.value), batch: Number(batch.value),
        fit_options: { epochs: Number(epochs.value) }, optimizer: optimizer.value, loss: loss.value.trim(),
        metrics: metrics.value.split(",").map((m) => m.trim()).filter(Boolean),
      };
      if (lr.value) body.learning_rate = Number(lr.value);
      if (weights.value.trim()) body.loss_weights = weights.value.split(",").map((w) => Number(w.trim()));
      const dep = await post("/deployments", body);
      ctx.flash(`Deployment #${dep.id} requested: ${dep.result_ids.length} result(s) waiting for training data.`);
      ctx.go(`#/deployments/${dep.id}`);
    });
  });
  return h("div", {}, pageHeader("New deployment", "Train a configuration's models (chains are trained jointly)."),
    card(null, form));
}

function metricNames(history) {
  const names = new Set();
  for (const entry of history) {
    for (const key of Object.keys(entry)) {
      if (key !== "epoch" && key !== "epochs" && typeof entry[key] === "number") names.add(key.replace(/^val_/, ""));
    }
  }
  return [...names].sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : a.localeCompare(b)));
}

function charts(result, deployment) {
  const history = result.history || [];
  const last = history[history.length - 1];
  const xEnd = (last && last.epochs) || epochsOf(deployment);
  const names = metricNames(history);
  if (!names.length) names.push("loss", "accuracy");
  return h("div", { class: "charts" }, names.map((name) => lineChart({
    title: name === "loss" ? "Loss" : name[0].toUpperCase() + name.slice(1),
    domain: /acc/.test(name) ? [0, 1] : [0, null],
    xEnd,
    series: [
      { name: "train", cls: "series-train", points: history.filter((e) => typeof e[name] === "number")
        .map((e) => [e.epoch, e[name]]) },
      { name: "validation", cls: "series-val", points: history.filter((e) => typeof e[`val_${name}`] === "number")
        .map((e) => [e.epoch, e[`val_${name}`]]) },
    ],
  })));
}

function progress(result, deployment) {
  const history = result.history || [];
  const lastEntry = history[history.length - 1];
  const total = (lastEntry && lastEntry.epochs) || epochsOf(deployment);
  const done = result.status === "finished" ? total : (lastEntry ? lastEntry.epoch : 0);
  const fill = h("div", { class: `progress-fill ${result.status}` });
  fill.style.width = `${Math.min(1, done / total) * 100}%`;
  return h("div", { class: "progress-line" },
    h("div", { class: "progress", role: "progressbar", "aria-valuenow": done, "aria-valuemax": total }, fill),
    h("span", { class: "muted small" }, `epoch ${done} / ${total}`));
}

function samplesNote(result) {
  const s = result.samples;
  const parts = s && typeof s === "object"
    ? Object.entries(s).sort(([a], [b]) => (SPLIT_RANK[a] ?? 9) - (SPLIT_RANK[b] ?? 9))
      .map(([split, n]) => `${num(n)} ${split}`) : [];
  if (result.seed !== null && result.seed !== undefined) parts.push(`shuffle seed ${result.seed}`);
  return parts.length ? h("p", { class: "muted small" }, `Samples: ${parts.join(" · ")}`) : null;
}

function sideInfo(result) {
  const table = metricsTable(result.metrics);
  const waiting = {
    created: "Waiting for the training data and a training slot.",
    deployed: "The training workload has started; reading the data.",
    training: "Final metrics (train, validation, test) appear when training finishes.",
  }[result.status];
  return h("div", { class: "final-metrics" }, table || h("h3", {}, "Final metrics"),
    table ? null : h("p", { class: "muted small" }, waiting || "No final metrics were reported."),
    samplesNote(result));
}

function metricsTable(metrics) {
  if (!metrics || !Object.keys(metrics).length) return null;
  const splits = Object.keys(metrics).filter((s) => metrics[s] && typeof metrics[s] === "object")
    .sort((a, b) => (SPLIT_RANK[a] ?? 9) - (SPLIT_RANK[b] ?? 9) || a.localeCompare(b));
  const names = [...new Set(splits.flatMap((s) => Object.keys(metrics[s])))];
  if (!names.length) return null;
  return h("div", {}, h("h3", {}, "Final metrics"), h("table", { class: "table table-compact metrics" },
    h("thead", {}, h("tr", {}, h("th", {}, "split"), names.map((n) => h("th", { class: "num" }, n)))),
    h("tbody", {}, splits.map((s) => h("tr", {}, h("td", {}, s),
      names.map((n) => h("td", { class: "num" }, num(metrics[s][n]))))))));
}

function resultCard(ctx, r, deployment, byId, refresh) {
  const chain = (r.chain || []).map((id) => byId.get(id)?.model_name || `#${id}`);
  const actions = [];
  if (r.status === "finished") {
    actions.push(link(`#/inferences/new?result=${r.id}`, "Deploy for inference", { class: "btn btn-primary btn-sm" }));
    actions.push(link(`#/results/${r.id}/exits`, "Exits and frontier", { class: "btn btn-secondary btn-sm",
      title: "The calibration of the chain's exits and the trade-off of their limits" }));
    for (const fmt of Object.keys(r.artefacts || {})) {
      actions.push(link(`/results/${r.id}/model${fmt === "keras" ? "" : `?format=${fmt}`}`, `Download ${fmt}`,
        { class: "btn btn-secondary btn-sm", download: "" }));
    }
  }
  if (!TERMINAL.has(r.status)) {
    actions.push(confirmButton("Stop", "Confirm stop", async () => {
      try {
        await post(`/results/${r.id}/stop`);
        ctx.flash(`Training of result #${r.id} stopped.`, "warn");
        await refresh();
      } catch (err) {
        ctx.flash(err.message, "error");
      }
    }, { class: "btn btn-danger btn-sm",
      title: chain.length > 1 ? "Stops the whole chain trained with it" : "Stops this training" }));
  } else {
    actions.push(confirmButton("Delete", "Confirm delete", async () => {
      try {
        await del(`/results/${r.id}`);
        ctx.flash(`Result #${r.id} deleted.`);
        await refresh();
      } catch (err) {
        ctx.flash(err.message, "error");
      }
    }, { class: "btn btn-danger btn-sm" }));
  }
  return h("section", { class: "card result", "data-result": r.id, "data-status": r.status },
    h("div", { class: "result-head" },
      h("div", {},
        h("h2", { class: "card-title" }, r.model_name || `model #${r.model_id}`, " ",
          h("span", { class: "muted" }, `result #${r.id} · v${r.model_version}`)),
        chain.length > 1 ? h("p", { class: "muted small" }, `exit ${r.chain.indexOf(r.id) + 1} of ${chain.length} · ` +
          `trained jointly: ${chain.join(" → ")}`) : h("p", { class: "muted small" }, "single model · one exit")),
      h("div", { class: "result-status" }, badge(r.status))),
    progress(r, deployment),
    r.queued ? h("p", { class: "alert alert-info" }, `Queued (position ${r.queued.position}): ${r.queued.note}`) : null,
    r.error ? h("p", { class: "alert alert-error" }, r.error) : null,
    h("div", { class: "result-body" }, charts(r, deployment), sideInfo(r)),
    h("div", { class: "card-actions" }, actions));
}

export async function detail(ctx) {
  const id = Number(ctx.params[0]);
  const deployment = await get(`/deployments/${id}`);
  const conf = await get(`/configurations/${deployment.configuration_id}`).catch(() => null);
  const resultsBox = h("div", { class: "results" });
  const sourceBox = h("div", {});
  let last = "";
  const refresh = async () => {
    const [results, sources] = await Promise.all([all(`/deployments/${id}/results`),
      all(`/datasources?deployment_id=${id}`)]);
    const snapshot = JSON.stringify([results, sources]);
    if (snapshot === last) return;
    last = snapshot;
    const byId = new Map(results.map((r) => [r.id, r]));
    const order = (r) => [(r.chain && r.chain[0]) || r.id, (r.chain || []).indexOf(r.id)];
    const sorted = [...results].sort((a, b) => order(a)[0] - order(b)[0] || order(a)[1] - order(b)[1]);
    resultsBox.replaceChildren(...(sorted.length ? sorted.map((r) => resultCard(ctx, r, deployment, byId, refresh))
      : [empty("This deployment has no results left.")]));
    sourceBox.replaceChildren(sources.length
      ? h("div", { class: "alert alert-info" }, `Training data: ${sources.map((s) => `${s.ranges.map((x) =>
        `${x.topic}:${x.partition} [${x.start}, ${x.end})`).join(", ")} (${s.input_format})`).join("; ")}.`)
      : h("div", { class: "alert alert-info" }, "Waiting for training data: send it with ",
        h("code", {}, `tierflow send --deployment ${id}`), " or any Kafka-ML sink."));
  };
  await refresh();
  ctx.every(POLL_MS, refresh);
  return h("div", {},
    pageHeader(`Deployment #${id}`, `${conf ? conf.name : `configuration #${deployment.configuration_id}`} · ` +
      `batch ${deployment.batch} · ${epochsOf(deployment)} epochs · ${deployment.optimizer}` +
      `${deployment.learning_rate ? ` (lr ${deployment.learning_rate})` : ""} · ${deployment.loss}`,
    link("#/deployments", "All deployments", { class: "btn btn-ghost" }),
    button("Refresh", () => refresh().catch((e) => ctx.flash(e.message, "error")))),
    sourceBox, resultsBox);
}
