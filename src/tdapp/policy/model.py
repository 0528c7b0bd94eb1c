"""The session model: volumes, images, and the session that joins every section.

A :class:`Session` is immutable and normalized: two documents that say the
same thing in different YAML give equal sessions (and so equal hashes). Its
validators own the rules that span sections: names are unique, and every name
one section uses refers to something the session defines. The model must never
hold a value it has not validated, whether it came from YAML or from code.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from tdapp.policy.access import AccessPolicy, is_identity, normalize_certificate
from tdapp.policy.base import Frozen, Section
from tdapp.policy.emit import dump_yaml
from tdapp.policy.secrets import Exports, Secret, VolumeImport
from tdapp.policy.security import Security
from tdapp.policy.services import Service
from tdapp.policy.values import (
    AbsolutePath,
    FileMode,
    FspfKey,
    FspfTag,
    Hash,
    ImageName,
    Int,
    Many,
    Measurements,
    SessionName,
    Tags,
    Text,
    VolumeName,
    fail,
    hex_string,
    int_range,
    is_placeholder,
    quoted,
    unique_names,
)

UpdatePolicy = Literal["rollback_protected", "ephemeral", "no_rollback_protection"]
DEFAULT_VERSION = "0.1"
_VERSION = re.compile(r"0\.[12]|0\.3(?:\.[0-9]{1,4})?")


class Volume(Frozen):
    """An encrypted volume: its key and the tag of its current state, or auto-initialised."""

    name: VolumeName
    fspf_key: FspfKey | None = Field(default=None, repr=False)  # a key: never in a repr
    fspf_tag: FspfTag | None = None
    update_policy: UpdatePolicy = "rollback_protected"
    export: Exports = ()
    import_: VolumeImport | None = Field(default=None, alias="import")

    @model_validator(mode="after")
    def _key_and_tag(self) -> Volume:
        if (self.fspf_key is None) != (self.fspf_tag is None):
            # A key without a tag cannot be checked for freshness, a tag without a
            # key cannot be opened. With neither, SCONE makes the volume on first use
            # (tdapp does not: tdapp.policy.enforced refuses that at creation).
            fail("give both fspf_key and fspf_tag", "fspf_key" if self.fspf_tag is None
                 else "fspf_tag")
        if self.import_ is not None:
            for key in ("fspf_key", "fspf_tag", "export"):
                if getattr(self, key):
                    fail(f"an imported volume cannot have {key}", key)
        for index, target in enumerate(self.export):
            if target.namespace is not None:
                fail("volumes are exported to sessions, not namespaces", "export", index)
        return self

    @property
    def auto_initialised(self) -> bool:
        """Neither key nor tag given (and not imported): in SCONE's language the volume is
        made on first use; tdapp refuses such a volume at creation (tdapp.policy.enforced)."""
        return self.fspf_key is None and self.fspf_tag is None and self.import_ is None


class ImageVolume(Frozen):
    """Where an image mounts a session volume, and what changes to it are kept."""

    name: VolumeName
    path: AbsolutePath
    update_policy: UpdatePolicy = "rollback_protected"


class InjectionFile(Frozen):
    """A file made in memory at ``path`` from ``content`` with placeholders replaced.

    Without ``content`` SCONE reads the file the image has at ``path``; tdapp
    refuses that at creation (tdapp.policy.enforced).
    """

    path: AbsolutePath
    content: str | None = Field(default=None, repr=False)  # may hold credentials
    permission: Annotated[FileMode, int_range(0, 0o7777)] | None = None


def _path_only(value: object) -> object:
    return {"path": value} if isinstance(value, str) else value


class Image(Frozen):
    """What a service's file system gets: mounted volumes and injected files."""

    name: ImageName
    mrenclaves: Measurements = ()
    tags: Tags = ()
    volumes: Annotated[tuple[ImageVolume, ...], Many] = ()
    injection_files: Annotated[tuple[Annotated[InjectionFile, BeforeValidator(_path_only)],
                                     ...], Many] = ()

    @model_validator(mode="after")
    def _distinct(self) -> Image:
        unique_names(self.volumes, "image volume", "volumes")
        unique_names(self.volumes, "mount path", "volumes", field="path")
        unique_names(self.injection_files, "injection file", "injection_files", field="path")
        return self


