"""The stack's proxy as the deploy starts it: compose/proxy/start.sh renders
the templates with the deploy's secrets and runs nginx (the test image
mfs-proxy:test stands in for the official nginx image). The Metaflow site's
`map` keys are whole credentials; with nginx's default hash bucket every
default deploy's proxy restarted in a loop ("could not build map_hash")."""

from __future__ import annotations

import secrets
import string
import subprocess
import time

import pytest

from support import REPO, docker_available

pytestmark = pytest.mark.skipif(not docker_available(), reason="needs the Docker engine")

IMAGE = "mfs-proxy:test"


def _password(n):
    # As deploy/stack.py generates them: A-Za-z0-9, of the deploy's lengths.
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(n))


@pytest.fixture
def proxy(tmp_path):
    if subprocess.run(["docker", "image", "inspect", IMAGE], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode != 0:
        pytest.fail("%s is missing: scripts/prepare builds it (tests/images/build proxy)" % IMAGE)
    tls = tmp_path / "tls"
    tls.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=vm",
                    "-keyout", str(tls / "key.pem"), "-out", str(tls / "cert.pem")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name = "mfs-test-proxy-%d" % (time.time() * 1000)
    proxy_dir = REPO / "compose" / "proxy"
    password, key = _password(24), _password(40)
    # A network of its own: nginx resolves upstreams through Docker's DNS
    # (127.0.0.11), as in the stack, and learns at once that none is there.
    subprocess.run(["docker", "network", "create", name], check=True, stdout=subprocess.DEVNULL)
    argv = ["docker", "run", "-d", "--name", name, "--network", name,
            "-e", "MFS_PROXY_S3_UPSTREAM=seaweedfs:8333",
            "-e", "MFS_PROXY_METAFLOW_UI_USER=metaflow",
            "-e", "MFS_PROXY_METAFLOW_UI_PASSWORD=" + password,
            "-e", "MFS_PROXY_METAFLOW_API_KEY=" + key,
            "-v", "%s/start.sh:/etc/mfs-proxy/start.sh:ro" % proxy_dir,
            "-v", "%s/nginx.conf.template:/etc/mfs-proxy/nginx.conf.template:ro" % proxy_dir,
            "-v", "%s/metaflow.conf.template:/etc/mfs-proxy/sites/metaflow.conf.template:ro"
            % proxy_dir,
            "-v", "%s:/etc/mfs-proxy/tls:ro" % tls,
            IMAGE, "/bin/sh", "/etc/mfs-proxy/start.sh"]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    try:
        yield name, password, key
    finally:
        subprocess.run(["docker", "rm", "-f", name], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        subprocess.run(["docker", "network", "rm", name], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def _exec(name, *argv):
    return subprocess.run(["docker", "exec", name, *argv], text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)


def test_the_metaflow_site_starts_with_the_deploys_credentials(proxy):
    name, password, key = proxy
    deadline = time.time() + 30
    while True:
        health = _exec(name, "wget", "-q", "-O", "-", "http://127.0.0.1:8081/healthz")
        if health.returncode == 0:
            break
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}}", name], text=True,
                               stdout=subprocess.PIPE).stdout.strip()
        logs = subprocess.run(["docker", "logs", name], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT).stdout
        assert state == "running" and time.time() < deadline, \
            "the proxy did not start (%s):\n%s" % (state, logs[-2000:])
        time.sleep(0.5)
    # The Metaflow site answers and checks the credentials the deploy generated.
    def status(*headers):
        args = ["wget", "-S", "-q", "-O", "/dev/null", "--no-check-certificate"]
        for h in headers:
            args += ["--header", h]
        out = _exec(name, *args, "https://127.0.0.1:8443/metadata/ping").stdout
        return [line.split()[1] for line in out.splitlines() if line.strip().startswith("HTTP/")]
    assert status() == ["401"]
    assert status("x-api-key: wrong") == ["401"]
    # With the right key the request passes the check and goes upstream (no
    # metadata service here: nginx answers 502 instead of 401).
    assert status("x-api-key: " + key) == ["502"]
