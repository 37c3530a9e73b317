// The review page: draws the session's state and sends it keys. All decisions are made on the
// server by the same code as the terminal app (labeling/session.py); this file only maps keys.
"use strict";

const $ = (id) => document.getElementById(id);
let keys = [];          // [{keys, names, action, label, shown, help}]
let state = null;
let chain = Promise.resolve();  // requests run one after another, in key order
let ended = false;
// Buttons: each says what it does and which key does the same.
const BUTTONS = ["accept", "reject", "merge", "move", "split", "name", "not_a_face", "lock", "undo", "force", "previous_item", "next_item"];

function post(path, body) {
  return fetch(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)})
    .then((response) => response.json());
}

function act(body) {
  chain = chain.then(() => post("/api/act", body)).then(render).catch((error) => say(String(error), true));
  return chain;
}

function say(message, error) {
  $("status").textContent = message;
  $("status").className = error ? "error" : "";
}

function columns() {
  return getComputedStyle($("faces")).gridTemplateColumns.split(" ").filter(Boolean).length || 1;
}

function pageSize() {
  const cell = $("faces").firstElementChild;
  const rows = cell ? Math.max(1, Math.floor((window.innerHeight - 200) / cell.offsetHeight)) : 1;
  return columns() * rows;
}

function chip(face, classes, title) {
  const cell = document.createElement("div");
  cell.className = "face " + classes;
  cell.dataset.face = face;
  cell.title = title;
  const img = document.createElement("img");
  img.src = `/chip/${face}.png`;
  img.alt = `face ${face}`;
  img.loading = "lazy";
  const caption = document.createElement("div");
  caption.className = "caption";
  caption.textContent = face;
  cell.append(img, caption);
  return cell;
}

function render(next) {
  state = next;
  $("progress").textContent = state.progress + (state.item ? "" : " · queue done");
  say(state.message, state.error);
  const item = state.item;
  const faces = $("faces"), compare = $("compare");
  faces.replaceChildren();
  compare.replaceChildren();
  if (!item) {
    $("reason").textContent = "Nothing left to review. u: undo the last decision, q: quit.";
    $("identity").textContent = "";
    $("suggestions").textContent = "";
    return;
  }
  $("reason").replaceChildren(Object.assign(document.createElement("b"), {textContent: item.kind}), item.reason);
  $("identity").textContent = `${item.label}: ${item.faces.length} face${item.faces.length === 1 ? "" : "s"}, ${item.selected.length} selected`;
  const selected = new Set(item.selected);
  item.faces.forEach((face, index) => {
    const cell = chip(face, (index === item.cursor ? "cursor " : "") + (selected.has(face) ? "selected" : ""),
                      `face ${face}: click to select or unselect`);
    cell.addEventListener("click", () => { act({action: "set_cursor", face}); act({action: "toggle"}); });
    faces.append(cell);
  });
  const heading = $("suggestions");
  heading.replaceChildren(item.suggestions.length ? "merge with" : "no merge suggestions");
  item.suggestions.forEach(([identity, similarity], k) => {
    const tag = document.createElement("span");
    tag.className = "suggestion" + (k === item.highlighted ? " highlighted" : "");
    tag.textContent = `${k + 1}: #${identity} ${similarity.toFixed(2)}`;
    heading.append(tag);
  });
  item.compare.forEach((face) => compare.append(chip(face, "", `face ${face} of the highlighted suggestion`)));
  const cursor = faces.children[item.cursor];
  if (cursor) cursor.scrollIntoView({block: "nearest"});
}

function openPrompt(question, value, action) {
  $("question").textContent = question;
  $("answer").value = value;
  $("prompt").hidden = false;
  $("answer").focus();
  $("prompt-form").onsubmit = (event) => {
    event.preventDefault();
    $("prompt").hidden = true;
    act({action, text: $("answer").value});
  };
}

function quit() {
  ended = true;
  post("/api/quit", {quit: true}).then((answer) => {
    $("progress").textContent = answer.message;
    $("faces").replaceChildren();
    $("compare").replaceChildren();
  });
}

// A key's action: decisions and navigation go to the server, prompts and help open here.
function run(action) {
  if (ended) return;
  const call = action.match(/^(\w+)\((.*)\)$/);
  const name = call ? call[1] : action;
  const args = call ? call[2].split(",").map(Number) : [];
  if (name === "cursor") return act({action: "cursor", delta: args[0] + args[1] * columns()});
  if (name === "page") return act({action: "cursor", delta: args[0] * pageSize()});
  if (name === "suggest") return act({action: "suggest", number: args[0]});
  if (name === "help") { $("help").hidden = false; return; }
  if (name === "quit") return quit();
  if (name === "move" || name === "name") {
    // After the requests before it, so the prompt names the current item.
    chain = chain.then(() => {
      if (!state.item) return;
      const [question, value] = name === "move" ? [state.item.move_prompt, ""] : state.item.name_prompt;
      openPrompt(question, value, name);
    });
    return;
  }
  return act({action: name});
}

document.addEventListener("keydown", (event) => {
  if (!$("prompt").hidden) {
    if (event.key === "Escape") { $("prompt").hidden = true; event.preventDefault(); }
    return;  // typing goes to the prompt
  }
  if (!$("help").hidden) {
    if (["Escape", "?", "q"].includes(event.key)) $("help").hidden = true;
    event.preventDefault();
    return;
  }
  if (event.ctrlKey || event.altKey || event.metaKey) return;
  const pressed = (event.shiftKey && event.key === "Tab") ? "shift+Tab" : event.key;
  const key = keys.find((entry) => entry.keys.includes(pressed));
  if (!key) return;
  event.preventDefault();
  run(key.action);
});

function showKeys() {
  const byAction = Object.fromEntries(keys.map((key) => [key.action, key]));
  for (const action of BUTTONS) {
    const key = byAction[action];
    const button = document.createElement("button");
    button.textContent = `${key.label} (${key.names.join(" / ")})`;
    button.title = key.help;
    button.dataset.action = action;
    button.addEventListener("click", (event) => { event.currentTarget.blur(); run(action); });
    $("buttons").append(button);
  }
  for (const key of keys.filter((key) => key.label)) {
    const entry = document.createElement("span");
    entry.className = "entry";
    entry.append(Object.assign(document.createElement("kbd"), {textContent: key.shown}), " " + key.label);
    $("keys").append(entry);
  }
  for (const key of keys) {
    const row = $("help-keys").insertRow();
    row.insertCell().append(Object.assign(document.createElement("kbd"), {textContent: key.names.join(" / ")}));
    row.insertCell().textContent = key.help;
  }
}

fetch("/api/keys").then((response) => response.json()).then((table) => {
  keys = table;
  showKeys();
  return fetch("/api/state");
}).then((response) => response.json()).then(render);
