"""The web page as a Starlette app: ``create_app(encoder, snapshot_dir, token)``; tests mount it in-process.

Security, for a server of someone's private photos (README, "Seeing what you found"):
every request must carry the page's cookie (set from the one-time ``?token=`` URL, then the
URL is cleaned by a redirect); the Host header must be a loopback name (DNS rebinding);
URLs carry index row ids, never paths; POSTs also need htmx's custom header, which a
cross-site page cannot send without a CORS preflight that this server never grants.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request as HttpRequest
from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ClipgrepError
from ..ranking import is_url
from ..render import human_bytes
from ..thumbnails import GRID_SIDE, StaleFile, ThumbnailCache
from .library import PAGE, Library, Request, Tile

if TYPE_CHECKING:
    from ..ranking import QueryEncoder

HERE = Path(__file__).parent
LARGE_SIDE = 1600
MAX_UPLOAD = 50_000_000
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
CSP = ("default-src 'none'; img-src 'self' blob:; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-resource-policy": "same-origin",
}


def create_app(encoder: QueryEncoder, snapshot_dir: Path, token: str, *, thumbnails: ThumbnailCache | None = None,
               allowed_hosts: Sequence[str] = LOOPBACK_NAMES,
               reveal: Callable[[str], None] | None = None, page_size: int = PAGE) -> ASGIApp:
    """The page for the index snapshot in ``snapshot_dir``, searched with ``encoder``."""
    library = Library(snapshot_dir, encoder)
    cache = thumbnails or ThumbnailCache()
    templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True))
    templates.filters["human_bytes"] = human_bytes
    templates.filters["date"] = lambda ns: time.strftime("%Y-%m-%d %H:%M", time.localtime(ns / 1e9))
    open_folder = reveal or _reveal_in_file_manager

    def render(name: str, **context: Any) -> str:
        return templates.get_template(name).render(**context)

    def grid(request: Request) -> str:
        """One page of tiles (with the trigger that loads the next), or the message of a failed query."""
        try:
            tiles = library.page(request, page_size)
        except ClipgrepError as e:
            return render("grid.html", tiles=[], error=e.message, hint=e.hint)
        more = _page_url("/results", request, offset=request.offset + page_size) if len(tiles) == page_size else ""
        return render("grid.html", tiles=tiles, next_url=more, first=request.offset == 0, request=request)

    def page(http: HttpRequest) -> Response:
        request = _parse(http)
        return HTMLResponse(render("page.html", request=request, grid=grid(request)),
                            headers={"cache-control": "no-store"})

    def results(http: HttpRequest) -> Response:
        request = _parse(http)
        headers = {"cache-control": "no-store"}
        if request.offset == 0:  # the address bar follows the search box: every search is bookmarkable
            headers["hx-push-url"] = _page_url("/", request)
        return HTMLResponse(grid(request), headers=headers)

    def indexed(http: HttpRequest) -> Tile | None:
        return library.tile(int(http.path_params["row_id"]))

    def picture(http: HttpRequest, side: int) -> Response:
        tile = indexed(http)
        if tile is None:
            return _not_in_index()
        if is_url(tile.path):  # imported (index --from-embeddings): the picture lives elsewhere
            return PlainTextResponse("not a local file: its picture is not on this machine", status_code=404)
        try:
            data = cache.webp(tile.path, side, expect=(tile.size, tile.mtime_ns))
        except FileNotFoundError:
            return PlainTextResponse("the file was deleted since it was indexed", status_code=404)
        except StaleFile:
            return PlainTextResponse("the file changed since it was indexed; run clipgrep index", status_code=404)
        except Exception:  # noqa: BLE001  (unreadable or undecodable now: no picture, the page goes on)
            return PlainTextResponse("the file cannot be read", status_code=404)
        return Response(data, media_type="image/webp",
                        headers={"cache-control": "private, max-age=31536000, immutable"})

    def view(http: HttpRequest) -> Response:
        tile = indexed(http)
        if tile is None:
            return _not_in_index()
        return HTMLResponse(render("view.html", tile=tile), headers={"cache-control": "no-store"})

    def folders(http: HttpRequest) -> Response:
        prefix = http.query_params.get("under", "")
        names = [os.fsencode(f).decode("utf-8", "backslashreplace") for f in library.folders(prefix)]
        return HTMLResponse(render("folders.html", folders=names))

    async def upload(http: HttpRequest) -> Response:
        chunks, size = [], 0
        async for chunk in http.stream():  # stop reading at the limit rather than buffer any size
            size += len(chunk)
            if size > MAX_UPLOAD:
                return PlainTextResponse("send one picture of at most 50 MB", status_code=413)
            chunks.append(chunk)
        data = b"".join(chunks)
        if not data:
            return PlainTextResponse("send one picture of at most 50 MB", status_code=413)
        from starlette.concurrency import run_in_threadpool

        try:
            upload_id = await run_in_threadpool(library.add_upload, data)
        except ClipgrepError as e:
            return PlainTextResponse(e.message, status_code=422)
        return PlainTextResponse(_page_url("/", Request(upload=upload_id)))

    def reveal_folder(http: HttpRequest) -> Response:
        tile = indexed(http)
        if tile is None:
            return _not_in_index()
        if is_url(tile.path):
            return PlainTextResponse("not a local file: it has no folder here", status_code=404)
        open_folder(os.path.dirname(tile.path))
        return Response(status_code=204)

    routes = [
        Route("/", page),
        Route("/results", results),
        Route("/thumb/{row_id:int}", lambda http: picture(http, GRID_SIDE)),
        Route("/image/{row_id:int}", lambda http: picture(http, LARGE_SIDE)),
        Route("/view/{row_id:int}", view),
        Route("/folders", folders),
        Route("/upload", upload, methods=["POST"]),
        Route("/reveal/{row_id:int}", reveal_folder, methods=["POST"]),
        Route("/favicon.ico", lambda http: Response(status_code=204)),  # browsers ask; none is needed
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Guard(Starlette(routes=routes), token, allowed_hosts)


def cookie_name(token: str) -> str:
    """Per server: two pages on different ports of 127.0.0.1 share cookies, so names must differ."""
    return "clipgrep_" + hashlib.sha256(token.encode()).hexdigest()[:12]


class Guard:
    """Host check, token-to-cookie exchange, the cookie on every request, security headers on every response."""

    def __init__(self, app: ASGIApp, token: str, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.token = token
        self.cookie = cookie_name(token)
        self.allowed_hosts = {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        response: Response | None = None
        if _host_name(headers.get("host", "")) not in self.allowed_hosts:
            response = PlainTextResponse("unexpected Host header", status_code=400)
        else:
            http = HttpRequest(scope)
            given = http.query_params.get("token")
            if scope["path"] == "/" and given is not None and hmac.compare_digest(given.encode(), self.token.encode()):
                # Swap the token for a cookie and drop it from the address bar, history and Referer.
                rest = [(k, v) for k, v in http.query_params.multi_items() if k != "token"]
                response = RedirectResponse("/" + ("?" + urlencode(rest) if rest else ""), status_code=303)
                response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict", path="/")
            elif not hmac.compare_digest(cookie_parser(headers.get("cookie", "")).get(self.cookie, "").encode(),
                                         self.token.encode()):
                response = PlainTextResponse("open the address that `clipgrep ui` printed (it holds the access "
                                             "token)", status_code=403)
            elif scope["method"] not in ("GET", "HEAD") and headers.get("hx-request") != "true":
                response = PlainTextResponse("requests that change something must come from the page",
                                             status_code=403)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    out[key] = value
            await send(message)

        await (response or self.app)(scope, receive, send_with_headers)


def _host_name(host: str) -> str:
    """The Host header without its port: "127.0.0.1:8080" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _parse(http: HttpRequest) -> Request:
    params = http.query_params

    def number(name: str, kind: Callable[[str], Any]) -> Any:
        try:
            return kind(params[name]) if params.get(name, "").strip() else None
        except ValueError:
            return None

    threshold = number("t", float)
    return Request(q=params.get("q", ""), like=number("like", int), upload=params.get("img") or None,
                   under=params.get("under", ""), threshold=threshold if threshold else None,
                   offset=max(0, number("offset", int) or 0))


def _page_url(path: str, request: Request, offset: int = 0) -> str:
    fields = {"q": request.q, "like": request.like, "img": request.upload, "under": request.under,
              "t": f"{request.threshold:g}" if request.threshold else None, "offset": offset or None}
    query = urlencode({k: v for k, v in fields.items() if v not in (None, "")})
    return path + ("?" + query if query else "")


def _reveal_in_file_manager(folder: str) -> None:
    opener = {"darwin": ["open"], "win32": ["explorer"]}.get(sys.platform, ["xdg-open"])
    try:
        subprocess.Popen([*opener, folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        pass



def _not_in_index() -> Response:
    return PlainTextResponse("not in the index (it was removed or re-indexed)", status_code=404)
