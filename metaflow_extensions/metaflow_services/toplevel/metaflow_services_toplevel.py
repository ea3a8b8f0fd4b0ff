"""What this extension adds once `import metaflow` has finished (Metaflow
loads one toplevel module per extension): each module below installs itself
on import, and only when its setting asks for it."""

from metaflow_extensions.metaflow_services.toplevel import (  # noqa: F401
    prebuilt_environments,
    service_tls,
)

__all__ = []
