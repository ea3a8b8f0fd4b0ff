"""Worker VMs: `fab add-worker`, `fab remove-worker` and the workers section
of `fab status` (docs/workers.md).

A worker VM runs Airflow's edge worker (compose/worker.yaml): it takes the
tasks of its queues from the main VM's Edge executor over HTTPS, through the
main VM's proxy, and runs the Metaflow steps in containers as the main VM
does. The main VM keeps a registry of its workers (install_dir/
state/workers.json); with at least one worker, its deploy switches Airflow to
the Edge executor, starts its own edge worker for the "default" queue and the
worker-sync service, and publishes the queues (MFS_WORKER_QUEUES) the compiler
routes steps with. Without workers the stack is exactly the single-VM stack.

add-worker: preflight both VMs (nothing changed), register the worker and
converge the main VM (smoke test through the Edge executor), then prepare the
worker VM like a deploy (Docker, stack files, images) and start it, and wait
until the main VM's Airflow lists it idle. A failure after the registration
takes it out again, so the main VM never routes to a worker that is not there.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

from fabric import Connection
from invoke import task

from . import bundle as bundle_mod
from . import commands as cmd
from . import stack
from .remote import DeployError, Out, Remote, boundary, translate
from .tasks import (COMMON_HELP, DOCKER_ROOT, WORKERS_FILE, Deployment, _duration, _options,
                    _read_secrets, _require_host, _state)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")
_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
REGISTER_TIMEOUT = 300


class Main:
    """The main VM, reached from this workstation with the same SSH settings
    as the worker."""

    def __init__(self, c, main_host, out, config):
        if not main_host:
            raise DeployError("--main is missing: the main VM this worker takes tasks from",
                              "fab -H WORKER add-worker --main MAIN_HOST")
        conn = Connection(main_host, config=c.config)
        self.d = Deployment(Remote(conn, out), _options(conn, config, {}), out)
        self.d.whoami()
        self.state = _state(self.d)   # the main VM's recorded options from here on
        self.out = out

    @property
    def r(self):
        return self.d.r

    def write_registry(self, workers):
        text = json.dumps({"workers": workers}, indent=2, sort_keys=True) + "\n"
        self.r.run(cmd.write_file(self.d.dir + "/" + WORKERS_FILE, text, "0644"),
                   what="writing the worker registry")

    def converge(self, bundle_path=None, manifest=None):
        """Re-deploy the main VM with the registry as it now is."""
        d = self.d
        d.changed = False
        d.preflight()
        d.prepare(bundle_path, manifest)
        d.go_live()

    def edge_workers(self):
        return edge_workers(self.d)

    def forget(self, name):
        self.r.run(cmd.compose(self.d.dir, "exec -T airflow-scheduler airflow edge "
                                           "remove-remote-edge-worker --edge-hostname %s"
                                           % cmd.q(name)),
                   what="removing %s from Airflow's worker list" % name, warn=True)


class WorkerDeployment(Deployment):
    """The worker stack on the -H host: a deploy's preflight, Docker, stack
    files and images, then compose/worker.yaml."""

    def __init__(self, remote, o, out, main: Main, entry):
        super().__init__(remote, o, out)
        self.main = main
        self.entry = entry

    def services(self):
        return stack.services(self.o, files=["worker.yaml"])

    def wanted_images(self):
        return {role: ref for role, ref in stack.images(self.o).items()
                if role in ("airflow", "step")}

    def preflight(self):
        self.out.step("preflight on worker %s (nothing is changed)" % self.r.host)
        self.whoami()
        f = cmd.parse_facts(self.r.stdout(cmd.facts([DOCKER_ROOT, self.dir], self.o.project),
                                          what="preflight"))
        self.facts = f
        # A worker publishes no port: only the machine checks apply.
        problems = [p for p in self.check_facts(f) if not p.startswith("expected port")]
        if self.r.stdout(cmd.read_file(self.dir + "/state/deploy.json"),
                         what="looking for a main stack").strip():
            problems.append("%s runs a main stack (%s/state/deploy.json); a worker needs a VM "
                            "of its own" % (self.r.host, self.dir))
        if problems:
            raise DeployError("preflight refused (nothing was changed): " + "; ".join(problems),
                              "fix the worker VM and run fab add-worker again")
        st = self.main.state
        for port, path in ((st["ports"]["https"], "/api/v2/monitor/health"),
                           (st["ports"]["s3"], "/")):
            code = self.r.stdout(cmd.check_proxy(port, path, host=st["public_host"]),
                                 what="reaching the main VM", warn=True).strip()
            if code in ("", "000"):
                raise DeployError(
                    "preflight refused (nothing was changed): the worker cannot reach the main "
                    "VM at https://%s:%d" % (st["public_host"], port),
                    "open port %d of the main VM (%s) to the worker, or redeploy the main VM "
                    "with --public-host set to an address the worker can reach"
                    % (port, st["public_host"]))
        self.out.ok("%s, %s cores, %.1f GB memory; reaches the main VM at https://%s (ports "
                    "%d, %d)" % (f.get("os_name"), f.get("cores"),
                                 int(f["mem_kb"]) / 1024 / 1024, st["public_host"],
                                 st["ports"]["https"], st["ports"]["s3"]))

    def configure(self):
        self.out.step("worker settings (%s/.env, mode 0600)" % self.dir)
        m = self.main
        if m.state.get("self_signed"):
            ca = m.r.stdout(cmd.read_file(m.d.dir + "/tls/cert.pem"),
                            what="reading the main VM's certificate")
        else:  # a certificate from a public CA: the system's trust store
            ca = self.r.stdout("cat /etc/ssl/certs/ca-certificates.crt",
                               what="reading the system's CA certificates")
        res = self.r.stdout(cmd.write_file(self.dir + "/tls/main-ca.pem", ca, "0644"),
                            what="installing the main VM's certificate").strip()
        self.out.ok("the main VM's certificate: %s" % res)
        env = stack.worker_env(self.o, m.state, _read_secrets(m.d), self.entry,
                               self.wanted_images(), self.facts["docker_gid"])
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "env"
            local.write_text(env)
            os.chmod(local, 0o600)
            remote = self.r.put_private(local, "env")
        res = self.r.stdout(cmd.install_uploaded(remote, self.dir + "/.env", "0600"),
                            what="writing the worker's .env").strip()
        self.out.ok(".env: %s (worker %s, queues %s, %d slots)"
                    % (res, self.entry["name"], ",".join(self.entry["queues"]),
                       self.entry["slots"]))

    def run_worker(self, bundle_path=None, manifest=None):
        self.install_docker()
        self.upload_stack()
        self.configure()
        self.images(bundle_path, manifest)
        self.start()
        self.wait_healthy()


def _entry(name, queues, slots, gpus, facts, host):
    cores = int(facts.get("cores") or 1)
    return {"name": name, "host": host, "queues": queues, "slots": int(slots) or cores,
            "cpu": cores, "memory": int(int(facts.get("mem_kb") or 0) / 1024),
            "gpu": int(gpus),
            "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _queues(queue):
    queues = [q.strip() for q in (queue or "default").split(",") if q.strip()]
    bad = [q for q in queues if not _QUEUE_RE.match(q)]
    if bad:
        raise DeployError("--queue %s: a queue name is letters, digits, '.', '_' or '-'"
                          % ",".join(bad), "e.g. --queue gpu (or --queue default,gpu)")
    return queues


@task(help=dict(COMMON_HELP, **{
    "main": "the main VM (as for fab -H): the worker takes its tasks",
    "queue": "queues this worker serves, comma-separated (default: default, i.e. any step)",
    "slots": "tasks at a time (default: the worker's CPU cores)",
    "gpus": "GPUs steps may ask for with @resources(gpu=N) (not detected; needs the NVIDIA "
            "container toolkit on the worker)",
    "name": "worker name in Airflow and in task metadata (default: the VM's host name)",
    "bundle": "archive made by `fab bundle`: load its images instead of building them",
}))
@boundary("add-worker")
def add_worker(c, main="", queue="", slots=0, gpus=0, name="", bundle=None, config=None,
               verbose=False):
    """Add the -H VM as a worker of the main VM (Airflow's Edge executor)."""
    _require_host(c, "add-worker")
    out = Out(verbose)
    queues = _queues(queue)
    m = Main(c, main, out, config)
    manifest = bundle_mod.read_manifest(bundle) if bundle else None
    w = WorkerDeployment(Remote(c, out), m.d.o, out, m, None)
    w.preflight()
    name = name or w.r.stdout("hostname -s", as_root=False, what="reading the host name").strip()
    name = name.lower()
    workers = m.d.read_workers()
    if not _NAME_RE.match(name) or name == stack.MAIN_WORKER:
        raise DeployError("worker name %r: use lower-case letters, digits and '-', not %r"
                          % (name, stack.MAIN_WORKER), "give one with --name")
    if name in workers and workers[name]["host"] != w.r.host:
        raise DeployError("a worker named %s already exists (%s)" % (name, workers[name]["host"]),
                          "give this one another --name, or remove that one first")
    w.entry = _entry(name, queues, slots, gpus, w.facts, w.r.host)

    with m.d.lock("fab add-worker %s" % name), w.lock("fab add-worker"):
        out.step("registering worker %s on the main VM %s" % (name, m.r.host))
        m.write_registry(dict(workers, **{name: w.entry}))
        try:
            m.converge(bundle, manifest)
            out.step("worker %s on %s" % (name, w.r.host))
            w.run_worker(bundle, manifest)
            _wait_registered(m, out, name, queues)
        except BaseException:
            out.warn("adding %s failed: taking it out of the main VM's registry again" % name)
            m.write_registry(workers)
            try:
                m.converge(bundle, manifest)
            except Exception as e:  # noqa: BLE001 - the original error matters more
                out.warn("could not converge the main VM back (%s); run fab -H %s deploy"
                         % (e, m.r.host))
            raise
    h = m.r.host
    out.stream.write(
        "\nWorker %s (%s) takes tasks of queue%s %s from %s, %d at a time, in %s.\n"
        "  Route a step to it:  @worker(queue=\"%s\") in the flow, or @resources that only it "
        "can hold\n  Workers and load:    fab -H %s status\n"
        "  Remove it:           fab -H %s remove-worker --main %s\n"
        % (name, w.r.host, "s" if len(queues) > 1 else "", ",".join(queues), h,
           w.entry["slots"], _duration(out.elapsed()), queues[0], h, w.r.host, h))


def _wait_registered(m, out, name, queues):
    out.step("waiting for the main VM's Airflow to list %s" % name)
    t0 = time.time()
    while True:
        found = {x["worker_name"]: x for x in m.edge_workers()}.get(name)
        if found and found["state"] in ("idle", "running"):
            out.ok("%s is %s, queues %s (%s)" % (name, found["state"], found["queues"],
                                                _duration(time.time() - t0)))
            return
        if time.time() - t0 > REGISTER_TIMEOUT:
            raise DeployError("worker %s did not register with the main VM within %s (%s)"
                              % (name, _duration(REGISTER_TIMEOUT),
                                 found["state"] if found else "not listed"),
                              "see the worker's log: fab -H WORKER logs edge-worker")
        time.sleep(3)


@task(help=dict(COMMON_HELP, main="the main VM (as for fab -H)",
                wait="seconds to wait for running tasks to finish (default 600)"))
@boundary("remove-worker")
def remove_worker(c, main="", wait=600, config=None, verbose=False):
    """Drain the -H worker (running tasks finish), stop it, forget it on the main VM.

    A worker that cannot be reached is only forgotten: its running tasks are
    retried elsewhere by Airflow."""
    _require_host(c, "remove-worker")
    out = Out(verbose)
    m = Main(c, main, out, config)
    workers = m.d.read_workers()
    host = Remote.describe(c)
    name = next((n for n, w in workers.items() if w["host"] == host), None)
    if name is None:
        raise DeployError("%s is not a worker of %s (workers: %s)"
                          % (host, m.r.host, ", ".join("%s (%s)" % (n, w["host"])
                                                      for n, w in sorted(workers.items()))
                             or "none"), "check -H and --main")
    w = Remote(c, out)
    with m.d.lock("fab remove-worker %s" % name):
        out.step("draining %s on %s (running tasks finish; up to %ss)" % (name, host, wait))
        reached = True
        try:
            d = Deployment(w, m.d.o, out)
            d.whoami()
            t0 = time.time()
            d.r.run(cmd.compose(m.d.dir, "exec -T edge-worker airflow edge maintenance on "
                                         "--comments %s --wait"
                                % cmd.q("fab remove-worker")),
                    what="draining the edge worker", timeout=int(wait) + 60, warn=True)
            out.ok("drained in %s" % _duration(time.time() - t0))
            # The last tasks' Metaflow metadata goes to the main VM before the
            # worker's volumes go.
            d.r.run(cmd.compose(m.d.dir, "exec -T sync metaflow-services sync --role worker "
                                         "--dags /opt/airflow/dags --once"),
                    what="shipping the last metadata", timeout=300, warn=True)
            # A stop ends the edge worker cleanly: it tells the main VM it is offline.
            d.r.run(cmd.compose(m.d.dir, "down --volumes --remove-orphans"),
                    what="removing the worker's containers", timeout=600)
            d.r.run("rm -f %s/.env" % cmd.q(m.d.dir), what="removing the worker's secrets")
            out.ok("containers, volumes and the worker's .env removed (Docker and its images "
                   "stay)")
        except Exception as e:  # noqa: BLE001 - a dead VM fails in many ways
            reached = False
            out.warn("%s: %s; forgetting it on the main VM only (Airflow retries its running "
                     "tasks elsewhere)" % (host, translate(e, host)[0]))
        out.step("forgetting %s on the main VM %s" % (name, m.r.host))
        m.forget(name)
        rest = {n: x for n, x in workers.items() if n != name}
        m.write_registry(rest)
        m.converge()
    out.stream.write("\nWorker %s removed%s. %s\n" % (
        name, "" if reached else " (it was unreachable: stop it by hand when it is back)",
        "The main VM runs every step itself again (single VM)." if not rest else
        "Workers left: %s." % ", ".join(sorted(rest))))


def edge_workers(d):
    """Airflow's view of the edge workers (from the main VM's scheduler
    container): [{worker_name, state, queues, jobs_active, concurrency,
    free_concurrency, ...}]; [] when it cannot be read."""
    res = d.r.run(cmd.compose(d.dir, "exec -T airflow-scheduler airflow edge list-workers "
                                     "--output json"), what="listing the edge workers", warn=True)
    lines = res.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("["):
            try:
                return json.loads("\n".join(lines[i:]))
            except ValueError:
                continue
    return []


def report(m_deployment, out) -> list:
    """The workers section of `fab status`; returns warnings."""
    d = m_deployment
    if not d.read_workers():
        out.info("none (single VM); add one with fab -H WORKER add-worker --main %s" % d.r.host)
        return []
    listed = {x["worker_name"]: x for x in edge_workers(d)}
    warnings = []
    machines = dict(d.workers, **{stack.MAIN_WORKER: {"host": d.r.host, "queues": ["default"]}})
    for name, w in sorted(machines.items()):
        x = listed.get(name) or {}
        state = x.get("state") or "not registered"
        slots = int(x.get("concurrency") or 0)   # the CLI's JSON has them as text
        load = ("%d/%d slots busy" % (slots - int(x.get("free_concurrency") or 0), slots)
                if slots else "load unknown")
        out.info("%-14s %-28s %-12s queues %-18s %s" % (name, w["host"], state,
                                                         ",".join(w["queues"]), load))
        if state not in ("idle", "running"):
            warnings.append("worker %s (%s) is %s: its queues' tasks wait or go elsewhere; see "
                            "fab -H %s logs edge-worker" % (name, w["host"], state, w["host"]))
    return warnings
