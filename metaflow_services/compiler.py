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

The refusals are in ``refusals``, a step's part of the spec in ``step_spec``,
parameters, schedule and the run's owner in ``run_inputs``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field

from metaflow import current

from . import __version__, routing
from .refusals import (CompileError, refuse_flow_decorators,
                       refuse_required_parameters_on_schedule)
from .run_inputs import (config_value, finish_event, parameters, project, run_user,
                         schedule, top_level_options, triggers, validated_tags)
from .spec import SPEC_VERSION, foreach_groups_root, read_specs, render_dag_file, write_atomic
from .triggers import TriggerCycle, check_triggers
from .step_spec import read_requirements, step_spec

_DAG_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,250}$")


@dataclass
class CompileOptions:
    tags: list = field(default_factory=list)
    image: str | None = None
    step_images: list = field(default_factory=list)  # "STEP=IMAGE"
    dag_id: str | None = None
    pool: str | None = None


def create_dag(obj, out, options: CompileOptions, as_json=False):
    """The ``airflow3 create`` command: check, build the spec, upload, write."""
    flow_name = obj.flow.name
    spec = build_spec(obj, options)  # refusals happen here, before any upload
    _check_trigger_graph(spec, out)

    say("Uploading the code package of %s ..." % flow_name)
    spec["package"] = upload_package(obj)

    text = render_dag_file(spec)
    path = out
    if os.path.isdir(out) or out.endswith(os.sep):
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "%s.py" % dag_file_stem(spec["dag_id"]))
    write_atomic(path, text)

    summary = {
        "flow": flow_name,
        "dag_id": spec["dag_id"],
        "dag_file": os.path.abspath(path),
        "schedule": spec["schedule"],
        "package_sha": spec["package"]["sha"],
        "steps": list(spec["steps"]),
        "where": os.path.abspath(path),
    }
    if as_json:
        print(json.dumps(summary))
    say("DAG %s for flow %s written to %s" % (spec["dag_id"], flow_name, os.path.abspath(path)))
    if spec["schedule"]:
        say("Schedule: %s (%s)" % (spec["schedule"]["cron"], spec["schedule"]["timezone"] or "UTC"))
    if spec["triggers"]:
        whens = (["event %s is published" % e["name"] for e in spec["triggers"]["events"]]
                 + ["a run of %s succeeds" % f["name"][len("metaflow."):-len(".end")]
                    for f in spec["triggers"]["flows"]])
        say("Runs when %s%s." % (" and ".join(whens), " (all of them, each since the "
                                 "last run)" if len(whens) > 1 else ""))
    elif not spec["schedule"]:
        say("No @schedule: trigger runs from the Airflow UI or its REST API.")
    envs = {json.dumps(s["environment"], sort_keys=True) for s in spec["steps"].values()
            if s.get("environment")}
    if envs:
        say("%d step environment(s) from @pypi/@conda/requirements.txt: each is built into "
            "an image on the worker the first time a step needs it." % len(envs))
    return summary


def _check_trigger_graph(spec, out):
    """Refuse a cycle of @trigger_on_finish through the flows already
    deployed next to this one, and say which flows it waits for that are not
    deployed (the DAG is still written: they may come later)."""
    if not spec["triggers"]:
        return
    folder = os.environ.get("MFS_DEPLOYED_DAGS") or (out if os.path.isdir(out) else None)
    deployed = read_specs(folder) if folder else []
    try:
        missing = check_triggers(spec, deployed)
    except TriggerCycle as e:
        raise CompileError("Flow %s: %s" % (spec["flow"]["name"], e))
    for name in missing:
        say("Warning: no deployed flow emits %s yet: this DAG runs once a flow with that "
            "name (project and branch) is deployed here and succeeds." % name)


def flow_environments(obj) -> dict:
    """The distinct step environments of the flow, with the steps using
    each (``airflow3 environments``: what `fab bundle --flows` downloads)."""
    flow_name, graph = obj.flow.name, obj.graph
    requirements = read_requirements(flow_name, os.path.dirname(os.path.abspath(sys.argv[0])))
    envs = {}
    for name in _topological(graph):
        env = step_spec(flow_name, graph, graph[name], requirements)["environment"]
        if env:
            key = json.dumps([env["packages"], env["python"]])
            envs.setdefault(key, dict(env, steps=[]))["steps"].append(name)
    return {"flow": flow_name, "file": os.path.basename(sys.argv[0]),
            "environments": list(envs.values())}


def say(msg):
    # click directly, not Metaflow's echo: its *bold* markup eats the
    # asterisks of cron expressions.
    from metaflow._vendor import click

    click.secho(msg, err=True)


def dag_file_stem(dag_id):
    return re.sub(r"[^A-Za-z0-9_]", "_", dag_id)


# --------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------


def build_spec(obj, options: CompileOptions) -> dict:
    flow, graph = obj.flow, obj.graph
    flow_name = flow.name
    refuse_flow_decorators(flow_name, flow)

    requirements = read_requirements(flow_name, os.path.dirname(os.path.abspath(sys.argv[0])))
    steps = {name: step_spec(flow_name, graph, graph[name], requirements)
             for name in _topological(graph)}
    # Foreach bodies are mapped over the outermost foreach only (Airflow cannot
    # nest mapping); every step records which mapped group it belongs to.
    for name, s in steps.items():
        s["group"] = foreach_groups_root(s["foreach_stack"])

    user = run_user(flow_name)
    params = parameters(flow_name, flow)
    spec = {
        "spec_version": SPEC_VERSION,
        "generator": "metaflow-services %s" % __version__,
        "flow": {
            "name": flow_name,
            "file": os.path.basename(sys.argv[0]),
            "source": os.path.abspath(sys.argv[0]),
            "doc": (flow.__doc__ or "").strip(),
            "project": project(),
        },
        "dag_id": _dag_id(flow_name, options),
        "user": user,
        "tags": validated_tags(flow_name, options.tags),
        "top_level_options": top_level_options(flow),
        "parameters": params,
        "config_value": config_value(flow),
        "schedule": schedule(flow_name, flow),
        "image": options.image,
        "pool": options.pool,
        "triggers": triggers(flow_name, flow, params),
        "finish_event": finish_event(),
        "start_step": graph.start_step,
        "end_step": graph.end_step,
        "steps": steps,
    }
    _apply_step_images(flow_name, spec, options.step_images)
    refuse_required_parameters_on_schedule(flow_name, spec)
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


def _dag_id(flow_name, options):
    dag_id = options.dag_id or current.get("project_flow_name") or flow_name
    if not _DAG_ID_RE.match(dag_id):
        raise CompileError(
            "Flow %s: %r is not a valid Airflow DAG id (letters, digits, '_', '.', "
            "'-'; at most 250 characters). Pass another one with --dag-id."
            % (flow_name, dag_id)
        )
    return dag_id


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
