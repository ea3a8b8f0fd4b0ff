"""Secrets of the platform for Metaflow's @secrets: stored, handed to steps.

A secret is a name and a set of environment variables (``{"PGPASSWORD":
"..."}``), kept as the Airflow Variable ``mfs_secret__NAME``: Airflow encrypts
Variables at rest with the deployment's Fernet key, serves them to tasks on
the main VM and on edge workers through its execution API, and masks the
values of a Variable whose key says "secret" in task logs.

    store    set / list / delete, in the scheduler container (Airflow's
             database): `metaflow-services secrets ...`, run by
             `fab secrets.set|list|delete NAME`
    compile  step_sources: which platform secrets a step's @secrets names
             (the spec's "secrets"; a step gets those and no others)
    run      fetch: the task runtime reads them (task SDK) for the executor,
             which hands them to the step as a private file (MFS_SECRETS_FILE)
             that the Metaflow provider of TYPE "metaflow-services" reads.

Values never go on a command line, into the environment of the container
(docker inspect shows it), into XCom or into the DAG file.
"""

from __future__ import annotations

import json
import re
import sys

TYPE = "metaflow-services"
VARIABLE_PREFIX = "mfs_secret__"
FILE_ENV = "MFS_SECRETS_FILE"
# In the step container: written before it starts, removed with it.
CONTAINER_DIR = "/run/metaflow-services"
CONTAINER_FILE = CONTAINER_DIR + "/secrets.json"
DESCRIPTION = "metaflow-services @secrets source %s (fab secrets.set %s)"

# No "." (Metaflow reads "type.id" in a source string) and what a variable key takes.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
# Metaflow's own rule for what @secrets may set (metaflow.plugins.secrets.utils).
_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SecretsError(ValueError):
    """Bad input to a secrets command, or a secret a step needs is missing."""


def check_name(name):
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SecretsError(
            "%r is not a platform secret name: use 1-100 letters, digits, '_' and '-', "
            "starting with a letter or digit (no '.': Metaflow reads TYPE.NAME)" % (name,))
    return name


def parse_values(text, name):
    """The environment variables of secret *name* from what the user gave:
    a JSON object of strings, or KEY=VALUE lines (# comments, blank lines)."""
    text = text.strip()
    if not text:
        raise SecretsError("no value for secret %s: give KEY=VALUE lines or a JSON object "
                           "on standard input" % name)
    if text.startswith("{"):
        try:
            values = json.loads(text)
        except ValueError as e:
            raise SecretsError("the value of secret %s starts with '{' but is not JSON (%s)"
                               % (name, e))
    else:
        values = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise SecretsError("line %d of the value of secret %s is not KEY=VALUE "
                                   "(the value itself is not shown)" % (n, name))
            values[key.strip()] = value
    if not isinstance(values, dict) or not values:
        raise SecretsError("the value of secret %s must be a non-empty JSON object or "
                           "KEY=VALUE lines" % name)
    for key, value in values.items():
        if not _VAR_RE.match(key) or key.startswith("METAFLOW_"):
            raise SecretsError(
                "secret %s: %r cannot be an environment variable of a step (letters, digits "
                "and '_', not starting with a digit, not METAFLOW_...)" % (name, key))
        if not isinstance(value, str):
            raise SecretsError("secret %s: the value of %s must be a string" % (name, key))
    return values


# ---------------------------------------------------------------------------
# Compile time
# ---------------------------------------------------------------------------


def step_sources(flow_name, step_name, decorator, default_type=None):
    """The platform secrets a step's @secrets decorator names, in order.
    Sources of other backends (aws-secrets-manager.X, {"type": ...}) are left
    to Metaflow. A bare name is ours unless the flow's environment sets
    another METAFLOW_DEFAULT_SECRETS_BACKEND_TYPE."""
    if decorator is None:
        return []
    default_type = default_type or TYPE
    names = []
    for source in decorator.attributes.get("sources") or []:
        if isinstance(source, str):
            kind, _, ident = source.partition(".") if "." in source else (default_type, "", source)
        elif isinstance(source, dict):
            kind, ident = source.get("type") or default_type, source.get("id")
        else:
            continue  # Metaflow itself refuses it when the step runs
        if kind != TYPE:
            continue
        try:
            names.append(check_name(ident))
        except SecretsError as e:
            raise SecretsError("Flow %s, step %s: @secrets source %s" % (flow_name, step_name, e))
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------
# The store (Airflow's database; run in the scheduler container)
# ---------------------------------------------------------------------------


