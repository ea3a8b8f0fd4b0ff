"""Builders of the commands the deploy runs on the VM.

Each function returns the shell text of one remote command and never
connects; the tasks (tasks.py) run them, as root (directly or through sudo).
Unit tests pin them as exact strings. Every command is safe to run again:
it checks before it acts and says what it did ("exists, skipped").
"""

from __future__ import annotations

import base64
import ipaddress
import shlex

q = shlex.quote

APT_ENV = "DEBIAN_FRONTEND=noninteractive"
# Keep configuration files that already exist (never prompt).
DPKG_KEEP = "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"

# Distribution packages of Docker Engine and Compose v2, where the distribution
# ships Compose v2 (Debian 13, Ubuntu 24.04 and later). docker-cli is a
# separate package in Debian 13.
DISTRO_DOCKER = {
    "debian": ["docker.io", "docker-cli", "docker-compose"],
    "ubuntu": ["docker.io", "docker-compose-v2"],
}
DOCKER_CE = ["docker-ce", "docker-ce-cli", "containerd.io", "docker-compose-plugin"]
# Besides Docker: certificates (pulls, the S3 endpoint), curl (health checks
# of the proxy from the VM), openssl (the self-signed certificate).
PREREQUISITES = ["ca-certificates", "curl", "openssl"]


# ---------------------------------------------------------------------------
# Preflight (read-only)
# ---------------------------------------------------------------------------


def whoami() -> str:
    """Who we are and whether sudo works without a password (no sudo yet)."""
    return ('printf "user=%s\\nuid=%s\\n" "$(id -un)" "$(id -u)"; '
            'if [ "$(id -u)" = 0 ]; then echo sudo=root; '
            'elif sudo -n true 2>/dev/null; then echo sudo=ok; '
            'elif command -v sudo >/dev/null 2>&1; then echo sudo=password; '
            'else echo sudo=missing; fi')


def facts(paths, project) -> str:
    """Everything preflight checks, as key=value lines; changes nothing.

    paths: directories whose file system needs free space (the nearest
    existing parent is measured)."""
    df = " ".join(q(p) for p in paths)
    return "\n".join([
        ". /etc/os-release 2>/dev/null || true",
        'echo "os_id=${ID:-unknown}"',
        'echo "os_version=${VERSION_ID:-unknown}"',
        'echo "os_codename=${VERSION_CODENAME:-}"',
        'echo "os_name=${PRETTY_NAME:-unknown}"',
        'echo "arch=$(uname -m)"',
        "echo \"mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)\"",
        'echo "cores=$(nproc 2>/dev/null || grep -c ^processor /proc/cpuinfo)"',
        "for p in %s; do d=$p; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; "
        "echo \"disk $p $(df -Pk \"$d\" | awk 'NR==2 {print $4}')\"; done" % df,
        # Listening TCP sockets, raw (parsed on the workstation).
        "awk 'NR>1 && $4==\"0A\" {print \"listen \" $2}' /proc/net/tcp /proc/net/tcp6 2>/dev/null",
        'if command -v docker >/dev/null 2>&1; then',
        '  echo "docker_cli=$(docker version --format "{{.Client.Version}}" 2>/dev/null)"',
        '  echo "docker_server=$(docker version --format "{{.Server.Version}}" 2>/dev/null)"',
        '  echo "compose=$(docker compose version --short 2>/dev/null)"',
        # Ports our own proxy publishes are not "in use by something else".
        "  docker ps --filter label=com.docker.compose.project=%s --format "
        "'{{.Ports}}' 2>/dev/null | tr ',' '\\n' | sed -n 's/.*:\\([0-9]*\\)->.*/ours \\1/p'"
        % q(project),
        "fi",
        '[ -d /run/systemd/system ] && echo "init=systemd" || echo "init=other"',
    ])


