"""Fabric tasks of metaflow-services (run from the repository root):

    fab -H root@vm.example.com deploy          # the whole platform on a bare VM
    fab -H root@vm.example.com status | logs [SERVICE] | stop | start | destroy
    fab -H root@vm.example.com client-config --name team   # a laptop's Metaflow profile
    fab bundle --output stack.tar              # images for VMs without registry access

`fab --list` shows them; `fab --help deploy` the options of one. The options
file is deploy.yaml next to this file (see deploy.example.yaml) or --config.
docs/deploy.md is the manual.
"""

from deploy.tasks import (bundle, client_config, deploy, destroy, logs, secrets, start,
                          status, stop, unlock)

__all__ = ["bundle", "client_config", "deploy", "destroy", "logs", "secrets", "start", "status",
           "stop", "unlock"]
