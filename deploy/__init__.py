"""`fab deploy -H host`: the whole metaflow-services platform on one VM.

Modules: ``config`` (the options, validated up front), ``stack`` (what goes
on the VM: files, settings, secrets, images, the plan), ``commands`` (builders
of the remote commands, pure), ``remote`` (running them; the error boundary),
``bundle`` (images for air-gapped VMs), ``tasks`` (the Fabric tasks).
"""
