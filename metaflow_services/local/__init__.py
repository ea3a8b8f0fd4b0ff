"""The platform on one machine without a VM: PostgreSQL, SeaweedFS (S3),
Airflow 3 and optionally the Metaflow metadata service as processes on
loopback.

- services.py: ports, Process, PostgreSQL, SeaweedFS, the Metaflow and worker env
- airflow_server.py: Airflow's api-server, scheduler, dag-processor; a REST client
- metadata.py: the metadata service and UI backend (Docker containers)
- stack.py: the stack with a folder (what `local up/down/status` do)
- command.py: the `metaflow-services local` parser and adapters

The demo, the benchmarks and the tests build on these.
"""

from .airflow_server import Airflow, AirflowAPI
from .metadata import MetaflowService
from .services import (VENV_BIN, LocalStackError, Postgres, Process, SeaweedFS, free_port,
                       free_ports, metaflow_env, scratch_dir, wait_for, worker_env)
from .stack import LocalStack, default_dir

__all__ = ["Airflow", "AirflowAPI", "LocalStack", "LocalStackError", "MetaflowService",
           "Postgres", "Process", "SeaweedFS", "VENV_BIN", "default_dir", "free_port",
           "free_ports", "metaflow_env", "scratch_dir", "wait_for", "worker_env"]
