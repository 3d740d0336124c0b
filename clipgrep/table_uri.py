"""Where a ``--table URI`` lives: a local folder or an object-store prefix, and how to reach it.

A LanceDB table is the folder ``<database>/<name>.lance``, so ``--table s3://bucket/db/photos``
(or ``.../photos.lance``) is the table ``photos`` of the database ``s3://bucket/db``. Light
module (stdlib only): the CLI parses URIs before anything heavy is imported.

Object-store credentials and endpoints come from the environment, as for the AWS CLI, boto3,
pyarrow and Lance: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or an instance role),
``AWS_REGION``, and ``AWS_ENDPOINT_URL`` for an S3-compatible store (MinIO, moto, R2...);
``GOOGLE_SERVICE_ACCOUNT`` for gs://; ``AZURE_STORAGE_ACCOUNT_NAME``/``_KEY`` for az://.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ClipgrepError

OBJECT_STORE_SCHEMES = ("s3", "gs", "az")
_SUFFIX = ".lance"


def is_object_uri(uri: str) -> bool:
    """Whether ``uri`` names an object-store location (``s3://``, ``gs://``, ``az://``)."""
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and scheme.lower() in OBJECT_STORE_SCHEMES


def check_scheme(uri: str, what: str) -> None:
    """Refuse a URI scheme clipgrep cannot reach (``http://``, a typo like ``s4://``)."""
    scheme, sep, _ = uri.partition("://")
    if sep and scheme.lower() not in OBJECT_STORE_SCHEMES and scheme.lower() != "file":
        raise ClipgrepError(f"{what} {uri}: unsupported scheme {scheme}://",
                            "use a local path, s3://, gs:// or az://")


@dataclass(frozen=True)
class TableLocation:
    """A table's database URI and name; ``uri`` is the table's own folder (for Ray's Lance sink)."""

    database: str
    name: str

    @property
    def uri(self) -> str:
        return f"{self.database}/{self.name}{_SUFFIX}"

    @property
    def remote(self) -> bool:
        return is_object_uri(self.database)

    def storage_options(self) -> dict[str, str]:
        """Options for LanceDB and Lance: only what the environment does not already say to them."""
        return storage_options() if self.remote else {}


def parse_table_uri(uri: str) -> TableLocation:
    """``s3://b/db/photos`` -> database ``s3://b/db``, table ``photos``; local paths become absolute.

    >>> parse_table_uri("s3://bucket/db/photos.lance")
    TableLocation(database='s3://bucket/db', name='photos')
    """
    check_scheme(uri, "--table")
    uri = uri.removeprefix("file://")
    remote = is_object_uri(uri)
    text = uri.rstrip("/") if remote else os.path.abspath(os.path.expanduser(uri))
    database, _, name = text.rpartition("/")
    name = name.removesuffix(_SUFFIX)
    bucket_only = remote and "/" not in text.partition("://")[2]
    if not name or bucket_only or not database:
        raise ClipgrepError(f"--table {uri} does not name a table",
                            "give a folder and a table name, e.g. --table s3://bucket/clipgrep/photos")
    return TableLocation(database, name)


def storage_options() -> dict[str, str]:
    """Lance's object-store options for an S3-compatible endpoint named by ``AWS_ENDPOINT_URL``.

    Lance reads the keys and region from the environment itself, but not boto3's endpoint
    variable, and it refuses plain http unless told (a local MinIO or moto).
    """
    options: dict[str, str] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options["allow_http"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["aws_region"] = region
    return options
