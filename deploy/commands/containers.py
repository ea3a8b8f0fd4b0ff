"""Commands about Docker and the stack: compose, images, containers, and
the stack's own commands (metaflow-services and airflow in its containers)."""

from __future__ import annotations

import shlex

q = shlex.quote

# ---------------------------------------------------------------------------
# Docker
# ---------------------------------------------------------------------------


def backup_dir(path) -> str:
    """Backups hold every secret: root only."""
    return ("if [ -d %s ]; then chmod 0700 %s && echo ''; else install -d -m 0700 -o root -g root %s "
            "&& echo ', created'; fi" % (q(path), q(path), q(path)))


def compose(install_dir, args) -> str:
    """docker compose in install_dir (which reads .env: the project name,
    files, profiles, settings and secrets)."""
    return "cd %s && docker compose %s" % (q(install_dir), args)


def ensure_volumes(names) -> str:
    return "; ".join(
        "docker volume inspect %s >/dev/null 2>&1 && echo 'exists %s' || "
        "{ docker volume create %s >/dev/null && echo 'created %s'; }" % (q(n), n, q(n), n)
        for n in names)


def image_ids(refs) -> str:
    """'REF ID' per image; ID 'missing' when the image is not on the VM."""
    return "; ".join("echo %s $(docker image inspect --format '{{.Id}}' %s 2>/dev/null "
                     "|| echo missing)" % (q(r), q(r)) for r in refs)


def pull(ref) -> str:
    return "docker pull -q %s" % q(ref)


def verify_and_load_bundle(path, images_member="images.tar.gz") -> str:
    """Check the bundle's checksums, then docker load its images."""
    p = q(path)
    return ("set -e; d=$(mktemp -d /var/tmp/mfs-bundle.XXXXXX); trap 'rm -rf \"$d\"' EXIT; "
            "tar -C \"$d\" -xf %s; cd \"$d\"; sha256sum -c --quiet SHA256SUMS; "
            "docker load -i %s | sed 's/^/  /'" % (p, q(images_member)))


def build(install_dir, service, tag, args, ca=None) -> str:
    """docker build of a stack image from its directory in install_dir; *ca*
    (a CA bundle on the VM, packages.ca_bundle) goes into the context as
    ca.pem for the build's pip, and out again."""
    build_args = " ".join("--build-arg %s" % q("%s=%s" % kv) for kv in sorted(args.items()))
    line = ("cd %s && docker build -q -t %s %s %s" % (q(install_dir), q(tag), build_args,
                                                      q(service))).replace("  ", " ")
    if not ca:
        return line
    pem = q(service + "/ca.pem")
    return "cd %s && cp %s %s && { %s; rc=$?; rm -f %s; exit $rc; }" % (
        q(install_dir), q(ca), pem, line, pem)


def project_containers(project) -> str:
    """One line per container of the project: service, configuration hash,
    image id, state, exit code, container id, start time."""
    fmt = ('{{index .Config.Labels "com.docker.compose.service"}} '
           '{{index .Config.Labels "com.docker.compose.config-hash"}} '
           '{{.Image}} {{.State.Status}} {{.State.ExitCode}} {{.Id}} {{.State.StartedAt}} '
           # Health is absent (not empty) without a healthcheck.
           '{{if index .State "Health"}}{{(index .State "Health").Status}}{{else}}none{{end}}')
    return ("docker ps -aq --filter label=com.docker.compose.project=%s | "
            "xargs -r docker inspect --format %s" % (q(project), q(fmt)))


def parse_containers(text):
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        out.append({"service": parts[0], "config_hash": parts[1], "image": parts[2],
                    "state": parts[3], "exit_code": int(parts[4]), "id": parts[5],
                    "started_at": parts[6], "health": parts[7]})
    return out


def container_memory(project) -> str:
    """One line per running container of the project: id and memory in use
    (docker stats, one sample)."""
    return ("docker ps -q --no-trunc --filter label=com.docker.compose.project=%s | "
            "xargs -r docker stats --no-stream --no-trunc --format '{{.ID}} {{.MemUsage}}'"
            % q(project))


