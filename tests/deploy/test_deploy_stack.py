"""`fab deploy` end to end on a bare Debian 13 VM, from a bundle of the
test-built images; then what users do with the stack, a second deploy, a
changed option, Docker restarting, stop/start and destroy.

The tests of this module share one deployment and run in order.
"""

from __future__ import annotations

import gzip
import json
import pickle
import re
import subprocess
import time
from pathlib import Path

import pytest

from deploylab import DATA_DIR, IMAGES, INSTALL_DIR, ONE_SHOTS, TIMINGS, VM_IP, VENV_BIN, fab_env

pytestmark = pytest.mark.deploy

FLOW = Path(__file__).parent / "flows" / "deploy_check_flow.py"
LONG_RUNNING = ("postgres", "seaweedfs", "airflow-api-server", "airflow-scheduler",
                "airflow-dag-processor", "airflow-triggerer", "maintenance", "flow-watcher", "proxy",
                "metadata", "metaflow-ui-backend", "metaflow-ui")


def running_services(containers):
    return {s: (c["id"], c["started"]) for s, c in containers.items() if s not in ONE_SHOTS}


def assert_first_run_intact(lab):
    """The run of test_a_flow_dropped_into_the_stack_runs_through_airflow is
    still in Airflow, and its artifacts in the object store."""
    run_id, mf_run = lab.results["flow_run"]
    api = lab.airflow()
    assert api.get("https://%s/api/v2/dags/DeployCheckFlow/dagRuns/%s" % (VM_IP, run_id),
                   timeout=30).json()["state"] == "success"
    lab.s3().head_object(Bucket="metaflow",
                         Key="metaflow/DeployCheckFlow/%s/join/t-0/0.data.json" % mf_run)


# ---------------------------------------------------------------------------
# The first deploy
# ---------------------------------------------------------------------------


def test_first_deploy_installs_docker_and_passes_its_smoke_test(deployed, lab):
    out = deployed.output
    assert "installing docker.io, docker-cli, docker-compose from Debian GNU/Linux 13" in out
    # Installed by the deploy (apt's own record), and running.
    history = lab.sh("cat /var/log/apt/history.log")
    assert re.search(r"Commandline: apt-get .*install .*docker\.io docker-cli docker-compose", history)
    assert lab.sh("docker version --format '{{.Server.Version}}'").startswith("26.1")
    assert lab.sh("docker compose version --short").startswith("2.26")
    assert "/etc/docker/daemon.json: written (live-restore)" in out
    assert "uploading the bundle" in out and "Loaded image: mfs-airflow:test" in out
    assert "==> smoke test: a hello flow compiled, run through Airflow, checked" in out
    assert "ok   smoke-test    run smoke__" in out
    assert "Deployed metaflow-services" in out and "https://%s " % VM_IP in out


def test_every_service_is_healthy(deployed, lab):
    cs = lab.wait_healthy(timeout=60)
    assert set(cs) == set(LONG_RUNNING) | set(ONE_SHOTS)
    for svc in LONG_RUNNING:
        assert cs[svc]["state"] == "running" and cs[svc]["health"] == "healthy", (svc, cs[svc])
    for svc in ONE_SHOTS:
        assert cs[svc]["state"] == "exited" and cs[svc]["exit_code"] == 0
    policies = lab.sh("docker inspect --format '{{.Name}} {{.HostConfig.RestartPolicy.Name}}' "
                      "$(docker ps -q)").split("\n")
    assert all(p.endswith(" unless-stopped") for p in policies if p), policies


def test_secrets_are_private_and_never_printed(deployed, lab):
    for name in ("secrets.env", ".env", "settings.env", "tls/key.pem"):
        mode = lab.sh("stat -c '%%a %%U' %s/%s" % (INSTALL_DIR, name)).strip()
        assert mode == "600 root", (name, mode)
    secrets = dict(line.split("=", 1) for line in
                   (lab.vm.root / INSTALL_DIR.lstrip("/") / "secrets.env").read_text().splitlines())
    assert len(secrets) >= 11
    for name, value in secrets.items():
        assert value not in deployed.output, "%s was printed by fab deploy" % name
    # Airflow's passwords file belongs to the airflow user, readable by it only.
    assert lab.sh("stat -c '%%a %%u' %s/state/airflow-auth/passwords.json" % INSTALL_DIR).strip() \
        == "600 50000"


