"""The Fabric tasks: `fab deploy`, `status`, `logs`, `stop`, `start`,
`destroy`, `client-config`, `secrets`, `bundle`, `unlock`, and for users'
flows `push-flows`, `tunnel`, `images`, `prune-images`.

`deploy` reads as its list of steps (Deployment.run). Each step checks before
it acts and says what it did; the preflight changes nothing on the VM, and
the steps after it are safe to repeat: a second deploy with the same options
changes nothing and restarts nothing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from fabric import task
from invoke.exceptions import Exit

from metaflow_services import __version__

from . import bundle as bundle_mod
from . import commands as cmd
from . import config as config_mod
from . import flows as flows_mod
from . import stack
from .remote import DeployError, Out, Remote, boundary

SUPPORTED_OS = {"debian": ("12", "13"), "ubuntu": ("22.04", "24.04")}
SUPPORTED_ARCH = ("x86_64", "aarch64")
MIN_ENGINE, MIN_COMPOSE = (25, 0), (2, 24)
DATA_GROUP = "metaflow"
DOCKER_ROOT = "/var/lib/docker"
HEALTH_POLL = 3
# The worker VMs of this main VM (fab add-worker), in install_dir.
WORKERS_FILE = "state/workers.json"


def _options(c, config, flags):
    host = getattr(c, "host", None)
    return config_mod.load(config, {k: v for k, v in flags.items() if v is not None}, host=host)


def _require_host(c, task_name):
    if not getattr(c, "host", None):
        raise DeployError("`fab %s` needs the VM: give it with -H user@host" % task_name,
                          "e.g. fab -H root@vm.example.com %s" % task_name)


def _set_flags(set_values):
    flags = {}
    for item in set_values or ():
        if "=" not in item:
            raise config_mod.ConfigError("--set %s: expected KEY=VALUE (e.g. --set "
                                         "airflow.parallelism=4)" % item)
        k, v = item.split("=", 1)
        flags[k.strip()] = v
    return flags


def _version_tuple(text):
    nums = []
    for part in (text or "").lstrip("v").split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        nums.append(int(digits))
    return tuple(nums)


def _duration(seconds):
    seconds = int(round(seconds))
    return "%dm%02ds" % divmod(seconds, 60) if seconds >= 60 else "%ds" % seconds


# ---------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------


class Deployment:
    def __init__(self, remote: Remote, o: config_mod.Options, out: Out):
        self.r = remote
        self.o = o
        self.out = out
        self.facts = {}
        self.image_ids = {}
        self.changed = False
        self.workers = {}  # the worker VMs' registry (deploy/workers.py)

    @property
    def dir(self):
        return self.o.install_dir

    def services(self):
        return stack.services(self.o, workers=bool(self.workers))

    def read_workers(self):
        text = self.r.stdout(cmd.read_file(self.dir + "/" + WORKERS_FILE),
                             what="reading the worker registry").strip()
        self.workers = json.loads(text)["workers"] if text else {}
        return self.workers

    def run(self, bundle_path=None, manifest=None):
        self.preflight()
        with self.lock("fab deploy"):
            self.prepare(bundle_path, manifest)
            self.go_live()
        self.summary()

    def prepare(self, bundle_path=None, manifest=None):
        """Everything up to the images; no service is (re)started yet."""
        self.install_docker()
        self.upload_stack()
        self.ensure_secrets()
        self.certificate()
        self.configure()
        self.images(bundle_path, manifest)

    def go_live(self):
        self.start()
        self.wait_healthy()
        self.check_proxy()
        self.bucket()
        self.smoke_test()
        self.record()

    # -- 1. preflight: read only ---------------------------------------------

    def whoami(self):
        info = cmd.parse_facts(self.r.stdout(cmd.whoami(), as_root=False, what="checking the user"))
        self.r.user = info.get("user")
        sudo = info.get("sudo")
        if sudo == "root":
            self.r.sudo_mode = "root"
        elif sudo == "ok":
            self.r.sudo_mode = "sudo"
        elif self.r.c.config.sudo.password:
            self.r.sudo_mode = "fabric"
            self.r.run("true", what="sudo with the given password")
        else:
            found = {"password": "sudo asks for a password",
                     "missing": "sudo is not installed"}.get(sudo, "sudo is not allowed")
            raise DeployError(
                "preflight: expected root or passwordless sudo for user %s, found: %s "
                "(nothing was changed)" % (self.r.user, found),
                "deploy as root, give %s passwordless sudo (\"%s ALL=(ALL) NOPASSWD:ALL\" in "
                "/etc/sudoers.d/%s), or add --prompt-for-sudo-password"
                % (self.r.user, self.r.user, self.r.user))

    def preflight(self):
        self.out.step("preflight on %s (nothing is changed)" % self.r.host)
        self.whoami()
        paths = [DOCKER_ROOT, self.dir, self.o.data_dir]
        f = cmd.parse_facts(self.r.stdout(cmd.facts(paths, self.o.project), what="preflight"))
        self.facts = f
        self.read_workers()
        problems = self.check_facts(f)
        if problems:
            raise DeployError("preflight refused (nothing was changed): " + "; ".join(problems),
                              "fix the VM or the options and deploy again")
        mem_gb = int(f["mem_kb"]) / 1024 / 1024
        docker = ("Docker %s, Compose %s" % (f["docker_server"], f["compose"])
                  if f.get("docker_server") else "no Docker yet")
        self.out.ok("%s, %s, %s cores, %.1f GB memory, %.0f GB free for Docker; %s"
                    % (f.get("os_name"), f.get("arch"), f.get("cores"), mem_gb,
                       (f["disk"].get(DOCKER_ROOT) or 0) / 1024 / 1024, docker))
        self.out.ok("ports %s free (or already ours); user %s (%s)"
                    % (", ".join(str(p) for p in self.o.published_ports()), self.r.user,
                       "root" if self.r.sudo_mode == "root" else "sudo"))

    def check_facts(self, f):
        o = self.o
        problems = []
        os_id, version = f.get("os_id", "unknown"), f.get("os_version", "unknown")
        if version not in SUPPORTED_OS.get(os_id, ()):
            problems.append("expected Debian 12/13 or Ubuntu 22.04/24.04, found %s"
                            % f.get("os_name", "%s %s" % (os_id, version)))
        if f.get("arch") not in SUPPORTED_ARCH:
            problems.append("expected an x86_64 or aarch64 machine, found %s" % f.get("arch"))
        mem_gb = int(f.get("mem_kb") or 0) / 1024 / 1024
        if mem_gb < o.preflight.min_memory_gb:
            problems.append("expected at least %.1f GB of memory, found %.1f GB"
                            % (o.preflight.min_memory_gb, mem_gb))
        free_kb = f["disk"].get(DOCKER_ROOT)
        if free_kb is not None and free_kb / 1024 / 1024 < o.preflight.min_disk_gb:
            problems.append("expected at least %.0f GB free for Docker's data (%s), found %.1f GB"
                            % (o.preflight.min_disk_gb, DOCKER_ROOT, free_kb / 1024 / 1024))
        for port in o.published_ports():
            if port in f["ours"]:
                continue
            for ip, p in f["listen"]:
                if p == port and _overlaps(ip, o.ports.bind_address):
                    problems.append("expected port %d to be free, found it in use (something "
                                    "listens on %s:%d; choose another with --set ports.<name>=PORT)"
                                    % (port, ip, port))
                    break
        if f.get("docker_server"):
            if _version_tuple(f["docker_server"]) < MIN_ENGINE:
                problems.append("expected Docker Engine %d.%d or newer, found %s (upgrade it, "
                                "e.g. from Docker's apt repository)"
                                % (MIN_ENGINE + (f["docker_server"],)))
            if not f.get("compose"):
                problems.append("expected Docker Compose v2 next to the installed Docker Engine, "
                                "found none (install docker-compose-plugin or docker-compose-v2)")
            elif _version_tuple(f["compose"]) < MIN_COMPOSE:
                problems.append("expected Docker Compose %d.%d or newer, found %s"
                                % (MIN_COMPOSE + (f["compose"],)))
        return problems

    # -- the lock --------------------------------------------------------------

    @contextmanager
    def lock(self, what):
        holder = "%s by %s@%s (pid %d) since %s" % (
            what, _local_user(), socket.gethostname(), os.getpid(),
            time.strftime("%Y-%m-%d %H:%M:%S"))
        res = self.r.stdout(cmd.acquire_lock(self.o.project, holder), what="taking the deploy lock")
        if not res.startswith("acquired"):
            raise DeployError("another deploy holds the lock on the VM: %s"
                              % res.strip()[len("held: "):],
                              "wait for it to finish; if none is running, release the lock with: "
                              "fab -H %s unlock" % self.r.host)
        try:
            yield
        finally:
            try:
                self.r.run(cmd.release_lock(self.o.project), what="releasing the deploy lock")
            except Exception:  # noqa: BLE001 - the original error matters more
                self.out.warn("could not release the deploy lock; fab -H %s unlock" % self.r.host)

    # -- 2. Docker --------------------------------------------------------------

    def apt_options(self):
        f, i = self.facts, self.o.install
        return cmd.apt_options(i.apt_mirror, i.apt_proxy, f.get("os_id"), f.get("os_codename"))

    def docker_source(self):
        src = self.o.install.docker_source
        if src != "auto":
            return src
        f = self.facts
        if (f["os_id"], f["os_version"]) in (("debian", "13"), ("ubuntu", "24.04")):
            return "distribution"
        return "docker"

    def install_docker(self):
        self.out.step("Docker Engine and Compose v2")
        f, i = self.facts, self.o.install
        apt_opts = self.apt_options()
        if i.apt_mirror:
            self.r.run(cmd.apt_mirror_sources(i.apt_mirror, f["os_id"], f["os_codename"]),
                       what="writing the apt mirror's sources list")
        if f.get("docker_server") and f.get("compose"):
            self.out.ok("Docker %s and Compose %s present, skipped" % (f["docker_server"],
                                                                     f["compose"]))
            res = self.r.stdout(cmd.install_prerequisites(apt_opts),
                                what="installing curl, openssl, CA certificates").strip()
            self.out.ok("curl, openssl, CA certificates: %s" % res)
        else:
            source = self.docker_source()
            t0 = time.time()
            if source == "distribution":
                self.out.info("installing %s from %s's packages (1-3 minutes) ..."
                              % (", ".join(cmd.DISTRO_DOCKER[f["os_id"]]), f["os_name"]))
                self.r.run(cmd.install_docker_distribution(f["os_id"], apt_opts),
                           what="installing Docker from the distribution", timeout=1800)
            else:
                self.out.info("installing Docker CE and the Compose plugin from %s (1-3 minutes) ..."
                              % i.docker_apt_repo)
                self.r.run(cmd.install_docker_ce(f["os_id"], f["os_codename"], i.docker_apt_repo,
                                                 apt_opts),
                           what="installing Docker from Docker's apt repository", timeout=1800)
            self.out.ok("installed in %s" % _duration(time.time() - t0))
        res = self.r.stdout(cmd.docker_daemon_config(), what="configuring Docker").strip()
        if "left as it is" in res:
            self.out.warn("/etc/docker/daemon.json exists without \"live-restore\": true; add it "
                          "so Docker restarts and upgrades do not stop the stack")
        else:
            self.out.ok("/etc/docker/daemon.json: %s" % res)
        res = self.r.stdout(cmd.start_docker(), what="starting Docker", timeout=300).strip()
        self.out.ok("Docker engine: %s" % res.splitlines()[-1])
        if "directly" in res:
            self.out.warn("no working init system for Docker here: after a reboot start it with "
                          "`dockerd &` (or enable docker.service)")
        v = cmd.parse_facts(self.r.stdout(cmd.docker_versions(), what="checking Docker's version"))
        if _version_tuple(v.get("server")) < MIN_ENGINE or _version_tuple(v.get("compose")) < MIN_COMPOSE:
            raise DeployError("expected Docker Engine %d.%d+ and Compose %d.%d+, found %s and %s"
                              % (MIN_ENGINE + MIN_COMPOSE + (v.get("server"), v.get("compose"))),
                              "upgrade Docker (install.docker_source: docker uses Docker's "
                              "repository)")
        self.facts["docker_gid"] = v.get("docker_gid") or "0"
        self.out.ok("Docker %s, Compose %s" % (v["server"], v["compose"]))

    # -- 3. files, secrets, certificate, settings ------------------------------

    def upload_stack(self):
        self.out.step("stack files in %s" % self.dir)
        blob, sha = stack.stack_archive()
        current = self.r.stdout(cmd.read_file(self.dir + "/.stack-sha256"),
                                what="reading the stack's digest").strip()
        if current == sha:
            self.out.ok("unchanged, skipped")
            return
        with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
            tmp.write(blob)
            tmp.flush()
            remote_tmp = "/tmp/mfs-stack-%s.tar" % sha[:12]
            self.r.put_file(tmp.name, remote_tmp)
        self.r.run(cmd.unpack_stack(self.dir, remote_tmp, sha, stack.STACK_FILES),
                   what="unpacking the stack's files")
        self.out.ok("%s (%d files)" % ("updated" if current else "uploaded", len(stack.STACK_FILES)))

    def ensure_secrets(self):
        self.out.step("secrets (%s/secrets.env, mode 0600, generated on the VM once)" % self.dir)
        res = self.r.stdout(cmd.ensure_secrets(self.dir, stack.secrets(self.o)),
                            what="generating secrets").strip()
        self.out.ok(res.replace("generated:", "generated"))

    def certificate(self):
        self.out.step("TLS certificate")
        o = self.o
        if o.tls.cert:
            cert = Path(o.tls.cert).expanduser().read_text()
            res = self.r.stdout(cmd.write_file("%s/tls/cert.pem" % self.dir, cert, "0644"),
                                what="installing the TLS certificate").strip()
            self.out.ok("certificate from %s: %s" % (o.tls.cert, res))
            tmp = self.r.put_private(Path(o.tls.key).expanduser(), "key.pem")
            res = self.r.stdout(cmd.install_uploaded(tmp, "%s/tls/key.pem" % self.dir, "0600"),
                                what="installing the TLS key").strip()
            self.out.ok("key from %s: %s" % (o.tls.key, res))
            self.r.run("rm -f %s/tls/.self-signed-for" % cmd.q(self.dir))
        else:
            res = self.r.stdout(cmd.self_signed_cert(self.dir, o.public_host, _is_ip(o.public_host)),
                                what="generating a self-signed certificate").strip()
            self.out.ok("self-signed for %s: %s" % (o.public_host, res))
        self.facts["tls_sha"] = self.r.stdout(cmd.tls_fingerprint(self.dir),
                                              what="reading the certificate").strip()

    def configure(self):
        self.out.step("settings, folders, volumes")
        f = self.facts
        env = stack.settings_env(self.o, {
            "docker_gid": f["docker_gid"], "cores": int(f.get("cores") or 1),
            "memory_gb": int(f.get("mem_kb") or 0) / 1024 / 1024, "tls_sha": f["tls_sha"],
            "workers": self.workers})
        self.r.run(cmd.write_file(self.dir + "/settings.env", env, "0600"),
                   what="writing settings.env")
        res = self.r.stdout(cmd.assemble_env(self.dir), what="writing .env").strip()
        self.out.ok(".env (settings + secrets): %s" % res)
        res = self.r.stdout(cmd.airflow_passwords(self.dir, list(self.o.airflow.users),
                                                  stack.AIRFLOW_UID),
                            what="writing Airflow's passwords file").strip()
        self.out.ok("Airflow passwords file: %s" % res)
        res = self.r.stdout(cmd.data_dirs(self.o.data_dir, stack.AIRFLOW_UID, DATA_GROUP,
                                          self.r.user), what="creating the DAG folders").strip()
        self.out.ok("%s/{dags,flows} (group %s may write): %s" % (self.o.data_dir, DATA_GROUP,
                                                                  res.replace("\n", "; ")))
        res = self.r.stdout(cmd.ensure_volumes(self.volumes()), what="creating volumes")
        self.out.ok("volumes: %s" % "; ".join(res.strip().splitlines()))
        res = self.r.stdout(cmd.backup_dir(self.o.backup.dir), what="creating the backup folder")
        self.out.ok("backups: %s (mode 0700)%s" % (self.o.backup.dir, res.strip()))

    def volumes(self):
        p = self.o.project
        return ["%s-postgres" % p, "%s-%s" % (p, self.o.object_store), "%s-metaflow-local" % p,
                "%s-code-cache" % p]

    # -- 4. images ----------------------------------------------------------------

    def wanted_images(self):
        return stack.images(self.o)

    def images(self, bundle_path=None, manifest=None):
        self.out.step("images")
        wanted = self.wanted_images()
        ids = self.remote_image_ids(wanted.values())
        missing = [ref for ref in wanted.values() if ids.get(ref) == "missing"]
        if manifest is not None:
            in_bundle = {e["ref"]: e["id"] for e in manifest["images"]}
            not_in_bundle = [ref for ref in missing if ref not in in_bundle]
            if not_in_bundle:
                raise DeployError("the bundle lacks %s (and the VM does not have them)"
                                  % ", ".join(not_in_bundle),
                                  "make the bundle with the same options as the deploy "
                                  "(fab bundle --config ...)")
            stale = [ref for ref in wanted.values()
                     if ref in in_bundle and ids.get(ref) != in_bundle[ref]]
            if stale:
                self.load_bundle(bundle_path, len(stale))
                ids = self.remote_image_ids(wanted.values())
            else:
                self.out.ok("all %d images of the bundle already loaded, upload skipped"
                            % len(in_bundle))
        else:
            for role, ref in wanted.items():
                if ids.get(ref) != "missing":
                    continue
                if role in stack.BUILT and not getattr(self.o.images, role):
                    self.build_on_vm(role, ref)
                else:
                    t0 = time.time()
                    self.out.info("pulling %s ..." % ref)
                    self.r.run(cmd.pull(ref), what="pulling %s" % ref, timeout=3600)
                    self.out.ok("%s pulled in %s" % (ref, _duration(time.time() - t0)))
            ids = self.remote_image_ids(wanted.values())
        still = [ref for ref in wanted.values() if ids.get(ref) == "missing"]
        if still:
            raise DeployError("images missing on the VM: %s" % ", ".join(still),
                              "pull or load them, or deploy with --bundle")
        self.image_ids = {role: ids[ref] for role, ref in wanted.items()}
        present = len(wanted) - len(missing)
        self.out.ok("%d images ready (%d were present)" % (len(wanted), present))

    def remote_image_ids(self, refs):
        out = self.r.stdout(cmd.image_ids(list(refs)), what="listing images")
        return dict(line.split(" ", 1) for line in out.strip().splitlines() if " " in line)

    def load_bundle(self, path, n_needed):
        size = Path(path).stat().st_size
        remote = "/var/tmp/metaflow-services-bundle-%d.tar" % int(time.time())
        self.out.info("uploading the bundle (%.0f MB; %d image(s) needed) ..." % (size / 1e6,
                                                                                  n_needed))
        t0 = time.time()
        last = [0]

        def progress(done, total):
            pct = int(done * 100 / total) if total else 100
            if pct >= last[0] + 10 or done == total:
                last[0] = pct - pct % 10
                self.out.info("  %3d%%  %.0f MB  %.0f MB/s" % (pct, done / 1e6,
                                                              done / 1e6 / max(time.time() - t0, 0.1)))
        self.r.put_file(path, remote, progress=progress)
        self.out.ok("uploaded in %s" % _duration(time.time() - t0))
        t0 = time.time()
        self.out.info("checking checksums and loading images ...")
        try:
            res = self.r.stdout(cmd.verify_and_load_bundle(remote), what="loading the bundle",
                                timeout=3600)
        finally:
            self.r.run("rm -f %s" % cmd.q(remote), warn=True)
        for line in res.strip().splitlines():
            self.out.info(line.strip())
        self.out.ok("loaded in %s" % _duration(time.time() - t0))

    def build_on_vm(self, role, ref):
        base = stack.base_image(role, self.o)
        t0 = time.time()
        if role == "airflow":
            with tempfile.TemporaryDirectory() as tmp:
                wheel = bundle_mod.build_wheel(Path(tmp))
                wheels = "%s/airflow/wheels" % self.dir
                remote_tmp = "/tmp/%s" % wheel.name
                self.r.put_file(wheel, remote_tmp)
                self.r.run("rm -rf %s && install -d %s && mv %s %s/" % (
                    cmd.q(wheels), cmd.q(wheels), cmd.q(remote_tmp), cmd.q(wheels)),
                    what="uploading the project's wheel")
        self.out.info("building %s on the VM (from %s; several minutes) ..." % (ref, base))
        arg = "AIRFLOW_BASE" if role == "airflow" else "STEP_BASE"
        self.r.run(cmd.build(self.dir, stack.BUILT[role], ref, {arg: base}),
                   what="building %s" % ref, timeout=3600)
        self.out.ok("%s built in %s" % (ref, _duration(time.time() - t0)))

    # -- 5. start ------------------------------------------------------------------

    def current_plan(self):
        svcs = self.services()
        hashes = dict(line.split(" ", 1) for line in self.r.stdout(
            cmd.compose(self.dir, "config --hash '*'"), what="reading the stack's configuration"
        ).strip().splitlines() if " " in line)
        containers = cmd.parse_containers(self.r.stdout(cmd.project_containers(self.o.project),
                                                        what="listing containers"))
        ids = {name: self.image_ids.get(s.role) or "" for name, s in svcs.items()}
        return svcs, containers, stack.plan(svcs, {k: v.strip() for k, v in hashes.items()},
                                            containers, ids)

    def start(self):
        self.out.step("start")
        svcs, containers, p = self.current_plan()
        if not p.changed:
            self.out.ok("all %d services up to date, nothing restarted" % len(svcs))
            return
        self.changed = True
        # Until a smoke test passes, later deploys run it even if they change
        # nothing (this one may fail or be interrupted before it).
        self.r.run(cmd.smoke_pending(self.dir, "set"), what="recording the pending smoke test")
        for line in p.lines():
            self.out.info(line)
        stale = [c["id"] for c in containers if c["service"] in p.remove]
        if stale:
            self.r.run(cmd.remove_containers(stale), what="removing containers no longer needed")
        t0 = time.time()
        self.r.run(cmd.up(self.dir), what="docker compose up", timeout=3600,
                   hide=False)
        self.out.ok("docker compose up in %s" % _duration(time.time() - t0))

    def wait_healthy(self, timeout=None):
        self.out.step("waiting for every service to be healthy")
        timeout = timeout or self.o.health_timeout
        svcs = self.services()
        t0 = time.time()
        last_report = ("", 0)
        while True:
            containers = cmd.parse_containers(self.r.stdout(cmd.project_containers(self.o.project),
                                                            what="reading container states"))
            pending, failed = _pending(svcs, containers)
            if failed:
                name, why = failed[0]
                raise DeployError("%s %s" % (name, why),
                                  "see its log: fab -H %s logs %s" % (self.r.host, name))
            elapsed = time.time() - t0
            if not pending:
                self.out.ok("%d services healthy (%s)" % (len(svcs), _duration(elapsed)))
                return
            desc = ", ".join("%s (%s)" % kv for kv in sorted(pending.items()))
            if desc != last_report[0] or elapsed - last_report[1] >= 30:
                self.out.info("%3ds  %d/%d ready; waiting for %s" % (
                    elapsed, len(svcs) - len(pending), len(svcs), desc))
                last_report = (desc, elapsed)
            if elapsed > timeout:
                raise DeployError("not healthy after %s: %s" % (_duration(timeout), desc),
                                  "see their logs: fab -H %s logs %s" % (
                                      self.r.host, sorted(pending)[0]))
            time.sleep(HEALTH_POLL)

    def check_proxy(self):
        code = self.r.stdout(cmd.check_proxy(self.o.ports.https, "/api/v2/monitor/health"),
                             what="checking the proxy", warn=True).strip()
        if code != "200":
            raise DeployError("the proxy does not serve Airflow on port %d (HTTP %s)"
                              % (self.o.ports.https, code or "no answer"),
                              "see: fab -H %s logs proxy" % self.r.host)
        self.out.ok("the proxy answers on https://%s:%d (Airflow: HTTP 200)"
                    % (self.o.public_host, self.o.ports.https))

    # -- 6. bucket, smoke test ---------------------------------------------------------

    def bucket(self):
        self.out.step("bucket %s" % self.o.bucket)
        res = self.r.run(cmd.scheduler_exec(self.dir, "doctor --ensure-bucket --only object-store "
                                                      "--json"), what="creating the bucket",
                         warn=True)
        try:
            check = json.loads(res.stdout)[0]
        except (ValueError, IndexError, KeyError):
            raise DeployError("checking the bucket failed: %s" % (res.stderr or res.stdout).strip()[-300:],
                              "see: fab -H %s logs airflow-scheduler" % self.r.host)
        if not check["ok"]:
            raise DeployError(check["detail"], check.get("fix") or "")
        self.out.ok(check["detail"])

    def smoke_test(self):
        mode = self.o.smoke_test
        pending = self.changed or self.r.stdout(cmd.smoke_pending(self.dir, "get"),
                                                what="reading the smoke test state").strip() == "yes"
        if mode == "never" or (mode == "on-change" and not pending):
            self.out.step("smoke test")
            self.out.ok("skipped (%s; --smoke-test always forces it)"
                        % ("nothing changed" if mode == "on-change" else "smoke_test: never"))
            return
        self.out.step("smoke test: a hello flow compiled, run through Airflow, checked")
        admin = self.o.admin_user
        t0 = time.time()
        self.r.run(cmd.scheduler_exec(self.dir, "doctor --smoke-test --airflow-user %s" % admin,
                                      password_var=stack.airflow_password_var(admin)),
                   hide=False, what="the smoke test", timeout=1200)
        self.r.run(cmd.smoke_pending(self.dir, "clear"), what="recording the smoke test")
        self.out.ok("passed in %s" % _duration(time.time() - t0))

    def record(self):
        o = self.o
        state = {"deployed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "metaflow_services_version": __version__,
                 "by": "%s@%s" % (_local_user(), socket.gethostname()),
                 "public_host": o.public_host, "ports": {"https": o.ports.https,
                                                         "metaflow": o.ports.metaflow,
                                                         "s3": o.ports.s3},
                 "metaflow_services": o.metaflow_services, "object_store": o.object_store,
                 "bucket": o.bucket, "project": o.project, "data_dir": o.data_dir,
                 "airflow_users": o.airflow.users, "metaflow_ui_user": o.metaflow_ui.user,
                 "self_signed": not o.tls.cert, "images": stack.images(o),
                 "options": config_mod.describe(o)}
        self.r.run(cmd.write_file(self.dir + "/state/deploy.json",
                                  json.dumps(state, indent=2, sort_keys=True) + "\n", "0644"),
                   what="recording the deploy")

    def summary(self):
        o, h = self.o, self.r.host
        lines = ["", "Deployed metaflow-services %s to %s in %s%s." % (
            __version__, h, _duration(self.out.elapsed()),
            "" if self.changed else " (nothing changed)")]
        users = ", ".join("%s (%s)" % kv for kv in o.airflow.users.items())
        rows = [("Airflow UI and REST API", o.airflow_url, "users: " + users)]
        if o.metaflow_services:
            rows += [("Metaflow UI", o.metaflow_url, "user: %s" % o.metaflow_ui.user),
                     ("Metaflow metadata API", o.metaflow_url + "/metadata", "x-api-key")]
        rows += [("S3 endpoint", o.s3_url, "bucket: %s" % o.bucket),
                 ("Flows folder on the VM", o.data_dir + "/flows",
                  "drop flow files here (group %s may write), or: fab push-flows DIR"
                  % DATA_GROUP)]
        for name, url, note in rows:
            lines.append("  %-24s %-34s %s" % (name, url, note))
        lines += [
            "Passwords and keys:  fab -H %s secrets --show   (on the VM: %s/secrets.env, mode 0600)"
            % (h, self.dir),
            "Laptop profile:      fab -H %s client-config --name NAME" % h,
            "Behind a firewall:   fab -H %s tunnel   (then client-config --tunnel)" % h,
            "Status and logs:     fab -H %s status  |  fab -H %s logs [-s SERVICE]" % (h, h),
        ]
        if not o.tls.cert:
            lines.append("TLS: a self-signed certificate (browsers warn once); give your own with "
                         "tls.cert and tls.key.")
        self.out.stream.write("\n".join(lines) + "\n")
        self.out.stream.flush()


def _pending(svcs, containers):
    """({service: what it waits for}, [(service, failure)])."""
    by = {}
    for c in containers:
        by.setdefault(c["service"], []).append(c)
    pending, failed = {}, []
    for name, svc in svcs.items():
        cs = by.get(name)
        if not cs:
            pending[name] = "no container yet"
            continue
        c = cs[0]
        if svc.one_shot:
            if c["state"] == "exited":
                if c["exit_code"] != 0:
                    failed.append((name, "failed (exit code %d)" % c["exit_code"]))
            else:
                pending[name] = c["state"]
        elif c["state"] != "running":
            pending[name] = c["state"]
        elif c["health"] not in ("healthy", "none"):
            pending[name] = c["health"]
    return pending, failed


def _local_user():
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is not an error
        return "?"


def _overlaps(listen_ip, bind_address):
    wild = ("0.0.0.0", "::")
    return listen_ip in wild or bind_address in wild or listen_ip == bind_address


def _is_ip(value):
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def _connect(c, task_name, verbose, config=None, flags=None):
    _require_host(c, task_name)
    out = Out(verbose)
    o = _options(c, config, flags or {})
    r = Remote(c, out)
    d = Deployment(r, o, out)
    return out, o, r, d


def _state(d):
    """The record of the last deploy; from here on the deployment uses the
    options it was deployed with (not this workstation's options file, which
    only says where to look: install_dir)."""
    text = d.r.stdout(cmd.read_file(d.dir + "/state/deploy.json"), what="reading the deploy record")
    if not text.strip():
        raise DeployError("no deployment found in %s on %s" % (d.dir, d.r.host),
                          "deploy first: fab -H %s deploy (or give --config with its install_dir)"
                          % d.r.host)
    st = json.loads(text)
    if st.get("options"):
        d.o = config_mod.from_description(st["options"])
    return st


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------

COMMON_HELP = {
    "config": "options file (default: deploy.yaml next to the fabfile, if present)",
    "verbose": "show every remote command and its output, and tracebacks",
}


@task(iterable=["set"], help=dict(COMMON_HELP, **{
    "bundle": "archive made by `fab bundle`: load its images instead of pulling",
    "object_store": "seaweedfs (default) or minio",
    "public_host": "name or IP browsers and laptops use (default: the -H host)",
    "metaflow_services": "on/off: the Metaflow metadata service and UI",
    "smoke_test": "always | on-change (default) | never: run the hello flow after deploying",
    "set": "any option as KEY=VALUE, e.g. --set ports.https=8443 (repeatable)",
}))
@boundary("deploy")
def deploy(c, config=None, bundle=None, object_store=None, public_host=None,
           metaflow_services=None, smoke_test=None, set=None, verbose=False):
    """Deploy (or update) the whole platform on the VM given with -H."""
    flags = _set_flags(set)
    flags.update({"object_store": object_store, "public_host": public_host,
                  "metaflow_services": metaflow_services, "smoke_test": smoke_test})
    _require_host(c, "deploy")
    out = Out(verbose)
    o = _options(c, config, flags)
    manifest = bundle_mod.read_manifest(bundle) if bundle else None
    Deployment(Remote(c, out), o, out).run(bundle, manifest)


@task(help=COMMON_HELP)
@boundary("status")
def status(c, config=None, verbose=False):
    """Every service's state and health, versions, disk use, last runs."""
    out, o, r, d = _connect(c, "status", verbose, config)
    d.whoami()
    st = _state(d)
    o = d.o
    out.step("services on %s (deployed %s by %s)" % (r.host, st["deployed_at"], st["by"]))
    containers = cmd.parse_containers(r.stdout(cmd.project_containers(o.project),
                                               what="listing containers"))
    memory = cmd.parse_memory(r.run(cmd.container_memory(o.project), what="reading memory use",
                                    warn=True).stdout)
    out.info("%-24s %-22s %-10s %s" % ("service", "state", "memory", "since"))
    for ct in sorted(containers, key=lambda x: x["service"]):
        state = ct["state"] + ("" if ct["health"] == "none" else " (%s)" % ct["health"])
        if ct["state"] == "exited":
            state += " exit %d" % ct["exit_code"]
        out.info("%-24s %-22s %-10s %s" % (ct["service"], state, memory.get(ct["id"], "-"),
                                           ct["started_at"][:19]))
    out.step("versions")
    for role, ref in sorted(st["images"].items()):
        out.info("%-12s %s" % (role, ref))
    res = r.run(cmd.scheduler_exec(d.dir, "doctor --versions"), what="reading versions", warn=True)
    for line in res.stdout.strip().splitlines():
        out.info(line)
    warnings = []
    out.step("disk")
    res = r.stdout("df -h %s %s %s | sed 1d; docker system df" % (
        DOCKER_ROOT, cmd.q(o.data_dir), cmd.q(o.backup.dir)), what="reading disk use")
    for line in res.strip().splitlines():
        out.info(line)
    warnings += disk_warnings(r.stdout("df -P -k %s %s %s | sed 1d" % (
        DOCKER_ROOT, cmd.q(o.data_dir), cmd.q(o.backup.dir)), what="reading disk use"))
    out.step("backups")
    from . import operations

    warnings += operations.report_backups(d, out)
    out.step("workers")
    from . import workers as workers_mod

    warnings += workers_mod.report(d, out)
    out.step("flows (%s/flows, compiled by the flow-watcher)" % o.data_dir)
    flows = flows_mod.read_state(r, o.data_dir)
    if flows:
        flows_mod.report(out, flows, o.airflow_url)
    else:
        out.info("none yet: drop flow files into %s/flows, or fab -H %s push-flows DIR"
                 % (o.data_dir, r.host))
    out.step("health and last runs")
    admin = next(u for u, role in st["airflow_users"].items() if role == "admin")
    res = r.run(cmd.scheduler_exec(d.dir, "doctor --last-runs 5 --airflow-user %s" % admin,
                                   password_var=stack.airflow_password_var(admin)),
                what="checking health", warn=True)
    for line in (res.stdout + res.stderr).strip().splitlines():
        out.info(line)
    if res.exited != 0:
        warnings.append("some health checks failed (above)")
    if warnings:
        out.step("warnings")
        for w in warnings:
            out.warn(w)
    if res.exited != 0:
        raise Exit("fab status on %s: some checks failed (above)" % r.host, code=1)


