"""A laptop's Metaflow client and a deployment's metadata service behind a
self-signed certificate: `fab client-config` names the certificate as
METAFLOW_SERVICE_VERIFY_CERTIFICATE, which this project's Metaflow extension
gives to Metaflow's service client (Metaflow itself only knows a CA for S3).
A real HTTPS server on loopback stands in for the proxy in front of the
service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SERVER = textwrap.dedent("""
    import http.server, json, ssl, sys
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"flow_id": "TlsFlow", "seen_key": self.headers.get("x-api-key")})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())
        def log_message(self, *a):
            pass
    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(srv.server_address[1], flush=True)
    srv.serve_forever()
""")

CLIENT = textwrap.dedent("""
    import json
    from metaflow.plugins.metadata_providers.service import ServiceMetadataProvider
    body, _ = ServiceMetadataProvider._request(None, "/flows/TlsFlow", "GET")
    print(json.dumps(body))
""")


@pytest.fixture
def https_service(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=vm",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(cert), str(key)],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield "https://127.0.0.1:%d" % port, cert
    finally:
        proc.kill()
        proc.wait()


def client(url, env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_")}
    # As on the test machines, and on laptops behind a TLS-inspecting proxy:
    # a CA bundle without the deployment's certificate.
    env["REQUESTS_CA_BUNDLE"] = os.environ.get("REQUESTS_CA_BUNDLE",
                                               "/etc/ssl/certs/ca-certificates.crt")
    env.update({"METAFLOW_HOME": str(tmp_path), "METAFLOW_DEFAULT_METADATA": "service",
                "METAFLOW_SERVICE_URL": url, "METAFLOW_SERVICE_AUTH_KEY": "the-key",
                "METAFLOW_SERVICE_RETRY_COUNT": "1", "USER": "tester"}, **env_extra)
    # cwd: never the repository (Metaflow would find its extension twice).
    return subprocess.run([sys.executable, "-c", CLIENT], env=env, text=True, cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)


def test_the_profile_certificate_lets_the_client_reach_the_service(https_service, tmp_path):
    url, cert = https_service
    denied = client(url, {}, tmp_path)
    assert denied.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in denied.stdout, denied.stdout
    ok = client(url, {"METAFLOW_SERVICE_VERIFY_CERTIFICATE": str(cert)}, tmp_path)
    assert ok.returncode == 0, ok.stdout
    body = json.loads(ok.stdout.strip().splitlines()[-1])
    assert body == {"flow_id": "TlsFlow", "seen_key": "the-key"}
