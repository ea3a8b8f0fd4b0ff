"""Runtime settings, read from the Airflow worker's environment.

A compiled DAG file carries no deployment details: where the object store is,
which executor and image run the steps, and how to reach the metadata service
all come from the worker's environment, so one DAG file runs on any
deployment. Every variable is documented in docs/configuration.md; keep the two
in sync.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import ExitCode, ServicesError

# Variables passed through from the worker to every task (Metaflow's own
# configuration and the object store's credentials).
PASSTHROUGH_PREFIXES = ("METAFLOW_", "AWS_")
# Worker-only variables that must never reach user code.
PASSTHROUGH_EXCLUDE = ("METAFLOW_INIT_", "METAFLOW_EXTRACTED_ROOT")
# The CA bundle of a worker VM (the main VM's certificate) for Metaflow's
# metadata client (requests); boto3 reads AWS_CA_BUNDLE.
PASSTHROUGH_NAMES = ("REQUESTS_CA_BUNDLE",)

DEFAULT_CODE_CACHE_DIR = "/var/cache/metaflow-services/code"


class ConfigurationError(ServicesError):
    """A deployment setting is missing or wrong; the message says which."""

    exit_code = ExitCode.USAGE


@dataclass
class Settings:
    executor: str = "subprocess"
    step_image: str | None = None
    code_cache_dir: str = DEFAULT_CODE_CACHE_DIR
    docker_code_cache: str = "metaflow-services-code-cache"
    docker_network: str | None = None
    docker_volumes: list = field(default_factory=list)
    docker_user: str | None = None
    docker_pull: str = "missing"
    python: str = "python3"
    group_parallelism: int = 4
    task_slots: int | None = None  # Airflow's slots for users' tasks (None: [core] parallelism)
    timeout_grace_seconds: int = 60
    ui_url: str | None = None
    pip_index_url: str | None = None
    pip_extra_index_url: str | None = None
    pip_trusted_host: str | None = None
    pip_cert: str | None = None
    pip_wheelhouse: str | None = None
    lock_dir: str = "/tmp/metaflow-services-locks"
    state_dir: str = "/tmp/metaflow-services-state"

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        env = os.environ if environ is None else environ
        executor = env.get("MFS_EXECUTOR", "subprocess").strip().lower()
        if executor not in ("docker", "subprocess"):
            raise ConfigurationError(
                "MFS_EXECUTOR=%r: expected 'docker' or 'subprocess'." % executor
            )
        pull = env.get("MFS_DOCKER_PULL", "missing").strip().lower()
        if pull not in ("missing", "always", "never"):
            raise ConfigurationError(
                "MFS_DOCKER_PULL=%r: expected 'missing', 'always' or 'never'." % pull
            )
        return cls(
            executor=executor,
            step_image=env.get("MFS_STEP_IMAGE") or None,
            code_cache_dir=env.get("MFS_CODE_CACHE_DIR") or _default_cache_dir(executor),
            docker_code_cache=env.get("MFS_DOCKER_CODE_CACHE") or "metaflow-services-code-cache",
            docker_network=env.get("MFS_DOCKER_NETWORK") or None,
            docker_volumes=[v.strip() for v in env.get("MFS_DOCKER_VOLUMES", "").split(",") if v.strip()],
            docker_user=env.get("MFS_DOCKER_USER") or None,
            docker_pull=pull,
            python=env.get("MFS_STEP_PYTHON") or "python3",
            group_parallelism=_int(env, "MFS_GROUP_PARALLELISM", 4, minimum=1),
            task_slots=_int(env, "MFS_TASK_SLOTS", 0, minimum=0) or None,
            timeout_grace_seconds=_int(env, "MFS_TIMEOUT_GRACE_SECONDS", 60, minimum=5),
            ui_url=(env.get("MFS_METAFLOW_UI_URL") or "").rstrip("/") or None,
            pip_index_url=env.get("MFS_PIP_INDEX_URL") or None,
            pip_extra_index_url=env.get("MFS_PIP_EXTRA_INDEX_URL") or None,
            pip_trusted_host=env.get("MFS_PIP_TRUSTED_HOST") or None,
            pip_cert=env.get("MFS_PIP_CERT") or None,
            pip_wheelhouse=env.get("MFS_PIP_WHEELHOUSE") or None,
            lock_dir=env.get("MFS_LOCK_DIR") or "/tmp/metaflow-services-locks",
            state_dir=env.get("MFS_STATE_DIR") or "/tmp/metaflow-services-state",
        )


def _default_cache_dir(executor):
    if executor == "docker":
        return DEFAULT_CODE_CACHE_DIR
    # The subprocess executor writes as the worker's user.
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "metaflow-services", "code")


def _int(env, name, default, minimum):
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError("%s=%r: expected a whole number." % (name, raw))
    if value < minimum:
        raise ConfigurationError("%s=%r: must be at least %d." % (name, raw, minimum))
    return value


def task_passthrough_env(environ=None) -> dict:
    env = os.environ if environ is None else environ
    return {
        k: v
        for k, v in env.items()
        if (k.startswith(PASSTHROUGH_PREFIXES) and not k.startswith(PASSTHROUGH_EXCLUDE))
        or k in PASSTHROUGH_NAMES
    }


def datastore_root(environ=None) -> str:
    """The S3 root all tasks store data under; runs need a shared object store."""
    env = os.environ if environ is None else environ
    ds = env.get("METAFLOW_DEFAULT_DATASTORE", "local")
    if ds != "s3":
        raise ConfigurationError(
            "METAFLOW_DEFAULT_DATASTORE=%r on the Airflow worker: tasks of one run "
            "share data through the object store, so set it to 's3' (with "
            "METAFLOW_DATASTORE_SYSROOT_S3 and METAFLOW_S3_ENDPOINT_URL)." % ds
        )
    root = env.get("METAFLOW_DATASTORE_SYSROOT_S3")
    if not root:
        raise ConfigurationError(
            "METAFLOW_DATASTORE_SYSROOT_S3 is not set on the Airflow worker "
            "(for example s3://metaflow/metaflow)."
        )
    return root.rstrip("/")
