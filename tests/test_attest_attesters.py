"""Hardware attesters against temporary folders that behave like the kernel's interfaces.

configfs-tsm is emulated by ``FakeConfigfs``, a subclass of the attesters' ``_Fs``
whose every method first makes the real os call on a real temporary folder
(``super()``) and then adds only what the kernel would do: make the attribute
files on mkdir, bump ``generation`` and remake ``outblob`` on an inblob write,
drop the attribute files on rmdir. So the attester's own code runs unchanged;
tests with the plain ``_Fs`` check the real os path too. Gramine's pseudo-files
are plain files here, which is all they look like from inside.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdapp.attest import Workload, report_data
from tdapp.attest.attesters import (
    MAX_BLOB,
    TSM_ATTEMPTS,
    GramineAttester,
    SimAttester,
    TsmAttester,
    _Fs,
    choose_attester,
    probe_hardware,
)
from tdapp.attest.las import LasClient
from tdapp.attest.sim import sign_evidence
from tdapp.errors import InputError, UnavailableError, UsageError

DATA = report_data("a nonce", b"an ephemeral key", Workload("c0" * 32, "a session", "a service"))
OTHER = bytes(range(64))  # another writer's report data
MEASUREMENT = "c0" * 32
VCEK = "63da758d-e664-4564-adc5-f4b93be8accd"
ASK = "4ab7b379-bbac-4fe4-a02f-05aef327c782"
ARK = "c0b406a4-a803-4952-9743-3fb6014cd0ae"
VLEK = "a8074bc2-a25a-483e-aae6-39c045a0b8a1"


def tdx_quote(inblob: bytes) -> bytes:
    return b"TDXQUOTE" + bytes(560) + inblob


def snp_report(inblob: bytes) -> bytes:
    return bytes(0x50) + inblob + bytes(1184 - 0x50 - 64)  # REPORT_DATA at 0x50


class FakeConfigfs(_Fs):
    """configfs-tsm's side effects over the real os calls of ``_Fs``."""

    def __init__(self, provider: str | None = "tdx_guest", auxblob: bytes | None = b"",
                 make_outblob: Callable[[bytes], bytes] = tdx_quote) -> None:
        self.provider = provider
        self.auxblob = auxblob
        self.make_outblob = make_outblob
        self.late_races = 0   # outblob reads after which another writer writes inblob
        self.early_races = 0  # our inblob writes right after which another writer writes
        self.ignore_writes = False  # the kernel refuses the inblob write
        self.made: list[Path] = []
        self.removed: list[Path] = []
        self.inblob_writes = 0

    def mkdir(self, path: Path) -> None:
        super().mkdir(path)
        self.made.append(path)
        (path / "inblob").write_bytes(b"")
        (path / "outblob").write_bytes(b"")
        (path / "generation").write_text("0\n")
        if self.provider is not None:
            (path / "provider").write_text(self.provider + "\n")
        if self.auxblob is not None:
            (path / "auxblob").write_bytes(self.auxblob)

    def write(self, path: Path, data: bytes) -> None:
        if path.name == "rtmr3:sha384":
            # The kernel's measurement interface extends; it never sets.
            assert len(data) == 48, "an RTMR extension is one SHA-384 digest"
            path.write_bytes(hashlib.sha384(path.read_bytes() + data).digest())
            return
        super().write(path, data)
        if path.name == "inblob":
            self.inblob_writes += 1
            self._written(path.parent)
            if self.early_races:
                self.early_races -= 1
                self._other_writer(path.parent)

    def read(self, path: Path, limit: int) -> bytes:
        data = super().read(path, limit)
        if path.name == "outblob" and self.late_races:
            self.late_races -= 1
            self._other_writer(path.parent)
        return data

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():  # configfs drops its attribute files itself
            child.unlink()
        super().rmdir(path)
        self.removed.append(path)

    def _other_writer(self, entry: Path) -> None:
        super().write(entry / "inblob", OTHER)
        self._written(entry)

    def _written(self, entry: Path) -> None:
        if self.ignore_writes:
            return
        generation = int((entry / "generation").read_text()) + 1
        (entry / "generation").write_text(f"{generation}\n")
        (entry / "outblob").write_bytes(self.make_outblob((entry / "inblob").read_bytes()))


def tsm(root: Path, fake: FakeConfigfs) -> TsmAttester:
    attester = TsmAttester(root)
    attester._fs = fake
    return attester


