// edge-kit fleet dashboard: polls the JSON API and updates the charts in place (no page reloads).
"use strict";

const REFRESH_MS = 5000;
const state = { model: "", channel: "", device: "", models: [], refs: {}, captures: null };
const $ = (id) => document.getElementById(id);
const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "");
const fmtNum = (x, d = 3) => (x === null || x === undefined ? "" : Number(x).toPrecision(d));
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

// The operator token lives in this tab's sessionStorage (gone when the tab closes) and travels as an
// Authorization header, never in a URL or a cookie: a page on another site cannot make the browser send it.
const TOKEN_KEY = "edgekit-fleet-token";
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
(function tokenFromFragment() {
  // `http://host/#token=...` (printed by the demo): stored, then removed from the address bar and history.
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

async function fetchAuthed(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const res = await fetch(path, { ...options, headers });
  if (res.status === 401) $("token-form").classList.add("needed");
  if (!res.ok) throw new Error(`${path}: ${res.status} ${await res.text()}`);
  return res;
}

async function api(path, options) {
  return (await fetchAuthed(path, options)).json();
}

// Each panel loads on its own: a failing answer shows in that panel and blanks nothing else.
async function panel(id, load) {
  const note = $(id);
  try {
    const result = await load();
    if (note) { note.textContent = ""; note.hidden = true; }
    return result;
  } catch (err) {
    if (note) { note.textContent = `could not load: ${err.message}`; note.hidden = false; }
    return undefined;
  }
}

function lineChart(id, yTitle) {
  return new Chart($(id), {
    type: "line",
    data: { labels: [], datasets: [] },
    options: {
      animation: false, responsive: true, interaction: { mode: "nearest", intersect: false },
      scales: { y: { beginAtZero: true, title: { display: true, text: yTitle } } },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 10 } } },
    },
  });
}

const charts = {
  fleet: lineChart("chart-fleet", "effect (Wasserstein sd / TVD)"),
  device: lineChart("chart-device", "effect (Wasserstein sd / TVD)"),
  histogram: new Chart($("chart-histogram"), {
    type: "bar",
    data: { labels: [], datasets: [
      { label: "reference", data: [], backgroundColor: "rgba(31,119,180,0.6)" },
      { label: "current", data: [], backgroundColor: "rgba(214,39,40,0.6)" },
    ] },
    options: { animation: false, responsive: true, scales: { y: { beginAtZero: true, title: { display: true, text: "fraction" } } } },
  }),
};
window.edgekitCharts = charts; // for tests and for poking at the page from the console

// Lines per channel over time; the channels shown are the selected one plus those that drifted or moved most.
function setLines(chart, rows, selected) {
  const times = [...new Set(rows.map((r) => r.window_start))].sort((a, b) => a - b);
  const byChannel = new Map();
  for (const r of rows) {
    if (!byChannel.has(r.channel)) byChannel.set(r.channel, new Map());
    byChannel.get(r.channel).set(r.window_start, r);
  }
  const score = (ch) => Math.max(...[...byChannel.get(ch).values()].map((r) => (r.drifted ? 10 : 0) + r.effect));
  let channels = [...byChannel.keys()].sort((a, b) => score(b) - score(a)).slice(0, 6);
  if (selected && byChannel.has(selected) && !channels.includes(selected)) channels = [selected, ...channels.slice(0, 5)];
  chart.data.labels = times.map(fmtTime);
  chart.data.datasets = channels.map((ch, i) => ({
    label: ch,
    data: times.map((t) => (byChannel.get(ch).get(t) || {}).effect ?? null),
    borderColor: PALETTE[i % PALETTE.length], backgroundColor: PALETTE[i % PALETTE.length],
    borderWidth: ch === selected ? 3 : 1.5, pointRadius: times.map((t) => ((byChannel.get(ch).get(t) || {}).drifted ? 5 : 2)),
    spanGaps: true,
  }));
  chart.update();
}

