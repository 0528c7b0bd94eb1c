"""The session language's rules: what is refused, where the error points, what is normalized.

Every refusal must be a SessionError whose one line names the source, the line
and the key path; nothing else may escape, whatever the input.
"""

from __future__ import annotations

import pytest

from tdapp.errors import InputError
from tdapp.policy import Session, SessionError, parse_session, split_command
from tdapp.policy.reader import MAX_CHARS

KEY = "9352c90f662f0cf3cbb1138614f454d90f5321eb0121e4ea4576fe2f1486a392"
TAG = "a1bf3087fea0d91e1a578ecc299d0fce"
MRENCLAVE = "e0f45a9a862c83f383730cc2aef144081025e3f925615da5b35c4d980faaa3c9"

BASE = f"""\
name: demo
version: "0.3"
services:
  - name: app
    image_name: app-image
    mrenclaves: [{MRENCLAVE}]
    command: /app --flag
    pwd: /
    environment:
      MODE: hw
volumes:
  - name: input
    fspf_key: {KEY}
    fspf_tag: {TAG}
  - name: output
images:
  - name: app-image
    volumes:
      - name: input
        path: /in
      - name: output
        path: /out
"""


def refused(text: str) -> SessionError:
    with pytest.raises(SessionError) as caught:
        parse_session(text, source="session.yml")
    error = caught.value
    assert isinstance(error, InputError)
    assert "\n" not in str(error)
    assert str(error).startswith("session.yml")
    return error


def expect(text: str, line: int | None, path: str, fragment: str) -> None:
    error = refused(text)
    assert (error.line, error.path) == (line, path), str(error)
    assert fragment in error.detail, str(error)
    where = f"session.yml:{line}: " if line is not None else "session.yml: "
    assert str(error).startswith(where + (f"{path}: " if path else "")), str(error)


def test_base_document_is_valid() -> None:
    session = parse_session(BASE)
    assert session.version == "0.3"
    output = session.volume("output")
    assert output is not None and output.auto_initialised


# -- unknown keys at several depths ----------------------------------------------------------


@pytest.mark.parametrize(("text", "line", "path", "fragment"), [
    (BASE + "attestation: {mode: sim}\n", 23, "",
     "unknown key 'attestation' at the top level"),
    (BASE.replace("    pwd: /\n", "    pwd: /\n    comand: x\n"), 9, "services[0]",
     "unknown key 'comand' (did you mean 'command'?)"),
    (BASE.replace("        path: /in\n", "        path: /in\n        mode: ro\n"), 21,
     "images[0].volumes[0]", "unknown key 'mode'"),
    (BASE + "security:\n  attestation:\n    mode: sim\n    tolerates: [debug-mode]\n", 26,
     "security.attestation", "unknown key 'tolerates' (did you mean 'tolerate'?)"),
    (BASE + "secrets:\n  - name: s\n    kind: ascii\n    import_: x\n", 26, "secrets[0]",
     "unknown key 'import_'"),
])
def test_unknown_keys_are_refused_with_line_and_path(text: str, line: int, path: str,
                                                     fragment: str) -> None:
    expect(text, line, path, fragment)


