// Charts drawn as inline SVG (no chart library): per-epoch lines and share bars.

import { h, svg } from "./dom.js";

function niceTicks(lo, hi, count = 4) {
  if (!(hi > lo)) {
    const pad = Math.abs(lo) * 0.1 || 0.5;
    lo -= pad;
    hi += pad;
  }
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const start = Math.floor(lo / step) * step;
  const end = Math.ceil(hi / step) * step;
  const ticks = [];
  for (let v = start; v <= end + step / 2; v += step) ticks.push(Number(v.toFixed(10)));
  return ticks;
}

function label(v) {
  if (Math.abs(v) >= 100) return v.toFixed(0);
  if (Math.abs(v) >= 10) return v.toFixed(1);
  return String(Number(v.toFixed(3)));
}

/**
 * A line chart of series [{name, cls, points: [[x, y], ...]}] over epochs.
 * `domain` fixes the y range (e.g. [0, 1] for accuracy); otherwise it fits the data.
 */
export function lineChart({ title, series, domain = null, xLabel = "epoch", xEnd = 0, height = 190, width = 360 }) {
  const drawn = series.filter((s) => s.points.length);
  const box = h("figure", { class: "chart", "data-chart": title });
  box.append(h("figcaption", {}, title));
  if (!drawn.length) {
    box.append(h("div", { class: "chart-empty" }, "waiting for the first epoch…"));
    return box;
  }
  const m = { top: 10, right: 12, bottom: 30, left: 44 };
  const xs = drawn.flatMap((s) => s.points.map((p) => p[0]));
  const ys = drawn.flatMap((s) => s.points.map((p) => p[1]));
  const xMax = Math.max(...xs, xEnd, 2);
  const xMin = Math.min(...xs, 1);
  // A domain may fix either end (null: fit that end to the data), e.g. [0, null] for a loss.
  const lo = domain && domain[0] !== null ? domain[0] : Math.min(...ys);
  const hi = domain && domain[1] !== null ? domain[1] : Math.max(...ys);
  const yTicks = niceTicks(Math.min(lo, ...ys), Math.max(hi, ...ys), 4);
  const y0 = yTicks[0];
  const y1 = yTicks[yTicks.length - 1];
  const px = (x) => m.left + ((x - xMin) / (xMax - xMin || 1)) * (width - m.left - m.right);
  const py = (y) => height - m.bottom - ((y - y0) / (y1 - y0 || 1)) * (height - m.top - m.bottom);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart-svg", role: "img",
    "aria-label": title });
  for (const t of yTicks) {
    root.append(svg("line", { x1: m.left, x2: width - m.right, y1: py(t), y2: py(t), class: "grid" }));
    root.append(svg("text", { x: m.left - 6, y: py(t) + 4, class: "tick", "text-anchor": "end" }, label(t)));
  }
  const step = Math.max(1, Math.ceil((xMax - xMin) / 8));
  for (let x = xMin; x <= xMax; x += step) {
    root.append(svg("text", { x: px(x), y: height - m.bottom + 16, class: "tick", "text-anchor": "middle" },
      String(x)));
  }
  root.append(svg("line", { x1: m.left, x2: width - m.right, y1: height - m.bottom, y2: height - m.bottom,
    class: "axis" }));
  root.append(svg("text", { x: width - m.right, y: height - 2, class: "axis-label", "text-anchor": "end" },
    xLabel));
  drawn.forEach((s, i) => {
    const cls = s.cls || `series-${i}`;
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" ");
    root.append(svg("path", { d, class: `line ${cls}` }));
    for (const [x, y] of s.points) {
      root.append(svg("circle", { cx: px(x), cy: py(y), r: 3, class: `dot ${cls}` },
        svg("title", {}, `${s.name}, epoch ${x}: ${y.toFixed(4)}`)));
    }
  });
  box.append(root);
  box.append(h("div", { class: "legend" }, drawn.map((s, i) => {
    const last = s.points[s.points.length - 1][1];
    return h("span", { class: "legend-item" }, h("span", { class: `swatch ${s.cls || `series-${i}`}` }),
      `${s.name} `, h("b", {}, last.toFixed(4)));
  })));
  return box;
}

/** Horizontal bars of shares (0..1) with labels: the exit distribution per tier; a row's optional `predicted`
 * share is a tick on its track. */
export function shareBars(rows) {
  return h("div", { class: "bars" }, rows.map((r, i) => {
    const fill = h("div", { class: `bar-fill tier-${i % 4}` });
    fill.style.width = `${Math.max(0, Math.min(1, r.share)) * 100}%`;
    const track = h("div", { class: "bar-track" }, fill);
    if (typeof r.predicted === "number") {
      const tick = h("div", { class: "bar-predicted", title: `predicted ${(r.predicted * 100).toFixed(1)} %` });
      tick.style.left = `${Math.max(0, Math.min(1, r.predicted)) * 100}%`;
      track.append(tick);
    }
    return h("div", { class: "bar-row", "data-tier": r.index },
      h("div", { class: "bar-label" }, r.label),
      track,
      h("div", { class: "bar-value" }, r.value));
  }));
}
