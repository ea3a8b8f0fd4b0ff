"""The dags folder on the deployed default stack (issue 12): flows copied
into it with scp as root and as a member of the group metaflow, next to a
plain Airflow DAG; a git checkout in it that follows `git pull`; and the move
of a deployment from before (flows in data_dir/flows) on `fab deploy`.

The VM has no git (a minimal Debian, as most VMs): the checkout is made and
pulled by the host's git in the VM's file system, as root on the VM would.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from test_deploy_stack_flows import dag, run_meta, wait

from deploylab import DATA_DIR, VM_IP
from support import plain_dag, value_flow

pytestmark = pytest.mark.deploy

DAGS = DATA_DIR + "/dags"

def flow_folder(tmp_path, name, value):
    folder = tmp_path / name.lower()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flow.py").write_text(value_flow(name, "Scheduled by Airflow: a flow, not a DAG "
                                                     "file (Airflow must not parse it)."))
    (folder / "helper.py").write_text("VALUE = %r\n" % value)
    return folder


def scp(lab, user, src, dest, recursive=True):
    argv = ["scp", "-q", "-i", str(lab.key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", *(["-r"] if recursive else []),
            str(src), "%s@%s:%s" % (user, VM_IP, dest)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def value_of_run(lab, dag_id):
    from metaflow_services.spec import run_id_for

    run_id, state, tis = lab.run_dag(dag_id, {}, timeout=600)
    assert state == "success", tis
    return run_id, run_id_for(dag_id, run_id)


def artifact(lab, flow, mf_run, name):
    """An artifact of the run's start step, read from the object store."""
    import gzip
    import pickle

    s3 = lab.s3()
    data = json.loads(s3.get_object(Bucket="metaflow", Key="metaflow/%s/%s/start/t-0/0.data.json"
                                    % (flow, mf_run))["Body"].read())
    sha = data["objects"][name]
    blob = s3.get_object(Bucket="metaflow",
                         Key="metaflow/%s/data/%s/%s" % (flow, sha[:2], sha))["Body"].read()
    return pickle.loads(gzip.decompress(blob))


def state(lab):
    return json.loads((lab.vm.root / DAGS.lstrip("/") / ".metaflow-services" / "state.json")
                      .read_text())["flows"]


@pytest.fixture(scope="module")
def alice(deployed, lab):
    """A data scientist's account: in the group metaflow, no sudo."""
    lab.sh("id alice >/dev/null 2>&1 || (useradd -m -s /bin/bash -G metaflow alice && "
           "install -d -m 700 -o alice -g alice /home/alice/.ssh && "
           "cp /root/.ssh/authorized_keys /home/alice/.ssh/ && "
           "chown alice:alice /home/alice/.ssh/authorized_keys)")
    return "alice"


def test_scp_as_root_and_as_a_group_member_next_to_a_plain_dag(deployed, lab, alice, tmp_path):
    api = lab.airflow()
    res = scp(lab, "root", flow_folder(tmp_path / "root", "RootScpFlow", "from root"), DAGS)
    assert res.returncode == 0, res.stderr
    res = scp(lab, alice, flow_folder(tmp_path / "alice", "AliceScpFlow", "from alice"), DAGS)
    assert res.returncode == 0, res.stderr
    (tmp_path / "plain_dag.py").write_text(plain_dag("plain_dag_next_to_flows"))
    res = scp(lab, alice, tmp_path / "plain_dag.py", DAGS + "/plain_dag.py", recursive=False)
    assert res.returncode == 0, res.stderr
    t0 = time.time()
    for dag_id in ("RootScpFlow", "AliceScpFlow", "plain_dag_next_to_flows"):
        wait("%s in Airflow" % dag_id, lambda: dag(api, dag_id), 60, 0.5)
    print("three DAGs listed %.1f s after the copies" % (time.time() - t0))

    # The flow files are not Airflow's to parse: no import error for them,
    # and each flow's DAG comes from the generated folder.
    errors = api.get("https://%s/api/v2/importErrors" % VM_IP, timeout=30).json()
    assert not [e for e in errors["import_errors"] if "scpflow" in e["filename"].lower()], errors
    for dag_id in ("RootScpFlow", "AliceScpFlow"):
        assert "/.metaflow-services/%s.py" % dag_id in dag(api, dag_id)["fileloc"]
    assert dag(api, "plain_dag_next_to_flows")["fileloc"].endswith("/dags/plain_dag.py")

    # The plain DAG runs as any Airflow DAG; Alice's flow runs under her name.
    run_id, st, tis = lab.run_dag("plain_dag_next_to_flows", {}, timeout=300)
    assert st == "success", tis
    api.patch("https://%s/api/v2/dags/AliceScpFlow" % VM_IP, json={"is_paused": False},
              timeout=30).raise_for_status()
    _, mf_run = value_of_run(lab, "AliceScpFlow")
    meta = run_meta(lab, "AliceScpFlow", mf_run)
    assert "user:alice" in set(meta.get("tags", [])) | set(meta.get("system_tags", []))
    # Root's flow is recorded under flows.default_user (Metaflow refuses root).
    assert state(lab)["rootscpflow/flow.py"]["user"] in (None, "metaflow-services")
    assert "'user': 'metaflow-services'" in (
        lab.vm.root / DAGS.lstrip("/") / ".metaflow-services" / "RootScpFlow.py").read_text()

    # Generated files are not the users' to edit.
    edit = subprocess.run(["ssh", "-i", str(lab.key), "-o", "StrictHostKeyChecking=no",
                           "-o", "UserKnownHostsFile=/dev/null", "alice@" + VM_IP,
                           "echo '# edited' >> %s/.metaflow-services/AliceScpFlow.py" % DAGS],
                          capture_output=True, text=True, timeout=60)
    assert edit.returncode != 0 and "Permission denied" in edit.stderr

    # fab status names the dags folder and each flow's DAG.
    status = lab.fab("status")
    assert "flows in the dags folder %s" % DAGS in status.output, str(status)
    assert "alicescpflow/flow.py" in status.output and "DAG AliceScpFlow" in status.output
    lab.sh("rm -rf %s/rootscpflow %s/alicescpflow %s/plain_dag.py" % (DAGS, DAGS, DAGS))


