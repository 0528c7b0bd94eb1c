"""curl against a live CAS, the way SCONE users talk to theirs.

``tdapp cas attest`` pins the CAS and gets the local key certified; after that
plain curl with that certificate and key, and the CAS certificate as the only
CA, must be able to post the seed's own session template to ``/session``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cas_fixtures import (
    HEX64,
    CasServer,
    MakeUser,
    StartCas,
    User,
    child_environment,
    fspf_variables,
    unique_name,
)
from seed_data import SEED_TEMPLATE

from tdapp.policy import fill_template, parse_session, session_hash
from tdapp.policy.modes import with_fixed_mode
from tdapp.policy.security import AttestationMode

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture(scope="module")
def cas(cas_server: StartCas, user: MakeUser) -> tuple[CasServer, User]:
    server = cas_server()
    alice = user("alice")
    alice.attest(server)
    return server, alice


def curl(home: Path, *args: str | Path) -> tuple[int, int, str, str]:
    """Run curl; returns (exit code, HTTP status or 0, body, stderr)."""
    done = subprocess.run(
        ["curl", "-q", "--silent", "--show-error", "--max-time", "30",
         "-w", "\n%{http_code}", *map(str, args)],
        capture_output=True, text=True, env=child_environment(home), timeout=60,
        stdin=subprocess.DEVNULL, check=False)
    body, _, status = done.stdout.rpartition("\n")
    return done.returncode, int(status) if status.isdigit() else 0, body, done.stderr


def as_client(server: CasServer, someone: User) -> list[str | Path]:
    return ["--cert", someone.cas_certificate(server), "--key", someone.key_path,
            "--cacert", server.cert_path]


def error_of(body: str, kind: str) -> str:
    """The reason of an error body, which must be exactly ``{kind, reason}``."""
    answer: Any = json.loads(body)
    assert isinstance(answer, dict) and set(answer) == {"kind", "reason"}, body
    assert answer["kind"] == kind and isinstance(answer["reason"], str), body
    assert answer["reason"].strip(), body
    return str(answer["reason"])


def seed_session(tmp_path: Path) -> tuple[str, str, Path]:
    name = unique_name("seed")
    text = fill_template(SEED_TEMPLATE, {"SESSION": name, **fspf_variables()})
    assert "$" not in text
    path = tmp_path / "session.yml"
    path.write_text(text)
    return name, text, path


def test_curl_posts_the_seed_template_and_reads_it_back(
        cas: tuple[CasServer, User], tmp_path: Path) -> None:
    server, alice = cas
    name, text, path = seed_session(tmp_path)

    code, status, body, err = curl(alice.home, *as_client(server, alice),
                                   "--data-binary", f"@{path}", f"{server.url}/session")
    assert code == 0, err
    assert status == 201, body
    created = json.loads(body)
    assert created["name"] == name
    assert HEX64.match(created["hash"]), created
    # The hash is the one a client computes locally for this creator, once the mode the
    # CAS fixes in a document that names none (hardware: this CAS is not a debug CAS).
    as_stored = with_fixed_mode(parse_session(text, source="seed"), predecessor=None,
                                default=AttestationMode.HARDWARE, trusted_platforms=())
    assert created["hash"] == session_hash(as_stored, alice.identity)

    code, status, body, err = curl(alice.home, *as_client(server, alice),
                                   f"{server.url}/v1/sessions/{name}")
    assert code == 0, err
    assert status == 200, body
    read = json.loads(body)
    assert read["hash"] == created["hash"]
    assert read["creator"] == alice.identity
    assert isinstance(read["session"], str)
    stored = parse_session(read["session"], source="read back")
    assert stored.name == name
    assert session_hash(stored, alice.identity) == created["hash"]

    # Posting the same document again (no predecessor) must not replace it.
    code, status, body, err = curl(alice.home, *as_client(server, alice),
                                   "--data-binary", f"@{path}", f"{server.url}/session")
    assert code == 0, err
    assert status == 409, body
    assert "already exists" in error_of(body, "conflict")


def test_curl_without_a_client_certificate_is_refused_with_401(
        cas: tuple[CasServer, User], tmp_path: Path) -> None:
    server, alice = cas
    name, _, path = seed_session(tmp_path)

    code, status, body, err = curl(alice.home, "--cacert", server.cert_path,
                                   "--data-binary", f"@{path}", f"{server.url}/session")
    assert code == 0, err
    assert status == 401, body
    assert "client certificate" in error_of(body, "authentication_required")

    # Nothing was stored under that name.
    code, status, body, err = curl(alice.home, *as_client(server, alice),
                                   f"{server.url}/v1/sessions/{name}")
    assert status == 404, body


def test_curl_with_a_self_signed_client_certificate_is_refused(
        cas: tuple[CasServer, User], tmp_path: Path) -> None:
    """Only certificates issued by the CAS's client CA identify a client."""
    server, alice = cas
    name, _, path = seed_session(tmp_path)

    code, status, body, err = curl(alice.home, "--cert", alice.self_signed_certificate,
                                   "--key", alice.key_path, "--cacert", server.cert_path,
                                   "--data-binary", f"@{path}", f"{server.url}/session")
    assert code != 0 or status in (400, 401, 403), (code, status, body, err)
    assert status != 201, body

    code, status, body, err = curl(alice.home, *as_client(server, alice),
                                   f"{server.url}/v1/sessions/{name}")
    assert status == 404, body
