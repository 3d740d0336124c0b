"""The web page in-process (Starlette's TestClient): token flow, Host check, cookie on every route,
no paths in URLs, deleted and changed files, odd names, search/browse/paging/filters."""
from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from PIL import Image
from starlette.testclient import TestClient

from clipgrep.thumbnails import ThumbnailCache
from clipgrep.ui import cookie_name, create_app
from clipgrep.ui.library import parse_web_query

from .factories import make_contract_bundle
from .fakes import FakeImageEncoder, FakeQueryEncoder
from .test_search import indexed, make_tree  # noqa: F401  (fixture: a tree indexed under the model 'tiny')
from .ui_support import TOKEN, index_photos, make_photos, row_id

BASE = "http://127.0.0.1:8765"


@pytest.fixture
def library(tmp_path: Path) -> tuple[list[str], Path]:
    paths = make_photos(tmp_path / "photos")
    index_photos(paths, tmp_path / "snapshot")
    return paths, tmp_path / "snapshot"


@pytest.fixture
def opened(tmp_path: Path) -> list[str]:
    return []


@pytest.fixture
def anonymous(library, tmp_path: Path, opened: list[str]) -> TestClient:
    app = create_app(FakeQueryEncoder(), library[1], TOKEN, thumbnails=ThumbnailCache(tmp_path / "thumbs"),
                     reveal=opened.append, page_size=4)
    return TestClient(app, base_url=BASE, follow_redirects=False)


@pytest.fixture
def client(anonymous: TestClient) -> TestClient:
    assert anonymous.get(f"/?token={TOKEN}").status_code == 303
    return anonymous


def tile_names(html: str) -> list[str]:
    return re.findall(r'<span class="name">([^<]*)</span>', html)


# --- access ---------------------------------------------------------------------------------------

def test_token_url_sets_a_strict_httponly_cookie_and_cleans_the_url(anonymous: TestClient) -> None:
    response = anonymous.get(f"/?token={TOKEN}&q=red")
    assert response.status_code == 303 and response.headers["location"] == "/?q=red"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{cookie_name(TOKEN)}={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    page = anonymous.get("/?q=red")
    assert page.status_code == 200 and tile_names(page.text)[0] == "apple.jpg"


def test_a_wrong_token_gets_no_cookie(anonymous: TestClient) -> None:
    response = anonymous.get("/?token=guess")
    assert response.status_code == 403 and "set-cookie" not in response.headers
    assert anonymous.get("/").status_code == 403


@pytest.mark.parametrize("method, url", [
    ("GET", "/"), ("GET", "/?q=red"), ("GET", "/results?q=red"), ("GET", "/thumb/{id}"), ("GET", "/image/{id}"),
    ("GET", "/view/{id}"), ("GET", "/folders?under=/"), ("GET", "/static/htmx.min.js"), ("GET", "/static/app.js"),
    ("POST", "/upload"), ("POST", "/reveal/{id}"), ("GET", "/no/such/route"), ("GET", "/thumb/{id}?token=" + TOKEN),
])
def test_every_route_refuses_without_the_cookie(anonymous: TestClient, library, method: str, url: str) -> None:
    url = url.format(id=row_id(library[0][0]))
    response = anonymous.request(method, url, headers={"HX-Request": "true"})
    assert response.status_code == 403 and "clipgrep ui" in response.text
    assert response.headers["content-security-policy"].startswith("default-src 'none'")


def test_the_cookie_of_another_server_does_not_open_this_one(anonymous: TestClient) -> None:
    anonymous.cookies.set(cookie_name(TOKEN), "other-token")
    assert anonymous.get("/").status_code == 403


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1.evil.example", "192.168.1.5:8765"])
def test_foreign_host_headers_are_refused_even_with_the_cookie(client: TestClient, host: str) -> None:
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends its own Host."""
    assert client.get("/", headers={"Host": host}).status_code == 400


@pytest.mark.parametrize("host", ["127.0.0.1:8765", "localhost:8765", "[::1]:8765", "LOCALHOST"])
def test_loopback_host_headers_are_accepted(client: TestClient, host: str) -> None:
    assert client.get("/", headers={"Host": host}).status_code == 200


def test_security_headers_and_no_cors(client: TestClient, library) -> None:
    for url in ("/", "/results?q=red", f"/thumb/{row_id(library[0][0])}", "/static/app.css"):
        response = client.get(url, headers={"Origin": "http://evil.example"})
        assert response.status_code == 200
        h = response.headers
        assert "script-src 'self'" in h["content-security-policy"] and "unsafe" not in h["content-security-policy"]
        assert h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "no-referrer"
        assert not any(k.startswith("access-control-") for k in h)
    preflight = client.options("/upload", headers={"Origin": "http://evil.example",
                                                   "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_posts_need_the_pages_own_header(client: TestClient, library, opened: list[str]) -> None:
    """A cross-site form can POST with no custom header; htmx and the page's fetch always send one."""
    url = f"/reveal/{row_id(library[0][0])}"
    assert client.post(url).status_code == 403 and opened == []
    assert client.post(url, headers={"HX-Request": "true"}).status_code == 204
    assert opened == [os.path.dirname(library[0][0])]


# --- no paths in URLs -----------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "/thumb/../../../etc/passwd", "/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/image//etc/passwd",
    "/thumb/-1", "/thumb/12345", "/view/99999999999", "/static/../app.py", "/static/%2e%2e/app.py",
    "/static/..%2fapp.py", "/thumb/1e3",
])
def test_traversal_attempts_find_nothing(client: TestClient, url: str) -> None:
    response = client.get(url)
    assert response.status_code == 404 and b"import" not in response.content and b"root:" not in response.content


