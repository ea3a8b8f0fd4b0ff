"""The platform's housekeeping: ``metaflow-services maintain``.

One long-running loop in the ``maintenance`` container (the Airflow image, as
root, with Airflow's environment, so the ``airflow`` CLI works). Every minute
it does what is due:

- task logs (hourly): Airflow task log files older than
  ``MFS_LOG_RETENTION_DAYS`` are deleted, then the directories that left empty;
- Airflow metadata (daily): ``airflow db clean`` of rows older than
  ``MFS_AIRFLOW_METADATA_RETENTION_DAYS`` (dag runs, task instances, XComs,
  the audit log, ...);
- backups (daily at ``MFS_BACKUP_SCHEDULE``, HH:MM UTC): a backup into
  ``MFS_BACKUP_DIR`` (metaflow_services.backup), then all but the newest
  ``MFS_BACKUP_KEEP`` are removed.

Each action prints one timestamped line. An action that fails is printed with
its error and tried again later; the loop itself never stops because of one.
Last-run times live in ``<backup dir>/.maintenance.json`` so a restart does not
redo a daily job. ``--once ACTION`` runs one action now and exits (non-zero if
it failed): for ``fab`` and tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from . import archive, encryption
from .errors import ExitCode, ServicesError

ACTIONS = ("logs", "metadata", "backups")
HOUR, DAY = 3600, 86400
# How often each action runs at most (backups follow their own schedule).
EVERY = {"logs": HOUR, "metadata": DAY}
# A failed action is tried again after this long, not every minute: a broken
# database or a full disk would otherwise mean an `airflow db clean` or a
# backup attempt per minute.
RETRY_AFTER = 10 * 60
STATE_FILE = ".maintenance.json"
# The names backup.create() gives its archives (archive.name_for) and partial files.
BACKUP_RE = re.compile(r"^%s(\d{8}T\d{6}Z)%s$" % (re.escape(archive.PREFIX),
                                                   re.escape(archive.SUFFIX)))
PARTIAL_GLOB = "%s*%s.partial" % (archive.PREFIX, archive.SUFFIX)


class SettingsError(ServicesError, ValueError):
    """A bad MFS_* setting; the message names the variable and what it expects."""

    exit_code = ExitCode.USAGE


@dataclass
class Settings:
    task_log_dir: Path = Path("/opt/airflow/logs")
    log_retention_days: int = 30
    metadata_retention_days: int = 90
    backup_schedule: str = ""              # "" or "HH:MM" (UTC, daily)
    backup_dir: Path = Path("/backups")
    backup_keep: int = 7
    heartbeat: Path = Path("/tmp/maintenance-heartbeat")
    interval: float = 60.0                 # seconds between checks for what is due
    backup_encrypt_to: str = ""            # age/SSH public keys: also write NAME.age

    @classmethod
    def from_env(cls, env=None) -> "Settings":
        env = os.environ if env is None else env
        s = cls(
            task_log_dir=Path(env.get("MFS_TASK_LOG_DIR") or cls.task_log_dir),
            log_retention_days=_int(env, "MFS_LOG_RETENTION_DAYS", cls.log_retention_days),
            metadata_retention_days=_int(env, "MFS_AIRFLOW_METADATA_RETENTION_DAYS",
                                         cls.metadata_retention_days),
            backup_schedule=env.get("MFS_BACKUP_SCHEDULE", "").strip(),
            backup_dir=Path(env.get("MFS_BACKUP_DIR") or cls.backup_dir),
            backup_keep=_int(env, "MFS_BACKUP_KEEP", cls.backup_keep),
            backup_encrypt_to=env.get("MFS_BACKUP_ENCRYPT_TO", "").strip(),
            heartbeat=Path(env.get("MFS_MAINTENANCE_HEARTBEAT") or cls.heartbeat),
        )
        # Refuse a bad schedule at start, not silently at 02:00.
        parse_schedule(s.backup_schedule)
        if s.backup_keep < 1:
            raise SettingsError("MFS_BACKUP_KEEP must be at least 1 (the number of backups "
                                "kept), got %d" % s.backup_keep)
        return s


def _int(env, name, default) -> int:
    value = (env.get(name) or "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SettingsError("%s must be a whole number, got %r" % (name, value)) from None


# ---------------------------------------------------------------------------
# Task logs
# ---------------------------------------------------------------------------


def prune_task_logs(root: Path, days: int, now: float | None = None) -> tuple[int, int]:
    """Delete files below root last modified more than `days` days ago, then
    the directories this left empty; returns (files removed, bytes freed).
    days <= 0 keeps everything."""
    root = Path(root)
    if days <= 0 or not root.is_dir():
        return 0, 0
    cutoff = (time.time() if now is None else now) - days * DAY
    files = freed = 0
    emptied = set()  # directories we removed something from
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if st.st_mtime < cutoff:
                    os.unlink(path)
                    files, freed = files + 1, freed + st.st_size
                    emptied.add(dirpath)
            except FileNotFoundError:  # Airflow removed it meanwhile
                pass
        # An empty directory goes if we emptied it or it is old itself; a
        # fresh empty one may be a task's log folder about to get its file.
        if dirpath != str(root) and (dirpath in emptied or _mtime(dirpath) < cutoff):
            try:
                os.rmdir(dirpath)
                emptied.add(os.path.dirname(dirpath))
            except OSError:  # not empty (or gone)
                pass
    return files, freed


def _mtime(path) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return float("inf")


# ---------------------------------------------------------------------------
# Airflow metadata
# ---------------------------------------------------------------------------

# Rows deleted per transaction: a first clean of a long-running stack must not
# hold locks on task_instance for minutes while the scheduler waits.
CLEAN_BATCH_SIZE = 10000


def clean_airflow_metadata(days: int, now=None) -> str:
    """`airflow db clean` of everything older than `days` days (Airflow
    always keeps each DAG's latest scheduled run). Returns a one-line summary;
    raises RuntimeError with the tail of Airflow's output if it fails."""
    if days <= 0:
        return "airflow metadata: kept forever (MFS_AIRFLOW_METADATA_RETENTION_DAYS=%d)" % days
    before = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    before = (before - timedelta(days=days)).replace(microsecond=0)
    cmd = ["airflow", "db", "clean", "--clean-before-timestamp", before.isoformat(),
           "--yes", "--skip-archive", "--batch-size", str(CLEAN_BATCH_SIZE),
           # By default a table that fails to clean is only a warning, exit 0.
           "--error-on-cleanup-failure"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-20:])
        raise RuntimeError("`%s` failed (exit code %d):\n%s"
                           % (" ".join(cmd), proc.returncode, tail))
    removed = _rows_removed(proc.stdout)
    what = ", ".join("%d %s" % (n, t) for t, n in removed.items() if n)
    what = what + " rows" if what else "nothing"
    return "airflow metadata: removed %s older than %d days (before %s)" % (
        what, days, before.strftime("%Y-%m-%d %H:%M UTC"))


