"""The full stack, with the Metaflow metadata service, UI backend and UI, when
their official images are on this machine (they cannot be pulled on the test
machines: load them with `docker load` first). Runs after test_deploy_stack.py,
on the same VM: switching the Metaflow services on is a changed option.

What is checked here that the main variant cannot: the one-shot migration,
the metadata API behind its API key, the UI and its API behind basic auth, a
smoke test recording its run in the metadata service, and a laptop profile
pointing at it.
"""

from __future__ import annotations

import json
import sys

import pytest
import requests

from deploylab import (CACHE, FAB, REPO, TEST_OPTIONS, VM_IP, deploy_module, fab_env,
                       local_image_id, run)

stack = deploy_module("stack")

pytestmark = pytest.mark.deploy

OFFICIAL = [stack.default_images()["metadata"], stack.default_images()["metaflow_ui"]]
MISSING = [ref for ref in OFFICIAL if not local_image_id(ref)]
FULL_OPTIONS = TEST_OPTIONS.replace("metaflow_services: false", "metaflow_services: true")


@pytest.fixture(scope="module")
def full(lab):
    if MISSING:
        pytest.skip("the official Metaflow service images %s are not on this machine (no "
                    "registry is reachable here); `docker load` them to run the full stack"
                    % ", ".join(MISSING))
    config = CACHE / "deploy-test-full.yaml"
    config.write_text(FULL_OPTIONS)
    bundle = CACHE / "bundle-test-full.tar"
    proc = run([FAB, "bundle", "--config", str(config), "--output", str(bundle)],
               cwd=str(REPO), env=fab_env(lab.home))
    assert proc.returncode == 0, proc.stdout[-3000:]
    res = lab.fab("deploy", "--config", str(config), "--bundle", str(bundle), "--smoke-test",
                  "always")
    assert res.returncode == 0, str(res)
    return res


def test_metaflow_services_are_healthy(full, lab):
    cs = lab.wait_healthy(timeout=300)
    for svc in ("metadata", "metaflow-ui-backend", "metaflow-ui"):
        assert cs[svc]["health"] == "healthy", (svc, cs[svc])
    assert cs["metaflow-migrate"]["state"] == "exited" and cs["metaflow-migrate"]["exit_code"] == 0
    tables = lab.compose("exec -T postgres psql -U postgres -d metaflow -Atc "
                         "\"SELECT count(*) FROM goose_db_version\"")
    assert int(tables.strip()) > 1


def test_the_metadata_api_needs_its_key(full, lab):
    url = "https://%s:8443/metadata/ping" % VM_IP
    assert requests.get(url, verify=lab.ca, timeout=30).status_code == 401
    ok = requests.get(url, verify=lab.ca, timeout=30,
                      headers={"x-api-key": lab.secret("MFS_METAFLOW_API_KEY")})
    assert ok.status_code == 200 and "pong" in ok.text


def test_the_metaflow_ui_needs_its_password(full, lab):
    url = "https://%s:8443/" % VM_IP
    assert requests.get(url, verify=lab.ca, timeout=30).status_code == 401
    auth = ("metaflow", lab.secret("MFS_METAFLOW_UI_PASSWORD"))
    page = requests.get(url, verify=lab.ca, timeout=30, auth=auth)
    assert page.status_code == 200 and "<html" in page.text.lower()
    flows = requests.get(url + "api/flows", verify=lab.ca, timeout=30, auth=auth)
    assert flows.status_code == 200
    names = [f.get("flow_id") for f in flows.json().get("data", [])]
    assert "MetaflowServicesSmokeTest" in names       # the smoke test ran against the service


def test_client_config_points_at_the_metadata_service(full, lab):
    res = lab.fab("client-config", "--name", "full")
    assert res.returncode == 0, str(res)
    cfg = json.loads((lab.home / ".metaflowconfig" / "config_full.json").read_text())
    assert cfg["METAFLOW_DEFAULT_METADATA"] == "service"
    assert cfg["METAFLOW_SERVICE_URL"] == "https://%s:8443/metadata" % VM_IP
    assert cfg["METAFLOW_SERVICE_AUTH_KEY"] == lab.secret("MFS_METAFLOW_API_KEY")
