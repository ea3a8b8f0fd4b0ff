"""What the deploy puts on the VM, computed on the workstation (no connection):
the stack's files, the settings file (.env without the secrets), the list of
secrets to generate, the images each option set needs, and the plan of what
`docker compose up` would change.

The compose files in compose/ are the single source of truth: the services,
which image each runs (``${MFS_<ROLE>_IMAGE:-pinned default}``), which are
one-shots and which profile or file they belong to are read from them.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from metaflow_services import __version__, encryption

from .config import Options

REPO = Path(__file__).resolve().parent.parent
COMPOSE_DIR = REPO / "compose"
# What fab deploy ships into the VM's dags folder (dags/README.md says what).
DAGS_DIR = REPO / "dags"
SHIPPED_TO_DAGS = ("README.md",)
# Files of the stack uploaded to install_dir (paths relative to compose/).
STACK_FILES = ("compose.yaml", "metaflow.yaml", "worker.yaml", "proxy/start.sh",
               "proxy/nginx.conf.template",
               "proxy/metaflow.conf.template", "airflow/Dockerfile", "step/Dockerfile")
PROXY_FILES = ("proxy/start.sh", "proxy/nginx.conf.template", "proxy/metaflow.conf.template")
# Sources that end up in the Airflow image (the project's wheel).
PACKAGE_SOURCES = ("pyproject.toml", "metaflow_services", "metaflow_extensions")

AIRFLOW_UID = 50000
IMAGE_VAR_RE = re.compile(r"\$\{MFS_([A-Z_]+)_IMAGE:[-?]([^}]+)\}")


@dataclass
class Service:
    name: str
    role: str                 # which image: postgres, airflow, metadata, ...
    one_shot: bool            # runs to completion on every start (restart: "no")
    file: str                 # compose.yaml or metaflow.yaml


# ---------------------------------------------------------------------------
# Compose files
# ---------------------------------------------------------------------------


def _load_yaml(text):
    try:
        import yaml
    except ImportError:
        from invoke.vendor import yaml
    return yaml.safe_load(text)


def compose_files(o: Options):
    return ["compose.yaml"] + (["metaflow.yaml"] if o.metaflow_services else [])


def profiles(o: Options, workers=False):
    return [o.object_store] + (["workers"] if workers else [])


def services(o: Options, workers=False, files=None) -> dict:
    """The services `docker compose up` runs with these options (on the main
    VM, with or without worker VMs; or files=["worker.yaml"] on a worker)."""
    active_profiles = set(profiles(o, workers))
    out, seen = {}, set()
    for fname in files or compose_files(o):
        text = (COMPOSE_DIR / fname).read_text()
        data = _load_yaml(text) or {}
        for name, svc in (data.get("services") or {}).items():
            svc = svc or {}
            if name in seen:  # an override in metaflow.yaml
                continue
            seen.add(name)
            svc_profiles = set(svc.get("profiles") or ())
            if svc_profiles and not (svc_profiles & active_profiles):
                continue
            m = IMAGE_VAR_RE.search(str(svc.get("image", "")))
            if not m:
                raise ValueError("%s: service %s has no ${MFS_<ROLE>_IMAGE:-...} image"
                                 % (fname, name))
            out[name] = Service(name=name, role=m.group(1).lower(),
                                one_shot=str(svc.get("restart", "")) == "no", file=fname)
    return out


def default_images() -> dict:
    """Pinned default image of each role, as written in the compose files."""
    out = {}
    for fname in ("compose.yaml", "metaflow.yaml"):
        for m in IMAGE_VAR_RE.finditer((COMPOSE_DIR / fname).read_text()):
            out.setdefault(m.group(1).lower(), m.group(2))
    return out


# Roles whose image the deploy builds (from compose/<dir>) unless overridden.
BUILT = {"airflow": "airflow", "step": "step"}


def images(o: Options) -> dict:
    """role -> image reference, for every image these options need."""
    roles = {s.role for s in services(o).values()}
    if o.executor == "docker":
        roles.add("step")
    defaults = default_images()
    out = {}
    for role in sorted(roles):
        override = getattr(o.images, role, "")
        if override:
            out[role] = override
        elif role in BUILT:
            out[role] = built_tag(role, o)
        else:
            out[role] = defaults[role]
    return out


def base_image(role, o: Options):
    """Base image (build arg) of a built role."""
    if role == "airflow":
        return o.images.airflow_base or _default_build_arg("AIRFLOW_BASE")
    return o.images.step_base or _default_build_arg("STEP_BASE")


def _default_build_arg(name):
    m = re.search(r"%s: \$\{MFS_[A-Z_]+:-([^}]+)\}" % name,
                  (COMPOSE_DIR / "compose.yaml").read_text())
    return m.group(1)


def built_tag(role, o: Options):
    """Tag of a built image: the version plus a digest of everything that goes
    into it, so an unchanged build is found on the VM and skipped, and a
    changed one gets a new tag (and restarts only the services using it)."""
    h = hashlib.sha256()
    h.update(base_image(role, o).encode())
    h.update((COMPOSE_DIR / BUILT[role] / "Dockerfile").read_bytes())
    if role == "airflow":
        for path in _package_files():
            h.update(str(path.relative_to(REPO)).encode())
            h.update(path.read_bytes())
    return "metaflow-services/%s:%s-%s" % (role, __version__, h.hexdigest()[:12])


def _package_files():
    files = []
    for src in PACKAGE_SOURCES:
        p = REPO / src
        if p.is_file():
            files.append(p)
        else:
            files.extend(sorted(f for f in p.rglob("*")
                                if f.is_file() and "__pycache__" not in f.parts
                                and f.suffix not in (".pyc",)))
    return files


# ---------------------------------------------------------------------------
# Files, settings and secrets
# ---------------------------------------------------------------------------


def stack_archive() -> tuple:
    """A reproducible tar of the stack's files and its sha256: the same files
    give the same digest, so an unchanged stack is not uploaded again."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in STACK_FILES:
            data = (COMPOSE_DIR / rel).read_bytes()
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mode = 0o755 if rel.endswith(".sh") else 0o644
            info.mtime = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    return blob, hashlib.sha256(blob).hexdigest()


