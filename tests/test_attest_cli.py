"""``tdapp attest verify`` on the recorded evidence, and the SNP sample under session policy."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliResult, assert_error

from tdapp.attest import DebugTolerated
from tdapp.attest.snp import verify_report
from tdapp.errors import ExitCode

DATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
DCAP, SNP = DATA / "dcap", DATA / "snp"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/testdata is missing")
Cli = Callable[..., CliResult]


def dcap(name: str, *extra: str) -> list[str | Path]:
    return ["attest", "verify", DCAP / name, "--tee", "tdx" if "tdx" in name else "sgx",
            "--collateral", DCAP / f"{name}_collateral.json", *extra]


def snp(*extra: str | Path) -> list[str | Path]:
    return ["attest", "verify", SNP / "attestation.bin", "--tee", "snp",
            "--vcek", SNP / "kds_vcek.der", "--ask", SNP / "milan_ask.der",
            "--ark", SNP / "milan_ark.der", "--at", "1790000000", *extra]


def test_sgx_sample_at_its_time(cli: Cli) -> None:
    result = cli(*dcap("sgx_quote", "--at", "1750334171"))
    assert result.code == 0, result.err
    assert "status:           ConfigurationAndSWHardeningNeeded" in result.out
    assert "advisories:       INTEL-SA-00289, INTEL-SA-00615" in result.out
    document = json.loads(cli(*dcap("sgx_quote", "--at", "1750334171", "--json")).out)
    assert document["verified"] is True and document["tee"] == "sgx"
    assert document["claims"]["mrenclave"] == document["measurement"] == (
        "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")


def test_tdx_sample_up_to_date_and_outdated_refused(cli: Cli) -> None:
    document = json.loads(cli(*dcap("tdx_quote", "--at", "1750331763", "--json")).out)
    assert (document["status"], document["claims"]["mrtd"][:16]) == ("UpToDate",
                                                                     "91eb2b44d141d4ec")
    refused = cli(*dcap("tdx_quote_outdated", "--at", "1772323200"))
    assert refused.code == ExitCode.REFUSED and refused.out == ""
    assert refused.err.startswith("tdapp: error: no matching TCB level found")


def test_today_the_collateral_is_expired_not_a_crash(cli: Cli) -> None:
    result = cli(*dcap("sgx_quote", "--json"))
    assert result.code == ExitCode.REFUSED
    document = json.loads(result.out)
    assert document["verified"] is False and document["kind"] == "refused"
    assert document["reason"].startswith("the collateral has expired: a CRL was valid until")
    assert result.err.count("\n") == 1 and "Traceback" not in result.err


def test_snp_sample_through_the_pinned_ark(cli: Cli) -> None:
    document = json.loads(cli(*snp("--json")).out)
    assert document["verified"] is True and document["debug"] is True
    assert document["claims"]["policy"] & (1 << 19)
    missing = cli("attest", "verify", SNP / "attestation.bin", "--tee", "snp",
                  "--ask", SNP / "milan_ask.der", "--ark", SNP / "milan_ark.der",
                  "--at", "1790000000")
    assert missing.code == ExitCode.REFUSED and "vcek" in missing.err
    wrong_root = cli(*snp("--ark", SNP / "milan_ask.der"))
    assert wrong_root.code == ExitCode.REFUSED and wrong_root.err.startswith("tdapp: error:")


def test_misuse_is_a_usage_error(cli: Cli) -> None:
    result = cli(*dcap("sgx_quote", "--vcek", str(SNP / "kds_vcek.der")))
    assert result.code == ExitCode.USAGE and "--tee snp" in result.err


def test_snp_sample_needs_the_debug_toleration() -> None:
    claims = verify_report((SNP / "attestation.bin").read_bytes(),
                           vcek=(SNP / "kds_vcek.der").read_bytes(),
                           ask=(SNP / "milan_ask.der").read_bytes(),
                           ark=(SNP / "milan_ark.der").read_bytes(), at=1_790_000_000)
    refused = DebugTolerated(False).verify(claims)
    assert not refused.ok and refused.reason == "debug-mode evidence needs tolerate: [debug-mode]"
    assert DebugTolerated(True).verify(claims).ok


def test_a_quote_without_collateral_is_a_usage_error(cli: Cli) -> None:
    result = cli("attest", "verify", DCAP / "sgx_quote", "--tee", "sgx")
    assert result.code == ExitCode.USAGE and "--collateral" in result.err


@pytest.mark.parametrize("pin", ["abc", "zz" * 32, "69d063b4" * 9])
def test_a_malformed_pin_is_a_usage_error(cli: Cli, pin: str) -> None:
    """Attack: a --pin-ark that is not a SHA-256 fingerprint. Effect that must not
    happen: a traceback, or verification going on with the pin ignored."""
    assert_error(cli(*snp("--pin-ark", pin)), ExitCode.USAGE, "is not a SHA-256 fingerprint")


def test_pin_ark_is_for_snp_only(cli: Cli) -> None:
    """Attack: --pin-ark given with a DCAP quote. Effect that must not happen: the option
    silently ignored."""
    assert_error(cli(*dcap("sgx_quote", "--pin-ark", "00" * 32)), ExitCode.USAGE, "--tee snp")


def test_a_given_ark_must_still_match_a_pin(cli: Cli) -> None:
    """Attack: a self-made root passed with --ark. Effect that must not happen: trust in
    it without a pin; with the pin added, its chain is still checked (the ASK is not a
    self-signed root)."""
    ask = SNP / "milan_ask.der"
    own_root = [ask if arg == SNP / "milan_ark.der" else arg for arg in snp()]
    assert_error(cli(*own_root), ExitCode.REFUSED, "is not a pinned AMD root")
    pin = hashlib.sha256(ask.read_bytes()).hexdigest()
    assert_error(cli(*own_root, "--pin-ark", pin), ExitCode.REFUSED,
                 "ARK certificate is not self-signed")
