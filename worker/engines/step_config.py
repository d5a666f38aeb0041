"""The typed settings of one pipeline step, and the one parser from a JobSpec step dict to them.

Each op's config is a frozen dataclass deriving from `StepConfig`; a field's allowed values and
bounds sit in its metadata, so the checks here and the API schema's parity test read one place.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from worker.engines.errors import EngineError

Config = TypeVar("Config", bound="StepConfig")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field with its allowed values (`choices`) or bounds, checked on construction.

    Example:
        amount: float = setting(0.5, gt=0, lt=1)
    """
    metadata = {
        key: value
        for key, value in {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}.items()
        if value is not None
    }
    return dataclasses.field(default=default, metadata=metadata)


_BOUNDS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Base of the per-op configs: parsing, value checks, and the cross-field rules of `check`."""

    op: ClassVar[str]

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            choices = field.metadata.get("choices")
            if choices is not None and value not in choices:
                raise self.invalid(f"{field.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
            for key, (holds, word) in _BOUNDS.items():
                bound = field.metadata.get(key)
                if bound is not None and value is not None and not (math.isfinite(value) and holds(value, bound)):
                    raise self.invalid(f"{field.name} must be {word} {bound}, got {value}")
        self.check()

    def check(self) -> None:
        """Rules between fields; raise `self.invalid(...)` when one is broken."""

    def invalid(self, message: str) -> EngineError:
        return EngineError("invalid_step", f"{self.op}: {message}")

    @classmethod
    def from_step(cls: type[Config], step: Mapping[str, Any]) -> Config:
        """Parse a JobSpec step dict; absent or null fields take the defaults.

        Raises:
            EngineError("invalid_step"): an unknown field, a value of the wrong type or out of range,
                a required field missing, or a broken rule between fields.

        Example:
            PruneConfig.from_step({"op": "prune", "structure": "channel", "amount": 0.3})
        """
        if step.get("op", cls.op) != cls.op:
            raise EngineError("invalid_step", f"a {cls.op} config cannot be read from a {step.get('op')!r} step")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(step) - set(fields) - {"op"})
        if unknown:
            raise EngineError("invalid_step", f"{cls.op}: unknown field(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        values = {name: _coerce(cls.op, name, step[name], hints[name]) for name in fields if step.get(name) is not None}
        missing = [
            name
            for name, field in fields.items()
            if name not in values
            and field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise EngineError("invalid_step", f"{cls.op} needs {', '.join(repr(m) for m in missing)}")
        return cls(**values)

    def as_step(self) -> dict[str, Any]:
        """The JSON-safe step dict this config stands for (`from_step(c.as_step()) == c`)."""
        values = {
            name: list(value) if isinstance(value, tuple) else value for name, value in dataclasses.asdict(self).items()
        }
        return {"op": self.op, **values}


def _coerce(op: str, name: str, value: Any, hint: Any) -> Any:
    """`value` as the field's type; JSON's int for a float is fine, a string for a number is not."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in args if arg is not type(None))
        args = typing.get_args(hint)
    wrong = EngineError("invalid_step", f"{op}: {name}={value!r} is not valid")
    if typing.get_origin(hint) is tuple:
        if (
            isinstance(value, str)
            or not isinstance(value, (list, tuple))
            or not all(isinstance(v, args[0]) for v in value)
        ):
            raise wrong
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if hint in (int, float):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or (hint is int and value != int(value))
        ):
            raise wrong
        return hint(value)
    if not isinstance(value, hint):
        raise wrong
    return value
