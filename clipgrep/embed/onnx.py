"""ONNX Runtime encoders for a bundle: the only module that imports onnxruntime.

Sessions are created lazily, so building an encoder is free until it encodes.
Outputs are float32 and L2-normalised (again: int8 graphs drift slightly off
unit norm, and search scores must be cosines).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

if TYPE_CHECKING:
    from ..bundle import Bundle, EncoderSpec

_STAMP = "stamp.json"  # stat of every file of a cache entry, written when the entry is built
_STAGING = ".tmp-"  # + "<pid>-": cache entries being built


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def create_session(path: Path, *, threads: int | None = None, cache_key: str | None = None) -> Any:
    """An InferenceSession on the best available device.

    CUDA is used when onnxruntime-gpu sees a GPU; otherwise the CPU with one
    intra-op thread per available core and spinning off, which measured ~8 %
    faster here when image decoding runs in other processes at the same time.

    With ``cache_key`` (a hash of the model file), the fully optimised graph is
    saved once per machine, its weights in a side file that onnxruntime
    memory-maps; later processes load that without optimising again. For the
    int8 ViT-B-32 text tower this took session creation from ~350-470 ms to
    ~35-45 ms, which is most of what a cold ``clipgrep search`` can afford.
    """
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    if cache_key is None or len(providers) > 1:
        return ort.InferenceSession(str(path), sess_options=_options(ort, threads), providers=providers)
    entry = _optimized_dir(ort, cache_key)
    if _cache_is_intact(entry):
        try:
            return ort.InferenceSession(str(entry / "model.onnx"), providers=providers,
                                        sess_options=_options(ort, threads, preoptimized=True))
        except Exception:  # noqa: BLE001, S110 - unreadable despite its stamp: rebuilt below
            pass
    return _create_and_cache(ort, path, entry, threads, providers)


def _options(ort: Any, threads: int | None, *, preoptimized: bool = False) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cpus()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: device-discovery warnings are noise to users
    if preoptimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # Pre-packing re-lays weights for batched matmuls at load (~30 ms); queries are single rows.
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def _create_and_cache(ort: Any, path: Path, target: Path, threads: int | None, providers: list[str]) -> Any:
    """A session for ``path`` that also writes its optimised graph to the cache entry ``target``.

    The entry is built in a staging dir and renamed into place with its stamp, so a killed
    build never leaves a half entry. When the cache cannot be written (a read-only or full
    disk), the session is created without it: a cache must never stop a search.
    """
    shutil.rmtree(target, ignore_errors=True)  # damaged or half-verified
    _remove_abandoned_builds(target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-", dir=target.parent))
    except OSError:
        return ort.InferenceSession(str(path), sess_options=_options(ort, threads), providers=providers)
    options = _options(ort, threads)
    options.optimized_model_filepath = str(staging / "model.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    session = None
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        _write_stamp(staging)
        staging.rename(target)  # atomic: a concurrent process either sees all of it or builds its own
    except Exception:  # noqa: BLE001, S110 - e.g. no space left for the optimised graph
        pass
    finally:  # also on Ctrl-C: no staging dir is left behind
        shutil.rmtree(staging, ignore_errors=True)
    if session is None:
        session = ort.InferenceSession(str(path), sess_options=_options(ort, threads), providers=providers)
    return session


def _optimized_dir(ort: Any, cache_key: str) -> Path:
    """Cache entries are per model file, onnxruntime version and CPU: optimised graphs are hardware specific."""
    from ..paths import onnx_cache_dir

    return onnx_cache_dir() / f"{cache_key}-ort{ort.__version__}-{_cpu_id()}"


def text_cache_key(bundle: Bundle) -> str:
    """The optimised-cache key of a bundle's text tower: its file's hash, so copies of a model share it."""
    return bundle.manifest["files"][bundle.text.file]["sha256"][:16]


def cached_sessions(cache_key: str) -> list[Path]:
    """The optimised-cache entries of one model file (any onnxruntime version or CPU)."""
    from ..paths import onnx_cache_dir

    return sorted(onnx_cache_dir().glob(f"{cache_key}-*"))


def _stat_stamp(directory: Path) -> dict[str, list[int]]:
    # ctime changes on every write and cannot be set back (unlike mtime), so an edited, truncated
    # or replaced file never matches; checking costs a few stat calls, not a hash of 100+ MB.
    stamp = {}
    for entry in os.scandir(directory):
        if entry.name != _STAMP:
            st = entry.stat(follow_symlinks=False)
            stamp[entry.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return stamp


def _write_stamp(directory: Path) -> None:
    (directory / _STAMP).write_text(json.dumps(_stat_stamp(directory)), encoding="utf-8")


def _cache_is_intact(entry: Path) -> bool:
    """Whether every file of the entry is exactly as its build left it (and none is missing or added)."""
    try:
        stamp = json.loads((entry / _STAMP).read_text(encoding="utf-8"))
        return bool(stamp) and stamp == _stat_stamp(entry)
    except (OSError, ValueError):
        return False


def _remove_abandoned_builds(directory: Path) -> None:
    """Staging dirs of builds whose process is gone (killed mid-build)."""
    try:
        entries = list(directory.glob(f"{_STAGING}*"))
    except OSError:
        return
    for staging in entries:
        pid = staging.name[len(_STAGING):].partition("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _cpu_id() -> str:
    """A short hash of the CPU model and feature flags."""
    import platform

    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text += "".join(line for line in f.read().split("\n\n")[0].splitlines()
                            if line.startswith(("model name", "flags")))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class _LazySession:
    """One encoder's session, created on first use, fed as its ``EncoderSpec`` says.

    Imported exports may take int32 inputs, an attention mask, or a batch
    dimension fixed at 1 (Immich's text graphs, and image graphs the import
    could not give a batch axis: clipgrep.imports.batching); those run row by row.
    """

    def __init__(self, path: Path, spec: EncoderSpec, threads: int | None, cache_key: str | None = None) -> None:
        self.path = path
        self.spec = spec
        self.threads = threads
        self.cache_key = cache_key
        self._session: Any = None

    def run(self, batch: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        if self._session is None:
            self._session = create_session(self.path, threads=self.threads, cache_key=self.cache_key)
        spec = self.spec
        dtype = np.dtype(spec.input_dtype) if spec.input_dtype else batch.dtype
        feeds = {spec.input: batch.astype(dtype, copy=False)}
        if spec.mask_input is not None:
            if mask is None:
                raise ValueError(f"{self.path.name} needs an attention mask")
            feeds[spec.mask_input] = mask.astype(dtype, copy=False)
        if spec.batch is not None and len(batch) != spec.batch:
            rows = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(len(batch))]
            out = np.concatenate([self._session.run([spec.output], row)[0] for row in rows])
        else:
            (out,) = self._session.run([spec.output], feeds)
        return l2_normalize(out)


class ImageEncoder:
    """Encode images with a bundle's image tower, preprocessing per its manifest.

    >>> enc = load_bundle("tiny").image_encoder()                   # doctest: +SKIP
    >>> enc.encode_files(["cat.jpg", "dog.png"]).shape               # doctest: +SKIP
    (2, 512)
    """

    def __init__(self, bundle: Bundle, *, batch_size: int = 16, draft: bool = True,
                 threads: int | None = None) -> None:
        from ..errors import BundleError
        from .preprocess import PreprocessConfig

        spec = bundle.image
        try:
            self.config = PreprocessConfig.from_dict(bundle.preprocess_config)
        except ValueError as e:  # bundle.py checks types only; the values are checked here
            raise BundleError(f"bundle {bundle.path}: bad preprocess config: {e}",
                              "re-create it: clipgrep models add ...") from None
        self.batch_size = batch_size
        self.draft = draft
        self.embed_dim = bundle.embed_dim
        self._session = _LazySession(bundle.file(spec.file), spec, threads)

    def load(self, source: str | os.PathLike[str] | BinaryIO) -> np.ndarray:
        """Decode and preprocess one image into a [3,H,W] float32 array (HEIC too: ``formats.open_image``)."""
        from .preprocess import load_image

        return load_image(source, self.config, draft=self.draft)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed already-preprocessed [N,3,H,W] pixels, in batches of ``batch_size``."""
        if len(pixels) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        parts = [self._session.run(np.ascontiguousarray(pixels[i:i + self.batch_size], dtype=np.float32))
                 for i in range(0, len(pixels), self.batch_size)]
        return np.concatenate(parts)

    def encode_files(self, sources: Iterable[str | os.PathLike[str] | BinaryIO]) -> np.ndarray:
        """Decode, preprocess and embed images; returns [N, D] unit vectors."""
        pixels = [self.load(s) for s in sources]
        if not pixels:
            return np.zeros((0, self.embed_dim), np.float32)
        return self.encode_pixels(np.stack(pixels))


