"""The training plumbing shared by teacher training and both stages."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import pytest

torch = pytest.importorskip("torch")  # the tools here serve the torch training loops

from clipgrep.compress.training import (
    JsonConfig,
    data_digest,
    data_digests,
    is_int,
    is_number,
    param_groups,
    resolve_device,
    start_run_dir,
    tower_of,
    warmup_cosine,
    write_text_atomic,
)
from clipgrep.errors import ClipgrepError


def test_warmup_is_linear_then_cosine_decays_to_zero() -> None:
    factor = warmup_cosine(4, 14)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0
    assert factor(9) == pytest.approx(0.5)  # half-way through the decay
    assert factor(14) == pytest.approx(0.0, abs=1e-12) and factor(20) == pytest.approx(0.0, abs=1e-12)
    decay = [factor(s) for s in range(4, 15)]
    assert decay == sorted(decay, reverse=True)
    assert warmup_cosine(0, 10)(0) == 1.0  # no warm-up
    assert warmup_cosine(0, 10)(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = torch.nn.Linear(3, 3)
        self.token_embedding = torch.nn.Embedding(5, 3)
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.0))


def test_param_groups_freeze_what_is_not_trained_and_skip_decay_on_gains_and_biases() -> None:
    model = _Toy()
    decay, no_decay = param_groups(model, 0.1, lambda name: tower_of(name) == "image")
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [(3, 3)] and [p.shape for p in no_decay["params"]] == [(3,)]
    assert model.visual.weight.requires_grad and model.visual.bias.requires_grad
    assert not model.token_embedding.weight.requires_grad and not model.logit_scale.requires_grad
    everything = param_groups(model, 0.1)  # the teacher trains all of itself, logit scale without decay
    assert sum(len(g["params"]) for g in everything) == 4
    assert any(p is model.logit_scale for p in everything[1]["params"]) and model.token_embedding.weight.requires_grad


def test_tower_of_names() -> None:
    assert tower_of("visual.conv1.weight") == "image"
    assert tower_of("transformer.resblocks.0.attn.in_proj_weight") == tower_of("token_embedding.weight") == "text"
    assert tower_of("logit_scale") is None and tower_of("logit_bias") is None


def test_data_digest_sees_order_and_content() -> None:
    assert data_digest(["a", "b"]) == data_digest(iter(["a", "b"]))
    assert len({data_digest(["a", "b"]), data_digest(["b", "a"]), data_digest(["a", "b", "c"]), data_digest([])}) == 4
    assert data_digests({"image": [Path("/x/1.png")], "text": ["a"]}) == {
        "image": data_digest(["/x/1.png"]), "text": data_digest(["a"])}


def test_device_resolution() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ClipgrepError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ClipgrepError, match="torch sees no CUDA GPU") as e:
            resolve_device("cuda:1")
        assert "--device cpu" in e.value.hint


def test_config_number_checks() -> None:
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(0.5) and not is_number(False) and not is_number("1")


def test_write_text_atomic_replaces_and_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("old", encoding="utf-8")
    write_text_atomic(path, "new\n")
    assert path.read_text(encoding="utf-8") == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@dataclass(frozen=True)
class _RunConfig(JsonConfig):
    config_kind: ClassVar[str] = "toy config"
    required_hint: ClassVar[str] = "give out"
    out: str
    lr: float = 0.1


@dataclass(frozen=True)
class _OtherConfig(JsonConfig):
    config_kind: ClassVar[str] = "other config"
    required_hint: ClassVar[str] = "give pairs"
    pairs: str


def test_a_run_dir_is_new_empty_or_an_earlier_run_of_the_same_kind(tmp_path: Path) -> None:
    config = _RunConfig(str(tmp_path / "new"))
    start_run_dir(tmp_path / "new", config)  # new
    assert _RunConfig.from_json((tmp_path / "new" / "config.json").read_text()) == config
    (tmp_path / "new" / "checkpoint.pt").write_bytes(b"x")
    start_run_dir(tmp_path / "new", replace(config, lr=0.2))  # an earlier run of the same kind
    (tmp_path / "empty").mkdir()
    start_run_dir(tmp_path / "empty", config)
    for name, content in (("foreign", '{"mine": 1}'), ("other", _OtherConfig("p").to_json()), ("garbage", "{")):
        out = tmp_path / name
        out.mkdir()
        (out / "config.json").write_text(content)
        with pytest.raises(ClipgrepError, match="is not empty and is not a toy run directory"):
            start_run_dir(out, config)
        assert (out / "config.json").read_text() == content
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(ClipgrepError, match="not empty"):
        start_run_dir(tmp_path / "photos", config)
    with pytest.raises(ClipgrepError, match="is a file"):
        start_run_dir(tmp_path / "photos" / "a.jpg", config)
