"""The command line: options -> one library call -> render.

Imports here stay light (typer + stdlib) so that ``--help`` and shell
completion never load numpy, onnxruntime, lancedb or torch.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated

import click
import typer

from . import __version__, render
from .cli_commands import CONTEXT_SETTINGS, ClipgrepGroup, SearchCommand
from .cli_compress import compress_app
from .cli_errors import EXIT_ERROR, EXIT_NO_MATCH, handle_errors, output_failed
from .errors import ClipgrepError

app = typer.Typer(
    name="clipgrep",
    cls=ClipgrepGroup,
    context_settings=CONTEXT_SETTINGS,
    help="Semantic image search from the command line.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
models_app = typer.Typer(help="Add, list, inspect and remove models (clipgrep bundles).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(compress_app, name="compress")


def _version(value: bool) -> None:
    if value:
        print(f"clipgrep {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Semantic image search from the command line.

    State lives in $CLIPGREP_HOME (default: the platform data dir).
    """


def complete_model_names(incomplete: str) -> list[str]:
    """Installed model names, for TAB completion: a directory listing, nothing heavy."""
    from .paths import models_dir

    try:
        names = sorted(p.name for p in models_dir().iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    return [n for n in names if n.startswith(incomplete)]


ModelOption = Annotated[str | None, typer.Option("--model", "-m", help="Model name or bundle dir.",
                                                    show_default="the default model",
                                                    autocompletion=complete_model_names)]
LangOption = Annotated[str | None, typer.Option(
    "--lang", help="Query language (fr, ja...) for models that take one (NLLB); others ignore it.")]


class Engine(str, Enum):
    local = "local"
    ray = "ray"


@app.command("index")
@handle_errors
def index(
    roots: Annotated[list[str] | None, typer.Argument(
        help="Directories or image files to index (a file is remembered as a file, not a root). "
             "Default: every root and file indexed before, else the current dir. With --engine ray: "
             "folders (on every node) or object-store prefixes (s3://, gs://, az://).",
        show_default=False)] = None,
    model: ModelOption = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", "-x", help=(
        "gitignore-style pattern to skip (repeatable), remembered with the roots indexed (every root "
        "when none is given); .clipgrepignore files work too."))] = None,
    remove_exclude: Annotated[list[str] | None, typer.Option("--remove-exclude", help=(
        "Forget a remembered exclude, written as it was given (repeatable)."))] = None,
    prune: Annotated[bool, typer.Option("--prune", help=(
        "Drop the rows of indexed files that are still there but left out now (excluded, hidden, "
        "unreadable), and of roots that look unmounted; without it they are kept, with a warning."))] = False,
    hidden: Annotated[bool, typer.Option("--hidden", help="Include hidden files and directories.")] = False,
    follow_symlinks: Annotated[bool, typer.Option("--follow-symlinks", help="Follow symbolic links.")] = False,
    workers: Annotated[int | None, typer.Option(help="Decoding processes.", show_default="one per CPU")] = None,
    retry_skipped: Annotated[bool, typer.Option("--retry-skipped", help="Try files skipped before again.")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Exit if another index run holds the lock.")] = False,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar on stderr.",
                                                     show_default="on a terminal")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=(
        "List every skipped file and why, skipped by this run or an earlier one."))] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the run's report as JSON on stdout.")] = False,
    thumbnails: Annotated[bool, typer.Option("--thumbnails", help=(
        "Also make the thumbnails that 'clipgrep ui' and --preview show."))] = False,
    from_embeddings: Annotated[Path | None, typer.Option("--from-embeddings", metavar="DIR", help=(
        "Instead of walking ROOTS, import image embeddings computed elsewhere: clip-retrieval's inference "
        "output (img_emb/*.npy with metadata/*.parquet). Their paths may be URLs; no walk ever drops them."))]
    = None,
    engine: Annotated[Engine, typer.Option(help=(
        "local: this machine, into the local index. ray: a Ray cluster, into the table --table names "
        "(needs the ray extra)."))] = Engine.local,
    address: Annotated[str | None, typer.Option(help=(
        "With --engine ray: the cluster's head (HOST:6379, or 'auto' on a node of it)."),
        show_default="a new local cluster")] = None,
    table: Annotated[str | None, typer.Option(help=(
        "With --engine ray: the LanceDB table to write, a local path or s3://, gs://, az:// URI."))] = None,
    shard_size: Annotated[int, typer.Option(min=1, help=(
        "With --engine ray: images per commit; a killed run redoes at most one shard."))] = 10_000,
) -> None:
    """Index images under ROOTS, or update the index: only new, changed, moved and deleted files cost work.

    \b
    Examples:
      clipgrep index ~/Pictures /mnt/photos
      clipgrep index                       # refresh every root indexed before
      clipgrep index . -x 'raw/' -x '*.png'  # remembered for this root
      clipgrep index . --remove-exclude '*.png'
      clipgrep index --from-embeddings clip-out/ --model vit-b-32
      clipgrep index --engine ray s3://bkt/photos --table s3://bkt/db/photos
    """
    if engine == Engine.ray or table is not None or address is not None:
        if from_embeddings is not None:
            raise ClipgrepError("--from-embeddings imports into the local index, not with --engine ray",
                                "drop --engine, --table and --address")
        _index_with_ray(roots or [], model, engine, address, table, shard_size, exclude, hidden, follow_symlinks,
                        retry_skipped, verbose, json_output)
        return
    from .index.build import IndexOptions, update_index
    from .index.interrupt import IndexInterrupted
    from .index.scan import ScanOptions
    from .models import load_model

    if from_embeddings is not None:
        walk_only = {"ROOTS": roots, "--exclude": exclude, "--remove-exclude": remove_exclude, "--prune": prune,
                     "--hidden": hidden, "--follow-symlinks": follow_symlinks, "--retry-skipped": retry_skipped}
        given = next((name for name, value in walk_only.items() if value), None)
        if given:
            raise ClipgrepError(f"--from-embeddings walks no folder, so {given} does not apply",
                                "import and walk in two runs: clipgrep index --from-embeddings DIR; clipgrep index ROOTS")
    options = IndexOptions(scan=ScanOptions(excludes=tuple(exclude or ()), include_hidden=hidden,
                                            follow_symlinks=follow_symlinks),
                           remove_excludes=tuple(remove_exclude or ()), prune=prune,
                           workers=workers, retry_skipped=retry_skipped, wait_for_lock=not no_wait)
    show = sys.stderr.isatty() if progress is None else progress
    with render.step_progress("adding the default model", ("load model", "export ONNX", "quantize",
                                                             "check parity", "install")) as on_step:
        bundle = load_model(model, on_progress=on_step)
    on_wait = lambda: render.note("another index run holds the lock; waiting for it")
    try:
        if from_embeddings is not None:
            from .index.imported import ImportOptions, import_embeddings

            with render.import_progress(show) as on_import:
                imported = import_embeddings(from_embeddings, bundle=bundle, on_progress=on_import, on_wait=on_wait,
                                             options=ImportOptions(wait_for_lock=not no_wait))
        else:
            with render.index_progress(show) as on_progress:
                report = update_index([str(r) for r in roots or ()], bundle=bundle, options=options,
                                      on_progress=on_progress, on_wait=on_wait)
    except IndexInterrupted as stopped:
        render.note(f"interrupted: {stopped.kept} images kept; rerun to resume")
        raise typer.Exit(128 + stopped.signum) from None  # as a shell reports a process its signal ended
    if from_embeddings is not None:
        if json_output:
            render.import_report_json(imported)
        render.import_summary(imported)
    else:
        if json_output:
            render.index_report_json(report)
        render.index_summary(report, verbose)
    if thumbnails:
        from .thumbnails import make_index_thumbnails

        ready, failed = make_index_thumbnails(bundle.index_id, workers)
        render.note(f"{ready} thumbnails ready" + (f", {failed} could not be made" if failed else ""))