LOW_DISK_PERCENT, LOW_DISK_GB = 90, 5


def disk_warnings(df_text):
    """`df -P -k` lines -> a warning per file system that is nearly full."""
    warnings, seen = [], set()
    for line in df_text.strip().splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[5] in seen:
            continue
        seen.add(parts[5])
        used_pct, avail_gb = int(parts[4].rstrip("%")), int(parts[3]) / 1024 / 1024
        if used_pct >= LOW_DISK_PERCENT or avail_gb < LOW_DISK_GB:
            warnings.append("low disk on %s: %d%% used, %.1f GB free (task logs, images and "
                            "backups grow there: fab prune-images, lower retention.* or "
                            "backup.keep, or grow the disk)" % (parts[5], used_pct, avail_gb))
    return warnings


@task(help=dict(COMMON_HELP, service="one service, e.g. airflow-scheduler (default: all)",
                follow="keep printing new lines", tail="lines per service"))
@boundary("logs")
def logs(c, service="", follow=False, tail=200, config=None, verbose=False):
    """Logs of the stack's services: fab logs [-s SERVICE] [-f] [-t LINES]."""
    out, o, r, d = _connect(c, "logs", verbose, config)
    d.whoami()
    r.run(cmd.logs(d.dir, service, int(tail), follow), hide=False, raw=True,
          what="docker compose logs")


