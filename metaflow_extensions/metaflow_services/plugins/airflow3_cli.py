"""``python FLOW_FILE airflow3 create [OUT] | trigger | delete``: the
Metaflow-native entry point of the compiler, and the commands Metaflow's
Deployer API runs (``Deployer(FLOW_FILE).airflow3(...)``, see
airflow3_deployer.py; the logic is in ``metaflow_services.deployment``).

Metaflow's own ``airflow`` group targets Airflow 2 on Kubernetes; this group
targets Airflow 3 on one machine. The command is a thin adapter: the compiler
lives in ``metaflow_services.compiler`` (imported only when the command runs,
because this module is shipped inside every code package, where
``metaflow_services`` is not installed).
"""

import sys

from metaflow import parameters
from metaflow._vendor import click

_ATTRIBUTE_FILE = dict(default=None, hidden=True,
                       help="Write what Metaflow's Deployer API reads to this file.")


@click.group()
def cli():
    pass


@cli.group(help="Compile this flow into an Airflow 3 DAG that runs on one machine, deploy "
                "it, trigger and delete it.")
@click.option("--dag-id", default=None,
              help="The DAG's id (default: the flow name, or project.branch.FlowName under "
                   "@project).")
@click.option("--dags-folder", default=None,
              help="Deploy into this local dags folder (default: $MFS_DAGS_FOLDER; without "
                   "either, to the deployment the Metaflow profile points at).")
@click.pass_obj
def airflow3(obj, dag_id=None, dags_folder=None):
    obj.mfs_dag_id = dag_id
    obj.mfs_dags_folder = dags_folder
    # Lint the graph exactly as `run` would, so a broken flow fails here.
    obj.check(obj.graph, obj.flow, obj.environment, pylint=obj.pylint)


def _fail(headline, e, code=1):
    # Printed here rather than by Metaflow, whose *bold* markup would eat
    # the asterisks of cron expressions in the message.
    click.secho(headline, fg="red", bold=True, err=True)
    click.secho("    %s" % (getattr(e, "what", None) or e), err=True)
    if getattr(e, "fix", ""):
        click.secho("    what to do: " + e.fix, err=True)
    sys.exit(code)


@airflow3.command(help="Compile this flow into a DAG and deploy it: to OUT (a file, or a "
                  "directory in which <dag_id>.py is written), the dags folder, or the "
                  "deployment of the Metaflow profile; the code package is uploaded.")
@click.argument("out", required=False)
@click.option("--tag", "tags", multiple=True, default=None,
              help="Tag every run of the DAG with this tag (repeatable).")
@click.option("--image", default=None,
              help="Container image for every step of this flow (docker executor); "
                   "overrides the deployment's MFS_STEP_IMAGE.")
@click.option("--step-image", "step_images", multiple=True, default=None,
              help="STEP=IMAGE: container image for one step (repeatable).")
@click.option("--dag-id", default=None,
              help="Airflow DAG id. Default: the flow name, or "
                   "project.branch.FlowName under @project.")
@click.option("--pool", default=None,
              help="Airflow pool every task of the DAG runs in (default: default_pool).")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print a JSON summary of the compiled DAG on stdout.")
@click.option("--deployer-attribute-file", **_ATTRIBUTE_FILE)
@click.pass_obj
def create(obj, out=None, tags=None, image=None, step_images=None, dag_id=None, pool=None,
           as_json=False, deployer_attribute_file=None):
    from metaflow_services import deployment
    from metaflow_services.compiler import CompileError, CompileOptions
    from metaflow_services.errors import ServicesError

    options = CompileOptions(
        tags=list(tags or ()),
        image=image,
        step_images=list(step_images or ()),
        dag_id=dag_id or obj.mfs_dag_id,
        pool=pool,
    )
    try:
        deployment.create(obj, out, obj.mfs_dags_folder, options,
                          attribute_file=deployer_attribute_file, as_json=as_json)
    except CompileError as e:
        _fail("Cannot compile this flow for Airflow:", e)
    except ServicesError as e:
        _fail("Cannot deploy this flow:", e)


@parameters.add_custom_parameters(deploy_mode=False)
@airflow3.command(help="Start a run of this flow's deployed DAG through Airflow's REST API "
                  "(the profile's address, $MFS_AIRFLOW_PASSWORD); the flow's parameters "
                  "are options.")
@click.option("--deployer-attribute-file", **_ATTRIBUTE_FILE)
@click.pass_obj
def trigger(obj, deployer_attribute_file=None, **kwargs):
    from metaflow_services import deployment
    from metaflow_services.errors import ServicesError

    try:
        deployment.trigger(obj, deployment.dag_id_of(obj, obj.mfs_dag_id),
                           deployment.trigger_params(obj.flow, kwargs),
                           attribute_file=deployer_attribute_file)
    except ServicesError as e:
        _fail("Cannot trigger this flow:", e)


@airflow3.command(help="Remove this flow's deployed DAG (its runs stay in Airflow's history "
                  "and in Metaflow).")
@click.pass_obj
def delete(obj):
    from metaflow_services import deployment
    from metaflow_services.errors import ServicesError

    try:
        deployment.delete(obj, deployment.dag_id_of(obj, obj.mfs_dag_id), obj.mfs_dags_folder)
    except ServicesError as e:
        _fail("Cannot delete this flow's DAG:", e)


@airflow3.command(help="Print this flow's step environments (@pypi, @conda, requirements.txt) "
                  "as JSON: what `fab bundle --flows` puts into the bundle's wheelhouse.")
@click.pass_obj
def environments(obj):
    import json

    from metaflow_services.compiler import CompileError, flow_environments

    try:
        click.echo(json.dumps(flow_environments(obj)))
    except CompileError as e:
        _fail("Cannot read the environments of this flow:", e)
