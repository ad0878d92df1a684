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

// A running retrain: the server pushes its status on every change (server-sent events) and the
// panel is re-fetched, rendered by the server, on each push. The stream ends with the run's final
// status; should it fail before that (a proxy that buffers, a dropped connection), the panel is
// polled every 2 s instead for the rest of the page's life.
var retrainStream = null, retrainPolling = false, retrainTimer = null;
function refreshRetrain() {
  htmx.ajax("GET", "/ui/retrain", {target: "#retrain", swap: "outerHTML"});
}
function followRetrain() {
  var panel = document.getElementById("retrain");
  if (!panel || panel.dataset.state !== "running") return;
  if (retrainPolling) {
    if (!retrainTimer) retrainTimer = setTimeout(function () { retrainTimer = null; refreshRetrain(); }, 2000);
    return;
  }
  if (retrainStream) return;
  var stream = retrainStream = new EventSource("/api/retrain/events");
  stream.onmessage = function (event) {
    if (JSON.parse(event.data).state !== "running") {  // the last one: no reconnecting after it
      stream.close();
      retrainStream = null;
    }
    refreshRetrain();
  };
  stream.onerror = function () {
    stream.close();
    retrainStream = null;
    retrainPolling = true;
    refreshRetrain();
  };
}
document.addEventListener("DOMContentLoaded", followRetrain);
document.addEventListener("htmx:afterSettle", followRetrain);  // whatever swapped in a running panel
