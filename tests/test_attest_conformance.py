"""Every real quote and report in ../shared/testdata/conformance/evidence through ``tdapp attest
verify``: each verifies with its claims or is refused with its reason, and none crashes.

The table gives, for each evidence file, the collateral or certificates an operator
would pick for it (the quote's FMSPC and the collateral's date are in the file
names; the SNP chain is the one of the report's generation) and a verification time
inside the validity of every piece it uses (checked below from the pieces' own
dates, so no refusal here is an expiry in disguise). A refusal must be exit code 7
and one ``tdapp: error:`` line, never a traceback or an internal error. Files that
have no matching collateral here are verified with the nearest one and must be
refused for that mismatch, never accepted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest
from cas_fixtures import CasServer, MakeUser, SessionDoc, StartCas, anonymous_http, unique_name
from conftest import CliResult, assert_error
from cryptography import x509

from tdapp.attest.dcap import DEBUG_REFUSED
from tdapp.attest.snp import AMD_ARK_SHA256S, GENOA_ARK_SHA256, MILAN_ARK_SHA256
from tdapp.client.key_release import EphemeralKey
from tdapp.errors import ExitCode

EVIDENCE = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "conformance" / "evidence"
pytestmark = [
    pytest.mark.skipif(not EVIDENCE.is_dir(), reason=f"{EVIDENCE} is missing"),
    # AMD's KDS issues VCEKs with serial number 0; cryptography parses them with a warning.
    pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive"),
]
Cli = Callable[..., CliResult]


@dataclass(frozen=True)
class Verified:
    """Exit 0 with these claims (hex values are prefixes of the verified ones)."""

    tee: str
    status: str
    measurement: str
    debug: bool = False
    advisories: tuple[str, ...] = ()
    claims: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Refused:
    """Exit 7, one line, naming the reason."""

    reason: str


@dataclass(frozen=True)
class Row:
    evidence: str  # under EVIDENCE
    at: str  # UTC, ISO 8601
    expect: Verified | Refused
    collateral: str | None = None  # dcap/…
    vcek: str | None = None  # snp/…
    ask: str | None = None
    ark: str | None = None

    @property
    def tee(self) -> str:
        if self.evidence.startswith("snp/"):
            return "snp"
        return "sgx" if Path(self.evidence).name.startswith("sgx-") else "tdx"

    @property
    def seconds(self) -> int:
        return int(_instant(self.at))

    def pieces(self) -> dict[str, str]:
        named = {"collateral": self.collateral, "vcek": self.vcek, "ask": self.ask,
                 "ark": self.ark}
        return {option: path for option, path in named.items() if path is not None}

    def files(self) -> set[str]:
        return {self.evidence, *self.pieces().values()}

    def args(self) -> list[str | Path]:
        options: list[str | Path] = []
        for option, path in self.pieces().items():
            options += [f"--{option}", EVIDENCE / path]
        return ["attest", "verify", EVIDENCE / self.evidence, "--tee", self.tee, *options,
                "--at", str(self.seconds)]

    def __str__(self) -> str:
        extra = [Path(path).name for path in self.pieces().values()
                 if path not in _USUAL_PIECES]
        return "+".join([Path(self.evidence).name, *extra])


MILAN = {"ask": "snp/amd-milan-ask.der", "ark": "snp/amd-milan-ark.der"}
GENOA = {"ask": "snp/amd-genoa-ask.der", "ark": "snp/amd-genoa-ark.der"}
_USUAL_PIECES = {*MILAN.values(), *GENOA.values()}

NOT_INTEL_ROOT = "root CA CRL is not signed by Intel's SGX Root CA"
OTHER_KIND = "the collateral is for another kind of quote (SGX or TDX)"
NO_TCB_LEVEL = "no matching TCB level found"
SA_960 = ("INTEL-SA-00960", "INTEL-SA-00982", "INTEL-SA-00986")

ROWS = [
    # -- SGX (quote v3) --------------------------------------------------------------------
    Row("dcap/sgx-v3-automata-00606a.quote", "2025-08-16T00:00:00Z",
        Verified("sgx", "SWHardeningNeeded", "a4f45c39dac622cb", advisories=("INTEL-SA-00615",),
                 claims={"mrsigner": "8f2dbc0f9c5d3378"}),
        collateral="dcap/sgx-00606a-2025-08-15.collateral.json"),
    Row("dcap/sgx-v3-phala-00a06711.quote", "2023-11-22T00:00:00Z",
        Verified("sgx", "ConfigurationAndSWHardeningNeeded", "33d8736db756ed49",
                 advisories=("INTEL-SA-00289", "INTEL-SA-00615"),
                 claims={"mrsigner": "815f42f11cf64430"}),
        collateral="dcap/sgx-00a067110000-2023-11-21.collateral.json"),
    # A debug enclave: dcap-qvl refuses it whatever the session tolerates.
    Row("dcap/sgx-v3-trustee-occlum-debug-00606a.quote", "2025-08-16T00:00:00Z",
        Refused(DEBUG_REFUSED), collateral="dcap/sgx-00606a-2025-08-15.collateral.json"),
    # Intel's sample quote chains to Intel's test root, not the production root dcap-qvl pins.
    Row("dcap/sgx-v3-intel-sample-certtype1.quote", "2020-01-01T00:00:00Z",
        Refused(NOT_INTEL_ROOT), collateral="dcap/intel-sample-sgx-testroot.collateral.json"),
    # No collateral here for these platforms: the nearest one must not pass for theirs.
    Row("dcap/sgx-v3-teekit-occlum-30606a.quote", "2025-08-16T00:00:00Z",
        Refused("its TCB info is for FMSPC 00606A000000, the quote's PCK certificate is for "
                "FMSPC 30606A000000"),
        collateral="dcap/sgx-00606a-2025-08-15.collateral.json"),
    Row("dcap/sgx-v3-teekit-chinenyeokafor-90c06f.quote", "2025-09-30T00:00:00Z",
        Refused(OTHER_KIND + ": Unsupported QE Identity"),
        collateral="dcap/tdx-90c06f-2025-09-29.collateral.json"),
    Row("dcap/sgx-v3-teekit-tlsn-quote9-00906ed5.quote", "2025-08-16T00:00:00Z",
        Refused("the revocation status of the quote's PCK certificate chain is unknown"),
        collateral="dcap/sgx-00606a-2025-08-15.collateral.json"),
    # -- TDX 1.0 (quote v4) ----------------------------------------------------------------
    Row("dcap/tdx-v4-automata-00806f05.quote", "2025-07-08T00:00:00Z",
        Verified("tdx", "OutOfDate", "935be7742dd89c6a", advisories=SA_960),
        collateral="dcap/tdx-00806f050000-2025-07-07.collateral.json"),
    # The same quote with a TCB info whose signed text was changed.
    Row("dcap/tdx-v4-automata-00806f05.quote", "2025-07-08T00:00:00Z",
        Refused("Signature is invalid for tcb_info"),
        collateral="dcap/tdx-00806f050000-2025-07-07.tcbinfo-edited.collateral.json"),
    Row("dcap/tdx-v4-go-tdx-guest-cos113-00806f05.quote", "2025-09-30T00:00:00Z",
        Verified("tdx", "UpToDate", "dae67181d3d65e07", claims={"rtmr0": "3fa2f61f395b7f5f"}),
        collateral="dcap/tdx-00806f050000-2025-09-29.collateral.json"),
    # The same quote as a tdapp evidence document carrying its collateral.
    Row("dcap/tdx-v4-go-tdx-guest-cos113-00806f05.evidence.json", "2025-07-08T00:00:00Z",
        Verified("tdx", "UpToDate", "dae67181d3d65e07", claims={"rtmr0": "3fa2f61f395b7f5f"})),
    Row("dcap/tdx-v4-teekit-edgeless-00806f05.quote", "2025-10-20T00:00:00Z",
        Verified("tdx", "OutOfDate", "b65ea009e424e6f7",
                 advisories=("INTEL-SA-00837", *SA_960)),
        collateral="dcap/tdx-00806f050000-2025-10-19.collateral.json"),
    Row("dcap/tdx-v4-teekit-gcp-00806f05.quote", "2025-07-08T00:00:00Z",
        Verified("tdx", "UpToDate", "409c0cd3e63d9ea5"),
        collateral="dcap/tdx-00806f050000-2025-07-07.collateral.json"),
    # dcap-qvl refuses a TD whose attributes let the host inject #VE on EPT violations.
    Row("dcap/tdx-v4-trustee-azure-00806f05.quote", "2025-10-20T00:00:00Z",
        Refused("SEPT_VE_DISABLE is not enabled"),
        collateral="dcap/tdx-00806f050000-2025-10-19.collateral.json"),
    Row("dcap/tdx-v4-trustee-q6-00a06d08.quote", "2025-10-29T00:00:00Z",
        Verified("tdx", "OutOfDate", "21e8dead92d6c69d"),
        collateral="dcap/tdx-00a06d080000-2025-10-28.collateral.json"),
    Row("dcap/tdx-v4-phala-near-20a06f.quote", "2025-09-03T00:00:00Z",
        Verified("tdx", "UpToDate", "f06dfda6dce1cf90"),
        collateral="dcap/tdx-20a06f-2025-09-02.collateral.json"),
    # Phala's published collateral for these holds SGX's TCB info and QE identity.
    Row("dcap/tdx-v4-phala-2024-b0c06f.quote", "2024-09-03T00:00:00Z",
        Refused(OTHER_KIND + ": Unsupported QE Identity"),
        collateral="dcap/tdx-b0c06f-2024-09-02-sgx-qe-identity.collateral.json"),
    Row("dcap/tdx-v4-phala-tdx-quote-hex-b0c06f.quote", "2024-09-03T00:00:00Z",
        Refused(OTHER_KIND + ": Unsupported QE Identity"),
        collateral="dcap/tdx-b0c06f-2024-09-02-sgx-qe-identity.collateral.json"),
    # TCBs older than every level their TCB info lists.
    Row("dcap/tdx-v4-go-tdx-guest-spr-e4-50806f.quote", "2023-06-19T00:00:00Z",
        Refused(NO_TCB_LEVEL), collateral="dcap/tdx-50806f-2023-06-18.collateral.json"),
    Row("dcap/tdx-v4-teekit-moemahhouk-90c06f.quote", "2025-09-30T00:00:00Z",
        Refused(NO_TCB_LEVEL), collateral="dcap/tdx-90c06f-2025-09-29.collateral.json"),
    Row("dcap/tdx-v4-trustee-q4-debug-50806f.quote", "2023-06-19T00:00:00Z",
        Refused(DEBUG_REFUSED), collateral="dcap/tdx-50806f-2023-06-18.collateral.json"),
    Row("dcap/tdx-v4-intel-sample.quote", "2022-01-01T00:00:00Z",
        Refused(NOT_INTEL_ROOT), collateral="dcap/intel-sample-tdx-testroot.collateral.json"),
    # -- TDX 1.5 (quote v5: the body under TD15/base, with MRSERVICETD and TEE_TCB_SVN2) -----
    Row("dcap/tdx-v5-go-tdx-guest-90c06f.quote", "2026-02-19T00:00:00Z",
        Verified("tdx", "UpToDate", "7348651a34b2d2d3",
                 claims={"rtmr0": "5c8daf76063a71ac", "mrservicetd": "0" * 96,
                         "teetcbsvn2": "0d010400000000000000000000000000"}),
        collateral="dcap/tdx-90c06f-2026-02-18.collateral.json"),
    # The same quote with collateral older than its PCK certificate.
    Row("dcap/tdx-v5-go-tdx-guest-90c06f.quote", "2025-09-30T00:00:00Z",
        Refused("a certificate is not yet valid at the verification time 2025-09-30T00:00:00Z "
                "(valid from 2026-01-27"),
        collateral="dcap/tdx-90c06f-2025-09-29.collateral.json"),
    Row("dcap/tdx-v5-automata-alibaba-90c06f.quote", "2026-02-19T00:00:00Z",
        Refused("Invalid MR service TD"), collateral="dcap/tdx-90c06f-2026-02-18.collateral.json"),
    Row("dcap/tdx-v5-trustee-q5-90c06f.quote", "2026-02-19T00:00:00Z",
        Refused(NO_TCB_LEVEL), collateral="dcap/tdx-90c06f-2026-02-18.collateral.json"),
    # -- SEV-SNP ---------------------------------------------------------------------------
    Row("snp/genoa-azure-hcl.report", "2025-08-16T00:00:00Z",
        Verified("snp", "UpToDate", "f57dc09a507c6ecd",
                 claims={"reported_tcb": "541700000000000a"}),
        vcek="snp/genoa-azure.vcek.der", **GENOA),
    Row("snp/milan-azure-hcl.report", "2024-01-01T00:00:00Z",
        Verified("snp", "UpToDate", "9ac48fcac8a2d88a"), vcek="snp/milan-azure.vcek.der",
        **MILAN),
    Row("snp/milan-gcp-v5.report", "2026-01-01T00:00:00Z",
        Verified("snp", "UpToDate", "b747d55452e0b9e9",
                 claims={"reported_tcb": "de1b000000000004"}),
        vcek="snp/milan-gcp-v5.vcek.der", **MILAN),
    Row("snp/milan-gcp-v5.evidence.json", "2026-01-01T00:00:00Z",
        Verified("snp", "UpToDate", "b747d55452e0b9e9")),
    Row("snp/milan-gcp-v5-x25519.report", "2026-01-01T00:00:00Z",
        Verified("snp", "UpToDate", "b747d55452e0b9e9"),
        vcek="snp/milan-gcp-v5-x25519.vcek.der", **MILAN),
    Row("snp/milan-go-sev-guest-debug.report", "2025-08-16T00:00:00Z",
        Verified("snp", "UpToDate", "b07af9620f3b839b", debug=True,
                 claims={"reported_tcb": "4405000000000002"}),
        vcek="snp/milan-go-sev-guest.vcek.der", **MILAN),
    Row("snp/milan-trustee.report", "2024-01-01T00:00:00Z",
        Verified("snp", "UpToDate", "a1f3930413247bb3"), vcek="snp/milan-trustee.vcek.der",
        **MILAN),
    # VCEKs whose signatures were broken on purpose.
    Row("snp/milan-trustee.report", "2024-01-01T00:00:00Z",
        Refused("VCEK certificate signature does not verify with the ASK key"),
        vcek="snp/milan-trustee-invalid-legacy.vcek.der", **MILAN),
    Row("snp/milan-trustee.report", "2024-01-01T00:00:00Z",
        Refused("VCEK certificate signature does not verify with the ASK key"),
        vcek="snp/milan-trustee-invalid-new.vcek.der", **MILAN),
    # Turin's ASK in a Milan chain: issued by another root.
    Row("snp/milan-trustee.report", "2024-01-01T00:00:00Z",
        Refused("ASK certificate is not issued by the ARK"), vcek="snp/milan-trustee.vcek.der",
        ask="snp/amd-turin-ask.der", ark=MILAN["ark"]),
    # Signed by a VLEK (ARK → ASVK → VLEK): no ASVK is here to check it.
    Row("snp/milan-trustee-vlek.report", "2025-06-01T00:00:00Z",
        Refused("signed by key kind 1, a VLEK: only VCEK-signed reports are supported"),
        vcek="snp/milan-trustee.vlek.der", **MILAN),
    Row("snp/milan-virtee.report", "2024-01-01T00:00:00Z",
        Verified("snp", "UpToDate", "7a1e5c266c0108db"), vcek="snp/milan-virtee.vcek.der",
        **MILAN),
]


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_each_file_verifies_or_is_refused_with_its_reason(cli: Cli, row: Row) -> None:
    """Attack: evidence from other platforms, debug enclaves, test roots, mismatched or
    edited collateral, foreign VCEKs and ASKs. Effect that must not happen: a crash
    (internal error, traceback), an exit 0 for anything the table refuses, or claims
    other than the evidence's own."""
    plain = cli(*row.args())
    document = json.loads(cli(*row.args(), "--json").out)
    if isinstance(row.expect, Refused):
        assert_error(plain, ExitCode.REFUSED, row.expect.reason)
        assert plain.out == ""
        assert document["verified"] is False and document["kind"] == "refused"
        assert row.expect.reason in document["reason"]
        return
    expect = row.expect
    assert plain.code == 0, plain.err
    assert plain.err == "" and f"status:           {expect.status}" in plain.out
    assert document["verified"] is True
    assert (document["tee"], document["status"], document["debug"]) == (
        expect.tee, expect.status, expect.debug)
    assert tuple(document["advisories"]) == expect.advisories
    assert document["measurement"].startswith(expect.measurement)
    named = {"sgx": "mrenclave", "tdx": "mrtd", "snp": "measurement"}[expect.tee]
    assert document["claims"][named] == document["measurement"]
    for name, prefix in expect.claims.items():
        assert document["claims"][name].startswith(prefix), name


