"""Keys and X.509 certificates for secrets: made, loaded and checked with cryptography.

The hazardous layer under :mod:`tdapp.cas.secret_values`: which key types a
secret may hold (:data:`SigningKey`), making them, loading a given PKCS#8 key or
certificate, and issuing a certificate from a session's key and CA secrets
(extensions as docs/secrets.md lists them). It must never put key material in a
message, and never accept a key that cannot sign or an RSA key under 2048 bits.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tdapp.errors import InputError
from tdapp.policy import Secret
from tdapp.policy.values import quoted

# The key types a value may hold: those the session language can ask for, and RSA
# of any size from 2048 bits (a given key); nothing that cannot sign a certificate.
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
_DER = serialization.Encoding.DER
_LIFETIME = re.compile(r"\s*([0-9]{1,9})\s*(days?|d|hours?|h|years?|y)\s*")
_UNITS = {"d": timedelta(days=1), "h": timedelta(hours=1), "y": timedelta(days=365)}
_MAX_LIFETIME = timedelta(days=36525)  # 100 years
_CN_LIMIT = 64  # X.509's bound for a common name (RFC 5280, ub-common-name)


class Material(Protocol):
    """What a certificate is made from: another secret's value (a key, or a CA)."""

    @property
    def name(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def chain(self) -> tuple[bytes, ...]: ...


def generate_key(key_type: str) -> SigningKey:
    if key_type in ("RSA-2048", "RSA-3072"):
        return rsa.generate_private_key(65537, int(key_type.removeprefix("RSA-")))
    if key_type == "Ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP384R1() if key_type == "P-384" else ec.SECP256R1())


def key_type_of(key: SigningKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "P-256", "secp384r1": "P-384"}.get(key.curve.name, key.curve.name)
    return "Ed25519"


def load_key(der: bytes) -> SigningKey:
    """The private key of PKCS#8 ``der``; InputError for a type tdapp does not keep."""
    key = serialization.load_der_private_key(der, None)
    if (isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048) or isinstance(
            key, ed25519.Ed25519PrivateKey) or (isinstance(
            key, ec.EllipticCurvePrivateKey) and key_type_of(key) in ("P-256", "P-384")):
        return key
    raise InputError("unsupported private key type")


def given_key(secret: Secret) -> bytes:
    # Nothing about the value may go in the message: only that it did not load.
    try:
        loaded = serialization.load_pem_private_key(str(secret.value).strip().encode("utf-8"), None)
        key = load_key(loaded.private_bytes(_DER, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    except (ValueError, TypeError, UnsupportedAlgorithm, InputError):
        raise InputError(f"secret {secret.name!r}: the value is not an unencrypted PEM "
                         "PKCS#8 private key of a supported type (P-256, P-384, Ed25519, "
                         "RSA of 2048 bits or more)") from None
    if secret.key_type is not None and key_type_of(key) != secret.key_type:
        raise InputError(f"secret {secret.name!r}: the given key is not a {secret.key_type} key")
    return key_der(key)


def given_certificate(secret: Secret, depends: Mapping[str, Material]
                       ) -> tuple[bytes, bytes | None, tuple[bytes, ...]]:
    certificate = x509.load_pem_x509_certificate(str(secret.value).strip().encode("ascii"))
    name = secret.name
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if secret.kind == "x509-ca" and not is_ca:
        raise InputError(f"secret {name!r}: the given certificate is not a CA certificate")
    key = depends["private_key"].data if "private_key" in depends else None
    if key is not None and not same_key(key, certificate):
        raise InputError(f"secret {name!r}: the given certificate is not for the key of "
                         f"private_key {secret.private_key!r}")
    chain: tuple[bytes, ...] = ()
    if "issuer" in depends:  # its chain is only known when the issuer verifiably signed it
        issuer = depends["issuer"]
        try:
            certificate.verify_directly_issued_by(x509.load_der_x509_certificate(issuer.data))
        except (ValueError, TypeError, InvalidSignature):
            raise InputError(f"secret {name!r}: the given certificate was not issued by "
                             f"issuer {issuer.name!r}") from None
        chain = (issuer.data, *issuer.chain)
    return certificate.public_bytes(_DER), key, chain


def issue_certificate(secret: Secret, depends: Mapping[str, Material], session_name: str
           ) -> tuple[bytes, bytes, tuple[bytes, ...]]:
    name, issuer = secret.name, depends.get("issuer")
    if secret.kind == "session-ca":
        # A session name may be longer than a common name can be; the CN is only a label.
        common_name = f"{session_name[:_CN_LIMIT - 11]} session CA"
        lifetime = timedelta(days=3650)
    else:
        common_name, lifetime = secret.common_name or name, _lifetime(secret)
    key = load_key(depends["private_key"].data) if "private_key" in depends else generate_key(
        "P-256")
    if issuer is not None and issuer.key is None:
        raise InputError(f"secret {name!r}: issuer {issuer.name!r} was given without its "
                         "private key, so it cannot sign")
    signer = key if issuer is None or issuer.key is None else load_key(issuer.key)
    try:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    except ValueError:
        raise InputError(f"secret {name!r}: a common name has 1 to {_CN_LIMIT} characters; "
                         "give a shorter common_name") from None
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(subject if issuer is None
                            else x509.load_der_x509_certificate(issuer.data).subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(seconds=60)).not_valid_after(now + lifetime)
               .add_extension(x509.BasicConstraints(ca=secret.kind != "x509", path_length=None),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   signer.public_key()), critical=False))
    if secret.kind != "x509":
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        usages = {"server": [ExtendedKeyUsageOID.SERVER_AUTH],
                  "client": [ExtendedKeyUsageOID.CLIENT_AUTH]}.get(
            secret.endpoint or "", [ExtendedKeyUsageOID.SERVER_AUTH,
                                    ExtendedKeyUsageOID.CLIENT_AUTH])
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if hosts := [*secret.dns, *secret.san]:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [_general_name(name, host) for host in hosts]), critical=False)
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    certificate = builder.sign(signer, algorithm)
    chain = () if issuer is None else (issuer.data, *issuer.chain)
    return certificate.public_bytes(_DER), key_der(key), chain


def _lifetime(secret: Secret) -> timedelta:
    if secret.valid_for is None:
        return timedelta(days=365)
    match = _LIFETIME.fullmatch(secret.valid_for)
    lifetime = None if match is None else int(match.group(1)) * _UNITS[match.group(2)[0]]
    if lifetime is None or not timedelta(0) < lifetime <= _MAX_LIFETIME:
        raise InputError(f"secret {secret.name!r}: valid_for {quoted(secret.valid_for)} is "
                         "not a duration like \"90 days\", \"12h\" or \"2 years\" of at most "
                         "100 years")
    return lifetime


def _general_name(secret_name: str, host: str) -> x509.GeneralName:
    with contextlib.suppress(ValueError):
        return x509.IPAddress(ipaddress.ip_address(host))
    try:
        return x509.DNSName(host)
    except ValueError:
        raise InputError(f"secret {secret_name!r}: {quoted(host)} is not an ASCII host name "
                         "or IP address (write international names as A-labels)") from None


def same_key(key_der: bytes, certificate: x509.Certificate) -> bool:
    return spki(load_key(key_der).public_key(), _DER) == spki(certificate.public_key(), _DER)


def key_der(key: SigningKey) -> bytes:
    return key.private_bytes(_DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def spki(key: PublicKeyTypes, encoding: serialization.Encoding) -> bytes:
    return key.public_bytes(encoding, serialization.PublicFormat.SubjectPublicKeyInfo)
