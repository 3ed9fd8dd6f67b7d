/* BioFP dashboard: polls the JSON API twice a second and redraws what changed. No dependency
   but the vendored uPlot (run page charts). Read-only: it only ever sends GET requests. */
"use strict";

const POLL_MS = 500;
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x) && Math.abs(x) < 1e6) return String(x);
  return Number(x.toPrecision(digits)).toString();
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "kB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${fmt(n, 3)} ${units[i]}`;
}

function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function statusBadge(status) {
  return el("span", { class: `status ${status}`, text: status, "data-status": status });
}

/* ---- polling ------------------------------------------------------------------------------- */

function poll(url, render) {
  let lastTag = null;
  const live = $("#live");
  async function tick() {
    try {
      const resp = await fetch(url, { cache: "no-cache", credentials: "same-origin" });
      if (!resp.ok) throw new Error(`${resp.status}`);
      const tag = resp.headers.get("etag");
      if (tag === null || tag !== lastTag) {
        const data = await resp.json();
        lastTag = tag;
        render(data);
        markRendered();
      }
      live.textContent = "live";
      live.className = "live on";
    } catch (err) {
      live.textContent = `offline (${err.message})`;
      live.className = "live off";
    } finally {
      setTimeout(tick, POLL_MS);
    }
  }
  tick();
}

function markRendered() {
  const n = Number(document.body.dataset.renders || 0) + 1;
  document.body.dataset.renders = String(n);
  if (n === 1 && window.performance && performance.mark) performance.mark("biofp-first-render");
}

/* ---- runs page ----------------------------------------------------------------------------- */

function renderRuns(data) {
  const body = $("#runs tbody");
  body.replaceChildren(...data.runs.map((r) => el("tr", { "data-run": r.id },
    el("td", {}, el("a", { href: `/runs/${encodeURIComponent(r.id)}`, text: r.name })),
    el("td", { title: r.error ?? "" }, statusBadge(r.status)),
    el("td", { class: "rounds", text: `${r.rounds_done} / ${r.num_rounds ?? "?"}` }),
    el("td", { text: r.strategy ?? "–" }),
    el("td", { text: r.model ?? "–" }),
    el("td", { text: r.sites ?? "–" }),
    el("td", { text: when(r.started) }),
    el("td", { text: when(r.updated) }),
  )));
  $("#empty").hidden = data.runs.length > 0;
}

/* ---- sites page ---------------------------------------------------------------------------- */

function renderSites(data) {
  const body = $("#sites tbody");
  body.replaceChildren(...data.sites.map((s) => el("tr", { "data-site": s.site },
    el("td", { text: s.site }),
    el("td", { class: "eps", text: fmt(s.epsilon) }),
    el("td", { text: s.rounds_ok }),
    el("td", { class: "refusals", text: s.refusals }),
    el("td", { text: s.failures }),
    el("td", { text: s.timeouts }),
    el("td", {}, ...s.runs.flatMap((id, i) => [i ? ", " : "",
      el("a", { href: `/runs/${encodeURIComponent(id)}`, text: id })])),
    el("td", { text: when(s.last_seen) }),
  )));
  $("#empty").hidden = data.sites.length > 0;
}

/* ---- run page ------------------------------------------------------------------------------ */

const charts = {};
let reportShown = false;

function color(i, n) {
  return `hsl(${Math.round((360 * i) / Math.max(n, 1))}, 65%, 45%)`;
}

function chart(id, rounds, series, opts = {}) {
  const box = document.getElementById(id);
  if (charts[id]) { charts[id].destroy(); delete charts[id]; }
  box.replaceChildren();
  if (!window.uPlot || rounds.length === 0) {
    box.append(el("p", { class: "muted", text: rounds.length ? "charts unavailable" : "no round yet" }));
    return;
  }
  const width = Math.max(box.clientWidth || 480, 280);
  charts[id] = new uPlot({
    width, height: 200,
    scales: { x: { time: false, range: (u, lo, hi) => [lo - 0.5, hi + 0.5] } },
    axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100], values: (u, t) => t.map((v) => (Number.isInteger(v) ? v : "")) },
      { size: 60, values: opts.values }],
    legend: { show: series.length <= 12 },
    series: [{ label: "round" }, ...series.map((s) => s.opts)],
  }, [rounds, ...series.map((s) => s.data)], box);
}

function renderGrid(data) {
  const rounds = data.rounds;
  const head = el("tr", {}, el("th", { text: "site" }), ...rounds.map((r) => el("th", { text: r.round })));
  $("#grid thead").replaceChildren(head);
  const rows = data.site_names.map((name) => el("tr", { "data-site": name },
    el("th", { text: name }),
    ...rounds.map((r) => {
      const s = r.sites[name];
      if (!s) return el("td", { class: "cell none", title: "not sampled", "data-round": r.round, "data-site": name, "data-status": "not sampled" });
      const title = s.reason ? `round ${r.round}, ${name}: ${s.status}: ${s.reason}` : `round ${r.round}, ${name}: ${s.status}`;
      const cell = el("td", { class: `cell ${s.status.replace(" ", "-")}`, title,
        "data-round": r.round, "data-site": name, "data-status": s.status });
      cell.addEventListener("click", () => { $("#cell-detail").textContent = title; });
      return cell;
    })));
  $("#grid tbody").replaceChildren(...rows);
}

function latestEpsilon(data, name) {
  for (let i = data.rounds.length - 1; i >= 0; i--) {
    const s = data.rounds[i].sites[name];
    if (s && s.epsilon !== null && s.epsilon !== undefined) return [s.epsilon, data.rounds[i].round];
  }
  return [null, null];
}

