"""Worker VMs on two bare VMs (docs/workers.md): the deployed test VM is the
main VM; a second VM (its own network namespace, 10.213.1.2) becomes a
worker with `fab add-worker`. The worker is air-gapped: Docker came with its
image (from the company's mirror, say), and it reaches the main VM and
nothing else. Everything it needs comes from the bundle: the images, and the
wheelhouse of a @pypi step routed to it (`fab bundle --flows`), whose
environment image it builds with no package index. A foreach's tasks land
on both machines and a step routed to the worker's own queue runs there
(checked with the Metaflow client on the main VM: the worker's metadata
reaches it); the worker VM dies in the middle of a task, which Airflow
retries on the main VM as the next Metaflow attempt, and the run succeeds.
`fab remove-worker` drains a live worker (the main VM is a single VM again)
and forgets a dead one.

Runs after the other deploy tests but the upkeep ones (support.DEPLOY_ORDER),
on the VM they leave: the upkeep tests upgrade the main VM to images the
test bundle lacks (what a worker then needs is checked below).
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import subprocess
import tarfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import vm as vm_mod
from deploylab import CACHE, INSTALL_DIR, VENV_BIN, VM_IP, _timed, untouched

pytestmark = pytest.mark.deploy

FLOW = Path(__file__).resolve().parents[1] / "flows" / "spread_flow.py"
WHEELHOUSE_FLOW = Path(__file__).resolve().parents[1] / "flows" / "wheelhouse" / "wheelhouse_flow.py"
FLOWS = Path(__file__).resolve().parents[1] / "flows"
TRIGGERS = FLOWS / "triggers"
# Plain HTTP: reachable from the main VM (through the host's NAT) whatever
# CAs it trusts; not from an air-gapped VM.
OUTSIDE = "http://deb.debian.org/debian/"


@pytest.fixture(scope="module")
def worker(lab, deployed):
    """The second VM: booted, Docker installed from Debian's packages, then
    cut off from everything but the other test VMs; destroyed at the end."""
    image = vm_mod.prepare_image(CACHE)
    vm1 = vm_mod.BareVM(image, CACHE / "vm1", lab.key.with_suffix(".pub").read_text().strip(),
                        index=1)
    with _timed("worker VM create, boot and Docker install"):
        vm1.create()
        vm1.network_up()
        vm1.boot()
        # --force-confold: keep the test VM's /etc/default/docker (vm.py).
        vm1.run("DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND="
                "noninteractive apt-get install -y -q --no-install-recommends -o "
                "Dpkg::Options::=--force-confold docker.io docker-cli docker-compose",
                timeout=1200)
        vm1.cut_off()
    yield vm1
    vm1.destroy()


def remove_worker(lab, vm1, log_name):
    res = lab.fab("remove-worker", "--main", "deployer@%s" % VM_IP, "--config", str(lab.config),
                  host=vm1.ip)
    (CACHE / log_name).write_text(str(res))
    assert res.returncode == 0, str(res)
    return res


def add_worker(lab, vm1, *extra):
    return lab.fab("add-worker", "--main", "deployer@%s" % VM_IP, "--config", str(lab.config),
                   "--bundle", str(lab.bundle), *extra, host=vm1.ip)


def task_state(lab, run_id, task_id):
    api = lab.airflow()
    tis = api.get("https://%s/api/v2/dags/SpreadFlow/dagRuns/%s/taskInstances" % (VM_IP, run_id),
                  timeout=30).json()["task_instances"]
    return {t["task_id"]: t["state"] for t in tis}.get(task_id)


def test_add_worker_without_main_is_refused_before_anything_changes(lab, worker):
    res = lab.fab("add-worker", "--config", str(lab.config), host=worker.ip)
    assert res.returncode != 0
    assert "--main is missing: the main VM this worker takes tasks from" in res.output, str(res)
    assert not (worker.root / INSTALL_DIR.lstrip("/")).exists()


def test_a_bundle_without_the_main_vms_images_is_refused_before_anything_changes(
        lab, worker, tmp_path):
    """A bundle made before the main VM's last upgrade lacks the Airflow image
    the main VM now runs: refused in preflight, before the main VM is touched."""
    airflow = json.loads(lab.sh("cat %s/state/deploy.json" % INSTALL_DIR))["images"]["airflow"]
    with tarfile.open(lab.bundle) as tar:
        manifest = json.loads(tar.extractfile(tar.next()).read())
    manifest["images"] = [e for e in manifest["images"] if e["ref"] != airflow]
    old = tmp_path / "bundle-before-the-upgrade.tar"
    with tarfile.open(old, "w") as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with untouched(lab):
        res = lab.fab("add-worker", "--main", "deployer@%s" % VM_IP, "--config", str(lab.config),
                      "--bundle", str(old), host=worker.ip)
    assert res.returncode == 1, str(res)
    assert "preflight refused (nothing was changed): the bundle %s lacks %s, which the main " \
           "VM deployer@%s runs" % (old, airflow, VM_IP) in res.output, str(res)
    assert "fab bundle --config" in res.output
    assert not (worker.root / INSTALL_DIR.lstrip("/")).exists()


def test_the_worker_vm_is_air_gapped(lab, worker):
    assert lab.sh("curl -fsS -o /dev/null -m 20 %s && echo reached" % OUTSIDE).strip() == "reached"
    res = worker.run("curl -fsS -o /dev/null -m 20 %s" % OUTSIDE, check=False)
    assert res.returncode != 0, "the worker VM reaches %s" % OUTSIDE


def test_add_worker_prepares_the_air_gapped_vm_and_registers_it(lab, worker):
    with _timed("fab add-worker (air-gapped VM, from the bundle)"):
        res = add_worker(lab, worker, "--queue", "default,special", "--name", "vm1")
    (CACHE / "add-worker.log").write_text(str(res))
    assert res.returncode == 0, str(res)
    out = res.output
    assert "preflight on worker" in out and "reaches the main VM at https://%s" % VM_IP in out
    assert "present, skipped" in out                            # Docker from its image
    # The bundle's wheelhouse (fab bundle --flows tests/flows/wheelhouse).
    assert "wheelhouse: " in out and "of wheelhouse_flow.py" in out, out
    assert "environment images get packages from the wheelhouse only" in out, out
    assert "==> smoke test" in out                             # the main VM through Edge
    assert "vm1 is idle, queues ['default', 'special']" in out, out
    assert "Worker vm1 (deployer@10.213.1.2) takes tasks of queues default,special" in out
    # Its .env holds the main VM's secrets: root-only; no database password.
    env = worker.root / INSTALL_DIR.lstrip("/") / ".env"
    assert oct(env.stat().st_mode & 0o777) == "0o600"
    assert "MFS_POSTGRES_PASSWORD" not in env.read_text()
    lab.results["worker_added"] = res

    status = lab.fab("status", "--config", str(lab.config))
    assert status.returncode == 0, str(status)
    lines = [x for x in status.output.splitlines() if x.strip().startswith(("vm1 ", "main "))]
    assert len(lines) == 2 and all(" idle " in x or " running " in x for x in lines), status.output


def test_a_foreach_spreads_over_both_vms_and_a_routed_step_runs_on_its_queue(lab, worker):
    assert "worker_added" in lab.results, "needs the worker"
    lab.drop_flow(FLOW, "SpreadFlow")

    # More splits than the main VM has slots (8 on the test VM: 2 cores), so
    # the main VM alone cannot hold them all: the worker's slots count.
    run_id, state, tis = lab.run_dag("SpreadFlow", {"width": 12}, timeout=1200)
    assert state == "success", tis
    from metaflow_services.spec import run_id_for

    mf_run = run_id_for("SpreadFlow", run_id)
    lab.results["spread_run"] = mf_run
    where = {}
    deadline = time.time() + 60   # the worker ships its metadata every few seconds
    while True:
        where = lab.client("r = Run('SpreadFlow/%s')\nprint(json.dumps({s: sorted({dict((m.name, "
                           "m.value) for m in t.metadata).get('mfs-worker') for t in r[s]}) for s "
                           "in ('body', 'special')}))" % mf_run)
        if None not in where["body"] or time.time() > deadline:
            break
        time.sleep(5)
    assert where["body"] == ["main", "vm1"], where     # the foreach used both machines
    assert where["special"] == ["vm1"], where          # @worker(queue="special")


def test_a_pypi_step_on_the_air_gapped_worker_installs_from_the_wheelhouse(lab, worker):
    assert "worker_added" in lab.results, "needs the worker"
    lab.drop_flow(WHEELHOUSE_FLOW, "WheelhouseFlow")
    run_id, state, tis = lab.run_dag("WheelhouseFlow", {}, timeout=900)
    assert state == "success", tis
    from metaflow_services.spec import run_id_for

    data = lab.client("r = Run('WheelhouseFlow/%s')\nd = r['render'].task.data\n"
                      "print(json.dumps([d.versions, d.html, d.ran_on]))"
                  % run_id_for("WheelhouseFlow", run_id))
    versions, html, ran_on = data
    assert ran_on == "vm1" and versions["jinja2"] == "3.1.4", data
    assert html == "<p>&lt;airflow &amp; metaflow&gt;</p>", html   # MarkupSafe at work
    # Its environment image was built on the worker, offline, from the wheels.
    images = worker.run("docker images --format '{{.Repository}}' metaflow-services/env").stdout
    assert "metaflow-services/env" in images, images


def test_an_event_starts_a_flow_on_the_worker_and_its_finish_one_on_main(lab, worker):
    """@trigger and @trigger_on_finish across machines: an event starts a flow
    whose steps run on the worker VM; its end step (on the worker) emits the
    finish event that starts a flow on the main VM."""
    assert "worker_added" in lab.results, "needs the worker"
    lab.drop_flow(TRIGGERS / "worker_event_flow.py", "WorkerEventFlow")
    lab.drop_flow(TRIGGERS / "after_worker_flow.py", "AfterWorkerFlow")
    before = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    proc = subprocess.run([str(VENV_BIN / "metaflow-services"), "publish", "worker.ready"],
                          env=lab.laptop_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = lab.triggered_run("AfterWorkerFlow", before, timeout=900)
    assert after["state"] == "success", after
    upstream = lab.triggered_run("WorkerEventFlow", before, timeout=60)
    from metaflow_services.spec import run_id_for

    got = lab.client("w = Run('WorkerEventFlow/%s')\na = Run('AfterWorkerFlow/%s')\n"
                     "print(json.dumps([w.pathspec, a.data.upstream, w.data.event_name, "
                     "sorted(dict((m.name, m.value) for m in t.metadata).get('mfs-worker') "
                     "for s in ('start', 'end') for t in w[s])]))"
                 % (run_id_for("WorkerEventFlow", upstream["dag_run_id"]),
                    run_id_for("AfterWorkerFlow", after["dag_run_id"])))
    assert got[1] == got[0], got                       # current.trigger.run on main
    assert got[2] == "worker.ready" and got[3] == ["vm1", "vm1"], got



def test_a_flow_secret_reaches_a_step_on_the_worker(lab, worker):
    """@secrets on a step routed to the worker VM: the worker's task runtime
    reads the secret from the main VM's Airflow (its execution API), the
    worker holds no copy of it afterwards."""
    assert "worker_added" in lab.results, "needs the worker"
    value = "pw-" + uuid.uuid4().hex
    res = lab.fab("secrets.set", "db", stdin="DB_PASSWORD=%s\n" % value)
    assert res.returncode == 0, str(res)
    lab.drop_flow(FLOWS / "platform_secrets" / "worker_secret_flow.py", "WorkerSecretFlow")
    run_id, state, tis = lab.run_dag("WorkerSecretFlow", {})
    assert state == "success", tis
    from metaflow_services.spec import run_id_for

    digest, machine = lab.client("d = Run('WorkerSecretFlow/%s')['start'].task.data\n"
                                 "print(json.dumps([d.digest, d.machine]))"
                                 % run_id_for("WorkerSecretFlow", run_id))
    assert machine == "vm1" and digest == hashlib.sha256(value.encode()).hexdigest()
    found = worker.run("grep -rlsF %s /opt /srv /tmp /var/tmp /root /home || true" % value).stdout
    assert found.strip() == "", "the value stayed on the worker VM: %s" % found
    lab.results["worker_secret"] = value


def worker_compose(worker, args, timeout=300):
    return worker.run("cd %s && docker compose %s" % (INSTALL_DIR, args), timeout=timeout).stdout


def test_a_token_minted_on_the_worker_vm_is_refused_by_the_main_vm(lab, worker):
    """Root on a worker VM has the edge workers' secret: with it, in the
    worker's own edge-worker container, it mints an admin token and a task
    token; the main VM's Airflow refuses both (it signs with a key only the
    main VM holds)."""
    assert "worker_added" in lab.results, "needs the worker"
    mint = textwrap.dedent("""
        import json, os, time, uuid, urllib.request, ssl, jwt
        secret, now = os.environ["AIRFLOW__API_AUTH__JWT_SECRET"], int(time.time())
        admin = json.loads(os.environ["MFS_CLAIMS"])  # a real admin token's claims
        task = {"sub": str(uuid.uuid4()), "aud": "urn:airflow.apache.org:task",
                "iat": now, "nbf": now, "exp": now + 600}
        ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
        out = {}
        for name, claims, path in (("api", admin, "/api/v2/dags"),
                                   ("task", task, "/execution/variables/mfs_secret__db")):
            req = urllib.request.Request(os.environ["MFS_MAIN_URL"] + path, headers={
                "Authorization": "Bearer " + jwt.encode(claims, secret, algorithm="HS512",
                                                        headers={"kid": "not-used"})})
            try:
                out[name] = urllib.request.urlopen(req, context=ctx, timeout=30).status
            except urllib.error.HTTPError as e:
                out[name] = e.code
        print(json.dumps(out))
        """)
    import jwt

    claims = jwt.decode(lab.airflow_token().json()["access_token"],
                        options={"verify_signature": False})
    out = worker_compose(worker, "exec -T -e MFS_MAIN_URL=https://%s -e MFS_CLAIMS=%s edge-worker "
                                 "python -c %s" % (VM_IP, shlex.quote(json.dumps(claims)),
                                                   shlex.quote(mint)))
    codes = json.loads(out.strip().splitlines()[-1])
    assert set(codes) == {"api", "task"} and set(codes.values()) <= {401, 403}, codes


def test_tasks_waiting_for_a_worker_survive_a_new_signing_key(lab, worker):
    """A deployment from before this version has no signing key (tokens were
    made with the shared secret); fab deploy makes one. A task queued for the
    worker holds a token signed the old way: the deploy queues it again with a
    new token, and it runs. Simulated by removing the key of this deployment."""
    assert "worker_secret" in lab.results, "needs the worker and the secret db"
    worker_compose(worker, "exec -T edge-worker airflow edge maintenance on --comments "
                           "'test: hold the queue' --wait")
    try:
        api = lab.airflow()
        base = "https://%s/api/v2/dags/WorkerSecretFlow" % VM_IP
        run_id = "rekey-%d" % time.time()
        api.post(base + "/dagRuns", json={"logical_date": None, "dag_run_id": run_id,
                                          "conf": {}}, timeout=30).raise_for_status()
        deadline = time.time() + 300
        while "queued" not in lab.compose(
                "exec -T -e PGUSER=postgres postgres psql -X -A -t -d airflow -c \"SELECT state "
                "FROM edge_job WHERE dag_id = 'WorkerSecretFlow' AND run_id = '%s'\"" % run_id):
            assert time.time() < deadline, "the task never waited in the edge queue"
            time.sleep(2)
        lab.sh("rm %s/state/airflow-jwt/signing-key.pem" % INSTALL_DIR)
        with _timed("fab deploy making a new signing key"):
            res = lab.deploy()
        (CACHE / "deploy-new-key.log").write_text(str(res))
        assert res.returncode == 0, str(res)
        assert "token signing key (Ed25519" in res.output and ": generated" in res.output
        assert "1 task(s) waiting for a worker queued again with new tokens" in res.output, \
            res.output
    finally:
        worker_compose(worker, "exec -T edge-worker airflow edge maintenance off")
    stale = api.get(base + "/dagRuns/" + run_id, timeout=30)
    assert stale.status_code in (401, 403), stale.text   # a token from before the new key
    api, deadline = lab.airflow(), time.time() + 600
    while (state := api.get(base + "/dagRuns/" + run_id, timeout=30).json()["state"]) not in (
            "success", "failed"):
        assert time.time() < deadline, "run still %s" % state
        time.sleep(3)
    assert state == "success", api.get(base + "/dagRuns/%s/taskInstances" % run_id,
                                       timeout=30).text
    from metaflow_services.spec import run_id_for

    digest, machine = lab.client("d = Run('WorkerSecretFlow/%s')['start'].task.data\n"
                                 "print(json.dumps([d.digest, d.machine]))"
                                 % run_id_for("WorkerSecretFlow", run_id))
    value = lab.results["worker_secret"]
    assert machine == "vm1" and digest == hashlib.sha256(value.encode()).hexdigest()
    assert lab.fab("secrets.delete", "db").returncode == 0

def assert_single_vm(lab):
    cs = lab.wait_healthy()
    assert "edge-worker" not in cs and "worker-sync" not in cs
    env = lab.compose("exec -T airflow-scheduler printenv AIRFLOW__CORE__EXECUTOR MFS_WORKER_QUEUES",
                      check=False)
    assert env.split() == ["LocalExecutor"], env


def test_remove_worker_drains_a_live_worker_and_the_main_vm_is_single_again(lab, worker):
    assert "worker_added" in lab.results, "needs the worker"
    res = remove_worker(lab, worker, "remove-worker.log")
    assert "draining vm1 on deployer@10.213.1.2" in res.output and "drained in" in res.output
    assert "The main VM runs every step itself again (single VM)." in res.output
    assert worker.run("docker ps -aq").stdout.strip() == ""      # nothing left running there
    assert not (worker.root / INSTALL_DIR.lstrip("/") / ".env").exists()
    assert_single_vm(lab)
    # The flow that routes a step to the gone queue is refused, saying why.
    api, deadline = lab.airflow(), time.time() + 180
    while True:
        text = json.dumps(api.get("https://%s/api/v2/importErrors" % VM_IP, timeout=30).json())
        if "@worker(queue='special') needs a worker VM serving that queue" in text:
            break
        assert time.time() < deadline, text
        time.sleep(3)


def test_add_worker_again_reuses_what_the_vm_has(lab, worker):
    with _timed("fab add-worker (again: Docker and images present)"):
        res = add_worker(lab, worker, "--queue", "default,special", "--name", "vm1")
    assert res.returncode == 0, str(res)
    assert "present, skipped" in res.output                     # Docker
    assert "2 images ready (2 were present)" in res.output
    assert "vm1 is idle" in res.output


def test_a_worker_vm_dying_mid_task_is_retried_on_the_main_vm(lab, worker):
    assert "worker_added" in lab.results, "needs the worker"
    # Only the worker takes new tasks until `slow` runs on it.
    lab.compose("exec -T edge-worker airflow edge maintenance on --comments 'test: vm1 first' "
                "--wait", timeout=300)
    try:
        api = lab.airflow()
        base = "https://%s/api/v2/dags/SpreadFlow" % VM_IP
        run_id = "crash-%d" % time.time()
        api.post(base + "/dagRuns", json={"logical_date": None, "dag_run_id": run_id,
                                          "conf": {"width": 1, "hang": 900}},
                 timeout=30).raise_for_status()
        deadline = time.time() + 600
        while task_state(lab, run_id, "slow") != "running":
            assert time.time() < deadline, api.get(base + "/dagRuns/%s/taskInstances" % run_id,
                                                   timeout=30).text
            time.sleep(2)
    finally:
        lab.compose("exec -T edge-worker airflow edge maintenance off")
    time.sleep(10)  # well inside the first attempt's sleep
    t0 = time.time()
    worker.crash()  # power loss: the worker's Docker, edge worker and step die at once
    deadline = time.time() + 900
    while True:
        state = api.get(base + "/dagRuns/" + run_id, timeout=30).json()["state"]
        if state in ("success", "failed"):
            break
        assert time.time() < deadline, "run still %s" % state
        time.sleep(5)
    recovered = time.time() - t0
    assert state == "success", api.get(base + "/dagRuns/%s/taskInstances" % run_id,
                                       timeout=30).text
    from metaflow_services.spec import run_id_for

    slow = lab.client("t = Run('SpreadFlow/%s')['slow'].task\nprint(json.dumps("
                      "[t.current_attempt, t.data.ran_on]))" % run_id_for("SpreadFlow", run_id))
    assert slow == [1, "main"], slow   # Metaflow's next attempt, on the surviving machine
    print("worker VM killed; the task's retry succeeded on the main VM %.0f s later" % recovered)

    # `fab status` says the worker is lost (once Airflow counts it lifeless).
    deadline = time.time() + 180
    while True:
        status = lab.fab("status", "--config", str(lab.config))
        if "warning: worker vm1 (deployer@10.213.1.2) is " in status.output:
            break
        assert time.time() < deadline, status.output
        time.sleep(10)


def test_remove_worker_forgets_a_dead_worker(lab, worker):
    assert "worker_added" in lab.results, "needs the worker"
    res = remove_worker(lab, worker, "remove-dead-worker.log")
    assert "forgetting it on the main VM only" in res.output
    assert "it was unreachable: stop it by hand when it is back" in res.output
    assert_single_vm(lab)