def cert_table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """An SEV certificate table: (raw 16-byte GUID, DER) entries, an all-zero end, the DERs."""
    start = 24 * (len(entries) + 1)
    heads, blobs = b"", b""
    for raw_guid, der in entries:
        heads += struct.pack("<16sII", raw_guid, start + len(blobs), len(der))
        blobs += der
    return heads + bytes(24) + blobs


def le(guid: str) -> bytes:
    return uuid.UUID(guid).bytes_le


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def assert_clean(root: Path, fake: FakeConfigfs | None = None) -> None:
    assert list(root.iterdir()) == []
    if fake is not None:
        assert fake.made and fake.removed == fake.made


# --- tsm ---------------------------------------------------------------------------------

def test_tdx_quote_carries_the_report_data(tmp_path: Path) -> None:
    fake = FakeConfigfs("tdx_guest")
    evidence = tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)
    assert evidence == {"tee": "tdx", "quote": b64(tdx_quote(DATA))}
    assert fake.inblob_writes == 1
    assert fake.made[0].name.startswith("tdapp-")
    assert_clean(tmp_path, fake)


def test_entry_names_are_fresh_per_report(tmp_path: Path) -> None:
    fake = FakeConfigfs("tdx_guest")
    attester = tsm(tmp_path, fake)
    attester.evidence(DATA, MEASUREMENT)
    attester.evidence(DATA, MEASUREMENT)
    assert len({path.name for path in fake.made}) == 2
    assert_clean(tmp_path, fake)


def test_snp_report_with_certificate_table(tmp_path: Path) -> None:
    ders = {"vcek": b"\x30\x82VCEK-DER", "ask": b"\x30\x82ASK-DER", "ark": b"\x30\x82ARK-DER"}
    table = cert_table([(le(VLEK), b"vlek"), (le(VCEK), ders["vcek"]), (le(ASK), ders["ask"]),
                        (le(ARK), ders["ark"])]) + bytes(100)  # kernel buffers may pad
    fake = FakeConfigfs("sev_guest", auxblob=table, make_outblob=snp_report)
    evidence = tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)
    assert evidence == {"tee": "snp", "report": b64(snp_report(DATA)),
                        **{name: b64(der) for name, der in ders.items()}}
    assert_clean(tmp_path, fake)


def test_guids_are_read_in_mixed_endian_order(tmp_path: Path) -> None:
    # VCEK's GUID as the spec lays it out in memory; big-endian bytes are another GUID.
    assert le(VCEK) == bytes.fromhex("8d75da6364e66445adc5f4b93be8accd")
    table = cert_table([(uuid.UUID(VCEK).bytes, b"not the vcek")])
    fake = FakeConfigfs("sev_guest", auxblob=table, make_outblob=snp_report)
    assert "vcek" not in tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)


@pytest.mark.parametrize("auxblob", [b"", bytes(24), bytes(4096), None],
                         ids=["empty", "end-only", "zeros", "absent"])
def test_snp_without_certificates(tmp_path: Path, auxblob: bytes | None) -> None:
    fake = FakeConfigfs("sev_guest", auxblob=auxblob, make_outblob=snp_report)
    evidence = tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)
    assert evidence == {"tee": "snp", "report": b64(snp_report(DATA))}
    assert_clean(tmp_path, fake)


@pytest.mark.parametrize(("auxblob", "reason"), [
    (struct.pack("<16sII", le(VCEK), 10_000, 4) + bytes(24), "does not fit"),
    (struct.pack("<16sII", le(VCEK), 40, 0xFFFFFFFF) + bytes(24), "does not fit"),
    (struct.pack("<16sII", le(VCEK), 0, 0) + bytes(24), "does not fit"),
    (struct.pack("<16sII", le(VCEK), 0, 8) + bytes(10), "no all-zero end entry"),
    (cert_table([(le(ASK), b"one"), (le(ASK), b"two")]), "the ask twice"),
], ids=["offset-beyond-end", "length-beyond-end", "empty-certificate", "no-end", "duplicate"])
def test_malformed_certificate_table(tmp_path: Path, auxblob: bytes, reason: str) -> None:
    fake = FakeConfigfs("sev_guest", auxblob=auxblob, make_outblob=snp_report)
    with pytest.raises(UnavailableError, match="auxblob") as raised:
        tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)
    assert reason in str(raised.value)
    assert_clean(tmp_path, fake)


