// Sorting, filtering and paging of the tutor index. Plain ES5-era DOM code: no modules (which
// browsers refuse over file://), no outside resources, no build step.
//
// Every tutor's row is in the HTML, so the page works without JavaScript; with it, only the
// first PAGE matching rows are displayed at a time, because laying out 10,000 table rows takes
// the browser seconds while hiding them (display: none) takes nothing. site.css hides the
// rows past PAGE until this script has run.
(function () {
  "use strict";
  var PAGE = 200;  // keep in step with the nth-child rule in site.css
  var table = document.getElementById("tutors");
  if (!table) { return; }
  var select = document.getElementById("risk-filter");
  var search = document.getElementById("search");
  var shown = document.getElementById("shown");
  var none = document.getElementById("none-shown");
  var more = document.getElementById("more");
  var all = document.getElementById("all");
  var tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.rows);
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var order = rows.map(function (_, i) { return i; });
  var limit = PAGE;
  // Read once: the text a search matches, and each column's sort keys on first use.
  var haystack = rows.map(function (row) { return row.cells[0].textContent.toLowerCase(); });
  var keys = {};

  function columnKeys(col, type) {
    if (!keys[col]) {
      keys[col] = rows.map(function (row) {
        var cell = row.cells[col];
        var raw = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent;
        if (type === "num") { return raw === "" ? null : parseFloat(raw); }
        return raw.trim().toLowerCase();
      });
    }
    return keys[col];
  }

  function sortBy(th) {
    var col = th.cellIndex;
    var type = th.getAttribute("data-type");
    var current = th.getAttribute("aria-sort");
    // Numbers open highest first (the riskiest tutors), text A to Z.
    var dir = current ? (current === "ascending" ? "descending" : "ascending")
                      : (type === "num" ? "descending" : "ascending");
    var sign = dir === "ascending" ? 1 : -1;
    var k = columnKeys(col, type);
    order = rows.map(function (_, i) { return i; });
    order.sort(function (a, b) {
      var x = k[a], y = k[b];
      if (x === y) { return a - b; }
      if (x === null) { return 1; }   // empty values last, either direction
      if (y === null) { return -1; }
      if (type === "num") { return sign * (x - y) || a - b; }
      return sign * x.localeCompare(y) || a - b;
    });
    // Reorder while the body is detached from the page: one style pass instead of thousands.
    var next = tbody.nextSibling;
    table.removeChild(tbody);
    order.forEach(function (i) { tbody.appendChild(rows[i]); });
    table.insertBefore(tbody, next);
    headers.forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
    show();
  }

  function count(n) { return n.toLocaleString("en-US"); }  // 10,000 as on the page

  function show() {
    var status = select ? select.value : "";
    var query = search ? search.value.trim().toLowerCase() : "";
    var matches = 0, visible = 0;
    for (var n = 0; n < order.length; n++) {
      var i = order[n];
      var match = (!status || rows[i].getAttribute("data-status") === status) &&
                  (!query || haystack[i].indexOf(query) !== -1);
      var display = match && visible < limit;
      if (match) { matches++; }
      if (display) { visible++; }
      if (rows[i].hidden === display) { rows[i].hidden = !display; }
    }
    var text = matches === rows.length ? count(rows.length) + " tutors"
                                       : count(matches) + " of " + count(rows.length) + " tutors";
    if (visible < matches) { text += ", the first " + count(visible) + " shown"; }
    if (shown) { shown.textContent = text; }
    if (none) { none.hidden = matches !== 0; }
    if (more) {
      more.hidden = visible >= matches;
      more.textContent = "Show " + count(Math.min(PAGE, matches - visible)) + " more";
    }
    if (all) {
      all.hidden = visible >= matches;
      all.textContent = "Show all " + count(matches);
    }
  }

  function refilter() { limit = PAGE; show(); }

  headers.forEach(function (th) {
    var button = th.querySelector("button");
    if (button) { button.addEventListener("click", function () { sortBy(th); }); }
  });
  if (select) { select.addEventListener("change", refilter); }
  if (search) { search.addEventListener("input", refilter); }
  if (more) { more.addEventListener("click", function () { limit += PAGE; show(); }); }
  if (all) { all.addEventListener("click", function () { limit = rows.length; show(); }); }
  show();  // also applies a filter value the browser restored on back navigation
  document.documentElement.className += " paged";
})();