@task(help=COMMON_HELP)
@boundary("stop")
def stop(c, config=None, verbose=False):
    """Stop every container (data and configuration stay)."""
    out, o, r, d = _connect(c, "stop", verbose, config)
    d.whoami()
    _state(d)
    with d.lock("fab stop"):
        out.step("stopping the stack on %s" % r.host)
        r.run(cmd.compose(d.dir, "stop"), what="docker compose stop", timeout=600)
        out.ok("stopped; start it again with: fab -H %s start" % r.host)


@task(help=COMMON_HELP)
@boundary("start")
def start(c, config=None, verbose=False):
    """Start the stack again (after `fab stop`) and wait until it is healthy."""
    out, o, r, d = _connect(c, "start", verbose, config)
    d.whoami()
    _state(d)
    with d.lock("fab start"):
        out.step("starting the stack on %s" % r.host)
        r.run(cmd.up(d.dir), what="docker compose up", timeout=1800)
        d.wait_healthy()
        d.check_proxy()


@task(help=dict(COMMON_HELP, volumes="also delete all data: database, object store, secrets, "
                                     "DAG and flow folders",
                yes="do not ask for confirmation"))
@boundary("destroy")
def destroy(c, volumes=False, yes=False, config=None, verbose=False):
    """Remove the stack from the VM; data is kept unless --volumes."""
    out, o, r, d = _connect(c, "destroy", verbose, config)
    d.whoami()
    try:
        _state(d)
        o = d.o
    except DeployError:
        pass  # no record (a failed first deploy): the options given here say what to remove
    what = ("the stack's containers and network on %s, and ALL ITS DATA: volumes %s, %s "
            "(secrets included) and %s (kept: the backups in %s)"
            % (r.host, ", ".join(d.volumes()), d.dir, o.data_dir, o.backup.dir)
            if volumes else
            "the stack's containers, network and files on %s (kept: the data volumes, "
            "%s/secrets.env and tls/, %s)" % (r.host, d.dir, o.data_dir))
    if not yes:
        out.stream.write("This removes %s.\nType the host name (%s) to confirm: " % (what, c.host))
        out.stream.flush()
        answer = sys.stdin.readline().strip()
        if answer != c.host:
            raise DeployError("not confirmed; nothing was removed", "")
    with d.lock("fab destroy"):
        out.step("removing the stack from %s" % r.host)
        r.run("if [ -f %s/.env ]; then %s; fi" % (cmd.q(d.dir), cmd.compose(
            d.dir, "down --remove-orphans --timeout 60")), what="docker compose down", timeout=900)
        containers = cmd.parse_containers(r.stdout(cmd.project_containers(o.project)))
        if containers:
            r.run(cmd.remove_containers([x["id"] for x in containers]))
        r.run("docker network rm %s >/dev/null 2>&1 || true" % cmd.q(o.project))
        if volumes:
            r.run("docker volume rm -f %s %s-airflow-logs %s-seaweedfs %s-minio >/dev/null; "
                  "rm -rf %s %s" % (" ".join(cmd.q(v) for v in d.volumes()), o.project, o.project,
                                   o.project, cmd.q(d.dir), cmd.q(o.data_dir)),
                  what="deleting the data")
            out.ok("removed, data deleted")
        else:
            r.run("cd %s && find . -mindepth 1 -maxdepth 1 ! -name secrets.env ! -name tls "
                  "-exec rm -rf {} +" % cmd.q(d.dir), what="removing the stack's files")
            out.ok("removed; kept the data volumes, %s/secrets.env, %s/tls and %s. `fab deploy` "
                   "brings the stack back with its data." % (d.dir, d.dir, o.data_dir))