# -- wrong types, bad values --------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "line", "path", "fragment"), [
    ("      MODE: hw\n", "      - MODE\n", 10, "services[0].environment",
     "expected a mapping, got a list"),
    ("services:\n  - name: app\n", "services:\n  name: app\n  x:\n  - name: app\n", 4,
     "services", "expected a list, got a mapping"),
    ("    pwd: /\n", "    pwd: [/]\n", 8, "services[0].pwd", "expected a string, got a list"),
    ("    pwd: /\n", "    pwd: relative/dir\n", 8, "services[0].pwd", "not an absolute path"),
    ("      MODE: hw\n", "      MODE: {nested: map}\n", 10, "services[0].environment.MODE",
     "expected a string, got a mapping"),
    (f"    fspf_key: {KEY}\n", f"    fspf_key: {KEY[:-2]}\n", 13, "volumes[0].fspf_key",
     "64 hex characters), got 62 characters"),
    (f"    fspf_tag: {TAG}\n", f"    fspf_tag: {TAG[:-1]}g\n", 14, "volumes[0].fspf_tag",
     "non-hex characters"),
    (f"    fspf_key: {KEY}\n", "    fspf_key: $INPUT_FSPF_KEY\n", 13, "volumes[0].fspf_key",
     "unfilled template variable $INPUT_FSPF_KEY"),
    (f"[{MRENCLAVE}]", f"[{MRENCLAVE[:40]}]", 6, "services[0].mrenclaves[0]",
     "enclave measurement"),
    (f"    fspf_tag: {TAG}\n", "", 13, "volumes[0].fspf_key", "give both fspf_key and fspf_tag"),
    ("        path: /out\n", "        path: out\n", 22, "images[0].volumes[1].path",
     "'out' is not an absolute path"),
    ("        path: /out\n", "        path: /x/../etc\n", 22, "images[0].volumes[1].path",
     "'..' component"),
    ("      - name: output\n", "      - name: outptu\n", 21, "images[0].volumes[1].name",
     "volume 'outptu' is not a volume of this session"),
    ("    image_name: app-image\n", "    image_name: other\n", 5, "services[0].image_name",
     "'other' is not an image of this session"),
    ("name: demo\n", "name: my demo\n", 1, "name", "not a valid session name"),
    ('version: "0.3"\n', "version: 0.4\n", 2, "version", "unsupported session language"),
    ("    command: /app --flag\n", "    command: /app 'unclosed\n", 7, "services[0].command",
     "unclosed ' quote"),
    ("  - name: app\n    image_name: app-image\n", "  - image_name: app-image\n", 4,
     "services[0]", "missing required key 'name'"),
])
def test_bad_values_are_refused_with_line_and_path(old: str, new: str, line: int, path: str,
                                                   fragment: str) -> None:
    assert old in BASE
    expect(BASE.replace(old, new, 1), line, path, fragment)


def test_secret_values_are_not_repeated_in_errors() -> None:
    secret_key = "ab" * 31 + "zz"
    error = refused(BASE.replace(KEY, secret_key))
    assert secret_key not in str(error) and "ab" * 10 not in str(error)


def test_duplicate_names_are_refused() -> None:
    expect("name: s\nvolumes:\n  - name: v\n  - name: w\n  - name: v\n", 5, "volumes[2].name",
           "duplicate volume name 'v' (also at volumes[0])")
    twice = BASE.replace("volumes:\n  - name: input", "  - name: app\nvolumes:\n  - name: input")
    expect(twice, 11, "services[1].name", "duplicate service name 'app'")
    expect(BASE + "  - name: app-image\n", 23, "images[1].name", "duplicate image name")
    secrets = "secrets:\n  - name: s\n    kind: ascii\n  - name: s\n    kind: binary\n"
    expect(BASE + secrets, 26, "secrets[1].name", "duplicate secret name 's'")
    mounts = BASE.replace("        path: /out\n", "        path: /in\n")
    expect(mounts, 22, "images[0].volumes[1].path", "duplicate mount path '/in'")


def test_duplicate_yaml_keys_are_refused() -> None:
    expect(BASE.replace("    pwd: /\n", "    pwd: /\n    pwd: /tmp\n"), 9, "services[0]",
           "duplicate key 'pwd' (first at line 8)")
    expect("name: a\nname: b\n", 2, "", "duplicate key 'name'")


def test_secret_kinds_take_only_their_own_keys() -> None:
    expect(BASE + "secrets:\n  - name: c\n    kind: x509\n    size: 3\n", 26, "secrets[0].size",
           "does not apply to secrets of kind x509")
    expect(BASE + "secrets:\n  - name: c\n", 24, "secrets[0].name",
           "needs a kind unless it is imported")
    expect(BASE + "secrets:\n  - name: c\n    kind: x509\n    issuer: ca\n", 26,
           "secrets[0].issuer", "issuer 'ca' is not a secret of this session")
    expect(BASE + "secrets:\n  - name: k\n    kind: ascii\n  - name: c\n    kind: x509\n"
           "    private_key: k\n", 28, "secrets[1].private_key",
           "is a ascii secret, not private-key")
    expect(BASE + "secrets:\n  - name: b\n    kind: binary\n    value: xyz\n", 26,
           "secrets[0].value", "even number of hex characters")


