"""Load an open_clip model from a pretrained tag, a local checkpoint or a local-dir.

Whatever the source, the result carries what a bundle needs besides the
weights: the preprocessing config and tokenizer exactly as open_clip would use
them, and a provenance record.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConversionError, first_line
from . import local_dir
from .torch_env import import_open_clip, quiet_open_clip_logging

SPEC_HINT = ("use ARCH:TAG (e.g. ViT-B-32-quickgelu:openai), ARCH:random, ARCH@FILE.safetensors "
             "or the path of an open_clip local dir")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's architecture and weights come from; ``parse``/``spec`` give its one-word form.

    - ``arch`` + ``pretrained``: an open_clip pretrained tag (downloaded via the HF hub);
    - ``arch`` + ``checkpoint`` file: local weights (safetensors, or torch with weights_only);
      ``pretrained`` may then name a tag whose preprocessing to use (nothing is downloaded);
    - ``checkpoint`` directory: an open_clip local-dir (open_clip_config.json + weights),
      which is what ``clipgrep compress`` writes;
    - ``arch`` alone with ``random_init``: random weights, for tests and benchmarks.
    """

    arch: str | None = None
    pretrained: str | None = None
    checkpoint: Path | None = None
    random_init: bool = False

    @classmethod
    def parse(cls, spec: str) -> ModelSource:
        """A model SPEC (``--teacher``), one of::

            ARCH:TAG              an open_clip pretrained tag, downloaded once   ViT-B-32-quickgelu:openai
            ARCH:random           random weights (tests, benchmarks)             ViT-B-32:random
            ARCH@FILE             local weights for ARCH (.safetensors / .pt)    ViT-B-32@~/w/clip.safetensors
            ARCH:TAG@FILE         local weights, TAG's preprocessing (no download)
            local-dir:DIR | DIR   an open_clip local dir (open_clip_config.json + weights),
                                  e.g. the student/ a compress stage wrote

        A bare path is read as a directory when it exists or contains a ``/``; a
        ``local-dir:`` prefix says so explicitly. ``ARCH`` alone is refused: the weights
        must be named. ``hf-hub:`` names are not supported (download the weights and use
        ``ARCH@FILE``). Paths become absolute.

        >>> ModelSource.parse("ViT-B-32:random")
        ModelSource(arch='ViT-B-32', pretrained=None, checkpoint=None, random_init=True)
        """
        text = spec.strip()
        if not text:
            raise ConversionError("the model SPEC is empty", SPEC_HINT)
        if text.startswith("hf-hub:"):
            raise ConversionError(f"hf-hub models are not supported here ({text})",
                                  "download its open_clip_model.safetensors and pass ARCH@FILE")
        if text.startswith("local-dir:") or ("@" not in text and _looks_like_dir(text)):
            path = _absolute(text.removeprefix("local-dir:"))
            if not local_dir.is_local_dir(path):
                raise ConversionError(f"{path} is not an open_clip local dir (no {local_dir.CONFIG})", SPEC_HINT)
            return cls(checkpoint=path)
        name, at, file = text.partition("@")
        arch, colon, tag = name.partition(":")
        if not arch or (colon and not tag):
            raise ConversionError(f"invalid model SPEC {spec!r}", SPEC_HINT)
        if at:
            if not file or tag == "random":
                raise ConversionError(f"invalid model SPEC {spec!r}: name the weights file after @", SPEC_HINT)
            return cls(arch=arch, pretrained=tag or None, checkpoint=_absolute(file))
        if tag == "random":
            return cls(arch=arch, random_init=True)
        if not tag:
            raise ConversionError(f"{spec!r} names no weights",
                                  f"add a pretrained tag or a file: {arch}:TAG, {arch}@FILE or {arch}:random")
        return cls(arch=arch, pretrained=tag)

    def spec(self) -> str:
        """The canonical SPEC: ``ModelSource.parse(s.spec()) == s``."""
        if self.checkpoint is not None and self.arch is None:
            return f"local-dir:{self.checkpoint}"
        name = self.arch if self.pretrained is None else f"{self.arch}:{self.pretrained}"
        if self.checkpoint is not None:
            return f"{name}@{self.checkpoint}"
        return f"{self.arch}:random" if self.random_init else str(name)

    def check(self) -> None:
        """Refuse what is wrong before importing torch (~3 s): missing paths, options that exclude each other.

        The architecture and tag names need open_clip's registry; ``load_model`` checks those.
        """
        if self.random_init and (self.checkpoint is not None or self.pretrained):
            raise ConversionError("--random-init excludes --checkpoint and --pretrained", "drop one of them")
        if self.checkpoint is not None:
            if self.checkpoint.is_dir():
                if not local_dir.is_local_dir(self.checkpoint):
                    raise ConversionError(f"{self.checkpoint} is neither a clipgrep bundle nor an open_clip "
                                          "model directory (no manifest.json or open_clip_config.json)",
                                          "pass a bundle directory, a local-dir or a weights file")
                return
            if not self.checkpoint.is_file():
                raise ConversionError(f"checkpoint {self.checkpoint} does not exist", "check the path")
        if not self.arch:
            raise ConversionError("no architecture given", "pass --arch, e.g. --arch ViT-B-32")
        if self.checkpoint is None and not self.random_init and not self.pretrained:
            raise ConversionError(f"no weights given for {self.arch}",
                                  "pass --pretrained TAG (e.g. laion2b_s34b_b79k for ViT-B-32), "
                                  "--checkpoint FILE or --random-init")

    def describe(self) -> str:
        if self.checkpoint is not None:
            return str(self.checkpoint)
        if self.random_init:
            return f"{self.arch} (random init)"
        return f"{self.arch} / {self.pretrained}"


