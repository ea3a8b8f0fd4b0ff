"""What a run takes from outside its steps: its parameters, config values
and schedule, and who and what it belongs to (user, tags, project, the
options flow decorators add to Metaflow's command line).
"""

from __future__ import annotations

import json
import re

from metaflow import current
from metaflow.exception import MetaflowException

from .refusals import CompileError

# Parameter names Metaflow drops or mangles when passed through the
# environment (METAFLOW_INIT_<NAME>), see metaflow-on-airflow.md.
_RESERVED_PARAMETER_NAMES = {"name", "cmd", "input", "index", "script"}


def run_user(flow_name):
    from metaflow.util import get_username

    user = get_username()
    if not user or user == "root":
        raise CompileError(
            "Flow %s: Metaflow needs a user name other than root to record runs. "
            "Set METAFLOW_USER (for example METAFLOW_USER=airflow) and compile again."
            % flow_name
        )
    return user


def project():
    name = current.get("project_name")
    if not name:
        return None
    return {
        "name": name,
        "branch": current.get("branch_name"),
        "flow_name": current.get("project_flow_name"),
        "is_production": bool(current.get("is_production")),
        "is_user_branch": bool(current.get("is_user_branch")),
    }


def validated_tags(flow_name, tags):
    from metaflow.tagging_util import validate_tags

    try:
        validate_tags(tags)
    except MetaflowException as e:
        raise CompileError("Flow %s: invalid --tag: %s" % (flow_name, e))
    return list(tags)


def top_level_options(flow):
    """--branch/--production and other options flow decorators add to the CLI."""
    from metaflow.decorators import flow_decorators
    from metaflow.util import dict_to_cli_options

    opts = {}
    for deco in flow_decorators(flow):
        opts.update(deco.get_top_level_options())
    return list(dict_to_cli_options(opts))


def parameters(flow_name, flow):
    """The flow's parameters (config parameters aside): how a run receives
    each (METAFLOW_INIT_<NAME>), its kind and its default."""
    out = []
    seen = set()
    for _, param in flow._get_parameters():
        if param.IS_CONFIG_PARAMETER:
            continue
        norm = param.name.lower().replace("-", "_")
        if norm in _RESERVED_PARAMETER_NAMES:
            raise CompileError(
                "Flow %s: the parameter %s cannot be passed to the run: Metaflow "
                "reads parameter values from METAFLOW_INIT_<NAME> variables and "
                "ignores or misreads this name. Rename the parameter (for example "
                "%s_value)." % (flow_name, param.name, param.name)
            )
        if norm in seen:
            raise CompileError(
                "Flow %s: the parameter %s is declared twice (names are "
                "case-insensitive and '-' equals '_'). Rename one of them."
                % (flow_name, param.name)
            )
        seen.add(norm)
        kind = _kind(param)
        has_default = "default" in param.kwargs and param.kwargs.get("default") is not None
        out.append({
            "name": param.name,
            "env": "METAFLOW_INIT_" + param.name.upper().replace("-", "_"),
            "kind": kind,
            "default": _default(flow_name, param, kind) if has_default else None,
            "has_default": has_default,
            "required": bool(param.kwargs.get("required", False)),
            "help": param.kwargs.get("help") or "",
        })
    return out


def _kind(param):
    """json, file, bool, int, float or str: from the declared type, else the
    default's."""
    from metaflow.includefile import FilePathClass
    from metaflow.parameters import JSONType, deploy_time_eval

    ptype = param.kwargs.get("type")
    if ptype is None and "default" in param.kwargs:
        d = deploy_time_eval(param.kwargs.get("default"))
        ptype = type(d) if d is not None else str
    if ptype == JSONType:
        return "json"
    if isinstance(ptype, FilePathClass):
        return "file"
    if ptype is bool or getattr(ptype, "name", None) == "boolean":
        return "bool"
    if ptype is int or getattr(ptype, "name", None) == "integer":
        return "int"
    if ptype is float or getattr(ptype, "name", None) == "float":
        return "float"
    return "str"


