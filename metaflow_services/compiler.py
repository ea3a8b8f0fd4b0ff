"""Compile a Metaflow flow into an Airflow 3 DAG file.

Runs inside Metaflow's CLI (``python flow.py airflow3 create OUT``), where the
flow has been loaded, its decorators initialised and its graph linted. It

1. checks that everything the flow uses can be honoured on one machine and
   refuses otherwise (naming the flow, the step, the construct and the fix),
2. turns the flow's graph, parameters and decorators into a plain, versioned
   *spec* (a JSON-able dict, see ``metaflow_services.spec``),
3. uploads the flow's code package to the flow's datastore, and
4. writes a small DAG file (the spec literal plus one call into
   ``metaflow_services.dag.build_dag``) atomically.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field

from metaflow import current
from metaflow.exception import MetaflowException

from . import __version__, routing
from .spec import SPEC_VERSION, foreach_groups_root, render_dag_file, write_atomic

# Step decorators that change *where* a step runs; one machine cannot honour them.
_REFUSED_STEP_DECORATORS = {
    "kubernetes": "runs the step on Kubernetes",
    "batch": "runs the step on AWS Batch",
    "parallel": "runs the step as a multi-node gang (@parallel)",
    "slurm": "runs the step on a Slurm cluster",
    "nvidia": "runs the step on NVIDIA DGX Cloud",
    "snowpark": "runs the step on Snowpark",
}
_REFUSED_FLOW_DECORATORS = {
    "trigger": "starts runs from external events",
    "trigger_on_finish": "starts runs when another flow finishes",
    "exit_hook": "runs hooks when the run ends",
}
# Dependency decorators: Metaflow builds these environments at run time with
# micromamba and internet access; silently ignoring them would run the step
# with the wrong packages.

# Parameter names Metaflow drops or mangles when passed through the
# environment (METAFLOW_INIT_<NAME>), see metaflow-on-airflow.md.
_RESERVED_PARAMETER_NAMES = {"name", "cmd", "input", "index", "script"}

_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_DAG_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,250}$")


class CompileError(MetaflowException):
    headline = "Cannot compile this flow for Airflow"


@dataclass
class CompileOptions:
    tags: list = field(default_factory=list)
    image: str | None = None
    step_images: list = field(default_factory=list)  # "STEP=IMAGE"
    dag_id: str | None = None


def create_dag(obj, out, options: CompileOptions, as_json=False):
    """The ``airflow3 create`` command: check, build the spec, upload, write."""
    flow_name = obj.flow.name
    spec = build_spec(obj, options)  # refusals happen here, before any upload

    say("Uploading the code package of %s ..." % flow_name)
    spec["package"] = upload_package(obj)

    text = render_dag_file(spec)
    path = out
    if os.path.isdir(out) or out.endswith(os.sep):
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "%s.py" % _file_stem(spec["dag_id"]))
    write_atomic(path, text)

    summary = {
        "flow": flow_name,
        "dag_id": spec["dag_id"],
        "dag_file": os.path.abspath(path),
        "schedule": spec["schedule"],
        "package_sha": spec["package"]["sha"],
        "steps": list(spec["steps"]),
    }
    if as_json:
        print(json.dumps(summary))
    say("DAG %s for flow %s written to %s" % (spec["dag_id"], flow_name, os.path.abspath(path)))
    if spec["schedule"]:
        say("Schedule: %s (%s)" % (spec["schedule"]["cron"], spec["schedule"]["timezone"] or "UTC"))
    else:
        say("No @schedule: trigger runs from the Airflow UI or its REST API.")
    envs = {json.dumps(s["environment"], sort_keys=True) for s in spec["steps"].values()
            if s.get("environment")}
    if envs:
        say("%d step environment(s) from @pypi/@conda/requirements.txt: each is built into "
            "an image on the worker the first time a step needs it." % len(envs))
    return summary


def say(msg):
    # click directly, not Metaflow's echo: its *bold* markup eats the
    # asterisks of cron expressions.
    from metaflow._vendor import click

    click.secho(msg, err=True)


def _file_stem(dag_id):
    return re.sub(r"[^A-Za-z0-9_]", "_", dag_id)


# --------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------


def build_spec(obj, options: CompileOptions) -> dict:
    flow, graph = obj.flow, obj.graph
    flow_name = flow.name
    _refuse_flow_decorators(flow_name, flow)

    requirements = read_requirements(flow_name, os.path.dirname(os.path.abspath(sys.argv[0])))
    steps = {}
    for name in _topological(graph):
        steps[name] = _step_spec(flow_name, graph, graph[name], options)
        steps[name]["environment"] = _environment(
            flow_name, graph[name], {d.name: d for d in graph[name].decorators}, requirements)
    # Foreach bodies are mapped over the outermost foreach only (Airflow cannot
    # nest mapping); every step records which mapped group it belongs to.
    for name, s in steps.items():
        s["group"] = foreach_groups_root(s["foreach_stack"])

    user = _user(flow_name)
    spec = {
        "spec_version": SPEC_VERSION,
        "generator": "metaflow-services %s" % __version__,
        "flow": {
            "name": flow_name,
            "file": os.path.basename(sys.argv[0]),
            "source": os.path.abspath(sys.argv[0]),
            "doc": (flow.__doc__ or "").strip(),
            "project": _project(),
        },
        "dag_id": _dag_id(flow_name, options),
        "user": user,
        "tags": _validated_tags(flow_name, options.tags),
        "top_level_options": _top_level_options(flow),
        "parameters": _parameters(flow_name, flow, graph),
        "config_value": _config_value(flow),
        "schedule": _schedule(flow_name, flow),
        "image": options.image,
        "start_step": graph.start_step,
        "end_step": graph.end_step,
        "steps": steps,
    }
    _apply_step_images(flow_name, spec, options.step_images)
    _refuse_required_parameters_on_schedule(flow_name, spec)
    _check_routes(flow_name, spec)
    return spec


def _check_routes(flow_name, spec):
    """Each step must have a queue that can hold it (the same check runs
    when Airflow parses the DAG file: workers may be removed later)."""
    try:
        queues = routing.queues_from_env()
        for name, step in spec["steps"].items():
            routing.route(flow_name, name, step, queues)
    except routing.RoutingError as e:
        raise CompileError(str(e))


def _topological(graph):
    order = [n for n in graph.sorted_nodes if n in graph]
    # sorted_nodes is a DFS order; make it a true topological order so a step's
    # upstream is always created before it (recursive self-loops ignored).
    indeg = {n: 0 for n in order}
    for n in order:
        for o in graph[n].out_funcs:
            if o != n and o in indeg:
                indeg[o] += 1
    ready = [n for n in order if indeg[n] == 0]
    out = []
    while ready:
        n = ready.pop(0)
        out.append(n)
        for o in graph[n].out_funcs:
            if o != n and o in indeg:
                indeg[o] -= 1
                if indeg[o] == 0:
                    ready.append(o)
    return out


def _step_spec(flow_name, graph, node, options):
    decos = {d.name: d for d in node.decorators}
    for deco_name, what in _REFUSED_STEP_DECORATORS.items():
        if deco_name in decos:
            raise CompileError(
                "Flow %s, step %s: @%s %s, which a single-VM deployment cannot "
                "do. Remove @%s from the step; give it more resources with "
                "@resources(cpu=..., memory=...) instead."
                % (flow_name, node.name, deco_name, what, deco_name)
            )

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
    retry_delay = 0
    if "retry" in decos:
        retry_delay = int(float(decos["retry"].attributes.get("minutes_between_retries") or 0) * 60)

    timeout = None
    if "timeout" in decos:
        a = decos["timeout"].attributes
        timeout = int(a.get("hours") or 0) * 3600 + int(a.get("minutes") or 0) * 60 + int(a.get("seconds") or 0)
        timeout = timeout or None

    env = {}
    if "environment" in decos:
        env = {str(k): str(v) for k, v in (decos["environment"].attributes.get("vars") or {}).items()}

    resources = None
    if "resources" in decos:
        a = decos["resources"].attributes
        resources = {
            "cpu": _number(a.get("cpu")),
            "memory": _number(a.get("memory")),
            "gpu": _number(a.get("gpu")),
            "shared_memory": _number(a.get("shared_memory")),
        }

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
        "retry_delay_seconds": retry_delay,
        "timeout_seconds": timeout,
        "env": env,
        "resources": resources,
        "image": None,
        "queue": _queue(flow_name, node.name, decos),
        "decorators": sorted(decos),
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


def _number(v):
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else f


def _refuse_flow_decorators(flow_name, flow):
    decos = getattr(flow, "_flow_decorators", {}) or {}
    for deco_name, what in _REFUSED_FLOW_DECORATORS.items():
        if decos.get(deco_name):
            raise CompileError(
                "Flow %s: @%s %s, which needs an event bus that this deployment "
                "does not have. Remove @%s and start runs from Airflow (a "
                "@schedule, the Airflow UI, or the REST API)."
                % (flow_name, deco_name, what, deco_name)
            )


# --------------------------------------------------------------------------
# Step environments (@pypi, @pypi_base, @conda, @conda_base, requirements.txt)
# --------------------------------------------------------------------------

_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


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


def _user(flow_name):
    from metaflow.util import get_username

    user = get_username()
    if not user or user == "root":
        raise CompileError(
            "Flow %s: Metaflow needs a user name other than root to record runs. "
            "Set METAFLOW_USER (for example METAFLOW_USER=airflow) and compile again."
            % flow_name
        )
    return user


def _project():
    name = current.get("project_name")
    if not name:
        return None
    return {
        "name": name,
        "branch": current.get("branch_name"),
        "flow_name": current.get("project_flow_name"),
        "is_production": bool(current.get("is_production")),
        "is_user_branch": bool(current.get("is_user_branch")),
    }


def _dag_id(flow_name, options):
    dag_id = options.dag_id or current.get("project_flow_name") or flow_name
    if not _DAG_ID_RE.match(dag_id):
        raise CompileError(
            "Flow %s: %r is not a valid Airflow DAG id (letters, digits, '_', '.', "
            "'-'; at most 250 characters). Pass another one with --dag-id."
            % (flow_name, dag_id)
        )
    return dag_id


def _validated_tags(flow_name, tags):
    from metaflow.tagging_util import validate_tags

    try:
        validate_tags(tags)
    except MetaflowException as e:
        raise CompileError("Flow %s: invalid --tag: %s" % (flow_name, e))
    return list(tags)


def _top_level_options(flow):
    """--branch/--production and other options flow decorators add to the CLI."""
    from metaflow.decorators import flow_decorators
    from metaflow.util import dict_to_cli_options

    opts = {}
    for deco in flow_decorators(flow):
        opts.update(deco.get_top_level_options())
    return list(dict_to_cli_options(opts))


def _parameters(flow_name, flow, graph):
    from metaflow.includefile import FilePathClass
    from metaflow.parameters import JSONType, deploy_time_eval

    out = []
    seen = set()
    for var, param in flow._get_parameters():
        if param.IS_CONFIG_PARAMETER:
            continue
        norm = param.name.lower().replace("-", "_")
        if norm in _RESERVED_PARAMETER_NAMES:
            raise CompileError(
                "Flow %s: the parameter %s cannot be passed to the run: Metaflow "
                "reads parameter values from METAFLOW_INIT_<NAME> variables and "
                "ignores or misreads this name. Rename the parameter (for example "
                "%s_value)." % (flow_name, param.name, param.name)
            )
        if norm in seen:
            raise CompileError(
                "Flow %s: the parameter %s is declared twice (names are "
                "case-insensitive and '-' equals '_'). Rename one of them."
                % (flow_name, param.name)
            )
        seen.add(norm)
        ptype = param.kwargs.get("type")
        if ptype is None and "default" in param.kwargs:
            d = deploy_time_eval(param.kwargs.get("default"))
            ptype = type(d) if d is not None else str
        if ptype == JSONType:
            kind = "json"
        elif isinstance(ptype, FilePathClass):
            kind = "file"
        elif ptype is bool or getattr(ptype, "name", None) == "boolean":
            kind = "bool"
        elif ptype is int or getattr(ptype, "name", None) == "integer":
            kind = "int"
        elif ptype is float or getattr(ptype, "name", None) == "float":
            kind = "float"
        else:
            kind = "str"
        has_default = "default" in param.kwargs and param.kwargs.get("default") is not None
        default = None
        if has_default:
            # Evaluates deploy-time defaults (functions of the context) and, for
            # IncludeFile, uploads the file and returns its descriptor.
            default = deploy_time_eval(param.kwargs.get("default"))
            if kind == "json" and isinstance(default, str):
                try:
                    default = json.loads(default)
                except ValueError:
                    raise CompileError(
                        "Flow %s: the default of the JSON parameter %s is not "
                        "valid JSON." % (flow_name, param.name)
                    )
            if kind == "file" and not isinstance(default, str):
                default = json.dumps(default)
        out.append({
            "name": param.name,
            "env": "METAFLOW_INIT_" + param.name.upper().replace("-", "_"),
            "kind": kind,
            "default": default,
            "has_default": has_default,
            "required": bool(param.kwargs.get("required", False)),
            "help": param.kwargs.get("help") or "",
        })
    return out


def _config_value(flow):
    """Config values are frozen into the code package at compile time; tasks read
    them back from it ("kv." keys), exactly as Metaflow's Argo integration does."""
    from metaflow.user_configs.config_options import ConfigInput

    cfg = {
        param.name: ConfigInput.make_key_name(param.name)
        for _, param in flow._get_parameters()
        if param.IS_CONFIG_PARAMETER
    }
    return json.dumps(cfg) if cfg else None


