"""What the deploy makes on the VM to prove who is who: the generated secrets
(secrets.env), the TLS certificate (tls/), and the key Airflow signs its
tokens with (state/airflow-jwt), with what a new key means for tasks in
flight. Steps of DEPLOY (deploy/steps.py) and RESTORE (deploy/backups.py).
"""

from __future__ import annotations

from pathlib import Path

from . import commands as cmd
from . import stack, validation
from .session import Session


def ensure_secrets(s: Session):
    s.out.step("secrets (%s/secrets.env, mode 0600, generated on the VM once)" % s.dir)
    res = s.r.stdout(cmd.ensure_secrets(s.dir, stack.secrets(s.o)),
                     what="generating secrets").strip()
    s.out.ok(res.replace("generated:", "generated"))


def certificate(s: Session):
    s.out.step("TLS certificate")
    o = s.o
    if s.keep_certificate:
        s.out.ok("kept the backup's certificate")
    elif o.tls.cert:
        cert = Path(o.tls.cert).expanduser().read_text()
        res = s.r.stdout(cmd.write_file("%s/tls/cert.pem" % s.dir, cert, "0644"),
                         what="installing the TLS certificate").strip()
        s.out.ok("certificate from %s: %s" % (o.tls.cert, res))
        tmp = s.r.put_private(Path(o.tls.key).expanduser(), "key.pem")
        res = s.r.stdout(cmd.install_uploaded(tmp, "%s/tls/key.pem" % s.dir, "0600"),
                         what="installing the TLS key").strip()
        s.out.ok("key from %s: %s" % (o.tls.key, res))
        s.r.run(cmd.remove_files("%s/tls/.self-signed-for" % s.dir))
    else:
        res = s.r.stdout(cmd.self_signed_cert(s.dir, o.public_host, validation.is_ip(o.public_host)),
                         what="generating a self-signed certificate").strip()
        s.out.ok("self-signed for %s: %s" % (o.public_host, res))
    s.facts["tls_sha"] = s.r.stdout(cmd.tls_fingerprint(s.dir),
                                    what="reading the certificate").strip()


def signing_key(s: Session):
    """Airflow signs users' and tasks' tokens with a key only the main VM's
    api-server and scheduler read; worker VMs get the edge workers' secret,
    which Airflow's own API does not accept."""
    state, sha = s.r.stdout(cmd.jwt_signing_key(s.dir, stack.AIRFLOW_UID),
                            what="making Airflow's token signing key").split()
    s.facts["jwt_key_sha"], s.facts["jwt_key_new"] = sha, state == "generated"
    s.out.ok("Airflow's token signing key (Ed25519, %s/state/airflow-jwt, airflow user only): %s"
             % (s.dir, state))


def requeue_for_new_key(s: Session, containers):
    """A new signing key on a running deployment: tokens signed before are
    refused from now on. Edge jobs still waiting for a worker go back to the
    scheduler (stopped first, so it queues nothing more with an old token),
    which queues them again with new tokens."""
    if not s.facts.get("jwt_key_new") or not any(
            c["service"] == "airflow-scheduler" and c["state"] == "running" for c in containers):
        return
    s.r.run(cmd.compose(s.dir, "stop -t 60 airflow-scheduler"), what="stopping the scheduler")
    if s.r.stdout(cmd.airflow_sql(s.dir, cmd.EDGE_JOB_TABLE), what="looking for edge jobs",
                  warn=True).strip() != "t":
        return
    moved, running = s.r.stdout(cmd.airflow_sql(s.dir, cmd.REQUEUE_EDGE_JOBS),
                                what="queueing edge jobs again").strip().split("|")
    s.out.ok("new token signing key: %s task(s) waiting for a worker queued again with new "
             "tokens" % moved)
    if int(running):
        s.out.warn("%s task(s) running now hold tokens signed the old way: Airflow refuses them "
                   "from now on, so they fail and are retried if they have retries" % running)
