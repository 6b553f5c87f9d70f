/* queuectl dashboard: vanilla JS, no build step, no third-party code.
 *
 * Every string that comes from a job (id, command, output, errors) is put on
 * the page as text: through the h() helper (textContent / text nodes) or
 * element.textContent, never as HTML.  Live updates come from Server-Sent
 * Events (/api/events); if they fail the page polls; while the tab is hidden
 * it does neither.
 */
"use strict";

(function () {
  const CSRF = document.querySelector('meta[name="queuectl-csrf"]').content;
  const READ_ONLY = document.querySelector('meta[name="queuectl-read-only"]').content === "true";
  const PAGE_SIZE = 50;
  const POLL_MS = 2000;
  const STATE_ORDER = ["pending", "waiting", "processing", "completed", "failed", "dead", "cancelled"];
  const ACTIVE = ["pending", "waiting", "failed", "processing"];
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);

  // --- DOM helpers: text only -----------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") el.textContent = String(value);
      else if (key === "class") el.setAttribute("class", value);
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "data") for (const [k, v] of Object.entries(value)) el.dataset[k] = String(v);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
  }

  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  // --- formatting ------------------------------------------------------------------------

  const nf = new Intl.NumberFormat();
  const fmtInt = (n) => nf.format(n || 0);

  function fmtDuration(sec) {
    if (sec === null || sec === undefined || isNaN(sec)) return "–";
    if (sec < 0) sec = 0;
    if (sec < 1) return Math.round(sec * 1000) + " ms";
    if (sec < 10) return sec.toFixed(1) + " s";
    if (sec < 60) return Math.round(sec) + " s";
    if (sec < 3600) return Math.floor(sec / 60) + "m " + String(Math.floor(sec % 60)).padStart(2, "0") + "s";
    if (sec < 86400) return Math.floor(sec / 3600) + "h " + String(Math.floor((sec % 3600) / 60)).padStart(2, "0") + "m";
    return Math.floor(sec / 86400) + "d " + Math.floor((sec % 86400) / 3600) + "h";
  }

  function serverNow() { return Date.now() + clockSkew; }
  const parseTime = (iso) => (iso ? Date.parse(iso) : NaN);

  function ago(iso) {
    const t = parseTime(iso);
    if (isNaN(t)) return "–";
    const d = (serverNow() - t) / 1000;
    if (d < -1) return "in " + shortAgo(-d);
    if (d < 2) return "just now";
    return shortAgo(d) + " ago";
  }

  function shortAgo(d) {
    if (d < 60) return Math.floor(d) + "s";
    if (d < 3600) return Math.floor(d / 60) + "m";
    if (d < 86400) return Math.floor(d / 3600) + "h";
    return Math.floor(d / 86400) + "d";
  }

  // Local time as 2026-11-29 21:04:05: sortable, unambiguous, the same in every locale.
  function localTime(iso) {
    const t = parseTime(iso);
    if (isNaN(t)) return "–";
    const d = new Date(t);
    const p = (n) => String(n).padStart(2, "0");
    return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " +
      p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }

  function fmtBytes(n) {
    if (n < 1024) return n + " B";
    if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
    return (n / 1048576).toFixed(1) + " MiB";
  }

  function stateBadge(state, label) {
    return h("span", { class: "badge badge-" + state + " st-" + state, data: { state } },
      h("span", { class: "dot" }), label || state);
  }

  // Times shown as "3s ago" or as a running clock are refreshed every second.
  function timeCell(iso, kind) {
    const el = h("span", { class: "when", title: localTime(iso), data: { t: iso || "", kind: kind || "ago" } });
    el.textContent = kind === "since" ? fmtDuration((serverNow() - parseTime(iso)) / 1000) : ago(iso);
    return el;
  }

  function tickClocks() {
    for (const el of document.querySelectorAll("[data-t]")) {
      const iso = el.dataset.t;
      if (!iso) continue;
      el.textContent = el.dataset.kind === "since" ? fmtDuration((serverNow() - parseTime(iso)) / 1000) : ago(iso);
    }
  }

  // --- HTTP --------------------------------------------------------------------------------

  async function api(path) {
    const res = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
    const doc = await res.json().catch(() => null);
    if (!res.ok) throw new Error((doc && doc.error) || res.status + " " + res.statusText);
    return doc;
  }

  async function post(path, body) {
    const res = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Queuectl-CSRF": CSRF, Accept: "application/json" },
      body: JSON.stringify(body || {}),
      cache: "no-store",
    });
    const doc = await res.json().catch(() => null);
    if (!res.ok) throw new Error((doc && doc.error) || res.status + " " + res.statusText);
    return doc;
  }

  // --- state ---------------------------------------------------------------------------------

  let clockSkew = 0;
  const view = {
    status: null,
    stats: null,
    statsAt: 0,
    filter: "",      // state filter ("" = all)
    q: "",           // id prefix
    cursors: [null], // cursor of each page up to the one shown
    page: null,
    job: null,       // id of the job in the drawer
    jobDoc: null,
    attempt: null,   // attempt shown in the drawer (null = latest)
  };

  // --- summary bar -----------------------------------------------------------------------------

  function statesOf(status) {
    const known = Object.keys(status.job_counts);
    const order = STATE_ORDER.filter((s) => known.includes(s));
    for (const s of known) if (!order.includes(s)) order.push(s);
    // A state that only a later version uses appears once it has jobs.
    return order.filter((s) => ["pending", "processing", "completed", "failed", "dead"].includes(s) || status.job_counts[s] > 0);
  }

  function renderSummary() {
    const st = view.status;
    const cards = statesOf(st).map((state) => {
      const n = st.job_counts[state] || 0;
      const card = h("button", {
        type: "button", class: "stat st-" + state + (n ? "" : " stat-zero") + (view.filter === state ? " is-active" : ""),
        data: { state, testid: "count-" + state },
        title: "Show " + state + " jobs",
        onclick: () => setFilter(view.filter === state ? "" : state),
      },
      h("div", { class: "stat-label" }, h("span", { class: "dot" }), state),
      h("div", { class: "stat-value", data: { count: state } }, fmtInt(n)),
      h("div", { class: "stat-note" }, noteFor(state, st)));
      return card;
    });
    const ws = st.workers_summary;
    cards.push(h("div", { class: "stat metric", data: { testid: "latency" } },
      h("div", { class: "stat-label" }, "Queue latency"),
      h("div", { class: "stat-value", id: "latency" }, st.queue_latency > 0 ? fmtDuration(st.queue_latency) : "0 s"),
      h("div", { class: "stat-note" }, st.oldest_due_at ? "oldest due job" : "nothing waiting")));
    cards.push(h("div", { class: "stat metric" },
      h("div", { class: "stat-label" }, "Workers"),
      h("div", { class: "stat-value", id: "workers-count" }, fmtInt(ws.busy), h("span", { class: "muted" }, " / " + fmtInt(ws.total))),
      h("div", { class: "stat-note" }, ws.total ? "busy / running" : "none running")));
    $("summary").replaceChildren(...cards);
    $("version").textContent = "v" + st.version;
    $("db-path").textContent = st.db;
    document.title = titleFor(st);
  }

  function noteFor(state, st) {
    const c = st.job_counts;
    const total = st.total || 0;
    const idle = st.workers_summary.idle;
    if (state === "processing") return !st.workers_summary.total ? "no workers" : idle ? fmtInt(idle) + (idle === 1 ? " worker idle" : " workers idle") : "all workers busy";
    if (state === "completed" && total) return Math.round((100 * c.completed) / total) + "% of all jobs";
    if (state === "dead") return c.dead ? "dead letter queue" : "none";
    if (state === "failed") return c.failed ? "waiting to retry" : "";
    if (state === "pending") return "";
    return "";
  }

  function titleFor(st) {
    const c = st.job_counts;
    const parts = [];
    if (c.processing) parts.push(c.processing + " running");
    if (c.pending) parts.push(c.pending + " pending");
    if (c.dead) parts.push(c.dead + " dead");
    return (parts.length ? parts.join(" · ") + " — " : "") + "queuectl";
  }

  // --- workers -----------------------------------------------------------------------------------

  function renderWorkers() {
    const workers = view.status.workers;
    const ws = view.status.workers_summary;
    $("workers-sub").textContent = ws.total ? fmtInt(ws.total) + " running · " + fmtInt(ws.busy) + " busy" : "";
    const body = $("workers").tBodies[0];
    if (!workers.length) {
      body.replaceChildren(h("tr", { class: "empty-row" }, h("td", { colspan: 6 },
        "No workers. Start some with ", h("code", {}, "queuectl worker start"), " or ", h("code", {}, "queuectl up"), ".")));
      return;
    }
    body.replaceChildren(...workers.map((w) => h("tr", { title: w.id, data: { worker: w.id } },
      h("td", { class: "mono" }, String(w.pid)),
      h("td", {}, w.host),
      h("td", {}, stateBadge(w.state)),
      h("td", { class: "job-col" }, w.job_id
        ? h("div", { class: "job-cell" },
          h("a", { href: "#job=" + encodeURIComponent(w.job_id), class: "id id-link", onclick: (e) => { e.preventDefault(); openJob(w.job_id); } }, w.job_id),
          h("span", { class: "sub", title: w.job_command || "" }, w.job_command || ""))
        : h("span", { class: "muted" }, "–")),
      h("td", { class: "num" }, w.job_started_at ? timeCell(w.job_started_at, "since") : h("span", { class: "muted" }, "–")),
      h("td", { class: "num" }, timeCell(w.heartbeat_at)))));
  }

  // --- chart ---------------------------------------------------------------------------------------

  function renderStats() {
    const stats = view.stats;
    if (!stats) return;
    const t = stats.totals;
    const rate = t.processed ? (100 * t.failed) / t.processed : 0;
    const stat = (k, v, bad) => h("div", { class: "chart-stat" }, h("div", { class: "k" }, k), h("div", { class: "v" + (bad ? " bad" : "") }, v));
    $("chart-stats").replaceChildren(
      stat("Processed", fmtInt(t.processed)),
      stat("Failed", fmtInt(t.failed), t.failed > 0),
      stat("Failure rate", t.processed ? (rate < 10 ? rate.toFixed(1) : Math.round(rate)) + "%" : "–", rate >= 5),
      stat("Mean run time", fmtDuration(t.mean_run)),
      stat("Mean wait", fmtDuration(t.mean_wait)));
    drawChart();
  }

  // A grid step of 1, 2 or 5 times a power of ten, so that 4 steps cover v.
  function niceStep(v) {
    const raw = Math.max(1, v / 4);
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
    return 10 * p;
  }

  function drawChart() {
    const box = $("chart");
    const minutes = view.stats.minutes;
    const W = Math.max(300, box.clientWidth - 20);
    const H = Math.max(160, box.clientHeight - 16);
    const left = 36, bottom = 22, top = 6;
    const plotW = W - left, plotH = H - bottom - top;
    const step = niceStep(Math.max(0, ...minutes.map((m) => m.processed)));
    const max = step * 4;
    const slot = plotW / minutes.length;
    const barW = Math.max(2, slot * 0.68);
    const y = (v) => top + plotH - (v / max) * plotH;
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", "aria-label": "Completed and failed attempts per minute" });
    for (let i = 0; i <= 4; i++) {
      const v = step * i;
      root.append(svg("line", { class: "grid", x1: left, x2: W, y1: y(v), y2: y(v) }));
      root.append(svg("text", { class: "axis", x: left - 8, y: y(v) + 4, "text-anchor": "end" }, fmtInt(Math.round(v))));
    }
    const band = svg("rect", { class: "hover-band", y: top, height: plotH, width: slot, x: -100 });
    root.append(band);
    minutes.forEach((m, i) => {
      const x = left + i * slot + (slot - barW) / 2;
      if (m.completed) root.append(svg("rect", { class: "bar-ok", x, width: barW, y: y(m.completed), height: Math.max(1, plotH + top - y(m.completed)), rx: 1.5 }));
      if (m.failed) {
        const base = y(m.completed);
        root.append(svg("rect", { class: "bar-bad", x, width: barW, y: base - (plotH + top - y(m.failed)), height: Math.max(1, plotH + top - y(m.failed)), rx: 1.5 }));
      }
    });
    [60, 45, 30, 15, 0].forEach((ago) => {
      const i = minutes.length - 1 - ago;
      const x = ago === 60 ? left : left + (i + 0.5) * slot;
      root.append(svg("text", { class: "axis", x, y: H - 5, "text-anchor": ago === 60 ? "start" : ago === 0 ? "end" : "middle" },
        ago === 0 ? "now" : "−" + ago + "m"));
    });
    if (!minutes.some((m) => m.processed)) {
      root.append(svg("text", { class: "empty", x: left + plotW / 2, y: top + plotH / 2, "text-anchor": "middle" }, "No attempts finished in the last hour"));
    }
    const tip = $("chart-tip");
    root.addEventListener("mousemove", (ev) => {
      const r = root.getBoundingClientRect();
      const px = ((ev.clientX - r.left) / r.width) * W;
      const i = Math.floor((px - left) / slot);
      if (i < 0 || i >= minutes.length) { tip.hidden = true; band.setAttribute("x", -100); return; }
      const m = minutes[i];
      band.setAttribute("x", left + i * slot);
      const when = new Date(parseTime(m.minute)).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      tip.replaceChildren(h("b", {}, when), h("br"),
        fmtInt(m.completed) + " completed · " + fmtInt(m.failed) + " failed", h("br"),
        "mean run " + fmtDuration(m.mean_run) + " · wait " + fmtDuration(m.mean_wait));
      tip.hidden = false;
      const card = box.parentElement.getBoundingClientRect();
      let tx = ev.clientX - card.left + 14;
      if (tx + tip.offsetWidth > card.width - 8) tx = ev.clientX - card.left - tip.offsetWidth - 14;
      tip.style.left = tx + "px";
      tip.style.top = (ev.clientY - card.top - 10) + "px";
    });
    root.addEventListener("mouseleave", () => { tip.hidden = true; band.setAttribute("x", -100); });
    box.replaceChildren(root);
  }

  // --- jobs table -----------------------------------------------------------------------------------

  function renderTabs() {
    const st = view.status;
    const tab = (value, label, count) => h("button", {
      type: "button", class: "tab" + (view.filter === value ? " is-active" : ""), data: { filter: value },
      onclick: () => setFilter(value),
    }, value ? h("span", { class: "dot st-" + value }) : null, label, h("span", { class: "count" }, fmtInt(count)));
    $("state-tabs").replaceChildren(tab("", "All", st.total), ...statesOf(st).map((s) => tab(s, s, st.job_counts[s])));
    const dead = st.job_counts.dead || 0;
    $("dlq-bar").hidden = view.filter !== "dead" || READ_ONLY;
    $("dlq-text").textContent = dead ? fmtInt(dead) + (dead === 1 ? " job is" : " jobs are") + " in the dead letter queue." : "The dead letter queue is empty.";
    $("dlq-retry").disabled = !dead;
    $("dlq-clear").disabled = !dead;
  }

  function renderJobs() {
    const body = $("jobs").tBodies[0];
    const page = view.page;
    if (!page) return;
    if (!page.jobs.length) {
      const what = view.q ? "No job id starts with “" + view.q + "”" + (view.filter ? " among " + view.filter + " jobs" : "") + "."
        : view.filter ? "No " + view.filter + " jobs." : "No jobs yet. Enqueue one with the button above, or: queuectl enqueue -- echo hello";
      body.replaceChildren(h("tr", { class: "empty-row" }, h("td", { colspan: 7 }, what)));
    } else {
      body.replaceChildren(...page.jobs.map(jobRow));
    }
    const pageNo = view.cursors.length;
    const start = (pageNo - 1) * PAGE_SIZE + 1;
    const total = view.q ? null : view.filter ? view.status.job_counts[view.filter] : view.status.total;
    let info = page.jobs.length ? fmtInt(start) + "–" + fmtInt(start + page.jobs.length - 1) : "";
    if (info && total !== null) info += " of " + fmtInt(total);
    if (view.q) info += (info ? " · " : "") + "matching ids, in id order";
    else info += (info ? " · " : "") + "most recently updated first";
    $("page-info").textContent = info;
    $("page-newer").disabled = pageNo <= 1;
    $("page-older").disabled = !page.next;
  }

  function jobRow(job) {
    const actions = h("td", { class: "actions" });
    if (job.state === "dead" && !READ_ONLY) {
      actions.append(h("button", {
        type: "button", class: "btn btn-small", data: { action: "retry" },
        onclick: (e) => { e.stopPropagation(); retryJob(job.id); },
      }, "Retry"));
    }
    return h("tr", {
      class: "clickable" + (view.job === job.id ? " is-selected" : ""), data: { id: job.id },
      onclick: () => openJob(job.id),
    },
    h("td", { class: "id" }, h("a", { class: "id-link", href: "#job=" + encodeURIComponent(job.id), onclick: (e) => { e.preventDefault(); } }, job.id)),
    h("td", {}, stateBadge(job.state)),
    h("td", {}, h("span", { class: "prio prio-" + job.priority }, job.priority)),
    h("td", { class: "num" }, job.attempts + "/" + (job.max_retries + 1)),
    h("td", { class: "cmd", title: job.command }, job.command),
    h("td", { class: "num" }, timeCell(job.updated_at)),
    actions);
  }

  async function loadJobs() {
    const params = new URLSearchParams({ limit: PAGE_SIZE });
    if (view.filter) params.set("state", view.filter);
    if (view.q) params.set("q", view.q);
    const cursor = view.cursors[view.cursors.length - 1];
    if (cursor) params.set("cursor", cursor);
    const key = params.toString();
    const page = await api("/api/jobs?" + key);
    const now = new URLSearchParams({ limit: PAGE_SIZE });
    if (view.filter) now.set("state", view.filter);
    if (view.q) now.set("q", view.q);
    const c2 = view.cursors[view.cursors.length - 1];
    if (c2) now.set("cursor", c2);
    if (now.toString() !== key) return; // the filter changed meanwhile; a newer load is on its way
    view.page = page;
    renderJobs();
  }

  function setFilter(state) {
    view.filter = state;
    view.cursors = [null];
    writeHash();
    renderSummary();
    renderTabs();
    loadJobs().catch(showError);
  }

  // --- job drawer --------------------------------------------------------------------------------------

  function openJob(id) {
    if (view.job !== id) { view.attempt = null; view.jobDoc = null; }
    view.job = id;
    writeHash();
    $("drawer").hidden = false;
    $("scrim").hidden = false;
    $("job-title").textContent = id;
    $("job-title").title = id;
    if (!view.jobDoc) {
      $("job-state").replaceChildren();
      $("job-command").textContent = "";
      $("job-fields").replaceChildren();
      $("job-attempts").tBodies[0].replaceChildren();
      setOutput(null);
    }
    for (const tr of $("jobs").tBodies[0].rows) tr.classList.toggle("is-selected", tr.dataset.id === id);
    loadJob().catch(showError);
  }

  function closeJob() {
    view.job = null;
    view.jobDoc = null;
    $("drawer").hidden = true;
    $("scrim").hidden = true;
    writeHash();
    for (const tr of $("jobs").tBodies[0].rows) tr.classList.remove("is-selected");
  }

  async function loadJob() {
    const id = view.job;
    if (!id) return;
    let path = "/api/jobs/" + encodeURIComponent(id);
    if (view.attempt) path += "?run=" + view.attempt;
    let doc;
    try {
      doc = await api(path);
    } catch (e) {
      if (view.job === id) {
        $("job-state").replaceChildren();
        $("job-command").textContent = "";
        $("job-fields").replaceChildren(h("dt", {}, "error"), h("dd", {}, e.message));
        $("job-attempts").tBodies[0].replaceChildren();
        setOutput(null);
      }
      return;
    }
    if (view.job !== id) return;
    view.jobDoc = doc;
    renderJob();
  }

  const FIELD_LABELS = [
    ["priority", "Priority"], ["queue", "Queue"], ["attempts", "Attempts"], ["runs", "Runs"], ["created_at", "Created"],
    ["updated_at", "Updated"], ["run_at", "Run at"], ["started_at", "Started"], ["finished_at", "Finished"],
    ["worker_id", "Worker"], ["exit_code", "Exit code"], ["last_error", "Last error"], ["timeout", "Timeout"],
    ["cwd", "Directory"], ["env", "Environment"],
  ];
  const SKIP_FIELDS = new Set(["id", "command", "state", "max_retries", "runs", "rescues", "lease_until", "cancel_requested",
    "timeout_text", "effective_timeout", "timeout_from"]);

  function renderJob() {
    const { job, attempts, output } = view.jobDoc;
    $("job-state").replaceChildren(stateBadge(job.state));
    $("job-retry").hidden = READ_ONLY || job.state !== "dead";
    $("job-cancel").hidden = READ_ONLY || !ACTIVE.includes(job.state) || !!job.cancel_requested;
    if ($("job-command").textContent !== job.command) $("job-command").textContent = job.command;
    const rows = [];
    const shown = new Set();
    for (const [key, label] of FIELD_LABELS) {
      shown.add(key);
      const value = fieldValue(job, key);
      if (value === null) continue;
      rows.push(h("dt", {}, label), h("dd", { class: ["cwd", "worker_id", "env"].includes(key) ? "mono" : "" }, value));
    }
    for (const [key, raw] of Object.entries(job)) { // fields a newer queuectl adds show up too
      if (shown.has(key) || SKIP_FIELDS.has(key)) continue;
      if (raw === null || raw === "" || (Array.isArray(raw) && !raw.length)) continue;
      rows.push(h("dt", {}, key.replace(/_/g, " ")), h("dd", { class: "mono" }, Array.isArray(raw) ? raw.join(", ") : typeof raw === "object" ? JSON.stringify(raw) : String(raw)));
    }
    $("job-fields").replaceChildren(...rows);
    const body = $("job-attempts").tBodies[0];
    const current = output ? output.attempt : null;
    if (!attempts.length) {
      body.replaceChildren(h("tr", { class: "empty-row" }, h("td", { colspan: 7 }, job.state === "processing" ? "Starting…" : "Not run yet.")));
    } else {
      body.replaceChildren(...attempts.slice().reverse().map((a) => h("tr", {
        class: "clickable" + (a.n === current ? " is-selected" : ""), data: { attempt: a.n },
        title: "Show the output of run " + a.n,
        onclick: () => { view.attempt = a.n === attempts[attempts.length - 1].n ? null : a.n; loadJob().catch(showError); },
      },
      h("td", { class: "num" }, String(a.n)),
      h("td", { title: localTime(a.started_at) }, localTime(a.started_at)),
      h("td", { class: "num" }, a.outcome === "running" ? timeCell(a.started_at, "since") : fmtDuration(a.duration)),
      h("td", {}, stateBadge(a.outcome)),
      h("td", { class: "num" }, a.exit_code === null ? "–" : String(a.exit_code)),
      h("td", { class: "mono" }, a.worker_id || "–"),
      h("td", { class: "err" }, a.error || ""))));
    }
    setOutput(output);
  }

  function fieldValue(job, key) {
    const v = job[key];
    switch (key) {
      case "attempts": return job.attempts + " of " + (job.max_retries + 1);
      case "runs": return job.runs !== job.attempts || job.rescues ? job.runs + (job.rescues ? " (" + job.rescues + " lost with a worker)" : "") : null;
      case "timeout": return job.timeout_text || null;
      case "env": return v && Object.keys(v).length ? Object.entries(v).map(([k, x]) => k + "=" + x).join("  ") : null;
      case "created_at": case "updated_at": case "started_at": case "finished_at":
        return v ? localTime(v) + "  (" + ago(v) + ")" : null;
      case "run_at":
        if (!["pending", "failed", "waiting"].includes(job.state)) return null;
        return localTime(v) + "  (" + ago(v) + ")";
      default:
        return v === null || v === undefined || v === "" ? null : String(v);
    }
  }

  function setOutput(output) {
    const pre = $("job-output");
    const live = output && output.running;
    $("output-live").hidden = !live;
    if (!output) {
      $("output-meta").textContent = "";
      pre.classList.add("is-empty");
      pre.textContent = view.jobDoc ? "This job has not run yet." : "Loading…";
      return;
    }
    let meta = "run " + output.attempt + " · " + fmtBytes(output.bytes);
    if (output.truncated) meta += " · showing the last " + fmtBytes(output.text.length);
    $("output-meta").textContent = meta;
    const text = output.text || "";
    pre.classList.toggle("is-empty", !text);
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
    const shown = text || (live ? "Waiting for output…" : "No output.");
    if (pre.textContent !== shown) {
      pre.textContent = shown;
      if (atBottom || live) pre.scrollTop = pre.scrollHeight;
    }
  }

  // --- actions ------------------------------------------------------------------------------------------

  function toast(message, isError) {
    const el = h("div", { class: "toast" + (isError ? " is-error" : ""), role: "status" }, message);
    $("toasts").append(el);
    setTimeout(() => el.remove(), isError ? 7000 : 3500);
  }

  function showError(e) { toast(e && e.message ? e.message : String(e), true); }

  function confirmAction(title, text, label) {
    const dlg = $("confirm-dialog");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-yes").textContent = label;
    return new Promise((resolve) => {
      dlg.returnValue = "";
      dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
      dlg.showModal();
      $("confirm-no").focus();
    });
  }

  async function retryJob(id) {
    try {
      await post("/api/jobs/" + encodeURIComponent(id) + "/retry", {});
      toast("Job " + id + " is back in the queue");
      scheduleRefresh(0);
    } catch (e) { showError(e); }
  }

  async function cancelJob(id) {
    if (!(await confirmAction("Cancel job " + id + "?", "A running job's process tree is killed. Jobs that depend on it are cancelled too.", "Cancel job"))) return;
    try {
      const r = await post("/api/jobs/" + encodeURIComponent(id) + "/cancel", {});
      toast(r.result === "requested" ? "Cancel requested: the worker stops " + id : "Job " + id + " cancelled");
      scheduleRefresh(0);
    } catch (e) { showError(e); }
  }

  async function retryAllDead() {
    const n = view.status.job_counts.dead || 0;
    if (!(await confirmAction("Retry all dead jobs?", fmtInt(n) + " job(s) go back to the queue for one more run each.", "Retry " + fmtInt(n)))) return;
    try {
      const r = await post("/api/dlq/retry", {});
      toast("Retried " + fmtInt(r.retried) + " job(s)" + (r.skipped ? "; " + r.skipped + " skipped (unique key in use)" : ""));
      scheduleRefresh(0);
    } catch (e) { showError(e); }
  }

  async function clearDead() {
    const n = view.status.job_counts.dead || 0;
    if (!(await confirmAction("Delete all dead jobs?", fmtInt(n) + " job(s) and their output are deleted. This cannot be undone.", "Delete " + fmtInt(n)))) return;
    try {
      const r = await post("/api/dlq/clear", {});
      toast("Deleted " + fmtInt(r.deleted) + " dead job(s)");
      scheduleRefresh(0);
    } catch (e) { showError(e); }
  }

  function openEnqueue() {
    $("enqueue-error").hidden = true;
    $("enqueue-dialog").showModal();
    $("enqueue-form").elements.command.focus();
  }

  async function submitEnqueue(ev) {
    ev.preventDefault();
    const f = $("enqueue-form").elements;
    const body = { command: f.command.value, priority: f.priority.value };
    for (const name of ["id", "queue"]) if (f[name].value.trim()) body[name] = f[name].value.trim();
    for (const name of ["timeout", "delay"]) if (f[name].value !== "") body[name] = Number(f[name].value);
    if (f.max_retries.value !== "") body.max_retries = Number(f.max_retries.value);
    if (body.queue === undefined) delete body.queue;
    $("enqueue-submit").disabled = true;
    try {
      const r = await post("/api/jobs", body);
      $("enqueue-dialog").close();
      $("enqueue-form").reset();
      toast("Enqueued " + r.id);
      scheduleRefresh(0);
      openJob(r.id);
    } catch (e) {
      $("enqueue-error").textContent = e.message;
      $("enqueue-error").hidden = false;
    } finally {
      $("enqueue-submit").disabled = false;
    }
  }

  // --- refresh and live updates --------------------------------------------------------------------------

  const MIN_REFRESH_GAP = 250; // ms: a busy queue changes all the time; a few refreshes a second are enough
  let refreshTimer = null;
  let refreshing = false;
  let refreshAgain = false;
  let lastRefresh = 0;

  function scheduleRefresh(delay) {
    if (document.hidden || refreshTimer) return;
    const wait = Math.max(delay || 0, MIN_REFRESH_GAP - (Date.now() - lastRefresh));
    refreshTimer = setTimeout(runRefresh, Math.max(0, wait));
  }

  async function runRefresh() {
    refreshTimer = null;
    if (refreshing) { refreshAgain = true; return; }
    refreshing = true;
    lastRefresh = Date.now();
    try {
      await refreshAll();
      if (live.mode === "offline") setLive(es ? "live" : "polling");
    } catch (e) {
      setLive("offline");
    } finally {
      refreshing = false;
      if (refreshAgain) { refreshAgain = false; scheduleRefresh(150); }
    }
  }

  async function refreshAll() {
    const before = Date.now();
    const st = await api("/api/status");
    clockSkew = parseTime(st.now) - (before + Date.now()) / 2;
    const jobsChanged = !view.status || view.status.jobs_version !== st.jobs_version;
    view.status = st;
    renderSummary();
    renderTabs();
    renderWorkers();
    const work = [];
    if (jobsChanged || !view.page) work.push(loadJobs());
    if (jobsChanged || !view.stats || Date.now() - view.statsAt > 15000) {
      work.push(api("/api/stats").then((s) => { view.stats = s; view.statsAt = Date.now(); renderStats(); }));
    }
    const running = view.jobDoc && (view.jobDoc.job.state === "processing" || (view.jobDoc.output && view.jobDoc.output.running));
    if (view.job && (jobsChanged || running || !view.jobDoc)) work.push(loadJob());
    await Promise.all(work);
  }

  const live = { mode: "connecting" };
  let es = null;
  let esFailures = 0;
  let pollTimer = null;
  let retrySseTimer = null;

  function setLive(mode) {
    live.mode = mode;
    const el = $("live");
    el.dataset.mode = mode;
    $("live-text").textContent = { live: "Live", polling: "Polling", paused: "Paused", offline: "Offline", connecting: "Connecting" }[mode] || mode;
    el.title = {
      live: "Updates arrive as they happen (Server-Sent Events)",
      polling: "Live updates are unavailable; refreshing every " + POLL_MS / 1000 + " s",
      paused: "Updates pause while this tab is hidden",
      offline: "The dashboard server does not answer",
    }[mode] || "";
  }

  function connect() {
    if (document.hidden) return;
    if (!window.EventSource || esFailures >= 3) { startPolling(); return; }
    const source = new EventSource("/api/events");
    es = source;
    source.addEventListener("hello", () => { esFailures = 0; stopPolling(); setLive("live"); scheduleRefresh(0); });
    source.addEventListener("change", () => scheduleRefresh(60));
    source.onerror = () => {
      source.close();
      if (es !== source) return;
      es = null;
      esFailures += 1;
      if (esFailures >= 3) { startPolling(); return; }
      setLive("connecting");
      setTimeout(() => { if (!es && !document.hidden && !pollTimer) connect(); }, 500 * esFailures);
    };
  }

  function startPolling() {
    stopPolling();
    setLive("polling");
    pollTimer = setInterval(() => scheduleRefresh(0), POLL_MS);
    scheduleRefresh(0);
    clearTimeout(retrySseTimer);
    retrySseTimer = setTimeout(() => { if (!document.hidden && pollTimer) { esFailures = 0; connect(); } }, 30000);
  }

  function stopPolling() {
    if (pollTimer) clearInterval(pollTimer);
    pollTimer = null;
  }

  function disconnect() {
    if (es) { const s = es; es = null; s.close(); }
    stopPolling();
    clearTimeout(retrySseTimer);
    clearTimeout(refreshTimer);
    refreshTimer = null;
  }

  function onVisibility() {
    if (document.hidden) {
      disconnect();
      setLive("paused");
    } else {
      esFailures = 0;
      connect();
      scheduleRefresh(0);
    }
  }

  // --- URL hash: #state=dead&job=ID --------------------------------------------------------------------------

  function writeHash() {
    const p = new URLSearchParams();
    if (view.filter) p.set("state", view.filter);
    if (view.job) p.set("job", view.job);
    const hash = p.toString();
    if (location.hash.slice(1) !== hash) history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
  }

  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    view.filter = p.get("state") || "";
    const job = p.get("job");
    if (job) openJob(job);
  }

  // --- start ------------------------------------------------------------------------------------------------

  let searchTimer = null;

  function init() {
    if (READ_ONLY) {
      $("read-only-badge").hidden = false;
      for (const el of document.querySelectorAll("[data-mutation]")) el.hidden = true;
    }
    $("enqueue-open").addEventListener("click", openEnqueue);
    $("enqueue-cancel").addEventListener("click", () => $("enqueue-dialog").close());
    $("enqueue-form").addEventListener("submit", submitEnqueue);
    $("dlq-retry").addEventListener("click", retryAllDead);
    $("dlq-clear").addEventListener("click", clearDead);
    $("job-close").addEventListener("click", closeJob);
    $("scrim").addEventListener("click", closeJob);
    $("job-retry").addEventListener("click", () => view.job && retryJob(view.job));
    $("job-cancel").addEventListener("click", () => view.job && cancelJob(view.job));
    $("page-newer").addEventListener("click", () => { if (view.cursors.length > 1) { view.cursors.pop(); loadJobs().catch(showError); } });
    $("page-older").addEventListener("click", () => { if (view.page && view.page.next) { view.cursors.push(view.page.next); loadJobs().catch(showError); } });
    $("search").addEventListener("input", () => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(() => {
        view.q = $("search").value.trim();
        view.cursors = [null];
        loadJobs().catch(showError);
      }, 180);
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && view.job && !document.querySelector("dialog[open]")) closeJob();
      if (e.key === "/" && document.activeElement === document.body) { e.preventDefault(); $("search").focus(); }
    });
    document.addEventListener("visibilitychange", onVisibility);
    window.addEventListener("resize", () => { if (view.stats) drawChart(); });
    setInterval(() => { if (!document.hidden) tickClocks(); }, 1000);
    readHash();
    setLive("connecting");
    scheduleRefresh(0);
    connect();
  }

  init();
})();
