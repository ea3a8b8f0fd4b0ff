"""What the deploy tests share (their fixtures are in conftest.py): everything they need is built here, once per
machine (cached under /var/cache/metaflow-services-tests) or once per session.

* the stack's images, built from Debian and PyPI (tests/images/*.Dockerfile;
  no registry is reachable), and a bundle of them made with `fab bundle`;
* a bare Debian 13 VM (tests/deploy/vm.py): fresh for every session, no Docker;
* `lab.fab(...)`: runs the real `fab` command as a user would, from the
  repository root, with a private HOME (no ~/.ssh, ~/.fabric.yaml or
  ~/.metaflowconfig of the machine leak in).

Set MFS_KEEP_VM=1 to leave the VM running after the session (for debugging:
`ssh -i /var/cache/metaflow-services-tests/ssh/id_ed25519 root@10.213.0.2`
from the host).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import vm as vm_mod  # noqa: E402

from support import REPO, deploy_module  # noqa: E402,F401  (tests/support.py)
CACHE = Path(os.environ.get("MFS_TEST_CACHE", "/var/cache/metaflow-services-tests"))
VENV_BIN = Path(sys.executable).parent
FAB = str(VENV_BIN / "fab")
# The README's command (it installs Fabric into .venv on first use).
SCRIPTS_FAB = str(REPO / "scripts" / "fab")
IMAGES = ["postgres", "seaweedfs", "proxy", "airflow", "step", "metadata", "metaflow-ui"]
VM_IP = vm_mod.VM_IP
INSTALL_DIR = "/opt/metaflow-services"
DATA_DIR = "/srv/metaflow-services"
BACKUP_DIR = "/var/backups/metaflow-services"
PROJECT = "metaflow-services"
# `fab bundle --flows` of this folder: the air-gapped worker's wheelhouse.
WHEELHOUSE_FLOWS = REPO / "tests" / "flows" / "wheelhouse"

# The deploy options of the test: the defaults (the Metaflow metadata
# service, UI backend and UI included), with the test-built images instead of
# the official ones (no registry is reachable here; tests/images/ builds
# equivalents, the Metaflow ones from the vendored upstream sources). Four
# task slots, as on the 4 GB VM the stack is sized for (this VM sees the
# host's 24 GB). test_deploy_lean.py switches metaflow_services off.
TEST_OPTIONS = """\
public_host: 10.213.0.2
airflow:
  parallelism: 4
images:
  postgres: mfs-postgres:test
  seaweedfs: mfs-seaweedfs:test
  proxy: mfs-proxy:test
  airflow: mfs-airflow:test
  step: mfs-step:test
  metadata: mfs-metadata:test
  metaflow_ui: mfs-metaflow-ui:test
"""

TIMINGS = {}


def _timed(name):
    class T:
        def __enter__(self):
            self.t0 = time.time()

        def __exit__(self, *exc):
            TIMINGS[name] = round(time.time() - self.t0, 1)
    return T()


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_sep("-", "deploy test timings (seconds)")
        for k, v in TIMINGS.items():
            terminalreporter.write_line("%-40s %8.1f" % (k, v))
        try:
            (CACHE / "deploy-test-timings.json").write_text(json.dumps(TIMINGS, indent=2))
        except OSError:
            pass


def run(argv, timeout=3600, env=None, cwd=None):
    return subprocess.run(argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout, env=env, cwd=cwd)


# ---------------------------------------------------------------------------
# Preparation (cached)
# ---------------------------------------------------------------------------


def build_images():
    env = dict(os.environ, PATH="%s:%s" % (VENV_BIN, os.environ.get("PATH", "")),
               MFS_CACHE_DIR=str(CACHE))
    proc = run([str(REPO / "tests" / "images" / "build"), *IMAGES], env=env)
    if proc.returncode != 0:
        pytest.fail("building the test images failed:\n%s" % proc.stdout[-3000:])


def local_image_id(ref):
    proc = run(["docker", "image", "inspect", "--format", "{{.Id}}", ref])
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_bundle(config: Path, home: Path) -> Path:
    """`fab bundle --flows` of the test images and the wheelhouse of the
    flows in WHEELHOUSE_FLOWS; made again only when an image or one of those
    flows changed."""
    path = CACHE / "bundle-test.tar"
    if path.exists():
        import tarfile

        with tarfile.open(path) as tar:
            manifest = json.loads(tar.extractfile(tar.next()).read())
        wheels = deploy_module("wheels")
        flows_sha = wheels.source_sha(wheels.flow_files(WHEELHOUSE_FLOWS))
        if all(local_image_id(e["ref"]) == e["id"] for e in manifest["images"]) and \
                (manifest.get("wheelhouse") or {}).get("source_sha") == flows_sha:
            return path
    proc = run([FAB, "bundle", "--config", str(config), "--output", str(path),
                "--flows", str(WHEELHOUSE_FLOWS),
                # This machine reaches PyPI through a TLS-inspecting proxy.
                "--set", "packages.ca_bundle=%s" % os.environ.get(
                    "SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")],
               cwd=str(REPO), env=fab_env(home))
    if proc.returncode != 0:
        pytest.fail("fab bundle failed:\n%s" % proc.stdout[-3000:])
    return path


def ssh_key(name):
    d = CACHE / "ssh"
    d.mkdir(parents=True, exist_ok=True)
    key = d / name
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mfs-deploy-tests",
                        "-f", str(key)], check=True)
    return key


def fab_env(home):
    """A user's shell: a private HOME; none of the test session's Metaflow or
    AWS settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("METAFLOW_", "AWS_", "MFS_", "SSH_AUTH_SOCK"))}
    env.update({"HOME": str(home), "PATH": "%s:%s" % (VENV_BIN, os.environ.get("PATH", "")),
                "USER": "tester", "NO_COLOR": "1"})
    return env


