"""`fab secrets.set|list|delete NAME`: the platform's secrets for @secrets.

The values are read on the workstation (standard input, or hidden prompts on
a terminal), checked there, uploaded over SFTP into a folder only the login
user can read and fed to `metaflow-services secrets set` in the scheduler
container on its standard input, so they are on no command line and in no
log; the upload is removed whatever happens. The scheduler stores them as an
Airflow Variable, encrypted with the deployment's Fernet key
(metaflow_services/platform_secrets.py).
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import tempfile

from metaflow_services.platform_secrets import SecretsError, check_name, parse_values

from . import commands as cmd
from .remote import DeployError

WHAT = "the platform's secrets (in the scheduler container)"


def run(s, action, name):
    """action: set | list | delete (the tasks fab secrets.ACTION)."""
    if action == "list":
        return show(s)
    try:
        check_name(name or "")
    except SecretsError as e:
        raise DeployError("fab secrets.%s: %s" % (action, e), "nothing was changed on the VM")
    if action == "set":
        return put(s, name, read_values(name))
    return delete(s, name)


def read_values(name, stdin=None):
    """KEY=VALUE lines or a JSON object: piped in, or typed at hidden prompts."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        print("Secret %s: type KEY=VALUE lines (hidden), an empty line to finish." % name)
        lines = []
        while True:
            line = getpass.getpass("  KEY=VALUE: ")
            if not line:
                break
            lines.append(line)
        text = "\n".join(lines)
    else:
        text = stdin.read()
    try:
        return parse_values(text, name)
    except SecretsError as e:
        raise DeployError("fab secrets.set %s: %s" % (name, e), "nothing was changed on the VM")


def put(s, name, values):
    s.out.step("setting the platform secret %s" % name)
    fd, local = tempfile.mkstemp(prefix="mfs-secret-")  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(values, f)
        remote = s.r.put_private(local, "secret.json")
    finally:
        os.unlink(local)
    try:
        _scheduler(s, "secrets set %s" % name, stdin=remote)
    finally:
        s.r.run(cmd.remove_upload(remote), as_root=False, warn=True)
    s.out.ok("%s holds %s (encrypted in Airflow's database)" % (name, ", ".join(sorted(values))))
    s.out.stream.write(
        "Steps get it with @secrets(sources=[%r]): those variables are set in the step, on the "
        "main VM and on workers. Tasks that start from now on read the new value.\n" % name)


def show(s):
    text = _scheduler(s, "secrets list")
    rows = [line.split("\t", 1) for line in text.splitlines() if "\t" in line]
    if not rows:
        s.out.stream.write("No platform secrets yet: fab -H HOST secrets.set NAME < values.env\n")
        return
    width = max(len(r[0]) for r in rows)
    for secret, keys in rows:
        s.out.stream.write("%-*s  %s\n" % (width, secret, keys.replace(",", ", ")))


def delete(s, name):
    out = _scheduler(s, "secrets delete %s" % name, warn=True)
    if out is None:
        raise DeployError("no platform secret %s on %s" % (name, s.host),
                          "fab -H HOST secrets.list shows those that are set")
    s.out.ok("deleted the platform secret %s; steps that name it now fail until it is set "
             "again" % name)


def _scheduler(s, args, stdin=None, warn=False):
    res = s.r.run(cmd.scheduler_exec(s.dir, args, stdin=stdin), what=WHAT, warn=True)
    if res.exited == 0:
        return res.stdout
    err = (res.stderr or "") + (res.stdout or "")
    if "is not running" in err or "no container" in err.lower():
        raise DeployError("the scheduler is not running on %s" % s.host,
                          "start the stack: fab -H HOST start")
    if warn and res.exited == 1:
        return None
    raise DeployError("%s failed (exit %d): %s" % (WHAT, res.exited, err.strip()[-400:]),
                      "run again with --verbose")
