"""The compiler: every flow shape and decorator becomes the right DAG, and every
construct one machine cannot honour is refused with an exact, actionable
message and no DAG file."""

from __future__ import annotations

import ast
import datetime
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import FLOWS, compile_flow, two_step_flow

SHAPES = ["linear_flow.py", "branches_flow.py", "foreach_flow.py", "nested_foreach_flow.py",
          "switch_flow.py", "retry_catch_flow.py", "config_project_flow.py",
          "single_step_flow.py", "custom_names_flow.py"]


def load_spec(path: Path) -> dict:
    from metaflow_services.spec import normalize

    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "SPEC":
            return normalize(ast.literal_eval(node.value))
    raise AssertionError("no SPEC in %s" % path)


def build(path: Path):
    from metaflow_services.dag import build_dag

    return build_dag(load_spec(path))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, seaweedfs):
    out = tmp_path_factory.mktemp("dags")
    for f in SHAPES:
        compile_flow(FLOWS / f, out)
    return out


def write_flow(tmp_path, body, name="flow.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def refused(tmp_path, body, extra_args=(), env=None):
    flow = write_flow(tmp_path, body)
    out = tmp_path / "dags"
    proc = compile_flow(flow, out, env=env, extra_args=extra_args, check=False)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert not out.exists() or not any(out.iterdir()), "a refused flow left a file behind"
    return " ".join((proc.stdout + proc.stderr).split())


def bad_flow(imp="Parameter", flow_deco="", param="", step_deco="", name="BadFlow"):
    return two_step_flow(imp=imp, flow_deco=flow_deco, param=param, step_deco=step_deco,
                         name=name)


# --------------------------------------------------------------------------
# DAG shapes
# --------------------------------------------------------------------------


def test_one_task_per_step_with_the_flows_edges(compiled):
    dag = build(compiled / "BranchesFlow.py")
    assert set(dag.task_dict) == {"start", "left", "right", "inner_a", "inner_b",
                                  "inner_join", "join", "end"}
    assert dag.task_dict["start"].downstream_task_ids == {"left", "right"}
    assert dag.task_dict["right"].downstream_task_ids == {"inner_a", "inner_b"}
    assert dag.task_dict["join"].upstream_task_ids == {"left", "inner_join"}
    assert dag.task_dict["start"].trigger_rule == "all_success"
    assert dag.task_dict["join"].trigger_rule == "none_failed"


def test_foreach_body_is_a_mapped_task_group(compiled):
    dag = build(compiled / "ForeachFlow.py")
    square, plus_one, join = (dag.task_dict[t] for t in ("square", "plus_one", "join"))
    group = square.task_group
    assert group is plus_one.task_group and group.group_id == "start_splits"
    assert type(group).__name__ == "MappedTaskGroup"
    assert square.downstream_task_ids == {"plus_one"}
    assert join.upstream_task_ids == {"plus_one"}
    assert dag.task_dict["join"].task_group.group_id is None  # outside the body


def test_nested_foreach_maps_only_the_outermost_level(compiled):
    spec = load_spec(compiled / "NestedForeachFlow.py")
    assert spec["steps"]["level3"]["foreach_stack"] == ["start", "level1", "level2"]
    assert {s: spec["steps"][s]["group"] for s in ("level1", "level3", "join2", "join1")} == {
        "level1": "start", "level3": "start", "join2": "start", "join1": None}
    dag = build(compiled / "NestedForeachFlow.py")
    assert dag.task_dict["left"].task_group.group_id == "start_splits"


def test_switch_and_recursive_step(compiled):
    spec = load_spec(compiled / "SwitchFlow.py")
    assert spec["steps"]["start"]["type"] == "split-switch"
    assert spec["steps"]["loop"]["recursive"] is True
    dag = build(compiled / "SwitchFlow.py")
    assert dag.task_dict["loop"].downstream_task_ids == {"end"}  # no self edge
    assert dag.task_dict["merge"].upstream_task_ids == {"fast_done", "slow"}


def test_single_step_and_custom_names(compiled):
    assert set(build(compiled / "SingleStepFlow.py").task_dict) == {"only"}
    spec = load_spec(compiled / "CustomNamesFlow.py")
    assert (spec["start_step"], spec["end_step"]) == ("begin", "finish")


def test_parameters_become_typed_params(compiled):
    dag = build(compiled / "LinearFlow.py")
    params = {k: dag.params.get_param(k) for k in dag.params}
    schema = {k: (p.value, p.schema.get("type"), p.description) for k, p in params.items()}
    assert schema["count"] == (3, "integer", "an int")
    assert schema["ratio"] == (0.5, "number", "a float")
    assert schema["flag"] == (False, "boolean", "a bool")
    assert schema["greeting"] == ("hello", "string", "a string")
    assert schema["config-json"][:2] == ({"a": 1}, None)
    value, ptype, description = schema["notes"]
    assert ptype == "string" and "IncludeFile" in description
    assert '"sub-type": "uploaded"' in value  # descriptor of the file uploaded at compile time


def test_retry_catch_timeout_map_to_airflow(compiled):
    dag = build(compiled / "RetryCatchFlow.py")
    t = dag.task_dict
    assert (t["start"].retries, t["start"].retry_delay) == (2, datetime.timedelta(0))
    # @catch: Metaflow's error retries (NUM_FALLBACK_RETRIES), so a crashed
    # attempt is followed by one that runs the fallback.
    assert t["raises"].retries == 3
    assert t["too_slow"].execution_timeout == datetime.timedelta(seconds=5 + 2 * 60)
    spec = load_spec(compiled / "RetryCatchFlow.py")
    assert spec["steps"]["start"]["max_user_code_retries"] == 2
    assert spec["steps"]["raises"]["max_user_code_retries"] == 0


def test_retry_delay_from_the_decorator(tmp_path, seaweedfs):
    flow = write_flow(tmp_path, bad_flow(imp="retry", name="DelayFlow",
                                         step_deco="@retry(times=3, minutes_between_retries=4)"))
    compile_flow(flow, tmp_path / "dags")
    dag = build(tmp_path / "dags" / "DelayFlow.py")
    assert dag.task_dict["start"].retries == 3
    assert dag.task_dict["start"].retry_delay == datetime.timedelta(minutes=4)


def test_project_sets_dag_id_and_branch(compiled):
    spec = load_spec(compiled / "mfs_test_user_tester_ConfigProjectFlow.py")
    assert spec["dag_id"] == "mfs_test.user.tester.ConfigProjectFlow"
    assert spec["flow"]["project"]["branch"] == "user.tester"
    assert spec["config_value"] == '{"settings": "kv.settings"}'


def test_tags_image_and_step_image_options(tmp_path, seaweedfs):
    out = tmp_path / "dags"
    compile_flow(FLOWS / "single_step_flow.py", out, extra_args=[
        "--tag", "team:ml", "--image", "registry.local/flow:1", "--step-image",
        "only=registry.local/big:2", "--dag-id", "custom_id"])
    spec = load_spec(out / "custom_id.py")
    assert spec["tags"] == ["team:ml"]
    assert spec["image"] == "registry.local/flow:1"
    assert spec["steps"]["only"]["image"] == "registry.local/big:2"


@pytest.mark.parametrize("decorator,cron,tz", [
    ("@schedule", "0 0 * * *", None),
    ("@schedule(hourly=True)", "0 * * * *", None),
    ("@schedule(weekly=True)", "0 0 * * SUN", None),
    ("@schedule(cron='30 6 * * 1-5')", "30 6 * * 1-5", None),
    ("@schedule(cron='0 6 ? * 2-6 *')", "0 6 * * MON-FRI", None),
    ("@schedule(cron='15 3 * * ? *', timezone='Europe/Amsterdam')", "15 3 * * *", "Europe/Amsterdam"),
])
def test_schedule_forms(tmp_path, seaweedfs, decorator, cron, tz):
    flow = write_flow(tmp_path, bad_flow(imp="schedule", flow_deco=decorator, name="SchedFlow"))
    compile_flow(flow, tmp_path / "dags")
    spec = load_spec(tmp_path / "dags" / "SchedFlow.py")
    assert (spec["schedule"]["cron"], spec["schedule"]["timezone"]) == (cron, tz)
    dag = build(tmp_path / "dags" / "SchedFlow.py")
    assert dag.timetable.expression == cron
    assert str(getattr(dag.timetable.timezone, "name", dag.timetable.timezone)) == (tz or "UTC")


# --------------------------------------------------------------------------
# Refusals: exact message, no DAG file
# --------------------------------------------------------------------------

@pytest.mark.parametrize("deco,what", [
    ("kubernetes", "runs the step on Kubernetes"),
    ("batch", "runs the step on AWS Batch"),
])
def test_refuses_remote_compute(tmp_path, seaweedfs, deco, what):
    msg = refused(tmp_path, bad_flow(imp=deco, step_deco="@%s" % deco))
    assert ("Flow BadFlow, step start: @%s %s, which a single-VM deployment cannot do. "
            "Remove @%s from the step; give it more resources with "
            "@resources(cpu=..., memory=...) instead." % (deco, what, deco)) in msg


def test_refuses_parallel(tmp_path, seaweedfs):
    msg = refused(tmp_path, """
        from metaflow import FlowSpec, step, parallel, current
        class BadFlow(FlowSpec):
            @step
            def start(self):
                self.next(self.train, num_parallel=2)
            @parallel
            @step
            def train(self):
                self.next(self.join)
            @step
            def join(self, inputs):
                self.next(self.end)
            @step
            def end(self):
                pass
        if __name__ == "__main__":
            BadFlow()
    """)
    assert ("Flow BadFlow, step train: @parallel runs the step as a multi-node gang "
            "(@parallel), which a single-VM deployment cannot do.") in msg


def test_refuses_exit_hook(tmp_path, seaweedfs):
    msg = refused(tmp_path, bad_flow(imp="exit_hook",
                                     flow_deco="@exit_hook(on_success=[print])"))
    assert ("Flow BadFlow: @exit_hook runs hooks when the run ends, which this deployment "
            "does not support. Remove @exit_hook; to run something after a flow, put it in a "
            "flow with @trigger_on_finish.") in msg


def test_step_environments_merge_step_flow_and_requirements(tmp_path, seaweedfs):
    out = tmp_path / "dags"
    compile_flow(FLOWS / "pinned" / "pinned_flow.py", out)
    steps = load_spec(out / "PinnedFlow.py")["steps"]
    # requirements.txt < @pypi_base < @pypi, per package name
    assert steps["start"]["environment"]["packages"] == ["six==1.16.0", "toolz==0.12.1"]
    assert steps["each"]["environment"]["packages"] == ["six==1.15.0", "toolz==0.12.0"]
    assert steps["each"]["environment"]["source"] == "requirements.txt + @pypi"
    assert steps["end"]["environment"] == steps["start"]["environment"]


def test_conda_packages_become_pip_requirements(tmp_path, seaweedfs):
    flow = write_flow(tmp_path, bad_flow(
        imp="conda", name="CondaFlow",
        step_deco="@conda(packages={'six': '>=1.15', 'toolz': ''}, python='3.11')"))
    compile_flow(flow, tmp_path / "dags")
    env = load_spec(tmp_path / "dags" / "CondaFlow.py")["steps"]["start"]["environment"]
    assert env == {"packages": ["six>=1.15", "toolz"], "python": "3.11", "source": "@conda"}


def test_environment_image_tag_depends_on_base_and_packages():
    from metaflow_services.images import environment_tag

    env = {"packages": ["six==1.16.0"], "python": None}
    tag = environment_tag("step:1", env)
    assert tag.startswith("metaflow-services/env:") and tag == environment_tag("step:1", dict(env))
    assert tag != environment_tag("step:2", env)
    assert tag != environment_tag("step:1", {"packages": ["six==1.15.0"], "python": None})


def test_refuses_requirements_with_pip_options(tmp_path, seaweedfs):
    (tmp_path / "requirements.txt").write_text("six==1.16.0\n--index-url http://x/simple\n")
    msg = refused(tmp_path, bad_flow())
    assert ("Flow BadFlow: requirements.txt line 2 ('--index-url http://x/simple') is not a "
            "plain requirement; pip options are not supported there (set the package index "
            "with MFS_PIP_INDEX_URL on the worker).") in msg


def test_refuses_required_parameter_without_default_on_a_schedule(tmp_path, seaweedfs):
    msg = refused(tmp_path, bad_flow(imp="Parameter, schedule", flow_deco="@schedule(hourly=True)",
                                     param="alpha = Parameter('alpha', required=True, type=int)"))
    assert ("Flow BadFlow: the parameter alpha is required and has no default, but the flow "
            "has @schedule: scheduled runs would have no value for it. Give it a default, or "
            "remove @schedule and trigger runs with a value.") in msg


@pytest.mark.parametrize("name", ["name", "script", "input"])
def test_refuses_parameter_names_metaflow_cannot_receive(tmp_path, seaweedfs, name):
    msg = refused(tmp_path, bad_flow(param="p = Parameter(%r, default='x')" % name))
    assert ("Flow BadFlow: the parameter %s cannot be passed to the run: Metaflow reads "
            "parameter values from METAFLOW_INIT_<NAME> variables and ignores or misreads "
            "this name. Rename the parameter (for example %s_value)." % (name, name)) in msg


def test_refuses_bad_timezone_and_year_restricted_cron(tmp_path, seaweedfs):
    msg = refused(tmp_path, bad_flow(imp="schedule", flow_deco="@schedule(timezone='Mars/Base')"))
    assert ("Flow BadFlow: @schedule(timezone='Mars/Base') is not a known IANA time zone. "
            "Use a name such as 'Europe/Amsterdam' or 'America/New_York'.") in msg
    msg = refused(tmp_path, bad_flow(imp="schedule", flow_deco="@schedule(cron='0 6 * * ? 2027')"))
    assert ("Flow BadFlow: @schedule(cron='0 6 * * ? 2027') restricts the year ('2027'); "
            "Airflow's cron has no year field. Use '*' as the sixth field.") in msg


def test_refuses_too_many_retries(tmp_path, seaweedfs):
    msg = refused(tmp_path, bad_flow(imp="retry", step_deco="@retry(times=7)"))
    assert "The maximum number of retries is @retry(times=4)." in msg  # Metaflow's own check


def test_refuses_root_user(tmp_path, seaweedfs):
    msg = refused(tmp_path, bad_flow(), env={"METAFLOW_USER": "root"})
    assert ("Metaflow needs a user name other than root to record runs. Set "
            "METAFLOW_USER (for example METAFLOW_USER=airflow) and compile again.") in msg


def test_syntax_error_names_file_and_line(tmp_path):
    flow = write_flow(tmp_path, "from metaflow import FlowSpec\nclass X(FlowSpec):\n    def (:\n")
    proc = compile_flow(flow, tmp_path / "dags", check=False)
    assert proc.returncode == 1
    assert "%s:3: syntax error: invalid syntax" % flow in proc.stderr
    assert "Refused: no DAG file written." in proc.stderr


def test_refused_recompile_keeps_the_last_good_dag(tmp_path, seaweedfs):
    out = tmp_path / "dags"
    good = bad_flow()
    flow = write_flow(tmp_path, good)
    compile_flow(flow, out)
    before = (out / "BadFlow.py").read_text()
    flow.write_text(textwrap.dedent(bad_flow(imp="kubernetes", step_deco="@kubernetes")))
    proc = compile_flow(flow, out, check=False)
    assert proc.returncode == 1
    assert (out / "BadFlow.py").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["BadFlow.py"]  # no temp files


# --------------------------------------------------------------------------
# The generated file
# --------------------------------------------------------------------------


def test_parsing_a_dag_imports_neither_metaflow_nor_the_network(compiled):
    probe = textwrap.dedent("""
        import socket, sys
        class Blocked(Exception):
            pass
        def no_network(*a, **k):
            raise Blocked("network access at parse time")
        socket.socket.connect = no_network
        socket.create_connection = no_network
        import runpy
        ns = runpy.run_path(sys.argv[1])
        assert ns["dag"].dag_id == "NestedForeachFlow"
        bad = [m for m in ("metaflow", "docker", "boto3", "botocore") if m in sys.modules]
        print("IMPORTED:" + ",".join(bad))
    """)
    proc = subprocess.run([sys.executable, "-c", probe, str(compiled / "NestedForeachFlow.py")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, AIRFLOW__CORE__LOAD_EXAMPLES="False"))
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED:\n" in proc.stdout or proc.stdout.strip().endswith("IMPORTED:")


def test_generated_file_is_small_and_readable(compiled):
    text = (compiled / "ForeachFlow.py").read_text()
    assert text.count("\nfrom ") + text.count("\nimport ") == 1
    assert "dag = build_dag(SPEC)" in text
    assert "Generated by metaflow-services" in text and "do not edit" in text
    assert "airflow" in text.lower() and "dag" in text.lower()  # Airflow's safe-mode heuristic
    assert len(text.splitlines()) < 150


def test_docs_name_the_flow_file_and_package_and_link_the_ui(compiled, monkeypatch):
    monkeypatch.setenv("MFS_METAFLOW_UI_URL", "https://mf.example.org/")
    dag = build(compiled / "LinearFlow.py")
    spec = load_spec(compiled / "LinearFlow.py")
    assert "linear_flow.py" in dag.doc_md
    assert spec["package"]["sha"] in dag.doc_md
    assert "https://mf.example.org/?flow_id=LinearFlow" in dag.doc_md


def test_metaflow_native_command_and_no_clash_with_builtin_airflow(tmp_path, seaweedfs):
    out = tmp_path / "native.py"
    proc = subprocess.run([sys.executable, str(FLOWS / "single_step_flow.py"), "--no-pylint",
                           "airflow3", "create", str(out)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=str(FLOWS))
    assert proc.returncode == 0, proc.stdout
    assert load_spec(out)["dag_id"] == "SingleStepFlow"
    builtin = subprocess.run([sys.executable, str(FLOWS / "single_step_flow.py"), "airflow",
                              "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, cwd=str(FLOWS))
    assert "Compile a new version of this flow to Airflow DAG" in builtin.stdout
