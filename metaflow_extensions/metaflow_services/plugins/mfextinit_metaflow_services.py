"""Registers metaflow-services with Metaflow's extension mechanism.

Adds the CLI group ``python flow.py airflow3 ...`` (named so it does not clash
with Metaflow's built-in ``airflow`` group, which emits Kubernetes-only DAGs for
Airflow 2), the internal step decorator attached to every task run from a
compiled DAG, ``@worker(queue=...)``, which routes a step to worker VMs, the
``airflow3`` implementation of Metaflow's Deployer API, and the secrets provider
``metaflow-services`` behind @secrets(sources=["name"]) in deployed runs.
This file is also shipped inside every code package, so it must not import
anything beyond Metaflow at load time.
"""

CLIS_DESC = [("airflow3", ".airflow3_cli.cli")]

# Deployer("flow.py").airflow3(...): Metaflow's Deployer API.
DEPLOYER_IMPL_PROVIDERS_DESC = [("airflow3", ".airflow3_deployer.Airflow3Deployer")]

STEP_DECORATORS_DESC = [
    ("airflow3_internal", ".airflow3_decorator.Airflow3InternalDecorator"),
    ("worker", ".worker_decorator.WorkerDecorator"),
]

# @secrets(sources=["name"]): the platform's secrets (fab secrets set NAME).
SECRETS_PROVIDERS_DESC = [("metaflow-services", ".platform_secrets_provider.PlatformSecretsProvider")]
