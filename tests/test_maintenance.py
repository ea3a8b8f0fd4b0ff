"""The maintenance loop (`metaflow-services maintain`): task log retention on
real files, backup rotation, the daily backup schedule, the loop under a fake
clock, and `airflow db clean` against the real Airflow + PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from metaflow_services import maintenance
from metaflow_services.maintenance import (Settings, SettingsError, backups,
                                           clean_airflow_metadata, due, newest_backup_age,
                                           prune_backups, prune_task_logs, run)
from support import VENV_BIN

DAY, HOUR = 86400, 3600


def utc(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()


def stamp(t: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def backup_name(t: float) -> str:
    return "metaflow-services-backup-%s.tar" % stamp(t)


def write(path: Path, text="x", age_days: float = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if age_days:
        t = time.time() - age_days * DAY
        os.utime(path, (t, t))
    return path


def age(path: Path, days: float):
    t = time.time() - days * DAY
    os.utime(path, (t, t))


# --------------------------------------------------------------------------
# Task logs
# --------------------------------------------------------------------------


def test_old_task_logs_and_the_folders_they_leave_empty_are_removed(tmp_path):
    root = tmp_path / "logs"
    old_run = root / "dag_id=a" / "run_id=old" / "task_id=t"
    write(old_run / "attempt=1.log", "o" * 1000, age_days=40)
    write(old_run / "attempt=2.log", "o" * 500, age_days=31)
    kept = write(root / "dag_id=a" / "run_id=new" / "task_id=t" / "attempt=1.log", "n", 1)
    write(root / "dag_id=b" / "run_id=old" / "task_id=t" / "attempt=1.log", "o" * 24, 100)
    old_empty = root / "dag_id=c" / "run_id=x"
    old_empty.mkdir(parents=True)
    age(old_empty, 60)
    # Just created by Airflow for a task whose log file is about to appear.
    fresh_empty = root / "dag_id=d" / "run_id=y" / "task_id=t"
    fresh_empty.mkdir(parents=True)

    files, freed = prune_task_logs(root, 30)

    assert (files, freed) == (3, 1524)
    assert kept.exists()
    assert not (root / "dag_id=a" / "run_id=old").exists()
    assert not (root / "dag_id=b").exists()
    assert not old_empty.exists()
    assert fresh_empty.is_dir()


def test_the_log_root_is_kept_even_when_everything_goes(tmp_path):
    root = tmp_path / "logs"
    write(root / "dag_id=a" / "x.log", age_days=40)
    write(root / "scheduler.log", age_days=40)
    age(root, 60)

    assert prune_task_logs(root, 30) == (2, 2)
    assert root.is_dir() and list(root.iterdir()) == []


@pytest.mark.parametrize("days", [0, -1])
def test_zero_or_negative_log_retention_keeps_everything(tmp_path, days):
    root = tmp_path / "logs"
    old = write(root / "dag_id=a" / "x.log", age_days=4000)
    empty = root / "empty"
    empty.mkdir()
    age(empty, 4000)

    assert prune_task_logs(root, days) == (0, 0)
    assert old.exists() and empty.exists()


def test_log_retention_uses_the_given_now(tmp_path):
    f = write(tmp_path / "logs" / "x.log", age_days=10)
    assert prune_task_logs(tmp_path / "logs", 30) == (0, 0)
    assert prune_task_logs(tmp_path / "logs", 30, now=time.time() + 25 * DAY) == (1, 1)
    assert not f.exists()


# --------------------------------------------------------------------------
# Backups on disk
# --------------------------------------------------------------------------


def test_backups_newest_first_and_pruned_to_keep(tmp_path):
    times = [utc("2026-03-0%d 02:00:00" % d) for d in (3, 1, 5, 2, 4)]
    for i, t in enumerate(times):
        p = write(tmp_path / backup_name(t))
        age(p, i)  # mtimes in another order than the names: the names count
    foreign = [write(tmp_path / "notes.txt"), write(tmp_path / "metaflow-services-backup-x.tar"),
               write(tmp_path / "other.tar.partial", age_days=5)]
    old_partial = write(tmp_path / (backup_name(utc("2026-02-01 02:00:00")) + ".partial"),
                        age_days=2)
    new_partial = write(tmp_path / (backup_name(utc("2026-03-06 02:00:00")) + ".partial"))
    # Encrypted copies (backup.encrypt_to) go with their backup.
    old_copy = write(tmp_path / (backup_name(utc("2026-03-01 02:00:00")) + ".age"))
    kept_copy = write(tmp_path / (backup_name(utc("2026-03-05 02:00:00")) + ".age"))
    old_copy_partial = write(tmp_path / (backup_name(utc("2026-02-01 02:00:00")) + ".age.partial"),
                             age_days=2)

    assert [p.name for p in backups(tmp_path)] == [
        backup_name(utc("2026-03-0%d 02:00:00" % d)) for d in (5, 4, 3, 2, 1)]

    removed = prune_backups(tmp_path, 2)

    assert sorted(p.name for p in removed) == sorted(
        [backup_name(utc("2026-03-0%d 02:00:00" % d)) for d in (1, 2, 3)]
        + [old_partial.name, old_copy.name, old_copy_partial.name])
    assert kept_copy.exists() and not old_copy.exists()
    assert [p.name for p in backups(tmp_path)] == [
        backup_name(utc("2026-03-0%d 02:00:00" % d)) for d in (5, 4)]
    assert new_partial.exists() and not old_partial.exists()
    assert all(p.exists() for p in foreign)


def test_newest_backup_age(tmp_path):
    assert newest_backup_age(tmp_path) is None
    write(tmp_path / backup_name(utc("2026-03-01 02:00:00")))
    write(tmp_path / backup_name(utc("2026-03-02 02:00:00")))
    assert newest_backup_age(tmp_path, now=utc("2026-03-02 03:30:00")) == 1.5 * HOUR


# --------------------------------------------------------------------------
# The daily schedule
# --------------------------------------------------------------------------


def test_due_at_and_after_the_scheduled_time_once_a_day():
    ran = utc("2026-03-01 02:00:05")
    assert not due("02:00", ran, utc("2026-03-01 23:59:59"))
    assert not due("02:00", ran, utc("2026-03-02 01:59:59"))
    assert due("02:00", ran, utc("2026-03-02 02:00:00"))
    assert due("02:00", ran, utc("2026-03-02 14:00:00"))
    # ran again at 02:00 on the 2nd: not again that day
    assert not due("02:00", utc("2026-03-02 02:00:00"), utc("2026-03-02 02:01:00"))
    assert not due("02:00", utc("2026-03-02 02:00:00"), utc("2026-03-02 23:59:00"))


def test_a_missed_day_is_caught_up_once_at_the_next_start():
    ran = utc("2026-03-01 02:00:00")
    # the machine was down on the 2nd and 3rd at 02:00; starts again at 09:00
    assert due("02:00", ran, utc("2026-03-03 09:00:00"))
    caught_up = utc("2026-03-03 09:00:00")
    assert not due("02:00", caught_up, utc("2026-03-03 23:00:00"))
    assert due("02:00", caught_up, utc("2026-03-04 02:00:00"))
    # never ran: due
    assert due("23:30", None, utc("2026-03-03 09:00:00"))


def test_schedule_forms():
    assert not due("", None, utc("2026-03-03 09:00:00"))
    assert due("2:30", utc("2026-03-02 02:30:00"), utc("2026-03-03 02:30:00"))
    assert not due("2:30", utc("2026-03-02 02:30:00"), utc("2026-03-03 02:29:00"))
    assert due(" 00:00 ", utc("2026-03-02 23:59:00"), utc("2026-03-03 00:00:00"))


@pytest.mark.parametrize("bad", ["25:00", "02:60", "2am", "0200", "02:00:00", "daily", "-1:00"])
def test_a_bad_schedule_is_a_clear_error(bad):
    with pytest.raises(SettingsError) as e:
        due(bad, None, time.time())
    assert "MFS_BACKUP_SCHEDULE" in str(e.value) and "HH:MM" in str(e.value)
    with pytest.raises(SettingsError, match="MFS_BACKUP_SCHEDULE"):
        Settings.from_env({"MFS_BACKUP_SCHEDULE": bad})


def test_settings_from_env():
    s = Settings.from_env({})
    assert s == Settings(Path("/opt/airflow/logs"), 30, 90, "", Path("/backups"), 7,
                         Path("/tmp/maintenance-heartbeat"))
    s = Settings.from_env({"MFS_TASK_LOG_DIR": "/l", "MFS_LOG_RETENTION_DAYS": "0",
                           "MFS_AIRFLOW_METADATA_RETENTION_DAYS": "365",
                           "MFS_BACKUP_SCHEDULE": "03:15", "MFS_BACKUP_DIR": "/b",
                           "MFS_BACKUP_KEEP": "3", "MFS_MAINTENANCE_HEARTBEAT": "/h"})
    assert s == Settings(Path("/l"), 0, 365, "03:15", Path("/b"), 3, Path("/h"))
    with pytest.raises(SettingsError, match="MFS_LOG_RETENTION_DAYS must be a whole number"):
        Settings.from_env({"MFS_LOG_RETENTION_DAYS": "30d"})
    with pytest.raises(SettingsError, match="MFS_BACKUP_KEEP must be at least 1"):
        Settings.from_env({"MFS_BACKUP_KEEP": "0"})


# --------------------------------------------------------------------------
# The loop, under a fake clock
# --------------------------------------------------------------------------


class Stop(Exception):
    pass


class Clock:
    """A fake time.time()/time.sleep() pair; sleep raises Stop at `until`."""

    def __init__(self, start, until):
        self.t, self.until = start, until

    def __call__(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds
        if self.t >= self.until:
            raise Stop


class FakeBackup:
    """A backup function writing an empty backup file named by the fake
    clock; fails while `failures` is positive."""

    def __init__(self, clock, failures=0, heartbeat=None):
        self.clock, self.failures, self.heartbeat = clock, failures, heartbeat
        self.calls = []

    def __call__(self, out_dir, progress=print, encrypt_to=""):
        self.calls.append(self.clock())
        if self.heartbeat:  # progress touches the heartbeat: a long backup is not a hang
            age(self.heartbeat, 1)
            progress("dumping the database")
            assert time.time() - self.heartbeat.stat().st_mtime < 60
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        path = Path(out_dir) / backup_name(self.clock())
        path.write_bytes(b"b" * 2_000_000)
        return path


@pytest.fixture
def settings(tmp_path):
    return Settings(task_log_dir=tmp_path / "logs", log_retention_days=30,
                    metadata_retention_days=90, backup_schedule="02:00",
                    backup_dir=tmp_path / "backups", backup_keep=2,
                    heartbeat=tmp_path / "heartbeat")


@pytest.fixture
def metadata_calls(monkeypatch):
    calls = []

    def fake(days, now=None):
        calls.append(now)
        return "airflow metadata: removed nothing older than %d days" % days

    monkeypatch.setattr(maintenance, "clean_airflow_metadata", fake)
    return calls


def today_at(hour):
    """Today (UTC, real) at hour: the fake clock runs near real time, so the
    real files' mtimes make sense to it."""
    midnight = time.time() // DAY * DAY
    return midnight + hour * HOUR


