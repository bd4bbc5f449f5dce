"""The deployment chain for one recipe, as Make-style steps:
doctor → model source (demo / synthetic / tiny model / GGUF import / download, when the recipe names one) →
finetune (LoRA, when the recipe asks for one) → merge-adapter (LoRA) →
convert (Olive, graph check) → package (inference_model.json, generation settings, template check, GenAI smoke
test) → install (Foundry cache) → check (Foundry runtime: listed, loads, answers the eval set) → bench →
validate (see :mod:`scripts.proof.run`)."""
from __future__ import annotations

import contextlib
import json
import logging
import platform
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from scripts.core import settings
from scripts.runtimes.genai_smoke import smoke_test
from scripts.convert.attention_scale import fold_attention_scale
from scripts.convert.graph_check import summarise_graph, verify_quantization
from scripts.convert.install import assemble_package, check_context, install_dir, install_package
from scripts.convert.olive import olive_config, run_olive
from scripts.convert.package import render_inference_model, with_search, with_session_options
from scripts.doctor import run_doctor
from scripts.core.errors import ModelSourceError, QualityError
from scripts.core.faults import checkpoint
from scripts.families.registry import AUTO_TEMPLATE
from scripts.families.select import (choose_family, prompt_template_for, refuse_system_prompt, refuse_unconvertible,
                                     with_stop_tokens)
from scripts.families.templates import check_template_agreement, load_tokenizer
from scripts.families.tools import ToolFormat, reply_calls, served_messages, serving_spec
from scripts.core.fileops import atomic_dir, folder_size, recover_dir
from scripts.core.locks import hold
from scripts.core.evalset import conversations, score
from scripts.core.evalset import load_qa
from scripts.core.tool_evalset import load_cases, load_lines, score_outcomes
from scripts.recipe.load import Recipe
from scripts.runtimes.foundry import cache_root, check_model
from scripts.runtimes.foundry_api import RUNTIME_DIR_NAME, default_client_note
from scripts.core.hf_folder import CHAT_TEMPLATE_FILE, inspect_model_folder, read_chat_template
from scripts.core.steps import Step, StepRunner
from scripts.core.workers import resolve, run_in_worker

log = logging.getLogger(__name__)
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
    def adapter(self) -> Path:
        """The LoRA adapter the recipe's ``model.finetune`` trains."""
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        """The base model with the recipe's LoRA adapter merged in."""
        return self.root / "merged"


