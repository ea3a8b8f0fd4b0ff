"""What one Airflow task instance does at run time (in the Airflow worker).

1. Work out which Metaflow tasks of the step this instance runs: one per
   foreach path in its group, only on branches that were taken, with their
   input paths, from the results its upstream steps pushed to XCom.
2. Run each through the executor (a container or a subprocess running
   ``bootstrap.py``), streaming output into the Airflow task log.
3. Push the results to XCom (key ``mfs``: the Metaflow task id, foreach width
   and next steps of every task), and, for a top-level foreach, return the
   ranges of splits that the mapped body expands over.

Ids are deterministic: the Metaflow run id comes from the DAG id and the
Airflow run id, task ids from the foreach path, the attempt from Airflow's
try number. Clearing a task in Airflow therefore re-runs it as the next attempt
of the same Metaflow task.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .config import ConfigurationError, Settings, datastore_root, task_passthrough_env
from .errors import ServicesError
from .executors import ExecutorError, Launch, container_name, make_executor
from .platform_secrets import TYPE as SECRETS_TYPE, SecretsError, fetch
from .spec import (PARAMS_TASK_ID, parameter_env, parse_path_key, path_key, run_id_for,
                   task_id_for)
from .triggers import (MissingPayloadField, asset_kwargs, event_parameters, finish_extra,
                       run_triggers, trigger_metadata)

RESULT_MARKER = "\x1eMFS-RESULT "
XCOM_KEY = "mfs"
MAX_ATTEMPTS = 6  # Metaflow refuses attempt numbers >= 6

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Planning (pure functions, unit-tested)
# ---------------------------------------------------------------------------


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


def split_ranges(num_splits, max_map_length):
    """Ranges of splits, one per mapped task instance: one split each when
    Airflow allows that many mapped instances, otherwise contiguous ranges."""
    if num_splits <= max_map_length:
        return [[i, i + 1] for i in range(num_splits)]
    size = math.ceil(num_splits / max_map_length)
    return [[i, min(i + size, num_splits)] for i in range(0, num_splits, size)]


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
            return split_ranges(splits, _max_map_length())
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
        if len(planned) == 1:
            return [self._run_one(planned[0])]
        workers = min(self.settings.group_parallelism, len(planned))
        self.log.info("Running %d Metaflow tasks, %d at a time.", len(planned), workers)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self._run_one, planned))

    def _run_one(self, planned):
        self._step_image()  # build the environment image once, before any task
        outcome = self._run_iteration(planned)
        # A recursive step (a switch that can choose itself) loops here: each
        # iteration is a new Metaflow task whose input is the previous one.
        while (self.s["recursive"] and outcome.exit_code == 0
               and self.step in (outcome.result.get("next") or ())):
            prev = outcome.planned
            nxt = PlannedTask(path=prev.path, task_id=task_id_for(prev.path, prev.iteration + 1),
                              inputs=["%s/%s/%s" % (self.run_id, self.step, prev.task_id)],
                              iteration=prev.iteration + 1)
            outcome = self._run_iteration(nxt)
        return outcome

    def _run_iteration(self, planned):
        if self._killed.is_set():
            return TaskOutcome(planned, 143)
        flow = self.spec["flow"]["name"]
        pathspec = "%s/%s/%s/%s" % (flow, self.run_id, self.step, planned.task_id)
        prefix = "" if planned.path == () and not planned.iteration else "[%s] " % planned.task_id
        launch = self._launch(planned, pathspec)
        result = {}

        def on_line(line):
            if line.startswith(RESULT_MARKER):
                result.update(json.loads(line[len(RESULT_MARKER):]))
            else:
                self.log.info("%s%s", prefix, line)

        self.log.info("%sStarting Metaflow task %s (attempt %d) in %s.", prefix, pathspec,
                      self.attempt, self.executor.describe(launch))
        try:
            code = self.executor.run(launch, on_line)
        except (ExecutorError, ConfigurationError) as e:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(str(e))
        return TaskOutcome(planned, code, result)

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

    def _launch(self, planned, pathspec):
        """What the executor starts for one Metaflow task: the bootstrap's
        input (MFS_TASK) in the task's environment, in the step's image."""
        spec = self.spec
        step_args, init = self._metaflow_commands(planned)
        image = self._step_image()
        pkg = spec["package"]
        task = {
            "package": {"url": self._package_url(), "sha": pkg["sha"],
                        "post_extract_env": pkg["post_extract_env"]},
            "cache_dir": self.settings.code_cache_dir,
            "flow_file": spec["flow"]["file"],
            "init": init,
            "step": step_args,
            "deadline_seconds": self._deadline(),
            "where": "%s executor%s" % (self.settings.executor,
                                        ", image %s" % image if self.settings.executor == "docker" else ""),
            "log": {"pathspec": pathspec, "attempt": self.attempt, "datastore": "s3",
                    "datastore_root": self.ds_root},
        }
        return Launch(
            name=container_name(self.run_id, self.step, planned.task_id),
            env=self._task_env(task, image),
            image=image,
            resources=self.s["resources"],
            secrets=self._secrets(),
            labels={"metaflow-services.pathspec": pathspec,
                    "metaflow-services.dag-id": spec["dag_id"],
                    "metaflow-services.airflow-run-id": self.ti.run_id},
        )

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
            "--input-paths", ",".join(planned.inputs),
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

    def _task_env(self, task, image):
        spec = self.spec
        env = task_passthrough_env()
        env.update(self.s["env"])  # @environment
        env.update({
            "METAFLOW_USER": spec["user"],
            "METAFLOW_RUNTIME_NAME": "airflow3",
            "MFS_TASK": json.dumps(task),
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
