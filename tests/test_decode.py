"""Decoding image files in worker processes: every bad file becomes a skip reason, nothing hangs."""
from __future__ import annotations

import errno
import functools
import importlib.util
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipgrep.embed.preprocess import PreprocessConfig, load_image
from clipgrep.errors import ClipgrepError
from clipgrep.index import decode
from clipgrep.index.decode import (
    CORRUPT,
    CRASHED,
    NEEDS_HEIF,
    Decoded,
    DecodeLimits,
    classify_error,
    decode_file,
    decode_images,
    map_ordered,
)

from .hostile import (
    fake_ghostscript,
    path_with,
    write_blank_png,
    write_eps,
    write_svg,
    write_undecodable_tiff,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CFG = PreprocessConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                       interpolation="bicubic", resize_mode="shortest")
# Low enough that the "bomb" and "large" images below are cheap to make, high enough for every good one.
LIMITS = DecodeLimits(max_pixels=1_000_000, max_decoded_pixels=250_000)
HAS_HEIF = importlib.util.find_spec("pillow_heif") is not None


# --- test images -------------------------------------------------------------------------------


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = [np.sin(xx / (7 + c) + yy / (11 + c) + c) * 90 + 128 for c in range(3)]
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.stack(waves, -1) + noise, 0, 255).astype(np.uint8))


