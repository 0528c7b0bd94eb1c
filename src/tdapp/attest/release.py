"""What the CAS releases to an attested program: one schema for both ends of the wire.

:class:`ReleasedConfiguration` is the plaintext inside the CAS's JWE answer
(the JWE itself is made and opened by the CAS and the runtime). The CAS builds
it from the session, the runtime parses it back with the same model, so the two
cannot drift apart: unknown fields, a missing field, a malformed key or tag are
refused on arrival rather than read as "no volume" or "empty command". Volume
keys travel as :class:`~tdapp.volume.VolumeKey` and tags as
:class:`~tdapp.volume.VolumeTag`; keys, the instance token, the environment and
injected files never appear in a ``repr``. This module describes the document;
it must never decide whether anything is released.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SecretBytes,
    SecretStr,
    ValidationError,
    field_serializer,
)

from tdapp.errors import IntegrityError, TdappError
from tdapp.policy.security import AttestationMode
from tdapp.volume import VolumeKey, VolumeTag

MEDIA_TYPE = "tdapp-config+json"  # the JWE's cty


def _key(value: object) -> VolumeKey:
    if isinstance(value, VolumeKey):
        return value
    if not isinstance(value, str):
        raise ValueError("a volume key is 64 hex characters")
    try:
        return VolumeKey.from_hex(value)
    except TdappError:
        raise ValueError("a volume key is 64 hex characters") from None


def _tag(value: object) -> VolumeTag:
    if isinstance(value, VolumeTag):
        return value
    if not isinstance(value, str):
        raise ValueError("a volume tag is 32 hex characters")
    try:
        return VolumeTag.from_hex(value)
    except TdappError:
        raise ValueError("a volume tag is 32 hex characters") from None


def _secret_bytes(value: object) -> SecretBytes:
    if isinstance(value, SecretBytes):
        return value
    if isinstance(value, bytes):
        return SecretBytes(value)
    if not isinstance(value, str):
        raise ValueError("an injected file's content is base64 text")
    try:
        return SecretBytes(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        raise ValueError("an injected file's content is base64 text") from None


WireKey = Annotated[VolumeKey, PlainValidator(_key),
                    PlainSerializer(lambda key: key.hex(), return_type=str)]
WireTag = Annotated[VolumeTag, PlainValidator(_tag),
                    PlainSerializer(lambda tag: tag.hex(), return_type=str)]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class VolumeGrant(_Wire):
    """One volume the program may open: where it appears, its key and expected tag."""

    name: str
    path: str
    key: WireKey = Field(repr=False)
    tag: WireTag | None  # None: the volume has no state yet
    # False for a volume imported from another session: mounted read-only, its tag
    # never reported (only the exporter's instances move it).
    writable: bool = True


class InjectedFile(_Wire):
    """A file the session writes into the program's file system before it starts."""

    path: str
    # Bytes (a binary secret's bare form is raw), base64 on the wire.
    content: Annotated[SecretBytes, PlainValidator(_secret_bytes)]
    permission: int | None = None  # mode bits; None: the runtime's default (0o600)

    @field_serializer("content", when_used="json")
    def _content(self, value: SecretBytes) -> str:
        return base64.b64encode(value.get_secret_value()).decode("ascii")


class IexecGrant(_Wire):
    """For an iExec task: what the runtime needs to seal the result (never given to the
    program): the task, where the app writes, and the task's enclave challenge key."""

    task_id: Annotated[str, Field(pattern=r"^0x[0-9a-f]{64}$")]
    output: str  # IEXEC_OUT, a mount path of a released volume
    challenge: SecretStr  # 0x-hex secp256k1 private key

    @field_serializer("challenge", when_used="json")
    def _challenge(self, value: SecretStr) -> str:
        return value.get_secret_value()


class ReleasedConfiguration(_Wire):
    """The configuration of one attested instance (the JWE's plaintext)."""

    session: str
    service: str
    mode: AttestationMode
    # The tdapp image measurement the CAS accepted, bound in the evidence: the
    # runtime runs nothing else.
    workload: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    command: tuple[str, ...]
    environment: dict[str, str] = Field(repr=False)
    pwd: str
    volumes: tuple[VolumeGrant, ...]
    injection_files: tuple[InjectedFile, ...] = Field(repr=False)
    token: SecretStr  # the instance's word for its tag reports
    expires_at: float
    iexec: IexecGrant | None = None

    @field_serializer("token", when_used="json")
    def _token(self, value: SecretStr) -> str:
        return value.get_secret_value()

    def to_json(self) -> bytes:
        """The JSON text the CAS encrypts (secrets in clear: only inside the JWE)."""
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_json(cls, text: bytes | str) -> ReleasedConfiguration:
        """Parse a decrypted answer; IntegrityError naming the first thing wrong."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "the document"
            raise IntegrityError(f"the CAS's configuration is malformed at {where}: "
                                 f"{first['msg']}") from None

    def grant(self, name: str) -> VolumeGrant | None:
        return next((volume for volume in self.volumes if volume.name == name), None)

