// imgtocap's page: send an image to /predictions/imgtocap with attention=true, show the caption,
// its score and timing, and for each word the model's attention over the image grid.
//
// The API's answer (handler/imgtocap_handler.py): {"caption", "score", "num_beams", "max_length",
// "inference_ms", "batch_size", "model_version", "limits": {"num_beams", "max_length"} (the
// largest each request may ask), "in_domain", "domain_distance"} and, when asked, "attention": {"grid": [rows, cols], "tokens":
// [{"token": "red", "weights": [rows * cols floats, row-major]}, ...]}: one entry per generated
// WordPiece ("##s" continues the word before it). The grid covers the whole image (the model
// resizes it to a square without cropping), so a heat map is stretched over the picture as shown.
"use strict";

const API = "predictions/imgtocap"; // relative: the page and the API share one address

const $ = (id) => document.getElementById(id);
const ui = {
  drop: $("drop"),
  file: $("file"),
  numBeams: $("num_beams"),
  maxLength: $("max_length"),
  error: $("error"),
  result: $("result"),
  picture: $("picture"),
  overlay: $("overlay"),
  looking: $("looking"),
  status: $("status"),
  caption: $("caption"),
  wordHint: $("word-hint"),
  facts: $("facts"),
  domainWarning: $("domain-warning"),
};

let shown = null; // {words, grid, tokens} of the answer on screen
let pinned = null; // the word index a click fixed, or null
let request = 0; // answers to an earlier image that arrive late are dropped
let pictureUrl = null;

function setup() {
  $("curl").textContent = `curl -T image.jpg ${new URL(API, location.href)}`;
  ui.file.addEventListener("change", () => {
    if (ui.file.files.length) send(ui.file.files[0]);
    ui.file.value = ""; // choosing the same file again still fires `change`
  });
  // A drop anywhere captions the image instead of the browser opening the file.
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (event) => {
      event.preventDefault();
      ui.drop.classList.add("over");
    });
  }
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) ui.drop.classList.remove("over");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    ui.drop.classList.remove("over");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) send(file);
  });
  document.addEventListener("paste", (event) => {
    const file = event.clipboardData && event.clipboardData.files[0];
    if (file) send(file);
  });
  ui.picture.addEventListener("load", () => redraw());
  ui.picture.addEventListener("error", () => ui.picture.classList.add("unviewable"));
  window.addEventListener("resize", () => redraw());
  for (const button of document.querySelectorAll(".example")) {
    button.addEventListener("click", () => sendExample(button.dataset.src));
  }
}

// An example is the page's own static file, sent as a dropped file would be.
async function sendExample(src) {
  const name = src.split("/").pop();
  try {
    const response = await fetch(src);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    send(new File([await response.blob()], name));
  } catch (error) {
    fail({ name }, `the example could not be loaded (${error.message})`);
  }
}

// The server's largest num_beams / max_length: the fields allow no more, and a value typed
// above it is brought down to it before it is sent.
function applyLimits(limits) {
  if (!limits) return;
  for (const [name, input] of [["num_beams", ui.numBeams], ["max_length", ui.maxLength]]) {
    if (!Number.isInteger(limits[name])) continue;
    input.max = String(limits[name]);
    input.title = `1 to ${limits[name]} (the server's limit)`;
  }
}

async function send(file) {
  const mine = ++request;
  showPicture(file);
  ui.error.hidden = true;
  ui.result.hidden = false;
  ui.result.classList.add("busy");
  ui.status.textContent = `Captioning ${file.name || "the pasted image"}…`;
  ui.caption.replaceChildren();
  ui.facts.hidden = ui.wordHint.hidden = ui.domainWarning.hidden = true;
  shown = pinned = null;
  redraw();

  const body = new FormData();
  body.append("data", file, file.name || "image");
  body.append("attention", "true");
  for (const [name, input] of [["num_beams", ui.numBeams], ["max_length", ui.maxLength]]) {
    if (input.max && Number(input.value) > Number(input.max)) input.value = input.max;
    if (input.value.trim()) body.append(name, input.value.trim());
  }
  const started = performance.now();
  let response, text;
  try {
    response = await fetch(API, { method: "POST", body });
    text = await response.text();
  } catch (error) {
    if (mine === request) fail(file, `the server did not answer (${error.message}): is it running?`);
    return;
  }
  if (mine !== request) return;
  const elapsed = performance.now() - started;
  let answer = null;
  try {
    answer = JSON.parse(text);
  } catch {
    // an answer that is not JSON: reported below with its first characters
  }
  if (!response.ok || !answer || typeof answer.caption !== "string") {
    fail(file, errorText(response, answer, text));
    return;
  }
  show(answer, elapsed);
}

function errorText(response, answer, text) {
  // The handler and the proxy say {"error": ...}; TorchServe itself {"code", "type", "message"}.
  const said = answer && (answer.error || answer.message);
  const detail = said || text.trim().slice(0, 300) || response.statusText || "no details";
  return `HTTP ${response.status}: ${detail}`;
}

function fail(file, message) {
  ui.result.hidden = true;
  ui.result.classList.remove("busy");
  ui.error.replaceChildren();
  const title = document.createElement("strong");
  title.textContent = `${file.name || "The pasted image"} was not captioned.`;
  const detail = document.createElement("span");
  detail.className = "detail";
  detail.textContent = message;
  ui.error.append(title, " ", detail);
  ui.error.hidden = false;
}

function showPicture(file) {
  if (pictureUrl) URL.revokeObjectURL(pictureUrl);
  pictureUrl = URL.createObjectURL(file);
  ui.picture.classList.remove("unviewable");
  ui.picture.src = pictureUrl;
}

