// graph.py --qk on viz.py's graph page: a click on an explained head (its hexagon) or on an edge
// between two positions shows why the head attends there: the top (query node, key node) terms of
// its contrast (the score minus the pattern-weighted mean score: what the softmax sees) and of its
// score, with the nodes' labels. QK = {qk: graph.json's "qk", labels: {id: text}, tokens: [...]}.
(function () {
  var panel = document.getElementById("qk-panel");
  var CHARS = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"};
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return CHARS[c]; }); }
  function token(p) { return "<code>" + esc(QK.tokens[p] || "") + "</code>"; }
  function name(q) { return "L" + q.layer + ".H" + q.head; }

  function pairs(rows, rest) {
    var out = "<table><tr><th>query node</th><th>key node</th><th>term</th></tr>";
    rows.forEach(function (p) {
      out += "<tr><td>" + esc(QK.labels[p.query] || p.query) + "</td><td>" +
        esc(QK.labels[p.key] || p.key) + "</td><td class='num'>" + p.value.toFixed(3) + "</td></tr>";
    });
    return out + "<tr><td colspan='2' class='muted'>all other pairs</td><td class='num'>" +
      rest.toFixed(3) + "</td></tr></table>";
  }

  function entry(q) {
    return "<h3>" + name(q) + ": query " + q.query_pos + " " + token(q.query_pos) +
      " attends to key " + q.key_pos + " " + token(q.key_pos) + "</h3><p>pattern " +
      q.pattern.toFixed(3) + " | score " + q.score.toFixed(3) + " | contrast " +
      q.contrast.toFixed(3) + "</p><div class='cols'><div><b>contrast</b>" +
      pairs(q.contrast_pairs, q.contrast_rest) + "</div><div><b>score</b>" +
      pairs(q.pairs, q.rest) + "</div></div>";
  }

  function show(list, what, quiet) {
    var none = "<p>No explained head on this edge's path: explain one with " +
      "<code>graph.py --qk LAYER.HEAD@I:J</code>.</p>";
    panel.innerHTML = "<h2>Why the head attends: " + esc(what) + "</h2>" +
      (list.length ? list.map(entry).join("") : none);
    if (!quiet) panel.scrollIntoView();
  }

  function where(id) {  // a node id -> [layer, position]; embeddings "E_t_p" sit below layer 0
    var parts = id.split("_");
    return [parts[0] === "E" ? -1 : parseInt(parts[0], 10), parseInt(parts[2], 10)];
  }

  document.querySelectorAll("svg g.node").forEach(function (g) {
    var m = /^qk_(\d+)$/.exec(g.querySelector("title").textContent);
    if (!m) return;
    var q = QK.qk[+m[1]];
    g.style.cursor = "pointer";
    g.addEventListener("click", function () { show([q], "head " + name(q)); });
  });
  // an edge from position j to position i passes through the heads of the layers between its ends
  document.querySelectorAll("svg g.edge").forEach(function (g) {
    var ends = g.querySelector("title").textContent.split("->");
    if (ends.length !== 2 || /^qk_/.test(ends[1])) return;
    var s = where(ends[0]), t = where(ends[1]);
    if (s[1] === t[1]) return;
    g.style.cursor = "pointer";
    g.addEventListener("click", function () {
      show(QK.qk.filter(function (q) {
        return q.key_pos === s[1] && q.query_pos === t[1] && q.layer > s[0] && q.layer <= t[0];
      }), "edge " + ends[0] + " → " + ends[1]);
    });
  });
  var m = /qk=(\d+)/.exec(location.hash);  // a link to one entry: page.html#qk=0
  if (m && QK.qk[+m[1]]) show([QK.qk[+m[1]]], "head " + name(QK.qk[+m[1]]), true);
})();
