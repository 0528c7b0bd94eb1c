"""Measured images: build, measure, list, export and import (tdapp's ``build-image.sh``).

An image is a folder of the store, ``$TDAPP_HOME/images/<NAME>/``, holding
``manifest.json`` (entrypoint, heap and stack limits, mode, read-only host
paths, every file's hash, the measurement) and ``rootfs/``, the folder that is
``/`` for the program. Its measurement, tdapp's MrEnclave, is a SHA-256 over
a canonical encoding of all of that (docs/measurement.md). This package must
never let a measurement depend on timestamps, owners, paths or file order, nor
leave a half-written image under an image's name.

For the runtime: ``image, measured = hold_image(name, folder)`` copies the
image into a folder of its own and measures the copy (refusing one whose files
no longer give its recorded measurement); it binds ``measured`` into its
evidence and runs the copy, so the host cannot swap files between the
measurement and the run. Then make what ``image.root`` holds the
program's ``/`` read-only (its entries bound over a tmpfs root, where the
volume mount points can be made), bind each of ``image.host_paths`` (globs)
read-only, and apply ``image.heap`` and ``image.stack``.

- :func:`build_image` — ``tdapp build``
- :func:`measure_image` — recompute a measurement from the files on disk
- :func:`load_image`, :func:`list_images`, :func:`image_store_dir` — the store
- :func:`export_image`, :func:`import_image` — deterministic tar archives
- :func:`session_template` — the session template ``tdapp build -o`` writes
"""

from tdapp.builder.archive import export_image, import_image
from tdapp.builder.build import BuildOptions, build_image
from tdapp.builder.manifest import Config, FileRecord, Manifest, parse_size
from tdapp.builder.measure import canonical_bytes, measure_image, measurement
from tdapp.builder.store import (
    Image,
    hold_image,
    image_store_dir,
    list_images,
    load_image,
    remove_image,
)
from tdapp.builder.template import session_template, write_template

__all__ = [
    "BuildOptions",
    "Config",
    "FileRecord",
    "Image",
    "Manifest",
    "build_image",
    "canonical_bytes",
    "export_image",
    "hold_image",
    "image_store_dir",
    "import_image",
    "list_images",
    "load_image",
    "measure_image",
    "measurement",
    "parse_size",
    "remove_image",
    "session_template",
    "write_template",
]
