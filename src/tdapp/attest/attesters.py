"""Attesters: the producers of attestation evidence, one interface, one backend per platform.

An :class:`Attester` turns the 64 bytes of ``report_data`` (:mod:`.binding`)
into evidence a verifier (:mod:`.verifiers`) understands:

* ``tsm``: Linux configfs-tsm (``/sys/kernel/config/tsm/report``), which gives
  TDX quotes (``{"tee": "tdx", "quote": …}``, with ``"event_log"`` when the
  kernel lets the runtime extend RTMR3 with the workload: see
  :mod:`tdapp.attest.eventlog`) and SEV-SNP reports
  (``{"tee": "snp", "report": …}`` plus ``vcek``/``ask``/``ark`` when the host
  supplies its certificates);
* ``gramine``: Gramine's ``/dev/attestation`` pseudo-files, which give SGX DCAP
  quotes (``{"tee": "sgx", "quote": …}``);
* ``sim``: the simulated LAS (:class:`tdapp.attest.las.LasClient`), for development.

Binary fields are standard base64 with padding. :func:`choose_attester` picks
one from the ``tee`` setting; :func:`probe_hardware` looks for hardware.

This module owns talking to those interfaces. It must never return evidence that
does not carry the caller's ``report_data`` (each backend checks the bytes are in
what it returns), never leave a configfs-tsm report entry behind, and never let
an OSError out: every failure is one line naming the path and the reason.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import secrets
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar

from tdapp.attest.binding import REPORT_DATA_SIZE, Workload
from tdapp.attest.eventlog import workload_event
from tdapp.errors import InputError, UnavailableError, UsageError

if TYPE_CHECKING:  # the LAS module pulls in aiohttp; hardware attesters do not need it
    from tdapp.attest.las import LasClient

DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")
DEFAULT_TDX_MEASUREMENTS = Path("/sys/class/misc/tdx_guest/measurements")  # Linux 6.16+
RTMR3_FILE = "rtmr3:sha384"
DEFAULT_EVENT_LOG = Path("/run/tdapp/rtmr3.log")
DEFAULT_GRAMINE_ROOT = Path("/dev/attestation")
TEE_SETTINGS = ("auto", "sim", "tsm", "gramine")
# Far above any real quote, report or certificate chain (the kernel caps outblob at
# 32 KiB); bounds what a broken or hostile interface can make us hold in memory.
MAX_BLOB = 1024 * 1024
MAX_TEXT = 4096  # generation, provider, attestation_type: a few bytes each
TSM_ATTEMPTS = 3
# An SEV certificate table entry: GUID (mixed-endian bytes), u32 LE offset, u32 LE length.
_CERT_ENTRY = struct.Struct("<16sII")
_CERT_NAMES = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark",
}
# Gramine's user_report_data and quote are one pair per process: two threads
# interleaving write/read could each get the other's quote.
_GRAMINE_LOCK = threading.Lock()
_T = TypeVar("_T")


class Attester(Protocol):
    """Produces evidence carrying ``report_data``; ``name`` is ``sim``, ``tsm`` or ``gramine``."""

    name: str

    def evidence(self, report_data: bytes, measurement: str, *,
                 workload: Workload | None = None) -> dict[str, Any]:
        """Evidence carrying the 64 bytes ``report_data``.

        ``measurement`` is used by ``sim`` only (the LAS signs what the runtime
        measured); hardware attesters ignore it, since the hardware measures.
        ``workload``, in a TDX guest whose kernel allows it, is extended into
        RTMR3 and logged before the quote is made.
        """
        ...


class _Fs:
    """The file operations the hardware attesters make: plain os calls on real paths.

    Exists so tests can stand in for the kernel: their subclass makes these same
    calls on a temporary folder and only adds what configfs does on top (creating
    attribute files on mkdir, bumping ``generation`` on an inblob write).
    """

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def exists(self, path: Path) -> bool:
        return os.path.lexists(path)

    def write(self, path: Path, data: bytes) -> None:
        # No O_CREAT: the kernel made these attribute files; creating one would
        # mean we are writing somewhere that is not the interface.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            # One write: configfs binary attributes take the buffer as a whole.
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise OSError(f"short write ({written} of {len(data)} bytes)")

    def read(self, path: Path, limit: int) -> bytes:
        """At most ``limit + 1`` bytes of ``path``: one more than allowed tells it is too large."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks: list[bytes] = []
            size = 0
            while size <= limit:
                chunk = os.read(fd, min(64 * 1024, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks)


class TsmAttester:
    """TDX or SEV-SNP evidence through Linux configfs-tsm.

    The kernel's protocol (Documentation/ABI/testing/configfs-tsm): make an entry
    folder, write inblob, read outblob (and auxblob), check generation, remove it.
    """

    name = "tsm"

    def __init__(self, root: Path = DEFAULT_TSM_ROOT, *,
                 measurements: Path = DEFAULT_TDX_MEASUREMENTS,
                 event_log: Path = DEFAULT_EVENT_LOG) -> None:
        self.root = root
        self.measurements = measurements
        self.event_log = event_log
        self._fs = _Fs()

    def evidence(self, report_data: bytes, measurement: str, *,
                 workload: Workload | None = None) -> dict[str, Any]:
        _check_report_data(report_data)
        rtmr3 = self.measurements / RTMR3_FILE
        if workload is not None and self._fs.exists(rtmr3):
            # Extend, quote and read the log under one lock: another run in this VM
            # extending in between would make the log and the quote disagree.
            with _locked_log(self.event_log) as log:
                event = workload_event(workload)
                _io(lambda path: self._fs.write(path, event.digest()), rtmr3,
                    "cannot extend RTMR3 through")
                log.write((event.line() + "\n").encode("utf-8"))
                log.flush()
                os.fsync(log.fileno())
                evidence = self._quote(report_data)
                if evidence["tee"] == "tdx":
                    evidence["event_log"] = _log_lines(self.event_log)
                return evidence
        return self._quote(report_data)

    def _quote(self, report_data: bytes) -> dict[str, Any]:
        # A fresh entry per report: entries are shared state between writers, and
        # a random name keeps other programs (and our other threads) out of ours.
        entry = self.root / f"tdapp-{secrets.token_hex(8)}"
        _io(self._fs.mkdir, entry, "cannot create the tsm report entry")
        try:
            evidence = self._generate(entry, report_data)
        except BaseException:
            # The error being raised says more than a failed cleanup would.
            with contextlib.suppress(OSError):
                self._fs.rmdir(entry)
            raise
        _io(self._fs.rmdir, entry, "cannot remove the tsm report entry")
        return evidence

    def _generate(self, entry: Path, report_data: bytes) -> dict[str, Any]:
        # Read first and once: it is fixed for the entry, and an unsupported
        # provider is refused before any report is made.
        provider = _text(self._fs, entry / "provider")
        if provider not in ("tdx_guest", "sev_guest"):
            raise UnavailableError(f"tsm provider {provider[:40]} is not supported "
                                   f"(read from {entry / 'provider'}; expected tdx_guest "
                                   "or sev_guest)")
        for _ in range(TSM_ATTEMPTS):
            blobs = self._attempt(entry, report_data)
            if blobs is not None:
                outblob, auxblob = blobs
                _require_carries(outblob, report_data, entry / "outblob")
                if provider == "tdx_guest":
                    return {"tee": "tdx", "quote": _b64(outblob)}
                return {"tee": "snp", "report": _b64(outblob),
                        **_certificates(auxblob, entry / "auxblob")}
        raise UnavailableError(f"the tsm report entry {entry} was changed concurrently "
                               f"{TSM_ATTEMPTS} times in a row; is another program writing "
                               "its inblob?")

    def _attempt(self, entry: Path, report_data: bytes) -> tuple[bytes, bytes] | None:
        """(outblob, auxblob) made for our inblob, or None when another write raced ours."""
        # generation increments on every inblob write: exactly one more than before
        # ours means the inblob holds our bytes; the same value after reading
        # outblob means the report read was made from them.
        before = self._generation(entry)
        _io(lambda path: self._fs.write(path, report_data), entry / "inblob",
            "cannot write the report data to")
        written = self._generation(entry)
        if written == before:
            raise UnavailableError(f"the kernel did not take the report data written to "
                                   f"{entry / 'inblob'} (generation stayed {before})")
        if written != before + 1:
            return None
        outblob = _read(self._fs, entry / "outblob", MAX_BLOB)
        auxblob = b""
        if self._fs.exists(entry / "auxblob"):  # SNP's certificates; absent on older kernels
            auxblob = _read(self._fs, entry / "auxblob", MAX_BLOB)
        if self._generation(entry) != written:
            return None
        if not outblob:
            raise UnavailableError(f"{entry / 'outblob'} is empty: the kernel made no report")
        return outblob, auxblob

    def _generation(self, entry: Path) -> int:
        text = _text(self._fs, entry / "generation")
        if not text.isdigit():
            raise UnavailableError(f"{entry / 'generation'} does not hold a decimal number "
                                   f"(got {text[:40]!r})")
        return int(text)


@contextlib.contextmanager
def _locked_log(path: Path) -> Iterator[BinaryIO]:
    """The event log, opened to append, under an exclusive lock."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise UnavailableError(f"cannot open the runtime event log {path}: "
                               f"{error.strerror or error}") from None
    with os.fdopen(fd, "ab") as log:
        fcntl.flock(log.fileno(), fcntl.LOCK_EX)
        yield log


def _log_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UnavailableError(f"cannot read the runtime event log {path}: {error}") from None
    return text.splitlines()


class GramineAttester:
    """SGX DCAP quotes through Gramine's ``/dev/attestation`` pseudo-files."""

    name = "gramine"

    def __init__(self, root: Path = DEFAULT_GRAMINE_ROOT) -> None:
        self.root = root
        self._fs = _Fs()

    def evidence(self, report_data: bytes, measurement: str, *,
                 workload: Workload | None = None) -> dict[str, Any]:
        _check_report_data(report_data)
        if not self._fs.exists(self.root):
            raise UnavailableError(f"{self.root} does not exist: not running inside Gramine "
                                   "with remote attestation enabled")
        kind_path = self.root / "attestation_type"
        # Older Gramine has no attestation_type; then the quote file answers for itself.
        if self._fs.exists(kind_path):
            kind = _text(self._fs, kind_path)
            if kind != "dcap":
                raise UnavailableError(f"gramine attestation type {kind[:40]} is not supported "
                                       f"(read from {kind_path}; only dcap is)")
        with _GRAMINE_LOCK:
            _io(lambda path: self._fs.write(path, report_data), self.root / "user_report_data",
                "cannot write the report data to")
            quote = _read(self._fs, self.root / "quote", MAX_BLOB)
        if not quote:
            raise UnavailableError(f"{self.root / 'quote'} is empty: Gramine made no quote")
        _require_carries(quote, report_data, self.root / "quote")
        return {"tee": "sgx", "quote": _b64(quote)}


class SimAttester:
    """Sim evidence signed by a (simulated) LAS; protects nothing against the host's root."""

    name = "sim"

    def __init__(self, las: LasClient) -> None:
        self.las = las

    def evidence(self, report_data: bytes, measurement: str, *,
                 workload: Workload | None = None) -> dict[str, Any]:
        _check_report_data(report_data)
        evidence = self.las.evidence(report_data, measurement)
        # A LAS is another process: check it signed our report data, not something else.
        if _sim_report_data(evidence) != report_data.hex():
            raise UnavailableError(f"the LAS at {self.las.address} answered evidence that "
                                   "does not carry the report data asked for")
        return evidence


def probe_hardware(tsm_root: Path = DEFAULT_TSM_ROOT,
                   gramine_root: Path = DEFAULT_GRAMINE_ROOT) -> Attester | None:
    """TsmAttester if the configfs-tsm report folder exists and is writable,
    GramineAttester if ``gramine_root/quote`` exists, else None."""
    if _tsm_usable(tsm_root):
        return TsmAttester(tsm_root)
    if os.path.lexists(gramine_root / "quote"):
        return GramineAttester(gramine_root)
    return None


def choose_attester(tee: str, *, las: LasClient | None,
                    tsm_root: Path = DEFAULT_TSM_ROOT,
                    gramine_root: Path = DEFAULT_GRAMINE_ROOT,
                    sim_allowed: bool = True) -> Attester:
    """The attester for ``tee`` (auto, sim, tsm or gramine).

    auto: the hardware :func:`probe_hardware` finds, else sim when ``sim_allowed``.
    sim needs ``las``. tsm and gramine: that attester, if its interface is there.
    """
    if tee == "auto":
        found = probe_hardware(tsm_root, gramine_root)
        if found is not None:
            return found
        if not sim_allowed:
            raise UnavailableError(f"no TEE was found (neither {tsm_root} nor "
                                   f"{gramine_root / 'quote'} is usable) and this session "
                                   "needs hardware attestation")
        return _sim(las)
    if tee == "sim":
        if not sim_allowed:
            raise UsageError("tee sim was asked for, but this session needs hardware "
                             "attestation")
        return _sim(las)
    if tee == "tsm":
        if not os.path.isdir(tsm_root):
            raise UnavailableError(f"the configfs-tsm interface {tsm_root} does not exist "
                                   "(no TDX or SEV-SNP guest, or a kernel without TSM_REPORTS)")
        if not _tsm_usable(tsm_root):
            raise UnavailableError(f"the configfs-tsm interface {tsm_root} is not writable "
                                   "by this user (it needs root)")
        return TsmAttester(tsm_root)
    if tee == "gramine":
        if not os.path.lexists(gramine_root / "quote"):
            raise UnavailableError(f"{gramine_root / 'quote'} does not exist: not running "
                                   "inside Gramine with remote attestation enabled")
        return GramineAttester(gramine_root)
    raise UsageError(f"unknown tee {tee[:40]!r} (expected {', '.join(TEE_SETTINGS)})")


def _sim(las: LasClient | None) -> SimAttester:
    if las is None:
        raise UsageError("tee sim needs a LAS to sign its evidence, and none was given")
    return SimAttester(las)


def _tsm_usable(root: Path) -> bool:
    return os.path.isdir(root) and os.access(root, os.W_OK | os.X_OK)


def _check_report_data(report_data: bytes) -> None:
    if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_SIZE:
        got = len(report_data) if isinstance(report_data, bytes) else type(report_data).__name__
        raise InputError(f"report_data must be {REPORT_DATA_SIZE} bytes, got {got}")


def _require_carries(blob: bytes, report_data: bytes, where: Path) -> None:
    # Every format we return (TDX and SGX quotes, SNP reports) holds REPORTDATA
    # verbatim; a blob without it was made for someone else's request.
    if report_data not in blob:
        raise UnavailableError(f"{where} does not carry the report data written for it")


def _certificates(table: bytes, where: Path) -> dict[str, str]:
    """The VCEK, ASK and ARK found in an SEV certificate table, base64 DER by name."""
    certificates: dict[str, str] = {}
    position = 0
    while table:  # an empty auxblob: the host supplies no certificates
        if position + _CERT_ENTRY.size > len(table):
            raise UnavailableError(f"{where}: the certificate table has no all-zero end entry "
                                   f"within its {len(table)} bytes")
        raw_guid, offset, length = _CERT_ENTRY.unpack_from(table, position)
        position += _CERT_ENTRY.size
        if raw_guid == bytes(16) and offset == 0 and length == 0:
            break
        guid = uuid.UUID(bytes_le=raw_guid)
        if length == 0 or offset > len(table) or length > len(table) - offset:
            raise UnavailableError(f"{where}: certificate {guid} at offset {offset}, length "
                                   f"{length} does not fit in the {len(table)}-byte table")
        name = _CERT_NAMES.get(guid)
        if name is None:
            continue  # other certificates (a VLEK, vendor extras) are not ours to pass on
        if name in certificates:
            raise UnavailableError(f"{where}: the certificate table lists the {name} twice")
        certificates[name] = _b64(table[offset:offset + length])
    return certificates


def _sim_report_data(evidence: dict[str, Any]) -> str | None:
    """The report_data hex a sim evidence's body claims, None if it has none."""
    try:
        body = json.loads(base64.b64decode(str(evidence.get("body", "")), validate=True))
    except (binascii.Error, ValueError):
        return None
    value = body.get("report_data") if isinstance(body, dict) else None
    return value if isinstance(value, str) else None


def _text(fs: _Fs, path: Path) -> str:
    data = _read(fs, path, MAX_TEXT)
    return " ".join(data.decode("utf-8", errors="replace").split())


def _read(fs: _Fs, path: Path, limit: int) -> bytes:
    data = _io(lambda p: fs.read(p, limit), path, "cannot read")
    if len(data) > limit:
        raise UnavailableError(f"{path} holds more than {limit} bytes")
    return data


def _io(operation: Callable[[Path], _T], path: Path, what: str) -> _T:
    try:
        return operation(path)
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise UnavailableError(f"{what} {path}: {reason}") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
