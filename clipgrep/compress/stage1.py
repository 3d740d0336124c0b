"""Stage 1 of ``clipgrep compress``: intra-modal contrastive KD (docs/paper.md §3.2.1).

The student's image tower learns from the teacher's image tower on images alone,
its text tower from the teacher's text tower on texts alone: InfoNCE whose
positive is the teacher's embedding of the same input and whose negatives are the
teacher's embeddings of the rest of the batch, plus an optional FIFO queue of
earlier batches' teacher embeddings. Teacher embeddings are computed once and
cached (``teacher.cached_embeddings``), so the teacher never runs in the loop.
A tower the student keeps as the teacher's is frozen and gets no data.

Output directory::

    config.json        the resolved Stage1Config (``Stage1Config.from_json`` reads it)
    checkpoint.pt      the resumable training state, rewritten every ``checkpoint_every`` steps
    cache/             teacher embeddings (``cache_dir`` moves them, e.g. to share between runs)
    student/           the student as an open_clip local dir, with config, plan and final losses

A run finds ``checkpoint.pt`` and continues from it, provided every setting that
shapes training is the same; ``out``, ``cache_dir``, ``device``,
``checkpoint_every`` and ``max_steps`` may change. ``max_steps`` stops early
without changing the LR schedule, so N steps then a resume to M steps equals M
steps in one go (bit for bit on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import ClipgrepError
from .checkpoint import (
    STAGE_CONFIG,
    capture_rng_states,
    load_training_state,
    restore_rng_states,
    save_local_dir,
    save_training_state,
)
from .data import load_image_set, load_texts
from .losses import intra_modal_distill_loss
from .students import StudentSpec, build_student, parse_student, plan_student
from .teacher import (
    CacheProgress,
    cached_embeddings,
    format_teacher,
    image_decode_pool,
    load_image_batch,
    load_teacher,
    parse_teacher,
)
from .training import (
    JsonConfig,
    check_counts,
    config_changes,
    data_digests,
    param_groups,
    resolve_device,
    seed_everything,
    tower_of,
    warmup_cosine,
    write_text_atomic,
)

__all__ = ["CHECKPOINT", "Stage1Config", "Stage1Progress", "run", "trained_towers"]

CHECKPOINT = "checkpoint.pt"
# Settings that do not change what training computes: a resume may differ in these.
RESUME_FREE = frozenset({"out", "cache_dir", "device", "checkpoint_every", "max_steps"})
_CACHE_BATCH = 256


@dataclass(frozen=True)
class Stage1Config(JsonConfig):
    """Everything stage 1 needs; ``out/config.json`` holds the resolved copy.

    ``teacher`` is a teacher SPEC (``teacher.parse_teacher``), ``student`` a
    ``--student`` value (``students.parse_student``). ``images`` is a directory or
    list file (``data.load_image_set``), ``texts`` a file of one text per line;
    each is needed only when the student changes that tower. ``epochs`` count
    passes over the larger of the two sets (the smaller one cycles). ``max_steps``
    stops early without changing the schedule. ``device``: "auto" (CUDA when
    available, with bf16/fp16 autocast), "cpu", "cuda", "cuda:1"...

    >>> Stage1Config("ViT-B-32-quickgelu:openai", "image=b32-6l,text=4", "coco/train2014",
    ...              "coco/captions.txt", "runs/s1")  # doctest: +SKIP
    """

    config_kind: ClassVar[str] = "stage-1 config"
    required_hint: ClassVar[str] = "give teacher, student, images, texts, out"

    teacher: str
    student: str
    images: str | None
    texts: str | None
    out: str
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    temperature: float = 0.07
    queue_size: int = 0
    seed: int = 0
    checkpoint_every: int = 100
    device: str = "auto"
    max_steps: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_counts(self, {"epochs": 1, "batch_size": 2, "warmup_steps": 0, "queue_size": 0, "seed": 0,
                            "checkpoint_every": 1})
        for name in ("lr", "temperature"):
            if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) > 0:
                raise ClipgrepError(f"{name} must be a positive number, not {getattr(self, name)!r}",
                                    f"e.g. {name}={getattr(Stage1Config, name)}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ClipgrepError(f"weight_decay must be >= 0, not {self.weight_decay!r}", "e.g. 0.05")
        if not self.out:
            raise ClipgrepError("no output directory given", "pass --out DIR")


@dataclass(frozen=True)
class Stage1Progress:
    """One finished training step: ``losses`` per trained tower ("image", "text"), throughput of this run."""

    step: int
    total_steps: int
    epoch: int
    losses: dict[str, float]
    items_per_s: float


Progress = Callable[[Stage1Progress | CacheProgress], None]


def trained_towers(spec: StudentSpec) -> tuple[str, ...]:
    """The towers stage 1 trains: those whose architecture differs from the teacher's."""
    image = not (spec.image == "teacher" and spec.image_layers is None)
    text = spec.text_layers is not None or spec.text_width is not None
    return tuple(t for t, differs in (("image", image), ("text", text)) if differs)


