"""The command line: options -> one library call -> render.

Imports here stay light (typer + stdlib) so that ``--help`` and shell
completion never load numpy, onnxruntime, lancedb or torch.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from . import __version__, render
from .errors import ClipgrepError

F = TypeVar("F", bound=Callable[..., Any])

# Exit codes follow grep: 0 results, 1 no results, 2 error.
EXIT_ERROR = 2
DEBUG_ENV = "CLIPGREP_DEBUG"

app = typer.Typer(
    name="clipgrep",
    help="Semantic image search from the command line.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
models_app = typer.Typer(help="Add, list, inspect and remove models (clipgrep bundles).", no_args_is_help=True)
app.add_typer(models_app, name="models")


def handle_errors(command: F) -> F:
    """Render a ClipgrepError as one stderr line with exit 2; tracebacks only with CLIPGREP_DEBUG=1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ClipgrepError as e:
            if os.environ.get(DEBUG_ENV):
                raise
            render.error(e)
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # a bug: still one line, with the way to see more
            if os.environ.get(DEBUG_ENV):
                raise
            render.error(ClipgrepError(f"internal error: {type(e).__name__}: {e}",
                                       f"rerun with {DEBUG_ENV}=1 for a traceback and report it"))
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        print(f"clipgrep {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Semantic image search from the command line.

    State lives in $CLIPGREP_HOME (default: the platform data dir).
    """


class Precision(str, Enum):
    int8 = "int8"
    fp32 = "fp32"


@models_app.command("add")
@handle_errors
def models_add(
    name: Annotated[str, typer.Argument(help="Name to install the model under.")],
    arch: Annotated[Optional[str], typer.Option(help="open_clip architecture, e.g. ViT-B-32, MobileCLIP-S1.")] = None,
    pretrained: Annotated[Optional[str], typer.Option(
        help="open_clip pretrained tag (downloaded); with --checkpoint, only its preprocessing is used.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        help="Local weights file (.safetensors, .pt/.bin), a local open_clip dir, or a bundle dir to copy.")] = None,
    precision: Annotated[Precision, typer.Option(help="int8 is ~2x faster on CPU; fp32 is exact.")] = Precision.int8,
    random_init: Annotated[bool, typer.Option("--random-init", help="Random weights (for benchmarks and tests).")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Replace a model already installed under NAME.")] = False,
) -> None:
    """Convert an open_clip model into a bundle and install it as NAME.

    \b
    Examples:
      clipgrep models add b32 --arch ViT-B-32 --pretrained laion2b_s34b_b79k
      clipgrep models add b32 --arch ViT-B-32 --checkpoint open_clip_model.safetensors
      clipgrep models add mine --checkpoint ./my-bundle
    """
    from .models import add_model

    with render.step_progress(f"adding {name}", ("load model", "export ONNX", "quantize", "check parity",
                                                 "install")) as on_progress:
        bundle = add_model(name, arch=arch, pretrained=pretrained, checkpoint=checkpoint,
                           precision=precision.value, random_init=random_init, replace=replace,
                           on_progress=on_progress)
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
                    "or add one with: clipgrep models add NAME --arch ARCH --pretrained TAG")


@models_app.command("info")
@handle_errors
def models_info(
    name: Annotated[str, typer.Argument(help="Installed model name or bundle directory.")],
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
def models_remove(name: Annotated[str, typer.Argument(help="Installed model name.")]) -> None:
    """Delete an installed model."""
    from .models import remove_model

    path = remove_model(name)
    render.note(f"removed {name} ({path})")


def main() -> None:
    app(prog_name="clipgrep")


if __name__ == "__main__":
    sys.exit(main())
