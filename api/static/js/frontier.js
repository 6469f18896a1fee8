// A chain's exit trade-off, read from its frontier record (GET /results/{id}/exits; the schema is in
// streams/exits.py): each point's cascade accuracy, share answered early and compute per input; which point a
// target selects, with the decider's rule and its one-sided 90% bounds (so the page can say it before the
// inference is requested); the SVG chart of the frontier and the calibration table per exit.
//
// Used by the chain's exits page (pages/exits.js) and the inference pages (pages/inferences.js).

import { binomialLower, binomialUpper } from "./bounds.js";
import { h, num, svg } from "./dom.js";

export const CONFIDENCE = 0.9;
export const TARGET_KINDS = ["max_accuracy_drop", "min_accuracy", "max_top_share"];
export const TARGET_LABELS = {
  max_accuracy_drop: "largest accuracy drop against the top exit",
  min_accuracy: "smallest cascade accuracy",
  max_top_share: "largest share of inputs reaching the top tier",
};
const ALPHA = 1 - CONFIDENCE; // the decider's alpha, to the last bit (1.0 - 0.90 in Python too)
const DIGITS = 5; // a target value for a point is rounded outwards to this many decimals

/** A cost in seconds as µs / ms / s. */
export function seconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "—";
  if (s < 1e-3) return `${(s * 1e6).toPrecision(3)} µs`;
  if (s < 1) return `${(s * 1e3).toPrecision(3)} ms`;
  return `${s.toPrecision(3)} s`;
}

export function share(x) {
  return x === null || x === undefined || Number.isNaN(x) ? "—" : `${(x * 100).toFixed(1)} %`;
}

/** A probability with four decimals, or "—". */
export function prob(x) {
  return x === null || x === undefined || Number.isNaN(x) ? "—" : Number(x).toFixed(4);
}

/**
 * The points of the frontier entered at tier `entry` on a split ("validation": what the decider chooses on,
 * or "test": the same limits re-evaluated), with per-tier `costs` (seconds per sample, entry first; default:
 * the record's measured ones). Null when the record has no such entry (or no test split).
 */
export function entryFrontier(record, entry, { costs = null, split = "validation" } = {}) {
  const e = (record.entries || []).find((x) => x.entry === entry);
  if (!e || !e[split]) return null;
  const counts = e[split];
  const tierCosts = costs || record.costs_s.slice(entry);
  const n = counts.n;
  const points = e.limits.map((limits, i) => {
    const answered = counts.answered[i];
    const correct = counts.correct[i].reduce((a, b) => a + b, 0);
    // The decider's cost_of, in the same order of operations (so ties break the same way).
    let reach = n;
    let total = 0;
    tierCosts.forEach((c, k) => {
      total += c * reach;
      reach -= answered[k];
    });
    const top = answered[answered.length - 1];
    return {
      index: i, limits, answered, correct, agreeing: counts.agreeing[i], b: counts.b[i], c: counts.c[i],
      shares: answered.map((a) => a / n), accuracy: correct / n, early: (n - top) / n, topShare: top / n,
      cost: total / n, neverEarly: limits.every((l) => l > 1), // as Python's all(): true for the top alone
    };
  });
  return { entry, split, tiers: e.limits[0] ? e.limits[0].length + 1 : 1, n, topCorrect: counts.top_correct,
    topAccuracy: counts.top_correct / n, costs: tierCosts, points, levels: e.levels, hasTest: Boolean(e.test) };
}

// -- the decider's rule (streams/exits.py choose_limits), on the validation split ------------------------------

export function dropUpper(front, p) {
  const pt = front.points[p];
  if (pt.neverEarly) return 0;
  return binomialUpper(pt.b, front.n, ALPHA / 2) - binomialLower(pt.c, front.n, ALPHA / 2);
}

export function accuracyLower(front, p) {
  return binomialLower(front.points[p].correct, front.n, ALPHA);
}

export function topShareUpper(front, p) {
  const pt = front.points[p];
  if (pt.neverEarly) return 1;
  if (pt.limits.some((l) => l <= 0)) return 0;
  return binomialUpper(pt.answered[pt.answered.length - 1], front.n, ALPHA);
}

const BOUND = { max_accuracy_drop: dropUpper, min_accuracy: accuracyLower, max_top_share: topShareUpper };

