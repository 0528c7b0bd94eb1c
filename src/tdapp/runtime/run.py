"""``tdapp run``: one trusted run of a DApp, from encrypted inputs to a published output.

Order matters and is the point of this module: fetch the volumes; measure the
image that will run (not a label); attest and receive the configuration; open
every volume against the tag the CAS holds (a rollback fails here); run the
program sandboxed with the session's command, environment and working folder
only; re-seal what it changed; upload; and only then move the tags on the
CAS. If anything fails, no tag moves and no URL is printed. Plaintext lives
only under /dev/shm (memory) and is removed at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdapp.attest.attesters import choose_attester
from tdapp.attest.las import LasClient
from tdapp.builder import Image, load_image, measure_image
from tdapp.builder.paths import user_ids
from tdapp.client.cas_client import CasClient
from tdapp.client.key_release import obtain_configuration, report_tag
from tdapp.core.address import Address
from tdapp.errors import InputError, IntegrityError, RefusedError, UnavailableError
from tdapp.runtime.sandbox import (
    Mount,
    SandboxSpec,
    default_host_paths_for,
    require_success,
    run_sandboxed,
)
from tdapp.runtime.shield import (
    AUTO_THRESHOLD,
    ShieldMount,
    fuse_usable,
    sealed_size,
    unmount_abandoned,
)
from tdapp.volume import Volume, VolumeKey, VolumeTag
from tdapp.volume.bundle import pack, unpack

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunRequest:
    image: str
    session_id: str
    cas: Address
    url: str
    push: str
    las: str
    tee: str = "auto"
    shield: str = "auto"


def _plaintext_root() -> str | None:
    shm = Path("/dev/shm")  # noqa: S108 - memory, so plaintext never reaches a disk
    if not shm.is_dir():
        return None
    _remove_abandoned(shm)
    return str(shm)


def _remove_abandoned(root: Path) -> None:
    """Delete work folders of runs that were killed (their process is gone).

    A run killed with SIGKILL cannot clean up after itself; its plaintext would
    otherwise stay in memory until reboot.
    """
    for folder in root.glob("tdapp-run-*"):
        pid_text = folder.name.split("-")[2]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            unmount_abandoned(folder)
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            continue  # another user's live run


def run_dapp(request: RunRequest, log: Log) -> str:
    """Run once; return the URL of the uploaded output bundle."""
    from tdapp.transfer import download, upload

    session, _, service = request.session_id.partition("/")
    if not session or not service:
        raise InputError(f"--sessionID {request.session_id!r} must look like SESSION/SERVICE")
    image = load_image(request.image)
    measurement = measure_image(image.path)
    log(f"image {request.image}: measurement {measurement}")
    with tempfile.TemporaryDirectory(prefix=f"tdapp-run-{os.getpid()}-",
                                     dir=_plaintext_root()) as work:
        root = Path(work)
        bundle = root / "inputs.zip"
        download(request.url, bundle)
        volumes = unpack(bundle, root / "sealed")
        las = LasClient(request.las)

        def evidence(data: bytes, mode: str) -> Mapping[str, Any]:
            attester = choose_attester(request.tee, las=las, sim_allowed=mode != "hardware")
            log(f"attester: {attester.name}")
            return attester.evidence(data, measurement)

        released = obtain_configuration(
            CasClient.connect(request.cas, anonymous=True), session, service, evidence)
        config = released.document
        log(f"attested to {request.cas} ({config['mode']} mode)")
        shields: list[ShieldMount] = []
        try:
            mounts, opened = _open_volumes(config, volumes, root, request.shield, shields, log)
            result = run_sandboxed(SandboxSpec(
                root=image.root, argv=list(config["command"]), env=dict(config["environment"]),
                cwd=str(config["pwd"]), mounts=mounts, host_paths=_host_paths(image),
                files=_injected(config), memory_limit=image.heap, stack_limit=image.stack,
                user=_user(image)))
            shielded = _finish(shields)
        finally:
            for shield in shields:
                shield.abort()
        require_success(result)
        changed = {**_reseal(opened, root, log), **shielded}
        output = root / "scone-upload.zip"
        resealed = root / "resealed"
        pack({name: resealed / name if (resealed / name).is_dir() else volumes[name]
              for name in volumes}, output)
        url = upload(output, request.push)
        client = CasClient.connect(request.cas, anonymous=True)
        for name, (old, new) in changed.items():
            report_tag(client, released.token, session, name, old, new)
            log(f"volume {name}: tag {old} -> {new}")
    return url


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


@dataclass
class _OpenVolume:
    name: str
    key: VolumeKey
    tag: str | None
    plain: Path
    fingerprint: frozenset[tuple[str, int, int, int]]


def _open_volumes(config: dict[str, Any], sealed: dict[str, Path], root: Path, shield: str,
                  shields: list[ShieldMount], log: Log) -> tuple[list[Mount], list[_OpenVolume]]:
    """Each volume checked against its key and tag, then staged on tmpfs or mounted by FUSE."""
    mounts, opened = [], []
    for volume in config["volumes"]:
        name, tag = str(volume["name"]), volume.get("tag")
        folder = sealed.get(name)
        if folder is None:
            raise InputError(f"the downloaded bundle holds no volume {name!r}")
        if volume.get("key") is None or tag is None:
            raise RefusedError(f"volume {name}: the session gives no key or tag for it")
        key = VolumeKey.from_hex(str(volume["key"]))
        opened_volume = Volume.open(folder, key, VolumeTag.from_hex(str(tag)), name=name)
        if _use_fuse(shield, folder, name):
            mount = ShieldMount(name, folder, root / "mnt" / name, key.hex(), str(tag))
            shields.append(mount)
            mounts.append(Mount(source=mount.mountpoint, target=str(volume["path"]),
                                writable=True))
            log(f"volume {name}: mounted by the FUSE shield")
            continue
        plain = root / "plain" / name
        opened_volume.extract(plain)
        mounts.append(Mount(source=plain, target=str(volume["path"]), writable=True))
        opened.append(_OpenVolume(name, key, str(tag), plain, _tree_fingerprint(plain)))
    return mounts, opened


def _use_fuse(shield: str, folder: Path, name: str) -> bool:
    if shield == "tmpfs":
        return False
    if shield == "fuse":
        if not fuse_usable():
            raise UnavailableError(f"volume {name}: --shield fuse needs /dev/fuse, fusermount3 "
                                   "and libfuse3 (package fuse3)")
        return True
    return fuse_usable() and sealed_size(folder) > AUTO_THRESHOLD


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


def _injected(config: dict[str, Any]) -> dict[str, bytes]:
    return {str(f["path"]): str(f.get("content") or "").encode()
            for f in config.get("injection_files", [])}


def _tree_fingerprint(root: Path) -> frozenset[tuple[str, int, int, int]]:
    entries = set()
    for path in root.rglob("*"):
        info = path.lstat()
        entries.add((path.relative_to(root).as_posix(), info.st_size, info.st_mtime_ns,
                     info.st_mode))
    return frozenset(entries)


def _reseal(opened: list[_OpenVolume], root: Path,
            log: Log) -> dict[str, tuple[str | None, str]]:
    """Seal every volume the program changed into a new version; unchanged ones stay."""
    changed: dict[str, tuple[str | None, str]] = {}
    for volume in opened:
        if _tree_fingerprint(volume.plain) == volume.fingerprint:
            continue
        target = root / "resealed" / volume.name
        target.parent.mkdir(exist_ok=True)
        created = Volume.create(target, volume.key, source=volume.plain)
        changed[volume.name] = (volume.tag, created.tag.hex())
        shutil.rmtree(volume.plain, ignore_errors=True)
        log(f"volume {volume.name}: sealed the program's changes")
    return changed
