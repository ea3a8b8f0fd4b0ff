"""What Metaflow's Deployer API returns for this platform (see
airflow3_deployer.py): the deployed flow (trigger, delete, from_deployment)
and a triggered run (Airflow's status of it, its Metaflow Run)."""

import json
import os
import sys
import tempfile
from typing import ClassVar, Optional

from metaflow.exception import MetaflowException
from metaflow.runner.deployer import (DeployedFlow, TriggeredRun,
                                      generate_fake_flow_file_contents)
from metaflow.runner.utils import get_lower_level_group, handle_timeout, temporary_fifo

TYPE = "airflow3"  # the CLI group and the Deployer method (airflow3_deployer.TYPE)

# Airflow's run states that are not final.
_ACTIVE = ("queued", "running")


class Airflow3TriggeredRun(TriggeredRun):
    """A run started through Airflow; `.run` is its Metaflow Run once the
    start step began, `.status` Airflow's state of it."""

    @property
    def airflow_run_id(self):
        return json.loads(self._content).get("airflow_run_id")

    @property
    def status(self) -> Optional[str]:
        """queued, running, success or failed (None when Airflow cannot be asked)."""
        from metaflow_services.airflow_client import AirflowAPIError

        try:
            got = _client(self.deployer).get(
                "/api/v2/dags/%s/dagRuns/%s" % (self.deployer.name, self.airflow_run_id),
                "reading the run", ok=(404,))
        except AirflowAPIError:
            return None
        return got and got.get("state")

    @property
    def is_running(self):
        return self.status in _ACTIVE

    def wait_for_completion(self, check_interval: int = 5, timeout: Optional[int] = None):
        import time

        start = time.time()
        while self.is_running:
            if timeout is not None and time.time() - start > timeout:
                raise TimeoutError("The run %s did not finish within %d s." % (self.pathspec,
                                                                               timeout))
            time.sleep(check_interval)
        return self.status

    def __init__(self, deployer, content):
        super().__init__(deployer, content)
        self._content = content


class Airflow3DeployedFlow(DeployedFlow):
    TYPE: ClassVar[Optional[str]] = TYPE

    def trigger(self, **kwargs) -> Airflow3TriggeredRun:
        """Start a run; the flow's parameters are keyword arguments."""
        with temporary_fifo() as (attribute_file_path, attribute_file_fd):
            command = self._group().trigger(deployer_attribute_file=attribute_file_path, **kwargs)
            content, ok = self._run(command, attribute_file_fd)
            if ok:
                return Airflow3TriggeredRun(deployer=self.deployer, content=content)
        raise MetaflowException("Error triggering %s on Airflow for %s"
                                % (self.deployer.name, self.deployer.flow_file))

    def delete(self, **kwargs) -> bool:
        """Remove the DAG; its runs stay in Airflow's history and in Metaflow."""
        _, ok = self._run(self._group().delete(**kwargs))
        return ok

    @classmethod
    def from_deployment(cls, identifier: str, metadata: Optional[str] = None,
                        profile: Optional[str] = None, dags_folder: Optional[str] = None,
                        env: Optional[dict] = None):
        """The deployed DAG *identifier* (its DAG id), read back from the
        deployment (or a local dags folder)."""
        from metaflow import Deployer
        from metaflow_services.deployment import deployed_spec

        spec = deployed_spec(identifier, dags_folder, profile)
        if spec is None:
            raise MetaflowException("No deployed flow found for: %s" % identifier)
        params = {p["name"]: {"name": p["name"], "python_var_name": p["name"].replace("-", "_"),
                              "type": {"json": "JSON", "file": "FilePath"}.get(p["kind"], p["kind"]),
                              "description": p["help"] or "", "is_required": p["required"]}
                  for p in spec["parameters"]}
        contents = generate_fake_flow_file_contents(flow_name=spec["flow"]["name"],
                                                    param_info=params)
        fd, path = tempfile.mkstemp(suffix=".py", prefix="mfs_deployed_")
        with os.fdopen(fd, "w") as f:
            f.write(contents)
        kwargs = {"dag_id": identifier}
        if dags_folder:
            kwargs["dags_folder"] = dags_folder
        d = Deployer(path, profile=profile,
                     env=dict(env or {}, METAFLOW_USER=spec["user"])).airflow3(**kwargs)
        d.name = identifier
        d.flow_name = spec["flow"]["name"]
        d.metadata = metadata
        return cls(deployer=d)

    @classmethod
    def get_triggered_run(cls, identifier: str, run_id: str, metadata: Optional[str] = None,
                          **kwargs):
        """The run whose Airflow run id is *run_id* of the deployed DAG *identifier*."""
        from metaflow_services.spec import run_id_for

        deployed = cls.from_deployment(identifier, metadata, **kwargs)
        return Airflow3TriggeredRun(deployer=deployed.deployer, content=json.dumps({
            "metadata": metadata, "name": identifier, "airflow_run_id": run_id,
            "pathspec": "%s/%s" % (deployed.deployer.flow_name, run_id_for(identifier, run_id))}))

    def _group(self):
        d = self.deployer
        return get_lower_level_group(d.api, d.top_level_kwargs, d.TYPE, d.deployer_kwargs)

    def _run(self, command, attribute_file_fd=None):
        d = self.deployer
        pid = d.spm.run_command([sys.executable, *command], env=d.env_vars, cwd=d.cwd,
                                show_output=d.show_output)
        command_obj = d.spm.get(pid)
        content = None
        if attribute_file_fd is not None:
            content = handle_timeout(attribute_file_fd, command_obj, d.file_read_timeout)
        command_obj.sync_wait()
        return content, command_obj.process.returncode == 0


def _client(deployer):
    from metaflow_services.airflow_client import AirflowClient

    env = deployer.env_vars
    return AirflowClient.from_settings(profile=env.get("METAFLOW_PROFILE"),
                                       url=env.get("MFS_AIRFLOW_URL"),
                                       user=env.get("MFS_AIRFLOW_USER"),
                                       password=env.get("MFS_AIRFLOW_PASSWORD"))
