"""What one Airflow task instance does at run time (in the Airflow worker).

1. Work out which Metaflow tasks of the step this instance runs: one per
   foreach path in its group, only on branches that were taken, with their
   input paths, from the results its upstream steps pushed to XCom.
2. Run them through the executor, all in one container (or subprocess)
   running ``bootstrap.py``, whose warm process forks each Metaflow task;
   the output streams into the Airflow task log, each task's line marked.
3. Push the results to XCom (key ``mfs``: the Metaflow task id, foreach width
   and next steps of every task), and, for a top-level foreach, return the
   ranges of splits that the mapped body expands over.

Ids are deterministic: the Metaflow run id comes from the DAG id and the
Airflow run id, task ids from the foreach path, the attempt from Airflow's
try number. Clearing a task in Airflow therefore re-runs it as the next attempt
of the same Metaflow task. A retried range of splits re-runs only the splits
that did not finish (a range whose splits all finished was cleared on purpose
and runs again).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, field

from .bootstrap import RESULT_MARKER, RESULT_OBJECT
from .config import ConfigurationError, Settings, datastore_root, task_passthrough_env
from .errors import ServicesError
from .executors import ExecutorError, Launch, container_name, make_executor
from .planning import PlannedTask, compress_paths, plan_tasks, split_ranges
from .platform_secrets import TYPE as SECRETS_TYPE, SecretsError, fetch
from .spec import PARAMS_TASK_ID, parameter_env, path_key, run_id_for, task_id_for
from .triggers import (MissingPayloadField, asset_kwargs, event_parameters, finish_extra,
                       run_triggers, trigger_metadata)

XCOM_KEY = "mfs"
MAX_ATTEMPTS = 6  # Metaflow refuses attempt numbers >= 6

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------


@dataclass
class TaskOutcome:
    planned: PlannedTask
    exit_code: int
    result: dict = field(default_factory=dict)


class StepFailed(ServicesError):
    """A step's task failed or could not start; Airflow may retry it."""