def parse_facts(text) -> dict:
    out = {"disk": {}, "listen": [], "ours": set()}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("disk "):
            _, path, kb = (line.split() + ["", ""])[:3]
            out["disk"][path] = int(kb) if kb.isdigit() else None
        elif line.startswith("listen "):
            out["listen"].append(parse_proc_net_address(line.split()[1]))
        elif line.startswith("ours "):
            out["ours"].add(int(line.split()[1]))
        elif "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def parse_proc_net_address(field):
    """'0100007F:1F90' (from /proc/net/tcp, or tcp6's 32 hex digits) ->
    ('127.0.0.1', 8080)."""
    addr, port = field.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw[::-1])
    else:  # four little-endian 32-bit words
        ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
        if ip.ipv4_mapped:
            ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


# ---------------------------------------------------------------------------
# Docker Engine and Compose v2
# ---------------------------------------------------------------------------


def apt_options(mirror="", proxy="", distro="", codename=""):
    """apt-get options: an HTTP proxy, and/or a mirror used for this install
    only (a temporary sources list; the system's sources stay as they are)."""
    opts = []
    if proxy:
        opts += ["-o Acquire::http::Proxy=%s" % q(proxy), "-o Acquire::https::Proxy=%s" % q(proxy)]
    if mirror:
        opts += ["-o Dir::Etc::SourceList=/etc/metaflow-services/apt/sources.list",
                 "-o Dir::Etc::SourceParts=/etc/metaflow-services/apt/sources.list.d",
                 "-o APT::Get::List-Cleanup=0"]
    return " ".join(opts)


def apt_mirror_sources(mirror, distro, codename) -> str:
    """Writes the temporary sources list used with install.apt_mirror."""
    components = "main universe" if distro == "ubuntu" else "main"
    lines = ["deb %s %s %s" % (mirror, codename, components),
             "deb %s %s-updates %s" % (mirror, codename, components)]
    return ("install -d /etc/metaflow-services/apt/sources.list.d && printf '%%s\\n' %s "
            "> /etc/metaflow-services/apt/sources.list" % " ".join(q(line) for line in lines))


def install_docker_distribution(distro, apt_opts="") -> str:
    pkgs = DISTRO_DOCKER[distro] + PREREQUISITES
    return ("%s apt-get %s update -q && %s apt-get %s install -y -q --no-install-recommends %s %s"
            % (APT_ENV, apt_opts, APT_ENV, apt_opts, DPKG_KEEP, " ".join(pkgs))).replace("  ", " ")


def install_docker_ce(distro, codename, repo, apt_opts="") -> str:
    """Docker's own apt repository (Debian 12, Ubuntu 22.04: their packaged
    Compose is v1 or missing)."""
    url = "%s/%s" % (repo.rstrip("/"), distro)
    source = ("deb [arch=$(dpkg --print-architecture) signed-by=/etc/apt/keyrings/docker.asc] "
              "%s %s stable" % (url, codename))
    steps = [
        "%s apt-get %s update -q" % (APT_ENV, apt_opts),
        "%s apt-get %s install -y -q --no-install-recommends %s %s"
        % (APT_ENV, apt_opts, DPKG_KEEP, " ".join(PREREQUISITES)),
        "install -m 0755 -d /etc/apt/keyrings",
        "curl -fsSL %s -o /etc/apt/keyrings/docker.asc" % q(url + "/gpg"),
        "chmod a+r /etc/apt/keyrings/docker.asc",
        'echo "%s" > /etc/apt/sources.list.d/docker.list' % source,
        "%s apt-get %s update -q" % (APT_ENV, apt_opts),
        "%s apt-get %s install -y -q --no-install-recommends %s %s"
        % (APT_ENV, apt_opts, DPKG_KEEP, " ".join(DOCKER_CE)),
    ]
    return " && ".join(s.replace("  ", " ") for s in steps)


def install_prerequisites(apt_opts="") -> str:
    """Only what is missing of curl/openssl/CA certificates (Docker present)."""
    return ("missing=''; for p in %s; do dpkg -s $p >/dev/null 2>&1 || missing=\"$missing $p\"; "
            "done; if [ -n \"$missing\" ]; then %s apt-get %s update -q && %s apt-get %s install "
            "-y -q --no-install-recommends %s $missing; echo \"installed:$missing\"; "
            "else echo 'all present, skipped'; fi"
            % (" ".join(PREREQUISITES), APT_ENV, apt_opts, APT_ENV, apt_opts, DPKG_KEEP)
            ).replace("  ", " ")


