"""``python flow.py airflow3 create | trigger | delete`` and Metaflow's
Deployer API (``Deployer("flow.py").airflow3().create()``) on top of them.

Where a DAG goes (``create``), first that applies:
  OUT (the command's argument)   written there, as `metaflow-services compile -o`
  --dags-folder / MFS_DAGS_FOLDER a local Airflow's dags folder
  otherwise                       the deployment the Metaflow profile points at,
                                  through its object store (inbox.py): a laptop
                                  with a profile from `fab client-config` needs
                                  no SSH key
``trigger`` starts a run through Airflow's REST API (airflow_client.py: the
profile's address, $MFS_AIRFLOW_PASSWORD); ``delete`` takes the DAG away
(Airflow keeps its runs, Metaflow its runs and artifacts).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from .airflow_client import AirflowAPIError, AirflowClient
from .compiler import CompileOptions, create_dag, dag_file_stem, say
from .errors import ExitCode, ServicesError
from .spec import run_id_for


class DeployError(ServicesError):
    headline = "Cannot deploy this flow"
    exit_code = ExitCode.FAILED


def dag_id_of(obj, dag_id=None):
    from metaflow import current

    return dag_id or current.get("project_flow_name") or obj.flow.name


def create(obj, out, dags_folder, options: CompileOptions, attribute_file=None, as_json=False):
    folder = dags_folder or os.environ.get("MFS_DAGS_FOLDER")
    if out or folder:
        # OUT may name a file; a dags folder is always a folder.
        target = out or os.path.join(folder, "")
        summary = create_dag(obj, target, options, as_json=as_json)
    else:
        summary = _create_on_deployment(obj, options, as_json)
    _wait_listed(summary)
    _write_attributes(attribute_file, {"name": summary["dag_id"], "flow_name": obj.flow.name,
                                       "metadata": obj.metadata.metadata_str(),
                                       "additional_info": {"where": summary["where"]}})
    return summary


def _create_on_deployment(obj, options, as_json):
    from . import inbox

    s3, bucket = _object_store(obj)
    tmp = tempfile.mkdtemp(prefix="mfs-deploy-")
    try:
        summary = create_dag(obj, tmp + os.sep, options, as_json=False)
        with open(summary["dag_file"]) as f:
            text = f.read()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stem = dag_file_stem(summary["dag_id"])
    etag = inbox.put_dag(s3, bucket, stem, text)
    say("Sent the DAG to the deployment (s3://%s/%s%s.py); waiting for the VM to install it ..."
        % (bucket, inbox.DAGS, stem))
    try:
        inbox.wait_installed(s3, bucket, stem, etag, say=say)
    except inbox.InboxError as e:
        raise DeployError("The deployment refused the DAG %s: %s" % (summary["dag_id"], e))
    summary.update(dag_file="s3://%s/%s%s.py" % (bucket, inbox.DAGS, stem),
                   where="deployment s3://%s" % bucket)
    if as_json:
        print(json.dumps(summary))
    say("Installed on the deployment: Airflow lists DAG %s within a minute." % summary["dag_id"])
    return summary


def _object_store(obj):
    if obj.flow_datastore.TYPE != "s3":
        raise DeployError(
            "No dags folder and no deployment to send the DAG to: the datastore is %s."
            % obj.flow_datastore.TYPE,
            "Use the profile fab client-config wrote (METAFLOW_PROFILE=NAME), or give "
            "--dags-folder DIR (or MFS_DAGS_FOLDER) for a local Airflow.")
    from metaflow.plugins.datatools.s3.s3util import get_s3_client

    from .objectstore import bucket_name

    s3, _ = get_s3_client()
    return s3, bucket_name(obj.flow_datastore.datastore_root)


def _wait_listed(summary, timeout=120):
    """With Airflow's address and a password at hand, wait until Airflow has
    parsed this version of the DAG, so that a trigger right after runs it,
    and unpause it."""
    client = _client_or_none()
    if client is None:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = client.get("/api/v2/dags/%s/details" % summary["dag_id"], "reading the DAG",
                         ok=(404,))
        if got and summary["package_sha"] in (got.get("doc_md") or ""):
            if got.get("is_paused"):
                # Deployed on purpose, as Metaflow's other deployers make it
                # live (a file dropped into the dags folder keeps Airflow's
                # airflow.dags_paused_at_creation).
                client.patch("/api/v2/dags/%s" % summary["dag_id"], {"is_paused": False},
                             "unpausing the DAG")
            say("Airflow lists DAG %s, unpaused: its schedule and triggers are live."
                % summary["dag_id"])
            return
        time.sleep(2)
    say("Warning: Airflow did not list this version of DAG %s within %d s; see the import "
        "errors in the Airflow UI." % (summary["dag_id"], timeout))


def _client_or_none():
    if not os.environ.get("MFS_AIRFLOW_PASSWORD"):
        return None
    try:
        return AirflowClient.from_settings()
    except AirflowAPIError as e:
        say("Warning: %s" % e.what)
        return None


def trigger(obj, dag_id, params, attribute_file=None):
    client = AirflowClient.from_settings()
    airflow_run_id = "deployer__%s" % time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + \
        "_%04d" % (int(time.time() * 1000) % 10000)
    path = "/api/v2/dags/%s" % dag_id
    dag = client.get(path, "reading the DAG", ok=(404,))
    if dag is None:
        raise DeployError("Airflow at %s has no DAG %s." % (client.url, dag_id),
                          "Deploy it first: python FLOW airflow3 create (or Deployer.create()).")
    if dag.get("is_paused"):
        say("Warning: DAG %s is paused: this run starts once it is unpaused (Airflow UI)."
            % dag_id)
    client.post(path + "/dagRuns", {"dag_run_id": airflow_run_id, "logical_date": None,
                                    "conf": params}, "triggering %s" % dag_id)
    pathspec = "%s/%s" % (obj.flow.name, run_id_for(dag_id, airflow_run_id))
    _write_attributes(attribute_file, {"name": dag_id, "metadata": obj.metadata.metadata_str(),
                                       "pathspec": pathspec, "airflow_run_id": airflow_run_id})
    say("Triggered DAG %s: Airflow run %s, Metaflow run %s." % (dag_id, airflow_run_id, pathspec))
    return pathspec


def delete(obj, dag_id, dags_folder):
    folder = dags_folder or os.environ.get("MFS_DAGS_FOLDER")
    stem = dag_file_stem(dag_id)
    if folder:
        path = os.path.join(folder, stem + ".py")
        removed = os.path.exists(path)
        if removed:
            os.unlink(path)
        where = path
    else:
        from . import inbox

        s3, bucket = _object_store(obj)
        removed = inbox.withdraw(s3, bucket, stem)
        where = "the deployment (s3://%s)" % bucket
    if not removed:
        raise DeployError("There is no deployed DAG %s in %s." % (dag_id, where))
    say("Removed DAG %s from %s: Airflow stops listing it shortly; its runs stay in Airflow's "
        "history and in Metaflow." % (dag_id, where))
    return True


def deployed_spec(dag_id, dags_folder=None, profile=None):
    """The spec of the deployed DAG *dag_id* (None when there is none): from
    the local dags folder, or from the deployment of the Metaflow profile."""
    from . import inbox
    from .airflow_client import load_profile
    from .spec import normalize
    from .workstation import profile_s3

    stem = dag_file_stem(dag_id)
    folder = dags_folder or os.environ.get("MFS_DAGS_FOLDER")
    if folder:
        try:
            with open(os.path.join(folder, stem + ".py")) as f:
                text = f.read()
        except OSError:
            text = None
    else:
        name = profile or os.environ.get("METAFLOW_PROFILE")
        path, prof = load_profile(name) if name else (None, None)
        if prof is None:
            raise DeployError("No Metaflow profile %s to find the deployment by%s." % (
                name or "(METAFLOW_PROFILE is not set)", " (%s)" % path if path else ""),
                "Pass profile=NAME (written by fab client-config), or dags_folder=DIR.")
        s3, bucket = profile_s3(prof)
        text = inbox.get_dag(s3, bucket, stem)
    return normalize(inbox.spec_of(text)) if text else None


def trigger_params(flow, kwargs) -> dict:
    """The run's parameters from the command's options (as Metaflow's Argo
    trigger reads them): only those given."""
    from metaflow.parameters import DelayedEvaluationParameter, JSONType

    params = {}
    for _, param in flow._get_parameters():
        if getattr(param, "IS_CONFIG_PARAMETER", False):
            continue
        val = kwargs.get(param.name.replace("-", "_").lower())
        if val is None:
            continue
        if isinstance(val, DelayedEvaluationParameter):
            val = val(return_str=True)
        if param.kwargs.get("type") == JSONType and isinstance(val, str):
            val = json.loads(val)
        params[param.name] = val
    return params


def _write_attributes(path, content):
    if path:
        with open(path, "w") as f:
            json.dump(content, f)