def test_thumbnails_and_large_view_serve_webp_of_indexed_rows(client: TestClient, library) -> None:
    apple = library[0][0]
    for url, longest in ((f"/thumb/{row_id(apple)}", 64), (f"/image/{row_id(apple)}", 64)):
        response = client.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
        assert "immutable" in response.headers["cache-control"]
        assert max(Image.open(io.BytesIO(response.content)).size) == longest


def test_deleted_and_changed_files_are_not_served(client: TestClient, library) -> None:
    paths = library[0]
    client.get(f"/thumb/{row_id(paths[1])}")  # cached while it was valid
    os.unlink(paths[0])
    Image.new("RGB", (64, 48), "white").save(paths[1])  # replaced after indexing: its size or mtime moved
    gone, changed = client.get(f"/thumb/{row_id(paths[0])}"), client.get(f"/thumb/{row_id(paths[1])}")
    assert gone.status_code == 404 and "deleted" in gone.text
    assert changed.status_code == 404 and "changed" in changed.text
    assert client.get(f"/image/{row_id(paths[1])}").status_code == 404


def test_odd_file_names_are_escaped_and_readable(client: TestClient, library) -> None:
    html = client.get("/?under=" + os.path.dirname(library[0][0]).replace("/red", "/odd")).text
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;.png" in html
    assert "caf\\xe9.png" in html and "new\nline.png" in html
    odd = next(p for p in library[0] if p.endswith(".png") and "caf" in p)
    assert client.get(f"/thumb/{row_id(odd)}").status_code == 200
    view = client.get(f"/view/{row_id(odd)}")
    assert view.status_code == 200 and "caf\\xe9.png" in view.text


# --- what the page shows --------------------------------------------------------------------------

def test_the_library_shows_newest_first_before_any_query(client: TestClient) -> None:
    html = client.get("/").text
    assert tile_names(html) == ["caf\\xe9.png", "new\nline.png", "&lt;img src=x onerror=alert(1)&gt;.png",
                                "sky.png"]
    assert 'hx-get="/results?offset=4"' in html and 'hx-trigger="revealed"' in html


