// The page's side of the live demo. One websocket; for each live query (an element with
// data-view) the server sends the whole tree once ({type: "snapshot"}), then only what
// changed ({type: "diff"}): operations that insert, update or remove the element named by
// a data-key, at an index in its list. Nothing here ever asks the server for a list again.
// Edits go to the server over HTTP; the page changes only when their diffs come back.
"use strict";

const views = [...document.querySelectorAll("[data-view]")].map((element) => element.id);
const statusBadge = document.getElementById("status");
const writerButton = document.getElementById("writer");
const lastChange = document.getElementById("last-change");
const resetButton = document.getElementById("reset");
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

function logEntry(text) {
  const entry = document.createElement("li");
  entry.textContent = text;
  log.prepend(entry);
  while (log.children.length > 30) log.lastElementChild.remove();
  return entry;
}

function timed(entry, ms, what) {
  const span = document.createElement("span");
  span.className = "latency";
  span.textContent = ` · ${Math.round(ms)} ms ${what}`;
  entry.append(span);
}

function applyDiff(message) {
  const ops = message.ops;
  const inserted = new Set(ops.filter((op) => op.op === "inserted").map((op) => op.key));
  const told = [];
  for (const op of ops) {
    const words = describe(op, inserted);
    if (words) told.push(words);
    flash(apply(op));
  }
  const entry = logEntry(told.join("; "));
  if (message.writer_ms !== undefined) timed(entry, message.writer_ms, "writer's commit → sent");
  arrived(ops, entry);
}

function applySnapshot(view, ops) {
  document.getElementById(view).replaceChildren();
  for (const op of ops) apply(op);
  const counts = {};
  for (const op of ops) counts[op.list] = (counts[op.list] ?? 0) + 1;
  const shown = Object.entries(counts).map(([list, count]) => `${count} ${list}`);
  logEntry(`⟳ ${view}: the whole tree, once (${shown.join(", ") || "empty"})`);
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
    else if (message.type === "diff") applyDiff(message);
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

// -- edits -------------------------------------------------------------------------------------
// The server answers an edit with the key of the element it changed (a suffix of a data-key).
// The edit is timed from the click to the first diff naming that key, which may come before
// the answer: the keys that arrived lately are kept with their time.
const pending = new Map(); // key -> click time, until its diff arrives
let arrivals = []; // {key, at, entry} of the latest operations

function names(opKey, key) {
  return opKey === key || opKey.endsWith(`/${key}`);
}

function arrived(ops, entry) {
  const at = performance.now();
  for (const op of ops) {
    for (const [key, clicked] of pending) {
      if (!names(op.key, key)) continue;
      timed(entry, at - clicked, "click → page");
      pending.delete(key);
    }
    arrivals.push({ key: op.key, at, entry });
  }
  arrivals = arrivals.slice(-200);
}

async function edit(method, path, body) {
  const clicked = performance.now();
  const response = await fetch(path, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) {
    lastChange.textContent = `✗ ${answer.error}`;
    return;
  }
  const seen = arrivals.find((a) => a.at >= clicked && names(a.key, answer.key));
  if (seen) timed(seen.entry, seen.at - clicked, "click → page");
  else pending.set(answer.key, clicked);
}

// Ask for a text (prefilled with `value`); edit with it unless the question is dismissed.
function ask(question, value, then) {
  const text = prompt(question, value ?? "");
  if (text?.trim()) then(text);
}

// What each button does, given the ids in its row's key ("person-2/posts/post-4":
// {person: "2", post: "4"}) and the row's element.
const actions = {
  rename: (id, row) =>
    ask("New name", row.dataset.name, (name) => edit("PATCH", `/people/${id.person}`, { name })),
  "add-post": (id) =>
    ask("Title of the new post", "", (title) =>
      edit("POST", `/people/${id.person}/posts`, { title }),
    ),
  retitle: (id, row) =>
    ask("New title", row.dataset.title, (title) => edit("PATCH", `/posts/${id.post}`, { title })),
  tag: (id) => ask("Tag", "", (name) => edit("POST", `/posts/${id.post}/tags`, { name })),
  delete: (id) => edit("DELETE", `/posts/${id.post}`),
  untag: (id) => edit("DELETE", `/posts/${id.post}/tags/${id.tag}`),
};

document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-action]");
  if (!button) return;
  const row = button.closest("[data-key]");
  const parts = row.dataset.key.split("/").filter((part) => part.includes("-"));
  actions[button.dataset.action](Object.fromEntries(parts.map((part) => part.split("-"))), row);
});

resetButton.addEventListener("click", () => fetch("/reset", { method: "POST" }));

connect(false);
