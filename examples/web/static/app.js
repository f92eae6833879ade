// The page's side of the live demo. One websocket; for each live query (an element with
// data-view) the server sends the whole tree once ({type: "snapshot"}), then only what
// changed ({type: "diff"}): operations that insert, update or remove the element named by
// a data-key, at an index in its list. Nothing here ever asks the server for a list again.
"use strict";

const views = [...document.querySelectorAll("[data-view]")].map((element) => element.id);
const statusBadge = document.getElementById("status");
const writerButton = document.getElementById("writer");
const lastChange = document.getElementById("last-change");
const log = document.getElementById("log");
let socket = null;
let writerOn = false;
let waiting = new Set(); // views whose snapshot has not arrived since (re)connecting

function byKey(key) {
  return document.querySelector(`[data-key="${CSS.escape(key)}"]`);
}

function setValues(element, values) {
  for (const [field, value] of Object.entries(values)) {
    element.dataset[field] = value;
    const selector = `[data-field="${field}"]`;
    for (const target of [element, ...element.querySelectorAll(selector)]) {
      // A field of a nested row (a post's tags) belongs to that row's element.
      if (target.matches(selector) && target.closest("[data-key]") === element) {
        target.textContent = value;
      }
    }
  }
}

function container(op) {
  if (op.parent === null) return document.getElementById(op.list);
  return byKey(op.parent)?.querySelector(`[data-list="${op.list}"]`);
}

// An index says where the row goes in its list as the earlier operations left it; a
// reference (a post's author) has none.
function place(list, element, index) {
  list.insertBefore(element, index === null ? null : list.children[index] ?? null);
}

function apply(op) {
  if (op.op === "removed") {
    byKey(op.key)?.remove();
    return null;
  }
  const list = container(op);
  if (!list) return null; // below a row removed meanwhile
  let element = byKey(op.key);
  if (op.op === "inserted") {
    element?.remove();
    element = document.getElementById(`t-${op.list}`).content.firstElementChild.cloneNode(true);
    element.dataset.key = op.key;
    setValues(element, op.values);
    place(list, element, op.index);
  } else if (element) {
    setValues(element, op.values);
    if (op.index !== null) place(list, element, op.index);
  }
  return element;
}

function flash(element) {
  if (!element) return;
  element.classList.remove("flash");
  void element.offsetWidth; // restart the animation
  element.classList.add("flash");
}

// "post #6 “Hello”": from the operation's values or, before it is applied, from the element.
function label(key, values) {
  const [kind, id] = key.split("/").at(-1).split("-");
  const shown = values ?? byKey(key)?.dataset ?? {};
  const text = shown.name ?? shown.title;
  return `${kind} #${id}${text === undefined ? "" : ` “${text}”`}`;
}

function where(parent, list) {
  if (parent === null) return list === "people" ? "" : ` · ${list}`;
  const owner = byKey(parent)?.dataset.name ?? parent.split("/").at(-1).replace("-", " #");
  return ` · ${owner} / ${list}`;
}

// What an operation does, in words, told before it is applied (a removed row's name is still
// there to read). Rows inserted with their parent are told with it.
function describe(op, inserted) {
  if (op.op === "updated") {
    const changes = Object.entries(op.values).map(([k, v]) => `${k}=${v}`);
    if (op.index !== null) changes.push(`moved to ${op.index + 1}`);
    return `~ ${label(op.key)}: ${changes.join(", ")}`;
  }
  if (op.op === "removed") return `− ${label(op.key)}${where(op.parent, op.list)}`;
  if (inserted.has(op.parent)) return null;
  return `+ ${label(op.key, op.values)}${where(op.parent, op.list)}`;
}

function applyDiff(ops) {
  const inserted = new Set(ops.filter((op) => op.op === "inserted").map((op) => op.key));
  const told = [];
  for (const op of ops) {
    const words = describe(op, inserted);
    if (words) told.push(words);
    flash(apply(op));
  }
  const entry = document.createElement("li");
  entry.textContent = told.join("; ");
  log.prepend(entry);
  while (log.children.length > 30) log.lastElementChild.remove();
}

function applySnapshot(view, ops) {
  document.getElementById(view).replaceChildren();
  for (const op of ops) apply(op);
  waiting.delete(view);
  if (waiting.size === 0) setStatus("connected");
}

function setStatus(status, text) {
  statusBadge.dataset.status = status;
  statusBadge.textContent = text ?? status;
}

function setWriter(enabled, last) {
  writerOn = enabled;
  writerButton.disabled = false;
  writerButton.setAttribute("aria-pressed", String(enabled));
  writerButton.textContent = `writer: ${enabled ? "on" : "off"}`;
  if (last) lastChange.textContent = `✎ ${last}`;
}

function connect(again) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws`);
  socket.onopen = () => {
    waiting = new Set(views);
    // After a drop, the page may be stale until the new snapshots arrive.
    setStatus(again ? "resyncing" : "connecting", again ? "resyncing" : "connecting…");
  };
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "snapshot") applySnapshot(message.view, message.ops);
    else if (message.type === "diff") applyDiff(message.ops);
    else if (message.type === "status") setStatus(message.status);
    else if (message.type === "writer") setWriter(message.enabled, message.last);
  };
  socket.onclose = () => {
    setStatus("disconnected", "disconnected: retrying…");
    writerButton.disabled = true;
    setTimeout(() => connect(true), 1000);
  };
}

writerButton.addEventListener("click", () => {
  socket?.send(JSON.stringify({ type: "writer", enabled: !writerOn }));
});

connect(false);
