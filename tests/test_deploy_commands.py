"""The deploy's command builders (deploy/commands.py) and what the deploy
renders (deploy/stack.py), without a VM: exact command strings, and the
shell snippets run for real in temporary directories."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from support import REPO, deploy_module

cmd = deploy_module("commands")
config = deploy_module("config")
stack = deploy_module("stack")

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the snippets chown files to root and uid 50000")


def sh(script, cwd=None):
    return subprocess.run(["sh", "-c", script], cwd=cwd, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, check=True).stdout


def opts(**kw):
    o = config.Options(public_host="vm.example.com")
    for k, v in kw.items():
        config.set_option(o, k, v)
    return config.validate(o)


# ---------------------------------------------------------------------------
# Exact strings
# ---------------------------------------------------------------------------


def test_lock_commands():
    assert cmd.acquire_lock("metaflow-services", "fab deploy by ana@laptop") == (
        "mkdir -p /run/lock && if mkdir /run/lock/metaflow-services.deploy.lock 2>/dev/null; "
        "then printf '%s\\n' 'fab deploy by ana@laptop' > "
        "/run/lock/metaflow-services.deploy.lock/holder; echo acquired; "
        "else echo \"held: $(cat /run/lock/metaflow-services.deploy.lock/holder 2>/dev/null)\"; fi")
    assert cmd.release_lock("metaflow-services") == "rm -rf /run/lock/metaflow-services.deploy.lock"


def test_docker_install_commands():
    assert cmd.install_docker_distribution("debian") == (
        "DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive "
        "apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confdef "
        "-o Dpkg::Options::=--force-confold docker.io docker-cli docker-compose "
        "ca-certificates curl openssl")
    assert cmd.install_docker_distribution("ubuntu").endswith(
        "docker.io docker-compose-v2 ca-certificates curl openssl")
    ce = cmd.install_docker_ce("debian", "bookworm", "https://download.docker.com/linux")
    assert "curl -fsSL https://download.docker.com/linux/debian/gpg -o /etc/apt/keyrings/docker.asc" in ce
    assert ('echo "deb [arch=$(dpkg --print-architecture) signed-by=/etc/apt/keyrings/docker.asc] '
            'https://download.docker.com/linux/debian bookworm stable" > '
            '/etc/apt/sources.list.d/docker.list') in ce
    assert ce.endswith("docker-ce docker-ce-cli containerd.io docker-compose-plugin")


def test_apt_options():
    assert cmd.apt_options(proxy="http://cache:3142") == (
        "-o Acquire::http::Proxy=http://cache:3142 -o Acquire::https::Proxy=http://cache:3142")
    assert cmd.apt_options(mirror="http://mirror/debian") == (
        "-o Dir::Etc::SourceList=/etc/metaflow-services/apt/sources.list "
        "-o Dir::Etc::SourceParts=/etc/metaflow-services/apt/sources.list.d "
        "-o APT::Get::List-Cleanup=0")
    assert cmd.install_docker_distribution("debian", "-o Acquire::http::Proxy=x").startswith(
        "DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::http::Proxy=x update -q")


def test_compose_and_docker_commands():
    assert cmd.up("/opt/mfs") == ("cd /opt/mfs && docker compose --ansi never --progress plain "
                                  "up -d --no-build --pull never --remove-orphans")
    assert cmd.docker_daemon_config() == (
        "f=/etc/docker/daemon.json; if [ ! -e $f ]; then install -d -m 0755 /etc/docker && "
        "printf '{\\n  \"live-restore\": true\\n}\\n' > $f && "
        "{ pid=$(pidof dockerd || true); [ -z \"$pid\" ] || kill -HUP $pid; } && "
        "echo 'written (live-restore)'; elif grep -Eq "
        "'\"live-restore\"[[:space:]]*:[[:space:]]*true' $f; then echo 'live-restore on, "
        "skipped'; else echo 'exists without live-restore, left as it is'; fi")
    assert cmd.ensure_volumes(["a-postgres"]) == (
        "docker volume inspect a-postgres >/dev/null 2>&1 && echo 'exists a-postgres' || "
        "{ docker volume create a-postgres >/dev/null && echo 'created a-postgres'; }")
    assert cmd.image_ids(["postgres:17"]) == (
        "echo postgres:17 $(docker image inspect --format '{{.Id}}' postgres:17 2>/dev/null "
        "|| echo missing)")
    assert cmd.build("/opt/mfs", "airflow", "metaflow-services/airflow:1",
                     {"AIRFLOW_BASE": "apache/airflow:3.3.2"}) == (
        "cd /opt/mfs && docker build -q -t metaflow-services/airflow:1 "
        "--build-arg AIRFLOW_BASE=apache/airflow:3.3.2 airflow")
    assert cmd.logs("/opt/mfs", "proxy", 50, True) == (
        "cd /opt/mfs && docker compose --ansi never logs --no-color --tail 50 --follow proxy"
        " | sed -u 's/\\x1b\\[[0-9;]*K//g'")
    assert cmd.check_proxy(443, "/api/v2/monitor/health") == (
        "curl -sk -o /dev/null -w '%{http_code}' --max-time 10 "
        "https://127.0.0.1:443/api/v2/monitor/health")


def test_the_smoke_test_password_never_is_on_a_command_line():
    c = cmd.scheduler_exec("/opt/mfs", "doctor --smoke-test", "MFS_AIRFLOW_PASSWORD_ADMIN")
    assert c == ("cd /opt/mfs && set -a; . ./secrets.env; set +a; "
                 "MFS_DOCTOR_AIRFLOW_PASSWORD=\"$MFS_AIRFLOW_PASSWORD_ADMIN\" docker compose exec "
                 "-T -e MFS_DOCTOR_AIRFLOW_PASSWORD airflow-scheduler metaflow-services doctor "
                 "--smoke-test")


def test_self_signed_certificate_command():
    assert cmd.self_signed_cert("/opt/mfs", "10.0.0.5", True) == (
        "install -d -m 0755 /opt/mfs/tls && if [ -s /opt/mfs/tls/cert.pem ] && "
        "[ \"$(cat /opt/mfs/tls/.self-signed-for 2>/dev/null)\" = 10.0.0.5 ]; then "
        "echo 'exists, skipped'; else openssl req -x509 -newkey ec -pkeyopt "
        "ec_paramgen_curve:prime256v1 -nodes -sha256 -days 3650 -subj /CN=10.0.0.5 -addext "
        "subjectAltName=IP:10.0.0.5,DNS:localhost,IP:127.0.0.1 -keyout /opt/mfs/tls/key.pem.new -out "
        "/opt/mfs/tls/cert.pem.new 2>/dev/null && chmod 600 /opt/mfs/tls/key.pem.new && "
        "chmod 644 /opt/mfs/tls/cert.pem.new && mv -f /opt/mfs/tls/key.pem.new "
        "/opt/mfs/tls/key.pem && mv -f /opt/mfs/tls/cert.pem.new /opt/mfs/tls/cert.pem && "
        "echo 10.0.0.5 > /opt/mfs/tls/.self-signed-for && echo 'generated (self-signed)'; fi")
    assert "subjectAltName=DNS:vm.example.com" in cmd.self_signed_cert("/x", "vm.example.com",
                                                                         False)


# ---------------------------------------------------------------------------
# Parsing what the VM reports
# ---------------------------------------------------------------------------


def test_parse_proc_net_addresses():
    assert cmd.parse_proc_net_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert cmd.parse_proc_net_address("00000000:01BB") == ("0.0.0.0", 443)
    assert cmd.parse_proc_net_address("00000000000000000000000000000000:2328") == ("::", 9000)
    assert cmd.parse_proc_net_address("00000000000000000000000001000000:0016") == ("::1", 22)
    # ::ffff:10.0.0.5 (a v4-mapped listener)
    assert cmd.parse_proc_net_address("0000000000000000FFFF00000500000A:01BB") == ("10.0.0.5", 443)


def test_facts_probe_runs_and_parses_here():
    facts = cmd.parse_facts(sh(cmd.facts(["/var/lib/docker", "/nonexistent/dir"], "p")))
    assert facts["os_id"] in ("debian", "ubuntu")
    assert facts["arch"] == os.uname().machine
    assert int(facts["mem_kb"]) > 0 and int(facts["cores"]) >= 1
    # A missing directory is measured at its nearest existing parent.
    assert facts["disk"]["/nonexistent/dir"] > 0
    assert all(isinstance(p, int) for _, p in facts["listen"])


def test_parse_containers():
    line = ("proxy abc123 sha256:img running 0 deadbeef 2026-01-01T00:00:00.000Z healthy\n"
            "airflow-init def456 sha256:img2 exited 0 cafe 2026-01-01T00:00:00.000Z none\n")
    cs = cmd.parse_containers(line)
    assert cs[0] == {"service": "proxy", "config_hash": "abc123", "image": "sha256:img",
                     "state": "running", "exit_code": 0, "id": "deadbeef",
                     "started_at": "2026-01-01T00:00:00.000Z", "health": "healthy"}
    assert cs[1]["health"] == "none"


# ---------------------------------------------------------------------------
# The shell snippets, run for real
# ---------------------------------------------------------------------------


@needs_root
def test_secrets_are_generated_once_with_the_right_formats(tmp_path):
    d = str(tmp_path / "install")
    secrets = stack.secrets(opts(**{"airflow.users": "admin:admin,ana:op"}))
    out = sh(cmd.ensure_secrets(d, secrets))
    assert out.startswith("generated: MFS_POSTGRES_PASSWORD")
    f = Path(d) / "secrets.env"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in f.read_text().splitlines())
    assert set(values) == {s.name for s in secrets}
    for s in secrets:
        v = values[s.name]
        if s.kind == "password":
            assert len(v) == s.length and v.isalnum(), (s.name, v)
        elif s.kind == "hex":
            assert len(v) == 64 and int(v, 16) >= 0
        else:  # a valid Fernet key for Airflow
            from cryptography.fernet import Fernet

            Fernet(v.encode())
    assert len(set(values.values())) == len(values)
    # Never regenerated; a missing one is added alone.
    before = f.read_text()
    assert sh(cmd.ensure_secrets(d, secrets)).strip() == "all present, skipped"
    assert f.read_text() == before
    f.write_text("".join(ln + "\n" for ln in before.splitlines()
                         if not ln.startswith("MFS_S3_SECRET_KEY=")))
    assert sh(cmd.ensure_secrets(d, secrets)).strip() == "generated: MFS_S3_SECRET_KEY"
    after = dict(line.split("=", 1) for line in f.read_text().splitlines())
    assert {k: v for k, v in after.items() if k != "MFS_S3_SECRET_KEY"} == \
        {k: v for k, v in values.items() if k != "MFS_S3_SECRET_KEY"}


@needs_root
def test_write_file_only_writes_changes(tmp_path):
    p = str(tmp_path / "sub" / "settings.env")
    assert sh(cmd.write_file(p, "A=1\n", "0600")).strip() == "written"
    assert Path(p).read_text() == "A=1\n" and stat.S_IMODE(os.stat(p).st_mode) == 0o600
    mtime = os.stat(p).st_mtime_ns
    assert sh(cmd.write_file(p, "A=1\n", "0600")).strip() == "unchanged"
    assert os.stat(p).st_mtime_ns == mtime
    assert sh(cmd.write_file(p, "A=2\n", "0600")).strip() == "written"
    assert base64.b64encode(b"A=2\n").decode() in cmd.write_file(p, "A=2\n")


@needs_root
def test_env_is_settings_plus_secrets(tmp_path):
    (tmp_path / "settings.env").write_text("A=1\n")
    (tmp_path / "secrets.env").write_text("S=2\n")
    assert sh(cmd.assemble_env(str(tmp_path))).strip() == "written"
    assert (tmp_path / ".env").read_text() == "A=1\nS=2\n"
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600
    assert sh(cmd.assemble_env(str(tmp_path))).strip() == "unchanged"


@needs_root
def test_unpack_stack_replaces_files_and_removes_stale_ones(tmp_path):
    d = tmp_path / "install"
    d.mkdir()
    (d / "old.yaml").write_text("stale")
    (d / ".stack-files").write_text("old.yaml\ncompose.yaml\n")
    (d / "secrets.env").write_text("KEEP=1\n")
    blob, sha = stack.stack_archive()
    archive = tmp_path / "stack.tar"
    archive.write_bytes(blob)
    sh(cmd.unpack_stack(str(d), str(archive), sha, stack.STACK_FILES))
    assert not (d / "old.yaml").exists() and (d / "secrets.env").read_text() == "KEEP=1\n"
    assert (d / ".stack-sha256").read_text().strip() == sha
    for rel in stack.STACK_FILES:
        assert (d / rel).read_bytes() == (stack.COMPOSE_DIR / rel).read_bytes()
    assert not archive.exists()
    # Reproducible: the same files give the same digest.
    assert stack.stack_archive()[1] == sha
    with tarfile.open(fileobj=__import__("io").BytesIO(blob)) as t:
        assert sorted(t.getnames()) == sorted(stack.STACK_FILES)


@needs_root
def test_airflow_passwords_file(tmp_path):
    (tmp_path / "secrets.env").write_text("MFS_AIRFLOW_PASSWORD_ADMIN=abc123\n"
                                          "MFS_AIRFLOW_PASSWORD_ANA=xyz789\n")
    assert sh(cmd.airflow_passwords(str(tmp_path), ["admin", "ana"], 50000)).strip() == "written"
    f = tmp_path / "state" / "airflow-auth" / "passwords.json"
    assert json.loads(f.read_text()) == {"admin": "abc123", "ana": "xyz789"}
    assert f.stat().st_uid == 50000 and stat.S_IMODE(f.stat().st_mode) == 0o600
    assert sh(cmd.airflow_passwords(str(tmp_path), ["admin", "ana"], 50000)).strip() == "unchanged"


@needs_root
def test_the_token_signing_key_is_made_once_for_the_airflow_user_only(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    state, sha = sh(cmd.jwt_signing_key(str(tmp_path), 50000)).split()
    assert state == "generated" and len(sha) == 16
    key = tmp_path / "state" / "airflow-jwt" / "signing-key.pem"
    assert isinstance(load_pem_private_key(key.read_bytes(), None), Ed25519PrivateKey)
    assert (key.stat().st_uid, stat.S_IMODE(key.stat().st_mode)) == (50000, 0o600)
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert sh(cmd.jwt_signing_key(str(tmp_path), 50000)).split() == ["exists", sha]


@needs_root
def test_self_signed_certificate_is_made_once_per_host(tmp_path):
    from cryptography import x509

    d = str(tmp_path)
    assert sh(cmd.self_signed_cert(d, "10.1.2.3", True)).strip() == "generated (self-signed)"
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The VM's address, and localhost for `fab tunnel`.
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert stat.S_IMODE((tmp_path / "tls" / "key.pem").stat().st_mode) == 0o600
    assert sh(cmd.self_signed_cert(d, "10.1.2.3", True)).strip() == "exists, skipped"
    assert sh(cmd.self_signed_cert(d, "vm.example.com", False)).strip() == "generated (self-signed)"


@needs_root
def test_smoke_pending_marker(tmp_path):
    d = str(tmp_path)
    assert sh(cmd.smoke_pending(d, "get")).strip() == "no"
    sh(cmd.smoke_pending(d, "set"))
    assert sh(cmd.smoke_pending(d, "get")).strip() == "yes"
    sh(cmd.smoke_pending(d, "clear"))
    assert sh(cmd.smoke_pending(d, "get")).strip() == "no"


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


def _svcs():
    return {"postgres": stack.Service("postgres", "postgres", False, "compose.yaml"),
            "airflow-init": stack.Service("airflow-init", "airflow", True, "compose.yaml"),
            "proxy": stack.Service("proxy", "proxy", False, "compose.yaml")}


def _c(service, h, image="img", state="running", code=0):
    return {"service": service, "config_hash": h, "image": image, "state": state,
            "exit_code": code, "id": service + "-id", "started_at": "", "health": "healthy"}


def test_plan_nothing_changed():
    containers = [_c("postgres", "h1"), _c("airflow-init", "h2", state="exited"),
                  _c("proxy", "h3")]
    p = stack.plan(_svcs(), {"postgres": "h1", "airflow-init": "h2", "proxy": "h3"},
                   containers, {"postgres": "img", "airflow-init": "img", "proxy": "img"})
    assert not p.changed and p.lines() == []


def test_plan_changes():
    containers = [_c("postgres", "h1", image="old"), _c("airflow-init", "h2", state="exited",
                                                        code=1),
                  _c("proxy", "old-hash"), _c("minio", "h9")]
    p = stack.plan(_svcs(), {"postgres": "h1", "airflow-init": "h2", "proxy": "h3"}, containers,
                   {"postgres": "new", "airflow-init": "img", "proxy": "img"})
    assert p.lines() == ["airflow-init: run again (last run failed)",
                         "postgres: recreate (new image)",
                         "proxy: recreate (configuration changed)",
                         "minio: remove (no longer part of the stack)"]
    p = stack.plan(_svcs(), {"postgres": "h1"}, [_c("postgres", "h1", state="exited")],
                   {"postgres": "img"})
    assert p.actions == {"postgres": "start (exited)", "airflow-init": "create", "proxy": "create"}


# ---------------------------------------------------------------------------
# What the deploy renders
# ---------------------------------------------------------------------------


def test_services_follow_the_options():
    names = set(stack.services(opts()))
    assert {"metadata", "metaflow-ui-backend", "metaflow-ui", "metaflow-migrate",
            "seaweedfs"} <= names and "minio" not in names and "step-image" not in names
    names = set(stack.services(opts(metaflow_services="off", object_store="minio")))
    assert "minio" in names and not names & {"metadata", "seaweedfs", "metaflow-ui"}
    assert stack.services(opts())["airflow-init"].one_shot
    assert not stack.services(opts())["proxy"].one_shot


def test_images_are_pinned_and_overridable():
    imgs = stack.images(opts())
    for role, ref in imgs.items():
        assert ":" in ref and not ref.endswith(":latest"), ref
    assert imgs["postgres"].startswith("postgres:17")
    assert imgs["airflow"].startswith("metaflow-services/airflow:0.1.0-")  # built, by content
    assert stack.images(opts(**{"images.postgres": "mirror/postgres:17"}))["postgres"] == \
        "mirror/postgres:17"
    assert "step" not in stack.images(opts(executor="subprocess"))
    # A different base image is a different build.
    assert stack.images(opts(**{"images.airflow_base": "x/airflow:1"}))["airflow"] != imgs["airflow"]


def test_sizing_fits_the_vm():
    o = opts()
    assert stack.sizing(o, cores=2, memory_gb=3.8) == (4, 1)
    assert stack.sizing(o, cores=8, memory_gb=32) == (16, 2)
    assert stack.sizing(o, cores=1, memory_gb=16) == (4, 1)
    assert stack.sizing(opts(**{"airflow.parallelism": "6"}), cores=2, memory_gb=3.8) == (6, 1)


def test_settings_env():
    env = stack.settings_env(opts(**{"ports.https": "8443", "ports.metaflow": "9443"}),
                             {"docker_gid": "998", "cores": 2, "memory_gb": 3.8,
                              "tls_sha": "abcd"})
    values = dict(line.split("=", 1) for line in env.splitlines() if not line.startswith("#"))
    assert values["COMPOSE_FILE"] == "compose.yaml:metaflow.yaml"
    assert values["COMPOSE_PROFILES"] == "seaweedfs"
    assert values["MFS_AIRFLOW_URL"] == "https://vm.example.com:8443"
    assert values["MFS_METAFLOW_UI_URL"] == "https://vm.example.com:9443"
    assert values["MFS_DOCKER_GID"] == "998" and values["MFS_TLS_SHA"] == "abcd"
    assert values["MFS_AIRFLOW_PARALLELISM"] == "4"
    assert not any("PASSWORD" in k or "SECRET" in k for k in values)
    env = stack.settings_env(opts(metaflow_services="no", object_store="minio"),
                             {"docker_gid": "1", "cores": 2, "memory_gb": 4, "tls_sha": "x"})
    values = dict(line.split("=", 1) for line in env.splitlines() if not line.startswith("#"))
    assert values["COMPOSE_FILE"] == "compose.yaml"
    assert values["MFS_S3_INTERNAL_URL"] == "http://minio:9000"
    assert values["MFS_S3_UPSTREAM"] == "minio:9000"


def test_status_warns_about_nearly_full_disks_once_each():
    status = deploy_module("status")
    df = ("/dev/vda1 41152736 37037462 4115274 91% /\n"          # 91% used
          "/dev/vda1 41152736 37037462 4115274 91% /\n"          # the same file system again
          "/dev/vdb 104857600 10485760 94371840 10% /srv\n"      # fine
          "/dev/vdc 20971520 16777216 3145728 84% /var/backups\n")  # 3 GB free
    warnings = status.disk_warnings(df)
    assert len(warnings) == 2
    assert warnings[0].startswith("low disk on /: 91% used, 3.9 GB free")
    assert warnings[1].startswith("low disk on /var/backups: 84% used, 3.0 GB free")
    assert status.disk_warnings("/dev/vdb 104857600 10485760 94371840 10% /srv\n") == []


def test_backup_options_are_checked():
    for key, value, expected in (("backup.schedule", "2:30", "expected HH:MM"),
                                 ("backup.schedule", "24:00", "expected HH:MM"),
                                 ("backup.keep", "0", "at least 1"),
                                 ("backup.dir", "/opt/metaflow-services", "an absolute path of its own"),
                                 ("retention.task_logs_days", "-1", "0 (never) or more")):
        with pytest.raises(config.ConfigError, match=r"%s.*%s" % (key.replace(".", r"\."),
                                                                  re.escape(expected))):
            opts(**{key: value})
    assert opts(**{"backup.schedule": "02:30"}).backup.schedule == "02:30"


def _remote():
    """Remote driving an invoke Context: the commands run for real in a local
    shell instead of over SSH."""
    import invoke

    remote = deploy_module("remote")
    c = invoke.Context()
    c.user, c.host, c.port = "root", "localhost", 22
    r = remote.Remote(c, remote.Out())
    r.sudo_mode = "root"
    return remote, r


def test_a_process_runc_failed_to_start_is_run_again(tmp_path, capsys):
    """Docker 26's runc intermittently loses its init process before it runs
    anything ("read init-p: connection reset by peer"); the deploy tries the
    command again instead of failing the whole deploy."""
    remote, r = _remote()
    marker = tmp_path / "tries"
    script = ('echo x >> %s; if [ $(wc -l < %s) -lt 2 ]; then echo "OCI runtime exec failed: '
              'waiting for init preliminary setup: read init-p: connection reset by peer: '
              'unknown" >&2; exit 126; fi; echo started' % (marker, marker))
    assert r.stdout(script, what="exec").strip() == "started"
    assert marker.read_text().count("x") == 2
    assert "trying again" in capsys.readouterr().out


def test_other_failures_are_not_run_again(tmp_path):
    remote, r = _remote()
    marker = tmp_path / "tries"
    with pytest.raises(remote.DeployError) as e:
        r.run("echo x >> %s; echo 'no such service' >&2; exit 1" % marker, what="compose up")
    assert marker.read_text().count("x") == 1
    assert "compose up failed (exit 1): no such service" in str(e.value)
    # warn=True: the caller gets the failed result, once.
    assert r.run("echo x >> %s; exit 3" % marker, warn=True).exited == 3
    assert marker.read_text().count("x") == 2


def test_small_file_operations_as_exact_strings():
    assert cmd.remove_files("/a b", "/c") == "rm -f '/a b' /c"
    assert cmd.move_into_fresh_folder("/tmp/w.whl", "/opt/x/wheels") == \
        "rm -rf /opt/x/wheels && install -d /opt/x/wheels && mv /tmp/w.whl /opt/x/wheels/"
    assert cmd.private_copy("/b/a.tar", "/tmp/a.tar", "ana") == \
        "install -m 0600 -o ana /b/a.tar /tmp/a.tar"
    assert cmd.maintenance("/opt/m", "backup", exec_=True) == \
        "cd /opt/m && docker compose exec -T maintenance metaflow-services backup"
    assert cmd.maintenance("/opt/m", "restore x.tar") == \
        "cd /opt/m && docker compose run --rm --no-deps -T maintenance metaflow-services restore x.tar"
    assert cmd.airflow_edge("/opt/m", "edge-worker", "maintenance on --wait") == \
        "cd /opt/m && docker compose exec -T edge-worker airflow edge maintenance on --wait"
    assert cmd.compose_down("/opt/m") == \
        "if [ -f /opt/m/.env ]; then cd /opt/m && docker compose down --remove-orphans --timeout 60; fi"
    assert cmd.delete_data(["p-postgres", "p-seaweedfs"], ["/opt/m", "/srv/m"]) == \
        "docker volume rm -f p-postgres p-seaweedfs >/dev/null; rm -rf /opt/m /srv/m"
    assert cmd.disk_free(["/var/lib/docker", "/srv/m"]) == "df -P -k /var/lib/docker /srv/m | sed 1d"


def test_file_operations_run_for_real(tmp_path):
    """What destroy keeps, what backups lists, what push-flows compares."""
    d = tmp_path / "install"
    for name in ("secrets.env", "tls/cert.pem", "compose.yaml", "state/deploy.json"):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(name)
    sh(cmd.remove_stack_files(str(d), ["secrets.env", "tls"]))
    assert sorted(p.name for p in d.iterdir()) == ["secrets.env", "tls"]
    b = tmp_path / "backups"
    b.mkdir()
    (b / "metaflow-services-backup-1.tar").write_bytes(b"x" * 10)
    (b / "other.txt").write_text("no")
    listed = sh(cmd.list_files(str(b), "metaflow-services-backup-*.tar")).split()
    assert listed[:2] == [str(b / "metaflow-services-backup-1.tar"), "10"]
    assert sh(cmd.list_files(str(tmp_path / "none"), "*")) == ""
    (d / ".hidden").write_text("h")
    digests = sh(cmd.file_digests(str(d)))
    assert "./secrets.env" in digests and "./tls/cert.pem" in digests and ".hidden" not in digests
    assert sh(cmd.existing_deployment(str(d), "no-such-project-xyz")).strip() == ""
