"""Stage 2 of ``clipgrep compress``: sequential fine-tuning with KD and hard negatives (docs/paper.md §4).

Two steps, in this order, each training one student tower on caption-image pairs:

- **2a (image)**: the student image tower against the *frozen teacher text tower*
  (its cached embeddings of the captions).
- **2b (text)**: the student text tower against the *frozen step-2a image tower*
  (its embeddings of every training image, computed once when 2b starts).

Each step minimises L = L_t2v + L_v2t + L_KD + L_HN (``losses.stage2_loss``;
a weight of 0 switches a term off and it is not computed). L_KD's target is
the teacher pair's similarity distribution, from cached teacher embeddings of
the same captions and images, never the student's own (the [3P] bug).

Hard negatives (L_HN) come from the whole training set, not the batch: for
each caption, the K training images nearest to it, minus its own image and any
image with an identical caption (``mining.mine_caption_negatives``). They are mined
at the start of every ``refresh_every``-th epoch of a step (0: once per step,
the static "pre-computed index" reading of the paper) for the captions the
coming epochs will use, and each mining rebuilds the index with the *current*
student:

- 2a: query = the caption's teacher text embedding, index = the current
  student's embeddings of all training images. The mined images are decoded
  and encoded in the same forward as the batch, so they get gradients: L_HN
  pushes each hard-negative image away from the caption, which is what the
  image tower has to learn (with frozen, pre-computed negatives only the
  positive would move). Cost: up to (1 + K) x the images per step.
- 2b: query = the caption's embedding by the current student text tower, index
  = the frozen 2a image embeddings. The anchor is the trainable caption, so
  the negatives need no gradient and their embeddings are exact, not stale.
  Each caption's nearest images (rather than each image's nearest captions) is
  the direction search uses: a text query ranking images.

Batches hold distinct images with one caption each (drawn per epoch), since two
captions of one image in a batch would be each other's false negatives. Train
on the training side of ``data.split_pairs(pairs, val_fraction, seed)``, so
``clipgrep compress eval --split val`` with the same seed and fraction is held out.

Output directory::

    config.json        the resolved Stage2Config (``Stage2Config.from_json`` reads it)
    checkpoint.pt      resumable state: step, 2a/2b, optimiser, mined negatives
    cache/             teacher embeddings of the training captions and images
    student/           the student as an open_clip local dir, with config, terms and final losses

Resuming works as in stage 1 (``stage1`` module doc): the same command carries
on from ``checkpoint.pt``, bit for bit on CPU, provided the settings that shape
training, the pairs and the input student are unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..convert import local_dir
from ..convert.source import ModelSource
from ..errors import ClipgrepError
from .checkpoint import (
    STAGE_CONFIG,
    WEIGHTS,
    load_local_dir,
    load_training_state,
    restore_rng_states,
    save_local_dir,
)
from .data import PairSet, load_pairs, split_pairs
from .loop import (
    Optimisation,
    amp_dtype,
    autocast,
    precision,
    restore_optimisation,
    run_steps,
    save_checkpoint,
)
from .losses import LossWeights, stage2_loss
from .mining import mine_caption_negatives
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

__all__ = ["CHECKPOINT", "STEPS", "HardNegativeProgress", "Stage2Config", "Stage2Progress", "run"]

CHECKPOINT = "checkpoint.pt"
STEPS = ("image", "text")  # 2a, 2b: the paper's order
RESUME_FREE = frozenset({"out", "cache_dir", "device", "checkpoint_every", "max_steps"})
_CACHE_BATCH = 256
_STEP_NAMES = {"image": "2a", "text": "2b"}


@dataclass(frozen=True)
class Stage2Config(JsonConfig):
    """Everything stage 2 needs; ``out/config.json`` holds the resolved copy.

    ``teacher`` is a teacher SPEC (``ModelSource.parse``); ``student`` a stage-1
    output directory or its ``student/`` local dir; ``pairs`` a JSONL/CSV of
    caption-image pairs (``data.load_pairs``). ``epochs_image``/``epochs_text`` are
    passes over the training images in steps 2a/2b, ``steps`` which of the two to
    run. ``weight_*`` scale L_t2v, L_v2t, L_KD, L_HN (0 switches a term off).
    ``hard_negatives_k`` images are mined per caption, anew every ``refresh_every``
    epochs (0: once per step). ``kd_temperature`` defaults to ``temperature``.
    ``max_steps`` stops early (counting both steps) without changing the schedule.

    >>> Stage2Config("ViT-B-32-quickgelu:openai", "runs/s1", "coco/pairs.jsonl", "runs/s2")  # doctest: +SKIP
    """

    config_kind: ClassVar[str] = "stage-2 config"
    required_hint: ClassVar[str] = "give teacher, student, pairs, out"

    teacher: str
    student: str
    pairs: str
    out: str
    epochs_image: int = 5
    epochs_text: int = 5
    batch_size: int = 64
    lr: float = 2e-5
    weight_decay: float = 0.05
    warmup_steps: int = 50
    temperature: float = 0.01
    kd_temperature: float | None = None
    weight_t2v: float = 1.0
    weight_v2t: float = 1.0
    weight_kd: float = 1.0
    weight_hn: float = 1.0
    hard_negatives_k: int = 8
    refresh_every: int = 1
    val_fraction: float = 0.1
    seed: int = 0
    checkpoint_every: int = 100
    device: str = "auto"
    max_steps: int | None = None
    steps: tuple[str, ...] = STEPS
    cache_dir: str | None = None
    image_root: str | None = None  # where the pairs' image paths start (default: the pairs file's dir)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))  # JSON gives a list
        check_counts(self, {"epochs_image": 1, "epochs_text": 1, "batch_size": 2, "warmup_steps": 0,
                            "hard_negatives_k": 1, "refresh_every": 0, "seed": 0, "checkpoint_every": 1})
        for name in ("lr", "temperature", "kd_temperature"):
            value = getattr(self, name)
            if not (value is None and name == "kd_temperature") and not (is_number(value) and value > 0):
                raise ClipgrepError(f"{name} must be a positive number, not {value!r}",
                                    f"e.g. {name}={getattr(Stage2Config, name) or 0.01}")
        for name in ("weight_decay", "weight_t2v", "weight_v2t", "weight_kd", "weight_hn"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ClipgrepError(f"{name} must be a number >= 0, not {getattr(self, name)!r}", "0 switches it off")
        if not any((self.weight_t2v, self.weight_v2t, self.weight_kd, self.weight_hn)):
            raise ClipgrepError("every loss weight is 0: nothing to train", "keep at least one term, e.g. t2v=1")
        if not (is_number(self.val_fraction) and 0 <= self.val_fraction < 1):
            raise ClipgrepError(f"val_fraction must be in [0, 1), not {self.val_fraction!r}", "e.g. 0.1")
        if not self.steps or self.steps != tuple(s for s in STEPS if s in self.steps):
            raise ClipgrepError(f"steps must be image, text or image,text, not {','.join(map(str, self.steps))!r}",
                                "stage 2 trains the image tower first, then the text tower (paper §3.2.2)")
        if not self.out:
            raise ClipgrepError("no output directory given", "pass --out DIR")

    @property
    def weights(self) -> LossWeights:
        return LossWeights(self.weight_t2v, self.weight_v2t, self.weight_kd, self.weight_hn)


@dataclass(frozen=True)
class Stage2Progress:
    """One finished step of training: ``phase`` "image" (2a) or "text" (2b); ``epoch`` counts within it.

    ``losses`` are the unweighted terms computed ("t2v", "v2t", "kd", "hn") and the weighted "total".
    """

    step: int
    total_steps: int
    epoch: int
    losses: dict[str, float]
    items_per_s: float
    phase: str


@dataclass(frozen=True)
class HardNegativeProgress:
    """Sent while an index for hard-negative mining (or 2b's frozen image side) is encoded."""

    phase: str
    kind: str
    done: int
    total: int

    @property
    def description(self) -> str:
        return f"stage {_STEP_NAMES[self.phase]}: student {self.kind} embeddings"


Progress = Callable[[Stage2Progress | HardNegativeProgress | CacheProgress], None]


def run(config: Stage2Config, on_progress: Progress | None = None) -> Path:
    """Run (or resume) stage 2 and return ``<out>/student``, an open_clip local dir.

    >>> run(Stage2Config("ViT-B-32-quickgelu:openai", "runs/s1", "pairs.jsonl", "runs/s2"))  # doctest: +SKIP
    PosixPath('runs/s2/student')
    """
    config, student_dir = _resolve(config)
    _check_dims(config, student_dir)
    train = _training_pairs(config)
    student_digest = _file_digest(student_dir / WEIGHTS)
    resume = _load_resume(Path(config.out) / CHECKPOINT, config, _pairs_digests(train), student_digest)
    out = Path(config.out)
    start_run_dir(out, config)
    seed_everything(config.seed)  # before the teacher: a random-init teacher draws from it
    teacher = load_teacher(config.teacher, config.device)
    kinds = ("text", "image") if config.weight_kd else ("text",)  # teacher images only feed L_KD
    items = {"text": train.captions, "image": train.images}
    # _resolve set cache_dir; kinds are "image"/"text"
    targets = {kind: cached_embeddings(teacher, kind, items[kind], config.cache_dir, _CACHE_BATCH,  # type: ignore[arg-type]
                                       on_progress)
               for kind in kinds}
    teacher_info = {"spec": config.teacher, "provenance": teacher.provenance,
                    "weights_blake2b": teacher.weights_digest}
    del teacher  # from here on only its cached embeddings are needed
    student, model_cfg, preprocess = load_local_dir(student_dir)
    r = _Run(config, train, student.to(config.device), targets, _tokenizer(student_dir), preprocess, student_digest,
             on_progress)
    if resume is not None:
        r.restore(resume)
    final_losses = _train(r, on_progress)
    extra = {"stage": 2, "config": asdict(config), "steps_run": list(config.steps),
             "terms": {name: bool(getattr(config, f"weight_{name}")) for name in ("t2v", "v2t", "kd", "hn")},
             "teacher": teacher_info, "init": {"student": str(student_dir), "weights_blake2b": student_digest,
                                               "stage_config": _stage_config(student_dir)},
             "train_split": {"images": len(train.images), "captions": len(train.captions)},
             "steps": r.step, "total_steps": r.total_steps, "complete": r.step == r.total_steps,
             "resumed_from": None if resume is None else resume.step, "final_losses": final_losses,
             "precision": precision(config.device)}
    return save_local_dir(r.student.eval(), model_cfg, preprocess, out / local_dir.STAGE_STUDENT, extra)


def _resolve(config: Stage2Config) -> tuple[Stage2Config, Path]:
    """Canonical teacher, absolute paths, a concrete device, and the student's local dir."""
    absolute: dict[str, Any] = {name: os.path.abspath(Path(getattr(config, name)).expanduser())
                                for name in ("student", "pairs", "out", "cache_dir", "image_root") if getattr(config, name)}
    absolute.setdefault("cache_dir", os.path.join(absolute["out"], "cache"))
    given = Path(absolute["student"])
    student_dir = local_dir.find_local_dir(given)
    if student_dir is None:
        raise ClipgrepError(f"{given} is neither a stage-1 output nor an open_clip local dir",
                            "pass the --out of clipgrep compress stage1 (or its student/ directory)")
    if student_dir == Path(absolute["out"]) / local_dir.STAGE_STUDENT:
        raise ClipgrepError(f"the student to fine-tune is {student_dir}, which stage 2 would overwrite",
                            "pass another --out")
    absolute["student"] = str(student_dir)
    resolved = dataclasses.replace(config, teacher=ModelSource.parse(config.teacher).spec(),
                                   device=resolve_device(config.device), **absolute)
    return resolved, student_dir


def _check_dims(config: Stage2Config, student_dir: Path) -> None:
    """Step 2a compares student image and teacher text embeddings directly: their sizes must agree."""
    from .students import source_model_cfg, teacher_model_cfg

    source = ModelSource.parse(config.teacher)
    teacher_dim = source_model_cfg(source)["embed_dim"]
    student_dim = teacher_model_cfg(student_dir)["embed_dim"]
    if student_dim != teacher_dim:
        raise ClipgrepError(f"the student embeds in {student_dim} dimensions, the teacher in {teacher_dim}",
                            "pass the student that stage 1 distilled from this teacher")


def _training_pairs(config: Stage2Config) -> PairSet:
    train, _ = split_pairs(load_pairs(config.pairs, config.image_root), config.val_fraction, config.seed)
    if len(train.images) < 2:
        raise ClipgrepError(f"the training split of {config.pairs} has {len(train.images)} image; contrastive "
                            "fine-tuning needs at least 2", "add pairs or lower --val-fraction")
    return train


def _load_resume(path: Path, config: Stage2Config, data: dict[str, str], student_digest: str) -> Any:
    """The checkpoint to continue from, or None; refuses one written by another config, data or student."""
    if not path.is_file():
        return None
    state = load_training_state(path)
    diffs = config_changes(state.extra.get("config", {}), config, RESUME_FREE)
    if state.extra.get("data") != data:
        diffs.append("the training pairs changed")
    if state.extra.get("student_blake2b") != student_digest:
        diffs.append("the input student's weights changed")
    if diffs:
        raise ClipgrepError(f"{path} was written by a different stage-2 run ({'; '.join(diffs)})",
                            "resume with the same settings and inputs, use another --out, or delete the "
                            "checkpoint to start over")
    return state


def _pairs_digests(pairs: PairSet) -> dict[str, str]:
    return data_digests({"image": pairs.images, "text": pairs.captions, "pairs": pairs.caption_image.tolist()})


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stage_config(student_dir: Path) -> Any:
    """What the stage that wrote the input student recorded about itself (None if nothing)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((student_dir / STAGE_CONFIG).read_text(encoding="utf-8")).get("config")
    return None


def _tokenizer(student_dir: Path) -> Any:
    from ..convert.torch_env import import_open_clip

    return import_open_clip().get_tokenizer(f"local-dir:{student_dir}")


@dataclass(frozen=True)
class _Batch:
    """One step's pairs (image ids, caption ids) and model inputs (2a: pixels of ``forward_ids``)."""

    images: np.ndarray
    captions: np.ndarray
    negatives: np.ndarray | None  # [B, K] image ids, -1 = none
    forward_ids: np.ndarray  # 2a: batch images then the mined ones not in the batch; 2b: empty
    inputs: Any  # 2a: pixels [len(forward_ids), 3, H, W]; 2b: token ids [B, L]


class _Run:
    """The state of one training run (a ``loop.Task``): model, current step (2a/2b), optimisation,
    mined negatives, position."""

    def __init__(self, config: Stage2Config, train: PairSet, student: Any, targets: dict[str, np.ndarray],
                 tokenizer: Any, preprocess: dict[str, Any], student_digest: str,
                 on_progress: Progress | None = None) -> None:
        from ..embed.preprocess import PreprocessConfig

        self.config, self.train, self.student, self.targets = config, train, student, targets
        self.tokenizer, self.pixels_cfg = tokenizer, PreprocessConfig.from_dict(preprocess)
        self.student_digest = student_digest
        self.on_progress = on_progress
        self.device = config.device
        self.batch = min(config.batch_size, len(train.images))
        self.steps_per_epoch = len(train.images) // self.batch
        self.epochs = {"image": config.epochs_image, "text": config.epochs_text}
        self.phase_steps = {phase: self.epochs[phase] * self.steps_per_epoch for phase in config.steps}
        self.total_steps = sum(self.phase_steps.values())
        self.captions_of = [train.caption_ids_of(i) for i in range(len(train.images))]
        self.amp_dtype = amp_dtype(self.device)  # mining encodes with it before any phase's optimisation exists
        self.optimisation: Optimisation | None = None  # one per phase, made as the phase starts
        self.step = 0
        self.phase: str | None = None
        self.hard_negatives: np.ndarray | None = None  # [n_captions, K], rows mined for the current window
        self.mined_for: tuple[str, int] | None = None  # (phase, first epoch of the window)
        self.image_bank: Any = None  # 2b: the frozen image tower's embeddings of all training images
        self._plans: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    # --- position and sampling --------------------------------------------------------------

    def position(self, step: int) -> tuple[str, int, int]:
        """(phase, epoch within it, step within it) of global ``step``."""
        for phase, n in self.phase_steps.items():
            if step < n:
                return phase, step // self.steps_per_epoch, step
            step -= n
        raise IndexError(step)

    def epoch_plan(self, phase: str, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(image order, caption drawn for each image): a pure function of (seed, phase, epoch)."""
        key = (phase, epoch)
        if key not in self._plans:
            rng = np.random.default_rng([self.config.seed, 2, STEPS.index(phase), epoch])
            order = rng.permutation(len(self.captions_of))
            draws = rng.random(len(self.captions_of))
            captions = np.array([ids[int(u * len(ids))] for ids, u in zip(self.captions_of, draws)], dtype=np.int64)
            if len(self._plans) >= 4:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = (order, captions)
        return self._plans[key]

    def batch_ids(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        phase, epoch, local = self.position(step)
        order, captions = self.epoch_plan(phase, epoch)
        k = local % self.steps_per_epoch
        images = order[k * self.batch:(k + 1) * self.batch]  # the last partial batch is dropped
        return images, captions[images]

    # --- phases, refreshes and checkpoints --------------------------------------------------

    def prepare(self, step: int, pool: ThreadPoolExecutor) -> None:
        """Enter 2a/2b and (re)mine hard negatives as ``step`` requires; a no-op mid-epoch."""
        phase, epoch, _ = self.position(step)
        if phase != self.phase:
            self.enter_phase(phase, pool)
        if not self.config.weight_hn:
            return
        every = self.config.refresh_every or self.epochs[phase]
        window = epoch - epoch % every
        if self.mined_for != (phase, window):
            self.mine(phase, range(window, min(window + every, self.epochs[phase])), pool)
            self.mined_for = (phase, window)

    def can_prefetch(self, step: int) -> bool:
        """Only within an epoch: the next epoch may mine new negatives or start 2b."""
        return self.position(step)[:2] == self.position(step - 1)[:2]

    def group(self, step: int) -> str:
        return self.position(step)[0]

    def enter_phase(self, phase: str, pool: ThreadPoolExecutor) -> None:
        """A fresh optimiser and schedule for the tower ``phase`` trains; every other parameter frozen."""
        import torch

        c = self.config
        self.phase, self.hard_negatives, self.mined_for = phase, None, None
        self.optimisation = Optimisation(self.student, lr=c.lr, weight_decay=c.weight_decay,
                                         warmup_steps=c.warmup_steps, total_steps=self.phase_steps[phase],
                                         device=self.device, trains=lambda name: tower_of(name) == phase)
        self.image_bank = None
        if phase == "text":  # the 2a image tower is frozen now: embed every training image once
            bank = self.encode("image", np.arange(len(self.train.images)), pool)
            self.image_bank = torch.from_numpy(bank).to(self.device)

    def mine(self, phase: str, epochs: range, pool: ThreadPoolExecutor) -> None:
        """Mine K images for each caption the epochs in ``epochs`` will use, with the current student."""
        captions = np.unique(np.concatenate([self.epoch_plan(phase, e)[1] for e in epochs]))
        if phase == "image":
            queries = np.asarray(self.targets["text"][captions])
            index = self.encode("image", np.arange(len(self.train.images)), pool)
        else:
            queries = self.encode("text", captions, pool)
            index = self.image_bank.cpu().numpy()
        table = np.full((len(self.train.captions), self.config.hard_negatives_k), -1, dtype=np.int64)
        table[captions] = mine_caption_negatives(queries, index, self.train, captions, self.config.hard_negatives_k)
        self.hard_negatives = table

    def encode(self, kind: str, ids: np.ndarray, pool: ThreadPoolExecutor) -> np.ndarray:
        """The student's L2-normalised float32 embeddings of training images or captions ``ids``, no grad."""
        import torch
        import torch.nn.functional as F

        out = []
        self.student.eval()
        with torch.no_grad(), autocast(self.amp_dtype):
            for start in range(0, len(ids), _CACHE_BATCH):
                chunk = ids[start:start + _CACHE_BATCH]
                out.append(F.normalize(self.forward(kind, self.inputs(kind, chunk, pool)).float(), dim=-1).cpu())
                if self.on_progress is not None:
                    self.on_progress(HardNegativeProgress(self.phase or kind, kind, start + len(chunk), len(ids)))
        self.student.train()
        return torch.cat(out).numpy()

    def restore(self, state: Any) -> None:
        self.student.load_state_dict(state.model_state)
        extra = state.extra
        with image_decode_pool() as pool:
            self.enter_phase(extra["phase"], pool)  # 2b re-embeds the images from the restored tower
        assert self.optimisation is not None  # enter_phase made it
        restore_optimisation(state, self.optimisation)
        if extra.get("hard_negatives") is not None:
            self.hard_negatives = extra["hard_negatives"].numpy().astype(np.int64)
            self.mined_for = (extra["mined_for"][0], int(extra["mined_for"][1]))
        restore_rng_states(state.rng_states)
        self.step = state.step

    def save(self) -> None:
        import torch

        # int32 halves the checkpoint's share for 500k captions x K; image ids stay far below 2**31.
        hard_negatives = None if self.hard_negatives is None else torch.from_numpy(self.hard_negatives.astype(np.int32))
        extra = {"config": asdict(self.config), "data": _pairs_digests(self.train),
                 "student_blake2b": self.student_digest, "phase": self.phase,
                 "epoch": self.position(self.step - 1)[1],
                 "hard_negatives": hard_negatives, "mined_for": list(self.mined_for) if self.mined_for else None}
        assert self.optimisation is not None  # saved only after a step, inside a phase
        save_checkpoint(Path(self.config.out) / CHECKPOINT, self.step, self.student, self.optimisation, extra)

    # --- one step ---------------------------------------------------------------------------

    def load_batch(self, step: int, pool: ThreadPoolExecutor) -> _Batch:
        """The pairs and model inputs of ``step`` (runs one step ahead in a thread, within an epoch)."""
        phase = self.position(step)[0]
        images, captions = self.batch_ids(step)
        negatives = self.hard_negatives[captions] if self.config.weight_hn else None  # type: ignore[index]  # mined when weight_hn
        if phase == "text":
            return _Batch(images, captions, negatives, np.zeros(0, np.int64), self.inputs("text", captions, pool))
        forward = images
        if negatives is not None:  # mined images join the forward, so L_HN's gradient reaches them
            mined = np.unique(negatives[negatives >= 0])
            forward = np.concatenate([images, mined[~np.isin(mined, images)]])
        return _Batch(images, captions, negatives, forward, self.inputs("image", forward, pool))

    def inputs(self, kind: str, ids: np.ndarray, pool: ThreadPoolExecutor) -> Any:
        import torch

        if kind == "image":
            return torch.from_numpy(load_image_batch([self.train.images[i] for i in ids], self.pixels_cfg, pool))
        return self.tokenizer([self.train.captions[i] for i in ids])

    def forward(self, kind: str, inputs: Any) -> Any:
        encode = self.student.encode_image if kind == "image" else self.student.encode_text
        return encode(inputs.to(self.device, non_blocking=True))

    def train_step(self, batch: _Batch) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        c, n, optimisation, phase = self.config, len(batch.images), self.optimisation, self.phase
        assert optimisation is not None and phase is not None  # prepare() entered the phase
        optimisation.zero_grad()
        with optimisation.autocast():
            embeddings = self.forward(phase, batch.inputs)
        embeddings = F.normalize(embeddings.float(), dim=-1)
        teacher_text = self.target("text", batch.captions)
        if self.phase == "image":  # 2a: trainable images against the frozen teacher text tower
            text, image, bank, bank_ids = teacher_text, embeddings[:n], embeddings, batch.forward_ids
        else:  # 2b: trainable captions against the frozen 2a image tower
            text, image = embeddings, self.image_bank[torch.from_numpy(batch.images).to(self.device)]
            bank, bank_ids = self.image_bank, None
        negatives, mask = _gather_negatives(bank, bank_ids, batch.negatives, len(self.train.images))
        loss, parts = stage2_loss(
            text, image, c.temperature, c.weights, teacher_text=teacher_text,
            teacher_image=self.target("image", batch.images) if c.weight_kd else None,
            kd_temperature=c.kd_temperature, hard_negatives=negatives, hard_negative_mask=mask)
        optimisation.step(loss)
        self.step += 1
        return parts

    def target(self, kind: str, ids: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(np.asarray(self.targets[kind][ids])).to(self.device)


def _gather_negatives(bank: Any, bank_ids: np.ndarray | None, negatives: np.ndarray | None,
                      n_images: int) -> tuple[Any, Any]:
    """Embeddings [B, K, D] of the mined image ids from ``bank`` (rows = ``bank_ids``, or all images), and the mask."""
    import torch

    if negatives is None:
        return None, None
    rows = negatives
    if bank_ids is not None:
        lookup = np.full(n_images, -1, dtype=np.int64)
        lookup[bank_ids] = np.arange(len(bank_ids))
        rows = np.where(negatives >= 0, lookup[np.maximum(negatives, 0)], -1)
    mask = torch.from_numpy(rows >= 0).to(bank.device)
    index = torch.from_numpy(np.maximum(rows, 0)).to(bank.device)
    return bank[index], mask


def _train(r: _Run, on_progress: Progress | None) -> dict[str, dict[str, float]]:
    """Step until ``max_steps`` or the end (``loop.run_steps``); returns each step's last-epoch mean losses."""
    stop = min(r.total_steps, r.config.max_steps or r.total_steps)

    def report(losses: dict[str, float], steps_per_s: float) -> None:
        if on_progress is not None:
            phase, epoch, _ = r.position(r.step - 1)
            on_progress(Stage2Progress(r.step, r.total_steps, epoch + 1, losses, steps_per_s * r.batch, phase))

    r.student.train()
    return run_steps(r, stop, r.config.checkpoint_every, report, image_decode_pool)