function fillSelect(select, values, current, labelOf = (v) => v) {
  const keep = select.dataset.fixed ? select.querySelector("option") : null;
  const html = values.map((v) => `<option value="${esc(v)}"${v === current ? " selected" : ""}>${esc(labelOf(v))}</option>`).join("");
  select.innerHTML = (keep ? keep.outerHTML : "") + html;
  if (current !== undefined) select.value = current;
}

async function refreshDevices() {
  const d = await api("/api/devices");
  $("n-online").textContent = d.online;
  $("n-offline").textContent = d.offline;
  $("n-models").textContent = d.models.length;
  state.models = d.models;
  for (const m of d.models) state.refs[m.sha256] = m;
  if (!state.model && d.models.length) {
    const withData = d.models.find((m) => m.windows > 0) || d.models[0];
    state.model = withData.sha256;
  }
  fillSelect($("model"), d.models.map((m) => m.sha256), state.model,
    (sha) => `${state.refs[sha].name} ${state.refs[sha].version} (${sha.slice(0, 8)}, ${state.refs[sha].devices} devices)`);
  $("device").dataset.fixed = "1";
  fillSelect($("device"), d.devices.filter((x) => x.model_sha256 === state.model).map((x) => x.device), state.device);
  // Captures held per device, all model versions together (absent when the server keeps no captures).
  state.captures = new Map();
  for (const c of d.captures || []) {
    const had = state.captures.get(c.device) || { held: 0, labelled: 0 };
    state.captures.set(c.device, { held: had.held + c.held, labelled: had.labelled + c.labelled });
  }
  return d.devices;
}

async function refreshFleet() {
  if (!state.model) return undefined;
  const hist = await api(`/api/drift?model=${state.model}&history=1`);
  const fleetRows = hist.results;
  const channels = [...new Set(fleetRows.map((r) => r.channel))];
  if (!state.channel && channels.length) {
    const drifted = fleetRows.filter((r) => r.drifted).sort((a, b) => b.effect - a.effect);
    state.channel = drifted.length ? drifted[0].channel : channels[0];
  }
  // Channels the reference cannot test (constant in the reference) say so, with the reason.
  const untestable = (state.refs[state.model] || {}).untestable || {};
  fillSelect($("channel"), channels, state.channel,
    (c) => (untestable[c] ? `${c} (untestable: ${untestable[c]})` : c));
  setLines(charts.fleet, fleetRows, state.channel);
  const ev = hist.evaluations[state.model];
  $("fleet-note").textContent = ev ? `(alpha ${hist.alpha}, evaluated ${fmtTime(ev.evaluated_at)}, big dots = drifted)` : "";

  const latest = Math.max(...fleetRows.map((r) => r.window_start));
  const rows = fleetRows.filter((r) => r.window_start === latest).sort((a, b) => (b.drifted - a.drifted) || (b.effect - a.effect));
  $("tests").querySelector("tbody").innerHTML = rows.slice(0, 12).map((r) =>
    `<tr><td>${esc(r.channel)}</td><td>${esc(r.test)}</td><td>${fmtNum(r.statistic)}</td><td>${fmtNum(r.p_value)}</td>` +
    `<td>${fmtNum(r.effect)} ${esc(r.effect_name || "")}${r.psi_band ? ` (PSI ${fmtNum(r.psi, 2)} ${esc(r.psi_band)})` : ""}</td>` +
    `<td class="${r.drifted ? "yes" : "no"}">${r.drifted ? "yes" : "no"}</td></tr>`).join("");

  return hist;
}

// Per-device table (latest window flag per device, when the drift answer came).
function renderDevices(devices, hist) {
  const latestByDevice = new Map(((hist && hist.devices) || []).map((r) => [r.device, r]));
  $("devices").querySelector("tbody").innerHTML = devices.map((d) => {
    const dr = latestByDevice.get(d.device);
    const flag = dr ? (dr.drifted ? `<span class="yes">yes: ${esc(dr.channels.slice(0, 3).join(", "))}</span>` : `<span class="no">no</span>`) : "";
    const ref = state.refs[d.model_sha256];
    return `<tr class="clickable" data-device="${esc(d.device)}"><td>${esc(d.device)}</td>` +
      `<td class="state-${d.online ? "online" : "offline"}">${d.online ? "online" : "offline"}</td>` +
      `<td>${fmtTime(d.last_seen)}</td><td>${esc(ref ? `${ref.name} ${ref.version}` : d.model_version || "")}</td><td>${flag}</td>` +
      `<td class="captures">${capturesCell(d.device)}</td></tr>`;
  }).join("");
}

