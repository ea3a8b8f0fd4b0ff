"""The ``metaflow-services`` command."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="metaflow-services",
        description="Run Metaflow flows on Airflow 3 on one machine.")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="Compile a Metaflow flow file into an Airflow DAG file.",
                       description="Compile FLOW_FILE into DIR/<dag_id>.py and upload its code "
                                   "package. Same as `python FLOW_FILE airflow3 create DIR`.")
    c.add_argument("flow_file")
    c.add_argument("-o", "--output-dir", default=None,
                   help="Where to write the DAG file (default: $MFS_DAGS_FOLDER, else ./dags).")
    c.add_argument("--tag", action="append", default=[], help="Tag every run (repeatable).")
    c.add_argument("--image", help="Container image for every step of this flow.")
    c.add_argument("--step-image", action="append", default=[], metavar="STEP=IMAGE",
                   help="Container image for one step (repeatable).")
    c.add_argument("--dag-id", help="Airflow DAG id (default: the flow name).")
    c.add_argument("--pool", help="Airflow pool of every task (default: Airflow's default_pool).")
    c.add_argument("--json", action="store_true", help="Print a JSON summary.")
    c.set_defaults(func=cmd_compile)

    _add_doctor_parser(sub)

    from .watcher import add_parser as add_watch_parser

    add_watch_parser(sub)
    from .maintenance import add_parser as add_maintain_parser
    add_maintain_parser(sub)

    from .backup import add_parser as add_backup_parser

    add_backup_parser(sub)
    from .events import add_parser as add_publish_parser

    add_publish_parser(sub)
    from .platform_secrets import add_parser as add_secrets_parser

    add_secrets_parser(sub)
    from .workers import add_parser as add_sync_parser

    add_sync_parser(sub)
    from .local.command import add_parser as add_local_parser

    add_local_parser(sub)

    i = sub.add_parser("images", help="List the step environment images on this host.",
                       description="Images built for @pypi/@conda/requirements.txt step "
                                   "environments, with size and last use. Run it where the "
                                   "Airflow worker runs (the scheduler container).")
    i.add_argument("--json", action="store_true", help="Print JSON.")
    i.set_defaults(func=cmd_images)

    p = sub.add_parser("prune-images", help="Remove environment images no DAG uses.",
                       description="Remove step environment images that no DAG file in "
                                   "DAGS_FOLDER would use with this worker's settings.")
    p.add_argument("--dags-folder", default=os.environ.get("AIRFLOW__CORE__DAGS_FOLDER")
                   or os.environ.get("MFS_DAGS_FOLDER") or "dags")
    p.add_argument("--dry-run", action="store_true", help="Only say what would be removed.")
    p.set_defaults(func=cmd_prune_images)

    args = parser.parse_args(argv)
    return args.func(args)


def cmd_compile(args):
    flow_file = args.flow_file
    if not os.path.isfile(flow_file):
        print("metaflow-services: no such flow file: %s" % flow_file, file=sys.stderr)
        return EXIT_USAGE
    err = syntax_error(flow_file) or user_error()
    if err:
        print("metaflow-services: %s\nRefused: no DAG file written." % err, file=sys.stderr)
        return EXIT_REFUSED
    out = args.output_dir or os.environ.get("MFS_DAGS_FOLDER") or os.path.join(os.getcwd(), "dags")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, os.path.abspath(flow_file), "--no-pylint", "airflow3", "create",
           os.path.abspath(out) + os.sep]
    for t in args.tag:
        cmd += ["--tag", t]
    if args.image:
        cmd += ["--image", args.image]
    for si in args.step_image:
        cmd += ["--step-image", si]
    if args.dag_id:
        cmd += ["--dag-id", args.dag_id]
    if args.pool:
        cmd += ["--pool", args.pool]
    if args.json:
        cmd += ["--json"]
    # @pypi/@conda steps run in prebuilt images: let Metaflow's dependency
    # decorators load without demanding --environment=conda (see
    # metaflow_extensions/metaflow_services/toplevel/prebuilt_environments.py).
    env = dict(os.environ, MFS_PREBUILT_ENVIRONMENTS="1")
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(flow_file)), env=env)
    if proc.returncode != 0:
        print("Refused: %s was not compiled; no DAG file written." % flow_file, file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def _docker_and_settings():
    import docker

    from .config import Settings

    return docker.from_env(), Settings.from_env()


def cmd_images(args):
    import datetime
    import json

    from .images import list_environment_images

    client, settings = _docker_and_settings()
    rows = list_environment_images(client, settings)
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    if not rows:
        print("No step environment images on this host.")
        return EXIT_OK
    print("%-42s %9s  %-19s  %s" % ("IMAGE", "SIZE", "CREATED", "LAST USED"))
    for r in rows:
        used = (datetime.datetime.fromtimestamp(r["last_used"]).strftime("%Y-%m-%d %H:%M")
                if r["last_used"] else "never")
        print("%-42s %7.0fMB  %-19s  %s" % (r["tag"], (r["size_bytes"] or 0) / 1e6,
                                          (r["created"] or "")[:19].replace("T", " "), used))
    return EXIT_OK


def cmd_prune_images(args):
    from .images import list_environment_images, referenced_tags
    from .spec import read_specs

    specs = read_specs(args.dags_folder)
    client, settings = _docker_and_settings()
    keep = referenced_tags(specs, settings)
    removed = 0
    for row in list_environment_images(client, settings):
        if row["tag"] in keep:
            continue
        print("%s %s (%.0f MB)" % ("would remove" if args.dry_run else "removing", row["tag"],
                                   (row["size_bytes"] or 0) / 1e6))
        if not args.dry_run:
            client.images.remove(row["tag"])
        removed += 1
    print("%d image(s) %s; %d in use by the %d DAG(s) in %s." % (
        removed, "to remove" if args.dry_run else "removed", len(keep), len(specs),
        args.dags_folder))
    return EXIT_OK


def user_error():
    """Metaflow refuses to record runs as root, with a message that does not
    say what to do: say it here."""
    user = os.environ.get("METAFLOW_USER") or os.environ.get("USER") or os.environ.get("USERNAME")
    if not user or user == "root":
        return ("Metaflow needs a user name other than root to record runs. Set "
                "METAFLOW_USER (for example METAFLOW_USER=airflow) and compile again.")
    return None


def syntax_error(path):
    """'file:line: message' for a Python syntax error, else None."""
    with open(path, "rb") as f:
        source = f.read()
    try:
        compile(source, path, "exec")
    except SyntaxError as e:
        return "%s:%s: syntax error: %s" % (path, e.lineno, e.msg)
    return None


# ---------------------------------------------------------------------------
# `doctor`: health checks of a deployed stack (metaflow_services/health.py).
# Runs inside the Airflow scheduler container, where the task runtime's
# environment is; used by `fab deploy`, `fab status` and container healthchecks.
# ---------------------------------------------------------------------------


def _add_doctor_parser(sub):
    d = sub.add_parser(
        "doctor", help="Check a deployed stack (run it in the Airflow scheduler container).",
        description="Check the database, the object store, the metadata service, the Docker "
                    "engine and Airflow, as the task runtime sees them. Exit code 1 if any "
                    "check fails.")
    d.add_argument("--only", action="append", default=[],
                   choices=["database", "object-store", "metadata", "metaflow-ui", "docker",
                            "airflow"],
                   help="Run only this check (repeatable).")
    d.add_argument("--ensure-bucket", action="store_true",
                   help="Create the object store's bucket if it is missing.")
    d.add_argument("--smoke-test", action="store_true",
                   help="Compile a hello flow into the dags folder, run it through Airflow and "
                        "check its artifacts (the Airflow password comes from "
                        "$MFS_DOCTOR_AIRFLOW_PASSWORD).")
    d.add_argument("--airflow-user", default="admin", help="Airflow user for --smoke-test and "
                                                           "--last-runs.")
    d.add_argument("--timeout", type=int, default=600, help="Seconds the smoke test's run may take.")
    d.add_argument("--last-runs", type=int, default=0, metavar="N",
                   help="Also list the N most recent DAG runs.")
    d.add_argument("--versions", action="store_true", help="Print the versions installed here.")
    d.add_argument("--job", metavar="JOB_TYPE",
                   help="Only check that this container's Airflow job (e.g. DagProcessorJob) "
                        "heartbeats (a container healthcheck).")
    d.add_argument("--max-age", type=int, default=90,
                   help="With --job: the oldest acceptable heartbeat, in seconds.")
    d.add_argument("--profile", metavar="NAME",
                   help="From a workstation: check the deployment this Metaflow profile (written "
                        "by `fab client-config --name NAME`) points at: the Airflow API (and "
                        "login, with $MFS_DOCTOR_AIRFLOW_PASSWORD), the object store with the "
                        "profile's keys, the metadata API with its key, and that each entry "
                        "point refuses requests without credentials.")
    d.add_argument("--json", action="store_true", help="Print the results as JSON.")
    d.set_defaults(func=cmd_doctor)


def cmd_doctor(args):
    from .health import doctor

    return doctor(args)


if __name__ == "__main__":
    sys.exit(main())
