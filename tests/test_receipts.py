"""Receipts: the CAS's signed statement of what ran on what, attacked as users would meet it.

Through ``tdapp``: a run writes its receipt, ``tdapp receipt verify`` checks it
offline against the pinned CAS key, ``tdapp decrypt`` checks the receipt of what
it decrypts and says who produced it. A receipt for another bundle or session,
with a changed field, or signed by another key is refused with its reason. At
the CAS: a run commits once, all its outputs or none, and only with its own
token; a database writer can neither change what a receipt will state nor
make the CAS serve another run's receipt for a bundle.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cas_fixtures import CasServer, SessionDoc, User, anonymous_http, unique_name
from jwcrypto import jwk, jws
from test_cas_attestation import (  # noqa: F401 - las and world are fixtures
    attempt,
    bind,
    evidence,
    las,
    new_nonce,
    world,
)
from walk_fixtures import Walk, push, running_up

from tdapp.attest.receipt import ALGORITHM, MEDIA_TYPE, Receipt, thumbprint, verify_receipt
from tdapp.client.key_release import EphemeralKey

REPO = Path(__file__).resolve().parent.parent
OUTPUT = "encrypted-output-files"
pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")


# -- through tdapp ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    with running_up(tmp_path_factory.mktemp("receipts")) as started:
        started.tdapp("build", str(REPO / "examples" / "copy_dapp"), "--name", "copy_demo",
                      "-o", str(started.example / "KEYS" / "copy_dapp.yml"))
        yield started


def _run(walk: Walk, text: str) -> tuple[list[str], Path, Path]:
    """encryptedpush, run, fetch: the arguments, the receipt file and the bundle."""
    command = push(walk, {"f.txt": text})
    receipt = walk.example / f"receipt-{unique_name('r')}.jws"
    url = walk.tdapp("run", "copy_demo", *command, "--push", walk.push,
                     "--receipt", str(receipt)).stdout.strip()
    bundle = walk.example / "ZIP" / "encryptedOutputFiles.zip"
    for old in bundle.parent.iterdir():
        old.unlink()
    subprocess.run(["curl", "--silent", "--fail", "--output", str(bundle), url], check=True,
                   timeout=60)
    return command, receipt, bundle


def _tampered(text: str, **changes: object) -> str:
    """The receipt with fields of its statement changed, its signature kept."""
    header, payload, signature = text.strip().split(".")
    statement = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    statement.update(changes)
    encoded = base64.urlsafe_b64encode(json.dumps(statement).encode()).rstrip(b"=").decode()
    return f"{header}.{encoded}.{signature}"


def _signed_by(key: jwk.JWK, statement: Receipt, kid: str) -> str:
    token = jws.JWS(statement.payload())
    token.add_signature(key, alg=ALGORITHM,
                        protected=json.dumps({"alg": ALGORITHM, "typ": MEDIA_TYPE, "kid": kid}))
    return str(token.serialize(compact=True))


def test_a_run_writes_a_receipt_that_verifies_offline_and_decrypt_names_the_producer(
        walk: Walk) -> None:
    command, receipt, bundle = _run(walk, "receipted\n")
    session = command[command.index("--sessionID") + 1].split("/")[0]
    done = walk.tdapp("receipt", "verify", str(receipt), "--bundle", str(bundle),
                      "--session", session)
    assert done.stdout.startswith("receipt verified: ") and session in done.stdout
    statement = json.loads(walk.tdapp("receipt", "verify", str(receipt), "--json").stdout)
    assert statement["session"] == session and statement["mode"] == "sim"
    assert set(statement["outputs"]) == {OUTPUT}
    assert statement["inputs"][OUTPUT] == statement["outputs"][OUTPUT]["old"]
    decrypted = walk.tdapp("decrypt", "--encrypted", str(bundle))
    assert "produced by " in decrypted.stderr and "receipt verified" in decrypted.stderr
    assert statement["measurement"] in decrypted.stderr


@pytest.mark.parametrize(("attack", "reason"), [
    ("another bundle", "another bundle"),
    ("another session", "is for session"),
    ("a changed field", "signature does not verify"),
    ("another key", "not a pinned CAS receipt key"),
    ("another key named as the CAS's", "signature does not verify"),
    ("not a receipt", "not a compact JWS"),
])
def test_a_receipt_that_does_not_fit_is_refused_with_its_reason(
        walk: Walk, tmp_path: Path, attack: str, reason: str) -> None:
    _, receipt, bundle = _run(walk, f"for {attack}\n")
    text = receipt.read_text()
    statement = verify_receipt(text, {thumbprint(k): k for k in _pinned_keys(walk)})
    options = ["--bundle", str(bundle)]
    forged = tmp_path / "forged.jws"
    if attack == "another bundle":
        other = tmp_path / "other.zip"
        other.write_bytes(bundle.read_bytes() + b"\0")
        options = ["--bundle", str(other)]
        forged.write_text(text)
    elif attack == "another session":
        options += ["--session", "someone-else"]
        forged.write_text(text)
    elif attack == "a changed field":
        forged.write_text(_tampered(text, measurement="ab" * 32))
    elif attack == "another key":
        attacker = jwk.JWK.generate(kty="EC", crv="P-256")
        forged.write_text(_signed_by(attacker, statement.model_copy(
            update={"cas_key": thumbprint(attacker)}), thumbprint(attacker)))
    elif attack == "another key named as the CAS's":
        attacker = jwk.JWK.generate(kty="EC", crv="P-256")
        forged.write_text(_signed_by(attacker, statement, statement.cas_key))
    else:
        forged.write_text("{\"session\": \"" + statement.session + "\"}")
    done = walk.tdapp("receipt", "verify", str(forged), *options, check=False)
    assert done.returncode != 0 and done.stdout == "", done
    assert reason in done.stderr and "Traceback" not in done.stderr, done.stderr
    # A key given by hand that is not the CAS's verifies nothing of the CAS's either.
    stranger = tmp_path / "stranger.jwk"
    stranger.write_text(jwk.JWK.generate(kty="EC", crv="P-256").export_public())
    done = walk.tdapp("receipt", "verify", str(receipt), "--key", str(stranger), check=False)
    assert done.returncode != 0 and "not a pinned CAS receipt key" in done.stderr


def _pinned_keys(walk: Walk) -> list[jwk.JWK]:
    return [jwk.JWK.from_json(path.read_text())
            for path in (walk.home / "pins").glob("*.receipt.jwk")]


def test_decrypt_refuses_a_receipt_the_database_swapped_in(walk: Walk) -> None:
    _, first_receipt, _ = _run(walk, "first\n")
    command, _, bundle = _run(walk, "second\n")
    session = command[command.index("--sessionID") + 1].split("/")[0]
    database = walk.home / "cas" / "cas.db"
    if not database.exists():
        database = next(walk.home.rglob("cas.db"))
    with sqlite3.connect(database) as db:
        changed = db.execute("UPDATE receipts SET receipt = ? WHERE session = ?",
                             (first_receipt.read_text().strip(), session)).rowcount
    assert changed == 1
    done = walk.tdapp("decrypt", "--encrypted", str(bundle), "--session", session, check=False)
    assert done.returncode != 0, done.stderr
    assert "is for session" in done.stderr or "another bundle" in done.stderr, done.stderr


# -- at the CAS -----------------------------------------------------------------------------


def _instance(world: tuple[CasServer, User], las: str) -> tuple[str, str, dict[str, str]]:  # noqa: F811
    """A fresh session and an attested instance of it: (name, token, tags)."""
    server, alice = world
    doc = SessionDoc(unique_name("commit"))
    with alice.http(server) as http:
        assert http.post("/v1/sessions", content=doc.body()).status_code == 201
    nonce = new_nonce(server, doc.name)
    key = EphemeralKey()
    answer = attempt(server, doc.name, evidence(las, bind(nonce, key, doc.name)), nonce, key)
    assert answer.status_code == 200, answer.text
    return doc.name, key.open(answer.json()["jwe"]).token.get_secret_value(), doc.tags


def _commit(server: CasServer, token: str, session: str,
            moves: list[dict[str, object]]) -> httpx.Response:
    with anonymous_http(server) as http:
        return http.post("/v1/runs/commit", headers={"Authorization": f"Bearer {token}"},
                         json={"session": session, "moves": moves, "bundle_sha256": "cd" * 32})


def _tag(cas: tuple[CasServer, User], session: str, volume: str) -> str:
    server, alice = cas
    with alice.http(server) as http:
        return str(http.get(f"/v1/volume-tags?session={session}&volume={volume}").json()["tag"])


def test_a_run_commits_once_all_or_nothing_and_only_with_its_own_token(
        world: tuple[CasServer, User], las: str) -> None:  # noqa: F811
    server, _ = world
    name, token, tags = _instance(world, las)
    other, other_token, _ = _instance(world, las)
    good = {"volume": OUTPUT, "old": tags[OUTPUT], "new": "11" * 16}
    stale = {"volume": "encrypted-input-files", "old": "00" * 16, "new": "22" * 16}
    # One stale move: nothing moves, not even the good one.
    answer = _commit(server, token, name, [good, stale])
    assert answer.status_code == 409, answer.text
    assert _tag(world, name, OUTPUT) == tags[OUTPUT]
    # Another instance's token moves nothing of this session.
    answer = _commit(server, other_token, name, [good])
    assert answer.status_code == 403, answer.text
    assert _tag(world, name, OUTPUT) == tags[OUTPUT]
    answer = _commit(server, token, name, [good])
    assert answer.status_code == 200, answer.text
    assert _tag(world, name, OUTPUT) == "11" * 16
    with anonymous_http(server) as http:
        published = http.get("/v1/receipt-key").json()
    key = jwk.JWK(**published["jwk"])
    statement = verify_receipt(answer.json()["receipt"], {published["kid"]: key})
    assert statement.outputs[OUTPUT].new == "11" * 16 and statement.session == name
    # Once: a second commit of the same instance is refused and moves nothing.
    again = _commit(server, token, name, [{"volume": OUTPUT, "old": "11" * 16,
                                           "new": "33" * 16}])
    assert again.status_code == 409 and "already" in again.json()["reason"]
    assert _tag(world, name, OUTPUT) == "11" * 16
    assert other  # (the other session is untouched)


def test_a_database_writer_cannot_change_what_a_receipt_will_state(
        world: tuple[CasServer, User], las: str) -> None:  # noqa: F811
    server, _ = world
    name, token, tags = _instance(world, las)
    with sqlite3.connect(server.state_dir / "cas.db") as db:
        (details,) = db.execute("SELECT details FROM instances WHERE session = ?",
                                (name,)).fetchone()
        forged = json.loads(details) | {"tee": "tdx", "mode": "hardware"}
        db.execute("UPDATE instances SET details = ? WHERE session = ?",
                   (json.dumps(forged), name))
    answer = _commit(server, token, name, [{"volume": OUTPUT, "old": tags[OUTPUT],
                                            "new": "44" * 16}])
    assert answer.status_code >= 400
    assert "receipt" not in answer.json()
    assert "integrity" in answer.json()["reason"]
    assert _tag(world, name, OUTPUT) == tags[OUTPUT]


def test_decrypt_takes_the_url_tdapp_run_printed(walk: Walk) -> None:
    command = push(walk, {"f.txt": "from a url\n"})
    url = walk.tdapp("run", "copy_demo", *command, "--push", walk.push).stdout.strip()
    out = walk.example / "FROM-URL"
    done = walk.tdapp("decrypt", "--encrypted", url, "--out", str(out))
    assert (out / "f.txt").read_text() == "from a url\n"
    assert "receipt verified" in done.stderr
    # A URL that does not answer is named whole in the error (never read as a path).
    missing = url.rsplit("/", 1)[0] + "/missing.zip"
    failed = walk.tdapp("decrypt", "--encrypted", missing, "--out", str(out / "x"),
                        check=False)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert missing.split("://", 1)[1] in failed.stderr, failed.stderr
