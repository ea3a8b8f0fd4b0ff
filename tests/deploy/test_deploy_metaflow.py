"""The Metaflow metadata service, UI backend and UI of the default deploy
(metaflow_services: true), on the VM test_deploy_stack.py deployed: images
built from the vendored upstream sources (tests/images/metadata.Dockerfile,
metaflow-ui.Dockerfile) with the official images' contract.

What is checked here: the one-shot migration, the metadata API behind its API
key, the UI and its API behind basic auth, runs recorded in the metadata
service, and the Metaflow UI in a real browser (headless Chromium) through the
proxy: a run page with its steps and tasks, and the live-update websocket.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from deploylab import VM_IP

pytestmark = pytest.mark.deploy


def ui_auth(lab):
    return ("metaflow", lab.secret("MFS_METAFLOW_UI_PASSWORD"))


def test_the_migration_ran_and_the_services_are_healthy(deployed, lab):
    cs = lab.wait_healthy(timeout=300)
    for svc in ("metadata", "metaflow-ui-backend", "metaflow-ui"):
        assert cs[svc]["health"] == "healthy", (svc, cs[svc])
    assert cs["metaflow-migrate"]["state"] == "exited" and cs["metaflow-migrate"]["exit_code"] == 0
    versions = lab.compose("exec -T postgres psql -U postgres -d metaflow -Atc "
                           "\"SELECT max(version_id) FROM goose_db_version WHERE is_applied\"")
    assert int(versions.strip()) >= 20230118020300   # the newest migration of 2.5.1
    tables = lab.compose("exec -T postgres psql -U postgres -d metaflow -Atc "
                         "\"SELECT tablename FROM pg_tables WHERE schemaname = 'public'\"")
    assert {"flows_v3", "runs_v3", "steps_v3", "tasks_v3", "metadata_v3",
            "artifact_v3"} <= set(tables.split())


def test_the_metadata_api_needs_its_key(deployed, lab):
    url = "https://%s:8443/metadata/ping" % VM_IP
    assert requests.get(url, verify=lab.ca, timeout=30).status_code == 401
    assert requests.get(url, verify=lab.ca, timeout=30,
                        headers={"x-api-key": "wrong"}).status_code == 401
    ok = requests.get(url, verify=lab.ca, timeout=30,
                      headers={"x-api-key": lab.secret("MFS_METAFLOW_API_KEY")})
    assert ok.status_code == 200 and "pong" in ok.text


def test_the_smoke_test_run_is_recorded_in_the_metadata_service(deployed, lab):
    runs = lab.metadata("flows/MetaflowServicesSmokeTest/runs")
    assert runs, "no run of the smoke test in the metadata service"
    run = runs[0]
    assert str(run["run_number"]).startswith("af-")
    tags = set(run["tags"]) | set(run["system_tags"])
    assert any(t.startswith("airflow_dag_id:") for t in tags), tags
    steps = {s["step_name"] for s in lab.metadata(
        "flows/MetaflowServicesSmokeTest/runs/%s/steps" % run["run_number"])}
    assert {"start", "end"} <= steps


def test_the_metaflow_ui_and_its_api_need_the_password(deployed, lab):
    url = "https://%s:8443/" % VM_IP
    for path in ("", "api/flows", "api/ws"):
        r = requests.get(url + path, verify=lab.ca, timeout=30)
        assert r.status_code == 401 and "Basic" in r.headers.get("WWW-Authenticate", ""), path
    assert requests.get(url, verify=lab.ca, timeout=30,
                        auth=("metaflow", "wrong")).status_code == 401
    page = requests.get(url, verify=lab.ca, timeout=30, auth=ui_auth(lab))
    assert page.status_code == 200 and "<title>Metaflow UI</title>" in page.text
    # The UI calls its backend at /api, through the proxy (same origin).
    assert 'window.METAFLOW_SERVICE="/api"' in page.text
    flows = requests.get(url + "api/flows", verify=lab.ca, timeout=30, auth=ui_auth(lab))
    assert flows.status_code == 200
    names = [f.get("flow_id") for f in flows.json().get("data", [])]
    assert "MetaflowServicesSmokeTest" in names


def test_client_config_points_at_the_metadata_service(deployed, lab):
    res = lab.fab("client-config", "--name", "full")
    assert res.returncode == 0, str(res)
    cfg = json.loads((lab.home / ".metaflowconfig" / "config_full.json").read_text())
    assert cfg["METAFLOW_DEFAULT_METADATA"] == "service"
    assert cfg["METAFLOW_SERVICE_URL"] == "https://%s:8443/metadata" % VM_IP
    assert cfg["METAFLOW_SERVICE_AUTH_KEY"] == lab.secret("MFS_METAFLOW_API_KEY")


# ---------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------


@pytest.fixture
def browser(request, lab):
    from browser import Browser, chromium_binary

    if not chromium_binary():
        pytest.fail("no Chromium on this machine: scripts/host-setup installs Debian's chromium")
    with Browser(ignore_certificate_errors=True, credentials=ui_auth(lab)) as b:
        yield b
        failed = getattr(request.node, "rep_call", None)
        if failed is None or failed.failed:
            # Kept as a test artifact: what the page showed when it failed.
            from deploylab import CACHE

            shot = CACHE / ("%s.png" % request.node.name)
            try:
                b.screenshot(shot)
                print("screenshot of the failing page: %s" % shot)
            except Exception as e:  # noqa: BLE001
                print("no screenshot: %s" % e)


def test_the_metaflow_ui_shows_a_run_in_a_browser(deployed, lab, browser):
    """Headless Chromium opens the Metaflow UI through the proxy with the UI's
    password, the run page of the check flow's foreach run shows its steps and
    tasks, and the live-update websocket (/api/ws) connects."""
    if "flow_run" not in lab.results:   # this module alone: run the check flow first
        from test_deploy_stack import \
            test_a_flow_dropped_into_the_stack_runs_through_airflow as run_check_flow

        run_check_flow(deployed, lab)
    run_id, mf_run = lab.results["flow_run"]
    browser.navigate("https://%s:8443/DeployCheckFlow/%s" % (VM_IP, mf_run))
    text = browser.wait_for(lambda t: all(s in t for s in ("square", "join")), 90,
                            "the run's steps")
    assert mf_run in text or "DeployCheckFlow" in text, text[:2000]
    browser.pump(3)
    statuses = browser.http_statuses("/api/")
    assert statuses and all(code == 200 for _, code in statuses), statuses
    # The page subscribes to live updates over the websocket, through the proxy.
    deadline = time.time() + 30
    while not any("/api/ws" in url and code == 101 for url, code in browser.websocket_handshakes()):
        assert time.time() < deadline, ("no websocket to /api/ws was opened: %s"
                                        % browser.websocket_handshakes())
        browser.pump(1)
