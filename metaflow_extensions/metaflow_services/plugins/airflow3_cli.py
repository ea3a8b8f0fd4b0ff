"""``python FLOW_FILE airflow3 create OUT``: the Metaflow-native entry point of
the compiler.

Metaflow's own ``airflow`` group targets Airflow 2 on Kubernetes; this group
targets Airflow 3 on one machine. The command is a thin adapter: the compiler
lives in ``metaflow_services.compiler`` (imported only when the command runs,
because this module is shipped inside every code package, where
``metaflow_services`` is not installed).
"""

from metaflow._vendor import click


@click.group()
def cli():
    pass


@cli.group(help="Compile this flow into an Airflow 3 DAG that runs on one machine.")
@click.pass_obj
def airflow3(obj):
    # Lint the graph exactly as `run` would, so a broken flow fails here.
    obj.check(obj.graph, obj.flow, obj.environment, pylint=obj.pylint)


@airflow3.command(help="Write the DAG file for this flow to OUT (a file, or a directory "
                  "in which <dag_id>.py is written) and upload the code package.")
@click.argument("out", required=True)
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
@click.pass_obj
def create(obj, out, tags=None, image=None, step_images=None, dag_id=None, pool=None,
           as_json=False):
    import sys

    from metaflow_services.compiler import CompileError, CompileOptions, create_dag

    options = CompileOptions(
        tags=list(tags or ()),
        image=image,
        step_images=list(step_images or ()),
        dag_id=dag_id,
        pool=pool,
    )
    try:
        create_dag(obj, out, options, as_json=as_json)
    except CompileError as e:
        # Printed here rather than by Metaflow, whose *bold* markup would eat
        # the asterisks of cron expressions in the message.
        click.secho("Cannot compile this flow for Airflow:", fg="red", bold=True, err=True)
        click.secho("    " + e.message, err=True)
        sys.exit(1)


@airflow3.command(help="Print this flow's step environments (@pypi, @conda, requirements.txt) "
                  "as JSON: what `fab bundle --flows` puts into the bundle's wheelhouse.")
@click.pass_obj
def environments(obj):
    import json
    import sys

    from metaflow_services.compiler import CompileError, flow_environments

    try:
        click.echo(json.dumps(flow_environments(obj)))
    except CompileError as e:
        click.secho("Cannot read the environments of this flow:", fg="red", bold=True, err=True)
        click.secho("    " + e.message, err=True)
        sys.exit(1)