def _default(flow_name, param, kind):
    from metaflow.parameters import deploy_time_eval

    # Evaluates deploy-time defaults (functions of the context) and, for
    # IncludeFile, uploads the file and returns its descriptor.
    default = deploy_time_eval(param.kwargs.get("default"))
    if kind == "json" and isinstance(default, str):
        try:
            default = json.loads(default)
        except ValueError:
            raise CompileError(
                "Flow %s: the default of the JSON parameter %s is not "
                "valid JSON." % (flow_name, param.name)
            )
    if kind == "file" and not isinstance(default, str):
        default = json.dumps(default)
    return default


def config_value(flow):
    """Config values are frozen into the code package at compile time; tasks read
    them back from it ("kv." keys), exactly as Metaflow's Argo integration does."""
    from metaflow.user_configs.config_options import ConfigInput

    cfg = {
        param.name: ConfigInput.make_key_name(param.name)
        for _, param in flow._get_parameters()
        if param.IS_CONFIG_PARAMETER
    }
    return json.dumps(cfg) if cfg else None


_AWS_DOW = {"1": "SUN", "2": "MON", "3": "TUE", "4": "WED", "5": "THU", "6": "FRI", "7": "SAT"}


def schedule(flow_name, flow):
    decos = (getattr(flow, "_flow_decorators", {}) or {}).get("schedule")
    if not decos:
        return None
    deco = decos[0]
    expr = getattr(deco, "schedule", None)
    if not expr:
        return None
    tz = deco.attributes.get("timezone") or None
    cron = normalize_cron(flow_name, expr, user_given=bool(deco.attributes.get("cron")))
    if tz:
        try:
            from zoneinfo import ZoneInfo

            ZoneInfo(tz)
        except Exception:
            raise CompileError(
                "Flow %s: @schedule(timezone=%r) is not a known IANA time zone. "
                "Use a name such as 'Europe/Amsterdam' or 'America/New_York'."
                % (flow_name, tz)
            )
    return {"cron": cron, "timezone": tz, "source": expr}


def normalize_cron(flow_name, expr, user_given=True):
    """Metaflow documents AWS EventBridge cron (6 fields: min hour dom month dow
    year, '?' allowed, day-of-week 1-7 = SUN-SAT). Airflow reads a 6th field as
    seconds, so convert to standard 5-field cron. A 5-field expression is taken
    as standard cron as it is."""
    fields = expr.split()
    if len(fields) == 5:
        out = fields
    elif len(fields) == 6:
        if fields[5] not in ("*", "?"):
            raise CompileError(
                "Flow %s: @schedule(cron=%r) restricts the year (%r); Airflow's cron "
                "has no year field. Use '*' as the sixth field." % (flow_name, expr, fields[5])
            )
        out = fields[:5]
        out[4] = re.sub(r"\b([1-7])\b", lambda m: _AWS_DOW[m.group(1)], out[4])
    else:
        raise CompileError(
            "Flow %s: @schedule(cron=%r) has %d fields; use 5-field cron "
            "('0 6 * * *') or Metaflow's 6-field AWS form ('0 6 * * ? *')."
            % (flow_name, expr, len(fields))
        )
    out = ["*" if f == "?" else f for f in out]
    cron = " ".join(out)
    try:
        from croniter import croniter
    except ImportError:  # Airflow not installed where we compile: Airflow checks at parse time.
        return cron
    if not croniter.is_valid(cron):
        raise CompileError(
            "Flow %s: @schedule(cron=%r) is not a valid cron expression (read as %r)."
            % (flow_name, expr, cron)
        )
    return cron




def finish_event():
    """The event this flow's successful runs emit (see triggers.py)."""
    from .triggers import finish_event_name

    return finish_event_name(current.get("project_flow_name") or current.flow_name)


