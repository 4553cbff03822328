"""A local HTTP server answering the Hugging Face Hub requests that `huggingface_hub` makes to list and download a
model repository, so the real client (sizes, allow-patterns, cache, progress bars) runs against it offline.

Endpoints (as the Hub serves them): `GET /api/models/{repo}[/revision/{rev}]` (repo info, file sizes with
`?blobs=true`), `POST /api/models/{repo}/paths-info/{rev}`, `HEAD|GET /{repo}/resolve/{rev}/{path}`.
Every file asked for (HEAD or GET) is recorded in `requested`, every body sent in `downloads`; a file declared
only by its size is listed with that size but never sent (a request for it gets an error).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class FakeRepo:
    files: dict[str, Path | int]  # repository path -> file to serve, or a declared size (never to be downloaded)
    commit: str = "c" * 40
    license: str | None = None

    def size(self, name: str) -> int:
        content = self.files[name]
        return content if isinstance(content, int) else content.stat().st_size

    def body(self, name: str) -> bytes | None:
        content = self.files[name]
        return None if isinstance(content, int) else content.read_bytes()


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    requested: list[str] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)
    url: str = ""


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _json(self, payload, status: int = 200) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _missing(self, what: str, code: str) -> None:
            data = json.dumps({"error": what}).encode()
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", what)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> tuple[str, str, FakeRepo | None, list[str], dict]:
            url = urlparse(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            api = parts[:2] == ["api", "models"]
            repo_parts = parts[2:4] if api else parts[:2]
            rest = parts[4:] if api else parts[2:]
            repo_id = "/".join(repo_parts)
            return ("api" if api else "file"), repo_id, hub.repos.get(repo_id), rest, parse_qs(url.query)

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def _serve(self, head: bool) -> None:
            kind, repo_id, repo, rest, query = self._route()
            if repo is None:
                return self._missing("Repository not found", "RepoNotFound")
            if kind == "api":  # repo info: /api/models/{repo} or /api/models/{repo}/revision/{rev}
                blobs = query.get("blobs", ["false"])[0].lower() == "true"
                siblings = [{"rfilename": n, **({"size": repo.size(n)} if blobs else {})} for n in sorted(repo.files)]
                return self._json({"id": repo_id, "sha": repo.commit,
                                   "siblings": siblings, "cardData": {"license": repo.license}})
            # /{repo}/resolve/{rev}/{path}
            name = "/".join(rest[2:])
            if rest[:1] != ["resolve"] or name not in repo.files:
                return self._missing("Entry not found", "EntryNotFound")
            hub.requested.append(name)
            body = repo.body(name)
            if body is None:
                return self._missing("Declared for listing only", "EntryNotFound")
            self.send_response(200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", '"' + hashlib.sha256(f"{repo.commit}/{name}".encode()).hexdigest() + '"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                hub.downloads.append(name)
                self.wfile.write(body)

        def do_POST(self) -> None:  # /api/models/{repo}/paths-info/{rev}
            kind, _, repo, rest, _ = self._route()
            length = int(self.headers.get("Content-Length", 0))
            form = parse_qs(self.rfile.read(length).decode())
            if repo is None or kind != "api" or rest[:1] != ["paths-info"]:
                return self._missing("Repository not found", "RepoNotFound")
            paths = [p for p in form.get("paths", []) if p in repo.files]
            return self._json([{"type": "file", "path": p, "size": repo.size(p), "oid": "0" * 40} for p in paths])

    return Handler


@contextmanager
def serve_hub(repos: dict[str, FakeRepo]) -> Iterator[FakeHub]:
    hub = FakeHub(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
