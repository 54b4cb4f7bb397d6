"""The configuration reference, generated from the pydantic models of ``config.py``.

This module owns rendering every configuration model (the Serve app ``args`` and the
environment contract) as Markdown tables: field, type, default, description. The committed
``docs/configuration.md`` is its output, and a unit test keeps the two equal; regenerate with

    python -m ray_worker.dev.config_reference > docs/configuration.md

It must not hold configuration knowledge of its own: every word of the tables comes from the
models' fields and docstrings, so the reference cannot drift from the code.
"""

from __future__ import annotations

import enum
import inspect
import sys
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ray_worker.config import (
    CapacityConfig,
    DispatcherConfig,
    EnvSettings,
    PollerConfig,
    PublisherOptions,
    QueueSpec,
    WorkerAppArgs,
)

__all__ = ["MODELS", "render", "render_model"]

REGENERATE = "python -m ray_worker.dev.config_reference > docs/configuration.md"

MODELS: tuple[type[BaseModel], ...] = (
    WorkerAppArgs,
    QueueSpec,
    PollerConfig,
    CapacityConfig,
    DispatcherConfig,
    PublisherOptions,
    EnvSettings,
)
"""The models documented, in the order they appear in the reference."""

_SECTION_NOTES: dict[type[BaseModel], str] = {
    WorkerAppArgs: "The top level: `applications[].args`, validated at `serve run`.",
    PollerConfig: "`args.poller`.",
    CapacityConfig: "`args.capacity`.",
    DispatcherConfig: "`args.dispatcher`.",
    PublisherOptions: "`args.publisher`.",
    QueueSpec: 'An entry of `args.queues`; a plain `"name:level"` string is accepted too.',
    EnvSettings: "Environment variables (prefix `BELLA_`, any case); each overrides the "
    "`args` field of the same meaning. See the README's environment contract.",
}


def _type_name(annotation: Any) -> str:
    """A short, readable spelling of a field's type."""
    if annotation is None or annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in annotation.__args__)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{args}]"
    if inspect.isclass(annotation):
        if issubclass(annotation, enum.Enum):
            return " \\| ".join(f'"{m.value}"' for m in annotation)
        if annotation is SecretStr:
            return "secret string"
        return annotation.__name__
    return str(annotation)


def _default(info: FieldInfo) -> str:
    """The default as it would be written in YAML, or a pointer to the nested model."""
    if info.default_factory is not None:
        factory: Any = info.default_factory
        if inspect.isclass(factory) and issubclass(factory, BaseModel):
            return f"see [{factory.__name__}](#{factory.__name__.lower()})"
        return f"`{_literal(factory())}`"
    if info.default is PydanticUndefined:
        return "required"
    return f"`{_literal(info.default)}`"


def _literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def _markdown(text: str) -> str:
    """One line of Markdown from docstring or description text (RST literals, raw ``<...>``)."""
    text = " ".join(text.split()).replace("``", "`")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _cell(text: str) -> str:
    """Escape what would break a Markdown table cell."""
    return _markdown(text).replace("|", "\\|")


def render_model(model: type[BaseModel]) -> str:
    """One model as a Markdown section: heading, docstring, table."""
    doc = inspect.getdoc(model) or ""
    lines = [f"## {model.__name__}", ""]
    summary = _markdown(doc.split("\n\n", 1)[0])
    if summary:
        lines += [summary, ""]
    note = _SECTION_NOTES.get(model)
    if note:
        lines += [note, ""]
    first = "variable" if model is EnvSettings else "field"
    lines += [f"| {first} | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        shown = f"`BELLA_{name.upper()}`" if model is EnvSettings else f"`{name}`"
        lines.append(
            f"| {shown} | {_type_name(info.annotation)} | {_default(info)} | "
            f"{_cell(info.description or '')} |"
        )
    return "\n".join(lines) + "\n"


def render(models: tuple[type[BaseModel], ...] = MODELS) -> str:
    """The whole reference as Markdown."""
    head = (
        "# Configuration reference\n\n"
        "Generated from the pydantic models in `ray_worker/config.py`; do not edit by hand.\n"
        f"Regenerate with `{REGENERATE}`.\n\n"
        "Every model is frozen and rejects unknown keys. Durations are in seconds (`_s`).\n"
    )
    return head + "".join("\n" + render_model(m) for m in models)


def main() -> int:
    """Print the reference to stdout."""
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