def test_scrolling_loads_the_next_page_until_the_end(client: TestClient) -> None:
    seen = []
    url = "/results"
    while url:
        html = client.get(url, headers={"HX-Request": "true"}).text
        seen += tile_names(html)
        url = (re.findall(r'class="more" hx-get="([^"]*)"', html) or [""])[0].replace("&amp;", "&")
    assert len(seen) == 8 == len(set(seen))


def test_search_ranks_and_pushes_a_bookmarkable_url(client: TestClient) -> None:
    response = client.get("/results?q=blue&under=&t=", headers={"HX-Request": "true"})
    assert tile_names(response.text)[:2] == ["sea.jpg", "sky.png"]
    assert response.headers["hx-push-url"] == "/?q=blue"
    page = client.get("/?q=blue&t=0.8")
    assert tile_names(page.text) == ["sea.jpg", "sky.png"] and 'value="0.8"' in page.text


def test_threshold_and_folder_filter(client: TestClient, library) -> None:
    red_dir = os.path.dirname(library[0][0])
    assert tile_names(client.get("/results", params={"q": "red", "under": red_dir}).text) == ["apple.jpg", "cherry.png"]
    assert tile_names(client.get("/results", params={"q": "red", "t": "0.95"}).text) == ["apple.jpg", "cherry.png"]
    assert "No pictures match" in client.get("/results", params={"q": "red", "t": "1.5"}).text
    assert tile_names(client.get("/results", params={"under": red_dir}).text) == ["cherry.png", "apple.jpg"]


def test_folder_suggestions_come_from_the_index(client: TestClient, library) -> None:
    root = os.path.dirname(os.path.dirname(library[0][0]))
    html = client.get("/folders", params={"under": root + "/b"}).text
    assert re.findall(r'value="([^"]*)"', html) == [root + "/blue"]


def test_more_like_this_uses_the_stored_vector(library, tmp_path: Path) -> None:
    class NoModel:
        def encode_texts(self, texts):
            raise AssertionError("ran the text model")

        def encode_images(self, paths):
            raise AssertionError("decoded a file")

    client = TestClient(create_app(NoModel(), library[1], TOKEN, thumbnails=ThumbnailCache(tmp_path / "t")),
                        base_url=BASE)
    client.get(f"/?token={TOKEN}")
    sky = next(p for p in library[0] if p.endswith("sky.png"))
    html = client.get(f"/?like={row_id(sky)}").text
    assert tile_names(html)[:2] == ["sky.png", "sea.jpg"] and "similar pictures" in html


def test_a_path_typed_in_the_box_is_never_decoded(client: TestClient, tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "red").save(outside)
    html = client.get("/results", params={"q": str(outside)}).text
    assert "indexed images only" in html and tile_names(html) == []


def test_dropped_picture_searches_by_its_content(client: TestClient) -> None:
    data = io.BytesIO()
    Image.new("RGB", (30, 30), (10, 230, 20)).save(data, format="PNG")
    response = client.post("/upload", content=data.getvalue(), headers={"HX-Request": "true"})
    assert response.status_code == 200 and response.text.startswith("/?img=")
    assert tile_names(client.get(response.text).text)[0] == "leaf.jpg"
    bad = client.post("/upload", content=b"not a picture", headers={"HX-Request": "true"})
    assert bad.status_code == 422 and "cannot read" in bad.text
    too_big = client.post("/upload", content=b"\0" * 50_000_001, headers={"HX-Request": "true"})
    assert too_big.status_code == 413


def test_row_ids_survive_a_new_snapshot(client: TestClient, library, tmp_path: Path) -> None:
    paths, snapshot = library
    apple_id = row_id(paths[0])
    extra = tmp_path / "photos" / "aaa-new.jpg"
    Image.new("RGB", (64, 48), "red").save(extra)
    index_photos([str(extra), *paths], snapshot)  # clipgrep index rewrote the snapshot: rows shifted by one
    assert client.get(f"/thumb/{apple_id}").status_code == 200
    assert "aaa-new.jpg" in client.get("/?q=red").text


