"""Model bases: frozen, closed records and sections that may be delegated to a secret.

Every record refuses keys it does not declare (``extra="forbid"``): the session
language is closed, and a misspelt key must be an error, never ignored. A
:class:`Section` is a mapping that SCONE also lets a document replace as a
whole by one ``$$SCONE::name$$`` placeholder (a config fragment from a secret);
such a section keeps the placeholder, reads back as it, and carries no
settings of its own. Resolving it is the CAS's job; nothing here may treat a
delegated section as if its defaults were the policy.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from tdapp.policy.values import describe, fail, is_placeholder


class Frozen(BaseModel):
    """An immutable record that accepts exactly its declared keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=False,
                              validate_by_alias=True, serialize_by_alias=True)


class Section(Frozen):
    """A mapping section, or the placeholder of a secret that holds it."""

    _delegate: str | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _mapping_or_placeholder(cls, data: Any, handler: ModelWrapValidatorHandler[Self]
                                ) -> Self:
        if isinstance(data, str):
            if not is_placeholder(data):
                fail("expected a mapping or a complete $$SCONE::name$$ placeholder, got a "
                     "string that is neither")
            section = handler({})
            section._delegate = data
            return section
        if data is not None and not isinstance(data, dict | BaseModel):
            fail(f"expected a mapping, got {describe(data)}")
        return handler({} if data is None else data)

    @model_serializer(mode="wrap")
    def _placeholder_or_mapping(self, handler: SerializerFunctionWrapHandler) -> Any:
        delegate = self.delegate
        return delegate if delegate is not None else handler(self)

    @property
    def delegate(self) -> str | None:
        """The ``$$SCONE::name$$`` placeholder this section was given as, if any."""
        # Read from pydantic's private store directly: ``self._delegate`` goes through
        # BaseModel.__getattr__ (about 30 times slower), and every attestation asks.
        private = self.__pydantic_private__
        found: str | None = private.get("_delegate") if private else None
        return found