def test_a_writer_racing_after_our_write_is_retried(tmp_path: Path) -> None:
    fake = FakeConfigfs("tdx_guest")
    fake.late_races = TSM_ATTEMPTS - 1
    evidence = tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)
    assert evidence == {"tee": "tdx", "quote": b64(tdx_quote(DATA))}
    assert fake.inblob_writes == TSM_ATTEMPTS
    assert_clean(tmp_path, fake)


def test_a_writer_slipping_in_before_our_generation_read_is_retried(tmp_path: Path) -> None:
    # The outblob would then be the other writer's, with a steady generation after it:
    # only the generation read before our write shows the extra write.
    fake = FakeConfigfs("tdx_guest")
    fake.early_races = 1
    evidence = tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)
    assert evidence == {"tee": "tdx", "quote": b64(tdx_quote(DATA))}
    assert fake.inblob_writes == 2
    assert_clean(tmp_path, fake)


@pytest.mark.parametrize("where", ["late", "early"])
def test_a_writer_that_keeps_racing_is_refused(tmp_path: Path, where: str) -> None:
    fake = FakeConfigfs("tdx_guest")
    setattr(fake, f"{where}_races", 1000)
    with pytest.raises(UnavailableError, match="changed concurrently"):
        tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)
    assert fake.inblob_writes == TSM_ATTEMPTS
    assert_clean(tmp_path, fake)


def test_a_refused_inblob_write_is_not_taken_for_a_race(tmp_path: Path) -> None:
    fake = FakeConfigfs("tdx_guest")
    fake.ignore_writes = True
    with pytest.raises(UnavailableError, match="did not take the report data"):
        tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)
    assert_clean(tmp_path, fake)


def test_missing_provider(tmp_path: Path) -> None:
    fake = FakeConfigfs(provider=None)
    with pytest.raises(UnavailableError, match=r"cannot read .*/provider: "):
        tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)
    assert_clean(tmp_path, fake)


def test_unknown_provider(tmp_path: Path) -> None:
    fake = FakeConfigfs(provider="arm_cca_guest")
    with pytest.raises(UnavailableError, match="tsm provider arm_cca_guest is not supported"):
        tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)
    assert fake.inblob_writes == 0  # refused before any report was made
    assert_clean(tmp_path, fake)


def test_outblob_without_our_report_data_is_refused(tmp_path: Path) -> None:
    fake = FakeConfigfs("tdx_guest", make_outblob=lambda inblob: b"QUOTE" + bytes(600))
    with pytest.raises(UnavailableError, match="does not carry the report data"):
        tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)
    assert_clean(tmp_path, fake)


@pytest.mark.parametrize(("make_outblob", "reason"), [
    (lambda inblob: b"", "is empty"),
    (lambda inblob: inblob + bytes(MAX_BLOB), "holds more than"),
], ids=["empty", "too-large"])
def test_unusable_outblob(tmp_path: Path, make_outblob: Callable[[bytes], bytes],
                          reason: str) -> None:
    fake = FakeConfigfs("tdx_guest", make_outblob=make_outblob)
    with pytest.raises(UnavailableError, match=reason):
        tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)
    assert_clean(tmp_path, fake)


def test_garbled_generation(tmp_path: Path) -> None:
    class Garbled(FakeConfigfs):
        def mkdir(self, path: Path) -> None:
            super().mkdir(path)
            (path / "generation").write_text("many\n")

    fake = Garbled("tdx_guest")
    with pytest.raises(UnavailableError, match="generation does not hold a decimal number"):
        tsm(tmp_path, fake).evidence(DATA, MEASUREMENT)
    assert_clean(tmp_path, fake)


@pytest.mark.parametrize("bad", [b"", bytes(63), bytes(65)])
def test_report_data_must_be_64_bytes(tmp_path: Path, bad: bytes) -> None:
    fake = FakeConfigfs("tdx_guest")
    with pytest.raises(InputError, match=f"report_data must be 64 bytes, got {len(bad)}"):
        tsm(tmp_path, fake).evidence(bad, MEASUREMENT)
    assert fake.made == []


def test_real_os_path_on_a_plain_folder(tmp_path: Path) -> None:
    # No kernel behind it: mkdir works, the attribute files are not there, and the
    # attester neither creates them nor leaves its entry behind.
    with pytest.raises(UnavailableError, match=r"cannot read .*/tdapp-[0-9a-f]+/provider: "):
        TsmAttester(tmp_path).evidence(DATA, MEASUREMENT)
    assert_clean(tmp_path)


def test_real_os_path_without_the_interface(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match=r"cannot create the tsm report entry .*/absent/"):
        TsmAttester(tmp_path / "absent").evidence(DATA, MEASUREMENT)


