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

import dataclasses
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..convert import local_dir
from ..convert.source import ModelSource
from ..errors import ClipgrepError
from .checkpoint import load_training_state, save_local_dir
from .data import load_image_set, load_texts
from .generic_texts import BUILTIN_GENERIC, generic_texts
from .library import IndexedImages, check_made_by_teacher, indexed_images
from .loop import Optimisation, precision, restore_checkpoint, run_steps, save_checkpoint
from .losses import intra_modal_distill_loss
from .students import StudentSpec, build_student, parse_student, plan_student
from .teacher import (
    CacheProgress,
    cached_embeddings,
    image_decode_pool,
    load_image_batch,
    load_teacher,
)
from .training import (
    JsonConfig,
    check_counts,
    config_changes,
    data_digests,
    is_number,
    resolve_device,
    seed_everything,
    start_run_dir,
    tower_of,
)

__all__ = ["CHECKPOINT", "Stage1Config", "Stage1Progress", "run", "trained_towers"]

CHECKPOINT = "checkpoint.pt"
# Settings that do not change what training computes: a resume may differ in these.
RESUME_FREE = frozenset({"out", "cache_dir", "device", "checkpoint_every", "max_steps"})
_CACHE_BATCH = 256
_PROBE_TEXTS = 64


@dataclass(frozen=True)
class Stage1Config(JsonConfig):
    """Everything stage 1 needs; ``out/config.json`` holds the resolved copy.

    ``teacher`` is a teacher SPEC (``ModelSource.parse``), ``student`` a
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
    # An installed model whose index holds the teacher's embeddings of the user's photos:
    # they are the image targets (library.py), and the indexed files the image set.
    images_from_index: str | None = None

    def __post_init__(self) -> None:
        if self.images and self.images_from_index:
            raise ClipgrepError("both --images and --images-from-index name the image set",
                                "pass one of them")
        check_counts(self, {"epochs": 1, "batch_size": 2, "warmup_steps": 0, "queue_size": 0, "seed": 0,
                            "checkpoint_every": 1})
        for name in ("lr", "temperature"):
            if not is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise ClipgrepError(f"{name} must be a positive number, not {getattr(self, name)!r}",
                                    f"e.g. {name}={getattr(Stage1Config, name)}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
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
    towers, resume, items, indexed = _check_inputs(config, spec)
    out = Path(config.out)
    start_run_dir(out, config)
    seed_everything(config.seed)  # before the teacher: a random-init teacher draws from it
    teacher = load_teacher(config.teacher, config.device)
    if indexed is not None:  # before any long work: the stored vectors must be this teacher's
        check_made_by_teacher(indexed, teacher, config.teacher, items.get("text") or generic_texts(_PROBE_TEXTS))
    targets = {kind: indexed.vectors if kind == "image" and indexed is not None else
               cached_embeddings(teacher, kind, items[kind], config.cache_dir,  # type: ignore[arg-type]
                                 _CACHE_BATCH, on_progress)  # kind is "image"/"text"; _resolve set cache_dir
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
                 precision=precision(config.device))
    return save_local_dir(r.student.eval(), model_cfg, preprocess, out / local_dir.STAGE_STUDENT, extra)


def _check_inputs(config: Stage1Config, spec: StudentSpec
                  ) -> tuple[tuple[str, ...], Any, dict[str, list[Any]], IndexedImages | None]:
    """Everything that can be refused before a model loads: towers, resume state, data."""
    towers = trained_towers(spec)
    if not towers:
        raise ClipgrepError(f"the student ({spec}) is the teacher: nothing to train",
                            "shrink a tower, e.g. --student image=b32-6l,text=4")
    checkpoint = Path(config.out) / CHECKPOINT
    resume = _load_resume(checkpoint, config)
    indexed = indexed_images(config.images_from_index) if config.images_from_index and "image" in towers else None
    items = _load_items(config, towers, indexed)
    if resume is not None and resume.extra.get("data") != data_digests(items):
        raise ClipgrepError(f"the image or text set changed since {checkpoint} was written",
                            "resume with the same data, use another --out, or delete the checkpoint")
    return towers, resume, items, indexed


def _resolve(config: Stage1Config) -> tuple[Stage1Config, StudentSpec]:
    """Canonical specs, absolute paths and a concrete device, so configs compare by value."""
    spec = parse_student(config.student)
    absolute: dict[str, Any] = {name: os.path.abspath(Path(getattr(config, name)).expanduser())
                                for name in ("images", "texts", "out", "cache_dir")
                                if getattr(config, name) and getattr(config, name) != BUILTIN_GENERIC}
    absolute.setdefault("cache_dir", os.path.join(absolute["out"], "cache"))
    resolved = dataclasses.replace(config, teacher=ModelSource.parse(config.teacher).spec(),
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


def _load_items(config: Stage1Config, towers: tuple[str, ...], indexed: IndexedImages | None
                ) -> dict[str, list[Any]]:
    items: dict[str, list[Any]] = {}
    for kind, source in (("image", config.images or config.images_from_index), ("text", config.texts)):
        if kind not in towers:
            continue  # a frozen tower gets no data, even when some is given
        if source is None:
            flag = "--images or --images-from-index" if kind == "image" else f"--texts (or {BUILTIN_GENERIC})"
            raise ClipgrepError(f"the student's {kind} tower differs from the teacher's, so stage 1 needs "
                                f"{kind}s to distil it on", f"pass {flag}")
        if kind == "image":
            found: list[Any] = indexed.paths if indexed is not None else load_image_set(source)
        elif source == BUILTIN_GENERIC:
            found = generic_texts()
        else:  # a duplicate text would sit in its own batch as a negative identical to its positive
            found = list(dict.fromkeys(load_texts(source)))
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
    """The state of one training run (a ``loop.Task``): model, optimisation, samplers, queues, position."""

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
        c = self.config
        self.samplers = {kind: _Sampler(len(self.items[kind]), min(c.batch_size, len(self.items[kind])), c.seed, i)
                         for i, kind in enumerate(("image", "text")) if kind in self.towers}
        self.steps_per_epoch = max(s.per_pass for s in self.samplers.values())
        self.total_steps = c.epochs * self.steps_per_epoch
        self.queues = {kind: np.zeros(0, dtype=np.int64) for kind in self.towers}
        self.optimisation = Optimisation(self.student, lr=c.lr, weight_decay=c.weight_decay,
                                         warmup_steps=c.warmup_steps, total_steps=self.total_steps, device=c.device,
                                         trains=lambda name: tower_of(name) in self.towers)

    def restore(self, state: Any) -> None:
        import torch

        restore_checkpoint(state, self.student, self.optimisation)
        self.queues = {k: torch.as_tensor(v).numpy().astype(np.int64) for k, v in state.extra["queues"].items()}
        self.step = state.step

    def save(self) -> None:
        import torch

        extra = {"config": asdict(self.config), "data": data_digests(self.items),
                 "queues": {k: torch.from_numpy(q.copy()) for k, q in self.queues.items()},
                 "epoch": self.step // self.steps_per_epoch}
        save_checkpoint(Path(self.config.out) / CHECKPOINT, self.step, self.student, self.optimisation, extra)

    # --- loop.Task: stage 1's batches never depend on training, so every step may be prefetched

    def prepare(self, step: int, pool: ThreadPoolExecutor) -> None:
        pass

    def can_prefetch(self, step: int) -> bool:
        return True

    def group(self, step: int) -> str:
        return "stage1"

    def load_batch(self, step: int, pool: ThreadPoolExecutor) -> dict[str, tuple[np.ndarray, Any]]:
        """Each trained modality's (ids, model inputs) at ``step``."""
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
        self.optimisation.zero_grad()
        losses = {}
        for kind, (ids, inputs) in batch.items():
            with self.optimisation.autocast():
                encode = self.student.encode_image if kind == "image" else self.student.encode_text
                embeddings = encode(inputs.to(device, non_blocking=True))
            student = F.normalize(embeddings.float(), dim=-1)
            teacher = torch.from_numpy(self.targets[kind][ids]).to(device)
            losses[kind] = intra_modal_distill_loss(student, teacher, self.config.temperature,
                                                    self._queued(kind, ids))
        self.optimisation.step(sum(losses.values()))
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
    """Step until ``max_steps`` or the end (``loop.run_steps``); returns mean losses of the last epoch run."""
    stop = min(r.total_steps, r.config.max_steps or r.total_steps)
    items_per_step = sum(s.batch for s in r.samplers.values())

    def report(losses: dict[str, float], steps_per_s: float) -> None:
        if on_progress is not None:
            epoch = (r.step - 1) // r.steps_per_epoch + 1
            on_progress(Stage1Progress(r.step, r.total_steps, epoch, losses, steps_per_s * items_per_step))

    r.student.train()
    return run_steps(r, stop, r.config.checkpoint_every, report, image_decode_pool).get("stage1", {})
