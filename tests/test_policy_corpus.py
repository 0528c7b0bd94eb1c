"""Conformance: the published SCONE sessions in shared/testdata/scone-sessions.

Files 01-28 are valid sessions and must parse, hash stably and round-trip
through ``to_yaml``; file 29 (top-level ``attestation``) and file 30 (an
access-policy placeholder without its closing ``$$``) must be refused with the
line and key path. The seed's 2018 template must work once filled.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from seed_data import SEED_TEMPLATE

from tdapp.policy import (
    Session,
    SessionError,
    fill_template,
    parse_session,
    session_hash,
    template_variables,
)

CORPUS = Path(os.environ.get(
    "TDAPP_SESSION_CORPUS",
    Path(__file__).resolve().parents[2] / "shared" / "testdata" / "scone-sessions"))
FILES = sorted(CORPUS.glob("*.yml"))
VALID = [path for path in FILES if int(path.name[:2]) <= 28]
CREATOR = "4f" * 32

if len(FILES) != 30:
    pytest.skip(f"SCONE session corpus not found at {CORPUS} (set TDAPP_SESSION_CORPUS)",
                allow_module_level=True)


def load(number: int) -> Session:
    (path,) = [path for path in FILES if path.name.startswith(f"{number:02d}-")]
    return parse_session(path.read_text(encoding="utf-8"), source=path.name)


def refusal(number: int) -> SessionError:
    (path,) = [path for path in FILES if path.name.startswith(f"{number:02d}-")]
    with pytest.raises(SessionError) as caught:
        parse_session(path.read_text(encoding="utf-8"), source=path.name)
    return caught.value


@pytest.mark.parametrize("path", VALID, ids=lambda path: path.name[:2])
def test_valid_file_parses_hashes_stably_and_round_trips(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    session = parse_session(text, source=path.name)
    again = parse_session(text, source=path.name)
    assert session == again
    digest = session_hash(session, CREATOR)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert session_hash(again, CREATOR) == digest

    written = session.to_yaml()
    reread = parse_session(written, source="to_yaml")
    assert reread == session
    assert session_hash(reread, CREATOR) == digest
    assert reread.to_yaml() == written  # the normalized form is a fixed point
    # The canonical content is itself a valid input (a CAS may store it as JSON) ...
    assert Session.model_validate(session.to_canonical()) == session
    # ... and other YAML tools read the written form as the same data.
    assert yaml.safe_load(written) == session.to_canonical()


def test_file_29_top_level_attestation_is_refused_with_its_line() -> None:
    error = refusal(29)
    assert error.line == 9
    assert ":9: " in str(error)
    assert "unknown key 'attestation' at the top level" in str(error)
    assert "\n" not in str(error)


def test_file_30_unclosed_access_policy_placeholder_is_refused() -> None:
    error = refusal(30)
    assert error.line == 13
    assert error.path == "access_policy.read[0]"
    assert str(error).startswith("30-SUSPECT-sconedocs-lang03-access-policy-placeholder.yml:13: "
                                 "access_policy.read[0]: ")
    assert "closing $$" in str(error)


def test_versions_normalize_to_strings() -> None:
    assert load(1).version == "0.1"           # absent
    assert load(7).version == "0.2"           # "0.2"
    assert load(4).version == "0.3"           # '0.3'
    assert load(21).version == "0.3"          # unquoted: a YAML float
    assert load(25).version == "0.3"
    assert load(15).version == "0.3.10"       # "0.3.10"
    assert load(19).version == "0.3.10"       # unquoted 0.3.10 (a string)
    # No `version` means 0.1, even for a document written in 0.3 syntax.
    assert load(28).version == "0.1"


def test_predecessor_forms() -> None:
    assert load(5).predecessor is None        # null
    assert load(15).predecessor is None       # ~
    assert load(1).predecessor is None        # absent
    assert load(16).predecessor == (
        "7a343d04b669477255bd9ea05aa78c6850341fc4541609c06eb20f96eabfa8bd")


def test_2018_form_keeps_digest_tags_and_image_mrenclaves() -> None:
    session = load(1)
    assert session.name == "180713033312847980809017601"   # digits: still a name
    assert session.digest == "create"
    service = session.service("application")
    image = session.image("sconecuratedimages/iexecsgx:copy_demo")
    assert service is not None and image is not None
    assert service.tags == ("demo",) and image.tags == ("demo",)
    assert image.mrenclaves == service.mrenclaves
    assert [(mount.name, mount.path) for mount in image.volumes] == [
        ("encrypted-input-files", "/encryptedInputs"),
        ("encrypted-output-files", "/encryptedOutputs")]
    volume = session.volume("encrypted-input-files")
    assert volume is not None and volume.fspf_tag == "a1bf3087fea0d91e1a578ecc299d0fce"
    assert session.volume("nope") is None and session.service("nope") is None
    assert load(6).digest == "eb4810eee9a419d315169f3736a4e180bf3f4a84c0602e960a0dbce7878d5fcc"


def test_environment_values_are_text_or_none() -> None:
    fprint = load(21).service("fprint-arg-env")
    assert fprint is not None and fprint.environment["env2"] == "3"
    netshield = load(26).service("secret-service")
    assert netshield is not None and netshield.environment["SCONE_LOG"] == "7"
    identity = netshield.environment["SCONE_NETWORK_SHIELD_SERVER_1_IDENTITY"]
    assert identity is not None and identity.startswith("$$SCONE::svid:privatekey:pkcs8:pem$$\n")
    app = load(4).service("app")
    assert app is not None and app.environment["IEXEC_APP_PROVIDER_SECRET_0"] == ""
    host = load(15).service("scone-print-arg-env")
    assert host is not None
    assert host.environment["\\@\\@HOSTNAME"] is None
    assert host.environment["\\@\\@SCONE_SERVICE_ACCESS_TOKEN"] == "ignored"
    assert host.host_environment() == ("HOSTNAME", "SCONE_SERVICE_ACCESS_TOKEN", "HOME")
    assert host.argv() == ["./scone-print-arg-env", "start", "@@1", "@@2", "@@3", "end"]


def test_attestation_forms() -> None:
    signer = load(16).service("scone-print-arg-env")
    assert signer is not None
    (variant,) = signer.attestation
    assert variant.mrenclave == (
        "37c8cbdab0673d4586983336f873fe44daa8ab52234367661d209bc21028a55a",)
    assert variant.signer is not None and (variant.signer.isvprodid, variant.signer.isvsvn) == (
        22, 2)
    mapping_form = load(22).service("with_otp")
    assert mapping_form is not None and len(mapping_form.attestation) == 1
    assert mapping_form.one_time_password_shared_secret == "$$SCONE::otp_secret$$"
    assert mapping_form.argv() == ["envcas", "-c", "cat /work/out1"]
    legacy = load(2).service("application")
    assert legacy is not None and legacy.attestation_variants()[0].mrenclave == legacy.mrenclaves


def test_security_section() -> None:
    attestation = load(2).security.attestation
    assert attestation.tolerate == ("debug-mode", "hyperthreading", "outdated-tcb")
    assert attestation.ignore_advisories == ("*",)
    assert load(4).security.attestation.ignore_advisories == ("INTEL-SA-00161", "INTEL-SA-00289")
    assert load(16).security.singleton_enclaves is True
    assert load(16).security.attestation.mode == "hardware"
    maa = load(23).security.attestation
    assert maa.mode == "maa" and maa.url == "https://sharedweu.weu.attest.azure.net"
    assert load(1).security.attestation.mode is None    # not stated: the CAS decides


def test_placeholder_sections_are_kept_and_reported() -> None:
    session = load(17)
    assert session.access_policy.delegate == "$$SCONE::access_policy$$"
    assert session.security.delegate == "$$SCONE::security$$"
    assert session.delegated_sections() == ("access_policy", "security")
    assert session.to_canonical()["security"] == "$$SCONE::security$$"
    # A delegated policy cannot be resolved here, so it grants nothing.
    assert not session.access_policy.allows("read", CREATOR, CREATOR)
    fragment = session.secret("access_policy")
    assert fragment is not None and fragment.value == {
        "read": ["CREATOR"], "update": ["CREATOR"], "create_sessions": ["CREATOR"]}
    assert load(15).delegated_sections() == ("access_policy",)
    assert load(2).delegated_sections() == ()


def test_secrets_sharing_forms() -> None:
    plain_names = load(9).secret("redis_client_cert")
    assert plain_names is not None
    assert [target.session for target in plain_names.export] == ["flask-restapi-27142"]
    single_mapping = load(17).secret("security")
    assert single_mapping is not None
    assert single_mapping.export[0].namespace == "otp-example-12039-2876-30711-9155"
    mixed = load(28).secret("database_access_certificate")
    assert mixed is not None
    assert [(target.session, target.namespace) for target in mixed.export] == [
        ("database_client", None), ("another_client", None), (None, "relying_party")]
    imported = load(14).secret("server-ca")
    assert imported is not None and imported.kind is None and imported.import_ is not None
    assert imported.import_.secret == "ca"
    akv = load(23).secret("MY_AKV_CERT")
    assert akv is not None and akv.import_akv is not None
    assert akv.import_akv.token == "$$SCONE::AAD_TOKEN$$"
    ascii_secret = load(22).secret("otp_secret")
    assert ascii_secret is not None and ascii_secret.value == "JJBFGV2ZGNCFARKIKBFTGUCYKBNFKVQK"


def test_auto_initialised_volumes() -> None:
    session = load(3)
    scone, iexec_in = session.volume("scone"), session.volume("iexec_in")
    assert scone is not None and scone.auto_initialised
    assert iexec_in is not None and not iexec_in.auto_initialised
    assert all(volume.auto_initialised for volume in load(4).volumes)


def test_certificate_access_entries_and_read_back_creator() -> None:
    policy = load(25).access_policy
    (certificate,) = [entry for entry in policy.read if entry != "CREATOR"]
    assert "CREATOR" in policy.read and policy.update == policy.read
    assert certificate.startswith("-----BEGIN CERTIFICATE-----\n")
    creator = load(20).creator
    assert creator is not None and creator.startswith("-----BEGIN CERTIFICATE-----\n")
    assert load(20).service("scone-print-arg-env").persistency == "None"  # type: ignore[union-attr]


# -- the seed's 2018 template ------------------------------------------------------------


SEED_VALUES = {
    "SESSION": "180713033312847980809017601",
    "INPUT_FSPF_KEY": "11" * 32, "INPUT_FSPF_TAG": "22" * 16,
    "OUTPUT_FSPF_KEY": "33" * 32, "OUTPUT_FSPF_TAG": "44" * 16,
}


def test_seed_template_filled_parses() -> None:
    assert template_variables(SEED_TEMPLATE) == set(SEED_VALUES)
    session = parse_session(fill_template(SEED_TEMPLATE, SEED_VALUES), source="copy_dapp.yml")
    assert session.name == SEED_VALUES["SESSION"]
    assert session.version == "0.1" and session.digest == "create"
    output = session.volume("encrypted-output-files")
    assert output is not None
    assert (output.fspf_key, output.fspf_tag) == ("33" * 32, "44" * 16)
    assert session == load(1).model_copy(update={"volumes": session.volumes})


def test_seed_template_unfilled_is_refused_naming_the_variable() -> None:
    with pytest.raises(SessionError) as caught:
        parse_session(SEED_TEMPLATE, source="copy_dapp.yml")
    assert "$SESSION" in str(caught.value)
    half = SEED_TEMPLATE.replace("$SESSION", "demo")
    with pytest.raises(SessionError) as caught:
        parse_session(half, source="copy_dapp.yml")
    # Keys are checked in the order the language declares them: fspf_key first.
    assert caught.value.path == "volumes[0].fspf_key"
    assert "$INPUT_FSPF_KEY" in str(caught.value)
