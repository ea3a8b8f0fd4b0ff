"""Flows on a deployment: `fab push-flows`, the flows part of `fab status`,
and `fab tunnel`.

Users' flows live in the dags folder, ``data_dir/dags`` on the VM, next to
plain Airflow DAG files; the stack's flow-watcher compiles them into
``data_dir/dags/.metaflow-services/`` and keeps its verdict per flow in
``state.json`` there (metaflow_services/watcher.py). Everything here reads or
writes that folder; nothing else on the VM.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import ExitStack
from pathlib import Path

from metaflow_services.watcher import defines_flow, package_files

from . import commands as cmd
from .remote import DeployError, Out, Remote

DAGS = "dags"   # the dags folder, under data_dir
STATE_FILE = DAGS + "/.metaflow-services/state.json"


# ---------------------------------------------------------------------------
# What the watcher made of the flows
# ---------------------------------------------------------------------------


def read_state(r: Remote, data_dir) -> dict:
    """{flow path relative to the dags folder: its entry} (empty before the
    watcher's first compile)."""
    text = r.stdout(cmd.read_file("%s/%s" % (data_dir, STATE_FILE)), as_root=False,
                    what="reading the flow-watcher's state")
    if not text.strip():
        return {}
    return json.loads(text).get("flows", {})


def describe(rel, st, airflow_url) -> tuple[bool, str]:
    """(ok, one line, or several for an error) about one flow."""
    if st.get("status") == "ok":
        sched = st.get("schedule") or "no schedule (trigger it in Airflow)"
        return True, "%-34s DAG %s, %s  %s/dags/%s" % (rel, st["dag_id"], sched, airflow_url,
                                                       st["dag_id"])
    if st.get("status") == "error":
        keeps = (" (the last good DAG %s keeps running)" % st["dag_id"]) if st.get("dag_id") else ""
        msg = "\n".join("      " + line for line in (st.get("message") or "").splitlines())
        return False, "%-34s ERROR%s:\n%s" % (rel, keeps, msg)
    return True, "%-34s waiting to be compiled" % rel


def report(out: Out, state: dict, airflow_url, only=None) -> int:
    """Prints one entry per flow; returns the number of flows in error."""
    errors = 0
    for rel in sorted(state):
        if only is not None and rel not in only:
            continue
        ok, text = describe(rel, state[rel], airflow_url)
        (out.info if ok else out.warn)(text)
        errors += not ok
    return errors


# ---------------------------------------------------------------------------
# fab push-flows
# ---------------------------------------------------------------------------


def local_files(folder: Path) -> dict:
    """{relative path: sha256} of the files the flows' code packages are made
    of (the watcher's own selection)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in package_files(folder)}


def remote_files(r: Remote, flows_dir) -> dict:
    text = r.stdout(cmd.file_digests(flows_dir), as_root=False, what="listing the flows on the VM")
    files = {}
    for line in text.splitlines():
        digest, _, path = line.partition("  ")
        if path.startswith("./"):
            files[path[2:]] = digest
    return files


def push(r: Remote, out: Out, folder: Path, data_dir, airflow_url, delete=False, timeout=120):
    folder = folder.expanduser().resolve()
    if not folder.is_dir():
        raise DeployError("no folder %s" % folder, "give the folder holding your flow files")
    flows_dir = "%s/%s" % (data_dir, DAGS)
    local = local_files(folder)
    flow_files = sorted(rel for rel in local if rel.endswith(".py")
                        and defines_flow(folder / rel))
    if not flow_files:
        raise DeployError("no Metaflow flow in %s (no .py file defines a FlowSpec subclass)"
                          % folder, "give the folder holding your flow files")

    out.step("pushing %s to %s:%s" % (folder, r.host, flows_dir))
    remote = remote_files(r, flows_dir)
    changed = sorted(rel for rel, digest in local.items() if remote.get(rel) != digest)
    # --delete removes flows only: the dags folder also holds plain Airflow
    # DAGs and other people's files.
    known = read_state(r, data_dir) if delete else {}
    gone = sorted(rel for rel in set(remote) - set(local) if rel in known)
    t0 = float(r.stdout(cmd.clock(), as_root=False, what="reading the VM's clock"))
    for rel in changed:
        _upload(r, folder / rel, "%s/%s" % (flows_dir, rel))
        out.info("%s %s" % ("updated" if rel in remote else "added  ", rel))
    if gone:
        r.run(cmd.remove_in(flows_dir, gone), as_root=False, what="removing flows")
        for rel in gone:
            out.info("removed %s" % rel)
    if not changed and not gone:
        out.ok("nothing changed on the VM (%d files up to date)" % len(local))
    else:
        out.ok("%d files copied, %d removed, %d unchanged"
               % (len(changed), len(gone), len(local) - len(changed)))

    # The flows whose code package changed: those in a folder with a changed file.
    touched = {os.path.dirname(rel) for rel in changed + gone}
    waiting = [rel for rel in flow_files if os.path.dirname(rel) in touched]
    gone_flows = [rel for rel in gone if rel.endswith(".py")]
    out.step("compiling (the flow-watcher on the VM)")
    state = wait_compiled(r, data_dir, waiting, gone_flows, t0, timeout)
    errors = report(out, state, airflow_url, only=set(flow_files))
    if errors:
        raise DeployError("%d of %d flows do not compile (above)" % (errors, len(flow_files)),
                          "fix them and push again; their last good DAGs keep running")
    out.ok("%d flows compiled; Airflow shows them within seconds: %s/dags"
           % (len(flow_files), airflow_url))


def _upload(r: Remote, local: Path, remote_path):
    """Into a temporary name, then renamed: the watcher never sees half a file."""
    parent = os.path.dirname(remote_path)
    tmp = "%s/.%s.push-%d" % (parent, os.path.basename(remote_path), os.getpid())
    try:
        r.run(cmd.make_dirs(parent), as_root=False, what="creating %s" % parent)
        r.put_file(local, tmp)
        r.run(cmd.publish_upload(tmp, remote_path), as_root=False,
              what="moving %s into place" % remote_path)
    except (DeployError, PermissionError, OSError) as e:
        raise DeployError("cannot write %s on %s: %s" % (remote_path, r.host, getattr(e, "what", e)),
                          "the login user must be in the group metaflow (the deploy adds its "
                          "own login user; add others with: usermod -aG metaflow USER)")


def wait_compiled(r: Remote, data_dir, waiting, gone, since, timeout):
    """Polls the watcher's state until each flow in *waiting* was compiled
    (or failed) after *since* and each in *gone* has left it."""
    deadline = time.time() + timeout
    while True:
        state = read_state(r, data_dir)
        pending = [rel for rel in waiting if (state.get(rel) or {}).get("checked_at", 0) < since]
        pending += [rel for rel in gone if rel in state]
        if not pending:
            return state
        if time.time() > deadline:
            raise DeployError("the flow-watcher did not pick up %s within %d s"
                              % (", ".join(pending), timeout),
                              "check it: fab logs -s flow-watcher")
        time.sleep(1)


# ---------------------------------------------------------------------------
# fab tunnel
# ---------------------------------------------------------------------------

TUNNEL_OFFSET = 10000  # local port = the VM's port + this: no root needed locally


def tunnel_ports(state: dict, offset=TUNNEL_OFFSET) -> list:
    """[(what, local port, VM port)] for every entry point the proxy publishes."""
    ports = [("Airflow UI and REST API", state["ports"]["https"])]
    if state.get("metaflow_services"):
        ports.append(("Metaflow UI and metadata API", state["ports"]["metaflow"]))
    ports.append(("S3 endpoint", state["ports"]["s3"]))
    return [(what, port + offset, port) for what, port in ports]


def tunnel_url(port):
    return "https://localhost:%d" % port


def forward(c, out: Out, ports, seconds=0):
    """Forwards each (local port -> the VM's loopback port) over the SSH
    connection until interrupted (or for *seconds*, for scripts)."""
    with ExitStack() as stack:
        for what, local, remote in ports:
            stack.enter_context(c.forward_local(local, remote_port=remote,
                                                remote_host="127.0.0.1",
                                                local_host="127.0.0.1"))
            out.info("%-30s %s" % (what, tunnel_url(local)))
        out.ok("tunnel open; Ctrl-C closes it. A laptop profile for it: "
               "fab -H %s client-config --tunnel" % Remote.describe(c))
        t_end = time.time() + seconds if seconds else None
        try:
            while t_end is None or time.time() < t_end:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
