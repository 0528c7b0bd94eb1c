"""iExec's result format: the zip of ``iexec_out`` and its encryption for the beneficiary.

Owns, byte for byte as iexec-common / tee-worker-post-compute write them and
iexec-sdk ``result-utils.js`` reads them:

- the result zip: every regular file under the output folder, named by its path
  relative to that folder (no ``iexec_out/`` prefix), deflated; a file name of
  more than 31 characters is refused, as the post-compute enclave refuses it;
- the encrypted result: a zip of ``aes-key.rsa`` = RSA-PKCS#1 v1.5 (beneficiary
  key) of a fresh 32-byte AES key and ``iexec_out.zip.aes`` = ``IV(16) ‖
  AES-256-CBC(PKCS#7(result zip))``; and, to read old results, the 2020 format
  (base64 text of RSA(base64 text of a 16-byte key), base64 text of
  AES-128-ECB(PKCS#7(zip)));
- the beneficiary key pair: RSA-4096, e = 65537, PKCS#8 and SubjectPublicKeyInfo
  PEM, the forms ``iexec result generate-encryption-keypair`` writes.

Unpacking is the one place untrusted names reach the file system: no absolute
paths, no ``..``, no links or devices, bounded count and size, and the target
appears whole or not at all. This module must never put key material in a
message, and never pass a name from a zip to the file system unchecked.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import shutil
import stat
import zipfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asymmetric_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tdapp.core.atomic import fsync_directory, temporary_sibling
from tdapp.errors import InputError

KEY_FILE = "aes-key.rsa"
"""The outer member holding the RSA-encrypted AES key."""
DATA_FILE = "iexec_out.zip.aes"
"""The outer member holding the AES-encrypted result zip."""
MAX_NAME_LENGTH = 31
"""The longest result file name iExec's post-compute enclave accepts (Java characters)."""
MAX_RESULT_BYTES = 1_000_000_000
"""Default bound on a result zip and on what unpacking it writes (iexec-sdk's: 1 GB)."""
MAX_MEMBERS = 10_000
_MAX_KEY_MEMBER = 1_000  # iexec-sdk's bound on aes-key.rsa
_RSA_BITS = 4096
_MIN_RSA_BITS = 2048
_BLOCK = 16
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # a fixed time, so that packing a folder is reproducible
_WRONG = "wrong key or not an iExec encrypted result"


# -- keys ------------------------------------------------------------------------------


