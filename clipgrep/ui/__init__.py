"""``clipgrep ui``: a local web page to browse and search the index (the ``ui`` extra).

Importing this package imports Starlette and Jinja2; the CLI does it only inside the ``ui``
command, and ``require_ui_extra`` turns their absence into one line naming the extra.

Example (tests mount it in-process)::

    from clipgrep.ui import create_app
    app = create_app(encoder, snapshot_dir, token="secret")
"""
from __future__ import annotations

from .app import cookie_name, create_app

__all__ = ["cookie_name", "create_app"]
