// Tokenmill: small behaviours htmx does not cover. No build step.
document.addEventListener("htmx:responseError", function (event) {
  // A failed poll must not blank the page: keep what is shown and say so.
  const target = event.detail.target;
  if (target) target.setAttribute("data-stale", "true");
});