function capturesCell(device) {
  const c = state.captures && state.captures.get(device);
  return c ? `${c.held} (${c.labelled})` : "";
}

const fmtBytes = (n) => (n >= 1048576 ? `${(n / 1048576).toFixed(1)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} B`);

// Field captures per device and model version (docs/captures.md); hidden when the server keeps none.
async function refreshCaptures() {
  const res = await fetchAuthed("/api/captures/counts").catch((err) => {
    if (String(err.message).includes(": 404")) return null;
    throw err;
  });
  $("captures-card").hidden = res === null;
  if (res === null) return;
  const d = await res.json();
  $("captures-store").textContent = d.store ? `(${fmtBytes(d.store.used_bytes)} of ${fmtBytes(d.store.max_bytes)} used; ` +
    `${d.total.held} held, ${d.total.labelled} labelled)` : "";
  $("captures").querySelector("tbody").innerHTML = d.counts.map((c) =>
    `<tr data-capture-device="${esc(c.device)}"><td>${esc(c.device)}</td><td>${esc(`${c.model_name || ""} ${c.model_version}`)}` +
    `<div class="muted">${esc(c.model_sha256.slice(0, 12))}</div></td><td>${c.held}</td><td>${c.labelled}</td>` +
    `<td>${fmtBytes(c.bytes)}</td><td>${fmtTime(c.last_stored)}</td></tr>`).join("");
}

async function refreshDeviceChart() {
  if (state.device) {
    const dev = await api(`/api/drift?model=${state.model}&device=${encodeURIComponent(state.device)}`);
    $("device-title").textContent = state.device;
    setLines(charts.device, dev.results, state.channel);
  } else {
    $("device-title").textContent = "pick a device";
    charts.device.data.labels = []; charts.device.data.datasets = []; charts.device.update();
  }
}

async function refreshHistogram() {
  if (state.model && state.channel) {
    const dq = state.device ? `&device=${encodeURIComponent(state.device)}` : "";
    const h = await api(`/api/histogram?model=${state.model}&channel=${encodeURIComponent(state.channel)}${dq}`);
    const labels = h.kind === "class" ? h.reference.map((_, i) => (state.refs[state.model].labels || [])[i] ?? i)
      : h.edges.slice(0, -1).map((e, i) => `${fmtNum(e, 2)}..${fmtNum(h.edges[i + 1], 2)}`);
    charts.histogram.data.labels = labels;
    charts.histogram.data.datasets[0].data = h.reference;
    charts.histogram.data.datasets[1].data = h.current;
    charts.histogram.data.datasets[1].label = `current (n=${h.n_current})`;
    charts.histogram.update();
    $("hist-title").textContent = `${state.channel}${state.device ? ` on ${state.device}` : " (fleet)"}`;
  }
}

async function refreshConcept() {
  if (!state.model) return;
  const c = await api(`/api/concept?model=${state.model}${state.device ? `&device=${encodeURIComponent(state.device)}` : ""}`);
  const m = c.models[0];
  if (!m) return;
  const parts = [];
  if (m.labelled) parts.push(`<div>Labelled accuracy <b>${fmtNum(m.labelled.accuracy)}</b> over ${m.labelled.n} labels ` +
    `(gate ${fmtNum(m.labelled.gate_accuracy)}) <span class="${m.labelled.drifted ? "yes" : "no"}">${m.labelled.drifted ? "below the gate" : "ok"}</span></div>`);
  if (m.estimated) parts.push(`<div class="estimate">Estimated accuracy <b>${fmtNum(m.estimated.accuracy)}</b> ` +
    `(ESTIMATE: ${esc(m.estimated.caveat)})</div>`);
  $("concept").innerHTML = parts.join("") || '<span class="muted">no labels or confidence data yet</span>';
}