def run(config: Stage1Config, on_progress: Progress | None = None) -> Path:
    """Run (or resume) stage 1 and return ``<out>/student``, an open_clip local dir.

    >>> run(Stage1Config("ViT-B-32:random", "text=4", None, "captions.txt", "runs/s1"))  # doctest: +SKIP
    PosixPath('runs/s1/student')
    """
    config, spec = _resolve(config)
    towers, resume, items = _check_inputs(config, spec)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / STAGE_CONFIG, config.to_json())
    seed_everything(config.seed)  # before the teacher: a random-init teacher draws from it
    teacher = load_teacher(config.teacher, config.device)
    # _resolve set cache_dir; towers are "image"/"text"
    targets = {kind: cached_embeddings(teacher, kind, items[kind], config.cache_dir, _CACHE_BATCH,  # type: ignore[arg-type]
                                       on_progress)
               for kind in towers}
    student, model_cfg = build_student(teacher.model, teacher.model_cfg, spec)
    r = _Run(config, towers, student.to(config.device), items, targets, teacher.tokenizer, teacher.preprocess_config)
    if resume is not None:
        r.restore(resume)
    extra = {"stage": 1, "config": asdict(config), "plan": plan_student(teacher.model_cfg, spec).to_dict(),
             "towers": list(towers), "teacher": {"spec": config.teacher, "provenance": teacher.provenance,
                                                 "weights_blake2b": teacher.weights_digest}}
    preprocess = teacher.preprocess
    del teacher  # frees its memory: from here on only the cached embeddings are needed
    final_losses = _train(r, on_progress)
    extra.update(steps=r.step, total_steps=r.total_steps, complete=r.step == r.total_steps,
                 resumed_from=None if resume is None else resume.step, final_losses=final_losses,
                 precision=str(r.amp_dtype).removeprefix("torch.") if r.amp_dtype else "float32")
    return save_local_dir(r.student.eval(), model_cfg, preprocess, out / "student", extra)


def _check_inputs(config: Stage1Config, spec: StudentSpec) -> tuple[tuple[str, ...], Any, dict[str, list[Any]]]:
    """Everything that can be refused before a model loads: towers, resume state, data."""
    towers = trained_towers(spec)
    if not towers:
        raise ClipgrepError(f"the student ({spec}) is the teacher: nothing to train",
                            "shrink a tower, e.g. --student image=b32-6l,text=4")
    checkpoint = Path(config.out) / CHECKPOINT
    resume = _load_resume(checkpoint, config)
    items = _load_items(config, towers)
    if resume is not None and resume.extra.get("data") != data_digests(items):
        raise ClipgrepError(f"the image or text set changed since {checkpoint} was written",
                            "resume with the same data, use another --out, or delete the checkpoint")
    return towers, resume, items


