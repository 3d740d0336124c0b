"""Training plumbing shared by teacher training, stage 1 and stage 2.

Config value checks, the device, seeding, AdamW parameter groups, the LR
schedule, data digests for resume checks, and atomic config writes. torch is
imported inside the functions that need it, so configs can be checked without it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import ClipgrepError


class JsonConfig:
    """``to_json``/``from_json`` for a frozen config dataclass, saved as ``config.json`` beside each output.

    Subclasses name themselves in ``config_kind`` ("stage-1 config") and say which
    fields are required in ``required_hint``, for the one-line errors.
    """

    config_kind: ClassVar[str]
    required_hint: ClassVar[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, text: str) -> Any:
        """Read ``to_json``'s output (e.g. ``Path("runs/s1/config.json").read_text()``)."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ClipgrepError(f"{cls.config_kind} is not valid JSON ({e})", f"write it with {cls.__name__}.to_json") \
                from None
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if not isinstance(data, dict) or set(data) - known:
            extra = sorted(set(data) - known) if isinstance(data, dict) else data
            raise ClipgrepError(f"not a {cls.config_kind}: unexpected {extra!r}", f"use only the keys {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ClipgrepError(f"incomplete {cls.config_kind}: {e}", cls.required_hint) from None


def check_counts(config: Any, minimums: dict[str, int]) -> None:
    """Each field in ``minimums`` a whole number at least its minimum; ``max_steps`` None or >= 1."""
    for name, low in minimums.items():
        if not is_int(getattr(config, name)) or getattr(config, name) < low:
            raise ClipgrepError(f"{name} must be a whole number >= {low}, not {getattr(config, name)!r}",
                                f"set {name} to {low} or more")
    if config.max_steps is not None and (not is_int(config.max_steps) or config.max_steps < 1):
        raise ClipgrepError(f"max_steps must be a whole number >= 1, not {config.max_steps!r}",
                            "leave it unset to train for all epochs")


def config_changes(saved: dict[str, Any], config: Any, free: frozenset[str]) -> list[str]:
    """How ``config`` differs from the config a checkpoint was ``saved`` with, outside the ``free`` fields."""
    return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in asdict(config).items() if k not in free and saved.get(k) != v]


def is_int(value: object) -> bool:
    """A whole number from a config (JSON or Python), not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float: nan passes every `< 0` check and inf every `> 0` one."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; anything else checked and canonicalised."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ClipgrepError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ClipgrepError(f"device {device} asked for, but torch sees no CUDA GPU", "use --device cpu or auto")
    return str(resolved)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CUDA generators too


def tower_of(name: str) -> str | None:
    """The tower a CLIP parameter belongs to ("image" or "text"); None for the logit scale/bias."""
    return "image" if name.startswith("visual.") else None if name.startswith("logit_") else "text"


def param_groups(model: Any, weight_decay: float,
                 trains: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
    """AdamW groups of the parameters ``trains(name)`` selects (default: all); the rest are frozen.

    open_clip_train's split: no weight decay on gains, biases and the logit scale
    (every parameter of fewer than 2 dimensions).
    """
    decay: list[Any] = []
    no_decay: list[Any] = []
    for name, param in model.named_parameters():
        trained = trains is None or trains(name)
        param.requires_grad_(trained)
        if trained:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def data_digest(values: Iterable[Any]) -> str:
    """A digest of an ordered list of items (paths, texts, ids): a resume must see the same data."""
    digest = hashlib.blake2b(digest_size=16)
    for value in values:
        digest.update(json.dumps(str(value), ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def data_digests(items: dict[str, list[Any]]) -> dict[str, str]:
    return {kind: data_digest(values) for kind, values in items.items()}


def start_run_dir(out: Path, config: JsonConfig) -> None:
    """Make ``out`` the run's directory and write ``config.json`` (STAGE_CONFIG) into it.

    ``out`` must be new, empty, or an earlier run of the same kind (its config.json
    reads back as ``config``'s class, so the run resumes or starts over there).
    Anything else is someone else's data: refused before a byte of it changes.
    """
    from .checkpoint import STAGE_CONFIG

    if out.exists() and not out.is_dir():
        raise ClipgrepError(f"--out {out} is a file, not a directory", "pass a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            type(config).from_json((out / STAGE_CONFIG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ClipgrepError):
            raise ClipgrepError(f"--out {out} is not empty and is not a {config.config_kind.removesuffix(' config')} "
                                f"run directory (no readable {STAGE_CONFIG} of one)",
                                "pass a new or empty directory, or the --out of an earlier run to resume it") \
                from None
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / STAGE_CONFIG, config.to_json())


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
