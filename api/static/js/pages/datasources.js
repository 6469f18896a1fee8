// Datasources: training data announced on the control topic; one can be sent to another deployment.
// Each shows the offset ranges training reads (used) and, where the control bridge used other ranges than the
// sink announced (Kafka-ML's seek-to-end offsets on the embedded broker), the announced ones and why.

import { all, post } from "../api.js";
import { button, card, empty, h, link, num, pageHeader, table, when } from "../dom.js";

function pctOf(rate) {
  return `${Math.round((rate || 0) * 100)} %`;
}

function formatSummary(s) {
  const c = s.input_config || {};
  if (s.input_format === "RAW") {
    const shape = c.data_reshape ? ` (${String(c.data_reshape).trim().split(/\s+/).join("×")})` : "";
    return `${c.data_type || "?"}${shape}, label ${c.label_type || "?"}`;
  }
  return Object.keys(c).join(", ");
}

function count(ranges) {
  return (ranges || []).reduce((n, r) => n + (r.end - r.start), 0);
}

function announcedOf(s) {
  return s.announced_ranges && s.announced_ranges.length === s.ranges.length ? s.announced_ranges : s.ranges;
}

// Each used range; under one that differs from its announced range, the announced one (the notes say why).
function rangesCell(s) {
  const announced = announcedOf(s);
  return h("div", { class: "ranges" }, s.ranges.map((r, i) => {
    const a = announced[i];
    const moved = a.start !== r.start || a.end !== r.end;
    return h("div", { class: moved ? "range range-moved" : "range" },
      h("code", { class: "nowrap", title: moved ? "used: the records training reads" : null },
        `${r.topic}:${r.partition} [${r.start}, ${r.end})`),
      moved ? h("div", { class: "muted small nowrap" }, `announced [${a.start}, ${a.end})`) : null);
  }));
}

function recordsCell(s) {
  const used = count(s.ranges);
  const announced = count(announcedOf(s));
  return h("div", { title: s.total_msg === null || s.total_msg === undefined ? null
    : `the sink counted ${num(s.total_msg)} record(s)` }, num(used),
  used !== announced ? h("div", { class: "muted small nowrap" }, `announced ${num(announced)}`) : null);
}

export async function list(ctx) {
  const holder = h("div", {});
  const load = async () => {
    const [sources, deps] = await Promise.all([all("/datasources"), all("/deployments")]);
    if (!sources.length) {
      holder.replaceChildren(empty("No datasources yet. Send training data with `tierflow send --deployment N` " +
        "or a Kafka-ML sink; its announcement shows up here."));
      return;
    }
    holder.replaceChildren(table([
      { label: "ID", cell: (s) => `#${s.id}`, class: "num" },
      { label: "Deployment", cell: (s) => link(`#/deployments/${s.deployment_id}`, `#${s.deployment_id}`) },
      { label: "Data", cell: rangesCell },
      { label: "Format", cell: (s) => h("div", { title: JSON.stringify(s.input_config) },
        h("span", { class: "tag" }, s.input_format), " ", h("span", { class: "muted small" }, formatSummary(s))) },
      { label: "Split", class: "nowrap", cell: (s) => `val ${pctOf(s.validation_rate)} · test ${pctOf(s.test_rate)}` },
      { label: "Records", cell: recordsCell, class: "num" },
      { label: "Origin", cell: (s) => h("div", {}, s.origin && s.origin.datasource_id
        ? `sent from #${s.origin.datasource_id}` : "announced",
      h("div", { class: "muted small nowrap" }, when(s.created_at))) },
      { label: "Notes", class: "notes", cell: (s) => [s.description ? h("div", {}, s.description) : null,
        (s.range_reasons || []).length ? h("details", { class: "reasons" },
          h("summary", { class: "reason-text" }, `Why the ranges differ (${s.range_reasons.length})`),
          s.range_reasons.map((r) => h("div", { class: "reason-text" }, `↳ ${r}`))) : null,
        ...(s.warnings || []).map((w) => h("div", { class: "warn-text" }, `⚠ ${w}`))] },
      { label: "Send to deployment", class: "row-actions", cell: (s) => {
        const others = deps.filter((d) => d.id !== s.deployment_id);
        if (!others.length) return h("span", { class: "muted small" }, "no other deployment");
        const pick = h("select", { name: "deployment_id", "aria-label": `send datasource ${s.id} to` },
          [...others].reverse().map((d) => h("option", { value: d.id }, `#${d.id}`)));
        return h("div", { class: "inline-form" }, pick, button("Send", async (e) => {
          e.target.disabled = true;
          try {
            const copy = await post(`/datasources/${s.id}/send`, { deployment_id: Number(pick.value) });
            ctx.flash(`Datasource #${s.id} sent to deployment #${copy.deployment_id} (new datasource #${copy.id}).`);
            await load();
          } catch (err) {
            ctx.flash(err.message, "error");
          } finally {
            e.target.disabled = false;
          }
        }, { class: "btn btn-primary btn-sm" }));
      } },
    ], [...sources].reverse()));
  };
  await load();
  return h("div", {},
    pageHeader("Datasources", "Training data announced for deployments, with the offset ranges training reads. " +
      "Where they differ from what the sink announced, the announced ones and the reason are shown. Re-use a " +
      "datasource for another deployment without sending the data again."),
    card(null, holder));
}
