"""Stage outputs (open_clip local dirs) and resumable training checkpoints, both written atomically.

A stage output is open_clip's documented local-dir format, so open_clip itself
(``create_model("local-dir:PATH")``) and ``clipgrep models add NAME --checkpoint
PATH`` read it back:

    open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}
    open_clip_model.safetensors  the weights
    config.json                  the resolved stage config (clipgrep's own; open_clip ignores it)

A training checkpoint is one ``torch.save`` file holding only tensors, numbers,
strings, lists, tuples and dicts, so it loads with ``torch.load(weights_only=True)``
and never runs pickled code: model and optimizer state dicts are such values
(AdamW's state is tensors, its param_groups numbers and lists), scheduler state
dicts are too for the built-in schedulers (a LambdaLR drops plain functions), and
``capture_rng_states`` converts numpy's RNG state to tensors for the same reason.

Writers never leave a half-written file where a reader looks: files go to a
temporary name in the same directory, are fsynced, then renamed into place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..convert import local_dir
from ..errors import ClipgrepError, first_line

OPEN_CLIP_CONFIG = local_dir.CONFIG
WEIGHTS = local_dir.WEIGHTS
STAGE_CONFIG = "config.json"
TRAINING_STATE_FORMAT = 1
# torch.compile wraps a module as ``_orig_mod``; nanochat strips it the same way.
_COMPILE_PREFIX = "_orig_mod."


def save_local_dir(model: Any, model_cfg: dict[str, Any], preprocess_cfg: Mapping[str, Any] | Any,
                   out_dir: str | os.PathLike[str], extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as an open_clip local dir at ``out_dir``, replacing any previous one.

    The new directory is assembled beside ``out_dir`` and renamed into place, so a
    failure (or a kill) while writing leaves the previous output untouched.

    >>> save_local_dir(student, cfg, loaded.preprocess, "runs/s1/student", {"stage": 1})  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    if dataclasses.is_dataclass(preprocess_cfg):
        preprocess_cfg = dataclasses.asdict(preprocess_cfg)  # type: ignore[arg-type]  # an instance, not a class
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        save_file(_plain_tensors(model.state_dict()), str(staging / WEIGHTS), metadata={"format": "pt"})
        _fsync(staging / WEIGHTS)
        open_clip_config = {"model_cfg": model_cfg, "preprocess_cfg": dict(preprocess_cfg)}
        _write_json(staging / OPEN_CLIP_CONFIG, open_clip_config)
        _write_json(staging / STAGE_CONFIG, extra_config or {})
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def load_local_dir(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(model, model_cfg, preprocess_cfg)`` of a local dir, the model in eval mode.

    >>> model, model_cfg, preprocess = load_local_dir("runs/s1/student")  # doctest: +SKIP
    """
    from ..convert.torch_env import import_open_clip, quiet_open_clip_logging

    local = Path(path).expanduser()
    model_cfg = local_dir.model_cfg(local)
    if not (local / WEIGHTS).is_file():
        # open_clip would only log a warning and hand back random weights.
        raise ClipgrepError(f"{local} has no {WEIGHTS}", "the stage that wrote it did not finish; run it again")
    open_clip = import_open_clip()
    try:
        with quiet_open_clip_logging():
            model = open_clip.create_model(f"local-dir:{local}", weights_only=True)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise ClipgrepError(f"open_clip could not load {local}: {first_line(e)}",
                            "the weights do not match open_clip_config.json; write the dir again") from None
    return model.eval(), model_cfg, dict(open_clip.get_model_preprocess_cfg(model))


@dataclass(frozen=True)
class TrainingState:
    """What ``load_training_state`` returns; the arguments of ``save_training_state``."""

    step: int
    model_state: dict[str, Any]
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None
    rng_states: dict[str, Any]
    extra: dict[str, Any]