def test_every_file_in_the_folder_is_in_the_table() -> None:
    """Attack: a file added to the folder without a row (skipped silently). Effect that
    must not happen: any quote, report, evidence document, collateral or certificate
    that no row uses."""
    on_disk = {path.relative_to(EVIDENCE).as_posix() for path in EVIDENCE.rglob("*")
               if path.is_file()}
    evidence = {name for name in on_disk
                if name.endswith((".quote", ".report", ".evidence.json"))}
    assert evidence == {row.evidence for row in ROWS}
    assert on_disk == {name for row in ROWS for name in row.files()}


# -- the times: inside every piece's own validity ---------------------------------------


def _instant(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _collateral_windows(collateral: Mapping[str, Any]) -> Iterator[tuple[str, float, float]]:
    for name in ("tcb_info", "qe_identity"):
        signed = json.loads(collateral[name])
        yield name, _instant(signed["issueDate"]), _instant(signed["nextUpdate"])
    for name in ("root_ca_crl", "pck_crl"):
        crl = x509.load_der_x509_crl(bytes.fromhex(collateral[name]))
        assert crl.next_update_utc is not None
        yield name, crl.last_update_utc.timestamp(), crl.next_update_utc.timestamp()
    for name in ("pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain"):
        for cert in x509.load_pem_x509_certificates(collateral[name].encode()):
            yield (f"{name} {cert.subject.rfc4514_string()[:40]}",
                   cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp())


def _certificate_windows(ders: Mapping[str, bytes]) -> Iterator[tuple[str, float, float]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # VCEK serial number 0
        for name, der in ders.items():
            cert = x509.load_der_x509_certificate(der)
            yield name, cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def _windows(row: Row) -> list[tuple[str, float, float]]:
    document: dict[str, Any] = {}
    if row.evidence.endswith(".json"):
        document = json.loads((EVIDENCE / row.evidence).read_text())
    if row.tee == "snp":
        ders: dict[str, bytes] = {name: base64.b64decode(document[name])
                                  for name in ("vcek", "ask", "ark") if name in document}
        ders.update({name: (EVIDENCE / path).read_bytes()
                     for name, path in row.pieces().items()})
        assert set(ders) == {"vcek", "ask", "ark"}
        return list(_certificate_windows(ders))
    collateral = (json.loads((EVIDENCE / row.collateral).read_text())
                  if row.collateral is not None else document["collateral"])
    return list(_collateral_windows(collateral))


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_each_time_is_inside_every_pieces_validity(row: Row) -> None:
    """Attack: a row refused only because its time is outside its collateral's or chain's
    validity (an expiry passing for another reason). Effect that must not happen: a
    row's time before a piece's start or after its end."""
    for name, start, end in _windows(row):
        assert start <= row.seconds <= end, (name, row.at)


# -- the AMD roots ------------------------------------------------------------------------


def test_the_built_in_pins_are_the_milan_and_genoa_arks_here_and_turin_has_none() -> None:
    """Attack: a pin that is not AMD's root (or a Turin pin taken on trust). Effect that
    must not happen: a built-in fingerprint other than the SHA-256 of an ARK file here,
    or a Turin pin while no Turin ARK is here to check its ASK against."""
    snp = EVIDENCE / "snp"
    assert hashlib.sha256((snp / "amd-milan-ark.der").read_bytes()).hexdigest() == \
        MILAN_ARK_SHA256
    assert hashlib.sha256((snp / "amd-genoa-ark.der").read_bytes()).hexdigest() == \
        GENOA_ARK_SHA256
    assert AMD_ARK_SHA256S == (MILAN_ARK_SHA256, GENOA_ARK_SHA256)
    turin_ask = x509.load_der_x509_certificate((snp / "amd-turin-ask.der").read_bytes())
    roots = {path.name: x509.load_der_x509_certificate(path.read_bytes())
             for path in snp.glob("amd-*-ark.der")}
    assert all(root.subject != turin_ask.issuer for root in roots.values())


def test_an_added_pin_adds_to_amds_and_never_replaces_them(cli: Cli) -> None:
    """Attack: --pin-ark used to narrow or swap the trusted roots. Effect that must not
    happen: Genoa refused once another root is pinned, or an unpinned ARK accepted."""
    genoa = next(row for row in ROWS if row.evidence == "snp/genoa-azure-hcl.report")
    other = hashlib.sha256((EVIDENCE / MILAN["ask"]).read_bytes()).hexdigest()
    assert cli(*genoa.args(), "--pin-ark", other).code == 0
    # The Milan ASK as a root: pinned, it is still not a self-signed ARK.
    assert genoa.vcek is not None and genoa.ask is not None
    swapped = ["attest", "verify", EVIDENCE / genoa.evidence, "--tee", "snp",
               "--vcek", EVIDENCE / genoa.vcek, "--ask", EVIDENCE / genoa.ask,
               "--ark", EVIDENCE / MILAN["ask"], "--at", str(genoa.seconds)]
    assert_error(cli(*swapped), ExitCode.REFUSED, "is not a pinned AMD root")
    assert_error(cli(*swapped, "--pin-ark", other.upper()), ExitCode.REFUSED,
                 "ARK certificate is not self-signed")


# -- the CAS says the same ------------------------------------------------------------------

CAS_AT = "2025-08-16T00:00:00Z"  # inside the SGX debug quote's collateral and the SNP chains


@pytest.fixture(scope="module")
def cas(cas_server: StartCas) -> CasServer:
    return cas_server(extra=("--verify-at", str(int(_instant(CAS_AT)))))


def _attest(server: CasServer, user: MakeUser, evidence: Mapping[str, Any],
            mrenclave: str) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    alice = user(unique_name("conformance"))
    alice.attest(server)
    document = SessionDoc(unique_name("conf")).as_dict()
    document["services"][0]["mrenclaves"] = [mrenclave]
    document["security"] = {"attestation": {"mode": "hardware", "tolerate": ["debug-mode"]}}
    with alice.http(server) as http:
        created = http.post("/v1/sessions", content=json.dumps(document).encode())
        assert created.status_code == 201, created.text
    session = str(document["name"])
    with anonymous_http(server) as http:
        nonce = http.post("/v1/attestation/nonce",
                          json={"session": session, "service": "application"}).json()["nonce"]
        answer = http.post("/v1/attestation", json={
            "session": session, "service": "application", "nonce": nonce,
            "public_key": EphemeralKey().public_b64url, "workload": mrenclave,
            "evidence": evidence})
    assert answer.status_code == 403, answer.text
    with alice.http(server) as http:
        events = http.get(f"/v1/audit?session={session}").json()["events"]
    return answer.json(), [(event["event"], event["outcome"], event["reason"])
                           for event in events if event["event"].startswith("attest")]


def test_the_cas_refuses_a_debug_quote_saying_why_even_when_debug_is_tolerated(
        cas: CasServer, user: MakeUser) -> None:
    """Attack: a debug SGX enclave's genuine quote sent to a session that tolerates
    debug-mode. Effect that must not happen: a release, or a refusal that does not say
    the toleration cannot apply to SGX and TDX quotes."""
    row = next(row for row in ROWS if "occlum-debug" in row.evidence)
    assert row.collateral is not None and row.at == CAS_AT
    quote = (EVIDENCE / row.evidence).read_bytes()
    mrenclave = dcap_qvl.parse_quote(quote).report.mr_enclave.hex()
    evidence = {"tee": "sgx", "quote": base64.b64encode(quote).decode(),
                "collateral": json.loads((EVIDENCE / row.collateral).read_text())}
    answer, steps = _attest(cas, user, evidence, mrenclave)
    assert answer["kind"] == "refused" and answer["reason"] == DEBUG_REFUSED
    assert steps == [("attest", "refused", DEBUG_REFUSED)]


def test_the_cas_verifies_a_genoa_report_through_the_built_in_pins(
        cas: CasServer, user: MakeUser) -> None:
    """Attack: none; a genuine Genoa report with its chain. Effect that must not happen:
    its refusal as an unpinned root (the Genoa ARK is built in, as Milan's is)."""
    row = next(row for row in ROWS if row.evidence == "snp/genoa-azure-hcl.report")
    assert row.at == CAS_AT
    evidence = {"tee": "snp", "report": base64.b64encode((EVIDENCE / row.evidence).read_bytes())
                .decode(), **{name: base64.b64encode((EVIDENCE / path).read_bytes()).decode()
                              for name, path in row.pieces().items()}}
    _, steps = _attest(cas, user, evidence, "ab" * 32)
    # Its report_data binds no nonce of this CAS: a later check refuses it, never the root.
    assert steps[0][:2] == ("attest.evidence", "accepted"), steps
    assert "snp evidence verified; measurement f57dc09a507c6ecd" in steps[0][2]
