"""Train a small CLIP teacher from scratch on a caption-image set (the generated shapes set, on a CPU).

``clipgrep compress`` needs a teacher to compress. Without downloads the only
teacher that knows anything is one trained here: an open_clip ``CLIP`` from
random init, the standard symmetric contrastive loss with a learnable logit
scale (clamped at 100, as open_clip_train does), AdamW with linear warm-up and
cosine decay. Each step takes a batch of distinct training images with one
random caption each: two captions of one image in a batch would be each
other's false negatives.

The set is meant to be small (the generated set is 64 px): all training images
are decoded once, with the runtime's own preprocessing
(``embed.preprocess.load_image``), into one float32 array, and all captions
tokenised once with the runtime tokenizer (``embed.tokenizer.ClipTokenizer``).

Output directory::

    config.json      the resolved TeacherTrainConfig (``TeacherTrainConfig.from_json`` reads it)
    checkpoint.pt    the resumable training state, rewritten every ``checkpoint_every`` steps
    teacher/         the model as an open_clip local dir; its config.json holds the run's
                     config, steps, final loss and held-out recall

A run finds ``checkpoint.pt`` and continues from it when every setting that
shapes training is the same (``out``, ``device``, ``checkpoint_every`` and
``max_steps`` may change). Batches are a pure function of (seed, step) and
``max_steps`` stops early without changing the LR schedule, so N steps then a
resume to M equals M steps in one go.
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from clipgrep.compress.checkpoint import load_training_state, save_local_dir
from clipgrep.compress.data import PairSet, load_pairs, split_pairs
from clipgrep.compress.loop import Optimisation, restore_checkpoint, run_steps, save_checkpoint
from clipgrep.compress.metrics import recall_at_k
from clipgrep.compress.training import (
    JsonConfig,
    check_counts,
    config_changes,
    data_digest,
    is_int,
    resolve_device,
    start_run_dir,
)
from clipgrep.convert.torch_env import import_open_clip
from clipgrep.errors import ClipgrepError

__all__ = ["CHECKPOINT", "TEACHER_DIR", "TINY_TEACHER_CFG", "TINY_TEACHER_IMAGE_SIZE", "TOKEN_EMBEDDING_STD",
           "TeacherProgress", "TeacherTrainConfig", "build_clip", "evaluate_torch", "train_teacher"]

CHECKPOINT = "checkpoint.pt"
TEACHER_DIR = "teacher"
# Settings that do not change what training computes: a resume may differ in these.
RESUME_FREE = frozenset({"out", "device", "checkpoint_every", "max_steps"})
# Decoded training pixels live in memory; past this the set is not the small one this is for.
MAX_PRELOAD_BYTES = 4 << 30
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# ViT-B/32 in miniature, which learns the generated shapes set (4k images, 64 px) in minutes on a
# 2-core CPU: 64 image tokens (64 px, patch 8) through 6 blocks, and a 12-block text tower like
# ViT-B/32's, so that a 4-block text student can be the paper's 2.9x faster. Text context 48 (the
# set's captions are at most 47 tokens). Three departures from open_clip's defaults, each measured
# on 3,000 generated images (chance-level recall without them after 600 steps): the ViT averages
# its tokens instead of reading a class token, the text attention has no causal mask, and both
# towers scale their residual branches by a learnable LayerScale starting at 0.1.
TINY_TEACHER_IMAGE_SIZE = 64
TINY_TEACHER_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": TINY_TEACHER_IMAGE_SIZE, "patch_size": 8, "width": 64, "layers": 6,
                   "head_width": 32, "pool_type": "avg", "ls_init_value": 0.1},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 12,
                 "no_causal_mask": True, "ls_init_value": 0.1},
}
# open_clip draws token embeddings with std 0.02 while each residual branch adds ~(2 * layers)**-0.5:
# the words are drowned out after one block and a deep text tower starts out blind to them (measured:
# stuck at chance-level recall for 600 steps). Drawn with this std instead, they survive.
TOKEN_EMBEDDING_STD = 0.5


@dataclass(frozen=True)
class TeacherTrainConfig(JsonConfig):
    """Everything teacher training needs; ``out/config.json`` holds the resolved copy.

    ``pairs`` is a caption-image file (``data.load_pairs``); training uses the
    train side of ``split_pairs(pairs, val_fraction, seed)`` and reports recall
    on the val side. ``model_cfg`` is an open_clip model config (``embed_dim``,
    ``vision_cfg``, ``text_cfg``); ``image_size`` becomes its vision
    ``image_size``. ``epochs`` count passes over the training images.
    ``max_steps`` stops early without changing the schedule. ``device``:
    "auto" (CUDA when available, with bf16/fp16 autocast), "cpu", "cuda"...

    >>> TeacherTrainConfig("shapes/pairs.jsonl", "runs/teacher")  # doctest: +SKIP
    """

    config_kind: ClassVar[str] = "teacher config"
    required_hint: ClassVar[str] = "give at least pairs and out"

    pairs: str
    out: str
    model_cfg: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(TINY_TEACHER_CFG))
    image_size: int = TINY_TEACHER_IMAGE_SIZE
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    seed: int = 0
    val_fraction: float = 0.1
    checkpoint_every: int = 200
    max_steps: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        check_counts(self, {"image_size": 8, "epochs": 1, "batch_size": 2, "warmup_steps": 0, "seed": 0,
                            "checkpoint_every": 1})
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ClipgrepError(f"lr must be a positive number, not {self.lr!r}", "e.g. lr=1e-3")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ClipgrepError(f"weight_decay must be >= 0, not {self.weight_decay!r}", "e.g. 0.1")
        if not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1:
            raise ClipgrepError(f"val_fraction must be in [0, 1), not {self.val_fraction!r}", "e.g. 0.1")
        if not self.out:
            raise ClipgrepError("no output directory given", "pass --out DIR")
        cfg = self.model_cfg
        if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), dict) for k in ("vision_cfg", "text_cfg")) \
                or not is_int(cfg.get("embed_dim")):
            raise ClipgrepError("model_cfg must be an open_clip model config with embed_dim, vision_cfg and "
                                "text_cfg", "start from teacher_training.TINY_TEACHER_CFG")
        size = cfg["vision_cfg"].get("image_size", self.image_size)
        if size != self.image_size:
            raise ClipgrepError(f"model_cfg's vision image_size {size!r} differs from image_size {self.image_size}",
                                "give the same size in both, or leave it out of model_cfg")
        # A private copy that carries the size: the caller's dict (and TINY_TEACHER_CFG) stay as they were.
        cfg = copy.deepcopy(cfg)
        cfg["vision_cfg"]["image_size"] = self.image_size
        object.__setattr__(self, "model_cfg", cfg)


@dataclass(frozen=True)
class TeacherProgress:
    """One finished step: ``losses`` ("contrastive", and the logit scale exp(s) after the step as
    "scale"), throughput of this run in pairs per second; shaped like the stages' reports."""

    step: int
    total_steps: int
    epoch: int
    losses: dict[str, float]
    items_per_s: float


