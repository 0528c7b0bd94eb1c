"""Container images (OCI layouts and ``docker save`` archives) unpacked into a root folder.

Owns reading an image reference (``docker-archive:FILE[:REPO:TAG]``,
``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``), choosing the image in it,
checking every blob (manifest, config, layers) against its digest before
trusting it, and handing the layers, in order, to :mod:`tdapp.builder.layers`,
which owns what may be written into the root folder. It must never extract
an outer archive to disk or trust a name in it: a member is only ever looked
up by a name this module builds, and only a regular-file member is ever read.
It must never write anything outside the root folder the caller gives, nor
trust a layer, a config or a manifest whose hash does not match. The chain
starts at ``index.json`` (OCI) or ``manifest.json`` (docker), which carry no
digest of their own; a docker config is checked against the hex in its file
name, and docker layers against the config's ``rootfs.diff_ids`` (required).

Errors are single lines: :class:`UsageError` for a malformed reference,
:class:`InputError` for a missing, unreadable or unsupported image, and
:class:`IntegrityError` for a blob that does not match its digest or a layer
with hostile content. On any error the root folder may hold part of the image;
the caller, who owns it, removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import stat
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tdapp.builder.layers import Budget, Layer, Readable, Root, apply_layer
from tdapp.errors import InputError, IntegrityError, UsageError

MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_INDEX_DEPTH = 4
REF_NAME = "org.opencontainers.image.ref.name"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_BLOB_NAME = re.compile(r"(?:.*/)?(?:sha256/)?([0-9a-f]{64})(?:\.json)?")
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")
_ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
KINDS = ("docker-archive", "oci", "oci-archive")


@dataclass(frozen=True)
class ImageConfig:
    """What the image's config says about running it; empty where it says nothing."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # "KEY=VALUE"
    working_dir: str = ""
    user: str = ""


@dataclass(frozen=True)
class UnpackedImage:
    """An unpacked image.

    ``digest`` is the sha256 of the image manifest for an OCI layout or archive
    (for a multi-platform index, of the platform's manifest, not of the index);
    for a docker-archive it is the sha256 of the config blob, which is docker's
    image ID.
    """

    reference: str
    digest: str
    config: ImageConfig
    layers: int


@dataclass
class _Plan:
    digest: str
    config: ImageConfig
    layers: list[Layer] = field(default_factory=list)


def parse_reference(reference: str) -> tuple[str, Path, str | None]:
    """("docker-archive"|"oci"|"oci-archive", path, tag or None); UsageError for anything else.

    As in containers/image, the path ends at its first ``:``; for a docker-archive
    the tag is the whole ``REPO:TAG`` to find among its RepoTags.
    """
    kind, colon, rest = reference.partition(":")
    if not colon or kind not in KINDS:
        raise UsageError(f"image reference {reference!r} is not docker-archive:FILE, "
                         "oci:DIR[:TAG] or oci-archive:FILE[:TAG]")
    path, colon, tag = rest.partition(":")
    if not path or (colon and not tag) or "\x00" in reference:
        raise UsageError(f"image reference {reference!r} has an empty path or tag")
    return kind, Path(path), tag if colon else None


def unpack_image(reference: str, rootfs: Path,
                 progress: Callable[[str], None] | None = None) -> UnpackedImage:
    """Unpack the image's layers, in order, whiteouts applied, into `rootfs` (an existing, empty
    folder the caller owns)."""
    kind, path, tag = parse_reference(reference)
    with _open_source(kind, path) as source:
        plan = _docker_plan(source, tag) if kind == "docker-archive" else _oci_plan(source, tag)
        root = Root(rootfs)
        try:
            budget = Budget()
            for layer in plan.layers:
                if progress is not None:
                    digest = layer.digest or layer.diff_id or ""
                    progress(f"layer {layer.index}/{len(plan.layers)} {digest[:19]}…")
                apply_layer(root, layer, budget)
        finally:
            root.close()
    return UnpackedImage(reference, plan.digest, plan.config, len(plan.layers))


