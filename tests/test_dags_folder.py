"""Flows dropped into the dags folder (issue 12), at the watcher's level with
real compiles and Airflow's own file discovery: flows next to plain DAG files,
the generated DAGs in the hidden folder git ignores, refusals that leave
everything else alone, two files with one flow name, a `git pull` changing
many flows at once, and the move of an old deployment's flows/ folder (the
deploy's shell, run for real)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


from metaflow_services.watcher import GENERATED, Watcher, might_contain_dag
from support import deploy_module, plain_dag, value_flow

PLAIN_DAG = plain_dag()


def flow(name, doc="A flow.", value=1):
    return value_flow(name, doc), "VALUE = %r\n" % value


def write(path: Path, text, mtime=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    (tmp.write_bytes if isinstance(text, bytes) else tmp.write_text)(text)
    os.replace(tmp, path)


def settle(w: Watcher):
    """Two scans (a change is seen, then compiled once it has settled)."""
    return w.poll() + w.poll()


def test_flows_and_plain_dags_share_the_folder_and_airflow_parses_only_dags(tmp_path, seaweedfs,
                                                                             monkeypatch):
    dags = tmp_path / "dags"
    text, helper = flow("SharedFolderFlow", doc="Runs on Airflow every day (a DAG, really).")
    write(dags / "team" / "shared_flow.py", text)
    write(dags / "team" / "helper.py", helper)
    write(dags / "plain_dag.py", PLAIN_DAG)
    plain_before = (dags / "plain_dag.py").read_bytes()
    w = Watcher(dags, settle=0)
    (st,) = settle(w)
    assert st.status == "ok", st.message
    gen = dags / GENERATED
    assert (gen / "SharedFolderFlow.py").is_file()
    assert (gen / "state.json").is_file()
    # The plain DAG is not the compiler's business: unchanged, not in the state.
    assert (dags / "plain_dag.py").read_bytes() == plain_before
    assert set(w.state) == {"team/shared_flow.py"}

    # Airflow's own discovery, with the stack's setting: the plain DAG and the
    # generated DAG are parsed; the flow file (whose docstring says "Airflow"
    # and "DAG") and its helper are not.
    from airflow.utils.file import find_dag_file_paths

    monkeypatch.setenv("AIRFLOW__CORE__MIGHT_CONTAIN_DAG_CALLABLE",
                       "metaflow_services.watcher.might_contain_dag")
    found = {str(Path(p).relative_to(dags)) for p in find_dag_file_paths(str(dags), True)}
    assert found == {"plain_dag.py", GENERATED + "/SharedFolderFlow.py"}

    # Parsing the generated DAG does not import Metaflow.
    probe = ("import runpy, sys; runpy.run_path(%r); "
             "print(sorted(m for m in sys.modules if m == 'metaflow' or m.startswith('metaflow.')))"
             % str(gen / "SharedFolderFlow.py"))
    out = subprocess.run([os.sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"

    # A git checkout of the folder: the generated files are not its business.
    subprocess.run(["git", "init", "-q", str(dags)], check=True)
    status = subprocess.run(["git", "-C", str(dags), "status", "--porcelain", "-uall"],
                            capture_output=True, text=True, check=True).stdout
    assert sorted(line[3:] for line in status.splitlines()) == [
        "plain_dag.py", "team/helper.py", "team/shared_flow.py"]


def test_refused_files_say_why_and_leave_the_rest_alone(tmp_path, seaweedfs):
    dags = tmp_path / "dags"
    text, helper = flow("GoodFlow")
    write(dags / "good" / "good_flow.py", text)
    write(dags / "good" / "helper.py", helper)
    latin1, _ = flow("Latin1Flow", doc="caf\u00e9")
    write(dags / "latin" / "latin1_flow.py", latin1.encode("latin-1"))
    mixed, _ = flow("MixedFlow")
    write(dags / "mixed" / "mixed_flow.py", "from airflow.sdk import DAG\n" + mixed)
    huge, _ = flow("HugeFlow")
    write(dags / "huge" / "huge_flow.py", huge + "# " + "x" * (2 << 20) + "\n")
    w = Watcher(dags, settle=0)
    done = {s.path: s for s in settle(w)}
    assert done["good/good_flow.py"].status == "ok"
    assert "not UTF-8 text (byte 0xe9 on line 6)" in done["latin/latin1_flow.py"].message
    assert "imports Airflow" in done["mixed/mixed_flow.py"].message
    assert "separate files" in done["mixed/mixed_flow.py"].message
    assert "is 2.1 MB" in done["huge/huge_flow.py"].message
    gen = dags / GENERATED
    for rel, st in done.items():
        if rel == "good/good_flow.py":
            continue
        assert st.status == "error" and st.dag_id is None
        # Shown in Airflow as an import error naming the flow file.
        err = (gen / (rel[:-3].replace("/", "__") + ".compile_error.py")).read_text()
        assert "Metaflow flow %s does not compile" % rel in err
    assert sorted(p.name for p in gen.glob("*.py") if "compile_error" not in p.name) == [
        "GoodFlow.py"]
    # Airflow still parses the mixed file as the plain DAG file it is.
    assert might_contain_dag(str(dags / "mixed" / "mixed_flow.py"))
    assert not might_contain_dag(str(dags / "good" / "good_flow.py"))
    # Refusals are decided without compiling: fixed, the file compiles.
    write(dags / "latin" / "latin1_flow.py", latin1)
    write(dags / "latin" / "helper.py", "VALUE = 2\n")
    assert [s.status for s in settle(w)] == ["ok"]
    assert not (gen / "latin__latin1_flow.compile_error.py").exists()


def test_two_files_with_one_flow_name_the_first_keeps_its_dag(tmp_path, seaweedfs):
    dags = tmp_path / "dags"
    text, helper = flow("TwinFlow", value="first")
    write(dags / "a" / "twin_flow.py", text)
    write(dags / "a" / "helper.py", helper)
    w = Watcher(dags, settle=0)
    settle(w)
    first = (dags / GENERATED / "TwinFlow.py").read_text()
    text2, helper2 = flow("TwinFlow", value="second")
    write(dags / "b" / "twin_flow.py", text2)
    write(dags / "b" / "helper.py", helper2)
    (st,) = settle(w)
    assert st.status == "error" and st.path == "b/twin_flow.py"
    assert "b/twin_flow.py defines the flow TwinFlow" in st.message
    assert "already comes from a/twin_flow.py" in st.message
    assert (dags / GENERATED / "TwinFlow.py").read_text() == first   # not overwritten
    assert w.state["a/twin_flow.py"].status == "ok"
    # The first file goes: the second takes the name over.
    (dags / "a" / "twin_flow.py").unlink()
    (st,) = settle(w)
    assert st.path == "b/twin_flow.py" and st.status == "ok", st.message
    assert st.dag_id == "TwinFlow"
    assert not (dags / GENERATED / "b__twin_flow.compile_error.py").exists()


def test_a_git_pull_that_changes_20_flows_compiles_each_once(tmp_path, seaweedfs):
    origin, dags = tmp_path / "origin", tmp_path / "dags"
    names = ["Pulled%02dFlow" % i for i in range(20)]

    def commit(value):
        for name in names:
            text, helper = flow(name, value=value)
            write(origin / name.lower() / "flow.py", text)
            write(origin / name.lower() / "helper.py", helper)
        git(origin, "add", "-A")
        git(origin, "commit", "-qm", "value %d" % value)

    def git(where, *args):
        subprocess.run(["git", "-C", str(where), "-c", "user.name=t", "-c", "user.email=t@t",
                        *args], check=True, capture_output=True)

    subprocess.run(["git", "init", "-q", "-b", "main", str(origin)], check=True)
    commit(1)
    subprocess.run(["git", "clone", "-q", str(origin), str(dags / "team")], check=True)
    w = Watcher(dags, settle=1.0)
    # Scans every half second while the files land, as the stack's watcher.
    polls = 0
    while len(w.state) < 20 or any(s.status == "new" for s in w.state.values()) or polls < 4:
        w.poll()
        polls += 1
        assert polls < 400
        time.sleep(0.5)
    assert {s.status for s in w.state.values()} == {"ok"}
    before = {n: (dags / GENERATED / ("%s.py" % n)).read_text() for n in names}
    commit(2)
    git(dags / "team", "pull", "-q")
    t0 = {rel: s.checked_at for rel, s in w.state.items()}
    for _ in range(400):
        w.poll()
        if all(s.checked_at != t0[rel] for rel, s in w.state.items()) and not w._pending:
            break
        time.sleep(0.5)
    for _ in range(6):   # nothing left to do: more scans compile nothing
        assert w.poll() == []
    attempts = {rel: s.attempts for rel, s in w.state.items()}
    assert attempts == {"team/%s/flow.py" % n.lower(): 2 for n in names}
    assert {s.status for s in w.state.values()} == {"ok"}
    # Each DAG now runs the pulled code package.
    assert all((dags / GENERATED / ("%s.py" % n)).read_text() != before[n] for n in names)


# --------------------------------------------------------------------------
# The deploy's move of an old deployment's flows/ folder (its real shell)
# --------------------------------------------------------------------------


def _old_layout(data):
    """A deployment from before: flows in flows/, their generated DAG files,
    an error placeholder and the state at the top of dags/."""
    text, helper = flow("OldFlow")
    write(data / "flows" / "old" / "old_flow.py", text)
    write(data / "flows" / "old" / "helper.py", helper)
    write(data / "flows" / "top_flow.py", flow("TopFlow")[0])
    write(data / "dags" / "OldFlow.py", '"""Airflow DAG OldFlow: runs the Metaflow flow OldFlow.\n\n'
          'Generated by metaflow-services 0.1.0; do not edit."""\nSPEC = {}\n')
    write(data / "dags" / "top_flow.compile_error.py",
          '"""Compile error of the Metaflow flow top_flow.py (airflow dag placeholder written by\n'
          'metaflow-services; it disappears when the flow compiles again)."""\nraise RuntimeError()\n')
    write(data / "dags" / ".metaflow-services" / "state.json", '{"flows": {}}')
    write(data / "dags" / "plain_dag.py", PLAIN_DAG)