@task(help=dict(COMMON_HELP, name="profile name: writes ~/.metaflowconfig/config_NAME.json",
                directory="write into this folder instead of ~/.metaflowconfig",
                tunnel="use the VM through `fab tunnel` (localhost ports) instead of its address"))
@boundary("client-config")
def client_config(c, name="", directory="", tunnel=False, config=None, verbose=False):
    """Write a Metaflow profile for this workstation.

    Laptops then use the VM's metadata service and object store:
    METAFLOW_PROFILE=NAME python flow.py run."""
    out, o, r, d = _connect(c, "client-config", verbose, config)
    d.whoami()
    st = _state(d)
    name = name or st["public_host"].replace(".", "-") + ("-tunnel" if tunnel else "")
    secrets = _read_secrets(d)
    host = st["public_host"]
    if tunnel:
        local = {remote: lport for _, lport, remote in flows_mod.tunnel_ports(st)}
        base = lambda port: flows_mod.tunnel_url(local[port])  # noqa: E731
    else:
        base = lambda port: ("https://%s" % host) if port == 443 else "https://%s:%d" % (host, port)  # noqa: E731
    folder = Path(directory).expanduser() if directory else Path.home() / ".metaflowconfig"
    folder.mkdir(parents=True, exist_ok=True)
    client_params = {"aws_access_key_id": secrets["MFS_S3_ACCESS_KEY"],
                     "aws_secret_access_key": secrets["MFS_S3_SECRET_KEY"],
                     "region_name": "us-east-1",
                     "config": {"s3": {"addressing_style": "path"}}}
    profile = {
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": "s3://%s/metaflow" % st["bucket"],
        "METAFLOW_DATATOOLS_S3ROOT": "s3://%s/data" % st["bucket"],
        "METAFLOW_CARD_S3ROOT": "s3://%s/metaflow/mf.cards" % st["bucket"],
        "METAFLOW_S3_ENDPOINT_URL": base(st["ports"]["s3"]),
        "METAFLOW_DATATOOLS_CLIENT_PARAMS": client_params,
        # Not Metaflow's: where `metaflow-services doctor --profile` finds Airflow.
        "MFS_AIRFLOW_URL": base(st["ports"]["https"]),
    }
    if st["metaflow_services"]:
        profile.update({"METAFLOW_DEFAULT_METADATA": "service",
                        "METAFLOW_SERVICE_URL": base(st["ports"]["metaflow"]) + "/metadata",
                        "METAFLOW_SERVICE_AUTH_KEY": secrets["MFS_METAFLOW_API_KEY"],
                        # Not Metaflow's either: the Metaflow UI, for doctor --profile.
                        "MFS_METAFLOW_UI_URL": base(st["ports"]["metaflow"])})
    else:
        profile["METAFLOW_DEFAULT_METADATA"] = "local"
    ca_note = ""
    if st.get("self_signed"):
        cert = r.stdout(cmd.read_file(d.dir + "/tls/cert.pem"), what="reading the certificate")
        ca = folder / ("%s-ca.pem" % name)
        ca.write_text(cert)
        profile["METAFLOW_S3_VERIFY_CERTIFICATE"] = str(ca)
        if st["metaflow_services"]:
            # Read by this project's Metaflow extension (Metaflow has no CA
            # setting for the metadata service).
            profile["METAFLOW_SERVICE_VERIFY_CERTIFICATE"] = str(ca)
        ca_note = ca
    path = folder / ("config_%s.json" % name)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(profile, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(path, 0o600)
    out.step("Metaflow profile %r" % name)
    out.ok("wrote %s (mode 0600: it holds the S3 keys%s)"
           % (path, " and the metadata API key" if st["metaflow_services"] else ""))
    out.info("use it:  METAFLOW_PROFILE=%s python flow.py run" % name)
    out.info("check it: metaflow-services doctor --profile %s" % name)
    if tunnel:
        out.info("it needs the tunnel open: fab -H %s tunnel" % r.host)
    if ca_note and st["metaflow_services"]:
        out.info("the VM's certificate is self-signed: %s; the profile trusts it for S3, and "
                 "for the metadata service where metaflow-services is installed (pip install "
                 "it next to metaflow; else export REQUESTS_CA_BUNDLE=%s, or give the VM a "
                 "trusted certificate)" % (ca_note, ca_note))
    elif ca_note:
        out.info("the VM's certificate is self-signed: %s (the profile trusts it)" % ca_note)
    if not st["metaflow_services"]:
        out.warn("this deployment runs without the metadata service: runs from a laptop keep "
                 "their metadata on the laptop (artifacts still go to the VM's object store)")


def _read_secrets(d):
    text = d.r.stdout(cmd.read_file(d.dir + "/secrets.env"), what="reading the secrets")
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    if not out:
        raise DeployError("no secrets in %s/secrets.env" % d.dir, "deploy first")
    return out


@task(help=dict(COMMON_HELP, show="print the values", name="print only this one (e.g. "
                                                           "MFS_AIRFLOW_PASSWORD_ADMIN)"))
@boundary("secrets")
def secrets(c, show=False, name="", config=None, verbose=False):
    """The generated passwords and keys (names only, unless --show or --name)."""
    out, o, r, d = _connect(c, "secrets", verbose, config)
    d.whoami()
    values = _read_secrets(d)
    if name:
        key = name if name in values else name.upper()
        if key not in values:
            raise DeployError("no secret %s; known: %s" % (name, ", ".join(sorted(values))), "")
        out.stream.write(values[key] + "\n")
        return
    for k in sorted(values):
        out.stream.write("%s=%s\n" % (k, values[k] if show else "(hidden; --show prints it)"))


@task(iterable=["set"], help=dict(COMMON_HELP, output="the archive to write (default: "
                                                      "metaflow-services-bundle.tar)",
                                   set="any option as KEY=VALUE (repeatable)"))
@boundary("bundle")
def bundle(c, output="metaflow-services-bundle.tar", config=None, verbose=False, set=None):
    """Save every image the stack needs (for these options) into one archive."""
    out = Out(verbose)
    flags = _set_flags(set)
    o = config_mod.load(config, flags, host=getattr(c, "host", None) or "localhost")
    bundle_mod.make(o, Path(output), out)
    out.stream.write("Deploy with: fab -H HOST deploy --bundle %s\n" % output)


@task(help=COMMON_HELP)
@boundary("unlock")
def unlock(c, config=None, verbose=False):
    """Release the deploy lock left by an interrupted deploy."""
    out, o, r, d = _connect(c, "unlock", verbose, config)
    d.whoami()
    held = r.stdout("cat %s/holder 2>/dev/null || true" % cmd.q(cmd.lock_path(o.project))).strip()
    r.run(cmd.release_lock(o.project))
    out.ok("released%s" % (" (was: %s)" % held if held else " (it was not held)"))


# ---------------------------------------------------------------------------
# Users' flows and their images
# ---------------------------------------------------------------------------


@task(help=dict(
    COMMON_HELP, folder="the local folder of flows",
    delete="also remove flows on the VM that are not in the folder",
    timeout="seconds to wait for the flow-watcher (default 120)"))
@boundary("push-flows")
def push_flows(c, folder, delete=False, timeout=120, config=None, verbose=False):
    """Copy a folder of flows to the VM and wait for their DAGs.

    Only changed files are copied; each flow's DAG id and schedule, or its
    compile error, is printed."""
    out, o, r, d = _connect(c, "push-flows", verbose, config)
    d.whoami()
    _state(d)
    flows_mod.push(r, out, Path(folder), d.o.data_dir, d.o.airflow_url, delete=delete,
                   timeout=int(timeout))


@task(help=dict(COMMON_HELP, seconds="close the tunnel after this many seconds (default: "
                                     "on Ctrl-C)"))
@boundary("tunnel")
def tunnel(c, seconds=0, config=None, verbose=False):
    """Forward the UIs, metadata API and S3 to localhost over SSH.

    For VMs whose ports a firewall closes: local port = VM port + 10000."""
    out, o, r, d = _connect(c, "tunnel", verbose, config)
    d.whoami()
    st = _state(d)
    out.step("tunnel to %s over SSH" % r.host)
    flows_mod.forward(c, out, flows_mod.tunnel_ports(st), seconds=float(seconds))


def _in_scheduler(c, task_name, config, verbose, title, args):
    """Runs `metaflow-services ARGS` in the scheduler container; prints its output."""
    out, o, r, d = _connect(c, task_name, verbose, config)
    d.whoami()
    _state(d)
    out.step("%s on %s" % (title, r.host))
    for line in r.stdout(cmd.scheduler_exec(d.dir, args), what=title).splitlines():
        out.info(line)


@task(help=COMMON_HELP)
@boundary("images")
def images(c, config=None, verbose=False):
    """List the step environment images built on the VM.

    (@pypi, @conda, requirements.txt), with size and last use."""
    _in_scheduler(c, "images", config, verbose, "step environment images", "images")


@task(help=dict(COMMON_HELP, dry_run="only say what would be removed"))
@boundary("prune-images")
def prune_images(c, dry_run=False, config=None, verbose=False):
    """Remove the step environment images no DAG on the VM uses."""
    _in_scheduler(c, "prune-images", config, verbose, "removing unused step environment images",
                  "prune-images" + (" --dry-run" if dry_run else ""))