def _index_with_ray(sources: list[str], model: str | None, engine: Engine, address: str | None, table: str | None,
                    shard_size: int, exclude: list[str] | None, hidden: bool, follow_symlinks: bool,
                    retry_skipped: bool, verbose: bool, json_output: bool) -> None:
    from .engines.ray_index import RayIndexOptions, index_with_ray
    from .index.scan import ScanOptions
    from .models import load_model

    if engine != Engine.ray:
        raise ClipgrepError("--table and --address go with --engine ray", "add --engine ray")
    if table is None:
        raise ClipgrepError("--engine ray writes to a table named by --table",
                            "e.g. clipgrep index --engine ray ~/Pictures --table /data/clipgrep/photos")
    options = RayIndexOptions(address=address, shard_size=shard_size, retry_skipped=retry_skipped,
                              scan=ScanOptions(excludes=tuple(exclude or ()), include_hidden=hidden,
                                               follow_symlinks=follow_symlinks))
    with render.step_progress("adding the default model", ("load model", "export ONNX", "quantize",
                                                             "check parity", "install")) as on_step:
        bundle = load_model(model, on_progress=on_step)
    report = index_with_ray(sources, table, bundle, options,
                            on_shard=lambda done, total: render.note(f"shard {done}/{total} committed"))
    if json_output:
        render.json_line(asdict(report))
    render.ray_index_summary(report, verbose)


