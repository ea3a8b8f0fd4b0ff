"""Users' flows on the deployed stack (issues 4 and 12): a flow file dropped
into the VM's dags folder (scp as root or as a member of the group metaflow,
a git checkout and `git pull`, next to plain Airflow DAGs) becomes a DAG
through the stack's flow-watcher; changed, its
new version runs; broken, the error shows in Airflow's import errors and in
`fab status` while the last good DAG keeps running; removed, its DAG goes
away. `fab push-flows` copies a folder and reports each flow's DAG or error.
`fab tunnel` + `fab client-config --tunnel` + `metaflow-services doctor
--profile` check the deployment from a workstation. A deployment from before
flows lived in the dags folder moves its flows/ in on `fab deploy`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import textwrap
import time

import pytest

from deploylab import DATA_DIR, REPO, TIMINGS, VENV_BIN, VM_IP, fab_env

pytestmark = pytest.mark.deploy

FLOW = textwrap.dedent('''
    from metaflow import FlowSpec, Parameter, step
    from helper import GREETING


    class DroppedFlow(FlowSpec):
        who = Parameter("who", default="world")

        @step
        def start(self):
            self.message = "%s, %s" % (GREETING, self.who)
            self.next(self.end)

        @step
        def end(self):
            print(self.message)


    if __name__ == "__main__":
        DroppedFlow()
''')

SCHEDULED = textwrap.dedent('''
    from metaflow import FlowSpec, schedule, step
    from helper import GREETING


    @schedule(cron="30 2 * * *")
    class PushedFlow(FlowSpec):
        @step
        def start(self):
            self.message = GREETING
            self.next(self.end)

        @step
        def end(self):
            pass


    if __name__ == "__main__":
        PushedFlow()
''')


class User:
    """A data scientist with an account on the VM (the deploy's login user,
    in the group that may write the dags folder), copying files over SFTP."""

    def __init__(self, lab):
        from fabric import Connection

        self.c = Connection(VM_IP, user="deployer",
                            connect_kwargs={"key_filename": str(lab.key)})

    def write(self, rel, text):
        path = "%s/dags/%s" % (DATA_DIR, rel)
        self.c.run("mkdir -p %s" % os.path.dirname(path), hide=True, in_stream=False)
        tmp = path + ".tmp"  # not a flow file: the watcher ignores it until renamed
        with self.c.sftp().open(tmp, "w") as f:
            f.write(text)
        self.c.run("mv -f %s %s" % (tmp, path), hide=True, in_stream=False)

    def remove(self, rel):
        self.c.run("rm -rf %s/dags/%s" % (DATA_DIR, rel), hide=True, in_stream=False)


def dag(api, dag_id):
    r = api.get("https://%s/api/v2/dags/%s" % (VM_IP, dag_id), timeout=30)
    return r.json() if r.status_code == 200 and not r.json().get("is_stale") else None


def wait(what, predicate, timeout, interval=1.0):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, "%s: not within %d s" % (what, timeout)
        time.sleep(interval)


def run_message(lab, api, dag_id, who):
    """Triggers a run with the parameter `who`; returns (Metaflow run id,
    the message artifact read from the object store)."""
    import gzip
    import pickle

    from metaflow_services.spec import run_id_for

    run_id, state, tis = lab.run_dag(dag_id, {"who": who}, timeout=600)
    assert state == "success", tis
    mf_run = run_id_for(dag_id, run_id)
    s3 = lab.s3()
    data = json.loads(s3.get_object(Bucket="metaflow", Key="metaflow/%s/%s/start/t-0/0.data.json"
                                    % (dag_id, mf_run))["Body"].read())
    sha = data["objects"]["message"]
    blob = s3.get_object(Bucket="metaflow",
                         Key="metaflow/%s/data/%s/%s" % (dag_id, sha[:2], sha))["Body"].read()
    return run_id, mf_run, pickle.loads(gzip.decompress(blob))


def run_meta(lab, dag_id, mf_run):
    """The run's record in the metadata service (through the proxy)."""
    return lab.metadata("flows/%s/runs/%s" % (dag_id, mf_run))


def import_errors(api, needle):
    errors = api.get("https://%s/api/v2/importErrors" % VM_IP, timeout=30).json()["import_errors"]
    return [e for e in errors if needle in e["stack_trace"]]


