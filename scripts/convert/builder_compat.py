"""What the pinned ONNX Runtime GenAI model builder (0.14.1, the last one Olive 0.13 drives) expects from a
transformers config, given back where transformers 5 no longer keeps it. Applied only inside the Olive process:
``python -m scripts.convert.builder_compat run --config FILE`` is ``olive run --config FILE`` with these in place.

One entry per quirk (:data:`CONFIG_ATTRIBUTES`): the config class, the attribute the builder reads, and how to derive
it from the new layout. Adding one is adding an entry; :func:`missing` tells the tests which are still needed.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ConfigAttribute:
    architecture: str
    config_class: str  # "module:Class"
    attribute: str
    derive: Callable[[Any], Any]
    why: str


CONFIG_ATTRIBUTES: tuple[ConfigAttribute, ...] = (
    ConfigAttribute(
        "Gemma3ForCausalLM", "transformers.models.gemma3.configuration_gemma3:Gemma3TextConfig", "rope_local_base_freq",
        lambda config: config.rope_parameters["sliding_attention"]["rope_theta"],
        "transformers 5 moved the local (sliding-window) RoPE base into rope_parameters['sliding_attention']"),
)


def _class(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def missing() -> list[ConfigAttribute]:
    """The quirks the installed transformers has (its config class lacks the attribute)."""
    return [q for q in CONFIG_ATTRIBUTES if not hasattr(_class(q.config_class), q.attribute)]


def apply() -> list[str]:
    """Give each config class the attributes the builder reads (as read-only properties); return what was added."""
    added = []
    for quirk in missing():
        setattr(_class(quirk.config_class), quirk.attribute, property(quirk.derive))
        added.append(f"{quirk.config_class.split(':')[1]}.{quirk.attribute}")
    return added


def main(argv: list[str] | None = None) -> None:
    """``olive`` with :func:`apply` in place (same arguments as ``python -m olive``)."""
    apply()
    from olive.cli.launcher import main as olive_main
    sys.argv = ["olive", *(sys.argv[1:] if argv is None else argv)]
    olive_main(called_as_console_script=False)


if __name__ == "__main__":
    main()
