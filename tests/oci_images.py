"""Writers of container images for tests: OCI layouts and archives, ``docker save`` archives.

Each image is built from a description (a list of layers, each a list of
:class:`Entry`), deterministically: mtimes 0, owner 0:0, no user names, sorted
JSON, gzip with mtime 0, so one description always gives the same digests.
Nothing is checked: hostile names, devices and links are written as given, so
tests can craft the images an unpacker must refuse. A layer may also be given
as raw ``bytes``, used as the blob as-is (its diff_id is then its own sha256).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())

_KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE, "chardev": tarfile.CHRTYPE,
          "blockdev": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}


@dataclass(frozen=True)
class Entry:
    """One tar member of a layer."""

    name: str
    kind: str = "file"  # "file" | "dir" | "symlink" | "hardlink" | "chardev" | "blockdev" | "fifo"
    data: bytes = b""
    mode: int = 0o644
    target: str = ""  # link target for symlink/hardlink


LayerSpec = Sequence[Entry] | bytes


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _tar(members: Sequence[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _info(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.type = _KINDS[entry.kind]
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = (
        entry.mode, 0, 0, 0, "", "")
    info.size = len(entry.data) if entry.kind == "file" else 0
    info.linkname = entry.target
    if entry.kind in ("chardev", "blockdev"):
        info.devmajor, info.devminor = 1, 3
    return info


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return _info(Entry(name, data=data)), data


def layer_tar(entries: Sequence[Entry], compress: bool = True) -> bytes:
    """One layer: a tar of ``entries`` in order, gzip-compressed unless ``compress`` is False."""
    raw = _tar([(_info(entry), entry.data) for entry in entries])
    return gzip.compress(raw, mtime=0) if compress else raw


def _layer_blobs(layers: Sequence[LayerSpec], compress: bool) -> list[tuple[bytes, str]]:
    """(blob, diff_id) per layer."""
    blobs = []
    for layer in layers:
        if isinstance(layer, bytes):
            blobs.append((layer, sha256(layer)))
        else:
            raw = layer_tar(layer, compress=False)
            blobs.append((gzip.compress(raw, mtime=0) if compress else raw, sha256(raw)))
    return blobs


def _config_bytes(config: Mapping[str, Any] | bytes | None, diff_ids: list[str]) -> bytes:
    """The config blob; a given ``rootfs`` (or raw bytes) is kept, to let tests lie."""
    if isinstance(config, bytes):
        return config
    value = {"architecture": HOST_ARCH, "os": "linux", **(config or {})}
    value.setdefault("rootfs", {"type": "layers", "diff_ids": diff_ids})
    return canonical_json(value)


def _descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


def oci_image_files(layers: Sequence[LayerSpec], config: Mapping[str, Any] | bytes | None = None,
                    compress: bool = True) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The blobs of one image as {"blobs/sha256/<hex>": bytes}, and its manifest's descriptor."""
    blobs = _layer_blobs(layers, compress)
    config_data = _config_bytes(config, [diff_id for _, diff_id in blobs])
    layer_type = OCI_LAYER + "+gzip" if compress else OCI_LAYER
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": _descriptor(OCI_CONFIG, config_data),
        "layers": [_descriptor(layer_type, blob) for blob, _ in blobs]})
    files = {f"blobs/sha256/{sha256(data)[7:]}": data
             for data in [config_data, manifest, *(blob for blob, _ in blobs)]}
    return files, _descriptor(OCI_MANIFEST, manifest)


