"""Method options as form fields, read from each method's options dataclass.

A method registered later gets its form without any UI change. A field is "advanced" (shown in a
collapsed accordion) when its dataclass metadata says so (`field(metadata={"advanced": True})`),
otherwise when it comes after the first MAIN_FIELDS fields: authors list the main knobs first.
`field(metadata={"help": "..."})` becomes the field's hint. A field that names a path on the server
(`field(metadata={"server_path": True})`, e.g. a cache folder) gets no form field: a visitor must not
choose where the server writes. The server sets such options from its own configuration.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from compose.errors import InvalidOptionError

MAIN_FIELDS = 3


@dataclass(frozen=True)
class OptionField:
    """How one option is edited: kind is bool, int, float, str, choice (a Literal) or json."""

    name: str
    kind: str
    default: Any
    optional: bool = False
    choices: tuple = ()
    advanced: bool = False
    help: str = ""

    def widget_value(self, value: Any = dataclasses.MISSING) -> Any:
        """A value (by default the default) as the form shows it: JSON as text, an empty box for None."""
        value = self.default if value is dataclasses.MISSING else value
        if self.kind == "json":
            return json.dumps(value)
        if self.kind == "str" or (self.optional and self.kind in ("int", "float")):  # text boxes
            return "" if value is None else str(value)
        return value


def option_fields(options_class: type) -> list[OptionField]:
    hints = typing.get_type_hints(options_class)
    fields = []
    for index, field in enumerate(dataclasses.fields(options_class)):
        if not field.init or field.metadata.get("server_path"):
            continue
        kind, optional, choices = _kind(hints.get(field.name, Any))
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        advanced = field.metadata.get("advanced", index >= MAIN_FIELDS)
        fields.append(
            OptionField(field.name, kind, default, optional, choices, advanced, field.metadata.get("help", ""))
        )
    return fields


def server_path_options(options_class: type) -> set[str]:
    """Names of the options that name server paths: set by the server, kept out of forms and saved recipes."""
    return {field.name for field in dataclasses.fields(options_class) if field.metadata.get("server_path")}


def _kind(annotation) -> tuple[str, bool, tuple]:
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        rest = [arg for arg in args if arg is not type(None)]
        annotation = rest[0] if len(rest) == 1 else Any
    if typing.get_origin(annotation) is Literal:
        return "choice", optional, typing.get_args(annotation)
    if annotation in (bool, int, float, str):
        return annotation.__name__, optional, ()
    return "json", optional, ()


def options_from_form(method: str, fields: list[OptionField], values: list[Any]) -> dict[str, Any]:
    """The options that differ from their defaults, typed; a bad value names the option and the fix."""
    options = {}
    for field, value in zip(fields, values):
        value = _typed(method, field, value)
        default = json.loads(field.widget_value()) if field.kind == "json" else field.default  # tuples come back as lists
        if value != default:
            options[field.name] = value
    return options


def _typed(method: str, field: OptionField, value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value.strip() and (field.optional or field.kind != "str")):
        if field.optional:
            return None
        raise InvalidOptionError(f"method '{method}' option {field.name} needs a value (default {field.default!r})")
    if field.kind == "json":
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise InvalidOptionError(
                f"method '{method}' option {field.name}: {value!r} is not valid JSON ({error.msg}); "
                f"e.g. {json.dumps(field.default)}"
            ) from error
    if field.kind in ("int", "float") and isinstance(value, str):
        try:
            value = float(value)
        except ValueError as error:
            raise InvalidOptionError(f"method '{method}' option {field.name}: {value!r} is not a number") from error
    if field.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value
