// Shipyard web console. Plain JavaScript, no dependencies, no build step.
//
// It talks to the gateway it was served by, with the signed-in user's token: the REST
// facade (/api/v1) for the control plane, the data plane's routes for the API test. Data
// from the API is only ever put into the page as text (textContent / text nodes), never
// as markup; the page's Content-Security-Policy would refuse an injected script anyway.
"use strict";
(() => {
  const API = "/api/v1";
  const TOKEN_KEY = "shipyard.token";
  // notice: what the next page says on arrival (a navigation clears the flash).
  const state = { token: sessionStorage.getItem(TOKEN_KEY) || "", me: null, notice: "" };
  const filters = { search: "", status: "", group: "", mine: false, include_deleted: false };
  // Each render gets a generation; a slow answer for a page the user left is dropped,
  // and the left page's timers are cleared.
  let generation = 0;
  const timers = new Set();

  // --- DOM --------------------------------------------------------------------------

  /** An element with attributes (on* are listeners) and children (strings become text). */
  function h(tag, attrs = {}, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") el.className = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "value") el.value = value;
      // Through the CSSOM: a style attribute is inline style, which the page's policy refuses.
      else if (key === "style") Object.assign(el.style, value);
      else if (key === "checked") el.checked = Boolean(value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function svg(tag, attrs = {}) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
    return el;
  }

  const main = () => document.getElementById("main");

  function show(...children) {
    const el = main();
    el.replaceChildren();
    append(el, children);
  }

  function flash(message, kind = "error") {
    const el = document.getElementById("flash");
    el.textContent = message;
    el.className = "flash" + (kind === "error" ? "" : " " + kind);
    el.hidden = !message;
  }

  const badge = (word) => h("span", { class: "badge " + word, "data-status": word }, word);
  const when = (ts) => (ts ? ts.replace("T", " ").replace(/\.\d+/, "").replace("Z", " UTC") : "—");
  const dash = (value) => (value === undefined || value === null || value === "" ? "—" : value);
  const fields = (rows) =>
    h("dl", { class: "fields" }, rows.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  const enc = encodeURIComponent;

  function table(headings, rows, empty = "Nothing here yet.") {
    if (!rows.length) return h("p", { class: "muted" }, empty);
    return h(
      "table",
      {},
      h("thead", {}, h("tr", {}, headings.map((x) => h("th", {}, x)))),
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c))))),
    );
  }

  function size(bytes) {
    if (!bytes) return "—";
    const units = ["B", "KiB", "MiB", "GiB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
  }

  /** Copies text to the clipboard (or, where the browser refuses, selects it for Ctrl+C). */
  async function copy(text, button) {
    let done = false;
    try {
      await navigator.clipboard.writeText(text);
      done = true;
    } catch (_) {
      const area = h("textarea", { class: "offscreen" }, text);
      document.body.append(area);
      area.select();
      done = document.execCommand("copy");
      area.remove();
    }
    if (button) {
      // The label before any click (a second click within the pause would see "Copied").
      button.dataset.label ??= button.textContent;
      button.textContent = done ? "Copied" : "Copy failed: select and press Ctrl+C";
      setTimeout(() => (button.textContent = button.dataset.label), 1500);
    }
  }

  function download(name, text) {
    const url = URL.createObjectURL(new Blob([text], { type: "text/plain" }));
    const link = h("a", { href: url, download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  // --- HTTP -------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, field) {
      super(message);
      this.status = status;
      this.field = field;
    }
  }

  /** A facade call; an error answer becomes an ApiError carrying the service's message. */
  /** A URL on this origin; the token is never sent anywhere else. */
  function here(path) {
    const url = new URL(path, location.origin);
    if (url.origin !== location.origin) throw new ApiError(400, `not this gateway's address: ${path}`);
    return url;
  }

  async function api(path, { method = "GET", body, query } = {}) {
    const url = here(API + path);
    for (const [key, value] of Object.entries(query || {})) {
      if (value !== "" && value !== undefined && value !== null && value !== false) {
        url.searchParams.set(key, String(value));
      }
    }
    const headers = { Authorization: "Bearer " + state.token };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const answer = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await answer.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = text;
    }
    if (!answer.ok) {
      const error = data && data.error;
      const message = error && error.message ? error.message : `${answer.status} ${answer.statusText}`;
      if (answer.status === 401 && path === "/me") throw new ApiError(401, message);
      if (answer.status === 401) {
        signOut(`Signed out: ${message}`);
      }
      throw new ApiError(answer.status, message, error && error.field);
    }
    return data;
  }

  /** A data-plane call (the API test): the whole answer, whatever its status. */
  async function call(method, path, { body, headers = {} } = {}) {
    const started = performance.now();
    const answer = await fetch(here(path), {
      method,
      headers: { Authorization: "Bearer " + state.token, ...headers },
      body,
    });
    const text = await answer.text();
    return { status: answer.status, headers: answer.headers, text, ms: performance.now() - started };
  }

  function pretty(text) {
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch (_) {
      return text;
    }
  }

  // --- session ----------------------------------------------------------------------

  function signOut(message = "") {
    state.token = "";
    state.me = null;
    // The next user of this tab starts clean: no token, filters or saved request bodies.
    sessionStorage.clear();
    Object.assign(filters, { search: "", status: "", group: "", mine: false, include_deleted: false });
    location.hash = "#/login";
    route();
    if (message) flash(message);
  }

  function header() {
    const who = document.getElementById("who");
    const nav = document.getElementById("nav");
    who.replaceChildren();
    nav.hidden = !state.me;
    if (!state.me) return;
    const groups = state.me.admin ? "admin" : (state.me.groups || []).join(", ") || "no group";
    append(who, [
      h("span", { id: "whoami" }, `${state.me.user} · ${groups}`),
      h("button", { onclick: () => signOut(), id: "sign-out" }, "Sign out"),
    ]);
    const section = location.hash.split("/")[1] || "deployments";
    for (const link of nav.querySelectorAll("a")) {
      link.classList.toggle("active", link.dataset.nav === section);
    }
  }

  function login() {
    const input = h("input", {
      type: "password",
      id: "token",
      placeholder: "your token",
      autocomplete: "off",
      size: 48,
    });
    const form = h(
      "form",
      {
        class: "card",
        onsubmit: async (event) => {
          event.preventDefault();
          const token = input.value.trim();
          if (!token) return flash("Paste your token first.");
          state.token = token;
          try {
            state.me = await api("/me");
          } catch (err) {
            state.token = "";
            return flash(`That token was refused: ${err.message}`);
          }
          sessionStorage.setItem(TOKEN_KEY, token);
          flash("");
          // On to the page that was asked for (a link someone sent), else the list.
          if (!location.hash || location.hash.startsWith("#/login")) location.hash = "#/deployments";
          else route();
        },
      },
      h("p", {}, "Sign in with your Shipyard token. ", h("code", {}, "shipyard users create"),
        " shows a user's token once; the admin's is in ", h("code", {}, "~/.shipyard/config.json"),
        ". The token is kept in this tab only."),
      h("div", { class: "row" }, input, h("button", { class: "primary", type: "submit" }, "Sign in")),
    );
    show(h("h1", {}, "Sign in"), form);
    input.focus();
  }

  // --- router -----------------------------------------------------------------------

  async function route() {
    generation += 1;
    for (const timer of timers) clearInterval(timer);
    timers.clear();
    const mine = generation;
    const path = location.hash.replace(/^#\/?/, "").split("?")[0];
    const parts = path.split("/").filter(Boolean).map((part) => {
      try {
        return decodeURIComponent(part);
      } catch (_) {
        return part; // a stray "%": the name as typed, which the API then refuses or finds
      }
    });
    if (!state.token || parts[0] === "login") {
      state.me = null;
      header();
      return login();
    }
    if (!state.me) {
      try {
        state.me = await api("/me");
      } catch (err) {
        if (err.status === 401) signOut(`Signed out: ${err.message}`);
        else flash(err.message);
        return;
      }
    }
    header();
    flash(state.notice, "info");
    state.notice = "";
    try {
      if (parts[0] === "images" && parts.length >= 4) {
        await imageCard(mine, parts[1], parts[2], parts[3], parts[4] || "info");
      } else if (parts[0] === "images") {
        await imageList(mine);
      } else if (parts[0] === "quotas") {
        await quotas(mine);
      } else if (parts[0] === "new") {
        await newDeployment(mine);
      } else if (parts[0] === "deployments" && parts[1]) {
        await deploymentCard(mine, parts[1], parts[2] || "instances");
      } else {
        await deploymentList(mine);
      }
    } catch (err) {
      if (mine !== generation) return;
      if (err instanceof ApiError && err.status === 401) return;
      flash(err.message || String(err));
      // Not the previous page under an error about this one.
      show(h("p", { class: "muted", id: "failed" }, "This page could not be shown. ",
        h("a", { href: "#/deployments" }, "Back to the deployments")));
    }
  }

  const current = (mine) => mine === generation;

  /** Wraps a refresh so that only the newest call's answer is shown: answers to earlier
   * calls (an older filter, a timer's) may arrive after it. */
  function newestOnly(mine, refresh) {
    let asked = 0;
    return () => {
      const mark = ++asked;
      const newest = () => mark === asked && current(mine);
      // A failed refresh says why, on its own page only; it never rejects.
      return refresh(newest).catch((err) => {
        if (newest() && !(err instanceof ApiError && err.status === 401)) flash(err.message);
      });
    };
  }

  /** Runs fn every ms while page ``mine`` is shown (a page left during its first load
   * starts no timer in the next page's set). */
  function every(mine, ms, fn) {
    if (!current(mine)) return;
    timers.add(setInterval(fn, ms));
  }

  // --- deployments ------------------------------------------------------------------

  const STATUSES = ["deploying", "deployed", "failed", "stopped", "deleted"];

  async function deploymentList(mine) {
    const groups = await api("/groups").then((r) => r.groups.map((g) => g.name)).catch(() => []);
    const body = h("div", { id: "deployments" }, h("p", { class: "muted" }, "Loading…"));
    if (!current(mine)) return;
    const refresh = newestOnly(mine, async (newest) => {
      const query = { ...filters, mine: filters.mine || undefined };
      const answer = await api("/deployments", { query });
      if (!newest()) return;
      body.replaceChildren(
        table(
          ["Name", "Group", "Status", "Image", "Replicas", "Endpoint", "Updated"],
          answer.deployments.map((d) => [
            h("div", {},
              h("a", { href: `#/deployments/${enc(d.name)}`, "data-deployment": d.name }, d.name),
              d.description ? h("div", { class: "muted small" }, d.description) : "",
              h("div", {}, Object.entries(d.metadata || {}).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`)))),
            d.group,
            badge(d.status),
            imageLink(d.group, d.image),
            `${d.ready_replicas}/${d.replicas}`,
            h("code", {}, d.endpoint),
            when(d.updated_at),
          ]),
          "No deployment matches. Create one with New deployment, or `shipyard deploy create`.",
        ),
      );
    });
    let typing;
    const search = h("input", {
      type: "search",
      id: "search",
      placeholder: "Search by name",
      value: filters.search,
      oninput: () => {
        filters.search = search.value;
        clearTimeout(typing);
        typing = setTimeout(refresh, 200);
      },
    });
    const select = (id, label, options, key) =>
      h(
        "select",
        { id, onchange: (e) => ((filters[key] = e.target.value), refresh()) },
        h("option", { value: "" }, label),
        options.map((o) => h("option", { value: o, selected: filters[key] === o || undefined }, o)),
      );
    const check = (id, label, key) =>
      h("label", {}, h("input", {
        type: "checkbox",
        id,
        checked: filters[key],
        onchange: (e) => ((filters[key] = e.target.checked), refresh()),
      }), " ", label);
    show(
      h("h1", {}, "Deployments", h("a", { href: "#/new", class: "button primary", id: "new-deployment" }, "New deployment")),
      h(
        "div",
        { class: "toolbar" },
        search,
        select("status", "Any status", STATUSES, "status"),
        select("group", "Any group", groups, "group"),
        check("mine", "Deployed by me", "mine"),
        check("include-deleted", "Include deleted", "include_deleted"),
        h("button", { onclick: refresh }, "Refresh"),
      ),
      body,
    );
    await refresh();
    every(mine, 5000, refresh);
  }

  function imageLink(group, image) {
    if (!image || !image.name) return "—";
    const label = `${image.name}:${image.version}`;
    return h("a", { href: `#/images/${enc(group)}/${enc(image.name)}/${image.version}` }, label);
  }

  const TABS = [
    ["instances", "Instances"],
    ["history", "History"],
    ["logs", "Logs"],
    ["monitoring", "Monitoring"],
    ["api", "API test"],
    ["async", "Async"],
    ["batch", "Batch"],
    ["keys", "Keys"],
    ["readme", "Readme"],
    ["settings", "Settings"],
  ];

  /** A deployment; a deleted one (which GetDeployment no longer answers) from the list
   * with deleted ones: its history, instances, logs, metrics and readme stay readable. */
  async function findDeployment(name) {
    try {
      return await api(`/deployments/${enc(name)}`);
    } catch (err) {
      if (err.status !== 404) throw err;
      const listed = await api("/deployments", { query: { search: name, include_deleted: true } });
      const found = listed.deployments.find((x) => x.name === name && x.status === "deleted");
      if (!found) throw err;
      return found;
    }
  }

  // What a deleted deployment still has.
  const KEPT_TABS = ["instances", "history", "logs", "monitoring", "readme"];

  async function deploymentCard(mine, name, tab) {
    let d = await findDeployment(name);
    if (!current(mine)) return;
    const base = `#/deployments/${enc(name)}`;
    const action = (label, verb, enabled) =>
      enabled &&
      h("button", {
        id: `action-${verb}`,
        onclick: async (event) => {
          event.target.disabled = true;
          try {
            await api(`/deployments/${enc(name)}:${verb}`, { method: "POST" });
          } catch (err) {
            event.target.disabled = false;
            return flash(err.message);
          }
          state.notice = `${label}: done.`;
          route();
        },
      }, label);
    const headline = () =>
      h("h1", {}, h("span", { id: "title" }, d.name), badge(d.status),
        action("Stop", "stop", ["deployed", "deploying", "failed"].includes(d.status)),
        action("Start", "start", d.status === "stopped"));
    const card = () => {
      const range = d.scaling.min_replicas === d.scaling.max_replicas
        ? `${d.scaling.min_replicas}`
        : `${d.scaling.min_replicas}–${d.scaling.max_replicas} (autoscaled)`;
      // The scheduler gives the full URL when it knows the gateway's, else the path.
      const url = /^https?:/.test(d.endpoint) ? d.endpoint : location.origin + d.endpoint;
      const metadata = Object.entries(d.metadata || {});
      return h("div", { class: "card" }, fields([
        ["Status", h("span", {}, d.status, d.message ? ` — ${d.message}` : "")],
        ["Group", d.group],
        ["Image", imageLink(d.group, d.image)],
        ["Configuration", `${d.instance_type}, ${range} replicas`],
        ["Instances", `${d.ready_replicas} ready of ${d.replicas}`],
        ["Access", d.access === "public" ? "public (no key)" : "private (client key or a member's token)"],
        ["URL", h("span", { class: "row" }, h("code", { id: "endpoint" }, url),
          h("button", { onclick: (e) => copy(url, e.target) }, "Copy"))],
        ["Revision", `${d.revision} (serving ${d.active_revision || "none yet"})`],
        ["Created", `${when(d.created_at)} by ${d.created_by}`],
        ["Updated", `${when(d.updated_at)} by ${d.updated_by}`],
        ["Description", h("span", { id: "description" }, dash(d.description))],
        metadata.length && ["Metadata", metadata.map(([k, v]) => h("div", {}, h("code", {}, k), " = ", v))],
      ]));
    };
    let top = headline();
    let facts = card();
    const panel = h("div", { id: "panel" });
    show(
      top,
      facts,
      h("div", { class: "tabs" }, TABS.filter(([key]) => d.status !== "deleted" || KEPT_TABS.includes(key))
        .map(([key, label]) =>
          h("a", { href: `${base}/${key}`, class: key === tab ? "active" : "", "data-tab": key }, label))),
      panel,
    );
    // The headline and the card follow the deployment (deploying → deployed, replicas);
    // the tab below keeps what the user typed.
    every(mine, 5000, newestOnly(mine, async (newest) => {
      const fresh = await findDeployment(name);
      if (!newest() || JSON.stringify(fresh) === JSON.stringify(d)) return;
      d = fresh;
      const [newTop, newFacts] = [headline(), card()];
      top.replaceWith(newTop);
      facts.replaceWith(newFacts);
      [top, facts] = [newTop, newFacts];
    }));
    const panels = {
      instances, history, logs, monitoring, apiTest, async: asyncRequests, batch: batchJobs, keys,
      readme: deploymentReadme, settings,
    };
    const render = panels[tab === "api" ? "apiTest" : tab] || instances;
    await render(mine, d, panel);
  }

  async function instances(mine, d, panel) {
    const refresh = newestOnly(mine, async (newest) => {
      const answer = await api(`/deployments/${enc(d.name)}/instances`);
      if (!newest()) return;
      panel.replaceChildren(
        h("p", { class: "muted" }, "The last 200 instances, newest first."),
        table(
          ["Instance", "Revision", "Status", "Restarts", "Created", "Ready", "Ended", "Message", ""],
          answer.instances.map((i) => [
            h("code", {}, i.instance_id),
            i.revision,
            badge(i.status),
            i.restarts,
            when(i.created_at),
            when(i.ready_at),
            when(i.ended_at),
            h("span", { class: "mono" }, dash(i.message)),
            h("a", { href: `#/deployments/${enc(d.name)}/logs?instance=${enc(i.instance_id)}` }, "logs"),
          ]),
          "No instance yet.",
        ),
      );
    });
    await refresh();
    every(mine, 5000, refresh);
  }

  async function history(mine, d, panel) {
    const answer = await api(`/deployments/${enc(d.name)}/history`);
    if (!current(mine)) return;
    panel.replaceChildren(table(
      ["Revision", "Action", "By", "At", "Image", "Replicas", "Instance type", "Stopped", "Message"],
      answer.entries.map((e) => [
        e.revision,
        e.action,
        e.actor,
        when(e.at),
        imageLink(e.group, e.image),
        e.scaling ? `${e.scaling.min_replicas}–${e.scaling.max_replicas}` : "—",
        e.instance_type,
        e.stopped ? "yes" : "no",
        dash(e.message || e.description),
      ]),
    ));
  }

  async function logs(mine, d, panel) {
    const wanted = new URLSearchParams(location.hash.split("?")[1] || "").get("instance") || "";
    const sources = await api(`/deployments/${enc(d.name)}/log-sources`);
    if (!current(mine)) return;
    const instance = h("select", { id: "log-instance" }, h("option", { value: "" }, "Every instance"),
      sources.sources.map((s) => h("option", { value: s.instance, selected: s.instance === wanted || undefined },
        `${s.instance} (revision ${s.revision}, ${s.lines} lines)`)));
    const grep = h("input", { type: "search", id: "log-grep", placeholder: "Only lines containing…" });
    const limit = h("select", { id: "log-limit" }, ["200", "2000", "10000"].map((n) =>
      h("option", { value: n, selected: n === "2000" || undefined }, `last ${n}`)));
    const follow = h("input", { type: "checkbox", id: "log-follow" });
    const out = h("pre", { class: "block", id: "log-lines" }, "Loading…");
    let lines = [];
    let text = "";
    let loading = false;
    const key = (l) => `${l.instance}|${l.offset}|${l.at}`;
    const render = () => {
      text = lines.map((l) => `${when(l.at)}  ${l.instance}  ${l.text}`).join("\n");
      out.textContent = text || "No lines.";
    };
    const refresh = newestOnly(mine, async (newest) => {
      loading = true;
      try {
        const query = { instance: instance.value, grep: grep.value, limit: limit.value };
        const answer = await api(`/deployments/${enc(d.name)}/logs`, { query });
        if (!newest()) return;
        lines = answer.lines;
        render();
        // What is shown, for whoever waits for a filter to apply.
        out.dataset.shown = `${query.instance}|${query.grep}`;
      } finally {
        loading = false;
      }
    });
    // Following: the lines since the newest shown, appended (the facade does not stream,
    // so this asks every 2 s); a full refresh in flight or a changed filter skips a turn.
    const more = newestOnly(mine, async (newest) => {
      if (!follow.checked || loading) return;
      const query = { instance: instance.value, grep: grep.value, limit: limit.value };
      const since = lines.length ? lines[lines.length - 1].at : undefined;
      const answer = await api(`/deployments/${enc(d.name)}/logs`, { query: { ...query, since } });
      const same = query.instance === instance.value && query.grep === grep.value;
      if (!newest() || loading || !same) return;
      const known = new Set(lines.map(key));
      const fresh = answer.lines.filter((l) => !known.has(key(l)));
      if (!fresh.length) return;
      lines = [...lines, ...fresh].slice(-Number(limit.value));
      render();
      out.scrollTop = out.scrollHeight;
    });
    for (const input of [instance, limit]) input.addEventListener("change", refresh);
    grep.addEventListener("change", refresh);
    grep.addEventListener("search", refresh);
    panel.replaceChildren(
      h("div", { class: "toolbar" }, instance, grep, limit,
        h("label", {}, follow, " Follow"),
        h("button", { onclick: refresh }, "Refresh"),
        h("button", { id: "copy-logs", onclick: (e) => copy(text, e.target) }, "Copy"),
        h("button", { onclick: () => download(`${d.name}-${instance.value || "all"}.log`, text) }, "Download")),
      out,
    );
    await refresh();
    every(mine, 2000, more);
  }

  const WINDOWS = [["1h", 60], ["6h", 360], ["24h", 1440], ["3d", 4320]];

  async function monitoring(mine, d, panel) {
    const span = h("select", { id: "metrics-window" }, WINDOWS.map(([label, minutes]) =>
      h("option", { value: minutes }, `last ${label}`)));
    const body = h("div", {});
    const refresh = newestOnly(mine, async (newest) => {
      const since = new Date(Date.now() - Number(span.value) * 60000).toISOString();
      const m = await api(`/deployments/${enc(d.name)}/metrics`, { query: { since } });
      if (!newest()) return;
      const t = m.total;
      const pct = (x) => `${(100 * x).toFixed(1)}%`;
      const tile = (label, value, id) =>
        h("div", { class: "tile" }, h("div", { class: "label" }, label), h("div", { class: "value", id }, value));
      body.replaceChildren(
        h("div", { class: "tiles" },
          tile("Requests", String(t.requests), "m-requests"),
          tile("QPS", t.qps.toFixed(2), "m-qps"),
          tile("Success rate", t.requests ? pct(t.success_rate) : "—", "m-success"),
          tile("4xx", t.requests ? pct(t.rate_4xx) : "—", "m-4xx"),
          tile("5xx", t.requests ? pct(t.rate_5xx) : "—", "m-5xx"),
          tile("Latency p50", `${t.latency_p50_ms.toFixed(1)} ms`, "m-p50"),
          tile("Latency p95", `${t.latency_p95_ms.toFixed(1)} ms`, "m-p95"),
          tile("Latency p99", `${t.latency_p99_ms.toFixed(1)} ms`, "m-p99")),
        h("p", { class: "muted" }, `One point per ${m.step_minutes} min, UTC. Kept 3 days.`),
        h("div", { class: "charts" },
          chart("Requests per second", m.series, [["qps", "#2457c5", (p) => p.qps]]),
          chart("Success rate (%)", m.series, [["success", "#157f3b", (p) => (p.requests ? 100 * p.success_rate : NaN)]]),
          chart("Errors (%)", m.series, [
            ["4xx", "#a15c00", (p) => (p.requests ? 100 * p.rate_4xx : NaN)],
            ["5xx", "#b42318", (p) => (p.requests ? 100 * p.rate_5xx : NaN)],
          ]),
          chart("Latency (ms)", m.series, [
            ["p50", "#2457c5", (p) => (p.requests ? p.latency_p50_ms : NaN)],
            ["p95", "#7a3ec8", (p) => (p.requests ? p.latency_p95_ms : NaN)],
            ["p99", "#b42318", (p) => (p.requests ? p.latency_p99_ms : NaN)],
          ])),
      );
    });
    span.addEventListener("change", refresh);
    panel.replaceChildren(h("div", { class: "toolbar" }, span, h("button", { onclick: refresh }, "Refresh")), body);
    await refresh();
    every(mine, 10000, refresh);
  }

  /** A line chart of `series` (points over time); a NaN value leaves a gap. */
  function chart(title, series, lines) {
    const W = 340;
    const H = 130;
    const left = 34;
    const bottom = H - 16;
    const values = lines.flatMap(([, , get]) => series.map(get)).filter(Number.isFinite);
    const top = values.length ? Math.max(...values) : 0;
    const max = top > 0 ? top * 1.1 : 1;
    const x = (i) => left + (series.length > 1 ? (i * (W - left - 6)) / (series.length - 1) : 0);
    const y = (v) => bottom - (v / max) * (bottom - 8);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
    root.append(svg("line", { class: "axis", x1: left, y1: bottom, x2: W - 4, y2: bottom }));
    root.append(svg("line", { class: "axis", x1: left, y1: 8, x2: left, y2: bottom }));
    const label = (text, ly) => {
      const t = svg("text", { x: left - 4, y: ly, "text-anchor": "end" });
      t.textContent = text;
      return t;
    };
    root.append(label(top > 0 ? String(+top.toPrecision(3)) : "0", y(top) + 3), label("0", bottom));
    // The time axis: where the series starts and ends (UTC, as everywhere here).
    const clock = (ts) => (ts ? ts.slice(11, 16) : "");
    if (series.length) {
      for (const [text, tx, anchor] of [
        [clock(series[0].start), left, "start"],
        [`${clock(series[series.length - 1].end)} UTC`, W - 4, "end"],
      ]) {
        const t = svg("text", { x: tx, y: H - 3, "text-anchor": anchor });
        t.textContent = text;
        root.append(t);
      }
    }
    let drawn = 0;
    for (const [name, color, get] of lines) {
      // Consecutive finite points form one polyline; gaps split it.
      let run = [];
      const flush = () => {
        if (run.length > 1) {
          root.append(svg("polyline", { points: run.join(" "), stroke: color, "data-line": name }));
        } else if (run.length === 1) {
          // A lone point (a minute with requests between quiet ones) is a dot.
          const [cx, cy] = run[0].split(",");
          root.append(svg("circle", { cx, cy, r: 2.5, fill: color, "data-line": name }));
        }
        run = [];
      };
      series.forEach((point, i) => {
        const v = get(point);
        if (Number.isFinite(v)) {
          run.push(`${x(i).toFixed(1)},${y(v).toFixed(1)}`);
          drawn += 1;
        } else flush();
      });
      flush();
    }
    return h("div", { class: "chart", "data-chart": title, "data-points": drawn },
      h("div", { class: "title" }, title), root,
      h("div", { class: "legend" }, lines.map(([name, color]) =>
        h("span", {}, h("i", { style: { background: color } }), name))));
  }

  const PROTOCOLS = {
    raw: ["Raw JSON", "POST", (d) => `/deployments/${enc(d)}/predict`, "{}"],
    v1: ["KServe v1", "POST", (d) => `/v1/models/${enc(d)}:predict`, '{"instances": []}'],
    v2: ["Open Inference v2", "POST", (d) => `/v2/models/${enc(d)}/infer`,
      '{"inputs": [{"name": "input-0", "shape": [1, 1], "datatype": "FP64", "data": [0]}]}'],
    seldon: ["Seldon", "POST", (d) => `/deployment/${enc(d)}/api/v1.0/predictions`, '{"data": {"ndarray": []}}'],
    metadata: ["Model metadata", "GET", (d) => `/v2/models/${enc(d)}`, ""],
  };

  /** The curl command for a request; the token stays a variable, never the secret. */
  function curl(method, url, body, isAsync) {
    const quote = (s) => `'${s.replace(/'/g, "'\\''")}'`;
    const parts = [`curl -X ${method} ${quote(url)}`, `-H "Authorization: Bearer $SHIPYARD_TOKEN"`];
    if (method !== "GET") parts.push("-H 'Content-Type: application/json'");
    if (isAsync) parts.push("-H 'X-Async-Request: true'");
    if (method !== "GET") parts.push(`-d ${quote(body)}`);
    return parts.join(" \\\n  ");
  }

  async function apiTest(mine, d, panel) {
    const saved = (p) => sessionStorage.getItem(`shipyard.body.${d.name}.${p}`);
    const protocol = h("select", { id: "api-protocol" }, Object.entries(PROTOCOLS).map(([key, [label, method, path]]) =>
      h("option", { value: key }, `${label}: ${method} ${decodeURIComponent(path(d.name))}`)));
    const body = h("textarea", { id: "api-body", spellcheck: "false" });
    const asyncBox = h("input", { type: "checkbox", id: "api-async" });
    const curlText = h("pre", { class: "block", id: "api-curl" });
    const result = h("div", { id: "api-result" });
    const selected = () => PROTOCOLS[protocol.value];
    const update = () => {
      const [, method, path] = selected();
      body.disabled = asyncBox.disabled = method === "GET";
      curlText.textContent = curl(method, location.origin + path(d.name), body.value, asyncBox.checked && !asyncBox.disabled);
    };
    const load = () => {
      const [, , , example] = selected();
      body.value = saved(protocol.value) ?? example;
      update();
    };
    protocol.addEventListener("change", load);
    body.addEventListener("input", () => {
      sessionStorage.setItem(`shipyard.body.${d.name}.${protocol.value}`, body.value);
      update();
    });
    asyncBox.addEventListener("change", update);
    let sent = 0;
    const send = async () => {
      const mark = ++sent;
      const newest = () => mark === sent && current(mine);
      const [, method, path] = selected();
      const asyncOn = asyncBox.checked && method !== "GET";
      result.replaceChildren(h("p", { class: "muted" }, "Sending…"));
      let answer;
      try {
        answer = await call(method, path(d.name), {
          body: method === "GET" ? undefined : body.value,
          headers: method === "GET" ? {} : {
            "Content-Type": "application/json",
            ...(asyncOn ? { "X-Async-Request": "true" } : {}),
          },
        });
      } catch (err) {
        result.replaceChildren(h("p", { class: "flash" }, `The request did not get through: ${err.message}`));
        return;
      }
      if (!newest()) return;
      const out = (id, answer) => [
        h("p", {}, h("strong", { id: `${id}-status` }, `HTTP ${answer.status}`), ` · ${answer.ms.toFixed(0)} ms`),
        h("pre", { class: "block", id: `${id}-body` }, pretty(answer.text)),
      ];
      result.replaceChildren(...out("api-answer", answer));
      if (answer.status === 202 && asyncOn) await follow(newest, d, answer, result, out);
    };
    panel.replaceChildren(
      h("div", { class: "card" },
        h("div", { class: "toolbar" }, protocol,
          h("label", {}, asyncBox, " Async (", h("code", {}, "X-Async-Request: true"), ")")),
        body,
        h("div", { class: "toolbar spaced" },
          h("button", { class: "primary", id: "api-send", onclick: send }, "Send"),
          h("button", { id: "api-copy-curl", onclick: (e) => copy(curlText.textContent, e.target) }, "Copy as cURL"))),
      h("h2", {}, "As cURL"),
      curlText,
      h("h2", {}, "Answer"),
      result,
    );
    load();
  }

  /** Polls an async request until it ends, then shows its result. */
  async function follow(newest, d, accepted, result, out) {
    let id;
    try {
      id = JSON.parse(accepted.text).request_id;
    } catch (_) {
      return;
    }
    const status = h("p", { id: "api-async-status" }, "Request ", h("code", {}, id), " ", badge("queued"));
    result.append(status);
    const deadline = Date.now() + 5 * 60 * 1000;
    // Until it ends (anything but queued or running), this send is superseded, or 5 min.
    while (newest()) {
      let answer;
      let doc = {};
      try {
        answer = await call("GET", `/deployments/${enc(d.name)}/async/${enc(id)}`);
        doc = JSON.parse(answer.text);
      } catch (err) {
        if (newest()) result.append(h("p", { class: "flash" }, `Following ${id} stopped: ${err.message}`));
        return;
      }
      if (!newest()) return;
      status.replaceChildren("Request ", h("code", {}, id), " ", badge(doc.status || `HTTP ${answer.status}`));
      if (answer.status < 400 && ["queued", "running"].includes(doc.status)) {
        if (Date.now() > deadline) {
          result.append(h("p", { class: "muted" }, `Still ${doc.status} after 5 minutes; see the Async tab later.`));
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, 500));
        continue;
      }
      if (doc.status === "completed" && doc.result_url) {
        const got = await call("GET", doc.result_url).catch((err) => ({ status: 0, text: err.message, ms: 0 }));
        if (newest()) result.append(...out("api-async-result", got));
      } else {
        result.append(h("pre", { class: "block" }, pretty(answer.text)));
      }
      return;
    }
  }

  async function keys(mine, d, panel) {
    const answer = await api(`/deployments/${enc(d.name)}/keys`);
    if (!current(mine)) return;
    const name = h("input", { type: "text", id: "key-client", placeholder: "client name, e.g. shop" });
    const create = async () => {
      try {
        const created = await api(`/deployments/${enc(d.name)}/keys`, { method: "POST", body: { client: name.value.trim() } });
        await keys(mine, d, panel);
        panel.prepend(h("div", { class: "secret", id: "key-secret" },
          h("p", {}, h("strong", {}, `Key for ${created.key.client}. `),
            "Copy it now: it is shown once and stored hashed."),
          h("div", { class: "row" }, h("code", { id: "key-secret-value" }, created.secret),
            h("button", { onclick: (e) => copy(created.secret, e.target) }, "Copy")),
          h("p", { class: "muted" }, "Use it as ", h("code", {}, `curl -u ${created.key.client}:<secret>`),
            " or ", h("code", {}, "Authorization: Bearer <secret>"), ".")));
      } catch (err) {
        flash(err.message);
      }
    };
    const revoke = (client) => async () => {
      try {
        await api(`/deployments/${enc(d.name)}/keys/${enc(client)}`, { method: "DELETE" });
        await keys(mine, d, panel);
      } catch (err) {
        flash(err.message);
      }
    };
    panel.replaceChildren(
      h("div", { class: "toolbar" }, name, h("button", { class: "primary", id: "key-create", onclick: create }, "Create key")),
      table(["Client", "Key id", "Created", "Last used", ""], answer.keys.map((k) => [
        k.client, h("code", {}, k.key_id), `${when(k.created_at)} by ${k.created_by}`, when(k.last_used_at),
        h("button", { class: "danger", onclick: revoke(k.client) }, "Revoke"),
      ]), "No client keys. Members of the group can call with their own token."),
    );
  }

  async function readmePanel(mine, panel, path, what) {
    const answer = await api(path).catch((err) => {
      if (err.status === 404) return { markdown: "" };
      throw err;
    });
    if (!current(mine)) return;
    const rendered = () => {
      if (!answer.markdown) return h("p", { class: "muted" }, `This ${what} has no readme yet.`);
      try {
        return markdown(answer.markdown);
      } catch (_) {
        // Whatever the renderer cannot take is shown as the text it is; Edit stays.
        return h("pre", { class: "block" }, answer.markdown);
      }
    };
    const view = () => panel.replaceChildren(
      h("div", { class: "toolbar" }, h("button", { id: "readme-edit", onclick: edit }, "Edit"),
        answer.updated_by ? h("span", { class: "muted" }, `Updated ${when(answer.updated_at)} by ${answer.updated_by}`) : ""),
      h("div", { class: "card", id: "readme" }, rendered()),
    );
    const edit = () => {
      const area = h("textarea", { id: "readme-text", class: "tall" }, answer.markdown);
      panel.replaceChildren(area, h("div", { class: "toolbar spaced" },
        h("button", { class: "primary", id: "readme-save", onclick: async () => {
          try {
            Object.assign(answer, await api(path, { method: "PUT", body: { markdown: area.value } }));
            view();
          } catch (err) {
            flash(err.message);
          }
        } }, "Save"),
        h("button", { onclick: view }, "Cancel")));
    };
    view();
  }

  const deploymentReadme = (mine, d, panel) =>
    readmePanel(mine, panel, `/deployments/${enc(d.name)}/readme`, "deployment");

  // --- forms: create, update, scale, delete ------------------------------------------

  /** A labelled row of a form, with a hint under it. */
  const row = (label, input, hint) =>
    h("label", { class: "form-row" }, h("span", { class: "label" }, label), input,
      hint ? h("span", { class: "hint" }, hint) : "");

  /** Options of a select; a chosen value the list lacks (an image or type since removed
   * from the catalog) is added, so that an untouched select keeps it. */
  const options = (values, chosen) => {
    const all = chosen && !values.some(([value]) => value === chosen) ? [[chosen, chosen], ...values] : values;
    return all.map(([value, label]) => h("option", { value, selected: value === chosen || undefined }, label));
  };

  /** Lines of `key=value` as an object; a line without `=` is refused with its number. */
  function parseMetadata(text) {
    const metadata = {};
    text.split("\n").forEach((line, i) => {
      if (!line.trim()) return;
      const at = line.indexOf("=");
      if (at < 1) throw new ApiError(400, `metadata line ${i + 1}: write key=value`, "metadata");
      metadata[line.slice(0, at).trim()] = line.slice(at + 1).trim();
    });
    return metadata;
  }

  /** Runs a form's action; an error is shown with the field it names, the form kept. */
  async function submitting(button, action) {
    button.disabled = true;
    flash("");
    try {
      await action();
    } catch (err) {
      flash(err.field ? `${err.message} (field: ${err.field})` : err.message);
    } finally {
      button.disabled = false;
    }
  }

  async function catalog(group) {
    const [images, types] = await Promise.all([
      api("/images", { query: { group } }).catch(() => ({ images: [] })),
      api("/instance-types").catch(() => ({ instance_types: [] })),
    ]);
    return {
      images: images.images.map((i) => [`${i.name}:${i.version}`, `${i.name}:${i.version}`]),
      types: types.instance_types.map((t) =>
        [t.name, `${t.name} (${t.cpu} CPU, ${t.memory_gib} GiB${t.gpu ? `, ${t.gpu} GPU` : ""})`]),
    };
  }

  async function newDeployment(mine) {
    const groups = state.me.admin
      ? (await api("/groups")).groups.map((g) => g.name)
      : state.me.groups || [];
    const group = h("select", { id: "new-group" }, options(groups.map((g) => [g, g])));
    const image = h("select", { id: "new-image" });
    const type = h("select", { id: "new-type" });
    if (!current(mine)) return;
    // Switching groups quickly: only the last group's catalog fills the lists.
    const fill = newestOnly(mine, async (newest) => {
      const { images, types } = await catalog(group.value);
      if (!newest()) return;
      image.replaceChildren(...options(images));
      type.replaceChildren(...options(types));
    });
    group.addEventListener("change", fill);
    const name = h("input", { type: "text", id: "new-name", placeholder: "iris-prod", autocomplete: "off" });
    const min = h("input", { type: "number", id: "new-min", value: "1", min: "0" });
    const max = h("input", { type: "number", id: "new-max", value: "1", min: "1" });
    const access = h("select", { id: "new-access" }, options([["private", "private: a client key or a member's token"], ["public", "public: no key"]]));
    const description = h("input", { type: "text", id: "new-description" });
    const metadata = h("textarea", { id: "new-metadata", placeholder: "team=shop\nowner=ana" });
    const create = h("button", { class: "primary", id: "new-create", type: "submit" }, "Create");
    const form = h("form", {
      class: "card form",
      onsubmit: (event) => {
        event.preventDefault();
        submitting(create, async () => {
          const body = {
            name: name.value.trim(),
            group: group.value,
            spec: {
              image: image.value,
              instance_type: type.value,
              scaling: { min_replicas: Number(min.value), max_replicas: Number(max.value) },
              access: access.value,
              description: description.value,
              metadata: parseMetadata(metadata.value),
            },
          };
          const made = await api("/deployments", { method: "POST", body });
          location.hash = `#/deployments/${enc(made.name)}`;
        });
      },
    },
    row("Name", name, "Lowercase letters, digits and dashes; it is in the URL and cannot change."),
    row("Group", group, "Its quota pays for the instances."),
    row("Image", image, "Build one with: shipyard image build ./folder --name NAME"),
    row("Instance type", type),
    row("Replicas", h("span", { class: "row" }, "from ", min, " to ", max),
      "Equal: a fixed count. A range: autoscaled; from 0: it sleeps when idle."),
    row("Access", access),
    row("Description", description),
    row("Metadata", metadata, "One key=value per line."),
    h("div", { class: "toolbar spaced" }, create, h("a", { href: "#/deployments" }, "Cancel")));
    show(h("h1", {}, "New deployment"), form);
    await fill();
    name.focus();
  }

  async function settings(mine, d, panel) {
    const { images, types } = await catalog(d.group);
    if (!current(mine)) return;
    const reload = () => route();
    const image = h("select", { id: "edit-image" }, options(images, `${d.image.name}:${d.image.version}`));
    const type = h("select", { id: "edit-type" }, options(types, d.instance_type));
    const access = h("select", { id: "edit-access" }, options([["private", "private"], ["public", "public"]], d.access));
    const description = h("input", { type: "text", id: "edit-description", value: d.description, size: 60 });
    const message = h("input", { type: "text", id: "edit-message", placeholder: "why (kept in the history)", size: 60 });
    const update = h("button", { class: "primary", id: "edit-save", type: "submit" }, "Update");
    const min = h("input", { type: "number", id: "scale-min", value: String(d.scaling.min_replicas), min: "0" });
    const max = h("input", { type: "number", id: "scale-max", value: String(d.scaling.max_replicas), min: "1" });
    const scale = h("button", { id: "scale-save", type: "submit" }, "Scale");
    const remove = h("button", { class: "danger", id: "delete", type: "button" }, "Delete…");
    remove.addEventListener("click", () => {
      // Two clicks, the second on a button that says what it does: no browser dialog.
      if (remove.dataset.armed !== "yes") {
        remove.dataset.armed = "yes";
        remove.textContent = `Delete ${d.name} for good`;
        return;
      }
      submitting(remove, async () => {
        await api(`/deployments/${enc(d.name)}`, { method: "DELETE" });
        state.notice = `${d.name} is deleted; its history and metrics stay readable.`;
        location.hash = "#/deployments";
      });
    });
    panel.replaceChildren(
      h("h2", {}, "Update"),
      h("form", {
        class: "card form",
        onsubmit: (event) => {
          event.preventDefault();
          submitting(update, async () => {
            const body = { message: message.value };
            if (image.value && image.value !== `${d.image.name}:${d.image.version}`) body.image = image.value;
            if (type.value && type.value !== d.instance_type) body.instance_type = type.value;
            if (access.value !== d.access) body.access = access.value;
            if (description.value !== d.description) {
              body.description = description.value;
              body.set_description = true;
            }
            await api(`/deployments/${enc(d.name)}`, { method: "PATCH", body });
            state.notice = "Updated: the new revision rolls out without downtime.";
            reload();
          });
        },
      },
      row("Image", image), row("Instance type", type), row("Access", access),
      row("Description", description), row("Message", message),
      h("div", { class: "toolbar spaced" }, update)),
      h("h2", {}, "Scale"),
      h("form", {
        class: "card form",
        onsubmit: (event) => {
          event.preventDefault();
          submitting(scale, async () => {
            await api(`/deployments/${enc(d.name)}:scale`, {
              method: "POST",
              body: { min_replicas: Number(min.value), max_replicas: Number(max.value) },
            });
            state.notice = "Scaled.";
            reload();
          });
        },
      },
      row("Replicas", h("span", { class: "row" }, "from ", min, " to ", max),
        "Equal: a fixed count. A range: autoscaled; from 0: it sleeps when idle."),
      h("div", { class: "toolbar spaced" }, scale)),
      h("h2", {}, "Delete"),
      h("div", { class: "card" },
        h("p", {}, "Stops every instance and frees the quota. The history, instances, metrics and readme stay readable."),
        remove),
    );
  }

  // --- async requests and batch jobs (the data plane's routes) -------------------------

  /** A data-plane JSON call; an error answer becomes an ApiError with its message. */
  async function plane(method, path, body) {
    const answer = await call(method, path, body === undefined ? {} : {
      body: JSON.stringify(body),
      headers: { "Content-Type": "application/json" },
    });
    let data = null;
    try {
      data = answer.text ? JSON.parse(answer.text) : null;
    } catch (_) {
      data = null;
    }
    if (answer.status >= 400) {
      const error = data && (data.error && data.error.message ? data.error.message : data.error);
      throw new ApiError(answer.status, typeof error === "string" ? error : `HTTP ${answer.status}`);
    }
    return data;
  }

  const ASYNC_STATUSES = ["queued", "running", "completed", "failed", "cancelled"];

  async function asyncRequests(mine, d, panel) {
    const status = h("select", { id: "async-status" }, h("option", { value: "" }, "Any status"),
      ASYNC_STATUSES.map((x) => h("option", { value: x }, x)));
    const list = h("div", { id: "async-list" });
    const shown = h("div", { id: "async-shown" });
    const base = `/deployments/${enc(d.name)}/async`;
    const refresh = newestOnly(mine, async (newest) => {
      const query = status.value ? `?status=${enc(status.value)}` : "";
      const answer = await plane("GET", base + query);
      if (!newest()) return;
      list.replaceChildren(table(
        ["Request", "Status", "Attempts", "Caller", "Created", "Finished", ""],
        answer.requests.map((r) => [
          h("code", {}, r.request_id),
          badge(r.status),
          r.attempts,
          dash(r.caller),
          when(r.created_at),
          when(r.finished_at),
          h("span", { class: "row" },
            r.result_url ? h("button", { onclick: () => result(r) }, "Result") : "",
            r.error ? h("span", { class: "mono" }, r.error) : "",
            ["queued", "running"].includes(r.status)
              ? h("button", { class: "danger", "data-cancel": r.request_id, onclick: () => cancel(r) }, "Cancel")
              : ""),
        ]),
        "No async request. Send one with the API test's Async box, or X-Async-Request: true.",
      ));
    });
    const result = async (r) => {
      try {
        const answer = await call("GET", r.result_url);
        shown.replaceChildren(h("h2", {}, `Result of ${r.request_id}`),
          h("pre", { class: "block", id: "async-result" }, pretty(answer.text)));
      } catch (err) {
        flash(err.message);
      }
    };
    const cancel = async (r) => {
      try {
        await plane("POST", `${base}/${enc(r.request_id)}/cancel`);
      } catch (err) {
        flash(err.message);
      }
      await refresh();
    };
    status.addEventListener("change", refresh);
    panel.replaceChildren(
      h("div", { class: "toolbar" }, status, h("button", { onclick: refresh }, "Refresh"),
        h("span", { class: "muted" }, "Requests and results are kept 3 days.")),
      list, shown);
    await refresh();
    every(mine, 5000, refresh);
  }

  async function batchJobs(mine, d, panel) {
    const base = `/deployments/${enc(d.name)}/batch`;
    const input = h("input", { type: "text", id: "batch-input", size: 40, placeholder: "s3://bucket/in/ or file:///…/in/" });
    const output = h("input", { type: "text", id: "batch-output", size: 40, placeholder: "s3://bucket/out/" });
    const start = h("button", { class: "primary", id: "batch-start", type: "submit" }, "Start");
    const list = h("div", { id: "batch-list" });
    const refresh = newestOnly(mine, async (newest) => {
      const answer = await plane("GET", base);
      if (!newest()) return;
      list.replaceChildren(table(
        ["Job", "Status", "Progress", "Input", "Output", "Created", ""],
        answer.jobs.map((j) => [
          h("code", {}, j.job_id),
          badge(j.status),
          `${j.done} done, ${j.failed} failed of ${j.total}`,
          h("code", {}, j.input),
          h("code", {}, j.output),
          when(j.created_at),
          h("span", { class: "row" }, j.error ? h("span", { class: "mono" }, j.error) : "",
            ["pending", "running"].includes(j.status)
              ? h("button", { class: "danger", onclick: async () => {
                try {
                  await plane("POST", `${base}/${enc(j.job_id)}/cancel`);
                } catch (err) {
                  flash(err.message);
                }
                await refresh();
              } }, "Cancel")
              : ""),
        ]),
        "No batch job yet.",
      ));
    });
    panel.replaceChildren(
      h("form", {
        class: "card form",
        onsubmit: (event) => {
          event.preventDefault();
          submitting(start, async () => {
            await plane("POST", base, { input: input.value.trim(), output: output.value.trim() });
            await refresh();
          });
        },
      },
      h("p", { class: "muted" }, "Runs the deployment on every object under the input prefix (JSON, JSON Lines or CSV) and writes <output>/<relative path>.out for each."),
      row("Input", input), row("Output", output), h("div", { class: "toolbar spaced" }, start)),
      list,
    );
    await refresh();
    every(mine, 5000, refresh);
  }

  // --- quotas -------------------------------------------------------------------------

  const RESOURCES = [["cpu", "CPU"], ["memory_gib", "Memory (GiB)"], ["gpu", "GPU"], ["instances", "Instances"]];

  async function quotas(mine) {
    const [usage, types, listed] = await Promise.all([
      api("/quotas"),
      api("/instance-types"),
      state.me.admin ? api("/groups") : { groups: [] },
    ]);
    if (!current(mine)) return;
    // A group without a quota has no usage row: an admin still sees it, to give it one.
    const zero = { cpu: 0, memory_gib: 0, gpu: 0, instances: 0 };
    const groups = [...usage.groups];
    for (const { name } of listed.groups) {
      if (!groups.some((g) => g.group === name)) groups.push({ group: name, limits: zero, used: zero, reservations: [] });
    }
    const meter = (used, limit) => {
      const share = limit > 0 ? Math.min(1, used / limit) : 0;
      const bar = h("span", { class: "meter" }, h("i", { style: { width: `${(100 * share).toFixed(0)}%` } }));
      return h("span", { class: "row" }, bar, `${+used.toFixed(2)} of ${+limit.toFixed(2)}`);
    };
    const edit = (g) => {
      const inputs = Object.fromEntries(RESOURCES.map(([key]) =>
        [key, h("input", { type: "number", min: "0", step: "any", value: String(g.limits[key]), "data-limit": key })]));
      const save = h("button", { class: "primary", type: "submit" }, "Save");
      return h("form", {
        class: "row",
        "data-quota": g.group,
        onsubmit: (event) => {
          event.preventDefault();
          submitting(save, async () => {
            const limits = Object.fromEntries(RESOURCES.map(([key]) => [key, Number(inputs[key].value)]));
            await api(`/quotas/${enc(g.group)}`, { method: "PUT", body: limits });
            state.notice = `Quota of ${g.group} saved.`;
            route();
          });
        },
      }, RESOURCES.map(([key, label]) => h("label", {}, `${label} `, inputs[key])), save);
    };
    show(
      h("h1", {}, "Quotas"),
      table(
        ["Group", ...RESOURCES.map(([, label]) => label), "Deployments"],
        groups.map((g) => [
          h("strong", {}, g.group),
          ...RESOURCES.map(([key]) => meter(g.used[key], g.limits[key])),
          dash((g.reservations || []).map((r) => r.deployment).join(", ")),
        ]),
        "No group has a quota yet.",
      ),
      state.me.admin && h("h2", {}, "Set a quota"),
      state.me.admin && h("div", { class: "card" }, groups.map((g) => h("div", {}, h("p", {}, h("strong", {}, g.group)), edit(g)))),
      h("h2", {}, "Instance types"),
      table(["Name", "CPU", "Memory (GiB)", "GPU", "Description"],
        types.instance_types.map((t) => [t.name, t.cpu, t.memory_gib, t.gpu, dash(t.description)]),
        "The catalog is empty: an admin adds types with `shipyard instance-types set`."),
    );
  }

  // --- images -----------------------------------------------------------------------

  async function imageList(mine) {
    const answer = await api("/images");
    if (!current(mine)) return;
    show(h("h1", {}, "Images"), table(
      ["Image", "Group", "Python", "Size", "Kind", "Created"],
      answer.images.map((i) => [
        imageLink(i.group, i), i.group, i.python, size(i.size_bytes), i.kind, `${when(i.created_at)} by ${i.created_by}`,
      ]),
      "No image yet. Build one with `shipyard image build ./model-folder --name NAME`.",
    ));
  }

  const IMAGE_TABS = [["info", "Info"], ["usage", "Usage"], ["build-logs", "Build logs"], ["readme", "Readme"]];

  async function imageCard(mine, group, name, version, tab) {
    const query = { group };
    const path = `/images/${enc(name)}/${enc(version)}`;
    const image = await api(path, { query });
    if (!current(mine)) return;
    const base = `#/images/${enc(group)}/${enc(name)}/${enc(version)}`;
    const panel = h("div", { id: "panel" });
    show(
      h("h1", {}, h("span", { id: "title" }, `${image.name}:${image.version}`)),
      h("div", { class: "tabs" }, IMAGE_TABS.map(([key, label]) =>
        h("a", { href: `${base}/${key}`, class: key === tab ? "active" : "", "data-tab": key }, label))),
      panel,
    );
    if (tab === "usage") {
      const usage = await api(`${path}/usage`, { query });
      if (!current(mine)) return;
      panel.replaceChildren(usage.deployments.length
        ? h("ul", { id: "usage" }, usage.deployments.map((n) => h("li", {}, h("a", { href: `#/deployments/${enc(n)}` }, n))))
        : h("p", { class: "muted", id: "usage" }, "No deployment uses this image."));
    } else if (tab === "build-logs") {
      if (!image.build_id) return panel.replaceChildren(h("p", { class: "muted" }, "No build is recorded for this image."));
      const answer = await api(`/builds/${enc(image.build_id)}/logs`);
      if (!current(mine)) return;
      const text = answer.lines.map((l) => `${when(l.at)}  ${l.line}`).join("\n");
      panel.replaceChildren(
        h("div", { class: "toolbar" }, h("button", { onclick: (e) => copy(text, e.target) }, "Copy"),
          h("button", { onclick: () => download(`build-${image.build_id}.log`, text) }, "Download")),
        h("pre", { class: "block", id: "build-log" }, text || "No lines."));
    } else if (tab === "readme") {
      await readmePanel(mine, panel, `${path}/readme?group=${enc(group)}`, "image");
    } else {
      panel.replaceChildren(
        h("div", { class: "card" }, fields([
          ["Group", image.group],
          ["Kind", image.kind === "oci" ? `OCI image ${image.image_ref}` : "environment pack"],
          ["Digest", h("code", {}, image.digest)],
          ["Size", size(image.size_bytes)],
          ["Python", image.python],
          ["Serving script", `${image.script}, ${image.workers || 1} worker(s) per instance`],
          ["Source", h("code", {}, dash(image.source))],
          ["Build", h("code", {}, dash(image.build_id))],
          ["Created", `${when(image.created_at)} by ${image.created_by}`],
        ])),
        h("h2", {}, "Packages"),
        table(["Package", "Version"], (image.packages || []).map((p) => [p.name, p.version])),
      );
    }
  }

  // --- Markdown (a safe subset of GitHub's: it builds elements, never markup) ---------

  const INLINE = new RegExp([
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: code
    /\*\*([^*]+)\*\*|__([^_]+)__/.source, // 3, 4: strong
    /\*([^*\s][^*]*)\*|\b_([^_\s][^_]*)_\b/.source, // 5, 6: emphasis
    /~~([^~]+)~~/.source, // 7: strikethrough
    /!?\[([^[\]]+)\]\(([^()\s]+)(?:\s+"[^"]*")?\)/.source, // 8, 9: link (an image becomes a link)
    /(https?:\/\/[^\s<]*[^\s<.,:;"')\]])/.source, // 10: bare URL
  ].join("|"), "g");

  function inline(text) {
    const out = [];
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) out.push(text.slice(last, m.index));
      if (m[1]) out.push(h("code", {}, m[2]));
      else if (m[3] || m[4]) out.push(h("strong", {}, inline(m[3] || m[4])));
      else if (m[5] || m[6]) out.push(h("em", {}, inline(m[5] || m[6])));
      else if (m[7]) out.push(h("del", {}, inline(m[7])));
      else if (m[8]) out.push(link(m[9], inline(m[8])));
      else out.push(link(m[10], [m[10]]));
      last = m.index + m[0].length;
    }
    if (last < text.length) out.push(text.slice(last));
    return out;
  }

  function link(url, children) {
    // Only web and mail links (relative ones resolve to this origin); javascript:, data:
    // and the rest stay text. The URL is judged as the browser will read it: parsed,
    // after it has dropped control characters and spaces a regex would not see.
    let protocol = "";
    try {
      protocol = new URL(url, location.href).protocol;
    } catch (_) {
      protocol = "";
    }
    const safe = ["http:", "https:", "mailto:"].includes(protocol);
    return safe ? h("a", { href: url, rel: "noopener noreferrer", target: "_blank" }, children) : h("span", {}, children);
  }

  const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+/;
  // Tested on trimmed lines; every repetition starts with "|", so matching is linear.
  const TABLE_RULE = /^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$/;
  const MAX_QUOTE_DEPTH = 8;
  const BLOCK_START = /^(#{1,6}\s|```|~~~|\s*>)/;

  const ITEM = /^(\s*)([-*+]|\d+[.)])\s+(.*)$/;
  const indentOf = (line) => line.length - line.trimStart().length;

  /** The list starting at lines[i], its deeper-indented items as nested lists (at most
   * MAX_QUOTE_DEPTH deep); returns it and the index of the first line after it. */
  function listAt(lines, i, depth) {
    const first = lines[i].match(ITEM);
    const indent = first[1].length;
    const list = h(/\d/.test(first[2]) ? "ol" : "ul");
    let li = null;
    while (i < lines.length) {
      const m = lines[i].match(ITEM);
      if (!m) {
        // A line indented past the marker continues the item's text.
        if (!li || !lines[i].trim() || indentOf(lines[i]) <= indent) break;
        append(li, [" ", inline(lines[i].trim())]);
        i += 1;
      } else if (m[1].length < indent) {
        break;
      } else if (m[1].length > indent && li && depth < MAX_QUOTE_DEPTH) {
        const [nested, next] = listAt(lines, i, depth + 1);
        li.append(nested);
        i = next;
      } else {
        li = h("li");
        let text = m[3];
        const task = text.match(/^\[( |x|X)\]\s+/);
        if (task) {
          li.append(h("input", { type: "checkbox", disabled: true, checked: task[1] !== " " }), " ");
          text = text.slice(task[0].length);
        }
        list.append(append(li, inline(text)));
        i += 1;
      }
    }
    return [list, i];
  }

  function markdown(source, depth = 0) {
    const root = h("div", { class: "readme" });
    const lines = source.replace(/\r\n?/g, "\n").split("\n");
    const cells = (row) => row.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) {
        i += 1;
      } else if ((m = line.match(/^(```|~~~)/))) {
        const code = [];
        i += 1;
        while (i < lines.length && !lines[i].startsWith(m[1])) code.push(lines[i++]);
        i += 1;
        root.append(h("pre", {}, h("code", {}, code.join("\n"))));
      } else if ((m = line.match(/^(#{1,6})[ \t]+(.*)$/))) {
        // A closing run of #s goes when a space precedes it ("# Using C#" keeps its #).
        const text = m[2].trimEnd().replace(/[ \t]#+$/, "").trimEnd();
        root.append(h(`h${m[1].length}`, {}, inline(text)));
        i += 1;
      } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
        root.append(h("hr"));
        i += 1;
      } else if (/^\s*>/.test(line)) {
        const quoted = [];
        while (i < lines.length && /^\s*>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s*>\s?/, ""));
        // Nested quotes beyond a few levels stay text (a pathological readme cannot
        // exhaust the stack).
        const inner = depth < MAX_QUOTE_DEPTH
          ? [...markdown(quoted.join("\n"), depth + 1).childNodes]
          : h("p", {}, quoted.join(" "));
        root.append(h("blockquote", {}, inner));
      } else if (LIST_ITEM.test(line)) {
        const [list, next] = listAt(lines, i, 0);
        root.append(list);
        i = next;
      } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1].trim())) {
        const head = cells(line);
        i += 2;
        const rows = [];
        while (i < lines.length && lines[i].includes("|") && lines[i].trim()) rows.push(cells(lines[i++]));
        root.append(h("table", {},
          h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, inline(c))))),
          h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, inline(c))))))));
      } else {
        const para = [line];
        i += 1;
        while (i < lines.length && lines[i].trim() && !BLOCK_START.test(lines[i]) && !LIST_ITEM.test(lines[i])) {
          para.push(lines[i++]);
        }
        root.append(h("p", {}, inline(para.join(" "))));
      }
    }
    return root;
  }

  window.addEventListener("hashchange", route);
  route();
})();
