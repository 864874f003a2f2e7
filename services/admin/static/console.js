// The admin console: screens drawn from the templates in index.html, data
// from the admin API. Text from the API is only ever set as textContent, so
// a channel's name cannot inject markup.
"use strict";

const state = { role: null, campaigns: [], canValidate: false, keepBanner: false };

// API

class ApiError extends Error {
  constructor(status, body) {
    super(body.detail || `request failed (${status})`);
    this.status = status;
    this.errors = body.errors || [];
  }
}

async function api(method, path, body, contentType = "application/json") {
  const headers = { "X-Mailroom-Console": "1" };
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = contentType;
    payload = contentType === "application/json" ? JSON.stringify(body) : body;
  }
  const response = await fetch(path, {
    method, headers, body: payload, credentials: "same-origin",
  });
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (response.status === 401 && path !== "/api/session") {
    state.role = null;
    showLogin();
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// Page helpers

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function screen(templateId) {
  const main = $("#main");
  main.replaceChildren($(`#${templateId}`).content.cloneNode(true));
  return main;
}

function banner(message, kind = "error") {
  const box = $("#banner");
  box.textContent = message;
  box.className = kind;
  box.hidden = !message;
}

function clearErrors(form) {
  for (const slot of $$(".error", form)) slot.textContent = "";
}

function showErrors(form, error) {
  clearErrors(form);
  banner(error.message);
  let first = null;
  for (const item of error.errors || []) {
    const slot = $(`[data-error-for="${CSS.escape(item.field)}"]`, form);
    if (slot) slot.textContent = item.message;
    first = first || slot;
  }
  // The banner is at the top of the page; a field's own message may be far below.
  if (first) first.scrollIntoView({ block: "center" });
  else window.scrollTo(0, 0);
}

function confirmDialog(text, action = "Delete") {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = action;
  return new Promise((resolve) => {
    const done = (answer) => {
      dialog.close();
      $("#confirm-ok").onclick = null;
      $("#confirm-cancel").onclick = null;
      resolve(answer);
    };
    $("#confirm-ok").onclick = () => done(true);
    $("#confirm-cancel").onclick = () => done(false);
    dialog.oncancel = () => done(false);
    dialog.showModal();
  });
}

function campaignOptions(select, { blank = null, selected = null } = {}) {
  const options = [];
  if (blank !== null) options.push(el("option", { value: "" }, blank));
  for (const campaign of state.campaigns) {
    options.push(el("option", {
      value: campaign.id, selected: campaign.id === selected,
    }, `${campaign.name} (${campaign.key})`));
  }
  select.replaceChildren(...options);
}

async function loadCampaigns() {
  state.campaigns = await api("GET", "/api/campaigns");
}

// Sign-in

function showLogin() {
  $("#nav").hidden = true;
  const main = screen("tpl-login");
  $("#login", main).addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const who = await api("POST", "/api/session", { token: $("#token").value });
      banner("");
      signedIn(who);
      location.hash = "#/channels";
      route();
    } catch (error) {
      banner(error.message);
    }
  });
}

function signedIn(who) {
  state.role = who.role;
  document.body.classList.toggle("read-only", who.role !== "admin");
  $("#who").textContent = `${who.name} (${who.role})`;
  $("#nav").hidden = false;
}

// Channel list

function channelQuery() {
  const params = new URLSearchParams();
  const quick = $("#quick-search").value.trim();
  if (quick) params.set("q", quick);
  const form = $("#advanced");
  if (!form.hidden) {
    for (const field of ["default_campaign_id", "name", "status", "address"]) {
      const value = form.elements[field].value.trim();
      if (value && value !== "all") params.set(field, value);
    }
  }
  return params.toString();
}

async function showChannels() {
  const main = screen("tpl-channels");
  campaignOptions($("#adv-campaign", main), { blank: "Any" });

  let timer = null;
  $("#quick-search", main).addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(refreshChannels, 250);
  });
  $("#toggle-advanced", main).addEventListener("click", () => {
    $("#advanced").hidden = !$("#advanced").hidden;
    refreshChannels();
  });
  $("#advanced", main).addEventListener("submit", (event) => {
    event.preventDefault();
    refreshChannels();
  });
  $("#adv-clear", main).addEventListener("click", () => {
    $("#advanced").reset();
    refreshChannels();
  });
  $("#select-all", main).addEventListener("change", (event) => {
    for (const box of $$("#channels tbody input.select")) box.checked = event.target.checked;
    countSelected();
  });
  $("#bulk-enable", main).addEventListener("click", () => bulkActive(true));
  $("#bulk-disable", main).addEventListener("click", () => bulkActive(false));
  $("#bulk-delete", main).addEventListener("click", bulkDelete);
  await refreshChannels();
}

