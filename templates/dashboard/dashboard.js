/* Rollout dashboard charts: a small SVG time-series renderer, no library, no network.
 * Reads the JSON in #dashboard-data (rendered by rollout_assets/dashboard) and draws, per chart:
 * phase bands, policy threshold segments, the metric series, breach and rollback markers. */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var WINDOW_MS = 15 * 60 * 1000;
  var PHASE_FILL = ["#e8eefc", "#e6f4ea", "#fff4e5", "#f3e8ff", "#e0f2f1", "#fde8ef"];
  var PHASE_LINE = ["#3e63dd", "#2f9e44", "#e8590c", "#7048e8", "#0c8599", "#c2255c"];
  var SERIES = ["#175cd3", "#e8590c", "#2f9e44", "#7048e8", "#0c8599"];
  var COLORS = { bad: "#c8102e", thr: "#d92d20", rb: "#6941c6", req: "#b54708", grid: "#eaecf0",
                 axis: "#667085" };
  var M = { top: 22, right: 14, bottom: 24, left: 56 };

  var data = JSON.parse(document.getElementById("dashboard-data").textContent);
  var phaseIndex = {};
  data.phases.forEach(function (p, i) { phaseIndex[p.name] = i; });

  function el(name, attrs, parent, text) {
    var n = document.createElementNS(NS, name);
    for (var k in attrs) { if (attrs[k] !== undefined && attrs[k] !== null) n.setAttribute(k, attrs[k]); }
    if (text !== undefined) n.textContent = text;
    if (parent) parent.appendChild(n);
    return n;
  }
  function ts(s) { return Date.parse(s); }
  function pad2(n) { return (n < 10 ? "0" : "") + n; }
  function hhmm(t) { var d = new Date(t); return pad2(d.getUTCHours()) + ":" + pad2(d.getUTCMinutes()); }
  function day(t) { var d = new Date(t); return d.getUTCFullYear() + "-" + pad2(d.getUTCMonth() + 1) + "-" + pad2(d.getUTCDate()); }
  function fmt(v, unit) {
    if (v === null || v === undefined) return "NULL";
    if (unit === "ms") return Math.round(v) + " ms";
    if (unit === "rate") return (v * 100).toFixed(v >= 0.99 ? 2 : 1) + " %";
    if (unit === "pct") return v.toFixed(1) + " %";
    return String(Math.round(v * 100) / 100);
  }
  function phaseColor(name, fill) {
    var i = phaseIndex[name];
    if (i === undefined) return fill ? "#f2f4f7" : "#667085";
    return (fill ? PHASE_FILL : PHASE_LINE)[i % PHASE_FILL.length];
  }

  /* points of one chart: {series: [{key, label, color, points: [{t, v, phase}]}]} */
  function seriesFor(chart) {
    if (chart.id === "slo_attainment") {
      var h = data.hourly || {}; var byPhase = {};
      (h.t || []).forEach(function (t, i) {
        if (h.attainment[i] === null) return;
        (byPhase[h.phase[i]] = byPhase[h.phase[i]] || []).push({ t: ts(t), v: h.attainment[i] * 100, phase: h.phase[i], n: h.judged[i] });
      });
      return Object.keys(byPhase).sort(function (a, b) { return phaseIndex[a] - phaseIndex[b]; })
        .map(function (p) { return { key: p, label: p, color: phaseColor(p, false), points: byPhase[p], step: 3600 * 1000 }; });
    }
    var rows = data.rows || {};
    return chart.series.map(function (s, i) {
      var pts = [];
      (rows.t || []).forEach(function (t, j) {
        var v = rows[s.key] ? rows[s.key][j] : null;
        if (v !== null && v !== undefined) pts.push({ t: ts(t), v: v, phase: rows.phase[j] });
      });
      return { key: s.key, label: s.label, color: SERIES[i % SERIES.length], points: pts, step: WINDOW_MS };
    });
  }

  function yDomain(chart, series) {
    var vals = [];
    series.forEach(function (s) { s.points.forEach(function (p) { vals.push(p.v); }); });
    chart.thresholds.forEach(function (t) { if (t.segments.length) vals.push(t.value); });
    if (chart.unit === "pct") return [0, 100];
    var lo = Math.min.apply(null, vals.length ? vals : [0]);
    var hi = Math.max.apply(null, vals.length ? vals : [1]);
    if (chart.unit === "rate") {
      lo = Math.max(0, Math.min(lo, 1) - 0.02); hi = Math.min(1, Math.max(hi, 0)) + 0.005;
      if (hi - lo < 0.02) lo = hi - 0.02;
      return [lo, hi];
    }
    if (chart.kind === "bar" || chart.unit === "ms" || chart.unit === "count") return [0, Math.max(hi * 1.12, 1)];
    return [lo, hi === lo ? lo + 1 : hi];
  }

  function ticks(lo, hi, n, integer) {
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    var err = (hi - lo) / n / step;
    if (err >= 7.5) step *= 10; else if (err >= 3.5) step *= 5; else if (err >= 1.5) step *= 2;
    if (integer) step = Math.max(step, 1);
    var out = []; for (var v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(v);
    return out;
  }

  function draw(div, chart) {
    var width = Math.max(div.clientWidth || 0, 320), height = 220;
    var x0 = ts(data.range.from), x1 = ts(data.range.to);
    var series = seriesFor(chart);
    var dom = yDomain(chart, series);
    var iw = width - M.left - M.right, ih = height - M.top - M.bottom;
    function X(t) { return M.left + (t - x0) / (x1 - x0) * iw; }
    function Y(v) { return M.top + ih - (Math.min(Math.max(v, dom[0]), dom[1]) - dom[0]) / (dom[1] - dom[0]) * ih; }
    var svg = el("svg", { viewBox: "0 0 " + width + " " + height, width: width, height: height,
                          "data-chart-id": chart.id, preserveAspectRatio: "none" });
    // phase bands
    var gb = el("g", { "class": "bands" }, svg);
    (data.bands || []).forEach(function (b) {
      var a = X(ts(b.t0)), z = X(ts(b.t1));
      el("rect", { x: a, y: M.top, width: Math.max(z - a, 1), height: ih, fill: phaseColor(b.phase, true), "data-phase": b.phase }, gb);
      if (z - a > 26) el("text", { x: a + 4, y: M.top - 6, "font-size": 10, fill: phaseColor(b.phase, false) }, gb, b.phase);
    });
    // grid and axes
    var ga = el("g", { "class": "axes", "font-size": 10, fill: COLORS.axis }, svg);
    ticks(dom[0], dom[1], 4, chart.unit === "count").forEach(function (v) {
      el("line", { x1: M.left, x2: M.left + iw, y1: Y(v), y2: Y(v), stroke: COLORS.grid }, ga);
      el("text", { x: M.left - 4, y: Y(v) + 3, "text-anchor": "end" }, ga, fmt(v, chart.unit === "count" ? "" : chart.unit));
    });
    var hours = (x1 - x0) / 3600000, every = hours <= 6 ? 1 : hours <= 30 ? 3 : hours <= 80 ? 12 : 24;
    for (var t = Math.ceil(x0 / 3600000 / every) * every * 3600000; t <= x1; t += every * 3600000) {
      el("line", { x1: X(t), x2: X(t), y1: M.top + ih, y2: M.top + ih + 4, stroke: COLORS.axis }, ga);
      el("text", { x: X(t), y: height - 6, "text-anchor": "middle" }, ga, hhmm(t) === "00:00" ? day(t).slice(5) : hhmm(t));
    }
    el("line", { x1: M.left, x2: M.left + iw, y1: M.top + ih, y2: M.top + ih, stroke: COLORS.axis }, ga);
    // breach and rollback markers (every chart)
    var gm = el("g", { "class": "markers" }, svg);
    var breachTs = {};
    (data.breaches || []).forEach(function (b) { breachTs[b.t] = (breachTs[b.t] || []).concat(b.phase + " " + b.failed_slos.join(",")); });
    Object.keys(breachTs).forEach(function (k) {
      var bx = X(ts(k) + WINDOW_MS / 2);
      el("line", { x1: bx, x2: bx, y1: M.top, y2: M.top + ih, stroke: COLORS.bad, "stroke-opacity": 0.35, "stroke-width": 2, "class": "breach-line" }, gm);
    });
    (data.rollbacks || []).forEach(function (r) {
      if (r.status === "skipped") return;
      var rx = X(ts(r.t) + WINDOW_MS);
      el("line", { x1: rx, x2: rx, y1: M.top, y2: M.top + ih, stroke: COLORS.rb, "stroke-dasharray": "3 3", "class": "rollback-line" }, gm);
      var tri = el("path", { d: "M" + (rx - 5) + " " + (M.top) + " L" + (rx + 5) + " " + M.top + " L" + rx + " " + (M.top + 8) + " Z",
                             fill: r.exit_code === 0 ? COLORS.rb : COLORS.bad, "class": "rollback-marker" }, gm);
      el("title", {}, tri, "rollback " + r.rollback_id + " → " + r.rollback_to + " (" + r.status + ", ExitCode=" + r.exit_code + ")");
    });
    if (chart.id === "restore_success") {
      (data.faults || []).forEach(function (f) {
        var fx = X(ts(f.t) + WINDOW_MS / 2), fy = M.top + ih - 14;
        var m = el("path", { d: "M" + fx + " " + (fy - 4) + " L" + (fx + 4) + " " + fy + " L" + fx + " " + (fy + 4) + " L" + (fx - 4) + " " + fy + " Z",
                             fill: f.retryable ? "#98a2b3" : COLORS.bad, "class": "collector-fault" }, gm);
        el("title", {}, m, (f.retryable ? "retryable" : "not retryable") + " collector fault " + f.t + " " + f.phase + ": " + f.reason + " (" + f.attempts + " attempts)");
      });
      (data.rollback_required || []).forEach(function (q) {
        var qx = X(ts(q.t) + WINDOW_MS / 2);
        var m = el("rect", { x: qx - 2, y: M.top + ih - 8, width: 4, height: 8, fill: COLORS.req, "class": "rollback-required" }, gm);
        el("title", {}, m, "rollback_required: " + q.phase + " → " + q.rollback_to + " at " + q.t);
      });
    }
    // threshold segments from the policy
    var gt = el("g", { "class": "thresholds" }, svg);
    chart.thresholds.forEach(function (th) {
      th.segments.forEach(function (seg) {
        var a = X(ts(seg[0])), z = X(ts(seg[1])), y = Y(th.value);
        var line = el("line", { x1: a, x2: z, y1: y, y2: y, stroke: COLORS.thr, "stroke-width": 1.5,
                                "stroke-dasharray": th.shadow ? "2 4" : "6 4", "class": "threshold" }, gt);
        el("title", {}, line, th.phase + " " + th.slo + ": " + th.comparator + " " + fmt(th.value, chart.unit) + " (" + th.severity + ")");
        if (z - a > 60) el("text", { x: z - 3, y: y - 3, "text-anchor": "end", "font-size": 10, fill: COLORS.thr }, gt, th.comparator + " " + fmt(th.value, chart.unit));
      });
    });
    // series
    var gs = el("g", { "class": "series" }, svg), count = 0;
    series.forEach(function (s) {
      if (chart.kind === "bar") {
        var bw = Math.max(iw * WINDOW_MS / (x1 - x0) - 1, 1);
        s.points.forEach(function (p) {
          if (p.v <= 0) { count++; return; }
          el("rect", { x: X(p.t), y: Y(p.v), width: bw, height: M.top + ih - Y(p.v), fill: s.color, "class": "bar" }, gs);
          count++;
        });
        return;
      }
      var d = "", prev = null;
      s.points.forEach(function (p) {
        var px = X(p.t + s.step / 2), py = Y(p.v);
        var joined = prev && p.t - prev.t <= s.step && p.phase === prev.phase;
        d += (joined ? " L" : " M") + px.toFixed(1) + " " + py.toFixed(1);
        prev = p; count++;
      });
      if (d) el("path", { d: d, fill: "none", stroke: s.color, "stroke-width": 1.6, "class": "line", "data-series": s.key }, gs);
      if (s.points.length < 40) s.points.forEach(function (p) { el("circle", { cx: X(p.t + s.step / 2), cy: Y(p.v), r: 2, fill: s.color }, gs); });
    });
    // failed SLO evaluations of this chart's metrics
    var keys = chart.series.map(function (s) { return s.key; });
    (data.failed_scores || []).forEach(function (f) {
      if (keys.indexOf(f.metric) < 0 || f.value === null) return;
      var c = el("circle", { cx: X(ts(f.t) + WINDOW_MS / 2), cy: Y(f.value), r: 4.5, fill: "none", stroke: COLORS.bad, "stroke-width": 2, "class": "breach-marker" }, gm);
      el("title", {}, c, f.t + " " + f.phase + " " + f.slo + ": " + fmt(f.value, chart.unit) + " " + f.comparator + " " + fmt(f.threshold, chart.unit) + " (n=" + f.sample_size + ")");
    });
    if (chart.id === "slo_attainment") {
      Object.keys(breachTs).forEach(function (k) {
        el("circle", { cx: X(ts(k) + WINDOW_MS / 2), cy: M.top + ih - 4, r: 4, fill: COLORS.bad, "class": "breach-marker" }, gm);
      });
    }
    svg.setAttribute("data-points", count);
    div.innerHTML = "";
    div.appendChild(svg);
    if (!count) {
      var empty = document.createElement("div"); empty.className = "empty";
      empty.textContent = "no data for " + keys.join(", ") + " in this range";
      div.appendChild(empty);
    }
    hover(div, svg, series, chart, X, x0, x1, iw);
    legend(chart, series);
  }

  function legend(chart, series) {
    var box = document.querySelector('[data-legend="' + chart.id + '"]');
    if (!box) return;
    box.innerHTML = "";
    series.forEach(function (s) {
      var span = document.createElement("span"); var i = document.createElement("i");
      i.style.background = s.color; span.appendChild(i);
      span.appendChild(document.createTextNode(s.label + " (" + s.points.length + ")"));
      box.appendChild(span);
    });
  }

  function hover(div, svg, series, chart, X, x0, x1, iw) {
    var tip = document.createElement("div"); tip.className = "tooltip"; tip.style.display = "none";
    div.appendChild(tip);
    svg.addEventListener("mousemove", function (ev) {
      var r = svg.getBoundingClientRect();
      var px = (ev.clientX - r.left) * (svg.viewBox.baseVal.width / r.width);
      var t = x0 + (px - M.left) / iw * (x1 - x0);
      var lines = [];
      series.forEach(function (s) {
        var best = null;
        s.points.forEach(function (p) { if (p.t <= t && t < p.t + s.step) best = p; });
        if (best) lines.push(s.label + " (" + best.phase + "): " + fmt(best.v, chart.unit));
      });
      if (!lines.length) { tip.style.display = "none"; return; }
      var w0 = Math.floor(t / WINDOW_MS) * WINDOW_MS;
      tip.textContent = day(w0) + " " + hhmm(w0) + " UTC — " + lines.join(" · ");
      tip.style.display = "block";
      tip.style.left = Math.min(ev.clientX - r.left + 12, r.width - 260) + "px";
      tip.style.top = (ev.clientY - r.top + 12) + "px";
    });
    svg.addEventListener("mouseleave", function () { tip.style.display = "none"; });
  }

  function colorChips() {
    document.querySelectorAll("[data-phase].phase-chip, .phase-badge[data-phase]").forEach(function (n) {
      n.style.background = phaseColor(n.getAttribute("data-phase"), true);
      n.style.borderColor = phaseColor(n.getAttribute("data-phase"), false);
    });
  }

  function render() {
    var charts = {};
    data.panels.forEach(function (p) { p.charts.forEach(function (c) { charts[c.id] = c; }); });
    var drawn = 0;
    document.querySelectorAll("[data-chart]").forEach(function (div) {
      var chart = charts[div.getAttribute("data-chart")];
      if (!chart) return;
      if (!data.range) { div.innerHTML = '<div class="empty">no window has been materialized yet</div>'; return; }
      try { draw(div, chart); drawn++; } catch (e) {
        div.innerHTML = '<div class="error">chart failed: ' + String(e).replace(/</g, "&lt;") + "</div>";
        console.error("chart " + chart.id + " failed", e);
      }
    });
    document.body.setAttribute("data-charts-drawn", String(drawn));
  }

  colorChips();
  render();
  var pending = null;
  window.addEventListener("resize", function () { clearTimeout(pending); pending = setTimeout(render, 150); });
})();
