"""``tdapp build``, ``tdapp measure``, ``tdapp images``, ``tdapp image export|import|rm``."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from tdapp.builder import (
    BuildOptions,
    Image,
    build_image,
    export_image,
    import_image,
    list_images,
    load_image,
    measure_image,
    parse_size,
    remove_image,
    write_template,
)
from tdapp.builder.container import build_from_container
from tdapp.builder.manifest import MODES
from tdapp.builder.store import modified_error
from tdapp.builder.template import TemplateTee, vm_values
from tdapp.cli.options import complete_image
from tdapp.errors import InputError, UsageError


class _SizeParam(click.ParamType):  # type: ignore[type-arg]
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        what = param.name if param is not None and param.name else "size"
        try:
            return parse_size(str(value), what)
        except UsageError as error:
            self.fail(error.message, param, ctx)


SIZE = _SizeParam()


def _note(text: str) -> None:
    click.echo(text, err=True)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _created(image: Image) -> str:
    try:
        return datetime.strptime(image.created, "%Y-%m-%dT%H:%M:%SZ").strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return image.created


@click.command()
@click.argument("app_dir", type=click.Path(path_type=Path, file_okay=False), required=False)
@click.option("--image", "reference", metavar="REF",
              help="Take the program from a container image instead of APP_DIR: "
                   "docker-archive:FILE, oci:DIR[:TAG] or oci-archive:FILE[:TAG].")
@click.option("--name", required=True, help="Image name: a-z 0-9 . _ - (up to 64).")
@click.option("--entrypoint", metavar="CMD",
              help="Program and arguments, split like a session command "
                   "(default: the image's single executable file).")
@click.option("--heap", type=SIZE, default="40M", show_default=True,
              help="Heap limit (bytes, or K, M, G).")
@click.option("--stack", type=SIZE, default="4M", show_default=True,
              help="Stack limit (bytes, or K, M, G).")
@click.option("--mode", type=click.Choice(MODES), default=None,
              help="Attestation the image is meant for (part of its measurement): sim "
                   "(default) or hardware (the default for --tee sgx, tdx or snp).")
@click.option("--tee", type=click.Choice([tee.value for tee in TemplateTee]), default=None,
              help="Where it will run, for the template: sim, sgx, or a tdx or snp "
                   "confidential VM (the template then pins the VM and the workload).")
@click.option("--vm-measurements", "vm_file", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="JSON with the VM's measurements for a tdx template "
                                 "(mrtd, rtmr0, rtmr1, rtmr2) or an snp one (measurement); "
                                 "without it the template has $TDX_MRTD … to fill in.")
@click.option("--host-path", "host_paths", multiple=True, metavar="PATH",
              help="Host path (glob allowed) the program may read, e.g. /usr/bin/python3. "
                   "Repeatable.")
@click.option("-o", "--output", "template", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the session template to this file.")
@click.option("--las", "las_address", default=None, metavar="HOST:PORT",
              help="The LAS whose platform a sim template accepts (default: the one tdapp "
                   "up announced, else 127.0.0.1:18766).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def build(app_dir: Path | None, reference: str | None, name: str, entrypoint: str | None,
          heap: int, stack: int, mode: str | None, tee: str | None, vm_file: Path | None,
          host_paths: tuple[str, ...], template: Path | None, las_address: str | None,
          as_json: bool) -> None:
    """Build APP_DIR (or the container image --image REF) into the image NAME and print
    its measurement.

    A Makefile (make -B) or build.sh in APP_DIR is run first, in a copy of the
    folder, reproducibly. The image holds the files listed in APP_DIR/image.txt,
    or else every file except sources (*.c, *.h, *.o, makefiles, build.sh) and
    dot-files. With --image, the image is the container image's whole root file
    system, its layers unpacked in order; its Entrypoint and Cmd (unless
    --entrypoint), User, Env and WorkingDir are kept.
    """
    if (app_dir is None) == (reference is None):
        raise UsageError("give either APP_DIR or --image REF")
    if reference is not None and host_paths:
        raise UsageError("--host-path cannot be used with --image: a container image holds "
                         "its whole root file system, and no host file may be part of it")
    target = TemplateTee(tee) if tee is not None else None
    if mode is None:
        mode = "sim" if target in (None, TemplateTee.SIM) else "hardware"
    if target is not None and (target is TemplateTee.SIM) != (mode == "sim"):
        raise UsageError(f"--tee {target} and --mode {mode} do not go together")
    vm = _vm_measurements(vm_file, target) if vm_file is not None else None
    if template is not None and not template.absolute().parent.is_dir():
        # Checked first, so that a build is not wasted on a template that cannot be written.
        raise InputError(f"cannot write {template}: its folder does not exist")
    if reference is not None:
        image = build_from_container(reference, BuildOptions(
            name=name, entrypoint=entrypoint, heap=heap, stack=stack, mode=mode),
            progress=_note)
    else:
        assert app_dir is not None
        options = BuildOptions(name=name, entrypoint=entrypoint, heap=heap, stack=stack,
                               mode=mode, host_paths=host_paths)
        image = build_image(app_dir, options, output=_note)
    files = len(image.files)
    _note(f"built image {image.name}: {files} file{'s' if files != 1 else ''}, "
          f"{_human(image.size)}, entrypoint {' '.join(image.entrypoint)}")
    if image.source is not None:
        _note(f"from {image.source.reference} ({image.source.digest})")
    if template is not None:
        platform = _las_platform(las_address) if image.mode == "sim" else None
        write_template(image, template, las_platform=platform, tee=target, vm=vm)
        _note(f"wrote session template {template}")
        if image.mode == "sim" and platform is None:
            _note("no LAS answered: the template accepts the platform of the LAS that "
                  "encryptedpush finds ($LAS_PLATFORM)")
    if as_json:
        click.echo(json.dumps({"name": image.name, "measurement": image.measurement,
                               "mode": image.mode, "files": files, "size": image.size,
                               "template": None if template is None else str(template)}))
        return
    click.echo(image.measurement)


def _vm_measurements(path: Path, tee: TemplateTee | None) -> dict[str, str]:
    if tee is None:
        raise UsageError("--vm-measurements needs --tee tdx or --tee snp")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"cannot read VM measurements from {path}: {error}") from None
    if not isinstance(document, dict):
        raise InputError(f"{path}: expected a JSON object of VM measurements")
    return vm_values(tee, document)


@click.command()
@click.argument("name", shell_complete=complete_image)
def measure(name: str) -> None:
    """Recompute the measurement of image NAME from its files and print it.

    Fails if it differs from the measurement recorded when the image was built.
    """
    image = load_image(name, verify=False)
    actual = measure_image(image.path)
    if actual != image.measurement:
        raise modified_error(name, actual, image.measurement)
    click.echo(actual)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list.")
def images(as_json: bool) -> None:
    """List the images in the store (recorded measurements; 'tdapp measure' checks one)."""
    found, problems = list_images()
    for problem in problems:
        _note(f"tdapp: warning: {problem}")
    if as_json:
        click.echo(json.dumps([{
            "name": image.name, "measurement": image.measurement, "size": image.size,
            "files": len(image.files), "created": image.created,
            "entrypoint": list(image.entrypoint), "heap": image.heap, "stack": image.stack,
            "mode": image.mode, "host_paths": list(image.host_paths), "user": image.user,
            "source": None if image.source is None else {
                "reference": image.source.reference, "digest": image.source.digest},
        } for image in found], ensure_ascii=False))
        return
    if not found:
        _note("no images (make one with 'tdapp build APP_DIR --name NAME')")
        return
    width = max(len("NAME"), *(len(image.name) for image in found))
    click.echo(f"{'NAME':<{width}}  {'MEASUREMENT':<17}  {'SIZE':>10}  {'CREATED (UTC)':<16}  "
               "SOURCE")
    for image in found:
        source = (f"{image.source.reference} {image.source.digest[:19]}…"
                  if image.source is not None else "-")
        click.echo(f"{image.name:<{width}}  {image.measurement[:16]}…  "
                   f"{_human(image.size):>10}  {_created(image):<16}  {source}")


@click.group()
def image() -> None:
    """Move images between machines: deterministic tar archives."""


@image.command(name="export")
@click.argument("name", shell_complete=complete_image)
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
def export_(name: str, file: Path) -> None:
    """Write image NAME to the tar archive FILE; prints its measurement."""
    measured = export_image(name, file)
    _note(f"exported image {name} to {file}")
    click.echo(measured)


@image.command(name="import")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--name", help="Store the image under this name instead of its own.")
@click.option("--force", is_flag=True, help="Replace an image of that name with another "
                                            "measurement.")
def import_(file: Path, name: str | None, force: bool) -> None:
    """Add the image in the tar archive FILE to the store, after checking its measurement."""
    measured = import_image(file, name=name, force=force)
    _note(f"imported {file}")
    click.echo(measured)


@image.command(name="rm")
@click.argument("name", shell_complete=complete_image)
def rm(name: str) -> None:
    """Remove image NAME from the store."""
    remove_image(name)
    _note(f"removed image {name}")


def _las_platform(las_address: str | None) -> str | None:
    """The platform id of this user's LAS, or None when none answers (asked briefly)."""
    from tdapp.attest.las import LasClient
    from tdapp.client.announce import announced
    from tdapp.errors import TdappError

    try:
        platform = LasClient(announced("las", las_address, "--las"), timeout=3.0).platform()
    except TdappError:
        return None
    value = platform.get("platform")
    return value if isinstance(value, str) else None