def _no_approvals(minimum: int) -> int:
    if minimum != 0:
        fail("approval boards are not supported: minimum must be 0")
    return minimum


class BoardPolicy(Frozen):
    """Palaemon's (0.1) approval board, as read back by its CAS. tdapp has no board."""

    minimum: Annotated[Int, AfterValidator(_no_approvals)] = 0
    timeout: Annotated[Int, int_range(0, 2**31 - 1)] = 0


def _version(value: str) -> str:
    if not _VERSION.fullmatch(value):
        fail(f"unsupported session language version {quoted(value)} "
             "(supported: 0.1, 0.2, 0.3 and 0.3.N)")
    return value


def _digest(value: str) -> str:
    # 0.1's `digest: create` on upload; a CAS read-back shows the hash instead.
    return value if value == "create" else _hash(value)


_hash = hex_string(64, "\"create\" or a SHA-256 hash")


def _signed_creator(value: object) -> object:
    if isinstance(value, dict) and "signer" in value:
        fail("signed policies (creator.signer) are not supported: the CAS records the "
             "identity that creates a session; remove creator")
    return value


def _creator(value: str) -> str:
    # Read-back documents carry the creator: an identity, or SCONE's PEM certificate.
    lowered = value.strip().lower()
    return lowered if is_identity(lowered) else normalize_certificate(value)


def _no_board(members: tuple[str, ...]) -> tuple[str, ...]:
    if members:
        fail("approval boards are not supported: board_members must be empty")
    return members


