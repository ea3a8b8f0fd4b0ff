"""Bad input: each a clear one-line error and no change on the VM.

These run before the first deploy (the modules of this folder run in name
order): the VM is bare, so "no change" also means Docker was not installed.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from deploylab import VM_IP

pytestmark = pytest.mark.deploy


def refused(res, *expected):
    """The deploy failed with one clear error (no traceback) saying *expected*."""
    assert res.returncode != 0, str(res)
    assert "Traceback" not in res.output, str(res)
    for text in expected:
        assert text in res.output, "%r not in the output:\n%s" % (text, res)


def test_unreachable_host(lab):
    with lab.unchanged():
        res = lab.fab("deploy", "--config", str(lab.config), host="%s:2" % VM_IP)
    refused(res, "fab deploy on deployer@%s:2: cannot connect: " % VM_IP,
            "; what to do: check the address and port, and that sshd runs")
    assert res.seconds < 60


def test_wrong_key(lab):
    with lab.unchanged():
        res = lab.fab("deploy", "--config", str(lab.config), key=lab.wrong_key)
    refused(res, "fab deploy on deployer@%s: SSH authentication failed" % VM_IP,
            "; what to do: check the user in -H user@host and the key")


def test_no_sudo(lab):
    with lab.unchanged():
        res = lab.fab("deploy", "--config", str(lab.config), user="nosudo")
    refused(res, "expected root or passwordless sudo for user nosudo, found: sudo asks for a "
                 "password (nothing was changed)",
            "passwordless sudo")


def test_unsupported_os(lab):
    # A VM of another distribution: its /etc/os-release says so.
    lab.sh("cp -P /etc/os-release /root/os-release.orig && rm /etc/os-release && "
           "printf 'ID=fedora\\nVERSION_ID=40\\nPRETTY_NAME=\"Fedora Linux 40\"\\n' "
           "> /etc/os-release")
    try:
        with lab.unchanged():
            res = lab.fab("deploy", "--config", str(lab.config))
    finally:
        lab.sh("rm /etc/os-release && mv /root/os-release.orig /etc/os-release")
    refused(res, "preflight refused (nothing was changed): expected Debian 12/13 or Ubuntu "
                 "22.04/24.04, found Fedora Linux 40")


def test_too_little_disk(lab):
    if lab.vm.run("test -e /var/lib/docker", check=False).returncode == 0:
        pytest.skip("the VM already has Docker (run this module before the deploy tests)")
    # A small disk for Docker's data, as a VM with a separate small volume has.
    lab.sh("mkdir /var/lib/docker && mount -t tmpfs -o size=512m tmpfs /var/lib/docker")
    try:
        with lab.unchanged():
            res = lab.fab("deploy", "--config", str(lab.config))
    finally:
        lab.sh("umount /var/lib/docker && rmdir /var/lib/docker")
    refused(res, "expected at least 20 GB free for Docker's data (/var/lib/docker), found 0.5 GB")


def test_port_in_use(lab):
    # Something else (a web server) already listens on the S3 port.
    server = lab.vm.in_netns_popen([sys.executable, "-m", "http.server", "--bind", "0.0.0.0",
                                    "9000"])
    try:
        for _ in range(50):
            if b" 0.0.0.0:9000 " in subprocess.run(
                    ["ip", "netns", "exec", "mfs-deploy-vm", "ss", "-Hltn"],
                    stdout=subprocess.PIPE).stdout:
                break
            time.sleep(0.1)
        with lab.unchanged():
            res = lab.fab("deploy", "--config", str(lab.config))
    finally:
        server.terminate()
        server.wait()
    refused(res, "expected port 9000 to be free, found it in use (something listens on "
                 "0.0.0.0:9000; choose another with --set ports.<name>=PORT)")


def test_unknown_option_flag(lab):
    with lab.unchanged():
        res = lab.fab("deploy", "--config", str(lab.config), "--objectstore", "minio")
    refused(res, "No idea what '--objectstore' is!")


def test_unknown_option_set(lab):
    with lab.unchanged():
        res = lab.fab("deploy", "--config", str(lab.config), "--set", "airflow.paralelism=4")
    refused(res, "fab deploy on deployer@%s: --set airflow.paralelism: unknown option "
                 "'airflow.paralelism' (did you mean 'parallelism'?)" % VM_IP)


def test_unknown_option_in_file(lab, tmp_path):
    bad = tmp_path / "deploy.yaml"
    bad.write_text(lab.config.read_text() + "objectstore: minio\n")
    with lab.unchanged():
        res = lab.fab("deploy", "--config", str(bad))
    refused(res, "%s: unknown option 'objectstore' (did you mean 'object_store'?)" % bad)


def test_bad_value(lab):
    with lab.unchanged():
        res = lab.fab("deploy", "--config", str(lab.config), "--object-store", "ceph")
    refused(res, "object_store: expected one of seaweedfs, minio, found 'ceph'")
