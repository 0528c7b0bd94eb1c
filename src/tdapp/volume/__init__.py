"""Encrypted volumes (SCONE's FSPF volumes): a folder of sealed files, a key and a tag.

This package owns the volume byte format and every operation on it. It must
never hand out plaintext that has not been authenticated, accept a tag other
than the one the caller expects, or leave a volume half-written. Use
:class:`Volume`; the modules below it are the hazardous layer.
"""

from tdapp.volume.api import FileInfo, Progress, VerifyReport, Volume
from tdapp.volume.fspf import DEFAULT_CHUNK_SIZE, FORMAT_VERSION
from tdapp.volume.keys import VolumeKey, VolumeTag
from tdapp.volume.regions import RegionKind, RegionMap

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "FileInfo",
    "Progress",
    "RegionKind",
    "RegionMap",
    "VerifyReport",
    "Volume",
    "VolumeKey",
    "VolumeTag",
]
