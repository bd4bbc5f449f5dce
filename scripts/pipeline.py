"""The deployment chain for one recipe, as Make-style steps:
doctor → model source (demo / synthetic / tiny model, when the recipe names one) → merge-adapter (LoRA) →
convert (Olive, graph check) → package (inference_model.json, generation settings, template check, GenAI smoke
test) → install (Foundry cache) → check (Foundry runtime: listed, loads, answers the eval set) → bench →
validate (see :mod:`scripts.proof`)."""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from . import settings
from .errors import QualityError
from .fileops import atomic_dir, folder_size
from .recipe import Recipe

log = logging.getLogger(__name__)
SCRIPTS = Path(__file__).resolve().parent
Announce = Callable[[str], None]


@dataclass
class Paths:
    """Where a recipe's build outputs live."""

    root: Path

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> "Paths":
        return cls(settings.build_dir() / recipe.name)

    @property
    def stamps(self) -> Path:
        return self.root / "stamps"

    @property
    def olive_work(self) -> Path:
        return self.root / "olive"

    @property
    def onnx(self) -> Path:
        return self.root / "onnx"

    @property
    def package(self) -> Path:
        return self.root / "package"

    @property
    def merged(self) -> Path:
        """The base model with the recipe's LoRA adapter merged in."""
        return self.root / "merged"


def demo_model_dir(dataset: Path) -> Path:
    return settings.build_dir() / "demo" / dataset.stem


def demo_dataset() -> Path:
    return settings.recipes_dir() / "data" / "qwen-domain.jsonl"


