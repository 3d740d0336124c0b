"""The frozen teacher of ``clipgrep compress`` and its embedding cache.

The teacher is named by a model SPEC (``--teacher``; the grammar is
``convert.source.ModelSource.parse``'s: ``ARCH:TAG``, ``ARCH:random``,
``ARCH@FILE``, ``ARCH:TAG@FILE``, or an open_clip local dir).

Teacher embeddings never change during training, so each data set is encoded
once and stored as ``<cache_dir>/teacher-<kind>-<key>.npy``. The key hashes
everything the embeddings depend on: the teacher's config and weights, the
open_clip version, the preprocessing (images) or tokenizer (texts), and the
ordered items (image paths with size and mtime, or the texts themselves).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..convert.source import LoadedModel, ModelSource, load_model
from ..embed.preprocess import PreprocessConfig, load_image
from ..errors import ClipgrepError

__all__ = ["CacheProgress", "Teacher", "cache_key", "cache_key_inputs", "cached_embeddings",
           "image_decode_pool", "load_image_batch", "load_teacher"]

Kind = Literal["image", "text"]
_CACHE_FORMAT = 1


class Teacher:
    """A loaded open_clip model used only as a frozen target: eval mode, no gradients, fp32 outputs.

    ``preprocess`` is open_clip's preprocess cfg dict; ``preprocess_config`` the same as
    clipgrep's ``PreprocessConfig``, which the student's pixels must use too.

    >>> teacher = load_teacher("ViT-B-32-quickgelu:openai")  # doctest: +SKIP
    >>> teacher.encode_texts(teacher.tokenize(["a dog"])).shape  # doctest: +SKIP
    torch.Size([1, 512])
    """

    def __init__(self, loaded: LoadedModel, model_cfg: dict[str, Any], device: Any = "cpu") -> None:
        self.model = loaded.model.to(device).eval().requires_grad_(False)
        self.model_cfg = model_cfg
        self.tokenizer = loaded.tokenizer
        self.preprocess = dict(loaded.preprocess)
        self.preprocess_config = PreprocessConfig.from_dict(self.preprocess)
        self.provenance = dict(loaded.provenance)
        self.device = device

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    def encode_images(self, pixels: Any) -> Any:
        """L2-normalised float32 image embeddings [N, D] of preprocessed pixels [N, 3, H, W]."""
        import torch

        with torch.no_grad():
            return _normalised(self.model.encode_image(pixels.to(self.device)))

    def encode_texts(self, ids: Any) -> Any:
        """L2-normalised float32 text embeddings [N, D] of token ids [N, context_length]."""
        import torch

        with torch.no_grad():
            return _normalised(self.model.encode_text(ids.to(self.device)))

    def tokenize(self, texts: Sequence[str]) -> Any:
        """Token ids [N, context_length] from the teacher's own open_clip tokenizer."""
        return self.tokenizer(list(texts))

    def identity(self) -> dict[str, Any]:
        """What the teacher's embeddings depend on, as JSON values (the weights as a digest)."""
        return {"model_cfg": self.model_cfg, "weights_blake2b": self.weights_digest,
                "open_clip_version": importlib.metadata.version("open_clip_torch")}

    @cached_property
    def weights_digest(self) -> str:
        """blake2b of every parameter and buffer: a random-init teacher has no other name."""
        import torch

        digest = hashlib.blake2b(digest_size=16)
        for key, tensor in sorted(self.model.state_dict().items()):
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}\0".encode())
            digest.update(memoryview(flat.view(torch.uint8).numpy()))
        return digest.hexdigest()

    def tokenizer_identity(self) -> dict[str, Any]:
        return {"class": type(self.tokenizer).__name__,
                "context_length": getattr(self.tokenizer, "context_length", None)}


def _normalised(embeddings: Any) -> Any:
    import torch.nn.functional as F

    return F.normalize(embeddings.float(), dim=-1)


def load_teacher(spec: str | ModelSource, device: Any = "cpu") -> Teacher:
    """Load the teacher a SPEC names onto ``device`` (a random-init teacher uses torch's global RNG).

    >>> load_teacher("ViT-B-32:random").embed_dim  # doctest: +SKIP
    512
    """
    from .students import source_model_cfg

    source = ModelSource.parse(spec) if isinstance(spec, str) else spec
    loaded = load_model(source)
    cfg = source_model_cfg(source)
    return Teacher(loaded, cfg, device)


# --- the embedding cache ------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheProgress:
    """Sent while a teacher embedding cache is computed: ``done`` of ``total`` items of ``kind``."""

    kind: str
    done: int
    total: int


