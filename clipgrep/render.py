"""All terminal output. stdout carries results; stderr carries conversation.

Nothing outside this module (and cli.py) writes to the terminal.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .errors import ClipgrepError

if TYPE_CHECKING:
    from .bundle import Bundle
    from .catalogue import CatalogueEntry
    from .engines.ray_index import RayIndexReport
    from .index.build import IndexProgress, IndexReport
    from .index.forget import Forgotten
    from .index.imported import ImportProgress, ImportReport
    from .models import ModelEntry, Removal
    from .ranking import Hit
    from .store import Skipped


def error(e: ClipgrepError) -> None:
    """One line on stderr: what went wrong, and how to fix it."""
    line = f"clipgrep: error: {e.message}"
    if e.hint:
        line += f" ({e.hint})"
    print(" ".join(line.split()), file=sys.stderr)


def note(message: str) -> None:
    print(f"clipgrep: {message}", file=sys.stderr)


def output_error(error: OSError) -> ClipgrepError:
    """What to say when stdout cannot take the output (`> /dev/full`, a full disk): not a bug."""
    return ClipgrepError(f"cannot write the output: {error.strerror or error}",
                         "free some space, or send the output elsewhere")


@contextmanager
def _stdout() -> Iterator[None]:
    """Wrap every write to stdout. A closed pipe stays a BrokenPipeError, on which the CLI edge stops
    quietly as grep does (`| head`); any other write error becomes ``output_error``. Flushes on the way
    out, since a redirected stdout is block-buffered and would only fail later, at exit."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        abandon_stdout()
        raise output_error(e) from None


