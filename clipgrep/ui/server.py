"""Running the page: load the model once, bind 127.0.0.1, print the token URL, open the browser."""
from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..bundle import Bundle


class ResidentEncoder:
    """A bundle's query encoders, loaded once and kept for every search (the CLI loads them per run).

    ``language`` is the text queries' language, as ``search --lang`` takes it; an
    unknown one fails here, before the page is served.
    """

    def __init__(self, bundle: Bundle, language: str | None = None) -> None:
        self.bundle = bundle
        self._text = bundle.text_encoder(batch_size=8, language=language)
        self._image: Any = None  # embed.onnx.ImageEncoder, made on the first dropped picture
        self._lock = threading.Lock()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._text.encode(list(texts))

    def encode_images(self, paths: Sequence[Path]) -> np.ndarray:
        with self._lock:
            if self._image is None:
                self._image = self.bundle.image_encoder()
        return self._image.encode_files(list(paths))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one. Bound before the URL is printed, so the URL works."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def serve(bundle: Bundle, snapshot_dir: Path, *, host: str, port: int, open_browser: bool,
          on_ready: Callable[[str], None], language: str | None = None) -> None:
    """Serve until interrupted. ``on_ready`` gets the one-time token URL once the socket listens."""
    import uvicorn

    from .app import LOOPBACK_NAMES, create_app

    token = secrets.token_urlsafe(32)
    allowed = (*LOOPBACK_NAMES, host) if not is_loopback(host) else LOOPBACK_NAMES
    app = create_app(ResidentEncoder(bundle, language), snapshot_dir, token, allowed_hosts=allowed)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/?token={token}"
    on_ready(url)
    if open_browser:
        import webbrowser

        threading.Timer(0.5, webbrowser.open, (url,)).start()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
