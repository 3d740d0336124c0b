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
from .torch_env import import_open_clip, quiet_open_clip_logging


@dataclass(frozen=True)
class ModelSource:
    """Where a model's architecture and weights come from.

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
    open_clip = import_open_clip()
    checkpoint = source.checkpoint
    if checkpoint is not None and checkpoint.is_dir():
        model_name, pretrained, weights = f"local-dir:{checkpoint}", None, f"local-dir {checkpoint}"
    else:
        model_name = _checked_arch(open_clip, source.arch)
        if checkpoint is not None:
            if not checkpoint.is_file():
                raise ConversionError(f"checkpoint {checkpoint} does not exist", "check the path")
            pretrained, weights = str(checkpoint), f"checkpoint {checkpoint.name}"
        elif source.random_init:
            pretrained, weights = None, "random init"
        else:
            pretrained = _checked_tag(open_clip, model_name, source.pretrained)
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
        "arch": source.arch or _local_dir_arch(checkpoint),
        "weights": weights,
        "open_clip_version": importlib.metadata.version("open_clip_torch"),
        "torch_version": importlib.metadata.version("torch"),
    }
    return LoadedModel(_reparameterize(model), tokenizer, preprocess, provenance)


def _checked_arch(open_clip: Any, arch: str | None) -> str:
    if not arch:
        raise ConversionError("no architecture given", "pass --arch, e.g. --arch ViT-B-32")
    if arch.startswith("hf-hub:"):
        return arch
    if open_clip.get_model_config(arch) is None:
        close = [m for m in open_clip.list_models() if arch.lower().split("-")[0] in m.lower()][:8]
        hint = f"did you mean one of: {', '.join(close)}" if close else "list them with: python -c " \
            "'import open_clip; print(open_clip.list_models())'"
        raise ConversionError(f"open_clip has no architecture {arch!r}", hint)
    return arch


def _checked_tag(open_clip: Any, arch: str, tag: str | None) -> str:
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not tag:
        raise ConversionError(f"no weights given for {arch}",
                              f"pass --pretrained TAG ({', '.join(tags[:6]) or 'none known'}) or --checkpoint FILE")
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


def _local_dir_arch(checkpoint: Path | None) -> str | None:
    import json

    try:
        config = json.loads((checkpoint / "open_clip_config.json").read_text())  # type: ignore[operator]
    except (OSError, ValueError, TypeError):
        return None
    return config.get("model_name") or config.get("model_cfg", {}).get("name")
