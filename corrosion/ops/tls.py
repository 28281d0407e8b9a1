"""Certificates for ``gossip.tls``, as corrosion's ``corrosion tls`` makes them: a cluster CA,
a server certificate per node (bound to the IP address peers connect to) and client
certificates for mutual TLS (``gossip.tls.client``).

ECDSA P-384 keys signed with SHA-384, the CA valid 5 years, the others 1 year, as corrosion's
(rcgen). Files are PEM with corrosion's names (``ca_cert.pem``/``ca_key.pem``,
``server_cert.pem``/``server_key.pem``, ``client_cert.pem``/``client_key.pem``), keys readable
by their owner only. An existing file is never overwritten (a CA key replaced by mistake would
orphan every certificate it signed).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import CorrosionError

CA_DAYS = 5 * 365
LEAF_DAYS = 365


class TlsError(CorrosionError):
    """A certificate could not be made (bad CA files, an IP that is not one, a file in the
    way); the message says which."""


def generate_ca(out_dir: Path) -> tuple[Path, Path]:
    """A new certificate authority: ``ca_cert.pem`` and ``ca_key.pem`` in ``out_dir``."""
    cert_path, key_path = _targets(out_dir, "ca")
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corrosion Root CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(name, name, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(key, hashes.SHA384())
    )
    _write(cert_path, key_path, cert, key)
    return cert_path, key_path


def generate_server_cert(ca_cert: Path, ca_key: Path, ip: str, out_dir: Path) -> tuple[Path, Path]:
    """A node's certificate for ``gossip.tls.cert_file``/``key_file``, valid for ``ip`` (the
    address its peers connect to), signed by the CA."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise TlsError(f"{ip!r} is not an IP address") from None
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(address))])
    san = x509.SubjectAlternativeName([x509.IPAddress(address)])
    return _leaf(ca_cert, ca_key, out_dir, "server", name, san, ExtendedKeyUsageOID.SERVER_AUTH)


def generate_client_cert(ca_cert: Path, ca_key: Path, out_dir: Path) -> tuple[Path, Path]:
    """A client certificate for ``gossip.tls.client`` (mutual TLS), signed by the CA."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corrosion client")])
    return _leaf(ca_cert, ca_key, out_dir, "client", name, None, ExtendedKeyUsageOID.CLIENT_AUTH)


def _leaf(
    ca_cert_path: Path,
    ca_key_path: Path,
    out_dir: Path,
    kind: str,
    name: x509.Name,
    san: x509.SubjectAlternativeName | None,
    usage: x509.ObjectIdentifier,
) -> tuple[Path, Path]:
    ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path)
    cert_path, key_path = _targets(out_dir, kind)
    key = ec.generate_private_key(ec.SECP384R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _builder(ca_cert.subject, name, key.public_key(), LEAF_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    _write(cert_path, key_path, builder.sign(ca_key, hashes.SHA384()), key)
    return cert_path, key_path


def _builder(
    issuer: x509.Name, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .issuer_name(issuer)
        .subject_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little behind
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as exc:
        raise TlsError(f"--ca-cert {str(cert_path)!r}: {exc.strerror}") from None
    except ValueError:
        raise TlsError(f"--ca-cert {str(cert_path)!r}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise TlsError(f"--ca-key {str(key_path)!r}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise TlsError(f"--ca-key {str(key_path)!r}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"--ca-key {str(key_path)!r}: not an ECDSA key (made by tls ca generate)")
    if key.public_key() != cert.public_key():
        raise TlsError("--ca-key does not belong to --ca-cert")
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise TlsError(f"--ca-cert {str(cert_path)!r}: not a CA certificate (tls ca generate)")
    return cert, key


def _targets(out_dir: Path, kind: str) -> tuple[Path, Path]:
    """The files to write in ``out_dir`` (made if missing), refusing to overwrite any."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TlsError(f"{str(out_dir)!r} is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TlsError(f"cannot create {str(out_dir)!r}: {exc.strerror or exc}") from None
    paths = out_dir / f"{kind}_cert.pem", out_dir / f"{kind}_key.pem"
    for path in paths:
        if path.exists():
            raise TlsError(f"{path} exists: move it away first (it is never overwritten)")
    return paths


def _write(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
