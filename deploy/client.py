"""A workstation's Metaflow profile for a deployment (`fab client-config`):
the metadata service, the object store and their certificate."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import commands as cmd
from . import flows as flows_mod
from .session import Session


def profile(st: dict, secrets: dict, base) -> dict:
    """Metaflow's settings for the deployment recorded in *st*; *base(port)*
    is the URL a published port is reached at from this workstation."""
    client_params = {"aws_access_key_id": secrets["MFS_S3_ACCESS_KEY"],
                     "aws_secret_access_key": secrets["MFS_S3_SECRET_KEY"],
                     "region_name": "us-east-1",
                     "config": {"s3": {"addressing_style": "path"}}}
    p = {
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": "s3://%s/metaflow" % st["bucket"],
        "METAFLOW_DATATOOLS_S3ROOT": "s3://%s/data" % st["bucket"],
        "METAFLOW_CARD_S3ROOT": "s3://%s/metaflow/mf.cards" % st["bucket"],
        "METAFLOW_S3_ENDPOINT_URL": base(st["ports"]["s3"]),
        "METAFLOW_DATATOOLS_CLIENT_PARAMS": client_params,
        # Not Metaflow's: where `metaflow-services doctor --profile` finds Airflow.
        "MFS_AIRFLOW_URL": base(st["ports"]["https"]),
    }
    if st["metaflow_services"]:
        p.update({"METAFLOW_DEFAULT_METADATA": "service",
                  "METAFLOW_SERVICE_URL": base(st["ports"]["metaflow"]) + "/metadata",
                  "METAFLOW_SERVICE_AUTH_KEY": secrets["MFS_METAFLOW_API_KEY"],
                  # Not Metaflow's either: the Metaflow UI, for doctor --profile.
                  "MFS_METAFLOW_UI_URL": base(st["ports"]["metaflow"])})
    else:
        p["METAFLOW_DEFAULT_METADATA"] = "local"
    return p


def write_profile(s: Session, name="", directory="", tunnel=False):
    st = s.record
    name = name or st["public_host"].replace(".", "-") + ("-tunnel" if tunnel else "")
    if tunnel:
        local = {remote: lport for _, lport, remote in flows_mod.tunnel_ports(st)}
        base = lambda port: flows_mod.tunnel_url(local[port])  # noqa: E731
    else:
        host = st["public_host"]
        base = lambda port: ("https://%s" % host) if port == 443 else "https://%s:%d" % (host, port)  # noqa: E731
    folder = Path(directory).expanduser() if directory else Path.home() / ".metaflowconfig"
    folder.mkdir(parents=True, exist_ok=True)
    p = profile(st, s.secrets(), base)
    ca = None
    if st.get("self_signed"):
        ca = folder / ("%s-ca.pem" % name)
        ca.write_text(s.r.stdout(cmd.read_file(s.dir + "/tls/cert.pem"),
                                 what="reading the certificate"))
        p["METAFLOW_S3_VERIFY_CERTIFICATE"] = str(ca)
        if st["metaflow_services"]:
            # Read by this project's Metaflow extension (Metaflow has no CA
            # setting for the metadata service).
            p["METAFLOW_SERVICE_VERIFY_CERTIFICATE"] = str(ca)
    path = folder / ("config_%s.json" % name)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(p, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(path, 0o600)
    _say_how_to_use(s, st, name, path, ca, tunnel)


def _say_how_to_use(s: Session, st, name, path, ca, tunnel):
    out = s.out
    out.step("Metaflow profile %r" % name)
    out.ok("wrote %s (mode 0600: it holds the S3 keys%s)"
           % (path, " and the metadata API key" if st["metaflow_services"] else ""))
    out.info("use it:  METAFLOW_PROFILE=%s python flow.py run" % name)
    out.info("check it: metaflow-services doctor --profile %s" % name)
    if tunnel:
        out.info("it needs the tunnel open: fab -H %s tunnel" % s.host)
    if ca and st["metaflow_services"]:
        out.info("the VM's certificate is self-signed: %s; the profile trusts it for S3, and "
                 "for the metadata service where metaflow-services is installed (pip install "
                 "it next to metaflow; else export REQUESTS_CA_BUNDLE=%s, or give the VM a "
                 "trusted certificate)" % (ca, ca))
    elif ca:
        out.info("the VM's certificate is self-signed: %s (the profile trusts it)" % ca)
    if not st["metaflow_services"]:
        out.warn("this deployment runs without the metadata service: runs from a laptop keep "
                 "their metadata on the laptop (artifacts still go to the VM's object store)")
