"""SEV-SNP reports: AMD's real sample verifies through the pinned Milan ARK; every attack fails.

The real chain cannot be re-signed, so attacks on the certificates' content (TCB,
chip id, algorithms, validity, key types) use a throwaway chain made here with
the same algorithms, whose ARK is pinned for that test, and the sample report
re-signed by its VCEK key, so each attack reaches the check meant to catch it.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tdapp.attest.claims import Claims, EvidenceError
from tdapp.attest.snp import (
    MILAN_ARK_SHA256,
    MILAN_GENOA_TCB,
    REPORT_SIZE,
    SnpVerifier,
    parse_report,
    tcb_layout,
    tcb_parts,
    verify_report,
)
from tdapp.attest.snp import TURIN_TCB as TURIN_TCB_LAYOUT
from tdapp.errors import RefusedError

DATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "snp"
pytestmark = [
    pytest.mark.skipif(not (DATA / "attestation.bin").is_file(),
                       reason=f"AMD SEV-SNP test data not found in {DATA}"),
    # AMD's KDS issues VCEKs with serial number 0; cryptography parses them with a warning.
    pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive"),
]

AMD_OID = "1.3.6.1.4.1.3704.1"
TCB_OIDS = {"blSPL": "3.1", "teeSPL": "3.2", "snpSPL": "3.3", "ucodeSPL": "3.8",
            "fmcSPL": "3.9"}
SAMPLE_TCB = {"blSPL": 2, "teeSPL": 0, "snpSPL": 5, "ucodeSPL": 0x44}
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
DAY = timedelta(days=1)
NOT_BEFORE = datetime(2024, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2030, 1, 1, tzinfo=UTC)
FAKE_AT = datetime(2025, 1, 1, tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class Sample:
    report: bytes
    vcek: bytes
    ask: bytes
    ark: bytes
    at: float

    def chain(self) -> dict[str, bytes]:
        return {"vcek": self.vcek, "ask": self.ask, "ark": self.ark}


@pytest.fixture(scope="module")
def sample() -> Sample:
    files = {name: (DATA / name).read_bytes() for name in
             ("attestation.bin", "kds_vcek.der", "milan_ask.der", "milan_ark.der")}
    vcek = x509.load_der_x509_certificate(files["kds_vcek.der"])
    return Sample(report=files["attestation.bin"], vcek=files["kds_vcek.der"],
                  ask=files["milan_ask.der"], ark=files["milan_ark.der"],
                  at=(vcek.not_valid_before_utc + DAY).timestamp())


def verify(sample: Sample, **changes: Any) -> Claims:
    arguments: dict[str, Any] = {"report": sample.report, **sample.chain(), "at": sample.at}
    arguments.update(changes)
    report = arguments.pop("report")
    return verify_report(report, **arguments)


def refused(sample: Sample, match: str, **changes: Any) -> str:
    with pytest.raises(EvidenceError, match=match) as caught:
        verify(sample, **changes)
    assert "\n" not in str(caught.value)
    return str(caught.value)


# --- the real sample ---------------------------------------------------------------------

def test_sample_verifies_through_the_pinned_milan_ark(sample: Sample) -> None:
    assert hashlib.sha256(sample.ark).hexdigest() == MILAN_ARK_SHA256
    claims = verify(sample)
    assert claims.tee == "snp"
    assert claims.debug is True
    policy = claims.values["policy"]
    assert isinstance(policy, int) and policy & (1 << 19) and policy == 0x0B0000
    assert claims.measurement == sample.report[0x90:0xC0].hex()
    assert claims.values["measurement"] == claims.measurement
    assert claims.platform == sample.report[0x1A0:0x1E0].hex()
    assert claims.report_data == sample.report[0x50:0x90] == bytes([1, 2, 3, 4, 5]) + bytes(59)
    assert claims.tcb_status == "UpToDate" and claims.advisories == ()
    assert claims.values["reported_tcb"] == "4405000000000002"
    assert claims.values["host_data"] == "00" * 32
    assert (claims.values["guest_svn"], claims.values["vmpl"]) == (0, 0)
    assert claims.values["family_id"] == claims.values["image_id"] == "00" * 16
    assert claims.values["id_key_digest"] == "00" * 48


def test_sample_fields_match_the_abi_layout(sample: Sample) -> None:
    report = parse_report(sample.report)
    assert (report.version, report.signature_algo, report.vmpl, report.signing_key) == (2, 1, 0, 0)
    assert report.policy == 0x0B0000 and report.debug
    assert tcb_parts(report.reported_tcb) == SAMPLE_TCB
    assert report.current_tcb == report.committed_tcb == report.launch_tcb == report.reported_tcb
    assert report.current_version == report.committed_version == (1, 49, 3)
    assert report.platform_info == 1
    assert report.report_id_ma == b"\xff" * 32
    assert report.signature_reserved == bytes(REPORT_SIZE - 0x330)
    vcek = x509.load_der_x509_certificate(sample.vcek)
    hwid = vcek.extensions.get_extension_for_oid(x509.ObjectIdentifier(f"{AMD_OID}.4"))
    assert isinstance(hwid.value, x509.UnrecognizedExtension)
    assert hwid.value.value == report.chip_id


def test_validity_boundaries_are_inclusive(sample: Sample) -> None:
    vcek = x509.load_der_x509_certificate(sample.vcek)
    verify(sample, at=vcek.not_valid_before_utc.timestamp())
    verify(sample, at=vcek.not_valid_after_utc.timestamp())


def test_unpinned_ark_is_refused_naming_its_fingerprint(sample: Sample) -> None:
    message = refused(sample, "not a pinned AMD root", pinned_arks=("00" * 32,))
    assert MILAN_ARK_SHA256 in message
    verify(sample, pinned_arks=("00" * 32, MILAN_ARK_SHA256.upper()))


def _field_edges() -> set[int]:
    starts = [0x00, 0x04, 0x08, 0x10, 0x20, 0x30, 0x34, 0x38, 0x40, 0x48, 0x50, 0x90, 0xC0,
              0xE0, 0x110, 0x140, 0x160, 0x180, 0x188, 0x1A0, 0x1E0, 0x1E8, 0x1EC, 0x1F0,
              0x1F8, 0x2A0]
    return {offset for start, end in itertools.pairwise(starts)
            for offset in (start, end - 1)}


SIGNED_OFFSETS = sorted(_field_edges() | set(range(0, 0x2A0, 11)))
SIGNATURE_OFFSETS = sorted({*range(0x2A0, 0x330, 7), 0x2A0 + 47, 0x2A0 + 71, 0x2E8, 0x32F})
TAIL_OFFSETS = [0x330, 0x400, REPORT_SIZE - 1]


def _expected_reason(offset: int) -> str:
    if offset < 4:  # version 2 → 3 or more: such a report must name its CPU family
        return "CPU family 0x0, whose TCB layout is not known"
    if 0x180 <= offset < 0x188:
        return "reported_tcb"
    if 0x1A0 <= offset < 0x1E0:
        return "chip_id"
    if 0x34 <= offset < 0x38:
        return "signature algorithm"
    if offset >= 0x330:
        return "reserved bytes after its signature"
    return "SNP report signature does not verify with the VCEK key"


@pytest.mark.parametrize("offset", SIGNED_OFFSETS + SIGNATURE_OFFSETS + TAIL_OFFSETS)
def test_flipping_any_byte_is_refused(sample: Sample, offset: int) -> None:
    assert len(SIGNED_OFFSETS) >= 60
    tampered = bytearray(sample.report)
    tampered[offset] ^= 0x01
    refused(sample, _expected_reason(offset), report=bytes(tampered))


@pytest.mark.parametrize("report", [b"", b"\0" * 0x2A0, b"\0" * (REPORT_SIZE + 1)],
                         ids=["empty", "signed-part-only", "one-byte-too-long"])
def test_wrong_size_report_is_refused(sample: Sample, report: bytes) -> None:
    refused(sample, f"must be {REPORT_SIZE} bytes, got {len(report)}", report=report)
    with pytest.raises(EvidenceError, match="must be 1184 bytes"):
        parse_report(report)


def test_truncated_report_is_refused(sample: Sample) -> None:
    refused(sample, "must be 1184 bytes, got 1183", report=sample.report[:-1])


@pytest.mark.parametrize("name", ["vcek", "ask", "ark"])
@pytest.mark.parametrize("garbage", [b"", b"\x30\x03\x02\x01\x00", b"not a certificate" * 10])
def test_garbage_der_is_refused_naming_the_certificate(sample: Sample, name: str,
                                                       garbage: bytes) -> None:
    refused(sample, f"{name.upper()} certificate is not a DER X.509 certificate",
            **{name: garbage})


def test_swapped_ask_and_ark_are_refused(sample: Sample) -> None:
    ask_fingerprint = hashlib.sha256(sample.ask).hexdigest()
    message = refused(sample, "not a pinned AMD root", ark=sample.ask, ask=sample.ark)
    assert ask_fingerprint in message
    # Even with the ASK pinned too, the chain itself does not hold.
    refused(sample, "ARK certificate is not self-signed", ark=sample.ask, ask=sample.ark,
            pinned_arks=(MILAN_ARK_SHA256, ask_fingerprint))


def test_vcek_in_place_of_ask_is_refused(sample: Sample) -> None:
    refused(sample, "ASK certificate is not issued by the ARK", ask=sample.vcek)


@pytest.mark.filterwarnings("ignore:Attribute's length")  # a flipped C=US, refused anyway
@pytest.mark.parametrize("name", ["vcek", "ask", "ark"])
def test_any_change_to_a_certificate_is_refused(sample: Sample, name: str) -> None:
    der = sample.chain()[name]
    for offset in range(len(der)):
        tampered = bytearray(der)
        tampered[offset] ^= 0x01
        # A changed ARK is not the pinned one; pin it anyway to reach its self-signature.
        pins = (MILAN_ARK_SHA256, hashlib.sha256(tampered).hexdigest())
        with pytest.raises(EvidenceError):
            verify(sample, pinned_arks=pins, **{name: bytes(tampered)})


def test_outer_signature_algorithm_must_match_the_signed_one(sample: Sample) -> None:
    # Salt length 48 → 49 in the ASK's unsigned outer AlgorithmIdentifier only.
    salt = bytes.fromhex("a203020130")
    outer = sample.ask.rindex(salt)
    assert sample.ask.index(salt) < outer
    tampered = sample.ask[:outer + 4] + b"\x31" + sample.ask[outer + 5:]
    refused(sample, "ASK certificate's signature algorithm is inconsistent", ask=tampered)


def test_signature_bit_string_must_have_no_unused_bits(sample: Sample) -> None:
    signature = x509.load_der_x509_certificate(sample.ask).signature
    assert sample.ask.endswith(b"\x00" + signature)
    tampered = sample.ask[:-len(signature) - 1] + b"\x01" + signature
    refused(sample, "ASK certificate's signature is not DER-encoded", ask=tampered)


@pytest.mark.parametrize(("at", "match"), [
    (datetime(2026, 8, 28, tzinfo=UTC), "VCEK certificate is not yet valid"),
    (datetime(2033, 8, 29, tzinfo=UTC), "VCEK certificate expired at 2033-08-28T16:41:28Z"),
    (datetime(2046, 1, 1, tzinfo=UTC), "ARK certificate expired at 2045-10-22T17:23:05Z"),
    (datetime(2019, 1, 1, tzinfo=UTC), "ARK certificate is not yet valid"),
])
def test_time_outside_validity_names_the_certificate(sample: Sample, at: datetime,
                                                     match: str) -> None:
    refused(sample, match, at=at.timestamp())


@pytest.mark.parametrize("at", [math.nan, math.inf, 1e300, True, "2026"])
def test_unusable_time_is_refused(sample: Sample, at: Any) -> None:
    refused(sample, "verification time", at=at)


# --- a throwaway chain with AMD's algorithms ------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tdapp tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _integer(value: int) -> bytes:
    body = value.to_bytes(1, "big")
    return b"\x02\x01" + body if value < 0x80 else b"\x02\x02\x00" + body


def _certificate(subject: x509.Name, issuer: x509.Name, public_key: Any, signer: Any, *,
                 ca: bool, extensions: Iterable[x509.ExtensionType] = (),
                 not_before: datetime = NOT_BEFORE, not_after: datetime = NOT_AFTER,
                 digest: hashes.HashAlgorithm | None = None,
                 rsa_padding: padding.AsymmetricPadding = PSS) -> bytes:
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    cert = builder.sign(signer, digest or hashes.SHA384(), rsa_padding=rsa_padding)
    return cert.public_bytes(Encoding.DER)


def vcek_extensions(tcb: Mapping[str, int] = SAMPLE_TCB, hwid: bytes | None = None,
                    *, raw: Mapping[str, bytes] | None = None) -> list[x509.ExtensionType]:
    values = {f"{AMD_OID}.{TCB_OIDS[name]}": _integer(value) for name, value in tcb.items()}
    values[f"{AMD_OID}.4"] = hwid if hwid is not None else CHIP_ID
    values.update(raw or {})
    return [x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)
            for oid, value in values.items()]


@dataclass(frozen=True)
class Fake:
    ark_key: rsa.RSAPrivateKey
    ask_key: rsa.RSAPrivateKey
    vcek_key: ec.EllipticCurvePrivateKey
    ark: bytes
    ask: bytes
    report: bytes

    @property
    def pins(self) -> tuple[str]:
        return (hashlib.sha256(self.ark).hexdigest(),)

    def vcek(self, key: Any = None, **options: Any) -> bytes:
        public = (key or self.vcek_key).public_key()
        return _certificate(_name("SEV-VCEK"), _name("SEV-Milan"), public, self.ask_key,
                            ca=False, extensions=options.pop("extensions", vcek_extensions()),
                            **options)

    def verify(self, *, report: bytes | None = None, **changes: Any) -> Claims:
        arguments: dict[str, Any] = {"vcek": self.vcek(), "ask": self.ask, "ark": self.ark,
                                     "at": FAKE_AT, "pinned_arks": self.pins}
        arguments.update(changes)
        return verify_report(self.report if report is None else report, **arguments)

    def refused(self, match: str, **changes: Any) -> None:
        with pytest.raises(EvidenceError, match=match):
            self.verify(**changes)

    def signed(self, report: bytes, **fields: int) -> bytes:
        """``report`` with ``fields`` (name=u32/u64 offset encoded as name_at) re-signed."""
        data = bytearray(report)
        for name, value in fields.items():
            kind, offset = name.split("_at_")
            struct.pack_into({"u8": "<B", "u32": "<I", "u64": "<Q"}[kind], data,
                             int(offset, 16), value)
        return sign(bytes(data), self.vcek_key)


def sign(report: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    r, s = decode_dss_signature(key.sign(report[:0x2A0], ec.ECDSA(hashes.SHA384())))
    return report[:0x2A0] + r.to_bytes(72, "little") + s.to_bytes(72, "little") + report[0x330:]


CHIP_ID = bytes(range(64))


@pytest.fixture(scope="module")
def fake(sample: Sample) -> Fake:
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    ark = _certificate(_name("ARK-Milan"), _name("ARK-Milan"), ark_key.public_key(), ark_key,
                       ca=True)
    ask = _certificate(_name("SEV-Milan"), _name("ARK-Milan"), ask_key.public_key(), ark_key,
                       ca=True)
    report = bytearray(sample.report)
    report[0x1A0:0x1E0] = CHIP_ID
    return Fake(ark_key, ask_key, vcek_key, ark, ask, sign(bytes(report), vcek_key))


def test_fake_chain_verifies(fake: Fake) -> None:
    claims = fake.verify()
    assert claims.platform == CHIP_ID.hex() and claims.debug


def test_policy_without_debug_bit_gives_debug_false(fake: Fake) -> None:
    claims = fake.verify(report=fake.signed(fake.report, u64_at_08=0x030000))
    assert claims.debug is False and claims.values["policy"] == 0x030000


def test_vcek_signed_by_another_key_is_refused(sample: Sample, fake: Fake) -> None:
    real = x509.load_der_x509_certificate(sample.vcek)
    rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = _certificate(real.subject, real.issuer, real.public_key(), rogue, ca=False,
                          extensions=[ext.value for ext in real.extensions],
                          not_before=real.not_valid_before_utc,
                          not_after=real.not_valid_after_utc)
    refused(sample, "VCEK certificate signature does not verify with the ASK key", vcek=forged)
    refused(sample, "ASK certificate signature does not verify with the ARK key",
            ask=_certificate(_name("x"), x509.load_der_x509_certificate(sample.ark).subject,
                             rogue.public_key(), rogue, ca=True))
    fake.refused("VCEK certificate signature does not verify with the ASK key",
                 vcek=_certificate(_name("SEV-VCEK"), _name("SEV-Milan"),
                                   fake.vcek_key.public_key(), rogue, ca=False,
                                   extensions=vcek_extensions()))


@pytest.mark.parametrize(("name", "value"), [
    ("blSPL", 3), ("teeSPL", 1), ("snpSPL", 6), ("ucodeSPL", 0x45), ("ucodeSPL", 0xC4)])
def test_vcek_for_another_tcb_is_refused_naming_the_component(fake: Fake, name: str,
                                                              value: int) -> None:
    tcb = {**SAMPLE_TCB, name: value}
    fake.refused(f"reported_tcb {name} is {SAMPLE_TCB[name]}, but the VCEK is issued for "
                 f"{name} {value}", vcek=fake.vcek(extensions=vcek_extensions(tcb)))


def test_tcb_svn_above_127_is_matched(fake: Fake) -> None:
    tcb = {**SAMPLE_TCB, "ucodeSPL": 0xD1}
    report = fake.signed(fake.report, u8_at_187=0xD1)
    claims = fake.verify(report=report, vcek=fake.vcek(extensions=vcek_extensions(tcb)))
    assert claims.values["reported_tcb"] == "d105000000000002"


def test_reserved_tcb_bytes_must_be_zero(fake: Fake) -> None:
    fake.refused("non-zero reserved bytes", report=fake.signed(fake.report, u8_at_183=1))


def test_vcek_for_another_chip_is_refused(fake: Fake) -> None:
    fake.refused("chip_id 0001020304050607… differs from the VCEK's hwID 0101",
                 vcek=fake.vcek(extensions=vcek_extensions(hwid=b"\1" + CHIP_ID[1:])))


def test_hwid_wrapped_in_an_octet_string_is_accepted(fake: Fake) -> None:
    fake.verify(vcek=fake.vcek(extensions=vcek_extensions(hwid=b"\x04\x40" + CHIP_ID)))


@pytest.mark.parametrize(("raw", "match"), [
    ({f"{AMD_OID}.3.3": b"\x02\x02\x00\x05"}, "snpSPL extension is not a DER INTEGER"),
    ({f"{AMD_OID}.3.1": b"\x04\x01\x02"}, "blSPL extension is not a DER INTEGER"),
    ({f"{AMD_OID}.3.8": b"\x02\x01\xc4"}, "ucodeSPL extension is not a DER INTEGER"),
    ({f"{AMD_OID}.3.2": b"\x02\x01\x00\x00"}, "teeSPL extension is not a DER INTEGER"),
    ({f"{AMD_OID}.3.2": b"\x02\x02\x01\x00"}, "teeSPL extension is not a DER INTEGER"),
    ({f"{AMD_OID}.4": CHIP_ID[:32]}, "hwID extension must hold 64 bytes, got 32"),
])
def test_malformed_vcek_extensions_are_refused(fake: Fake, raw: dict[str, bytes],
                                               match: str) -> None:
    fake.refused(match, vcek=fake.vcek(extensions=vcek_extensions(raw=raw)))


def test_missing_vcek_extension_is_refused(fake: Fake) -> None:
    extensions = [ext for ext in vcek_extensions()
                  if ext.oid.dotted_string != f"{AMD_OID}.3.3"]
    fake.refused("VCEK certificate has no snpSPL extension",
                 vcek=fake.vcek(extensions=extensions))


@pytest.mark.parametrize(("key", "match"), [
    (ec.generate_private_key(ec.SECP256R1()), "not an ECDSA P-384 key"),
    (rsa.generate_private_key(public_exponent=65537, key_size=2048), "not an ECDSA P-384 key"),
    (ec.generate_private_key(ec.SECP384R1()), "report signature does not verify"),
])
def test_vcek_with_a_wrong_key_is_refused(fake: Fake, key: Any, match: str) -> None:
    fake.refused(match, vcek=fake.vcek(key=key))


@pytest.mark.parametrize(("options", "match"), [
    ({"rsa_padding": padding.PKCS1v15()}, r"signed with 1\.2\.840\.113549\.1\.1\.12, not RSASSA"),
    ({"digest": hashes.SHA256(), "rsa_padding": padding.PSS(
        mgf=padding.MGF1(hashes.SHA256()), salt_length=32)}, "signed with RSASSA-PSS with sha256"),
    ({"rsa_padding": padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=32)},
     "VCEK certificate signature does not verify with the ASK key"),
])
def test_certificates_need_rsassa_pss_sha384_salt_48(fake: Fake, options: dict[str, Any],
                                                      match: str) -> None:
    fake.refused(match, vcek=fake.vcek(**options))


def test_ark_self_signature_is_checked(fake: Fake) -> None:
    rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ark = _certificate(_name("ARK-Milan"), _name("ARK-Milan"), fake.ark_key.public_key(), rogue,
                       ca=True)
    fake.refused("ARK certificate signature does not verify with the ARK key", ark=ark,
                 pinned_arks=(hashlib.sha256(ark).hexdigest(),))


def test_ask_must_be_a_ca(fake: Fake) -> None:
    ask = _certificate(_name("SEV-Milan"), _name("ARK-Milan"), fake.ask_key.public_key(),
                       fake.ark_key, ca=False)
    fake.refused("ASK certificate is not a CA certificate", ask=ask)


def test_expired_ask_is_named(fake: Fake) -> None:
    ask = _certificate(_name("SEV-Milan"), _name("ARK-Milan"), fake.ask_key.public_key(),
                       fake.ark_key, ca=True, not_after=datetime(2024, 6, 1, tzinfo=UTC))
    fake.refused("ASK certificate expired at 2024-06-01T00:00:00Z", ask=ask)


@pytest.mark.parametrize(("fields", "match"), [
    ({"u32_at_00": 1}, "version 1 is not supported"),
    ({"u32_at_34": 2}, "signature algorithm is 2"),
    ({"u32_at_48": 1 << 2}, "signed by key kind 1, a VLEK: only VCEK-signed reports"),
    ({"u32_at_48": 7 << 2}, "signed by key kind 7, not a VCEK"),
    ({"u32_at_00": 3, "u8_at_188": 0x1B}, "CPU family 0x1b, whose TCB layout is not known"),
    ({"u32_at_00": 3, "u8_at_188": 0x17}, "CPU family 0x17"),
])
def test_unsupported_report_forms_are_refused(fake: Fake, fields: dict[str, int],
                                              match: str) -> None:
    fake.refused(match, report=fake.signed(fake.report, **fields))


def test_version_3_from_genoa_is_accepted(fake: Fake) -> None:
    fake.verify(report=fake.signed(fake.report, u32_at_00=3, u8_at_188=0x19))


# Turin's TCB_VERSION: FMC, bootloader, TEE, SNP in bytes 0-3, microcode in byte 7.
TURIN_TCB = {"fmcSPL": 1, "blSPL": 2, "teeSPL": 3, "snpSPL": 4, "ucodeSPL": 0x50}
TURIN_TCB_U64 = 0x50 << 56 | 4 << 24 | 3 << 16 | 2 << 8 | 1


def turin_report(fake: Fake, tcb: int = TURIN_TCB_U64) -> bytes:
    return fake.signed(fake.report, u32_at_00=3, u8_at_188=0x1A, u64_at_180=tcb)


def test_turin_report_is_read_in_turins_tcb_layout(fake: Fake) -> None:
    """A family 1Ah report's TCB must be read with the FMC SPL first: read in Milan's
    layout its SVNs would be matched against the wrong VCEK extensions."""
    report = turin_report(fake)
    assert tcb_parts(TURIN_TCB_U64, TURIN_TCB_LAYOUT) == TURIN_TCB
    assert tcb_layout(parse_report(report)) is TURIN_TCB_LAYOUT
    claims = fake.verify(report=report, vcek=fake.vcek(
        extensions=vcek_extensions(TURIN_TCB, hwid=CHIP_ID[:8])))
    assert claims.values["reported_tcb"] == "5000000004030201"


@pytest.mark.parametrize(("tcb", "hwid", "match"), [
    (SAMPLE_TCB, CHIP_ID[:8], "VCEK certificate has no fmcSPL extension"),
    ({**TURIN_TCB, "snpSPL": 5}, CHIP_ID[:8],
     "reported_tcb snpSPL is 4, but the VCEK is issued for snpSPL 5"),
    ({**TURIN_TCB, "fmcSPL": 0}, CHIP_ID[:8],
     "reported_tcb fmcSPL is 1, but the VCEK is issued for fmcSPL 0"),
    (TURIN_TCB, CHIP_ID, r"hwID extension must hold 8 bytes, got 64 \(Turin layout\)"),
    (TURIN_TCB, b"\xff" + CHIP_ID[1:8], "differs from the VCEK's hwID ff01"),
], ids=["milan-vcek", "other-snp-spl", "other-fmc-spl", "64-byte-hwid", "other-chip"])
def test_turin_report_with_a_vcek_for_another_tcb_or_chip_is_refused(
        fake: Fake, tcb: Mapping[str, int], hwid: bytes, match: str) -> None:
    """A Milan-style VCEK (no FMC SPL, 64-byte hwID), or one for another Turin TCB or
    chip, must not vouch for a Turin report."""
    extensions = vcek_extensions(tcb, hwid=hwid)
    if "fmcSPL" not in tcb:
        extensions = [ext for ext in extensions if ext.oid.dotted_string != f"{AMD_OID}.3.9"]
    fake.refused(match, report=turin_report(fake), vcek=fake.vcek(extensions=extensions))


def test_turin_reserved_tcb_bytes_must_be_zero(fake: Fake) -> None:
    """Bytes 4-6 of Turin's TCB_VERSION are reserved: a report setting them is refused
    even by a VCEK whose SPLs all match."""
    fake.refused("non-zero reserved bytes", report=turin_report(fake, TURIN_TCB_U64 | 1 << 40),
                 vcek=fake.vcek(extensions=vcek_extensions(TURIN_TCB, hwid=CHIP_ID[:8])))


def test_genoa_report_is_read_in_the_milan_layout(fake: Fake) -> None:
    """Genoa (family 19h, like Milan) keeps Milan's TCB layout; a version 2 report has no
    CPUID fields and is read the same way."""
    genoa = parse_report(fake.signed(fake.report, u32_at_00=3, u8_at_188=0x19, u8_at_189=0x11))
    assert tcb_layout(genoa) is MILAN_GENOA_TCB is tcb_layout(parse_report(fake.report))


def test_random_reports_are_refused_with_evidence_error(sample: Sample) -> None:
    for seed in range(20):
        junk = hashlib.shake_256(seed.to_bytes(2, "big")).digest(REPORT_SIZE)
        with pytest.raises(EvidenceError):
            verify(sample, report=junk)


# --- the verifier over an evidence document --------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def evidence_of(sample: Sample, *names: str) -> dict[str, Any]:
    return {"tee": "snp", "report": b64(sample.report),
            **{name: b64(sample.chain()[name]) for name in names}}


def test_verifier_with_certificates_in_the_evidence(sample: Sample) -> None:
    claims = SnpVerifier().verify(evidence_of(sample, "vcek", "ask", "ark"), at=sample.at)
    assert claims == verify(sample)
    assert SnpVerifier.tee == "snp"


def test_verifier_with_certificates_in_the_configuration(sample: Sample) -> None:
    configured = SnpVerifier(certificates=sample.chain())
    assert configured.verify(evidence_of(sample), at=sample.at) == verify(sample)
    # The evidence's copy is used when both are given; trust rests on the pin either way.
    stale = SnpVerifier(certificates={**sample.chain(), "vcek": b"stale"})
    assert stale.verify(evidence_of(sample, "vcek"), at=sample.at).debug
    with pytest.raises(EvidenceError, match="VCEK certificate is not a DER"):
        stale.verify(evidence_of(sample), at=sample.at)


def test_verifier_pins_its_arks(sample: Sample) -> None:
    with pytest.raises(EvidenceError, match="not a pinned AMD root"):
        SnpVerifier(pinned_arks=("ab" * 32,)).verify(
            evidence_of(sample, "vcek", "ask", "ark"), at=sample.at)


@pytest.mark.parametrize("name", ["vcek", "ask", "ark"])
def test_verifier_names_a_missing_certificate(sample: Sample, name: str) -> None:
    present = [other for other in ("vcek", "ask", "ark") if other != name]
    with pytest.raises(EvidenceError, match=f"no '{name}' certificate and none is configured"):
        SnpVerifier().verify(evidence_of(sample, *present), at=sample.at)


@pytest.mark.parametrize(("change", "match"), [
    ({"nonce": "x"}, "unexpected field 'nonce'"),
    ({"tee": "sgx"}, "'tee': 'snp'"),
    ({"report": None}, "'report' must be a base64 string"),
    ({"report": "not base64!"}, "'report' is not valid base64"),
    ({"report": "QQ="}, "'report' is not valid base64"),
    ({"report": "QR=="}, "'report' is not canonical base64"),
    ({"report": "QUFB" * 400}, "'report' is too long"),
    ({"report": b64(b"\0" * 10)}, "must be 1184 bytes, got 10"),
    ({"vcek": "QUFB" * 5000}, "'vcek' is too long"),
    ({"ask": 7}, "'ask' must be a base64 string"),
])
def test_verifier_refuses_malformed_evidence(sample: Sample, change: dict[str, Any],
                                             match: str) -> None:
    evidence = {**evidence_of(sample, "vcek", "ask", "ark"), **change}
    with pytest.raises(EvidenceError, match=match):
        SnpVerifier().verify(evidence, at=sample.at)


def test_verifier_refuses_missing_report_and_non_objects(sample: Sample) -> None:
    verifier = SnpVerifier(certificates=sample.chain())
    with pytest.raises(EvidenceError, match="missing 'report'"):
        verifier.verify({"tee": "snp"}, at=sample.at)
    with pytest.raises(EvidenceError, match="JSON object"):
        verifier.verify([], at=sample.at)  # type: ignore[arg-type]
    with pytest.raises(EvidenceError, match="unexpected field 1"):
        verifier.verify({**evidence_of(sample), 1: "x"}, at=sample.at)


def test_verifier_configuration_errors_are_programming_errors(sample: Sample) -> None:
    with pytest.raises(ValueError, match="unknown SNP certificate names"):
        SnpVerifier(certificates={"vlek": sample.vcek})
    with pytest.raises(TypeError, match="not one string"):
        SnpVerifier(pinned_arks=MILAN_ARK_SHA256)
    with pytest.raises(ValueError, match="64 hex digits"):
        SnpVerifier(pinned_arks=("abc",))
    with pytest.raises(ValueError, match="64 hex digits"):
        SnpVerifier(pinned_arks=())


def test_evidence_error_is_a_refusal() -> None:
    assert issubclass(EvidenceError, RefusedError)


def test_parse_report_is_unverified_display_only(sample: Sample) -> None:
    tampered = sample.report[:0x90] + b"\xee" * 48 + sample.report[0xC0:]
    assert parse_report(tampered).measurement == b"\xee" * 48
    assert replace(parse_report(sample.report), policy=0).debug is False