Progress = Callable[[TeacherProgress], None]


def train_teacher(config: TeacherTrainConfig, on_progress: Progress | None = None) -> Path:
    """Train (or resume) a CLIP from scratch on ``config.pairs``; return ``<out>/teacher``, an open_clip local dir.

    With ``TINY_TEACHER_CFG`` on 4,030 generated images, 12 epochs on 2 CPU cores:
    about 6 minutes, held-out R@1 about 0.3 both ways over 970 images
    (``benchmarks/bench_compress.py``).

    >>> train_teacher(TeacherTrainConfig("shapes/pairs.jsonl", "runs/teacher", epochs=20))  # doctest: +SKIP
    PosixPath('runs/teacher/teacher')
    """
    import torch

    config = _resolve(config)
    out = Path(config.out)
    pairs = load_pairs(config.pairs)
    train, val = split_pairs(pairs, config.val_fraction, config.seed) if config.val_fraction else (pairs, None)
    resume = _load_resume(out / CHECKPOINT, config, train)
    start_run_dir(out, config)
    torch.manual_seed(config.seed)
    model = build_clip(config.model_cfg).to(config.device)
    preprocess = dict(import_open_clip().get_model_preprocess_cfg(model))
    r = _Run(config, model, _TrainSet.load(train, preprocess, config.model_cfg))
    if resume is not None:
        r.restore(resume)
    final_loss = _train(r, on_progress)
    model.eval()
    metrics = evaluate_torch(model, val, device=config.device) if val is not None and len(val) else None
    extra = {"stage": "teacher", "config": asdict(config), "steps": r.step, "total_steps": r.total_steps,
             "complete": r.step == r.total_steps, "resumed_from": None if resume is None else resume.step,
             "final_loss": final_loss, "logit_scale": float(model.logit_scale.detach().exp()),
             "train_images": len(train.images), "val_images": 0 if val is None else len(val.images),
             "val_recall": metrics}
    return save_local_dir(model, config.model_cfg, preprocess, out / TEACHER_DIR, extra)