class TextEncoder:
    """Encode texts with a bundle's text tower and its own tokenizer.

    >>> load_bundle("tiny").text_encoder().encode(["a red bicycle"]).shape   # doctest: +SKIP
    (1, 512)
    """

    def __init__(self, bundle: Bundle, *, batch_size: int = 64, threads: int | None = None,
                 language: str | None = None) -> None:
        spec = bundle.text
        tok = bundle.tokenizer
        if tok.kind == "hf-tokenizers":
            from .hf_tokenizer import HfTokenizer

            self.tokenizer: Any = HfTokenizer.from_spec(bundle.file(tok.file), bundle.manifest["tokenizer"])
            self.tokenizer.prefix(language)  # an unknown language fails now, before any work (clipgrep ui: at start)
        else:
            from .tokenizer import ClipTokenizer

            self.tokenizer = ClipTokenizer.from_spec(bundle.file(tok.file), bundle.manifest["tokenizer"])
        self.language = language
        self.batch_size = batch_size
        self.embed_dim = bundle.embed_dim
        # Text sessions start every search, so they load from the per-machine optimised cache.
        self._session = _LazySession(bundle.file(spec.file), spec, threads, cache_key=text_cache_key(bundle))

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self._tokenize(texts)[0]

    def _tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        if hasattr(self.tokenizer, "encode_with_mask"):
            return self.tokenizer.encode_with_mask(list(texts), self.language)
        return self.tokenizer.encode(list(texts)), None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts; returns [N, D] unit vectors."""
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        ids, mask = self._tokenize(texts)
        step = self.batch_size
        return np.concatenate([self._session.run(ids[i:i + step], None if mask is None else mask[i:i + step])
                               for i in range(0, len(ids), step)])
