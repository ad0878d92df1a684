// The page's own behaviour, beside htmx (a file, not inline: the Content-Security-Policy allows no
// inline script): empty the chat box after a message is sent, keep the newest reply in view, and
// clear an old notice when a request succeeds.
document.addEventListener("htmx:afterRequest", function (event) {
  var form = event.detail.elt;
  if (!event.detail.successful) return;
  var notice = document.getElementById("notice");
  if (notice) notice.innerHTML = "";
  if (form.id === "chat-form") {
    form.reset();
    document.getElementById("chat-text").focus();
  }
});
document.addEventListener("htmx:afterSwap", function (event) {
  if (event.detail.target.id === "log") {
    var log = event.detail.target;
    log.scrollTop = log.scrollHeight;
  }
});