def _write_images(d: Path) -> dict[str, str | None]:
    """Every file class decode_images must handle, and the skip reason each must get (None: decodes)."""
    photo = _photo(160, 128)  # large enough for a 1/2-scale JPEG draft at size 32
    photo.save(d / "good.jpg", quality=90)
    photo.save(d / "good.png")
    photo.save(d / "png_named.jpg", format="PNG")  # mislabelled: PIL sniffs the content
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("not a picture\n")
    for name in ("good.jpg", "good.png"):
        data = (d / name).read_bytes()
        (d / f"truncated{Path(name).suffix}").write_bytes(data[: len(data) // 2])
    Image.new("1", (1200, 1000)).save(d / "bomb.png")  # 1.2 MP > LIMITS' 1 MP; a few hundred bytes
    Image.new("1", (600, 600)).save(d / "large.png")  # 0.36 MP: under the header limit, over the decode one
    write_eps(d / "holiday.jpg")  # Pillow would run Ghostscript on it
    write_undecodable_tiff(d / "multipage.tif")
    write_svg(d / "drawing.png")
    red, blue = Image.new("RGB", (48, 40), (255, 0, 0)), Image.new("RGB", (48, 40), (0, 0, 255))
    red.save(d / "animated.gif", save_all=True, append_images=[blue], duration=100, loop=0)
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(d / "sixteen_bit.png")
    photo.convert("CMYK").save(d / "cmyk.jpg")
    _rotated_jpeg(d / "rotated.jpg")
    palette = Image.new("P", (40, 30))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] * 85 + [0, 0, 0])
    palette.save(d / "palette_alpha.png", transparency=bytes([0, 128, 255]))  # PIL warns on convert
    Image.new("RGB", (40, 30), (10, 200, 30)).save(  # EXIF whose IFD runs past its end
        d / "corrupt_exif.jpg", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x0f\x01")
    # "gone.jpg" is never written: a file deleted between the scan and its decoding.
    (d / "folder.jpg").mkdir()
    os.mkfifo(d / "fifo.jpg")  # opening it for reading would block forever without O_NONBLOCK
    expected: dict[str, str | None] = {
        "good.jpg": None, "good.png": None, "png_named.jpg": None, "empty.jpg": "empty file",
        "text.jpg": "not an image", "truncated.jpg": CORRUPT, "truncated.png": CORRUPT,
        "bomb.png": "too many pixels (1.2 MP > 1 MP)", "animated.gif": None, "sixteen_bit.png": None,
        "large.png": "too many pixels to decode (0.36 MP > 0.25 MP)",
        "holiday.jpg": "unsupported image format (EPS)",
        "multipage.tif": "unsupported image format (a TIFF variant Pillow cannot open)",
        "drawing.png": "not an image",
        "cmyk.jpg": None, "rotated.jpg": None, "palette_alpha.png": None, "corrupt_exif.jpg": None,
        "gone.jpg": "vanished during indexing", "folder.jpg": "not a regular file",
        "fifo.jpg": "not a regular file",
    }
    expected["photo.heic"] = _heic(d / "photo.heic", photo)
    return expected


def _rotated_jpeg(path: Path) -> None:
    """Stored 64x32 with the left half red; EXIF orientation 6 shows it turned 90° clockwise."""
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = (255, 0, 0)
    a[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, quality=95, exif=exif)


def _heic(path: Path, photo: Image.Image) -> str | None:
    if HAS_HEIF:
        from pillow_heif import register_heif_opener

        register_heif_opener()
        photo.save(path, format="HEIF", quality=90)
        return None
    # Without pillow-heif nothing can write one; the brand is all decode_file looks at.
    path.write_bytes(struct.pack(">I", 24) + b"ftypheic" + bytes(4) + b"mif1heic" + bytes(64))
    return NEEDS_HEIF


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    d = tmp_path_factory.mktemp("images")
    return d, _write_images(d)


def _outcomes(results: list[Decoded]) -> list[tuple[int, str | None]]:
    return [(r.index, r.skip_reason) for r in results]


def _same_pixels(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is b is None or (a is not None and b is not None and np.array_equal(a, b))


def _decoded(path: Path) -> np.ndarray:
    """decode_file's pixels for a file that must decode."""
    pixels, reason = decode_file(str(path), CFG)
    assert reason is None and pixels is not None, reason
    return pixels


# --- every bad-input class ---------------------------------------------------------------------


def test_each_file_class_in_process(images: tuple[Path, dict[str, str | None]]) -> None:
    d, expected = images
    names = sorted(expected)
    results = list(decode_images([str(d / n) for n in names], CFG, workers=0, limits=LIMITS))
    assert {n: r.skip_reason for n, r in zip(names, results)} == expected
    for name, result in zip(names, results):
        assert (result.pixels is None) == (expected[name] is not None), name


def test_mixed_batch_in_two_workers_matches_in_process(images: tuple[Path, dict[str, str | None]]) -> None:
    d, expected = images
    paths = [str(d / n) for n in sorted(expected)] * 2  # repeats: results must come back in order
    pooled = list(decode_images(paths, CFG, workers=2, lookahead=5, limits=LIMITS))
    local = list(decode_images(paths, CFG, workers=0, limits=LIMITS))
    assert _outcomes(pooled) == _outcomes(local) == [
        (i, expected[Path(p).name]) for i, p in enumerate(paths)]
    for a, b in zip(pooled, local):
        assert _same_pixels(a.pixels, b.pixels)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_bytes_from_an_object_store_decode_as_the_file_does(images: tuple[Path, dict[str, str | None]]) -> None:
    d, expected = images
    regular = [n for n in sorted(expected) if (d / n).is_file() and not (d / n).is_symlink()]
    assert len(regular) > 5
    for name in regular:
        try:
            data = (d / name).read_bytes()
        except OSError:
            continue  # unreadable: a file-system reason, not the bytes'
        from_file = decode.decode_file(str(d / name), CFG, limits=LIMITS)
        from_bytes = decode.decode_bytes(data, CFG, limits=LIMITS)
        assert from_bytes[1] == from_file[1], name
        assert _same_pixels(from_bytes[0], from_file[0]), name


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # load_image's, not decode_images'
def test_good_files_match_load_image(images: tuple[Path, dict[str, str | None]]) -> None:
    d, expected = images
    good = [n for n, reason in expected.items() if reason is None and n != "photo.heic"]
    for draft in (True, False):
        results = decode_images([str(d / n) for n in good], CFG, workers=0, draft=draft, limits=LIMITS)
        for name, result in zip(good, results):
            assert result.pixels is not None and result.pixels.dtype == np.float32
            assert np.array_equal(result.pixels, load_image(d / name, CFG, draft=draft)), name


@pytest.mark.skipif(not HAS_HEIF, reason="pillow-heif is not installed")
def test_heic_decodes_like_other_formats(images: tuple[Path, dict[str, str | None]]) -> None:
    d, _ = images
    pixels = _decoded(d / "photo.heic")  # registers the opener, if needed
    assert np.array_equal(pixels, load_image(d / "photo.heic", CFG))
    jpeg = load_image(d / "good.jpg", CFG, draft=False)
    assert np.abs(pixels - jpeg).mean() < 0.1  # same picture, lossy either way


def test_heic_without_pillow_heif_names_the_extra(images: tuple[Path, dict[str, str | None]]) -> None:
    d, _ = images
    script = textwrap.dedent(f"""
        import sys
        sys.modules["pillow_heif"] = None  # as if not installed: importing it raises ImportError
        from clipgrep.embed.preprocess import PreprocessConfig
        from clipgrep.index.decode import decode_file
        cfg = PreprocessConfig((32, 32), (0.5,) * 3, (0.25,) * 3, "bicubic", "shortest")
        print(decode_file({str(d / "photo.heic")!r}, cfg)[1])
    """)
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60)
    assert (out.stdout.strip(), out.stderr) == (NEEDS_HEIF, "")


def test_animated_gif_uses_the_first_frame(images: tuple[Path, dict[str, str | None]]) -> None:
    d, _ = images
    pixels = _decoded(d / "animated.gif")
    assert pixels[0].min() == 2.0 and pixels[2].max() == -2.0  # pure red: (1 - 0.5) / 0.25, (0 - 0.5) / 0.25


def test_exif_orientation_is_applied(images: tuple[Path, dict[str, str | None]]) -> None:
    d, _ = images
    pixels = _decoded(d / "rotated.jpg")
    assert pixels.shape == (3, 32, 32)
    # Turned clockwise, the stored left (red) half is on top and the right (blue) half below.
    assert pixels[0, :12].mean() > 1.5 and pixels[2, :12].mean() < -1.5
    assert pixels[2, -12:].mean() > 1.5 and pixels[0, -12:].mean() < -1.5


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    write_blank_png(tmp_path / "bomb.png", 20_000, 20_000)
    assert (tmp_path / "bomb.png").stat().st_size < 300_000
    started = time.perf_counter()
    pixels, reason = decode_file(str(tmp_path / "bomb.png"), CFG)  # default limits: 200 MP
    assert (pixels, reason) == (None, "too many pixels (400 MP > 200 MP)")
    assert time.perf_counter() - started < 1.0  # header only: decoding would take seconds and 400 MB


def test_decoded_pixels_are_capped_after_the_draft(tmp_path: Path) -> None:
    # The cap bounds a decode's memory, so it applies to what is decoded: a JPEG that draft
    # reduces decodes, the same pixels as a PNG (which cannot be reduced) are refused.
    photo = _photo(800, 640)  # 0.51 MP > 0.25 MP; a 1/4-scale draft still covers 2 x 32 on the short side
    photo.save(tmp_path / "large.jpg", quality=90)
    photo.save(tmp_path / "large.png")
    limits = DecodeLimits(max_decoded_pixels=250_000)
    refused = "too many pixels to decode (0.512 MP > 0.25 MP)"
    assert decode_file(str(tmp_path / "large.png"), CFG, limits=limits) == (None, refused)
    assert decode_file(str(tmp_path / "large.jpg"), CFG, draft=False, limits=limits) == (None, refused)
    pixels, reason = decode_file(str(tmp_path / "large.jpg"), CFG, limits=limits)
    assert reason is None and pixels is not None
    assert np.array_equal(pixels, load_image(tmp_path / "large.jpg", CFG))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_extreme_aspect_ratio_decodes_in_bounded_memory(tmp_path: Path) -> None:
    """A 10000x1 PNG is a few hundred bytes; resizing its short side to 224 made a 2240000x224 image (2 GB)."""
    Image.new("RGB", (10_000, 1), (255, 0, 0)).save(tmp_path / "strip.png")
    Image.new("RGB", (1, 10_000), (0, 0, 255)).save(tmp_path / "pole.png")
    # VmHWM, not getrusage: a child's ru_maxrss starts from its parent's RSS (pytest's, here).
    script = textwrap.dedent(f"""
        import re
        from clipgrep.embed.preprocess import PreprocessConfig
        from clipgrep.index.decode import decode_file
        cfg = PreprocessConfig((224, 224), (0.5,) * 3, (0.25,) * 3, "bicubic", "shortest")
        for name in ("strip.png", "pole.png"):
            pixels, reason = decode_file({str(tmp_path)!r} + "/" + name, cfg)
            assert reason is None and pixels.shape == (3, 224, 224), reason
        with open("/proc/self/status") as f:
            print(int(re.search(r"VmHWM:\\s*(\\d+) kB", f.read()).group(1)) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=120)
    peak_mib = int(out.stdout)
    assert peak_mib < 200, f"decoding two 10000-pixel strips peaked at {peak_mib} MiB"  # was ~2 GiB each


def test_ghostscript_never_runs(tmp_path: Path) -> None:
    """An EPS named .jpg: decode_file and load_image refuse it; a plain Image.open would run gs."""
    write_eps(tmp_path / "holiday.jpg")
    bin_dir, marker = fake_ghostscript(tmp_path / "bin")
    script = textwrap.dedent(f"""
        import sys
        from clipgrep.embed.formats import UnsupportedImageFormat
        from clipgrep.embed.preprocess import PreprocessConfig, load_image
        from clipgrep.index.decode import decode_file
        path = {str(tmp_path / "holiday.jpg")!r}
        cfg = PreprocessConfig((32, 32), (0.5,) * 3, (0.25,) * 3, "bicubic", "shortest")
        print(decode_file(path, cfg)[1])
        try:
            load_image(path, cfg)
        except UnsupportedImageFormat as e:
            print(e)
        if sys.argv[1:] == ["control"]:  # what the restriction prevents: Pillow's own open runs gs
            from PIL import Image
            try:
                Image.open(path).load()
            except Exception:
                pass
    """)
    env = {**os.environ, "PATH": path_with(bin_dir)}
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60, env=env)
    assert out.stdout.splitlines() == ["unsupported image format (EPS)"] * 2
    assert not marker.exists()
    subprocess.run([sys.executable, "-c", script, "control"], check=True, capture_output=True, cwd=REPO_ROOT,
                   timeout=60, env=env)
    assert marker.exists()  # the fake gs is found and run when Pillow is left to choose


def test_pil_globals_neither_loosen_nor_leak(images: tuple[Path, dict[str, str | None]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    d, _ = images
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # some other library's choice
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert decode_file(str(d / "truncated.jpg"), CFG) == (None, CORRUPT)
    assert decode_file(str(d / "bomb.png"), CFG, limits=LIMITS)[1] == "too many pixels (1.2 MP > 1 MP)"
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS) == (True, None)


def test_file_too_large(images: tuple[Path, dict[str, str | None]]) -> None:
    d, _ = images
    size = (d / "good.png").stat().st_size
    _, reason = decode_file(str(d / "good.png"), CFG, limits=DecodeLimits(max_file_bytes=2048))
    assert reason == f"file too large ({size / 1024:.3g} KiB > 2 KiB)"


def test_unreadable_file(images: tuple[Path, dict[str, str | None]], monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ = images
    target = str(d / "good.jpg")
    real_open = os.open

    def deny(path: str, *args: int, **kwargs: int) -> int:
        if path == target:  # tests run as root, so chmod 000 would not stop the read
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    results = list(decode_images([target, str(d / "good.png")], CFG, workers=0))
    assert _outcomes(results) == [(0, "unreadable: permission denied"), (1, None)]


def test_library_stays_quiet(images: tuple[Path, dict[str, str | None]]) -> None:
    """PIL's warnings (bomb, palette transparency, corrupt EXIF) reach no terminal, from any process."""
    d, expected = images
    noisy = ["bomb.png", "palette_alpha.png", "corrupt_exif.jpg", "truncated.jpg", "animated.gif"]
    with pytest.warns(UserWarning, match="Corrupt EXIF"):  # the file really is noisy
        Image.open(d / "corrupt_exif.jpg").getexif()
    script = textwrap.dedent(f"""
        from clipgrep.embed.preprocess import PreprocessConfig
        from clipgrep.index.decode import DecodeLimits, decode_images
        if __name__ == "__main__":
            cfg = PreprocessConfig((32, 32), (0.5,) * 3, (0.25,) * 3, "bicubic", "shortest")
            paths = [{", ".join(repr(str(d / n)) for n in noisy)}]
            for workers in (0, 2):
                limits = DecodeLimits(max_pixels=1_000_000)
                results = decode_images(paths, cfg, workers=workers, limits=limits)
                print([r.skip_reason for r in results])
    """)
    out = subprocess.run([sys.executable, "-W", "always", "-c", script], check=False, capture_output=True,
                         text=True, cwd=REPO_ROOT, timeout=120)
    assert out.stderr == ""
    assert out.stdout.splitlines() == [repr([expected[n] for n in noisy])] * 2


# --- order, bounded look-ahead, crashes and hangs ------------------------------------------------


def test_lookahead_bounds_the_paths_taken(images: tuple[Path, dict[str, str | None]]) -> None:
    d, _ = images
    taken = 0

    def paths() -> Iterator[str]:  # a lazy input shows how far ahead of the consumer decoding runs
        nonlocal taken
        for i in range(24):
            taken += 1
            yield str(d / ("good.png" if i % 3 else "text.jpg"))

    ahead = []
    for k, result in enumerate(decode_images(paths(), CFG, workers=2, lookahead=4)):
        assert result.index == k
        ahead.append(taken - k)  # paths taken but not yet handed to the consumer, counting this one
        time.sleep(0.01)  # a slow consumer (the encoder): workers must not run further ahead
    assert max(ahead) == 4


# Tasks for map_ordered are Python expressions that the builtin eval runs in the workers.
# A task function from this module would make every fresh worker import it, and pytest
# (~0.35 s each), and the crash tests start several pools.
def _pid_after(seconds: float) -> str:
    """A task returning (worker pid, None) after ``seconds``."""
    return f"(__import__('os').getpid(), __import__('time').sleep({seconds}))"


PID = _pid_after(0)
# A real segfault (reading address 0), without leaving a core file in the working directory.
CRASH = ("__import__('resource').setrlimit(__import__('resource').RLIMIT_CORE, (0, 0)) "
         "or __import__('ctypes').string_at(0)")
HANG = "__import__('time').sleep(60)"


def _reasons(outcomes: Iterator[decode.Outcome]) -> list[str | None]:
    return [reason if pixels is None else None for pixels, reason in outcomes]


def test_crashing_decoder_is_skipped_and_pool_recreated() -> None:
    items = [PID, CRASH, PID, PID, PID, PID]
    outcomes = list(map_ordered(eval, items, workers=2, lookahead=4, timeout_s=30))
    assert _reasons(iter(outcomes)) == [None, CRASHED, None, None, None, None]
    pids = [pixels for pixels, _ in outcomes if pixels is not None]
    assert pids[0] != pids[-1]  # the broken pool's workers were replaced


def test_worker_killed_from_outside_skips_nothing() -> None:
    outcomes = map_ordered(eval, [_pid_after(0.05)] * 8, workers=2, lookahead=4, timeout_s=30)
    first = int(next(outcomes)[0])  # type: ignore[arg-type]  # eval's tasks return a pid
    os.kill(first, signal.SIGKILL)  # the pool breaks; whatever was in flight decodes again
    rest = list(outcomes)
    assert _reasons(iter(rest)) == [None] * 7
    assert rest[-1][0] != first


def test_hanging_decoder_times_out() -> None:
    outcomes = map_ordered(eval, [PID, HANG, PID, PID], workers=2, lookahead=3, timeout_s=0.5)
    assert _reasons(outcomes) == [None, "decoder timed out (> 0.5 s)", None, None]


def test_workers_that_cannot_start_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker dying before its first task (an unguarded __main__ re-run by forkserver) must
    # not pass for a decoder crash on every file, which would mark every file skipped.
    monkeypatch.setattr(decode, "_init_worker", functools.partial(os._exit, 3))
    with pytest.raises(ClipgrepError, match="failed to start"):
        list(map_ordered(eval, [PID, PID], workers=1, lookahead=2))


def test_closing_early_and_argument_checks(images: tuple[Path, dict[str, str | None]]) -> None:
    d, _ = images
    results = decode_images([str(d / "good.png")] * 40, CFG, workers=2, lookahead=8)
    assert next(results).index == 0
    results.close()  # shuts the pool down without waiting for the other 39
    with pytest.raises(ValueError, match="lookahead"):
        decode_images([], CFG, lookahead=0)
    with pytest.raises(ValueError, match="workers"):
        decode_images([], CFG, workers=-1)
    assert list(decode_images([], CFG, workers=2)) == []
    assert [r.skip_reason for r in decode_images([str(d / "text.jpg")], CFG)] == ["not an image"]


@pytest.mark.parametrize(("exc", "reason"), [
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), "vanished during indexing"),
    (PermissionError(errno.EACCES, "Permission denied"), "unreadable: permission denied"),
    (OSError(errno.EIO, "Input/output error"), "unreadable: input/output error"),
    (OSError("image file is truncated (2 bytes not processed)"), CORRUPT),
    (SyntaxError("broken PNG file"), CORRUPT),
    (Image.DecompressionBombError("Image size (...) exceeds limit"), "too many pixels"),
    (BrokenProcessPool(), CRASHED),
    (MemoryError(), "out of memory while decoding"),
    (decode.SkipImage("empty file"), "empty file"),
    (RuntimeError("?"), "decoder error (RuntimeError)"),
])
def test_classify_error(exc: BaseException, reason: str) -> None:
    assert classify_error(exc) == reason