def proxy_config_sha():
    h = hashlib.sha256()
    for rel in PROXY_FILES:
        h.update((COMPOSE_DIR / rel).read_bytes())
    return h.hexdigest()[:16]


def sizing(o: Options, cores: int, memory_gb: float):
    """Airflow's process counts for this VM (a 4 GB, 2-core VM gets 4 task
    slots and 1 parsing process)."""
    parallelism = o.airflow.parallelism
    if parallelism == "auto":
        by_memory = 4 if memory_gb < 6 else 8 if memory_gb < 12 else 16
        parallelism = max(2, min(4 * cores, by_memory))
    parsing = o.airflow.parsing_processes
    if parsing == "auto":
        parsing = 1 if cores < 4 else 2
    return int(parallelism), int(parsing)


def settings_env(o: Options, facts: dict) -> str:
    """The non-secret half of .env (the secrets are appended on the VM).
    facts: docker_gid, cores, memory_gb, tls_sha, jwt_key_sha (from the VM),
    workers (the worker registry, state/workers.json)."""
    parallelism, parsing = sizing(o, facts["cores"], facts["memory_gb"])
    workers = facts.get("workers") or {}
    user_slots = parallelism + sum(int(w.get("slots") or 0) for w in workers.values())
    s3_internal = {"seaweedfs": "seaweedfs:8333", "minio": "minio:9000"}[o.object_store]
    values = {
        "COMPOSE_PROJECT_NAME": o.project,
        "COMPOSE_FILE": ":".join(compose_files(o)),
        "COMPOSE_PROFILES": ",".join(profiles(o, bool(workers))),
        "MFS_DATA_DIR": o.data_dir,
        "MFS_PUBLIC_HOST": o.public_host,
        "MFS_AIRFLOW_URL": o.airflow_url,
        "MFS_METAFLOW_UI_URL": o.metaflow_url if o.metaflow_services else "",
        "MFS_BIND_ADDRESS": o.ports.bind_address,
        "MFS_HTTPS_PORT": o.ports.https,
        "MFS_S3_PORT": o.ports.s3,
        "MFS_METAFLOW_PORT": o.ports.metaflow,
        "MFS_BUCKET": o.bucket,
        "MFS_S3_INTERNAL_URL": "http://" + s3_internal,
        "MFS_S3_UPSTREAM": s3_internal,
        "MFS_AIRFLOW_USERS": ",".join("%s:%s" % kv for kv in o.airflow.users.items()),
        "MFS_AIRFLOW_PARALLELISM": parallelism,
        # Airflow's limit on running tasks covers every machine: the worker
        # VMs' slots add to the main VM's, or a worker adds no capacity. Users'
        # tasks get all of them (default_pool); one more is the smoke test's.
        "MFS_AIRFLOW_DEFAULT_POOL_SLOTS": user_slots,
        "MFS_AIRFLOW_CORE_PARALLELISM": user_slots + 1,
        "MFS_AIRFLOW_PARSING_PROCESSES": parsing,
        "MFS_DAGS_PAUSED_AT_CREATION": "True" if o.airflow.dags_paused_at_creation else "False",
        "MFS_LOG_RETENTION_DAYS": o.retention.task_logs_days,
        "MFS_AIRFLOW_METADATA_RETENTION_DAYS": o.retention.airflow_metadata_days,
        # Docker keeps 5 files per container.
        "MFS_DOCKER_LOG_MAX_SIZE": "%dm" % max(1, o.retention.docker_logs_mb // 5),
        "MFS_BACKUP_HOST_DIR": o.backup.dir,
        "MFS_BACKUP_SCHEDULE": o.backup.schedule,
        "MFS_BACKUP_KEEP": o.backup.keep,
        "MFS_BACKUP_ENCRYPT_TO": encryption.normalize(o.backup.encrypt_to),
        "MFS_EXECUTOR": o.executor,
        "MFS_METAFLOW_UI_USER": o.metaflow_ui.user,
        "MFS_FLOWS_DEFAULT_USER": o.flows.default_user,
        "MFS_DOCKER_GID": facts["docker_gid"],
        "MFS_PROXY_CONFIG_SHA": proxy_config_sha(),
        "MFS_TLS_SHA": facts["tls_sha"],
        # A new token signing key restarts the api-server and scheduler.
        "MFS_JWT_KEY_SHA": facts.get("jwt_key_sha") or "none",
        **packages_env(o),
    }
    if workers:
        values.update({
            "MFS_AIRFLOW_EXECUTOR": "LocalExecutor," + EDGE_EXECUTOR,
            "MFS_EDGE_API_ENABLED": "True",
            "MFS_WORKER_QUEUES": json.dumps(worker_queues(workers, facts, parallelism),
                                            sort_keys=True, separators=(",", ":")),
            # A dead worker VM's task is retried within ~2 minutes, not 5.
            "MFS_TASK_HEARTBEAT_TIMEOUT": 120,
        })
    for role, ref in images(o).items():
        values["MFS_%s_IMAGE" % role.upper()] = ref
    if o.images.airflow_base:
        values["MFS_AIRFLOW_BASE_IMAGE"] = o.images.airflow_base
    if o.images.step_base:
        values["MFS_STEP_BASE_IMAGE"] = o.images.step_base
    lines = ["# Written by fab deploy (metaflow-services %s): the settings. Do not edit;"
             % __version__,
             "# change the deploy options and run fab deploy. The secrets follow."]
    lines += ["%s=%s" % (k, v) for k, v in values.items()]
    return "\n".join(lines) + "\n"


def packages_env(o: Options) -> dict:
    """Where environment image builds get packages (metaflow_services/images.py
    reads these; the CA and the wheelhouse are files in install_dir/packages,
    deploy/packages.py)."""
    p = o.packages
    return {"MFS_PIP_INDEX_URL": p.index_url, "MFS_PIP_EXTRA_INDEX_URL": p.extra_index_url,
            "MFS_PIP_TRUSTED_HOST": ",".join(filter(None, re.split(r"[\s,]+", p.trusted_hosts)))}


def build_args(o: Options) -> dict:
    """The packages.* options of the stack's own image builds
    (compose/airflow, compose/step); empty ones are left out."""
    env = packages_env(o)
    return {k: env[k] for k in ("MFS_PIP_INDEX_URL", "MFS_PIP_TRUSTED_HOST") if env[k]}


# ---------------------------------------------------------------------------
# Worker VMs (docs/workers.md)
# ---------------------------------------------------------------------------

EDGE_EXECUTOR = "airflow.providers.edge3.executors.EdgeExecutor"
MAIN_WORKER = "main"  # the edge worker on the main VM (serves "default")


def worker_queues(workers: dict, facts: dict, main_slots: int) -> dict:
    """queue -> the largest machine serving it (what the router checks a
    step's @resources against) and the machines' names."""
    machines = dict(workers)
    machines[MAIN_WORKER] = {"queues": ["default"], "cpu": facts["cores"],
                             "memory": int(facts["memory_gb"] * 1024), "gpu": 0,
                             "slots": main_slots}
    out = {}
    for name, w in sorted(machines.items()):
        for q in w["queues"]:
            cap = out.setdefault(q, {"cpu": 0, "memory": 0, "gpu": 0, "workers": []})
            for k in ("cpu", "memory", "gpu"):
                cap[k] = max(cap[k], w.get(k) or 0)
            cap["workers"].append(name)
    return out


def worker_env(o: Options, main: dict, secrets: dict, worker: dict, images: dict,
               docker_gid) -> str:
    """The worker VM's .env (mode 0600): where the main VM is, the secrets a
    worker needs (not the database passwords: it has no database), and what
    this worker serves."""
    host, ports = main["public_host"], main["ports"]
    base = "https://%s" % host + ("" if ports["https"] == 443 else ":%d" % ports["https"])
    values = {
        "COMPOSE_PROJECT_NAME": o.project,
        "COMPOSE_FILE": "worker.yaml",
        "MFS_INSTALL_DIR": o.install_dir,
        "MFS_MAIN_URL": base,
        "MFS_MAIN_S3_URL": "https://%s:%d" % (host, ports["s3"]),
        "MFS_BUCKET": main["bucket"],
        "MFS_METADATA": "service" if main["metaflow_services"] else "local",
        "MFS_MAIN_METADATA_URL": ("https://%s:%d/metadata" % (host, ports["metaflow"])
                                  if main["metaflow_services"] else ""),
        "MFS_WORKER_NAME": worker["name"],
        "MFS_WORKER_QUEUES_LIST": ",".join(worker["queues"]),
        "MFS_WORKER_SLOTS": worker["slots"],
        "MFS_AIRFLOW_IMAGE": images["airflow"],
        "MFS_STEP_IMAGE": images["step"],
        "MFS_DOCKER_GID": docker_gid,
        "MFS_DOCKER_LOG_MAX_SIZE": "%dm" % max(1, o.retention.docker_logs_mb // 5),
        "MFS_AIRFLOW_JWT_SECRET": secrets["MFS_AIRFLOW_JWT_SECRET"],
        "MFS_S3_ACCESS_KEY": secrets["MFS_S3_ACCESS_KEY"],
        "MFS_S3_SECRET_KEY": secrets["MFS_S3_SECRET_KEY"],
        **packages_env(o),
    }
    if main["metaflow_services"]:
        values["MFS_METAFLOW_API_KEY"] = secrets["MFS_METAFLOW_API_KEY"]
    lines = ["# Written by fab add-worker (metaflow-services %s); mode 0600: it holds"
             % __version__, "# secrets of the main VM. Run fab add-worker again to change it."]
    lines += ["%s=%s" % (k, v) for k, v in values.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Secret:
    name: str
    kind: str        # password (A-Za-z0-9), hex, fernet
    length: int = 32


def secrets(o: Options):
    """Every secret the stack uses; generated once on the VM, never changed."""
    out = [
        Secret("MFS_POSTGRES_PASSWORD", "password"),
        Secret("MFS_AIRFLOW_DB_PASSWORD", "password"),
        Secret("MFS_METAFLOW_DB_PASSWORD", "password"),
        Secret("MFS_AIRFLOW_FERNET_KEY", "fernet"),
        Secret("MFS_AIRFLOW_JWT_SECRET", "hex", 64),
        Secret("MFS_AIRFLOW_API_SECRET_KEY", "hex", 64),
        Secret("MFS_S3_ACCESS_KEY", "password", 20),
        Secret("MFS_S3_SECRET_KEY", "password", 40),
        Secret("MFS_METAFLOW_UI_PASSWORD", "password", 24),
        Secret("MFS_METAFLOW_API_KEY", "password", 40),
    ]
    for user in o.airflow.users:
        out.append(Secret(airflow_password_var(user), "password", 24))
    return out


def airflow_password_var(user):
    return "MFS_AIRFLOW_PASSWORD_%s" % user.upper()


# ---------------------------------------------------------------------------
# The plan: what `docker compose up` would change
# ---------------------------------------------------------------------------


@dataclass
class Plan:
    actions: dict = field(default_factory=dict)   # service -> reason
    remove: list = field(default_factory=list)    # containers of services no longer in the stack

    @property
    def changed(self):
        return bool(self.actions or self.remove)

    def lines(self):
        out = ["%s: %s" % (s, r) for s, r in sorted(self.actions.items())]
        out += ["%s: remove (no longer part of the stack)" % s for s in sorted(self.remove)]
        return out


def plan(svcs: dict, hashes: dict, containers: list, image_ids: dict) -> Plan:
    """Compare what compose would run with what runs.

    svcs: {name: Service}; hashes: {service: config hash} (`docker compose
    config --hash`); containers: [{service, config_hash, image, state,
    exit_code}] of the project; image_ids: {service: id of its image now}.
    Long-running services need a container with the same configuration hash
    and image that is running; one-shots re-run only when something else
    changes (compose runs them before their dependents)."""
    p = Plan()
    by_service = {}
    for c in containers:
        by_service.setdefault(c["service"], []).append(c)
    for name, svc in svcs.items():
        cs = by_service.get(name, [])
        if not cs:
            p.actions[name] = "create"
            continue
        c = cs[0]
        if c["config_hash"] != hashes.get(name):
            p.actions[name] = "recreate (configuration changed)"
        elif image_ids.get(name) and c["image"] != image_ids[name]:
            p.actions[name] = "recreate (new image)"
        elif svc.one_shot:
            if c["state"] == "exited" and c["exit_code"] != 0:
                p.actions[name] = "run again (last run failed)"
        elif c["state"] != "running":
            p.actions[name] = "start (%s)" % c["state"]
    p.remove = sorted(set(by_service) - set(svcs))
    return p
