"""`metaflow-services local up | down | status | env`: the parser and thin
adapters over LocalStack (stack.py), which does the work."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import threading
import time

from ..errors import ExitCode, ServicesError
from .stack import DEFAULT_PORTS, PORT_OPTIONS, LocalStack, default_dir


def add_parser(sub):
    p = sub.add_parser(
        "local", help="Run the platform on this machine, without a VM (like Airflow's standalone).",
        description="PostgreSQL, SeaweedFS (S3) and Airflow 3 (and optionally the Metaflow "
                    "metadata service) as background processes on 127.0.0.1, with their data, "
                    "logs and secrets in one folder.")
    verbs = p.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="Start the stack in the background and print where it runs.")
    _add_dir(up)
    up.add_argument("--metadata-service", action="store_true", default=None,
                    help="Also run the Metaflow metadata service and UI backend (Docker "
                         "containers of --metadata-image).")
    up.add_argument("--no-metadata-service", dest="metadata_service", action="store_false",
                    help="Record runs in Metaflow's local metadata folder (the default).")
    up.add_argument("--metadata-image", help="Image of metaflow-service (default mfs-metadata:test,"
                                             " built by scripts/prepare).")
    up.add_argument("--executor", choices=["subprocess", "docker"],
                    help="How tasks run their step (default: subprocess, kept from the last up).")
    up.add_argument("--step-image", help="Image of the docker executor (default mfs-step:test).")
    up.add_argument("--user", help="METAFLOW_USER of the runs (default: yours; "
                                   "metaflow-services for root).")
    for name, default in DEFAULT_PORTS.items():
        up.add_argument(PORT_OPTIONS[name], type=int, dest="port_" + name.replace("-", "_"),
                        metavar="PORT", help="default %d (0: any free port); kept in the folder"
                                             % default)
    up.set_defaults(func=cmd_up)
    down = verbs.add_parser("down", help="Stop everything `local up` started (idempotent).")
    _add_dir(down)
    down.add_argument("--purge", action="store_true",
                      help="Also delete the folder: data, logs, secrets.")
    down.set_defaults(func=cmd_down)
    st = verbs.add_parser("status", help="Each process, whether it runs and whether it answers.")
    _add_dir(st)
    st.add_argument("--json", action="store_true", help="Print JSON.")
    st.set_defaults(func=cmd_status)
    env = verbs.add_parser("env", help="Print the exports a Metaflow client needs "
                                       "(eval \"$(metaflow-services local env)\").")
    _add_dir(env)
    env.set_defaults(func=cmd_env)


def _add_dir(p):
    p.add_argument("--dir", default=None, help="The stack's folder (default: $MFS_LOCAL_DIR, "
                                                "else %s)" % default_dir())


def _stack(args):
    return LocalStack(args.dir or default_dir())


def _boundary(fn):
    """One line for a failure the user can act on, its exit code."""
    def run(args):
        try:
            return fn(args)
        except ServicesError as e:
            print("metaflow-services local %s: %s" % (args.verb, e.line()), file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("\ninterrupted: `metaflow-services local down` stops what started",
                  file=sys.stderr)
            return ExitCode.INTERRUPTED
    return run


@contextlib.contextmanager
def progress(what):
    """A heading, a line every 15 s while it takes, then the time it took."""
    print("==> %s" % what, flush=True)
    t0, done = time.time(), threading.Event()

    def tick():
        while not done.wait(15):
            print("    ... %.0f s" % (time.time() - t0), flush=True)
    threading.Thread(target=tick, daemon=True).start()
    try:
        yield
    finally:
        done.set()
    print("    ok (%.1f s)" % (time.time() - t0), flush=True)


@_boundary
def cmd_up(args):
    stack = _stack(args)
    running, expected = stack.running(), stack.expected()
    if running and set(expected) <= set(running):
        print("The local stack in %s is already running." % stack.dir)
        print_summary(stack)
        return ExitCode.OK
    if running:
        print("Parts of the stack in %s had stopped (running: %s); restarting it."
              % (stack.dir, ", ".join(running)))
        stack.stop(_say)
    ports = {name: getattr(args, "port_" + name.replace("-", "_")) for name in DEFAULT_PORTS}
    stack.configure(ports=ports, executor=args.executor, step_image=args.step_image,
                    metadata_service=args.metadata_service, metadata_image=args.metadata_image,
                    user=args.user)
    stack.preflight()
    stack.save()
    t0 = time.time()
    stack.start(progress)
    print("\nThe local stack is up (%.0f s), in %s:" % (time.time() - t0, stack.dir))
    print_summary(stack)
    return ExitCode.OK


def print_summary(stack):
    s, p, d = stack.settings, stack.settings["ports"], stack.dir
    rows = [
        ("Airflow", "http://127.0.0.1:%d  user admin, password in %s"
         % (p["airflow"], stack.password_file)),
        ("dags folder", "%s  (metaflow-services compile FLOW.py -o %s)" % (d / "dags", d / "dags")),
        ("S3 (SeaweedFS)", "http://127.0.0.1:%d  bucket metaflow" % p["s3"]),
        ("PostgreSQL", "127.0.0.1:%d  user postgres (trust, loopback only)" % p["postgres"]),
    ]
    if s["metadata_service"]:
        rows.append(("metadata service", "http://127.0.0.1:%d  (UI backend http://127.0.0.1:%d"
                     "/api)" % (p["metadata"], p["ui-backend"])))
    else:
        rows.append(("Metaflow metadata", "local, in %s" % stack.mflocal))
    rows.append(("steps run", "%s executor%s" % (s["executor"], " (image %s)" % s["step_image"]
                                                 if s["executor"] == "docker" else "")))
    rows.append(("logs", "%s/{postgres,seaweedfs,airflow}/*.log" % d))
    for k, v in rows:
        print("  %-18s %s" % (k, v))
    print("\nUse it from a shell (Metaflow client, compile):\n  . %s\n"
          "  (or: eval \"$(metaflow-services local env%s)\")" % (stack.env_file, _dir_arg(stack)))
    print("Check it: metaflow-services local status%s\nStop it:  metaflow-services local down%s"
          % (_dir_arg(stack), _dir_arg(stack)))


def _dir_arg(stack):
    return "" if stack.dir == default_dir().expanduser().resolve() else " --dir %s" % stack.dir


def _say(msg):
    print("  " + msg, flush=True)


@_boundary
def cmd_down(args):
    stack = _stack(args)
    if not stack.dir.exists():
        print("Nothing to stop: no local stack in %s." % stack.dir)
        return ExitCode.OK
    said = []
    stack.stop(lambda msg: (said.append(msg), _say(msg)))
    left = stack.running()
    if left:
        raise ServicesError("still running after down: %s" % ", ".join(left),
                            "see metaflow-services local status%s" % _dir_arg(stack))
    print("The local stack in %s is stopped%s." % (
        stack.dir, "" if said else " (nothing was running)"))
    if args.purge:
        shutil.rmtree(stack.dir)
        print("Deleted %s." % stack.dir)
    return ExitCode.OK


@_boundary
def cmd_status(args):
    stack = _stack(args)
    if not stack.settings:
        print("No local stack in %s (metaflow-services local up%s starts one)."
              % (stack.dir, _dir_arg(stack)))
        return ExitCode.FAILED
    rows = stack.status()
    if args.json:
        print(json.dumps({"dir": str(stack.dir), "services": rows}, indent=1))
    else:
        print("Local stack in %s" % stack.dir)
        print("  %-22s %-8s %-9s %-8s %s" % ("SERVICE", "PID", "RUNNING", "ANSWERS", "ADDRESS"))
        for r in rows:
            pid = r["pid"] if isinstance(r["pid"], int) else "-" if r["pid"] is None else "ctr"
            print("  %-22s %-8s %-9s %-8s %s" % (r["name"], pid, "yes" if r["running"] else "no",
                                               "yes" if r["answers"] else "no", r["address"]))
    return ExitCode.OK if all(r["running"] and r["answers"] for r in rows) else ExitCode.FAILED


@_boundary
def cmd_env(args):
    stack = _stack(args)
    if not stack.env_file.exists():
        raise ServicesError("no local stack in %s" % stack.dir,
                            "start one with metaflow-services local up%s" % _dir_arg(stack))
    print(stack.env_file.read_text(), end="")
    return ExitCode.OK