def lines(capsys, prefix):
    return [line for line in capsys.readouterr().out.splitlines() if prefix in line]


def test_the_loop_runs_each_action_when_due(settings, metadata_calls, capsys):
    old_log = write(settings.task_log_dir / "dag_id=a" / "old.log", "o" * 1_500_000, 40)
    new_log = write(settings.task_log_dir / "dag_id=a" / "new.log", age_days=1)
    write(settings.heartbeat, age_days=1)
    start = today_at(5)  # a first start after the day's 02:00: no backup yet
    clock = Clock(start, until=start + DAY + 22 * HOUR)  # the day after next, 03:00
    fake_backup = FakeBackup(clock, heartbeat=settings.heartbeat)
    settings.backup_keep = 1

    with pytest.raises(Stop):
        run(settings, backup_fn=fake_backup, sleep=clock.sleep, clock=clock)

    out = capsys.readouterr().out
    # backups at 02:00 on each of the two following days; keep 1: the older one went
    assert fake_backup.calls == [start + 21 * HOUR, start + 45 * HOUR]
    assert [p.name for p in backups(settings.backup_dir)] == [backup_name(start + 45 * HOUR)]
    assert "removed 1 old backup file(s), keeping the newest 1" in out
    assert "backup: dumping the database" in out
    assert "backup: wrote %s (2.0 MB)" % (settings.backup_dir / backup_name(start + 21 * HOUR)) \
        in out
    # metadata daily, from the first start
    assert metadata_calls == [start, start + DAY]
    # task logs hourly
    log_lines = [line for line in out.splitlines() if " task logs: " in line]
    assert len(log_lines) == 46
    assert log_lines[0].endswith("task logs: removed 1 files (1.5 MB) older than 30 days")
    assert log_lines[1].endswith("task logs: removed 0 files (0.0 MB) older than 30 days")
    assert not old_log.exists() and new_log.exists()
    assert time.time() - settings.heartbeat.stat().st_mtime < 60
    # every line starts with a UTC timestamp
    assert all(datetime.strptime(line[:20], "%Y-%m-%dT%H:%M:%SZ") for line in out.splitlines())
    state = json.loads((settings.backup_dir / ".maintenance.json").read_text())
    assert state["backups"] == start + 45 * HOUR and state["metadata"] == start + DAY


