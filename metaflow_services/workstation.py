"""`metaflow-services doctor --profile NAME`: the deployment a Metaflow
profile points at, checked from a workstation as a laptop's client sees it:
Airflow (and that its API wants a login), the object store with the
profile's keys, the metadata service (and that it wants its key) and the
Metaflow UI (and that it asks for its password).
"""

from __future__ import annotations

import os

from . import objectstore
from .airflow_client import load_profile
from .checks import Check


def workstation_checks(profile_name, airflow_user="admin", password=None):
    import requests

    path, prof = load_profile(profile_name)
    if prof is None:
        return [Check("profile", False, "no Metaflow profile %s" % path,
                      "write it: fab -H HOST client-config --name %s" % profile_name)]
    ca = prof.get("METAFLOW_S3_VERIFY_CERTIFICATE") or os.environ.get("REQUESTS_CA_BUNDLE")
    http = requests.Session()
    http.trust_env = False  # else REQUESTS_CA_BUNDLE wins over the profile's CA
    results = [Check("profile", True, path)]
    results += _check_airflow(http, prof, ca, airflow_user, password)
    results.append(_check_profile_s3(prof, ca))
    if prof.get("METAFLOW_DEFAULT_METADATA") == "service":
        results += _check_metadata_service(http, prof, ca)
    else:
        results.append(Check("metadata", True, "local (this deployment runs without the "
                                               "metadata service)"))
    return results


def _check_airflow(http, prof, ca, airflow_user, password):
    airflow = prof.get("MFS_AIRFLOW_URL")
    if not airflow:
        return [Check("airflow", False, "the profile names no Airflow URL",
                      "write it again with fab client-config")]
    verify = ca or True
    results = []
    try:
        r = http.get(airflow + "/api/v2/monitor/health", timeout=15, verify=verify)
        r.raise_for_status()
        health = r.json()
        bad = [k for k, v in health.items() if isinstance(v, dict)
               and v.get("status") not in (None, "healthy")]
        results.append(Check("airflow", not bad, "%s: %s" % (
            airflow, "healthy" if not bad else "unhealthy: " + ", ".join(bad)),
            "" if not bad else "fab -H HOST status; fab -H HOST logs -s airflow-" + bad[0]))
        denied = http.get(airflow + "/api/v2/dags", timeout=15, verify=verify).status_code
        results.append(Check("airflow-auth", denied in (401, 403),
                             "the REST API without a token: HTTP %d" % denied,
                             "" if denied in (401, 403) else "the API answers without "
                             "credentials: check the deployment's auth settings"))
        if password:
            r = http.post(airflow + "/auth/token", json={"username": airflow_user,
                                                         "password": password},
                          timeout=15, verify=verify)
            results.append(Check("airflow-login", r.status_code in (200, 201),
                                 "user %s: HTTP %d" % (airflow_user, r.status_code),
                                 "get the password: fab -H HOST secrets --name "
                                 "MFS_AIRFLOW_PASSWORD_%s" % airflow_user.upper()))
    except Exception as e:  # noqa: BLE001
        results.append(Check("airflow", False, *_reach_problem(e, airflow, ca)))
    return results


def profile_s3(prof, ca=None):
    """(S3 client, bucket) of the deployment a Metaflow profile points at."""
    bucket = objectstore.bucket_name(prof.get("METAFLOW_DATASTORE_SYSROOT_S3", ""))
    params = dict(prof.get("METAFLOW_DATATOOLS_CLIENT_PARAMS") or {})
    params.pop("config", None)
    ca = ca or prof.get("METAFLOW_S3_VERIFY_CERTIFICATE") or os.environ.get("REQUESTS_CA_BUNDLE")
    s3 = objectstore.connect(prof.get("METAFLOW_S3_ENDPOINT_URL"), verify=ca or True,
                             attempts=2, read_timeout=None, **params)
    return s3, bucket


def _check_profile_s3(prof, ca):
    endpoint = prof.get("METAFLOW_S3_ENDPOINT_URL")
    bucket = objectstore.bucket_name(prof.get("METAFLOW_DATASTORE_SYSROOT_S3", ""))
    try:
        s3, bucket = profile_s3(prof, ca)
        s3.head_bucket(Bucket=bucket)
        return Check("object-store", True, "%s: bucket %s readable with the profile's keys"
                     % (endpoint, bucket))
    except Exception as e:  # noqa: BLE001
        code = objectstore.error_code(e)
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return Check("object-store", False, "%s refused the profile's keys (%s)"
                         % (endpoint, code), "write the profile again with fab client-config")
        if code in ("404", "NoSuchBucket"):
            return Check("object-store", False, "no bucket %s at %s" % (bucket, endpoint),
                         "fab -H HOST deploy creates it")
        what, fix = _reach_problem(e, endpoint, ca)
        return Check("object-store", False, what, fix)


def _check_metadata_service(http, prof, ca):
    """The metadata service answers with the profile's key and refuses
    without it; the Metaflow UI asks for its password."""
    verify = ca or True
    url = prof.get("METAFLOW_SERVICE_URL", "")
    results = []
    try:
        ok = http.get(url + "/ping", timeout=15, verify=verify,
                      headers={"x-api-key": prof.get("METAFLOW_SERVICE_AUTH_KEY", "")})
        denied = http.get(url + "/ping", timeout=15, verify=verify).status_code
        results.append(Check("metadata", ok.status_code == 200,
                             "%s/ping with the key: HTTP %d" % (url, ok.status_code),
                             "" if ok.status_code == 200 else
                             "write the profile again with fab client-config; "
                             "fab -H HOST logs -s metadata"))
        results.append(Check("metadata-auth", denied in (401, 403),
                             "without the key: HTTP %d" % denied))
    except Exception as e:  # noqa: BLE001
        results.append(Check("metadata", False, *_reach_problem(e, url, ca)))
    ui = prof.get("MFS_METAFLOW_UI_URL", "")
    if ui:
        try:
            status = http.get(ui.rstrip("/") + "/", timeout=15, verify=verify).status_code
            results.append(Check("metaflow-ui", status == 401,
                                 "%s: HTTP %d%s" % (ui, status, " (asks for its password)"
                                                    if status == 401 else ""),
                                 "" if status == 401 else "fab -H HOST status; "
                                 "fab -H HOST logs -s metaflow-ui"))
        except Exception as e:  # noqa: BLE001
            results.append(Check("metaflow-ui", False, *_reach_problem(e, ui, ca)))
    return results


def _reach_problem(e, url, ca):
    """A one-line diagnosis of a failed request, and what to do."""
    import requests

    text = str(e)
    if isinstance(e, requests.exceptions.SSLError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return ("TLS certificate of %s not trusted (CA file: %s)" % (url, ca or "none"),
                "run fab client-config again (it saves the VM's certificate next to the profile)")
    if isinstance(e, (requests.exceptions.ConnectionError, OSError)) or "connect" in text.lower():
        return ("cannot reach %s: %s" % (url, text.splitlines()[0][:160]),
                "check the address and firewall, or open `fab -H HOST tunnel` and use a "
                "profile made with `fab client-config --tunnel`")
    if isinstance(e, requests.exceptions.Timeout):
        return ("%s did not answer in time" % url, "check the VM: fab -H HOST status")
    return ("%s: %s" % (type(e).__name__, text[:160]), "fab -H HOST status")