def start_docker() -> str:
    """Start the engine with the host's init system (systemd, else the init
    script), or run dockerd directly where neither works (containers, VMs
    without an init system); enable it at boot where that exists."""
    return "\n".join([
        "up() { docker info >/dev/null 2>&1; }",
        "wait_up() { i=0; while [ $i -lt $1 ]; do up && return 0; sleep 1; i=$((i+1)); done; return 1; }",
        'if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then',
        "  systemctl enable docker.service >/dev/null 2>&1 || true",
        "fi",
        "if up; then echo 'running, skipped'; exit 0; fi",
        'if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then',
        "  systemctl start docker.service && wait_up 60 && { echo 'started (systemd)'; exit 0; }",
        "elif [ -x /etc/init.d/docker ]; then",
        "  /etc/init.d/docker start >/dev/null 2>&1 && wait_up 60 "
        "&& { echo 'started (init script)'; exit 0; }",
        "fi",
        "nohup dockerd >>/var/log/dockerd.log 2>&1 </dev/null &",
        "wait_up 90 && { echo 'started (dockerd directly; it will not start at boot)'; exit 0; }",
        "echo 'dockerd did not start; see /var/log/docker.log or /var/log/dockerd.log' >&2",
        "exit 1",
    ])


def docker_daemon_config() -> str:
    """Docker's live-restore: containers keep running while the daemon
    restarts (package upgrades, `service docker restart`), so the stack is not
    stopped by them. Written only if the host has no daemon.json yet (an
    existing one is the administrator's: reported, not changed); applied with
    a reload (SIGHUP), which restarts nothing."""
    return ("f=/etc/docker/daemon.json; "
            "if [ ! -e $f ]; then install -d -m 0755 /etc/docker && "
            "printf '{\\n  \"live-restore\": true\\n}\\n' > $f && "
            "{ pid=$(pidof dockerd || true); [ -z \"$pid\" ] || kill -HUP $pid; } && "
            "echo 'written (live-restore)'; "
            "elif grep -Eq '\"live-restore\"[[:space:]]*:[[:space:]]*true' $f; then "
            "echo 'live-restore on, skipped'; "
            "else echo 'exists without live-restore, left as it is'; fi")


def docker_versions() -> str:
    return ("echo \"server=$(docker version --format '{{.Server.Version}}')\"; "
            "echo \"compose=$(docker compose version --short)\"; "
            "echo \"docker_gid=$(getent group docker | cut -d: -f3)\"")


# ---------------------------------------------------------------------------
# Lock
# ---------------------------------------------------------------------------


def lock_path(project):
    return "/run/lock/%s.deploy.lock" % project


def acquire_lock(project, holder) -> str:
    """mkdir is atomic: exactly one of two concurrent deploys gets the lock."""
    d = lock_path(project)
    return ("mkdir -p /run/lock && if mkdir %s 2>/dev/null; then printf '%%s\\n' %s > %s/holder; "
            "echo acquired; else echo \"held: $(cat %s/holder 2>/dev/null)\"; fi"
            % (q(d), q(holder), q(d), q(d)))


def release_lock(project) -> str:
    return "rm -rf %s" % q(lock_path(project))


# ---------------------------------------------------------------------------
# Files, secrets, certificate
# ---------------------------------------------------------------------------


def read_file(path) -> str:
    return "cat %s 2>/dev/null || true" % q(path)


def write_file(path, content, mode="0644", owner="root:root") -> str:
    """Write *content* (no secrets: it is part of the command) to *path*
    atomically, only if it differs; prints 'unchanged' or 'written'."""
    data = base64.b64encode(content.encode()).decode()
    return install_if_changed("printf %%s %s | base64 -d" % data, path, mode, owner)