def test_a_failing_action_is_reported_and_retried_while_the_others_go_on(
        settings, monkeypatch, capsys):
    def broken_database(days, now=None):
        raise RuntimeError("`airflow db clean ...` failed (exit code 1):\nconnection refused")

    monkeypatch.setattr(maintenance, "clean_airflow_metadata", broken_database)
    start = today_at(1) + 50 * 60  # 01:50
    clock = Clock(start, until=start + 3 * HOUR)
    fake_backup = FakeBackup(clock, failures=2)
    settings.backup_dir.mkdir()
    (settings.backup_dir / ".maintenance.json").write_text(
        json.dumps({"backups": start - DAY + 10 * 60, "first_start": start - 2 * DAY}))

    with pytest.raises(Stop):
        run(settings, backup_fn=fake_backup, sleep=clock.sleep, clock=clock)

    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if "backups: FAILED" in line]
    assert len(failed) == 2
    assert failed[0].endswith("backups: FAILED, trying again in 10 minutes: "
                              "OSError: [Errno 28] No space left on device")
    # 02:00 failed, 02:10 failed, 02:20 succeeded
    assert fake_backup.calls == [start + 10 * 60, start + 20 * 60, start + 30 * 60]
    assert backups(settings.backup_dir)[0].name == backup_name(start + 30 * 60)
    # the metadata clean kept failing: tried every 10 minutes, its error printed each time
    meta = [line for line in out.splitlines() if "metadata: FAILED" in line]
    assert len(meta) == 18
    assert "exit code 1):\n  connection refused\n" in out  # the output's tail, indented
    assert len([line for line in out.splitlines() if " task logs: removed" in line]) == 3