def cached_embeddings(teacher: Teacher, kind: Kind, items: Sequence[str | os.PathLike[str]],
                      cache_dir: str | os.PathLike[str], batch_size: int = 256,
                      on_progress: Callable[[CacheProgress], None] | None = None) -> np.ndarray:
    """The teacher's float32 embeddings [N, D] of ``items`` (image paths or texts), computed once.

    Stored as ``<cache_dir>/teacher-<kind>-<key>.npy`` plus a ``.json`` of the key's
    inputs, written atomically under a ``.lock`` file (concurrent callers encode once);
    any later call with the same teacher, preprocessing and ordered items reads the file
    back (memory-mapped, read-only) instead of running the teacher. Changing, adding, removing, reordering or touching an image
    gives another key, so a stale cache is never read.

    >>> emb = cached_embeddings(teacher, "text", load_texts("texts.txt"), "runs/s1/cache")  # doctest: +SKIP
    """
    if kind not in ("image", "text"):
        raise ValueError(f"kind must be 'image' or 'text', not {kind!r}")
    if not items:
        raise ClipgrepError(f"no {kind}s to encode", f"pass at least one {kind}")
    key_inputs = cache_key_inputs(teacher, kind, items)
    key = _key_of(key_inputs)
    directory = Path(cache_dir).expanduser()
    path = directory / f"teacher-{kind}-{key}.npy"
    shape = (len(items), teacher.embed_dim)
    if (cached := _load_cached(path, shape)) is not None:
        return cached
    from filelock import FileLock

    directory.mkdir(parents=True, exist_ok=True)
    # Runs sharing a cache_dir may start together (the proof benchmark's parallel jobs): the
    # second waits for the first and reads its file instead of encoding everything again.
    with FileLock(path.with_suffix(".lock")):
        if (cached := _load_cached(path, shape)) is not None:
            return cached
        # Provenance only informs: the weights digest is the identity, wherever the file lives.
        _write_json(path.with_suffix(".json"), {**key_inputs, "key": key, "provenance": teacher.provenance,
                                                "shape": list(shape)})
        _encode_to_file(teacher, kind, items, path, batch_size, on_progress)
    return np.load(path, mmap_mode="r")


def _load_cached(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The finished cache file at ``path`` (memory-mapped, read-only), or None."""
    if not path.is_file():
        return None
    cached = np.load(path, mmap_mode="r")
    return cached if cached.shape == shape and cached.dtype == np.float32 else None


def cache_key(teacher: Teacher, kind: Kind, items: Sequence[str | os.PathLike[str]]) -> str:
    """The ``<key>`` of ``cached_embeddings``' file name for these inputs (20 hex digits)."""
    return _key_of(cache_key_inputs(teacher, kind, items))


def _key_of(inputs: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(inputs, sort_keys=True).encode(), digest_size=10).hexdigest()


def cache_key_inputs(teacher: Teacher, kind: Kind, items: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Everything the cached embeddings depend on; the items enter as a digest of their ordered list."""
    digest = hashlib.blake2b(digest_size=16)
    for item in items:
        if kind == "image":
            record = _file_record(Path(item))
        else:
            record = json.dumps(str(item), ensure_ascii=False)
        digest.update(record.encode("utf-8", "surrogateescape") + b"\n")
    inputs = {"format": _CACHE_FORMAT, "kind": kind, "teacher": teacher.identity(),
              "n_items": len(items), "items_blake2b": digest.hexdigest()}
    if kind == "image":
        inputs["preprocess"] = teacher.preprocess_config.to_dict()
    else:
        inputs["tokenizer"] = teacher.tokenizer_identity()
    return inputs


def _file_record(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError as e:
        raise ClipgrepError(f"cannot read image {path}: {e.strerror or e}", "check the image set") from None
    return json.dumps([os.path.abspath(path), stat.st_size, stat.st_mtime_ns], ensure_ascii=False)


def _encode_to_file(teacher: Teacher, kind: Kind, items: Sequence[Any], path: Path, batch_size: int,
                    on_progress: Callable[[CacheProgress], None] | None) -> None:
    """Fill a temporary .npy batch by batch (never all in RAM), then rename it into place."""
    import torch

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", suffix=".npy", dir=path.parent)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(items), teacher.embed_dim))
        with image_decode_pool() as pool:
            for start in range(0, len(items), batch_size):
                batch = items[start:start + batch_size]
                if kind == "image":
                    embeddings = teacher.encode_images(torch.from_numpy(load_image_batch(
                        batch, teacher.preprocess_config, pool)))
                else:
                    embeddings = teacher.encode_texts(teacher.tokenize(batch))
                out[start:start + len(batch)] = embeddings.cpu().numpy()
                if on_progress is not None:
                    on_progress(CacheProgress(kind, start + len(batch), len(items)))
        out.flush()
        del out
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_image_batch(paths: Sequence[str | os.PathLike[str]], cfg: PreprocessConfig,
                     pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Preprocessed pixels [N, 3, H, W] float32 of ``paths`` (decoded in ``pool`` when given).

    Uses ``clipgrep.embed.preprocess.load_image``, the runtime's own preprocessing,
    so the student trains on exactly the pixels search will feed it.
    """
    mapper = pool.map if pool is not None else map
    return np.stack(list(mapper(lambda p: _load_one(p, cfg), paths)))


def _load_one(path: str | os.PathLike[str], cfg: PreprocessConfig) -> np.ndarray:
    from PIL import UnidentifiedImageError

    try:
        return load_image(path, cfg)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ClipgrepError(f"cannot decode image {path}: {e}", "remove it from the image set") from None


def image_decode_pool() -> ThreadPoolExecutor:
    """Threads for decoding images (PIL releases the GIL while decoding and resizing)."""
    from ..embed.onnx import available_cpus

    return ThreadPoolExecutor(max_workers=min(8, available_cpus()))


def _write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
