"""A local stand-in for the part of the Hugging Face Hub's HTTP API that huggingface_hub's
snapshot_download uses (repo info, the recursive tree, `resolve/<revision>/<file>` with HEAD for
metadata), with the Hub's error codes for a gated repo, an unknown repo and an unknown revision.

Test modules import it as `fake_hub`. Every request is recorded, so a test can assert what was
fetched.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_API = re.compile(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False

    @classmethod
    def from_dir(cls, root: Path, **extra: bytes) -> FakeRepo:
        """A repository holding every file under `root` (paths relative to it) and `extra`."""
        files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return cls({**files, **extra})


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    server: ThreadingHTTPServer | None = None
    endpoint: str = ""  # its URL (HF_ENDPOINT) once started
    missing_status: int = 401  # the Hub's answer to an unknown repo without a token (404 with)

    def start(self) -> str:
        """Serves on 127.0.0.1 from a thread; returns the endpoint."""
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self.endpoint

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def answer(self, method: str, path: str) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers) for one request."""
        self.requests.append((method, path))
        api, resolve = _API.fullmatch(path), _RESOLVE.fullmatch(path)
        match = api or resolve
        repo = self.repos.get(match[1]) if match else None
        if repo is None:
            return _error(self.missing_status, "RepoNotFound", "Repository not found")
        revision = (api[3] or "main") if api else resolve[2]
        if revision not in ("main", repo.commit):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if repo.gated:
            return _error(403, "GatedRepo", "Access to this model is restricted")
        if api and api[2] != "tree":
            siblings = [{"rfilename": name} for name in repo.files]
            info = {"id": match[1], "sha": repo.commit, "siblings": siblings}
            return 200, json.dumps(info).encode(), {"Content-Type": "application/json"}
        if api:
            tree = [
                {"type": "file", "path": name, "size": len(data), "oid": _sha1(data)}
                for name, data in repo.files.items()
            ]
            return 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}
        data = repo.files.get(resolve[3])
        if data is None:
            return _error(404, "EntryNotFound", "Entry not found")
        etag = '"' + hashlib.sha256(data).hexdigest() + '"'
        return 200, data, {"X-Repo-Commit": repo.commit, "ETag": etag}


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _error(status: int, code: str, message: str) -> tuple[int, bytes, dict[str, str]]:
    body = json.dumps({"error": message}).encode()
    return status, body, {"X-Error-Code": code, "X-Error-Message": message}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._reply(with_body=False)

        def do_GET(self) -> None:
            self._reply(with_body=True)

        def _reply(self, with_body: bool) -> None:
            status, body, headers = hub.answer(self.command, unquote(urlsplit(self.path).path))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if with_body:
                self.wfile.write(body)

    return Handler