def test_a_restart_does_not_redo_daily_jobs_and_catches_up_a_missed_backup(
        settings, metadata_calls):
    start = today_at(1)
    clock = Clock(start, until=start + 2 * HOUR)  # ran 01:00-03:00: backup at 02:00
    fake_backup = FakeBackup(clock)
    with pytest.raises(Stop):
        run(settings, backup_fn=fake_backup, sleep=clock.sleep, clock=clock)
    assert fake_backup.calls == [start + HOUR] and metadata_calls == [start]

    # restarted at 10:00 the same day: nothing daily to do
    clock.t, clock.until = start + 9 * HOUR, start + 10 * HOUR
    with pytest.raises(Stop):
        run(settings, backup_fn=fake_backup, sleep=clock.sleep, clock=clock)
    assert fake_backup.calls == [start + HOUR] and metadata_calls == [start]

    # down for two days, back at 09:00: one catch-up backup at start, then 02:00 as usual
    back = start + 2 * DAY + 8 * HOUR
    clock.t, clock.until = back, back + 18 * HOUR
    with pytest.raises(Stop):
        run(settings, backup_fn=fake_backup, sleep=clock.sleep, clock=clock)
    assert fake_backup.calls == [start + HOUR, back, start + 3 * DAY + HOUR]
    assert metadata_calls == [start, back]


def test_a_backup_taken_by_hand_counts_as_the_days_backup(settings, metadata_calls):
    start = today_at(1)
    settings.backup_dir.mkdir()
    (settings.backup_dir / ".maintenance.json").write_text(
        json.dumps({"backups": start - DAY, "first_start": start - 2 * DAY}))
    write(settings.backup_dir / backup_name(start + HOUR + 60))  # by hand at 02:01
    clock = Clock(start + 3 * HOUR, until=start + 5 * HOUR)
    fake_backup = FakeBackup(clock)
    with pytest.raises(Stop):
        run(settings, backup_fn=fake_backup, sleep=clock.sleep, clock=clock)
    assert fake_backup.calls == []


def test_once_runs_one_action_and_says_whether_it_worked(settings, capsys):
    clock = Clock(time.time(), until=time.time())
    assert run(settings, backup_fn=FakeBackup(clock), once="backups", clock=clock) == 0
    assert len(backups(settings.backup_dir)) == 1
    assert run(settings, backup_fn=FakeBackup(clock, failures=1), once="backups") == 1
    assert "backups: FAILED: OSError: [Errno 28] No space left on device" in \
        capsys.readouterr().out
    settings.log_retention_days = 0
    old = write(settings.task_log_dir / "x.log", age_days=400)
    assert run(settings, once="logs") == 0
    assert "task logs: kept forever (MFS_LOG_RETENTION_DAYS=0)" in capsys.readouterr().out
    assert old.exists()