@dataclass
class Pipeline:
    recipe: Recipe
    force: bool = False
    announce: Announce = log.info
    status: Callable[[str], Any] | None = None  # live one-line progress for long steps
    cache_root: Path = field(default=None)  # type: ignore[assignment]
    root: Path | None = None  # build folder; default build/<recipe> (compare: build/<recipe>/precisions/<p>)
    wait: bool = True  # a folder locked by another command: wait for it (False: raise BusyError)

    def __post_init__(self) -> None:

        self.paths = Paths(Path(self.root)) if self.root else Paths.for_recipe(self.recipe)
        self.cache_root = Path(self.cache_root or cache_root())
        self.runner = StepRunner(self.paths.stamps, self.force, self.announce)
        self._locks: contextlib.ExitStack | None = None

    # ----- locks and recovery (scripts.core.locks, fileops.recover_dir) ---------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the recipe's build-folder lock (and its built model source's) for the block, after recovering what a
        killed run left there. The cache target's lock joins them from the install step on (:meth:`run`)."""
        if self._locks is not None:
            yield
            return
        recipe_root = Paths.for_recipe(self.recipe).root
        with contextlib.ExitStack() as stack:
            lock = stack.enter_context(hold(recipe_root, f"building recipe {self.recipe.name}", wait=self.wait,
                                            announce=self.announce))
            notes = [n for folder in (self.paths.onnx, self.paths.package, self.paths.adapter, self.paths.merged)
                     for n in recover_dir(folder)]
            if lock.stale is not None and (self.paths.olive_work / "cache").is_dir():
                shutil.rmtree(self.paths.olive_work / "cache")  # a killed Olive run may leave half-written entries
                notes.append(f"emptied Olive's cache {self.paths.olive_work / 'cache'} (a run of this recipe was "
                             "killed)")
            if self.recipe.source.info.step:
                stack.enter_context(hold(self.base_dir, f"building the model source {self.recipe.source.spec}",
                                         wait=self.wait, announce=self.announce))
                notes += recover_dir(self.base_dir)
            for note in notes:
                self.announce(f"recovered: {note}")
            self._locks = stack
            try:
                checkpoint("pipeline:locked")
                yield
            finally:
                self._locks = None

    @contextlib.contextmanager
    def cache_locked(self) -> Iterator[None]:
        """Hold the lock of the installed folder (``<cache>/<publisher>/<name>``) for the block, after finishing or
        undoing an install that was killed there and removing its leftovers (said so through ``announce``)."""
        with hold(self.installed_dir, f"installing or loading {self.recipe.foundry.model_id}", wait=self.wait,
                  announce=self.announce, lock_file=self.installed_lock):
            for note in recover_dir(self.installed_dir):
                self.announce(f"recovered: {note}")
            yield

    # ----- inputs ---------------------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        """The Hugging Face folder ``model.source`` names, or that its build step makes (demo, GGUF import, …)."""
        return self.recipe.source.folder

    @property
    def model_dir(self) -> Path:
        """The model that is converted: the base, or the base with the LoRA adapter merged in."""
        return self.paths.merged if self.adapter_dir else self.base_dir

    @property
    def adapter_dir(self) -> Path | None:
        """The adapter merged before conversion: ``model.adapter``, or the one ``model.finetune`` trains."""
        if self.recipe.adapter:
            return Path(self.recipe.adapter)
        return self.paths.adapter if self.recipe.finetune.dataset else None

    @property
    def installed_dir(self) -> Path:
        return install_dir(self.cache_root, self.recipe.foundry.publisher, self.recipe.foundry.name)

    @property
    def installed_lock(self) -> Path:
        """The lock file of :attr:`installed_dir`, in the cache's own ``.slmops-runtime/`` folder, so that the
        publisher folder holds nothing but models."""
        return (self.cache_root / RUNTIME_DIR_NAME / "locks" / self.recipe.foundry.publisher /
                f"{self.recipe.foundry.name}.lock")

    def eval_set(self):
        dataset = self.recipe.eval.dataset
        return load_qa(dataset) if dataset else []

    def tool_cases(self):
        """The held-out cases of ``eval.tools`` ([] when none)."""
        tools = self.recipe.eval.tools
        return load_cases(tools) if tools else []

    def chat_tools(self) -> list[dict] | None:
        """The tools ``invoke run`` offers: those of the first line of ``eval.tools`` (None without it)."""
        tools = self.recipe.eval.tools
        return (load_lines(tools)[0].get("tools") or None) if tools else None

    def tool_chats(self, cases) -> tuple[list[list[dict]], ToolFormat | None]:
        """``cases`` as the plain conversations ``invoke serve`` would hand the runtime for them (the tools written in
        the installed model's family format), and that format to parse the replies with."""
        if not cases:
            return [], None
        spec = serving_spec(read_chat_template(self.installed_dir))
        if spec is None:
            raise QualityError(f"{self.recipe.path}: eval.tools is set, but the installed model's chat template "
                               "matches no family with a tool format (templates/families/<family>.tools.json).")
        return ([served_messages(spec, c.messages, c.tools) for c in cases],
                ToolFormat.from_json(spec["family"], spec["format"]))

    @staticmethod
    def score_replies(cases, texts: list[str], fmt: ToolFormat | None):
        """The :class:`~scripts.core.tool_evalset.ToolScore` of raw replies to ``cases`` (in :meth:`tool_chats`' format)."""
        return score_outcomes(cases, [reply_calls(t, fmt) for t in texts])

    # ----- step bodies --------------------------------------------------------------------------------
    def _doctor(self) -> dict:
        checks = run_doctor()
        return {"warnings": [c.name for c in checks if c.status.name == "WARN"]}

    def _check_before_converting(self) -> None:
        """The cheap checks of what would otherwise fail after Olive: the model folder, its architecture (a registered
        family's, or convertible by the pinned builder), the family and its chat template (unless ``auto-template``,
        which needs the tokenizer), the system prompt against the family, and the eval set."""
        source = inspect_model_folder(self.model_dir)
        refuse_unconvertible(source)
        if self.recipe.family != AUTO_TEMPLATE:
            family = choose_family(self.recipe.family, source, str(self.model_dir)).family
            refuse_system_prompt(family, self.recipe.eval.system_prompt, str(self.model_dir))
        self.eval_set()

    def _convert(self) -> dict:

        self._check_before_converting()
        with atomic_dir(self.paths.onnx, label="convert") as staging:
            config = olive_config(self.recipe.conversion, self.model_dir, staging, self.paths.olive_work / "cache")
            run_olive(config, self.paths.olive_work, progress=self.status)
            checkpoint("convert:olive-done")
            folded, _ = fold_attention_scale(staging) if self.recipe.conversion.fold_attention_scale else (0, [])
            summary = summarise_graph(staging / "model.onnx")
            verify_quantization(summary, self.recipe.conversion, str(staging / "model.onnx"))
        self.announce(f"       graph: {summary.describe()}" + (f"; attention scale folded into the query ({folded} "
                                                                 "layers)" if folded else ""))
        return {"graph": summary.describe(), "bytes": folder_size(self.paths.onnx), "attention_scale_folded": folded}

    def _build_source(self) -> dict:
        """Make the Hugging Face folder of a built source kind (demo, synthetic, tiny, GGUF), staged atomically."""
        source = self.recipe.source
        kind = source.info
        if self.status:
            self.status(f"{kind.step}: {kind.describe} → {source.folder}…")
        with atomic_dir(source.folder, label="source") as staging:
            if kind.in_process:
                result = resolve(kind.builder)(source.request(staging))
            else:
                result = run_in_worker(kind.builder, source.request(staging), error=ModelSourceError,
                                       what=f"building {source.spec} ({kind.describe})")
        self.announce(f"       {result.pop('summary', source.spec)}")
        return result

    def _finetune(self) -> dict:
        spec = self.recipe.finetune
        inspect_model_folder(self.base_dir)
        if self.status:
            self.status(f"LoRA fine-tune of {self.base_dir} on {spec.dataset.name} ({spec.epochs} epochs)…")
        with atomic_dir(self.paths.adapter, label="finetune") as staging:
            result = run_in_worker("scripts.sources.finetune:train",
                                   {"base_dir": str(self.base_dir), "dataset": str(spec.dataset),
                                    "settings": spec.settings(), "out_dir": str(staging)},
                                   error=ModelSourceError, what=f"fine-tuning {self.base_dir} on {spec.dataset.name}")
        self.announce(f"       {result.pop('summary')}")
        return result

    def _merge_adapter(self) -> dict:
        inspect_model_folder(self.base_dir)
        if self.status:
            self.status(f"merging the LoRA adapter {self.adapter_dir} into {self.base_dir}…")
        with atomic_dir(self.paths.merged, label="merge") as staging:
            result = run_in_worker("scripts.sources.lora:merge_job",
                                   {"base_dir": str(self.base_dir), "adapter_dir": str(self.adapter_dir),
                                    "out_dir": str(staging)},
                                   error=ModelSourceError, what=f"merging the adapter {self.adapter_dir}")
        self.announce(f"       merged LoRA adapter (rank {result['rank']}, {', '.join(result['target_modules'] or [])})")
        return result

    def _package(self) -> dict:
        source = inspect_model_folder(self.model_dir)
        where = str(self.model_dir)
        tokenizer = load_tokenizer(self.model_dir)
        choice = choose_family(self.recipe.family, source, where, tokenizer)
        family = choice.family
        self.announce(f"       family: {choice.how}")
        refuse_system_prompt(family, self.recipe.eval.system_prompt, where)
        genai_config = json.loads((self.paths.onnx / "genai_config.json").read_text(encoding="utf-8"))
        generation = self.recipe.generation.resolved(family.generation_defaults,
                                                     genai_config.get("model", {}).get("context_length"))
        inference_model = render_inference_model(family, self.recipe, generation, choice.prompt_template)
        inference_model["PromptTemplate"] = prompt_template_for(choice, inference_model["PromptTemplate"])
        # verified against the template Foundry Local will apply: the converted model's (what gets installed)
        shipped = read_chat_template(self.paths.onnx) or source.chat_template or choice.chat_template
        compared = check_template_agreement(inference_model["PromptTemplate"], self.model_dir, where, family, tokenizer,
                                            shipped, choice.default_system)
        genai_config = with_stop_tokens(with_search(genai_config, generation), family.stop_tokens,
                                        self.paths.onnx / "tokenizer.json")
        session = self.recipe.runtime.session_options()
        genai_config = with_session_options(genai_config, session)
        extra = {CHAT_TEMPLATE_FILE: choice.chat_template} if choice.chat_template and not read_chat_template(
            self.paths.onnx) else {}
        assemble_package(self.paths.onnx, self.paths.package, genai_config, inference_model, extra)
        sample = self.eval_set()[0].question if self.recipe.eval.dataset else "Hello"
        smoke = smoke_test(self.paths.package, sample)
        cases = "; ".join(f"{c.case}: {len(c.chat_template_tokens)} tokens" for c in compared)
        self.announce(f"       family {family.name}: PromptTemplate matches the tokenizer's chat template token by "
                      f"token ({cases}); GenAI smoke test generated {smoke['tokens']} tokens with "
                      f"intra_op_num_threads {session['intra_op_num_threads']} (recipe runtime.intra_op_threads)")
        return {"family": family.name, "verified": [c.case for c in compared],
                "generation": {k: v for k, v in vars(generation).items()}, "session_options": session}

    def _install(self) -> dict:
        target = install_package(self.paths.package, self.cache_root, self.recipe.foundry.publisher,
                                 self.recipe.foundry.name)
        return {"path": str(target), "bytes": folder_size(target)}

    def check(self) -> dict:
        """Listed, loads and answers through the Foundry Local runtime; scores the eval set."""

        qa = self.eval_set()
        cases = self.tool_cases()
        tool_chats, fmt = self.tool_chats(cases)
        hello = [] if cases else [[{"role": "user", "content": "Hello"}]]
        chats = (conversations(qa, self.recipe.eval.system_prompt) if qa else hello) + tool_chats
        if self.status:
            self.status(f"Foundry Local: loading {self.recipe.foundry.model_id} and answering {len(chats)} prompts…")
        with self.cache_locked():
            result = check_model(self.cache_root, self.installed_dir, self.recipe.foundry.model_id, chats,
                                 max_tokens=self.recipe.eval.max_new_tokens)
            context = default_client_note(check_context(self.installed_dir))
        answers = [a.text for a in result.answers]
        answers, tool_texts = answers[:len(chats) - len(tool_chats)], answers[len(chats) - len(tool_chats):]
        summary: dict[str, Any] = {
            "model_id": result.model_id, "listed": result.listed, "registration": result.registration,
            "load_seconds": result.load_seconds, "generate_seconds": sum(a.seconds for a in result.answers),
            "prompt": chats[0][-1]["content"], "answer": (answers or tool_texts)[0],
            "first_answer_seconds": result.answers[0].seconds,
            "context": context,
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
        if cases:
            tool_score = self.score_replies(cases, tool_texts, fmt)
            require_tool_score(tool_score, self.recipe, "through Foundry Local")
            summary["tools"] = tool_score.to_json()
        return summary

    # ----- steps -----------------------------------------------------------------------------------------
    def steps(self) -> list:

        r = self.recipe
        hashed = r.settings_for_hash()
        out = [Step("doctor", self._doctor, settings={"python": platform.python_version(), "packages": {
            d.metadata["Name"].lower(): d.version for d in metadata.distributions()}}, code=["scripts.doctor"])]
        kind = r.source.info
        if kind.step:
            out.append(Step(kind.step, self._build_source, inputs=r.source.step_inputs(),
                            settings={"source": r.source.spec}, outputs=[self.base_dir],
                            code=[kind.builder.split(":")[0]]))
        if r.finetune.dataset:
            out.append(Step("finetune", self._finetune, inputs=[self.base_dir, r.finetune.dataset],
                            settings=r.finetune.settings(), outputs=[self.paths.adapter],
                            code=["scripts.sources.finetune"]))
        if self.adapter_dir:
            out.append(Step("merge-adapter", self._merge_adapter, inputs=[self.base_dir, self.adapter_dir],
                            outputs=[self.paths.merged], code=["scripts.sources.lora"]))
        out += [
            Step("convert", self._convert, inputs=[self.model_dir], settings=hashed["conversion"],
                 outputs=[self.paths.onnx], code=["scripts.convert.olive", "scripts.convert.graph_check"]),
            Step("package", self._package, inputs=[self.paths.onnx, self.model_dir, settings.TEMPLATES_DIR],
                 settings={**{k: hashed[k] for k in ("family", "foundry", "generation", "name", "description")},
                           "session_options": r.runtime.session_options()},
                 outputs=[self.paths.package],
                 code=["scripts.convert.package", "scripts.convert.install", "scripts.families.select",
                       "scripts.runtimes.genai_smoke"]),
            Step("install", self._install, inputs=[self.paths.package],
                 settings={"cache": str(self.cache_root), "foundry": hashed["foundry"]},
                 outputs=[self.installed_dir], code=["scripts.convert.install"]),
            Step("check", self.check, inputs=[self.installed_dir] + [d for d in (r.eval.dataset, r.eval.tools) if d],
                 settings={"eval": hashed["eval"], "model_id": r.foundry.model_id},
                 code=["scripts.runtimes.foundry", "scripts.core.evalset", "scripts.core.tool_evalset"]),
        ]
        return out

    def run(self, until: str | None = None) -> dict[str, Any]:
        """Run the steps in order (up to and including ``until``) under the recipe's lock, and from ``install`` on
        under the cache target's too; return each step's outcome by name."""
        outcomes = {}
        with self.locked():
            for step in self.steps():
                if step.name == "install":
                    self._locks.enter_context(self.cache_locked())
                outcomes[step.name] = self.runner.run(step)
                if step.name == until:
                    break
        return outcomes


def require_tool_score(tool_score, recipe: Recipe, where: str) -> None:
    """:class:`QualityError` unless both rates of ``tool_score`` reach the recipe's ``eval.min_accuracy``."""
    if tool_score.passes(recipe.eval.min_accuracy):
        return
    examples = "\n".join(f"  - {f['ask']!r}: expected {f['expected']}, got calls {f['got_calls']} text {f['got_text']!r}"
                         for f in tool_score.failures[:5])
    raise QualityError(f"{recipe.foundry.model_id} on the held-out tool cases of {recipe.eval.tools.name} {where}: "
                       f"{tool_score.figure()}; the recipe requires {100 * recipe.eval.min_accuracy:.0f} % of each "
                       f"(eval.min_accuracy). Failures, e.g.:\n{examples}")