def generate_beneficiary_key() -> tuple[bytes, bytes]:
    """A fresh RSA-4096 beneficiary key pair: (PKCS#8 private PEM, SubjectPublicKeyInfo PEM)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
    private_pem = private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


def _pem(text: bytes) -> bytes:
    # iExec hands the public key around as base64 of its PEM (RESULT_ENCRYPTION_PUBLIC_KEY).
    if b"-----BEGIN" in text:
        return text
    with contextlib.suppress(binascii.Error, ValueError):
        return base64.b64decode(b"".join(text.split()), validate=True)
    return text


def load_public_key(public_pem: bytes) -> rsa.RSAPublicKey:
    """An RSA public key from PEM (SubjectPublicKeyInfo or PKCS#1), or base64 of that PEM."""
    try:
        key = serialization.load_pem_public_key(_pem(public_pem))
    except (ValueError, UnsupportedAlgorithm):
        raise InputError("the beneficiary public key is not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise InputError("the beneficiary public key is not an RSA key")
    if key.key_size < _MIN_RSA_BITS:
        raise InputError(f"the beneficiary public key has {key.key_size} bits; "
                         f"at least {_MIN_RSA_BITS} are needed")
    return key


def load_private_key(private_pem: bytes) -> rsa.RSAPrivateKey:
    """An RSA private key from unencrypted PEM (PKCS#8 or PKCS#1)."""
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except TypeError:
        raise InputError("the beneficiary private key is password-protected; "
                         "give an unencrypted PEM") from None
    except (ValueError, UnsupportedAlgorithm):
        raise InputError("the beneficiary private key is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise InputError("the beneficiary private key is not an RSA key")
    return key


# -- packing ---------------------------------------------------------------------------


def java_length(name: str) -> int:
    """``name``'s length as Java counts it (UTF-16 code units), which iExec's limit uses."""
    return len(name.encode("utf-16-le", "surrogatepass")) // 2


def _result_files(folder: Path) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    pending = [(folder, "")]
    while pending:
        current, prefix = pending.pop()
        for entry in sorted(os.scandir(current), key=lambda item: item.name):
            path = Path(entry.path)
            name = prefix + entry.name
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                pending.append((path, name + "/"))
            elif not stat.S_ISREG(mode):
                raise InputError(f"{path} is not a regular file (links and special files "
                                 "cannot be in an iExec result)")
            elif java_length(entry.name) > MAX_NAME_LENGTH:
                raise InputError(f"result file name {entry.name!r} is longer than "
                                 f"{MAX_NAME_LENGTH} characters, which iExec refuses ({path})")
            else:
                found.append((name, path))
    return sorted(found)


def pack_result(folder: Path) -> bytes:
    """The result zip of ``folder`` as iExec makes it of ``/iexec_out``.

    Members are the folder's regular files (recursively), named relative to the
    folder, deflated, in name order; empty subfolders are not kept (iExec does
    not keep them either). InputError for a link, a special file, or a file name
    over 31 characters.
    """
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, path in _result_files(folder):
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            try:
                archive.writestr(info, path.read_bytes())
            except UnicodeEncodeError:
                raise InputError(f"{path}: the file name is not valid UTF-8") from None
    return buffer.getvalue()


# -- encryption ------------------------------------------------------------------------


def encrypt_result(result_zip: bytes, public_pem: bytes) -> bytes:
    """The encrypted result for a beneficiary: a zip of aes-key.rsa and iexec_out.zip.aes."""
    public = load_public_key(public_pem)
    key, iv = os.urandom(32), os.urandom(_BLOCK)
    padder = padding.PKCS7(_BLOCK * 8).padder()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    data = iv + encryptor.update(padder.update(result_zip) + padder.finalize())
    data += encryptor.finalize()
    wrapped = public.encrypt(key, asymmetric_padding.PKCS1v15())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        # The order and compression of iexec-sdk's own sample.
        archive.writestr(zipfile.ZipInfo(DATA_FILE, date_time=_ZIP_TIME), data,
                         compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr(zipfile.ZipInfo(KEY_FILE, date_time=_ZIP_TIME), wrapped,
                         compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def _member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise InputError(f"not an iExec encrypted result: it has no {name}") from None
    if info.file_size > limit:
        raise InputError(f"not an iExec encrypted result: {name} is larger than {limit} bytes")
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError) as error:
        raise InputError(f"not an iExec encrypted result: cannot read {name} "
                         f"({type(error).__name__})") from None


def _rsa_ciphertext(stored: bytes, size: int) -> bytes:
    if len(stored) == size:
        return stored
    try:  # the 2020 format keeps it as base64 text
        decoded = base64.b64decode(b"".join(stored.split()), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != size:
        raise InputError(f"{_WRONG}: {KEY_FILE} does not fit a {size * 8}-bit key")
    return decoded


def _unpad(padded: bytes) -> bytes:
    unpadder = padding.PKCS7(_BLOCK * 8).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise InputError(_WRONG) from None


def _decrypt_current(key: bytes, data: bytes) -> bytes:
    if len(data) < 2 * _BLOCK or len(data) % _BLOCK:
        raise InputError(_WRONG)
    decryptor = Cipher(algorithms.AES(key), modes.CBC(data[:_BLOCK])).decryptor()
    return _unpad(decryptor.update(data[_BLOCK:]) + decryptor.finalize())


def _decrypt_legacy(key_text: bytes, data: bytes) -> bytes:
    try:
        key = base64.b64decode(key_text, validate=True)
        encrypted = base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(_WRONG) from None
    if len(key) not in (16, 24, 32) or not encrypted or len(encrypted) % _BLOCK:
        raise InputError(_WRONG)
    # ECB only to read results written in 2020; nothing is ever encrypted this way.
    decryptor = Cipher(algorithms.AES(key), modes.ECB()).decryptor()  # noqa: S305
    return _unpad(decryptor.update(encrypted) + decryptor.finalize())


def decrypt_result(blob: bytes, private_pem: bytes, *,
                   max_bytes: int = MAX_RESULT_BYTES) -> bytes:
    """The result zip inside an encrypted result (current or 2020 format).

    InputError with one line if ``blob`` is not an encrypted result or the key is
    not the beneficiary's. RSA-PKCS#1 v1.5 decryption with a wrong key yields
    random bytes rather than an error (implicit rejection), so the wrong key is
    caught by the AES padding and then by the zip's structure and CRCs, which
    are also all that catch a modified ciphertext (the format has no MAC).
    """
    private = load_private_key(private_pem)
    try:
        archive = zipfile.ZipFile(io.BytesIO(blob))
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise InputError("not an iExec encrypted result (not a zip)") from None
    with archive:
        stored_key = _member(archive, KEY_FILE, _MAX_KEY_MEMBER)
        data = _member(archive, DATA_FILE, 2 * max_bytes)  # the 2020 format's base64 grows it
    ciphertext = _rsa_ciphertext(stored_key, (private.key_size + 7) // 8)
    try:
        aes_key = private.decrypt(ciphertext, asymmetric_padding.PKCS1v15())
    except ValueError:
        raise InputError(_WRONG) from None
    inner = (_decrypt_current(aes_key, data) if len(aes_key) == 32
             else _decrypt_legacy(aes_key, data))
    if len(inner) > max_bytes:
        raise InputError(f"the result zip is larger than {max_bytes} bytes")
    _check_inner(inner, max_bytes)
    return inner


def _check_inner(inner: bytes, max_bytes: int) -> None:
    # CBC has no MAC: a wrong key that passes the padding check, or a modified
    # ciphertext, shows only as a zip that does not parse or whose CRCs fail.
    try:
        with zipfile.ZipFile(io.BytesIO(inner)) as archive:
            infos = archive.infolist()
            if len(infos) > MAX_MEMBERS or sum(info.file_size for info in infos) > max_bytes:
                raise InputError(f"the result holds more than {MAX_MEMBERS} members or "
                                 f"{max_bytes} bytes")
            damaged = archive.testzip()
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError, RuntimeError):
        raise InputError(_WRONG) from None
    if damaged is not None:
        raise InputError(f"{_WRONG}: the decrypted zip is damaged (modified in transit?)")


# -- unpacking -------------------------------------------------------------------------


def _member_path(info: zipfile.ZipInfo) -> tuple[str, ...]:
    name = info.filename
    shown = repr(name[:120])
    parts = tuple(name.rstrip("/").split("/")) if name.rstrip("/") else ()
    if (not parts or name.startswith("/") or "\\" in name
            or any(ord(char) < 0x20 or ord(char) == 0x7F for char in name)
            or any(part in ("", ".", "..") for part in parts)
            or (len(parts[0]) >= 2 and parts[0][1] == ":")):
        raise InputError(f"refused result member {shown}: not a plain relative path")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise InputError(f"refused result member {shown}: a link or special file")
    return parts


_Plan = list[tuple[zipfile.ZipInfo, tuple[str, ...]]]


def _plan(archive: zipfile.ZipFile, max_bytes: int) -> _Plan:
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise InputError(f"the result has more than {MAX_MEMBERS} members")
    plan: _Plan = []
    files: set[tuple[str, ...]] = set()
    folders: set[tuple[str, ...]] = set()
    total = 0
    for info in infos:
        parts = _member_path(info)
        for depth in range(1, len(parts)):
            folders.add(parts[:depth])
        if info.is_dir():
            folders.add(parts)
            continue
        if parts in files:
            raise InputError(f"refused result: member {info.filename[:120]!r} appears twice")
        files.add(parts)
        total += info.file_size
        if total > max_bytes:
            raise InputError(f"the result unpacks to more than {max_bytes} bytes")
        plan.append((info, parts))
    clash = files & folders
    if clash:
        raise InputError(f"refused result: {'/'.join(min(clash))[:120]!r} is both a file "
                         "and a folder")
    return plan


def unpack_result(inner_zip: bytes, target: Path, *,
                  max_bytes: int = MAX_RESULT_BYTES) -> list[str]:
    """Extract a result zip into ``target`` (new, or an empty folder); return the files' names.

    Every member is checked before anything is written: a plain relative path
    (no absolute path, no ``..``, no backslash, no drive, no control
    characters, which could rewrite a terminal showing the name), not a link or
    special file, no duplicates, at most MAX_MEMBERS members and ``max_bytes``
    bytes in all. Files are written 0600 and folders 0700 (a decrypted result
    is the beneficiary's alone) into a temporary sibling, renamed to ``target``
    only once all is written.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(inner_zip))
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise InputError("not a result zip") from None
    if target.is_symlink() or (target.exists() and (not target.is_dir()
                                                    or any(target.iterdir()))):
        raise InputError(f"{target} exists and is not an empty folder")
    with archive:
        plan = _plan(archive, max_bytes)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = temporary_sibling(target)
        staging.mkdir(mode=0o700)
        try:
            for info, parts in plan:
                _extract(archive, info, staging.joinpath(*parts), max_bytes)
            for info in archive.infolist():
                if info.is_dir():
                    staging.joinpath(*_member_path(info)).mkdir(mode=0o700, parents=True,
                                                                 exist_ok=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    fsync_directory(target.parent)
    return ["/".join(parts) for _, parts in plan]


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, limit: int) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    written = 0
    try:
        with archive.open(info) as source, os.fdopen(os.open(path, flags, 0o600), "wb") as sink:
            while piece := source.read(1 << 20):
                written += len(piece)
                if written > limit:
                    raise InputError(f"the result unpacks to more than {limit} bytes")
                sink.write(piece)
            sink.flush()
            os.fsync(sink.fileno())
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError) as error:
        raise InputError(f"result member {info.filename[:120]!r} is damaged or unsupported "
                         f"({type(error).__name__})") from None
