"""All terminal output. stdout carries results; stderr carries conversation.

Nothing outside this module (and cli.py) writes to the terminal.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .bundle import Bundle
    from .errors import ClipgrepError
    from .models import ModelEntry


def error(e: ClipgrepError) -> None:
    """One line on stderr: what went wrong, and how to fix it."""
    line = f"clipgrep: error: {e.message}"
    if e.hint:
        line += f" ({e.hint})"
    print(" ".join(line.split()), file=sys.stderr)


def note(message: str) -> None:
    print(f"clipgrep: {message}", file=sys.stderr)


def json_line(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _columns(rows: Sequence[Sequence[str]]) -> Iterator[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        yield "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()


def models_table(entries: Sequence[ModelEntry], default: str) -> None:
    rows = [("NAME", "PRECISION", "DIM", "SIZE", "ARCH", "WEIGHTS")]
    for entry in entries:
        name = entry.name + (" *" if entry.name == default else "")
        if entry.bundle is None:
            rows.append((name, "-", "-", "-", "broken:", entry.problem or ""))
            continue
        b = entry.bundle
        provenance = b.manifest.get("provenance", {})
        rows.append((name, b.precision, str(b.embed_dim), human_bytes(b.size_bytes()),
                     str(provenance.get("arch", "?")), str(provenance.get("weights", "?"))))
    for line in _columns(rows):
        print(line)


def model_summary(entry: ModelEntry) -> dict[str, Any]:
    if entry.bundle is None:
        return {"name": entry.name, "path": str(entry.path), "problem": entry.problem}
    b = entry.bundle
    return {"name": b.name, "path": str(b.path), "bundle_id": b.bundle_id, "precision": b.precision,
            "embed_dim": b.embed_dim, "bytes": b.size_bytes(), "provenance": b.manifest.get("provenance", {})}


def model_info(bundle: Bundle) -> None:
    m = bundle.manifest
    provenance = m.get("provenance", {})
    pre = m["preprocess"]
    lines = [
        ("name", bundle.name),
        ("path", str(bundle.path)),
        ("bundle id", bundle.bundle_id),
        ("arch", str(provenance.get("arch", "?"))),
        ("weights", str(provenance.get("weights", "?"))),
        ("precision", bundle.precision),
        ("embed dim", str(bundle.embed_dim)),
        ("image input", f"{pre['size'][0]}x{pre['size'][1]} {pre['resize_mode']} {pre['interpolation']}"),
        ("tokenizer", f"{m['tokenizer']['kind']}, context {m['tokenizer']['context_length']}"),
    ]
    params = m.get("params")
    if params:
        lines.append(("parameters", f"image {params['image'] / 1e6:.1f}M, text {params['text'] / 1e6:.1f}M"))
    for name, entry in m["files"].items():
        lines.append((f"file {name}", human_bytes(entry["bytes"])))
    parity = m.get("parity")
    if parity:
        for key in ("image", "text", "image_jpeg_draft"):
            if key in parity:
                p = parity[key]
                lines.append((f"parity {key}", f"min cos {p['min_cos']:.6f}, mean {p['mean_cos']:.6f} (n={p['n']})"))
        lines.append(("token ids", "identical to open_clip" if parity.get("token_ids_identical") else "DIFFER"))
    for modality, q in m.get("quantization", {}).items():
        timings = ", ".join(f"{k} {v:.1f} ms" for k, v in q["ms_per_item"].items())
        lines.append((f"int8 {modality}", f"quantized {q['chosen']} ({timings})"))
    lines += [(f"{k}", str(v)) for k, v in provenance.items() if k not in ("arch", "weights")]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")


@contextmanager
def step_progress(title: str, steps: Sequence[str]) -> Iterator[Callable[[str], None]]:
    """A progress bar over named steps on a TTY; one line per step otherwise."""
    if not sys.stderr.isatty():
        yield lambda step: note(f"{title}: {step}")
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(title, total=len(steps))
        seen: list[str] = []

        def advance(step: str) -> None:
            if seen:
                progress.advance(task)
            seen.append(step)
            progress.update(task, description=f"{title}: {step}")

        yield advance
