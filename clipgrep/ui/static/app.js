// clipgrep ui: the large view, keyboard navigation, copy path, drop or paste a picture.
// No inline scripts or eval: the page's Content-Security-Policy forbids both.
"use strict";
(function () {
  const viewer = document.getElementById("viewer");
  const grid = document.getElementById("grid");
  const tiles = () => Array.from(grid.querySelectorAll("a.tile"));
  let current = null; // the tile whose large view is open

  document.getElementById("t").addEventListener("input", (e) => {
    document.getElementById("t-value").textContent = Number(e.target.value).toFixed(2);
  });

  document.body.addEventListener("htmx:afterSwap", (e) => {
    if (e.detail.target === viewer && !viewer.open) viewer.showModal();
  });
  document.body.addEventListener("htmx:beforeRequest", (e) => {
    const tile = e.detail.elt.closest && e.detail.elt.closest("a.tile");
    if (tile) current = tile;
  });
  viewer.addEventListener("close", () => { if (current) current.focus(); });
  viewer.addEventListener("click", (e) => {
    if (e.target === viewer || e.target.closest(".close")) viewer.close();
    const copy = e.target.closest("[data-copy]");
    if (copy) {
      navigator.clipboard.writeText(copy.dataset.copy).then(() => { copy.textContent = "Copied"; },
        () => { copy.textContent = "Copy failed"; });
    }
  });

  function open(tile) { if (tile) { tile.focus(); tile.click(); } }

  function neighbour(tile, dx, dy) {
    const all = tiles();
    const i = all.indexOf(tile);
    if (dx) return all[i + dx];
    const box = tile.getBoundingClientRect();
    const row = all.filter((t) => Math.abs(t.getBoundingClientRect().top - box.top) < 2);
    const perRow = Math.max(1, row.length);
    return all[i + dy * perRow];
  }

  document.addEventListener("keydown", (e) => {
    const typing = e.target.matches("input, textarea");
    if (viewer.open) {
      if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
        e.preventDefault();
        open(neighbour(current, e.key === "ArrowRight" ? 1 : -1, 0));
      }
      return;
    }
    if (e.key === "/" && !typing) { e.preventDefault(); document.getElementById("q").focus(); return; }
    if (typing) {
      if (e.key === "ArrowDown" && e.target.id === "q") { e.preventDefault(); const first = tiles()[0]; if (first) first.focus(); }
      return;
    }
    const tile = document.activeElement && document.activeElement.closest("a.tile");
    if (!tile) return;
    const moves = { ArrowRight: [1, 0], ArrowLeft: [-1, 0], ArrowDown: [0, 1], ArrowUp: [0, -1] };
    if (moves[e.key]) {
      e.preventDefault();
      const next = neighbour(tile, moves[e.key][0], moves[e.key][1]);
      if (next) { next.focus(); next.scrollIntoView({ block: "nearest" }); }
      else if (e.key === "ArrowUp") document.getElementById("q").focus();
    }
  });

  // Drop or paste a picture: it is sent to /upload and the page goes to its similar pictures.
  async function searchByPicture(file) {
    if (!file || !file.type.startsWith("image/")) return;
    const response = await fetch("/upload", { method: "POST", body: file, headers: { "HX-Request": "true" } });
    if (response.ok) window.location = await response.text();
    else {
      const message = document.createElement("p");
      message.className = "message";
      message.textContent = await response.text();
      grid.prepend(message);
    }
  }
  const hint = document.getElementById("drop-hint");
  document.addEventListener("dragover", (e) => { e.preventDefault(); hint.hidden = false; });
  document.addEventListener("dragleave", () => { hint.hidden = true; });
  document.addEventListener("drop", (e) => {
    e.preventDefault(); hint.hidden = true;
    searchByPicture(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = Array.from(e.clipboardData.items).find((i) => i.type.startsWith("image/"));
    if (item) { e.preventDefault(); searchByPicture(item.getAsFile()); }
  });
})();
