"""``tdapp dataset encrypt|decrypt`` and ``tdapp result …`` through the CLI, on iExec samples."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliResult, assert_error, run_tdapp

from tdapp.iexec import digest
from tdapp.iexec.ethereum import keccak

DATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "conformance" / "iexec"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/testdata is missing")

Cli = Callable[..., CliResult]
TASK = "0x" + "ab" * 32
WORKER = "0x" + "cd" * 20


# -- tdapp dataset encrypt / decrypt -----------------------------------------------------


def test_dataset_encrypt_then_decrypt(cli: Cli, tmp_path: Path) -> None:
    source = tmp_path / "data.csv"
    source.write_bytes(b"a,b\n1,2\n")
    done = cli("dataset", "encrypt", source)
    assert done.code == 0, done.err
    encrypted, key_file = tmp_path / "data.csv.enc", tmp_path / "data.csv.enc.key"
    assert done.out == f"checksum 0x{hashlib.sha256(encrypted.read_bytes()).hexdigest()}\n"
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_text()) == 44
    checksum = done.out.split()[1]
    assert_error(cli("dataset", "decrypt", encrypted, "--key-file", key_file), 3,
                 "data.csv exists")
    source.rename(tmp_path / "original.csv")
    done = cli("dataset", "decrypt", encrypted, "--key-file", key_file, "--checksum",
               checksum.upper().replace("0X", "0x"))
    assert done.code == 0, done.err
    assert (tmp_path / "data.csv").read_bytes() == b"a,b\n1,2\n"
    assert (tmp_path / "data.csv").stat().st_mode & 0o777 == 0o600
    assert_error(cli("dataset", "encrypt", source), 3, "exists")
    out = tmp_path / "other.enc"
    assert_error(cli("dataset", "encrypt", source, "-o", out, "--key-file", key_file), 3,
                 "exists")
    assert not out.exists()


def test_dataset_decrypt_iexec_sample_and_bad_input(cli: Cli, tmp_path: Path) -> None:
    sample = tmp_path / "sample.bin"
    shutil.copy(DATA / "common_aes_encrypted-data.bin", sample)
    key = DATA / "common_aes_key.txt"
    checksum = "0x" + hashlib.sha256(sample.read_bytes()).hexdigest()
    done = cli("dataset", "decrypt", sample, "--key-file", key, "--checksum", checksum)
    assert done.code == 0, done.err
    assert (tmp_path / "sample.bin.dec").read_bytes() == b"Some very useful data."
    out = tmp_path / "out"
    assert_error(cli("dataset", "decrypt", sample, "--key-file", key, "-o", out,
                     "--checksum", "0x" + "0" * 64), 4, "checksum mismatch")
    assert_error(cli("dataset", "decrypt", sample, "--key-file", key, "-o", out,
                     "--checksum", "0x12"), 2, "--checksum")
    other = tmp_path / "other.key"
    other.write_text("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    flipped = tmp_path / "flipped.bin"
    flipped.write_bytes(sample.read_bytes()[:-1] + bytes([sample.read_bytes()[-1] ^ 1]))
    assert_error(cli("dataset", "decrypt", sample, "--key-file", other, "-o", out), 3,
                 "wrong key or not an iExec dataset")
    assert_error(cli("dataset", "decrypt", flipped, "--key-file", key, "-o", out), 3,
                 "wrong key or not an iExec dataset")
    other.write_text("not base64!")
    assert_error(cli("dataset", "decrypt", sample, "--key-file", other, "-o", out), 3,
                 "not base64")
    assert_error(cli("dataset", "decrypt", sample, "--key-file", tmp_path / "none", "-o", out),
                 3, "does not exist")
    assert_error(cli("dataset", "decrypt", tmp_path / "none", "--key-file", key, "-o", out), 3,
                 "does not exist")
    assert_error(cli("dataset", "decrypt", sample, "-o", out), 2, "--key-file")
    assert not out.exists()


# -- tdapp result keygen / encrypt / decrypt ---------------------------------------------


def test_result_keygen_encrypt_decrypt(cli: Cli, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    done = cli("result", "keygen", "-o", keys)
    assert done.code == 0, done.err
    private, public = keys / "beneficiary.key", keys / "beneficiary.key.pub"
    assert done.out == f"private {private}\npublic {public}\n"
    assert private.stat().st_mode & 0o777 == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
    before = private.read_bytes()
    assert_error(cli("result", "keygen", "-o", keys), 3, "exists")
    assert private.read_bytes() == before
    folder = tmp_path / "iexec_out"
    (folder / "logs").mkdir(parents=True)
    (folder / "computed.json").write_text('{"deterministic-output-path": "/iexec_out/r"}')
    (folder / "r").write_bytes(b"result")
    (folder / "logs" / "l").write_bytes(b"log")
    encrypted = tmp_path / "result.zip"
    done = cli("result", "encrypt", folder, "--public-key", public, "-o", encrypted)
    assert done.code == 0, done.err
    assert_error(cli("result", "encrypt", folder, "--public-key", public, "-o", encrypted), 3,
                 "exists")
    done = cli("result", "decrypt", encrypted, "--key", private, "-o", tmp_path / "clear")
    assert done.code == 0, done.err
    assert (tmp_path / "clear" / "logs" / "l").read_bytes() == b"log"
    assert (tmp_path / "clear" / "r").read_bytes() == b"result"
    assert_error(cli("result", "decrypt", encrypted, "--key", private, "-o", tmp_path / "clear"),
                 3, "not an empty folder")
    assert_error(cli("result", "decrypt", encrypted, "--key", DATA / "sdk_unexpected_key",
                     "-o", tmp_path / "x"), 3, "wrong key")
    assert not (tmp_path / "x").exists()


def test_result_decrypt_sdk_samples_and_bad_input(cli: Cli, tmp_path: Path) -> None:
    for sample, key, files in [("sdk_encryptedResults.zip", "sdk_expected_key",
                                {"computed.json": 54, "result.txt": 419}),
                               ("sdk_legacyEncryptedResults.zip", "sdk_legacy_expected_key",
                                {"computed.json": 54, "volume.fspf": 0, "result.txt": 349})]:
        target = tmp_path / sample
        done = cli("result", "decrypt", DATA / sample, "--key", DATA / key, "-o", target)
        assert done.code == 0, done.err
        assert {path.name: path.stat().st_size for path in target.iterdir()} == files
    out = tmp_path / "out"
    assert_error(cli("result", "decrypt", DATA / "sdk_encryptedResults.zip", "--key",
                     DATA / "sdk_unexpected_key", "-o", out), 3, "wrong key")
    assert_error(cli("result", "decrypt", DATA / "common_aes_key.txt", "--key",
                     DATA / "sdk_expected_key", "-o", out), 3, "not a zip")
    assert_error(cli("result", "decrypt", DATA / "sdk_encryptedResults.zip", "--key",
                     DATA / "sdk_expected_key.pub", "-o", out), 3, "not a PEM private key")
    assert_error(cli("result", "decrypt", DATA / "sdk_encryptedResults.zip", "--key",
                     DATA / "sdk_expected_key"), 2, "-o")
    assert not out.exists()
    long_name = tmp_path / "long"
    long_name.mkdir()
    (long_name / ("n" * 32)).write_bytes(b"x")
    assert_error(cli("result", "encrypt", long_name, "--public-key",
                     DATA / "sdk_expected_key.pub", "-o", out), 3, "n" * 32)
    assert_error(cli("result", "encrypt", long_name, "--public-key",
                     DATA / "sdk_expected_key", "-o", out), 3, "not a PEM public key")
    assert not out.exists()


# -- tdapp result digest / verify --------------------------------------------------------


def test_result_digest(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / "b").write_bytes(b"2")
    done = cli("result", "digest", tmp_path / "a")
    assert done.out == f"0x{hashlib.sha256(b'1').hexdigest()}\n"
    expected = keccak(hashlib.sha256(b"1").digest() + hashlib.sha256(b"2").digest())
    assert cli("result", "digest", tmp_path).out == f"0x{expected.hex()}\n"
    done = cli("result", "digest", "--callback", "0x" + "00" * 31 + "01")
    assert done.out == "0xb10e2d527612073b26eecdfd717e6a320cf44b4afac2b0732d9fcbe2b7fa0cf6\n"
    assert_error(cli("result", "digest"), 2, "PATH or --callback")
    assert_error(cli("result", "digest", tmp_path / "a", "--callback", "0x01"), 2,
                 "PATH or --callback")
    assert_error(cli("result", "digest", "--callback", "0xzz"), 2, "--callback")
    (tmp_path / "sub").mkdir()
    assert_error(cli("result", "digest", tmp_path), 3, "subfolder")
    assert_error(cli("result", "digest", tmp_path / "none"), 3, "does not exist")


def test_result_verify(cli: Cli) -> None:
    challenge = digest.EnclaveChallenge.create()
    value = digest.callback_digest("0x2a")
    signature = digest.to_hex(digest.sign_result(challenge, TASK, WORKER, value))
    args = ["result", "verify", "--task-id", TASK, "--worker", WORKER, "--digest",
            digest.to_hex(value), "--signature", signature]
    done = cli(*args, "--address", challenge.address)
    assert done.code == 0, done.err
    assert done.out == f"signature verified: signed by {challenge.address}\n"
    other = digest.EnclaveChallenge.create().address
    assert_error(cli(*args, "--address", other), 4, f"not {other}")
    wrong_task = ["--task-id", "0x" + "ac" * 32]
    assert_error(cli(*args, *wrong_task, "--address", challenge.address), 4, "not ")
    assert_error(cli(*args[:2], "--task-id", "0x12", *args[4:], "--address", other), 2,
                 "--task-id")
    assert_error(cli(*args[:-1], "0x00", "--address", other), 2, "--signature")
    assert_error(cli(*args, "--address", "0x1234"), 2, "--address")
    assert_error(cli(*args), 2, "--address")


def test_result_commands_in_a_real_process(tmp_path: Path) -> None:
    done = run_tdapp("result", "digest", "--callback", "2a")
    assert done.code == 0, done.err
    assert done.out == f"0x{keccak(b'*').hex()}\n"
    done = run_tdapp("result", "--help")
    assert all(name in done.out for name in ("keygen", "encrypt", "decrypt", "digest", "verify"))
    done = run_tdapp("dataset", "--help")
    assert all(name in done.out for name in ("push", "encrypt", "decrypt"))