def parse_memory(text) -> dict:
    """{container id: "123.4MiB"} from container_memory's output."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out[parts[0]] = parts[1]
    return out


def up(install_dir) -> str:
    # Images are pulled, loaded or built beforehand: compose must not try.
    # Plain progress lines (no terminal): what it creates, waits for, starts.
    return compose(install_dir, "--ansi never --progress plain up -d --no-build --pull never "
                                "--remove-orphans")


def logs(install_dir, service="", tail=200, follow=False) -> str:
    # Compose writes terminal clear-line codes even without a terminal.
    args = "--ansi never logs --no-color --tail %d%s%s" % (
        tail, " --follow" if follow else "", " " + q(service) if service else "")
    return compose(install_dir, args) + r" | sed -u 's/\x1b\[[0-9;]*K//g'"


def remove_containers(ids) -> str:
    return "docker rm -f %s" % " ".join(q(i) for i in ids)


def scheduler_exec(install_dir, args, password_var=None, stdin=None) -> str:
    """metaflow-services in the scheduler container (it has the task runtime's
    environment). A password is passed from secrets.env by name, and *stdin*
    (a file on the VM) as the command's input, so neither is on a command line."""
    env = ""
    prefix = ""
    if password_var:
        prefix = "set -a; . ./secrets.env; set +a; MFS_DOCTOR_AIRFLOW_PASSWORD=\"$%s\" " % password_var
        env = "-e MFS_DOCTOR_AIRFLOW_PASSWORD "
    line = ("cd %s && %sdocker compose exec -T %sairflow-scheduler metaflow-services %s"
            % (q(install_dir), prefix, env, args))
    return line + " < %s" % q(stdin) if stdin else line


def smoke_pending(install_dir, action) -> str:
    """The marker of a smoke test still to pass: set, get (yes/no), clear."""
    f = q(install_dir + "/state/smoke-test-pending")
    return {"set": "install -d %s/state && touch %s" % (q(install_dir), f),
            "get": "[ -e %s ] && echo yes || echo no" % f,
            "clear": "rm -f %s" % f}[action]


def check_proxy(port, path="/", host="127.0.0.1") -> str:
    """The proxy answers TLS (any HTTP status): on the VM itself, or from a
    worker VM at the main VM's address. Prints the status, 000 if none."""
    return ("curl -sk -o /dev/null -w '%%{http_code}' --max-time 10 https://%s:%d%s"
            % (host, port, path))




def maintenance(install_dir, args, exec_=False) -> str:
    """metaflow-services ARGS in the maintenance service: in its running
    container (exec_), or in a new one that starts nothing else (restore)."""
    how = "exec -T" if exec_ else "run --rm --no-deps -T"
    return compose(install_dir, "%s maintenance metaflow-services %s" % (how, args))


def airflow_edge(install_dir, service, args) -> str:
    """`airflow edge ARGS` (Airflow's Edge executor CLI) in *service*."""
    return compose(install_dir, "exec -T %s airflow edge %s" % (service, args))


def compose_down(install_dir) -> str:
    """The stack's containers and network removed (nothing if never started)."""
    return "if [ -f %s/.env ]; then %s; fi" % (
        q(install_dir), compose(install_dir, "down --remove-orphans --timeout 60"))


def remove_network(project) -> str:
    return "docker network rm %s >/dev/null 2>&1 || true" % q(project)


def delete_data(volumes, folders) -> str:
    return "docker volume rm -f %s >/dev/null; rm -rf %s" % (
        " ".join(q(v) for v in volumes), " ".join(q(f) for f in folders))


# Edge jobs waiting for a worker carry a token signed when they were queued:
# with a new signing key they go back to the scheduler, which queues them
# again with a token it signs then (nothing is lost, nothing runs twice).
# Prints: jobs moved back, tasks running (their tokens are the old kind).
EDGE_JOB_TABLE = "SELECT to_regclass('public.edge_job') IS NOT NULL"
REQUEUE_EDGE_JOBS = (
    "WITH moved AS (DELETE FROM edge_job WHERE state = 'queued' "
    "RETURNING dag_id, task_id, run_id, map_index), "
    "requeued AS (UPDATE task_instance ti SET state = 'scheduled', queued_by_job_id = NULL "
    "FROM moved m WHERE ti.dag_id = m.dag_id AND ti.task_id = m.task_id "
    "AND ti.run_id = m.run_id AND ti.map_index = m.map_index AND ti.state = 'queued' "
    "RETURNING ti.task_id) "
    "SELECT (SELECT count(*) FROM requeued), "
    "(SELECT count(*) FROM task_instance WHERE state = 'running')")


def airflow_sql(install_dir, sql) -> str:
    """One SQL statement on Airflow's database, as the postgres superuser over
    the server's local socket (works before Airflow starts, as in a restore).
    Rows print one per line, columns separated by '|'."""
    return compose(install_dir, "exec -T -e PGUSER=postgres postgres psql -X -A -t -F '|' "
                                "-v ON_ERROR_STOP=1 -d airflow -c %s" % q(sql))