function estimate(kind, front, p) {
  const pt = front.points[p];
  if (kind === "max_accuracy_drop") return (pt.b - pt.c) / front.n;
  if (kind === "min_accuracy") return pt.accuracy;
  return pt.topShare;
}

/** The bound of point p the target `kind` is checked against. */
export function bound(kind, front, p) {
  return BOUND[kind](front, p);
}

/**
 * The point a target selects, as the decider picks it: the cheapest point (then the most accurate) whose
 * estimate and one-sided 90% bound meet the target; for `max_top_share` the most accurate (then the cheapest).
 * Only points that can answer early are candidates. Null when no point meets it (the API refuses it).
 */
export function choose(front, kind, value) {
  const meets = (x) => (kind === "min_accuracy" ? x >= value : x <= value);
  const candidates = front.points.filter((pt) => front.tiers === 1 || pt.limits.some((l) => l <= 1))
    .map((pt) => pt.index);
  if (kind === "max_top_share") {
    candidates.sort((a, b) => front.points[b].correct - front.points[a].correct
      || front.points[a].cost - front.points[b].cost);
  } else {
    candidates.sort((a, b) => front.points[a].cost - front.points[b].cost
      || front.points[b].correct - front.points[a].correct);
  }
  for (const p of candidates) {
    if (meets(estimate(kind, front, p)) && meets(bound(kind, front, p))) return p;
  }
  return null;
}

/**
 * The target value that selects point p: its own bound, rounded outwards (so that p meets it). The decider
 * may still pick another point for it: one that meets the same target more cheaply (or, for a top-share
 * target, more accurately); `choose` says which. Null when no target of this kind can select p.
 */
export function targetFor(front, p, kind) {
  const pt = front.points[p];
  if (front.tiers > 1 && !pt.limits.some((l) => l <= 1)) return null; // it never answers early
  const b = bound(kind, front, p);
  const scale = 10 ** DIGITS;
  let v = kind === "min_accuracy" ? Math.floor(b * scale) / scale : Math.ceil(b * scale) / scale;
  v = Number(v.toFixed(DIGITS));
  if (kind === "min_accuracy" ? v > b : v < b) v = Number((v + (kind === "min_accuracy" ? -1 : 1) / scale)
    .toFixed(DIGITS));
  const ok = { max_accuracy_drop: v >= 0 && v < 1, min_accuracy: v > 0 && v <= 1, max_top_share: v >= 0 && v <= 1 };
  return ok[kind] ? v : null;
}

// -- the chart ----------------------------------------------------------------------------------------------

export const X_MODES = {
  early: { label: "share answered early", axis: "share of inputs answered below the top tier",
    of: (pt) => pt.early, better: 1 },
  cost: { label: "compute per input", axis: "expected compute per input", of: (pt) => pt.cost, better: -1 },
};

/** The points no other beats on both accuracy and the x axis (better = 1: larger x is better), sorted by x. */
export function paretoFront(front, xMode) {
  const { of, better } = X_MODES[xMode];
  const order = [...front.points].sort((a, b) => better * (of(b) - of(a)) || b.accuracy - a.accuracy);
  const kept = [];
  let best = -Infinity;
  for (const pt of order) {
    if (pt.accuracy > best) {
      kept.push(pt);
      best = pt.accuracy;
    }
  }
  return kept.sort((a, b) => of(a) - of(b));
}

function ticks(lo, hi, count) {
  if (!(hi > lo)) {
    const pad = Math.abs(lo) * 0.05 || 0.01;
    lo -= pad;
    hi += pad;
  }
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.floor(lo / step) * step; v <= Math.ceil(hi / step) * step + step / 2; v += step) {
    out.push(Number(v.toFixed(12)));
  }
  return out;
}

/**
 * The frontier as an SVG figure: cascade accuracy against `xMode`. Every stored point is a faint dot; the
 * points of the frontier for this axis are joined and can be picked (a click picks the nearest one, the
 * slider below steps along them). `marks`: [{kind: "chosen" | "observed" | "preview", x, y, title}] drawn on
 * top (x in the axis's unit); `selected`: the index of the picked point.
 */