def triggers(flow_name, flow, params):
    """@trigger and @trigger_on_finish as the spec's "triggers": the events
    (with the parameters mapped from their payload) and the flows' finish
    events the DAG is scheduled on; None without either decorator."""
    decos = getattr(flow, "_flow_decorators", {}) or {}
    events = _event_triggers(flow_name, decos["trigger"][0], params) if decos.get("trigger") else []
    flows = _finish_triggers(flow_name, decos["trigger_on_finish"][0]) \
        if decos.get("trigger_on_finish") else []
    if not events and not flows:
        return None
    names = [e["name"] for e in events] + [f["name"] for f in flows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CompileError("Flow %s waits for %s more than once (@trigger and "
                           "@trigger_on_finish name it twice)." % (flow_name, dup[0]))
    for p in params:
        mapped = any(p["name"] in e["parameters"] for e in events)
        if p["required"] and not p["has_default"] and not mapped:
            raise CompileError(
                "Flow %s: the parameter %s is required and has no default, but runs start "
                "from events (@trigger/@trigger_on_finish) that do not set it. Give it a "
                "default, or map it from an event's payload: @trigger(event={'name': ..., "
                "'parameters': {'%s': 'FIELD'}})." % (flow_name, p["name"], p["name"]))
    return {"events": events, "flows": flows}


def _event_triggers(flow_name, deco, params):
    from .triggers import EVENT_NAME_RE, PAYLOAD_FIELD_RE

    try:
        deco.format_deploytime_value()
    except MetaflowException as e:
        raise CompileError("Flow %s: @trigger: %s" % (flow_name, e))
    known = {p["name"].lower(): p["name"] for p in params}
    out = []
    for event in deco.triggers:
        name = event.get("name")
        if not isinstance(name, str) or not EVENT_NAME_RE.match(name):
            raise CompileError(
                "Flow %s: @trigger event name %r cannot name an Airflow asset: use letters, "
                "digits, '_', '.' and '-' (at most 200 characters)." % (flow_name, name))
        mapping = {}
        for param, fld in (event.get("parameters") or {}).items():
            if param.lower() not in known:
                raise CompileError(
                    "Flow %s: @trigger maps the payload field %r of event %s to the parameter "
                    "%s, which the flow does not have (parameters: %s)."
                    % (flow_name, fld, name, param, ", ".join(sorted(known.values())) or "none"))
            if not PAYLOAD_FIELD_RE.match(fld):
                raise CompileError(
                    "Flow %s: @trigger payload field %r (event %s) must be letters, digits "
                    "and '_'." % (flow_name, fld, name))
            mapping[known[param.lower()]] = fld
        out.append({"name": name, "parameters": mapping})
    # Metaflow: a single event without a mapping sets every parameter whose
    # name is a field of its payload.
    if len(out) == 1 and not out[0]["parameters"]:
        out[0]["parameters"] = {p["name"]: p["name"] for p in params}
    return out


def _finish_triggers(flow_name, deco):
    """Metaflow's rule: a flow named without project and branch is the one
    deployed from the same project and branch as this flow."""
    from .triggers import finish_event_name

    try:
        deco.format_deploytime_value()
    except MetaflowException as e:
        raise CompileError("Flow %s: @trigger_on_finish: %s" % (flow_name, e))
    out = []
    for t in deco.triggers:
        proj = t.get("project") or current.get("project_name")
        branch = t.get("branch") or current.get("branch_name")
        if bool(proj) != bool(branch):
            raise CompileError(
                "Flow %s: @trigger_on_finish(%s) names a project without a branch (or a "
                "branch without a project): give both, project.branch.%s, or use @project."
                % (flow_name, t.get("fq_name"), t["flow"]))
        fq = ".".join(v for v in (proj, branch, t["flow"]) if v)
        out.append({"name": finish_event_name(fq), "flow": t["flow"], "project": proj,
                    "branch": branch})
    return out
