"""TLS contexts (certificates and host names are always verified), and what a refused
certificate means for the person who has to fix it."""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h), as ssl.SSLCertVerificationError.verify_code.
CERT_NOT_YET_VALID = 9
CERT_HAS_EXPIRED = 10
DEPTH_ZERO_SELF_SIGNED_CERT = 18
SELF_SIGNED_CERT_IN_CHAIN = 19
UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
HOSTNAME_MISMATCH = 62
IP_ADDRESS_MISMATCH = 64
_UNTRUSTED = {
    DEPTH_ZERO_SELF_SIGNED_CERT,
    SELF_SIGNED_CERT_IN_CHAIN,
    UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    UNABLE_TO_VERIFY_LEAF_SIGNATURE,
}


def tls_context(ca_file: Path | None, security: str) -> ssl.SSLContext | None:
    """The system's trust store, plus FORWARDER_TLS_CA_FILE; None for `none` (no TLS)."""
    if security == "none":
        return None  # loading the trust store costs time and memory for nothing
    return _context(ca_file)


@functools.cache
def _context(ca_file: Path | None) -> ssl.SSLContext:
    """One context per CA file, shared by every connection: loading the system trust
    store costs about a megabyte, which a thousand mailboxes must not pay each."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


@dataclass(frozen=True)
class CertificateProblem:
    """Why a server's certificate was refused: the fields of the error to raise."""

    detail: str
    advice: str | None
    settings: tuple[str, ...]


def certificate_problem(
    exc: ssl.SSLCertVerificationError, *, host: str, host_setting: str, ca_file: Path | None
) -> CertificateProblem:
    """Expired, not yet valid, another host's, or signed by an unknown CA: each has its own fix.

    `FORWARDER_TLS_CA_FILE` is suggested only for an unknown CA, and only when it is
    not set; when it is set, the error says the certificate is not signed by it.
    """
    code, reason = exc.verify_code, exc.verify_message
    if code == CERT_HAS_EXPIRED:
        return CertificateProblem(
            "its TLS certificate has expired",
            "renew the certificate on the server (or correct this machine's clock)",
            (),
        )
    if code == CERT_NOT_YET_VALID:
        return CertificateProblem(
            "its TLS certificate is not valid yet", "check this machine's clock", ()
        )
    if code in (HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH):
        return CertificateProblem(
            f"its TLS certificate is not valid for the name {host!r}",
            "use the host name the certificate was issued for",
            (host_setting,),
        )
    if code in _UNTRUSTED and ca_file is None:
        return CertificateProblem(
            f"its TLS certificate is not trusted ({reason})",
            "if the server uses a private CA, set FORWARDER_TLS_CA_FILE to that CA's PEM file",
            (),
        )
    if code in _UNTRUSTED:
        return CertificateProblem(
            f"its TLS certificate is not trusted ({reason})",
            f"it is signed neither by the CA in {ca_file} nor by one the system trusts",
            ("FORWARDER_TLS_CA_FILE",),
        )
    return CertificateProblem(f"its TLS certificate was refused ({reason})", None, ())
