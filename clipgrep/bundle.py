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
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BundleError

if TYPE_CHECKING:
    from .embed.onnx import ImageEncoder, TextEncoder

FORMAT = "clipgrep-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Stat stamps of files whose sha256 was verified, so that every search does not
# re-hash a 60-300 MB model: a changed size, mtime or inode forces a full check.
VERIFIED_STAMP = ".verified.json"
# Real manifests are a few KB; the cap is read before parsing, so a huge file costs nothing.
MAX_MANIFEST_BYTES = 1 << 20
MAX_MANIFEST_DEPTH = 16
_STAMP_VERSION = 2

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

    def image_encoder(self, **options: Any) -> ImageEncoder:
        """An image encoder for this bundle (imports onnxruntime on first use)."""
        from .embed.onnx import ImageEncoder

        return ImageEncoder(self, **options)

    def text_encoder(self, **options: Any) -> TextEncoder:
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
    named = {spec["file"] for spec in encoders.values()} | {tokenizer["file"]}
    if set(files) - named:  # external weights change vectors too (only such bundles get the key)
        identity["external_data"] = {name: files[name]["sha256"] for name in sorted(set(files) - named)}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def write_manifest(directory: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Hash the files named by ``fields`` and write ``manifest.json``; return the manifest.

    ``fields`` holds everything but ``format``, ``files`` and ``bundle_id``, which
    are derived here so a writer cannot get them wrong.
    """
    from .onnx_external import external_data_locations

    encoders = [spec["file"] for spec in fields["encoders"].values()]
    # Weights kept beside an encoder (models over 2 GB must) are hashed like the encoder itself.
    names = encoders + [fields["tokenizer"]["file"]] + [
        location for name in encoders for location in external_data_locations(directory / name)]
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
        manifest = _read_small_json(path)
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read {path}: {e}", "re-create the bundle: clipgrep models add ...") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} is not a JSON object", "re-create the bundle: clipgrep models add ...")
    return manifest


def _read_small_json(path: Path) -> Any:
    """Parse a manifest-sized JSON file; ValueError if it is too large or nested too deeply to be one.

    The size is capped before reading and the depth checked without recursion, so
    a hostile file costs neither memory nor a RecursionError, then or when printed.
    """
    with open(path, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ValueError(f"larger than {MAX_MANIFEST_BYTES >> 10} KiB, far more than a manifest needs")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    if deepest > MAX_MANIFEST_DEPTH:
        raise ValueError(f"nested more than {MAX_MANIFEST_DEPTH} levels deep")
    return value


class _Schema:
    """Type checks of manifest fields, each failure one BundleError naming the field."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def fail(self, where: str, what: str) -> BundleError:
        return BundleError(f"{self.directory}: manifest field {where} {what}", "re-create it: clipgrep models add ...")

    def get(self, mapping: dict[str, Any], key: str, kind: Any, where: str, *, optional: bool = False) -> Any:
        if key not in mapping:
            if optional:
                return None
            raise self.fail(f"{where}{key}", "is missing")
        value = mapping[key]
        if not _is_a(value, kind):
            raise self.fail(f"{where}{key}", f"must be {_KIND_NAMES[kind]}, not {type(value).__name__}")
        return value

    def numbers(self, values: Any, count: int, where: str, *, whole: bool = False) -> None:
        kind = int if whole else float
        if not isinstance(values, list) or len(values) != count or not all(_is_a(v, kind) for v in values):
            raise self.fail(where, f"must be a list of {count} {_KIND_NAMES[kind]}s")


_KIND_NAMES: dict[Any, str] = {str: "a string", int: "a whole number", float: "a number", dict: "an object",
                               list: "a list"}


def _is_a(value: Any, kind: Any) -> bool:
    if isinstance(value, bool):  # JSON true is not a number
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _check_schema(manifest: dict[str, Any], directory: Path) -> None:
    fix = "re-create it: clipgrep models add ..."
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{directory}: not a clipgrep bundle manifest (format {manifest.get('format')!r})", fix)
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{directory}: manifest has no integer format_version", fix)
    if version > FORMAT_VERSION:
        raise BundleError(f"{directory}: bundle format {version} is newer than this clipgrep supports "
                          f"({FORMAT_VERSION})", "upgrade clipgrep: pip install -U clipgrep")
    if version < FORMAT_VERSION:
        raise BundleError(f"{directory}: bundle format {version} is no longer supported", fix)
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise BundleError(f"{directory}: manifest lacks {', '.join(missing)}", fix)
    _check_types(manifest, _Schema(directory))
    if manifest["precision"] not in PRECISIONS:
        raise BundleError(f"{directory}: unknown precision {manifest['precision']!r}", fix)
    if manifest["tokenizer"]["kind"] not in TOKENIZER_KINDS:
        raise BundleError(f"{directory}: unsupported tokenizer kind {manifest['tokenizer']['kind']!r}",
                          "upgrade clipgrep: pip install -U clipgrep")
    named = {spec["file"] for spec in manifest["encoders"].values()} | {manifest["tokenizer"]["file"]}
    if not named <= set(manifest["files"]):
        raise BundleError(f"{directory}: manifest names files it has no hash for", fix)
    for name in manifest["files"]:
        if Path(name).name != name or name in (".", "..", MANIFEST, VERIFIED_STAMP):
            # a hash entry must never point outside the bundle (or at its bookkeeping)
            raise BundleError(f"{directory}: manifest names a file outside the bundle: {name!r}", fix)


def _check_types(m: dict[str, Any], schema: _Schema) -> None:
    """The type of every field that clipgrep reads, so no later use can fail on a hostile value."""
    for key in ("name", "bundle_id", "precision"):
        schema.get(m, key, str, "")
    if not re.fullmatch(r"[0-9a-f]{16}", m["bundle_id"]):  # it names files in the index dir
        raise schema.fail("bundle_id", "must be 16 hex digits")
    if schema.get(m, "embed_dim", int, "") < 1:
        raise schema.fail("embed_dim", "must be positive")
    pre = schema.get(m, "preprocess", dict, "")
    schema.numbers(pre.get("size"), 2, "preprocess.size", whole=True)
    for key in ("mean", "std"):
        schema.numbers(pre.get(key), 3, f"preprocess.{key}")
    for key in ("interpolation", "resize_mode"):
        schema.get(pre, key, str, "preprocess.")
    schema.get(pre, "fill_color", int, "preprocess.", optional=True)
    _check_tokenizer(schema.get(m, "tokenizer", dict, ""), schema)
    encoders = schema.get(m, "encoders", dict, "")
    if set(encoders) != {"image", "text"}:
        raise schema.fail("encoders", "must describe exactly an image and a text encoder")
    for modality in ("image", "text"):
        spec = schema.get(encoders, modality, dict, "encoders.")
        where = f"encoders.{modality}."
        if not {"file", "input", "output"} <= set(spec) <= {"file", "input", "output", *_ENCODER_OPTIONS}:
            raise schema.fail(f"encoders.{modality}", "must have file, input and output, and only "
                              + ", ".join(_ENCODER_OPTIONS) + " besides")
        for key in ("file", "input", "output", "mask_input"):
            schema.get(spec, key, str, where, optional=key == "mask_input")
        if spec.get("input_dtype") is not None and schema.get(spec, "input_dtype", str, where) not in _INPUT_DTYPES:
            raise schema.fail(f"{where}input_dtype", "must be one of " + ", ".join(_INPUT_DTYPES))
        if schema.get(spec, "batch", int, where, optional=True) is not None and spec["batch"] < 1:
            raise schema.fail(f"{where}batch", "must be positive")
    files = schema.get(m, "files", dict, "")
    for name in files:
        entry = schema.get(files, name, dict, "files.")
        digest = schema.get(entry, "sha256", str, f"files.{name}.")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or schema.get(entry, "bytes", int, f"files.{name}.") < 0:
            raise schema.fail(f"files.{name}", "needs a sha256 of 64 hex digits and a byte count")
    _check_optional_types(m, schema)


# Imported exports only (EncoderSpec): int32 ids, an attention-mask input, a batch fixed at 1.
_ENCODER_OPTIONS = ("input_dtype", "mask_input", "batch")
_INPUT_DTYPES = ("float32", "float16", "int32", "int64")


def _check_tokenizer(tok: dict[str, Any], schema: _Schema) -> None:
    """The settings ``ClipTokenizer.from_spec`` (clip-bpe) or ``HfTokenizer.from_spec`` (hf-tokenizers) read."""
    for key in ("kind", "file"):
        schema.get(tok, key, str, "tokenizer.")
    clip = tok["kind"] == "clip-bpe"
    for key in ("context_length", "sot_id", "eot_id", "pad_id"):
        required = key == "context_length" or (clip and key != "pad_id")
        value = schema.get(tok, key, int, "tokenizer.", optional=not required)
        if value is not None and value < 0:
            raise schema.fail(f"tokenizer.{key}", "must not be negative")
    schema.get(tok, "clean", str, "tokenizer.", optional=True)
    if "special_texts" in tok:
        texts = schema.get(tok, "special_texts", list, "tokenizer.")
        if len(texts) != 2 or not all(isinstance(t, str) and t for t in texts):
            raise schema.fail("tokenizer.special_texts", "must be a list of 2 non-empty strings")
    if tok["kind"] == "hf-tokenizers":
        schema.get(tok, "pad_token", str, "tokenizer.")
        if tok.get("language_prefix") is not None:
            schema.get(tok, "language_prefix", str, "tokenizer.")


def _check_optional_types(m: dict[str, Any], schema: _Schema) -> None:
    """Fields only ``models info`` and ``compress eval`` read: absent is fine, the wrong type is not."""
    provenance = schema.get(m, "provenance", dict, "", optional=True) or {}
    for key in ("repo", "revision", "layout"):  # imports: where the export came from (render, catalogue)
        if provenance.get(key) is not None:
            schema.get(provenance, key, str, "provenance.")
    sources = schema.get(provenance, "source_files", dict, "provenance.", optional=True) or {}
    for name in sources:
        schema.get(sources, name, str, "provenance.source_files.")
    params = schema.get(m, "params", dict, "", optional=True)
    for key in ("image", "text") if params else ():
        schema.get(params, key, float, "params.")
    parity = schema.get(m, "parity", dict, "", optional=True) or {}
    for key in ("image", "text", "image_jpeg_draft"):
        figures = schema.get(parity, key, dict, "parity.", optional=True)
        for figure in ("min_cos", "mean_cos", "n") if figures is not None else ():
            schema.get(figures, figure, float, f"parity.{key}.")
    schema.get(parity, "token_reference", str, "parity.", optional=True)
    quantization = schema.get(m, "quantization", dict, "", optional=True) or {}
    for modality in quantization:
        tower = schema.get(quantization, modality, dict, "quantization.")
        schema.get(tower, "chosen", str, f"quantization.{modality}.")
        schema.get(tower, "reused_from", str, f"quantization.{modality}.", optional=True)
        timings = schema.get(tower, "ms_per_item", dict, f"quantization.{modality}.")
        for key in timings:
            schema.get(timings, key, float, f"quantization.{modality}.ms_per_item.")


def _check_files(manifest: dict[str, Any], directory: Path, *, full: bool) -> None:
    stamp = {} if full else _read_stamp(directory)
    verified = {}
    encoder_files = {spec["file"] for spec in manifest["encoders"].values()}
    for name, expected in manifest["files"].items():
        path = directory / name
        try:
            st = path.lstat()
        except OSError:
            raise BundleError(f"bundle {directory} is missing {name}",
                              "re-install the model: clipgrep models add ...") from None
        if not stat.S_ISREG(st.st_mode):  # a link may lead out of the bundle, a FIFO or device never ends
            raise BundleError(f"bundle {directory}: {name} is not a regular file (a link or device?)",
                              "copy the real file into the bundle directory")
        key = [st.st_size, st.st_mtime_ns, st.st_ino, expected["sha256"]]
        if stamp.get(name) != key:
            if st.st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
                raise BundleError(f"bundle {directory}: {name} does not match its sha256 (corrupt or modified)",
                                  "re-install the model: clipgrep models add ...")
            if name in encoder_files:
                _check_external_data(directory, name, manifest["files"])
        verified[name] = key
    if verified != stamp:
        _store_stamp(directory, verified)


def _check_external_data(directory: Path, name: str, files: dict[str, Any]) -> None:
    """Refuse an encoder whose weights live in a side file the manifest does not hash (see onnx_external)."""
    from .onnx_external import OnnxFormatError, external_data_locations

    try:
        locations = external_data_locations(directory / name)
    except (OnnxFormatError, OSError, ValueError) as e:
        raise BundleError(f"bundle {directory}: {name} is not a readable ONNX file ({e})",
                          "re-install the model: clipgrep models add ...") from None
    unlisted = sorted(loc for loc in locations if loc not in files)
    if unlisted:
        raise BundleError(f"bundle {directory}: {name} loads weights from {', '.join(map(repr, unlisted))}, "
                          "which the manifest does not hash", "re-create the bundle with every file in its manifest")


def _write_stamp(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    stamp = {}
    for name, entry in files.items():
        st = (directory / name).stat()
        stamp[name] = [st.st_size, st.st_mtime_ns, st.st_ino, entry["sha256"]]
    _store_stamp(directory, stamp)


def _read_stamp(directory: Path) -> dict[str, Any]:
    try:
        stamp = _read_small_json(directory / VERIFIED_STAMP)
    except (OSError, ValueError):
        return {}
    # Stamps of older versions were written without the external-data check: verify again once.
    if not isinstance(stamp, dict) or stamp.get("version") != _STAMP_VERSION:
        return {}
    files = stamp.get("files")
    return files if isinstance(files, dict) else {}


def _store_stamp(directory: Path, stamp: dict[str, Any]) -> None:
    try:
        (directory / VERIFIED_STAMP).write_text(json.dumps({"version": _STAMP_VERSION, "files": stamp}),
                                                encoding="utf-8")
    except OSError:
        pass  # a read-only bundle is still usable; it is just re-hashed each time