async function refreshChannels() {
  const query = channelQuery();
  const channels = await api("GET", `/api/channels${query ? `?${query}` : ""}`);
  const body = $("#channels tbody");
  if (!body) return;
  body.replaceChildren(...channels.map(channelRow));
  $("#empty").hidden = channels.length > 0;
  $("#select-all").checked = false;
  countSelected();
}

function channelRow(channel) {
  const admin = state.role === "admin";
  const toggle = el("input", {
    type: "checkbox", class: "toggle", checked: channel.active, disabled: !admin,
    "aria-label": `Enabled: ${channel.name}`,
  });
  toggle.addEventListener("change", async () => {
    try {
      await api("PUT", `/api/channels/${channel.id}/active`, { active: toggle.checked });
      banner(`${channel.name} ${toggle.checked ? "enabled" : "disabled"}.`, "info");
      await refreshChannels();
    } catch (error) {
      toggle.checked = !toggle.checked;
      banner(error.message);
    }
  });

  const status = channel.status === "active" ? "Active" : "Inactive";
  return el("tr", { dataset: { id: channel.id, name: channel.name } },
    el("td", {}, el("input", {
      type: "checkbox", class: "select", "aria-label": `Select ${channel.name}`,
      onchange: countSelected,
    })),
    el("td", { class: "name" }, channel.name,
      el("span", { class: "status-detail" }, channel.address)),
    el("td", { class: "filters" }, channel.filter_count),
    el("td", { class: "status" },
      el("span", { class: `badge ${channel.status}`, title: channel.status_detail }, status),
      el("span", { class: "status-detail" }, channel.status_detail)),
    el("td", { class: "campaign" },
      channel.default_campaign ? channel.default_campaign.name : "—"),
    el("td", { class: "enabled" }, toggle),
    el("td", {},
      el("div", { class: "actions" },
        el("a", { href: `#/channels/${channel.id}/edit`, class: "edit" }, admin ? "Edit" : "View"),
        el("a", { href: `#/channels/${channel.id}/filters`, class: "filters-link" }, "Filters"),
        admin ? el("button", {
          type: "button", class: "delete danger", onclick: () => deleteChannel(channel),
        }, "Delete") : "")));
}

function countSelected() {
  const count = $$("#channels tbody input.select:checked").length;
  const label = $("#selected-count");
  if (label) label.textContent = `${count} selected`;
}

function selectedRows() {
  return $$("#channels tbody input.select:checked").map((box) => box.closest("tr"));
}

async function bulkActive(active) {
  const failures = [];
  for (const row of selectedRows()) {
    try {
      await api("PUT", `/api/channels/${row.dataset.id}/active`, { active });
    } catch (error) {
      failures.push(error.message);
    }
  }
  await refreshChannels();
  banner(failures.join(" · ") || `Selected channels ${active ? "enabled" : "disabled"}.`,
    failures.length ? "error" : "info");
}

async function bulkDelete() {
  const rows = selectedRows();
  if (!rows.length) return;
  const names = rows.map((row) => row.dataset.name).join(", ");
  if (!await confirmDialog(`Delete ${rows.length} channel(s) permanently: ${names}? Their filters are deleted too.`)) return;
  for (const row of rows) await api("DELETE", `/api/channels/${row.dataset.id}`);
  banner(`Deleted ${names}.`, "info");
  await refreshChannels();
}

async function deleteChannel(channel) {
  const text = `Delete channel “${channel.name}” permanently? Its ${channel.filter_count} filter(s) are deleted too; this cannot be undone.`;
  if (!await confirmDialog(text)) return;
  try {
    await api("DELETE", `/api/channels/${channel.id}`);
    banner(`Channel ${channel.name} deleted.`, "info");
  } catch (error) {
    banner(error.message);
  }
  await refreshChannels();
}

// Channel form

const SERVER_FIELDS = ["host", "port", "security", "username", "verify_tls"];
const GRAPH_FIELDS = ["tenant_id", "client_id", "mailbox"];
const DEFAULT_PORTS = { imap: 993, pop3: 995, smtp: 587 };

