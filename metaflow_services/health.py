"""`metaflow-services doctor`: health checks of a deployed stack, its smoke test.

They run where the task runtime runs, in the Airflow scheduler container,
whose environment has everything they need (docs/configuration.md): the
database URL, the object store's endpoint and keys, the metadata service's
URL, the Docker socket. Entry point: ``metaflow-services doctor``, used

* by ``fab deploy`` (``--ensure-bucket``, ``--smoke-test``) and ``fab status``,
* by the dag-processor's and triggerer's container healthchecks (``--job``),
* by an operator on the VM:
  ``docker compose exec airflow-scheduler metaflow-services doctor``,
* and from a workstation, through the entry point a Metaflow profile names:
  ``metaflow-services doctor --profile NAME`` (``workstation_checks``).

The checks live in ``checks`` (inside the stack), ``smoke`` (the smoke test)
and ``workstation`` (through a profile); this module runs the ones asked for
and prints them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

from .airflow_client import AirflowClient
from .checks import (Check, check_airflow, check_database, check_docker,
                     check_metadata, check_metaflow_ui, check_object_store, job_alive, last_runs,
                     one_line)
from .smoke import smoke_test
from .workstation import workstation_checks

CHECKS = {
    "database": check_database,
    "object-store": None,   # takes ensure_bucket
    "metadata": check_metadata,
    "metaflow-ui": check_metaflow_ui,
    "docker": check_docker,
    "airflow": check_airflow,
}


def versions():
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("apache-airflow", "metaflow", "metaflow-services", "docker", "boto3"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def doctor(args) -> int:
    """`metaflow-services doctor`: see cli.py for the arguments."""
    password = os.environ.get("MFS_DOCTOR_AIRFLOW_PASSWORD")
    if args.profile:
        return _print(workstation_checks(args.profile, args.airflow_user, password), args.json)
    if args.job:
        c = job_alive(args.job, args.max_age)
        print(("ok: " if c.ok else "FAILED: ") + c.detail)
        return 0 if c.ok else 1
    if args.versions:
        for k, v in versions().items():
            print("%-18s %s" % (k, v))
        return 0

    results = []
    for name in args.only or list(CHECKS):
        if name == "object-store":
            results.append(check_object_store(ensure_bucket=args.ensure_bucket))
        else:
            results.append(CHECKS[name]())
    if args.last_runs:
        results.append(_last_runs(args.airflow_user, password, args.last_runs))
    if args.smoke_test:
        say = (lambda s: None) if args.json else (lambda s: print(s, flush=True))
        results.append(_smoke_test(args.airflow_user, password, args.timeout, say))
    return _print(results, args.json)


def _last_runs(user, password, limit) -> Check:
    if not password:
        return Check("last-runs", False, "no MFS_DOCTOR_AIRFLOW_PASSWORD given")
    try:
        runs = last_runs(AirflowClient(user, password), limit)
        detail = "; ".join("%s %s %s" % (r["dag_id"], r["dag_run_id"], r["state"])
                           for r in runs) or "no runs yet"
    except Exception as e:  # noqa: BLE001
        return Check("last-runs", False, one_line(e))
    return Check("last-runs", True, detail)


def _smoke_test(user, password, timeout, say) -> Check:
    if not password:
        return Check("smoke-test", False, "no Airflow password given",
                     "set MFS_DOCTOR_AIRFLOW_PASSWORD (fab deploy does)")
    try:
        return smoke_test(user, password, timeout, say)
    except Exception as e:  # noqa: BLE001
        return Check("smoke-test", False, one_line(e), "docker compose logs airflow-scheduler")


def _print(results, as_json=False) -> int:
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        for r in results:
            line = "%s %-13s %s" % ("ok  " if r.ok else "FAIL", r.name, r.detail)
            if not r.ok and r.fix:
                line += "  (what to do: %s)" % r.fix
            print(line)
    return 0 if all(r.ok for r in results) else 1
