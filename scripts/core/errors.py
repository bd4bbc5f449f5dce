"""Typed domain errors. Every message says what went wrong, where, and what to do about it.

`tasks.py` is the only place these turn into exit codes (`invoke.Exit`).
"""
from __future__ import annotations


class SlmopsError(Exception):
    """Base class of every error the pipeline raises on purpose."""

    exit_code = 1


class StepError(SlmopsError):
    """A step of the chain is defined wrongly (e.g. names project code that does not exist)."""


class RecipeError(SlmopsError):
    """A recipe file is missing, malformed, or names something that does not exist."""


class ModelSourceError(SlmopsError):
    """The model folder to deploy is missing or incomplete (no config, no weights, no tokenizer)."""


class EnvironmentCheckError(SlmopsError):
    """A required tool or package is missing or at a version known not to work."""


class ConversionError(SlmopsError):
    """Olive did not produce a usable ONNX model."""


class GraphCheckError(SlmopsError):
    """The converted graph does not carry the quantization settings the recipe asked for."""


class TemplateError(SlmopsError):
    """A chat template could not be rendered, or two templates that must agree do not."""


class InstallError(SlmopsError):
    """Installing a model into the Foundry Local cache failed."""


class StorageError(SlmopsError):
    """A folder the project keeps state in (the Foundry cache, the build folder) is not a folder, is read-only or is
    full; the message names it and says how to fix it."""


class FoundryError(SlmopsError):
    """The Foundry Local runtime could not list, load or run a model."""


class ServeError(SlmopsError):
    """The OpenAI-compatible server (`invoke serve`) could not start, answer or stop."""


class QualityError(SlmopsError):
    """The deployed model does not meet the recipe's quality threshold."""


class MeasurementError(SlmopsError):
    """A benchmark or validation worker could not load the model or measure it."""


class BusyError(SlmopsError):
    """A folder (a recipe's build folder, a model source, a cache target) is held by another running command."""

    exit_code = 75  # EX_TEMPFAIL: try again later


class PeerError(MeasurementError):
    """A measured peer runtime (llama.cpp) is not installed, or could not build or run its copy of the model."""


class PeerUnavailableError(PeerError):
    """The optional peer is not installed; the message says how to install it."""


class ToolCallError(SlmopsError):
    """A tool call or tool format that cannot be honoured: a call that is not JSON, names an undeclared tool or breaks
    its schema; a malformed ``tools`` list; a family without a tool format."""
