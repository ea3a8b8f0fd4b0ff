"""A private Python package index for tests: a PEP 503 "simple" index over a
folder of wheels, served over HTTPS with a certificate from a CA the test
makes (as a company's mirror behind its own CA would be). Every request is
logged as "CLIENT_IP PATH" so a test can tell who fetched what.

    python tests/pyindex.py --root WHEELS --host 10.213.0.1 --port 8470 \
        --cert server.pem --key server.key --log requests.log

``make_ca`` and ``download`` are the test-side helpers; ``serve`` starts one
in a subprocess.
"""

from __future__ import annotations

import argparse
import html
import re
import ssl
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _project(filename):
    return _norm(filename.split("-", 1)[0])


class Handler(BaseHTTPRequestHandler):
    root: Path
    log: Path

    def do_GET(self):  # noqa: N802 (http.server's name)
        with open(self.log, "a") as f:
            f.write("%s %s\n" % (self.client_address[0], self.path))
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        files = sorted(p.name for p in self.root.iterdir() if p.suffix in (".whl", ".gz"))
        if parts == ["simple"]:
            names = sorted({_project(f) for f in files})
            return self._page("".join('<a href="/simple/%s/">%s</a>\n' % (n, n) for n in names))
        if len(parts) == 2 and parts[0] == "simple":
            mine = [f for f in files if _project(f) == _norm(parts[1])]
            if not mine:
                return self._send(404, b"not found")
            return self._page("".join('<a href="/files/%s">%s</a>\n' % (html.escape(f), f)
                                      for f in mine))
        if len(parts) == 2 and parts[0] == "files" and parts[1] in files:
            return self._send(200, (self.root / parts[1]).read_bytes(),
                              "application/octet-stream")
        return self._send(404, b"not found")

    def _page(self, body):
        self._send(200, ("<!DOCTYPE html><html><body>\n%s</body></html>\n" % body).encode(),
                   "text/html")

    def _send(self, code, data, kind="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--log", required=True)
    a = p.parse_args(argv)
    Handler.root, Handler.log = Path(a.root), Path(a.log)
    server = ThreadingHTTPServer((a.host, a.port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


# ---------------------------------------------------------------------------
# Test-side helpers
# ---------------------------------------------------------------------------


def make_ca(folder: Path, addresses) -> dict:
    """A CA of the test's own and a server certificate it signs for
    *addresses* (IPs). Returns the paths: ca, cert, key."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key",
                                                       "server.csr", "server.pem"))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=%s\nbasicConstraints=CA:FALSE\n"
                   % ",".join("IP:%s" % a for a in addresses))
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=mfs test package index CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=mfs test package index")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return {"ca": ca, "cert": cert, "key": key}


def download(requirements, dest: Path):
    """Pure-Python wheels of *requirements* (and their dependencies) into
    *dest*, with this machine's pip settings."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                    "--no-deps", "-d", str(dest), *requirements], check=True)
    return sorted(p.name for p in dest.iterdir())


class Index:
    def __init__(self, root: Path, host, port, certs: dict, log: Path, public=None):
        """*host*: the address to listen on; *public*: the one clients use
        (default: *host*; the certificate must name it)."""
        self.root, self.host, self.port, self.log = root, host, port, log
        self.url = "https://%s:%d/simple" % (public or host, port)
        self.certs = certs
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--root", str(root), "--host", host, "--port", str(port),
             "--cert", str(certs["cert"]), "--key", str(certs["key"]), "--log", str(log)])
        ctx = ssl.create_default_context(cafile=str(certs["ca"]))
        deadline = time.time() + 20
        while True:
            try:
                import urllib.request

                local = "127.0.0.1" if host == "0.0.0.0" else host
                urllib.request.urlopen("https://%s:%d/simple/" % (local, port), context=ctx,
                                       timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("the test package index did not start on %s" % self.url)
                time.sleep(0.2)
        log.write_text("")

    def requests(self):
        return [line.split(" ", 1) for line in self.log.read_text().splitlines()]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