export function frontierChart({ front, xMode = "early", selected = null, marks = [], onPick = null,
  title = "Exit frontier" }) {
  const mode = X_MODES[xMode];
  const fig = h("figure", { class: "chart frontier-chart", "data-chart": "frontier", "data-x": xMode });
  fig.append(h("figcaption", {}, `${title}: cascade accuracy against ${mode.label} `,
    h("span", { class: "muted" }, `(${front.split} split, ${num(front.n)} samples, ${front.points.length} points)`)));
  const width = 660;
  const height = 300;
  const m = { top: 12, right: 16, bottom: 36, left: 52 };
  const pareto = paretoFront(front, xMode);
  const xs = front.points.map(mode.of).concat(marks.map((k) => k.x)).filter(Number.isFinite);
  const ys = front.points.map((pt) => pt.accuracy).concat(marks.map((k) => k.y), [front.topAccuracy])
    .filter(Number.isFinite);
  const xt = ticks(Math.min(...xs, 0), Math.max(...xs), 5);
  const yt = ticks(Math.min(...ys), Math.max(...ys), 4);
  const [x0, x1] = [xt[0], xt[xt.length - 1]];
  const [y0, y1] = [yt[0], yt[yt.length - 1]];
  const px = (x) => m.left + ((x - x0) / (x1 - x0 || 1)) * (width - m.left - m.right);
  const py = (y) => height - m.bottom - ((y - y0) / (y1 - y0 || 1)) * (height - m.top - m.bottom);
  const xLabel = (v) => (xMode === "early" ? `${Number((v * 100).toFixed(1))} %` : seconds(v));
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart-svg frontier-svg", role: "img",
    "aria-label": `${title}: cascade accuracy against ${mode.label}` });
  for (const t of yt) {
    root.append(svg("line", { x1: m.left, x2: width - m.right, y1: py(t), y2: py(t), class: "grid" }));
    root.append(svg("text", { x: m.left - 6, y: py(t) + 4, class: "tick", "text-anchor": "end" }, t.toFixed(3)));
  }
  for (const t of xt) {
    root.append(svg("text", { x: px(t), y: height - m.bottom + 15, class: "tick", "text-anchor": "middle" },
      xLabel(t)));
  }
  root.append(svg("line", { x1: m.left, x2: width - m.right, y1: height - m.bottom, y2: height - m.bottom,
    class: "axis" }));
  root.append(svg("text", { x: width - m.right, y: height - 4, class: "axis-label", "text-anchor": "end" },
    mode.axis));
  root.append(svg("line", { x1: m.left, x2: width - m.right, y1: py(front.topAccuracy), y2: py(front.topAccuracy),
    class: "top-line" }, svg("title", {}, `the top exit alone: ${prob(front.topAccuracy)}`)));
  root.append(svg("text", { x: m.left + 4, y: py(front.topAccuracy) - 4, class: "tick top-label" },
    `top exit alone ${prob(front.topAccuracy)}`));
  const dots = svg("g", { class: "all-points" });
  for (const pt of front.points) {
    dots.append(svg("circle", { cx: px(mode.of(pt)).toFixed(1), cy: py(pt.accuracy).toFixed(1), r: 2,
      class: "pt" }));
  }
  root.append(dots);
  if (pareto.length > 1) {
    root.append(svg("path", { class: "front-line", d: pareto.map((pt, j) => `${j ? "L" : "M"}${
      px(mode.of(pt)).toFixed(1)},${py(pt.accuracy).toFixed(1)}`).join(" ") }));
  }
  const picks = svg("g", { class: "front-points" });
  for (const pt of pareto) {
    picks.append(svg("circle", { cx: px(mode.of(pt)).toFixed(1), cy: py(pt.accuracy).toFixed(1), r: 3,
      class: `pt front${pt.index === selected ? " pt-selected" : ""}`, "data-point": pt.index },
    svg("title", {}, `point ${pt.index}: limits ${pt.limits.join(", ") || "none"} · accuracy ${
      prob(pt.accuracy)} · ${share(pt.early)} early · ${seconds(pt.cost)} per input`)));
  }
  root.append(picks);
  const sel = selected === null ? null : front.points[selected];
  if (sel) {
    root.append(svg("circle", { cx: px(mode.of(sel)), cy: py(sel.accuracy), r: 6, class: "mark mark-selected",
      "data-point": sel.index }, svg("title", {}, `picked: point ${sel.index}`)));
  }
  for (const mk of marks) {
    if (!Number.isFinite(mk.x) || !Number.isFinite(mk.y)) continue;
    const [cx, cy] = [px(mk.x), py(mk.y)];
    const shape = mk.kind === "observed"
      ? svg("path", { d: `M${cx - 6},${cy}L${cx},${cy - 6}L${cx + 6},${cy}L${cx},${cy + 6}Z`,
        class: `mark mark-${mk.kind}` })
      : svg("circle", { cx, cy, r: 7, class: `mark mark-${mk.kind}` });
    shape.setAttribute("data-mark", mk.kind);
    shape.append(svg("title", {}, mk.title || mk.kind));
    root.append(shape);
  }
  fig.append(root);
  if (onPick && pareto.length) {
    // A click picks the nearest frontier point (in screen pixels, within 24 px): dots this small are hard
    // to hit, and many lie close together.
    root.addEventListener("click", (ev) => {
      const ctm = root.getScreenCTM();
      if (!ctm) return;
      const at = new DOMPoint(ev.clientX, ev.clientY).matrixTransform(ctm.inverse());
      let best = null;
      let bestD = Infinity;
      for (const pt of pareto) {
        const d = Math.hypot(px(mode.of(pt)) - at.x, py(pt.accuracy) - at.y);
        if (d < bestD) {
          best = pt;
          bestD = d;
        }
      }
      if (best && bestD * (ctm.a || 1) <= 24) onPick(best.index);
    });
    const slider = h("input", { type: "range", name: "frontier-point", min: 0, max: pareto.length - 1, step: 1,
      class: "frontier-slider", "aria-label": "step along the frontier" });
    const at = pareto.findIndex((pt) => pt.index === selected);
    slider.value = String(at >= 0 ? at : pareto.length - 1);
    slider.addEventListener("input", () => onPick(pareto[Number(slider.value)].index));
    fig.append(h("div", { class: "frontier-slider-row" }, h("span", { class: "muted small" }, "pick a point:"),
      slider));
  }
  fig.append(h("div", { class: "legend" },
    h("span", { class: "legend-item" }, h("span", { class: "swatch swatch-front" }),
      onPick ? "frontier (click to pick)" : "frontier"),
    h("span", { class: "legend-item" }, h("span", { class: "swatch swatch-pt" }), "other stored points"),
    h("span", { class: "legend-item" }, h("span", { class: "swatch swatch-top" }), "top exit alone"),
    marks.some((k) => k.kind === "chosen") ? h("span", { class: "legend-item" },
      h("span", { class: "swatch swatch-chosen" }), "chosen (predicted)") : null,
    marks.some((k) => k.kind === "observed") ? h("span", { class: "legend-item" },
      h("span", { class: "swatch swatch-observed" }), "observed live") : null,
    marks.some((k) => k.kind === "preview") ? h("span", { class: "legend-item" },
      h("span", { class: "swatch swatch-preview" }), "what the typed target selects") : null));
  return fig;
}

