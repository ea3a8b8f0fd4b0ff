"""Stopping, starting and removing a deployed stack, and the deploy lock by
hand: `fab stop | start | destroy | unlock`."""

from __future__ import annotations

import sys

from . import commands as cmd
from . import health
from .remote import DeployError
from .session import Session


def stop(s: Session):
    with s.lock("fab stop"):
        s.out.step("stopping the stack on %s" % s.host)
        s.r.run(cmd.compose(s.dir, "stop"), what="docker compose stop", timeout=600)
        s.out.ok("stopped; start it again with: fab -H %s start" % s.host)


def start(s: Session):
    with s.lock("fab start"):
        s.out.step("starting the stack on %s" % s.host)
        s.r.run(cmd.up(s.dir), what="docker compose up", timeout=1800)
        health.wait_healthy(s)
        health.check_proxy(s)


def destroy(s: Session, volumes=False, yes=False, confirm_with=""):
    """Removes the stack; its data too with *volumes*. Without *yes* the user
    types *confirm_with* (the host name) first."""
    o = s.o
    what = ("the stack's containers and network on %s, and ALL ITS DATA: volumes %s, %s "
            "(secrets included) and %s (kept: the backups in %s)"
            % (s.host, ", ".join(s.volumes()), s.dir, o.data_dir, o.backup.dir)
            if volumes else
            "the stack's containers, network and files on %s (kept: the data volumes, "
            "%s/secrets.env and tls/, %s)" % (s.host, s.dir, o.data_dir))
    if not yes:
        s.out.stream.write("This removes %s.\nType the host name (%s) to confirm: "
                           % (what, confirm_with))
        s.out.stream.flush()
        if sys.stdin.readline().strip() != confirm_with:
            raise DeployError("not confirmed; nothing was removed", "")
    with s.lock("fab destroy"):
        s.out.step("removing the stack from %s" % s.host)
        s.r.run(cmd.compose_down(s.dir), what="docker compose down", timeout=900)
        containers = cmd.parse_containers(s.r.stdout(cmd.project_containers(o.project)))
        if containers:
            s.r.run(cmd.remove_containers([x["id"] for x in containers]))
        s.r.run(cmd.remove_network(o.project))
        if volumes:
            extra = ["%s-airflow-logs" % o.project, "%s-seaweedfs" % o.project,
                     "%s-minio" % o.project]
            s.r.run(cmd.delete_data(list(dict.fromkeys(s.volumes() + extra)), [s.dir, o.data_dir]),
                    what="deleting the data")
            s.out.ok("removed, data deleted")
        else:
            s.r.run(cmd.remove_stack_files(s.dir, ["secrets.env", "tls"]),
                    what="removing the stack's files")
            s.out.ok("removed; kept the data volumes, %s/secrets.env, %s/tls and %s. `fab deploy` "
                     "brings the stack back with its data." % (s.dir, s.dir, o.data_dir))


def unlock(s: Session):
    held = s.r.stdout(cmd.read_file(cmd.lock_path(s.o.project) + "/holder")).strip()
    s.r.run(cmd.release_lock(s.o.project))
    s.out.ok("released%s" % (" (was: %s)" % held if held else " (it was not held)"))