_AWS_DOW = {"1": "SUN", "2": "MON", "3": "TUE", "4": "WED", "5": "THU", "6": "FRI", "7": "SAT"}


def _schedule(flow_name, flow):
    decos = (getattr(flow, "_flow_decorators", {}) or {}).get("schedule")
    if not decos:
        return None
    deco = decos[0]
    expr = getattr(deco, "schedule", None)
    if not expr:
        return None
    tz = deco.attributes.get("timezone") or None
    cron = normalize_cron(flow_name, expr, user_given=bool(deco.attributes.get("cron")))
    if tz:
        try:
            from zoneinfo import ZoneInfo

            ZoneInfo(tz)
        except Exception:
            raise CompileError(
                "Flow %s: @schedule(timezone=%r) is not a known IANA time zone. "
                "Use a name such as 'Europe/Amsterdam' or 'America/New_York'."
                % (flow_name, tz)
            )
    return {"cron": cron, "timezone": tz, "source": expr}


def normalize_cron(flow_name, expr, user_given=True):
    """Metaflow documents AWS EventBridge cron (6 fields: min hour dom month dow
    year, '?' allowed, day-of-week 1-7 = SUN-SAT). Airflow reads a 6th field as
    seconds, so convert to standard 5-field cron. A 5-field expression is taken
    as standard cron as it is."""
    fields = expr.split()
    if len(fields) == 5:
        out = fields
    elif len(fields) == 6:
        if fields[5] not in ("*", "?"):
            raise CompileError(
                "Flow %s: @schedule(cron=%r) restricts the year (%r); Airflow's cron "
                "has no year field. Use '*' as the sixth field." % (flow_name, expr, fields[5])
            )
        out = fields[:5]
        out[4] = re.sub(r"\b([1-7])\b", lambda m: _AWS_DOW[m.group(1)], out[4])
    else:
        raise CompileError(
            "Flow %s: @schedule(cron=%r) has %d fields; use 5-field cron "
            "('0 6 * * *') or Metaflow's 6-field AWS form ('0 6 * * ? *')."
            % (flow_name, expr, len(fields))
        )
    out = ["*" if f == "?" else f for f in out]
    cron = " ".join(out)
    try:
        from croniter import croniter
    except ImportError:  # Airflow not installed where we compile: Airflow checks at parse time.
        return cron
    if not croniter.is_valid(cron):
        raise CompileError(
            "Flow %s: @schedule(cron=%r) is not a valid cron expression (read as %r)."
            % (flow_name, expr, cron)
        )
    return cron


