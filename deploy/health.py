"""Whether a deployment works, in one place: the containers' health, the
proxy, the bucket, the smoke test and the health section of `fab status`.

The checks that run inside the stack (the object store, Airflow, the metadata
service, the smoke flow) are `metaflow-services doctor` in the scheduler
container (metaflow_services/health.py); this module runs it and waits.
"""

from __future__ import annotations

import json
import time

from . import commands as cmd
from . import stack
from .remote import DeployError
from .session import Session, duration

POLL_SECONDS = 3


def pending(svcs, containers):
    """({service: what it waits for}, [(service, failure)])."""
    by = {}
    for c in containers:
        by.setdefault(c["service"], []).append(c)
    waiting, failed = {}, []
    for name, svc in svcs.items():
        cs = by.get(name)
        if not cs:
            waiting[name] = "no container yet"
            continue
        c = cs[0]
        if svc.one_shot:
            if c["state"] != "exited":
                waiting[name] = c["state"]
            elif c["exit_code"] != 0:
                failed.append((name, "failed (exit code %d)" % c["exit_code"]))
        elif c["state"] != "running":
            waiting[name] = c["state"]
        elif c["health"] not in ("healthy", "none"):
            waiting[name] = c["health"]
    return waiting, failed


def wait_healthy(s: Session, timeout=None):
    s.out.step("waiting for every service to be healthy")
    timeout = timeout or s.o.health_timeout
    svcs = s.services()
    t0 = time.time()
    last_report = ("", 0)
    while True:
        containers = cmd.parse_containers(s.r.stdout(cmd.project_containers(s.o.project),
                                                     what="reading container states"))
        waiting, failed = pending(svcs, containers)
        if failed:
            name, why = failed[0]
            raise DeployError("%s %s" % (name, why),
                              "see its log: fab -H %s logs %s" % (s.host, name))
        elapsed = time.time() - t0
        if not waiting:
            s.out.ok("%d services healthy (%s)" % (len(svcs), duration(elapsed)))
            return
        desc = ", ".join("%s (%s)" % kv for kv in sorted(waiting.items()))
        if desc != last_report[0] or elapsed - last_report[1] >= 30:
            s.out.info("%3ds  %d/%d ready; waiting for %s" % (
                elapsed, len(svcs) - len(waiting), len(svcs), desc))
            last_report = (desc, elapsed)
        if elapsed > timeout:
            raise DeployError("not healthy after %s: %s" % (duration(timeout), desc),
                              "see their logs: fab -H %s logs %s" % (s.host, sorted(waiting)[0]))
        time.sleep(POLL_SECONDS)


def check_proxy(s: Session):
    code = s.r.stdout(cmd.check_proxy(s.o.ports.https, "/api/v2/monitor/health"),
                      what="checking the proxy", warn=True).strip()
    if code != "200":
        raise DeployError("the proxy does not serve Airflow on port %d (HTTP %s)"
                          % (s.o.ports.https, code or "no answer"),
                          "see: fab -H %s logs proxy" % s.host)
    s.out.ok("the proxy answers on https://%s:%d (Airflow: HTTP 200)"
             % (s.o.public_host, s.o.ports.https))


def bucket(s: Session):
    s.out.step("bucket %s" % s.o.bucket)
    res = s.r.run(cmd.scheduler_exec(s.dir, "doctor --ensure-bucket --only object-store --json"),
                  what="creating the bucket", warn=True)
    try:
        check = json.loads(res.stdout)[0]
    except (ValueError, IndexError, KeyError):
        raise DeployError("checking the bucket failed: %s"
                          % (res.stderr or res.stdout).strip()[-300:],
                          "see: fab -H %s logs airflow-scheduler" % s.host)
    if not check["ok"]:
        raise DeployError(check["detail"], check.get("fix") or "")
    s.out.ok(check["detail"])


def smoke_test(s: Session):
    """A hello flow compiled, run through Airflow and checked, when the
    stack changed (or a smoke test is still pending, or always)."""
    mode = "always" if s.always_smoke_test else s.o.smoke_test
    due = s.changed or s.r.stdout(cmd.smoke_pending(s.dir, "get"),
                                  what="reading the smoke test state").strip() == "yes"
    if mode == "never" or (mode == "on-change" and not due):
        s.out.step("smoke test")
        s.out.ok("skipped (%s; --smoke-test always forces it)"
                 % ("nothing changed" if mode == "on-change" else "smoke_test: never"))
        return
    s.out.step("smoke test: a hello flow compiled, run through Airflow, checked")
    admin = s.o.admin_user
    t0 = time.time()
    s.r.run(cmd.scheduler_exec(s.dir, "doctor --smoke-test --airflow-user %s" % admin,
                               password_var=stack.airflow_password_var(admin)),
            hide=False, what="the smoke test", timeout=1200)
    s.r.run(cmd.smoke_pending(s.dir, "clear"), what="recording the smoke test")
    s.out.ok("passed in %s" % duration(time.time() - t0))


def report(s: Session, admin, last_runs=5) -> bool:
    """The health section of `fab status`: doctor's checks and the last
    runs, printed; True when every check passed."""
    res = s.r.run(cmd.scheduler_exec(s.dir, "doctor --last-runs %d --airflow-user %s"
                                     % (last_runs, admin),
                                     password_var=stack.airflow_password_var(admin)),
                  what="checking health", warn=True)
    for line in (res.stdout + res.stderr).strip().splitlines():
        s.out.info(line)
    return res.exited == 0
