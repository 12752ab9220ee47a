"""A local stand-in for the Hugging Face Hub's write API, on 127.0.0.1 (a random port), for the push tests.

It answers what ``huggingface_hub`` calls for ``create_repo``, ``create_branch``, ``repo_info`` and
``upload_folder``: ``POST /api/repos/create``, ``POST /api/models/<repo>/branch/<branch>``, ``GET
/api/models/<repo>``, ``POST /api/models/<repo>/preupload/<rev>`` (``.safetensors`` files are ``lfs``, the rest
``regular``), the git-LFS batch API ``POST /<repo>.git/info/lfs/objects/batch`` (``basic`` transfer: a ``PUT``
to this server) and ``POST /api/models/<repo>/commit/<rev>`` (NDJSON); ``POST /api/validate-yaml`` parses the
card's metadata with ``huggingface_hub.ModelCard``. It records the requests, the repos
created, and every commit's files (regular files decoded from base64, LFS files from their PUT), so tests assert
what the real client sent. ``fail`` makes one endpoint answer an HTTP error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeHub:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.repos: dict[str, dict[str, Any]] = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.commits: list[dict[str, Any]] = []
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.tokens: list[str | None] = []
        self.cards: list[str] = []  # the README.md contents sent to /api/validate-yaml
        self.fail: dict[str, int] = {}  # endpoint name (create, preupload, commit, batch, info) -> HTTP status
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, name: str) -> bool:
                status = hub.fail.get(name)
                if status is None:
                    return False
                self._send(status, {"error": f"fake hub: {name} answers {status}"}, {"X-Error-Message": "no"})
                return True

            def do_GET(self) -> None:  # noqa: N802
                hub.requests.append(("GET", self.path))
                match = re.fullmatch(r"/api/models/([^/]+/[^/?]+)(?:/revision/[^?]+)?(?:\?.*)?", self.path)
                if match and not self._error("info"):
                    repo = match.group(1)
                    if repo in hub.repos:
                        self._send(200, {"id": repo, "modelId": repo, "sha": "0" * 40, "private": False})
                    else:
                        self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                elif not match:
                    self._send(404, {"error": f"fake hub: no GET {self.path}"})

            def do_PUT(self) -> None:  # noqa: N802
                hub.requests.append(("PUT", self.path))
                body = self._body()
                match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
                if not match or hashlib.sha256(body).hexdigest() != match.group(1):
                    self._send(400, {"error": "bad LFS upload"})
                    return
                hub.lfs[match.group(1)] = body
                self._send(200, {})

            def do_POST(self) -> None:  # noqa: N802
                hub.requests.append(("POST", self.path))
                hub.tokens.append(self.headers.get("Authorization"))
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/validate-yaml":  # upload_folder has the Hub check a README.md's metadata first
                    from huggingface_hub import ModelCard

                    content = json.loads(body)["content"]
                    hub.cards.append(content)
                    try:
                        ModelCard(content)
                    except ValueError as err:
                        self._send(400, {"errors": [{"message": str(err)}]})
                        return
                    self._send(200, {"errors": [], "warnings": []})
                    return
                if path == "/api/repos/create":
                    if self._error("create"):
                        return
                    payload = json.loads(body)
                    repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else None
                    repo = repo or payload["name"]
                    if repo in hub.repos:
                        self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
                        return
                    private = bool(payload.get("private")) or payload.get("visibility") == "private"
                    hub.repos[repo] = {"private": private, "branches": {"main": {}}}
                    self._send(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})
                    return
                if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path):
                    repo, branch = match.groups()
                    branches = hub.repos[repo]["branches"]
                    if branch in branches:
                        self._send(409, {"error": "Reference already exists"})
                        return
                    branches[branch] = dict(branches["main"])
                    self._send(200, {})
                    return
                if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
                    if self._error("preupload"):
                        return
                    files = json.loads(body)["files"]
                    modes = [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                            "shouldIgnore": False,
                        }
                        for f in files
                    ]
                    self._send(200, {"files": modes, "commitOid": "0" * 40})
                    return
                if match := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
                    if self._error("batch"):
                        return
                    payload = json.loads(body)
                    objects = [
                        {
                            "oid": o["oid"],
                            "size": o["size"],
                            "authenticated": True,
                            "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}},
                        }
                        for o in payload["objects"]
                    ]
                    self._send(200, {"transfer": "basic", "objects": objects})
                    return
                if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
                    if self._error("commit"):
                        return
                    repo, revision = match.groups()
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(item["value"] for item in lines if item["key"] == "header")
                    files: dict[str, bytes] = {}
                    for item in lines:
                        if item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "lfsFile":
                            oid = item["value"]["oid"]
                            if oid not in hub.lfs:
                                self._send(422, {"error": f"LFS object {oid} was never uploaded"})
                                return
                            files[item["value"]["path"]] = hub.lfs[oid]
                    revision = revision.replace("%2F", "/")
                    hub.repos[repo]["branches"].setdefault(revision, {}).update(files)
                    hub.commits.append(
                        {"repo": repo, "revision": revision, "message": header["summary"], "files": files}
                    )
                    oid = hashlib.sha1(body).hexdigest()
                    self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})
                    return
                self._send(404, {"error": f"fake hub: no POST {path}"})

        return Handler