def test_drop_change_break_and_remove_a_flow(deployed, lab):
    api = lab.airflow()
    user = User(lab)
    user.write("team/helper.py", "GREETING = 'hello'\n")
    t0 = time.time()
    user.write("team/dropped_flow.py", FLOW)
    wait("the dropped flow's DAG in Airflow", lambda: dag(api, "DroppedFlow"), 30, 0.5)
    TIMINGS["flow dropped -> DAG in Airflow (s)"] = round(time.time() - t0, 1)
    api.patch("https://%s/api/v2/dags/DroppedFlow" % VM_IP, json={"is_paused": False},
              timeout=30).raise_for_status()
    run_id, mf_run, message = run_message(lab, api, "DroppedFlow", "team")
    assert message == "hello, team"

    # Runs are recorded under the file's owner and tagged with Airflow's ids.
    meta = run_meta(lab, "DroppedFlow", mf_run)
    tags = set(meta.get("tags", [])) | set(meta.get("system_tags", []))
    assert "user:deployer" in tags, tags
    assert {"airflow_dag_id:DroppedFlow", "airflow_run_id:%s" % run_id} <= tags, tags

    # Changed (a helper module): the new version runs.
    user.write("team/helper.py", "GREETING = 'good morning'\n")
    wait("the changed flow to run", lambda: run_message(lab, api, "DroppedFlow", "team")[2]
         == "good morning, team", 180, 2)

    # Broken: the error is an Airflow import error, and in `fab status`; the
    # last good DAG still runs.
    user.write("team/dropped_flow.py", FLOW.replace("def end(self):", "def end(self:"))
    errors = wait("the compile error in /api/v2/importErrors",
                  lambda: import_errors(api, "team/dropped_flow.py does not compile"), 60)
    assert "The last good version (DAG DroppedFlow) keeps running" in errors[0]["stack_trace"]
    assert "syntax error" in errors[0]["stack_trace"]
    status = lab.fab("status")
    assert "team/dropped_flow.py" in status.output and "ERROR" in status.output, str(status)
    assert "the last good DAG DroppedFlow keeps running" in status.output, str(status)
    assert run_message(lab, api, "DroppedFlow", "still")[2] == "good morning, still"

    # Fixed: the error goes away.
    user.write("team/dropped_flow.py", FLOW)
    wait("the import error to go away",
         lambda: not import_errors(api, "team/dropped_flow.py does not compile"), 60)

    # Removed: the DAG goes away, its runs stay.
    user.remove("team")
    wait("the removed flow's DAG to go away", lambda: dag(api, "DroppedFlow") is None, 60)
    runs = api.get("https://%s/api/v2/dags/DroppedFlow/dagRuns" % VM_IP, timeout=30).json()
    assert any(r["dag_run_id"] == run_id for r in runs.get("dag_runs", [])), runs


def test_push_flows_copies_only_what_changed_and_reports_each_flow(deployed, lab, tmp_path):
    folder = tmp_path / "flows"
    (folder / "nightly").mkdir(parents=True)
    (folder / "nightly" / "helper.py").write_text("GREETING = 'pushed'\n")
    (folder / "nightly" / "pushed_flow.py").write_text(SCHEDULED)
    (folder / "notes.md").write_text("not part of any flow\n")

    res = lab.fab("push-flows", str(folder))
    assert res.returncode == 0, str(res)
    assert "added   nightly/pushed_flow.py" in res.output and "added   nightly/helper.py" in res.output
    assert "notes.md" not in res.output
    assert "DAG PushedFlow, 30 2 * * *" in res.output, str(res)
    assert "https://%s/dags/PushedFlow" % VM_IP in res.output
    api = lab.airflow()
    wait("PushedFlow in Airflow", lambda: dag(api, "PushedFlow"), 60)

    again = lab.fab("push-flows", str(folder))
    assert again.returncode == 0 and "nothing changed on the VM" in again.output, str(again)

    # A broken flow: its error, a non-zero exit, and the last good DAG kept.
    (folder / "nightly" / "pushed_flow.py").write_text(SCHEDULED.replace("@schedule(cron=",
                                                                         "@schedule(crom="))
    bad = lab.fab("push-flows", str(folder))
    assert bad.returncode == 1, str(bad)
    assert "updated nightly/pushed_flow.py" in bad.output
    assert "ERROR (the last good DAG PushedFlow keeps running)" in bad.output, str(bad)
    assert "crom" in bad.output
    assert "1 of 1 flows do not compile" in bad.output
    assert dag(api, "PushedFlow")

    # --delete removes what the folder no longer has.
    (folder / "nightly" / "pushed_flow.py").unlink()
    (folder / "other").mkdir()
    (folder / "other" / "helper.py").write_text("GREETING = 'other'\n")
    (folder / "other" / "other_flow.py").write_text(
        SCHEDULED.replace("PushedFlow", "OtherFlow").replace('@schedule(cron="30 2 * * *")\n', ""))
    res = lab.fab("push-flows", str(folder), "--delete")
    assert res.returncode == 0, str(res)
    assert "removed nightly/pushed_flow.py" in res.output
    assert "DAG OtherFlow, no schedule" in res.output, str(res)
    wait("PushedFlow's DAG to go away", lambda: dag(api, "PushedFlow") is None, 60)


