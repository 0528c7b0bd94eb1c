"""``tdapp volume …``: create, add to, show, extract and verify encrypted volumes."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import click

from tdapp.core.progress import byte_progress, counted
from tdapp.errors import UsageError
from tdapp.volume import DEFAULT_CHUNK_SIZE, FORMAT_VERSION, RegionMap, Volume, VolumeKey, VolumeTag


class _HexParam(click.ParamType):  # type: ignore[type-arg]
    def __init__(self, kind: type[VolumeKey] | type[VolumeTag]) -> None:
        self.kind = kind
        self.name = "HEX"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> VolumeKey | VolumeTag:
        if isinstance(value, self.kind):
            return value
        try:
            return self.kind.from_hex(str(value))
        except UsageError as error:
            self.fail(error.message, param, ctx)


KEY = _HexParam(VolumeKey)
TAG = _HexParam(VolumeTag)

_key_option = click.option(
    "--key", "key", type=KEY, envvar="VOLUME_KEY", required=True, show_envvar=True,
    help="Volume key, 64 hex characters.")
_tag_option = click.option(
    "--tag", "tag", type=TAG, envvar="VOLUME_TAG", required=True, show_envvar=True,
    help="Expected volume tag, 32 hex characters (the tag of the latest version).")
_envar_option = click.option(
    "--envar-output", is_flag=True,
    help="Print exactly 'export VOLUME_KEY=…' and 'export VOLUME_TAG=…'.")
_volume_dir = click.argument("volume_dir", type=click.Path(path_type=Path, file_okay=False))


def _print_key_and_tag(key: VolumeKey, tag: VolumeTag, envar_output: bool) -> None:
    if envar_output:
        click.echo(f"export VOLUME_KEY={key.hex()}")
        click.echo(f"export VOLUME_TAG={tag.hex()}")
    else:
        click.echo(f"key: {key.hex()}")
        click.echo(f"tag: {tag.hex()}")


@click.group()
def volume() -> None:
    """Encrypted volumes: a folder of sealed files opened with a key and a tag."""


@volume.command()
@_volume_dir
@click.option("--from", "source", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Fill the new volume from this folder.")
@click.option("--region", "regions", multiple=True, metavar="PATH=KIND",
              help="Protection of a path prefix: encrypted, authenticated or not-protected "
                   "(longest prefix wins; default / = encrypted). Repeatable.")
@click.option("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, show_default=True,
              help="Bytes of plaintext per sealed chunk.")
@_envar_option
def create(volume_dir: Path, source: Path | None, regions: tuple[str, ...], chunk_size: int,
           envar_output: bool) -> None:
    """Create a new volume in VOLUME_DIR (missing or empty) with a fresh random key."""
    region_map = RegionMap.parse_options(regions)
    key = VolumeKey.generate()
    with byte_progress("encrypting", None) as progress:
        created = Volume.create(volume_dir, key, source=source, regions=region_map,
                                chunk_size=chunk_size, progress=progress)
    _print_key_and_tag(key, created.tag, envar_output)


@volume.command()
@_volume_dir
@click.argument("src_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@_key_option
@_tag_option
@_envar_option
def add(volume_dir: Path, src_dir: Path, key: VolumeKey, tag: VolumeTag,
        envar_output: bool) -> None:
    """Add or replace the files of SRC_DIR in the volume; prints the new tag."""
    opened = Volume.open(volume_dir, key, tag)
    with byte_progress("encrypting", None) as progress:
        new_tag = opened.add(src_dir, progress=progress)
    _print_key_and_tag(key, new_tag, envar_output)


@volume.command()
@_volume_dir
@_key_option
@_tag_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show(volume_dir: Path, key: VolumeKey, tag: VolumeTag, as_json: bool) -> None:
    """List the volume's regions and files (checks the FSPF, not file contents)."""
    opened = Volume.open(volume_dir, key, tag)
    files = opened.files()
    if as_json:
        click.echo(json.dumps({
            "format": FORMAT_VERSION,
            "tag": opened.tag.hex(),
            "chunk_size": opened.chunk_size,
            "regions": {("/" + prefix): kind.value for prefix, kind in opened.regions},
            "files": [{"path": f.path, "region": f.region.value, "size": f.size,
                       "mode": f"{f.mode:04o}"} for f in files],
        }, ensure_ascii=False))
        return
    click.echo(f"volume      {volume_dir}")
    click.echo(f"format      {FORMAT_VERSION}, chunk size {opened.chunk_size} bytes")
    click.echo(f"tag         {opened.tag.hex()}")
    click.echo("regions     " + ", ".join(f"/{prefix} {kind.value}"
                                          for prefix, kind in opened.regions))
    click.echo(f"files       {len(files)}, {sum(f.size for f in files)} bytes")
    for info in files:
        permissions = stat.filemode(stat.S_IFREG | info.mode)
        click.echo(f"  {info.region.value:<14} {permissions} {info.size:>12}  {info.path}")


