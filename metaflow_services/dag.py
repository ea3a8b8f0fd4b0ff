"""Build the Airflow DAG for a compiled flow spec (parse time).

Imported by Airflow's dag-processor for every generated DAG file, so it imports
only Airflow and the standard library: no metaflow, no docker, no network.

Shape: one task per Metaflow step, task id = step name, edges = the flow's
edges. A foreach body (the steps between a top-level foreach and its join) is
an Airflow *mapped task group* expanded over the foreach's splits, so each
split's steps run as soon as that split's previous step is done. Airflow cannot
nest mapping, so deeper foreach levels run grouped inside each mapped task;
and a wide foreach (more splits than about two per task slot) maps over
contiguous ranges of splits, each run in one container (runtime.py). Switch steps run only the chosen branch:
a step on a branch that was not taken skips itself.
"""

from __future__ import annotations

import datetime
import os

from airflow.sdk import (
    DAG,
    Asset,
    AssetOrTimeSchedule,
    BaseOperator,
    BaseOperatorLink,
    CronTriggerTimetable,
    Param,
    task_group,
)

from .routing import queues_from_env, route
from .spec import SPEC_VERSION, normalize, run_id_for
from .triggers import asset_kwargs, listened_events

# A fixed, timezone-aware start date: Airflow 3 needs one for scheduled DAGs,
# and `now()` would change on every parse.
START_DATE = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)

_PARAM_TYPES = {"int": "integer", "float": "number", "bool": "boolean",
                "str": "string", "file": "string", "json": None}


class MetaflowRunLink(BaseOperatorLink):
    """'Metaflow run' button on every task: opens this Airflow run's Metaflow
    run in the Metaflow UI (needs MFS_METAFLOW_UI_URL)."""

    name = "Metaflow run"

    def get_link(self, operator, *, ti_key):
        ui = (os.environ.get("MFS_METAFLOW_UI_URL") or "").rstrip("/")
        if not ui:
            return ""
        spec = operator.mfs_spec
        return "%s/%s/%s" % (ui, spec["flow"]["name"], run_id_for(spec["dag_id"], ti_key.run_id))


class MetaflowStepOperator(BaseOperator):
    """Runs one Metaflow step (all of its tasks for this Airflow task instance)."""

    template_fields = ("mfs_group",)
    operator_extra_links = (MetaflowRunLink(),)
    ui_color = "#e8f4fd"

    def __init__(self, *, mfs_spec, mfs_step, mfs_group=None, **kwargs):
        super().__init__(**kwargs)
        self.mfs_spec = mfs_spec
        self.mfs_step = mfs_step
        self.mfs_group = mfs_group
        self._mfs_runtime = None

    def execute(self, context):
        from .runtime import StepRun  # run time only: may import docker

        self._mfs_runtime = StepRun(self, context)
        return self._mfs_runtime.execute()

    def on_kill(self):
        if self._mfs_runtime is not None:
            self._mfs_runtime.kill()


def build_dag(spec: dict) -> DAG:
    if spec.get("spec_version") != SPEC_VERSION:
        raise ValueError(
            "This DAG file was generated for spec version %r, but the installed "
            "metaflow-services reads version %d: compile the flow again."
            % (spec.get("spec_version"), SPEC_VERSION)
        )
    spec = normalize(spec)
    flow = spec["flow"]
    tags = ["metaflow", flow["name"]]
    if flow["project"]:
        tags += ["project:%s" % flow["project"]["name"], "branch:%s" % flow["project"]["branch"]]

    dag = DAG(
        dag_id=spec["dag_id"],
        description=(flow["doc"].splitlines() or ["Metaflow flow %s" % flow["name"]])[0][:200],
        schedule=_schedule(spec["schedule"], listened_events(spec)),
        start_date=START_DATE,
        catchup=False,
        params={p["name"]: _param(p) for p in spec["parameters"]},
        doc_md=_doc(spec),
        tags=tags,
        default_args={"owner": spec["user"]},
    )
    queues = queues_from_env()  # worker VMs' queues; none on a single VM
    with dag:
        ops = {}
        groups = {}
        for name, step in spec["steps"].items():
            if step["group"] is None:
                ops[name] = _operator(spec, name, queues)
            else:
                groups.setdefault(step["group"], []).append(name)
        for foreach, members in groups.items():
            _mapped_body(spec, foreach, members, ops, queues)
        for name, step in spec["steps"].items():
            for nxt in step["next"]:
                if nxt != name:  # a recursive step loops inside its own task
                    ops[name] >> ops[nxt]
    return dag