def _wait_port(port, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    proc.terminate()
    raise AssertionError("nothing listens on localhost:%d; fab tunnel said:\n%s"
                         % (port, proc.communicate(timeout=30)[0]))


def doctor(lab, profile_dir, name, password=None):
    env = fab_env(lab.home)
    env["METAFLOW_HOME"] = str(profile_dir)
    if password:
        env["MFS_DOCTOR_AIRFLOW_PASSWORD"] = password
    return subprocess.run([str(VENV_BIN / "metaflow-services"), "doctor", "--profile", name],
                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=120)


def test_tunnel_client_config_and_doctor_from_a_workstation(deployed, lab, tmp_path):
    profiles = tmp_path / "profiles"
    res = lab.fab("client-config", "--tunnel", "--name", "viatunnel", "--directory",
                  str(profiles))
    assert res.returncode == 0, str(res)
    prof = json.loads((profiles / "config_viatunnel.json").read_text())
    assert prof["METAFLOW_S3_ENDPOINT_URL"] == "https://localhost:19000"
    assert prof["MFS_AIRFLOW_URL"] == "https://localhost:10443"

    # Closed tunnel: doctor says what is wrong and what to do.
    closed = doctor(lab, profiles, "viatunnel")
    assert closed.returncode == 1, closed.stdout
    assert "FAIL airflow" in closed.stdout and "cannot reach https://localhost:10443" \
        in closed.stdout and "fab -H HOST tunnel" in closed.stdout, closed.stdout

    argv = [str(VENV_BIN / "fab"), "-H", "deployer@%s" % VM_IP, "-i", str(lab.key), "tunnel",
            "--seconds", "90"]
    tun = subprocess.Popen(argv, cwd=str(REPO), env=fab_env(lab.home), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_port(10443, tun)
        _wait_port(19000, tun)
        ok = doctor(lab, profiles, "viatunnel", password=lab.secret("MFS_AIRFLOW_PASSWORD_ADMIN"))
        assert ok.returncode == 0, ok.stdout
        for line in ("ok   airflow ", "ok   airflow-auth ", "ok   airflow-login ",
                     "ok   object-store ", "ok   metadata ", "ok   metadata-auth ",
                     "ok   metaflow-ui "):
            assert line in ok.stdout, ok.stdout
        # A wrong password and wrong keys are named as such.
        prof["METAFLOW_DATATOOLS_CLIENT_PARAMS"]["aws_secret_access_key"] = "wrong"
        (profiles / "config_wrongkeys.json").write_text(json.dumps(prof))
        bad = doctor(lab, profiles, "wrongkeys", password="wrong-password")
        assert bad.returncode == 1
        assert "FAIL airflow-login" in bad.stdout and "FAIL object-store" in bad.stdout, bad.stdout
        assert "refused the profile's keys" in bad.stdout, bad.stdout
    finally:
        tun.terminate()
        out = tun.communicate(timeout=30)[0]
    assert "Airflow UI and REST API" in out and "https://localhost:10443" in out, out


def test_images_and_prune_images_run_in_the_stack(deployed, lab):
    # The test stack's flows pin nothing: no environment image exists, and
    # pruning finds the DAGs in the VM's dags folder and removes nothing.
    res = lab.fab("images")
    assert res.returncode == 0, str(res)
    assert "No step environment images on this host." in res.output, str(res)
    res = lab.fab("prune-images", "--dry-run")
    assert res.returncode == 0, str(res)
    assert re.search(r"0 image\(s\) to remove; 0 in use by the [1-9]\d* DAG\(s\) in "
                     r"/opt/airflow/dags\.", res.output), str(res)
