"""``clipgrep compress ...``: the two-stage compression commands (options -> one library call -> render).

torch and open_clip are imported only inside the commands that train or export.
"""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import render
from .cli_errors import handle_errors
from .errors import ClipgrepError

compress_app = typer.Typer(
    help="Distil a small, fast student from a big CLIP teacher (Leaner and Faster, NAACL 2022).",
    no_args_is_help=True,
)


class ExportPrecision(str, Enum):
    both = "both"
    int8 = "int8"
    fp32 = "fp32"


class Split(str, Enum):
    all = "all"
    val = "val"
    test = "test"


ImageRootOption = Annotated[Path | None, typer.Option(
    help="Where the pairs' image paths start (default: the pairs file's dir), e.g. coco/ for Karpathy's "
         "val2014/... paths.", show_default=False)]


@compress_app.command("stage1")
@handle_errors
def stage1(
    teacher: Annotated[str, typer.Option(help=(
        "Teacher SPEC: ARCH:TAG (downloaded), ARCH@FILE, ARCH:TAG@FILE (local weights, TAG's preprocessing), "
        "a local open_clip dir, or ARCH:random."))],
    student: Annotated[str, typer.Option(help=(
        "Student: image=teacher|N|b32-6l|s32|timm:NAME, text=teacher|N, text_width=W, map=uniform|first, "
        "init=teacher|random|PATH; e.g. image=b32-6l,text=4."))],
    out: Annotated[Path, typer.Option(help="Output directory (checkpoints, cache, student/).")],
    images: Annotated[Path | None, typer.Option(help="Image folder or list file (for the image student).")]
    = None,
    texts: Annotated[str | None, typer.Option(help=(
        "Text file, one per line (for the text student); builtin:generic is a shipped corpus of 30,000 "
        "generated photo captions and queries."))] = None,
    images_from_index: Annotated[bool, typer.Option(
        "--images-from-index", help="Use the photos indexed with --model, and the teacher embeddings the index "
                                    "stored for them (no teacher pass over the images).")] = False,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="With --images-from-index: the installed model your photos are indexed with; it "
                              "must be the teacher.", show_default="the default model")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the larger of the two sets.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Items per tower per step (the InfoNCE negatives).")] = 64,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 1e-4,
    temperature: Annotated[float, typer.Option(help="InfoNCE temperature.")] = 0.07,
    queue: Annotated[int, typer.Option(help="Extra negatives: cached teacher embeddings of past batches.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and batch order.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints.")] = 100,
    device: Annotated[str, typer.Option(help="auto (CUDA with mixed precision when present), cpu, cuda.")] = "auto",
    max_steps: Annotated[int | None, typer.Option(help="Stop early (the schedule is unchanged).")] = None,
) -> None:
    """Stage 1: intra-modal contrastive distillation of each student tower from the teacher's.

    The image student learns from the teacher's image tower on unlabelled images, the text student
    from its text tower on texts alone. Re-running the same command resumes from the last checkpoint.

    \b
    Example:
      clipgrep compress stage1 --teacher ViT-B-32:laion2b_s34b_b79k --student image=b32-6l,text=4 \\
        --images ~/Pictures --texts captions.txt --out runs/s1
      clipgrep compress stage1 --teacher ViT-B-32:laion2b_s34b_b79k --student image=b32-6l,text=4 \\
        --images-from-index --model vit-b-32 --texts builtin:generic --out runs/mine
    """
    from .compress.stage1 import Stage1Config, run
    from .models import default_model_name

    if model and not images_from_index:
        raise ClipgrepError("--model only applies with --images-from-index", "add --images-from-index")
    config = Stage1Config(teacher=teacher, student=student, images=str(images) if images else None,
                          images_from_index=(model or default_model_name()) if images_from_index else None,
                          texts=texts, out=str(out), epochs=epochs,
                          batch_size=batch_size, lr=lr, temperature=temperature, queue_size=queue, seed=seed,
                          checkpoint_every=checkpoint_every, device=device, max_steps=max_steps)
    with render.training_progress(sys.stderr.isatty()) as on_progress:
        student_dir = run(config, on_progress=on_progress)
    render.note(f"stage 1 done: {student_dir} (export it with: clipgrep compress export {out} NAME)")


