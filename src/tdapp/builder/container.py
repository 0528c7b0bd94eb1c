"""``tdapp build --image REF``: a container image as a measured tdapp image.

Owns the mapping from a container image to an image of the store: the layers
are unpacked (tdapp.builder.oci) into a staging folder of the store, the whole
tree is measured, and the image config gives the defaults: ``Entrypoint`` +
``Cmd`` the measured entrypoint (a bare program name resolved on the image's
``PATH``), ``User`` the measured user, ``Env`` and ``WorkingDir`` the session
template's environment and working folder. The reference and digest are
recorded next to the measurement. Must never give such an image host paths: all
of the program is in the image.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tdapp.builder.build import BuildOptions, now
from tdapp.builder.manifest import (
    HEAP_RANGE,
    STACK_RANGE,
    Config,
    Manifest,
    Source,
    check_entrypoint,
    check_limit,
    check_mode,
    check_name,
    check_user,
    parse_entrypoint,
)
from tdapp.builder.measure import measurement, scan_tree
from tdapp.builder.oci import ImageConfig, parse_reference, unpack_image
from tdapp.builder.paths import find_program, user_ids
from tdapp.builder.store import Image, Staging
from tdapp.errors import InputError, UsageError

DEFAULT_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def build_from_container(reference: str, options: BuildOptions,
                         progress: Callable[[str], None] | None = None) -> Image:
    """Store the container image ``reference`` as image ``options.name``.

    ``options.entrypoint`` overrides the image's Entrypoint and Cmd; host paths are
    refused.
    """
    if options.host_paths:
        raise UsageError("host paths cannot be given to an image from a container image: it "
                         "holds its whole root file system, and no host file may be part of it")
    name = check_name(options.name)
    heap = check_limit(options.heap, "heap", HEAP_RANGE)
    stack = check_limit(options.stack, "stack", STACK_RANGE)
    mode = check_mode(options.mode)
    command = parse_entrypoint(options.entrypoint) if options.entrypoint is not None else None
    parse_reference(reference)  # a malformed reference fails before anything is written
    with Staging() as staging:
        unpacked = unpack_image(reference, staging.root, progress)
        image_config = unpacked.config
        user = check_user(image_config.user, InputError)
        if user and user_ids(staging.root, user) is None:
            raise InputError(f"{reference}: the image's User {user!r} is not in its "
                             "/etc/passwd or /etc/group")
        entrypoint = _entrypoint(staging.root, command, image_config, reference)
        tree = scan_tree(staging.root)
        config = Config(entrypoint, heap, stack, mode, (), user)
        source = Source(reference, unpacked.digest, image_config.env,
                        image_config.working_dir or "/")
        manifest = Manifest(name, config, tree.files, measurement(config, tree), now(),
                            tree.dirs, tree.links, source)
        staging.write_manifest(manifest)
        path = staging.publish(name)
    return Image.from_manifest(manifest, path)


def _entrypoint(root: Path, command: tuple[str, ...] | None, config: ImageConfig,
                reference: str) -> tuple[str, ...]:
    """The program and arguments to measure, with the program as an absolute path."""
    argv = command if command is not None else (*config.entrypoint, *config.cmd)
    if not argv:
        raise UsageError(f"{reference} has neither Entrypoint nor Cmd; name the program with "
                         "--entrypoint")
    search = next((entry.split("=", 1)[1] for entry in config.env
                   if entry.startswith("PATH=")), DEFAULT_SEARCH_PATH)
    program = find_program(root, argv[0], search)
    if program is None:
        raise InputError(f"{reference}: the program {argv[0]!r} is not an executable file "
                         f"of the image (searched PATH={search})")
    return check_entrypoint((program, *argv[1:]), InputError)