async function refreshAlerts() {
  const a = await api("/api/alerts");
  $("approval-mode").textContent = `(approval: ${a.approval})`;
  $("n-pending").textContent = a.alerts.filter((x) => x.state === "pending_approval").length;
  $("alerts").querySelector("tbody").innerHTML = a.alerts.map((x) => {
    const t = x.triggers[x.triggers.length - 1];
    const waiting = x.state === "pending_approval" || x.state === "rate_limited";
    const buttons = (waiting ? `<button class="approve" data-id="${x.id}" data-action="approve">Approve retraining</button> ` : "") +
      (["dismissed", "retraining"].includes(x.state) ? "" : `<button data-id="${x.id}" data-action="dismiss">Dismiss</button>`);
    return `<tr id="alert-${x.id}"><td>${x.id}</td><td>${fmtTime(x.created_at)}</td><td>${esc(x.scope)}</td><td>${esc(x.kind)}</td>` +
      `<td>${esc(x.summary)}</td><td class="state state-${esc(x.state)}">${esc(x.state)}</td>` +
      `<td>${t ? `${esc(t.outcome)}${t.returncode !== null ? ` (exit ${t.returncode})` : ""}` : ""}</td><td>${buttons}</td></tr>`;
  }).join("");
}

// Deployments: state, each device's role/version/step, the canary's figures, and the operator's buttons.
const DEPLOY_ACTIONS = { canary: ["promote", "halt", "rollback"], rolling: ["halt", "rollback"], done: ["rollback"],
  halted: ["rollback"], rolled_back: [] };

function canaryFigures(c) {
  if (!c || !c.figures || !Object.keys(c.figures).length) return '<span class="muted">waiting for the canaries</span>';
  const verdict = !c.ready ? `waiting for ${esc((c.waiting_for || []).join("; "))} ` +
      `(windows ${esc(JSON.stringify(c.windows || {}))} of ${esc(c.windows_needed)})`
    : c.passed ? '<span class="no">passed</span>' : `<span class="yes">FAILED: ${esc((c.failing || []).join(", "))}</span>`;
  const rows = Object.entries(c.figures).map(([name, f]) => {
    const shown = Object.entries(f).filter(([k, v]) => k !== "ok" && (v === null || typeof v !== "object"))
      .map(([k, v]) => `${esc(k)}=${typeof v === "number" ? fmtNum(v) : esc(v)}`).join(" ");
    const ok = f.ok === true ? '<span class="no">ok</span>' : f.ok === false ? '<span class="yes">fail</span>' : '<span class="muted">n/a</span>';
    return `<li class="figure" data-figure="${esc(name)}"><b>${esc(name)}</b> ${ok} <span class="muted">${shown}</span></li>`;
  }).join("");
  return `<div class="verdict">${verdict}</div><ul class="figures">${rows}</ul>`;
}

async function refreshDeployments() {
  const res = await fetchAuthed("/api/deployments").catch((err) => {
    if (String(err.message).includes(": 404")) return null; // this server does not deploy bundles
    throw err;
  });
  $("deployments-card").hidden = res === null;
  if (res === null) return;
  const d = await res.json();
  $("deployments").querySelector("tbody").innerHTML = d.deployments.map((x) => {
    const devices = Object.entries(x.devices).map(([id, v]) =>
      `<li data-device="${esc(id)}">${esc(id)} <span class="muted">${esc(v.role)}</span> ${esc(v.version || "?")} ` +
      `<span class="step step-${esc(v.state)}">${esc(v.state)}</span>${v.reason ? ` <span class="yes">${esc(v.reason)}</span>` : ""}</li>`).join("");
    const buttons = (DEPLOY_ACTIONS[x.state] || []).map((a) =>
      `<button data-deployment="${esc(x.deployment)}" data-deploy-action="${a}">${a}</button>`).join(" ");
    return `<tr id="deployment-${esc(x.deployment)}"><td>${esc(x.deployment)}<div class="muted">${fmtTime(x.created_at)}</div></td>` +
      `<td>${esc(x.name)} ${esc(x.version)}<div class="muted">${esc(x.sha256.slice(0, 12))}</div></td>` +
      `<td class="state state-${esc(x.state)}">${esc(x.state)}${x.note ? `<div class="muted">${esc(x.note)}</div>` : ""}</td>` +
      `<td><ul class="devices">${devices}</ul></td><td>${canaryFigures(x.canary)}</td><td>${buttons}</td></tr>`;
  }).join("");
}

