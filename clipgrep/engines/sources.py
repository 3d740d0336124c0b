"""List the images of index SOURCEs and read their bytes: local folders or object-store prefixes.

Local folders are walked by the local path's own scanner (excludes, ``.clipgrepignore``, hidden
files, symlink rules). Object prefixes are listed recursively and filtered by the same image
extensions. S3 goes through boto3, whose listing gives each object's ETag (pyarrow's does not),
so a rewritten object is found even when its size and second-resolution time are unchanged;
gs:// and az:// go through pyarrow and are compared by size and modification time.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

from ..embed.formats import IMAGE_EXTENSIONS
from ..errors import ClipgrepError, first_line
from ..index.scan import ScanOptions, ScanProblem, scan
from ..table_uri import check_scheme, is_object_uri
from .shard_plan import SourceFile


def normalise_source(source: str) -> str:
    """An object prefix without its trailing slash, or an absolute local path."""
    check_scheme(source, "source")
    source = source.removeprefix("file://")
    if is_object_uri(source):
        return source.rstrip("/")
    return os.path.abspath(os.path.expanduser(source))


def list_sources(sources: Sequence[str], options: ScanOptions) -> tuple[list[SourceFile], list[ScanProblem]]:
    """Every image under ``sources`` (already normalised), with the problems met while walking."""
    local = [s for s in sources if not is_object_uri(s)]
    files: list[SourceFile] = []
    problems: list[ScanProblem] = []
    if local:
        result = scan(local, options)
        files += [SourceFile(e.path, e.size, e.mtime_ns) for e in result.files]
        problems += result.problems
    for prefix in (s for s in sources if is_object_uri(s)):
        files += _list_s3(prefix) if prefix.lower().startswith("s3://") else _list_pyarrow(prefix)
    return files, problems


def _is_image(key: str) -> bool:
    return os.path.splitext(key)[1].lower() in IMAGE_EXTENSIONS


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.partition("://")[2].partition("/")
    return bucket, key


def _list_s3(prefix: str) -> list[SourceFile]:
    bucket, key = _split(prefix)
    scheme = prefix.partition("://")[0]
    files = []
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key and key + "/")
        for page in pages:
            for obj in page.get("Contents", ()):
                if _is_image(obj["Key"]) and not obj["Key"].endswith("/"):
                    files.append(SourceFile(f"{scheme}://{bucket}/{obj['Key']}", int(obj["Size"]),
                                            int(obj["LastModified"].timestamp() * 1e9), obj["ETag"].strip('"')))
    except Exception as e:  # noqa: BLE001 - botocore's errors share no base class worth naming
        raise ClipgrepError(f"cannot list {prefix}: {first_line(e)}",
                            "check the bucket name and AWS_* credentials (AWS_ENDPOINT_URL for S3-compatible stores)"
                            ) from None
    return files


def _list_pyarrow(prefix: str) -> list[SourceFile]:
    from pyarrow import fs

    try:
        filesystem, root = fs.FileSystem.from_uri(prefix)
        infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
    except Exception as e:  # noqa: BLE001
        raise ClipgrepError(f"cannot list {prefix}: {first_line(e)}", "check the URI and the credentials") from None
    scheme = prefix.partition("://")[0]
    return [SourceFile(f"{scheme}://{info.path}", info.size, info.mtime_ns or 0)
            for info in infos if info.type == fs.FileType.File and _is_image(info.path)]


@functools.lru_cache(maxsize=1)
def s3_client() -> Any:
    """One client per process; boto3 reads AWS_ENDPOINT_URL, AWS_REGION and the keys itself."""
    try:
        import boto3
    except ImportError:
        raise ClipgrepError("s3:// sources need boto3", "pip install 'clipgrep[ray]'") from None
    return boto3.client("s3")


def read_object(uri: str) -> bytes:
    """An object's bytes; raises OSError (or the client's error) when it cannot be read."""
    if uri.lower().startswith("s3://"):
        bucket, key = _split(uri)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()