def test_the_bucket_exists(deployed, lab):
    s3 = lab.s3()
    assert "metaflow" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    s3.head_bucket(Bucket="metaflow")


def test_airflow_login_works_with_the_generated_password_only(deployed, lab):
    import requests

    ok = lab.airflow_token()
    assert ok.status_code == 201 and ok.json()["access_token"]
    wrong = lab.airflow_token(password="not-the-password")
    assert wrong.status_code == 401
    # The UI through the proxy, over TLS with the deployment's certificate.
    page = requests.get("https://%s/" % VM_IP, verify=lab.ca, timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    # The REST API needs the token.
    assert requests.get("https://%s/api/v2/dags" % VM_IP, verify=lab.ca,
                        timeout=30).status_code == 401


def test_nothing_but_the_proxy_listens_on_the_network(deployed, lab):
    out = subprocess.run(["ip", "netns", "exec", "mfs-deploy-vm", "ss", "-Hlntup"],
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    exposed = {}
    for line in out.splitlines():
        fields = line.split()
        local = fields[4]
        addr, port = local.rsplit(":", 1)
        if addr.strip("[]").startswith(("127.", "::1")) or addr == "[::1]":
            continue
        proc = re.search(r'users:\(\("([^"]+)"', line)
        exposed.setdefault(int(port), set()).add(proc.group(1) if proc else "?")
    # The VM's own sshd (how we reach it) and the proxy's published ports.
    assert exposed.pop(22) == {"sshd"}
    assert exposed == {443: {"docker-proxy"}, 8443: {"docker-proxy"}, 9000: {"docker-proxy"}}, \
        exposed
    published = lab.sh("docker ps --format '{{.Names}} {{.Ports}}'")
    for line in published.strip().splitlines():
        name, _, ports = line.partition(" ")
        if "->" in ports:
            assert name == "metaflow-services-proxy-1", line


def drop_check_flow(lab):
    """A user (member of the group "metaflow") copies the check flow onto the
    VM, and the stack's flow-watcher compiles it into the dags folder. (The
    file's owner becomes the runs' METAFLOW_USER: it must not be root.)"""
    from fabric import Connection

    with Connection(VM_IP, user="deployer", connect_kwargs={"key_filename": str(lab.key)}) as c:
        c.put(str(FLOW), "%s/dags/deploy_check_flow.py" % DATA_DIR)
    dag_file = (lab.vm.root / DATA_DIR.lstrip("/") / "dags" / ".metaflow-services"
                / "DeployCheckFlow.py")
    deadline = time.time() + 120
    while not dag_file.exists():
        assert time.time() < deadline, lab.compose("logs --tail 50 flow-watcher")
        time.sleep(1)


def test_a_flow_dropped_into_the_stack_runs_through_airflow(deployed, lab):
    """The foreach flow runs with step containers; its artifacts are in the
    object store. (test_deploy_stack_flows.py: the flow-watcher in detail.)"""
    from metaflow_services.spec import run_id_for

    drop_check_flow(lab)

    api = lab.airflow()
    base = "https://%s/api/v2/dags/DeployCheckFlow" % VM_IP
    deadline = time.time() + 180
    while api.get(base, timeout=30).status_code != 200:
        assert time.time() < deadline, api.get("https://%s/api/v2/importErrors" % VM_IP).text
        time.sleep(2)
    api.patch(base, json={"is_paused": False}, timeout=30).raise_for_status()
    run_id, state, tis = lab.run_dag("DeployCheckFlow", {"n": 4},
                                     run_id="deploy-test-%d" % time.time())
    assert state == "success", tis

    # The run's artifacts are in the object store (read through the proxy).
    s3 = lab.s3()
    mf_run = run_id_for("DeployCheckFlow", run_id)
    data = json.loads(s3.get_object(
        Bucket="metaflow", Key="metaflow/DeployCheckFlow/%s/join/t-0/0.data.json" % mf_run
    )["Body"].read())
    sha = data["objects"]["total"]
    blob = s3.get_object(Bucket="metaflow",
                         Key="metaflow/DeployCheckFlow/data/%s/%s" % (sha[:2], sha))["Body"].read()
    assert pickle.loads(gzip.decompress(blob)) == 0 + 1 + 4 + 9
    squares = s3.list_objects_v2(Bucket="metaflow",
                                 Prefix="metaflow/DeployCheckFlow/%s/square/" % mf_run)
    assert len({o["Key"].split("/")[4] for o in squares["Contents"]}) == 4  # one task per split
    # Recorded in the metadata service: the run under the file's owner, one
    # task per split.
    run = lab.metadata("flows/DeployCheckFlow/runs/%s" % mf_run)
    assert run["run_number"] == mf_run and run["user_name"] == "deployer", run
    tasks = lab.metadata("flows/DeployCheckFlow/runs/%s/steps/square/tasks" % mf_run)
    assert len(tasks) == 4, tasks
    # Each task's log in Airflow holds its own lines, not the heartbeat's
    # complaints: the service answers a task's first heartbeat with 404,
    # which Metaflow's sidecar never shows (the warm process's in-task
    # heartbeat must not either).
    for ti in json.loads(tis)["task_instances"]:
        text = api.get(base + "/dagRuns/%s/taskInstances/%s/logs/1" % (run_id, ti["task_id"]),
                       params={"map_index": ti["map_index"], "full_content": "true"},
                       timeout=30).text
        assert "/%s/" % ti["task_id"] in text and "starting" in text, text[-3000:]
        assert "HeartBeat" not in text, text[-3000:]
    lab.results["flow_run"] = (run_id, mf_run)


# ---------------------------------------------------------------------------
# Deploying again
# ---------------------------------------------------------------------------


def test_a_second_deploy_changes_nothing(deployed, lab):
    before = lab.containers()
    with_bundle = lab.deploy()
    TIMINGS["second fab deploy, nothing changed"] = round(with_bundle.seconds, 1)
    assert with_bundle.returncode == 0, str(with_bundle)
    out = with_bundle.output
    for line in ("stack files in %s\n    ok unchanged, skipped" % INSTALL_DIR,
                 "ok all present, skipped",
                 "ok all %d images of the bundle already loaded, upload skipped" % len(IMAGES),
                 "ok all %d services up to date, nothing restarted" % len(before),
                 "ok skipped (nothing changed",
                 "(nothing changed)."):
        assert line in out, line
    # (Its duration is measured by tests/deploy/bench_deploy.py, target < 30 s.)
    after = lab.containers()
    assert running_services(after) == running_services(before)
    assert after["airflow-init"] == before["airflow-init"]  # one-shots did not run again
    # Data intact: the earlier run is still in Airflow and in the object store.
    assert_first_run_intact(lab)


def test_a_changed_option_restarts_only_what_it_affects(deployed, lab):
    before = lab.containers()
    res = lab.deploy("--set", "retention.task_logs_days=7", "--smoke-test", "never")
    assert res.returncode == 0, str(res)
    assert "maintenance: recreate (configuration changed)" in res.output
    after = lab.containers()
    changed = {s for s in LONG_RUNNING if after[s]["id"] != before[s]["id"]
               or after[s]["started"] != before[s]["started"]}
    assert changed == {"maintenance"}, changed
    assert "MFS_LOG_RETENTION_DAYS=7" in lab.sh(
        "docker inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "
        "metaflow-services-maintenance-1 | grep RETENTION").split()
    # And back: again only that service.
    res = lab.deploy("--smoke-test", "never")
    assert res.returncode == 0, str(res)
    again = lab.containers()
    assert {s for s in LONG_RUNNING if again[s]["id"] != after[s]["id"]} == {"maintenance"}


def test_your_own_certificate_restarts_only_the_proxy(deployed, lab, tmp_path):
    import requests

    # A CA of "your company" and a certificate it signed for the VM's address.
    def ossl(*args):
        subprocess.run(["openssl", *args], cwd=str(tmp_path), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=Test CA", "-keyout", "ca.key", "-out", "ca.pem")
    ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", "/CN=%s" % VM_IP, "-keyout", "vm.key", "-out", "vm.csr")
    (tmp_path / "ext").write_text("subjectAltName=IP:%s\n" % VM_IP)
    ossl("x509", "-req", "-in", "vm.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "2", "-extfile", "ext", "-out", "vm.pem")
    before = lab.containers()
    res = lab.deploy("--set", "tls.cert=%s" % (tmp_path / "vm.pem"),
                     "--set", "tls.key=%s" % (tmp_path / "vm.key"), "--smoke-test", "never")
    assert res.returncode == 0, str(res)
    after = lab.containers()
    assert {s for s in LONG_RUNNING if after[s]["id"] != before[s]["id"]} == {"proxy"}
    ok = requests.get("https://%s/api/v2/monitor/health" % VM_IP, timeout=30,
                      verify=str(tmp_path / "ca.pem"))
    assert ok.status_code == 200
    key_on_vm = lab.sh("cat %s/tls/key.pem" % INSTALL_DIR)
    assert key_on_vm == (tmp_path / "vm.key").read_text()
    assert lab.sh("stat -c '%%a' %s/tls/key.pem" % INSTALL_DIR).strip() == "600"
    assert (tmp_path / "vm.key").read_text().strip().splitlines()[1] not in res.output
    # Back to a self-signed certificate (made anew), again only the proxy restarts.
    res = lab.deploy("--smoke-test", "never")
    assert res.returncode == 0, str(res)
    assert "self-signed for %s: generated (self-signed)" % VM_IP in res.output
    again = lab.containers()
    assert {s for s in LONG_RUNNING if again[s]["id"] != after[s]["id"]} == {"proxy"}


def test_two_deploys_never_overlap(deployed, lab):
    lab.sh("mkdir /run/lock/metaflow-services.deploy.lock && echo 'fab deploy by ana@laptop "
           "(pid 7) since 2026-01-01 10:00:00' > /run/lock/metaflow-services.deploy.lock/holder")
    res = lab.deploy()
    assert res.returncode == 1
    assert ("another deploy holds the lock on the VM: fab deploy by ana@laptop (pid 7) since "
            "2026-01-01 10:00:00; what to do: wait for it to finish; if none is running, release "
            "the lock with: fab -H deployer@%s unlock" % VM_IP) in res.output, str(res)
    res = lab.fab("unlock")
    assert res.returncode == 0 and "released (was: fab deploy by ana@laptop" in res.output
    assert lab.vm.run("test -e /run/lock/metaflow-services.deploy.lock", check=False).returncode != 0


def test_status_reports_every_service(deployed, lab):
    res = lab.fab("status")
    assert res.returncode == 0, str(res)
    for svc in LONG_RUNNING:
        # Each with its memory in use (the UI backend's is the one to watch).
        m = re.search(r"%s\s+running \(healthy\)\s+([0-9.]+)([KMG]i?B)" % svc, res.output)
        assert m, (svc, res.output)
        if svc == "metaflow-ui-backend":
            assert m.group(2) in ("MiB", "GiB") and float(m.group(1)) > 0
    for line in ("apache-airflow     3.3.2", "metaflow           2.19.39", "ok   database",
                 "ok   object-store", "ok   docker", "ok   airflow", "ok   last-runs",
                 "DeployCheckFlow"):
        assert line in res.output, line
    # The Metaflow services, checked from inside the stack.
    assert re.search(r"ok   metadata\s+metadata service http://metadata:8080: pong", res.output)
    assert re.search(r"ok   metaflow-ui\s+UI backend http://metaflow-ui-backend:8083/api/ping: "
                     r"ok; UI http://metaflow-ui:3000/: ok", res.output), res.output


def test_logs_of_one_service(deployed, lab):
    res = lab.fab("logs", "--service", "proxy", "--tail", "5")
    assert res.returncode == 0, str(res)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("proxy-1  |") for ln in lines), res.output
    assert "\x1b" not in res.output


def test_client_config_lets_a_laptop_use_the_object_store(deployed, lab, tmp_path):
    res = lab.fab("client-config", "--name", "lab")
    assert res.returncode == 0, str(res)
    cfg_path = lab.home / ".metaflowconfig" / "config_lab.json"
    assert oct(cfg_path.stat().st_mode & 0o777) == "0o600"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["METAFLOW_S3_ENDPOINT_URL"] == "https://%s:9000" % VM_IP
    assert cfg["METAFLOW_DEFAULT_METADATA"] == "service"
    # A flow run on the "laptop" with the profile stores its artifacts on the VM.
    flow = tmp_path / "laptop_flow.py"
    flow.write_text(FLOW.read_text().replace("DeployCheckFlow", "LaptopFlow"))
    env = fab_env(lab.home)
    env.update({"METAFLOW_PROFILE": "lab", "USER": "laptop-user"})
    proc = subprocess.run([str(VENV_BIN / "python"), str(flow), "--no-pylint", "run", "--n", "2"],
                          cwd=str(tmp_path), env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    keys = [o["Key"] for o in lab.s3().list_objects_v2(
        Bucket="metaflow", Prefix="metaflow/LaptopFlow/")["Contents"]]
    assert any("/join/" in k and k.endswith("/0.data.json") for k in keys), keys[:20]
    # ...and records the run in the deployment's metadata service, under the
    # laptop's user.
    runs = lab.metadata("flows/LaptopFlow/runs")
    assert [r["user_name"] for r in runs] == ["laptop-user"], runs


# ---------------------------------------------------------------------------
# Restarts
# ---------------------------------------------------------------------------


def test_docker_restarts_without_stopping_the_stack(deployed, lab):
    # live-restore (set by the deploy): a Docker upgrade or restart leaves the
    # containers running.
    assert lab.sh("docker info --format '{{.LiveRestoreEnabled}}'").strip() == "true"
    before, daemon = lab.containers(), lab.sh("pidof dockerd").strip()
    lab.sh("/etc/init.d/docker restart", timeout=180)
    cs = lab.wait_healthy(timeout=300)
    assert lab.sh("pidof dockerd").strip() != daemon
    assert running_services(cs) == running_services(before)
    assert lab.airflow_token().status_code == 201


def test_the_stack_comes_back_by_itself_after_a_reboot(deployed, lab):
    before = lab.containers()
    t0 = time.time()
    lab.vm.shutdown()               # every process of the VM ends, containers included
    lab.vm.boot()
    # What the VM's init system does at boot (there is none in this VM).
    lab.sh("/etc/init.d/docker start", timeout=180)
    cs = lab.wait_healthy(timeout=600)
    TIMINGS["stack healthy again after a reboot"] = round(time.time() - t0, 1)
    for svc in LONG_RUNNING:
        assert cs[svc]["id"] == before[svc]["id"], svc           # the same containers ...
        assert cs[svc]["started"] != before[svc]["started"], svc  # ... started again
    assert lab.airflow_token().status_code == 201
    assert_first_run_intact(lab)


def test_stop_and_start(deployed, lab):
    res = lab.fab("stop")
    assert res.returncode == 0, str(res)
    cs = lab.containers()
    assert all(c["state"] == "exited" for c in cs.values()), cs
    res = lab.fab("start")
    assert res.returncode == 0, str(res)
    assert "services healthy" in res.output
    lab.wait_healthy(timeout=60)


def test_destroy_keeps_the_data_and_a_deploy_brings_it_back(deployed, lab):
    # It asks first: without the host name typed in, nothing is removed.
    before = lab.containers()
    res = lab.fab("destroy")
    assert res.returncode == 1 and "Type the host name (%s) to confirm" % VM_IP in res.output
    assert "not confirmed; nothing was removed" in res.output
    assert lab.containers() == before
    res = lab.fab("destroy", "--yes")
    assert res.returncode == 0, str(res)
    assert lab.containers() == {}
    volumes = lab.sh("docker volume ls -q").split()
    for v in ("postgres", "seaweedfs", "metaflow-local", "code-cache"):
        assert "metaflow-services-%s" % v in volumes
    assert lab.vm.run("test -s %s/secrets.env" % INSTALL_DIR, check=False).returncode == 0
    assert lab.vm.run("test -e %s/compose.yaml" % INSTALL_DIR, check=False).returncode != 0

    res = lab.deploy("--smoke-test", "never")
    assert res.returncode == 0, str(res)
    assert "ok all present, skipped" in res.output       # the same secrets
    lab.wait_healthy(timeout=60)
    assert_first_run_intact(lab)
