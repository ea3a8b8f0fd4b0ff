"""Event-triggered runs: ``@trigger`` and ``@trigger_on_finish`` as Airflow assets.

Every compiled flow's end step emits an asset event when a run succeeds: the
asset is named as Metaflow names the event (``metaflow.<flow>.end``, with
``project.branch.`` before the flow name under ``@project``), and the event's
extra says which run it was. A flow with ``@trigger_on_finish`` is scheduled
on those assets; a flow with ``@trigger(event=NAME)`` on the asset ``NAME``,
whose events are published through Airflow's REST API
(``metaflow-services publish``, ``metaflow_services.events``). Several
triggers mean all of them (Airflow's list of assets), as in Metaflow.

At run time the triggering asset events (Airflow's ``triggering_asset_events``)
become Metaflow's trigger metadata (``current.trigger``, set by the
``airflow3_internal`` decorator from ``MFS_TRIGGERS``) and, for events, the
values of the parameters mapped from their payload.

Imported at DAG parse time and in tasks: the standard library only.
"""

from __future__ import annotations

import json
import re
import time

# Metaflow's (and Argo Events') rule for event names; Airflow takes any such
# name as an asset name (it refuses empty, blank, "self", "context", over 1500).
EVENT_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
PAYLOAD_FIELD_RE = re.compile(r"^[A-Za-z0-9_]+$")
# The assets' URI scheme: Airflow leaves "x-" schemes as they are.
URI_SCHEME = "x-metaflow"
ASSET_GROUP = "metaflow"
# Keys our publishers put next to the payload in an asset event's extra.
_ENVELOPE = ("name", "id", "timestamp", "payload", "type", "from_rest_api")


def finish_event_name(fq_flow_name: str) -> str:
    """The event a successful run of a flow emits (Metaflow's name for it):
    fq_flow_name is project.branch.Flow under @project, else the flow name."""
    return "metaflow.%s.end" % fq_flow_name


def asset_uri(event_name: str) -> str:
    return "%s://event/%s" % (URI_SCHEME, event_name)


def asset_kwargs(event_name: str) -> dict:
    """Asset(**asset_kwargs(name)): the same asset in every DAG and in publish."""
    return {"name": event_name, "uri": asset_uri(event_name), "group": ASSET_GROUP}


def listened_events(spec: dict) -> list:
    """Names of the events a compiled flow waits for (all of them), in order."""
    trig = spec.get("triggers") or {}
    return [e["name"] for e in trig.get("events", ())] + [f["name"] for f in trig.get("flows", ())]


def finish_extra(spec: dict, run_id: str, end_task_id: str) -> dict:
    """The extra of the asset event a successful run emits: which run it was,
    in the shape of Metaflow's trigger metadata."""
    flow = spec["flow"]
    fq = spec.get("finish_event") or finish_event_name(flow["name"])
    project = flow.get("project") or {}
    return {
        "type": "run",
        "name": fq,
        "id": "%s/%s/%s/%s" % (flow["name"], run_id, spec["end_step"], end_task_id),
        "timestamp": int(time.time()),
        "flow": flow["name"],
        "run_id": run_id,
        "project": project.get("name"),
        "branch": project.get("branch"),
    }


def payload_of(extra: dict) -> dict:
    """An event's payload: the "payload" object our publishers send, or the
    whole extra of an event posted by hand (curl) without that envelope."""
    extra = extra or {}
    if isinstance(extra.get("payload"), dict):
        return extra["payload"]
    return {k: v for k, v in extra.items() if k not in _ENVELOPE}


