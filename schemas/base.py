"""The base of every goldstream message: versioning, ids, strict validation, bytes in and out.

Every message crosses a process boundary (Kafka, files, other languages), so validation is strict
(unknown fields rejected, no NaN or infinity, no silent type coercion) and every failure is a
`SchemaError` that names the field, which is what the dead-letter topic records.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Self, TypeVar

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
)

SCHEMA_VERSION = "1.0"
"""The version this code writes. Messages of an older or equal major version are read."""

SCHEMA_MAJOR = int(SCHEMA_VERSION.split(".")[0])

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+\-]{0,127}$")

# Identifiers end up inside Kafka keys and Redis keys (with {hash tags}), so they exclude
# whitespace and braces; labels are free text that users see, so they only exclude control chars.
Id = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=_ID_RE.pattern,
        description="Identifier: 1-128 chars, letters, digits and . _ : @ / + - (no spaces or braces).",
    ),
]


def is_id(value: str) -> bool:
    """Whether a string is a valid Id (e.g. a Kafka key that must name an item or a project)."""
    return _ID_RE.match(value) is not None


LABEL_MAX_LENGTH = 128

Label = Annotated[
    str,
    Field(min_length=1, max_length=LABEL_MAX_LENGTH, pattern=r"^[^\x00-\x1f\x7f]+$", description="Label name."),
]


@dataclass(frozen=True)
class Limits:
    """Size limits applied while decoding, so one oversized message cannot exhaust a worker.

    `max_message_bytes` is half of Kafka's default 1 MB message size: the check can fire on
    anything Kafka delivers, and what the worker derives from an accepted message (an escalation
    embedding the annotation, a dead letter carrying it in base64) still fits on a topic."""

    max_message_bytes: int = 512 * 1024
    max_objects: int = 5_000
    max_vertices: int = 20_000
    max_keypoints: int = 512

    @classmethod
    def from_mapping(cls, values: Mapping[str, int]) -> Limits:
        return cls(**{k: int(v) for k, v in values.items()})


DEFAULT_LIMITS = Limits()

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class FieldError:
    """One reason a message was rejected: where (dotted path) and why."""

    loc: str
    msg: str
    type: str
    path: tuple[str | int, ...] = ()

    def __str__(self) -> str:
        return f"{self.loc or '<message>'}: {self.msg}"


class SchemaError(ValueError):
    """Raised for any message that cannot be accepted; the only error `decode` lets out."""

    def __init__(self, errors: list[FieldError], model: str = "") -> None:
        self.errors = errors
        self.model = model
        head = f"invalid {model}: " if model else "invalid message: "
        shown = "; ".join(str(e) for e in errors[:5])
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(head + shown + more)

    @property
    def reason(self) -> str:
        """A short machine-readable reason code (the first error's type)."""
        return self.errors[0].type if self.errors else "invalid"

    @classmethod
    def from_validation(cls, exc: ValidationError, model: str = "") -> SchemaError:
        errors = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"])
            errors.append(FieldError(loc=loc, msg=err["msg"], type=err["type"], path=tuple(err["loc"])))
        return cls(errors, model)


def limits_of(info: Any) -> Limits:
    """The Limits passed in validation context, or the defaults."""
    ctx = getattr(info, "context", None) or {}
    return ctx.get("limits", DEFAULT_LIMITS)


def check_version(value: str) -> str:
    major = int(value.split(".")[0])
    if major > SCHEMA_MAJOR:
        raise ValueError(
            f"schema_version {value} is newer than this goldstream reads ({SCHEMA_MAJOR}.x); upgrade the consumer"
        )
    return value


SchemaVersion = Annotated[
    str,
    Field(pattern=r"^\d{1,3}\.\d{1,3}$", description="MAJOR.MINOR of the message schema."),
    AfterValidator(check_version),
]


class Model(BaseModel):
    """Strict, immutable, closed: what a contract between services needs."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        allow_inf_nan=False,
    )

    @classmethod
    def trusted(cls, values: dict[str, Any]) -> Self:
        """An instance of values our own code computed from validated input, built without
        validation: `values` must name every field. Why: validating each row of a result is a
        third of what scoring a 10-box item costs; `model_construct` does the same thing slower,
        with a generic pass over the fields. The enclosing result is still validated."""
        m = _new(cls)
        _set(m, "__dict__", values)
        # every field is set, so one read-only set per class serves all its instances: a set per
        # row was a third of the containers a 10-box item allocates, and the collector's work
        # grows with them (9 % of `score_items` under CPython's default thresholds)
        fields = _ALL_FIELDS.get(cls)
        if fields is None:
            fields = _ALL_FIELDS[cls] = _SharedFields(cls.model_fields)
        _set(m, "__pydantic_fields_set__", fields)
        _set(m, "__pydantic_extra__", None)
        _set(m, "__pydantic_private__", None)
        return m

    def __copy__(self) -> Self:
        """A copy owns a mutable field set (pydantic's `model_copy(update=...)` adds to it); a
        trusted instance shares its class's read-only one."""
        m = super().__copy__()
        if type(m.__pydantic_fields_set__) is _SharedFields:
            _set(m, "__pydantic_fields_set__", set(m.__pydantic_fields_set__))
        return m

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Self:
        m = super().__deepcopy__(memo)
        if type(m.__pydantic_fields_set__) is _SharedFields:
            _set(m, "__pydantic_fields_set__", set(m.__pydantic_fields_set__))
        return m


_new = object.__new__
_set = object.__setattr__


class _SharedFields(set[str]):
    """The field set every trusted instance of a class shares: a `set`, as pydantic's
    serializer requires, that refuses to change (a change would reach every instance)."""

    def _refuse(self, *_: object) -> None:
        raise TypeError("the field set of a trusted instance is shared; copy the instance to change it")

    add = discard = remove = pop = clear = update = _refuse
    difference_update = intersection_update = symmetric_difference_update = _refuse
    __ior__ = __iand__ = __isub__ = __ixor__ = _refuse  # type: ignore[assignment]


_ALL_FIELDS: dict[type[Model], _SharedFields] = {}


class Message(Model):
    """A top-level message on a goldstream topic."""

    topic: ClassVar[str] = ""
    min_size_limit: ClassVar[int] = 0
    """A floor under `Limits.max_message_bytes` for messages goldstream derives from an accepted
    input and may be larger than it (an escalation embeds the annotation; a dead letter carries
    its input in base64)."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    event_id: Id = Field(description="Unique id of this event; re-deliveries carry the same id.")

    def to_bytes(self) -> bytes:
        """orjson bytes of the message (what goes on Kafka and into JSONL files)."""
        return encode(self)

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview | str, limits: Limits | None = None) -> Self:
        return decode(cls, raw, limits)


def encode(message: BaseModel) -> bytes:
    """Serialise a model with orjson; JSON mode first so dates, enums and tuples are plain JSON."""
    return orjson.dumps(message.model_dump(mode="json"))


def decode(model: type[M], raw: bytes | bytearray | memoryview | str, limits: Limits | None = None) -> M:
    """Parse and validate bytes as `model`; any failure is a SchemaError naming the field."""
    limits = limits or DEFAULT_LIMITS
    name = model.__name__
    if isinstance(raw, memoryview):
        raw = raw.tobytes()
    size = len(raw.encode() if isinstance(raw, str) else raw)
    limit = max(limits.max_message_bytes, getattr(model, "min_size_limit", 0))
    if size > limit:
        raise SchemaError([FieldError("", f"message is {size} bytes, over the limit of {limit}", "too_large")], name)
    try:
        return model.model_validate_json(raw, context={"limits": limits})
    except ValidationError as exc:
        raise SchemaError.from_validation(exc, name) from None
    except (ValueError, TypeError, RecursionError) as exc:  # defensive: parser edge cases
        raise SchemaError([FieldError("", str(exc) or type(exc).__name__, "invalid")], name) from None


def validate(model: type[M], data: Mapping[str, Any], limits: Limits | None = None) -> M:
    """Validate already-parsed JSON data (e.g. a YAML file) as `model`, raising SchemaError."""
    try:
        return model.model_validate_json(orjson.dumps(data), context={"limits": limits or DEFAULT_LIMITS})
    except (ValidationError, orjson.JSONEncodeError) as exc:
        if isinstance(exc, ValidationError):
            raise SchemaError.from_validation(exc, model.__name__) from None
        raise SchemaError([FieldError("", str(exc), "invalid")], model.__name__) from None