class PreviewProtocol(str, Enum):
    auto = "auto"
    kitty = "kitty"
    iterm = "iterm"
    sixel = "sixel"
    blocks = "blocks"


@app.command("search", cls=SearchCommand)
@handle_errors
def search(
    query: Annotated[list[str], typer.Argument(help=(
        "Text, or an image file, to search for. 'W:term' weights a term (e.g. '2:golden retriever', '-0.5:cat'); "
        "'text:...' forces text; a leading backslash keeps a literal 'N:'; after '--' every word is a term."),
        show_default=False)],
    add: Annotated[list[str] | None, typer.Option("--add", "-a", help="Add a term (text or image).")] = None,
    sub: Annotated[list[str] | None, typer.Option("--sub", "-s", help="Subtract a term (text or image).")] = None,
    top: Annotated[int | None, typer.Option("--top", "-k", help="How many results.",
                                               show_default="10, or all with --threshold")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", "-t",
                                                       help="Only scores >= this cosine (-1 to 1).")] = None,
    # A str, not a Path: pathlib would turn the prefix s3://bucket/dir of imported rows into s3:/bucket/dir.
    under: Annotated[str | None, typer.Option("--under", "-u", click_type=click.Path(), metavar="PATH", help=(
        "Only images inside this directory (or URL prefix, for imported rows)."))] = None,
    model: ModelOption = None,
    paths: Annotated[bool, typer.Option("--paths", "-p", help="Print paths only.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per result.")] = False,
    null: Annotated[bool, typer.Option("--null", "-0", help="End results with NUL instead of newline (xargs -0).")]
    = False,
    lang: LangOption = None,
    preview: Annotated[bool, typer.Option("--preview", "-P", help=(
        "Show thumbnails in the terminal (ignored when stdout is not a terminal)."))] = False,
    preview_protocol: Annotated[PreviewProtocol, typer.Option(help="Image protocol; auto reads the environment. "
                                                              "Implies --preview.")] = PreviewProtocol.auto,
    preview_height: Annotated[int, typer.Option(min=1, max=100, help="Thumbnail height in text rows.")] = 8,
    preview_grid: Annotated[bool, typer.Option("--preview-grid", help="Thumbnails in a grid (implies --preview).")]
    = False,
    table: Annotated[str | None, typer.Option(help=(
        "Search this LanceDB table ('clipgrep index --engine ray' wrote it: a local path or s3://, gs://, az:// "
        "URI) instead of the local index."))] = None,
) -> None:
    """Search the index: prints 'score<TAB>path' lines, best first. Exit 0 with results, 1 without, 2 on error.

    \b
    Examples:
      clipgrep search "a red bicycle at night"
      clipgrep search "2:golden retriever" --add ./pool.jpg --sub fruit -k 20
      clipgrep search sunset --under ~/Pictures/2024 --paths -0 | xargs -0 feh
      clipgrep search "a red bicycle" --preview-grid
    """
    from .ranking import search as run_search

    if paths and json_output:
        raise ClipgrepError("--paths and --json exclude each other", "pick one output format")
    show_preview = render.wants_preview(preview or preview_grid or preview_protocol != PreviewProtocol.auto,
                                        paths or json_output or null)
    if table is not None:
        from .table_search import search_table

        if under is not None:
            raise ClipgrepError("--under does not work with --table yet", "drop --under, or search the local index")
        hits = search_table(table, query, add=add or (), sub=sub or (), model=model, k=top, threshold=threshold,
                            language=lang)
    else:
        hits = run_search(query, add=add or (), sub=sub or (), model=model, k=top, threshold=threshold,
                          under=under, language=lang)
    if show_preview:
        render.preview_hits(hits, preview_protocol.value, preview_height, preview_grid)
    else:
        render.hits(hits, "json" if json_output else "paths" if paths else "scores", null)
    if threshold is not None and hits.left_out:
        render.note(f"{hits.left_out} more results score {threshold:g} or more; raise -k to see them")
    if not hits:
        raise typer.Exit(EXIT_NO_MATCH)