# ---------------------------------------------------------------------------
# The lab
# ---------------------------------------------------------------------------


@dataclass
class FabResult:
    argv: list
    returncode: int
    output: str
    seconds: float

    def __str__(self):
        return "$ %s\n(exit %d, %.0fs)\n%s" % (" ".join(self.argv), self.returncode, self.seconds,
                                               self.output[-6000:])


@dataclass
class Lab:
    vm: vm_mod.BareVM
    key: Path
    wrong_key: Path
    bundle: Path
    config: Path
    home: Path
    results: dict = field(default_factory=dict)

    def fab(self, *args, user="deployer", host=VM_IP, key=None, timeout=2400, global_args=(),
            fab=FAB, stdin=None):
        """`fab -H user@host -i KEY ARGS`; *stdin*: text piped in (else none)."""
        argv = [fab, "-H", "%s@%s" % (user, host), "-i", str(key or self.key), *global_args, *args]
        t0 = time.time()
        proc = subprocess.run(argv, cwd=str(REPO), env=fab_env(self.home), text=True,
                              input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        return FabResult(argv[:1] + [a if a != str(key or self.key) else "KEY" for a in argv[1:]],
                         proc.returncode, proc.stdout, time.time() - t0)

    def deploy(self, *extra, bundle=True, config=None, **kw):
        args = ["deploy", "--config", str(config or self.config)]
        if bundle:
            args += ["--bundle", str(self.bundle)]
        return self.fab(*args, *extra, **kw)

    # -- looking into the VM, as its console would ----------------------------

    def sh(self, script, check=True, timeout=300):
        return self.vm.run(script, check=check, timeout=timeout).stdout

    def compose(self, args, check=True, timeout=600):
        return self.sh("cd %s && docker compose %s" % (INSTALL_DIR, args), check=check,
                       timeout=timeout)

    def containers(self):
        """{service: {id, started, state, health, exit_code}} of the stack."""
        fmt = ('{{index .Config.Labels "com.docker.compose.service"}}|{{.Id}}|'
               '{{.State.StartedAt}}|{{.State.Status}}|'
               '{{if index .State "Health"}}{{(index .State "Health").Status}}{{else}}none{{end}}|'
               '{{.State.ExitCode}}|{{.RestartCount}}')
        out = self.sh("docker ps -aq --filter label=com.docker.compose.project=%s | "
                      "xargs -r docker inspect --format '%s'" % (PROJECT, fmt))
        result = {}
        for line in out.strip().splitlines():
            svc, cid, started, state, health, code, restarts = line.split("|")
            result[svc] = {"id": cid, "started": started, "state": state, "health": health,
                           "exit_code": int(code), "restarts": int(restarts)}
        return result

    def secret(self, name):
        for line in (self.vm.root / INSTALL_DIR.lstrip("/") / "secrets.env").read_text().splitlines():
            if line.startswith(name + "="):
                return line.split("=", 1)[1]
        raise KeyError(name)

    @property
    def ca(self):
        return str(self.vm.root / INSTALL_DIR.lstrip("/") / "tls" / "cert.pem")

    def laptop_env(self, profile="laptop"):
        """A laptop's shell with a profile `fab client-config` writes now (a
        profile from before `fab restore` onto a new VM holds the old VM's
        certificate), a Metaflow user and the admin's Airflow password: what
        the Deployer and publish need."""
        res = self.fab("client-config", "--name", profile)
        assert res.returncode == 0, str(res)
        return dict(fab_env(self.home), METAFLOW_PROFILE=profile, METAFLOW_USER="alice",
                    MFS_AIRFLOW_PASSWORD=self.secret("MFS_AIRFLOW_PASSWORD_ADMIN"))

    def airflow_token(self, user="admin", password=None):
        import requests

        r = requests.post("https://%s/auth/token" % VM_IP, timeout=30, verify=self.ca,
                          json={"username": user,
                                "password": password or self.secret("MFS_AIRFLOW_PASSWORD_ADMIN")})
        return r

    def airflow(self):
        import requests

        r = self.airflow_token()
        r.raise_for_status()
        s = requests.Session()
        # Else REQUESTS_CA_BUNDLE (set on these machines) wins over s.verify.
        s.trust_env = False
        s.verify = self.ca
        s.headers["Authorization"] = "Bearer " + r.json()["access_token"]
        return s

    def run_dag(self, dag_id, conf, run_id=None, timeout=900):
        """Triggers a run through the REST API and waits for it to finish:
        (run id, final state, its task instances as text for messages)."""
        api = self.airflow()
        base = "https://%s/api/v2/dags/%s" % (VM_IP, dag_id)
        run_id = run_id or "test-%d" % (time.time() * 1000)
        api.post(base + "/dagRuns", json={"logical_date": None, "dag_run_id": run_id,
                                          "conf": conf}, timeout=30).raise_for_status()
        deadline = time.time() + timeout
        while True:
            state = api.get(base + "/dagRuns/" + run_id, timeout=30).json()["state"]
            if state in ("success", "failed"):
                break
            assert time.time() < deadline, "run %s of %s still %s" % (run_id, dag_id, state)
            time.sleep(3)
        return run_id, state, api.get(base + "/dagRuns/%s/taskInstances" % run_id,
                                      timeout=30).text

    def triggered_run(self, dag_id, after, timeout=600):
        """The first run of *dag_id* started by an asset event (@trigger,
        @trigger_on_finish) queued after *after* (ISO time, UTC), once finished."""
        api = self.airflow()
        deadline = time.time() + timeout
        while time.time() < deadline:
            runs = api.get("https://%s/api/v2/dags/%s/dagRuns" % (VM_IP, dag_id),
                           timeout=30).json()["dag_runs"]
            for r in runs:
                if (r["run_type"] == "asset_triggered" and r["queued_at"] > after
                        and r["state"] in ("success", "failed")):
                    return r
            time.sleep(3)
        raise AssertionError("no finished asset-triggered run of %s since %s" % (dag_id, after))

    def drop_flow(self, path, dag_id):
        """scp the flow into the dags folder as a data scientist would; wait
        for its DAG and unpause it."""
        from fabric import Connection

        with Connection(VM_IP, user="deployer",
                        connect_kwargs={"key_filename": str(self.key)}) as c:
            c.put(str(path), "%s/dags/%s" % (DATA_DIR, path.name))
        dag = self.vm.root / DATA_DIR.lstrip("/") / "dags" / ".metaflow-services" / (dag_id + ".py")
        api, base = self.airflow(), "https://%s/api/v2/dags/%s" % (VM_IP, dag_id)
        deadline = time.time() + 240
        while not dag.exists() or api.get(base, timeout=30).status_code != 200:
            assert time.time() < deadline, self.compose("logs --tail 30 flow-watcher")
            time.sleep(2)
        api.patch(base, json={"is_paused": False}, timeout=30).raise_for_status()

    def client(self, code):
        """Python with the Metaflow client in the main VM's scheduler container
        (the stack's own Metaflow settings); returns its JSON output."""
        out = self.compose("exec -T airflow-scheduler python -c %s"
                           % shlex.quote("import json\nfrom metaflow import Run, namespace\n"
                                         "namespace(None)\n" + code))
        return json.loads(out.strip().splitlines()[-1])

    def metadata(self, path):
        """GET from the metadata service through the proxy, with the API key,
        as the Metaflow client of a `fab client-config` profile does."""
        import requests

        r = requests.get("https://%s:8443/metadata/%s" % (VM_IP, path.lstrip("/")),
                         verify=self.ca, timeout=30,
                         headers={"x-api-key": self.secret("MFS_METAFLOW_API_KEY")})
        r.raise_for_status()
        return r.json()

    def s3(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url="https://%s:9000" % VM_IP, verify=self.ca,
                            aws_access_key_id=self.secret("MFS_S3_ACCESS_KEY"),
                            aws_secret_access_key=self.secret("MFS_S3_SECRET_KEY"),
                            region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 2}))

    def wait_healthy(self, timeout=600):
        deadline = time.time() + timeout
        while True:
            cs = self.containers()
            bad = {s: c for s, c in cs.items()
                   if not (c["state"] == "running" and c["health"] in ("healthy", "none"))
                   and not (c["state"] == "exited" and c["exit_code"] == 0
                            and s in ONE_SHOTS)}
            if cs and not bad:
                return cs
            if time.time() > deadline:
                raise AssertionError("not healthy after %ss: %s" % (timeout, bad))
            time.sleep(3)

    @contextmanager
    def unchanged(self):
        """Asserts the block changes nothing on the VM: no file newer than a
        marker (except the SSH login records and sudo's timestamps), the same
        locks and containers."""
        state = ("ls -A /run/lock; command -v docker >/dev/null && "
                 "docker ps -a --no-trunc --format '{{.ID}} {{.State}}' || true")
        before = self.sh(state)
        self.sh("rm -f /tmp/.mfs-marker && touch /tmp/.mfs-marker && sleep 1.1")
        yield
        changed = self.sh(
            "find / -xdev -newer /tmp/.mfs-marker ! -path /tmp/.mfs-marker "
            "! -path '/var/log/*' ! -path /var/log ! -path '/var/lib/sudo*' ! -path /run "
            "2>/dev/null || true"
        ).split()
        assert changed == [], "files changed on the VM: %s" % changed
        assert self.sh(state) == before, "locks or containers changed on the VM"