def _resolve(config: Stage1Config) -> tuple[Stage1Config, StudentSpec]:
    """Canonical specs, absolute paths and a concrete device, so configs compare by value."""
    spec = parse_student(config.student)
    absolute: dict[str, Any] = {name: os.path.abspath(Path(getattr(config, name)).expanduser())
                                for name in ("images", "texts", "out", "cache_dir") if getattr(config, name)}
    absolute.setdefault("cache_dir", os.path.join(absolute["out"], "cache"))
    resolved = dataclasses.replace(config, teacher=format_teacher(parse_teacher(config.teacher)),
                                   student=str(spec), device=resolve_device(config.device), **absolute)
    return resolved, spec


def _load_resume(path: Path, config: Stage1Config) -> Any:
    """The checkpoint to continue from, or None; refuses one written by another config."""
    if not path.is_file():
        return None
    state = load_training_state(path)
    diffs = config_changes(state.extra.get("config", {}), config, RESUME_FREE)
    if diffs:
        raise ClipgrepError(f"{path} was written by a different stage-1 config ({'; '.join(diffs)})",
                            "resume with the same settings, use another --out, or delete the checkpoint "
                            "to start over")
    return state


def _load_items(config: Stage1Config, towers: tuple[str, ...]) -> dict[str, list[Any]]:
    items: dict[str, list[Any]] = {}
    for kind, source in (("image", config.images), ("text", config.texts)):
        if kind not in towers:
            continue  # a frozen tower gets no data, even when some is given
        if source is None:
            flag = "--images" if kind == "image" else "--texts"
            raise ClipgrepError(f"the student's {kind} tower differs from the teacher's, so stage 1 needs "
                                f"{kind}s to distil it on", f"pass {flag}")
        # A duplicate text would sit in its own batch as a negative identical to its positive.
        found = load_image_set(source) if kind == "image" else list(dict.fromkeys(load_texts(source)))
        if len(found) < 2:
            raise ClipgrepError(f"{source} holds {len(found)} {kind}; contrastive KD needs at least 2",
                                f"add more {kind}s")
        items[kind] = found
    return items


@dataclass(frozen=True)
class _Sampler:
    """Batch ids of one modality at a global step: a pure function of (seed, modality, step).

    Each pass over the set is a fresh permutation; a pass drops its last partial
    batch, so every InfoNCE batch has the same number of negatives.
    """

    n_items: int
    batch: int
    seed: int
    stream: int

    @property
    def per_pass(self) -> int:
        return self.n_items // self.batch

    def ids(self, step: int) -> np.ndarray:
        passes, k = divmod(step, self.per_pass)
        return _permutation(self.seed, self.stream, passes, self.n_items)[k * self.batch:(k + 1) * self.batch]


@lru_cache(maxsize=4)
def _permutation(seed: int, stream: int, passes: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, passes]).permutation(n)