function showKindFields(form) {
  const inbound = form.elements["inbound.type"].value;
  const outbound = form.elements["outbound.type"].value;
  $(".in-server", form).classList.toggle("show", inbound === "imap" || inbound === "pop3");
  $(".in-graph", form).classList.toggle("show", inbound === "graph");
  $(".imap-only", form).classList.toggle("show", inbound === "imap");
  $(".out-server", form).classList.toggle("show", outbound === "smtp");
  $(".out-graph", form).classList.toggle("show", outbound === "graph");
}

function account(form, side) {
  const kind = form.elements[`${side}.type`].value;
  if (!kind) return null;
  const value = (name) => form.elements[`${side}.${name}`];
  // Settings the form does not show (a private CA file, say) are kept.
  const original = form.original && form.original[side];
  const result = original && original.type === kind ? { ...original } : { type: kind };
  if (kind === "graph") {
    for (const name of GRAPH_FIELDS) result[name] = value(name).value.trim();
    if (side === "inbound") {
      result.auth_flow = value("auth_flow").value;
      result.redirect_uri = value("redirect_uri").value.trim();
    }
    return result;
  }
  for (const name of SERVER_FIELDS) {
    const input = value(name);
    if (input.type === "checkbox") result[name] = input.checked;
    else if (name === "port") result[name] = input.value === "" ? null : Number(input.value);
    else result[name] = input.value.trim();
  }
  if (kind === "imap") result.folder = value("folder").value.trim() || "INBOX";
  return result;
}

function secretsFrom(form) {
  const secrets = {};
  for (const input of $$("input[name^='secrets.']", form)) {
    const name = input.name.slice("secrets.".length);
    if (input.value && input.closest("div").classList.contains("show")) secrets[name] = input.value;
  }
  return secrets;
}

function channelBody(form) {
  const campaign = form.elements.default_campaign_id.value;
  return {
    name: form.elements.name.value.trim(),
    address: form.elements.address.value.trim(),
    default_campaign_id: campaign ? Number(campaign) : null,
    active: form.elements.active.checked,
    inbound: account(form, "inbound"),
    outbound: account(form, "outbound"),
    sync_all_folders: form.elements.sync_all_folders.checked,
    sync_recipient_only: form.elements.sync_recipient_only.checked,
    secrets: secretsFrom(form),
  };
}

function fillAccount(form, side, data) {
  form.elements[`${side}.type`].value = data ? data.type : "";
  if (!data) return;
  for (const [key, value] of Object.entries(data)) {
    const input = form.elements[`${side}.${key}`];
    if (!input || key === "type") continue;
    if (input.type === "checkbox") input.checked = Boolean(value);
    else input.value = value ?? "";
  }
}

function fillChannel(form, channel) {
  form.original = { inbound: channel.inbound, outbound: channel.outbound };
  form.elements.name.value = channel.name;
  form.elements.address.value = channel.address;
  form.elements.default_campaign_id.value = channel.default_campaign_id ?? "";
  form.elements.active.checked = channel.active;
  form.elements.sync_all_folders.checked = channel.sync_all_folders;
  form.elements.sync_recipient_only.checked = channel.sync_recipient_only;
  fillAccount(form, "inbound", channel.inbound);
  fillAccount(form, "outbound", channel.outbound);
  const stored = channel.secrets;
  const hints = {
    "f-in-password": stored.inbound_password_set,
    "f-out-password": stored.outbound_password_set,
    "f-in-secret": stored.client_secret_set,
    "f-out-secret": stored.client_secret_set,
  };
  for (const [id, set] of Object.entries(hints)) {
    $(`#${id}`, form).placeholder = set ? "stored; leave empty to keep" : "";
  }
  $("#f-status", form).textContent =
    `Status: ${channel.status === "active" ? "Active" : "Inactive"} (${channel.status_detail})`;
}

