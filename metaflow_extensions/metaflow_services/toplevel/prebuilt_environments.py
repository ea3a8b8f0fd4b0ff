"""Let @pypi/@conda flows compile and run with steps in prebuilt images.

Metaflow's @pypi, @pypi_base, @conda and @conda_base insist on
`--environment=conda|pypi`, which builds the environments with micromamba (at
compile time and in every task, with internet access). metaflow-services
builds one container image per distinct environment instead, so tasks already
run inside it: the decorators must keep their attributes (the compiler reads
them) but not demand Metaflow's own environment.

Only when MFS_PREBUILT_ENVIRONMENTS=1 (set by `metaflow-services compile` and
by the task runtime) and only under the default `local` environment, the
decorators are shown an environment that reports itself as prebuilt. Nothing
changes for any other use of Metaflow on the same machine.
"""

import os


class _PrebuiltEnvironment(object):
    """The local environment, presented to the dependency decorators as a
    virtual environment that is already in place (nothing to create)."""

    TYPE = "pypi"

    def __init__(self, environment):
        self._environment = environment

    def set_local_root(self, local_root):
        pass

    def is_disabled(self, step):
        return True

    def __getattr__(self, name):
        return getattr(self._environment, name)


def _wrap(cls, method_name, env_position):
    original = getattr(cls, method_name)
    if getattr(original, "_mfs_prebuilt", False):
        return

    def wrapper(self, *args, **kwargs):
        args = list(args)
        if getattr(args[env_position], "TYPE", None) == "local":
            args[env_position] = _PrebuiltEnvironment(args[env_position])
        return original(self, *args, **kwargs)

    wrapper._mfs_prebuilt = True
    wrapper.__doc__ = original.__doc__
    setattr(cls, method_name, wrapper)


def _install():
    from metaflow.plugins.pypi import conda_decorator, pypi_decorator

    # step_init(self, flow, graph, step, decos, environment, ...)
    _wrap(pypi_decorator.PyPIStepDecorator, "step_init", 4)
    _wrap(conda_decorator.CondaStepDecorator, "step_init", 4)
    # flow_init(self, flow, graph, environment, ...)
    _wrap(pypi_decorator.PyPIFlowDecorator, "flow_init", 2)
    _wrap(conda_decorator.CondaFlowDecorator, "flow_init", 2)


if os.environ.get("MFS_PREBUILT_ENVIRONMENTS") == "1":
    _install()

__all__ = []
