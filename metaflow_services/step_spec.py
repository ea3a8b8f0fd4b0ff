"""One step of a flow as the spec describes it: its place in the graph,
retries, timeout, resources, environment variables, worker queue, the
platform secrets its @secrets names, and the
packages its environment needs (@pypi, @pypi_base, @conda, @conda_base,
requirements.txt next to the flow).
"""

from __future__ import annotations

import os
import re

from .platform_secrets import SecretsError, step_sources
from .refusals import CompileError, refuse_step_decorators

_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def step_spec(flow_name, graph, node, requirements):
    """The spec of one step; `requirements` are the flow's requirements.txt
    (read_requirements)."""
    decos = {d.name: d for d in node.decorators}
    refuse_step_decorators(flow_name, node.name, decos)
    user_retries, error_retries = _retries(flow_name, node)
    in_funcs = sorted(node.in_funcs)
    enclosing = node.split_parents[:-1] if node.type == "join" else node.split_parents
    foreach_stack = [p for p in enclosing if graph[p].type == "foreach"]
    return {
        "type": node.type,
        "next": list(node.out_funcs),
        "in": in_funcs,
        "foreach_stack": foreach_stack,
        "foreach_param": node.foreach_param,
        "recursive": node.name in node.out_funcs,
        "doc": (node.doc or "").strip(),
        "max_user_code_retries": user_retries,
        "retries": user_retries + error_retries,
        "retry_delay_seconds": _retry_delay(decos),
        "timeout_seconds": _timeout(decos),
        "env": _env(decos),
        "resources": _resources(decos),
        "image": None,
        "queue": _queue(flow_name, node.name, decos),
        "secrets": _secrets(flow_name, node.name, decos),
        "decorators": sorted(decos),
        "environment": _environment(flow_name, node, decos, requirements),
    }


def _retries(flow_name, node):
    """(user code retries, error retries) as Metaflow counts them."""
    user_retries, error_retries = 0, 0
    for d in node.decorators:
        u, e = d.step_task_retry_count()
        user_retries = max(user_retries, u or 0)
        error_retries = max(error_retries, e or 0)
    if user_retries + error_retries > 5:
        raise CompileError(
            "Flow %s, step %s: @retry asks for %d attempts; Metaflow allows at "
            "most 6 attempts of a task. Lower `times` to 5 or less."
            % (flow_name, node.name, user_retries + error_retries + 1)
        )
    return user_retries, error_retries


def _retry_delay(decos):
    if "retry" not in decos:
        return 0
    return int(float(decos["retry"].attributes.get("minutes_between_retries") or 0) * 60)


def _timeout(decos):
    if "timeout" not in decos:
        return None
    a = decos["timeout"].attributes
    timeout = (int(a.get("hours") or 0) * 3600 + int(a.get("minutes") or 0) * 60
               + int(a.get("seconds") or 0))
    return timeout or None


def _env(decos):
    if "environment" not in decos:
        return {}
    return {str(k): str(v) for k, v in (decos["environment"].attributes.get("vars") or {}).items()}


def _resources(decos):
    if "resources" not in decos:
        return None
    a = decos["resources"].attributes
    return {
        "cpu": _number(a.get("cpu")),
        "memory": _number(a.get("memory")),
        "gpu": _number(a.get("gpu")),
        "shared_memory": _number(a.get("shared_memory")),
    }


def _queue(flow_name, step_name, decos):
    if "worker" not in decos:
        return None
    queue = decos["worker"].attributes.get("queue")
    if not isinstance(queue, str) or not _QUEUE_RE.match(queue):
        raise CompileError(
            "Flow %s, step %s: @worker(queue=%r): a queue name is letters, digits, '.', "
            "'_' or '-', for example @worker(queue=\"gpu\")." % (flow_name, step_name, queue))
    return queue


def _secrets(flow_name, step_name, decos):
    """The platform secrets the step's @secrets names: the runtime hands
    the step these and no others."""
    from metaflow.metaflow_config import DEFAULT_SECRETS_BACKEND_TYPE

    try:
        return step_sources(flow_name, step_name, decos.get("secrets"),
                            DEFAULT_SECRETS_BACKEND_TYPE)
    except SecretsError as e:
        raise CompileError("%s. Set a secret with: fab -H HOST secrets.set NAME" % e)


def _number(v):
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else f


# --------------------------------------------------------------------------
# Step environments
# --------------------------------------------------------------------------


def read_requirements(flow_name, flow_dir):
    """requirements.txt next to the flow: the base layer of every step's
    environment ({normalized name: requirement line})."""
    path = os.path.join(flow_dir, "requirements.txt")
    if not os.path.isfile(path):
        return {}
    out = {}
    with open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            m = _NAME_RE.match(line)
            if line.startswith("-") or not m:
                raise CompileError(
                    "Flow %s: requirements.txt line %d (%r) is not a plain requirement; "
                    "pip options are not supported there (set the package index with "
                    "MFS_PIP_INDEX_URL on the worker)." % (flow_name, lineno, raw.strip()))
            out[_normalize(m.group(1))] = line
    return out


def _normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_requirement(name, version):
    """@pypi/@conda `packages={name: version}` as a pip requirement."""
    version = str(version or "").strip()
    if not version:
        return name
    if version[0] in "<>=!~":
        return name + version
    return "%s==%s" % (name, version)


def _environment(flow_name, node, decos, requirements):
    """The packages (pip requirement lines) and Python version a step needs.
    Precedence, per package name: the step's @pypi/@conda, then the flow's
    @pypi_base/@conda_base (Metaflow merges those two into the step's
    decorator), then requirements.txt next to the flow."""
    packages = dict(requirements)
    python = None
    sources = ["requirements.txt"] if requirements else []
    deco = decos.get("pypi") or decos.get("conda")
    if deco is not None and not deco.attributes.get("disabled"):
        if "pypi" in decos and "conda" in decos:
            raise CompileError(
                "Flow %s, step %s: the step has both @pypi and @conda; use one of them."
                % (flow_name, node.name))
        for name, version in (deco.attributes.get("packages") or {}).items():
            packages[_normalize(name)] = pip_requirement(name, version)
        if hasattr(deco, "is_attribute_user_defined") and deco.is_attribute_user_defined("python"):
            python = str(deco.attributes.get("python") or "") or None
        sources.append("@" + deco.name)
    if not packages and not python:
        return None
    return {"packages": sorted(packages.values(), key=str.lower), "python": python,
            "source": " + ".join(sources)}
