// Tokenmill: small behaviours htmx does not cover. No build step.
(function () {
  "use strict";

  // Every element with data-plotly="<id>" is drawn from the JSON in <script id="<id>">.
  function renderCharts(root) {
    if (!window.Plotly) return;
    root.querySelectorAll("[data-plotly]").forEach(function (el) {
      const source = document.getElementById(el.dataset.plotly);
      if (!source) return;
      const figure = JSON.parse(source.textContent);
      window.Plotly.react(el, figure.data, figure.layout, { responsive: true, displaylogo: false });
    });
  }

  document.addEventListener("DOMContentLoaded", function () { renderCharts(document); });
  document.addEventListener("htmx:afterSettle", function (event) { renderCharts(event.detail.elt); });
  document.addEventListener("htmx:responseError", function (event) {
    // A failed poll must not blank the page: keep what is shown and mark it stale.
    const target = event.detail.target;
    if (target) target.setAttribute("data-stale", "true");
  });
})();