@dataclass
class LoadedModel:
    model: Any  # open_clip CLIP / CustomTextCLIP, in eval mode
    tokenizer: Any  # open_clip tokenizer
    preprocess: dict[str, Any]  # open_clip PreprocessCfg as a dict
    provenance: dict[str, Any] = field(default_factory=dict)


def load_model(source: ModelSource) -> LoadedModel:
    """Build the open_clip model for ``source``, weights loaded, in eval mode."""
    source.check()
    open_clip = import_open_clip()
    checkpoint = source.checkpoint
    if checkpoint is not None and checkpoint.is_dir():
        model_name, pretrained, weights = f"local-dir:{checkpoint}", None, f"local-dir {checkpoint}"
    else:
        model_name = _checked_arch(open_clip, source.arch or "")
        if checkpoint is not None:
            pretrained, weights = str(checkpoint), f"checkpoint {checkpoint.name}"
        elif source.random_init:
            pretrained, weights = None, "random init"
        else:
            pretrained = _checked_tag(open_clip, model_name, source.pretrained or "")
            _download(open_clip, model_name, pretrained)
            weights = f"open_clip pretrained tag {pretrained}"
    try:
        with quiet_open_clip_logging():  # open_clip logs "initialized randomly" etc. to the root logger
            model = open_clip.create_model(model_name, pretrained=pretrained, weights_only=True)
            tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise ConversionError(f"open_clip could not load {source.describe()}: {first_line(e)}",
                              "check that the checkpoint matches --arch") from None
    model.eval()
    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    if checkpoint is not None and checkpoint.is_file():
        preprocess = _preprocess_for_checkpoint(open_clip, model_name, source.pretrained, preprocess)
    provenance = {
        "arch": source.arch or local_dir.arch_name(checkpoint),
        "weights": weights,
        "open_clip_version": importlib.metadata.version("open_clip_torch"),
        "torch_version": importlib.metadata.version("torch"),
    }
    return LoadedModel(_reparameterize(model), tokenizer, preprocess, provenance)


def _checked_arch(open_clip: Any, arch: str) -> str:
    if arch.startswith("hf-hub:"):
        return arch
    if open_clip.get_model_config(arch) is None:
        close = [m for m in open_clip.list_models() if arch.lower().split("-")[0] in m.lower()][:8]
        hint = f"did you mean one of: {', '.join(close)}" if close else "list them with: python -c " \
            "'import open_clip; print(open_clip.list_models())'"
        raise ConversionError(f"open_clip has no architecture {arch!r}", hint)
    return arch


def _checked_tag(open_clip: Any, arch: str, tag: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        raise ConversionError(f"open_clip has no pretrained tag {tag!r} for {arch}",
                              f"known tags: {', '.join(tags) or 'none'}")
    return tag


def _download(open_clip: Any, arch: str, tag: str) -> Path:
    """Fetch the weights into the HF cache first, so a network failure gets its own message."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, tag)
    try:
        with _offline_unless_hub_reachable(), quiet_open_clip_logging():
            return Path(download_pretrained(cfg))
    except Exception as e:  # noqa: BLE001 - hub, HTTP and OS errors all mean "could not fetch"
        repo = (cfg.get("hf_hub") or "").strip("/")
        where = f"https://huggingface.co/{repo}" if repo else cfg.get("url", "the open_clip release page")
        raise ConversionError(
            f"cannot download {arch} weights ({tag}) from the Hugging Face hub ({type(e).__name__})",
            f"offline? download open_clip_model.safetensors from {where} on a machine with internet, then run: "
            f"clipgrep models add NAME --arch {arch} --pretrained {tag} --checkpoint FILE",
        ) from None


@contextlib.contextmanager
def _offline_unless_hub_reachable() -> Iterator[None]:
    """Use only the local HF cache when the hub cannot be reached.

    Without this, huggingface_hub retries each candidate file with backoff for
    about a minute before failing. Its offline flag is read once at import, so
    the module constant is switched for the duration of the download.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    asked = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    constants.HF_HUB_OFFLINE = saved or asked or not _hub_reachable(constants.ENDPOINT)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; let huggingface_hub try
    url = urllib.parse.urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _preprocess_for_checkpoint(open_clip: Any, arch: str, tag: str | None,
                               default: dict[str, Any]) -> dict[str, Any]:
    """Preprocessing for local weights: that of ``tag`` if given, or the one all of the arch's tags share.

    Weights trained with other normalisation (MobileCLIP uses mean 0, std 1)
    give poor vectors with open_clip's defaults, so borrow the published config.
    """
    from open_clip.pretrained import get_pretrained_cfg

    keys = ("mean", "std", "interpolation", "resize_mode")
    tags = [tag] if tag else open_clip.list_pretrained_tags_by_model(arch)
    configs = {tuple((k, str(get_pretrained_cfg(arch, t).get(k))) for k in keys) for t in tags}
    if tag and not get_pretrained_cfg(arch, tag):
        raise ConversionError(f"open_clip has no pretrained tag {tag!r} for {arch}",
                              f"known tags: {', '.join(open_clip.list_pretrained_tags_by_model(arch))}")
    if len(configs) != 1:
        return default
    chosen = get_pretrained_cfg(arch, tags[0])
    return {**default, **{k: chosen[k] for k in keys if chosen.get(k) is not None}}


def _reparameterize(model: Any) -> Any:
    """Fold MobileOne/FastViT train-time branches into single convs before export (no-op for ViTs)."""
    try:
        from timm.utils.model import reparameterize_model
    except ImportError:
        return model
    return reparameterize_model(model)


def _looks_like_dir(text: str) -> bool:
    return "/" in text or os.sep in text or Path(text).expanduser().is_dir()


def _absolute(text: str) -> Path:
    return Path(os.path.abspath(Path(text).expanduser()))
