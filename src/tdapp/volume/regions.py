"""Protection regions of a volume: which paths are encrypted, authenticated or left alone.

The longest matching path prefix wins, matched on whole path components, so a
region ``logs`` covers ``logs/a`` but not ``logs2/a``. The root region is always
present and defaults to ``encrypted``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from tdapp.errors import UsageError
from tdapp.volume.paths import normalize_relative


class RegionKind(StrEnum):
    ENCRYPTED = "encrypted"
    AUTHENTICATED = "authenticated"
    NOT_PROTECTED = "not-protected"

    @property
    def protected(self) -> bool:
        return self is not RegionKind.NOT_PROTECTED

    @classmethod
    def parse(cls, text: str) -> RegionKind:
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(kind.value for kind in cls)
            raise UsageError(f"unknown region kind {text!r}: expected one of {choices}") from None


@dataclass(frozen=True)
class RegionMap:
    """An immutable prefix -> kind table. The empty prefix is the volume root."""

    entries: Mapping[str, RegionKind]

    @classmethod
    def build(cls, regions: Iterable[tuple[str, RegionKind]]) -> RegionMap:
        table: dict[str, RegionKind] = {"": RegionKind.ENCRYPTED}
        seen: set[str] = set()
        for raw_path, kind in regions:
            prefix = normalize_relative(raw_path, allow_root=True)
            if prefix in seen:
                raise UsageError(f"region {raw_path!r} is given twice")
            seen.add(prefix)
            table[prefix] = kind
        return cls(dict(sorted(table.items())))

    @classmethod
    def parse_options(cls, options: Iterable[str]) -> RegionMap:
        """Parse CLI ``PATH=KIND`` options."""
        pairs: list[tuple[str, RegionKind]] = []
        for option in options:
            path, sep, kind = option.rpartition("=")
            if not sep or not path:
                raise UsageError(
                    f"region {option!r} must look like PATH=KIND, e.g. /logs=not-protected"
                )
            pairs.append((path, RegionKind.parse(kind)))
        return cls.build(pairs)

    def kind_of(self, path: str) -> RegionKind:
        """The kind of the longest region prefix covering ``path`` (normalized, relative)."""
        candidate = path
        while True:
            kind = self.entries.get(candidate)
            if kind is not None:
                return kind
            if not candidate:
                raise AssertionError("the root region is always present")
            candidate = candidate.rpartition("/")[0]

    def leads_to_unprotected(self, folder: str) -> bool:
        """Whether a not-protected region lies strictly inside ``folder`` (so ``plain/``
        needs the folder to hold that region's files)."""
        inside = f"{folder}/" if folder else ""
        return any(prefix.startswith(inside) and prefix != folder and not kind.protected
                   for prefix, kind in self.entries.items())

    def as_list(self) -> list[tuple[str, RegionKind]]:
        return list(self.entries.items())