def _sh(script):
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True
                          ).stdout.strip()


def test_an_old_flows_folder_moves_into_the_dags_folder(tmp_path):
    cmd = deploy_module("commands")

    data = tmp_path / "srv"
    _old_layout(data)
    assert _sh(cmd.migrate_flows_folder(str(data), check_only=True)) == "needed"
    assert (data / "flows").is_dir() and not (data / "flows").is_symlink()  # checked only
    out = _sh(cmd.migrate_flows_folder(str(data)))
    assert out == "moved 2 entries of flows/ into dags/; removed 2 generated DAG files"
    assert os.readlink(data / "flows") == "dags"           # the old path keeps working
    files = sorted(str(p.relative_to(data / "dags")) for p in (data / "dags").rglob("*")
                   if p.is_file())
    assert files == ["old/helper.py", "old/old_flow.py", "plain_dag.py", "top_flow.py"]
    assert _sh(cmd.migrate_flows_folder(str(data))) == "current"   # once only
    (tmp_path / "fresh" / "dags").mkdir(parents=True)   # a deployment made since
    assert _sh(cmd.migrate_flows_folder(str(tmp_path / "fresh"))) == "current"


def test_a_name_in_both_folders_moves_nothing(tmp_path):
    cmd = deploy_module("commands")

    data = tmp_path / "srv"
    _old_layout(data)
    write(data / "dags" / "top_flow.py", PLAIN_DAG)   # a user's own file, not generated
    before = sorted(str(p) for p in data.rglob("*"))
    assert _sh(cmd.migrate_flows_folder(str(data), check_only=True)) == "clash: top_flow.py"
    assert _sh(cmd.migrate_flows_folder(str(data))) == "clash: top_flow.py"
    assert sorted(str(p) for p in data.rglob("*")) == before


def test_the_shipped_readme_is_kept_current_unless_a_user_made_it_theirs(tmp_path):
    cmd = deploy_module("commands")
    stack = deploy_module("stack")
    readme = (stack.DAGS_DIR / "README.md").read_text()
    path = tmp_path / "dags" / "README.md"
    path.parent.mkdir()
    path.parent.chmod(0o2775)   # the group's folder: writing our file keeps it so
    owner = "%d:%d" % (os.getuid(), os.getgid())
    assert _sh(cmd.ship_unless_edited(str(path), readme, owner)) == "written"
    assert path.parent.stat().st_mode & 0o7777 == 0o2775
    assert path.read_text() == readme
    assert _sh(cmd.ship_unless_edited(str(path), readme, owner)) == "unchanged"
    newer = readme.replace("Put Metaflow flows here", "Put your Metaflow flows here")
    assert _sh(cmd.ship_unless_edited(str(path), newer, owner)) == "written"   # still ours
    path.write_text("# Our team's flows\n")                               # now the team's
    assert _sh(cmd.ship_unless_edited(str(path), newer, owner)) == "kept (edited on the VM)"
    assert path.read_text() == "# Our team's flows\n"