def install_uploaded(src, path, mode="0600", owner="root:root") -> str:
    """Move a file uploaded to a private temporary folder into place (for
    files that must not appear on a command line, like a TLS key)."""
    return install_if_changed("cat %s" % q(src), path, mode, owner) + \
        " && rm -rf \"$(dirname %s)\"" % q(src)


def install_if_changed(producer, path, mode, owner) -> str:
    p = q(path)
    tmp = q(path + ".new")
    return ("install -d -m 0755 \"$(dirname %s)\" && (umask 077 && %s > %s) && "
            "if cmp -s %s %s; then rm -f %s; echo unchanged; else chmod %s %s && chown %s %s "
            "&& mv -f %s %s && echo written; fi"
            % (p, producer, tmp, tmp, p, tmp, mode, tmp, owner, tmp, tmp, p))


def unpack_stack(install_dir, archive, sha, files) -> str:
    """Extract the stack's files into install_dir (replacing them) and record
    the archive's digest; files of an older stack that are gone are removed."""
    d = q(install_dir)
    listed = " ".join(q(f) for f in files)
    return ("install -d -m 0755 %s && old=$(cat %s/.stack-files 2>/dev/null || true) && "
            "tar -C %s --no-same-owner -xf %s && "
            "for f in $old; do case \" %s \" in *\" $f \"*) ;; *) rm -f %s/$f;; esac; done && "
            "printf '%%s\\n' %s > %s/.stack-files && echo %s > %s/.stack-sha256 && rm -f %s"
            % (d, d, d, q(archive), listed, d, listed, d, q(sha), d, q(archive)))


def ensure_secrets(install_dir, secrets) -> str:
    """Append every missing secret to secrets.env (mode 0600, root); existing
    ones are never changed. Prints the names generated (never values)."""
    f = q(install_dir + "/secrets.env")
    gen = {
        # 48 random bytes, base64, only letters and digits kept: about 60
        # characters of which the first N are used.
        "password": "head -c 48 /dev/urandom | base64 | tr -dc A-Za-z0-9 | head -c %d",
        "hex": "head -c %d /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        # Fernet: url-safe base64 of 32 random bytes.
        "fernet": "head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '\\n'%.0s",
    }
    lines = ["set -e", "umask 077", "install -d -m 0755 %s" % q(install_dir),
             "touch %s" % f, "chmod 600 %s" % f, "chown root:root %s" % f, "new=''"]
    for s in secrets:
        length = s.length // 2 if s.kind == "hex" else s.length
        cmd = gen[s.kind] % length
        lines.append("grep -q '^%s=' %s || { v=$(%s); [ -n \"$v\" ] && printf '%s=%%s\\n' \"$v\" "
                     ">> %s && new=\"$new %s\"; }" % (s.name, f, cmd, s.name, f, s.name))
    lines.append('if [ -n "$new" ]; then echo "generated:$new"; else echo "all present, skipped"; fi')
    return "\n".join(lines)


def self_signed_cert(install_dir, host, is_ip) -> str:
    """A self-signed certificate for *host*, made once; made again only if the
    host changed (a new public_host)."""
    d = q(install_dir + "/tls")
    # localhost too: `fab tunnel` brings the entry points to this workstation.
    san = (("IP:%s" % host) if is_ip else ("DNS:%s" % host)) + ",DNS:localhost,IP:127.0.0.1"
    return ("install -d -m 0755 %s && "
            "if [ -s %s/cert.pem ] && [ \"$(cat %s/.self-signed-for 2>/dev/null)\" = %s ]; then "
            "echo 'exists, skipped'; else "
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 "
            "-days 3650 -subj %s -addext %s -keyout %s/key.pem.new -out %s/cert.pem.new "
            "2>/dev/null && chmod 600 %s/key.pem.new && chmod 644 %s/cert.pem.new && "
            "mv -f %s/key.pem.new %s/key.pem && mv -f %s/cert.pem.new %s/cert.pem && "
            "echo %s > %s/.self-signed-for && echo 'generated (self-signed)'; fi"
            % (d, d, d, q(host), q("/CN=%s" % host), q("subjectAltName=%s" % san),
               d, d, d, d, d, d, d, d, q(host), d))


