"""The deploy engine: ordered lists of steps.

A step is a function of a ``Session`` (deploy/session.py) that checks the VM
before it acts and says what it did ("exists, skipped"). A deploy, a restore,
an upgrade and an add-worker are different lists of the same steps
(``DEPLOY`` here, ``RESTORE`` in deploy/backups.py, ``WORKER`` in
deploy/workers.py), run by ``run``. Every shell line a step runs comes from
deploy/commands.py; waiting for health lives in deploy/health.py.
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path

from metaflow_services import __version__

from . import bundle as bundle_mod
from . import commands as cmd
from . import config as config_mod
from . import credentials
from . import health
from . import packages as packages_mod
from . import stack
from .remote import DeployError
from .session import DATA_GROUP, DOCKER_ROOT, Session, duration, local_user, version_tuple

SUPPORTED_OS = {"debian": ("12", "13"), "ubuntu": ("22.04", "24.04")}
SUPPORTED_ARCH = ("x86_64", "aarch64")
MIN_ENGINE, MIN_COMPOSE = (25, 0), (2, 24)


def run(s: Session, steps):
    for step in steps:
        step(s)


def deploy(s: Session):
    """`fab deploy`: read-only preflight, then every step under the lock."""
    preflight(s)
    with s.lock("fab deploy"):
        run(s, DEPLOY)
    summary(s)


# ---------------------------------------------------------------------------
# 1. preflight: read only
# ---------------------------------------------------------------------------


def preflight(s: Session):
    s.out.step("preflight on %s (nothing is changed)" % s.host)
    s.whoami()
    f = s.facts = cmd.parse_facts(s.r.stdout(cmd.facts([DOCKER_ROOT, s.dir, s.o.data_dir],
                                                       s.o.project), what="preflight"))
    s.read_workers()
    problems = machine_problems(s.o, f) + port_problems(s.o, f)
    if problems:
        raise DeployError("preflight refused (nothing was changed): " + "; ".join(problems),
                          "fix the VM or the options and deploy again")
    docker = ("Docker %s, Compose %s" % (f["docker_server"], f["compose"])
              if f.get("docker_server") else "no Docker yet")
    s.out.ok("%s, %s, %s cores, %.1f GB memory, %.0f GB free for Docker; %s"
             % (f.get("os_name"), f.get("arch"), f.get("cores"), memory_gb(f),
                (f["disk"].get(DOCKER_ROOT) or 0) / 1024 / 1024, docker))
    s.out.ok("ports %s free (or already ours); user %s (%s)"
             % (", ".join(str(p) for p in s.o.published_ports()), s.r.user,
                "root" if s.r.sudo_mode == "root" else "sudo"))


def memory_gb(facts):
    return int(facts.get("mem_kb") or 0) / 1024 / 1024


def machine_problems(o: config_mod.Options, f: dict) -> list:
    """What keeps the machine from running the stack (operating system,
    architecture, memory, disk, Docker), one sentence each."""
    problems = []
    os_id, version = f.get("os_id", "unknown"), f.get("os_version", "unknown")
    if version not in SUPPORTED_OS.get(os_id, ()):
        problems.append("expected Debian 12/13 or Ubuntu 22.04/24.04, found %s"
                        % f.get("os_name", "%s %s" % (os_id, version)))
    if f.get("arch") not in SUPPORTED_ARCH:
        problems.append("expected an x86_64 or aarch64 machine, found %s" % f.get("arch"))
    if memory_gb(f) < o.preflight.min_memory_gb:
        problems.append("expected at least %.1f GB of memory, found %.1f GB"
                        % (o.preflight.min_memory_gb, memory_gb(f)))
    free_kb = f["disk"].get(DOCKER_ROOT)
    if free_kb is not None and free_kb / 1024 / 1024 < o.preflight.min_disk_gb:
        problems.append("expected at least %.0f GB free for Docker's data (%s), found %.1f GB"
                        % (o.preflight.min_disk_gb, DOCKER_ROOT, free_kb / 1024 / 1024))
    return problems + docker_problems(f)


def docker_problems(f: dict) -> list:
    if not f.get("docker_server"):
        return []  # installed by the deploy
    problems = []
    if version_tuple(f["docker_server"]) < MIN_ENGINE:
        problems.append("expected Docker Engine %d.%d or newer, found %s (upgrade it, "
                        "e.g. from Docker's apt repository)" % (MIN_ENGINE + (f["docker_server"],)))
    if not f.get("compose"):
        problems.append("expected Docker Compose v2 next to the installed Docker Engine, "
                        "found none (install docker-compose-plugin or docker-compose-v2)")
    elif version_tuple(f["compose"]) < MIN_COMPOSE:
        problems.append("expected Docker Compose %d.%d or newer, found %s"
                        % (MIN_COMPOSE + (f["compose"],)))
    return problems


def port_problems(o: config_mod.Options, f: dict) -> list:
    problems = []
    for port in o.published_ports():
        if port in f["ours"]:
            continue
        for ip, p in f["listen"]:
            if p == port and _overlaps(ip, o.ports.bind_address):
                problems.append("expected port %d to be free, found it in use (something "
                                "listens on %s:%d; choose another with --set ports.<name>=PORT)"
                                % (port, ip, port))
                break
    return problems


def _overlaps(listen_ip, bind_address):
    wild = ("0.0.0.0", "::")
    return listen_ip in wild or bind_address in wild or listen_ip == bind_address


# ---------------------------------------------------------------------------
# 2. Docker
# ---------------------------------------------------------------------------


def install_docker(s: Session):
    s.out.step("Docker Engine and Compose v2")
    f, i = s.facts, s.o.install
    apt_opts = cmd.apt_options(i.apt_mirror, i.apt_proxy, f.get("os_id"), f.get("os_codename"))
    if i.apt_mirror:
        s.r.run(cmd.apt_mirror_sources(i.apt_mirror, f["os_id"], f["os_codename"]),
                what="writing the apt mirror's sources list")
    if f.get("docker_server") and f.get("compose"):
        s.out.ok("Docker %s and Compose %s present, skipped" % (f["docker_server"], f["compose"]))
        res = s.r.stdout(cmd.install_prerequisites(apt_opts),
                         what="installing curl, openssl, CA certificates").strip()
        s.out.ok("curl, openssl, CA certificates: %s" % res)
    else:
        _install_docker_packages(s, apt_opts)
    _start_docker(s)


def _docker_source(s: Session):
    src = s.o.install.docker_source
    if src != "auto":
        return src
    if (s.facts["os_id"], s.facts["os_version"]) in (("debian", "13"), ("ubuntu", "24.04")):
        return "distribution"
    return "docker"


def _install_docker_packages(s: Session, apt_opts):
    f, i = s.facts, s.o.install
    t0 = time.time()
    if _docker_source(s) == "distribution":
        s.out.info("installing %s from %s's packages (1-3 minutes) ..."
                   % (", ".join(cmd.DISTRO_DOCKER[f["os_id"]]), f["os_name"]))
        s.r.run(cmd.install_docker_distribution(f["os_id"], apt_opts),
                what="installing Docker from the distribution", timeout=1800)
    else:
        s.out.info("installing Docker CE and the Compose plugin from %s (1-3 minutes) ..."
                   % i.docker_apt_repo)
        s.r.run(cmd.install_docker_ce(f["os_id"], f["os_codename"], i.docker_apt_repo, apt_opts),
                what="installing Docker from Docker's apt repository", timeout=1800)
    s.out.ok("installed in %s" % duration(time.time() - t0))


def _start_docker(s: Session):
    res = s.r.stdout(cmd.docker_daemon_config(), what="configuring Docker").strip()
    if "left as it is" in res:
        s.out.warn("/etc/docker/daemon.json exists without \"live-restore\": true; add it "
                   "so Docker restarts and upgrades do not stop the stack")
    else:
        s.out.ok("/etc/docker/daemon.json: %s" % res)
    res = s.r.stdout(cmd.start_docker(), what="starting Docker", timeout=300).strip()
    s.out.ok("Docker engine: %s" % res.splitlines()[-1])
    if "directly" in res:
        s.out.warn("no working init system for Docker here: after a reboot start it with "
                   "`dockerd &` (or enable docker.service)")
    v = cmd.parse_facts(s.r.stdout(cmd.docker_versions(), what="checking Docker's version"))
    if version_tuple(v.get("server")) < MIN_ENGINE or version_tuple(v.get("compose")) < MIN_COMPOSE:
        raise DeployError("expected Docker Engine %d.%d+ and Compose %d.%d+, found %s and %s"
                          % (MIN_ENGINE + MIN_COMPOSE + (v.get("server"), v.get("compose"))),
                          "upgrade Docker (install.docker_source: docker uses Docker's "
                          "repository)")
    s.facts["docker_gid"] = v.get("docker_gid") or "0"
    s.out.ok("Docker %s, Compose %s" % (v["server"], v["compose"]))


# ---------------------------------------------------------------------------
# 3. files and settings (secrets, certificate, signing key: credentials.py)
# ---------------------------------------------------------------------------


def upload_stack(s: Session):
    s.out.step("stack files in %s" % s.dir)
    blob, sha = stack.stack_archive()
    current = s.r.stdout(cmd.read_file(s.dir + "/.stack-sha256"),
                         what="reading the stack's digest").strip()
    if current == sha:
        s.out.ok("unchanged, skipped")
        return
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        tmp.write(blob)
        tmp.flush()
        remote_tmp = "/tmp/mfs-stack-%s.tar" % sha[:12]
        s.r.put_file(tmp.name, remote_tmp)
    s.r.run(cmd.unpack_stack(s.dir, remote_tmp, sha, stack.STACK_FILES),
            what="unpacking the stack's files")
    s.out.ok("%s (%d files)" % ("updated" if current else "uploaded", len(stack.STACK_FILES)))


def configure(s: Session):
    s.out.step("settings, folders, volumes")
    f = s.facts
    credentials.signing_key(s)
    env = stack.settings_env(s.o, {
        "docker_gid": f["docker_gid"], "cores": int(f.get("cores") or 1),
        "memory_gb": memory_gb(f), "tls_sha": f["tls_sha"], "jwt_key_sha": f["jwt_key_sha"],
        "workers": s.workers})
    s.r.run(cmd.write_file(s.dir + "/settings.env", env, "0600"), what="writing settings.env")
    res = s.r.stdout(cmd.assemble_env(s.dir), what="writing .env").strip()
    s.out.ok(".env (settings + secrets): %s" % res)
    res = s.r.stdout(cmd.airflow_passwords(s.dir, list(s.o.airflow.users), stack.AIRFLOW_UID),
                     what="writing Airflow's passwords file").strip()
    s.out.ok("Airflow passwords file: %s" % res)
    res = s.r.stdout(cmd.data_dirs(s.o.data_dir, stack.AIRFLOW_UID, DATA_GROUP, s.r.user),
                     what="creating the dags folder").strip()
    s.out.ok("dags folder %s/dags (group %s may write): %s" % (s.o.data_dir, DATA_GROUP,
                                                               res.replace("\n", "; ")))
    for name in stack.SHIPPED_TO_DAGS:
        res = s.r.stdout(cmd.ship_unless_edited(
            "%s/dags/%s" % (s.o.data_dir, name), (stack.DAGS_DIR / name).read_text(),
            "%d:%s" % (stack.AIRFLOW_UID, DATA_GROUP)), what="writing the dags folder's %s" % name)
        s.out.ok("dags folder's %s: %s" % (name, res.strip()))
    res = s.r.stdout(cmd.ensure_volumes(s.volumes()), what="creating volumes")
    s.out.ok("volumes: %s" % "; ".join(res.strip().splitlines()))
    res = s.r.stdout(cmd.backup_dir(s.o.backup.dir), what="creating the backup folder")
    s.out.ok("backups: %s (mode 0700)%s" % (s.o.backup.dir, res.strip()))


# ---------------------------------------------------------------------------
# 4. images
# ---------------------------------------------------------------------------


def images(s: Session):
    s.out.step("images")
    wanted = s.wanted_images()
    ids = remote_image_ids(s, wanted.values())
    missing = [ref for ref in wanted.values() if ids.get(ref) == "missing"]
    if s.bundle_manifest is not None:
        ids = _images_from_bundle(s, wanted, ids)
    else:
        for role, ref in wanted.items():
            if ids.get(ref) == "missing":
                _pull_or_build(s, role, ref)
        ids = remote_image_ids(s, wanted.values())
    still = [ref for ref in wanted.values() if ids.get(ref) == "missing"]
    if still:
        raise DeployError("images missing on the VM: %s" % ", ".join(still),
                          "pull or load them, or deploy with --bundle")
    s.image_ids = {role: ids[ref] for role, ref in wanted.items()}
    s.out.ok("%d images ready (%d were present)" % (len(wanted), len(wanted) - len(missing)))


def remote_image_ids(s: Session, refs):
    out = s.r.stdout(cmd.image_ids(list(refs)), what="listing images")
    return dict(line.split(" ", 1) for line in out.strip().splitlines() if " " in line)


def bundle_lacks(s: Session, wanted, ids):
    """The images *wanted* that neither the VM (*ids*) nor the bundle has."""
    in_bundle = {e["ref"] for e in s.bundle_manifest["images"]}
    return [ref for ref in wanted.values() if ids.get(ref) == "missing" and ref not in in_bundle]


BUNDLE_LACKS_HINT = "make the bundle with the same options as the deploy (fab bundle --config ...)"


def _images_from_bundle(s: Session, wanted, ids):
    in_bundle = {e["ref"]: e["id"] for e in s.bundle_manifest["images"]}
    not_in_bundle = bundle_lacks(s, wanted, ids)
    if not_in_bundle:
        raise DeployError("the bundle lacks %s (and the VM does not have them)"
                          % ", ".join(not_in_bundle), BUNDLE_LACKS_HINT)
    stale = [ref for ref in wanted.values() if ref in in_bundle and ids.get(ref) != in_bundle[ref]]
    if not stale:
        s.out.ok("all %d images of the bundle already loaded, upload skipped" % len(in_bundle))
        return ids
    _load_bundle(s, len(stale))
    return remote_image_ids(s, wanted.values())


def _pull_or_build(s: Session, role, ref):
    if role in stack.BUILT and not getattr(s.o.images, role):
        _build_on_vm(s, role, ref)
        return
    t0 = time.time()
    s.out.info("pulling %s ..." % ref)
    s.r.run(cmd.pull(ref), what="pulling %s" % ref, timeout=3600)
    s.out.ok("%s pulled in %s" % (ref, duration(time.time() - t0)))


def _load_bundle(s: Session, n_needed):
    path = s.bundle_path
    size = Path(path).stat().st_size
    remote = "/var/tmp/metaflow-services-bundle-%d.tar" % int(time.time())
    s.out.info("uploading the bundle (%.0f MB; %d image(s) needed) ..." % (size / 1e6, n_needed))
    t0 = time.time()
    s.r.put_file(path, remote, progress=upload_progress(s.out, t0))
    s.out.ok("uploaded in %s" % duration(time.time() - t0))
    t0 = time.time()
    s.out.info("checking checksums and loading images ...")
    try:
        res = s.r.stdout(cmd.verify_and_load_bundle(remote), what="loading the bundle",
                         timeout=3600)
    finally:
        s.r.run(cmd.remove_files(remote), warn=True)
    for line in res.strip().splitlines():
        s.out.info(line.strip())
    s.out.ok("loaded in %s" % duration(time.time() - t0))


def upload_progress(out, t0):
    """An SFTP progress callback printing every 10%."""
    last = [0]

    def progress(done, total):
        pct = int(done * 100 / total) if total else 100
        if pct >= last[0] + 10 or done == total:
            last[0] = pct - pct % 10
            out.info("  %3d%%  %.0f MB  %.0f MB/s" % (pct, done / 1e6,
                                                     done / 1e6 / max(time.time() - t0, 0.1)))
    return progress


def _build_on_vm(s: Session, role, ref):
    base = stack.base_image(role, s.o)
    t0 = time.time()
    if role == "airflow":
        with tempfile.TemporaryDirectory() as tmp:
            wheel = bundle_mod.build_wheel(Path(tmp))
            remote_tmp = "/tmp/%s" % wheel.name
            s.r.put_file(wheel, remote_tmp)
            s.r.run(cmd.move_into_fresh_folder(remote_tmp, "%s/airflow/wheels" % s.dir),
                    what="uploading the project's wheel")
    s.out.info("building %s on the VM (from %s; several minutes) ..." % (ref, base))
    arg = "AIRFLOW_BASE" if role == "airflow" else "STEP_BASE"
    s.r.run(cmd.build(s.dir, stack.BUILT[role], ref, {arg: base, **stack.build_args(s.o)},
                      ca=s.dir + "/packages/ca.pem" if s.o.packages.ca_bundle else None),
            what="building %s" % ref, timeout=3600)
    s.out.ok("%s built in %s" % (ref, duration(time.time() - t0)))


# ---------------------------------------------------------------------------
# 5. start, and what comes after it
# ---------------------------------------------------------------------------


def dags_folder(s: Session):
    """Deployments (and backups) from before flows lived in the dags folder:
    their flows/ moves into it, before the new flow-watcher starts."""
    res = s.r.stdout(cmd.migrate_flows_folder(s.o.data_dir, check_only=True),
                     what="checking the dags folder").strip()
    if res == "current":
        return
    if res.startswith("clash:"):
        raise DeployError(
            "flows now live in the dags folder, but %s/flows and %s/dags both have: %s"
            % (s.o.data_dir, s.o.data_dir, ", ".join(res[6:].split())),
            "rename or remove one of each pair on the VM, then run fab deploy again "
            "(nothing was moved)")
    s.out.step("dags folder")
    # The old watcher must not record or delete anything while its flows move.
    s.r.run(cmd.compose(s.dir, "--ansi never stop flow-watcher"), warn=True,
            what="stopping the old flow-watcher")
    res = s.r.stdout(cmd.migrate_flows_folder(s.o.data_dir), what="moving flows into the dags "
                     "folder").strip()
    s.out.ok("%s: flows now live in the dags folder %s/dags; %s/flows is a link to it. "
             "DAG ids, schedules and runs stay." % (res, s.o.data_dir, s.o.data_dir))


def start(s: Session):
    s.out.step("start")
    svcs = s.services()
    hashes = dict(line.split(" ", 1) for line in s.r.stdout(
        cmd.compose(s.dir, "config --hash '*'"), what="reading the stack's configuration"
    ).strip().splitlines() if " " in line)
    containers = cmd.parse_containers(s.r.stdout(cmd.project_containers(s.o.project),
                                                 what="listing containers"))
    ids = {name: s.image_ids.get(svc.role) or "" for name, svc in svcs.items()}
    p = stack.plan(svcs, {k: v.strip() for k, v in hashes.items()}, containers, ids)
    if not p.changed:
        s.out.ok("all %d services up to date, nothing restarted" % len(svcs))
        return
    s.changed = True
    # Until a smoke test passes, later deploys run it even if they change
    # nothing (this one may fail or be interrupted before it).
    s.r.run(cmd.smoke_pending(s.dir, "set"), what="recording the pending smoke test")
    for line in p.lines():
        s.out.info(line)
    credentials.requeue_for_new_key(s, containers)
    stale = [c["id"] for c in containers if c["service"] in p.remove]
    if stale:
        s.r.run(cmd.remove_containers(stale), what="removing containers no longer needed")
    t0 = time.time()
    s.r.run(cmd.up(s.dir), what="docker compose up", timeout=3600, hide=False)
    s.out.ok("docker compose up in %s" % duration(time.time() - t0))


def record(s: Session):
    o = s.o
    s.write_record({
        "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metaflow_services_version": __version__,
        "by": "%s@%s" % (local_user(), socket.gethostname()),
        "public_host": o.public_host,
        "ports": {"https": o.ports.https, "metaflow": o.ports.metaflow, "s3": o.ports.s3},
        "metaflow_services": o.metaflow_services, "object_store": o.object_store,
        "bucket": o.bucket, "project": o.project, "data_dir": o.data_dir,
        "airflow_users": o.airflow.users, "metaflow_ui_user": o.metaflow_ui.user,
        "self_signed": not o.tls.cert, "images": stack.images(o),
        "options": config_mod.describe(o)})


def summary(s: Session):
    o, h = s.o, s.host
    lines = ["", "Deployed metaflow-services %s to %s in %s%s." % (
        __version__, h, duration(s.out.elapsed()), "" if s.changed else " (nothing changed)")]
    users = ", ".join("%s (%s)" % kv for kv in o.airflow.users.items())
    rows = [("Airflow UI and REST API", o.airflow_url, "users: " + users)]
    if o.metaflow_services:
        rows += [("Metaflow UI", o.metaflow_url, "user: %s" % o.metaflow_ui.user),
                 ("Metaflow metadata API", o.metaflow_url + "/metadata", "x-api-key")]
    rows += [("S3 endpoint", o.s3_url, "bucket: %s" % o.bucket),
             ("dags folder on the VM", o.data_dir + "/dags",
              "drop flow files (and plain Airflow DAGs) here: scp, git pull, or fab push-flows "
              "DIR (group %s may write)" % DATA_GROUP)]
    for name, url, note in rows:
        lines.append("  %-24s %-34s %s" % (name, url, note))
    lines += [
        "Passwords and keys:  fab -H %s secrets --show   (on the VM: %s/secrets.env, mode 0600)"
        % (h, s.dir),
        "Laptop profile:      fab -H %s client-config --name NAME" % h,
        "Behind a firewall:   fab -H %s tunnel   (then client-config --tunnel)" % h,
        "Status and logs:     fab -H %s status  |  fab -H %s logs [-s SERVICE]" % (h, h),
    ]
    if not o.tls.cert:
        lines.append("TLS: a self-signed certificate (browsers warn once); give your own with "
                     "tls.cert and tls.key.")
    s.out.stream.write("\n".join(lines) + "\n")
    s.out.stream.flush()


# Everything up to the images: no service is (re)started yet.
PREPARE = [install_docker, upload_stack, credentials.ensure_secrets, credentials.certificate,
           configure, packages_mod.install, images]
# The new configuration goes live and is proven.
GO_LIVE = [dags_folder, start, health.wait_healthy, health.check_proxy, health.bucket, health.smoke_test,
           record]
DEPLOY = PREPARE + GO_LIVE
