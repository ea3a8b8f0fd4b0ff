"""Fabric tasks of metaflow-services (run from the repository root):

    fab -H root@vm.example.com deploy          # the whole platform on a bare VM
    fab -H root@vm.example.com status | logs [SERVICE] | stop | start | destroy
    fab -H root@vm.example.com client-config --name team   # a laptop's Metaflow profile
    fab -H root@vm.example.com push-flows flows/   # copy flows, wait for their DAGs
    fab -H root@vm.example.com tunnel          # the UIs, metadata API and S3 on localhost
    fab -H root@vm.example.com images | prune-images   # step environment images
    fab -H root@vm.example.com backup --to backups/ [--encrypt-to age1...]   # one archive
    fab -H root@new-vm restore backups/ARCHIVE.tar[.age --identity KEY]  # onto a fresh VM
    fab -H root@new-vm resume                          # go live after a restore
    fab -H root@vm.example.com upgrade [--set images.airflow=REF] [--drain]  # backup, migrate, or roll back
    fab -H root@worker add-worker --main root@vm.example.com [--queue gpu]   # a worker VM
    fab -H root@worker remove-worker --main root@vm.example.com            # drain, remove it
    fab bundle --output stack.tar [--flows DIR]   # images (and wheels) for offline VMs
    fab -H root@vm.example.com secrets.set db < db.env   # a secret for @secrets(sources=["db"])
    fab -H root@vm.example.com secrets.list | secrets.delete db
    fab -H root@vm.example.com secrets [--name MFS_AIRFLOW_PASSWORD_ADMIN]   # the stack's own

`fab --list` shows them; `fab --help deploy` the options of one. The options
file is deploy.yaml next to this file (see deploy.example.yaml) or --config.
docs/deploy.md is the manual.
"""

from invoke import Collection

from deploy.tasks import (add_worker, backup, bundle, client_config, deploy, destroy, images, logs,
                          prune_images, push_flows, remove_worker, restore, resume, secrets,
                          secrets_delete, secrets_list, secrets_set, start, status, stop, tunnel,
                          unlock, upgrade)

# `fab secrets` (the stack's own passwords) and `fab secrets.set|list|delete`
# (the flows' secrets) form one group, so the tasks are listed explicitly.
ns = Collection(add_worker, backup, bundle, client_config, deploy, destroy, images, logs,
                prune_images, push_flows, remove_worker, restore, resume, start, status, stop,
                tunnel, unlock, upgrade,
                secrets=Collection(secrets, secrets_set, secrets_list, secrets_delete))
