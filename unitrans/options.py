"""A component's options, declared once: one typed class whose fields are the spec keys, with their defaults and
their documentation.

A builder module (light: no torch) declares ``class VCRAOptions(Options)`` with one annotated field per option and
a docstring under each field; the registered builder is ``@builds(VCRAOptions)`` over a function that receives
the validated options object and imports the implementation, which keeps the object. The builder's signature,
the spec schema (``unitrans validate``), the builder's ``Args:`` documentation and the resolved spec's defaults
are all derived from that class: there is nothing to keep in sync.

The shared constrained types live here too, so a range is written one way everywhere (``PositiveInt``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Any, Callable, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PositiveInt  # noqa: F401  (PositiveInt: re-exported)
from pydantic.fields import FieldInfo

NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]  # a dropout rate, a label smoothing

__all__ = ["Configured", "NonNegativeFloat", "NonNegativeInt", "Options", "PositiveFloat", "PositiveInt", "Probability",
           "builds"]

O = TypeVar("O", bound="Options")


class Options(BaseModel):
    """Base of a component's options: typed fields, each documented by the string literal under it.

    Unknown keys are refused, values are validated (and coerced) when the object is made, and the field
    docstrings are kept (``Options.model_fields[name].description``).
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=(),
                              arbitrary_types_allowed=True)

    @classmethod
    def args_doc(cls) -> str:
        """A Google-style ``Args:`` section from the field docstrings."""
        lines = ["Args:"]
        for name, info in cls.model_fields.items():
            lines.append(f"    {name}: {(info.description or '').strip()}")
        return "\n".join(lines)


def _parameter(name: str, info: FieldInfo) -> inspect.Parameter:
    """The keyword-only parameter of a field: its type with its constraints (``Annotated[int, Gt(0)]``) and its
    default (a required field has none; a default factory stays the field, which the spec schema reads back)."""
    annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    if info.default_factory is not None:
        default: Any = info
    else:
        default = inspect.Parameter.empty if info.is_required() else info.default
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


class Configured:
    """A component made from its :class:`Options`: ``Component(options)``, or the options' fields as keywords
    (``Captioning(num_beams=1)``), validated the same way. A subclass names its class in ``options_class``."""

    options_class: type[Options]

    def __init__(self, options: Options | None = None, **fields: Any):
        self.options = options if options is not None else self.options_class(**fields)


def builds(options: type[O]) -> Callable[[Callable[[O], Any]], Callable[..., Any]]:
    """Turn ``fn(options) -> component`` into the keyword builder a registry holds: ``builder(**fields)``.

    The builder's signature has one keyword-only parameter per field of ``options`` (annotated, with the field as
    its default: ``unitrans.spec.builder_schema`` builds the spec schema from it), its docstring is the options'
    docstring plus their ``Args:``, and ``builder.options`` is the class.

    Args:
        options: the :class:`Options` subclass that declares the component's fields.

    Returns:
        A decorator for the function that receives the validated options and returns the component.
    """

    def wrap(fn: Callable[[O], Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def builder(**kwargs: Any) -> Any:
            return fn(options(**kwargs))

        params = [_parameter(name, info) for name, info in options.model_fields.items()]
        builder.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        builder.__annotations__ = {p.name: p.annotation for p in params}
        builder.__doc__ = f"{inspect.cleandoc(options.__doc__ or '')}\n\n{options.args_doc()}"
        builder.options = options  # type: ignore[attr-defined]
        del builder.__wrapped__  # the signature is the options', not fn's
        return builder

    return wrap
