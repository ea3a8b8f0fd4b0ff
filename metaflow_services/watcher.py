"""Watch a folder of Metaflow flows and keep Airflow's dags folder in step.

A flow is a ``.py`` file in the flows folder (or a subfolder) that defines a
``FlowSpec`` subclass. Its code package is its folder, so helper modules next
to it are part of it: a change to any file in that folder recompiles the flows
there. Per flow, after its files have stopped changing for ``settle`` seconds:

- new or changed: compiled with ``metaflow-services compile`` (code package
  uploaded, DAG file written atomically);
- compile fails: the last good DAG keeps running, and an *error DAG file*
  ``<stem>.compile_error.py`` makes the message show up in Airflow as an
  import error for that flow (it is removed once the flow compiles again);
- removed: its DAG file (and error file) are deleted; Airflow keeps the runs.

State (one entry per flow: DAG id, status, message, times) is kept in
``<dags>/.metaflow-services/state.json`` for ``fab status``/``push-flows``.
Polling (not inotify) so it works on bind mounts and network folders; a scan of
a few hundred files costs well under a millisecond of CPU per second.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .spec import write_atomic

log = logging.getLogger("metaflow_services.watcher")

# Files that make up a flow's code package (Metaflow's default suffixes plus
# what flows commonly read next to them).
PACKAGE_SUFFIXES = (".py", ".txt", ".json", ".yaml", ".yml", ".toml", ".cfg", ".sql", ".csv")
ERROR_SUFFIX = ".compile_error.py"
STATE_DIR = ".metaflow-services"


@dataclass
class FlowState:
    path: str                 # relative to the flows folder
    digest: str = ""          # of the flow's folder when last compiled (or tried)
    dag_id: str | None = None
    dag_file: str | None = None
    status: str = "new"       # ok | error | new
    message: str = ""
    compiled_at: float | None = None   # last successful compile
    checked_at: float | None = None    # last compile attempt (ok or not)
    user: str | None = None            # METAFLOW_USER of its runs: the file's owner
    schedule: str | None = None
    attempts: int = 0


@dataclass
class Watcher:
    flows: Path
    dags: Path
    settle: float = 2.0
    compile_args: list = field(default_factory=list)
    # A passwd file naming the owners of flow files (in a container, the
    # host's /etc/passwd mounted read-only): runs are then recorded under the
    # user who dropped the flow. Without it (or for unknown uids) the
    # watcher's own METAFLOW_USER is used.
    passwd: Path | None = None
    # Runs of flows saved by root (how most people reach a fresh VM: `fab -H
    # root@vm push-flows`, scp as root) or by a uid the passwd file does not
    # name are recorded under this user (`watch` passes its own
    # METAFLOW_USER); Metaflow refuses to record runs as root.
    default_user: str | None = None
    heartbeat: Path | None = None      # touched after every scan (healthcheck)
    state: dict = field(default_factory=dict)   # rel path -> FlowState
    _pending: dict = field(default_factory=dict)  # rel path -> (digest, first seen unchanged at)
    _is_flow: dict = field(default_factory=dict)  # path -> ((mtime_ns, size), defines a flow)

    def __post_init__(self):
        self.flows = Path(self.flows)
        self.dags = Path(self.dags)
        self.state_file = self.dags / STATE_DIR / "state.json"
        self._load()

    # -- the loop -------------------------------------------------------------

    def run_forever(self, interval=1.0):
        log.info("Watching %s for Metaflow flows; DAGs go to %s.", self.flows, self.dags)
        while True:
            self.poll()
            if self.heartbeat:
                self.heartbeat.touch()
            time.sleep(interval)

    def poll(self, now=None):
        """One scan: compile what settled, remove what disappeared. Returns
        the flows compiled (or failed) in this scan."""
        now = time.time() if now is None else now
        found = self.scan()
        done = []
        for rel in sorted(set(self.state) - set(found)):
            self._remove(rel)
        for rel, digest in found.items():
            st = self.state.get(rel)
            if st is not None and st.digest == digest:
                self._pending.pop(rel, None)
                continue
            pending = self._pending.get(rel)
            if pending is None or pending[0] != digest:
                self._pending[rel] = (digest, now)  # changed: wait until it settles
                continue
            if now - pending[1] < self.settle:
                continue
            self._pending.pop(rel, None)
            done.append(self._compile(rel, digest))
        return done

    # -- finding flows ----------------------------------------------------------

    def scan(self):
        """{flow file relative path: digest of its folder's package files}."""
        flows = {}
        folder_digests = {}
        for dirpath, dirnames, filenames in os.walk(self.flows):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            for name in sorted(filenames):
                if not name.endswith(".py") or name.startswith("."):
                    continue
                path = Path(dirpath) / name
                if not self._defines_flow(path):
                    continue
                if dirpath not in folder_digests:
                    folder_digests[dirpath] = _folder_digest(Path(dirpath))
                flows[str(path.relative_to(self.flows))] = folder_digests[dirpath]
        return flows

    def _defines_flow(self, path):
        # Idle cost: a stat per file; a file is read and parsed only when it changed.
        try:
            st = path.stat()
        except OSError:
            return False
        key = (st.st_mtime_ns, st.st_size)
        cached = self._is_flow.get(path)
        if cached is None or cached[0] != key:
            cached = (key, defines_flow(path))
            self._is_flow[path] = cached
        return cached[1]

    # -- compiling --------------------------------------------------------------

    def _compile(self, rel, digest):
        st = self.state.setdefault(rel, FlowState(path=rel))
        st.digest = digest
        st.attempts += 1
        path = self.flows / rel
        cmd = [sys.executable, "-m", "metaflow_services.cli", "compile", str(path), "-o",
               str(self.dags), "--json", *self.compile_args]
        env = dict(os.environ)
        # Metaflow makes its temporary files (the package upload's among them)
        # in the working directory by default: the flows folder may be
        # read-only (it is in the stack).
        env.setdefault("METAFLOW_TEMPDIR", tempfile.gettempdir())
        env.setdefault("METAFLOW_ARTIFACT_LOCALROOT", tempfile.gettempdir())
        st.user = self._owner(path) or self.default_user
        if st.user:
            env["METAFLOW_USER"] = st.user
        t = time.time()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=str(path.parent), env=env)
        st.checked_at = time.time()
        if proc.returncode == 0:
            summary = json.loads(proc.stdout.strip().splitlines()[-1])
            if st.dag_file and st.dag_file != summary["dag_file"]:
                _unlink(st.dag_file)  # the flow was renamed: its old DAG goes away
            st.dag_id, st.dag_file = summary["dag_id"], summary["dag_file"]
            st.schedule = (summary.get("schedule") or {}).get("cron")
            st.status, st.message, st.compiled_at = "ok", "", time.time()
            _unlink(self._error_file(rel))
            log.info("Compiled %s into DAG %s (%.1f s).", rel, st.dag_id, time.time() - t)
        else:
            st.status, st.message = "error", _compile_message(proc.stderr)
            self._write_error_file(rel, st)
            log.error("Compiling %s failed%s:\n%s", rel,
                      "; the last good DAG %s keeps running" % st.dag_id if st.dag_id else "",
                      st.message)
        self._save()
        return st

    def _owner(self, path):
        if not self.passwd:
            return None
        try:
            uid = path.stat().st_uid
            for line in self.passwd.read_text().splitlines():
                fields = line.split(":")
                if len(fields) > 2 and fields[2] == str(uid):
                    return fields[0] if fields[0] != "root" else None
        except OSError:
            pass
        return None

    def _error_file(self, rel):
        return str(self.dags / (_stem(rel) + ERROR_SUFFIX))

    def _write_error_file(self, rel, st):
        """A DAG file that fails to import with the compile message, so Airflow
        lists it among its import errors (UI banner, /api/v2/importErrors)."""
        keeps = ("The last good version (DAG %s) keeps running until the file is fixed."
                 % st.dag_id if st.dag_id else "No DAG exists for it yet.")
        message = "Metaflow flow %s does not compile. %s\n\n%s" % (rel, keeps, st.message)
        text = ('"""Compile error of the Metaflow flow %s (airflow dag placeholder written by\n'
                'metaflow-services; it disappears when the flow compiles again)."""\n\n'
                "raise RuntimeError(%r)\n" % (rel, message))
        write_atomic(self._error_file(rel), text)

    def _remove(self, rel):
        st = self.state.pop(rel)
        self._pending.pop(rel, None)
        if st.dag_file:
            _unlink(st.dag_file)
        _unlink(self._error_file(rel))
        log.info("Flow %s was removed: DAG %s removed (its run history stays in Airflow).",
                 rel, st.dag_id)
        self._save()

    # -- state ------------------------------------------------------------------

    def _load(self):
        try:
            raw = json.loads(self.state_file.read_text())
            known = set(FlowState.__dataclass_fields__)
            self.state = {k: FlowState(**{f: x for f, x in v.items() if f in known})
                          for k, v in raw.get("flows", {}).items()}
        except (OSError, ValueError, TypeError):
            self.state = {}

    def _save(self):
        data = {"updated": time.time(), "flows_folder": str(self.flows),
                "flows": {k: asdict(v) for k, v in sorted(self.state.items())}}
        write_atomic(str(self.state_file), json.dumps(data, indent=1))