function renderEpsilon(data) {
  $("#epsilon tbody").replaceChildren(...data.site_names.map((name) => {
    const [eps, round] = latestEpsilon(data, name);
    const budget = data.budgets[name];
    const used = eps !== null && budget ? `${Math.round((100 * eps) / budget)} %` : "–";
    return el("tr", { "data-site": name }, el("td", { text: name }), el("td", { class: "eps", text: fmt(eps) }),
      el("td", { text: budget ? fmt(budget) : "none" }), el("td", { text: used }), el("td", { text: round ?? "–" }));
  }));
}

function renderCharts(data) {
  const x = data.rounds.map((r) => r.round);
  const pick = (key) => data.rounds.map((r) => r[key]);
  chart("chart-loss", x, [
    { opts: { label: "train", stroke: "#1f6feb", width: 2 }, data: pick("train_loss") },
    { opts: { label: "held-out", stroke: "#d1242f", width: 2 }, data: pick("eval_loss") },
  ]);
  const names = data.site_names;
  const eps = names.map((name, i) => ({
    opts: { label: name, stroke: color(i, names.length), width: 1.5 },
    data: data.rounds.map((r) => (r.sites[name] ? r.sites[name].epsilon : null)),
  }));
  const budgets = [...new Set(Object.values(data.budgets).filter((b) => b))];
  if (budgets.length === 1) {
    eps.push({ opts: { label: "budget", stroke: "#d1242f", dash: [6, 4], width: 2 }, data: x.map(() => budgets[0]) });
    $("#budget-note").textContent = `(budget ε ${fmt(budgets[0])}, dashed)`;
  } else {
    $("#budget-note").textContent = budgets.length ? "(budgets differ: see the table)" : "";
  }
  chart("chart-eps", x, eps);
  const bars = window.uPlot && uPlot.paths && uPlot.paths.bars ? uPlot.paths.bars({ size: [0.6, 40] }) : undefined;
  chart("chart-bytes", x, [{ opts: { label: "bytes", stroke: "#57606a", fill: "#57606a55", paths: bars, points: { show: false }, value: (u, v) => bytes(v) }, data: pick("bytes") }],
    { values: (u, ticks) => ticks.map(bytes) });
  chart("chart-wall", x, [{ opts: { label: "wall s", stroke: "#8250df", width: 2 }, data: pick("wall_s") }]);
  const comp = data.compression || "none";
  const ok = data.rounds.reduce((a, r) => a + r.contributed, 0);
  const total = data.rounds.reduce((a, r) => a + r.bytes, 0);
  const perUpdate = ok ? total / ok : null;
  const ratio = perUpdate && data.model_bytes ? ` = ${fmt(data.model_bytes / perUpdate, 3)}× smaller than the ${bytes(data.model_bytes)} model` : "";
  $("#compression").textContent = `(compression: ${comp}; ${bytes(perUpdate)} per update${ratio})`;
}

function renderConfig(config) {
  const rows = Object.entries(config || {}).map(([k, v]) =>
    el("tr", {}, el("th", { text: k.replaceAll("_", "-") }), el("td", { text: typeof v === "object" ? JSON.stringify(v) : String(v) })));
  $("#config tbody").replaceChildren(...rows);
}

async function renderReport(data) {
  if (!data.has_report && data.figures.length === 0) return;
  if (reportShown) return;
  reportShown = true;
  $("#report-section").hidden = false;
  const base = `/runs/${encodeURIComponent(data.id)}`;
  $("#figures").replaceChildren(...data.figures.map((f) =>
    el("figure", {}, el("img", { src: `${base}/figures/${encodeURIComponent(f)}`, alt: f, loading: "lazy" }), el("figcaption", { text: f }))));
  if (data.has_report) {
    const resp = await fetch(`${base}/report`, { credentials: "same-origin" });
    if (resp.ok) $("#report").innerHTML = await resp.text(); /* server-rendered, raw HTML escaped */
  }
}

function renderRun(data) {
  document.title = `BioFP run ${data.name}`;
  $("#run-name").textContent = data.name;
  const status = $("#run-status");
  status.textContent = data.status;
  status.className = `status ${data.status}`;
  $("#updating").hidden = !data.updating;
  $("#run-error").hidden = !data.error;
  $("#run-error").textContent = data.error ? `error: ${data.error}` : "";
  if (data.updating && data.rounds.length === 0 && charts["chart-loss"]) return; /* keep last view */
  const total = data.num_rounds ?? "?";
  $("#round-progress").textContent = `Round ${data.rounds_done} of ${total}`;
  $("#round-bar").style.width = data.num_rounds ? `${(100 * data.rounds_done) / data.num_rounds}%` : "0";
  $("#run-facts").textContent = [`strategy ${data.strategy ?? "–"}`, `model ${data.model ?? "–"}`,
    `${data.sites ?? "–"} sites`, `DP ${data.dp === false ? "off" : "on"}`, `started ${when(data.started)}`,
    `last update ${when(data.updated)}`].join(" · ");
  renderGrid(data);
  renderEpsilon(data);
  renderCharts(data);
  renderConfig(data.config);
  renderReport(data);
}

/* ---- start --------------------------------------------------------------------------------- */

const page = document.body.dataset.page;
if (page === "runs") poll("/api/runs", renderRuns);
else if (page === "sites") poll("/api/sites", renderSites);
else if (page === "run") {
  const id = decodeURIComponent(location.pathname.split("/")[2] || "");
  poll(`/api/runs/${encodeURIComponent(id)}`, renderRun);
}
