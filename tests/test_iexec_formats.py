"""tdapp.iexec against iExec's own published samples, and the formulas pinned independently.

Every sample in ../shared/testdata/conformance/iexec opens with its key to the
plaintext its README states, and fails cleanly with another key or a flipped
byte; tdapp's own output is checked with bare ``cryptography``/``eth_hash``
calls here, not with the module's own helpers.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asymmetric_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tdapp.errors import InputError, IntegrityError
from tdapp.iexec import computed, dataset, digest, result

# The same libraries, through the module that keeps py_ecc from raising the recursion limit.
from tdapp.iexec.ethereum import Account, encode_defunct, keccak

DATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "conformance" / "iexec"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/testdata is missing")

TASK = "0x" + "11" * 32
WORKER = "0x" + "22" * 20
ONE = "0x" + "00" * 31 + "01"


def fixture(name: str) -> bytes:
    return (DATA / name).read_bytes()


def members(blob: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def rezip(blob: bytes, name: str, change: bytes | None = None, *, flip: int | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, content in members(blob).items():
            if member == name:
                content = change if change is not None else content
                if flip is not None:
                    content = content[:flip] + bytes([content[flip] ^ 1]) + content[flip + 1:]
            archive.writestr(member, content)
    return buffer.getvalue()


def one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(error.value)
    assert "\n" not in text and "PRIVATE" not in text
    return text


@pytest.fixture(scope="module")
def beneficiary() -> tuple[bytes, bytes]:
    return result.generate_beneficiary_key()


# -- datasets ----------------------------------------------------------------------------


def test_iexec_dataset_sample_decrypts_and_fails_cleanly() -> None:
    blob, key = fixture("common_aes_encrypted-data.bin"), fixture("common_aes_key.txt").decode()
    assert dataset.decrypt_dataset(blob, key) == b"Some very useful data."
    assert dataset.decrypt_dataset(blob, key) == fixture("common_aes_plain-data.txt")
    assert dataset.DatasetKey.from_b64(key).b64() == key.strip()
    for position in range(len(blob)):  # CBC has no MAC: an error or other plaintext
        flipped = blob[:position] + bytes([blob[position] ^ 0x80]) + blob[position + 1:]
        try:
            assert dataset.decrypt_dataset(flipped, key) != b"Some very useful data."
        except InputError as error:
            assert str(error) == "wrong key or not an iExec dataset"
        with pytest.raises(IntegrityError):
            dataset.check_checksum(flipped, dataset.dataset_checksum(blob))
    with pytest.raises(InputError, match=r"^wrong key or not an iExec dataset$"):
        dataset.decrypt_dataset(blob[:20], key)
    wrong = 0
    for _ in range(20):
        try:
            dataset.decrypt_dataset(blob, dataset.generate_dataset_key())
        except InputError:
            wrong += 1
    assert wrong >= 15  # a wrong key passes the padding check about once in 256


def test_dataset_checksum_is_sha256_of_the_encrypted_file() -> None:
    blob = fixture("common_aes_encrypted-data.bin")
    expected = "0x" + hashlib.sha256(blob).hexdigest()
    assert dataset.dataset_checksum(blob) == expected
    dataset.check_checksum(blob, expected)
    dataset.check_checksum(blob, "0X" + expected[2:].upper())
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        dataset.check_checksum(blob, "0x" + "0" * 64)
    for bad in ("", expected[2:], expected + "00", "0x" + "g" * 64):
        with pytest.raises(InputError, match="checksum must be"):
            dataset.check_checksum(blob, bad)


def test_own_dataset_layout_checked_with_bare_cryptography() -> None:
    key = dataset.generate_dataset_key()
    assert repr(key) == "DatasetKey(<hidden>)" and key.b64() not in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    data = os.urandom(100)
    first, second = dataset.encrypt_dataset(data, key), dataset.encrypt_dataset(data, key)
    assert first[:16] != second[:16] and len(first) == 16 + 112
    raw = base64.b64decode(key.b64())
    decryptor = Cipher(algorithms.AES(raw), modes.CBC(first[:16])).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(decryptor.update(first[16:]) + decryptor.finalize())
    assert plain + unpadder.finalize() == data
    assert dataset.decrypt_dataset(second, key.b64()) == data
    assert dataset.decrypt_dataset(dataset.encrypt_dataset(b"", key), key) == b""
    with pytest.raises(InputError):
        dataset.DatasetKey.from_b64(base64.b64encode(b"x" * 16))


def test_dataset_files_stream_and_publish_nothing_on_failure(tmp_path: Path) -> None:
    source = tmp_path / "big"
    source.write_bytes(os.urandom(3 * (1 << 20) + 5))
    key = dataset.generate_dataset_key()
    checksum = dataset.encrypt_dataset_file(source, tmp_path / "big.enc", key)
    blob = (tmp_path / "big.enc").read_bytes()
    assert checksum == dataset.dataset_checksum(blob)
    assert dataset.decrypt_dataset(blob, key) == source.read_bytes()
    dataset.decrypt_dataset_file(tmp_path / "big.enc", tmp_path / "out", key, checksum=checksum)
    assert (tmp_path / "out").read_bytes() == source.read_bytes()
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o600
    with pytest.raises(IntegrityError):
        dataset.decrypt_dataset_file(tmp_path / "big.enc", tmp_path / "bad", key,
                                     checksum="0x" + "1" * 64)
    with pytest.raises(InputError, match="wrong key"):
        dataset.decrypt_dataset_file(tmp_path / "big.enc", tmp_path / "bad", "A" * 43 + "=")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["big", "big.enc", "out"]


# -- results -----------------------------------------------------------------------------


def test_iexec_rsa_sample_decrypts_with_pkcs1v15() -> None:
    private = result.load_private_key(fixture("common_rsa_key"))
    plain = private.decrypt(fixture("common_rsa_encrypted-data.bin"), asymmetric_padding.PKCS1v15())
    assert plain == b"A very useful data!" == fixture("common_rsa_plain-data.txt")
    public = result.load_public_key(fixture("common_rsa_key.pub"))
    assert public.public_numbers() == private.public_key().public_numbers()


def test_sdk_result_samples_decrypt_with_the_right_key_only() -> None:
    inner = members(result.decrypt_result(fixture("sdk_encryptedResults.zip"),
                                          fixture("sdk_expected_key")))
    assert inner["computed.json"] == b'{"deterministic-output-path": "/iexec_out/result.txt"}'
    assert len(inner["result.txt"]) == 419 and inner["result.txt"].isascii()
    legacy = members(result.decrypt_result(fixture("sdk_legacyEncryptedResults.zip"),
                                           fixture("sdk_legacy_expected_key")))
    assert {name: len(content) for name, content in legacy.items()} == {
        "computed.json": 54, "volume.fspf": 0, "result.txt": 349}
    blob = fixture("sdk_encryptedResults.zip")
    tampered = [rezip(blob, result.KEY_FILE, flip=100), rezip(blob, result.DATA_FILE, flip=40),
                rezip(blob, result.DATA_FILE, flip=len(members(blob)[result.DATA_FILE]) - 1)]
    for sample, key in [(blob, "sdk_unexpected_key"), (blob, "sdk_legacy_expected_key"),
                        (fixture("sdk_legacyEncryptedResults.zip"), "sdk_unexpected_key"),
                        *((sample, "sdk_expected_key") for sample in tampered)]:
        with pytest.raises(InputError) as error:
            result.decrypt_result(sample, fixture(key))
        assert one_line(error).startswith(("wrong key", "not an iExec"))
    for broken in (b"not a zip", rezip(blob, result.KEY_FILE, b"short")):
        with pytest.raises(InputError):
            result.decrypt_result(broken, fixture("sdk_expected_key"))


def test_own_result_encryption_layout(beneficiary: tuple[bytes, bytes], tmp_path: Path) -> None:
    private_pem, public_pem = beneficiary
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----\n")
    key = serialization.load_pem_private_key(private_pem, None)
    assert key.key_size == 4096 and key.public_key().public_numbers().e == 65537  # type: ignore[union-attr]
    inner = b"PK any bytes: the layout does not care"
    outer = members(result.encrypt_result(inner, public_pem))
    assert set(outer) == {"aes-key.rsa", "iexec_out.zip.aes"} and len(outer["aes-key.rsa"]) == 512
    aes = key.decrypt(outer["aes-key.rsa"], asymmetric_padding.PKCS1v15())  # type: ignore[union-attr]
    assert len(aes) == 32
    data = outer["iexec_out.zip.aes"]
    decryptor = Cipher(algorithms.AES(aes), modes.CBC(data[:16])).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(decryptor.update(data[16:]) + decryptor.finalize())
    assert plain + unpadder.finalize() == inner
    # The SDK's own key pair works both ways, and a folder survives the round trip.
    folder = tmp_path / "iexec_out"
    (folder / "sub").mkdir(parents=True)
    (folder / "computed.json").write_bytes(computed.computed_json(
        deterministic_output_path="/iexec_out/result.txt"))
    (folder / "result.txt").write_bytes(b"42\n")
    (folder / "sub" / "x").write_bytes(b"")
    packed = result.pack_result(folder)
    assert sorted(members(packed)) == ["computed.json", "result.txt", "sub/x"]
    blob = result.encrypt_result(packed, fixture("sdk_expected_key.pub"))
    assert result.decrypt_result(blob, fixture("sdk_expected_key")) == packed
    assert result.unpack_result(packed, tmp_path / "out") == ["computed.json", "result.txt",
                                                              "sub/x"]
    assert (tmp_path / "out" / "result.txt").read_bytes() == b"42\n"
    assert result.pack_result(folder) == packed  # reproducible


def test_result_file_names_of_31_characters_pass_and_32_fail(tmp_path: Path) -> None:
    cases = [("a" * 31, 31), ("é" * 31, 31), ("a" * 32, 32), ("😀" * 16, 32)]
    for index, (name, length) in enumerate(cases):
        folder = tmp_path / f"case{index}"
        folder.mkdir()
        (folder / name).write_bytes(b"x")
        if length <= result.MAX_NAME_LENGTH:
            assert list(members(result.pack_result(folder))) == [name]
        else:
            with pytest.raises(InputError, match="longer than 31 characters") as error:
                result.pack_result(folder)
            assert repr(name) in str(error.value)
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "to").symlink_to("/etc/passwd")
    with pytest.raises(InputError, match="not a regular file"):
        result.pack_result(tmp_path / "link")


def test_common_result_zip_unpacks_with_its_folder(tmp_path: Path) -> None:
    names = result.unpack_result(fixture("common_result-0xabc.zip"), tmp_path / "out")
    assert names == ["iexec_out/hello.txt", "stdout.txt"]
    assert len((tmp_path / "out" / "iexec_out" / "hello.txt").read_bytes()) == 7
    assert len((tmp_path / "out" / "stdout.txt").read_bytes()) == 19


def _zip(*entries: tuple[str | zipfile.ZipInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        warnings.simplefilter("ignore")  # "Duplicate name": wanted here
        for name, content in entries:
            archive.writestr(name, content)
    return buffer.getvalue()


def _link(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16
    return info


@pytest.mark.parametrize("entries", [
    [("../evil", b"x")], [("/abs", b"x")], [("a/../../b", b"x")], [("a\\b", b"x")],
    [("C:x", b"x")], [("a\nb", b"x")], [(_link("l"), b"/etc/passwd")],
    [("a", b"1"), ("a", b"2")], [("a", b"1"), ("a/b", b"2")], [("./a", b"x")],
])
def test_unpack_refuses_unsafe_members_and_writes_nothing(
        tmp_path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> None:
    with pytest.raises(InputError, match="refused result"):
        result.unpack_result(_zip(*entries), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unpack_bounds_size_and_target(tmp_path: Path) -> None:
    bomb = _zip(("zeros", b"\0" * (4 << 20)))
    assert len(bomb) < 50_000
    with pytest.raises(InputError, match="more than 1000000 bytes"):
        result.unpack_result(bomb, tmp_path / "out", max_bytes=1_000_000)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_bytes(b"")
    with pytest.raises(InputError, match="not an empty folder"):
        result.unpack_result(_zip(("a", b"1")), tmp_path / "full")
    (tmp_path / "empty").mkdir()
    assert result.unpack_result(_zip(("a", b"1")), tmp_path / "empty") == ["a"]
    with pytest.raises(InputError, match="not a result zip"):
        result.unpack_result(b"garbage", tmp_path / "new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty", "full"]


# -- digests and signatures --------------------------------------------------------------


def test_callback_digest_pinned_vector() -> None:
    raw = bytes(31) + b"\x01"
    assert digest.callback_digest(ONE) == keccak(raw) == bytes.fromhex(
        "b10e2d527612073b26eecdfd717e6a320cf44b4afac2b0732d9fcbe2b7fa0cf6")
    assert digest.callback_digest(ONE[2:]) == keccak(raw) != keccak(ONE.encode())
    for bad in ("0x", "", "0x1", "0xzz"):
        with pytest.raises(InputError, match="callback-data"):
            digest.callback_digest(bad)


def test_web2_digest_of_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "one").write_bytes(b"hello")
    assert digest.web2_result_digest(tmp_path / "one") == hashlib.sha256(b"hello").digest()
    folder = tmp_path / "out"
    folder.mkdir()
    names = {"b": b"2", "B": b"1", "_": b"3", ".hidden": b"4", "\ue000": b"5", "😀": b"6"}
    for name, content in names.items():
        (folder / name).write_bytes(content)
    java_order = [".hidden", "B", "_", "b", "😀", "\ue000"]  # UTF-16: D83D < E000
    expected = keccak(b"".join(hashlib.sha256(names[name]).digest() for name in java_order))
    assert digest.web2_result_digest(folder) == expected
    (tmp_path / "empty").mkdir()
    assert digest.web2_result_digest(tmp_path / "empty") == keccak(b"")
    (folder / "sub").mkdir()
    with pytest.raises(InputError, match="sub is a subfolder"):
        digest.web2_result_digest(folder)
    with pytest.raises(InputError, match="does not exist"):
        digest.web2_result_digest(tmp_path / "missing")


def test_hash_seal_message_formulas() -> None:
    task, worker, value = bytes.fromhex(TASK[2:]), bytes.fromhex(WORKER[2:]), keccak(b"r")
    assert digest.result_hash(TASK, value) == keccak(task + value)
    assert digest.result_seal(WORKER, TASK, value) == keccak(worker + task + value)
    assert digest.enclave_message(TASK, WORKER, value) == keccak(
        keccak(task + value) + keccak(worker + task + value))
    with pytest.raises(InputError, match="task id"):
        digest.result_hash("0x1234", value)
    with pytest.raises(InputError, match="worker"):
        digest.result_seal("0x" + "22" * 19, TASK, value)


def test_signature_recovers_the_challenge_and_nothing_else(tmp_path: Path) -> None:
    challenge = digest.EnclaveChallenge.create()
    assert repr(challenge) == f"EnclaveChallenge({challenge.address})"
    assert challenge.private_key_hex()[2:] not in repr(challenge)
    assert digest.EnclaveChallenge.from_hex(challenge.private_key_hex()).address == \
        challenge.address
    folder = tmp_path / "iexec_out"
    folder.mkdir()
    (folder / "result.txt").write_bytes(b"the answer is 42")
    value = digest.web2_result_digest(folder)
    signature = digest.sign_result(challenge, TASK, WORKER, value)
    assert len(signature) == 65 and signature[64] in (27, 28)
    message = keccak(digest.result_hash(TASK, value) + digest.result_seal(WORKER, TASK, value))
    assert Account.recover_message(encode_defunct(primitive=message),
                                   signature=signature) == challenge.address
    assert digest.check_signer(TASK, WORKER, value, signature, challenge.address.lower()) == \
        challenge.address
    short = signature[:32] + ((signature[64] - 27) << 255 | int.from_bytes(
        signature[32:64], "big")).to_bytes(32, "big")
    assert digest.recover_signer(TASK, WORKER, value, short) == challenge.address
    (folder / "result.txt").write_bytes(b"the answer is 43")
    others = [(TASK, WORKER, digest.web2_result_digest(folder), signature),
              ("0x" + "12" * 32, WORKER, value, signature),
              (TASK, "0x" + "23" * 20, value, signature),
              (TASK, WORKER, value, digest.sign_result(digest.EnclaveChallenge.create(),
                                                       TASK, WORKER, value))]
    for task, worker, other, signed in others:
        assert digest.recover_signer(task, worker, other, signed) != challenge.address
        with pytest.raises(IntegrityError, match="not " + challenge.address):
            digest.check_signer(task, worker, other, signed, challenge.address)


def test_malformed_signatures_and_keys_are_refused() -> None:
    challenge = digest.EnclaveChallenge(bytes(31) + b"\x07")
    value = keccak(b"r")
    signature = digest.sign_result(challenge.private_key_hex(), TASK, WORKER, value)
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    high_s = (signature[:32] + (n - int.from_bytes(signature[32:64], "big")).to_bytes(32, "big")
              + bytes([55 - signature[64]]))
    for bad in (signature[:64] + b"\x00", signature[:10], high_s, bytes(65)):
        with pytest.raises(InputError):
            digest.recover_signer(TASK, WORKER, value, bad)
    for key in (bytes(32), n.to_bytes(32, "big"), b"short"):
        with pytest.raises(InputError):
            digest.EnclaveChallenge(key)
    with pytest.raises(TypeError):
        pickle.dumps(challenge)
    good = challenge.address
    assert digest.parse_address(good.lower()) == digest.parse_address(good)
    mangled = good[:2] + good[2:].swapcase()
    with pytest.raises(InputError, match="EIP-55"):
        digest.parse_address(mangled)


# -- computed.json -----------------------------------------------------------------------


def test_computed_json_matches_iexec_and_is_sealed(tmp_path: Path) -> None:
    sample = members(result.decrypt_result(fixture("sdk_encryptedResults.zip"),
                                           fixture("sdk_expected_key")))["computed.json"]
    parsed = computed.parse_computed_json(sample)
    assert parsed.deterministic_output_path == "/iexec_out/result.txt" and not parsed.is_callback
    assert parsed.to_json() == sample == computed.computed_json(
        deterministic_output_path="/iexec_out/result.txt")
    (tmp_path / "result.txt").write_bytes(b"out")
    challenge = digest.EnclaveChallenge.create()
    sealed = computed.seal_computed(parsed, iexec_out=tmp_path, task_id=TASK.upper().replace(
        "0X", "0x"), worker=WORKER, challenge=challenge)
    assert sealed.task_id == TASK and sealed.result_digest == "0x" + hashlib.sha256(
        b"out").hexdigest()
    assert list(computed.parse_computed_json(sealed.to_json()).__dict__.values())[2:] == [
        sealed.task_id, sealed.result_digest, sealed.enclave_signature]
    assert digest.recover_signer(TASK, WORKER, sealed.result_digest or "",
                                 sealed.enclave_signature or "") == challenge.address
    web3 = computed.seal_computed(computed.parse_computed_json(
        json.dumps({"callback-data": ONE, "other": 1, "task-id": None})),
        iexec_out=tmp_path, task_id=TASK, worker=WORKER, challenge=challenge)
    assert web3.result_digest == digest.to_hex(keccak(bytes(31) + b"\x01"))


@pytest.mark.parametrize(("text", "fragment"), [
    ("[]", "JSON object"), ("{", "not JSON"), ("{}", "neither"),
    ('{"callback-data": 5}', "callback-data must be a string"),
    ('{"callback-data": "0xzz"}', "callback-data"),
    ('{"deterministic-output-path": "/x", "task-id": "0x12"}', "task-id"),
    ('{"deterministic-output-path": "/x", "enclave-signature": "0x00"}', "enclave-signature"),
])
def test_computed_json_refuses_malformed(text: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        computed.parse_computed_json(text)


def test_deterministic_path_stays_in_iexec_out(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)
    for path in ("/etc/passwd", "iexec_out/x", "/iexec_out/../etc", "/iexec_out/link"):
        with pytest.raises(InputError, match="deterministic-output-path"):
            computed.deterministic_path(computed.ComputedFile(path), tmp_path / "out")
    assert computed.deterministic_path(computed.ComputedFile("/iexec_out"),
                                       tmp_path / "out") == tmp_path / "out"