def defines_flow(path: Path) -> bool:
    """Whether the file defines a FlowSpec subclass (cheap: a text check
    first, then the syntax tree; a file with a syntax error that mentions
    FlowSpec counts, so that its error is reported)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    if "FlowSpec" not in text:
        return False
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return True
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if getattr(base, "id", None) == "FlowSpec" or getattr(base, "attr", None) == "FlowSpec":
                    return True
    return False


def package_files(folder: Path):
    """The files under *folder* a code package is made of, in a stable order
    (hidden files and folders and __pycache__ left out). `fab push-flows`
    copies the same set."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for name in sorted(filenames):
            if name.endswith(PACKAGE_SUFFIXES) and not name.startswith("."):
                yield Path(dirpath) / name


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha1()
    for p in package_files(folder):
        try:
            st = p.stat()
        except OSError:
            continue
        h.update(("%s\0%d\0%d\0" % (p.relative_to(folder), st.st_size,
                                    st.st_mtime_ns)).encode())
    return h.hexdigest()


def _compile_message(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if l.strip()]
    # Metaflow's banner and our "Refused" trailer are noise here.
    keep = [l.strip() for l in lines if not l.startswith("Metaflow ") and "Validating your flow" not in l
            and "The graph looks good" not in l]
    return "\n".join(keep[-15:]) or "compile failed (no message)"


