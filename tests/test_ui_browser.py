"""The web page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

One server for the module, on a pre-bound 127.0.0.1 socket in a thread, over generated photos
and the fake encoder. Skipped only outside CI when the browser is not installed (`make test`
and .ci/run install it); in CI a missing browser fails.
"""
from __future__ import annotations

import io
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
webdriver = pytest.importorskip("selenium.webdriver")
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from clipgrep.thumbnails import ThumbnailCache
from clipgrep.ui import create_app
from clipgrep.ui.server import bind

from .fakes import FakeQueryEncoder
from .ui_support import TOKEN, index_photos, make_photos

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PAGE_SIZE = 12
SCREENSHOT = Path(os.environ.get("CLIPGREP_SCREENSHOT_DIR", "")) if os.environ.get("CLIPGREP_SCREENSHOT_DIR") else None

if not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)):
    if os.environ.get("CI"):
        raise RuntimeError("Debian's chromium and chromium-driver are missing: `make test` installs them")
    pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    import uvicorn

    root = tmp_path_factory.mktemp("browser")
    paths = make_photos(root / "photos", extra_greys=30)
    index_photos(paths, root / "snapshot")
    app = create_app(FakeQueryEncoder(), root / "snapshot", TOKEN, thumbnails=ThumbnailCache(root / "thumbs"),
                     reveal=lambda folder: None, page_size=PAGE_SIZE)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", paths
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # 480 px high: the first page (two rows of tiles) overflows it, so the "loading more" sentinel is
    # below the fold and only a scroll loads the next page (at 900 px it loaded at once, racing the test).
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,480",
                "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no Selenium Manager download
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 30):
    """Wait for ``condition``; on timeout, say where the browser was and what it showed."""
    from selenium.common.exceptions import TimeoutException

    try:
        return WebDriverWait(driver, timeout).until(lambda d: condition(d))
    except TimeoutException:
        body = driver.execute_script("return document.body ? document.body.innerText : ''")[:600]
        raise AssertionError(f"timed out at {driver.current_url}; the page showed: {body!r}; "
                             f"console: {driver.get_log('browser')}") from None


def names(driver) -> list[str]:
    """The grid's file names, read in one script (the grid may be swapped between two element reads)."""
    return driver.execute_script("return Array.from(document.querySelectorAll('a.tile .name'), e => e.textContent)")


def text(driver, css: str) -> str:
    """An element's text, read in one script (htmx may swap the element between two reads)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : ''", css)


def loaded_images(driver) -> int:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('a.tile img')).filter(i => i.complete && i.naturalWidth > 0).length")


def test_the_page_end_to_end(server, browser, tmp_path: Path) -> None:
    url, paths = server
    # The token URL is swapped for a cookie; the address bar no longer holds it.
    browser.get(f"{url}/?token={TOKEN}")
    wait(browser, lambda d: len(names(d)) == PAGE_SIZE)
    time.sleep(1)  # nothing more arrives unless the page is scrolled
    assert len(names(browser)) == PAGE_SIZE
    assert "token" not in browser.current_url
    assert names(browser)[0] == "caf\\xe9.png"  # the library, newest first, before any query

    # Scrolling loads more.
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    wait(browser, lambda d: len(names(d)) > PAGE_SIZE)

    # Typing a query shows the ranked grid and a bookmarkable address.
    box = browser.find_element(By.ID, "q")
    box.send_keys("red")
    wait(browser, lambda d: names(d)[:2] == ["apple.jpg", "cherry.png"])
    wait(browser, lambda d: d.current_url.endswith("/?q=red"))
    wait(browser, lambda d: loaded_images(d) >= 2)

    # Keyboard: down from the box to the first picture, Enter opens the large view, right goes on.
    box.send_keys(Keys.ARROW_DOWN)
    assert browser.switch_to.active_element.get_attribute("class") == "tile"
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait(browser, lambda d: d.execute_script("return document.getElementById('viewer').open"))
    wait(browser, lambda d: d.execute_script(
        "const i = document.querySelector('#viewer img'); return i && i.complete && i.naturalWidth > 0"))
    assert "apple.jpg" in text(browser, "#viewer .path")
    shot(browser, tmp_path, "large-view")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    wait(browser, lambda d: "cherry.png" in text(d, "#viewer .path"))

    # The large view's buttons do not move when its picture loads (a click aimed at them before
    # the load would otherwise land elsewhere): the same place with the picture as without.
    where = "const r = document.getElementById('more-like').getBoundingClientRect(); return [r.x, r.y];"
    wait(browser, lambda d: d.execute_script(
        "const i = document.querySelector('#viewer img'); return i && i.complete && i.naturalWidth > 0"))
    loaded = browser.execute_script(where)
    browser.execute_script("document.querySelector('#viewer img').removeAttribute('src')")
    assert browser.execute_script(where) == loaded

    # More like this: a search by the picture's stored vector.
    browser.find_element(By.ID, "more-like").click()
    wait(browser, lambda d: "like=" in d.current_url and names(d) and names(d)[0] == "cherry.png")

    # Folder filter and threshold, from the form's own inputs.
    browser.get(f"{url}/?q=blue")
    wait(browser, lambda d: names(d)[:2] == ["sea.jpg", "sky.png"])
    folder = os.path.dirname(next(p for p in paths if p.endswith("sky.png")))
    browser.find_element(By.ID, "under").send_keys(folder)
    wait(browser, lambda d: names(d) == ["sea.jpg", "sky.png"])
    assert "under=" in browser.current_url
    browser.execute_script("const t = document.getElementById('t'); t.value = '0.9';"
                           "t.dispatchEvent(new Event('input', {bubbles: true}));")
    wait(browser, lambda d: names(d) == ["sea.jpg"])
    assert "t=0.9" in browser.current_url

    # The page as a person sees it: not blank, thumbnails drawn.
    browser.get(f"{url}/?q=red")
    wait(browser, lambda d: loaded_images(d) >= PAGE_SIZE)
    image = shot(browser, tmp_path, "search")
    colours = image.convert("RGB").getcolors(1 << 20) or []
    assert len(colours) > 50
    red_pixels = sum(n for n, (r, g, b) in colours if r > 180 and g < 60 and b < 60)
    assert red_pixels > 5000  # the red thumbnails are drawn, not just the page chrome

    # No Content-Security-Policy violations or script errors along the way.
    problems = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert problems == []


def shot(browser, tmp_path: Path, name: str) -> Image.Image:
    png = browser.get_screenshot_as_png()
    for directory in (tmp_path, SCREENSHOT):
        if directory:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"{name}.png").write_bytes(png)
    return Image.open(io.BytesIO(png))
