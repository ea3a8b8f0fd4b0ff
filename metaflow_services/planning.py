"""Which Metaflow tasks one Airflow task instance runs, and how a foreach's
splits are spread over mapped task instances: pure functions of the spec and
the upstream results (unit-tested), used by the task runtime (runtime.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .spec import PARAMS_TASK_ID, parse_path_key, task_id_for

RANGES_PER_SLOT = 2
MAX_SPLITS_PER_RANGE = 250


@dataclass
class PlannedTask:
    path: tuple
    task_id: str
    inputs: list            # ["run/step/task", ...]
    split_index: int | None = None
    iteration: int = 0


def plan_tasks(spec, step, run_id, upstream, group=None):
    """The Metaflow tasks of *step* that one Airflow task instance runs.

    upstream: {in_step: [xcom value, ...]} where each value is
    {"tasks": {path_key: {"id", "next", "splits"}}} as pushed by that step.
    group: [first, stop) range of top-level split indexes, for mapped steps.
    """
    s = spec["steps"][step]
    if step == spec["start_step"]:
        return [PlannedTask((), task_id_for(()), ["%s/_parameters/%s" % (run_id, PARAMS_TASK_ID)])]
    depth = len(s["foreach_stack"])
    candidates = {}
    for parent in s["in"]:
        pdepth = len(spec["steps"][parent]["foreach_stack"])
        for value in upstream.get(parent) or ():
            for key, info in (value or {}).get("tasks", {}).items():
                if step not in info.get("next", ()):
                    continue  # a switch took another branch
                q = parse_path_key(key)
                if pdepth == depth:
                    targets = [q]
                elif pdepth == depth - 1:  # step is the body of parent's foreach
                    targets = [q + (j,) for j in range(info["splits"])]
                elif pdepth == depth + 1:  # step joins a foreach
                    targets = [q[:-1]]
                else:
                    raise RuntimeError("unexpected foreach depths %s -> %s" % (parent, step))
                for path in targets:
                    if group is not None and not (group[0] <= path[0] < group[1]):
                        continue
                    candidates.setdefault(path, []).append((parent, q, info["id"]))
    planned = []
    for path in sorted(candidates):
        inputs = sorted(candidates[path])
        split_index = None
        if any(len(spec["steps"][p]["foreach_stack"]) == depth - 1 for p, _, _ in inputs):
            split_index = path[-1]
        planned.append(PlannedTask(
            path=path,
            task_id=task_id_for(path),
            inputs=["%s/%s/%s" % (run_id, p, tid) for p, _, tid in inputs],
            split_index=split_index,
        ))
    return planned


def split_ranges(num_splits, slots, max_map_length):
    """Ranges of splits, one per mapped task instance.

    A narrow foreach gets one split per instance. A wide one gets about two
    ranges per task slot: each instance runs its range in one container whose
    warm process forks each split, so a split costs no Airflow task, container
    or Python start, and two waves keep the slots busy when splits differ in
    length. No range is longer than MAX_SPLITS_PER_RANGE (what a retried
    range re-reads), and there are never more than max_map_length."""
    want = max(slots * RANGES_PER_SLOT, math.ceil(num_splits / MAX_SPLITS_PER_RANGE))
    n = max(1, min(num_splits, max_map_length, want))
    return [[i * num_splits // n, (i + 1) * num_splits // n] for i in range(n)
            if (i + 1) * num_splits // n > i * num_splits // n]


def compress_paths(paths):
    """Input paths in Metaflow's compressed form (a common prefix, ':', the
    suffixes): a join of 10,000 splits stays well under the 128 KB that one
    command-line argument may hold."""
    prefix = os.path.commonprefix(paths) if len(paths) > 1 else ""
    if not prefix:
        return ",".join(paths)
    return prefix + ":" + ",".join(p[len(prefix):] for p in paths)
