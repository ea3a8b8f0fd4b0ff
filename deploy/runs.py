"""Runs in flight on a deployment: what restore, upgrade and resume need to
know before they change anything (docs/operations.md, "A busy platform").

Reads and writes Airflow's database with psql in the postgres container, so it
works before Airflow starts (a restore holds everything back before the
scheduler's first loop). What a restore paused is recorded on the VM
(``state/held-by-restore.json``) so that `fab resume` unpauses exactly those
DAGs, and nothing a user paused on purpose.
"""

from __future__ import annotations

import json
import time

from metaflow_services.smoke import SMOKE_DAG_ID

from . import commands as cmd
from .session import Session, duration

HELD_FILE = "state/held-by-restore.json"
# Users' DAGs only: the deploy's own smoke test is never held or waited for.
USERS = "dag_id <> '%s'" % SMOKE_DAG_ID


def _rows(s: Session, sql, what):
    out = s.r.stdout(cmd.airflow_sql(s.dir, sql), what=what)
    return [line.split("|") for line in out.strip().splitlines() if line.strip()]


def in_flight(s: Session) -> list:
    """[{dag_id, run_id, state, started}] of the DAG runs not finished (the
    deploy's own smoke test aside), oldest first."""
    rows = _rows(s, "SELECT dag_id, run_id, state, COALESCE(EXTRACT(EPOCH FROM start_date), 0) "
                    "FROM dag_run WHERE state IN ('running', 'queued') AND %s "
                    "ORDER BY start_date NULLS LAST, id" % USERS,
                 "listing the runs in flight")
    return [{"dag_id": d, "run_id": r, "state": st, "started": float(t or 0)}
            for d, r, st, t in rows]


def describe(runs, now=None) -> list:
    now = now or time.time()
    return ["%s / %s (%s%s)" % (r["dag_id"], r["run_id"], r["state"],
                                ", started %s before" % duration(now - r["started"])
                                if r["started"] else "") for r in runs]


def hold(s: Session, runs: list) -> dict:
    """A restored database before the scheduler starts: every active DAG
    paused, so no schedule fires and none of *runs* (in flight at backup
    time) goes on. Returns what was held, also written to HELD_FILE for `fab
    resume`."""
    active = [row[0] for row in _rows(
        s, "SELECT dag_id FROM dag WHERE NOT is_paused AND %s ORDER BY dag_id" % USERS,
        "listing the active DAGs")]
    if active:
        s.r.run(cmd.airflow_sql(s.dir, "UPDATE dag SET is_paused = true WHERE NOT is_paused "
                                       "AND %s" % USERS),
                what="pausing the restored DAGs")
    held = {"held_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "paused_dags": active, "runs_in_flight": runs, "tasks_reset": reset_cut_off(s)}
    s.r.run(cmd.write_file("%s/%s" % (s.dir, HELD_FILE), json.dumps(held, indent=1) + "\n",
                           "0600"), what="recording what the restore held back")
    return held


def reset_cut_off(s: Session) -> int:
    """Tasks the backup caught running or queued belong to processes of the
    old VM: back to no state, so that (once their DAG runs) each runs again
    as its next attempt, instead of waiting for Airflow to declare it dead
    and count a failure. Returns how many."""
    out = s.r.stdout(cmd.airflow_sql(
        s.dir, "WITH reset AS (UPDATE task_instance SET state = NULL WHERE state IN "
               "('running', 'queued', 'scheduled', 'restarting') AND %s RETURNING 1) "
               "SELECT count(*) FROM reset" % USERS),
        what="resetting the tasks the backup caught running")
    return int((out.strip().splitlines() or ["0"])[-1])


def read_held(s: Session):
    text = s.r.stdout(cmd.read_file("%s/%s" % (s.dir, HELD_FILE)), what="reading "
                      "what the restore held back")
    return json.loads(text) if text.strip() else None


def release(s: Session, held: dict) -> list:
    """Unpause what a restore paused (not what users paused since), then
    forget it. Returns the DAG ids unpaused."""
    dags = held.get("paused_dags") or []
    if dags:
        ids = ", ".join("'%s'" % d.replace("'", "''") for d in dags)
        s.r.run(cmd.airflow_sql(s.dir, "UPDATE dag SET is_paused = false WHERE dag_id IN (%s)"
                                % ids), what="unpausing the DAGs the restore paused")
    s.r.run(cmd.remove_files("%s/%s" % (s.dir, HELD_FILE)), what="forgetting the hold")
    return dags
