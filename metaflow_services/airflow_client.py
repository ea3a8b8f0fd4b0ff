"""Airflow's REST API as a workstation reaches it: the address and the CA
from a Metaflow profile written by ``fab client-config`` (or the
environment), a login with an Airflow user's password, and the few calls
the event publisher and the Deployer make.

Where the settings come from, first found wins:
  URL       argument, $MFS_AIRFLOW_URL, the profile's MFS_AIRFLOW_URL
  user      argument, $MFS_AIRFLOW_USER, "admin"
  password  argument, $MFS_AIRFLOW_PASSWORD
  CA file   the profile's METAFLOW_S3_VERIFY_CERTIFICATE (the VM's own
            certificate), else the system's trust store
The profile is $METAFLOW_PROFILE's (or the argument's), in $METAFLOW_HOME or
~/.metaflowconfig.
"""

from __future__ import annotations

import os

import json

from .errors import ExitCode, ServicesError


# A RuntimeError too: callers that wait for an object to appear catch that.
class AirflowAPIError(ServicesError, RuntimeError):
    headline = "Airflow's REST API"
    exit_code = ExitCode.FAILED


def airflow_url():
    """Airflow's API inside the stack (the containers' view)."""
    return (os.environ.get("MFS_AIRFLOW_INTERNAL_URL") or "http://airflow-api-server:8080").rstrip("/")


def load_profile(name):
    """(path, settings) of the Metaflow profile *name*; settings None when absent."""
    home = os.path.expanduser(os.environ.get("METAFLOW_HOME", "~/.metaflowconfig"))
    path = os.path.join(home, "config_%s.json" % name)
    try:
        with open(path) as f:
            return path, json.load(f)
    except OSError:
        return path, None


class AirflowClient:
    def __init__(self, user, password, url=None, ca=None, timeout=30):
        import requests

        self.url = (url or airflow_url()).rstrip("/")
        self.user = user
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would beat the profile's CA
        self.session.verify = ca or os.environ.get("REQUESTS_CA_BUNDLE") or True
        self._login(password)

    @classmethod
    def from_settings(cls, url=None, user=None, password=None, profile=None):
        prof_name = profile or os.environ.get("METAFLOW_PROFILE")
        prof = {}
        if prof_name:
            path, prof = load_profile(prof_name)
            if prof is None:
                raise AirflowAPIError(
                    "There is no Metaflow profile %s (%s)." % (prof_name, path),
                    "Write it with: fab -H HOST client-config --name %s" % prof_name)
        url = url or os.environ.get("MFS_AIRFLOW_URL") or prof.get("MFS_AIRFLOW_URL")
        if not url:
            raise AirflowAPIError(
                "No Airflow address: no profile names one and MFS_AIRFLOW_URL is not set.",
                "Use a profile written by fab client-config (METAFLOW_PROFILE=NAME), or set "
                "MFS_AIRFLOW_URL=https://VM/.")
        user = user or os.environ.get("MFS_AIRFLOW_USER") or "admin"
        password = password or os.environ.get("MFS_AIRFLOW_PASSWORD")
        if not password:
            raise AirflowAPIError(
                "No password for the Airflow user %s." % user,
                "Set MFS_AIRFLOW_PASSWORD (fab -H HOST secrets --name MFS_AIRFLOW_PASSWORD_%s "
                "prints it)." % user.upper())
        return cls(user, password, url, ca=prof.get("METAFLOW_S3_VERIFY_CERTIFICATE"))

    def _login(self, password):
        r = self._send("post", "/auth/token", json={"username": self.user, "password": password})
        if r.status_code in (401, 403):
            raise AirflowAPIError(
                "Airflow at %s refused the user %s's password (HTTP %d)."
                % (self.url, self.user, r.status_code),
                "Check MFS_AIRFLOW_USER / MFS_AIRFLOW_PASSWORD (fab -H HOST secrets --name "
                "MFS_AIRFLOW_PASSWORD_%s)." % self.user.upper())
        self._check(r, "logging in")
        self.session.headers["Authorization"] = "Bearer " + r.json()["access_token"]

    def _send(self, method, path, **kwargs):
        import requests

        try:
            return getattr(self.session, method)(self.url + path, timeout=self.timeout, **kwargs)
        except requests.exceptions.SSLError as e:
            raise AirflowAPIError(
                "The TLS certificate of %s is not trusted: %s" % (self.url, str(e)[:200]),
                "Use the profile fab client-config wrote (it trusts the VM's certificate).")
        except requests.exceptions.RequestException as e:
            raise AirflowAPIError(
                "Cannot reach Airflow at %s: %s" % (self.url, str(e).splitlines()[0][:200]),
                "Check the address and the network (fab -H HOST status on the VM).")

    def _check(self, r, what):
        if r.status_code >= 400:
            detail = r.text[:300]
            try:
                detail = r.json().get("detail", detail)
            except ValueError:
                pass
            raise AirflowAPIError("Airflow at %s answered HTTP %d %s: %s"
                                  % (self.url, r.status_code, what, detail))
        return r.json() if r.content else None

    def request(self, method, path, **kw):
        """One call; its JSON answer ({} when empty), AirflowAPIError on HTTP >= 400."""
        return self._check(self._send(method.lower(), path, **kw), "to %s %s" % (method, path)) or {}

    def get(self, path, what, ok=(), **params):
        r = self._send("get", path, params=params)
        if r.status_code in ok:
            return None
        return self._check(r, what)

    def post(self, path, body, what):
        return self._check(self._send("post", path, json=body), what)

    def patch(self, path, body, what):
        return self._check(self._send("patch", path, json=body), what)

    def delete(self, path, what, ok=(404,)):
        r = self._send("delete", path)
        if r.status_code in ok:
            return None
        return self._check(r, what)