def store_set(name, values):
    from airflow.models.crypto import get_fernet
    from airflow.models.variable import Variable

    check_name(name)
    if not get_fernet().is_encrypted:
        raise SecretsError(
            "Airflow has no [core] fernet_key here, so secret %s would be stored in plain "
            "text; nothing was stored. Set AIRFLOW__CORE__FERNET_KEY (fab deploy sets one)"
            % name)
    Variable.set(VARIABLE_PREFIX + name, json.dumps(values, sort_keys=True),
                 description=DESCRIPTION % (name, name))


def store_list():
    """{name: [variable names]} of every platform secret (never the values)."""
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import select

    found = {}
    with create_session() as session:
        rows = session.scalars(select(Variable).where(
            Variable.key.startswith(VARIABLE_PREFIX, autoescape=True))).all()
        for row in rows:
            try:
                keys = sorted(json.loads(row.val or "{}"))
            except ValueError:
                keys = ["(unreadable: set it again)"]
            found[row.key[len(VARIABLE_PREFIX):]] = keys
    return dict(sorted(found.items()))


def store_delete(name):
    from airflow.models.variable import Variable

    check_name(name)
    return Variable.delete(VARIABLE_PREFIX + name) > 0


# ---------------------------------------------------------------------------
# Run time (the task runtime, in the Airflow worker)
# ---------------------------------------------------------------------------


def fetch(names, step):
    """{name: {VAR: value}} for a step, read through Airflow's task SDK (the
    execution API: the same on the main VM and on workers). Every value is
    added to Airflow's log masker, so a step that prints one shows ***."""
    if not names:
        return {}
    from airflow.sdk import Variable
    from airflow.sdk.exceptions import AirflowRuntimeError
    from airflow.sdk.log import mask_secret

    found = {}
    for name in names:
        try:
            raw = Variable.get(VARIABLE_PREFIX + name)
        except (AirflowRuntimeError, KeyError):
            raw = None
        if raw is None:
            raise SecretsError(
                "Step %s asks for the platform secret %s (@secrets), which is not set on this "
                "deployment. Set it: fab -H HOST secrets.set %s (KEY=VALUE lines on standard "
                "input); fab -H HOST secrets.list shows those that are." % (step, name, name))
        values = json.loads(raw)
        for value in values.values():
            mask_secret(value)  # no name: masked whatever the variable is called
        found[name] = values
    return found


def file_content(secrets) -> bytes:
    return json.dumps(secrets, sort_keys=True).encode()


# ---------------------------------------------------------------------------
# `metaflow-services secrets set|list|delete`
# ---------------------------------------------------------------------------


def add_parser(sub):
    p = sub.add_parser(
        "secrets", help="Platform secrets for @secrets (in the scheduler container).",
        description="Secrets steps get with @secrets(sources=[NAME]), stored encrypted as "
                    "Airflow Variables mfs_secret__NAME. `set` reads KEY=VALUE lines or a "
                    "JSON object from standard input (never from the command line).")
    p.add_argument("action", choices=["set", "list", "delete"])
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_secrets)


def cmd_secrets(args):
    try:
        if args.action == "list":
            for name, keys in store_list().items():
                print("%s\t%s" % (name, ",".join(keys)))
            return 0
        if not args.name:
            raise SecretsError("secrets %s needs a NAME" % args.action)
        check_name(args.name)
        if args.action == "set":
            values = parse_values(sys.stdin.read(), args.name)
            store_set(args.name, values)
            print("set %s: %s" % (args.name, ", ".join(sorted(values))))
        elif store_delete(args.name):
            print("deleted %s" % args.name)
        else:
            print("no platform secret %s" % args.name, file=sys.stderr)
            return 1
        return 0
    except SecretsError as e:
        print("metaflow-services secrets: %s" % e, file=sys.stderr)
        return 2