class Session(Frozen):
    """A session (security policy): a name and everything its services may get."""

    name: SessionName
    version: Annotated[Text, AfterValidator(_version)] = DEFAULT_VERSION
    predecessor: Hash | None = None
    digest: Annotated[Text, AfterValidator(_digest)] | None = None
    tags: Tags = ()
    board_members: Annotated[tuple[Text, ...], Many, AfterValidator(_no_board)] = ()
    board_policy: BoardPolicy | None = None
    access_policy: AccessPolicy = AccessPolicy()
    security: Security = Security()
    services: Annotated[tuple[Service, ...], Many] = ()
    volumes: Annotated[tuple[Volume, ...], Many] = ()
    images: Annotated[tuple[Image, ...], Many] = ()
    secrets: Annotated[tuple[Secret, ...], Many] = ()
    creator: Annotated[Text, BeforeValidator(_signed_creator),
                       AfterValidator(_creator)] | None = None

    @model_validator(mode="after")
    def _references(self) -> Session:
        unique_names(self.services, "service name", "services")
        volumes = unique_names(self.volumes, "volume name", "volumes")
        images = unique_names(self.images, "image name", "images")
        secrets = unique_names(self.secrets, "secret name", "secrets")
        attested = self.security.delegate is None and self.security.attestation.delegate is None \
            and self.security.attestation.mode != "none"
        for index, service in enumerate(self.services):
            if attested and not service.attestation_variants():
                # Its configuration would go to any code that asks: say so explicitly.
                fail("a service needs mrenclaves or attestation, unless "
                     "security.attestation.mode is none", "services", index, "name")
            if service.image_name is not None and service.image_name not in images:
                fail(f"image_name {quoted(service.image_name)} is not an image of this "
                     "session", "services", index, "image_name")
        for index, image in enumerate(self.images):
            for position, mount in enumerate(image.volumes):
                if mount.name not in volumes:
                    fail(f"volume {quoted(mount.name)} is not a volume of this session",
                         "images", index, "volumes", position, "name")
        for index, secret in enumerate(self.secrets):
            for key, target in secret.references().items():
                _check_reference(self.secrets, secrets, target, key, index)
        return self

    # -- lookups ---------------------------------------------------------------------

    def service(self, name: str) -> Service | None:
        return next((service for service in self.services if service.name == name), None)

    def volume(self, name: str) -> Volume | None:
        return next((volume for volume in self.volumes if volume.name == name), None)

    def image(self, name: str) -> Image | None:
        return next((image for image in self.images if image.name == name), None)

    def secret(self, name: str) -> Secret | None:
        return next((secret for secret in self.secrets if secret.name == name), None)

    def delegated_sections(self) -> tuple[str, ...]:
        """Sections given as a ``$$SCONE::name$$`` placeholder (to be resolved by the CAS)."""
        sections: list[tuple[str, Section]] = [
            ("access_policy", self.access_policy), ("security", self.security),
            ("security.attestation", self.security.attestation)]
        return tuple(path for path, section in sections if section.delegate is not None)

    # -- normalized forms ------------------------------------------------------------

    def to_canonical(self, *, redact_secrets: bool = False) -> dict[str, Any]:
        """The normalized content as JSON-able data: what the hash covers.

        Values equal to their defaults are left out, so an explicit default and an
        absent key give the same content (and adding an optional key to the
        language later does not change the hash of existing sessions). With
        ``redact_secrets`` every key and secret value given literally is replaced
        by ``<redacted>`` (for showing a session; the result is no longer valid).
        """
        content: dict[str, Any] = self.model_dump(mode="json", by_alias=True,
                                                  exclude_defaults=True)
        # The version is always stated; field order is the readable order.
        content.pop("version", None)
        content = {"name": content.pop("name"), "version": self.version, **content}
        return redact(content) if redact_secrets else content

    def to_yaml(self, *, redact_secrets: bool = False) -> str:
        """The normalized session as YAML; ``parse_session(s.to_yaml()) == s``."""
        return dump_yaml(self.to_canonical(redact_secrets=redact_secrets))


def _check_reference(secrets: tuple[Secret, ...], index_of: dict[str, int], target: str,
                     key: str, index: int) -> None:
    if target not in index_of:
        fail(f"{key} {quoted(target)} is not a secret of this session", "secrets", index, key)
    kind = secrets[index_of[target]].kind
    wanted = {"private_key": ("private-key",), "issuer": ("x509-ca", "session-ca")}[key]
    if kind is not None and kind not in wanted:
        fail(f"{key} {quoted(target)} is a {kind} secret, not {' or '.join(wanted)}",
             "secrets", index, key)


REDACTED = "<redacted>"
# Where literal key material can stand, per section (a $$SCONE::name$$ reference
# is not itself secret and stays visible).
_SECRET_KEYS = {
    "volumes": ("fspf_key",),
    "services": ("fspf_key", "one_time_password_shared_secret"),
    "secrets": ("value", "application_secret", "private_key"),
}


def redact(content: dict[str, Any]) -> dict[str, Any]:
    """``content`` (canonical form) with literal keys and secret values replaced."""
    result = dict(content)
    for section, keys in _SECRET_KEYS.items():
        result[section] = [_hide(dict(item), keys) for item in content.get(section, [])]
        if not result[section]:
            del result[section]
    security = content.get("security")
    if isinstance(security, dict):
        security = _hide(dict(security), ("service_access_token",))
        if isinstance(security.get("attestation"), dict):
            security["attestation"] = _hide(dict(security["attestation"]),
                                            ("one_time_password_shared_secret",))
        result["security"] = security
    return result


def _hide(item: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    for key in keys:
        value = item.get(key)
        if value is not None and not is_placeholder(value):
            # x509 private_key names another secret: a name, not key material.
            if key == "private_key" and item.get("kind") in ("x509", "x509-ca"):
                continue
            item[key] = REDACTED
    return item