@compress_app.command("stage2")
@handle_errors
def stage2(
    teacher: Annotated[str, typer.Option(help="Teacher SPEC, as for stage1 (the KD target and 2a's text side).")],
    student: Annotated[Path, typer.Option(help="The stage-1 output dir (or its student/ local dir).")],
    pairs: Annotated[Path, typer.Option(help="Pairs: JSONL/CSV, COCO captions_*.json or a Karpathy "
                                             "dataset_*.json; trains on the split's training side.")],
    out: Annotated[Path, typer.Option(help="Output directory (checkpoints, cache, student/).")],
    epochs_image: Annotated[int, typer.Option(help="Step 2a: passes over the training images.")] = 5,
    epochs_text: Annotated[int, typer.Option(help="Step 2b: passes over the training images.")] = 5,
    steps: Annotated[str, typer.Option(help="Which steps to run: image,text (2a then 2b), image or text.")]
    = "image,text",
    batch_size: Annotated[int, typer.Option(help="Pairs per step: distinct images, one caption each.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 2e-5,
    temperature: Annotated[float, typer.Option(help="Contrastive temperature (fixed).")] = 0.01,
    kd_temperature: Annotated[float | None, typer.Option(
        help="KD temperature (unset: the same as --temperature).")] = None,
    weight_t2v: Annotated[float, typer.Option(help="Weight of L_t2v (0 switches a term off).")] = 1.0,
    weight_v2t: Annotated[float, typer.Option(help="Weight of L_v2t.")] = 1.0,
    weight_kd: Annotated[float, typer.Option(help="Weight of L_KD, distilling the teacher's similarities.")] = 1.0,
    weight_hn: Annotated[float, typer.Option(help="Weight of L_HN, the mined hard negatives.")] = 1.0,
    hard_negatives: Annotated[int, typer.Option(help="K: training images mined per caption.")] = 8,
    refresh_every: Annotated[int, typer.Option(help="Epochs between re-minings (0: once per step).")] = 1,
    val_fraction: Annotated[float, typer.Option(help="Images held out (as for compress eval --split val).")]
    = 0.1,
    seed: Annotated[int, typer.Option(help="Seed for the split and batch order.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints.")] = 100,
    device: Annotated[str, typer.Option(help="auto (CUDA with mixed precision when present), cpu, cuda.")] = "auto",
    max_steps: Annotated[int | None, typer.Option(help="Stop early (the schedule is unchanged).")] = None,
    image_root: ImageRootOption = None,
) -> None:
    """Stage 2: fine-tune the image tower, then the text tower, with KD and hard negatives.

    2a trains the student image tower against the teacher's text tower, 2b the student text tower
    against the 2a image tower; hard negatives are mined from the whole training set. Re-running the
    same command resumes from the last checkpoint.

    \b
    Example:
      clipgrep compress stage2 --teacher ViT-B-32:laion2b_s34b_b79k --student runs/s1 \\
        --pairs coco/pairs.jsonl --out runs/s2
    """
    from .compress.stage2 import Stage2Config, run

    config = Stage2Config(
        teacher=teacher, student=str(student), pairs=str(pairs), out=str(out), epochs_image=epochs_image,
        epochs_text=epochs_text, steps=tuple(s.strip() for s in steps.split(",")), batch_size=batch_size, lr=lr,
        temperature=temperature, kd_temperature=kd_temperature, weight_t2v=weight_t2v, weight_v2t=weight_v2t,
        weight_kd=weight_kd, weight_hn=weight_hn, hard_negatives_k=hard_negatives, refresh_every=refresh_every,
        val_fraction=val_fraction, seed=seed, checkpoint_every=checkpoint_every, device=device, max_steps=max_steps,
        image_root=str(image_root) if image_root else None)
    with render.training_progress(sys.stderr.isatty()) as on_progress:
        student_dir = run(config, on_progress=on_progress)
    render.note(f"stage 2 done: {student_dir} (export it with: clipgrep compress export {out} NAME)")


@compress_app.command("export")
@handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A stage output dir (its student/) or an open_clip local-dir.")],
    name: Annotated[str, typer.Argument(help="Model name to install the bundle under.")],
    precision: Annotated[ExportPrecision, typer.Option(
        help="'both' installs NAME (int8) and NAME-fp32.")] = ExportPrecision.both,
    replace: Annotated[bool, typer.Option("--replace", help="Replace models already installed.")] = False,
) -> None:
    """Export a trained student as a bundle, through the same parity gate as model conversion.

    \b
    Example:
      clipgrep compress export runs/stage2 tiny-student
      clipgrep index ~/Pictures --model tiny-student
    """
    from .compress.export import export_student

    with render.step_progress(f"exporting {name}", ("load model", "export ONNX", "quantize", "check parity",
                                                    "install")) as on_step:
        bundles = export_student(checkpoint, name, precision.value, replace=replace, on_progress=on_step)
    for bundle in bundles:
        render.note(f"installed {bundle.name} ({bundle.precision}, {render.human_bytes(bundle.size_bytes())})")


@compress_app.command("eval")
@handle_errors
def evaluate(
    pairs: Annotated[Path, typer.Option(help="Pairs: JSONL/CSV, COCO captions_*.json or a Karpathy "
                                             "dataset_*.json; several captions per image.")],
    model: Annotated[list[str], typer.Option("--model", "-m", help="Model to evaluate (repeat; the first is the "
                                                                   "reference, usually the teacher).")],
    split: Annotated[Split, typer.Option(help="'val': only the held-out images of the training split; 'test': "
                                              "a Karpathy file's test split (the paper's tables).")] = Split.all,
    image_root: ImageRootOption = None,
    seed: Annotated[int, typer.Option(help="Split seed (as used for training).")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Split fraction (as used for training).")] = 0.1,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per model.")] = False,
) -> None:
    """Recall@1/5/10 both ways, parameters, size and encode speed: a teacher-vs-student table.

    Everything is measured through the runtime bundle path, the code search uses.

    \b
    Example:
      clipgrep compress eval --pairs data/pairs.jsonl --split val -m teacher -m student
    """
    from .compress.eval import EvalConfig, compare
    from .compress.eval import evaluate as run_eval

    config = EvalConfig(pairs=str(pairs), models=tuple(model), split=split.value, seed=seed,
                        val_fraction=val_fraction, image_root=str(image_root) if image_root else None)
    rows = compare(run_eval(config, on_progress=render.note))
    if json_output:
        for row in rows:
            render.json_line(row)
    else:
        render.eval_table(rows)