def run_triggers(spec: dict, triggering) -> list:
    """Metaflow's trigger metadata (a list of {type, name, id, timestamp}) from
    the asset events that started this Airflow run, newest first, and the
    payload of each event. *triggering* is Airflow's triggering_asset_events
    accessor (or any mapping of asset -> events with .extra and .timestamp)."""
    wanted = set(listened_events(spec))
    if not wanted:  # most flows: nothing to read on every task's start
        return []
    out = []
    for asset in triggering or ():
        name = getattr(asset, "name", None)
        if name not in wanted:
            continue
        for ev in triggering[asset]:
            extra = dict(getattr(ev, "extra", None) or {})
            ts = getattr(ev, "timestamp", None)
            epoch = int(ts.timestamp()) if hasattr(ts, "timestamp") else extra.get("timestamp")
            kind = "run" if extra.get("type") == "run" else "event"
            out.append({
                "type": kind,
                "name": name,
                "id": extra.get("id") or "%s/%s" % (getattr(ev, "source_dag_id", None) or "api",
                                                     epoch),
                "timestamp": epoch,
                "payload": payload_of(extra) if kind == "event" else {},
            })
    out.sort(key=lambda t: t["timestamp"] or 0, reverse=True)
    return out


def trigger_metadata(triggers: list) -> str:
    """MFS_TRIGGERS for the task: what Metaflow's Trigger takes (no payloads:
    they may be large, and parameters already carry what the flow maps)."""
    return json.dumps([{k: t[k] for k in ("type", "name", "id", "timestamp")} for t in triggers])


class MissingPayloadField(ValueError):
    pass


def event_parameters(spec: dict, triggers: list) -> dict:
    """Parameter values mapped from the payloads of the triggering events
    (@trigger(event={"name": ..., "parameters": {param: field}})): the newest
    event of each name counts; a field missing from it leaves the parameter's
    default, or fails naming both when the parameter has none."""
    newest = {}
    for t in triggers:  # newest first
        if t["type"] == "event":
            newest.setdefault(t["name"], t)
    params = {p["name"]: p for p in spec["parameters"]}
    values = {}
    for event in (spec.get("triggers") or {}).get("events", ()):
        got = newest.get(event["name"])
        if got is None:
            continue
        for param, fld in event.get("parameters", {}).items():
            if fld in got["payload"]:
                values[param] = got["payload"][fld]
            elif params.get(param) and params[param]["required"] and not params[param]["has_default"]:
                raise MissingPayloadField(
                    "The event %s that started this run has no field %r in its payload, "
                    "which @trigger maps to the parameter %s (required, no default). "
                    "Publish it again with that field, or give the parameter a default."
                    % (event["name"], fld, param))
    return values


class TriggerCycle(ValueError):
    pass


def check_triggers(spec: dict, deployed: list) -> list:
    """Raise TriggerCycle when @trigger_on_finish edges, with *spec* in place
    of its DAG among the *deployed* specs, lead from *spec*'s finish event
    back to itself; return the finish events *spec* waits for that no
    deployed flow emits."""
    specs = {s["dag_id"]: s for s in deployed}
    specs[spec["dag_id"]] = spec
    emitted = {s.get("finish_event") or finish_event_name(s["flow"]["name"]): s
               for s in specs.values()}
    # event -> the specs that start when it happens
    listeners = {}
    for s in specs.values():
        for f in (s.get("triggers") or {}).get("flows", ()):
            listeners.setdefault(f["name"], []).append(s)
    start = spec.get("finish_event")
    path, seen = [spec], set()

    def walk(event):
        for nxt in listeners.get(event, ()):
            if nxt["dag_id"] == spec["dag_id"]:
                names = [s["flow"]["name"] for s in path] + [spec["flow"]["name"]]
                raise TriggerCycle(
                    "@trigger_on_finish makes a cycle: %s (each runs when the one before it "
                    "succeeds, forever). Remove @trigger_on_finish from one of them."
                    % " -> ".join(names))
            if nxt["dag_id"] in seen:
                continue
            seen.add(nxt["dag_id"])
            path.append(nxt)
            walk(nxt.get("finish_event") or finish_event_name(nxt["flow"]["name"]))
            path.pop()

    if start:
        walk(start)
    return [f["name"] for f in (spec.get("triggers") or {}).get("flows", ())
            if f["name"] not in emitted]
