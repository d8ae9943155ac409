"""TLS contexts: certificates and host names are always verified."""

from __future__ import annotations

import ssl

from forwarder.config import Settings


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The system's trust store, plus FORWARDER_TLS_CA_FILE when set."""
    context = ssl.create_default_context()
    if settings.tls_ca_file is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca_file))
    return context
