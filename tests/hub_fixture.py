"""A tiny stand-in for the Hugging Face hub on 127.0.0.1, serving one repo from a local directory.

It answers what ``huggingface_hub`` asks for a model download: the repo info
(``/api/models/REPO[/revision/REV]``), the file tree (``/api/models/REPO/tree/REV``)
and file resolution (``HEAD``/``GET /REPO/resolve/REV/PATH`` with the hub's
``X-Repo-Commit``/``ETag``/``X-Linked-Etag`` headers and ``Range`` support).
Files over ``LFS_MIN`` bytes are announced as LFS files (sha256), the others by
git blob id, as the hub does. Knobs make it misbehave: cut a transfer short
once, serve altered bytes, or leave a file out.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_MIN = 1000


@dataclass
class FakeHub:
    repo: str
    root: Path
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the first GET is cut
    corrupt: set[str] = field(default_factory=set)  # paths whose served bytes differ from the announced hash
    hidden: set[str] = field(default_factory=set)  # paths left out of the repo
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    url: str = ""

    def files(self) -> dict[str, bytes]:
        out = {}
        for p in sorted(self.root.rglob("*")):
            name = p.relative_to(self.root).as_posix()
            if p.is_file() and name not in self.hidden:
                out[name] = p.read_bytes()
        return out

    def entry(self, name: str, data: bytes) -> dict[str, Any]:
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        item: dict[str, Any] = {"size": len(data), "blob": blob}
        if len(data) >= LFS_MIN:
            item["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return item

    def served(self, name: str, data: bytes) -> bytes:
        return bytes([data[0] ^ 1]) + data[1:] if name in self.corrupt else data


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _not_found(self, kind: str = "EntryNotFound") -> None:
            body = b'{"error": "not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            self._resolve(head=True)

        def do_GET(self) -> None:
            path = unquote(urlparse(self.path).path)
            api = f"/api/models/{hub.repo}"
            if path.startswith(api + "/tree/"):
                files = hub.files()
                self._json([{"type": "file", "path": n, "size": len(d), "oid": hub.entry(n, d)["blob"],
                             **({"lfs": {"oid": e["lfs"]["sha256"], "size": e["lfs"]["size"], "pointerSize": 134}}
                                if "lfs" in (e := hub.entry(n, d)) else {})}
                            for n, d in files.items()])
            elif path == api or path.startswith(api + "/revision/"):
                self._json({"id": hub.repo, "sha": COMMIT, "siblings": [
                    {"rfilename": n, "size": len(d), "blobId": hub.entry(n, d)["blob"],
                     **({"lfs": hub.entry(n, d)["lfs"]} if "lfs" in hub.entry(n, d) else {})}
                    for n, d in hub.files().items()]})
            elif path.startswith("/api/"):
                self._not_found("RepoNotFound")
            else:
                self._resolve(head=False)

        def _resolve(self, *, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            prefix = f"/{hub.repo}/resolve/"
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if not path.startswith(prefix):
                return self._not_found("RepoNotFound")
            name = path[len(prefix):].split("/", 1)[1]
            files = hub.files()
            if name not in files:
                return self._not_found()
            data = files[name]
            entry = hub.entry(name, data)
            body = hub.served(name, data)
            start = 0
            if self.headers.get("Range"):
                start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{entry["blob"]}"')
            if "lfs" in entry:
                self.send_header("X-Linked-Etag", f'"{entry["lfs"]["sha256"]}"')
                self.send_header("X-Linked-Size", str(len(data)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if head:
                return None
            cut = hub.drop_after.pop(name, None) if not start else None
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return None
            self.wfile.write(body[start:])
            return None

    return Handler


class running:
    """Context manager: serve ``hub`` on a free port of 127.0.0.1 and set ``hub.url``."""

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))

    def __enter__(self) -> FakeHub:
        self.hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.hub

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