/** A two-button switch between the chart's x axes. */
export function axisToggle(current, onChange) {
  return h("div", { class: "segmented", role: "group", "aria-label": "x axis" },
    Object.entries(X_MODES).map(([key, mode]) => h("button", {
      type: "button", class: `btn btn-sm ${key === current ? "btn-primary" : "btn-secondary"}`,
      "data-x": key, "aria-pressed": key === current ? "true" : "false", onclick: () => onChange(key),
    }, mode.label)));
}

// -- tables ---------------------------------------------------------------------------------------------------

/** Per exit: T, accuracy and expected calibration error before -> after, where measured, and its cost. */
export function calibrationTable(exits) {
  return h("div", { class: "table-wrap" }, h("table", { class: "table table-compact calibration" },
    h("thead", {}, h("tr", {}, ["Exit", "Model", "Temperature T", "Accuracy", "ECE before → after",
      "Measured on", "Compute / sample"].map((c, i) => h("th", { class: i >= 2 && i !== 5 ? "num" : null }, c)))),
    h("tbody", {}, exits.map((e) => {
      const c = e.calibration;
      return h("tr", { "data-exit": e.exit },
        h("td", {}, String(e.exit)), h("td", {}, h("b", {}, e.model_name || `#${e.result_id}`)),
        h("td", { class: "num" }, num(e.temperature, 3)),
        h("td", { class: "num" }, c ? prob(c.accuracy) : "—"),
        h("td", { class: "num" }, c ? h("span", {}, prob(c.ece_before), " → ", h("b", {}, prob(c.ece_after)))
          : "—"),
        h("td", {}, c ? `${c.measured_on} (${num(c.n_measured)})` : "—"),
        h("td", { class: "num" }, seconds(e.cost_s)));
    }))));
}