@pytest.mark.parametrize("q, expected", [
    ("red car", [(1.0, "red car")]),
    ("red car -rain +2:night sky", [(1.0, "red car"), (-1.0, "rain"), (2.0, "night sky")]),
    ("-0.5:cat dog", [(-0.5, "cat dog")]),
    ("t-shirt - x", [(1.0, "t-shirt - x")]),
])
def test_web_query_syntax(q: str, expected: list[tuple[float, str]]) -> None:
    assert [(t.weight, t.text) for t in parse_web_query(q)] == expected


def test_ui_without_the_extra_names_it_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from clipgrep.cli import app

    for name in [m for m in sys.modules if m.startswith(("clipgrep.ui", "starlette"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "starlette", None)
    result = CliRunner().invoke(app, ["ui", "--no-browser"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "pip install 'clipgrep[ui]'" in result.stderr


def test_clipgrep_ui_serves_the_index_on_loopback(indexed: Path) -> None:  # noqa: F811
    """The real command: model loaded once, URL with a token on stderr, 127.0.0.1 only."""
    import subprocess

    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "clipgrep", "ui", "--no-browser", "--model", "tiny"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+/\?token=\S+)", line)
        assert url, line
        with httpx.Client(follow_redirects=True) as http:
            page = http.get(url.group(1))
            assert page.status_code == 200 and str(page.url).endswith("/")
            html = http.get(str(page.url), params={"q": str(indexed / "blue.png")}).text  # its stored vector
            assert tile_names(html)[0] == "blue.png"
            assert http.get(str(page.url), params={"q": "a red bicycle"}).status_code == 200  # the real text model
        with httpx.Client() as stranger:
            assert stranger.get(str(page.url)).status_code == 403
    finally:
        proc.terminate()
        proc.wait(10)


# --- query language (--lang, as search has it) ----------------------------------------------------

def make_nllb_bundle(directory: Path) -> Path:
    """The contract bundle with an NLLB-style tokenizer.json: queries take a FLORES-200 language prefix."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from clipgrep.bundle import write_manifest

    make_contract_bundle(directory, name="nllb-tiny")
    tokenizer = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "black": 2, "cat": 3, "fra_Latnblack": 4},
                                           unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    fields = json.loads((directory / "manifest.json").read_text())
    fields = {k: v for k, v in fields.items() if k not in ("format", "files", "bundle_id")}
    fields["tokenizer"] = {"kind": "hf-tokenizers", "file": "tokenizer.json", "context_length": 8,
                           "pad_token": "<pad>", "clean": "whitespace", "language_prefix": "flores200"}
    write_manifest(directory, fields)
    return directory


def test_ui_lang_prefixes_text_queries_as_search_does(tmp_path: Path) -> None:
    from clipgrep.bundle import load_bundle
    from clipgrep.ranking import BundleQueryEncoder
    from clipgrep.ui.server import ResidentEncoder

    bundle = load_bundle(make_nllb_bundle(tmp_path / "nllb"))
    page = ResidentEncoder(bundle, "fr").encode_texts(["black cat"])
    assert np.array_equal(page, BundleQueryEncoder(bundle, "fr").encode_texts(["black cat"]))  # search --lang fr
    assert np.array_equal(page, ResidentEncoder(bundle).encode_texts(["fra_Latnblack cat"]))
    assert not np.array_equal(page, ResidentEncoder(bundle).encode_texts(["black cat"]))


def test_ui_refuses_an_unknown_lang_in_one_line_before_serving(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from clipgrep.cli import app
    from clipgrep.index.build import IndexOptions, update_index
    from clipgrep.models import add_model

    bundle = add_model("nllb-tiny", checkpoint=make_nllb_bundle(tmp_path / "nllb"))
    update_index([make_tree(tmp_path / "pics")], bundle=bundle, encoder=FakeImageEncoder(),
                 options=IndexOptions(workers=0))
    result = CliRunner().invoke(app, ["ui", "--no-browser", "--model", "nllb-tiny", "--lang", "xx"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "unknown query language 'xx'" in result.stderr
    assert "--lang" in CliRunner().invoke(app, ["ui", "--help"]).stdout