def abandon_stdout() -> None:
    """Send what is still printed, or left in the buffer, to /dev/null: stdout cannot take it."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until the process exits


def json_line(obj: Any) -> None:
    with _stdout():
        print(json.dumps(obj, ensure_ascii=False))


def human_bytes(n: float) -> str:
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
    with _stdout():
        for line in _columns(rows):
            print(line)


def catalogue_table(entries: Sequence[CatalogueEntry], installed: set[str], default: str) -> None:
    """``models available``: one row per catalogue model; sources of the figures below the table."""
    rows = [("NAME", "LANGUAGES", "DIM", "DOWNLOAD", "INT8", "IMG/S", "MS/QUERY", "LICENCE", "QUALITY")]
    for e in entries:
        speed = e.speed or {}
        mark = (" *" if e.name == default else "") + (" (installed)" if e.name in installed else "")
        rows.append((e.name + mark, e.languages, str(e.embed_dim), _mb(e.download_mb), _mb(e.int8_mb),
                     _num(speed.get("img_per_s_batch16")), _num(speed.get("ms_per_query")), e.licence,
                     e.quality or "-"))
    with _stdout():
        for line in _columns(rows):
            print(line)
    sources = sorted({s for e in entries for s in (e.quality_source, (e.speed or {}).get("source")) if s})
    note("* default; figures from: " + "; ".join(sources) + "; add one with: clipgrep models add NAME")


def _catalogue_lines(repo: str | None) -> list[tuple[str, str]]:
    """What the catalogue knows about a model fetched from ``repo``: quality, speed, licence."""
    from .catalogue import find

    entry = find(repo) if repo else None
    if entry is None:
        return []
    speed = entry.speed or {}
    lines = [("licence", entry.licence),
             ("published quality", f"{entry.quality} ({entry.quality_source})" if entry.quality else "-")]
    if speed:
        lines.append(("measured speed", (f"{_num(speed.get('img_per_s_batch16'))} img/s (batch 16), "
                                         f"{_num(speed.get('ms_per_query'))} ms/query ({speed.get('source')})")))
    return lines


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MB"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def model_summary(entry: ModelEntry) -> dict[str, Any]:
    if entry.bundle is None:
        return {"name": entry.name, "path": str(entry.path), "problem": entry.problem}
    b = entry.bundle
    return {"name": b.name, "path": str(b.path), "bundle_id": b.bundle_id, "precision": b.precision,
            "embed_dim": b.embed_dim, "bytes": b.size_bytes(), "provenance": b.manifest.get("provenance", {})}


def waiting(what: str) -> None:
    note(f"{what} holds the lock; waiting for it to finish")


def removal(r: Removal) -> None:
    if r.path is not None:
        note(f"removed {r.name} ({r.path})")
    if r.shared_with:
        note(f"its index stays: {', '.join(r.shared_with)} has the same image tower and uses it")
    elif r.purged:
        note(f"deleted its index and caches ({human_bytes(r.data_bytes)})")
    elif r.data_bytes:
        note(f"its index and caches ({human_bytes(r.data_bytes)}) stay, for a re-install of the same model; "
             f"delete them with: clipgrep models remove {r.name} --purge")


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
        reference = parity.get("token_reference", "open_clip")  # imports: the export's tokenizer.json
        lines.append(("token ids", f"identical to {reference}" if parity.get("token_ids_identical") else "DIFFER"))
    for modality, q in m.get("quantization", {}).items():
        timings = ", ".join(f"{k} {v:.1f} ms" for k, v in q["ms_per_item"].items())
        reused = f", reused from {q['reused_from']}" if "reused_from" in q else ""
        lines.append((f"int8 {modality}", f"quantized {q['chosen']} ({timings}{reused})"))
    for k, v in provenance.items():
        if k == "source_files":
            lines.append(("source files", f"{len(v)}, sha256 of each in the manifest"))
        elif k not in ("arch", "weights") and v is not None:
            lines.append((k, str(v)))
    lines += _catalogue_lines(provenance.get("repo"))
    _key_values(lines)


def _key_values(lines: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in lines)
    with _stdout():
        for key, value in lines:
            print(f"{key.ljust(width)}  {value}")


@contextmanager
def step_progress(title: str, steps: Sequence[str]) -> Iterator[Callable[[str], None]]:
    """A progress bar over named steps on a TTY (one line per step otherwise), shown from the first step on."""
    if not sys.stderr.isatty():
        yield lambda step: note(f"{title}: {step}")
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=True)
    task = progress.add_task(title, total=len(steps))
    seen: list[str] = []

    def advance(step: str) -> None:
        if not seen:
            progress.start()
        else:
            progress.advance(task)
        seen.append(step)
        progress.update(task, description=f"{title}: {step}")

    try:
        yield advance
    finally:
        if seen:
            progress.stop()


def _write_path_line(prefix: str, path: str, end: bytes) -> None:
    """Write a path exactly as the filesystem names it (non-UTF-8 bytes included)."""
    out = sys.stdout.buffer
    out.write(prefix.encode())
    out.write(os.fsencode(path))
    out.write(end)


def hits(results: Sequence[Hit], fmt: str, null: bool) -> None:
    """Search results on stdout: ``score<TAB>path`` (default), ``paths``, or ``json`` lines."""
    end = b"\0" if null else b"\n"
    with _stdout():
        sys.stdout.flush()
        for hit in results:
            if fmt == "json":
                line = json.dumps({"score": round(hit.score, 6), "path": hit.path}, ensure_ascii=False)
                # A non-UTF-8 name holds lone surrogates; backslashreplace writes them as JSON \udcXX escapes.
                sys.stdout.buffer.write(line.encode("utf-8", "backslashreplace") + end)
            elif fmt == "paths":
                _write_path_line("", hit.path, end)
            else:
                _write_path_line(f"{hit.score:.4f}\t", hit.path, end)


def wants_preview(requested: bool, other_format: bool) -> bool:
    """Previews only on a terminal: in a pipe they are dropped with a warning, so scripts get plain lines."""
    if not requested:
        return False
    if not sys.stdout.isatty():
        note("warning: --preview ignored: stdout is not a terminal")
        return False
    if other_format:
        from .errors import ClipgrepError

        raise ClipgrepError("--preview shows scores and paths itself", "drop --paths, --json or --null")
    return True


def preview_hits(results: Sequence[Hit], protocol: str, rows: int, grid: bool) -> None:
    """Each result as a thumbnail beside (or, in a grid, above) its score and path."""
    from .preview import render_previews, screen_for

    sys.stdout.flush()
    screen = screen_for(protocol, rows, os.environ, sys.stdout.fileno())
    sys.stdout.buffer.write(render_previews(results, screen, grid=grid))
    sys.stdout.buffer.flush()


def index_summary(report: IndexReport, verbose: bool) -> None:
    parts = [f"{report.added} added", f"{report.updated} updated", f"{report.reused} moved/copied",
             f"{report.removed} removed", f"{report.unchanged} unchanged"]
    skipped = len(report.skipped)
    if skipped:
        parts.append(f"{skipped} skipped" + ("" if verbose else " (--verbose lists them)"))
    if report.kept:
        parts.append(f"{report.kept} kept")
    note(f"{report.rows} images indexed ({', '.join(parts)}) in {report.seconds:.1f} s")
    if verbose:  # every file skipped now, by this run or an earlier one
        for item in report.skipped_files:
            print(f"  skipped {os.fsdecode(os.fsencode(item.path))}: {item.reason}", file=sys.stderr)
    for path, reason in report.scan_problems:
        print(f"  warning: {path}: {reason}", file=sys.stderr)


def ray_index_summary(report: RayIndexReport, verbose: bool) -> None:
    parts = [f"{report.encoded} added or updated", f"{report.removed} removed", f"{report.unchanged} unchanged"]
    if report.skipped:
        parts.append(f"{report.skipped} skipped" + ("" if verbose else " (--verbose lists them)"))
    if report.shards_committed_before:
        parts.append(f"{report.shards_committed_before} shards committed before")
    note(f"{report.rows} images in {report.table} ({', '.join(parts)}) in {report.seconds:.1f} s")
    if verbose:
        for path, reason in report.skipped_files:
            print(f"  skipped {path}: {reason}", file=sys.stderr)
    for path, reason in report.problems:
        print(f"  warning: {path}: {reason}", file=sys.stderr)


def index_report_json(report: IndexReport) -> None:
    data = {k: v for k, v in vars(report).items() if k not in ("skipped", "skipped_files", "scan_problems")}
    data["skipped"] = [{"path": s.path, "reason": s.reason} for s in report.skipped]
    data["scan_problems"] = [{"path": p, "reason": r} for p, r in report.scan_problems]
    line = json.dumps(data, ensure_ascii=False)
    with _stdout():
        sys.stdout.buffer.write(line.encode("utf-8", "backslashreplace") + b"\n")


@contextmanager
def index_progress(show: bool) -> Iterator[Callable[[IndexProgress], None]]:
    """A live progress line on stderr: scanned, to encode, done, skipped, rate and ETA."""
    if not show:
        yield lambda _: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("scanning", total=None, rate="")

        def update(p: IndexProgress) -> None:
            if p.phase == "encoding" and p.to_encode:
                speed = progress.tasks[0].speed
                progress.update(task, total=p.to_encode, completed=p.encoded + p.skipped,
                                description=f"scanned {p.scanned} | encoding {p.encoded}/{p.to_encode}"
                                            f" | skipped {p.skipped}",
                                rate=f"{speed:.1f} img/s" if speed else "")
            else:
                progress.update(task, description=f"{p.phase} ({p.scanned} files)")

        yield update


def import_summary(report: ImportReport) -> None:
    skipped = sum(report.skipped.values())
    parts = [f"{report.added} added", f"{report.updated} updated"]
    if skipped:
        parts.append(f"{skipped} skipped (" + ", ".join(f"{n} {why}" for why, n in sorted(report.skipped.items())) + ")")
    note(f"{report.rows} images indexed ({', '.join(parts)} from {report.shards} shards of {report.source}) "
         f"in {report.seconds:.1f} s")
    for path, reason in report.problems:
        print(f"  warning: {path}: {reason}", file=sys.stderr)


def import_report_json(report: ImportReport) -> None:
    data = {**vars(report), "problems": [{"path": p, "reason": r} for p, r in report.problems]}
    json_line(data)


@contextmanager
def import_progress(show: bool) -> Iterator[Callable[[ImportProgress], None]]:
    """A live progress line on stderr: rows imported of all, and the time left."""
    if not show:
        yield lambda _: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("checking shards", total=None)

        def update(p: ImportProgress) -> None:
            if p.phase == "importing":
                progress.update(task, total=p.total, completed=p.done, description=f"importing {p.done}/{p.total} rows")
            else:
                progress.update(task, description=f"{p.phase} ({p.done} rows)")

        yield update


def forgotten(result: Forgotten) -> None:
    line = f"forgot {result.path} ({result.removed} rows removed)"
    if result.pattern and result.excluded_from:
        import shlex

        root, pattern = shlex.quote(result.excluded_from), shlex.quote(result.pattern)
        line += (f"; {result.excluded_from} excludes {pattern} from now on "
                 f"('clipgrep index {root} --remove-exclude {pattern}' undoes it)")
    note(line)


def skipped_files(items: Sequence[Skipped], fmt: str, null: bool) -> None:
    """Skipped files on stdout: ``reason<TAB>path`` (like search's ``score<TAB>path``) or ``json`` lines."""
    sys.stdout.flush()
    end = b"\0" if null else b"\n"
    for item in items:
        if fmt == "json":
            line = json.dumps({"path": item.path, "reason": item.reason, "size": item.size,
                               "mtime_ns": item.mtime_ns}, ensure_ascii=False)
            sys.stdout.buffer.write(line.encode("utf-8", "backslashreplace") + end)
        else:
            _write_path_line(f"{item.reason}\t", item.path, end)
    sys.stdout.buffer.flush()


def status(info: dict[str, Any]) -> None:
    lines = []
    for key, value in info.items():
        if key.endswith("_bytes"):
            key, value = key[: -len("_bytes")], human_bytes(value)
        if isinstance(value, dict):  # root -> its excludes
            value = "; ".join(f"{k}: {' '.join(v)}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        lines.append((key.replace("_", " "), value))
    _key_values(lines)


_EVAL_COLUMNS = (
    ("model", "name", "{}"), ("prec", "precision", "{}"), ("params", "params", "{:.2f}M"),
    ("MB", "bytes", "{:.1f}"), ("t2i R@1", "t2i_R@1", "{:.3f}"), ("R@5", "t2i_R@5", "{:.3f}"),
    ("R@10", "t2i_R@10", "{:.3f}"), ("i2t R@1", "i2t_R@1", "{:.3f}"), ("R@5", "i2t_R@5", "{:.3f}"),
    ("R@10", "i2t_R@10", "{:.3f}"), ("img ms b1", "image_ms_b1", "{:.2f}"), ("b16", "image_ms_b16", "{:.2f}"),
    ("txt ms b1", "text_ms_b1", "{:.2f}"), ("b16", "text_ms_b16", "{:.2f}"),
)
_RATIO_COLUMNS = (
    ("model", "name", "{}"), ("params", "params_ratio", "{:.3f}"), ("size", "size_ratio", "{:.3f}"),
    ("t2i R@1", "t2i_R@1_ratio", "{:.3f}"), ("i2t R@1", "i2t_R@1_ratio", "{:.3f}"),
    ("img speed-up b1", "image_speedup_b1", "{:.2f}x"), ("b16", "image_speedup_b16", "{:.2f}x"),
    ("txt speed-up b1", "text_speedup_b1", "{:.2f}x"), ("b16", "text_speedup_b16", "{:.2f}x"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "params" or key == "bytes":
        value = value / 1e6
    return fmt.format(value)


def eval_table(rows: Sequence[dict[str, Any]]) -> None:
    """The teacher-vs-student table: raw figures, then ratios to the first model."""
    for columns in (_EVAL_COLUMNS, _RATIO_COLUMNS):
        table = [tuple(title for title, _, _ in columns)]
        table += [tuple(_cell(row, key, fmt) for _, key, fmt in columns) for row in rows]
        with _stdout():
            for line in _columns(table):
                print(line)
            print()


@contextmanager
def training_progress(show: bool) -> Iterator[Callable[[Any], None]]:
    """Training progress on stderr: a live bar on a terminal, a line every ~10 % otherwise.

    Accepts both step reports (``step``/``total_steps``/``losses``/``items_per_s``, optionally
    ``phase``) and embedding reports (``kind``/``done``/``total``, optionally ``description``).
    """
    if not show:
        last = {"step": -1}

        def line(p: Any) -> None:
            if hasattr(p, "step") and (p.step == p.total_steps or p.step - last["step"] >= max(1, p.total_steps // 10)):
                last["step"] = p.step
                losses = " ".join(f"{k} {v:.4f}" for k, v in p.losses.items())
                note(f"step {p.step}/{p.total_steps} {_phase(p)}epoch {p.epoch} loss {losses} "
                     f"({p.items_per_s:.0f} items/s)")

        yield line
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("starting", total=None)

        def update(p: Any) -> None:
            if hasattr(p, "step"):
                losses = " ".join(f"{k} {v:.4f}" for k, v in p.losses.items())
                progress.update(task, total=p.total_steps, completed=p.step,
                                description=f"{_phase(p)}epoch {p.epoch} loss {losses} {p.items_per_s:.0f} items/s")
            else:
                description = getattr(p, "description", None) or f"teacher {p.kind} embeddings"
                progress.update(task, total=p.total, completed=p.done, description=description)

        yield update


def _phase(progress: Any) -> str:
    """The tower a stage-2 report trains, as a prefix ("image ", "text "); empty for other reports."""
    phase = getattr(progress, "phase", None)
    return f"{phase} " if phase else ""


def fidelity_report(report: dict[str, Any]) -> None:
    """``compress auto``'s label-free report: how closely the student ranks the library like the teacher."""
    print(f"{report['student']} vs {report['teacher']} on {report['n_images']} library images")
    for line in _columns([
        ("", f"{report['n_text_queries']} text queries", f"{report['n_image_queries']} image queries"),
        ("recall@10 vs teacher", f"{report['text_recall_at_10']:.3f}", f"{report['image_recall_at_10']:.3f}"),
        ("Spearman", f"{report['text_spearman']:.3f}", f"{report['image_spearman']:.3f}"),
    ]):
        print(line)
    print(f"size   {human_bytes(report['student_bytes'])} vs {human_bytes(report['teacher_bytes'])} "
          f"({report['size_ratio']:.2f}x)")
    print(f"image  {report['student_image_ms_b16']:.2f} vs {report['teacher_image_ms_b16']:.2f} ms per image at "
          f"batch 16 ({report['image_speedup_b16']:.2f}x faster)")
    print(f"text   {report['student_text_ms_b1']:.2f} vs {report['teacher_text_ms_b1']:.2f} ms per query "
          f"({report['text_speedup_b1']:.2f}x faster)")
