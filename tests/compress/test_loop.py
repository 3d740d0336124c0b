"""The shared training loop on a toy task: resume is exact, checkpoints land on schedule, prefetch waits
for prepare where it must, losses average per group, CPU trains in fp32."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.convert
torch = pytest.importorskip("torch")

from clipgrep.compress.checkpoint import load_training_state
from clipgrep.compress.loop import (
    Optimisation,
    amp_dtype,
    precision,
    restore_checkpoint,
    run_steps,
    save_checkpoint,
)

STEPS_PER_EPOCH = 4


class ToyTask:
    """Least squares on data that is a pure function of the step, with dropout so the RNGs matter."""

    def __init__(self, out: Path, total: int = 12, prefetch_within_epoch: bool = False) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
        self.optimisation = Optimisation(self.model, lr=0.05, weight_decay=0.01, warmup_steps=2, total_steps=total,
                                         device="cpu")
        self.out, self.step, self.steps_per_epoch = out, 0, STEPS_PER_EPOCH
        self.prefetch_within_epoch = prefetch_within_epoch
        self.events: list[tuple[str, int]] = []
        self.loaded_on: dict[int, bool] = {}  # step -> loaded on the main thread (not prefetched)

    def prepare(self, step: int, pool: Any) -> None:
        self.events.append(("prepare", step))

    def can_prefetch(self, step: int) -> bool:
        return not self.prefetch_within_epoch or step % STEPS_PER_EPOCH != 0

    def group(self, step: int) -> str:
        return "even" if step // STEPS_PER_EPOCH % 2 == 0 else "odd"

    def load_batch(self, step: int, pool: Any) -> tuple[Any, Any]:
        self.events.append(("load", step))
        self.loaded_on[step] = threading.current_thread() is threading.main_thread()
        rng = np.random.default_rng(step)
        x = torch.from_numpy(rng.normal(size=(16, 3)).astype(np.float32))
        return x, x.sum(dim=1, keepdim=True)

    def train_step(self, batch: tuple[Any, Any]) -> dict[str, float]:
        x, y = batch
        self.optimisation.zero_grad()
        with self.optimisation.autocast():
            loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.optimisation.step(loss)
        self.step += 1
        return {"mse": float(loss.detach()), "step": float(self.step)}

    def save(self) -> None:
        self.events.append(("save", self.step))
        save_checkpoint(self.out / "checkpoint.pt", self.step, self.model, self.optimisation, {"toy": True})


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = ToyTask(tmp_path / "a")
    run_steps(whole, 12, checkpoint_every=5)
    first = ToyTask(tmp_path / "b")
    run_steps(first, 7, checkpoint_every=5)  # saves at 5 and at the stop, 7
    state = load_training_state(tmp_path / "b" / "checkpoint.pt")
    assert state.step == 7 and state.extra["toy"] is True and "scaler" in state.extra
    resumed = ToyTask(tmp_path / "b")
    restore_checkpoint(state, resumed.model, resumed.optimisation)
    resumed.step = state.step
    run_steps(resumed, 12, checkpoint_every=5)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.optimisation.scheduler.last_epoch == whole.optimisation.scheduler.last_epoch == 12


def test_checkpoints_follow_the_schedule_and_the_stop(tmp_path: Path) -> None:
    task = ToyTask(tmp_path)
    run_steps(task, 11, checkpoint_every=4)
    assert [step for event, step in task.events if event == "save"] == [4, 8, 11]


def test_a_batch_is_prefetched_only_where_the_task_allows(tmp_path: Path) -> None:
    task = ToyTask(tmp_path, prefetch_within_epoch=True)
    run_steps(task, 9, checkpoint_every=100)
    order = [event for event in task.events if event[0] != "save"]
    for step in range(9):
        if step % STEPS_PER_EPOCH == 0:  # an epoch starts: its batch waits for prepare(), on the main thread
            assert order.index(("load", step)) > order.index(("prepare", step)) and task.loaded_on[step]
        else:  # within an epoch: loaded a step ahead, in the prefetch thread
            assert not task.loaded_on[step], step


def test_losses_average_over_each_groups_last_epoch(tmp_path: Path) -> None:
    task = ToyTask(tmp_path)
    seen: list[float] = []
    means = run_steps(task, 10, checkpoint_every=100, on_step=lambda losses, rate: seen.append(rate))
    # steps 0-3 and 8-9 are "even", 4-7 "odd"; a group keeps its last STEPS_PER_EPOCH steps
    assert means["even"]["step"] == pytest.approx(np.mean([1, 2, 3, 4, 9, 10][-STEPS_PER_EPOCH:]))
    assert means["odd"]["step"] == pytest.approx(np.mean([5, 6, 7, 8]))
    assert len(seen) == 10 and all(rate > 0 for rate in seen)


def test_cpu_trains_in_fp32_without_loss_scaling(tmp_path: Path) -> None:
    task = ToyTask(tmp_path)
    assert amp_dtype("cpu") is None and precision("cpu") == "float32"
    assert task.optimisation.amp_dtype is None and not task.optimisation.scaler.is_enabled()
    frozen = ToyTask(tmp_path)
    trains_first = Optimisation(frozen.model, lr=0.1, weight_decay=0.0, warmup_steps=0, total_steps=1, device="cpu",
                                trains=lambda name: name.startswith("0."))
    assert [p.requires_grad for p in frozen.model.parameters()] == [True, True, False, False]
    assert trains_first.optimizer.param_groups[0]["params"]  # the weight decays, the bias does not


def test_run_steps_uses_the_pool_it_is_given(tmp_path: Path) -> None:
    task = ToyTask(tmp_path)
    pools: list[Any] = []

    def pool() -> ThreadPoolExecutor:
        pools.append(ThreadPoolExecutor(1))
        return pools[-1]

    original = task.load_batch
    task.load_batch = lambda step, p: (pools and p is pools[0]) and original(step, p)  # type: ignore[method-assign]
    run_steps(task, 2, checkpoint_every=100, pool=pool)
    assert len(pools) == 1 and task.step == 2
