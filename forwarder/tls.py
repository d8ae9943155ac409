"""TLS contexts: certificates and host names are always verified."""

from __future__ import annotations

import ssl

from forwarder.config import Settings


def tls_context(settings: Settings, security: str) -> ssl.SSLContext | None:
    """The system's trust store, plus FORWARDER_TLS_CA_FILE; None for `none` (no TLS)."""
    if security == "none":
        return None  # loading the trust store costs time and memory for nothing
    context = ssl.create_default_context()
    if settings.tls_ca_file is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca_file))
    return context
