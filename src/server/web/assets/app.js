// acr-task's page: live updates over server-sent events, nothing else.
// The page works without this script (forms post, links go); it only keeps things current.
"use strict";

(function () {
  function onReady(f) {
    if (document.readyState !== "loading") f();
    else document.addEventListener("DOMContentLoaded", f);
  }

  // The runs list: refetch the rows when the server says the runs changed, and once the
  // stream opens (a run queued between the page's render and the subscription is not missed).
  function liveRuns() {
    var body = document.getElementById("run-rows");
    if (!body || !window.EventSource) return;
    var busy = false, again = false;
    function refresh() {
      if (busy) { again = true; return; }
      busy = true;
      fetch("/ui/runs/rows" + location.search, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html !== null) body.innerHTML = html; })
        .finally(function () {
          busy = false;
          if (again) { again = false; refresh(); }
        });
    }
    var src = new EventSource("/ui/runs/events");
    src.addEventListener("open", refresh);
    src.addEventListener("changed", refresh);
  }

  // SVG elements have no string className: the attribute works for both.
  function setStatus(el, status) {
    if (!el) return;
    var k = (el.getAttribute("class") || "").replace(/\bs-\w+/g, "").trim();
    el.setAttribute("class", k + " s-" + status);
  }

  function badge(status) {
    var s = document.createElement("span");
    s.className = "status s-" + status;
    s.dataset.status = status;
    s.textContent = status;
    return s;
  }

  function fmtMs(ms) {
    var s = Math.floor(ms / 1000);
    if (s === 0) return ms + " ms";
    if (s < 60) return (ms / 1000).toFixed(1) + " s";
    if (s < 3600) return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
    return Math.floor(s / 3600) + "h " + String(Math.floor(s / 60) % 60).padStart(2, "0") + "m";
  }

  // A run's page: log lines, the steps' states, the run's status, live.
  function liveRun() {
    var run = document.getElementById("run");
    if (!run || !window.EventSource) return;
    var log = document.getElementById("log");
    var filter = document.getElementById("log-step");
    var lines = log.textContent.split("\n").filter(function (l) { return l.length > 0; });
    var stepCount = document.querySelectorAll("#dag .node").length;

    function render() {
      var only = filter ? filter.value : "";
      var shown = only ? lines.filter(function (l) { return l.indexOf(only + " | ") === 0; }) : lines;
      var atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.textContent = shown.join("\n") + (shown.length ? "\n" : "");
      if (atEnd) log.scrollTop = log.scrollHeight;
    }
    if (filter) filter.addEventListener("change", render);
    if (run.dataset.final === "true") return;

    var src = new EventSource("/ui/runs/" + encodeURIComponent(run.dataset.run) +
      "/events?offset=" + run.dataset.offset);
    src.addEventListener("log", function (e) {
      e.data.split("\n").forEach(function (l) { if (l.length) lines.push(l); });
      render();
    });
    // The graph and timeline, drawn by the server (a new graph, or the final geometry).
    function redraw(steps) {
      fetch("/ui/runs/" + encodeURIComponent(run.dataset.run) + "/graph", { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html === null) return;
          var g = document.getElementById("graph");
          var t = document.querySelector("table.timeline");
          var tmp = document.createElement("div");
          tmp.innerHTML = html;
          g.replaceChildren(tmp.querySelector("svg.dag"));
          if (t) t.replaceWith(tmp.querySelector("table"));
          if (filter && steps) {
            steps.forEach(function (s) {
              if (!filter.querySelector('option[value="' + CSS.escape(s.id) + '"]')) {
                var o = document.createElement("option");
                o.value = s.id; o.textContent = s.id;
                filter.insertBefore(o, filter.lastElementChild);
              }
            });
          }
        });
    }
    src.addEventListener("steps", function (e) {
      var steps = JSON.parse(e.data);
      if (steps.length !== stepCount) {
        // The graph is new (the task file was just loaded): fetch it drawn.
        stepCount = steps.length;
        redraw(steps);
        return;
      }
      steps.forEach(function (s) {
        var node = document.querySelector('#dag .node[data-step="' + CSS.escape(s.id) + '"]');
        setStatus(node, s.status);
        if (node) node.querySelector("title").textContent = s.id + ": " + s.status;
        var row = document.querySelector('#step-rows tr[data-step="' + CSS.escape(s.id) + '"]');
        if (!row) return;
        row.querySelector(".st").replaceChildren(badge(s.status));
        row.querySelector(".start").textContent = "+" + fmtMs(s.startedMs);
        row.querySelector(".dur").textContent = fmtMs(s.durationMs);
        row.querySelector(".att").textContent = s.attempts;
        setStatus(row.querySelector(".bar"), s.status);
      });
    });
    src.addEventListener("status", function (e) {
      var st = JSON.parse(e.data);
      document.getElementById("run-status").replaceChildren(badge(st.status));
      if (st.duration) document.getElementById("run-duration").textContent = st.duration;
    });
    src.addEventListener("end", function () {
      src.close();
      redraw(null);
      run.dataset.final = "true";
      document.getElementById("live").textContent = "finished";
      var cancel = document.getElementById("cancel");
      if (cancel) cancel.closest("form").remove();
    });
  }

  // Copy buttons (pull commands).
  function copyButtons() {
    document.querySelectorAll("button.copy").forEach(function (b) {
      b.addEventListener("click", function () {
        if (!navigator.clipboard) return;
        navigator.clipboard.writeText(b.dataset.copy).then(function () {
          b.textContent = "Copied";
          setTimeout(function () { b.textContent = "Copy"; }, 1500);
        });
      });
    });
  }

  onReady(function () {
    liveRuns();
    liveRun();
    copyButtons();
  });
})();
