"""Worker VMs: add-worker, remove-worker and the workers section of
`fab status` (docs/workers.md).

A worker VM runs Airflow's edge worker (compose/worker.yaml): it takes the
tasks of its queues from the main VM's Edge executor over HTTPS, through the
main VM's proxy, and runs the Metaflow steps in containers as the main VM
does. The main VM keeps a registry of its workers (install_dir/
state/workers.json); with at least one worker, its deploy switches Airflow to
the Edge executor, starts its own edge worker for the "default" queue and the
worker-sync service, and publishes the queues (MFS_WORKER_QUEUES) the compiler
routes steps with. Without workers the stack is exactly the single-VM stack.

add-worker: preflight both VMs (nothing changed), register the worker and
converge the main VM (smoke test through the Edge executor), then the
``WORKER`` steps on the worker VM (Docker, stack files, images, start), and
wait until the main VM's Airflow lists it idle. A failure after the
registration takes it out again, so the main VM never routes to a worker that
is not there.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

from fabric import Connection

from . import commands as cmd
from . import health
from . import packages
from . import stack
from . import steps
from .remote import DeployError, Out, Remote, translate
from .session import DOCKER_ROOT, Session, duration, options

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")
_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
REGISTER_TIMEOUT = 300


def main_session(c, main_host, out: Out, config) -> Session:
    """The main VM, reached from this workstation with the same SSH settings
    as the worker, with its recorded options."""
    if not main_host:
        raise DeployError("--main is missing: the main VM this worker takes tasks from",
                          "fab -H WORKER add-worker --main MAIN_HOST")
    conn = Connection(main_host, config=c.config)
    m = Session(Remote(conn, out), options(conn, config), out)
    m.whoami()
    m.state()
    m.read_workers()
    return m


def converge(m: Session):
    """Re-deploy the main VM with the registry as it now is."""
    m.changed = False
    steps.preflight(m)
    steps.run(m, steps.DEPLOY)


# ---------------------------------------------------------------------------
# The worker VM's own steps
# ---------------------------------------------------------------------------


def worker_preflight(w: Session):
    w.out.step("preflight on worker %s (nothing is changed)" % w.host)
    w.whoami()
    f = w.facts = cmd.parse_facts(w.r.stdout(cmd.facts([DOCKER_ROOT, w.dir], w.o.project),
                                             what="preflight"))
    # A worker publishes no port: only the machine checks apply.
    problems = steps.machine_problems(w.o, f)
    if w.has_record():
        problems.append("%s runs a main stack (%s/state/deploy.json); a worker needs a VM "
                        "of its own" % (w.host, w.dir))
    if problems:
        raise DeployError("preflight refused (nothing was changed): " + "; ".join(problems),
                          "fix the worker VM and run fab add-worker again")
    _preflight_images(w)
    st = w.main.record
    for port, path in ((st["ports"]["https"], "/api/v2/monitor/health"),
                       (st["ports"]["s3"], "/")):
        code = w.r.stdout(cmd.check_proxy(port, path, host=st["public_host"]),
                          what="reaching the main VM", warn=True).strip()
        if code in ("", "000"):
            raise DeployError(
                "preflight refused (nothing was changed): the worker cannot reach the main "
                "VM at https://%s:%d" % (st["public_host"], port),
                "open port %d of the main VM (%s) to the worker, or redeploy the main VM "
                "with --public-host set to an address the worker can reach"
                % (port, st["public_host"]))
    w.out.ok("%s, %s cores, %.1f GB memory; reaches the main VM at https://%s (ports %d, %d)"
             % (f.get("os_name"), f.get("cores"), steps.memory_gb(f), st["public_host"],
                st["ports"]["https"], st["ports"]["s3"]))


def _preflight_images(w: Session):
    """The worker runs the main VM's Airflow and step images (an upgrade may
    have changed them): a bundle without them would fail only after the main
    VM was reconfigured, so it is refused here."""
    if w.bundle_manifest is None:
        return
    wanted = w.wanted_images()
    lacking = steps.bundle_lacks(w, wanted, steps.remote_image_ids(w, wanted.values()))
    if lacking:
        raise DeployError("preflight refused (nothing was changed): the bundle %s lacks %s, "
                          "which the main VM %s runs, and %s does not have them"
                          % (w.bundle_path, ", ".join(lacking), w.main.host, w.host),
                          steps.BUNDLE_LACKS_HINT)


def configure_worker(w: Session):
    w.out.step("worker settings (%s/.env, mode 0600)" % w.dir)
    m = w.main
    if m.record.get("self_signed"):
        ca = m.r.stdout(cmd.read_file(m.dir + "/tls/cert.pem"),
                        what="reading the main VM's certificate")
    else:  # a certificate from a public CA: the system's trust store
        ca = w.r.stdout(cmd.read_file("/etc/ssl/certs/ca-certificates.crt"),
                        what="reading the system's CA certificates")
    res = w.r.stdout(cmd.write_file(w.dir + "/tls/main-ca.pem", ca, "0644"),
                     what="installing the main VM's certificate").strip()
    w.out.ok("the main VM's certificate: %s" % res)
    env = stack.worker_env(w.o, m.record, m.secrets(), w.entry, w.wanted_images(),
                           w.facts["docker_gid"])
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "env"
        local.write_text(env)
        os.chmod(local, 0o600)
        remote = w.r.put_private(local, "env")
    res = w.r.stdout(cmd.install_uploaded(remote, w.dir + "/.env", "0600"),
                     what="writing the worker's .env").strip()
    w.out.ok(".env: %s (worker %s, queues %s, %d slots)"
             % (res, w.entry["name"], ",".join(w.entry["queues"]), w.entry["slots"]))


WORKER = [steps.install_docker, steps.upload_stack, configure_worker, packages.install,
          steps.images, steps.start, health.wait_healthy]


# ---------------------------------------------------------------------------
# add-worker, remove-worker
# ---------------------------------------------------------------------------


def queues_of(queue):
    queues = [q.strip() for q in (queue or "default").split(",") if q.strip()]
    bad = [q for q in queues if not _QUEUE_RE.match(q)]
    if bad:
        raise DeployError("--queue %s: a queue name is letters, digits, '.', '_' or '-'"
                          % ",".join(bad), "e.g. --queue gpu (or --queue default,gpu)")
    return queues


def entry(name, queues, slots, gpus, facts, host):
    cores = int(facts.get("cores") or 1)
    return {"name": name, "host": host, "queues": queues, "slots": int(slots) or cores,
            "cpu": cores, "memory": int(int(facts.get("mem_kb") or 0) / 1024),
            "gpu": int(gpus), "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def add(w: Session, name, queues, slots, gpus):
    """`fab add-worker`: *w* is the worker VM's session, w.main the main's."""
    m = w.main
    worker_preflight(w)
    name = (name or w.r.stdout(cmd.short_hostname(), as_root=False,
                               what="reading the host name").strip()).lower()
    workers = dict(m.workers)
    if not _NAME_RE.match(name) or name == stack.MAIN_WORKER:
        raise DeployError("worker name %r: use lower-case letters, digits and '-', not %r"
                          % (name, stack.MAIN_WORKER), "give one with --name")
    if name in workers and workers[name]["host"] != w.host:
        raise DeployError("a worker named %s already exists (%s)" % (name, workers[name]["host"]),
                          "give this one another --name, or remove that one first")
    w.entry = entry(name, queues, slots, gpus, w.facts, w.host)
    with m.lock("fab add-worker %s" % name), w.lock("fab add-worker"):
        w.out.step("registering worker %s on the main VM %s" % (name, m.host))
        m.write_workers(dict(workers, **{name: w.entry}))
        try:
            converge(m)
            w.out.step("worker %s on %s" % (name, w.host))
            steps.run(w, WORKER)
            wait_registered(m, name)
        except BaseException:
            w.out.warn("adding %s failed: taking it out of the main VM's registry again" % name)
            m.write_workers(workers)
            try:
                converge(m)
            except Exception as e:  # noqa: BLE001 - the original error matters more
                w.out.warn("could not converge the main VM back (%s); run fab -H %s deploy"
                           % (e, m.host))
            raise
    w.out.stream.write(
        "\nWorker %s (%s) takes tasks of queue%s %s from %s, %d at a time, in %s.\n"
        "  Route a step to it:  @worker(queue=\"%s\") in the flow, or @resources that only it "
        "can hold\n  Workers and load:    fab -H %s status\n"
        "  Remove it:           fab -H %s remove-worker --main %s\n"
        % (name, w.host, "s" if len(queues) > 1 else "", ",".join(queues), m.host,
           w.entry["slots"], duration(w.out.elapsed()), queues[0], m.host, w.host, m.host))


def wait_registered(m: Session, name):
    m.out.step("waiting for the main VM's Airflow to list %s" % name)
    t0 = time.time()
    while True:
        found = {x["worker_name"]: x for x in edge_workers(m)}.get(name)
        if found and found["state"] in ("idle", "running"):
            m.out.ok("%s is %s, queues %s (%s)" % (name, found["state"], found["queues"],
                                                  duration(time.time() - t0)))
            return
        if time.time() - t0 > REGISTER_TIMEOUT:
            raise DeployError("worker %s did not register with the main VM within %s (%s)"
                              % (name, duration(REGISTER_TIMEOUT),
                                 found["state"] if found else "not listed"),
                              "see the worker's log: fab -H WORKER logs edge-worker")
        time.sleep(3)


def remove(w: Session, wait):
    """`fab remove-worker`: drain, stop and forget the -H worker; a worker
    that cannot be reached is only forgotten."""
    m = w.main
    name = next((n for n, x in m.workers.items() if x["host"] == w.host), None)
    if name is None:
        raise DeployError("%s is not a worker of %s (workers: %s)"
                          % (w.host, m.host, ", ".join("%s (%s)" % (n, x["host"])
                                                      for n, x in sorted(m.workers.items()))
                             or "none"), "check -H and --main")
    with m.lock("fab remove-worker %s" % name):
        w.out.step("draining %s on %s (running tasks finish; up to %ss)" % (name, w.host, wait))
        reached = True
        try:
            take_down(w, wait)
        except Exception as e:  # noqa: BLE001 - a dead VM fails in many ways
            reached = False
            w.out.warn("%s: %s; forgetting it on the main VM only (Airflow retries its running "
                       "tasks elsewhere)" % (w.host, translate(e, w.host)[0]))
        w.out.step("forgetting %s on the main VM %s" % (name, m.host))
        m.r.run(cmd.airflow_edge(m.dir, "airflow-scheduler", "remove-remote-edge-worker "
                                 "--edge-hostname %s" % cmd.q(name)),
                what="removing %s from Airflow's worker list" % name, warn=True)
        rest = {n: x for n, x in m.workers.items() if n != name}
        m.write_workers(rest)
        converge(m)
    w.out.stream.write("\nWorker %s removed%s. %s\n" % (
        name, "" if reached else " (it was unreachable: stop it by hand when it is back)",
        "The main VM runs every step itself again (single VM)." if not rest else
        "Workers left: %s." % ", ".join(sorted(rest))))


def take_down(w: Session, wait):
    w.whoami()
    t0 = time.time()
    w.r.run(cmd.airflow_edge(w.dir, "edge-worker", "maintenance on --comments %s --wait"
                             % cmd.q("fab remove-worker")),
            what="draining the edge worker", timeout=int(wait) + 60, warn=True)
    w.out.ok("drained in %s" % duration(time.time() - t0))
    # The last tasks' Metaflow metadata goes to the main VM before the
    # worker's volumes go.
    w.r.run(cmd.compose(w.dir, "exec -T sync metaflow-services sync --role worker "
                               "--dags /opt/airflow/dags --once"),
            what="shipping the last metadata", timeout=300, warn=True)
    # A stop ends the edge worker cleanly: it tells the main VM it is offline.
    w.r.run(cmd.compose(w.dir, "down --volumes --remove-orphans"),
            what="removing the worker's containers", timeout=600)
    w.r.run(cmd.remove_files(w.dir + "/.env"), what="removing the worker's secrets")
    w.out.ok("containers, volumes and the worker's .env removed (Docker and its images stay)")


# ---------------------------------------------------------------------------
# What the main VM's Airflow knows of them
# ---------------------------------------------------------------------------


def edge_workers(m: Session):
    """Airflow's view of the edge workers (from the main VM's scheduler
    container): [{worker_name, state, queues, jobs_active, concurrency,
    free_concurrency, ...}]; [] when it cannot be read."""
    res = m.r.run(cmd.airflow_edge(m.dir, "airflow-scheduler", "list-workers --output json"),
                  what="listing the edge workers", warn=True)
    lines = res.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("["):
            try:
                return json.loads("\n".join(lines[i:]))
            except ValueError:
                continue
    return []


def report(m: Session) -> list:
    """The workers section of `fab status`; returns warnings."""
    if not m.read_workers():
        m.out.info("none (single VM); add one with fab -H WORKER add-worker --main %s" % m.host)
        return []
    listed = {x["worker_name"]: x for x in edge_workers(m)}
    warnings = []
    machines = dict(m.workers, **{stack.MAIN_WORKER: {"host": m.host, "queues": ["default"]}})
    for name, x in sorted(machines.items()):
        seen = listed.get(name) or {}
        state = seen.get("state") or "not registered"
        slots = int(seen.get("concurrency") or 0)   # the CLI's JSON has them as text
        load = ("%d/%d slots busy" % (slots - int(seen.get("free_concurrency") or 0), slots)
                if slots else "load unknown")
        m.out.info("%-14s %-28s %-12s queues %-18s %s" % (name, x["host"], state,
                                                           ",".join(x["queues"]), load))
        if state not in ("idle", "running"):
            warnings.append("worker %s (%s) is %s: its queues' tasks wait or go elsewhere; see "
                            "fab -H %s logs edge-worker" % (name, x["host"], state, x["host"]))
    return warnings
