(function () {
  var table = document.getElementById("features");
  var body = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var layerBox = document.getElementById("layer");
  var queryBox = document.getElementById("q");
  var more = document.getElementById("more");
  var PAGE = 200;  // rows shown at once (each costs ~1 ms of layout); "show more" adds as many
  var limit = PAGE;
  var FLAGS = INDEX.classes.length - 1;  // the last cell: "dead" there means no page
  // a row: its cell texts, the extra words a search looks in (q), its <tr> once built
  var inline = Array.prototype.map.call(body.rows, function (tr) {
    return {cells: Array.prototype.map.call(tr.cells, function (td) { return td.textContent; }),
            q: tr.dataset.q, tr: tr, text: null};
  });
  var byLayer = {};  // layer -> every row of it in the file's order, once known
  var requested = {};  // layer -> "loading" or "failed", once its file is asked for

  function inlineOf(layer) {
    return inline.filter(function (r) { return r.cells[0] === String(layer); });
  }
  INDEX.layers.forEach(function (l) { if (!(l in INDEX.files)) byLayer[l] = inlineOf(l); });

  window.featureIndex = function (layer, records) {  // what index/layer_XX.js calls
    var known = {};
    inlineOf(layer).forEach(function (r) { known[r.cells[1]] = r; });
    byLayer[layer] = records.map(function (rec) {
      return known[rec[1]] || {cells: rec.slice(0, FLAGS + 1), q: rec[FLAGS + 1], tr: null, text: null};
    });
  };

  function state() {  // the view, from the URL's hash: sort, dir, layer ("", "all" or a layer), q
    var p = new URLSearchParams(location.hash.slice(1));
    return {sort: p.get("sort") || "", dir: p.get("dir") || "", layer: p.get("layer") || "", q: p.get("q") || ""};
  }

  function wanted(s) {  // the layers a view reads; null: the rows in index.html
    if (s.layer === "" && !s.q) return null;
    if (s.layer === "" || s.layer === "all") return INDEX.layers;
    return INDEX.layers.filter(function (l) { return String(l) === s.layer; });
  }

  function load(layers) {  // a script element for each layer file not asked for yet; each redraws once it ran
    layers.forEach(function (l) {
      if (byLayer[l] || requested[l]) return;
      requested[l] = "loading";
      var script = document.createElement("script");
      script.src = INDEX.files[l];
      script.onload = render;
      script.onerror = function () { requested[l] = "failed"; render(); };
      document.head.appendChild(script);
    });
  }

  function text(r) {  // what a search looks in, lower case
    if (r.text === null) r.text = (r.cells[2] + " " + r.cells[3] + " " + r.q).toLowerCase();
    return r.text;
  }

  function value(cell, numeric) {  // null sorts last whichever the direction
    if (!numeric) return cell === "" ? null : cell.toLowerCase();
    var v = parseFloat(cell);
    return isNaN(v) ? null : v;
  }

  function element(r) {  // a row's <tr>: the one in index.html, or built as index_row builds it
    if (r.tr) return r.tr;
    r.tr = document.createElement("tr");
    r.tr.dataset.layer = r.cells[0];
    r.tr.dataset.q = r.q;
    r.cells.forEach(function (cell, i) {
      var td = r.tr.insertCell();
      if (INDEX.classes[i]) td.className = INDEX.classes[i];
      if (i === 1 && r.cells[FLAGS].split(" ").indexOf("dead") < 0) {
        var a = td.appendChild(document.createElement("a"));
        a.href = INDEX.page.replace("{layer}", r.cells[0]).replace("{feature}", cell);
        a.textContent = cell;
      } else {
        td.textContent = cell;
      }
    });
    return r.tr;
  }

  function sorted(rows, col, dir) {  // a stable sort: ties keep the file's order
    var numeric = heads[col].dataset.type === "num";
    var sign = dir === "asc" ? 1 : -1;
    var values = rows.map(function (r) { return value(r.cells[col], numeric); });
    var order = rows.map(function (r, i) { return i; });
    order.sort(function (a, b) {
      var x = values[a];
      var y = values[b];
      if (x === y) return a - b;
      if (x === null) return 1;
      if (y === null) return -1;
      return x < y ? -sign : sign;
    });
    return order.map(function (i) { return rows[i]; });
  }

  function progress(layers) {  // the loading note; returns how many of the layers are still on their way
    var pending = (layers || []).filter(function (l) { return requested[l] === "loading" && !byLayer[l]; });
    var failed = (layers || []).filter(function (l) { return requested[l] === "failed"; });
    document.getElementById("loading").textContent = pending.length ?
      "reading layers: " + (layers.length - pending.length) + " of " + layers.length + " loaded…" :
      failed.length ? "could not read " + failed.map(function (l) { return INDEX.files[l]; }).join(", ") : "";
    table.dataset.pending = pending.length;
    return pending.length;
  }

  function render() {
    var s = state();
    var layers = wanted(s);
    load(layers || []);
    // while layers load, only the note changes: each redraw of the table costs a layout of its rows
    if (progress(layers) && !table.hidden) return;
    var rows = layers === null ? inline : [].concat.apply([], layers.map(function (l) {
      return byLayer[l] || inlineOf(l);  // a layer still loading: its best rows meanwhile
    }));
    var words = s.q.toLowerCase().split(/\s+/).filter(Boolean);
    var matched = rows.filter(function (r) { return words.every(function (w) { return text(r).indexOf(w) >= 0; }); });
    var col = heads.findIndex(function (th) { return th.dataset.key === s.sort; });
    var dir = col < 0 ? "" : (s.dir || heads[col].dataset.dir);
    if (col >= 0) matched = sorted(matched, col, dir);
    var fragment = document.createDocumentFragment();
    matched.slice(0, limit).forEach(function (r) { fragment.appendChild(element(r)); });
    body.replaceChildren(fragment);
    heads.forEach(function (th, i) { th.className = i === col ? dir : ""; });
    if (layerBox.value !== s.layer) layerBox.value = s.layer;
    if (queryBox.value !== s.q) queryBox.value = s.q;
    var scope = layers === null && inline.length < INDEX.total ?
      "the best " + inline.length.toLocaleString("en") + " by detection AUROC of " : "";
    document.getElementById("shown").textContent = Math.min(matched.length, limit) + " of " + matched.length +
      " matching (" + scope + INDEX.total.toLocaleString("en") + " features)";
    more.hidden = matched.length <= limit;
    table.hidden = false;
  }

  function update(change) {  // a new view: into the hash (so a link reopens it), then drawn
    var s = Object.assign(state(), change);
    var p = new URLSearchParams();
    Object.keys(s).forEach(function (k) { if (s[k] !== "") p.set(k, s[k]); });
    history.replaceState(null, "", "#" + p.toString());
    render();
  }

  heads.forEach(function (th) {
    th.addEventListener("click", function () {
      var s = state();
      var current = s.dir || th.dataset.dir;
      var dir = s.sort !== th.dataset.key ? th.dataset.dir : (current === "asc" ? "desc" : "asc");
      update({sort: th.dataset.key, dir: dir});
    });
  });
  layerBox.addEventListener("change", function () { update({layer: layerBox.value}); });
  queryBox.addEventListener("input", function () { update({q: queryBox.value}); });
  more.addEventListener("click", function () { limit += PAGE; render(); });
  window.addEventListener("hashchange", render);
  render();
})();
