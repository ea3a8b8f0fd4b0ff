"""What a flow cannot do on this platform, and the error that says so.

A ``CompileError`` names the flow, the step, the construct and the fix. It is
a MetaflowException too, so Metaflow's CLI shows it like its own errors.
"""

from __future__ import annotations

from metaflow.exception import MetaflowException

from .errors import ExitCode, ServicesError

# Step decorators that change *where* a step runs; one machine cannot honour them.
_REFUSED_STEP_DECORATORS = {
    "kubernetes": "runs the step on Kubernetes",
    "batch": "runs the step on AWS Batch",
    "parallel": "runs the step as a multi-node gang (@parallel)",
    "slurm": "runs the step on a Slurm cluster",
    "nvidia": "runs the step on NVIDIA DGX Cloud",
    "snowpark": "runs the step on Snowpark",
}
_REFUSED_FLOW_DECORATORS = {
    "exit_hook": "runs hooks when the run ends",
}


# ServicesError first: its __init__ hands `what` on to MetaflowException's,
# which keeps it as the message Metaflow's CLI prints.
class CompileError(ServicesError, MetaflowException):
    headline = "Cannot compile this flow for Airflow"
    exit_code = ExitCode.USAGE


def refuse_step_decorators(flow_name, step_name, decos):
    for deco_name, what in _REFUSED_STEP_DECORATORS.items():
        if deco_name in decos:
            raise CompileError(
                "Flow %s, step %s: @%s %s, which a single-VM deployment cannot "
                "do. Remove @%s from the step; give it more resources with "
                "@resources(cpu=..., memory=...) instead."
                % (flow_name, step_name, deco_name, what, deco_name)
            )


def refuse_flow_decorators(flow_name, flow):
    decos = getattr(flow, "_flow_decorators", {}) or {}
    for deco_name, what in _REFUSED_FLOW_DECORATORS.items():
        if decos.get(deco_name):
            raise CompileError(
                "Flow %s: @%s %s, which this deployment does not support. Remove "
                "@%s; to run something after a flow, put it in a flow with "
                "@trigger_on_finish."
                % (flow_name, deco_name, what, deco_name)
            )


def refuse_required_parameters_on_schedule(flow_name, spec):
    if not spec["schedule"]:
        return
    for p in spec["parameters"]:
        if p["required"] and not p["has_default"]:
            raise CompileError(
                "Flow %s: the parameter %s is required and has no default, but the "
                "flow has @schedule: scheduled runs would have no value for it. Give it "
                "a default, or remove @schedule and trigger runs with a value."
                % (flow_name, p["name"])
            )

