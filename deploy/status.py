"""`fab status`: every service's state, versions, disk, backups, workers,
flows and health, with the warnings that need the user at the end."""

from __future__ import annotations

from . import backups
from . import commands as cmd
from . import flows as flows_mod
from . import health
from . import packages
from . import workers
from .session import DOCKER_ROOT, Session

LOW_DISK_PERCENT, LOW_DISK_GB = 90, 5


def report(s: Session) -> bool:
    """Prints the report; True when every health check passed."""
    st, o = s.record, s.o
    services(s)
    s.out.step("versions")
    for role, ref in sorted(st["images"].items()):
        s.out.info("%-12s %s" % (role, ref))
    res = s.r.run(cmd.scheduler_exec(s.dir, "doctor --versions"), what="reading versions",
                  warn=True)
    for line in res.stdout.strip().splitlines():
        s.out.info(line)
    s.out.step("disk")
    warnings = disk(s)
    s.out.step("backups")
    warnings += backups.report(s)
    warnings += backups.held_warning(s)
    s.out.step("workers")
    warnings += workers.report(s)
    s.out.step("packages of step environments (@pypi, @conda)")
    warnings += packages.report(s)
    s.out.step("flows in the dags folder %s/dags (compiled by the flow-watcher)" % o.data_dir)
    flows = flows_mod.read_state(s.r, o.data_dir)
    if flows:
        flows_mod.report(s.out, flows, o.airflow_url)
    else:
        s.out.info("none yet: drop flow files into the dags folder %s/dags, or fab -H %s "
                   "push-flows DIR" % (o.data_dir, s.host))
    s.out.step("health and last runs")
    admin = next(u for u, role in st["airflow_users"].items() if role == "admin")
    healthy = health.report(s, admin)
    if not healthy:
        warnings.append("some health checks failed (above)")
    if warnings:
        s.out.step("warnings")
        for w in warnings:
            s.out.warn(w)
    return healthy


def services(s: Session):
    st = s.record
    s.out.step("services on %s (deployed %s by %s)" % (s.host, st["deployed_at"], st["by"]))
    containers = cmd.parse_containers(s.r.stdout(cmd.project_containers(s.o.project),
                                                 what="listing containers"))
    memory = cmd.parse_memory(s.r.run(cmd.container_memory(s.o.project),
                                      what="reading memory use", warn=True).stdout)
    s.out.info("%-24s %-22s %-10s %s" % ("service", "state", "memory", "since"))
    for ct in sorted(containers, key=lambda x: x["service"]):
        state = ct["state"] + ("" if ct["health"] == "none" else " (%s)" % ct["health"])
        if ct["state"] == "exited":
            state += " exit %d" % ct["exit_code"]
        s.out.info("%-24s %-22s %-10s %s" % (ct["service"], state, memory.get(ct["id"], "-"),
                                             ct["started_at"][:19]))


def disk(s: Session) -> list:
    paths = [DOCKER_ROOT, s.o.data_dir, s.o.backup.dir]
    for line in s.r.stdout(cmd.disk_usage(paths), what="reading disk use").strip().splitlines():
        s.out.info(line)
    return disk_warnings(s.r.stdout(cmd.disk_free(paths), what="reading disk use"))


def disk_warnings(df_text):
    """`df -P -k` lines -> a warning per file system that is nearly full."""
    warnings, seen = [], set()
    for line in df_text.strip().splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[5] in seen:
            continue
        seen.add(parts[5])
        used_pct, avail_gb = int(parts[4].rstrip("%")), int(parts[3]) / 1024 / 1024
        if used_pct >= LOW_DISK_PERCENT or avail_gb < LOW_DISK_GB:
            warnings.append("low disk on %s: %d%% used, %.1f GB free (task logs, images and "
                            "backups grow there: fab prune-images, lower retention.* or "
                            "backup.keep, or grow the disk)" % (parts[5], used_pct, avail_gb))
    return warnings