/** What a point does: its limits and shares per tier, its accuracy with bounds, and its compute. */
export function pointSummary(front, p, names, testFront = null) {
  const pt = front.points[p];
  const test = testFront ? testFront.points[p] : null;
  const rows = pt.answered.map((a, k) => h("tr", { "data-tier": k },
    h("td", {}, `${k} · ${names[k] || ""}`),
    h("td", { class: "num point-limit" }, k < pt.limits.length ? (pt.limits[k] > 1 ? `${pt.limits[k]} (never)`
      : String(pt.limits[k])) : "top"),
    h("td", { class: "num" }, share(pt.shares[k])),
    h("td", { class: "num" }, test ? share(test.shares[k]) : "—")));
  return h("div", { class: "point-summary", "data-point": p },
    h("p", { class: "small" }, h("b", {}, `Point ${p}`), ` · cascade accuracy ${prob(pt.accuracy)} (90% lower `,
      `bound ${prob(accuracyLower(front, p))}) · drop against the top exit ${prob((pt.b - pt.c) / front.n)} (90% `,
      `upper bound ${prob(dropUpper(front, p))}) · ${share(pt.early)} answered early · ${seconds(pt.cost)} `,
      "per input", test ? ` · test split: accuracy ${prob(test.accuracy)}` : ""),
    h("table", { class: "table table-compact point-tiers" },
      h("thead", {}, h("tr", {}, h("th", {}, "Tier"), h("th", { class: "num" }, "Limit (calibrated)"),
        h("th", { class: "num" }, "Share (validation)"), h("th", { class: "num" }, "Share (test)"))),
      h("tbody", {}, rows)));
}

// -- an inference on its chain's frontier ------------------------------------------------------------------------

/** The share of inputs each tier answered live (the API's `observed_share`, else its window's `share`). */
export function observedShares(stats) {
  if (!stats || !stats.window || !Array.isArray(stats.tiers)) return null;
  return stats.tiers.map((t) => (typeof t.observed_share === "number" ? t.observed_share : t.share));
}

/** A tier's live agreement with the top exit (`/stats` tiers[].live.agreement), or null while unknown. */
export function liveAgreement(stats, k) {
  const live = stats && stats.tiers && stats.tiers[k] && stats.tiers[k].live;
  return live && typeof live.agreement === "number" ? live.agreement : null;
}

/**
 * The marks of an inference served from a target on `front` (its entry's frontier): the chosen point, and
 * the observed one. The observed point's x is measured (the live shares); its accuracy cannot be (live inputs
 * have no labels), so it is estimated as the predicted accuracy less the agreement with the top exit lost
 * live: predicted + (live agreement - predicted agreement), over all inputs, each tier weighted by its live
 * share (a tier without live agreement yet counts with its predicted one). Without drift it sits at the
 * predicted accuracy; each answer that disagrees with the top more often than predicted pulls it down.
 */
export function inferenceMarks(inf, stats, front, xMode) {
  const pred = inf && inf.predicted;
  if (!pred || !front || !front.points[pred.point]) return [];
  const of = X_MODES[xMode].of;
  const chosen = front.points[pred.point];
  const marks = [{ kind: "chosen", x: of(chosen), y: chosen.accuracy,
    title: `inference #${inf.id}: the chosen point ${pred.point} (predicted accuracy ${prob(pred.accuracy)})` }];
  const obs = observedShares(stats);
  if (obs && obs.length === chosen.answered.length) {
    const top = obs.length - 1;
    let agreement = obs[top];
    let live = 0;
    for (let k = 0; k < top; k += 1) {
      const predicted = (pred.tier_agreement || [])[k];
      const a = liveAgreement(stats, k);
      if (a !== null) live += 1;
      agreement += obs[k] * (a !== null ? a : (typeof predicted === "number" ? predicted : 1));
    }
    let reach = 1;
    let cost = 0;
    front.costs.forEach((c, k) => {
      cost += c * reach;
      reach -= obs[k];
    });
    const x = xMode === "early" ? 1 - obs[top] : cost;
    const y = pred.accuracy + (agreement - pred.agreement);
    marks.push({ kind: "observed", x, y, title: `inference #${inf.id} live: ${share(1 - obs[top])} answered ` +
      `early; estimated accuracy ${prob(y)} (${live ? "from the live agreement with the top exit"
        : "no live agreement yet: the predicted one"})` });
  }
  return marks;
}