def tls_fingerprint(install_dir) -> str:
    return "sha256sum %s/tls/cert.pem %s/tls/key.pem | sha256sum | cut -c1-16" % (
        q(install_dir), q(install_dir))


def assemble_env(install_dir) -> str:
    """.env = settings + secrets (what every `docker compose` in install_dir
    reads), rewritten only if it changed."""
    d = q(install_dir)
    return ("cd %s && umask 077 && cat settings.env secrets.env > .env.new && "
            "if cmp -s .env.new .env; then rm -f .env.new; echo unchanged; "
            "else chmod 600 .env.new && mv -f .env.new .env && echo written; fi" % d)


def airflow_passwords(install_dir, users, uid) -> str:
    """The simple auth manager's passwords file, from the generated secrets
    (owned by the airflow user, which must be able to rewrite it)."""
    from .stack import airflow_password_var

    d = q(install_dir)
    auth = "%s/state/airflow-auth" % install_dir
    parts = ", ".join('\\"%s\\": \\"%%s\\"' % u for u in users)
    args = " ".join('"$%s"' % airflow_password_var(u) for u in users)
    return ("set -e; cd %s; set -a; . ./secrets.env; set +a; install -d -m 0700 -o %d -g 0 %s; "
            "umask 077; printf \"{%s}\\n\" %s > %s/passwords.json.new; "
            "if cmp -s %s/passwords.json.new %s/passwords.json; then rm -f %s/passwords.json.new; "
            "echo unchanged; else chown %d:0 %s/passwords.json.new && "
            "mv -f %s/passwords.json.new %s/passwords.json && echo written; fi"
            % (d, uid, q(auth), parts, args, q(auth), q(auth), q(auth), q(auth), uid, q(auth),
               q(auth), q(auth)))


def data_dirs(data_dir, uid, group, login_user) -> str:
    """dags/ and flows/ under data_dir: writable by the airflow user (which
    compiles into dags/) and by members of *group* (users on the VM)."""
    dd = q(data_dir)
    add_user = ""
    if login_user and login_user != "root":
        add_user = (" && if ! id -nG %s | tr ' ' '\\n' | grep -qx %s; then usermod -aG %s %s "
                    "&& echo 'added %s to group %s'; fi"
                    % (q(login_user), q(group), q(group), q(login_user), login_user, group))
    return ("(getent group %s >/dev/null || groupadd --system %s) && "
            "install -d -m 0755 %s && "
            "install -d -m 2775 -o %d -g %s %s/dags %s/flows && "
            "chown %d:%s %s/dags %s/flows && chmod 2775 %s/dags %s/flows && echo ready%s"
            % (q(group), q(group), dd, uid, q(group), dd, dd, uid, q(group), dd, dd, dd, dd,
               add_user))


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


def build(install_dir, service, tag, args) -> str:
    """docker build of a stack image from its directory in install_dir."""
    build_args = " ".join("--build-arg %s" % q("%s=%s" % kv) for kv in sorted(args.items()))
    return ("cd %s && docker build -q -t %s %s %s" % (q(install_dir), q(tag), build_args,
                                                        q(service))).replace("  ", " ")


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


def scheduler_exec(install_dir, args, password_var=None) -> str:
    """metaflow-services in the scheduler container (it has the task runtime's
    environment). A password is passed from secrets.env by name, so it is
    never on a command line."""
    env = ""
    prefix = ""
    if password_var:
        prefix = "set -a; . ./secrets.env; set +a; MFS_DOCTOR_AIRFLOW_PASSWORD=\"$%s\" " % password_var
        env = "-e MFS_DOCTOR_AIRFLOW_PASSWORD "
    return ("cd %s && %sdocker compose exec -T %sairflow-scheduler metaflow-services %s"
            % (q(install_dir), prefix, env, args))


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
