"""A bare Debian 13 "VM" for the deploy tests: a freshly debootstrapped root
file system with sshd, booted in its own network, mount, PID and UTS
namespaces.

Why namespaces rather than a plain chroot: the deploy installs and starts a
Docker engine inside the VM while the host's Docker engine keeps running (other
tests use it). In its own network namespace the VM's dockerd has its own
iptables, docker0 bridge and published ports, and cannot fight the host's. The
PID namespace makes shutdown exact (killing its init kills every process the
VM started, containers included) and the mount namespace keeps Docker's
overlay mounts out of the host's mount table.

Networking: a veth pair, 10.213.0.1 (host) <-> 10.213.0.2 (VM). The VM gets
outbound access (apt must download docker.io from Debian) through NAT on the
host for that /30 only; nothing else is routed. Tests only ever connect to
10.213.0.2. A second VM (index 1, for worker tests) is 10.213.1.2 in its own
namespace; it reaches the first VM's address through the host, as a second
machine on the same network would.

Nothing here is specific to the code under test: it is the "cloud provider".
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NETNS = "mfs-deploy-vm"
VETH_HOST, VETH_VM = "mfsvm-h", "mfsvm-v"
HOST_IP, VM_IP, PREFIX = "10.213.0.1", "10.213.0.2", 30
SUBNET = "10.213.0.0/30"
TEST_VMS = "10.213.0.0/16"      # every test VM's /30 lies in it
# What a minimal cloud image of Debian 13 has besides the base system.
VM_PACKAGES = ["openssh-server", "sudo", "curl", "ca-certificates"]
REPO = Path(__file__).resolve().parents[2]


def sh(*argv, check=True, capture=False, input=None, timeout=None, env=None):
    return subprocess.run(list(argv), check=check, text=True, input=input, timeout=timeout,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None, env=env)


def prepare_image(cache: Path) -> Path:
    """The VM's disk image (a tarball), built once and cached: Debian 13 minbase
    (shared with scripts/build-base-image) plus sshd, sudo, curl, CA
    certificates. No Docker."""
    image = cache / "vm-trixie.tar"
    if image.exists():
        return image
    env = dict(os.environ, MFS_CACHE_DIR=str(cache))
    rootfs = cache / "rootfs-trixie"
    if not (rootfs / "bin" / "sh").exists():
        # Debootstraps trixie into cache/rootfs-trixie (and imports it as the
        # base image for the test images).
        sh(str(REPO / "scripts" / "build-base-image"), "trixie", "mfs-base:trixie", env=env)
    work = cache / "vm-trixie.build"
    if work.exists():
        _force_rmtree(work)
    sh("cp", "-a", str(rootfs), str(work))
    mounts = []
    try:
        for sub, args in (("proc", ["-t", "proc", "proc"]), ("dev", ["--bind", "/dev"]),
                          ("sys", ["--bind", "/sys"])):
            sh("mount", *args, str(work / sub))
            mounts.append(work / sub)
        shutil.copy("/etc/resolv.conf", work / "etc" / "resolv.conf")
        # No daemon may start inside the build chroot.
        (work / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
        os.chmod(work / "usr/sbin/policy-rc.d", 0o755)
        chroot_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
                      "LANG": "C.UTF-8"}
        sh("chroot", str(work), "apt-get", "update", "-qq", env=chroot_env)
        sh("chroot", str(work), "apt-get", "install", "-y", "-qq", "--no-install-recommends",
           *VM_PACKAGES, env=chroot_env, capture=True)
        sh("chroot", str(work), "apt-get", "clean", env=chroot_env)
        (work / "usr/sbin/policy-rc.d").unlink()
    finally:
        for m in reversed(mounts):
            sh("umount", "-l", str(m), check=False)
    tmp = image.with_suffix(".tmp")
    sh("tar", "-C", str(work), "--numeric-owner", "-cf", str(tmp), ".")
    os.replace(tmp, image)
    _force_rmtree(work)
    return image


def _force_rmtree(path: Path):
    sh("rm", "-rf", "--one-file-system", str(path), check=False)


class BareVM:
    """One VM: created from the image, booted, shut down, deleted. Index 0
    has the module's names and addresses; index N its own namespace, veth
    pair and 10.213.N.0/30."""

    def __init__(self, image: Path, root: Path, public_key: str, index: int = 0):
        self.image = image
        self.root = root
        self.public_key = public_key
        self.init = None          # the unshare process; its child is the VM's PID 1
        self.nat_rules = []
        self.index = index
        if index == 0:
            self.netns, self.veth_host, self.veth_vm = NETNS, VETH_HOST, VETH_VM
            self.host_ip, self.ip, self.subnet = HOST_IP, VM_IP, SUBNET
            self.hostname = "mfs-vm"
        else:
            self.netns = "%s%d" % (NETNS, index)
            self.veth_host, self.veth_vm = "mfsvm%d-h" % index, "mfsvm%d-v" % index
            self.host_ip, self.ip = "10.213.%d.1" % index, "10.213.%d.2" % index
            self.subnet = "10.213.%d.0/%d" % (index, PREFIX)
            self.hostname = "mfs-vm%d" % index

    # -- life cycle -----------------------------------------------------------

    def create(self):
        if self.root.exists():
            _force_rmtree(self.root)
        self.root.mkdir(parents=True)
        sh("tar", "-C", str(self.root), "--numeric-owner", "-xpf", str(self.image))
        r = self.root
        (r / "etc/hostname").write_text("%s\n" % self.hostname)
        (r / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 %s\n" % self.hostname)
        shutil.copy("/etc/resolv.conf", r / "etc/resolv.conf")
        # root logs in with the key (as on most cloud images); "deployer" is
        # the usual admin user with passwordless sudo; "nosudo" has no sudo.
        self.chroot("useradd -m -s /bin/bash deployer && useradd -m -s /bin/bash nosudo "
                    "&& echo 'deployer ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/deployer "
                    "&& chmod 0440 /etc/sudoers.d/deployer")
        for home, user in (("root", "root"), ("home/deployer", "deployer"),
                           ("home/nosudo", "nosudo")):
            self.chroot("install -d -m 700 -o {u} -g {u} /{h}/.ssh && "
                        "printf '%s\\n' \"$KEY\" > /{h}/.ssh/authorized_keys && "
                        "chown {u}:{u} /{h}/.ssh/authorized_keys && "
                        "chmod 600 /{h}/.ssh/authorized_keys".format(u=user, h=home),
                        env={"KEY": self.public_key})
        # This sandbox denies even root CAP_SYS_RESOURCE, so Debian's
        # /etc/init.d/docker fails at its `ulimit -n 1048576`; a real VM allows
        # it. The init script sources this file first: keep the limits it can
        # set and go on, so the deploy meets the init script a real
        # systemd-less Debian VM has.
        (r / "etc/default").mkdir(exist_ok=True)
        (r / "etc/default/docker").write_text(
            "# test VM: raise limits where the sandbox allows it\n"
            'ulimit() { command ulimit "$@" 2>/dev/null || true; }\n')
        (r / "etc/ssh/sshd_config.d/test.conf").write_text(
            "PasswordAuthentication no\nPermitRootLogin prohibit-password\nUseDNS no\n")

    def chroot(self, script, env=None):
        """Run a shell script in the VM's file system before it boots."""
        e = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        e.update(env or {})
        return sh("chroot", str(self.root), "/bin/sh", "-ec", script, env=e, capture=True)

    def network_up(self):
        self.network_down()
        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_vm)
        sh("ip", "link", "set", self.veth_vm, "netns", self.netns)
        sh("ip", "addr", "add", "%s/%d" % (self.host_ip, PREFIX), "dev", self.veth_host)
        sh("ip", "link", "set", self.veth_host, "up")
        ns = ["ip", "netns", "exec", self.netns]
        sh(*ns, "ip", "addr", "add", "%s/%d" % (self.ip, PREFIX), "dev", self.veth_vm)
        sh(*ns, "ip", "link", "set", self.veth_vm, "up")
        sh(*ns, "ip", "link", "set", "lo", "up")
        sh(*ns, "ip", "route", "add", "default", "via", self.host_ip)
        self.nat_rules = self._rules()
        for table, chain, rule in self.nat_rules:
            sh("iptables", "-t", table, "-I", chain, "1", *rule)
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            if f.read().strip() != "1":
                sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")

    def network_down(self):
        self._drop_rules()
        sh("ip", "link", "del", self.veth_host, check=False, capture=True)
        sh("ip", "netns", "del", self.netns, check=False, capture=True)

    def cut_off(self):
        """Air-gapped from now on: the VM reaches the other test VMs and
        nothing else (no route out: connections elsewhere are refused)."""
        self._drop_rules()
        self.nat_rules = self._rules(offline=True)
        for table, chain, rule in self.nat_rules:
            sh("iptables", "-t", table, "-I", chain, "1", *rule)

    def _drop_rules(self):
        for table, chain, rule in self.nat_rules or self._rules() + self._rules(offline=True):
            while sh("iptables", "-t", table, "-D", chain, *rule, check=False,
                     capture=True).returncode == 0:
                pass
        self.nat_rules = []

    def _rules(self, offline=False):
        """Outbound access for the VM's /30 only (to anywhere, or offline to
        the other test VMs only). Inserted in reverse: FORWARD rules go
        first, as the host's Docker sets the FORWARD policy to DROP."""
        only = ["-d", TEST_VMS] if offline else []
        rules = [("filter", "FORWARD", ["-i", self.veth_host, "-s", self.subnet, "-j", "REJECT"])
                 ] if offline else []
        return rules + [
            ("nat", "POSTROUTING", ["-s", self.subnet, *only, "!", "-o", self.veth_host,
                                    "-j", "MASQUERADE"]),
            ("filter", "FORWARD", ["-i", self.veth_host, "-s", self.subnet, *only,
                                   "-j", "ACCEPT"]),
            ("filter", "FORWARD", ["-o", self.veth_host, "-d", self.subnet, "-m", "conntrack",
                                   "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"]),
        ]

    def boot(self, timeout=30):
        """Start the VM. Its PID 1 mounts /proc, /sys, /dev and /run as a VM
        has them, makes the VM's root the root of its mount namespace
        (pivot_root, not chroot: under a chroot, runc would give containers
        the host's root file system) and becomes sshd, which reaps orphans as
        an init must."""
        r = str(self.root)
        boot = f"""
set -e
mount --make-rprivate /
mount --bind {r} {r}
mount -t proc proc {r}/proc
mount -t sysfs sysfs {r}/sys
mount --rbind /sys/fs/cgroup {r}/sys/fs/cgroup
mount --rbind /dev {r}/dev
mount -t tmpfs -o mode=755 tmpfs {r}/run
mkdir -p {r}/run/sshd {r}/run/lock {r}/run/oldroot
chmod 1777 {r}/run/lock
cd {r}
pivot_root . run/oldroot
umount -l /run/oldroot
rmdir /run/oldroot
echo {self.hostname} > /proc/sys/kernel/hostname
exec /usr/sbin/sshd -D -e
"""
        log = open(self.root.parent / ("%s.console.log" % self.root.name), "ab")
        self.init = subprocess.Popen(
            ["nsenter", "--net=/run/netns/%s" % self.netns, "unshare", "--mount", "--pid", "--uts",
             "--fork", "--kill-child", "--", "/bin/sh", "-c", boot],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            preexec_fn=_die_with_parent)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.init.poll() is not None:
                raise RuntimeError("the VM did not boot; see %s" % log.name)
            try:
                with socket.create_connection((self.ip, 22), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH"):
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("sshd in the VM did not come up within %ss" % timeout)

    def pid1(self):
        """Host PID of the VM's PID 1."""
        out = sh("pgrep", "-P", str(self.init.pid), capture=True, check=False).stdout.split()
        return int(out[0]) if out else None

    def run(self, script, check=True, timeout=300, env=None):
        """Run a shell script inside the running VM (as its root, like a
        console login), in all of the VM's namespaces."""
        pid = self.pid1()
        if pid is None:
            raise RuntimeError("the VM is not running")
        e = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LANG": "C.UTF-8", "HOME": "/root"}
        e.update(env or {})
        proc = subprocess.run(
            ["nsenter", "-t", str(pid), "-m", "-n", "-p", "-u", "--", "/bin/sh", "-c", script],
            env=e, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError("in the VM: %s\nexit %d\n%s\n%s" % (script, proc.returncode,
                                                                  proc.stdout, proc.stderr))
        return proc

    def in_netns(self, *argv, **kw):
        """A host program inside the VM's network namespace (e.g. `ss`)."""
        return sh("ip", "netns", "exec", self.netns, *argv, **kw)

    def in_netns_popen(self, argv):
        """A host program in the background inside the VM's network namespace
        (e.g. something that occupies a port)."""
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def shutdown(self):
        if self.init is None:
            return
        if self.init.poll() is None:
            # A clean stop of Docker first, as a real shutdown would.
            try:
                self.run("if [ -x /etc/init.d/docker ]; then /etc/init.d/docker stop; fi",
                         check=False, timeout=60)
            except Exception:
                pass
            pid = self.pid1()
            if pid:
                # SIGKILL to a PID namespace's init kills everything in it.
                os.kill(pid, signal.SIGKILL)
            try:
                self.init.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.init.pid, signal.SIGKILL)
                self.init.wait()
        self.init = None

    def crash(self):
        """Power loss: every process of the VM dies at once, Docker included
        (shutdown() stops Docker cleanly first)."""
        pid = self.pid1()
        if pid:
            os.kill(pid, signal.SIGKILL)
        if self.init is not None:
            self.init.wait(timeout=30)
        self.init = None

    def destroy(self):
        self.shutdown()
        self.network_down()
        _force_rmtree(self.root)


def _die_with_parent():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