class _Source(ABC):
    """Files of an image by name: a folder's, or the regular-file members of a tar."""

    def __init__(self, where: str) -> None:
        self.where = where

    @abstractmethod
    def open(self, name: str) -> AbstractContextManager[Readable]:
        """The file called ``name``, opened for reading; InputError if it is not there."""

    def read(self, name: str, what: str) -> bytes:
        with self.open(name) as handle:
            data = handle.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise InputError(f"{self.where}: {what} is larger than {MAX_JSON_BYTES} bytes")
        return data


class _Folder(_Source):
    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self._path = path

    def open(self, name: str) -> AbstractContextManager[Readable]:
        try:
            # O_NONBLOCK: a FIFO put in the layout must not hang us before the check below.
            fd = os.open(self._path / name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InputError(f"{self.where}: {name} is missing") from None
        except OSError as error:
            raise InputError(f"{self.where}: cannot read {name}: {error.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InputError(f"{self.where}: {name} is not a regular file")
        return os.fdopen(fd, "rb")


class _Tar(_Source):
    def __init__(self, path: Path, archive: tarfile.TarFile) -> None:
        super().__init__(str(path))
        self._archive = archive
        self._members: dict[str, tarfile.TarInfo | None] = {}  # None: there twice
        for member in archive.getmembers():
            name = member.name
            while name.startswith("./"):
                name = name[2:]
            if member.isreg():
                self._members[name] = None if name in self._members else member

    def open(self, name: str) -> AbstractContextManager[Readable]:
        while name.startswith("./"):
            name = name[2:]
        if name not in self._members:
            raise InputError(f"{self.where}: the archive has no file {name!r}")
        member = self._members[name]
        if member is None:
            raise InputError(f"{self.where}: the archive holds {name!r} twice; refused")
        handle: IO[bytes] | None = self._archive.extractfile(member)
        assert handle is not None  # a regular file
        return handle


@contextmanager
def _open_source(kind: str, path: Path) -> Iterator[_Source]:
    if kind == "oci":
        if not path.is_dir():
            raise InputError(f"{path} is not a folder (an OCI image layout)")
        yield _Folder(path)
        return
    try:
        archive = tarfile.open(path, mode="r:*")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as error:
        detail = getattr(error, "strerror", None) or "not a tar archive"
        raise InputError(f"{path} cannot be read as a {kind}: {detail}") from None
    with archive:
        try:
            source = _Tar(path, archive)
        except (tarfile.TarError, OSError, EOFError):
            raise InputError(f"{path} is not a valid tar archive ({kind})") from None
        try:
            yield source
        except (tarfile.TarError, EOFError) as error:  # a truncated member, while reading it
            raise InputError(f"{path}: cannot read the archive: {error}") from None


def _json(data: bytes, where: str, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise InputError(f"{where}: {what} is not valid JSON") from None


def _verified(source: _Source, descriptor: Any, what: str) -> bytes:
    digest, size = _digest(descriptor, source.where, what)
    data = source.read(f"blobs/sha256/{digest[7:]}", what)
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise IntegrityError(f"{source.where}: {what} blob does not match its digest {digest} "
                             f"(it hashes to {actual})")
    if size is not None and len(data) != size:
        raise IntegrityError(f"{source.where}: {what} blob {digest} is {len(data)} bytes, its "
                             f"descriptor says {size}")
    return data


def _digest(descriptor: Any, where: str, what: str) -> tuple[str, int | None]:
    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
        raise InputError(f"{where}: the descriptor of the {what} is not an object with a digest")
    digest, size = descriptor["digest"], descriptor.get("size")
    if not _DIGEST.fullmatch(digest):
        raise InputError(f"{where}: {what} digest {digest[:80]!r} is not sha256:<64 hex> "
                         "(other algorithms are not supported)")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise InputError(f"{where}: {what} descriptor has an invalid size")
    return digest, size


def _object(value: Any, where: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"{where}: {what} is not a JSON object")
    return value


def _list(value: Any, where: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InputError(f"{where}: {what} is not a JSON list")
    return value


def _oci_plan(source: _Source, tag: str | None) -> _Plan:
    where = source.where
    layout = _object(_json(source.read("oci-layout", "oci-layout"), where, "oci-layout"), where,
                     "oci-layout")
    if not isinstance(layout.get("imageLayoutVersion"), str):
        raise InputError(f"{where}: oci-layout has no imageLayoutVersion; not an OCI layout")
    index = _object(_json(source.read("index.json", "index.json"), where, "index.json"), where,
                    "index.json")
    manifests = _list(index.get("manifests"), where, "index.json's manifests")
    names = [_annotation(item, REF_NAME) for item in manifests]
    chosen = _choose(manifests, [{name} if name else set() for name in names], tag, where,
                     ":TAG")
    descriptor, manifest = _image_manifest(source, chosen, 0)
    config_bytes = _verified(source, manifest.get("config"), "config")
    config, diff_ids = _image_config(config_bytes, where)
    descriptors = _list(manifest.get("layers"), where, "the manifest's layers")
    _check_diff_ids(diff_ids, len(descriptors), where)
    plan = _Plan(_digest(descriptor, where, "manifest")[0], config)
    for index_, item in enumerate(descriptors):
        digest, size = _digest(item, where, f"layer {index_ + 1}")
        if "encrypted" in str(item.get("mediaType", "")):
            raise InputError(f"{where}: layer {index_ + 1} ({digest[:19]}) is encrypted; "
                             "not supported")
        plan.layers.append(Layer(index_ + 1, _opener(source, f"blobs/sha256/{digest[7:]}"),
                                 digest, size, diff_ids[index_] if diff_ids else None))
    return plan


def _annotation(item: Any, key: str) -> str | None:
    annotations = item.get("annotations") if isinstance(item, dict) else None
    value = annotations.get(key) if isinstance(annotations, dict) else None
    return value if isinstance(value, str) else None


def _image_manifest(source: _Source, descriptor: Any,
                    depth: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (descriptor, manifest) of the image: nested indexes resolved to this platform."""
    where = source.where
    manifest = _object(_json(_verified(source, descriptor, "manifest"), where, "manifest"),
                       where, "manifest")
    media_type = descriptor.get("mediaType") or manifest.get("mediaType")
    if media_type not in _INDEX_TYPES and not ("manifests" in manifest
                                               and "layers" not in manifest):
        if "config" not in manifest or "layers" not in manifest:
            raise InputError(f"{where}: manifest {descriptor['digest'][:19]} is not an image "
                             f"manifest (media type {media_type!r}); not supported")
        return descriptor, manifest
    if depth >= MAX_INDEX_DEPTH:
        raise InputError(f"{where}: image indexes are nested more than {MAX_INDEX_DEPTH} deep")
    arch = _ARCHES.get(platform.machine().lower(), platform.machine().lower())
    offered = []
    for item in _list(manifest.get("manifests"), where, "an index's manifests"):
        wanted = item.get("platform") if isinstance(item, dict) else None
        wanted = wanted if isinstance(wanted, dict) else {}
        offered.append(f"{wanted.get('os')}/{wanted.get('architecture')}")
        if wanted.get("os") == "linux" and wanted.get("architecture") == arch:
            return _image_manifest(source, item, depth + 1)
    raise InputError(f"{where}: the image has no linux/{arch} variant (it has: "
                     f"{', '.join(offered) or 'none'})")


def _image_config(data: bytes, where: str) -> tuple[ImageConfig, list[str] | None]:
    config = _object(_json(data, where, "the image config"), where, "the image config")
    run = config.get("config")
    run = {} if run is None else _object(run, where, "the image config's config")

    def strings(key: str) -> tuple[str, ...]:
        value = run.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise InputError(f"{where}: the image config's {key} is not a list of strings")
        return tuple(value)

    def text(key: str) -> str:
        value = run.get(key)
        if value is not None and not isinstance(value, str):
            raise InputError(f"{where}: the image config's {key} is not a string")
        return value or ""

    image = ImageConfig(strings("Entrypoint"), strings("Cmd"), strings("Env"),
                        text("WorkingDir"), text("User"))
    rootfs = config.get("rootfs")
    if rootfs is None:
        return image, None
    diff_ids = _list(_object(rootfs, where, "rootfs").get("diff_ids"), where, "rootfs.diff_ids")
    for diff_id in diff_ids:
        if not isinstance(diff_id, str) or not _DIGEST.fullmatch(diff_id):
            raise InputError(f"{where}: the image config has a diff_id that is not "
                             "sha256:<64 hex>")
    return image, diff_ids


def _check_diff_ids(diff_ids: list[str] | None, layers: int, where: str) -> None:
    if diff_ids is not None and len(diff_ids) != layers:
        raise IntegrityError(f"{where}: the image config lists {len(diff_ids)} diff_ids for "
                             f"{layers} layers")


def _opener(source: _Source, name: str) -> Callable[[], AbstractContextManager[Readable]]:
    return lambda: source.open(name)


def _docker_plan(source: _Source, tag: str | None) -> _Plan:
    where = source.where
    entries = _list(_json(source.read("manifest.json", "manifest.json"), where,
                          "manifest.json"), where, "manifest.json")
    tags = [[item for item in entry["RepoTags"] if isinstance(item, str)]
            if isinstance(entry, dict) and isinstance(entry.get("RepoTags"), list) else []
            for entry in entries]
    entry = _object(_choose(entries, [set(names) for names in tags], tag, where, ":REPO:TAG"),
                    where, "the manifest.json entry")
    config_name = entry.get("Config")
    layer_names = _list(entry.get("Layers"), where, "the manifest.json entry's Layers")
    if not isinstance(config_name, str) or not all(isinstance(n, str) for n in layer_names):
        raise InputError(f"{where}: manifest.json's Config or Layers is not a file name")
    config_bytes = source.read(config_name, "the image config")
    digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    named = _BLOB_NAME.fullmatch(config_name)
    if named and named.group(1) != digest[7:]:
        raise IntegrityError(f"{where}: the image config {config_name!r} does not match the "
                             f"digest in its name (it hashes to {digest})")
    config, diff_ids = _image_config(config_bytes, where)
    if diff_ids is None:
        raise InputError(f"{where}: the image config has no rootfs.diff_ids, so its layers "
                         "cannot be verified; not supported")
    _check_diff_ids(diff_ids, len(layer_names), where)
    plan = _Plan(digest, config)
    for index_, name in enumerate(layer_names):
        # A legacy "<id>/layer.tar" name carries no content hash; a blobs/sha256/<hex> name
        # (docker 25 and later) is the blob's own digest.
        blob = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", name)
        plan.layers.append(Layer(index_ + 1, _opener(source, name),
                                 f"sha256:{blob.group(1)}" if blob else None, None,
                                 diff_ids[index_]))
    return plan


def _choose(items: list[Any], tags: list[set[str]], tag: str | None, where: str,
            syntax: str) -> Any:
    """The one item tagged ``tag``; without a tag, the only item."""
    known = ", ".join(sorted(set().union(*tags))) or "none"
    if tag is not None:
        chosen = [item for item, names in zip(items, tags, strict=True) if tag in names]
        if len(chosen) != 1:
            raise InputError(f"{where}: {'no' if not chosen else 'more than one'} image is "
                             f"tagged {tag!r} (tags: {known})")
        return chosen[0]
    if len(items) != 1:
        raise UsageError(f"{where} holds {len(items)} images; name one with {syntax} "
                         f"(tags: {known})")
    return items[0]