@contextmanager
def untouched(lab):
    """The block changes nothing of the deployment: no file in its folders
    newer than a marker, the same containers. (lab.unchanged() is for VMs
    with no stack running: a running stack writes its own files.)"""
    dirs = " ".join((INSTALL_DIR, DATA_DIR, BACKUP_DIR))
    before = lab.containers()
    lab.sh("touch /tmp/.mfs-upkeep-marker && sleep 1.1")
    yield
    # (a folder not made yet, such as the backups' before the first backup, is skipped)
    changed = lab.sh("for d in %s; do [ ! -d $d ] || find $d -newer /tmp/.mfs-upkeep-marker; "
                     "done" % dirs).split()
    assert changed == [], changed
    assert lab.containers() == before


ONE_SHOTS = ("postgres-init", "airflow-init", "metaflow-migrate")


@pytest.fixture(scope="session")
def lab():
    if os.geteuid() != 0:
        pytest.skip("the deploy tests need root (network namespaces, debootstrap, mounts)")
    if run(["docker", "info"]).returncode != 0:
        pytest.fail("the deploy tests need the host's Docker engine (scripts/host-setup starts it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="mfs-deploy-home-"))
    config = CACHE / "deploy-test.yaml"
    config.write_text(TEST_OPTIONS)
    with _timed("test images (tests/images/build)"):
        build_images()
    with _timed("VM disk image (cached)"):
        image = vm_mod.prepare_image(CACHE)
    with _timed("fab bundle (cached)"):
        bundle = ensure_bundle(config, home)
    key, wrong = ssh_key("id_ed25519"), ssh_key("wrong_ed25519")
    vm = vm_mod.BareVM(image, CACHE / "vm", key.with_suffix(".pub").read_text().strip())
    with _timed("VM create and boot"):
        vm.create()
        vm.network_up()
        vm.boot()
    lab = Lab(vm=vm, key=key, wrong_key=wrong, bundle=bundle, config=config, home=home)
    yield lab
    if os.environ.get("MFS_KEEP_VM") == "1":
        print("\nMFS_KEEP_VM=1: the VM keeps running (%s); stop it with "
              "tests/deploy/vm.py's BareVM.destroy" % VM_IP)
        return
    vm.destroy()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def deployed(lab):
    """The first deploy onto the bare VM, from the bundle, as the README says:
    `scripts/fab -H root@vm deploy` (--config and --bundle only swap in the
    test-built images)."""
    assert lab.vm.run("command -v docker", check=False).returncode != 0, \
        "the VM must start without Docker"
    with _timed("first fab deploy (from the bundle)"):
        res = lab.deploy(user="root", fab=SCRIPTS_FAB)
    lab.results["first"] = res
    (CACHE / "first-deploy.log").write_text(str(res))
    assert res.returncode == 0, str(res)
    # The VM's admin lets a data scientist ("deployer", an account on the VM)
    # write flows: members of the group metaflow may (README, step 1). A
    # deploy as root adds nobody to it.
    lab.sh("usermod -aG metaflow deployer")
    return res


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item (item.rep_call), so
    fixtures can tell a failed test (e.g. to keep a browser screenshot)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
