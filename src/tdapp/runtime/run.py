"""``tdapp run``: one trusted run of a DApp, from encrypted inputs to a published output.

Order matters and is the point of this module: copy the image into this run's
own folder and measure the copy, which is what will run (not a label, and not
the store's files, which the host could swap after the check); fetch the
bundle; attest for that workload and receive the configuration, refusing one
released for another workload;
unpack only the session's volumes and open each against the tag the CAS holds
(a rollback fails here); run the program sandboxed with the session's command,
environment and working folder only, for at most the run's time limit;
re-seal what it changed (found by content: SHA-256 of every file, with its
type, mode and link target); upload a bundle of the changed volumes only; and
only then move their tags on the CAS. If anything fails, no tag moves and no
URL is printed. Ciphertext lives in an ordinary temporary folder, plaintext
only in memory, sized from the image's limits (:mod:`tdapp.runtime.workspace`),
and both are removed at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, assert_never

from tdapp.attest.attesters import choose_attester
from tdapp.attest.binding import Workload
from tdapp.attest.las import LasClient
from tdapp.attest.release import ReleasedConfiguration
from tdapp.builder import Image, hold_image
from tdapp.builder.paths import user_ids
from tdapp.client.cas_client import CasClient
from tdapp.client.key_release import commit_run, committed_run, obtain_configuration
from tdapp.client.receipts import bundle_digest, check_receipt
from tdapp.core.address import Address
from tdapp.core.atomic import write_atomically
from tdapp.errors import (
    InputError,
    IntegrityError,
    ProgramFailedError,
    RefusedError,
    TdappError,
    UnavailableError,
)
from tdapp.policy.security import AttestationMode
from tdapp.runtime.iexec_post import ZERO_WORKER, seal_iexec_result
from tdapp.runtime.mounts import (
    AUTO_THRESHOLD,
    ShieldKind,
    ShieldMount,
    fuse_usable,
    sealed_size,
)
from tdapp.runtime.sandbox import (
    Mount,
    SandboxResult,
    SandboxSpec,
    default_host_paths_for,
    require_success,
    run_sandboxed,
)
from tdapp.runtime.workspace import (
    ciphertext_folder,
    pages,
    plaintext_folder,
    remove_abandoned,
    write_allowance,
)
from tdapp.volume import Volume, VolumeKey
from tdapp.volume.bundle import pack, unpack

Log = Callable[[str], None]
Fingerprint = frozenset[tuple[str, int, str]]
"""(path, st_mode, SHA-256 of a file's content or a link's target) for every entry."""

DEFAULT_RUN_TIMEOUT = 3600.0
"""Seconds the program may run before it is killed and the run fails."""


@dataclass(frozen=True)
class RunRequest:
    image: str
    session_id: str
    cas: Address
    url: str
    push: str
    las: str
    tee: str = "auto"
    shield: ShieldKind = ShieldKind.AUTO
    timeout: float = DEFAULT_RUN_TIMEOUT
    # More bundles to take volumes from (a dataset another party pushed, say); a volume
    # name may come from one bundle only.
    more_urls: tuple[str, ...] = ()
    # Where the run's receipt is written (None: not kept here; the CAS keeps it too).
    receipt: Path | None = None
    # The worker address an iExec task's result seal names.
    iexec_worker: str = ZERO_WORKER
    # A pool task's id: stated in the receipt, and how a redelivery finds the first run.
    label: str | None = None


@dataclass(frozen=True)
class RunOutcome:
    url: str | None  # None only for a duplicate whose first run recorded no URL
    receipt: str
    duplicate: bool = False  # a run with the same label had committed: nothing ran


def run_dapp(request: RunRequest, log: Log) -> str:
    """Run once; return the URL of the uploaded output bundle."""
    outcome = run_labelled(request, log)
    if outcome.url is None:
        raise IntegrityError("the earlier run of this task recorded no output URL")
    return outcome.url


def run_labelled(request: RunRequest, log: Log) -> RunOutcome:
    """Run once, or, for a labelled run (a pool task) whose label committed already,
    report that run instead of running again (exactly one effect per task)."""
    from tdapp.transfer import check_upload_target, download, upload

    session, _, service = request.session_id.partition("/")
    if not session or not service:
        raise InputError(f"--sessionID {request.session_id!r} must look like SESSION/SERVICE")
    if not (math.isfinite(request.timeout) and request.timeout > 0):
        raise InputError(f"the run's time limit must be a positive number of seconds, got "
                         f"{request.timeout}")
    check_upload_target(request.push)  # before anything runs, not after
    remove_abandoned()
    with ciphertext_folder() as root:
        # Measured once, from a copy only this run uses: what runs is what the
        # evidence binds, whatever happens to the image store meanwhile.
        image, measurement = hold_image(request.image, root / "image")
        log(f"image {request.image}: measurement {measurement}")
        bundles = [root / f"inputs-{index}.zip"
                   for index in range(1 + len(request.more_urls))]
        for url, bundle in zip((request.url, *request.more_urls), bundles, strict=True):
            download(url, bundle)
        las = LasClient(request.las)
        workload = Workload(measurement, session, service)

        def evidence(data: bytes, mode: str) -> Mapping[str, Any]:
            # Only a session the CAS says is sim (or none) can be served by a LAS.
            sim_allowed = mode in (AttestationMode.SIM, AttestationMode.NONE)
            attester = choose_attester(request.tee, las=las, sim_allowed=sim_allowed)
            log(f"attester: {attester.name}")
            return attester.evidence(data, measurement, workload=workload)

        released = obtain_configuration(
            CasClient.connect(request.cas, anonymous=True), workload, evidence)
        log(f"attested to {request.cas} ({released.mode} mode)")
        if request.label is not None:
            earlier = committed_run(CasClient.connect(request.cas, anonymous=True),
                                    released.token.get_secret_value(), session, request.label)
            if earlier is not None:
                log(f"task {request.label}: a run of it committed already; reporting that run")
                return RunOutcome(earlier[1], earlier[0], duplicate=True)
        wanted = {volume.name for volume in released.volumes}
        volumes = _unpack_all(bundles, root / "sealed", wanted)
        staged = _check_volumes(released, volumes, request.shield)
        changed = _run_program(request, image, released, staged, root, log)
        output = root / "scone-upload.zip"
        pack({name: folder for name, (_, _, folder) in changed.items()}, output)
        for name in sorted(wanted - changed.keys()):
            log(f"volume {name}: unchanged, not in the output bundle")
        digest = bundle_digest(output)
        url = upload(output, request.push)
        client = CasClient.connect(request.cas, anonymous=True)
        receipt = commit_run(client, released.token.get_secret_value(), session,
                             {name: (old, new) for name, (old, new, _) in changed.items()},
                             digest, label=request.label, url=url)
        for name, (old, new, _) in changed.items():
            log(f"volume {name}: tag {old} -> {new}")
        _keep_receipt(receipt, request, log)
    return RunOutcome(url, receipt)


def _keep_receipt(receipt: str, request: RunRequest, log: Log) -> None:
    """Check the receipt against the pinned receipt key (a CAS that signs with another key
    is said so, not hidden) and write it where the caller asked."""
    try:
        stated = check_receipt(receipt)
        log(f"receipt: {stated.describe()}")
    except TdappError as error:
        log(f"receipt not verified: {error.message}")
    if request.receipt is None:
        return
    try:
        write_atomically(request.receipt, receipt.encode("ascii") + b"\n", permissions=0o644)
    except OSError as error:  # the outputs are committed: the CAS keeps the receipt too
        log(f"receipt not written to {request.receipt}: {error.strerror}; the CAS keeps it "
            "(tdapp decrypt fetches it)")
        return
    log(f"receipt written to {request.receipt} (check it: tdapp receipt verify "
        f"{request.receipt} --bundle BUNDLE)")


def _unpack_all(bundles: list[Path], target: Path, wanted: set[str]) -> dict[str, Path]:
    """The wanted volumes of every bundle; a volume found in two bundles is refused."""
    found: dict[str, Path] = {}
    for index, bundle in enumerate(bundles):
        volumes = unpack(bundle, target / str(index), wanted)
        bundle.unlink()
        twice = sorted(found.keys() & volumes.keys())
        if twice:
            raise InputError(f"volume {twice[0]!r} is in more than one of the bundles given "
                             "with --url; give each volume once")
        found.update(volumes)
    return found


Changes = dict[str, tuple[str | None, str, Path]]
"""Volume name -> (old tag, new tag, its sealed folder now)."""


@dataclass
class _Staged:
    """A session volume opened against its key and tag, before the program runs."""

    name: str
    key: VolumeKey
    tag: str
    sealed: Path
    target: str
    volume: Volume
    fuse: bool
    writable: bool = True  # an imported volume is read-only and never resealed


def _check_volumes(released: ReleasedConfiguration, sealed: dict[str, Path],
                   shield: ShieldKind) -> list[_Staged]:
    """Each volume checked against its key and tag; the shield it gets chosen."""
    staged = []
    for grant in released.volumes:
        name, tag = grant.name, grant.tag
        folder = sealed.get(name)
        if folder is None:
            raise InputError(f"the downloaded bundle holds no volume {name!r}")
        if tag is None:
            raise RefusedError(f"volume {name}: the session gives no tag for it")
        opened = Volume.open(folder, grant.key, tag, name=name)
        staged.append(_Staged(name, grant.key, tag.hex(), folder, grant.path, opened,
                              _use_fuse(shield, folder, name), grant.writable))
    return staged


def _run_program(request: RunRequest, image: Image, config: ReleasedConfiguration,
                 staged: list[_Staged], root: Path, log: Log) -> Changes:
    """Mount or decrypt the volumes, run the program, seal what it changed."""
    in_memory = [volume for volume in staged if not volume.fuse]
    plaintext = (plaintext_folder(*_plaintext_need(in_memory), write_allowance(image.heap), log)
                 if in_memory else contextlib.nullcontext(root / "plain"))
    shields: list[ShieldMount] = []
    with plaintext as plain_root:
        try:
            mounts, fingerprints = [], {}
            for volume in staged:
                if volume.fuse:
                    mount = ShieldMount(volume.name, volume.sealed, root / "mnt" / volume.name,
                                        volume.key.hex(), volume.tag,
                                        read_only=not volume.writable)
                    shields.append(mount)
                    mounts.append(Mount(source=mount.mountpoint, target=volume.target,
                                        writable=volume.writable))
                    log(f"volume {volume.name}: mounted by the FUSE shield")
                    continue
                plain = plain_root / volume.name
                volume.volume.extract(plain)
                mounts.append(Mount(source=plain, target=volume.target,
                                    writable=volume.writable))
                if volume.writable:
                    fingerprints[volume.name] = _tree_fingerprint(plain)
            log("program: running")
            began = time.monotonic()
            result = run_sandboxed(SandboxSpec(
                root=image.root, argv=list(config.command), env=dict(config.environment),
                cwd=config.pwd, mounts=mounts, host_paths=_host_paths(image),
                files=_injected(config), file_modes=_injected_modes(config),
                memory_limit=image.heap, stack_limit=image.stack,
                user=_user(image), timeout=request.timeout,
                tmp_size=write_allowance(image.heap)))
            ended = (f"exit {result.exit_code}" if result.signal is None
                     else f"signal {result.signal}")
            log(f"program: ended after {time.monotonic() - began:.1f} s ({ended})")
            if config.iexec is not None and _succeeded(result):
                seal_iexec_result(config.iexec, mounts, request.iexec_worker, log)
            shielded = _finish(shields)
        finally:
            for shield in shields:
                shield.abort()
        if result.timed_out:
            raise ProgramFailedError(f"the program ran past the run's time limit of "
                                     f"{request.timeout:g} s and was killed")
        require_success(result)
        return {**_reseal(in_memory, fingerprints, plain_root, root, log),
                **{name: (old, new, _sealed_of(staged, name))
                   for name, (old, new) in shielded.items() if _writable(staged, name)}}


def _plaintext_need(volumes: list[_Staged]) -> tuple[int, int]:
    """(bytes, inodes) the decrypted volumes take on a tmpfs, from their FSPFs."""
    size, entries = 0, {volume.name for volume in volumes}
    for volume in volumes:
        for info in volume.volume.files():
            size += pages(info.size)
            parts = f"{volume.name}/{info.path}".split("/")
            entries.update("/".join(parts[:depth]) for depth in range(2, len(parts) + 1))
    return size, len(entries)


def _succeeded(result: SandboxResult) -> bool:
    return not result.timed_out and result.signal is None and result.exit_code == 0


def _writable(staged: list[_Staged], name: str) -> bool:
    return next(volume.writable for volume in staged if volume.name == name)


def _sealed_of(staged: list[_Staged], name: str) -> Path:
    return next(volume.sealed for volume in staged if volume.name == name)


def _host_paths(image: Image) -> list[str]:
    if image.source is not None:
        return []  # a container image holds all of its program; nothing comes from the host
    return [*image.host_paths, *default_host_paths_for(image.root, image.host_paths)]


def _user(image: Image) -> tuple[int, int] | None:
    if not image.user:
        return None
    ids = user_ids(image.root, image.user)
    if ids is None:
        raise InputError(f"image {image.name}: user {image.user!r} is not in its /etc/passwd "
                         "or /etc/group")
    return ids


def _use_fuse(shield: ShieldKind, folder: Path, name: str) -> bool:
    match shield:
        case ShieldKind.TMPFS:
            return False
        case ShieldKind.FUSE:
            if not fuse_usable():
                raise UnavailableError(f"volume {name}: --shield fuse needs /dev/fuse, "
                                       "fusermount3 and libfuse3 (package fuse3)")
            return True
        case ShieldKind.AUTO:
            return fuse_usable() and sealed_size(folder) > AUTO_THRESHOLD
        case unreachable:
            assert_never(unreachable)


def _finish(shields: list[ShieldMount]) -> dict[str, tuple[str | None, str]]:
    """Unmount every shield; the volumes whose tag moved; refuse if any read was refused."""
    changed: dict[str, tuple[str | None, str]] = {}
    failures: list[str] = []
    for shield in shields:
        report = shield.finish()
        failures += [f"volume {shield.name}: {failure}" for failure in report.failures]
        if report.tag.hex() != shield.tag:
            changed[shield.name] = (shield.tag, report.tag.hex())
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise IntegrityError(f"{failures[0]}{more}; the program's reads were refused")
    return changed


def _injected_modes(config: ReleasedConfiguration) -> dict[str, int]:
    # setuid, setgid and sticky bits are never given, whatever the session says.
    return {f.path: f.permission & 0o777 for f in config.injection_files
            if f.permission is not None}


def _injected(config: ReleasedConfiguration) -> dict[str, bytes]:
    return {f.path: f.content.get_secret_value() for f in config.injection_files}


def _tree_fingerprint(root: Path) -> Fingerprint:
    """Every entry's path, type and mode, and a file's SHA-256 or a link's target.

    Content, not size and mtime: a same-size rewrite with its mtime put back is
    still a change. Links are never followed; a file is read in bounded chunks.
    """
    entries = set()
    for current, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(current, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                content = _file_digest(path)
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            else:
                content = ""
            entries.add((os.path.relpath(path, root), info.st_mode, content))
    return frozenset(entries)


def _file_digest(path: str) -> str:
    # O_NONBLOCK: a FIFO swapped in for the file must not hang the runtime.
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:  # sealing it will say why; here it only counts as changed
        return f"unreadable ({error.strerror})"
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return "not a regular file"
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _reseal(opened: list[_Staged], fingerprints: dict[str, Fingerprint], plain_root: Path,
            root: Path, log: Log) -> Changes:
    """Seal every volume the program changed into a new version; unchanged ones stay."""
    changed: Changes = {}
    for volume in opened:
        plain = plain_root / volume.name
        if not volume.writable or _tree_fingerprint(plain) == fingerprints[volume.name]:
            continue
        target = root / "resealed" / volume.name
        target.parent.mkdir(exist_ok=True)
        created = Volume.create(target, volume.key, source=plain)
        changed[volume.name] = (volume.tag, created.tag.hex(), target)
        shutil.rmtree(plain, ignore_errors=True)
        log(f"volume {volume.name}: sealed the program's changes")
    return changed
