"""Commands about the machine: what it is (preflight, read-only), Docker
Engine and Compose v2 installed and started, the deploy lock."""

from __future__ import annotations

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