function show(answer, elapsed) {
  ui.result.classList.remove("busy");
  const attention = answer.attention;
  const tokens = attention && Array.isArray(attention.tokens) ? attention.tokens : null;
  const words = tokens
    ? wordsOf(tokens)
    : answer.caption.split(/\s+/).filter(Boolean).map((text) => ({ text, pieces: [] }));
  shown = tokens ? { words, tokens, grid: attention.grid } : null;

  const spans = words.map((word, i) => {
    const element = document.createElement(tokens ? "button" : "span");
    element.className = "word";
    element.textContent = word.text;
    if (tokens) {
      element.type = "button";
      element.dataset.word = String(i);
      element.title = word.pieces.map((p) => tokens[p].token).join(" + ");
      element.addEventListener("mouseenter", () => highlight(i));
      element.addEventListener("focus", () => highlight(i));
      element.addEventListener("mouseleave", () => highlight(pinned));
      element.addEventListener("blur", () => highlight(pinned));
      element.addEventListener("click", () => {
        pinned = pinned === i ? null : i;
        highlight(pinned);
      });
    }
    return element;
  });
  ui.caption.replaceChildren(...spans.flatMap((span, i) => (i ? [" ", span] : [span])));
  ui.status.textContent = "";
  ui.wordHint.textContent = tokens
    ? "Point at or tap a word to see where the model looked while writing it; tap again to let go."
    : "This server sends no attention maps (its handler predates them): the caption only.";
  ui.wordHint.hidden = false;

  $("score").textContent = answer.score == null ? "–" : answer.score.toFixed(3).replace("-", "−");
  $("score").title = "mean log-probability per word piece: 0 is certain, lower is less sure";
  const batch = answer.batch_size > 1 ? ` (a batch of ${answer.batch_size})` : "";
  $("model-ms").textContent = `${Math.round(answer.inference_ms)} ms${batch}`;
  $("total-ms").textContent = `${Math.round(elapsed)} ms`;
  $("beams").textContent = String(answer.num_beams);
  // in_domain is null for a model packaged without its domain check: nothing to warn about
  ui.domainWarning.hidden = answer.in_domain !== false;
  $("in-domain").textContent =
    answer.in_domain == null ? "not checked" : answer.in_domain ? "yes" : "no";
  $("in-domain").title =
    answer.domain_distance == null ? "" : `distance ${answer.domain_distance.toFixed(2)}`;
  $("model-version").textContent = answer.model_version || "–";
  applyLimits(answer.limits);
  ui.facts.hidden = false;
  highlight(null);
}

// WordPieces -> words: "##s" and lone punctuation join the word before them.
function wordsOf(tokens) {
  const words = [];
  tokens.forEach((entry, i) => {
    const piece = String(entry.token);
    const continues = piece.startsWith("##") || /^[.,;:!?'")\]]$/.test(piece);
    const text = piece.startsWith("##") ? piece.slice(2) : piece;
    if (continues && words.length) {
      words[words.length - 1].text += text;
      words[words.length - 1].pieces.push(i);
    } else {
      words.push({ text, pieces: [i] });
    }
  });
  return words;
}

function highlight(index) {
  for (const button of ui.caption.querySelectorAll("button.word")) {
    const on = Number(button.dataset.word) === index;
    button.classList.toggle("on", on);
    button.setAttribute("aria-pressed", String(on && pinned === index));
  }
  if (shown && index != null) {
    ui.looking.textContent = `Where the model looked while writing “${shown.words[index].text}”`;
    ui.overlay.dataset.word = String(index);
  } else {
    ui.looking.textContent = shown ? "Point at a word of the caption" : "\u00a0";
    delete ui.overlay.dataset.word;
  }
  redraw();
}

function redraw() {
  fitPicture();
  const index = ui.overlay.dataset.word;
  const weights = shown && index != null ? mapOf(shown.words[Number(index)]) : null;
  draw(weights, shown && shown.grid);
}

// No taller than most of the window, however narrow the picture.
function fitPicture() {
  const { naturalWidth: w, naturalHeight: h } = ui.picture;
  const frame = ui.picture.parentElement;
  frame.style.maxWidth = w && h ? `${Math.round((0.65 * window.innerHeight * w) / h)}px` : "";
}

// A word's map: the mean over its pieces (each piece's weights sum to 1 over the grid).
function mapOf(word) {
  const maps = word.pieces.map((p) => shown.tokens[p].weights);
  return maps[0].map((_, k) => maps.reduce((sum, m) => sum + m[k], 0) / maps.length);
}

function draw(weights, grid) {
  const canvas = ui.overlay;
  const width = ui.picture.clientWidth;
  const height = ui.picture.clientHeight;
  if (!weights || !grid || !width || !height) {
    canvas.hidden = true;
    return;
  }
  const [rows, cols] = grid;
  const scale = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * scale);
  canvas.height = Math.round(height * scale);

  // One pixel per grid cell, then scaled up with smoothing: a soft map, not a mosaic.
  const cells = document.createElement("canvas");
  cells.width = cols;
  cells.height = rows;
  const image = cells.getContext("2d").createImageData(cols, rows);
  const top = Math.max(...weights) || 1;
  for (let k = 0; k < rows * cols; k++) {
    const v = Math.min(1, Math.max(0, weights[k] / top)); // 1: where it looked most
    // Dim what the word did not look at, tint what it did: the picture stays recognisable.
    const alpha = 0.62 * (1 - v) ** 1.3 + 0.34 * v;
    image.data.set([10 + 245 * v, 14 + 176 * v, 40 - 10 * v, Math.round(255 * alpha)], 4 * k);
  }
  cells.getContext("2d").putImageData(image, 0, 0);
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  context.drawImage(cells, 0, 0, canvas.width, canvas.height);
  canvas.hidden = false;
}

setup();
