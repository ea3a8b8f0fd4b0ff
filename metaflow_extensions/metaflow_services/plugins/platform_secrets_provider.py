"""@secrets(sources=["name"]) from the platform: Metaflow's secrets provider of
TYPE "metaflow-services".

The task runtime reads the secrets a step's @secrets names from the
platform's store (metaflow_services/platform_secrets.py, the other side of
this file) and hands them to the step as a JSON file only the step's user can
read, named by MFS_SECRETS_FILE: {name: {VARIABLE: value}}. This module runs
inside the step, where only Metaflow and the standard library can be relied
on, so it names the variable and the type itself.
"""

import json
import os

from metaflow.exception import MetaflowException
from metaflow.plugins.secrets import SecretsProvider

FILE_ENV = "MFS_SECRETS_FILE"


class PlatformSecretsProvider(SecretsProvider):
    TYPE = "metaflow-services"

    def get_secret_as_dict(self, secret_id, options={}, role=None):
        path = os.environ.get(FILE_ENV)
        if not path:
            raise MetaflowException(
                "platform secrets reach the steps of runs that metaflow-services schedules "
                "(deployed flows); this run has none. For a run on your own machine, point "
                "%s at a JSON file of the form {\"%s\": {\"VARIABLE\": \"value\"}}, or use "
                "another secrets backend." % (FILE_ENV, secret_id))
        try:
            with open(path) as f:
                secrets = json.load(f)
        except (OSError, ValueError) as e:
            raise MetaflowException("cannot read the platform secrets file %s: %s" % (path, e))
        if secret_id not in secrets:
            raise MetaflowException(
                "the platform secret %r was not given to this step: a step gets the secrets "
                "its own @secrets(sources=[...]) names (it has: %s)"
                % (secret_id, ", ".join(sorted(secrets)) or "none"))
        return dict(secrets[secret_id])
