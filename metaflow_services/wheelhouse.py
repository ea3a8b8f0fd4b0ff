"""A wheelhouse: the wheels of the step environments of some flows, for VMs
that cannot reach a package index (air-gapped).

`fab bundle --flows DIR` makes one on a workstation (deploy/packages.py) by
running `pip wheel` in the step image, so every wheel fits the VM's Python and
platform, sdists included. The deploy unpacks it on the VM; environment image
builds then install from it with `pip --no-index` (metaflow_services/images.py).

Its index.json says which wheels each environment resolved to, keyed by
``environment_key``, so a build copies only those into its context (not the
whole wheelhouse), and a pin that is not there is named before pip runs:

    {"format": 1, "made": "...", "python": "3.12.7", "flows": ["a.py"],
     "environments": {KEY: {"packages": [...], "python": null, "files": [...]}}}
"""

from __future__ import annotations

import hashlib
import json
import os
import re

INDEX = "index.json"
FORMAT = 1

# What adds wheels to the VM's wheelhouse: named in every "missing" message.
ADD_COMMAND = ("fab bundle --flows DIR (DIR holding this flow), then fab deploy --bundle FILE "
               "(and fab add-worker --bundle FILE on each worker VM)")


def environment_key(environment: dict) -> str:
    """The same for the same packages and Python, on any machine."""
    key = json.dumps({"packages": sorted(environment["packages"], key=str.lower),
                      "python": environment.get("python") or None}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def read_index(folder) -> dict | None:
    """The wheelhouse's index, or None when *folder* holds no wheelhouse."""
    if not folder:
        return None
    try:
        with open(os.path.join(folder, INDEX)) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and index.get("format") == FORMAT else None


def write_index(folder, environments: dict, python: str, flows: list, made: str) -> dict:
    index = {"format": FORMAT, "made": made, "python": python, "flows": sorted(flows),
             "environments": environments}
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
    return index


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_name_version(filename):
    # PEP 427: {name}-{version}(-{build})?-{python}-{abi}-{platform}.whl
    parts = filename[:-4].split("-")
    return (_norm(parts[0]), parts[1]) if filename.endswith(".whl") and len(parts) >= 5 else None


_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*$")


def plan(folder, index: dict, environment: dict) -> tuple:
    """(wheel files to give pip, pinned requirements the wheelhouse lacks).

    An environment the bundle resolved gets exactly its wheels. Another one
    gets every wheel (pip picks), after checking its exact pins by file name,
    so a missing package is named before pip says "no matching
    distribution"."""
    wheels = sorted(f for f in os.listdir(folder) if f.endswith(".whl"))
    known = (index.get("environments") or {}).get(environment_key(environment))
    if known and all(f in wheels for f in known["files"]):
        return list(known["files"]), []
    have = {_wheel_name_version(f) for f in wheels}
    missing = []
    for req in environment["packages"]:
        m = _PIN.match(req)
        if m and (_norm(m.group(1)), m.group(2)) not in have:
            missing.append(req)
    return wheels, missing
