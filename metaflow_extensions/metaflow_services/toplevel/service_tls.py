"""The metadata service of a deployment with a self-signed certificate.

Metaflow's client of the metadata service (requests, one session) verifies
TLS against certifi's bundle, or REQUESTS_CA_BUNDLE, and has no setting of
its own for a CA. `fab client-config` writes the deployment's certificate next
to the profile and names it as METAFLOW_SERVICE_VERIFY_CERTIFICATE (the
service's twin of Metaflow's METAFLOW_S3_VERIFY_CERTIFICATE): with this
extension installed, the profile alone is then enough. The CA is given to
every request of that session (a session-level default would lose to
REQUESTS_CA_BUNDLE); nothing else in the process changes.
"""


def _install():
    from metaflow.metaflow_config import SERVICE_URL
    from metaflow.metaflow_config_funcs import from_conf

    ca = from_conf("SERVICE_VERIFY_CERTIFICATE")
    if not ca or not SERVICE_URL:
        return
    from metaflow.plugins.metadata_providers.service import ServiceMetadataProvider

    session = ServiceMetadataProvider._session
    adapter = session.get_adapter(SERVICE_URL)
    if getattr(adapter, "_mfs_ca", None):
        return
    send = adapter.send

    def send_with_ca(request, **kwargs):
        kwargs["verify"] = ca
        return send(request, **kwargs)

    adapter.send = send_with_ca
    adapter._mfs_ca = ca


_install()
