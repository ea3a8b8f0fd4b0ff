"""The contract between the compiler and the runtime: the DAG spec.

A compiled DAG file holds one literal, ``SPEC``, produced by
``metaflow_services.compiler`` and consumed by ``metaflow_services.dag`` (at
parse time) and ``metaflow_services.runtime`` (in each task). This module is
imported at DAG parse time, so it imports neither metaflow nor airflow.

Spec, version 1 (all keys always present)::

    spec_version      1
    generator         "metaflow-services X.Y.Z"
    flow              {name, file, source, doc, project: None | {name, branch,
                       flow_name, is_production, is_user_branch}}
    dag_id            Airflow DAG id
    user              METAFLOW_USER for every task
    tags              extra tags for every run
    top_level_options e.g. ["--branch", "x"] for @project
    parameters        [{name, env, kind: int|float|bool|str|json|file, default,
                        has_default, required, help}]
    config_value      METAFLOW_FLOW_CONFIG_VALUE or None
    schedule          None | {cron (5-field), timezone, source}
    image             flow-level image override or None
    pool              Airflow pool of every task, or None (default_pool; files
                      written before this key existed lack it: read with .get)
    triggers          None | {events: [{name, parameters: {param: payload field}}],
                       flows: [{name (its finish event), flow, project, branch}]}:
                      the events the DAG is scheduled on (all of them; .get)
    finish_event      the event a successful run emits, metaflow.[project.branch.]Flow.end
                      (.get: older files lack it and emit nothing)
    start_step, end_step
    steps             {name: {type, next, in, foreach_stack, foreach_param,
                       recursive, doc, max_user_code_retries, retries,
                       retry_delay_seconds, timeout_seconds, env, resources,
                       image, queue (@worker), decorators, group, environment: None |
                       {packages: [pip requirement], python, source},
                       secrets: [platform secret names its @secrets names]}}
    package           {sha, url, path, datastore, metadata, post_extract_env}

In the file, step entries leave out keys that have their default value
(``STEP_DEFAULTS``), so the file stays short; ``normalize`` puts them back.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pprint
import re
import tempfile

SPEC_VERSION = 1

# Task id of Metaflow's `_parameters` pseudo-task (created by `init`).
PARAMS_TASK_ID = "params"


STEP_DEFAULTS = {
    "in": [],
    "foreach_stack": [],
    "foreach_param": None,
    "recursive": False,
    "doc": "",
    "max_user_code_retries": 0,
    "retries": 0,
    "retry_delay_seconds": 0,
    "timeout_seconds": None,
    "env": {},
    "resources": None,
    "image": None,
    "queue": None,
    "decorators": [],
    "group": None,
    "environment": None,
    "secrets": [],
}


def compact(spec: dict) -> dict:
    out = dict(spec)
    out["steps"] = {
        name: {k: v for k, v in step.items() if k not in STEP_DEFAULTS or STEP_DEFAULTS[k] != v}
        for name, step in spec["steps"].items()
    }
    return out


def normalize(spec: dict) -> dict:
    out = dict(spec)
    out["steps"] = {name: dict(STEP_DEFAULTS, **step) for name, step in spec["steps"].items()}
    return out


def foreach_groups_root(foreach_stack):
    """Airflow maps a foreach body over the *outermost* enclosing foreach only;
    deeper levels run grouped inside each mapped task instance."""
    return foreach_stack[0] if foreach_stack else None


def run_id_for(dag_id: str, airflow_run_id: str) -> str:
    """Metaflow run id of an Airflow DAG run: deterministic (a cleared task
    re-runs in the same Metaflow run), non-numeric (numeric ids are assumed to
    come from the metadata service and are not registered) and free of the
    characters Metaflow reserves in paths (, : !)."""
    digest = hashlib.sha1(("%s\n%s" % (dag_id, airflow_run_id)).encode()).hexdigest()
    return "af-" + digest[:20]


def task_id_for(path, iteration=0) -> str:
    """Metaflow task id of a step's task at a foreach *path* (the split index at
    each enclosing foreach, outermost first). Unique within a step, readable:
    ``t-0`` outside any foreach, ``t-3`` for split 3, ``t-2-5`` for split 5 of
    the inner foreach of split 2, ``t-0-r4`` for iteration 4 of a recursive
    step."""
    base = "t-" + ("-".join(str(i) for i in path) if path else "0")
    return base if not iteration else "%s-r%d" % (base, iteration)


def path_key(path) -> str:
    return ".".join(str(i) for i in path)


def parse_path_key(key: str) -> tuple:
    return tuple(int(i) for i in key.split(".")) if key else ()


def read_specs(folder) -> list:
    """The specs of the generated DAG files under *folder* (hidden folders
    included), read without running them; unreadable files are skipped."""
    specs = []
    # os.walk, not glob: the generated DAG files are in a hidden folder.
    for d, _, files in os.walk(folder):
        for f in files:
            if not f.endswith(".py"):
                continue
            try:
                with open(os.path.join(d, f)) as fh:
                    tree = ast.parse(fh.read())
            except (OSError, SyntaxError, ValueError):
                continue
            for node in tree.body:
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "SPEC":
                    try:
                        specs.append(normalize(ast.literal_eval(node.value)))
                    except (ValueError, KeyError, TypeError, SyntaxError):
                        pass
    return specs


def render_dag_file(spec: dict) -> str:
    """The generated DAG file: small and readable, one literal and one call."""
    flow = spec["flow"]
    header = (
        '"""Airflow DAG %(dag_id)s: runs the Metaflow flow %(flow)s (%(file)s).\n\n'
        "Generated by %(generator)s; do not edit. Change the flow and compile it\n"
        "again (metaflow-services compile %(file)s). Code package %(sha)s.\n"
        '"""\n'
        % {k: _doc_safe(v) for k, v in {
            "dag_id": spec["dag_id"],
            "flow": flow["name"],
            "file": flow["file"],
            "generator": spec["generator"],
            "sha": spec["package"]["sha"],
        }.items()}
    )
    body = (
        "from metaflow_services.dag import build_dag\n\n"
        "SPEC = %s\n\n"
        "dag = build_dag(SPEC)\n"
    ) % pprint.pformat(compact(spec), indent=1, width=100, sort_dicts=False)
    return header + "\n" + body


def _doc_safe(value) -> str:
    """Text for the file's docstring that cannot end it (no quotes,
    backslashes or line breaks; a deployed spec comes from outside)."""
    return re.sub(r"[^\w .,:/@+=()\-]", "_", str(value))


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    """Write via a temporary file in the same directory and rename, so readers
    (Airflow's dag-processor) never see a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".%s." % os.path.basename(path),
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def parameter_env(spec, params):
    """METAFLOW_INIT_<NAME> variables for `init` from the Airflow run's params."""
    env = {}
    for p in spec["parameters"]:
        value = params.get(p["name"]) if params else None
        if value is None:
            if p["has_default"]:
                value = p["default"]
            else:
                continue
        if p["kind"] == "json":
            value = value if isinstance(value, str) else json.dumps(value)
        elif p["kind"] == "bool":
            value = "true" if _truthy(value) else "false"
        else:
            value = str(value)
        env[p["env"]] = value
    return env


def _truthy(v):
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y", "on")
    return bool(v)