class StepRun:
    def __init__(self, operator, context):
        self.op = operator
        self.context = context
        self.spec = operator.mfs_spec
        self.step = operator.mfs_step
        self.s = self.spec["steps"][self.step]
        self.ti = context["ti"]
        self.log = operator.log
        self.executor = None
        self._killed = threading.Event()
        self._image_lock = threading.Lock()
        self._secret_values = None
        self._secrets_lock = threading.Lock()

    # -- entry point --------------------------------------------------------

    def execute(self):
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        try:
            self.settings = Settings.from_env()
            self.ds_root = datastore_root()
        except ConfigurationError as e:
            raise AirflowFailException(str(e))
        attempt = self.ti.try_number - 1
        if attempt >= MAX_ATTEMPTS:
            raise AirflowFailException(
                "This is try %d of the task; Metaflow allows at most %d attempts of a "
                "task. Trigger a new DAG run instead of clearing this task again."
                % (self.ti.try_number, MAX_ATTEMPTS))
        self.attempt = attempt
        self.run_id = run_id_for(self.spec["dag_id"], self.ti.run_id)
        self.triggers = run_triggers(self.spec, self.context.get("triggering_asset_events"))
        group = self._group()
        planned = plan_tasks(self.spec, self.step, self.run_id, self._pull_upstream(), group)
        self.context["mfs_label"] = self._label(group, planned)
        if not planned:
            raise AirflowSkipException(
                "No Metaflow task of step %r runs here: the branch was not taken." % self.step)
        self.log.info("Metaflow run %s/%s, step %s: %d task(s), attempt %d, executor %s.",
                      self.spec["flow"]["name"], self.run_id, self.step, len(planned),
                      attempt, self.settings.executor)
        if self.settings.ui_url:
            self.log.info("Metaflow UI: %s/%s/%s", self.settings.ui_url,
                          self.spec["flow"]["name"], self.run_id)
        try:
            self.executor = make_executor(self.settings, self.log)
        except ConfigurationError as e:
            raise AirflowFailException(str(e))

        outcomes = self._run_all(planned)
        failed = [o for o in outcomes if o.exit_code != 0]
        if failed:
            names = ", ".join("%s/%s" % (self.step, o.planned.task_id) for o in failed)
            raise StepFailed("Metaflow task(s) %s failed (exit code %s); see the log above "
                             "or the task's logs in the Metaflow UI."
                             % (names, ", ".join(str(o.exit_code) for o in failed)))

        tasks = {}
        for o in outcomes:
            tasks[path_key(o.planned.path)] = {
                "id": o.planned.task_id,
                "next": o.result.get("next") or [n for n in self.s["next"] if n != self.step],
                "splits": o.result.get("foreach_num_splits"),
            }
        self.ti.xcom_push(key=XCOM_KEY, value={"run_id": self.run_id, "tasks": tasks})
        if self.step == self.spec["end_step"] and self.spec.get("finish_event"):
            self._emit_finish(tasks[""]["id"])
        if self.s["type"] == "foreach" and not self.s["foreach_stack"]:
            splits = tasks[""]["splits"]
            return split_ranges(splits, self._slots(), _max_map_length())
        return None

    def _emit_finish(self, end_task_id):
        """The extra of the run's finish event (the end step's outlet), which
        Airflow records when this task succeeds."""
        from airflow.sdk import Asset

        asset = Asset(**asset_kwargs(self.spec["finish_event"]))
        self.context["outlet_events"][asset].extra = finish_extra(self.spec, self.run_id,
                                                                  end_task_id)

    def _init_params(self):
        """The run's parameter values: the trigger form / REST conf, or the
        payload fields @trigger maps from the events that started the run."""
        from airflow.sdk.exceptions import AirflowFailException

        params = dict(self.context.get("params") or {})
        try:
            params.update(event_parameters(self.spec, self.triggers))
        except MissingPayloadField as e:
            raise AirflowFailException(str(e))
        return parameter_env(self.spec, params)

    def kill(self):
        self._killed.set()
        if self.executor is not None:
            self.executor.kill_all()

    # -- helpers ------------------------------------------------------------

    def _group(self):
        g = self.op.mfs_group
        if g is None:
            return None
        if isinstance(g, str):
            g = json.loads(g)
        return [int(g[0]), int(g[1])]

    def _label(self, group, planned):
        if group is None:
            return None
        if group[1] - group[0] == 1:
            return "split %d" % group[0]
        return "splits %d-%d" % (group[0], group[1] - 1)

    def _pull_upstream(self):
        upstream = {}
        for parent in self.s["in"]:
            same_group = (self.s["group"] is not None
                          and self.spec["steps"][parent]["group"] == self.s["group"])
            if same_group:
                value = self.ti.xcom_pull(task_ids=parent, key=XCOM_KEY,
                                          map_indexes=self.ti.map_index)
            else:
                value = self.ti.xcom_pull(task_ids=parent, key=XCOM_KEY)
            # A mapped upstream with exactly one instance comes back as a
            # scalar, several as a list, a skipped one as None.
            if value is None:
                values = []
            elif isinstance(value, dict):
                values = [value]
            else:
                values = [v for v in value if v]
            upstream[parent] = values
        return upstream

    def _run_all(self, planned):
        """Runs the planned tasks in one container (or subprocess). A recursive
        step (a switch that can choose itself) loops: each iteration is a new
        Metaflow task whose input is the previous one, run as the next batch."""
        self._step_image()  # build the environment image once, before any task
        final = {}
        batch = planned
        while batch:
            again = []
            for o in self._run_batch(batch):
                prev = o.planned
                if (self.s["recursive"] and o.exit_code == 0
                        and self.step in (o.result.get("next") or ())):
                    again.append(PlannedTask(
                        path=prev.path, task_id=task_id_for(prev.path, prev.iteration + 1),
                        inputs=["%s/%s/%s" % (self.run_id, self.step, prev.task_id)],
                        iteration=prev.iteration + 1))
                else:
                    final[prev.path] = o
            batch = again
        return [final[p.path] for p in planned]

    def _run_batch(self, planned):
        if self._killed.is_set():
            return [TaskOutcome(p, 143) for p in planned]
        launch = self._launch(planned)
        results = {}

        def on_line(line):
            if line.startswith(RESULT_MARKER):
                r = json.loads(line[len(RESULT_MARKER):])
                results[r.pop("key")] = r
            else:
                self.log.info("%s", line)

        what = ("Metaflow task %s" % launch.labels.get("metaflow-services.pathspec")
                if len(planned) == 1 else "%d Metaflow tasks" % len(planned))
        self.log.info("Starting %s (attempt %d) in %s.", what, self.attempt,
                      self.executor.describe(launch))
        try:
            code = self.executor.run(launch, on_line)
        except (ExecutorError, ConfigurationError) as e:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(str(e))
        outcomes = []
        for p in planned:
            r = results.get(p.task_id)
            if r is None:  # the container or bootstrap died before the task ended
                outcomes.append(TaskOutcome(p, code or 1))
            else:
                outcomes.append(TaskOutcome(p, r.pop("exit_code"), r))
        return outcomes

    def _base_image(self):
        return self.s.get("image") or self.spec.get("image") or self.settings.step_image

    def _step_image(self):
        """The image this step runs in: the base image, or for a step with an
        environment (@pypi, @conda, requirements.txt) the image built for it."""
        if getattr(self, "_image", None):
            return self._image
        from airflow.sdk.exceptions import AirflowFailException

        env = self.s.get("environment")
        base = self._base_image()
        if not env or self.settings.executor != "docker":
            if env:
                raise AirflowFailException(
                    "Step %s needs the packages %s (%s), which run in an environment image: "
                    "that needs MFS_EXECUTOR=docker on the Airflow worker (it is %s)."
                    % (self.step, ", ".join(env["packages"]), env["source"],
                       self.settings.executor))
            self._image = base
            return base
        if not base:
            raise AirflowFailException(
                "Step %s needs an environment image but no base image is set: set "
                "MFS_STEP_IMAGE on the Airflow worker or compile with --image." % self.step)
        from .images import EnvironmentBuildError, ensure_environment_image

        with self._image_lock:
            if not getattr(self, "_image", None):
                try:
                    self._image = ensure_environment_image(
                        self.executor.client, base, env, self.settings, self.log)
                except EnvironmentBuildError as e:
                    self.log.error("%s", e)  # in the task log as plain text, not only the traceback
                    raise StepFailed(str(e))
        return self._image

    def _launch(self, planned):
        """What the executor starts for a batch of Metaflow tasks: the
        bootstrap's input (MFS_TASK_FILE), in the step's environment and image."""
        spec = self.spec
        image = self._step_image()
        pkg = spec["package"]
        parallel = self._parallel(planned)
        job = {
            "package": {"url": self._package_url(), "sha": pkg["sha"],
                        "post_extract_env": pkg["post_extract_env"]},
            "cache_dir": self.settings.code_cache_dir,
            "flow_file": spec["flow"]["file"],
            "deadline_seconds": self._deadline(),
            "parallel": parallel,
            "where": "%s executor%s" % (self.settings.executor,
                                        ", image %s" % image if self.settings.executor == "docker" else ""),
            "log": {"attempt": self.attempt, "datastore": "s3", "datastore_root": self.ds_root},
            # A retried batch of several tasks skips those that finished, by
            # their result objects; a batch of one runs again whatever it
            # finds, so its task writes none (0.2 s a step).
            "tasks": [self._job_task(p, keep_result=len(planned) > 1) for p in planned],
        }
        first, last = planned[0].task_id, planned[-1].task_id
        step_path = "%s/%s/%s" % (spec["flow"]["name"], self.run_id, self.step)
        labels = {"metaflow-services.dag-id": spec["dag_id"],
                  "metaflow-services.airflow-run-id": self.ti.run_id}
        if len(planned) == 1:
            labels["metaflow-services.pathspec"] = "%s/%s" % (step_path, first)
        else:
            labels["metaflow-services.tasks"] = "%s/%s..%s" % (step_path, first, last)
        resources = dict(self.s["resources"] or {})
        for k in ("cpu", "memory", "shared_memory"):  # per task, for `parallel` at once
            if resources.get(k):
                resources[k] = float(resources[k]) * parallel
        return Launch(
            name=container_name(self.run_id, self.step,
                                first if len(planned) == 1 else "%s..%s" % (first, last)),
            env=self._task_env(image),
            job=json.dumps(job).encode(),
            image=image,
            resources=resources,
            secrets=self._secrets(),
            labels=labels,
        )

    def _job_task(self, planned, keep_result):
        pathspec = "%s/%s/%s/%s" % (self.spec["flow"]["name"], self.run_id, self.step,
                                    planned.task_id)
        step_args, init = self._metaflow_commands(planned)
        task = {
            "key": planned.task_id,
            "pathspec": pathspec,
            "step": step_args,
            "init": init,
            # Which task a line of the Airflow log belongs to (not needed for a
            # step's only task).
            "label": "" if planned.path == () and not planned.iteration
                     else "[%s] " % planned.task_id,
        }
        if keep_result:
            task["result_url"] = "%s/%s/%s" % (self.ds_root, pathspec, RESULT_OBJECT)
        return task

    def _parallel(self, planned):
        """Metaflow tasks the batch runs at once. A range of splits runs one
        at a time (the ranges keep the slots busy); the nested tasks of one
        split, up to MFS_GROUP_PARALLELISM at a time, in a container sized for
        that many (never with GPUs)."""
        group = self._group()
        if (len(planned) == 1 or (self.s["resources"] or {}).get("gpu")
                or (group is not None and group[1] - group[0] > 1)):
            return 1
        return min(self.settings.group_parallelism, len(planned))

    def _slots(self):
        if self.settings.task_slots:
            return self.settings.task_slots
        from airflow.sdk import conf

        return conf.getint("core", "parallelism", fallback=32)

    def _secrets(self):
        """The platform secrets the step's @secrets names (read once per
        Airflow task; the executor hands them over as a private file)."""
        with self._secrets_lock:
            if self._secret_values is None:
                from airflow.sdk.exceptions import AirflowFailException

                try:
                    self._secret_values = fetch(self.s.get("secrets") or [], self.step)
                except SecretsError as e:
                    self.log.error("%s", e)
                    raise AirflowFailException(str(e))
        return self._secret_values

    def _metaflow_commands(self, planned):
        """The task's `step` command line, and for the run's first task the
        `init` that records the run's parameters first."""
        spec = self.spec
        tags = list(spec["tags"]) + [
            "airflow_dag_id:%s" % spec["dag_id"],
            "airflow_run_id:%s" % self.ti.run_id,
        ]
        tag_args = [a for t in tags for a in ("--tag", t)]
        top = list(spec["top_level_options"]) + [
            "--quiet", "--no-pylint", "--with", "airflow3_internal",
            "--event-logger", "nullSidecarLogger", "--monitor", "nullSidecarMonitor",
        ]
        step_args = top + [
            "step", self.step,
            "--run-id", self.run_id,
            "--task-id", planned.task_id,
            "--retry-count", str(self.attempt),
            "--max-user-code-retries", str(self.s["max_user_code_retries"]),
            "--input-paths", compress_paths(planned.inputs),
        ] + tag_args
        if planned.split_index is not None:
            step_args += ["--split-index", str(planned.split_index)]
        if self.step != spec["start_step"] or planned.iteration:
            return step_args, None
        return step_args, {
            "args": top + ["init", "--run-id", self.run_id, "--task-id", PARAMS_TASK_ID] + tag_args,
            "env": self._init_params(),
            # Metaflow marks a finished task with <attempt>.DONE.lock; a
            # retried start must not create a second _parameters task.
            "done_marker": "%s/%s/%s/_parameters/%s/0.DONE.lock"
                           % (self.ds_root, spec["flow"]["name"], self.run_id, PARAMS_TASK_ID),
        }

    def _package_url(self):
        pkg = self.spec["package"]
        if pkg.get("path") and pkg.get("datastore") == "s3":
            # Resolved against this worker's datastore root (see compiler.upload_package).
            return "%s/%s" % (self.ds_root, pkg["path"])
        return pkg["url"]

    def _deadline(self):
        if not self.s["timeout_seconds"]:
            return None
        # @timeout's own alarm fires first; this backstop leaves time for
        # @catch and for persisting artifacts on a busy machine.
        return self.s["timeout_seconds"] + self.settings.timeout_grace_seconds

    def _task_env(self, image):
        spec = self.spec
        env = task_passthrough_env()
        env.update(self.s["env"])  # @environment
        env.update({
            "METAFLOW_USER": spec["user"],
            "METAFLOW_RUNTIME_NAME": "airflow3",
            "MFS_AIRFLOW_DAG_ID": spec["dag_id"],
            "MFS_AIRFLOW_RUN_ID": self.ti.run_id,
            "MFS_AIRFLOW_TASK_ID": self.ti.task_id,
            "MFS_AIRFLOW_MAP_INDEX": str(self.ti.map_index),
            "MFS_AIRFLOW_TRY_NUMBER": str(self.ti.try_number),
            "MFS_EXECUTOR": self.settings.executor,
            # Which machine ran it: the edge worker's name on worker VMs.
            "MFS_WORKER_NAME": os.environ.get("MFS_WORKER_NAME") or socket.gethostname(),
            # @pypi/@conda steps already run inside their environment's image.
            "MFS_PREBUILT_ENVIRONMENTS": "1",
        })
        # @secrets(sources=["name"]) without a type: the platform's secrets.
        env.setdefault("METAFLOW_DEFAULT_SECRETS_BACKEND_TYPE", SECRETS_TYPE)
        if self.triggers:  # current.trigger (the airflow3_internal decorator)
            env["MFS_TRIGGERS"] = trigger_metadata(self.triggers)
        if self.settings.executor == "docker" and image:
            env["MFS_IMAGE"] = image
            env["MFS_BASE_IMAGE"] = self._base_image()
        if spec["config_value"]:
            env["METAFLOW_FLOW_CONFIG_VALUE"] = spec["config_value"]
        return env


def _max_map_length():
    from airflow.sdk import conf

    return conf.getint("core", "max_map_length", fallback=1024)