async function showChannelForm(channelId) {
  const main = screen("tpl-channel-form");
  const form = $("#channel-form", main);
  campaignOptions($("#f-campaign", form), { blank: "None" });
  for (const side of ["inbound", "outbound"]) {
    form.elements[`${side}.type`].addEventListener("change", (event) => {
      const port = form.elements[`${side}.port`];
      if (port && !port.value && DEFAULT_PORTS[event.target.value]) {
        port.value = DEFAULT_PORTS[event.target.value];
      }
      showKindFields(form);
    });
  }

  let channel = null;
  if (channelId) {
    channel = await api("GET", `/api/channels/${channelId}`);
    $("#form-title", main).textContent = `Channel ${channel.name}`;
    fillChannel(form, channel);
    $("#validate", form).hidden = !(state.canValidate && state.role === "admin");
  }
  showKindFields(form);
  if (state.role !== "admin") {
    for (const input of $$("input, select", form)) input.disabled = true;
    $("#save", form).hidden = true;
  }

  // Delegated Exchange sign-in: save, then go to Microsoft, which sends the
  // browser back to the API's /api/oauth/callback (the redirect URI).
  const authorise = $("#authorise", form);
  const showAuthorise = () => {
    const delegated =
      form.elements["inbound.type"].value === "graph" &&
      form.elements["inbound.auth_flow"].value === "authorization_code";
    authorise.hidden = !(state.role === "admin" && delegated);
  };
  for (const name of ["inbound.type", "inbound.auth_flow"]) {
    form.elements[name].addEventListener("change", showAuthorise);
  }
  showAuthorise();
  authorise.addEventListener("click", async () => {
    try {
      const body = channelBody(form);
      channel = channel
        ? await api("PATCH", `/api/channels/${channel.id}`, body)
        : await api("POST", "/api/channels", body);
      const started = await api("POST", `/api/channels/${channel.id}/authorise`);
      location.assign(started.authorization_url);
    } catch (error) {
      showErrors(form, error);
    }
  });

  $("#validate", form).addEventListener("click", async () => {
    try {
      const checked = await api("POST", `/api/channels/${channelId}/validate`);
      fillChannel(form, checked);
      banner(`Validation: ${checked.status_detail}`, checked.status === "active" ? "info" : "error");
    } catch (error) {
      showErrors(form, error);
    }
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = channelBody(form);
    try {
      const saved = channel
        ? await api("PATCH", `/api/channels/${channel.id}`, body)
        : await api("POST", "/api/channels", body);
      banner(`Channel ${saved.name} saved.`, "info");
      state.keepBanner = true;
      location.hash = "#/channels";
    } catch (error) {
      showErrors(form, error);
    }
  });
}

// Filters

const OPERATOR_TEXT = { contains: "contains", not_contains: "does not contain", regex: "matches regex" };

async function showFilters(channelId) {
  const main = screen("tpl-filters");
  const channel = await api("GET", `/api/channels/${channelId}`);
  $("#filters-title", main).textContent = `Filters of ${channel.name}`;
  campaignOptions($("#ff-campaign", main));
  const form = $("#filter-form", main);
  let editing = null;

  const resetForm = () => {
    editing = null;
    form.reset();
    clearErrors(form);
    $("#filter-form-title").textContent = "Add a filter";
    $("#ff-save").textContent = "Add filter";
    $("#ff-cancel").hidden = true;
  };

  const edit = (item) => {
    editing = item;
    form.elements.field.value = item.field;
    form.elements.operator.value = item.operator;
    form.elements.value.value = item.value;
    form.elements.campaign_id.value = item.campaign_id;
    form.elements.stop.checked = item.stop;
    $("#filter-form-title").textContent = `Edit filter ${item.position}`;
    $("#ff-save").textContent = "Save filter";
    $("#ff-cancel").hidden = false;
    form.elements.value.focus();
  };

  const draw = (filters) => {
    const admin = state.role === "admin";
    const ids = filters.map((f) => f.id);
    const move = async (index, offset) => {
      const order = [...ids];
      [order[index], order[index + offset]] = [order[index + offset], order[index]];
      try {
        draw(await api("PUT", `/api/channels/${channelId}/filters/order`, { filter_ids: order }));
      } catch (error) {
        banner(error.message);
      }
    };
    const remove = async (item) => {
      if (!await confirmDialog(`Delete filter ${item.position} (${item.field} ${OPERATOR_TEXT[item.operator]} “${item.value}”)?`)) return;
      await api("DELETE", `/api/channels/${channelId}/filters/${item.id}`);
      if (editing && editing.id === item.id) resetForm();
      draw(await api("GET", `/api/channels/${channelId}/filters`));
    };
    $("#filters tbody").replaceChildren(...filters.map((item, index) => el("tr", { dataset: { id: item.id } },
      el("td", { class: "position" }, item.position),
      el("td", { class: "field" }, item.field),
      el("td", { class: "operator" }, OPERATOR_TEXT[item.operator]),
      el("td", { class: "value" }, item.value),
      el("td", { class: "campaign" }, item.campaign ? item.campaign.name : item.campaign_id),
      el("td", { class: "stop" }, item.stop ? "yes" : "no"),
      el("td", {}, admin ? el("div", { class: "actions" },
        el("button", { type: "button", class: "up", disabled: index === 0, onclick: () => move(index, -1) }, "↑ Up"),
        el("button", { type: "button", class: "down", disabled: index === filters.length - 1, onclick: () => move(index, 1) }, "↓ Down"),
        el("button", { type: "button", class: "edit", onclick: () => edit(item) }, "Edit"),
        el("button", { type: "button", class: "delete danger", onclick: () => remove(item) }, "Delete")) : ""))));
    $("#no-filters").hidden = filters.length > 0;
  };

  $("#ff-cancel", main).addEventListener("click", resetForm);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {
      field: form.elements.field.value,
      operator: form.elements.operator.value,
      value: form.elements.value.value,
      campaign_id: Number(form.elements.campaign_id.value),
      stop: form.elements.stop.checked,
    };
    try {
      if (editing) await api("PATCH", `/api/channels/${channelId}/filters/${editing.id}`, body);
      else await api("POST", `/api/channels/${channelId}/filters`, body);
      banner("");
      resetForm();
      draw(await api("GET", `/api/channels/${channelId}/filters`));
    } catch (error) {
      showErrors(form, error);
    }
  });

  $("#dry-run", main).addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = $("#dr-file").files[0];
    const raw = file ? await file.arrayBuffer() : $("#dr-text").value.replace(/\r?\n/g, "\r\n");
    try {
      const result = await api("POST", `/api/channels/${channelId}/filters/dry-run`, raw, "message/rfc822");
      showDryRun(result);
    } catch (error) {
      banner(error.message);
    }
  });

  draw(await api("GET", `/api/channels/${channelId}/filters`));
}