def test_attestation_rules() -> None:
    expect(BASE + "security:\n  attestation:\n    mode: node\n", 25, "security.attestation.mode",
           "expected 'hardware', 'sim', 'none' or 'maa', got 'node'")
    expect(BASE + "security:\n  attestation:\n    tolerate: [debug]\n", 25,
           "security.attestation.tolerate[0]", "got 'debug'")
    expect(BASE + "security:\n  attestation:\n    mode: maa\n    tolerate: [maa-managed-tcb]\n",
           25, "security.attestation.mode", "needs the url")
    expect(BASE + "security:\n  attestation:\n    one_time_password_shared_secret: ABCDEF\n",
           25, "security.attestation.one_time_password_shared_secret", "shorter than 128 bits")
    both = BASE.replace("    command:",
                        f"    attestation: {{mrenclave: {MRENCLAVE}}}\n    command:")
    expect(both, 7, "services[0].attestation", "either mrenclaves or attestation")
    empty = BASE.replace(f"    mrenclaves: [{MRENCLAVE}]\n", "    attestation: [{}]\n")
    expect(empty, 6, "services[0].attestation[0]", "needs mrenclave, signer, tdx or snp")
    signer = BASE.replace(f"    mrenclaves: [{MRENCLAVE}]\n",
                          f"    attestation:\n      signer: {{mrsigner: {MRENCLAVE}, "
                          "isvprodid: '22'}\n")
    expect(signer, 7, "services[0].attestation.signer.isvprodid",
           "expected an integer, got a string")
    unattested = BASE.replace(f"    mrenclaves: [{MRENCLAVE}]\n", "")
    expect(unattested, 4, "services[0].name", "needs mrenclaves or attestation")
    assert parse_session(unattested + "security: {attestation: {mode: none}}\n").services
    big = signer.replace("'22'", "9" * 5000)
    expect(big, 7, "services[0].attestation.signer.isvprodid", "integer is too large")


# -- normalization ------------------------------------------------------------------------------


def test_scalars_are_read_as_yaml_1_2_text_where_text_is_expected() -> None:
    session = parse_session(BASE.replace("      MODE: hw\n", "      MODE: hw\n      A: yes\n"
                                         "      B: 0042\n      C: 1.50\n      D: true\n"
                                         "      E:\n      F: 2018-07-13\n"))
    service = session.service("app")
    assert service is not None
    assert service.environment == {"MODE": "hw", "A": "yes", "B": "0042", "C": "1.50",
                                   "D": "true", "E": None, "F": "2018-07-13"}


def test_normalizations() -> None:
    session = parse_session(
        BASE.replace(f"[{MRENCLAVE}]", f"[{MRENCLAVE.upper()}, {MRENCLAVE}]")
            .replace("        path: /in\n", "        path: //in/\n")
            .replace("    command: /app --flag\n", "    command: [/app, --flag, two words]\n")
        + "security:\n  attestation:\n    tolerate: [outdated-tcb, debug-mode, debug-mode]\n"
          "    ignore_advisories: [INTEL-SA-1, \"*\"]\n")
    service, image = session.service("app"), session.image("app-image")
    assert service is not None and image is not None
    assert service.mrenclaves == (MRENCLAVE,)
    assert image.volumes[0].path == "/in"
    assert service.command == ("/app", "--flag", "two words")
    assert service.argv() == ["/app", "--flag", "two words"]
    assert session.security.attestation.tolerate == ("debug-mode", "outdated-tcb")
    assert session.security.attestation.ignore_advisories == ("*",)


def test_empty_sections_and_null_predecessor() -> None:
    session = parse_session("name: ns/empty\npredecessor: ~\nservices:\nvolumes: []\n")
    assert (session.services, session.volumes, session.predecessor) == ((), (), None)
    assert session.access_policy.read == ("CREATOR",)