def _stem(rel):
    return rel[:-3].replace(os.sep, "__").replace(".", "_")


def _unlink(path):
    try:
        os.unlink(path)
    except (OSError, TypeError):
        pass


def add_parser(sub):
    w = sub.add_parser("watch", help="Compile flows dropped into a folder into DAGs, continuously.",
                       description="Watch FLOWS for Metaflow flows and keep DAGS in step: compile "
                                   "new and changed flows, surface compile errors as Airflow "
                                   "import errors, remove the DAGs of removed flows.")
    w.add_argument("--flows", required=True, help="the folder users drop flows into")
    w.add_argument("--dags", required=True, help="Airflow's dags folder")
    w.add_argument("--interval", type=float, default=1.0, help="seconds between scans")
    w.add_argument("--settle", type=float, default=2.0,
                   help="seconds a flow's files must stay unchanged before it is compiled")
    w.add_argument("--once", action="store_true", help="compile what is there, then exit")
    w.add_argument("--passwd", help="passwd file naming flow files' owners: their runs are "
                                    "recorded under the owner's name (METAFLOW_USER)")
    w.add_argument("--heartbeat", help="file touched after every scan (for a healthcheck)")
    w.set_defaults(func=run)


def run(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.makedirs(args.flows, exist_ok=True)
    w = Watcher(Path(args.flows), Path(args.dags), settle=args.settle,
                passwd=Path(args.passwd) if args.passwd else None,
                # Its own METAFLOW_USER (the deploy's flows.default_user).
                default_user=os.environ.get("METAFLOW_USER") or None,
                heartbeat=Path(args.heartbeat) if args.heartbeat else None)
    if args.once:
        w.settle = 0
        w.poll()
        w.poll()
        return 1 if any(s.status == "error" for s in w.state.values()) else 0
    w.run_forever(args.interval)
