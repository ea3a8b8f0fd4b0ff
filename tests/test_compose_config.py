"""The stack as Docker Compose renders it (`docker compose config`) with what
the deploy writes into .env: every service's environment, healthcheck,
published ports and volumes, for the full stack (with the Metaflow services,
whose images cannot be run on the test machines) and the other variants."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO, deploy_module

config = deploy_module("config")
stack = deploy_module("stack")

HAVE_COMPOSE = shutil.which("docker") and subprocess.run(
    ["docker", "compose", "version"], stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL).returncode == 0
pytestmark = pytest.mark.skipif(not HAVE_COMPOSE, reason="needs the docker compose CLI "
                                                         "(scripts/host-setup installs it)")
LONG_RUNNING_AIRFLOW = ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
                        "airflow-triggerer", "maintenance", "flow-watcher")
FACTS = {"docker_gid": "988", "cores": 2, "memory_gb": 3.8, "tls_sha": "fedcba9876543210",
         "jwt_key_sha": "0123456789abcdef"}


def render(tmp_path, workers=None, **options):
    o = config.Options(public_host="mfs.example.com")
    for k, v in options.items():
        config.set_option(o, k, v)
    config.validate(o)
    d = tmp_path / "install"
    for rel in stack.STACK_FILES:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stack.COMPOSE_DIR / rel, d / rel)
    secrets = {s.name: "%s-value" % s.name.lower() for s in stack.secrets(o)}
    (d / ".env").write_text(stack.settings_env(o, dict(FACTS, workers=workers or {})) +
                            "".join("%s=%s\n" % kv for kv in secrets.items()))
    proc = subprocess.run(["docker", "compose", "config", "--format", "json"], cwd=str(d),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert set(cfg["services"]) == set(stack.services(o, bool(workers))), "deploy/stack.py reads the files " \
                                                           "differently from compose"
    return o, secrets, cfg


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return render(tmp_path_factory.mktemp("full"))


def test_only_the_proxy_publishes_ports(full):
    o, _, cfg = full
    for name, svc in cfg["services"].items():
        if name != "proxy":
            assert not svc.get("ports"), name
    ports = {(p["target"], int(p["published"]), p["host_ip"]) for p in
             cfg["services"]["proxy"]["ports"]}
    assert ports == {(443, 443, "0.0.0.0"), (9000, 9000, "0.0.0.0"), (8443, 8443, "0.0.0.0")}


def test_healthchecks_restart_policies_and_log_rotation(full):
    _, _, cfg = full
    one_shots = {"postgres-init", "airflow-init", "metaflow-migrate"}
    for name, svc in cfg["services"].items():
        assert svc["logging"] == {"driver": "json-file",
                                  "options": {"max-size": "10m", "max-file": "5"}}, name
        if name in one_shots:
            assert svc["restart"] == "no", name
            continue
        assert svc["restart"] == "unless-stopped", name
        hc = svc["healthcheck"]
        assert not hc.get("disable") and hc["test"][0] in ("CMD", "CMD-SHELL"), name
        assert hc["start_interval"] == "2s", name
    tests = {n: " ".join(s["healthcheck"]["test"][1:]) for n, s in cfg["services"].items()
             if n not in one_shots}
    assert tests["postgres"] == "pg_isready -h 127.0.0.1 -U postgres -d postgres"
    assert tests["airflow-scheduler"].endswith("http://127.0.0.1:8974/health")
    assert tests["airflow-dag-processor"] == "metaflow-services doctor --job DagProcessorJob"
    assert tests["airflow-triggerer"] == "metaflow-services doctor --job TriggererJob"
    assert "/tmp/flow-watcher-heartbeat -mmin -1" in tests["flow-watcher"]
    assert tests["metadata"].endswith("http://127.0.0.1:8080/healthcheck")
    assert tests["metaflow-ui-backend"].endswith("http://127.0.0.1:8083/api/ping")
    assert tests["seaweedfs"].endswith("http://127.0.0.1:8333/healthz")


def test_postgres(full):
    _, secrets, cfg = full
    pg = cfg["services"]["postgres"]
    assert "max_connections=200" in pg["command"]
    assert pg["environment"]["PGDATA"] == "/var/lib/postgresql/data"
    assert pg["environment"]["POSTGRES_PASSWORD"] == secrets["MFS_POSTGRES_PASSWORD"]
    assert [(v["source"], v["target"]) for v in pg["volumes"]] == [
        ("postgres-data", "/var/lib/postgresql/data"),
        ("/var/backups/metaflow-services", "/backups")]
    # Data volumes are external: `docker compose down -v` cannot delete them.
    for key in ("postgres-data", "seaweedfs-data", "metaflow-local", "code-cache"):
        assert cfg["volumes"][key]["external"] is True, key
    assert cfg["volumes"]["postgres-data"]["name"] == "metaflow-services-postgres"
    init = cfg["services"]["postgres-init"]
    assert init["environment"]["AIRFLOW_DB_PASSWORD"] == secrets["MFS_AIRFLOW_DB_PASSWORD"]
    assert init["environment"]["METAFLOW_DB_PASSWORD"] == secrets["MFS_METAFLOW_DB_PASSWORD"]
    assert init["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_airflow_services_share_one_configuration(full):
    o, secrets, cfg = full
    airflow = list(LONG_RUNNING_AIRFLOW) + ["airflow-init"]
    envs = [cfg["services"][n]["environment"] for n in airflow]
    for key in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET",
                "AIRFLOW__API__SECRET_KEY", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                "AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CORE__PARALLELISM"):
        assert len({e[key] for e in envs}) == 1, key
    env = envs[0]
    assert env["AIRFLOW__CORE__FERNET_KEY"] == secrets["MFS_AIRFLOW_FERNET_KEY"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    # A 2-core, 4 GB VM: 4 slots for users' tasks, one more for the smoke test.
    assert env["AIRFLOW__CORE__PARALLELISM"] == "5"
    init = cfg["services"]["airflow-init"]["command"][0]
    assert 'airflow pools set default_pool "4"' in init
    assert "airflow pools set metaflow_services_smoke 1" in init
    assert env["AIRFLOW__API__WORKERS"] == "1"
    assert int(env["AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL"]) <= 30
    assert env["AIRFLOW__API__BASE_URL"] == "https://mfs.example.com"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == (
        "postgresql+psycopg://airflow:%s@postgres:5432/airflow" % secrets["MFS_AIRFLOW_DB_PASSWORD"])
    for name in LONG_RUNNING_AIRFLOW:
        svc = cfg["services"][name]
        assert svc["image"] == stack.images(o)["airflow"]
        # The flow-watcher imports users' code: not in the root group.
        assert svc["user"] == {"maintenance": "0:0", "flow-watcher": "50000:50000"}.get(
            name, "50000:0")
        assert svc["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    # Housekeeping and backups: the retention settings, the backup folder
    # (also the postgres service's, for pg_dump), the install folder read only.
    m = cfg["services"]["maintenance"]
    assert m["environment"]["MFS_LOG_RETENTION_DAYS"] == "30"
    assert m["environment"]["MFS_AIRFLOW_METADATA_RETENTION_DAYS"] == "90"
    assert m["environment"]["MFS_BACKUP_SCHEDULE"] == ""
    mounts = {v["target"]: v for v in m["volumes"]}
    assert mounts["/backups"]["source"] == "/var/backups/metaflow-services"
    assert mounts["/install"]["read_only"] is True
    assert mounts["/data"]["source"] == o.data_dir
    pg_mounts = {v["target"]: v["source"] for v in cfg["services"]["postgres"]["volumes"]}
    assert pg_mounts["/backups"] == "/var/backups/metaflow-services"
    assert cfg["services"]["airflow-init"]["build"]["context"].endswith("/airflow")
    init_cmd = cfg["services"]["airflow-init"]["command"][0]
    assert "airflow db migrate" in init_cmd and "airflow db check-migrations" in init_cmd


def test_the_scheduler_runs_metaflow_steps_in_containers(full):
    o, secrets, cfg = full
    s = cfg["services"]["airflow-scheduler"]
    env = s["environment"]
    assert s["group_add"] == ["988"]
    mounts = {v["target"]: v["source"] for v in s["volumes"]}
    assert mounts["/var/run/docker.sock"] == "/var/run/docker.sock"
    assert mounts["/opt/airflow/dags"] == "/srv/metaflow-services/dags"
    assert env["MFS_EXECUTOR"] == "docker"
    assert env["MFS_STEP_IMAGE"] == stack.images(o)["step"]
    assert env["MFS_DOCKER_NETWORK"] == cfg["networks"]["default"]["name"] == "metaflow-services"
    assert env["MFS_DOCKER_USER"] == "50000:0"
    # A wide foreach's ranges are sized to the users' slots (default_pool: the
    # 2-core, 3.8 GB VM's 4).
    assert env["MFS_TASK_SLOTS"] == "4"
    assert env["METAFLOW_DEFAULT_DATASTORE"] == "s3"
    assert env["METAFLOW_DATASTORE_SYSROOT_S3"] == "s3://metaflow/metaflow"
    assert env["METAFLOW_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert env["AWS_ACCESS_KEY_ID"] == secrets["MFS_S3_ACCESS_KEY"]
    # With the Metaflow services: runs record metadata in the metadata service.
    assert env["METAFLOW_DEFAULT_METADATA"] == "service"
    assert env["METAFLOW_SERVICE_URL"] == "http://metadata:8080"
    assert env["MFS_METAFLOW_UI_URL"] == "https://mfs.example.com:8443"


def test_environment_builds_get_the_packages_options(tmp_path, full):
    """packages.* reach every service that builds step environment images,
    with the CA bundle and the wheelhouse from install_dir/packages."""
    _, _, default = full
    assert default["services"]["airflow-scheduler"]["environment"]["MFS_PIP_INDEX_URL"] == ""
    o, _, cfg = render(tmp_path, workers={"vm1": VM1},
                       **{"packages.index_url": "https://pypi.example.com/simple",
                          "packages.trusted_hosts": "a.example.com b.example.com"})
    for name in ("airflow-scheduler", "edge-worker"):
        svc = cfg["services"][name]
        env = svc["environment"]
        assert env["MFS_PIP_INDEX_URL"] == "https://pypi.example.com/simple", name
        assert env["MFS_PIP_TRUSTED_HOST"] == "a.example.com,b.example.com", name
        assert env["MFS_PIP_CERT"] == "/etc/mfs/packages/ca.pem", name
        assert env["MFS_PIP_WHEELHOUSE"] == "/etc/mfs/packages/wheelhouse", name
        mounts = {v["target"]: v for v in svc["volumes"]}
        assert mounts["/etc/mfs/packages"]["source"].endswith("/install/packages"), name
        assert mounts["/etc/mfs/packages"]["read_only"], name


def test_scheduled_backups_get_the_encryption_recipients(tmp_path):
    """backup.encrypt_to reaches the maintenance service whole: an SSH key
    (with a space) survives .env, its comment (which may hold '#') left out."""
    import pyrage

    age_pub = str(pyrage.x25519.Identity.generate().to_public())
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ana@laptop #work",
                    "-f", str(tmp_path / "key")], check=True)
    ssh_pub = (tmp_path / "key.pub").read_text().strip()
    _, _, cfg = render(tmp_path, **{"backup.encrypt_to": "%s,%s" % (age_pub, ssh_pub)})
    assert cfg["services"]["maintenance"]["environment"]["MFS_BACKUP_ENCRYPT_TO"] == \
        "%s,%s" % (age_pub, " ".join(ssh_pub.split()[:2]))


def test_only_the_api_server_and_scheduler_read_the_token_signing_key(full):
    _, _, cfg = full
    signers = {"airflow-api-server", "airflow-scheduler"}
    for name, svc in cfg["services"].items():
        env = svc.get("environment") or {}
        mounts = {v["target"]: (v["source"], v.get("read_only", False))
                  for v in svc.get("volumes") or [] if isinstance(v, dict)}
        if name in signers:
            assert env["AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH"] == \
                "/opt/airflow/jwt/signing-key.pem"
            assert mounts["/opt/airflow/jwt"][1] is True
            assert mounts["/opt/airflow/jwt"][0].endswith("/state/airflow-jwt")
            # A new key restarts them (the deploy puts its fingerprint here).
            assert svc["labels"]["org.metaflow-services.jwt-key"] == "0123456789abcdef"
            assert env["MFS_STEP_IMAGE"], "the signers keep the whole Airflow environment"
        else:
            assert "AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH" not in env, name
            assert not any("airflow-jwt" in src for src, _ in mounts.values()), name


def test_the_flow_watcher_compiles_flows_into_the_dags_folder(full):
    o, secrets, cfg = full
    w = cfg["services"]["flow-watcher"]
    assert w["command"][:2] == ["metaflow-services", "watch"]
    mounts = {v["target"]: (v["source"], v.get("read_only", False)) for v in w["volumes"]}
    # It reads the users' flows in the dags folder, writes their DAGs into its
    # hidden folder there, and names owners from the VM's passwd.
    assert w["command"][2:4] == ["--flows", "/opt/airflow/dags"] and "--dags" not in w["command"]
    assert mounts["/opt/airflow/dags"] == ("/srv/metaflow-services/dags", False)
    assert not any("flows" in src for src, _ in mounts.values())
    # The folder, read only: a file mount would miss users added since.
    assert mounts["/run/host/etc"] == ("/etc", True)
    assert w["command"][w["command"].index("--passwd") + 1] == "/run/host/etc/passwd"
    assert "/var/run/docker.sock" not in mounts
    env = w["environment"]
    # Compiling uploads code packages: the same object store and metadata as the runs.
    scheduler = cfg["services"]["airflow-scheduler"]["environment"]
    for key in ("METAFLOW_DATASTORE_SYSROOT_S3", "METAFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "METAFLOW_DEFAULT_METADATA", "MFS_METAFLOW_UI_URL"):
        assert env[key] == scheduler[key], key
    assert env["METAFLOW_USER"] == "metaflow-services"


def test_metaflow_services(full):
    _, secrets, cfg = full
    svc = cfg["services"]
    migrate = svc["metaflow-migrate"]
    assert migrate["command"] == ["/opt/latest/bin/python3", "/root/run_goose.py", "--wait", "60"]
    assert "--only-if-empty-db" not in migrate["command"]     # upgrades apply new migrations
    for name in ("metaflow-migrate", "metadata", "metaflow-ui-backend"):
        env = svc[name]["environment"]
        assert env["MF_MIGRATION_ENDPOINTS_ENABLED"] == "0", name
        assert env["MF_METADATA_DB_USER"] == "metaflow"
        assert env["MF_METADATA_DB_PSWD"] == secrets["MFS_METAFLOW_DB_PASSWORD"]
    for name in ("metadata", "metaflow-ui-backend"):
        assert svc[name]["depends_on"]["metaflow-migrate"]["condition"] == \
            "service_completed_successfully"
    ui = svc["metaflow-ui-backend"]["environment"]
    for key in ("CACHE_ARTIFACT_STORAGE_LIMIT", "CACHE_DAG_STORAGE_LIMIT", "CACHE_LOG_STORAGE_LIMIT"):
        assert int(ui[key]) > 0, key
    assert int(ui["CACHE_ARTIFACT_MAX_ACTIONS"]) <= 4
    assert ui["PATH_PREFIX"] == "/api" and ui["UI_ENABLED"] == "0"
    assert ui["METAFLOW_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert svc["metaflow-ui"]["environment"]["METAFLOW_SERVICE"] == "/api"
    proxy = svc["proxy"]["environment"]
    assert proxy["MFS_PROXY_METAFLOW_API_KEY"] == secrets["MFS_METAFLOW_API_KEY"]
    assert proxy["MFS_PROXY_METAFLOW_UI_PASSWORD"] == secrets["MFS_METAFLOW_UI_PASSWORD"]
    targets = {v["target"] for v in svc["proxy"]["volumes"]}
    assert "/etc/mfs-proxy/sites/metaflow.conf.template" in targets


def test_the_proxy_restarts_when_its_configuration_or_certificate_changes(full):
    _, _, cfg = full
    labels = cfg["services"]["proxy"]["labels"]
    assert labels["org.metaflow-services.config"] == stack.proxy_config_sha()
    assert labels["org.metaflow-services.tls"] == FACTS["tls_sha"]


def test_without_metaflow_services_runs_share_a_metadata_volume(tmp_path):
    o, _, cfg = render(tmp_path, metaflow_services="off")
    assert not {"metadata", "metaflow-ui", "metaflow-ui-backend"} & set(cfg["services"])
    s = cfg["services"]["airflow-scheduler"]
    env = s["environment"]
    assert env["METAFLOW_DEFAULT_METADATA"] == "local"
    root = env["METAFLOW_DATASTORE_SYSROOT_LOCAL"]
    mounts = {v["target"]: v["source"] for v in s["volumes"]}
    assert mounts[root] == "metaflow-local"
    # Step containers mount the same volume at the same path.
    assert env["MFS_DOCKER_VOLUMES"] == "%s:%s" % (cfg["volumes"]["metaflow-local"]["name"], root)
    ports = {p["target"] for p in cfg["services"]["proxy"]["ports"]}
    assert ports == {443, 9000}


def test_minio(tmp_path):
    o, secrets, cfg = render(tmp_path, object_store="minio")
    assert "seaweedfs" not in cfg["services"]
    m = cfg["services"]["minio"]
    assert m["environment"]["MINIO_ROOT_USER"] == secrets["MFS_S3_ACCESS_KEY"]
    assert m["image"].startswith("minio/minio:RELEASE.")
    assert cfg["services"]["airflow-scheduler"]["environment"]["METAFLOW_S3_ENDPOINT_URL"] == \
        "http://minio:9000"
    assert cfg["services"]["proxy"]["environment"]["MFS_PROXY_S3_UPSTREAM"] == "minio:9000"
    o, _, cfg = render(tmp_path / "again", object_store="minio",
                       **{"images.minio": "registry.example.com/minio:2026"})
    assert cfg["services"]["minio"]["image"] == "registry.example.com/minio:2026"


def test_every_image_is_pinned(full):
    _, _, cfg = full
    for name, svc in cfg["services"].items():
        image = svc["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), (name, image)


VM1 = {"name": "vm1", "host": "root@10.0.0.7", "queues": ["default", "gpu"], "slots": 8,
       "cpu": 8, "memory": 32000, "gpu": 1}


def test_worker_vms_switch_the_main_vm_to_the_edge_executor(tmp_path, full):
    _, _, single = full
    sched = single["services"]["airflow-scheduler"]["environment"]
    assert sched["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert sched["AIRFLOW__EDGE__API_ENABLED"] == "False" and sched["MFS_WORKER_QUEUES"] == ""
    assert "edge-worker" not in single["services"]

    o, _, cfg = render(tmp_path, workers={"vm1": VM1})
    assert {"edge-worker", "worker-sync"} <= set(cfg["services"])
    for name in ("airflow-scheduler", "airflow-dag-processor", "flow-watcher", "edge-worker"):
        env = cfg["services"][name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == (
            "LocalExecutor,airflow.providers.edge3.executors.EdgeExecutor"), name
        # The JSON survives .env and compose's interpolation intact.
        assert json.loads(env["MFS_WORKER_QUEUES"]) == {
            "default": {"cpu": 8, "memory": 32000, "gpu": 1, "workers": ["main", "vm1"]},
            "gpu": {"cpu": 8, "memory": 32000, "gpu": 1, "workers": ["vm1"]}}, name
    assert cfg["services"]["airflow-api-server"]["environment"]["AIRFLOW__EDGE__API_ENABLED"] == "True"
    assert cfg["services"]["edge-worker"]["command"][:4] == ["airflow", "edge", "worker", "--queues"]
    # A worker adds capacity: Airflow may run the main VM's slots plus the
    # worker's at once, while the main VM's own edge worker keeps its slots.
    main_slots = int(single["services"]["airflow-scheduler"]["environment"][
        "AIRFLOW__CORE__PARALLELISM"]) - 1   # the smoke test's slot aside
    sched = cfg["services"]["airflow-scheduler"]["environment"]
    assert int(sched["AIRFLOW__CORE__PARALLELISM"]) == main_slots + VM1["slots"] + 1
    assert 'default_pool "%d"' % (main_slots + VM1["slots"]) in \
        cfg["services"]["airflow-init"]["command"][0]
    edge = cfg["services"]["edge-worker"]["command"]
    assert edge[edge.index("--concurrency") + 1] == str(main_slots)
    # Still only the proxy publishes ports: workers come in through it.
    assert [n for n, svc in cfg["services"].items() if svc.get("ports")] == ["proxy"]


def test_the_worker_stack_has_no_port_no_database_and_trusts_the_main_vm(tmp_path):
    o = config.Options(public_host="mfs.example.com")
    config.validate(o)
    main = {"public_host": "mfs.example.com", "ports": {"https": 443, "s3": 9000, "metaflow": 8443},
            "bucket": "metaflow", "metaflow_services": True}
    secrets = {s.name: "%s-value" % s.name.lower() for s in stack.secrets(o)}
    d = tmp_path / "worker"
    d.mkdir()
    shutil.copy(stack.COMPOSE_DIR / "worker.yaml", d / "worker.yaml")
    images = {"airflow": "mfs/airflow:1", "step": "mfs/step:1"}
    (d / ".env").write_text(stack.worker_env(o, main, secrets, VM1, images, "988"))
    proc = subprocess.run(["docker", "compose", "config", "--format", "json"], cwd=str(d),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert set(cfg["services"]) == set(stack.services(o, files=["worker.yaml"])) == {
        "edge-worker", "sync"}
    env = cfg["services"]["edge-worker"]["environment"]
    assert env["AIRFLOW__EDGE__API_URL"] == "https://mfs.example.com/edge_worker/v1/rpcapi"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "https://mfs.example.com/execution/"
    assert env["METAFLOW_S3_ENDPOINT_URL"] == "https://mfs.example.com:9000"
    assert env["METAFLOW_SERVICE_URL"] == "https://mfs.example.com:8443/metadata"
    assert env["MFS_WORKER_NAME"] == "vm1" and env["MFS_STEP_IMAGE"] == "mfs/step:1"
    assert cfg["services"]["edge-worker"]["command"] == [
        "airflow", "edge", "worker", "--queues", "default,gpu", "--concurrency", "8",
        "--edge-hostname", "vm1"]
    # Environment images build on the worker too: its packages folder.
    assert env["MFS_PIP_WHEELHOUSE"] == "/etc/mfs/packages/wheelhouse"
    assert any(v["target"] == "/etc/mfs/packages" and v["source"].endswith("/worker/packages")
               for v in cfg["services"]["edge-worker"]["volumes"])
    rendered = json.dumps(cfg)
    for name in ("MFS_POSTGRES_PASSWORD", "MFS_AIRFLOW_DB_PASSWORD", "MFS_AIRFLOW_FERNET_KEY",
                 "MFS_AIRFLOW_API_SECRET_KEY", "MFS_METAFLOW_UI_PASSWORD"):
        assert secrets[name] not in rendered, "a worker needs no %s" % name
    for name, svc in cfg["services"].items():
        assert not svc.get("ports"), name
        assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        assert any(v["target"] == "/etc/mfs/main-ca.pem" for v in svc["volumes"]), name