def test_real_fs_never_creates_and_bounds_reads(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _Fs().write(tmp_path / "inblob", DATA)
    assert not (tmp_path / "inblob").exists()
    (tmp_path / "big").write_bytes(bytes(100_000))
    assert len(_Fs().read(tmp_path / "big", 1000)) == 1001


# --- gramine -----------------------------------------------------------------------------

def gramine_root(tmp_path: Path, *, kind: str | None = "dcap",
                 quote: bytes = b"SGXQUOTE" + bytes(360) + DATA) -> Path:
    root = tmp_path / "attestation"
    root.mkdir()
    (root / "user_report_data").write_bytes(bytes(64))
    (root / "quote").write_bytes(quote)
    if kind is not None:
        (root / "attestation_type").write_text(kind)
    return root


@pytest.mark.parametrize("kind", ["dcap", None])
def test_gramine_quote(tmp_path: Path, kind: str | None) -> None:
    root = gramine_root(tmp_path, kind=kind)
    evidence = GramineAttester(root).evidence(DATA, MEASUREMENT)
    assert (root / "user_report_data").read_bytes() == DATA
    assert evidence == {"tee": "sgx", "quote": b64((root / "quote").read_bytes())}


@pytest.mark.parametrize("kind", ["epid", "none"])
def test_gramine_other_attestation_types_are_refused(tmp_path: Path, kind: str) -> None:
    root = gramine_root(tmp_path, kind=kind)
    with pytest.raises(UnavailableError, match=f"gramine attestation type {kind} is not "):
        GramineAttester(root).evidence(DATA, MEASUREMENT)
    assert (root / "user_report_data").read_bytes() == bytes(64)


def test_gramine_missing(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match="absent does not exist"):
        GramineAttester(tmp_path / "absent").evidence(DATA, MEASUREMENT)
    root = gramine_root(tmp_path)
    (root / "user_report_data").unlink()
    with pytest.raises(UnavailableError, match=r"cannot write the report data to .*user_report"):
        GramineAttester(root).evidence(DATA, MEASUREMENT)
    assert not (root / "user_report_data").exists()


@pytest.mark.parametrize(("quote", "reason"), [
    (b"SGXQUOTE" + bytes(500), "does not carry the report data"),
    (b"", "is empty"),
], ids=["other-report-data", "empty"])
def test_gramine_unusable_quote(tmp_path: Path, quote: bytes, reason: str) -> None:
    with pytest.raises(UnavailableError, match=reason):
        GramineAttester(gramine_root(tmp_path, quote=quote)).evidence(DATA, MEASUREMENT)


def test_gramine_report_data_must_be_64_bytes(tmp_path: Path) -> None:
    root = gramine_root(tmp_path)
    with pytest.raises(InputError, match="report_data must be 64 bytes"):
        GramineAttester(root).evidence(DATA[:32], MEASUREMENT)
    assert (root / "user_report_data").read_bytes() == bytes(64)


# --- sim ---------------------------------------------------------------------------------

class FakeLas(LasClient):
    """Signs like the LAS, without a server; ``lie`` makes it sign other report data."""

    def __init__(self, lie: bool = False) -> None:
        super().__init__("127.0.0.1:9")
        self.key = Ed25519PrivateKey.generate()
        self.lie = lie
        self.calls = 0

    def evidence(self, report_data: bytes, measurement: str,
                 debug: bool = False) -> dict[str, Any]:
        self.calls += 1
        return sign_evidence(self.key, measurement=measurement,
                             report_data=OTHER if self.lie else report_data,
                             debug=debug, issued_at=time.time())


def test_sim_attester() -> None:
    las = FakeLas()
    evidence = SimAttester(las).evidence(DATA, MEASUREMENT)
    assert evidence["tee"] == "sim"
    with pytest.raises(UnavailableError, match="does not carry the report data"):
        SimAttester(FakeLas(lie=True)).evidence(DATA, MEASUREMENT)
    with pytest.raises(InputError, match="report_data must be 64 bytes"):
        SimAttester(las).evidence(DATA + b"x", MEASUREMENT)
    assert las.calls == 1


# --- probing and choosing ----------------------------------------------------------------

def roots(tmp_path: Path) -> dict[str, Path]:
    return {"tsm_root": tmp_path / "tsm", "gramine_root": tmp_path / "attestation"}


def test_names() -> None:
    assert (TsmAttester.name, GramineAttester.name, SimAttester.name) == (
        "tsm", "gramine", "sim")


def test_auto_without_hardware(tmp_path: Path) -> None:
    assert probe_hardware(**roots(tmp_path)) is None
    las = FakeLas()
    chosen = choose_attester("auto", las=las, **roots(tmp_path))
    assert isinstance(chosen, SimAttester) and chosen.las is las
    with pytest.raises(UnavailableError, match=r"no TEE was found .* needs hardware"):
        choose_attester("auto", las=las, sim_allowed=False, **roots(tmp_path))
    with pytest.raises(UsageError, match="needs a LAS"):
        choose_attester("auto", las=None, **roots(tmp_path))


def test_auto_finds_tsm(tmp_path: Path) -> None:
    (tmp_path / "tsm").mkdir()
    for tee in ("auto", "tsm"):
        chosen = choose_attester(tee, las=None, sim_allowed=False, **roots(tmp_path))
        assert isinstance(chosen, TsmAttester) and chosen.root == tmp_path / "tsm"


def test_auto_finds_gramine(tmp_path: Path) -> None:
    gramine_root(tmp_path)
    for tee in ("auto", "gramine"):
        chosen = choose_attester(tee, las=None, sim_allowed=False, **roots(tmp_path))
        assert isinstance(chosen, GramineAttester)
        assert chosen.root == tmp_path / "attestation"


def test_explicit_choices_need_their_interface(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs a LAS"):
        choose_attester("sim", las=None, **roots(tmp_path))
    with pytest.raises(UsageError, match="needs hardware"):
        choose_attester("sim", las=FakeLas(), sim_allowed=False, **roots(tmp_path))
    with pytest.raises(UnavailableError, match=r"configfs-tsm interface .*/tsm does not exist"):
        choose_attester("tsm", las=None, **roots(tmp_path))
    with pytest.raises(UnavailableError, match=r"attestation/quote does not exist"):
        choose_attester("gramine", las=None, **roots(tmp_path))
    with pytest.raises(UsageError, match="unknown tee 'sgx'"):
        choose_attester("sgx", las=None, **roots(tmp_path))
    assert isinstance(choose_attester("sim", las=FakeLas(), **roots(tmp_path)), SimAttester)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_tsm_folder_not_writable(tmp_path: Path) -> None:
    (tmp_path / "tsm").mkdir(mode=0o500)
    assert probe_hardware(**roots(tmp_path)) is None
    with pytest.raises(UnavailableError, match="is not writable by this user"):
        choose_attester("tsm", las=None, **roots(tmp_path))


# --- tsm on TDX: the workload extended into RTMR3 and logged --------------------------------

def test_tdx_guest_extends_rtmr3_with_the_workload_and_logs_it(tmp_path: Path) -> None:
    from tdapp.attest.eventlog import parse_log, replay, workload_event

    measurements = tmp_path / "measurements"
    measurements.mkdir()
    (measurements / "rtmr3:sha384").write_bytes(bytes(48))
    root = tmp_path / "report"
    root.mkdir()
    attester = TsmAttester(root, measurements=measurements, event_log=tmp_path / "run" / "log")
    attester._fs = FakeConfigfs("tdx_guest")
    first, second = (Workload(m * 32, "s", "app") for m in ("c0", "d1"))
    evidence = attester.evidence(DATA, MEASUREMENT, workload=first)
    assert evidence["event_log"] == [workload_event(first).line()]
    evidence = attester.evidence(DATA, MEASUREMENT, workload=second)
    # The whole history, in order, and it replays to what the (emulated) kernel holds.
    events = parse_log(evidence["event_log"])
    assert [e.line() for e in events] == [workload_event(w).line() for w in (first, second)]
    assert replay(events) == (measurements / "rtmr3:sha384").read_bytes()
    assert evidence["quote"] == b64(tdx_quote(DATA))
    assert oct((tmp_path / "run" / "log").stat().st_mode & 0o777) == "0o600"
    assert_clean(root)


def test_without_the_kernel_interface_nothing_is_logged(tmp_path: Path) -> None:
    attester = TsmAttester(tmp_path, measurements=tmp_path / "absent",
                           event_log=tmp_path.parent / f"{tmp_path.name}-log")
    attester._fs = FakeConfigfs("tdx_guest")
    evidence = attester.evidence(DATA, MEASUREMENT, workload=Workload("c0" * 32, "s", "app"))
    assert "event_log" not in evidence
    assert not (tmp_path.parent / f"{tmp_path.name}-log").exists()
