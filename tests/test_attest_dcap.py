"""SGX and TDX DCAP quotes recorded on real machines, verified with dcap-qvl at their times.

The samples and their collateral are in ../shared/testdata/dcap (its README gives
the time at which each verifies). At today's date their CRLs have expired, which
must read as exactly that.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tdapp.attest import EvidenceError, verifier_for
from tdapp.attest.dcap import DcapVerifier, _claims, collateral_from_file, verify_quote

DCAP = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "dcap"
SGX_AT, TDX_AT, OUTDATED_AT = 1750334171, 1750331763, 1772323200
SGX_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
TDX_MRTD = ("91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
            "de03ae6dc5f87f27428b2538873118b7")
pytestmark = pytest.mark.skipif(not DCAP.is_dir(), reason="../shared/testdata/dcap is missing")


def sample(name: str) -> tuple[bytes, str]:
    return (DCAP / name).read_bytes(), (DCAP / f"{name}_collateral.json").read_text()


def test_the_sgx_sample_verifies_at_its_time() -> None:
    claims = verify_quote(*sample("sgx_quote"), at=SGX_AT)
    assert claims.tee == "sgx"
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert claims.advisories == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert claims.measurement == SGX_MRENCLAVE == claims.values["mrenclave"]
    assert claims.values["mrsigner"] == (
        "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6")
    assert claims.values["isvprodid"] == 0 and claims.values["isvsvn"] == 0
    assert claims.debug is False
    assert claims.report_data.rstrip(b"\0") == b"Hello, world!"


def test_the_tdx_sample_verifies_up_to_date() -> None:
    claims = verify_quote(*sample("tdx_quote"), at=TDX_AT)
    assert (claims.tee, claims.tcb_status, claims.advisories) == ("tdx", "UpToDate", ())
    assert claims.measurement == TDX_MRTD == claims.values["mrtd"]
    assert {"rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid"} <= set(claims.values)
    assert claims.values["mrconfigid"] == "0" * 96
    assert claims.debug is False


def test_the_outdated_tdx_sample_is_refused_with_the_reason() -> None:
    with pytest.raises(EvidenceError, match=r"^no matching TCB level found: the platform's TCB "
                                            r"is older than every level"):
        verify_quote(*sample("tdx_quote_outdated"), at=OUTDATED_AT)


@pytest.mark.parametrize("name", ["sgx_quote", "tdx_quote"])
def test_at_todays_date_the_collateral_is_reported_expired(name: str) -> None:
    with pytest.raises(EvidenceError) as refusal:
        verify_quote(*sample(name), at=time.time())
    assert re.match(r"the collateral has expired: a CRL was valid until 20\d\d-\d\d-\d\dT"
                    r"\d\d:\d\d:\d\dZ, verification time 20", refusal.value.message), \
        refusal.value.message


# Header (48 bytes) and report body: what the attestation key signs.
SIGNED = {"sgx_quote": 48 + 384, "tdx_quote": 48 + 584}


@pytest.mark.parametrize("name", ["sgx_quote", "tdx_quote"])
def test_flipping_any_byte_of_the_signed_body_fails(name: str) -> None:
    quote, collateral = sample(name)
    at = SGX_AT if name == "sgx_quote" else TDX_AT
    verify_quote(quote, collateral, at=at)
    survivors = []
    for offset in range(SIGNED[name]):
        flipped = bytearray(quote)
        flipped[offset] ^= 0x01
        try:
            verify_quote(bytes(flipped), collateral, at=at)
        except EvidenceError:
            continue
        survivors.append(offset)
    assert survivors == []


@pytest.mark.parametrize("name", ["sgx_quote", "tdx_quote"])
def test_flipping_the_signature_or_the_pck_chain_fails(name: str) -> None:
    quote, collateral = sample(name)
    at = SGX_AT if name == "sgx_quote" else TDX_AT
    begins = [match.start() for match in re.finditer(rb"-----BEGIN CERTIFICATE-----", quote)]
    assert len(begins) >= 2
    # Inside the base64 of the PCK certificate and of the intermediate CA (the root
    # in the quote is not used: Intel's root is pinned by dcap-qvl).
    offsets = [SIGNED[name] + 4, SIGNED[name] + 40, begins[0] + 100, begins[0] + 400,
               begins[1] + 100, begins[1] + 300]
    for offset in offsets:
        flipped = bytearray(quote)
        flipped[offset] ^= 0x01
        with pytest.raises(EvidenceError):
            verify_quote(bytes(flipped), collateral, at=at)


@pytest.mark.parametrize("change", ["tcb_info", "tcb_info_signature", "qe_identity",
                                    "qe_identity_signature"])
def test_changed_collateral_fails(change: str) -> None:
    quote, collateral = sample("sgx_quote")
    document = json.loads(collateral)
    if change.endswith("signature"):
        value = document[change]
        document[change] = ("0" if value[0] != "0" else "1") + value[1:]
    else:
        document[change] = document[change].replace('"version":', '"version": ', 1) \
            if '"version":' in document[change] else document[change] + " "
        inner = json.loads(document[change])
        inner["issueDate"] = "2025-06-19T10:56:12Z"
        document[change] = json.dumps(inner, separators=(",", ":"))
    with pytest.raises(EvidenceError):
        verify_quote(quote, json.dumps(document), at=SGX_AT)


def test_the_evidence_interface_carries_or_configures_the_collateral() -> None:
    quote, collateral = sample("sgx_quote")
    evidence = {"tee": "sgx", "quote": base64.b64encode(quote).decode()}
    configured = DcapVerifier("sgx", collateral=collateral_from_file(
        DCAP / "sgx_quote_collateral.json"))
    assert configured.verify(evidence, at=SGX_AT).measurement == SGX_MRENCLAVE
    carried = {**evidence, "collateral": json.loads(collateral)}
    assert verifier_for(carried).verify(carried, at=SGX_AT).tcb_status == \
        "ConfigurationAndSWHardeningNeeded"
    with pytest.raises(EvidenceError, match="no collateral for this sgx quote"):
        DcapVerifier("sgx").verify(evidence, at=SGX_AT)
    with pytest.raises(EvidenceError, match="the quote is a sgx quote, not tdx"):
        DcapVerifier("tdx").verify({**carried, "tee": "tdx"}, at=SGX_AT)


@pytest.mark.parametrize(("evidence", "fragment"), [
    ({"tee": "sgx", "quote": "not base64!"}, "is not valid base64"),
    ({"tee": "sgx", "quote": 3}, "must be a base64 string"),
    ({"tee": "sgx", "quote": "AAAA", "extra": 1}, "unexpected fields extra"),
    ({"tee": "sgx", "quote": "AAAA", "collateral": []}, "must be a JSON object"),
    ({"tee": "sgx", "quote": "AAAA", "collateral": {}}, "not valid QuoteCollateralV3"),
    ({"tee": "sgx", "quote": base64.b64encode(b"\0" * 600).decode(),
      "collateral": json.loads((DCAP / "sgx_quote_collateral.json").read_text())
      if DCAP.is_dir() else {}}, "quote verification failed"),
])
def test_malformed_evidence_is_a_typed_refusal(evidence: dict[str, object],
                                                fragment: str) -> None:
    with pytest.raises(EvidenceError, match=re.escape(fragment)):
        DcapVerifier("sgx").verify(evidence, at=SGX_AT)


# What dcap-qvl returns for a verified TDX 1.0 body; TDX 1.5 nests it under "base".
_TD10 = {"mr_td": "11" * 48, "mr_config_id": "00" * 48, "td_attributes": "01" + "00" * 7,
         "report_data": "22" * 64, **{f"rt_mr{i}": f"{i}{i}" * 48 for i in range(4)}}


def test_a_td15_body_is_read_like_a_td10_body_with_its_two_extra_registers() -> None:
    """Attack: a v5 quote's body nested under TD15/base. Effect that must not happen: a
    KeyError (a crash), or TD15's claims differing from the same body as TD10."""
    td15 = {"base": _TD10, "tee_tcb_svn2": "0d" + "00" * 15, "mr_service_td": "33" * 48}
    old = _claims({"status": "UpToDate", "report": {"TD10": _TD10}, "ppid": "ab"}, "tdx")
    new = _claims({"status": "UpToDate", "report": {"TD15": td15}, "ppid": "ab"}, "tdx")
    assert (new.measurement, new.report_data, new.debug) == ("11" * 48, b"\x22" * 64, True)
    assert old == replace(new, values={key: value for key, value in new.values.items()
                                       if key not in ("mrservicetd", "teetcbsvn2")})
    assert new.values["mrservicetd"] == "33" * 48
    assert new.values["teetcbsvn2"] == "0d" + "00" * 15


