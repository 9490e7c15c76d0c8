"""UniTrans: parameter-efficient fine-tuning of vision-language models (VCRA, QASN, MCAM) as components.

The public surface. Importing ``unitrans`` imports nothing heavy (no torch, no transformers, not even pydantic):
every name below is loaded on first access through a module-level ``__getattr__``.

Example:
    >>> import unitrans
    >>> spec = unitrans.load_spec("examples/quickstart.toml", ["train.lr=1e-4"])
    >>> metrics = unitrans.run(spec)  # doctest: +SKIP
    >>> points = {"text.attn.q": "*.attention.self.query"}
    >>> handle = unitrans.attach(my_model, "vcra", rank=8, points=points)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> "module:attribute" ("module" alone: the module itself)
_LAZY: dict[str, str] = {
    "Spec": "unitrans.spec:Spec",
    "ComponentSpec": "unitrans.spec:ComponentSpec",
    "SpecError": "unitrans.spec:SpecError",
    "load_spec": "unitrans.spec:load_spec",
    "validate_dict": "unitrans.spec:validate_dict",
    "resolve": "unitrans.spec:resolve",
    "dump_toml": "unitrans.spec:dump_toml",
    "UserError": "unitrans.errors:UserError",
    "registry": "unitrans.registry",
    "InjectionPoint": "unitrans.interfaces:InjectionPoint",
    "Backbone": "unitrans.interfaces:Backbone",
    "Adapter": "unitrans.interfaces:Adapter",
    "SideNetwork": "unitrans.interfaces:SideNetwork",
    "AlignmentLoss": "unitrans.interfaces:AlignmentLoss",
    "Task": "unitrans.interfaces:Task",
    "DataModule": "unitrans.interfaces:DataModule",
    "run": "unitrans.engine.run:run",
    # the Python API
    "attach": "unitrans.api:attach",
    "build": "unitrans.api:build",
    "load_adapter": "unitrans.api:load_adapter",
    "save_adapter": "unitrans.api:save_adapter",
    "export": "unitrans.engine.export:export",
    "Handle": "unitrans.handle:Handle",
    "Options": "unitrans.options:Options",
    # the backbone plugin contract
    "CONTRACT": "unitrans.interfaces:CONTRACT",
    "DualEncoder": "unitrans.interfaces:DualEncoder",
    "FusionNetwork": "unitrans.interfaces:FusionNetwork",
    "FusionEncoder": "unitrans.interfaces:FusionEncoder",
    "ItmHead": "unitrans.interfaces:ItmHead",
    "EncoderDecoder": "unitrans.interfaces:EncoderDecoder",
    "QuestionEncoder": "unitrans.interfaces:QuestionEncoder",
    "Exportable": "unitrans.interfaces:Exportable",
    "SharedProjection": "unitrans.interfaces:SharedProjection",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from unitrans import registry
    from unitrans.api import attach, build, load_adapter, save_adapter
    from unitrans.engine.export import export
    from unitrans.engine.run import run
    from unitrans.errors import UserError
    from unitrans.handle import Handle
    from unitrans.interfaces import (
        CONTRACT,
        Adapter,
        AlignmentLoss,
        Backbone,
        DataModule,
        DualEncoder,
        EncoderDecoder,
        Exportable,
        FusionEncoder,
        FusionNetwork,
        InjectionPoint,
        ItmHead,
        QuestionEncoder,
        SharedProjection,
        SideNetwork,
        Task,
    )
    from unitrans.options import Options
    from unitrans.spec import ComponentSpec, Spec, SpecError, dump_toml, load_spec, resolve, validate_dict


def __getattr__(name: str) -> Any:
    """Import a public name on first access (PEP 562)."""
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'unitrans' has no attribute '{name}'")
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    value = getattr(module, attr) if attr else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
