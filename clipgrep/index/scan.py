"""The filesystem walk for the indexer: roots in, a sorted list of image files out.

One ``os.scandir`` per directory and at most one ``stat`` per image file: ``DirEntry``
answers ``is_dir``/``is_symlink`` from the directory listing itself, so files that are not
images cost a string comparison and nothing else. Excluded directories are pruned before
they are opened, so ``node_modules`` or a Synology ``@eaDir`` is never read.

Exclusion follows gitignore, with three layers, strongest first:

1. ``ScanOptions.excludes`` (``--exclude``), relative to the root being walked;
2. ``.clipgrepignore`` files, each relative to its own directory, deeper files first;
3. ``DEFAULT_EXCLUDES``, relative to the root.

The first layer with a matching pattern decides (within a layer the last match wins, so
``!keep.jpg`` works), which lets a ``.clipgrepignore`` re-include what a default excludes.
As in git, a file inside an excluded directory cannot be re-included: the directory is
never opened.

Nothing here prints; unreadable directories and files become ``ScanProblem`` entries, and
only a root the user got wrong raises ``ClipgrepError``.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import pathspec

from ..embed.formats import IMAGE_EXTENSIONS
from ..errors import ClipgrepError
from .regular_file import NOT_REGULAR, open_regular

# Directories that hold copies, thumbnails, caches or trash rather than anyone's photos.
# Dot-directories are listed too because ``include_hidden`` would otherwise let them in.
# Directory patterns only (trailing "/"), so they cost nothing per file.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    # version control and build/tool caches (full of icons and test images)
    ".git/", ".hg/", ".svn/", "node_modules/", "__pycache__/", "site-packages/", "dist-packages/",
    ".venv/", ".tox/", ".cache/", ".thumbnails/", ".ipynb_checkpoints/",
    # trash and recycle bins
    ".Trash/", ".Trash-*/", ".Trashes/", "$RECYCLE.BIN/", "RECYCLER/", r"\#recycle/", "@Recycle/",
    # NAS thumbnail and snapshot trees: Synology, QNAP, NetApp/ZFS
    "@eaDir/", r"\#snapshot/", ".@__thumb/", "@Recently-Snapshot/", ".snapshot/", ".zfs/",
    # OS metadata
    "System Volume Information/", ".Spotlight-V100/", ".fseventsd/", ".DocumentRevisions-V100/",
    ".TemporaryItems/", "__MACOSX/", "lost+found/",
    # previews, caches and old versions kept by photo managers and sync tools (Lightroom,
    # Apple Photos, Capture One, Picasa, Syncthing): the photos themselves live elsewhere
    "*.lrdata/", "**/*.photoslibrary/resources/derivatives/", "**/*.photoslibrary/private/",
    "**/CaptureOne/Cache/", ".picasaoriginals/", ".stversions/", "**/Library/Caches/",
)

IGNORE_FILE = ".clipgrepignore"
IGNORE_FILE_MAX_BYTES = 1 << 20  # a pattern file; a bigger one is a mistake or a link to a disk image

# How many directory entries pass between two on_progress calls.
PROGRESS_EVERY = 1000


@dataclass(frozen=True)
class FileEntry:
    """One image file: ``path`` is absolute and un-resolved; a ``str`` even for non-UTF-8 names.

    Names that are not valid in the filesystem encoding keep their bytes as surrogate escapes,
    so ``os.fsencode(entry.path)`` gives back the exact bytes to open.
    """

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ScanOptions:
    """What to walk past. ``extensions`` are lower-case with the dot."""

    excludes: tuple[str, ...] = ()
    include_hidden: bool = False
    follow_symlinks: bool = False
    extensions: frozenset[str] = IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ScanProblem:
    """Something that could not be read; the scan went on without it."""

    path: str
    reason: str


@dataclass
class ScanResult:
    """``files`` sorted by path without duplicates; ``excluded`` counts directories and
    image-named files dropped by patterns, the hidden rule or the symlink rule."""

    files: list[FileEntry]
    problems: list[ScanProblem] = field(default_factory=list)
    excluded: int = 0


def scan(
    roots: Sequence[str | os.PathLike[str]],
    options: ScanOptions = ScanOptions(),
    on_progress: Callable[[int], None] | None = None,
) -> ScanResult:
    """Walk ``roots`` (directories or single image files) and return the image files in them.

    ``on_progress(n)`` gets the number of directory entries examined so far, about every
    ``PROGRESS_EVERY`` entries and once at the end. Raises ``ClipgrepError`` for a root that
    does not exist or is neither a directory nor an image file, or for a bad ``--exclude``.
    """
    if isinstance(roots, (str, bytes, os.PathLike)):  # scan("photos") means one root, not six
        roots = [roots]
    walker = _Walker(options, on_progress)
    for root in roots:
        walker.add_root(_normalise_root(root))
    return walker.result()


# --- exclusion rules -----------------------------------------------------------------------


class _Layer(NamedTuple):
    """One set of gitignore patterns and where the walk is relative to their base directory.

    ``files`` leaves out directory-only patterns (``trash/``): they can only match a file
    through a parent directory, and that directory was already pruned or kept. Most
    defaults are directory-only, so with no ``--exclude`` a file costs no pattern match.
    """

    prefix: str  # path of the current directory relative to the base, "" or ending in "/"
    dirs: pathspec.GitIgnoreSpec | None
    files: pathspec.GitIgnoreSpec | None

    def child(self, name: str) -> _Layer:
        return _Layer(f"{self.prefix}{name}/", self.dirs, self.files)


def _make_layer(lines: Iterable[str]) -> _Layer | None:
    """Compile patterns into a layer; ``None`` when nothing in them can match.

    Raises ``ValueError`` for an invalid pattern (pathspec's ``GitIgnorePatternError``).
    """
    lines = list(lines)
    file_lines = [line for line in lines if not line.rstrip().endswith("/")]
    dirs, files = _compile(lines), _compile(file_lines)
    return _Layer("", dirs, files) if dirs or files else None


def _compile(lines: list[str]) -> pathspec.GitIgnoreSpec | None:
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    # An empty spec still costs microseconds per call; comments and blanks compile to
    # patterns with include=None.
    return spec if any(p.include is not None for p in spec.patterns) else None


class _Rules(NamedTuple):
    """The layers in force in one directory, strongest first."""

    layers: tuple[_Layer, ...]
    has_excludes: bool  # layers[0] is from ScanOptions.excludes and stays above ignore files
    for_files: bool  # some layer has file patterns; usually not, and then files skip matching

    @classmethod
    def of(cls, layers: tuple[_Layer, ...], has_excludes: bool) -> _Rules:
        return cls(layers, has_excludes, any(layer.files is not None for layer in layers))

    def child(self, name: str) -> _Rules:
        return self._replace(layers=tuple(layer.child(name) for layer in self.layers))

    def with_ignore_file(self, layer: _Layer) -> _Rules:
        at = 1 if self.has_excludes else 0
        return _Rules.of((*self.layers[:at], layer, *self.layers[at:]), self.has_excludes)

    def excludes(self, name: str, is_dir: bool) -> bool:
        for layer in self.layers:
            spec = layer.dirs if is_dir else layer.files
            if spec is None:
                continue
            path = f"{layer.prefix}{name}/" if is_dir else layer.prefix + name
            include = spec.check_file(path).include
            if include is not None:
                return include
        return False


def _root_rules(options: ScanOptions) -> _Rules:
    # A bare string is one pattern, not a sequence of one-character patterns.
    patterns = (options.excludes,) if isinstance(options.excludes, str) else options.excludes
    try:
        cli = _make_layer(patterns)
    except ValueError as e:
        raise ClipgrepError(
            f"bad --exclude pattern: {e}",
            "patterns use .gitignore syntax, e.g. --exclude 'raw/' --exclude '*.tmp.jpg'") from None
    defaults = _make_layer(DEFAULT_EXCLUDES)
    layers = tuple(layer for layer in (cli, defaults) if layer is not None)
    return _Rules.of(layers, has_excludes=cli is not None)


def _read_ignore_file(path: str) -> tuple[_Layer | None, list[str]]:
    """The layer from one ``.clipgrepignore`` and the lines that were not valid patterns.

    Decoded like file names (filesystem encoding, surrogateescape) so a pattern can name a
    non-UTF-8 file. Raises ``OSError`` if the file cannot be read, is not a regular file
    (a FIFO would block the walk, a link to /dev/zero never end) or is too large.
    """
    f, info = open_regular(path)
    with f:
        if info.st_size > IGNORE_FILE_MAX_BYTES:
            raise OSError(errno.EFBIG, "too large for a pattern file", path)
        data = f.read(IGNORE_FILE_MAX_BYTES)
    text = data.decode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())
    lines = text.removeprefix("\ufeff").splitlines()
    try:
        return _make_layer(lines), []
    except ValueError:
        # Keep the good lines: one typo should not un-ignore a whole tree.
        bad = [line for line in lines if not _valid_pattern(line)]
        good = [line for line in lines if line not in bad]
        return _make_layer(good), bad


def _valid_pattern(line: str) -> bool:
    try:
        pathspec.GitIgnoreSpec.from_lines([line])
    except ValueError:
        return False
    return True


# --- the walk -------------------------------------------------------------------------------


class _Dir(NamedTuple):
    """A directory waiting to be listed."""

    path: str
    rules: _Rules  # for its entries
    dir_id: tuple[int, int]  # (st_dev, st_ino)
    ancestors: frozenset[tuple[int, int]]  # ids of it and every directory above it
    via_link: bool  # it, or a directory above it, was reached through a symlink


def _normalise_root(root: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    # abspath, not realpath: the user's spelling of the root (a symlink, a mount alias) is
    # the path they will search and open results by.
    return os.fsdecode(os.path.abspath(os.fspath(root)))


def _reason(err: OSError, is_link: bool = False) -> str:
    """A short, stable reason for a ScanProblem."""
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.ELOOP:
        return "symlink loop"
    if err.errno == errno.ENOENT:
        return "broken symlink" if is_link else "vanished during scan"
    return (err.strerror or type(err).__name__).lower()


def _stat_with_inode(entry: os.DirEntry[str], follow: bool) -> os.stat_result:
    st = entry.stat(follow_symlinks=follow)
    if st.st_ino == 0:
        # Windows' DirEntry.stat leaves st_dev and st_ino zero; loop guards and de-duplication
        # need the real ones.
        st = os.stat(entry.path, follow_symlinks=follow)
    return st


def _points_to_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows the link: one stat, only ever for symlinks
    except OSError:
        return False


class _Walker:
    """One scan across all roots: the files found, the problems, the counters."""

    def __init__(self, options: ScanOptions, on_progress: Callable[[int], None] | None) -> None:
        self.follow = options.follow_symlinks
        self.include_hidden = options.include_hidden
        self.extensions = frozenset(
            ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in options.extensions)
        self.root_rules = _root_rules(options)
        self.on_progress = on_progress
        self.seen = 0
        # Without a callback the threshold is never reached, so the hot loop pays one compare.
        self.next_report = PROGRESS_EVERY if on_progress is not None else sys.maxsize
        self.excluded = 0
        self.problems: list[ScanProblem] = []
        # Keyed by path, or by (st_dev, st_ino) when following links, where two paths to one
        # file are expected; then ``ranks`` keeps the best path: one without links, then the
        # smaller.
        self.files: dict[object, FileEntry] = {}
        self.ranks: dict[object, tuple[bool, str]] = {}

    def result(self) -> ScanResult:
        if self.on_progress is not None:
            self.on_progress(self.seen)
        files = sorted(self.files.values(), key=lambda e: e.path)
        problems = sorted(set(self.problems), key=lambda p: (p.path, p.reason))
        return ScanResult(files, problems, self.excluded)

    def add_root(self, path: str) -> None:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise ClipgrepError(f"{path} does not exist", "check the path") from None
        except OSError as e:
            raise ClipgrepError(f"cannot access {path}: {_reason(e)}",
                                "check the path and its permissions") from None
        if stat.S_ISDIR(st.st_mode):
            self._walk(path, (st.st_dev, st.st_ino))
        elif stat.S_ISREG(st.st_mode) and self._is_image(os.path.basename(path)):
            # Named explicitly, so no hidden, pattern or symlink rule applies.
            self._add_file(path, st, via_link=False)
        else:
            raise ClipgrepError(
                f"{path} is neither a directory nor an image file",
                f"clipgrep indexes directories and {', '.join(sorted(self.extensions))} files")

    def _walk(self, root: str, root_id: tuple[int, int]) -> None:
        """Depth-first over one root, in name order; symlinked directories wait until the
        real tree is done, so a directory reachable both directly and through a link (an
        album of links into the year folders) is listed under its real path."""
        visited: set[tuple[int, int]] = set()
        stack = [_Dir(root, self.root_rules, root_id, frozenset({root_id}), via_link=False)]
        deferred: deque[_Dir] = deque()
        while stack or deferred:
            d = stack.pop() if stack else deferred.popleft()
            if d.dir_id in visited:  # an alias of a directory already listed: not a loop
                continue
            visited.add(d.dir_id)
            children = sorted(self._list_dir(d), key=lambda c: c.path)
            stack.extend(c for c in reversed(children) if d.via_link or not c.via_link)
            deferred.extend(c for c in children if c.via_link and not d.via_link)

    def _list_dir(self, d: _Dir) -> list[_Dir]:
        """Record the image files in ``d`` and return the subdirectories to walk."""
        try:
            with os.scandir(d.path) as it:
                entries = list(it)
        except OSError as e:
            self.problems.append(ScanProblem(d.path, _reason(e)))
            return []
        rules = self._rules_in(d, entries)
        children: list[_Dir] = []
        for entry in entries:
            self.seen += 1
            if self.seen >= self.next_report:
                self._report()
            name = entry.name
            if name[0] == "." and (not self.include_hidden or name.startswith("._")):
                # "._*" are macOS AppleDouble resource forks: named like images, never images.
                self._drop(entry)
            elif entry.is_dir(follow_symlinks=False):  # answered by the listing: no syscall
                child = self._subdir(d, rules, entry, through_link=False)
                if child is not None:
                    children.append(child)
            elif entry.is_symlink():
                child = self._symlink(d, rules, entry)
                if child is not None:
                    children.append(child)
            elif self._is_image(name):
                self._file(rules, entry, via_link=d.via_link, follow=False)
        return children

    def _rules_in(self, d: _Dir, entries: list[os.DirEntry[str]]) -> _Rules:
        """``d``'s rules, plus its ``.clipgrepignore`` if it has one."""
        if not any(entry.name == IGNORE_FILE for entry in entries):
            return d.rules
        path = os.path.join(d.path, IGNORE_FILE)
        try:
            layer, bad = _read_ignore_file(path)
        except OSError as e:
            self.problems.append(ScanProblem(path, _reason(e)))
            return d.rules
        self.problems.extend(ScanProblem(path, f"invalid pattern {line!r} ignored") for line in bad)
        return d.rules.with_ignore_file(layer) if layer is not None else d.rules

    def _subdir(self, d: _Dir, rules: _Rules, entry: os.DirEntry[str], through_link: bool) -> _Dir | None:
        name = entry.name
        if rules.excludes(name, is_dir=True):
            self.excluded += 1
            return None
        try:
            st = _stat_with_inode(entry, follow=through_link)
        except OSError as e:
            self.problems.append(ScanProblem(entry.path, _reason(e, through_link)))
            return None
        dir_id = (st.st_dev, st.st_ino)
        if dir_id in d.ancestors:
            # Through a link it is the classic loop; without one, a bind mount of a parent.
            reason = "symlink loop" if through_link else "filesystem loop"
            self.problems.append(ScanProblem(entry.path, reason))
            return None
        return _Dir(entry.path, rules.child(name), dir_id, d.ancestors | {dir_id}, d.via_link or through_link)

    def _symlink(self, d: _Dir, rules: _Rules, entry: os.DirEntry[str]) -> _Dir | None:
        if not self.follow:
            self._drop(entry, follow=True)
            return None
        if _points_to_dir(entry):
            return self._subdir(d, rules, entry, through_link=True)
        if self._is_image(entry.name):  # the link's name decides, as for any file
            self._file(rules, entry, via_link=True, follow=True)
        return None

    def _file(self, rules: _Rules, entry: os.DirEntry[str], via_link: bool, follow: bool) -> None:
        if rules.for_files and rules.excludes(entry.name, is_dir=False):
            self.excluded += 1
            return
        try:
            # Identity only matters when following links, where files are keyed by inode.
            st = _stat_with_inode(entry, follow) if self.follow else entry.stat(follow_symlinks=False)
        except OSError as e:
            self.problems.append(ScanProblem(entry.path, _reason(e, is_link=follow)))
            return
        if stat.S_ISREG(st.st_mode):
            self._add_file(entry.path, st, via_link)
        else:  # a FIFO or device named like an image: never opened, but worth a word
            self.problems.append(ScanProblem(entry.path, NOT_REGULAR))

    def _add_file(self, path: str, st: os.stat_result, via_link: bool) -> None:
        if not self.follow:  # the same path twice (overlapping roots) is the same file
            self.files[path] = FileEntry(path, st.st_size, st.st_mtime_ns)
            return
        key, rank = (st.st_dev, st.st_ino), (via_link, path)
        if key not in self.ranks or rank < self.ranks[key]:
            self.ranks[key] = rank
            self.files[key] = FileEntry(path, st.st_size, st.st_mtime_ns)

    def _drop(self, entry: os.DirEntry[str], follow: bool = False) -> None:
        """Count a skipped entry if it would otherwise have been walked or indexed."""
        is_dir = _points_to_dir(entry) if follow else entry.is_dir(follow_symlinks=False)
        if is_dir or self._is_image(entry.name):
            self.excluded += 1

    def _is_image(self, name: str) -> bool:
        # rfind rather than os.path.splitext: same answer for a bare name, half the cost.
        dot = name.rfind(".")
        return dot > 0 and name[dot:].lower() in self.extensions

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.seen)
        self.next_report = self.seen + PROGRESS_EVERY
