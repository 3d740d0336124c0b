"""What an install costs on disk: every distribution in a Python environment, its size, who needs it.

    python tools/install_size.py --python .venv-size/bin/python [--budget-mib 650]

Size = disk usage (allocated blocks, as ``du``) of the files each distribution's
RECORD lists, in MiB; "needed by" = the installed distributions whose
requirements (extras excluded) name it. Prints a table (biggest first) and the
total to stdout; with ``--budget-mib``, exits 1 when the total is over it.
``make check-size`` runs it on a fresh venv holding the base install only
(``pip install -c constraints.txt .``, no extras).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

# Runs inside the measured environment (its own interpreter), so that its importlib.metadata sees it.
_PROBE = r'''
import importlib.metadata as md, json, os, re
dists = {}
for d in md.distributions():
    dists[re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower()] = d
needed_by = {key: [] for key in dists}
for d in dists.values():
    for requirement in d.requires or []:
        if "extra ==" in requirement:
            continue
        name = re.sub(r"[-_.]+", "-", re.split(r"[ ;<>=!~\[(]", requirement, 1)[0]).lower()
        if name in needed_by:
            needed_by[name].append(d.metadata["Name"])
rows = []
for key, d in dists.items():
    size = 0
    for f in d.files or []:
        try:
            size += os.lstat(d.locate_file(f)).st_blocks * 512
        except OSError:
            pass
    rows.append([d.metadata["Name"], d.version, size, sorted(set(needed_by[key]))])
print(json.dumps(rows))
'''


def measure(python: str) -> list[tuple[str, str, int, list[str]]]:
    out = subprocess.run([python, "-c", _PROBE], check=True, capture_output=True, text=True).stdout
    return sorted((tuple(row) for row in json.loads(out)), key=lambda row: -row[2])  # type: ignore[misc]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="The environment's interpreter.")
    parser.add_argument("--budget-mib", type=float, help="Fail when the total is over this many MiB.")
    args = parser.parse_args()
    rows = measure(args.python)
    mib = 1024 * 1024
    for name, version, size, needed_by in rows:
        print(f"{size / mib:8.1f} MiB  {name}=={version}  needed by: {', '.join(needed_by) or '-'}")
    total = sum(row[2] for row in rows) / mib
    print(f"{total:8.1f} MiB  total, {len(rows)} distributions")
    if args.budget_mib is not None and total > args.budget_mib:
        print(f"error: the install takes {total:.1f} MiB, over its budget of {args.budget_mib:g} MiB; "
              "see which distribution grew above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