function showDryRun(result) {
  const rows = [
    ["Campaign", result.campaign ? `${result.campaign.name} (${result.campaign.key})` : "none"],
    ["Filter", result.filter
      ? `#${result.filter.position}: ${result.filter.field} ${OPERATOR_TEXT[result.filter.operator]} “${result.filter.value}”`
      : "none matched; default campaign"],
    ["Matched text", result.matched_text ?? "—"],
    ["Reason", result.reason],
    ["Sender", result.sender],
    ["Subject", result.subject],
  ];
  const list = $("#dr-result");
  list.replaceChildren(...rows.flatMap(([term, text]) => [
    el("dt", {}, term), el("dd", { class: term.toLowerCase().replace(" ", "-") }, text),
  ]));
  list.hidden = false;
}

// Campaigns

async function showCampaigns() {
  const main = screen("tpl-campaigns");
  const draw = () => $("#campaigns tbody").replaceChildren(...state.campaigns.map((c) =>
    el("tr", {}, el("td", {}, c.key), el("td", {}, c.name))));
  draw();
  const form = $("#campaign-form", main);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const created = await api("POST", "/api/campaigns", {
        key: form.elements.key.value.trim(), name: form.elements.name.value.trim(),
      });
      banner(`Campaign ${created.key} added.`, "info");
      form.reset();
      clearErrors(form);
      await loadCampaigns();
      draw();
    } catch (error) {
      showErrors(form, error);
    }
  });
}

// Routing

async function route() {
  if (!state.role) return showLogin();
  const hash = location.hash || "#/channels";
  let match;
  try {
    await loadCampaigns();
    if (hash === "#/channels/new") await showChannelForm(null);
    else if ((match = hash.match(/^#\/channels\/(\d+)\/edit$/))) await showChannelForm(match[1]);
    else if ((match = hash.match(/^#\/channels\/(\d+)\/filters$/))) await showFilters(match[1]);
    else if (hash === "#/campaigns") await showCampaigns();
    else await showChannels();
  } catch (error) {
    if (error.status !== 401) banner(error.message);
  }
}

async function start() {
  $("#sign-out").addEventListener("click", async () => {
    await api("DELETE", "/api/session");
    state.role = null;
    banner("");
    showLogin();
  });
  window.addEventListener("hashchange", () => {
    if (!state.keepBanner) banner("");
    state.keepBanner = false;
    route();
  });
  try {
    const schema = await fetch("/openapi.json").then((r) => r.json());
    state.canValidate = Boolean(schema.paths["/api/channels/{channel_id}/validate"]);
  } catch {
    state.canValidate = false;
  }
  try {
    signedIn(await api("GET", "/api/session"));
    route();
  } catch {
    showLogin();
  }
}

start();
