"""Keys, certificates and their fingerprints, shared by the CAS and its clients.

An identity is the SHA-256 of a public key (DER SubjectPublicKeyInfo), so a
renewed certificate for the same key keeps it. Owns key and certificate
creation; must never write a private key readable by other users.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tdapp.core.atomic import WriteMode, write_atomically
from tdapp.errors import InputError

PrivateKey = ec.EllipticCurvePrivateKey
_VALIDITY = datetime.timedelta(days=3650)


def new_private_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_hash(public_key: PublicKeyTypes) -> str:
    """The identity of a public key: hex SHA-256 of its DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def certificate_key_hash(certificate: x509.Certificate) -> str:
    return key_hash(certificate.public_key())


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, as colon-free lower-case hex."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def _names(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def self_signed(key: PrivateKey, common_name: str, *, hosts: Iterable[str] = (),
                ca: bool = False, client: bool = False) -> x509.Certificate:
    """A self-signed certificate; ``hosts`` become DNS or IP subject alternative names."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(_names(common_name))
        .issuer_name(_names(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )
    alt_names = [_alt_name(host) for host in hosts]
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(key, hashes.SHA256())


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_client_certificate(csr: x509.CertificateSigningRequest, issuer_key: PrivateKey,
                             issuer: x509.Certificate) -> x509.Certificate:
    """Certify the key in ``csr`` (after checking its proof of possession) for client TLS.

    The subject is replaced by the key's hash: the CAS vouches only that this
    key exists, which is all an identity is.
    """
    if not csr.is_signature_valid:
        raise InputError("the certificate request's signature is not valid")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise InputError("the certificate request must carry an EC key")
    return (
        x509.CertificateBuilder()
        .subject_name(_names(key_hash(public_key)))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def certificate_request(key: PrivateKey) -> x509.CertificateSigningRequest:
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(_names(key_hash(key.public_key())))
            .sign(key, hashes.SHA256()))


def pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def save_private_key(key: PrivateKey, path: Path, *,
                     mode: WriteMode = WriteMode.CREATE_ONLY) -> None:
    """Write ``key`` (mode 0600); by default refuse to replace an existing key file."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    write_atomically(path, data, mode=mode, permissions=0o600)


def save_certificate(certificate: x509.Certificate, path: Path, *,
                     mode: WriteMode = WriteMode.REPLACE) -> None:
    write_atomically(path, pem(certificate), mode=mode)


def load_private_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load private key {path}: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"{path} is not an EC private key")
    return key


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load certificate {path}: {error}") from None


def ensure_private_file_mode(path: Path) -> None:
    """Refuse a key file other users could read: it would no longer be a secret."""
    mode = os.stat(path).st_mode & 0o077
    if mode:
        raise InputError(f"{path} is readable by other users; run: chmod 600 {path}")