@dataclass(eq=False)
class _Run:
    """The state of one training run: model, optimiser, schedule, samplers, queues, position."""

    config: Stage1Config
    towers: tuple[str, ...]
    student: Any
    items: dict[str, list[Any]]
    targets: dict[str, np.ndarray]
    tokenizer: Any
    pixels_cfg: Any
    step: int = 0
    queues: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch

        c, device = self.config, self.config.device
        self.samplers = {kind: _Sampler(len(self.items[kind]), min(c.batch_size, len(self.items[kind])), c.seed, i)
                         for i, kind in enumerate(("image", "text")) if kind in self.towers}
        self.steps_per_epoch = max(s.per_pass for s in self.samplers.values())
        self.total_steps = c.epochs * self.steps_per_epoch
        self.queues = {kind: np.zeros(0, dtype=np.int64) for kind in self.towers}
        cuda = torch.device(device).type == "cuda"
        self.amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.optimizer = torch.optim.AdamW(param_groups(self.student, c.weight_decay, lambda name: tower_of(name) in self.towers), lr=c.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(min(c.warmup_steps, self.total_steps), self.total_steps))

    def restore(self, state: Any) -> None:
        import torch

        self.student.load_state_dict(state.model_state)
        self.optimizer.load_state_dict(state.optimizer_state)
        self.scheduler.load_state_dict(state.scheduler_state)
        self.scaler.load_state_dict(state.extra.get("scaler") or self.scaler.state_dict())
        restore_rng_states(state.rng_states)
        self.queues = {k: torch.as_tensor(v).numpy().astype(np.int64) for k, v in state.extra["queues"].items()}
        self.step = state.step

    def save(self) -> None:
        import torch

        extra = {"config": asdict(self.config), "data": data_digests(self.items), "scaler": self.scaler.state_dict(),
                 "queues": {k: torch.from_numpy(q.copy()) for k, q in self.queues.items()},
                 "epoch": self.step // self.steps_per_epoch}
        save_training_state(Path(self.config.out) / CHECKPOINT, self.step, self.student.state_dict(),
                            self.optimizer.state_dict(), self.scheduler.state_dict(), capture_rng_states(), extra)

    def load_batch(self, step: int, pool: ThreadPoolExecutor) -> dict[str, tuple[np.ndarray, Any]]:
        """Each trained modality's (ids, model inputs) at ``step``; runs one step ahead in a thread."""
        import torch

        batch = {}
        for kind, sampler in self.samplers.items():
            ids = sampler.ids(step)
            chosen = [self.items[kind][i] for i in ids]
            if kind == "image":
                inputs = torch.from_numpy(load_image_batch(chosen, self.pixels_cfg, pool))
            else:
                inputs = self.tokenizer(chosen)
            batch[kind] = (ids, inputs)
        return batch

    def train_step(self, batch: dict[str, tuple[np.ndarray, Any]]) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        device = self.config.device
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        self.optimizer.zero_grad(set_to_none=True)
        losses = {}
        for kind, (ids, inputs) in batch.items():
            with autocast:
                encode = self.student.encode_image if kind == "image" else self.student.encode_text
                embeddings = encode(inputs.to(device, non_blocking=True))
            student = F.normalize(embeddings.float(), dim=-1)
            teacher = torch.from_numpy(self.targets[kind][ids]).to(device)
            losses[kind] = intra_modal_distill_loss(student, teacher, self.config.temperature,
                                                    self._queued(kind, ids))
        self.scaler.scale(sum(losses.values())).backward()  # type: ignore[arg-type]  # never empty: a Tensor
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        for kind, (ids, _) in batch.items():
            if self.config.queue_size:
                self.queues[kind] = np.concatenate([self.queues[kind], ids])[-self.config.queue_size:]
        self.step += 1
        return {kind: float(loss.detach()) for kind, loss in losses.items()}

    def _queued(self, kind: str, ids: np.ndarray) -> Any:
        """Teacher embeddings of queued items, minus those in this batch (they would be false negatives)."""
        import torch

        queued = self.queues[kind]
        queued = queued[~np.isin(queued, ids)]
        return torch.from_numpy(self.targets[kind][queued]).to(self.config.device) if len(queued) else None


def _train(r: _Run, on_progress: Progress | None) -> dict[str, float]:
    """The loop: step until ``max_steps`` or the end, checkpointing; returns mean losses of the last epoch run."""
    stop = min(r.total_steps, r.config.max_steps or r.total_steps)
    recent: list[dict[str, float]] = []
    start_step, started = r.step, time.perf_counter()
    items_per_step = sum(s.batch for s in r.samplers.values())
    r.student.train()
    with ThreadPoolExecutor(1) as prefetch, image_decode_pool() as decode:
        upcoming = prefetch.submit(r.load_batch, r.step, decode) if r.step < stop else None
        while upcoming is not None:
            batch = upcoming.result()
            upcoming = prefetch.submit(r.load_batch, r.step + 1, decode) if r.step + 1 < stop else None
            losses = r.train_step(batch)
            recent = (recent + [losses])[-r.steps_per_epoch:]
            if r.step % r.config.checkpoint_every == 0 or r.step == stop:
                r.save()
            if on_progress is not None:
                rate = (r.step - start_step) * items_per_step / max(time.perf_counter() - started, 1e-9)
                epoch = (r.step - 1) // r.steps_per_epoch + 1
                on_progress(Stage1Progress(r.step, r.total_steps, epoch, losses, rate))
    return {kind: float(np.mean([line[kind] for line in recent])) for kind in r.towers} if recent else {}

