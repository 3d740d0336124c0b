"""The model bundle: the one contract between training/conversion and runtime.

A bundle is a directory::

    manifest.json    format, name, dims, preprocessing, tokenizer, tensor names,
                     precision, sha256 of every file, provenance, parity figures
    image.onnx       pixel_values float32 [N,3,H,W] -> embeds float32 [N,D]
    text.onnx        input_ids int64 [N,L] -> embeds float32 [N,D]
    bpe_simple_vocab_16e6.txt.gz   the CLIP BPE vocabulary (as shipped by open_clip)

Only this module reads manifests; only ``write_manifest`` writes them. Runtime
code gets a validated ``Bundle`` value. Everything here is stdlib so that
``clipgrep models list`` stays instant.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT = "clipgrep-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Stat stamps of files whose sha256 was verified, so that every search does not
# re-hash a 60-300 MB model: a changed size, mtime or inode forces a full check.
VERIFIED_STAMP = ".verified.json"

PRECISIONS = ("fp32", "int8")
# clip-bpe: clipgrep's own torch-free CLIP tokenizer; hf-tokenizers: an export's tokenizer.json run
# through Hugging Face ``tokenizers`` (imported models: XLM-R, NLLB, SigLIP... see embed/hf_tokenizer.py).
TOKENIZER_KINDS = ("clip-bpe", "hf-tokenizers")
_REQUIRED = ("name", "bundle_id", "embed_dim", "precision", "preprocess", "tokenizer", "encoders", "files")


@dataclass(frozen=True)
class EncoderSpec:
    """Which ONNX file encodes one modality, and its tensor names."""

    file: str
    input: str
    output: str
    # Imported exports (clipgrep.imports) may differ from clipgrep's own: int32 ids,
    # an attention-mask input, a batch dimension fixed at 1.
    input_dtype: str | None = None
    mask_input: str | None = None
    batch: int | None = None


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str
    file: str
    context_length: int
    sot_id: int | None = None
    eot_id: int | None = None


@dataclass(frozen=True)
class Bundle:
    """A validated bundle on disk. Create with ``load_bundle``."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def embed_dim(self) -> int:
        return self.manifest["embed_dim"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def preprocess_config(self) -> dict[str, Any]:
        return self.manifest["preprocess"]

    @property
    def tokenizer(self) -> TokenizerSpec:
        t = self.manifest["tokenizer"]
        return TokenizerSpec(t["kind"], t["file"], t["context_length"], t.get("sot_id"), t.get("eot_id"))

    @property
    def index_id(self) -> str:
        """The key of this model's image index (tables, snapshots, run state): its ``image_id``.

        Keyed by the image tower, not the whole bundle, so that a model that only
        swaps the text tower searches the existing index without re-indexing.
        """
        return self.image_id

    @property
    def image_id(self) -> str:
        """Hash of what makes image vectors: image encoder file, its tensors, preprocessing, dims.

        Two bundles with the same image tower (a text-only model swap, e.g. an
        M-CLIP text tower aligned to the same image tower) share it, so their
        image vectors are interchangeable.
        """
        spec = self.manifest["encoders"]["image"]
        identity = {"embed_dim": self.embed_dim, "preprocess": self.preprocess_config,
                    "encoder": {**spec, "file": self.manifest["files"][spec["file"]]["sha256"]}}
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def image(self) -> EncoderSpec:
        return EncoderSpec(**self.manifest["encoders"]["image"])

    @property
    def text(self) -> EncoderSpec:
        return EncoderSpec(**self.manifest["encoders"]["text"])

    def file(self, name: str) -> Path:
        return self.path / name

    def size_bytes(self) -> int:
        return sum(f["bytes"] for f in self.manifest["files"].values())

    def image_encoder(self, **options: Any):  # -> embed.onnx.ImageEncoder
        """An image encoder for this bundle (imports onnxruntime on first use)."""
        from .embed.onnx import ImageEncoder

        return ImageEncoder(self, **options)

    def text_encoder(self, **options: Any):  # -> embed.onnx.TextEncoder
        """A text encoder for this bundle (imports onnxruntime on first use)."""
        from .embed.onnx import TextEncoder

        return TextEncoder(self, **options)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def compute_bundle_id(manifest: dict[str, Any]) -> str:
    """Hash of everything that changes a vector: encoder files, tokenizer, preprocessing, dims.

    The name, provenance and parity figures are left out, so a renamed or
    re-installed copy of the same model keeps its id (and its index).
    """
    files = manifest["files"]
    encoders = manifest["encoders"]
    tokenizer = manifest["tokenizer"]
    identity = {
        "format_version": manifest.get("format_version"),
        "embed_dim": manifest["embed_dim"],
        "preprocess": manifest["preprocess"],
        "tokenizer": {k: v for k, v in tokenizer.items() if k != "file"},
        "tokenizer_sha256": files[tokenizer["file"]]["sha256"],
        "encoders": {
            modality: {**spec, "file": files[spec["file"]]["sha256"]} for modality, spec in encoders.items()
        },
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def write_manifest(directory: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Hash the files named by ``fields`` and write ``manifest.json``; return the manifest.

    ``fields`` holds everything but ``format``, ``files`` and ``bundle_id``, which
    are derived here so a writer cannot get them wrong.
    """
    names = [spec["file"] for spec in fields["encoders"].values()] + [fields["tokenizer"]["file"]]
    names += fields.get("extra_files", [])  # e.g. an encoder's external weights (model.onnx_data)
    files = {}
    for name in sorted(set(names)):
        path = directory / name
        files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **fields, "files": files}
    manifest["bundle_id"] = compute_bundle_id(manifest)
    ordered = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": manifest["name"],
               "bundle_id": manifest["bundle_id"], **manifest}
    (directory / MANIFEST).write_text(json.dumps(ordered, indent=2) + "\n", encoding="utf-8")
    _write_stamp(directory, files)
    return ordered


def rename_manifest(directory: Path, name: str) -> None:
    """Give an installed copy a new name; the bundle id does not depend on it."""
    path = directory / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["name"] = name
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def load_bundle(path: str | os.PathLike[str], *, verify: str = "cached") -> Bundle:
    """Load and validate the bundle in directory ``path``.

    ``verify="full"`` re-hashes every file; ``"cached"`` (the default) re-hashes
    only files whose size, mtime or inode changed since the last full check.

    >>> bundle = load_bundle(models_dir() / "vit-b-32")  # doctest: +SKIP
    """
    directory = Path(path)
    manifest = _read_manifest(directory)
    _check_schema(manifest, directory)
    _check_files(manifest, directory, full=(verify == "full"))
    if compute_bundle_id(manifest) != manifest["bundle_id"]:
        raise BundleError(f"bundle {directory} has an inconsistent bundle_id (manifest edited?)",
                          "re-create it: clipgrep models add ...")
    return Bundle(directory, manifest)


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleError(f"{directory} is not a clipgrep bundle (no {MANIFEST})",
                          "pass a bundle directory, or add a model with: clipgrep models add")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}", "re-create the bundle: clipgrep models add ...") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} is not a JSON object", "re-create the bundle: clipgrep models add ...")
    return manifest


def _check_schema(manifest: dict[str, Any], directory: Path) -> None:
    fix = "re-create it: clipgrep models add ..."
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{directory}: not a clipgrep bundle manifest (format {manifest.get('format')!r})", fix)
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{directory}: manifest has no integer format_version", fix)
    if version > FORMAT_VERSION:
        raise BundleError(f"{directory}: bundle format {version} is newer than this clipgrep supports "
                          f"({FORMAT_VERSION})", "upgrade clipgrep: pip install -U clipgrep")
    if version < FORMAT_VERSION:
        raise BundleError(f"{directory}: bundle format {version} is no longer supported", fix)
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise BundleError(f"{directory}: manifest lacks {', '.join(missing)}", fix)
    if manifest["precision"] not in PRECISIONS:
        raise BundleError(f"{directory}: unknown precision {manifest['precision']!r}", fix)
    if manifest["tokenizer"].get("kind") not in TOKENIZER_KINDS:
        raise BundleError(f"{directory}: unsupported tokenizer kind {manifest['tokenizer'].get('kind')!r}",
                          "upgrade clipgrep: pip install -U clipgrep")
    if set(manifest["encoders"]) != {"image", "text"}:
        raise BundleError(f"{directory}: manifest must describe exactly an image and a text encoder", fix)
    named = {spec.get("file") for spec in manifest["encoders"].values()} | {manifest["tokenizer"].get("file")}
    if not named <= set(manifest["files"]):
        raise BundleError(f"{directory}: manifest names files it has no hash for", fix)
    for name in manifest["files"]:
        if Path(name).name != name:  # a hash entry must never point outside the bundle
            raise BundleError(f"{directory}: manifest names a file outside the bundle: {name!r}", fix)


def _check_files(manifest: dict[str, Any], directory: Path, *, full: bool) -> None:
    stamp = {} if full else _read_stamp(directory)
    verified = {}
    for name, expected in manifest["files"].items():
        path = directory / name
        try:
            st = path.stat()
        except OSError:
            raise BundleError(f"bundle {directory} is missing {name}",
                              "re-install the model: clipgrep models add ...") from None
        key = [st.st_size, st.st_mtime_ns, st.st_ino, expected["sha256"]]
        if stamp.get(name) != key:
            if st.st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
                raise BundleError(f"bundle {directory}: {name} does not match its sha256 (corrupt or modified)",
                                  "re-install the model: clipgrep models add ...")
        verified[name] = key
    if verified != stamp:
        _store_stamp(directory, verified)


def _write_stamp(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    stamp = {}
    for name, entry in files.items():
        st = (directory / name).stat()
        stamp[name] = [st.st_size, st.st_mtime_ns, st.st_ino, entry["sha256"]]
    _store_stamp(directory, stamp)


def _read_stamp(directory: Path) -> dict[str, Any]:
    try:
        stamp = json.loads((directory / VERIFIED_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _store_stamp(directory: Path, stamp: dict[str, Any]) -> None:
    try:
        (directory / VERIFIED_STAMP).write_text(json.dumps(stamp), encoding="utf-8")
    except OSError:
        pass  # a read-only bundle is still usable; it is just re-hashed each time
