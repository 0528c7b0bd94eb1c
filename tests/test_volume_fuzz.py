"""Hostile stored bytes: the volume parsers raise only tdapp's typed errors, never crash or hang."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdapp.errors import TdappError
from tdapp.volume import VolumeKey, VolumeTag
from tdapp.volume.bundle import unpack
from tdapp.volume.fspf import HEADER_SIZE, MAGIC, Manifest, open_fspf, seal_fspf
from tdapp.volume.regions import RegionMap

KEY = VolumeKey(bytes(range(32)))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_fspf_bytes(data: bytes) -> None:
    for candidate in (data, MAGIC + data, MAGIC + b"\x00\x01\x00\x00" + data):
        with pytest.raises(TdappError):
            open_fspf(candidate, KEY, VolumeTag(bytes(16)))


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_manifest_json_sealed_with_the_right_key(document: object) -> None:
    """Even an FSPF a key holder wrote badly is refused with a reason, not a crash."""
    good, _ = seal_fspf(Manifest(64, 1, RegionMap.build([]), {}, {}), KEY)
    header = good[:HEADER_SIZE]
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from tdapp.volume.fspf import _hkdf  # the format's own key derivation

    salt = header[28:60]
    sealed = AESGCM(_hkdf(KEY, salt=salt, info=b"tdapp/v1 fspf", length=32)).encrypt(
        bytes(12), json.dumps(document).encode(), header)
    with contextlib.suppress(TdappError):
        open_fspf(header + sealed, KEY, VolumeTag(sealed[-16:]))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2000))
def test_arbitrary_bundle_bytes(tmp_path: Path, data: bytes) -> None:
    bundle = tmp_path / "b.zip"
    bundle.write_bytes(b"PK\x03\x04" + data)
    with tempfile.TemporaryDirectory(dir=tmp_path) as target, \
            contextlib.suppress(TdappError):
        unpack(bundle, Path(target))
