// The console's few behaviours: copy buttons, and drawing the spend chart with uPlot.
document.addEventListener("click", function (event) {
  var button = event.target.closest("[data-copy]");
  if (!button) return;
  var source = document.getElementById(button.getAttribute("data-copy"));
  if (!source) return;
  navigator.clipboard.writeText(source.textContent.trim()).then(function () {
    button.textContent = "Copied";
  }, function () {
    button.textContent = "Select and copy by hand";
  });
});

function drawSpendChart(elementId, data) {
  var element = document.getElementById(elementId);
  if (!element || typeof uPlot === "undefined") return;
  var xs = data.days.map(function (d) { return Date.parse(d + "T00:00:00Z") / 1000; });
  var width = Math.max(280, element.clientWidth - 8);
  new uPlot({
    width: width, height: 220,
    series: [{}, { label: "credits", stroke: "#1f5fbf", fill: "rgba(31,95,191,0.12)", paths: uPlot.paths.bars({ size: [0.7, 40] }) }],
    axes: [{}, { size: 60 }],
    scales: { x: { time: true, range: function (u, min, max) { return [min - 43200, max + 43200]; } } },
  }, [xs, data.credits], element);
}

// A running task's page: its status part is refreshed on each event of the task's stream
// (server-sent events), with a slow poll (hx-trigger "every 5s") as the fallback.
document.addEventListener("DOMContentLoaded", function () {
  var box = document.getElementById("task-status");
  if (!box || !box.dataset.events || typeof EventSource === "undefined") return;
  var source = new EventSource(box.dataset.events);
  source.addEventListener("task", function (event) {
    var current = document.getElementById("task-status");
    if (current && window.htmx) window.htmx.trigger(current, "taskchange");
    var status = JSON.parse(event.data).status;
    if (status !== "pending" && status !== "processing") source.close();
  });
});

// A refused htmx request (4xx, 5xx) swaps nothing: say why at the top of the page.
document.addEventListener("htmx:responseError", function (event) {
  var box = document.getElementById("console-alert");
  if (!box) return;
  var page = new DOMParser().parseFromString(event.detail.xhr.responseText || "", "text/html");
  var reason = page.querySelector(".error");
  box.className = "error";
  box.textContent = reason ? reason.textContent : "The request failed (" + event.detail.xhr.status + ").";
});