def _rows_removed(output: str) -> dict:
    """{table: rows} from `airflow db clean`'s "Checking table T" / "Found N
    rows meeting deletion criteria." lines."""
    rows, table = {}, None
    for line in output.splitlines():
        m = re.search(r"Checking table (\S+)", line)
        if m:
            table = m.group(1)
        m = re.search(r"Found (\d+) rows meeting deletion criteria", line)
        if m and table:
            rows[table] = int(m.group(1))
    return rows


# ---------------------------------------------------------------------------
# Backups
# ---------------------------------------------------------------------------


def backups(dir: Path) -> list[Path]:
    """The backups in dir, newest first (by the UTC time in their names)."""
    found = [(m.group(1), p) for p in Path(dir).glob("%s*%s" % (archive.PREFIX, archive.SUFFIX))
             if (m := BACKUP_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def prune_backups(dir: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` backups, and partial backups older
    than a day (left by a crash; a younger one may still be being written).
    Returns what was removed."""
    removed = backups(dir)[max(keep, 0):]
    # A backup's encrypted copy goes with it.
    removed += [p.with_name(p.name + encryption.SUFFIX) for p in removed
                if p.with_name(p.name + encryption.SUFFIX).exists()]
    removed += [p for glob in (PARTIAL_GLOB, PARTIAL_GLOB.replace(".partial", ".age.partial"))
                for p in Path(dir).glob(glob) if _mtime(p) < time.time() - DAY]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def backup_time(path: Path) -> float:
    stamp = BACKUP_RE.match(Path(path).name).group(1)
    return datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()


def newest_backup_age(dir: Path, now: float | None = None) -> float | None:
    """Seconds since the newest backup was taken, None if there is none."""
    found = backups(dir)
    if not found:
        return None
    return (time.time() if now is None else now) - backup_time(found[0])


def parse_schedule(schedule: str) -> tuple[int, int] | None:
    """(hour, minute) of a daily "HH:MM" UTC schedule; None for "" (off)."""
    schedule = (schedule or "").strip()
    if not schedule:
        return None
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", schedule)
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise SettingsError("MFS_BACKUP_SCHEDULE must be empty (no scheduled backups) or a "
                            "daily time in UTC as HH:MM, e.g. 02:30; got %r" % schedule)
    return int(m.group(1)), int(m.group(2))


def due(schedule: str, last_run: float | None, now: float) -> bool:
    """Whether a daily backup at `schedule` (HH:MM UTC) is due: the latest
    scheduled time at or before now has not been covered by a run. So it runs
    once a day at HH:MM, and a day missed while the container was down is
    caught up at the next start (once, however many days were missed)."""
    hm = parse_schedule(schedule)
    if hm is None:
        return False
    today = datetime.fromtimestamp(now, timezone.utc)
    latest = today.replace(hour=hm[0], minute=hm[1], second=0, microsecond=0)
    if latest > today:
        latest -= timedelta(days=1)
    return last_run is None or last_run < latest.timestamp()


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def say(message: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # An error's output tail follows, indented: one entry per action.
    print("%s %s" % (stamp, message.rstrip().replace("\n", "\n  ")), flush=True)


def mb(n: int) -> str:
    return "%.1f MB" % (n / 1e6)


def run(settings: Settings, backup_fn=None, sleep=time.sleep, once=None, clock=time.time):
    """Do what is due every settings.interval seconds, forever; with `once`
    (one of ACTIONS) run just that action now and return its exit code.
    backup_fn(out_dir, progress=...) -> Path makes a backup (default:
    metaflow_services.backup.create); clock and sleep are for tests."""
    state_file = settings.backup_dir / STATE_FILE
    state = _load_state(state_file)
    actions = _actions(settings, backup_fn)
    if once:
        ok = _attempt(once, actions[once], clock(), state, state_file, retry=False)
        return 0 if ok else 1
    # No backup yet: the first one is at the first scheduled time after the
    # first start, not in the middle of a fresh deploy.
    state.setdefault("first_start", clock())
    _save_state(state_file, state)
    failed_at = {}
    plan = ("daily at %s UTC into %s, the newest %d kept"
            % (settings.backup_schedule, settings.backup_dir, settings.backup_keep)
            if settings.backup_schedule else "off (MFS_BACKUP_SCHEDULE is empty)")
    say("maintenance: task logs kept %s, Airflow metadata kept %s, backups %s"
        % (_days(settings.log_retention_days), _days(settings.metadata_retention_days), plan))
    while True:
        now = clock()
        _touch(settings.heartbeat)
        for name in ACTIONS:
            if name in failed_at and now - failed_at[name] < RETRY_AFTER:
                continue
            if _is_due(name, settings, state, now):
                if _attempt(name, actions[name], now, state, state_file):
                    failed_at.pop(name, None)
                else:
                    failed_at[name] = now
        _touch(settings.heartbeat)
        sleep(settings.interval)


def _days(n):
    return "%d days" % n if n > 0 else "forever"


def _is_due(name, settings, state, now) -> bool:
    if name == "backups":
        # A backup in the folder counts too (also one taken by hand); before
        # the first one, the first start does (see run()).
        taken = [backup_time(p) for p in backups(settings.backup_dir)[:1]]
        last = max([t for t in (state.get("backups"), state.get("first_start")) if t] + taken,
                   default=None)
        return due(settings.backup_schedule, last, now)
    days = settings.log_retention_days if name == "logs" else settings.metadata_retention_days
    last = state.get(name)
    return days > 0 and (last is None or now - last >= EVERY[name])


def _actions(settings, backup_fn):
    """name -> function(now) returning the line to print."""
    def logs(now):
        days = settings.log_retention_days
        if days <= 0:
            return "task logs: kept forever (MFS_LOG_RETENTION_DAYS=%d)" % days
        files, freed = prune_task_logs(settings.task_log_dir, days, now)
        return "task logs: removed %d files (%s) older than %d days" % (files, mb(freed), days)

    def metadata(now):
        return clean_airflow_metadata(settings.metadata_retention_days, now)

    def make_backup(now):
        create = backup_fn
        if create is None:
            from .backup import create

        def progress(message):
            say("backup: %s" % message)
            _touch(settings.heartbeat)  # a long backup is not a hung loop

        settings.backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = create(settings.backup_dir, progress=progress,
                      encrypt_to=settings.backup_encrypt_to)
        removed = prune_backups(settings.backup_dir, settings.backup_keep)
        return "backup: wrote %s (%s); removed %d old backup file(s), keeping the newest %d" % (
            path, mb(Path(path).stat().st_size), len(removed), settings.backup_keep)

    return {"logs": logs, "metadata": metadata, "backups": make_backup}


def _attempt(name, action, now, state, state_file, retry=True) -> bool:
    """Run one action; print its line or its error. True if it succeeded."""
    try:
        say(action(now))
    except Exception as e:  # noqa: BLE001 - one failed action must not stop the others
        say("%s: FAILED%s: %s: %s" % (name, ", trying again in %d minutes" % (RETRY_AFTER // 60)
                                      if retry else "", type(e).__name__, e))
        return False
    state[name] = now
    _save_state(state_file, state)
    return True


def _load_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # unreadable: redo the daily jobs, say why
        say("maintenance: ignoring %s (%s)" % (path, e))
        return {}


def _save_state(path: Path, state: dict) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:  # a restart then redoes a job: worth a line, not a crash
        say("maintenance: could not save %s: %s" % (path, e))


def _touch(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as e:
        say("maintenance: could not touch the heartbeat %s: %s" % (path, e))


# ---------------------------------------------------------------------------
# `metaflow-services maintain`
# ---------------------------------------------------------------------------


def add_parser(sub):
    m = sub.add_parser(
        "maintain", help="Run the platform's housekeeping loop (the maintenance container).",
        description="Every minute, do what is due: delete old Airflow task logs (hourly, "
                    "MFS_LOG_RETENTION_DAYS), clean old Airflow metadata (daily, "
                    "MFS_AIRFLOW_METADATA_RETENTION_DAYS), take a backup (MFS_BACKUP_SCHEDULE "
                    "HH:MM UTC, into MFS_BACKUP_DIR, keeping MFS_BACKUP_KEEP).")
    m.add_argument("--once", choices=ACTIONS,
                   help="run this action now and exit (exit code 1 if it failed)")
    m.set_defaults(func=cmd_maintain)


def cmd_maintain(args):
    import signal

    try:
        settings = Settings.from_env()
    except SettingsError as e:
        print("metaflow-services maintain: %s" % e, file=sys.stderr)
        return e.exit_code
    # `docker stop`: exit through the normal path, so a backup being written
    # removes its partial file.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run(settings, once=args.once)