@dataclass
class Pipeline:
    recipe: Recipe
    force: bool = False
    announce: Announce = log.info
    status: Callable[[str], Any] | None = None  # live one-line progress for long steps
    cache_root: Path = field(default=None)  # type: ignore[assignment]
    root: Path | None = None  # build folder; default build/<recipe> (compare: build/<recipe>/precisions/<p>)

    def __post_init__(self) -> None:
        from .foundry_runtime import cache_root
        from .steps import StepRunner

        self.paths = Paths(Path(self.root)) if self.root else Paths.for_recipe(self.recipe)
        self.cache_root = Path(self.cache_root or cache_root())
        self.runner = StepRunner(self.paths.stamps, self.force, self.announce)

    # ----- inputs ---------------------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        """The model folder named by ``model.source`` (the demo model's build folder for ``"demo"``)."""
        from .recipe import SYNTHETIC_SOURCES
        if self.recipe.source in SYNTHETIC_SOURCES:
            return settings.build_dir() / "synthetic" / self.recipe.source.split(":", 1)[1]
        if self.recipe.tiny_family:
            return settings.build_dir() / "tiny" / self.recipe.tiny_family
        return demo_model_dir(demo_dataset()) if self.recipe.uses_demo_model else Path(self.recipe.source)

    @property
    def model_dir(self) -> Path:
        """The model that is converted: the base, or the base with ``model.adapter`` merged in."""
        return self.paths.merged if self.recipe.adapter else self.base_dir

    @property
    def installed_dir(self) -> Path:
        from .install import install_dir
        return install_dir(self.cache_root, self.recipe.foundry.publisher, self.recipe.foundry.name)

    def eval_set(self):
        from .demo_model import load_qa
        dataset = self.recipe.eval.dataset
        return load_qa(dataset) if dataset else []

    # ----- step bodies --------------------------------------------------------------------------------
    def _doctor(self) -> dict:
        from .doctor import run_doctor
        checks = run_doctor()
        return {"warnings": [c.name for c in checks if c.status.name == "WARN"]}

    def _demo(self) -> dict:
        from .demo_model import DemoSettings, build_demo_model
        target = self.base_dir
        with atomic_dir(target) as staging:
            result = build_demo_model(demo_dataset(), staging, DemoSettings(), progress=True)
        self.announce(f"       demo model: {result.n_parameters:,} parameters, trained in {result.train_seconds:.0f} s, "
                      f"PyTorch exact match {100 * result.accuracy:.1f} %")
        return {"accuracy": result.accuracy, "train_seconds": result.train_seconds}

    def _convert(self) -> dict:
        from .family_select import refuse_unconvertible
        from .graph_check import summarise_graph, verify_quantization
        from .model_source import inspect_model_folder
        from .olive_convert import olive_config, run_olive

        refuse_unconvertible(inspect_model_folder(self.model_dir))
        with atomic_dir(self.paths.onnx) as staging:
            config = olive_config(self.recipe.conversion, self.model_dir, staging, self.paths.olive_work / "cache")
            run_olive(config, self.paths.olive_work, progress=self.status)
            summary = summarise_graph(staging / "model.onnx")
            verify_quantization(summary, self.recipe.conversion, str(staging / "model.onnx"))
        self.announce(f"       graph: {summary.describe()}")
        return {"graph": summary.describe(), "bytes": folder_size(self.paths.onnx)}

    def _build_base_in_subprocess(self, module: str, arg: str, what: str) -> str:
        """Create ``base_dir`` with ``python -m <module> ARG DIR`` in its own process (its memory, and torch, stay
        out of the pipeline process), staged atomically; return the child's stdout."""
        import subprocess
        import sys
        from .errors import ModelSourceError
        if self.status:
            self.status(f"{what} in {self.base_dir}…")
        with atomic_dir(self.base_dir) as staging:
            proc = subprocess.run([sys.executable, "-m", module, arg, str(staging)], cwd=settings.REPO_ROOT,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise ModelSourceError(f"{what[0].upper()}{what[1:]} failed:\n{proc.stderr[-2000:]}")
        return proc.stdout

    def _synthetic(self) -> dict:
        import json
        source = self.recipe.source
        stdout = self._build_base_in_subprocess("scripts.synthetic_model", source,
                                                f"creating {source} (random weights, seeded)")
        result = json.loads(stdout.strip().splitlines()[-1])
        self.announce(f"       {source}: {result['parameters']:,} parameters, random weights "
                      "(size and speed only; its answers are noise)")
        return result

    def _tiny(self) -> dict:
        family = self.recipe.tiny_family
        self._build_base_in_subprocess("scripts.tiny_models", family, f"building a tiny random {family} model")
        self.announce(f"       tiny {family} model: random weights, the family's real chat template (it proves "
                      "conversion, templates and loading; its answers are noise). Deploy your own with --model-path.")
        return {"family": family}

    def _merge_adapter(self) -> dict:
        from .lora import merge_in_subprocess
        from .model_source import inspect_model_folder

        inspect_model_folder(self.base_dir)
        if self.status:
            self.status(f"merging the LoRA adapter {self.recipe.adapter} into {self.base_dir}…")
        with atomic_dir(self.paths.merged) as staging:
            result = merge_in_subprocess(self.base_dir, Path(self.recipe.adapter), staging)
        self.announce(f"       merged LoRA adapter (rank {result['rank']}, {', '.join(result['target_modules'] or [])})")
        return result

    def _package(self) -> dict:
        import json

        from .family_select import choose_family, refuse_system_prompt, with_stop_tokens
        from .genai_smoke import smoke_test
        from .inference_config import (check_template_agreement, render_inference_model, with_search,
                                       _load_tokenizer)
        from .install import assemble_package
        from .model_source import inspect_model_folder, read_chat_template

        source = inspect_model_folder(self.model_dir)
        where = str(self.model_dir)
        tokenizer = _load_tokenizer(self.model_dir)
        choice = choose_family(self.recipe.family, source, where, tokenizer)
        family = choice.family
        self.announce(f"       family: {choice.how}")
        refuse_system_prompt(family, self.recipe.eval.system_prompt, where)
        generation = self.recipe.generation.resolved(family.generation_defaults)
        inference_model = render_inference_model(family, self.recipe, generation, choice.prompt_template)
        # verified against the template Foundry Local will apply: the converted model's (what gets installed)
        shipped = read_chat_template(self.paths.onnx) or source.chat_template
        compared = check_template_agreement(inference_model["PromptTemplate"], self.model_dir, where, family, tokenizer,
                                            shipped)
        genai_config = json.loads((self.paths.onnx / "genai_config.json").read_text(encoding="utf-8"))
        genai_config = with_stop_tokens(with_search(genai_config, generation), family.stop_tokens,
                                        self.paths.onnx / "tokenizer.json")
        assemble_package(self.paths.onnx, self.paths.package, genai_config, inference_model)
        sample = self.eval_set()[0].question if self.recipe.eval.dataset else "Hello"
        smoke = smoke_test(self.paths.package, sample)
        cases = "; ".join(f"{c.case}: {len(c.chat_template_tokens)} tokens" for c in compared)
        self.announce(f"       family {family.name}: PromptTemplate matches the tokenizer's chat template token by "
                      f"token ({cases}); GenAI smoke test generated {smoke['tokens']} tokens")
        return {"family": family.name, "verified": [c.case for c in compared],
                "generation": {k: v for k, v in vars(generation).items()}}

    def _install(self) -> dict:
        from .install import install_package
        target = install_package(self.paths.package, self.cache_root, self.recipe.foundry.publisher,
                                 self.recipe.foundry.name)
        return {"path": str(target), "bytes": folder_size(target)}

    def check(self) -> dict:
        """Listed, loads and answers through the Foundry Local runtime; scores the eval set."""
        from .evaluate import conversations, score
        from .foundry_runtime import check_model

        qa = self.eval_set()
        chats = conversations(qa, self.recipe.eval.system_prompt) if qa else [[{"role": "user", "content": "Hello"}]]
        if self.status:
            self.status(f"Foundry Local: loading {self.recipe.foundry.model_id} and answering {len(chats)} prompts…")
        result = check_model(self.cache_root, self.installed_dir, self.recipe.foundry.model_id, chats,
                             max_tokens=self.recipe.eval.max_new_tokens)
        answers = [a.text for a in result.answers]
        summary: dict[str, Any] = {
            "model_id": result.model_id, "listed": result.listed, "registration": result.registration,
            "load_seconds": result.load_seconds, "generate_seconds": sum(a.seconds for a in result.answers),
            "prompt": chats[0][-1]["content"], "answer": answers[0],
            "first_answer_seconds": result.answers[0].seconds,
        }
        if qa:
            ev = score(answers, qa)
            summary.update(accuracy=ev.accuracy, accuracy_figure=ev.figure(),
                           wrong=[{"question": q, "got": g, "expected": e} for q, g, e in ev.wrong])
            if ev.accuracy < self.recipe.eval.min_accuracy:
                examples = "\n".join(f"  - {q!r}: got {g!r}, expected {e!r}" for q, g, e in ev.wrong[:5])
                raise QualityError(
                    f"{self.recipe.foundry.model_id} answered {ev.figure()} of {self.recipe.eval.dataset.name} "
                    f"through Foundry Local; the recipe requires {100 * self.recipe.eval.min_accuracy:.0f} % "
                    f"(eval.min_accuracy). Wrong answers, e.g.:\n{examples}\nTrain longer, or use a higher "
                    "precision / smaller block size (conversion.quantization).")
        return summary

    # ----- steps -----------------------------------------------------------------------------------------
    def steps(self) -> list:
        from .steps import Step

        r = self.recipe
        hashed = r.settings_for_hash()
        out = [Step("doctor", self._doctor, settings={"python": platform.python_version(), "packages": {
            d.metadata["Name"].lower(): d.version for d in metadata.distributions()}}, code=[SCRIPTS / "doctor.py"])]
        if r.uses_demo_model:
            from .demo_model import DemoSettings
            out.append(Step("demo-model", self._demo, inputs=[demo_dataset()], settings=DemoSettings().to_dict(),
                            outputs=[self.base_dir], code=[SCRIPTS / "demo_model.py"]))
        from .recipe import SYNTHETIC_SOURCES
        if r.source in SYNTHETIC_SOURCES:
            out.append(Step("synthetic-model", self._synthetic, settings={"source": r.source},
                            outputs=[self.base_dir], code=[SCRIPTS / "synthetic_model.py"]))
        if r.tiny_family:
            family_files = sorted(settings.TEMPLATES_DIR.glob(f"families/{r.tiny_family}.*"))
            out.append(Step("tiny-model", self._tiny, inputs=family_files, settings={"source": r.source},
                            outputs=[self.base_dir], code=[SCRIPTS / "tiny_models.py"]))
        if r.adapter:
            out.append(Step("merge-adapter", self._merge_adapter, inputs=[self.base_dir, Path(r.adapter)],
                            outputs=[self.paths.merged], code=[SCRIPTS / "lora.py"]))
        out += [
            Step("convert", self._convert, inputs=[self.model_dir], settings=hashed["conversion"],
                 outputs=[self.paths.onnx], code=[SCRIPTS / "olive_convert.py", SCRIPTS / "graph_check.py"]),
            Step("package", self._package, inputs=[self.paths.onnx, self.model_dir, settings.TEMPLATES_DIR],
                 settings={k: hashed[k] for k in ("family", "foundry", "generation", "name",
                                                                  "description")},
                 outputs=[self.paths.package],
                 code=[SCRIPTS / "inference_config.py", SCRIPTS / "install.py", SCRIPTS / "families.py",
                       SCRIPTS / "family_select.py"]),
            Step("install", self._install, inputs=[self.paths.package],
                 settings={"cache": str(self.cache_root), "foundry": hashed["foundry"]},
                 outputs=[self.installed_dir], code=[SCRIPTS / "install.py"]),
            Step("check", self.check, inputs=[self.installed_dir] + ([r.eval.dataset] if r.eval.dataset else []),
                 settings={"eval": hashed["eval"], "model_id": r.foundry.model_id},
                 code=[SCRIPTS / "foundry_runtime.py", SCRIPTS / "foundry_worker.py", SCRIPTS / "evaluate.py"]),
        ]
        return out

    def run(self, until: str | None = None) -> dict[str, Any]:
        """Run the steps in order (up to and including ``until``); return each step's outcome by name."""
        outcomes = {}
        for step in self.steps():
            outcomes[step.name] = self.runner.run(step)
            if step.name == until:
                break
        return outcomes


@dataclass(frozen=True)
class DeploySummary:
    recipe: str
    model_id: str
    installed: Path
    size_bytes: int
    check: dict[str, Any]
    skipped: list[str]
    ran: list[str]
    proof: dict[str, Any] = field(default_factory=dict)  # bench/validate summary and the report path


def deploy(recipe: Recipe, force: bool = False, announce: Announce = log.info,
           status: Callable[[str], Any] | None = None, proof: str | None = "quick") -> DeploySummary:
    """Run the whole chain for ``recipe`` and summarise the result. ``proof``: the bench/validate profile
    (``quick`` or ``full``) run after ``check``, or None to skip them."""
    pipeline = Pipeline(recipe, force=force, announce=announce, status=status)
    outcomes = pipeline.run()
    skipped, ran = [n for n, o in outcomes.items() if o.skipped], [n for n, o in outcomes.items() if not o.skipped]
    proven: dict[str, Any] = {}
    if proof:
        from .measure import get_profile
        from .proof import run_proof
        proven = run_proof(pipeline, get_profile(proof), status or (lambda s: None))
        skipped, ran = skipped + proven["skipped"], ran + proven["ran"]
    return DeploySummary(recipe.name, recipe.foundry.model_id, pipeline.installed_dir,
                         folder_size(pipeline.installed_dir), outcomes["check"].result or {}, skipped, ran, proven)
