"""AMD SEV-SNP evidence: the ATTESTATION_REPORT layout and its verification up to a pinned root.

Owns the report layout (SEV-SNP ABI; the TCB_VERSION format of each generation:
Milan and Genoa share one, Turin adds an FMC SPL and moves the others) and the
check of the chain ARK → ASK → VCEK → report. Claims are returned only after
all of: the ARK's SHA-256 is pinned and the ARK signs itself; ARK → ASK → VCEK
are each signed with RSASSA-PSS/SHA-384 (salt 48) and valid at ``at``; the
report is signed by the VCEK's P-384 key; the report's ``reported_tcb`` and
``chip_id`` are those the VCEK was issued for, read in the layout of the
generation the report names (CPUID family, report version 3 and later).

It must never trust a certificate that does not chain to a pinned ARK, never
judge the claims (debug, measurement, TCB level are for the policies), never
fetch from AMD's KDS (certificates come from the evidence or the
configuration), never hand-roll a cryptographic primitive (all come from
``cryptography``), and never raise anything but EvidenceError for bad evidence.
The report carries no time, so ``Claims.issued_at`` stays 0: freshness comes
from the nonce bound into ``report_data``.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import SignatureAlgorithmOID

from tdapp.attest.claims import Claims, EvidenceError, Tee, base64_field

TEE = Tee.SNP
# SHA-256 over the DER of AMD's self-signed root keys (KDS cert_chain of each product line).
MILAN_ARK_SHA256 = "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd"
GENOA_ARK_SHA256 = "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1"
# Turin's ARK is not pinned: no Turin ARK was at hand to check against its ASK's signature.
# An operator who has fetched and checked it adds its fingerprint (--pin-ark).
AMD_ARK_SHA256S = (MILAN_ARK_SHA256, GENOA_ARK_SHA256)
REPORT_SIZE = 1184
SIGNED_SIZE = 0x2A0  # the signature covers bytes 0x000-0x29F
SIGNATURE_R, SIGNATURE_S, SIGNATURE_PART_SIZE, SIGNATURE_END = 0x2A0, 0x2E8, 72, 0x330
ECDSA_P384_SHA384 = 1
DEBUG_POLICY_BIT = 1 << 19
SIGNING_KEY_VCEK = 0
SIGNING_KEY_VLEK = 1
EVIDENCE_FIELDS = frozenset({"tee", "report", "vcek", "ask", "ark"})
CERTIFICATES = ("vcek", "ask", "ark")
# Far above AMD's certificates (< 2 KiB): bounds the work done on unverified input.
MAX_CERTIFICATE_CHARS = 16 * 1024
_REPORT_CHARS = 4 * math.ceil(REPORT_SIZE / 3)
# AMD signs ARK, ASK and VCEK with exactly these parameters; verifying with them fixed
# (as well as with those a certificate declares) refuses any other hash, MGF or salt length.
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_AMD_OID = "1.3.6.1.4.1.3704.1"
_HWID_OID = f"{_AMD_OID}.4"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TcbLayout:
    """How one generation packs its SPLs into the TCB_VERSION u64, and its VCEK's hwID size.

    ``parts``: (VCEK extension name, OID under AMD's arc, byte of the u64); every
    other byte is reserved and must be zero.
    """

    name: str
    parts: tuple[tuple[str, str, int], ...]
    hwid_size: int


MILAN_GENOA_TCB = TcbLayout("Milan/Genoa", (("blSPL", "3.1", 0), ("teeSPL", "3.2", 1),
                                            ("snpSPL", "3.3", 6), ("ucodeSPL", "3.8", 7)), 64)
# Turin (family 1Ah): FMC SPL in byte 0, the others moved down; its VCEK's hwID is the
# first 8 bytes of CHIP_ID.
TURIN_TCB = TcbLayout("Turin", (("fmcSPL", "3.9", 0), ("blSPL", "3.1", 1), ("teeSPL", "3.2", 2),
                                ("snpSPL", "3.3", 3), ("ucodeSPL", "3.8", 7)), 8)
TCB_PARTS = MILAN_GENOA_TCB.parts
_MILAN_GENOA_FAMILY = 0x19  # Zen 3 (Milan) and Zen 4 (Genoa, Bergamo, Siena)
_TURIN_FAMILY = 0x1A  # Zen 5 (Turin)


@dataclass(frozen=True)
class SnpReport:
    """The fields of one ATTESTATION_REPORT as laid out in the report (no verification).

    TCB fields are the raw little-endian u64 (see :func:`tcb_parts`); ``flags`` is
    the u32 at 0x48 (bit 0 author_key_en, 1 mask_chip_key, 2-4 signing_key).
    """

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    flags: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_family: int
    cpuid_model: int
    cpuid_stepping: int
    chip_id: bytes
    committed_tcb: int
    current_version: tuple[int, int, int]  # (major, minor, build)
    committed_version: tuple[int, int, int]
    launch_tcb: int
    signature_r: int
    signature_s: int
    signature_reserved: bytes

    @property
    def debug(self) -> bool:
        return bool(self.policy & DEBUG_POLICY_BIT)

    @property
    def signing_key(self) -> int:
        return (self.flags >> 2) & 0b111


def tcb_parts(tcb: int, layout: TcbLayout = MILAN_GENOA_TCB) -> dict[str, int]:
    """The SVNs of a TCB_VERSION in ``layout``, named as in the VCEK's extensions."""
    return {name: (tcb >> (8 * byte)) & 0xFF for name, _, byte in layout.parts}


def tcb_layout(report: SnpReport) -> TcbLayout:
    """The TCB_VERSION layout of the generation ``report`` comes from.

    Reports before version 3 carry no CPUID fields; they come from firmware older
    than any Turin firmware, so they are Milan or Genoa. EvidenceError for a
    family whose layout is not known.
    """
    if report.version < 3 or report.cpuid_family == _MILAN_GENOA_FAMILY:
        return MILAN_GENOA_TCB
    if report.cpuid_family == _TURIN_FAMILY:
        return TURIN_TCB
    _fail(f"SNP report is from CPU family 0x{report.cpuid_family:x}, whose TCB layout is not "
          f"known (0x{_MILAN_GENOA_FAMILY:x}: Milan and Genoa, 0x{_TURIN_FAMILY:x}: Turin)")


def parse_report(report: bytes) -> SnpReport:
    """The fields of ``report`` for display; EvidenceError unless it is REPORT_SIZE bytes."""
    if not isinstance(report, bytes | bytearray | memoryview):
        _fail(f"SNP report must be bytes, got {type(report).__name__}")
    data = bytes(report)
    if len(data) != REPORT_SIZE:
        _fail(f"SNP report must be {REPORT_SIZE} bytes, got {len(data)}")

    def raw(at: int, size: int) -> bytes:
        return data[at:at + size]

    def little(at: int, size: int) -> int:  # every integer in the report, r and s included
        return int.from_bytes(raw(at, size), "little")

    def u32(at: int) -> int:
        return little(at, 4)

    def u64(at: int) -> int:
        return little(at, 8)

    return SnpReport(
        version=u32(0x00), guest_svn=u32(0x04), policy=u64(0x08),
        family_id=raw(0x10, 16), image_id=raw(0x20, 16), vmpl=u32(0x30),
        signature_algo=u32(0x34), current_tcb=u64(0x38), platform_info=u64(0x40),
        flags=u32(0x48), report_data=raw(0x50, 64), measurement=raw(0x90, 48),
        host_data=raw(0xC0, 32), id_key_digest=raw(0xE0, 48),
        author_key_digest=raw(0x110, 48), report_id=raw(0x140, 32),
        report_id_ma=raw(0x160, 32), reported_tcb=u64(0x180),
        # CPUID bytes exist from version 3 on; before that they are reserved zeros.
        cpuid_family=data[0x188], cpuid_model=data[0x189], cpuid_stepping=data[0x18A],
        chip_id=raw(0x1A0, 64), committed_tcb=u64(0x1E0),
        current_version=(data[0x1EA], data[0x1E9], data[0x1E8]),
        committed_version=(data[0x1EE], data[0x1ED], data[0x1EC]),
        launch_tcb=u64(0x1F0), signature_r=little(SIGNATURE_R, SIGNATURE_PART_SIZE),
        signature_s=little(SIGNATURE_S, SIGNATURE_PART_SIZE),
        signature_reserved=data[SIGNATURE_END:])


def verify_report(report: bytes, *, vcek: bytes, ask: bytes, ark: bytes, at: float,
                  pinned_arks: Collection[str] = AMD_ARK_SHA256S) -> Claims:
    """The Claims of ``report`` checked through ``vcek`` → ``ask`` → ``ark`` (DER) at ``at``.

    Raises EvidenceError (one line naming what failed) on anything wrong;
    ValueError/TypeError only for malformed ``pinned_arks`` (a configuration bug).
    """
    pins = normalize_pins(pinned_arks)
    when = _instant(at)
    parsed = parse_report(report)
    _check_form(parsed)
    layout = tcb_layout(parsed)
    vcek_cert = _verify_chain(vcek=vcek, ask=ask, ark=ark, when=when, pins=pins)
    # Binding before the signature so that a VCEK for another chip or TCB gets a precise
    # reason, not just "bad signature"; nothing is returned until the signature passes.
    _check_binding(parsed, vcek_cert, layout)
    _check_signature(parsed, bytes(report), vcek_cert)
    values: dict[str, str | int] = {
        "measurement": parsed.measurement.hex(), "host_data": parsed.host_data.hex(),
        "policy": parsed.policy, "guest_svn": parsed.guest_svn, "vmpl": parsed.vmpl,
        "family_id": parsed.family_id.hex(), "image_id": parsed.image_id.hex(),
        "reported_tcb": f"{parsed.reported_tcb:016x}",
        "id_key_digest": parsed.id_key_digest.hex()}
    # "UpToDate": SNP has no TCB-info service; the TCB was matched to the VCEK instead.
    return Claims(tee=TEE, measurement=parsed.measurement.hex(),
                  report_data=parsed.report_data, platform=parsed.chip_id.hex(),
                  debug=parsed.debug, tcb_status="UpToDate",
                  values=MappingProxyType(values))


class SnpVerifier:
    """Verifies ``snp`` evidence: ``{"tee": "snp", "report": base64, "vcek", "ask", "ark"}``.

    Certificates are base64 DER, taken from the evidence if it carries them, else
    from ``certificates`` (configured at the CAS). Either source is equally good:
    all trust rests on the pinned ARK fingerprints, not on where a certificate came from.
    """

    tee = TEE

    def __init__(self, *, pinned_arks: Collection[str] = AMD_ARK_SHA256S,
                 certificates: Mapping[str, bytes] | None = None) -> None:
        self.pinned_arks = normalize_pins(pinned_arks)
        configured = dict(certificates or {})
        unknown = sorted(str(name) for name in set(configured) - set(CERTIFICATES))
        if unknown:
            raise ValueError(f"unknown SNP certificate names {unknown} "
                             f"(expected some of {', '.join(CERTIFICATES)})")
        for name, der in configured.items():
            if not isinstance(der, bytes):
                raise TypeError(f"configured SNP certificate {name!r} must be DER bytes")
        self.certificates: Mapping[str, bytes] = MappingProxyType(configured)

    def verify(self, evidence: Mapping[str, Any], *, at: float) -> Claims:
        if not isinstance(evidence, Mapping):
            _fail("snp evidence must be a JSON object")
        extra = sorted(repr(key)[:40] for key in evidence if key not in EVIDENCE_FIELDS)
        if extra:
            _fail(f"snp evidence has unexpected field{'s' if len(extra) > 1 else ''} "
                  f"{', '.join(extra)}")
        if evidence.get("tee") != TEE:
            _fail("snp evidence must have 'tee': 'snp'")
        if "report" not in evidence:
            _fail("snp evidence is missing 'report'")
        report = _base64_field(evidence, "report", _REPORT_CHARS)
        chain: dict[str, bytes] = {}
        for name in CERTIFICATES:
            if name in evidence:
                chain[name] = _base64_field(evidence, name, MAX_CERTIFICATE_CHARS)
            elif name in self.certificates:
                chain[name] = self.certificates[name]
            else:
                _fail(f"snp evidence carries no '{name}' certificate and none is configured")
        return verify_report(report, vcek=chain["vcek"], ask=chain["ask"], ark=chain["ark"],
                             at=at, pinned_arks=self.pinned_arks)


def normalize_pins(pinned_arks: Collection[str]) -> frozenset[str]:
    """Lower-case hex SHA-256 fingerprints; ValueError/TypeError for a malformed list."""
    # A lone string is a Collection[str] of characters: refuse it rather than pin nothing.
    if isinstance(pinned_arks, str | bytes):
        raise TypeError("pinned_arks must be a collection of hex SHA-256 strings, not one string")
    pins = frozenset(pin.lower() if isinstance(pin, str) else "" for pin in pinned_arks)
    if not pins or not all(_HEX64.fullmatch(pin) for pin in pins):
        raise ValueError("pinned_arks must hold one or more SHA-256 fingerprints (64 hex digits)")
    return pins


def _check_form(report: SnpReport) -> None:
    if report.version < 2:
        _fail(f"SNP report version {report.version} is not supported (2 or later)")
    if report.signature_algo != ECDSA_P384_SHA384:
        _fail(f"SNP report signature algorithm is {report.signature_algo}, only "
              f"{ECDSA_P384_SHA384} (ECDSA P-384 with SHA-384) is supported")
    if report.signing_key == SIGNING_KEY_VLEK:
        # A VLEK chains ARK → ASVK → VLEK, and AMD issues it to a cloud provider, not a
        # chip: no ASVK is pinned or checked here, so such a report cannot be verified.
        _fail(f"SNP report is signed by key kind {SIGNING_KEY_VLEK}, a VLEK: only "
              "VCEK-signed reports are supported (the VLEK chain ARK → ASVK → VLEK is "
              "not checked)")
    if report.signing_key != SIGNING_KEY_VCEK:
        _fail(f"SNP report is signed by key kind {report.signing_key}, not a VCEK: only "
              "VCEK-signed reports are supported")
    # Not signed: if these could vary, one genuine report would have many encodings.
    if any(report.signature_reserved):
        _fail("SNP report has non-zero reserved bytes after its signature")


def _verify_chain(*, vcek: bytes, ask: bytes, ark: bytes, when: datetime,
                  pins: frozenset[str]) -> x509.Certificate:
    ark_cert, ask_cert, vcek_cert = (_load("ARK", ark), _load("ASK", ask), _load("VCEK", vcek))
    fingerprint = hashlib.sha256(ark).hexdigest()
    if fingerprint not in pins:
        _fail(f"ARK certificate SHA-256 {fingerprint} is not a pinned AMD root")
    if ark_cert.issuer != ark_cert.subject:
        _fail("ARK certificate is not self-signed (its issuer is not its subject)")
    _check_signed("ARK", ark_cert, "ARK", ark_cert)
    _check_signed("ASK", ask_cert, "ARK", ark_cert)
    _check_signed("VCEK", vcek_cert, "ASK", ask_cert)
    for name, cert in (("ARK", ark_cert), ("ASK", ask_cert)):
        if not _is_ca(cert):
            _fail(f"{name} certificate is not a CA certificate (basicConstraints)")
    for name, cert in (("ARK", ark_cert), ("ASK", ask_cert), ("VCEK", vcek_cert)):
        if when < cert.not_valid_before_utc:
            _fail(f"{name} certificate is not yet valid at {_iso(when)} "
                  f"(valid from {_iso(cert.not_valid_before_utc)})")
        if when > cert.not_valid_after_utc:
            _fail(f"{name} certificate expired at {_iso(cert.not_valid_after_utc)} "
                  f"(checked at {_iso(when)})")
    return vcek_cert


def _load(name: str, der: bytes) -> x509.Certificate:
    if not isinstance(der, bytes):
        _fail(f"{name} certificate must be DER bytes, got {type(der).__name__}")
    try:
        with warnings.catch_warnings():
            # AMD issues VCEKs with serial number 0, which RFC 5280 forbids; cryptography
            # warns about it on every load. The chain, not the serial, carries the trust.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(der)
        # cryptography parses some fields only when first read: read them now, so that a
        # malformed one is refused here, named, and not as a stray ValueError later.
        _ = (cert.subject, cert.issuer, cert.extensions, cert.not_valid_before_utc,
             cert.not_valid_after_utc)
    except (ValueError, TypeError, x509.InvalidVersion, x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType):
        _fail(f"{name} certificate is not a DER X.509 certificate")
    # The signature BIT STRING ends the DER and must have 0 unused bits; cryptography
    # reads past a non-zero count, which would give one certificate a second encoding.
    if not der.endswith(b"\x00" + cert.signature):
        _fail(f"{name} certificate's signature is not DER-encoded")
    return cert


def _check_signed(name: str, cert: x509.Certificate, issuer_name: str,
                  issuer: x509.Certificate) -> None:
    if cert.issuer != issuer.subject:
        _fail(f"{name} certificate is not issued by the {issuer_name} (issuer "
              f"{cert.issuer.rfc4514_string()[:80]!r})")
    try:
        oid = cert.signature_algorithm_oid
        digest = cert.signature_hash_algorithm
        parameters = cert.signature_algorithm_parameters
        key = issuer.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        _fail(f"{name} certificate has an unsupported signature algorithm or key")
    if (oid != SignatureAlgorithmOID.RSASSA_PSS or not isinstance(digest, hashes.SHA384)
            or not isinstance(parameters, padding.PSS)
            or not isinstance(parameters.mgf, padding.MGF1)):
        used = f"RSASSA-PSS with {digest.name}" if (
            oid == SignatureAlgorithmOID.RSASSA_PSS and digest is not None) else oid.dotted_string
        _fail(f"{name} certificate is signed with {used}, not RSASSA-PSS with SHA-384")
    if not isinstance(key, rsa.RSAPublicKey):
        _fail(f"{issuer_name} certificate key is not an RSA key")
    try:
        # The declared parameters: this also refuses an outer signatureAlgorithm that
        # differs from the signed one, which nothing else would notice.
        cert.verify_directly_issued_by(issuer)
        # AMD's fixed parameters: only SHA-384, MGF1-SHA-384 and salt length 48 pass.
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except InvalidSignature:
        _fail(f"{name} certificate signature does not verify with the {issuer_name} key "
              "(RSASSA-PSS, SHA-384, salt length 48)")
    except (ValueError, TypeError, UnsupportedAlgorithm):
        _fail(f"{name} certificate's signature algorithm is inconsistent or unsupported")


def _is_ca(cert: x509.Certificate) -> bool:
    try:  # the extensions were parsed by _load already
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _check_binding(report: SnpReport, vcek: x509.Certificate, layout: TcbLayout) -> None:
    """The VCEK is issued for one chip at one TCB: the report must name exactly those."""
    try:
        extensions = {ext.oid.dotted_string: ext.value for ext in vcek.extensions}
    except (x509.DuplicateExtension, x509.UnsupportedGeneralNameType, ValueError, TypeError):
        _fail("VCEK certificate has malformed extensions")
    reported = tcb_parts(report.reported_tcb, layout)
    issued_tcb = 0
    for name, oid, byte in layout.parts:
        value = _der_byte_integer(name, _extension_bytes(extensions, f"{_AMD_OID}.{oid}", name))
        if reported[name] != value:
            _fail(f"SNP report's reported_tcb {name} is {reported[name]}, but the VCEK is "
                  f"issued for {name} {value}")
        issued_tcb |= value << (8 * byte)
    if report.reported_tcb != issued_tcb:
        _fail(f"SNP report's reported_tcb {report.reported_tcb:016x} has non-zero reserved "
              f"bytes (the VCEK is issued for {issued_tcb:016x})")
    hwid = _extension_bytes(extensions, _HWID_OID, "hwID")
    # KDS puts the raw bytes in the extension; accept them wrapped in an OCTET STRING too.
    size = layout.hwid_size
    if len(hwid) == size + 2 and hwid[:2] == bytes((0x04, size)):
        hwid = hwid[2:]
    if len(hwid) != size:
        _fail(f"VCEK hwID extension must hold {size} bytes, got {len(hwid)} "
              f"({layout.name} layout)")
    # A Turin VCEK names the chip by the first 8 bytes of CHIP_ID; the report's signature
    # covers the rest.
    if hwid != report.chip_id[:size]:
        _fail(f"SNP report's chip_id {report.chip_id[:8].hex()}… differs from the VCEK's "
              f"hwID {hwid[:8].hex()}…")


def _extension_bytes(extensions: Mapping[str, x509.ExtensionType], oid: str, name: str) -> bytes:
    value = extensions.get(oid)
    if value is None:
        _fail(f"VCEK certificate has no {name} extension ({oid})")
    if not isinstance(value, x509.UnrecognizedExtension):
        _fail(f"VCEK {name} extension ({oid}) has an unexpected form")
    return value.value


def _der_byte_integer(name: str, der: bytes) -> int:
    """A DER INTEGER in 0..255: tag 2, short length, minimal non-negative encoding."""
    body = der[2:]
    minimal = ((len(body) == 1 and body[0] < 0x80)
               or (len(body) == 2 and body[0] == 0 and body[1] >= 0x80))
    if der[:1] != b"\x02" or len(der) < 3 or der[1] != len(body) or not minimal:
        _fail(f"VCEK {name} extension is not a DER INTEGER from 0 to 255")
    return body[-1]


def _check_signature(report: SnpReport, data: bytes, vcek: x509.Certificate) -> None:
    try:
        key = vcek.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        _fail("VCEK certificate has an unsupported public key")
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        _fail("VCEK certificate key is not an ECDSA P-384 key")
    try:
        signature = encode_dss_signature(report.signature_r, report.signature_s)
        key.verify(signature, data[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError, TypeError):
        _fail("SNP report signature does not verify with the VCEK key")


def _base64_field(evidence: Mapping[str, Any], name: str, max_chars: int) -> bytes:
    return base64_field(evidence[name], f"snp evidence field '{name}'", max_chars)


def _instant(at: float) -> datetime:
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        _fail("the verification time must be a finite number of seconds")
    try:
        return datetime.fromtimestamp(at, tz=UTC)
    except (OverflowError, OSError, ValueError):
        _fail(f"the verification time {at} is out of range")


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _fail(reason: str) -> NoReturn:
    raise EvidenceError(reason)
