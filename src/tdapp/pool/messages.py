"""The one message a submitter sends a worker: what ``tdapp run`` would be given.

Everything in it is what the host already sees on ``tdapp run``'s command line
(image name, session/service, CAS address, bundle URLs, where to push): public,
and nothing a broker attacker can turn into a key or a leak. A rewritten message
can at worst point at another session or image, which the CAS or the
measurement refuses. JSON only; unknown fields and bad values are refused.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tdapp.errors import InputError


class Queue(StrEnum):
    """What a worker can attest, and so which tasks it takes."""

    SIM = "sim"
    SGX = "sgx"
    TDX = "tdx"
    SNP = "snp"


class RunTask(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    image: Annotated[str, Field(min_length=1, max_length=255)]
    session_id: Annotated[str, Field(pattern=r"^[^/\s]{1,256}/[^/\s]{1,128}$")]
    cas: Annotated[str, Field(min_length=3, max_length=300)]
    urls: Annotated[tuple[str, ...], Field(min_length=1, max_length=8)]
    push: Annotated[str, Field(min_length=1, max_length=2048)]
    tee: Literal["auto", "sim", "tsm", "gramine"] = "auto"
    shield: Literal["auto", "fuse", "tmpfs"] = "auto"
    timeout: Annotated[float, Field(gt=0, le=1e9)] = 3600.0
    iexec_worker: str | None = None
    # Where a worker that lacks the image gets it: an archive of tdapp image export (the
    # transfer service, S3 or a URL). It is measured on import and again before it runs.
    image_url: Annotated[str, Field(min_length=1, max_length=2048)] | None = None

    def to_json(self) -> dict[str, object]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, body: object) -> RunTask:
        """The task in a message; InputError naming the first thing wrong."""
        try:
            return cls.model_validate(body)
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "the message"
            raise InputError(f"the task message is malformed at {where}: {first['msg']}") from None
