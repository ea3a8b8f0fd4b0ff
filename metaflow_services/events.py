"""Publishing the events that start ``@trigger`` flows.

From Python (shaped like Metaflow's ``ArgoEvent``)::

    from metaflow_services.events import Event
    Event("table.ready").publish({"table_name": "sales", "row_count": 120})

from a shell: ``metaflow-services publish table.ready --payload '{...}'``, or
with curl against Airflow's REST API (docs/flows.md). An event is an asset
event of the Airflow asset that every DAG waiting for it is scheduled on; the
payload goes into the event's extra as ``{"payload": {...}}`` with its name,
an id and a timestamp next to it. Settings (address, user, password, CA) as
in ``airflow_client``.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

from .airflow_client import AirflowAPIError, AirflowClient
from .triggers import EVENT_NAME_RE, asset_uri


class Event:
    def __init__(self, name, payload=None, *, url=None, user=None, password=None, profile=None):
        if not isinstance(name, str) or not EVENT_NAME_RE.match(name):
            raise AirflowAPIError("%r is not an event name: use letters, digits, '_', '.' and "
                                  "'-' (at most 200 characters)." % (name,))
        self.name = name
        self.payload = dict(payload or {})
        self._settings = {"url": url, "user": user, "password": password, "profile": profile}

    def add_to_payload(self, key, value):
        self.payload[key] = value
        return self

    def publish(self, payload=None, ignore_errors=False):
        """Publish the event; returns its id (None when ignore_errors hid a failure)."""
        try:
            client = AirflowClient.from_settings(**self._settings)
            return publish(client, self.name, dict(self.payload, **(payload or {})))["id"]
        except AirflowAPIError:
            if ignore_errors:
                return None
            raise

    def safe_publish(self, payload=None):
        return self.publish(payload, ignore_errors=True)


def find_asset(client, name):
    """The Airflow asset of event *name*; it exists while a deployed DAG waits
    for the event (or a flow emits it)."""
    found = client.get("/api/v2/assets", "listing assets", name_pattern=name, limit=100) or {}
    for a in found.get("assets", ()):
        if a.get("name") == name and a.get("uri") == asset_uri(name):
            return a
    raise AirflowAPIError(
        "No deployed flow waits for the event %s: Airflow at %s has no asset of that name."
        % (name, client.url),
        "Deploy a flow with @trigger(event=%r) first (drop it into the dags folder), and "
        "check the name." % name)


def publish(client, name, payload):
    """Publish event *name* with *payload*; returns {id, asset_id, timestamp}."""
    asset = find_asset(client, name)
    event_id = uuid.uuid4().hex
    extra = {"name": name, "id": event_id, "timestamp": int(time.time()), "payload": payload}
    got = client.post("/api/v2/assets/events", {"asset_id": asset["id"], "extra": extra},
                      "publishing the event %s" % name) or {}
    return {"id": event_id, "asset_id": asset["id"], "airflow_event_id": got.get("id"),
            "timestamp": got.get("timestamp")}


def add_parser(sub):
    p = sub.add_parser(
        "publish", help="Publish an event that starts the flows waiting for it (@trigger).",
        description="Publish the event NAME with a JSON payload through Airflow's REST API: "
                    "every deployed flow with @trigger(event=NAME) starts a run, the payload's "
                    "fields mapped to its parameters. Airflow's address and CA come from the "
                    "Metaflow profile (--profile or $METAFLOW_PROFILE, written by fab "
                    "client-config) or $MFS_AIRFLOW_URL; the password from "
                    "$MFS_AIRFLOW_PASSWORD.")
    p.add_argument("name")
    p.add_argument("--payload", default="{}", help="A JSON object (default: {}).")
    p.add_argument("--profile", help="Metaflow profile (default: $METAFLOW_PROFILE).")
    p.add_argument("--airflow-url", help="Airflow's address (default: from the profile).")
    p.add_argument("--user", help="Airflow user (default: $MFS_AIRFLOW_USER, else admin).")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args):
    try:
        payload = json.loads(args.payload)
    except ValueError as e:
        print("metaflow-services publish: --payload is not JSON: %s" % e, file=sys.stderr)
        return 2
    if not isinstance(payload, dict):
        print("metaflow-services publish: --payload must be a JSON object ({...}), not %s"
              % type(payload).__name__, file=sys.stderr)
        return 2
    try:
        client = AirflowClient.from_settings(url=args.airflow_url, user=args.user,
                                             profile=args.profile)
        got = publish(client, args.name, payload)
    except AirflowAPIError as e:
        print("metaflow-services publish: %s" % e.what, file=sys.stderr)
        if e.fix:
            print("  fix: %s" % e.fix, file=sys.stderr)
        return int(e.exit_code)
    print("Published event %s (id %s) to %s: the flows waiting for it start a run; see them "
          "in the Airflow UI (Assets: %s)." % (args.name, got["id"], client.url, args.name))
    return 0
