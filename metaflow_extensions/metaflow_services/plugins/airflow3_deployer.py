"""Metaflow's Deployer API for this platform:

    from metaflow import Deployer
    deployed = Deployer("flow.py", profile="vm").airflow3().create()
    run = deployed.trigger(alpha=5)      # a TriggeredRun
    run.status                           # Airflow's state of the run
    run.wait_for_run().data.x            # the Metaflow Run, once it started
    Airflow3DeployedFlow.from_deployment("MyFlow", profile="vm").delete()

As with Metaflow's Argo Workflows and Step Functions deployers, each call
runs this flow's `airflow3` command (create | trigger | delete) in a
subprocess; deployer options (dag_id, dags_folder) are the group's options.
Airflow's REST API is reached with the profile's address and
$MFS_AIRFLOW_PASSWORD (pass env={"MFS_AIRFLOW_PASSWORD": ...} to Deployer).
The objects it returns are in airflow3_deployer_objects.py (imported only
when used: Metaflow loads this module while it loads its plugins). This
module ships in code packages: it imports only Metaflow at load time.
"""

from typing import ClassVar, Optional

from metaflow.runner.deployer_impl import DeployerImpl

TYPE = "airflow3"


class Airflow3Deployer(DeployerImpl):
    """Deployer for Airflow 3 (metaflow-services).

    Parameters
    ----------
    dag_id : str, optional
        The DAG's id (default: the flow name, or project.branch.FlowName).
    dags_folder : str, optional
        Deploy into this local dags folder instead of the profile's deployment.
    """

    TYPE: ClassVar[Optional[str]] = TYPE

    def __init__(self, deployer_kwargs, **kwargs):
        self._deployer_kwargs = deployer_kwargs
        super().__init__(**kwargs)

    @property
    def deployer_kwargs(self):
        return self._deployer_kwargs

    @staticmethod
    def deployed_flow_type():
        from .airflow3_deployer_objects import Airflow3DeployedFlow

        return Airflow3DeployedFlow

    def create(self, **kwargs):
        """Compile and deploy the flow (options as `airflow3 create`: tags,
        image, step_images, pool, ...); returns an Airflow3DeployedFlow."""
        from .airflow3_deployer_objects import Airflow3DeployedFlow

        return self._create(Airflow3DeployedFlow, **kwargs)