def test_the_maintain_command(tmp_path):
    logs = tmp_path / "logs"
    old = write(logs / "dag_id=a" / "old.log", age_days=40)
    env = dict(os.environ, MFS_TASK_LOG_DIR=str(logs), MFS_BACKUP_DIR=str(tmp_path / "b"))
    cmd = [str(VENV_BIN / "metaflow-services"), "maintain"]
    p = subprocess.run(cmd + ["--once", "logs"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("task logs: removed 1 files (0.0 MB) older than 30 days")
    assert not old.exists()
    p = subprocess.run(cmd, env=dict(env, MFS_BACKUP_SCHEDULE="2am"), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2
    assert "MFS_BACKUP_SCHEDULE must be empty" in p.stderr and "HH:MM" in p.stderr


# --------------------------------------------------------------------------
# airflow db clean
# --------------------------------------------------------------------------


def fake_airflow(tmp_path, monkeypatch, script):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "airflow").write_text("#!/bin/sh\n" + script)
    (bin_dir / "airflow").chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (bin_dir, os.environ["PATH"]))


def test_a_failing_db_clean_raises_with_the_end_of_its_output(tmp_path, monkeypatch):
    fake_airflow(tmp_path, monkeypatch, 'echo "$@" > %s/args\n'
                 'for i in $(seq 1 50); do echo "line $i"; done\n'
                 'echo "sqlalchemy.exc.OperationalError: connection refused"; exit 1\n' % tmp_path)
    with pytest.raises(RuntimeError) as e:
        clean_airflow_metadata(30, now=utc("2026-03-31 12:00:00"))
    message = str(e.value)
    assert "airflow db clean" in message and "exit code 1" in message
    assert "connection refused" in message and "line 40" in message and "line 20\n" not in message
    args = (tmp_path / "args").read_text().split()
    assert args[:4] == ["db", "clean", "--clean-before-timestamp", "2026-03-01T12:00:00+00:00"]
    assert {"--yes", "--skip-archive", "--error-on-cleanup-failure"} <= set(args)


def test_zero_metadata_retention_does_not_run_airflow(tmp_path, monkeypatch):
    fake_airflow(tmp_path, monkeypatch, "touch %s/ran; exit 1\n" % tmp_path)
    assert "kept forever" in clean_airflow_metadata(0)
    assert not (tmp_path / "ran").exists()


DAG = textwrap.dedent('''
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG

    with DAG("mfs_maintenance_clean", schedule=None):
        EmptyOperator(task_id="a") >> EmptyOperator(task_id="b")
''')


def sql(postgres, db, query):
    out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres",
                          "-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-c", query],
                         check=True, capture_output=True, text=True).stdout
    return out.split()


@pytest.mark.e2e
def test_db_clean_removes_old_dag_runs_and_keeps_recent_ones(airflow, postgres, monkeypatch):
    dag_id = "mfs_maintenance_clean"
    (airflow.dags / "mfs_maintenance_clean.py").write_text(DAG)
    api = airflow.api()
    api.wait_for_dag(dag_id)
    ages = {"old-1": 200, "old-2": 31, "recent-1": 29, "recent-2": 0}
    for run_id in ages:
        api.trigger(dag_id, run_id=run_id)
    for run_id in ages:
        assert api.wait_for_run(dag_id, run_id, timeout=300) == "success"
    for run_id, days in ages.items():
        sql(postgres, airflow.db, "UPDATE dag_run SET start_date = now() - interval '%d days', "
            "end_date = now() - interval '%d days' WHERE dag_id = '%s' AND run_id = '%s'"
            % (days, days, dag_id, run_id))
    ti_count = "SELECT count(*) FROM task_instance WHERE dag_id = '%s'" % dag_id
    assert sql(postgres, airflow.db, ti_count) == ["8"]
    for key, value in airflow.env().items():
        monkeypatch.setenv(key, value)

    t0 = time.time()
    summary = clean_airflow_metadata(days=30)
    took = time.time() - t0

    runs = sql(postgres, airflow.db,
               "SELECT run_id FROM dag_run WHERE dag_id = '%s' ORDER BY run_id" % dag_id)
    assert runs == ["recent-1", "recent-2"]
    assert sql(postgres, airflow.db, ti_count) == ["4"]  # went with their runs
    assert "2 dag_run rows" in summary and "older than 30 days" in summary, summary
    print("airflow db clean took %.1f s: %s" % (took, summary))