def git(where, *args):
    return subprocess.run(["git", "-C", str(where), "-c", "user.name=ci", "-c",
                           "user.email=ci@example.com", *args], check=True, capture_output=True,
                          text=True).stdout


def test_a_git_checkout_follows_git_pull(deployed, lab, tmp_path):
    origin = tmp_path / "origin"
    subprocess.run(["git", "init", "-q", "-b", "main", str(origin)], check=True)
    for name in ("GitFirstFlow", "GitSecondFlow"):
        flow_folder(origin, name, "v1")
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "v1")
    checkout = lab.vm.root / DAGS.lstrip("/") / "team-flows"
    git(tmp_path, "clone", "-q", str(origin), str(checkout))
    api = lab.airflow()
    for dag_id in ("GitFirstFlow", "GitSecondFlow"):
        wait("%s in Airflow" % dag_id, lambda: dag(api, dag_id), 60, 0.5)
    api.patch("https://%s/api/v2/dags/GitFirstFlow" % VM_IP, json={"is_paused": False},
              timeout=30).raise_for_status()
    first = state(lab)

    for name in ("GitFirstFlow", "GitSecondFlow"):
        (origin / name.lower() / "helper.py").write_text("VALUE = 'v2'\n")
    git(origin, "commit", "-qam", "v2")
    git(checkout, "pull", "-q")
    rels = ["team-flows/gitfirstflow/flow.py", "team-flows/gitsecondflow/flow.py"]
    wait("both flows compiled after the pull",
         lambda: all(state(lab)[r]["checked_at"] > first[r]["checked_at"] for r in rels), 90)
    time.sleep(5)   # more scans: nothing more to compile
    after = state(lab)
    assert [after[r]["attempts"] - first[r]["attempts"] for r in rels] == [1, 1]
    assert all(after[r]["status"] == "ok" for r in rels)
    # The pulled code runs.
    _, mf_run = value_of_run(lab, "GitFirstFlow")
    assert artifact(lab, "GitFirstFlow", mf_run, "value") == "v2"
    lab.results["git_flow_run"] = mf_run


def test_an_old_flows_folder_moves_into_the_dags_folder_on_deploy(deployed, lab):
    """A deployment from before: its flows in data_dir/flows, their DAG files
    at the top of dags/. `fab deploy` moves them; DAG ids, pause state and run
    history stay."""
    if "git_flow_run" not in lab.results:
        pytest.skip("needs the git checkout test's flow and run")
    api = lab.airflow()
    before = dag(api, "GitFirstFlow")
    runs_before = {r["dag_run_id"] for r in api.get(
        "https://%s/api/v2/dags/GitFirstFlow/dagRuns" % VM_IP, timeout=30).json()["dag_runs"]}
    # The old layout, made from the current one with the watcher stopped.
    lab.compose("stop flow-watcher")
    lab.sh("cd %s && mkdir flows && mv dags/team-flows flows/ && "
           "mv dags/.metaflow-services/GitFirstFlow.py dags/.metaflow-services/GitSecondFlow.py "
           "dags/" % DATA_DIR)

    res = lab.deploy()
    assert res.returncode == 0, str(res)
    assert "moved 1 entries of flows/ into dags/; removed 2 generated DAG files" in res.output
    assert "flows now live in the dags folder %s" % DAGS in res.output, str(res)
    assert lab.sh("readlink %s/flows" % DATA_DIR).strip() == "dags"
    gen = lab.vm.root / DAGS.lstrip("/") / ".metaflow-services"
    wait("the moved flows compiled again", lambda: (gen / "GitFirstFlow.py").exists()
         and (gen / "GitSecondFlow.py").exists(), 90)
    assert not (lab.vm.root / DAGS.lstrip("/") / "GitFirstFlow.py").exists()
    after = wait("GitFirstFlow's DAG from its new file",
                 lambda: (dag(api, "GitFirstFlow") or {}).get("fileloc", "").endswith(
                     "/.metaflow-services/GitFirstFlow.py") and dag(api, "GitFirstFlow"), 90)
    assert after["is_paused"] == before["is_paused"] is False
    runs_after = {r["dag_run_id"] for r in api.get(
        "https://%s/api/v2/dags/GitFirstFlow/dagRuns" % VM_IP, timeout=30).json()["dag_runs"]}
    assert runs_before <= runs_after
    # The old path still takes flows.
    lab.sh("test -f %s/flows/team-flows/gitfirstflow/flow.py" % DATA_DIR)
    lab.sh("rm -rf %s/team-flows" % DAGS)
    wait("the removed checkout's DAGs to go away", lambda: dag(api, "GitFirstFlow") is None, 90)