@compress_app.command("auto")
@handle_errors
def auto(
    teacher: Annotated[str, typer.Option(help="The installed model your photos are indexed with, or a teacher SPEC "
                                              "(as for stage1).")],
    out: Annotated[Path, typer.Option(help="Output directory (stage-1 run, fidelity.json).")],
    name: Annotated[str, typer.Option(help="Model name to install the student under.")],
    images_from_index: Annotated[bool, typer.Option(
        "--images-from-index", help="Distil on the photos indexed with --model (the only source auto uses; "
                                    "the flag is accepted for symmetry with stage1).")] = True,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="The installed model the photos are indexed with.",
        show_default="--teacher when it is a model, else the default model")] = None,
    student: Annotated[str | None, typer.Option(help="Student SPEC, as for stage1.",
                                                   show_default="half the image layers, a third of the text layers")]
    = None,
    texts: Annotated[str, typer.Option(help="Texts for the text tower: a file, or builtin:generic.")]
    = "builtin:generic",
    epochs: Annotated[int, typer.Option(help="Passes over the larger of the two sets.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Items per tower per step.")] = 64,
    device: Annotated[str, typer.Option(help="auto (CUDA with mixed precision when present), cpu, cuda.")] = "auto",
    max_steps: Annotated[int | None, typer.Option(help="Stop early (the schedule is unchanged).")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace a model already installed as NAME.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Distil a student for your own library: stage 1 on the indexed photos, export, fidelity report.

    The report needs no labels: for generic text queries and for image queries sampled from the
    library, how much of the teacher's top 10 the student's top 10 holds, and the rank correlation.
    Rerunning resumes where it stopped.

    \b
    Example:
      clipgrep compress auto --teacher vit-b-32 --images-from-index --out runs/mine --name mine
      clipgrep index --model mine
    """
    from .compress.auto import AutoConfig, run_auto

    config = AutoConfig(teacher=teacher, out=str(out), name=name, model=model, student=student, texts=texts,
                        epochs=epochs, batch_size=batch_size, device=device, max_steps=max_steps, replace=replace)
    with render.training_progress(sys.stderr.isatty()) as on_training:
        result = run_auto(config, on_training, on_step=render.note)
    if json_output:
        render.json_line(result.report)
    else:
        render.fidelity_report(result.report)
    render.note(f"re-index with the student: clipgrep index --model {result.model}")