@volume.command()
@_volume_dir
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@_key_option
@_tag_option
def extract(volume_dir: Path, out_dir: Path, key: VolumeKey, tag: VolumeTag) -> None:
    """Verify and decrypt the volume into OUT_DIR; nothing is written unless all verifies."""
    opened = Volume.open(volume_dir, key, tag)
    total = sum(info.size for info in opened.files())
    with byte_progress("decrypting", total) as progress:
        report = opened.extract(out_dir, progress=progress)
    click.echo(f"extracted {counted(report.files, 'file')} ({counted(report.bytes, 'byte')}) "
               f"into {out_dir}", err=True)


@volume.command()
@_volume_dir
@_key_option
@_tag_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def verify(volume_dir: Path, key: VolumeKey, tag: VolumeTag, as_json: bool) -> None:
    """Check every byte of the volume against its key and expected tag."""
    opened = Volume.open(volume_dir, key, tag)
    total = sum(info.size for info in opened.files())
    with byte_progress("verifying", total) as progress:
        report = opened.verify(progress=progress)
    if as_json:
        click.echo(json.dumps({"ok": True, "files": report.files, "bytes": report.bytes,
                               "tag": opened.tag.hex()}))
        return
    click.echo(f"ok: {counted(report.files, 'file')}, {counted(report.bytes, 'byte')} verified, "
               f"tag {opened.tag.hex()}")


@volume.command()
@_volume_dir
@click.argument("mountpoint", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--key", "key", type=KEY, envvar="VOLUME_KEY", show_envvar=True,
              help="Volume key, 64 hex characters (or give --key-fd).")
@click.option("--tag", "tag", type=TAG, envvar="VOLUME_TAG", show_envvar=True,
              help="Expected volume tag, 32 hex characters (or give --key-fd).")
@click.option("--key-fd", "key_fd", type=click.IntRange(min=0), default=None, metavar="FD",
              help="Read the key and tag from this inherited descriptor instead, as the "
                   "lines VOLUME_KEY=<hex> and VOLUME_TAG=<hex>; keeps them out of the "
                   "command line and the environment.")
@click.option("--read-only", is_flag=True, help="Refuse every change (EROFS).")
@click.option("--allow-other", is_flag=True,
              help="Let other users (and sandboxes in their own user namespace) use the mount.")
@click.option("--report", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write {\"tag\", \"failures\"} as JSON to this file when unmounted.")
@click.option("--die-with-parent", is_flag=True, hidden=True,
              help="Unmount when the parent process dies (for tdapp run).")
def mount(volume_dir: Path, mountpoint: Path, key: VolumeKey | None, tag: VolumeTag | None,
          key_fd: int | None, read_only: bool, allow_other: bool, report: Path | None,
          die_with_parent: bool) -> None:
    """Mount the volume at MOUNTPOINT, decrypting and verifying as files are read.

    Runs until unmounted (fusermount3 -u MOUNTPOINT) or interrupted; then seals
    what changed and prints the new tag. A chunk that fails authentication is an
    I/O error to the reader, and makes this command fail naming the file and chunk.
    """
    from tdapp.core.atomic import write_atomically
    from tdapp.errors import IntegrityError
    from tdapp.runtime.mounts import read_key_message
    from tdapp.runtime.shield import end_with_parent, serve_volume

    if key_fd is not None:
        if key is not None or tag is not None:
            raise UsageError("give the key and tag either with --key-fd or with --key and --tag "
                             "(VOLUME_KEY, VOLUME_TAG), not both")
        key, tag = read_key_message(key_fd)
    elif key is None or tag is None:
        missing = "--key (or VOLUME_KEY)" if key is None else "--tag (or VOLUME_TAG)"
        raise UsageError(f"missing {missing}; or give both with --key-fd")
    if die_with_parent:
        end_with_parent()
    # Absolute: libfuse changes the working folder to / once mounted (a relative --report
    # would otherwise be written at the root).
    report = report.absolute() if report is not None else None
    opened = Volume.open(volume_dir.absolute(), key, tag)
    click.echo(f"mounted {volume_dir} at {mountpoint}{' (read-only)' if read_only else ''}",
               err=True)
    result = serve_volume(opened, mountpoint.absolute(), read_only=read_only,
                          allow_other=allow_other)
    if report is not None:
        write_atomically(report, json.dumps({"tag": result.tag.hex(),
                                             "failures": result.failures}).encode(),
                         permissions=0o600)
    click.echo(result.tag.hex())
    if result.failures:
        more = f" (and {len(result.failures) - 1} more)" if len(result.failures) > 1 else ""
        raise IntegrityError(f"{result.failures[0]}{more}; the reads were refused")