def build_clip(model_cfg: dict[str, Any], token_embedding_std: float = TOKEN_EMBEDDING_STD) -> Any:
    """A randomly initialised open_clip ``CLIP`` for ``model_cfg`` (torch's global RNG), token
    embeddings drawn with ``token_embedding_std``, and its preprocess cfg set: the vision image
    size, OpenAI mean/std, bicubic shortest-edge resize.

    >>> build_clip(TINY_TEACHER_CFG).visual.image_size  # doctest: +SKIP
    (64, 64)
    """
    import torch

    open_clip = import_open_clip()
    cfg = copy.deepcopy(model_cfg)
    try:
        model = open_clip.model.CLIP(**cfg)
    except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as e:
        detail = str(e) or f"an {type(e).__name__} in open_clip"  # its own asserts have no message
        raise ClipgrepError(f"open_clip cannot build a CLIP from model_cfg: {detail}",
                            "check vision_cfg (width divisible by head_width) and text_cfg (width by heads, "
                            "pool_type first/last/argmax/eos)") from None
    torch.nn.init.normal_(model.token_embedding.weight, std=token_embedding_std)
    size = cfg["vision_cfg"].get("image_size", 224)
    open_clip.set_model_preprocess_cfg(model, {
        "size": size, "mode": "RGB", "mean": _OPENAI_MEAN, "std": _OPENAI_STD,
        "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0})
    return model


def evaluate_torch(model: Any, pairs: PairSet, *, batch_size: int = 256, ks: Sequence[int] = (1, 5, 10),
                   device: Any = None) -> dict[str, float]:
    """Retrieval recall@K (``metrics.recall_at_k``) of a torch open_clip model on ``pairs``.

    Pixels and tokens come from the runtime's preprocessing and tokenizer, with the
    model's own preprocess cfg and context length. Quick checks during development;
    a shipped model is measured through its bundle (``compress.eval``).

    >>> evaluate_torch(load_local_dir("runs/teacher/teacher")[0], val)["t2i_R@1"]  # doctest: +SKIP
    0.41
    """
    from clipgrep.compress.teacher import image_decode_pool, load_image_batch
    from clipgrep.embed.preprocess import PreprocessConfig

    device = device or next(model.parameters()).device
    cfg = PreprocessConfig.from_dict(import_open_clip().get_model_preprocess_cfg(model))
    tokens = _tokenizer(model.context_length).encode(pairs.captions)
    image_emb, text_emb = [], []
    with image_decode_pool() as pool:  # chunk by chunk: a large set never sits decoded in memory
        for start in range(0, len(pairs.images), batch_size):
            pixels = load_image_batch(pairs.images[start:start + batch_size], cfg, pool)
            image_emb.append(_encode(model.encode_image, pixels, device))
    for start in range(0, len(tokens), batch_size):
        text_emb.append(_encode(model.encode_text, tokens[start:start + batch_size], device))
    return recall_at_k(np.concatenate(text_emb), np.concatenate(image_emb), pairs.caption_image, ks)


def _encode(encode: Callable[..., Any], inputs: np.ndarray, device: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        return encode(torch.from_numpy(inputs).to(device), normalize=True).float().cpu().numpy()


@lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> Any:
    from clipgrep.convert.tokenizer_export import open_clip_bpe_path
    from clipgrep.embed.tokenizer import ClipTokenizer

    return ClipTokenizer.from_file(open_clip_bpe_path(), context_length=context_length)


def _resolve(config: TeacherTrainConfig) -> TeacherTrainConfig:
    """Absolute paths and a concrete device, so configs compare by value."""
    import dataclasses

    paths: dict[str, Any] = {name: os.path.abspath(Path(getattr(config, name)).expanduser()) for name in ("pairs", "out")}
    return dataclasses.replace(config, device=resolve_device(config.device), **paths)


def _load_resume(path: Path, config: TeacherTrainConfig, train: PairSet) -> Any:
    """The checkpoint to continue from, or None; refuses one written by another config or data set."""
    if not path.is_file():
        return None
    state = load_training_state(path)
    diffs = config_changes(state.extra.get("config", {}), config, RESUME_FREE)
    if diffs:
        raise ClipgrepError(f"{path} was written by a different teacher config ({'; '.join(diffs)})",
                            "resume with the same settings, use another --out, or delete the checkpoint")
    if state.extra.get("data") != _data_digest(train):
        raise ClipgrepError(f"the training pairs changed since {path} was written",
                            "resume with the same data, use another --out, or delete the checkpoint")
    return state


def _data_digest(pairs: PairSet) -> str:
    """Digest of the ordered (image, caption) pairs, image paths relative to the pairs file."""
    def name(path: Path) -> str:
        return path.relative_to(pairs.root).as_posix() if pairs.root and path.is_relative_to(pairs.root) else str(path)

    return data_digest((name(pairs.images[i]), caption) for caption, i in zip(pairs.captions, pairs.caption_image))


@dataclass(frozen=True, eq=False)
class _TrainSet:
    """The training split in memory: pixels [I, 3, H, W], tokens [T, L], each image's caption ids."""

    pixels: np.ndarray
    tokens: np.ndarray
    caption_ids: list[np.ndarray]
    digest: str

    @classmethod
    def load(cls, train: PairSet, preprocess: dict[str, Any], model_cfg: dict[str, Any]) -> _TrainSet:
        from clipgrep.compress.teacher import image_decode_pool, load_image_batch
        from clipgrep.embed.preprocess import PreprocessConfig

        cfg = PreprocessConfig.from_dict(preprocess)
        size = len(train.images) * 3 * cfg.height * cfg.width * 4
        if size > MAX_PRELOAD_BYTES:
            raise ClipgrepError(f"{len(train.images)} training images take {size / 2**30:.1f} GiB decoded, more "
                                "than teacher training holds in memory", "train the teacher on a smaller set")
        if len(train.images) < 2:
            raise ClipgrepError(f"only {len(train.images)} training image(s); contrastive training needs 2 or more",
                                "add images, or lower val_fraction")
        with image_decode_pool() as pool:
            pixels = load_image_batch(train.images, cfg, pool)
        context = model_cfg["text_cfg"].get("context_length", 77)
        tokens = _tokenizer(context).encode(train.captions)
        ids = [train.caption_ids_of(i) for i in range(len(train.images))]
        return cls(pixels, tokens, ids, _data_digest(train))


@lru_cache(maxsize=4)
def _permutation(seed: int, passes: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 0, passes]).permutation(n)


@dataclass(eq=False)
class _Run:
    """One training run (a ``loop.Task``): model, optimisation and position; batches are a function of the step."""

    config: TeacherTrainConfig
    model: Any
    data: _TrainSet
    step: int = 0

    def __post_init__(self) -> None:
        c = self.config
        n_images = len(self.data.pixels)
        self.batch = min(c.batch_size, n_images)
        self.steps_per_epoch = n_images // self.batch  # the last partial batch of a pass is dropped
        self.total_steps = c.epochs * self.steps_per_epoch
        self.optimisation = Optimisation(self.model, lr=c.lr, weight_decay=c.weight_decay,
                                         warmup_steps=c.warmup_steps, total_steps=self.total_steps, device=c.device)

    def batch_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, caption ids) of ``step``: distinct images, one random caption of each."""
        passes, k = divmod(step, self.steps_per_epoch)
        images = _permutation(self.config.seed, passes, len(self.data.pixels))[k * self.batch:(k + 1) * self.batch]
        picks = np.random.default_rng([self.config.seed, 1, step]).random(len(images))
        captions = np.array([ids[int(p * len(ids))] for ids, p in
                             zip((self.data.caption_ids[i] for i in images), picks)], dtype=np.int64)
        return images, captions

    # --- loop.Task: the set is in memory, so a batch is two fancy-indexing copies

    def prepare(self, step: int, pool: Any) -> None:
        pass

    def can_prefetch(self, step: int) -> bool:
        return True

    def group(self, step: int) -> str:
        return "teacher"

    def load_batch(self, step: int, pool: Any) -> tuple[Any, Any]:
        import torch

        images, captions = self.batch_at(step)
        return torch.from_numpy(self.data.pixels[images]), torch.from_numpy(self.data.tokens[captions])

    def train_step(self, batch: tuple[Any, Any]) -> dict[str, float]:
        import torch

        from clipgrep.compress.losses import contrastive_losses

        device = self.config.device
        pixels, tokens = (inputs.to(device, non_blocking=True) for inputs in batch)
        self.optimisation.zero_grad()
        with self.optimisation.autocast():
            image_emb = self.model.encode_image(pixels, normalize=True)
            text_emb = self.model.encode_text(tokens, normalize=True)
        t2i, i2t = contrastive_losses(text_emb.float(), image_emb.float(), 1.0 / self.model.logit_scale.exp())
        loss = (t2i + i2t) / 2
        self.optimisation.step(loss)
        with torch.no_grad():  # open_clip_train's clamp: a scale past 100 makes training unstable
            self.model.logit_scale.clamp_(0, math.log(100))
        self.step += 1
        return {"contrastive": float(loss.detach()), "scale": float(self.model.logit_scale.detach().exp())}

    def restore(self, state: Any) -> None:
        restore_checkpoint(state, self.model, self.optimisation)
        self.step = state.step

    def save(self) -> None:
        extra = {"config": asdict(self.config), "data": self.data.digest, "epoch": self.step // self.steps_per_epoch}
        save_checkpoint(Path(self.config.out) / CHECKPOINT, self.step, self.model, self.optimisation, extra)


def _train(r: _Run, on_progress: Progress | None) -> float | None:
    """Step until ``max_steps`` or the end (``loop.run_steps``); returns the mean loss of the last epoch run."""
    stop = min(r.total_steps, r.config.max_steps or r.total_steps)

    def report(losses: dict[str, float], steps_per_s: float) -> None:
        if on_progress is not None:
            epoch = (r.step - 1) // r.steps_per_epoch + 1
            on_progress(TeacherProgress(r.step, r.total_steps, epoch, losses, steps_per_s * r.batch))

    r.model.train()
    recent = run_steps(r, stop, r.config.checkpoint_every, report).get("teacher")
    return recent["contrastive"] if recent else None