def _refuse_required_parameters_on_schedule(flow_name, spec):
    if not spec["schedule"]:
        return
    for p in spec["parameters"]:
        if p["required"] and not p["has_default"]:
            raise CompileError(
                "Flow %s: the parameter %s is required and has no default, but the "
                "flow has @schedule: scheduled runs would have no value for it. Give it "
                "a default, or remove @schedule and trigger runs with a value."
                % (flow_name, p["name"])
            )


def _apply_step_images(flow_name, spec, step_images):
    for item in step_images or ():
        step, sep, image = item.partition("=")
        if not sep or not image:
            raise CompileError(
                "Flow %s: --step-image expects STEP=IMAGE, got %r." % (flow_name, item)
            )
        if step not in spec["steps"]:
            raise CompileError(
                "Flow %s: --step-image names the step %s, which the flow does not "
                "have (steps: %s)." % (flow_name, step, ", ".join(spec["steps"]))
            )
        spec["steps"][step]["image"] = image


# --------------------------------------------------------------------------
# The code package
# --------------------------------------------------------------------------


def upload_package(obj):
    """Build Metaflow's code package (Metaflow itself, extensions and the flow's
    directory) and store it content-addressed in the flow's datastore."""
    from metaflow.package import MetaflowPackage

    if obj.flow_datastore.TYPE not in ("s3", "local"):
        raise CompileError(
            "Flow %s: the %s datastore is not supported; set "
            "METAFLOW_DEFAULT_DATASTORE=s3 (the deployment's object store)."
            % (obj.flow.name, obj.flow_datastore.TYPE)
        )
    package = MetaflowPackage(
        obj.flow, obj.environment, obj.echo, suffixes=obj.package_suffixes
    )
    url, sha = obj.flow_datastore.save_data([package.blob], len_hint=1)[0]
    metadata = json.loads(package.package_metadata)
    if metadata.get("archive_format", "tgz") != "tgz":
        raise CompileError(
            "Flow %s: code packages in the %r format are not supported (only tgz)."
            % (obj.flow.name, metadata.get("archive_format"))
        )
    root = obj.flow_datastore.datastore_root.rstrip("/")
    rel = url[len(root) + 1:] if url.startswith(root + "/") else None
    post_extract = {
        k: v
        for k, v in MetaflowPackage.get_post_extract_env_vars(
            package.package_metadata, dest_dir="{root}"
        ).items()
    }
    return {
        "sha": sha,
        "url": url,
        # Relative to the datastore root, so a worker resolves it against its
        # own METAFLOW_DATASTORE_SYSROOT_S3 (one DAG file for any deployment
        # that shares the object store).
        "path": rel,
        "datastore": obj.flow_datastore.TYPE,
        "metadata": package.package_metadata,
        "post_extract_env": post_extract,
    }
