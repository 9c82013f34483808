"""The job page: what ``GET /jobs/{id}`` returns to a browser (``Accept: text/html``).

Plain HTML and a few lines of JS: it polls the same URL for the status JSON every second until
the job ends, then shows the images through ``/jobs/{id}/images/{index}``. Whatever comes from the
job (prompt, error) is set with ``textContent``, never parsed as HTML, and a nonce-based CSP
allows only this page's own script. The query string (``access_token`` when the API wants one)
is passed on to those requests; ``no-referrer`` keeps it from leaking to the storage host.
"""

from __future__ import annotations

import html
import secrets

POLL_INTERVAL_MS = 1000

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>sdqueue job %JOB_ID%</title>
<style nonce="%NONCE%">
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
  progress { width: 100%; }
  #images img { display: block; max-width: 100%; margin: 1rem 0; }
  .muted { color: #666; }
  .error { color: #b00020; }
</style>
</head>
<body>
<h1>Job <code>%JOB_ID%</code></h1>
<p><strong id="status">loading…</strong> <span id="steps" class="muted"></span></p>
<progress id="progress" max="1" value="0"></progress>
<p id="prompt" class="muted"></p>
<p id="error" class="error" hidden></p>
<div id="images"></div>
<script nonce="%NONCE%">
const ENDED = ["finished", "failed", "canceled"];
const $ = (id) => document.getElementById(id);

async function poll() {
  try {
    const response = await fetch(location.href, {headers: {Accept: "application/json"}, cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const job = await response.json();
    show(job);
    if (ENDED.includes(job.status)) return;
  } catch (err) {
    $("error").hidden = false;
    $("error").textContent = "cannot read the job (" + err.message + "), retrying";
  }
  setTimeout(poll, %INTERVAL%);
}

function show(job) {
  document.body.dataset.status = job.status;
  $("status").textContent = job.status;
  $("steps").textContent = `step ${job.progress.step} of ${job.progress.total_steps}`;
  $("progress").max = job.progress.total_steps || 1;
  $("progress").value = job.status === "finished" ? $("progress").max : job.progress.step;
  $("prompt").textContent = job.request.prompt || "";
  $("error").hidden = !job.error;
  $("error").textContent = job.error || "";
  if (job.status !== "finished" || $("images").childElementCount) return;
  for (const image of job.images) {
    const img = document.createElement("img");
    img.alt = `image ${image.index} (seed ${image.seed})`;
    img.onload = () => { img.dataset.state = "loaded"; };
    img.onerror = () => { img.dataset.state = "failed"; img.alt += " could not be loaded"; };
    img.src = `${location.pathname}/images/${image.index}${location.search}`;
    $("images").append(img);
  }
}

poll();
</script>
</body>
</html>
"""


def prefers_html(accept: str) -> bool:
    """Whether an Accept header ranks text/html above JSON: browsers do, curl and API clients don't."""
    quality: dict[str, float] = {}
    for media_range in accept.lower().split(","):
        media, *params = (part.strip() for part in media_range.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media] = max(q, quality.get(media, 0.0))
    json_q = max(quality.get(media, 0.0) for media in ("application/json", "application/*", "*/*"))
    return quality.get("text/html", 0.0) > json_q


def job_page(job_id: str) -> tuple[str, dict[str, str]]:
    """The page for JOB_ID and the headers to send with it (a fresh CSP nonce each time)."""
    nonce = secrets.token_urlsafe(16)
    body = (
        _PAGE.replace("%JOB_ID%", html.escape(job_id))
        .replace("%NONCE%", nonce)
        .replace("%INTERVAL%", str(POLL_INTERVAL_MS))
    )
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' http: https:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return body, {"Content-Security-Policy": csp, "Cache-Control": "no-store"}