@pytest.mark.parametrize(("report", "fragment"), [
    ({"TD15": {**_TD10}}, "a TD15 report without its TD10 base"),
    ({"TD15": {"base": {**_TD10, "mr_td": "11"}, "tee_tcb_svn2": "00" * 16,
               "mr_service_td": "00" * 48}}, "mr_td is not 48 bytes of hex"),
    ({"TD15": {"base": _TD10, "tee_tcb_svn2": "00" * 16}}, "mr_service_td is not 48 bytes"),
    ({"TD10": {key: value for key, value in _TD10.items() if key != "report_data"}},
     "report_data is not 64 bytes of hex"),
    ({"TD15Ex": {"base": _TD10}}, "unknown report kind 'TD15Ex'"),
    ({"SgxEnclave": {"mr_enclave": "00" * 32}}, "mr_signer is not 32 bytes"),
    ({"SgxEnclave": {"mr_enclave": "00" * 32, "mr_signer": "00" * 32, "isv_prod_id": "0"}},
     "isv_prod_id is not a 16-bit number"),
])
def test_an_unexpected_report_shape_is_an_evidence_error(report: dict[str, object],
                                                          fragment: str) -> None:
    """Attack: a dcap-qvl result of a shape tdapp does not know (another version of the
    binding, another body type). Effect that must not happen: anything but an
    EvidenceError naming the field (a KeyError or TypeError would crash the CLI)."""
    with pytest.raises(EvidenceError, match=re.escape(fragment)):
        _claims({"status": "UpToDate", "report": report}, None)