def _write_layout(path: Path, files: Mapping[str, bytes], descriptor: dict[str, Any]) -> None:
    """Add ``files`` and one index entry to the layout at ``path`` (made when missing)."""
    (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (path / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    index_path = path / "index.json"
    index: dict[str, Any] = (json.loads(index_path.read_bytes()) if index_path.exists()
             else {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
    index["manifests"].append(descriptor)
    index_path.write_bytes(canonical_json(index))
    for name, data in files.items():
        (path / name).write_bytes(data)


def write_oci_layout(path: Path, layers: Sequence[LayerSpec],
                     config: Mapping[str, Any] | bytes | None = None, tag: str = "latest",
                     compress: bool = True) -> str:
    """An OCI image layout at ``path``; returns the manifest digest.

    Writing into an existing layout adds the image to its index.json, so one
    layout can hold several tags.
    """
    files, descriptor = oci_image_files(layers, config, compress)
    descriptor["annotations"] = {REF_NAME: tag}
    _write_layout(path, files, descriptor)
    return str(descriptor["digest"])


def write_oci_index(path: Path, images: Mapping[str, Sequence[LayerSpec]],
                    tag: str = "latest") -> dict[str, str]:
    """A multi-platform layout: {architecture: layers}; returns {architecture: manifest digest}."""
    files: dict[str, bytes] = {}
    entries, digests = [], {}
    for arch, layers in images.items():
        image_files, descriptor = oci_image_files(layers, {"architecture": arch})
        files.update(image_files)
        entries.append({**descriptor, "platform": {"os": "linux", "architecture": arch}})
        digests[arch] = str(descriptor["digest"])
    index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    files[f"blobs/sha256/{sha256(index)[7:]}"] = index
    _write_layout(path, files, _descriptor(OCI_INDEX, index, annotations={REF_NAME: tag}))
    return digests


def write_oci_archive(file: Path, layers: Sequence[LayerSpec],
                      config: Mapping[str, Any] | bytes | None = None, tag: str = "latest",
                      extra: Sequence[Entry] = ()) -> str:
    """A tar of an OCI layout, members sorted; ``extra`` members are added at its end."""
    files, descriptor = oci_image_files(layers, config)
    descriptor["annotations"] = {REF_NAME: tag}
    files["oci-layout"] = canonical_json({"imageLayoutVersion": "1.0.0"})
    files["index.json"] = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                          "manifests": [descriptor]})
    members = [_file(name, data) for name, data in sorted(files.items())]
    file.write_bytes(_tar(members + [(_info(entry), entry.data) for entry in extra]))
    return str(descriptor["digest"])


DockerImage = tuple[str, Sequence[LayerSpec], Mapping[str, Any] | None]


def write_docker_archives(file: Path, images: Sequence[DockerImage],
                          blobs: bool = False) -> list[str]:
    """A ``docker save`` archive of several (repo_tag, layers, config) images.

    Legacy layout (``<id>/layer.tar``, ``<hex>.json``), or with ``blobs`` the
    layout of docker 25 and later: every file a ``blobs/sha256/<hex>``.
    """
    files: dict[str, bytes] = {}
    manifest, digests = [], []
    for repo_tag, layers, config in images:
        names, parent = [], ""
        layer_blobs = _layer_blobs(layers, compress=False)
        for blob, diff_id in layer_blobs:
            layer_id = hashlib.sha256(f"{parent}{diff_id}".encode()).hexdigest()
            name = f"blobs/sha256/{diff_id[7:]}" if blobs else f"{layer_id}/layer.tar"
            files[name] = blob
            if not blobs:
                files[f"{layer_id}/VERSION"] = b"1.0"
                files[f"{layer_id}/json"] = canonical_json({"id": layer_id, "parent": parent})
            names.append(name)
            parent = layer_id
        config_data = _config_bytes(config, [diff_id for _, diff_id in layer_blobs])
        config_name = (f"blobs/sha256/{sha256(config_data)[7:]}" if blobs
                       else f"{sha256(config_data)[7:]}.json")
        files[config_name] = config_data
        manifest.append({"Config": config_name, "RepoTags": [repo_tag], "Layers": names})
        digests.append(sha256(config_data))
    files["manifest.json"] = canonical_json(manifest)
    file.write_bytes(_tar([_file(name, data) for name, data in sorted(files.items())]))
    return digests


def write_docker_archive(file: Path, layers: Sequence[LayerSpec],
                         config: Mapping[str, Any] | None = None,
                         repo_tag: str = "example:latest", blobs: bool = False) -> str:
    """A ``docker save`` archive; returns "sha256:<config digest>" (the image ID)."""
    return write_docker_archives(file, [(repo_tag, layers, config)], blobs)[0]


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def manifest_of(layout: Path, digest: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(blob_path(layout, digest).read_bytes())
    return value