def save_training_state(path: str | os.PathLike[str], step: int, model_state: Mapping[str, Any],
                        optimizer_state: dict[str, Any] | None, scheduler_state: dict[str, Any] | None,
                        rng_states: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write a resumable checkpoint at ``path``, atomically replacing the previous one.

    ``rng_states`` should come from ``capture_rng_states()``; ``extra`` holds plain
    values only (numbers, strings, lists, dicts, tensors), or loading refuses it.

    >>> save_training_state("runs/s1/last.pt", step, model.state_dict(), opt.state_dict(),
    ...                     sched.state_dict(), capture_rng_states(), {"epoch": 3})  # doctest: +SKIP
    """
    import torch

    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": TRAINING_STATE_FORMAT, "step": int(step), "model": strip_compile_prefix(model_state),
               "optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng_states,
               "extra": extra or {}}
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return target


def load_training_state(path: str | os.PathLike[str], map_location: Any = "cpu") -> TrainingState:
    """Read a checkpoint written by ``save_training_state`` (``torch.load(weights_only=True)``).

    >>> state = load_training_state("runs/s1/last.pt")  # doctest: +SKIP
    >>> optimizer.load_state_dict(state.optimizer_state)  # doctest: +SKIP
    """
    import pickle

    import torch

    source = Path(path).expanduser()
    if not source.is_file():
        raise ClipgrepError(f"no training checkpoint at {source}", "start without --resume, or check the path")
    try:
        payload = torch.load(source, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ClipgrepError(f"cannot read training checkpoint {source}: {first_line(e)}", "it is damaged or "
                            "was not written by clipgrep compress; start without --resume") from None
    if not isinstance(payload, dict) or payload.get("format") != TRAINING_STATE_FORMAT:
        raise ClipgrepError(f"{source} is not a clipgrep training checkpoint (format {TRAINING_STATE_FORMAT})",
                            "start without --resume, or use a checkpoint from this version")
    return TrainingState(payload["step"], payload["model"], payload["optimizer"], payload["scheduler"],
                         payload["rng"], payload["extra"])


def capture_rng_states() -> dict[str, Any]:
    """The global RNG states of Python, numpy and torch (and CUDA once initialised), as plain values.

    Generators a caller owns (``np.random.default_rng``, ``torch.Generator``) are
    not global: save their state in ``extra``.
    """
    import random

    import numpy as np
    import torch

    numpy_state = np.random.get_state(legacy=False)
    # numpy's key is a uint32 array, which weights_only loading refuses; int64 holds it exactly.
    key = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {"key": key, "pos": int(numpy_state["state"]["pos"])}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Undo ``capture_rng_states``: later random draws repeat those that followed the capture."""
    import random

    import numpy as np
    import torch

    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = states["numpy"]
    key = np.asarray(numpy_state["state"]["key"].numpy(), dtype=np.uint32)
    np.random.set_state({**numpy_state, "state": {"key": key, "pos": int(numpy_state["state"]["pos"])}})
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def strip_compile_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Keys as if torch.compile had not wrapped the module (it inserts ``_orig_mod.``)."""
    stripped = {key.replace(_COMPILE_PREFIX, ""): value for key, value in state.items()}
    if len(stripped) != len(state):
        raise ValueError("state dict keys collide once torch.compile's _orig_mod. prefix is removed")
    return stripped


def _plain_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors safetensors accepts: CPU, contiguous, each owning its whole storage.

    safetensors refuses tensors that share memory (tied weights) or are views into
    a larger storage; those are cloned, the rest only made contiguous. Loading the
    clones back sets a tied parameter twice, to the same value.
    """
    state = strip_compile_prefix(state)
    storages = Counter(t.untyped_storage().data_ptr() for t in state.values() if t.numel())
    plain = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        shared = storages[tensor.untyped_storage().data_ptr()] > 1 or \
            tensor.numel() * tensor.element_size() != tensor.untyped_storage().nbytes()
        plain[key] = (tensor.clone() if shared else tensor).cpu().contiguous()
    return plain


def _write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=2, sort_keys=True)  # serialise first: a TypeError writes nothing
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _swap_into_place(staged: Path, dest: Path) -> None:
    """Replace directory ``dest`` with ``staged``.

    POSIX cannot rename a directory over a non-empty one, so the old directory is
    first moved aside to ``.NAME.old-PID``: a crash between the two renames leaves
    the previous output there, whole.
    """
    _fsync_dir(staged)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    staged.rename(dest)
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist renames in ``path`` (not possible on Windows, where it is skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
