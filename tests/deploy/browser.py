"""A real browser for the web-page tests: Debian's Chromium, headless, driven
through the DevTools protocol (CDP) over its websocket. No WebDriver layer:
Chromium and this client are all there is, and the protocol gives what the
tests look at (the page's text, network events such as websocket handshakes,
a screenshot).

    with Browser(ignore_certificate_errors=True, credentials=("user", "password")) as b:
        b.navigate("https://host:8443/")
        b.wait_for(lambda text: "start" in text, 60, "the start step")
        b.screenshot(path)
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def chromium_binary():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, ignore_certificate_errors=False, credentials=None, width=1400,
                 height=1000):
        # (user, password) for sites behind HTTP basic authentication: sent
        # with every request of the page, as the browser does once a person
        # has typed them into its dialog. (Credentials in the URL are no
        # substitute: pages that build request URLs from their own address
        # then carry them, and fetch() refuses such URLs.)
        self.credentials = credentials
        self.flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                      "--no-first-run", "--no-default-browser-check",
                      "--window-size=%d,%d" % (width, height)]
        if ignore_certificate_errors:
            self.flags.append("--ignore-certificate-errors")
        self.events = []     # every CDP event received: {"method": ..., "params": ...}
        self._id = 0

    # -- lifecycle --------------------------------------------------------------

    def __enter__(self):
        import websocket

        binary = chromium_binary()
        if not binary:
            raise RuntimeError("no Chromium: scripts/host-setup installs Debian's chromium")
        self.profile = tempfile.mkdtemp(prefix="mfs-chromium-")
        self.proc = subprocess.Popen(
            [binary, *self.flags, "--remote-debugging-port=0", "--user-data-dir=" + self.profile,
             "about:blank"], stdout=subprocess.DEVNULL,
            # A file, not a pipe nobody drains (Chromium would block on it).
            stderr=open(Path(self.profile) / "chromium.log", "wb"))
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                log = (Path(self.profile) / "chromium.log").read_text(errors="replace")
                raise RuntimeError("Chromium did not start: %s" % log[-2000:])
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        page = self._page_ws_url(port)
        self.ws = websocket.create_connection(page, timeout=30, suppress_origin=True)
        for domain in ("Page", "Network", "Runtime"):
            self.call(domain + ".enable")
        if self.credentials:
            token = base64.b64encode(("%s:%s" % self.credentials).encode()).decode()
            self.call("Network.setExtraHTTPHeaders", headers={"Authorization": "Basic " + token})
        return self

    def __exit__(self, *exc):
        try:
            self.ws.close()
        except Exception:
            pass
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _page_ws_url(self, port):
        import urllib.request

        deadline = time.time() + 30
        while True:
            with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port, timeout=10) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            if time.time() > deadline:
                raise RuntimeError("Chromium has no page to drive")
            time.sleep(0.2)

    # -- the protocol --------------------------------------------------------------

    def _send(self, method, params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        return self._id

    def _event(self, msg):
        self.events.append(msg)

    def call(self, method, **params):
        """Sends one command and returns its result; events that arrive in
        the meantime are kept in self.events."""
        my_id = self._send(method, params)
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError("%s: %s" % (method, msg["error"]))
                return msg.get("result", {})
            if "method" in msg:
                self._event(msg)

    def pump(self, seconds):
        """Collects events for a while."""
        end = time.time() + seconds
        self.ws.settimeout(0.5)
        try:
            while time.time() < end:
                try:
                    msg = json.loads(self.ws.recv())
                except Exception:
                    continue
                if "method" in msg:
                    self._event(msg)
        finally:
            self.ws.settimeout(30)

    # -- what tests do ------------------------------------------------------------

    def navigate(self, url):
        self.call("Page.navigate", url=url)

    def text(self):
        res = self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                        returnByValue=True)
        return res.get("result", {}).get("value", "")

    def wait_for(self, predicate, timeout, what):
        deadline = time.time() + timeout
        while True:
            text = self.text()
            if predicate(text):
                return text
            if time.time() > deadline:
                raise AssertionError("%s: not on the page after %ss; the page shows:\n%s"
                                     % (what, timeout, text[:3000]))
            self.pump(1.0)

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return path

    def websocket_handshakes(self):
        """[(url, HTTP status)] of the page's websocket handshakes so far."""
        created = {e["params"]["requestId"]: e["params"]["url"] for e in self.events
                   if e["method"] == "Network.webSocketCreated"}
        return [(created.get(e["params"]["requestId"], "?"), e["params"]["response"]["status"])
                for e in self.events if e["method"] == "Network.webSocketHandshakeResponseReceived"]

    def http_statuses(self, needle):
        """[(url, status)] of responses whose URL contains needle."""
        return [(e["params"]["response"]["url"], e["params"]["response"]["status"])
                for e in self.events if e["method"] == "Network.responseReceived"
                and needle in e["params"]["response"]["url"]]
