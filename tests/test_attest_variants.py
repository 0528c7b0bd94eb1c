"""The session language's attestation variants judged against real TDX claims.

A service may name, per variant, SGX ``mrenclave`` and ``signer``, TDX ``tdx``
(mrtd, rtmr0-3, mrconfigid) and SNP ``snp`` (measurement, host_data, policy)
factors; the CAS accepts claims that satisfy every factor of one variant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tdapp.attest import Claims
from tdapp.attest.dcap import verify_quote
from tdapp.cas.judging import _variants
from tdapp.policy import SessionError, parse_session

WORKLOAD = "c0" * 32  # the tdapp image a confidential VM's runtime says it runs
DCAP = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "dcap"
pytestmark = pytest.mark.skipif(not DCAP.is_dir(), reason="../shared/testdata/dcap is missing")


@pytest.fixture(scope="module")
def tdx() -> Claims:
    return verify_quote((DCAP / "tdx_quote").read_bytes(),
                        (DCAP / "tdx_quote_collateral.json").read_text(), at=1750331763)


@pytest.fixture(scope="module")
def sgx() -> Claims:
    return verify_quote((DCAP / "sgx_quote").read_bytes(),
                        (DCAP / "sgx_quote_collateral.json").read_text(), at=1750334171)


def service(attestation: Any) -> Any:
    session = parse_session(json.dumps({"name": "s", "version": "0.3", "services": [
        {"name": "app", "command": "/app", "attestation": attestation}]}), source="test")
    return session.service("app")


def test_tdx_factors(tdx: Claims) -> None:
    values = tdx.values
    exact = {"tdx": {"mrtd": values["mrtd"], "rtmr0": values["rtmr0"],
                     "rtmr1": str(values["rtmr1"]).upper(), "mrconfigid": "0" * 96},
             "mrenclave": [WORKLOAD]}
    assert _variants(service(exact), WORKLOAD).verify(tdx).ok
    wrong = {"tdx": {"mrtd": values["mrtd"], "rtmr2": "ab" * 48}, "mrenclave": [WORKLOAD]}
    verdict = _variants(service(wrong), WORKLOAD).verify(tdx)
    assert not verdict.ok and verdict.reason.startswith("tdx rtmr2 d833feef")
    assert "is not the session's (expected abab" in verdict.reason


def test_a_variant_of_another_tee_does_not_match(tdx: Claims, sgx: Claims) -> None:
    sgx_only = service({"mrenclave": [sgx.measurement]})
    verdict = _variants(sgx_only, WORKLOAD).verify(tdx)
    assert not verdict.ok and "is not one of the session's mrenclaves" in verdict.reason
    tdx_only = service({"tdx": {"mrtd": [tdx.measurement]}, "mrenclave": [WORKLOAD]})
    verdict = _variants(tdx_only, WORKLOAD).verify(sgx)
    assert not verdict.ok and verdict.reason == "sgx evidence does not match a tdx attestation " \
        "variant"
    either = service([{"mrenclave": [sgx.measurement]},
                      {"tdx": {"mrtd": [tdx.measurement]}, "mrenclave": [WORKLOAD]}])
    assert _variants(either, WORKLOAD).verify(tdx).ok
    assert _variants(either, WORKLOAD).verify(sgx).ok


def test_sgx_signer_factor(sgx: Claims) -> None:
    signer = str(sgx.values["mrsigner"])
    assert _variants(service({"signer": {"mrsigner": signer, "isvprodid": 0,
                                         "isvsvn_min": 0}}), WORKLOAD).verify(sgx).ok
    verdict = _variants(service({"signer": {"mrsigner": signer, "isvprodid": 0,
                                            "isvsvn_min": 1}}), WORKLOAD).verify(sgx)
    assert not verdict.ok and verdict.reason == "isvsvn 0 is below the session's minimum 1"
    verdict = _variants(service({"signer": {"mrsigner": "00" * 32, "isvprodid": 0}}),
                        WORKLOAD).verify(sgx)
    assert not verdict.ok and verdict.reason.startswith("mrsigner 815f42f1")


@pytest.mark.parametrize(("attestation", "fragment"), [
    ({"tdx": {"rtmr0": "00" * 48}}, "a tdx factor needs mrtd"),
    ({"tdx": {"mrtd": ["00" * 32]}}, r"tdx.mrtd\[0\]: expected a 48-byte measurement register"),
    ({"snp": {"host_data": "00" * 32}}, "an snp factor needs measurement"),
    ({"snp": {"measurement": ["00" * 48], "policy": -1}}, "expected an integer"),
    ({}, "an attestation variant needs mrenclave, signer, tdx or snp"),
])
def test_malformed_factors_name_the_key(attestation: Any, fragment: str) -> None:
    with pytest.raises(SessionError, match=fragment):
        service(attestation)
