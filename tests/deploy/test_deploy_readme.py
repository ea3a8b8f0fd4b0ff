"""The README's walkthrough, run as written: root login, `scripts/fab`, a
folder of flows next to you, the Airflow password from `fab secrets`, a run
triggered in Airflow, a laptop profile from `client-config` and the Metaflow
client reading the run's artifacts from the deployed metadata service.

The lines are taken from README.md itself (the first bash block of "From a
bare VM to a scheduled flow"), so the README cannot drift from what works.
Only two things differ from a user's shell: `vm` is the test VM's address,
and the deploy line gets `--config` with the test-built images (no registry
is reachable here; everything else is the defaults).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from deploylab import REPO, VM_IP, fab_env

pytestmark = pytest.mark.deploy

MY_FLOW = '''\
from metaflow import FlowSpec, Parameter, step


class MyFlow(FlowSpec):
    """The README's example flow."""

    greeting = Parameter("greeting", default="hello")

    @step
    def start(self):
        self.words = [self.greeting, "from", "airflow"]
        self.next(self.end)

    @step
    def end(self):
        self.sentence = " ".join(self.words)
        print(self.sentence)


if __name__ == "__main__":
    MyFlow()
'''


def readme_lines():
    text = (REPO / "README.md").read_text()
    section = text.split("## From a bare VM to a scheduled flow", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = []
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        # Drop a trailing comment (two spaces or more, then #), not a # inside quotes.
        lines.append(re.sub(r"\s{2,}#[^\"']*$", "", line).strip())
    return lines


@pytest.fixture(scope="module")
def user_shell(deployed, lab, tmp_path_factory):
    """A laptop: the SSH key where ssh looks for it (no -i), a folder of
    flows, the lines of the README."""
    home = tmp_path_factory.mktemp("readme-home")
    (home / ".ssh").mkdir(mode=0o700)
    shutil.copy(lab.key, home / ".ssh" / "id_ed25519")
    (home / ".ssh" / "id_ed25519").chmod(0o600)
    work = tmp_path_factory.mktemp("laptop")
    (work / "my_flows").mkdir()
    (work / "my_flows" / "my_flow.py").write_text(MY_FLOW)
    lines = readme_lines()
    return home, work, lines


def sh(line, home, work, timeout=1200):
    env = dict(fab_env(home), HOME=str(home))
    line = line.replace("root@vm", "root@" + VM_IP).replace("scripts/fab", str(REPO / "scripts/fab"))
    t0 = time.time()
    proc = subprocess.run(["bash", "-c", line], cwd=str(work), env=env, text=True,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, proc.stdout, "$ %s\n(exit %d, %.0fs)\n%s" % (
        line, proc.returncode, time.time() - t0, proc.stdout[-5000:])


def line_starting(lines, prefix):
    found = [ln for ln in lines if ln.startswith(prefix)]
    assert found, "README.md has no line %r... in its walkthrough: %s" % (prefix, lines)
    return found[0]


def test_the_readme_walkthrough_as_root(user_shell, lab):
    home, work, lines = user_shell

    # 1. scripts/fab -H root@vm deploy (the first deploy was this very line,
    # as root, from the bundle; again it converges and says where to look).
    deploy = line_starting(lines, "scripts/fab -H root@vm deploy")
    rc, out, log = sh(deploy + " --config %s" % lab.config, home, work)
    assert rc == 0, log
    assert "https://%s" % VM_IP in out and "Metaflow UI" in out, log

    # 2. The Airflow password.
    rc, out, log = sh(line_starting(lines, "scripts/fab -H root@vm secrets"), home, work)
    assert rc == 0, log
    password = lab.secret("MFS_AIRFLOW_PASSWORD_ADMIN")
    assert password in out, log

    # 3. push-flows my_flows/ (relative to where the user is), as root: the
    # flow compiles and runs as flows.default_user.
    rc, out, log = sh(line_starting(lines, "scripts/fab -H root@vm push-flows"), home, work)
    assert rc == 0, log
    assert "MyFlow" in out and "refus" not in out.lower(), log

    # 4. Unpause and trigger MyFlow in Airflow (its REST API, with the password).
    token = lab.airflow_token(password=password)
    assert token.status_code in (200, 201), token.text
    api = lab.airflow()
    # Airflow's dag-processor picks the compiled DAG up within seconds.
    deadline = time.time() + 90
    while api.get("https://%s/api/v2/dags/MyFlow" % VM_IP, timeout=30).status_code != 200:
        assert time.time() < deadline, "MyFlow is not in Airflow 90 s after push-flows"
        time.sleep(2)
    api.patch("https://%s/api/v2/dags/MyFlow" % VM_IP, json={"is_paused": False},
              timeout=30).raise_for_status()
    run_id, state, tis = lab.run_dag("MyFlow", {"greeting": "hi"}, timeout=600)
    assert state == "success", tis

    # 5. client-config, then the Metaflow client on the laptop.
    rc, out, log = sh(line_starting(lines, "scripts/fab -H root@vm client-config"), home, work)
    assert rc == 0, log
    rc, out, log = sh(line_starting(lines, "METAFLOW_PROFILE=team python"), home, work,
                      timeout=300)
    assert rc == 0, log
    from metaflow_services.spec import run_id_for

    assert "Run('MyFlow/%s')" % run_id_for("MyFlow", run_id) in out, log
    assert "True" in out and "sentence" in out and "words" in out, log

    # The run is in the metadata service under the default user, tagged
    # with Airflow's ids.
    run = lab.metadata("flows/MyFlow/runs/%s" % run_id_for("MyFlow", run_id))
    tags = set(run["tags"]) | set(run["system_tags"])
    assert "user:metaflow-services" in tags and run["user_name"] == "metaflow-services", run
    assert "airflow_run_id:%s" % run_id in tags, tags