def _mapped_body(spec, foreach, members, ops, queues):
    group_id = "%s_splits" % foreach
    while group_id in spec["steps"]:
        group_id += "_"

    @task_group(group_id=group_id, prefix_group_id=False,
                tooltip="The steps inside foreach %r, one mapped instance per split "
                        "(or range of splits)." % foreach)
    def body(mfs_group):
        for name in members:
            ops[name] = _operator(spec, name, queues, group=mfs_group)

    body.expand(mfs_group=ops[foreach].output)


def _operator(spec, name, queues, group=None):
    step = spec["steps"][name]
    kwargs = route(spec["flow"]["name"], name, step, queues)
    if step["timeout_seconds"] and group is None:
        # (A mapped instance may run a range of splits one after another: the
        # bootstrap's deadline applies to each of them, Airflow's would not.)
        grace = int(os.environ.get("MFS_TIMEOUT_GRACE_SECONDS") or 60)
        # The bootstrap's own deadline (@timeout + grace) fires first; Airflow's
        # is the last resort (it then cancels the task, which kills the step).
        kwargs["execution_timeout"] = datetime.timedelta(seconds=step["timeout_seconds"] + 2 * grace)
    if group is not None:
        kwargs["map_index_template"] = "{{ mfs_label }}"
    if spec.get("pool"):
        kwargs["pool"] = spec["pool"]
    if name == spec["end_step"] and spec.get("finish_event"):
        # A successful run emits its finish event (flows with @trigger_on_finish).
        kwargs["outlets"] = [Asset(**asset_kwargs(spec["finish_event"]))]
    return MetaflowStepOperator(
        task_id=name,
        mfs_spec=spec,
        mfs_step=name,
        mfs_group=group,
        retries=step["retries"],
        retry_delay=datetime.timedelta(seconds=step["retry_delay_seconds"]),
        # Steps after a switch run unless something upstream failed; a step on
        # a branch that was not taken skips itself.
        trigger_rule="all_success" if name == spec["start_step"] else "none_failed",
        doc_md=step["doc"] or None,
        **kwargs,
    )


def _param(p):
    ptype = _PARAM_TYPES[p["kind"]]
    kwargs = {"description": p["help"] or None}
    if p["kind"] == "file":
        kwargs["description"] = ((p["help"] + " ") if p["help"] else "") + (
            "(IncludeFile: the file was uploaded when the flow was compiled.)")
    if p["has_default"]:
        if ptype:
            kwargs["type"] = ptype
        return Param(p["default"], **kwargs)
    if p["required"]:
        if ptype:
            kwargs["type"] = ptype
        return Param(**kwargs)
    # Optional without a default: Metaflow passes None.
    if ptype:
        kwargs["type"] = [ptype, "null"]
    return Param(None, **kwargs)


def _schedule(schedule, events):
    """@schedule's cron, the events of @trigger/@trigger_on_finish (a list of
    assets: all of them), or either (Metaflow deploys both)."""
    cron = schedule and CronTriggerTimetable(schedule["cron"], timezone=schedule["timezone"] or "UTC")
    assets = [Asset(**asset_kwargs(name)) for name in events]
    if cron and assets:
        return AssetOrTimeSchedule(timetable=cron, assets=assets)
    return assets or cron or None


def _doc(spec):
    flow = spec["flow"]
    pkg = spec["package"]
    lines = [
        "### Metaflow flow `%s`" % flow["name"],
        "",
        flow["doc"] or "",
        "",
        "* Flow file: `%s` (compiled from `%s`)" % (flow["file"], flow["source"]),
        "* Code package: `%s` (sha1 `%s`)" % (pkg["url"], pkg["sha"]),
        "* Runs as Metaflow user `%s`; Metaflow run id = `af-` + a hash of this DAG id "
        "and the Airflow run id (shown in each task's log)." % spec["user"],
    ]
    if flow["project"]:
        lines.append("* Project `%s`, branch `%s`" % (flow["project"]["name"], flow["project"]["branch"]))
    if spec["schedule"]:
        lines.append("* Schedule: `%s` (%s), from `@schedule`"
                     % (spec["schedule"]["cron"], spec["schedule"]["timezone"] or "UTC"))
    for name in listened_events(spec):
        lines.append("* Runs when `%s` happens (`@trigger`/`@trigger_on_finish`; all of the "
                     "listed events)" % name)
    if spec.get("finish_event"):
        lines.append("* A successful run emits the asset event `%s`" % spec["finish_event"])
    ui = (os.environ.get("MFS_METAFLOW_UI_URL") or "").rstrip("/")
    if ui:
        lines.append("* [This flow's runs in the Metaflow UI](%s/?flow_id=%s); each task "
                     "has a *Metaflow run* link to its run." % (ui, flow["name"]))
    lines.append("* Generated by %s" % spec["generator"])
    return "\n".join(lines)