@app.command("status")
@handle_errors
def status(
    model: ModelOption = None,
    json_output: Annotated[bool, typer.Option("--json", help=(
        "Print as one JSON object; with --skipped, one object per file."))] = False,
    skipped: Annotated[bool, typer.Option("--skipped", help=(
        "List the files index runs skipped, as 'reason<TAB>path' lines, instead."))] = False,
    null: Annotated[bool, typer.Option("--null", "-0", help="With --skipped: end records with NUL, not newline.")]
    = False,
) -> None:
    """Show indexed roots (with excludes) and files, model, rows, skipped files, size, last run, search mode.

    \b
    Examples:
      clipgrep status
      clipgrep status --skipped --json | jq -r .reason | sort | uniq -c
    """
    from .status import index_status, skipped_files

    if skipped:
        render.skipped_files(skipped_files(model), "json" if json_output else "reasons", null)
        return
    if null:
        raise ClipgrepError("-0/--null goes with --skipped", "use: clipgrep status --skipped -0")
    info = index_status(model)
    if json_output:
        render.json_line(info)
    else:
        render.status(info)


@app.command("forget")
@handle_errors
def forget(root: Annotated[Path, typer.Argument(help=(
        "A root or file given to 'clipgrep index' before, or a folder or file inside a root."))]) -> None:
    """Stop indexing ROOT and drop its images from the index (files are not touched).

    A folder or file inside a root is excluded from that root from now on.
    """
    from .index.forget import forget_root

    render.forgotten(forget_root(str(root)))


class Shell(str, Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


@app.command("completions")
@handle_errors
def completions(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.", show_default=False)]) -> None:
    """Print the shell completion script (the README says where to put it)."""
    from .completions import completion_script

    sys.stdout.write(completion_script(shell.value))


@app.command("ui")
@handle_errors
def ui(
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port on 127.0.0.1; 0 picks a free one.")] = 0,
    model: ModelOption = None,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Only print the address.")] = False,
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback shows your photos to "
                                           "your network (the token still guards them).")] = "127.0.0.1",
    lang: LangOption = None,
) -> None:
    """Browse and search the index in a local web page (needs the ui extra, see the README).

    \b
    Examples:
      clipgrep ui
      clipgrep ui --port 8765 --no-browser
      clipgrep ui --model nllb-clip-base-siglip --lang fr
    """
    from .models import load_model
    from .paths import snapshot_dir
    from .snapshot import read_snapshot

    try:
        from .ui.server import is_loopback, serve
    except ImportError as e:
        raise ClipgrepError(f"clipgrep ui needs the ui extra ({e.name} is missing)",
                            "pip install 'clipgrep[ui]'") from None
    if not is_loopback(host):
        render.note(f"warning: listening on {host}: other machines can reach this page (the token still guards it)")
    bundle = load_model(model, auto_install=False)
    if read_snapshot(snapshot_dir(bundle.index_id)) is None:
        raise ClipgrepError(f"nothing is indexed with model {bundle.name} yet", "run: clipgrep index DIR")
    serve(bundle, snapshot_dir(bundle.index_id), host=host, port=port, open_browser=not no_browser, language=lang,
          on_ready=lambda url: render.note(f"serving the page at {url} (Ctrl-C stops it)"))


class Precision(str, Enum):
    int8 = "int8"
    fp32 = "fp32"


