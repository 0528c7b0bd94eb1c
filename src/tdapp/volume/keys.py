"""Key and tag value types: validated on the way in, never printed by accident."""

from __future__ import annotations

import hmac
import os
from typing import ClassVar, Self

from tdapp.errors import UsageError


class _Secretish:
    """Fixed-length bytes parsed from hex, compared in constant time."""

    length: ClassVar[int]
    label: ClassVar[str]
    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != self.length:
            raise UsageError(f"{self.label} must be {self.length} bytes, got {len(raw)}")
        self._raw = bytes(raw)

    @classmethod
    def from_hex(cls, text: str) -> Self:
        cleaned = text.strip().lower()
        if len(cleaned) != 2 * cls.length:
            raise UsageError(
                f"{cls.label} must be {2 * cls.length} hex characters, got {len(cleaned)}"
            )
        try:
            raw = bytes.fromhex(cleaned)
        except ValueError:
            raise UsageError(f"{cls.label} is not hexadecimal") from None
        return cls(raw)

    @property
    def raw(self) -> bytes:
        return self._raw

    def hex(self) -> str:
        return self._raw.hex()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Secretish)
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash((type(self), self._raw))


class VolumeKey(_Secretish):
    """The 32-byte volume key. Its repr never shows the bytes."""

    length = 32
    label = "volume key"
    __slots__ = ()

    @classmethod
    def generate(cls) -> VolumeKey:
        return cls(os.urandom(cls.length))

    def __repr__(self) -> str:
        return "VolumeKey(<hidden>)"


class VolumeTag(_Secretish):
    """The 16-byte tag naming one state of a volume. Not secret, but unforgeable."""

    length = 16
    label = "volume tag"
    __slots__ = ()

    def __repr__(self) -> str:
        return f"VolumeTag({self.hex()})"

    def __str__(self) -> str:
        return self.hex()