// Loaded on its own: /healthz answers 503 while a consumer is disconnected, and that must show.
async function refreshBroker() {
  const el = $("broker");
  try {
    // 503 is an answer here (not ready), so this reads the body whatever the status.
    const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
    const res = await fetch("/healthz", { cache: "no-store", headers });
    const h = await res.json();
    const down = h.consumers.filter((c) => !c.connected).length;
    el.textContent = down === 0 ? "broker: connected"
      : `broker: DISCONNECTED (${down} of ${h.consumers.length} consumers), ingest paused`;
    el.classList.toggle("down", down > 0);
  } catch (err) {
    el.textContent = `broker: unknown (${err.message})`;
    el.classList.add("down");
  }
}

async function refresh() {
  refreshBroker();
  const [devices] = await Promise.all([panel("err-devices", refreshDevices), panel("err-alerts", refreshAlerts),
    panel("err-deployments", refreshDeployments), panel("err-captures", refreshCaptures)]);
  const [hist] = await Promise.all([panel("err-drift", refreshFleet), panel("err-concept", refreshConcept)]);
  if (devices) await panel("err-devices", () => renderDevices(devices, hist));
  await Promise.all([panel("err-device", refreshDeviceChart), panel("err-histogram", refreshHistogram)]);
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("token-form").classList.remove("needed");
  refresh();
});

// The CSV export goes through fetch, so it carries the token like every other call.
$("export-csv").addEventListener("click", async () => {
  try {
    const blob = await (await fetchAuthed("/api/alerts?format=csv")).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "alerts.csv";
    a.click();
    URL.revokeObjectURL(a.href);
  } catch (err) {
    alert(err.message);
  }
});

document.addEventListener("click", async (ev) => {
  const deploy = ev.target.closest("button[data-deploy-action]");
  if (deploy) {
    const { deployment, deployAction } = deploy.dataset;
    if (deployAction !== "promote" && !confirm(`${deployAction} deployment ${deployment}?`)) return;
    deploy.disabled = true;
    try {
      await api(`/api/deployments/${encodeURIComponent(deployment)}/${deployAction}`, { method: "POST",
        headers: { "Content-Type": "application/json" }, body: "{}" });
    } catch (err) {
      alert(err.message);
    }
    await panel("err-deployments", refreshDeployments);
    return;
  }
  const btn = ev.target.closest("button[data-action]");
  if (btn) {
    btn.disabled = true;
    try {
      await api(`/api/alerts/${btn.dataset.id}/${btn.dataset.action}`, { method: "POST",
        headers: { "Content-Type": "application/json" }, body: JSON.stringify({ by: "dashboard" }) });
    } catch (err) {
      alert(err.message);
    }
    await refreshAlerts();
    return;
  }
  const row = ev.target.closest("tr[data-device]");
  if (row) {
    state.device = row.dataset.device;
    await refresh();
  }
});
$("model").addEventListener("change", (e) => { state.model = e.target.value; state.channel = ""; state.device = ""; refresh(); });
$("channel").addEventListener("change", (e) => { state.channel = e.target.value; refresh(); });
$("device").addEventListener("change", (e) => { state.device = e.target.value; refresh(); });

refresh();
setInterval(refresh, REFRESH_MS);
