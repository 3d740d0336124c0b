"""Student specs, layer maps, and students built from a tiny 4+4-block teacher (weights copied exactly)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.convert
torch = pytest.importorskip("torch")

from clipgrep.compress.stage1 import trained_towers
from clipgrep.compress.students import (
    StudentSpec,
    build_student,
    count_params,
    first_layers,
    parse_student,
    plan_student,
    teacher_model_cfg,
    uniform_layers,
)
from clipgrep.errors import ClipgrepError

from ..convert_support import register_arch, require_open_clip

TEACHER_ARCH = "clipgrep-tiny-teacher-4l"
# 160 px so that timm's 160 px test_vit fits as a replacement image tower; patch 32 keeps it at 26 tokens.
TEACHER_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 160, "layers": 4, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 4},
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Any:
    open_clip = require_open_clip()
    register_arch(TEACHER_ARCH, TEACHER_CONFIG, tmp_path_factory.mktemp("arch"))
    torch.manual_seed(0)
    model = open_clip.create_model(TEACHER_ARCH).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.6)  # not open_clip's initial value, so a copy is visible
    return model


def build(teacher: Any, text: str) -> tuple[Any, dict[str, Any]]:
    torch.manual_seed(1)
    return build_student(teacher, teacher_model_cfg(TEACHER_ARCH), parse_student(text))


def params(module: Any) -> dict[str, Any]:
    return dict(module.named_parameters())


def assert_same(a: Any, b: Any) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa), [k for k in pa if not torch.equal(pa[k], pb[k])]


def assert_blocks(student_blocks: Any, teacher_blocks: Any, layers: list[int]) -> None:
    assert len(student_blocks) == len(layers)
    for block, layer in zip(student_blocks, layers):
        assert_same(block, teacher_blocks[layer])


def block_params(width: int) -> int:
    """Parameters of one open_clip residual block: ln_1, attention (qkv + out), ln_2, 4x MLP."""
    return 12 * width * width + 13 * width


def embed(model: Any) -> tuple[Any, Any]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 160, 160, generator=generator)
    ids = torch.randint(1, 49000, (3, 77), generator=generator)
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(ids)


# --- layer maps --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "keep", "expected"), [
    (12, 4, [0, 4, 8, 11]), (12, 6, [0, 3, 5, 7, 9, 11]), (12, 2, [0, 11]), (12, 1, [0]),
    (12, 12, list(range(12))), (4, 2, [0, 3]), (4, 3, [0, 2, 3]),
])
def test_uniform_layers_spread_from_first_to_last(total: int, keep: int, expected: list[int]) -> None:
    assert uniform_layers(total, keep) == expected


@pytest.mark.parametrize("total", [2, 5, 12, 24])
def test_uniform_layers_are_distinct_sorted_and_keep_both_ends(total: int) -> None:
    for keep in range(2, total + 1):
        layers = uniform_layers(total, keep)
        assert len(layers) == keep and layers == sorted(set(layers))
        assert layers[0] == 0 and layers[-1] == total - 1


def test_first_layers_and_bad_counts() -> None:
    assert first_layers(12, 4) == [0, 1, 2, 3]
    for keep in (0, 13):
        for select in (uniform_layers, first_layers):
            with pytest.raises(ClipgrepError, match=f"cannot keep {keep} of the teacher's 12") as e:
                select(12, keep)
            assert "between 1 and 12" in e.value.hint


# --- spec parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("image=b32-6l,text=4", StudentSpec("teacher", 6, 4)),
    ("image=s32,text=text-4l", StudentSpec("timm:vit_small_patch32_224", None, 4)),
    (" text = 2 , image = 3 , map = first ", StudentSpec("teacher", 3, 2, "first")),
    ("image=ViT-S-32:6,init=random", StudentSpec("ViT-S-32", 6, None, init="random")),
    ("image=timm:vit_small_patch16_224,text=teacher,init=/w/vit=s.safetensors",
     StudentSpec("timm:vit_small_patch16_224", None, None, init="/w/vit=s.safetensors")),
    ("text=6", StudentSpec(text_layers=6)),
    ("image=3,text=4,text_width=24", StudentSpec("teacher", 3, 4, text_width=24)),
    ("text_width=16", StudentSpec(text_width=16)),
])
def test_parse_student_and_round_trip(text: str, expected: StudentSpec) -> None:
    spec = parse_student(text)
    assert spec == expected
    assert parse_student(str(spec)) == spec
    assert StudentSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(("text", "message"), [
    ("", "is not key=value"),
    ("b32-6l+text4", "is not key=value"),
    ("image=b32-6l,depth=4", "unknown key 'depth'"),
    ("image=s32,image=b32-6l", "image given twice"),
    ("image=", "is not key=value"),
    ("text=four", "text=four is not a number of blocks"),
    ("text=4l", "text=4l is not a number of blocks"),
    ("text=0", "at least one block"),
    ("image=0", "at least one block"),
    ("map=last", "unknown layer map 'last'"),
    ("text_width=wide", "text_width=wide is not a width"),
    ("text_width=0", "text_width=0 is not a width"),
    ("image=timm:vit_small_patch32_224:6", "cannot choose the number of blocks of a timm tower"),
    ("text=4,init=/w/vit.safetensors", "would load the image tower, but image=teacher keeps the teacher's"),
])
def test_parse_student_errors_say_how_to_fix(text: str, message: str) -> None:
    with pytest.raises(ClipgrepError, match=message) as e:
        parse_student(text)
    assert e.value.hint


def test_parsing_does_not_need_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from clipgrep.compress.students import parse_student; "
            "parse_student('image=s32,text=4'); sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False, cwd=Path(__file__).parents[2]).returncode == 0


# --- building from the tiny teacher -------------------------------------------------------------------


def test_truncated_student_copies_exactly_the_selected_blocks(teacher: Any) -> None:
    student, cfg = build(teacher, "image=2,text=2")
    assert cfg["vision_cfg"]["layers"] == 2 and cfg["text_cfg"]["layers"] == 2
    assert cfg["embed_dim"] == TEACHER_CONFIG["embed_dim"]
    assert teacher_model_cfg(TEACHER_ARCH)["vision_cfg"]["layers"] == 4  # the teacher's config is not touched
    assert_blocks(student.visual.transformer.resblocks, teacher.visual.transformer.resblocks, [0, 3])
    assert_blocks(student.transformer.resblocks, teacher.transformer.resblocks, [0, 3])
    # Everything outside the blocks is the teacher's, unchanged.
    teacher_params, student_params = params(teacher), params(student)
    outside = [k for k in student_params if ".resblocks." not in k]
    assert {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
            "visual.ln_pre.weight", "visual.ln_post.bias", "visual.proj", "token_embedding.weight",
            "positional_embedding", "ln_final.weight", "text_projection", "logit_scale"} <= set(outside)
    assert all(torch.equal(student_params[k], teacher_params[k]) for k in outside)
    assert torch.equal(student.attn_mask, teacher.attn_mask)
    image, text = embed(student)
    assert image.shape == text.shape == (3, TEACHER_CONFIG["embed_dim"])
    assert not student.training and student.visual.preprocess_cfg == teacher.visual.preprocess_cfg


def test_first_layer_map_copies_the_first_blocks(teacher: Any) -> None:
    student, _ = build(teacher, "image=3,text=1,map=first")
    assert_blocks(student.visual.transformer.resblocks, teacher.visual.transformer.resblocks, [0, 1, 2])
    assert_blocks(student.transformer.resblocks, teacher.transformer.resblocks, [0])


def test_teacher_kept_tower_is_identical(teacher: Any) -> None:
    student, cfg = build(teacher, "image=2,text=teacher")
    assert cfg["text_cfg"] == TEACHER_CONFIG["text_cfg"]
    (student_image, student_text), (teacher_image, teacher_text) = embed(student), embed(teacher)
    assert torch.equal(student_text, teacher_text)
    assert not torch.allclose(student_image, teacher_image)
    same, _ = build(teacher, "image=teacher,text=teacher,init=random")  # "teacher" towers ignore init
    assert_same(same, teacher)


def test_random_init_leaves_only_kept_towers_and_the_logit_scale_from_the_teacher(teacher: Any) -> None:
    student, _ = build(teacher, "image=teacher,text=2,init=random")
    assert_same(student.visual, teacher.visual)
    assert torch.equal(student.logit_scale, teacher.logit_scale)
    assert not torch.equal(student.token_embedding.weight, teacher.token_embedding.weight)
    assert not torch.equal(student.transformer.resblocks[0].attn.in_proj_weight,
                           teacher.transformer.resblocks[0].attn.in_proj_weight)


def test_narrow_text_tower_starts_random_with_the_teacher_head_width(teacher: Any) -> None:
    student, cfg = build(teacher, "image=2,text=3,text_width=16")
    assert cfg["text_cfg"] | {"width": 32, "heads": 2, "layers": 4} == TEACHER_CONFIG["text_cfg"]
    assert (cfg["text_cfg"]["width"], cfg["text_cfg"]["heads"], cfg["text_cfg"]["layers"]) == (16, 1, 3)
    assert student.token_embedding.weight.shape == (49408, 16)
    assert student.text_projection.shape == (16, TEACHER_CONFIG["embed_dim"])
    assert_blocks(student.visual.transformer.resblocks, teacher.visual.transformer.resblocks, [0, 3])
    assert trained_towers(parse_student("text_width=16")) == ("text",)
    # A width of the teacher's keeps the teacher's blocks; heads follow the head width (16 per head).
    same_width, cfg = build(teacher, "text=2,text_width=32")
    assert cfg["text_cfg"]["heads"] == 2
    assert_blocks(same_width.transformer.resblocks, teacher.transformer.resblocks, [0, 3])
    _, cfg = build(teacher, "text=2,text_width=48")
    assert cfg["text_cfg"]["heads"] == 3
    image, text = embed(student)
    assert image.shape == text.shape == (3, TEACHER_CONFIG["embed_dim"])


def test_parameter_counts_shrink_by_whole_blocks(teacher: Any) -> None:
    student, _ = build(teacher, "image=1,text=3")
    before, after = count_params(teacher), count_params(student)
    assert before["image"] - after["image"] == 3 * block_params(64)
    assert before["text"] - after["text"] == 1 * block_params(32)


def test_open_clip_arch_of_the_same_shape_starts_from_the_teacher(teacher: Any) -> None:
    spec = f"image={TEACHER_ARCH}:2,text=teacher"
    student, _ = build(teacher, spec)
    assert plan_student(teacher_model_cfg(TEACHER_ARCH), parse_student(spec)).image_layers == [0, 3]
    assert_blocks(student.visual.transformer.resblocks, teacher.visual.transformer.resblocks, [0, 3])


def test_timm_tower_loads_a_timm_checkpoint_and_projects_to_the_joint_dim(teacher: Any, tmp_path: Path) -> None:
    import timm  # imported by open_clip already, after the torchvision work-around
    from safetensors.torch import save_file

    torch.manual_seed(5)
    trunk = timm.create_model("test_vit", num_classes=7)  # the classifier head is dropped on load
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, tmp_path / "test_vit.safetensors")
    student, cfg = build(teacher, f"image=timm:test_vit,text=2,init={tmp_path / 'test_vit.safetensors'}")
    assert cfg["vision_cfg"]["timm_model_name"] == "test_vit" and cfg["vision_cfg"]["image_size"] == 160
    loaded = params(student.visual.trunk)
    assert all(torch.equal(loaded[k], v) for k, v in trunk.named_parameters() if not k.startswith("head."))
    assert student.visual.head.proj.out_features == TEACHER_CONFIG["embed_dim"]
    assert_blocks(student.transformer.resblocks, teacher.transformer.resblocks, [0, 3])  # text: from the teacher
    image, _ = embed(student)
    assert image.shape == (3, TEACHER_CONFIG["embed_dim"])


@pytest.mark.parametrize(("text", "message"), [
    ("image=5", "cannot keep 5 of the teacher's 4 blocks"),
    ("text=9", "cannot keep 9 of the teacher's 4 blocks"),
    ("image=ViT-Nope-32", "no architecture 'ViT-Nope-32'"),
    ("image=timm:vit_small_patch32_224", "takes 224px images but the teacher takes 160px"),
    ("image=2,init=/nonexistent/w.safetensors", "init checkpoint /nonexistent/w.safetensors does not exist"),
])
def test_build_errors_say_how_to_fix(teacher: Any, text: str, message: str) -> None:
    with pytest.raises(ClipgrepError, match=message) as e:
        build(teacher, text)
    assert e.value.hint


def test_teacher_model_cfg_of_an_unknown_architecture(tmp_path: Path) -> None:
    with pytest.raises(ClipgrepError, match="no architecture 'ViT-Nope-32'"):
        teacher_model_cfg("ViT-Nope-32")
    with pytest.raises(ClipgrepError, match="is not an open_clip local dir") as e:
        teacher_model_cfg(tmp_path)
    assert "written by clipgrep compress" in e.value.hint


def test_init_checkpoint_for_another_model_is_refused(teacher: Any, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"visual.proj": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(ClipgrepError, match="does not fit the student's image tower"):
        build(teacher, f"image=2,init={tmp_path / 'other.safetensors'}")


def test_vit_b_32_presets_structure() -> None:
    """Structure only: built on the meta device (no memory, no init), never run."""
    from clipgrep.convert.torch_env import import_open_clip

    open_clip = import_open_clip()
    cfg = teacher_model_cfg("ViT-B-32")
    with torch.device("meta"):
        teacher = open_clip.model.CLIP(**cfg)
        b32, b32_cfg = build_student(teacher, cfg, parse_student("image=b32-6l,text=4"))
        s32, _ = build_student(teacher, cfg, parse_student("image=s32,text=4"))
    assert (b32_cfg["vision_cfg"]["layers"], b32_cfg["text_cfg"]["layers"]) == (6, 4)
    assert s32.visual.trunk.embed_dim == 384 and s32.visual.head.proj.out_features == 512
    total = sum(count_params(teacher).values())
    # Six ViT-B blocks (width 768) and eight text blocks (width 512) fewer: 45.3M / 38.2M as in docs/stack.md §5.
    assert count_params(teacher) == {"image": 87_849_216, "text": 63_428_096}
    assert count_params(b32) == {"image": 87_849_216 - 6 * block_params(768),
                                 "text": 63_428_096 - 8 * block_params(512)}
    assert sum(count_params(b32).values()) / total == pytest.approx(0.552, abs=1e-3)
    assert sum(count_params(s32).values()) / total == pytest.approx(0.403, abs=1e-3)
