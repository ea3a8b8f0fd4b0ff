"""[core] hostname_callable for the prototype: every "VM" (process group) reports
the name in PROTO_HOSTNAME, so task instances show where they ran."""
import os
import socket


def get():
    return os.environ.get("PROTO_HOSTNAME") or socket.getfqdn()
