"""TLS: certificate, key and CA pairing, and whether the files exist and load."""

from __future__ import annotations

from collections.abc import Iterator

from daemon.config.errors import Severity
from daemon.config.facts import Facts
from daemon.config.rules.catalogue import CheckResult, Finding, rule
from daemon.config.schema import DaemonSettings


@rule(
    "tls.key-without-cert",
    keys=["server.tls.keyfile", "server.tls.certfile"],
    fix="set server.tls.certfile to the certificate of that key, or remove server.tls.keyfile",
)
def _key_without_cert(c: DaemonSettings, f: Facts) -> CheckResult:
    """A TLS private key needs its certificate."""
    if c.server.tls.keyfile and not c.server.tls.certfile:
        return "keyfile is set but certfile is not"


@rule(
    "tls.cert-without-key",
    keys=["server.tls.certfile", "server.tls.keyfile"],
    fix="set server.tls.keyfile to the certificate's private key, or remove server.tls.certfile",
)
def _cert_without_key(c: DaemonSettings, f: Facts) -> CheckResult:
    """A TLS certificate needs its private key."""
    if c.server.tls.certfile and not c.server.tls.keyfile:
        return "certfile is set but keyfile is not"


@rule(
    "tls.ca-without-cert",
    keys=["server.tls.ca_certs", "server.tls.certfile", "server.tls.keyfile"],
    fix="set server.tls.certfile and server.tls.keyfile, or remove server.tls.ca_certs",
)
def _ca_without_cert(c: DaemonSettings, f: Facts) -> CheckResult:
    """Client-certificate authorities only mean something when TLS is on (certfile and keyfile)."""
    tls = c.server.tls
    if tls.ca_certs and not (tls.certfile and tls.keyfile):
        return "ca_certs is set but TLS is off (certfile and keyfile are not both set)"


@rule(
    "tls.password-without-key",
    keys=["server.tls.keyfile_password", "server.tls.keyfile"],
    fix="set server.tls.keyfile (and certfile), or remove server.tls.keyfile_password",
)
def _password_without_key(c: DaemonSettings, f: Facts) -> CheckResult:
    """A key password needs an encrypted keyfile to open."""
    if c.server.tls.keyfile_password and not c.server.tls.keyfile:
        return "keyfile_password is set but there is no keyfile"


@rule(
    "tls.refresh-without-cert",
    keys=["server.tls.refresh", "server.tls.certfile", "server.tls.keyfile"],
    fix="set server.tls.certfile and server.tls.keyfile, or set server.tls.refresh = false",
)
def _refresh_without_cert(c: DaemonSettings, f: Facts) -> CheckResult:
    """Certificate refresh watches certfile and keyfile, so both must be set."""
    tls = c.server.tls
    if tls.refresh and not (tls.certfile and tls.keyfile):
        return "refresh is on but certfile and keyfile are not both set"


@rule(
    "tls.verify-client-without-ca",
    keys=["server.tls.verify_client", "server.tls.ca_certs"],
    fix="set server.tls.ca_certs to the CA bundle that signs client certificates, or set verify_client = false",
)
def _verify_client_without_ca(c: DaemonSettings, f: Facts) -> CheckResult:
    """Verifying client certificates needs the authorities that sign them."""
    if c.server.tls.verify_client and not c.server.tls.ca_certs:
        return "verify_client is on but ca_certs is not set"


@rule(
    "tls.ca-certs-unused",
    keys=["server.tls.ca_certs", "server.tls.verify_client"],
    severity=Severity.WARNING,
    fix="set server.tls.verify_client = true to require client certificates, or remove ca_certs",
)
def _ca_unused(c: DaemonSettings, f: Facts) -> CheckResult:
    """ca_certs only takes effect with verify_client."""
    tls = c.server.tls
    if tls.ca_certs and tls.certfile and tls.keyfile and not tls.verify_client:
        return "ca_certs is set but verify_client is off, so client certificates are not checked"


@rule(
    "tls.file-missing",
    keys=["server.tls.certfile", "server.tls.keyfile", "server.tls.ca_certs"],
    fix="correct the path, or create the file (readable by the daemon's user) before starting",
)
def _tls_files(c: DaemonSettings, f: Facts) -> Iterator[Finding]:
    """Certificate, key and CA files must exist and be readable, checked before anything loads."""
    for name in ("certfile", "keyfile", "ca_certs"):
        path = getattr(c.server.tls, name)
        if path and (problem := f.file_problem(path)):
            yield Finding(problem, f"server.tls.{name}")


@rule(
    "tls.cert-invalid",
    keys=["server.tls.certfile", "server.tls.keyfile", "server.tls.keyfile_password"],
    fix="point certfile and keyfile at a PEM certificate and its matching private key "
    "(and set keyfile_password if the key is encrypted)",
)
def _cert_invalid(c: DaemonSettings, f: Facts) -> CheckResult:
    """The certificate and key must load together, as the front-end will load them."""
    tls = c.server.tls
    if not (tls.certfile and tls.keyfile) or f.file_problem(tls.certfile) or f.file_problem(tls.keyfile):
        return None
    password = tls.keyfile_password.get_secret_value() if tls.keyfile_password else None
    if problem := f.tls_problem(tls.certfile, tls.keyfile, password):
        return Finding(problem[1], f"server.tls.{problem[0]}")


@rule("tls.ca-invalid", keys=["server.tls.ca_certs"], fix="point ca_certs at a PEM bundle of CA certificates")
def _ca_invalid(c: DaemonSettings, f: Facts) -> CheckResult:
    """The client CA bundle must hold PEM certificates."""
    ca = c.server.tls.ca_certs
    if ca and not f.file_problem(ca):
        return f.ca_problem(ca)
