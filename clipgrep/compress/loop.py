"""The training loop every ``clipgrep compress`` stage shares.

A stage says *what* to learn: its batches (a pure function of the step, so a
resume replays them exactly) and its loss. This module says *how*: AdamW with
open_clip_train's decay split and a warm-up + cosine schedule, CUDA autocast with
a GradScaler where fp16 needs one, resumable checkpoints, the next batch loaded
in a thread while the current one trains, and progress. open_clip's ``task/``
split and nanoGPT's single loop are the models.

A stage implements ``Task`` and calls ``run_steps``::

    class _Run:                                    # a Task
        def load_batch(self, step, pool): ...     # inputs of ``step``, read in a thread
        def train_step(self, batch): ...          # losses; calls self.optimisation.step(loss)
        def save(self): save_checkpoint(path, self.step, model, self.optimisation, extra)

    losses = run_steps(run, stop, checkpoint_every, on_step=report)
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .checkpoint import capture_rng_states, restore_rng_states, save_training_state
from .training import param_groups, warmup_cosine


def amp_dtype(device: str) -> Any:
    """The autocast dtype on ``device``: bf16 where the GPU has it, else fp16; None (fp32) on CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(dtype: Any) -> Any:
    """Autocast to ``dtype`` on CUDA (from ``amp_dtype``), or nothing for None."""
    import torch

    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def precision(device: str) -> str:
    """What a run on ``device`` trains in, for the record: "bfloat16", "float16" or "float32"."""
    dtype = amp_dtype(device)
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


class Optimisation:
    """AdamW, its schedule and mixed precision for the parameters ``trains(name)`` selects.

    The others are frozen (``requires_grad`` off). On CUDA the forward runs under
    autocast in bf16 where the GPU has it, else fp16 with loss scaling; on CPU in fp32.
    """

    def __init__(self, model: Any, *, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                 device: str, trains: Callable[[str], bool] | None = None) -> None:
        import torch

        self.amp_dtype = amp_dtype(device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.optimizer = torch.optim.AdamW(param_groups(model, weight_decay, trains), lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(min(warmup_steps, total_steps), total_steps))

    def autocast(self) -> Any:
        return autocast(self.amp_dtype)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, loss: Any) -> None:
        """Backward through ``loss`` and take one optimiser and schedule step."""
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()


def save_checkpoint(path: Path, step: int, model: Any, optimisation: Optimisation, extra: dict[str, Any]) -> None:
    """The resumable state of a run: weights, optimiser, schedule, loss scale, RNGs and the stage's ``extra``."""
    save_training_state(path, step, model.state_dict(), optimisation.optimizer.state_dict(),
                        optimisation.scheduler.state_dict(), capture_rng_states(),
                        {**extra, "scaler": optimisation.scaler.state_dict()})


def restore_checkpoint(state: Any, model: Any, optimisation: Optimisation | None = None) -> None:
    """Undo ``save_checkpoint`` onto a freshly built run (``optimisation`` None: weights and RNGs only,
    for a stage that builds its optimiser after reading the state)."""
    model.load_state_dict(state.model_state)
    if optimisation is not None:
        restore_optimisation(state, optimisation)
    restore_rng_states(state.rng_states)


def restore_optimisation(state: Any, optimisation: Optimisation) -> None:
    optimisation.optimizer.load_state_dict(state.optimizer_state)
    optimisation.scheduler.load_state_dict(state.scheduler_state)
    optimisation.scaler.load_state_dict(state.extra.get("scaler") or optimisation.scaler.state_dict())


class Task(Protocol):
    """What ``run_steps`` drives: one stage's run, positioned at ``step``."""

    step: int
    steps_per_epoch: int

    def prepare(self, step: int, pool: ThreadPoolExecutor) -> None:
        """Called before ``step`` trains (stage 2 enters a phase or mines negatives here)."""

    def can_prefetch(self, step: int) -> bool:
        """Whether ``step``'s batch may be loaded before ``prepare(step)`` has run."""

    def group(self, step: int) -> str:
        """The name under which ``step``'s losses are averaged (a phase, or one name for all)."""

    def load_batch(self, step: int, pool: ThreadPoolExecutor) -> Any: ...

    def train_step(self, batch: Any) -> dict[str, float]:
        """Train on ``batch``, advance ``step`` by one, return the losses to report."""

    def save(self) -> None: ...


def run_steps(task: Task, stop: int, checkpoint_every: int,
              on_step: Callable[[dict[str, float], float], None] | None = None,
              pool: Callable[[], Any] = contextlib.nullcontext) -> dict[str, dict[str, float]]:
    """Train from ``task.step`` to ``stop``; returns each group's mean losses over its last epoch run.

    ``on_step(losses, items_per_second_so_far)`` follows every step (``task.step`` is
    already the next one). A checkpoint is written every ``checkpoint_every`` steps and
    at ``stop``. ``pool`` makes the executor that batches decode images in.
    """
    recent: dict[str, list[dict[str, float]]] = {}
    start_step, started = task.step, time.perf_counter()
    with ThreadPoolExecutor(1) as prefetch, pool() as decode:
        upcoming: Future[Any] | None = None
        while task.step < stop:
            current = task.step
            task.prepare(current, decode)
            batch = upcoming.result() if upcoming is not None else task.load_batch(current, decode)
            following = current + 1
            ahead = following < stop and task.can_prefetch(following)
            upcoming = prefetch.submit(task.load_batch, following, decode) if ahead else None
            losses = task.train_step(batch)
            group = recent.setdefault(task.group(current), [])
            group.append(losses)
            del group[:-task.steps_per_epoch]
            if task.step % checkpoint_every == 0 or task.step == stop:
                task.save()
            if on_step is not None:
                on_step(losses, (task.step - start_step) / max(time.perf_counter() - started, 1e-9))
    return {name: {key: float(np.mean([line[key] for line in lines])) for key in lines[-1]}
            for name, lines in recent.items()}
