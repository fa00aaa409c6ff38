// Attention viewer and importance grid of report.html. The page's data is the JSON in #report-data.
// State is read from the URL fragment (#layer=0&head=3&hover=5) on load and written to the DOM
// (data-* attributes of #viewer and of each token) so a headless browser can check it.
(function () {
  "use strict";

  const data = JSON.parse(document.getElementById("report-data").textContent);
  const viewer = document.getElementById("viewer");
  const state = { layerIndex: 0, head: 0, hover: Math.max(data.tokens.length - 1, 0) };

  function visible(token) {
    return token === "" ? "\u2205" : token.replace(/\n/g, "\u21b5");
  }

  function readFragment() {
    const params = new URLSearchParams(window.location.hash.slice(1));
    if (params.has("layer")) {
      const index = data.layers.findIndex((l) => l.layer === Number(params.get("layer")));
      if (index >= 0) state.layerIndex = index;
    }
    const layer = data.layers[state.layerIndex];
    const head = Number(params.get("head"));
    if (params.has("head") && Number.isInteger(head) && head >= 0 && head < layer.patterns.length) {
      state.head = head;
    }
    const hover = Number(params.get("hover"));
    if (params.has("hover") && Number.isInteger(hover) && hover >= 0 && hover < data.tokens.length) {
      state.hover = hover;
    }
  }

  function writeFragment() {
    const layer = data.layers[state.layerIndex].layer;
    const fragment = "#layer=" + layer + "&head=" + state.head + "&hover=" + state.hover;
    if (window.location.hash !== fragment) history.replaceState(null, "", fragment);
  }

  function buildTokens() {
    const container = document.getElementById("viewer-tokens");
    data.tokens.forEach((token, index) => {
      const span = document.createElement("span");
      span.className = "token";
      span.dataset.index = String(index);
      span.textContent = visible(token);
      span.addEventListener("mouseenter", () => select({ hover: index }));
      container.appendChild(span);
    });
  }

  function buildHeadButtons() {
    const container = document.getElementById("head-buttons");
    container.textContent = "";
    data.layers[state.layerIndex].patterns.forEach((_, head) => {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = String(head);
      button.dataset.head = String(head);
      button.addEventListener("click", () => select({ head: head }));
      container.appendChild(button);
    });
  }

  function drawPattern(pattern) {
    const canvas = document.getElementById("pattern-canvas");
    const n = pattern.length;
    const cell = Math.max(1, Math.min(24, Math.floor(480 / Math.max(n, 1))));
    canvas.width = cell * n;
    canvas.height = cell * n;
    const context = canvas.getContext("2d");
    context.fillStyle = "#ffffff";
    context.fillRect(0, 0, canvas.width, canvas.height);
    for (let query = 0; query < n; query++) {
      for (let key = 0; key <= query; key++) {
        context.fillStyle = "rgba(37, 99, 235, " + pattern[query][key] + ")";
        context.fillRect(key * cell, query * cell, cell, cell);
      }
    }
    context.strokeStyle = "#dc2626";
    context.lineWidth = 2;
    context.strokeRect(1, state.hover * cell, canvas.width - 2, cell);
    canvas.onmousemove = (event) => {
      const rect = canvas.getBoundingClientRect();
      const row = Math.floor(((event.clientY - rect.top) / rect.height) * n);
      if (row >= 0 && row < n && row !== state.hover) select({ hover: row });
    };
  }

  function render() {
    const layer = data.layers[state.layerIndex];
    const pattern = layer.patterns[state.head];
    const row = pattern[state.hover];

    viewer.dataset.layer = String(layer.layer);
    viewer.dataset.head = String(state.head);
    viewer.dataset.hover = String(state.hover);
    document.getElementById("layer-select").value = String(layer.layer);
    document.querySelectorAll("#head-buttons button").forEach((button) => {
      button.setAttribute("aria-pressed", String(Number(button.dataset.head) === state.head));
    });

    let strongest = 0;
    document.querySelectorAll("#viewer-tokens .token").forEach((span) => {
      const key = Number(span.dataset.index);
      span.classList.toggle("query", key === state.hover);
      if (key > state.hover) {
        span.classList.add("masked");
        span.dataset.weight = "masked";
        span.style.background = "";
        span.style.color = "";
        span.title = "position " + key + ": after the query, masked";
        return;
      }
      const weight = row[key];
      if (weight > row[strongest]) strongest = key;
      span.classList.remove("masked");
      span.dataset.weight = weight.toFixed(4);
      span.style.background = "rgba(37, 99, 235, " + weight + ")";
      span.style.color = weight > 0.55 ? "#ffffff" : "";
      span.title = "position " + key + ": weight " + weight.toFixed(4);
    });

    document.getElementById("viewer-caption").textContent =
      "Layer " + layer.layer + ", head " + state.head + ": query " + state.hover + " \u201c" + visible(data.tokens[state.hover]) +
      "\u201d attends most to key " + strongest + " \u201c" + visible(data.tokens[strongest]) +
      "\u201d (" + row[strongest].toFixed(4) + ").";

    drawPattern(pattern);

    const picture = document.getElementById("head-picture");
    const source = layer.pictures[state.head];
    picture.hidden = !source;
    if (source) picture.src = source;
    document.getElementById("head-picture-caption").textContent = source
      ? "Saved picture of layer " + layer.layer + " head " + state.head + "."
      : "No picture was saved for this head.";

    writeFragment();
  }

  function select(change) {
    if (change.layerIndex !== undefined && change.layerIndex !== state.layerIndex) {
      state.layerIndex = change.layerIndex;
      const heads = data.layers[state.layerIndex].patterns.length;
      if (state.head >= heads) state.head = 0;
      buildHeadButtons();
    }
    if (change.head !== undefined) state.head = change.head;
    if (change.hover !== undefined) state.hover = change.hover;
    render();
  }

  function openHead(layerNumber, head) {
    const index = data.layers.findIndex((l) => l.layer === layerNumber);
    if (index < 0) return;
    select({ layerIndex: index, head: head });
    document.getElementById("attention").scrollIntoView();
  }

  function buildImportanceGrid() {
    const container = document.getElementById("importance-grid");
    if (!container || !data.importance) return;
    const table = document.createElement("table");
    const header = table.insertRow();
    header.appendChild(document.createElement("th")).textContent = "layer \\ head";
    const heads = data.importance.length ? data.importance[0].length : 0;
    for (let head = 0; head < heads; head++) {
      header.appendChild(document.createElement("th")).textContent = String(head);
    }
    let largest = 0;
    data.importance.forEach((row) => row.forEach((d) => { if (Number.isFinite(d)) largest = Math.max(largest, Math.abs(d)); }));
    data.importance.forEach((row, layer) => {
      const tr = table.insertRow();
      tr.appendChild(document.createElement("th")).textContent = String(layer);
      row.forEach((delta, head) => {
        const cell = tr.insertCell();
        // A head of a layer outside --sweep-layers has no delta (NaN, null in JSON): marked as
        // the KV-groups table marks it, and not clickable.
        if (!Number.isFinite(delta)) {
          cell.textContent = "\u2013";
          cell.title = "not swept";
          return;
        }
        const alpha = largest > 0 ? Math.abs(delta) / largest : 0;
        cell.style.background = delta >= 0 ? "rgba(220, 38, 38, " + alpha + ")" : "rgba(37, 99, 235, " + alpha + ")";
        cell.style.color = alpha > 0.55 ? "#ffffff" : "";
        cell.textContent = delta.toFixed(2);
        cell.title = "layer " + layer + " head " + head + ": \u0394 loss " + delta;
        cell.addEventListener("click", () => openHead(layer, head));
      });
    });
    container.appendChild(table);
    document.querySelectorAll("#top-heads tr[data-layer]").forEach((tr) => {
      tr.addEventListener("click", () => openHead(Number(tr.dataset.layer), Number(tr.dataset.head)));
    });
  }

  buildImportanceGrid();

  if (!viewer || data.layers.length === 0) return;

  readFragment();
  buildTokens();
  buildHeadButtons();
  document.getElementById("layer-select").addEventListener("change", (event) => {
    const index = data.layers.findIndex((l) => l.layer === Number(event.target.value));
    if (index >= 0) select({ layerIndex: index });
  });
  document.addEventListener("keydown", (event) => {
    const heads = data.layers[state.layerIndex].patterns.length;
    if (event.key === "ArrowLeft" && state.hover > 0) select({ hover: state.hover - 1 });
    if (event.key === "ArrowRight" && state.hover + 1 < data.tokens.length) select({ hover: state.hover + 1 });
    if (event.key === "ArrowUp") { event.preventDefault(); select({ head: (state.head + heads - 1) % heads }); }
    if (event.key === "ArrowDown") { event.preventDefault(); select({ head: (state.head + 1) % heads }); }
  });
  window.addEventListener("hashchange", () => {
    const before = state.layerIndex;
    readFragment();
    if (state.layerIndex !== before) buildHeadButtons();
    render();
  });
  render();
})();