def test_model_refuses_bad_values_built_in_code_too() -> None:
    with pytest.raises(ValueError, match="hex"):
        Session.model_validate({"name": "x", "predecessor": "nothex"})
    with pytest.raises(ValueError, match="Extra inputs"):
        Session.model_validate({"name": "x", "bogus": 1})


# -- YAML-level refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("name: [unclosed\n", 2, "malformed YAML"),
    ("name: a\n  b: c\n", 2, "malformed YAML"),
    ("name: a\n\tservices: []\n", 2, "malformed YAML"),
    ("", 1, "document is empty"),
    ("# only a comment\n", 1, "document is empty"),
    ("- name: a\n", 1, "expected a session mapping at the top level, got a list"),
    ("just text\n", 1, "got a string"),
    ("42\n", 1, "got an integer"),
    ("name: a\n---\nname: b\n", 2, "single document"),
    ("name: &n a\n", 1, "anchors"),
    ("name: !!python/object:os.system a\n", 1, "tag !!python/object:os.system"),
    ("name: !!binary YWJj\n", 1, "tag !!binary"),
    ("? [a, b]\n: c\n", 1, "mapping key must be a plain string"),
    ('name: "\\ud800"\n', 1, "not valid Unicode"),
    ("name: x\nservices: " + "[" * 200 + "]" * 200 + "\n", 2, "nested more than"),
])
def test_yaml_problems_are_session_errors(text: str, line: int, fragment: str) -> None:
    error = refused(text)
    assert error.line == line, str(error)
    assert fragment in str(error), str(error)


def test_binary_junk_and_oversize_documents_are_refused() -> None:
    assert "malformed YAML" in str(refused("name: \x00\x01\x02\x03 binary"))
    assert "malformed YAML" in str(refused(bytes(range(256)).decode("latin-1")))
    assert "larger than" in str(refused("name: x\n#" + "x" * MAX_CHARS))
    with pytest.raises(SessionError, match="expected the document as text"):
        parse_session(b"name: x\n")  # type: ignore[arg-type]


@pytest.mark.timeout(30)  # a guard against a hang, not a speed requirement
def test_billion_laughs_is_refused_without_expanding() -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    error = refused("\n".join(["name: bomb", *lines]) + "\n")
    assert "anchors" in str(error) or "aliases" in str(error)
    # Aliases alone are refused too (they could only point at anchors anyway).
    assert "aliases" in str(refused("name: *a\n"))


@pytest.mark.timeout(30)  # a guard against a hang, not a speed requirement
def test_many_nodes_are_refused() -> None:
    text = "name: x\ntags: [" + "t," * 100_001 + "]\n"
    assert "more than 100000 values" in str(refused(text))


def test_session_references() -> None:
    imports = ("secrets:\n  - name: a\n    import: {session: ../sibling, secret: a}\n"
               "  - name: b\n    import: {session: ./child/x, secret: b}\n"
               "  - name: c\n    import: {session: ../../ns/other, secret: c}\n")
    session = parse_session(BASE + imports)
    assert [secret.import_.session for secret in session.secrets if secret.import_] == [
        "../sibling", "./child/x", "../../ns/other"]
    expect(BASE + "secrets:\n  - name: a\n    import: {session: ns/../x, secret: a}\n", 25,
           "secrets[0].import.session", "not a valid session reference")


def test_command_splitting() -> None:
    assert split_command("""a 'b c' "d'e" f""") == ["a", "b c", "d'e", "f"]
    assert split_command("x''y  \"\"") == ["xy", ""]
    with pytest.raises(ValueError, match="unclosed"):
        split_command('a "b')
    expect(BASE.replace("    command: /app --flag\n", "    command: \"''\"\n"), 7,
           "services[0].command", "names no program")


def test_sessions_can_be_built_in_code() -> None:
    session = Session(name="built")
    assert (session.version, session.predecessor, session.services) == ("0.1", None, ())
    assert parse_session(session.to_yaml()) == session
