// lmqa's reader page: ask a loaded context, watch the answer stream in, read
// the passages it came from, what each layer retrieved, and the document
// around any passage. Plain JS, no dependencies, no build step.
//
// Document text, file names and answers are untrusted (a book may hold
// "<script>"): they reach the page only as text nodes (textContent,
// createTextNode), never through innerHTML, and no link is ever built from
// them. The server's Content-Security-Policy forbids inline script anyway.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY = "lmqa-api-key";          // sessionStorage: this tab only
  const CONTEXT = "lmqa-context";
  const HISTORY = "lmqa-history:";     // + context name; sessionStorage, as `lmqa chat` keeps a session's turns
  const MAX_TURNS = 50;
  const AROUND = 3000;                 // characters of document shown around a passage
  const MORE = 20000;                  // characters added by "earlier" / "later"
  const MIN_CELL = 2;                  // heatmap: the narrowest column, in CSS pixels (wider documents are binned)

  let key = sessionStorage.getItem(KEY) || "";
  let context = null;                  // the model id picked
  let contexts = [];                   // /v1/models' list
  let busy = false;
  let shownId = null;                  // the answer whose evidence is shown
  let quotes = [];                     // its quoted spans, document characters
  let heat = null;                     // the heatmap's data and geometry, for hovering
  let view = null;                     // the document view: {context, start, end, chars, mark}

  class KeyNeeded extends Error {}

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function status(text, isError) {
    const node = $("status");
    node.textContent = text || "";
    node.hidden = !text;
    node.classList.toggle("error", Boolean(isError));
  }

  function basename(path) {
    const parts = String(path || "").split(/[\\/]/).filter(Boolean);
    return parts.length ? parts[parts.length - 1] : String(path || "");
  }

  function lines(start, end) {
    return start === end ? String(start) : `${start}-${end}`;
  }

  // ----- the API -----
  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = Object.assign({}, opts.headers || {});
    if (key) opts.headers["Authorization"] = "Bearer " + key;
    const res = await fetch(path, opts);
    if (res.status === 401) {
      needKey(Boolean(key));
      throw new KeyNeeded("API key needed");
    }
    if (!res.ok) {
      let message = `${res.status} ${res.statusText}`;
      try {
        const body = await res.json();
        if (body && body.error && body.error.message) message = body.error.message;
      } catch (e) { /* not JSON: keep the status line */ }
      const error = new Error(message);
      error.status = res.status;
      throw error;
    }
    return res;
  }

  function failed(error) {
    if (error instanceof KeyNeeded) return;
    status(String(error && error.message ? error.message : error), true);
  }

  // ----- the API key -----
  function needKey(refused) {
    $("main").hidden = true;
    $("key-panel").hidden = false;
    $("change-key").hidden = true;
    $("key-message").textContent = refused
      ? "The server refused this API key. Enter the key it was started with (lmqa serve --api-key, or LMQA_API_KEY)."
      : "This server asks for an API key: it was started with --api-key (or LMQA_API_KEY). " +
        "Enter the key to pick a context and ask questions.";
    status("");
    $("key").focus();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    key = $("key").value.trim();
    $("key").value = "";
    if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
    $("key-panel").hidden = true;
    loadContexts().catch(failed);
  });

  $("change-key").addEventListener("click", () => {
    $("key-panel").hidden = false;
    $("key-message").textContent = "Enter another API key for this server.";
    $("key").focus();
  });

  // ----- contexts -----
  async function loadContexts() {
    status("Loading contexts…");
    const data = await (await api("/v1/models")).json();
    const select = $("context");
    select.replaceChildren();
    for (const m of data.data) {
      const option = el("option", null, `${m.id} (${basename(m.document)}, ${Number(m.tokens).toLocaleString()} tokens)`);
      option.value = m.id;
      select.append(option);
    }
    select.disabled = data.data.length === 0;
    $("change-key").hidden = !key;
    $("key-panel").hidden = true;
    $("main").hidden = false;
    status(data.data.length ? "" : "This server has no contexts loaded.");
    contexts = data.data;
    const names = contexts.map((m) => m.id);
    const saved = sessionStorage.getItem(CONTEXT);
    if (names.length) pick(names.includes(saved) ? saved : names[0]);
  }

  function pick(name) {
    context = name;
    $("context").value = name;
    sessionStorage.setItem(CONTEXT, name);
    const m = contexts.find((x) => x.id === name);
    $("context-info").textContent = m ? m.document : "";
    clearAnswer();
    closeDocument();
    renderHistory();
  }

  $("context").addEventListener("change", (event) => pick(event.target.value));

  // ----- conversation history (per context, this tab) -----
  function history(name) {
    try {
      const turns = JSON.parse(sessionStorage.getItem(HISTORY + name) || "[]");
      return Array.isArray(turns) ? turns : [];
    } catch (e) {
      return [];
    }
  }

  function saveHistory(name, turns) {
    sessionStorage.setItem(HISTORY + name, JSON.stringify(turns.slice(-MAX_TURNS)));
  }

  function renderHistory() {
    const list = $("turns");
    list.replaceChildren();
    const turns = history(context);
    for (const turn of turns) list.append(turnItem(turn));
    $("history-empty").hidden = turns.length > 0;
  }

  function turnItem(turn) {
    const item = el("li", "turn");
    item.append(el("div", "question", turn.question));
    const answer = el("div", "answer", turn.answer);
    item.append(answer);
    const meta = el("div", "meta muted");
    if (turn.timings) {
      const t = turn.timings;
      meta.append(`first token after ${(t.queued_s + t.first_token_s).toFixed(2)} s, ${t.answer_tokens} tokens, ` +
                  `${t.total_s.toFixed(2)} s in all `);
    }
    if (turn.id) {
      const button = el("button", "link", "evidence");
      button.type = "button";
      button.addEventListener("click", () => show(turn.id).catch(failed));
      meta.append(button);
      item.dataset.id = turn.id;
    }
    item.append(meta);
    if (turn.id && turn.id === shownId) item.classList.add("shown");
    return item;
  }

  $("clear").addEventListener("click", () => {
    if (!context) return;
    sessionStorage.removeItem(HISTORY + context);
    clearAnswer();
    renderHistory();
  });

  // ----- asking -----
  $("ask-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("question").value.trim();
    if (!question || busy || !context) return;
    $("question").value = "";
    ask(question).catch((error) => {
      const pending = document.querySelector("#turns .turn.streaming");
      if (pending) {  // the question stays in view, marked as not answered
        pending.classList.remove("streaming");
        pending.classList.add("failed");
        pending.querySelector(".meta").textContent = error instanceof KeyNeeded ? "not answered: API key needed"
          : `not answered: ${error && error.message ? error.message : error}`;
      }
      failed(error);
    }).finally(() => {
      busy = false;
      $("ask").disabled = false;
    });
  });

  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("ask-form").requestSubmit();
    }
  });

  async function ask(question) {
    busy = true;
    $("ask").disabled = true;
    status("Waiting for the answer…");
    const name = context;
    const turn = { id: null, question, answer: "", timings: null };
    const item = turnItem(turn);
    item.classList.add("streaming");
    const answerNode = item.querySelector(".answer");
    $("turns").append(item);
    $("history-empty").hidden = true;
    item.scrollIntoView({ block: "nearest" });

    const res = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: name, stream: true, messages: [{ role: "user", content: question }] }),
    });
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = false;
    const handle = (data) => {
      if (data === "[DONE]") { done = true; return; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the answer failed");
      if (chunk.id) turn.id = chunk.id;
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        if (!turn.answer) status("");
        turn.answer += choice.delta.content;
        answerNode.textContent = turn.answer;
      }
      if (chunk.timings) turn.timings = chunk.timings;
    };
    while (!done) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) handle(line.slice(6));
        }
      }
    }
    status("");
    const turns = history(name);
    turns.push(turn);
    saveHistory(name, turns);
    if (name !== context) return;  // the reader moved on to another context meanwhile
    item.replaceWith(turnItem(turn));
    if (turn.id) await show(turn.id);
  }

  // ----- evidence and the heatmap of one answer -----
  function clearAnswer() {
    shownId = null;
    heat = null;
    $("answer-panel").hidden = true;
    $("evidence").replaceChildren();
  }

  async function show(id) {
    let answer, blocks;
    try {
      [answer, blocks] = await Promise.all([
        api(`/v1/answers/${encodeURIComponent(id)}`).then((r) => r.json()),
        api(`/v1/answers/${encodeURIComponent(id)}/blocks`).then((r) => r.json()),
      ]);
    } catch (error) {
      if (error.status === 404) {
        status("The server no longer keeps this answer's evidence (it keeps its latest answers since it started).", true);
        return;
      }
      throw error;
    }
    shownId = id;
    quotes = answer.quotes || [];
    for (const item of $("turns").children) item.classList.toggle("shown", item.dataset.id === id);
    $("answer-panel").hidden = false;
    renderEvidence(answer);
    renderHeatmap(blocks);
  }

  function highlighted(text, spans) {
    const out = document.createDocumentFragment();
    const sorted = (spans || []).map((s) => [Math.max(0, s[0]), Math.min(text.length, s[1])])
      .filter((s) => s[1] > s[0]).sort((a, b) => a[0] - b[0]);
    let at = 0;
    for (const [start, end] of sorted) {
      if (end <= at) continue;
      const from = Math.max(start, at);
      if (from > at) out.append(document.createTextNode(text.slice(at, from)));
      out.append(el("mark", null, text.slice(from, end)));
      at = end;
    }
    if (at < text.length) out.append(document.createTextNode(text.slice(at)));
    return out;
  }

  function renderEvidence(answer) {
    const list = $("evidence");
    list.replaceChildren();
    $("evidence-note").textContent = answer.evidence.length ? "" : "(none: the answer attended to no document block)";
    for (const p of answer.evidence) {
      const item = el("li", "passage");
      const head = el("div", "passage-head");
      head.append(el("span", "location", `${p.file}:${lines(p.start_line, p.end_line)}`));
      const blocks = p.blocks.length > 1 ? `blocks ${p.blocks[0]}-${p.blocks[p.blocks.length - 1]}` : `block ${p.block}`;
      head.append(el("span", "muted", blocks));
      if (p.quoted) head.append(el("span", "tag", "quoted by the answer"));
      const share = el("span", "share", `${(100 * p.share).toFixed(1)}% of the answer's attention`);
      const bar = el("span", "bar");
      const fill = el("span", "fill");
      fill.style.width = `${Math.min(100, Math.max(0, 100 * p.share)).toFixed(1)}%`;
      bar.append(fill);
      share.prepend(bar);
      head.append(share);
      if (p.char_start !== null) {
        const open = el("button", "link open", "open in document");
        open.type = "button";
        open.addEventListener("click", () => openDocument(p.char_start, p.char_end).catch(failed));
        head.append(open);
      }
      item.append(head);
      const text = el("p", "passage-text");
      text.append(highlighted(p.text, p.spans));
      item.append(text);
      list.append(item);
    }
  }

  // light (rarely) to dark (often), as ColorBrewer's YlGnBu
  const RAMP = [[237, 248, 177], [127, 205, 187], [44, 127, 184], [37, 52, 148], [8, 29, 88]];
  function colour(x) {
    const t = Math.min(1, Math.max(0, x)) * (RAMP.length - 1);
    const i = Math.min(RAMP.length - 2, Math.floor(t));
    const f = t - i;
    const c = RAMP[i].map((v, k) => Math.round(v + f * (RAMP[i + 1][k] - v)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function renderHeatmap(data) {
    const canvas = $("heatmap-canvas");
    const labels = $("heatmap-labels");
    const L = data.layers;
    const N = Math.max(1, data.blocks);
    const width = Math.max(240, Math.floor(canvas.parentElement.clientWidth || 600));
    const perColumn = Math.max(1, Math.ceil(N / (width / MIN_CELL)));  // a lone retrieval stays visible
    const columns = Math.ceil(N / perColumn);
    const cell = width / columns;
    const rowHeight = L > 40 ? 6 : L > 16 ? 10 : 16;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(L * rowHeight * ratio);
    canvas.style.width = `${width}px`;
    canvas.style.height = `${L * rowHeight}px`;
    canvas.dataset.layers = String(L);
    canvas.dataset.blocks = String(N);
    canvas.dataset.perColumn = String(perColumn);

    labels.replaceChildren();
    for (let layer = 0; layer < L; layer++) {
      const label = el("span", "layer", layer);
      label.style.height = `${rowHeight}px`;
      label.style.lineHeight = `${rowHeight}px`;
      labels.append(label);
    }

    const grid = new Float64Array(L * columns);
    const byLayer = [];
    for (let layer = 0; layer < L; layer++) {
      const counts = new Map();
      for (const [block, count] of data.retrievals[layer] || []) {
        counts.set(block, count);
        grid[layer * columns + Math.floor(block / perColumn)] += count;
      }
      byLayer.push(counts);
    }
    const top = Math.max(2, ...grid);

    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = "#f6f6f6";
    ctx.fillRect(0, 0, width, L * rowHeight);
    const doc = data.document_blocks;
    if (doc && doc[1] + 1 < N) {  // blocks after the document: the question and the answer
      ctx.fillStyle = "#ece7f3";
      const x = Math.floor((doc[1] + 1) / perColumn) * cell;
      ctx.fillRect(x, 0, width - x, L * rowHeight);
    }
    for (let layer = 0; layer < L; layer++) {
      for (let col = 0; col < columns; col++) {
        const v = grid[layer * columns + col];
        if (!v) continue;
        ctx.fillStyle = colour(0.3 + 0.7 * Math.log(v) / Math.log(top));
        ctx.fillRect(col * cell, layer * rowHeight, Math.max(cell, 1), rowHeight - 1);
      }
    }
    ctx.fillStyle = "rgba(214, 39, 40, 0.55)";
    for (const mark of data.marks) ctx.fillRect(Math.floor(mark.block / perColumn) * cell, 0, 1, L * rowHeight);

    const axis = $("heatmap-axis");
    axis.textContent = `${L} layers (rows) × ${N.toLocaleString()} blocks of ${data.block_size} tokens (columns` +
      (perColumn > 1 ? `, ${perColumn} blocks each` : "") + `); most often ${data.max_count} times` +
      (data.marks.length ? `; red lines: ${data.marks.length} files or chapters` : "") +
      (doc && doc[1] + 1 < N ? "; shaded: the question and answer" : "");
    heat = { data, L, N, perColumn, columns, cell, rowHeight, byLayer, grid, width };
  }

  // drawn again when its column changes width (the document view opening beside it, a resized window)
  new ResizeObserver(() => {
    const width = Math.max(240, Math.floor($("heatmap-canvas").parentElement.clientWidth || 600));
    if (heat && !$("answer-panel").hidden && width !== heat.width) renderHeatmap(heat.data);
  }).observe($("heatmap-canvas").parentElement);

  function heatAt(event) {
    if (!heat) return null;
    const rect = $("heatmap-canvas").getBoundingClientRect();
    const x = event.clientX - rect.left;
    const y = event.clientY - rect.top;
    const layer = Math.floor(y / heat.rowHeight);
    const col = Math.floor(x / heat.cell);
    if (layer < 0 || layer >= heat.L || col < 0 || col >= heat.columns) return null;
    const first = col * heat.perColumn;
    const last = Math.min(heat.N, first + heat.perColumn) - 1;
    let block = first;
    let best = -1;
    for (let b = first; b <= last; b++) {  // the bin's most retrieved block stands for it
      const c = heat.byLayer[layer].get(b) || 0;
      if (c > best) { best = c; block = b; }
    }
    return { layer, first, last, block, count: heat.grid[layer * heat.columns + col], x, y };
  }

  function place(block) {
    const data = heat.data;
    const source = data.sources[String(block)];
    if (source) return source.location;
    const doc = data.document_blocks;
    if (doc && block > doc[1]) return "the question and answer";
    if (doc && block < doc[0]) return "the prompt before the document";
    return null;  // a document block no layer retrieved: the answer's JSON does not name its place
  }

  function chapter(block) {
    let label = null;
    for (const mark of heat.data.marks) {
      if (mark.block <= block) label = mark.label; else break;
    }
    return label;
  }

  $("heatmap-canvas").addEventListener("mousemove", (event) => {
    const tip = $("heatmap-tip");
    const at = heatAt(event);
    if (!at) { tip.hidden = true; return; }
    const own = heat.byLayer[at.layer].get(at.block) || 0;
    const where = place(at.block);
    const within = chapter(at.block);
    tip.replaceChildren();
    if (where) tip.append(el("div", "tip-place", where));
    tip.append(el("div", null, `layer ${at.layer}, block ${at.block}`));
    tip.append(el("div", null, own ? `retrieved ${own} times` : "not retrieved by this layer"));
    if (at.first !== at.last && at.count) {
      tip.append(el("div", "muted", `blocks ${at.first}-${at.last} (this column): ${at.count} times`));
    }
    if (within) tip.append(el("div", "muted", `in ${within}`));
    tip.hidden = false;
    const offset = $("heatmap-canvas").offsetLeft;  // past the layer labels
    const room = $("heatmap").clientWidth - tip.offsetWidth - 4;
    const right = offset + at.x + 14;
    tip.style.left = `${Math.round(Math.max(0, right <= room ? right : offset + at.x - tip.offsetWidth - 14))}px`;
    tip.style.top = `${Math.round(at.y + 14)}px`;
  });

  $("heatmap-canvas").addEventListener("mouseleave", () => { $("heatmap-tip").hidden = true; });

  $("heatmap-canvas").addEventListener("click", (event) => {
    const at = heatAt(event);
    const source = at && heat.data.sources[String(at.block)];
    if (source) openDocument(source.char_start, source.char_end).catch(failed);
  });

  // ----- the document view -----
  function closeDocument() {
    view = null;
    $("document").hidden = true;
    $("document-text").replaceChildren();
  }

  $("document-close").addEventListener("click", closeDocument);

  async function fetchText(start, end) {
    const query = new URLSearchParams({ model: view.context, start: String(start), end: String(end) });
    return (await api(`/v1/document?${query}`)).json();
  }

  async function openDocument(start, end) {
    view = { context, start: 0, end: 0, chars: 0, mark: [start, end] };
    const data = await fetchText(Math.max(0, start - AROUND), end + AROUND);
    view.start = data.start;
    view.end = data.end;
    view.chars = data.chars;
    $("document").hidden = false;
    const where = data.lines.find((l) => l.start + l.text.length >= start && l.line !== null);
    $("document-title").textContent = where ? `${where.file}` : basename(data.source);
    const box = $("document-text");
    box.replaceChildren(...data.lines.map(lineNode));
    moreButtons();
    const first = box.querySelector(".in-passage");
    if (first) box.scrollTop = Math.max(0, first.offsetTop - box.clientHeight / 3);  // the view scrolls, not the page
  }

  function lineNode(line) {
    const node = el("div", "line");
    node.dataset.start = String(line.start);
    node.append(el("span", "ln", line.line === null ? "" : line.line));
    const end = line.start + line.text.length;
    const [ms, me] = view.mark;
    if (ms < Math.max(end, line.start + 1) && me > line.start) node.classList.add("in-passage");
    if (line.file !== null && line.line !== null) node.title = `${line.file}:${line.line}`;
    const spans = quotes.filter((q) => q[0] < end && q[1] > line.start)
      .map((q) => [q[0] - line.start, q[1] - line.start]);
    const text = el("span", "text");
    text.append(highlighted(line.text, spans));
    node.append(text);
    return node;
  }

  function moreButtons() {
    $("document-earlier").hidden = !view || view.start <= 0;
    $("document-later").hidden = !view || view.end >= view.chars;
  }

  $("document-earlier").addEventListener("click", async () => {
    if (!view || view.start <= 0) return;
    try {
      const data = await fetchText(Math.max(0, view.start - MORE), view.start - 1);
      const box = $("document-text");
      const before = box.scrollHeight;
      box.prepend(...data.lines.map(lineNode));
      box.scrollTop += box.scrollHeight - before;
      view.start = data.start;
      moreButtons();
    } catch (error) { failed(error); }
  });

  $("document-later").addEventListener("click", async () => {
    if (!view || view.end >= view.chars) return;
    try {
      const data = await fetchText(view.end + 1, view.end + 1 + MORE);
      $("document-text").append(...data.lines.map(lineNode));
      view.end = data.end;
      moreButtons();
    } catch (error) { failed(error); }
  });

  loadContexts().catch(failed);
})();