@models_app.command("add")
@handle_errors
def models_add(
    name: Annotated[str, typer.Argument(help="Name to install the model under.")],
    arch: Annotated[str | None, typer.Option(help="open_clip architecture, e.g. ViT-B-32, MobileCLIP-S1.")] = None,
    pretrained: Annotated[str | None, typer.Option(
        help="open_clip pretrained tag (downloaded); with --checkpoint, only its preprocessing is used.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Local weights file (.safetensors, .pt/.bin), a local open_clip dir, or a bundle dir to copy.")] = None,
    precision: Annotated[Precision, typer.Option(help="int8 is ~2x faster on CPU; fp32 is exact.")] = Precision.int8,
    random_init: Annotated[bool, typer.Option("--random-init", help="Random weights (for benchmarks and tests).")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Replace a model already installed under NAME.")] = False,
    from_source: Annotated[str | None, typer.Option(
        "--from", help="A published ONNX export (no torch needed): Hugging Face repo (immich-app/...) or local dir.")
    ] = None,
    revision: Annotated[str | None, typer.Option(help="With --from REPO: branch, tag or commit.")] = None,
) -> None:
    """Install a model as NAME: import a published ONNX export, or convert an open_clip model.

    \b
    Examples:
      clipgrep models add nllb-clip-base-siglip          (a name from: clipgrep models available)
      clipgrep models add b32 --from immich-app/ViT-B-32__laion2b-s34b-b79k
      clipgrep models add xlmr --from ./XLM-Roberta-Large-Vit-B-32
      clipgrep models add b32 --arch ViT-B-32 --pretrained laion2b_s34b_b79k
      clipgrep models add b32 --arch ViT-B-32 --checkpoint open_clip_model.safetensors
      clipgrep models add mine --checkpoint ./my-bundle
    """
    from .models import add_model

    steps = ("download", "read export", "quantize", "check parity", "install") if from_source else \
        ("load model", "export ONNX", "quantize", "check parity", "install")
    with render.step_progress(f"adding {name}", steps) as on_progress:
        bundle = add_model(name, arch=arch, pretrained=pretrained, checkpoint=checkpoint,
                           precision=precision.value, random_init=random_init, replace=replace,
                           from_source=from_source, revision=revision, on_progress=on_progress,
                           on_wait=render.waiting)
    render.note(f"installed {bundle.name} ({bundle.precision}, {render.human_bytes(bundle.size_bytes())}) "
                f"at {bundle.path}")


@models_app.command("list")
@handle_errors
def models_list(
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List installed models; * marks the default."""
    from .models import default_model_name, list_models

    entries = list_models()
    if json_output:
        for entry in entries:
            render.json_line(render.model_summary(entry))
    elif entries:
        render.models_table(entries, default_model_name())
    else:
        render.note("no models installed; the default model is added on first use, "
                    "or add one with: clipgrep models add NAME (see: clipgrep models available)")


@models_app.command("available")
@handle_errors
def models_available(
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List the published models clipgrep can fetch: languages, sizes, speed, licence, quality."""
    from .catalogue import CATALOGUE
    from .models import default_model_name
    from .paths import models_dir

    installed = {p.name for p in models_dir().iterdir()} if models_dir().is_dir() else set()
    if json_output:
        for entry in CATALOGUE:
            render.json_line({**entry.to_dict(), "installed": entry.name in installed})
    else:
        render.catalogue_table(CATALOGUE, installed, default_model_name())


@models_app.command("info")
@handle_errors
def models_info(
    name: Annotated[str, typer.Argument(help="Installed model name or bundle directory.",
                                        autocompletion=complete_model_names)],
    json_output: Annotated[bool, typer.Option("--json", help="Print the whole manifest as JSON.")] = False,
) -> None:
    """Show a model's architecture, sizes, precision, parity figures and provenance."""
    from .models import load_model

    bundle = load_model(name, auto_install=False)
    if json_output:
        render.json_line(bundle.manifest)
    else:
        render.model_info(bundle)


@models_app.command("remove")
@handle_errors
def models_remove(
    name: Annotated[str, typer.Argument(help="Installed model name.", autocompletion=complete_model_names)],
    purge: Annotated[bool, typer.Option("--purge", help=(
        "Also delete its index and caches (also works after a plain remove)."))] = False,
) -> None:
    """Delete an installed model; --purge deletes its index and caches too.

    Without --purge they stay, and a re-install of the same model reuses them.
    """
    from .models import remove_model

    render.removal(remove_model(name, purge=purge, on_wait=render.waiting))


def main() -> None:
    """The console script. Exits with ``os._exit`` once output is flushed: interpreter teardown
    (onnxruntime, numpy, lancedb finalisers) adds tens of ms, or ~0.3 s after lancedb, to every run."""
    try:
        app(prog_name="clipgrep")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    try:
        sys.stdout.flush()
    except OSError as e:  # output printed but still buffered (e.g. --version) fails only here
        code = output_failed(e) or code
    try:
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(code)


if __name__ == "__main__":
    main()
