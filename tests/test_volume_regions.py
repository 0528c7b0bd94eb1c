"""Region prefixes and path rules: longest whole-component prefix wins, bad paths refused."""

from __future__ import annotations

import pytest

from tdapp.errors import InputError, UsageError
from tdapp.volume import RegionKind, RegionMap
from tdapp.volume.paths import check_stored_path, normalize_relative

E, A, N = RegionKind.ENCRYPTED, RegionKind.AUTHENTICATED, RegionKind.NOT_PROTECTED


def test_root_defaults_to_encrypted() -> None:
    assert RegionMap.build([]).kind_of("any/file") is E


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("logs/a.log", N),
        ("logs/keep/a.log", A),
        ("logs/keep", A),
        ("logs2/a.log", E),  # a prefix matches whole components only
        ("log", E),
        ("data.txt", E),
    ],
)
def test_longest_component_prefix_wins(path: str, kind: RegionKind) -> None:
    regions = RegionMap.parse_options(["/logs=not-protected", "logs/keep/=authenticated"])
    assert regions.kind_of(path) is kind


def test_root_region_can_be_overridden() -> None:
    regions = RegionMap.parse_options(["/=authenticated", "/secret=encrypted"])
    assert regions.kind_of("readme") is A
    assert regions.kind_of("secret/key") is E


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        ("/logs=plaintext", "unknown region kind 'plaintext'"),
        ("logs", "must look like PATH=KIND"),
        ("/a/../b=encrypted", "'..' component"),
        ("/logs=encrypted", None),
    ],
)
def test_region_options_are_validated(option: str, reason: str | None) -> None:
    if reason is None:
        assert RegionMap.parse_options([option]).kind_of("logs/x") is E
        return
    with pytest.raises(UsageError, match=reason):
        RegionMap.parse_options([option])


def test_a_region_given_twice_is_refused() -> None:
    with pytest.raises(UsageError, match="given twice"):
        RegionMap.parse_options(["/logs=encrypted", "logs/=not-protected"])


def test_user_paths_are_normalized() -> None:
    assert normalize_relative("/a//b/./c/") == "a/b/c"
    with pytest.raises(UsageError, match="names the volume root"):
        normalize_relative("/")


@pytest.mark.parametrize("path", ["", "/etc/passwd", "a/../../x", "a//b", "./a", "a/", "a\x00b"])
def test_stored_paths_must_be_canonical(path: str) -> None:
    with pytest.raises(InputError):
        check_stored_path(path)
