"""Step decorator attached (``--with airflow3_internal``) to every task that a
compiled Airflow DAG runs.

It is the task-side half of the runtime: it records which Airflow task ran the
Metaflow task (as task metadata, so the Metaflow UI and client can link back),
sets ``current.trigger`` for runs started by @trigger/@trigger_on_finish (from
``MFS_TRIGGERS``, as Metaflow's Argo decorator does from its event payloads),
and, when the step finishes, writes what the orchestrator must know to schedule
what comes next (the foreach width, the switch branch taken) to the file named
by ``MFS_RESULT_FILE``. This mirrors what Metaflow's Argo integration does with
its ``/mnt/out`` files. It ships inside the code package: stdlib + Metaflow only.
"""

import json
import os

from metaflow.decorators import StepDecorator
from metaflow.metadata_provider import MetaDatum

# Environment variable -> task metadata field.
_AIRFLOW_FIELDS = {
    "MFS_AIRFLOW_DAG_ID": "airflow-dag-id",
    "MFS_AIRFLOW_RUN_ID": "airflow-run-id",
    "MFS_AIRFLOW_TASK_ID": "airflow-task-id",
    "MFS_AIRFLOW_MAP_INDEX": "airflow-map-index",
    "MFS_AIRFLOW_TRY_NUMBER": "airflow-try-number",
    "MFS_EXECUTOR": "mfs-executor",
    "MFS_WORKER_NAME": "mfs-worker",
    "MFS_IMAGE": "mfs-image",
    "MFS_BASE_IMAGE": "mfs-base-image",
}
# Written into environment images (metaflow_services/images.py): the packages
# pip actually installed, so a later reader can tell exactly what ran.
_RESOLVED_ENVIRONMENT = "/etc/metaflow-services/environment.json"


def _resolved_environment():
    """{package: version} installed in this step's environment image, as JSON."""
    if not os.environ.get("MFS_BASE_IMAGE") or not os.path.exists(_RESOLVED_ENVIRONMENT):
        return None
    try:
        with open(_RESOLVED_ENVIRONMENT) as f:
            packages = json.load(f)
        return json.dumps({p["name"]: p["version"] for p in packages}, sort_keys=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _triggers():
    try:
        return json.loads(os.environ.get("MFS_TRIGGERS") or "[]")
    except ValueError:
        return []


class Airflow3InternalDecorator(StepDecorator):
    name = "airflow3_internal"

    def task_pre_step(
        self,
        step_name,
        task_datastore,
        metadata,
        run_id,
        task_id,
        flow,
        graph,
        retry_count,
        max_user_code_retries,
        ubf_context,
        inputs,
    ):
        triggers = _triggers()
        if triggers:
            from metaflow import current
            from metaflow.events import Trigger

            current._update_env({"trigger": Trigger(list(triggers))})
        entries = [
            MetaDatum(
                field=field,
                value=os.environ[var],
                type=field,
                tags=["attempt_id:%d" % retry_count],
            )
            for var, field in _AIRFLOW_FIELDS.items()
            if os.environ.get(var)
        ]
        if triggers and step_name == graph.start_step:
            # Where Metaflow's Argo integration records them too.
            entries.append(MetaDatum(field="execution-triggers", value=json.dumps(triggers),
                                     type="execution-triggers",
                                     tags=["attempt_id:%d" % retry_count]))
        resolved = _resolved_environment()
        if resolved:
            entries.append(MetaDatum(field="mfs-environment", value=resolved,
                                     type="mfs-environment",
                                     tags=["attempt_id:%d" % retry_count]))
        if entries:
            metadata.register_metadata(run_id, step_name, task_id, entries)

    def task_finished(
        self, step_name, flow, graph, is_task_ok, retry_count, max_user_code_retries
    ):
        path = os.environ.get("MFS_RESULT_FILE")
        if not path or not is_task_ok:
            return
        result = {"attempt": retry_count}
        node = graph[step_name]
        if node.type == "foreach":
            splits = getattr(flow, "_foreach_num_splits", None)
            if splits is not None:
                result["foreach_num_splits"] = int(splits)
        transition = getattr(flow, "_transition", None)
        if transition:
            result["next"] = list(transition[0])
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, path)
