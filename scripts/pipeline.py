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
import os
import platform
import shutil
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

from scripts.core import settings
from scripts.runtimes.genai_smoke import smoke_test
from scripts.convert.attention_scale import fold_attention_scale
from scripts.convert.exact_route import Carried, builder_settings, carry, check_carried
from scripts.convert.graph_check import summarise_graph, verify_options, verify_quantization
from scripts.convert.install import assemble_package, check_context, install_dir
from scripts.convert.olive import olive_config, run_olive
from scripts.convert import versions
from scripts.convert.package import render_inference_model, with_search, with_session_options
from scripts.doctor import folder_problem, run_doctor
from scripts.core.errors import InstallError, ModelSourceError, QualityError, StorageError
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
from scripts.recipe.paths import Paths
from scripts.recipe.spec import FinetuneSpec, Recipe
from scripts.core.tool_evalset import load_cases, load_lines, score_outcomes
from scripts.runtimes.foundry import cache_root, check_model
from scripts.runtimes.foundry_api import RUNTIME_DIR_NAME, default_client_note
from scripts.sources.registry import parse_source
from scripts.proof.gate import describe, failure_message, gate_windows, measure_gate
from scripts.core.hf_folder import CHAT_TEMPLATE_FILE, inspect_model_folder, read_chat_template
from scripts.sources.gguf import KEPT_GGUF
from scripts.core.steps import Step, StepRunner
from scripts.core.workers import resolve, run_in_worker

log = logging.getLogger(__name__)
Announce = Callable[[str], None]


@dataclass
class Pipeline:
    recipe: Recipe
    force: bool = False
    announce: Announce = log.info
    status: Callable[[str], Any] | None = None  # live one-line progress for long steps
    cache_root: Path = field(default=None)  # type: ignore[assignment]
    root: Path | None = None  # build folder; default build/<recipe> (compare: build/<recipe>/precisions/<p>)
    wait: bool = True  # a folder locked by another command: wait for it (False: raise BusyError)
    take_over: bool = False  # install over a model another recipe installed at the same publisher/name

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
    def cache_locked(self, read_only: bool = False) -> Iterator[None]:
        """Hold the lock of the installed folder (``<cache>/<publisher>/<name>``) for the block, after finishing or
        undoing an install that was killed there and removing its leftovers (said so through ``announce``).
        ``read_only`` (check, run): on a cache where no lock file can be created, go on without one."""
        with hold(self.installed_dir, f"installing or loading {self.recipe.foundry.model_id}", wait=self.wait,
                  announce=self.announce, lock_file=self.installed_lock, read_only=read_only):
            if not read_only or os.access(self.installed_dir.parent, os.W_OK):
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
        """The model the deployment computes, in FP32: the base, or the base with the LoRA adapter merged in (the
        reference of fidelity and answer checks)."""
        return self.paths.merged if self.adapter_dir else self.base_dir

    @property
    def carried(self) -> Carried:
        """What the convert step carries into the graph instead of re-quantizing: the source GGUF's blocks (an int4
        build of a GGUF source, ``conversion.gguf`` "exact") and the adapter as a branch (``conversion.adapter``)."""
        c = self.recipe.conversion
        exact = self.recipe.source.gguf_file and c.gguf == "exact" and c.precision == "int4"
        branch = self.adapter_dir if self.adapter_dir and c.adapter == "branch" else None
        return Carried(self.base_dir / KEPT_GGUF if exact else None, branch, c.adapter_bits)

    @property
    def convert_dir(self) -> Path:
        """The Hugging Face folder Olive builds from: the base when the adapter is kept as a branch."""
        return self.base_dir if self.carried.adapter else self.model_dir

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

    @property
    def model_id(self) -> str:
        """The id of the installed current version (``name:N``, :mod:`scripts.convert.versions`); the recipe's
        ``foundry.name:foundry.version`` before the first install (or for a model installed without a manifest)."""
        version = versions.current_version(self.installed_dir)
        return f"{self.recipe.foundry.name}:{version}" if version is not None else self.recipe.foundry.model_id

    @property
    def recipe_arg(self) -> str:
        """How to name this recipe on the command line (``--model ...``)."""
        path = self.recipe.path
        return self.recipe.name if path.parent == settings.recipes_dir() and path.stem == self.recipe.name \
            else str(path)

    def _installed_stale(self) -> str | None:
        """Why the installed folder is not what the install step would install (None: it is): checked before trusting
        the install step's stamp. Sizes and mtimes first, hashes only where they differ."""
        target = self.installed_dir
        if not target.is_dir() or not self.paths.package.is_dir():
            return None
        manifest = versions.read_manifest(target)
        if manifest is None:
            return f"{target} has no install manifest: reinstalling to record and verify it"
        if manifest.get("content") != versions.content_of(self.paths.package)["content"]:
            owner = (manifest.get("recipe") or {}).get("name", "?")
            if manifest.get("rolled_back_from") is not None:
                return (f"{manifest.get('model_id')} is current after `invoke rollback`: installing this recipe's "
                        "build again (roll back after the deploy to keep the earlier version)")
            return (f"{target} holds {manifest.get('model_id')} (recipe {owner}), which is not this recipe's package: "
                    "reinstalling")
        problem = versions.verify(target, manifest)
        return f"the installed model is damaged ({problem}): reinstalling" if problem else None

    def verify_installed(self, deep: bool = True) -> None:
        """Check every installed file against its manifest (``deep``: by hash; else by size and mtime, hashing only
        files whose stat differs); a damaged install is an :class:`InstallError` naming the file and the command that
        repairs it."""
        if versions.read_manifest(self.installed_dir) is None:
            return
        problem = versions.verify(self.installed_dir, deep=deep)
        if problem:
            raise InstallError(f"{self.model_id} is damaged: {problem}. Repair it with `invoke deploy --model "
                               f"{self.recipe_arg}` (reinstalls it from the build), or make a kept version current "
                               f"with `invoke rollback --model {self.recipe_arg}` (`invoke models` lists them).")

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

    def score_tools(self, cases, texts: list[str], fmt: ToolFormat | None, where: str):
        """The :class:`~scripts.core.tool_evalset.ToolScore` of raw replies to ``cases``; :class:`QualityError` below
        ``eval.min_accuracy``."""
        tool_score = score_outcomes(cases, [reply_calls(t, fmt) for t in texts])
        require_tool_score(tool_score, self.recipe, where)
        return tool_score

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
        carried, conversion = self.carried, self.recipe.conversion
        with atomic_dir(self.paths.onnx, label="convert") as staging:
            built, shared = builder_settings(conversion, carried)
            config = olive_config(built, self.convert_dir, staging, self.paths.olive_work / "cache",
                                  shared_embeddings=shared)
            run_olive(config, self.paths.olive_work, progress=self.status)
            checkpoint("convert:olive-done")
            note = carry(staging, conversion, carried)
            folded, _ = fold_attention_scale(staging) if conversion.fold_attention_scale else (0, [])
            summary = summarise_graph(staging / "model.onnx")
            where = str(staging / "model.onnx")
            if carried.gguf:
                check_carried(staging, carried, folded, where)
                verify_options(summary, conversion, where)
            else:
                verify_quantization(summary, conversion, where)
        if note:
            self.announce(f"       carried: {note}")
        self.announce(f"       graph: {summary.describe()}" + (f"; attention scale folded into the query ({folded} "
                                                                 "layers)" if folded else ""))
        return {"graph": summary.describe(), "bytes": folder_size(self.paths.onnx), "attention_scale_folded": folded,
                "carried": note}

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

    @property
    def gated(self) -> bool:
        """Whether the build is held to ``conversion.fidelity`` before it is installed: quantized builds of models
        with real weights (an FP32 build is its own reference; random weights make the figures noise)."""
        r = self.recipe
        return r.conversion.fidelity.gate and r.conversion.precision != "fp32" and not r.source.random_weights

    def _fidelity_gate(self) -> dict:
        """The build against the FP32 ONNX build of the same model (built, or reused, in
        ``build/<recipe>/precisions/fp32/``, where ``compare`` builds it), on the eval answers and held-out text
        (:mod:`scripts.proof.gate`); refuses to go on below ``conversion.fidelity``."""
        r = self.recipe
        if self.status:
            self.status("fidelity gate: building (or reusing) the FP32 reference…")
        prepared = prepared_recipe(r, self)
        reference = Pipeline(replace(prepared, conversion=replace(r.conversion, precision="fp32")), root=self.paths.root
                             / "precisions" / "fp32", force=self.force, announce=self.announce,
                             status=self.status)  # where compare builds it
        reference.run(only=("convert", "package"))
        if self.status:
            self.status("fidelity gate: scoring the build against FP32 (eval answers, held-out text)…")
        windows = gate_windows(self.paths.package, self.eval_set(), r.eval.system_prompt,
                               r.conversion.fidelity.heldout_tokens)
        result = measure_gate(self.paths.package, reference.paths.package, windows, r.conversion.fidelity)
        self.announce(f"       fidelity vs FP32: {describe(result.figures)} (scored in {result.seconds:.0f} s)")
        if not result.passed:
            raise QualityError(failure_message(result, r.name, r.conversion.precision))
        return result.to_json()

    def _install(self) -> dict:
        f = self.recipe.foundry
        if not self.take_over and (problem := versions.owner_problem(self.installed_dir, self.recipe.path,
                                                                     self.recipe.name)):
            raise InstallError(problem)
        missing = [n for n in ("model.onnx", "genai_config.json", "inference_model.json")
                   if not (self.paths.package / n).is_file()]
        if missing:
            raise InstallError(f"{self.paths.package} is not a complete package (missing {', '.join(missing)}); "
                               f"rerun `invoke deploy --model {self.recipe_arg} --force` to rebuild it.")
        check_context(self.paths.package)
        owner = {"name": self.recipe.name, "path": str(self.recipe.path),
                 "precision": self.recipe.conversion.precision}
        manifest = versions.install_version(self.paths.package, self.cache_root, f.publisher, f.name,
                                            self.installed_dir, recipe=owner, first_version=int(f.version),
                                            keep=f.keep_versions, announce=self.announce)
        self.announce(f"       installed {f.publisher}/{manifest['model_id']} (content {manifest['content'][:8]})")
        return {"path": str(self.installed_dir), "bytes": folder_size(self.installed_dir),
                "model_id": manifest["model_id"], "content": manifest["content"]}

    def check(self) -> dict:
        """Listed, loads and answers through the Foundry Local runtime; scores the eval set."""

        qa = self.eval_set()
        cases = self.tool_cases()
        tool_chats, fmt = self.tool_chats(cases)
        chats = conversations(qa, self.recipe.eval.system_prompt) if qa or cases else [[{"role": "user",
                                                                                          "content": "Hello"}]]
        chats += tool_chats
        if self.status:
            self.status(f"Foundry Local: loading {self.recipe.foundry.name} and answering {len(chats)} prompts…")
        with self.cache_locked(read_only=True):
            model_id = self.model_id  # after the lock's recovery: a killed rollback or install may have changed it
            self.verify_installed()
            result = check_model(self.cache_root, self.installed_dir, model_id, chats,
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
                    f"{model_id} answered {ev.figure()} of {self.recipe.eval.dataset.name} "
                    f"through Foundry Local; the recipe requires {100 * self.recipe.eval.min_accuracy:.0f} % "
                    f"(eval.min_accuracy). Wrong answers, e.g.:\n{examples}\nTrain longer, or use a higher "
                    "precision / smaller block size (conversion.quantization).")
        if cases:
            summary["tools"] = self.score_tools(cases, tool_texts, fmt, "through Foundry Local").to_json()
        headline = (summary.get("accuracy_figure") or "answers").replace(".0 %", "%").replace(" %", "%")
        versions.record_proof(self.cache_root, self.recipe.foundry.publisher, self.recipe.foundry.name,
                              self.installed_dir, {"headline": headline, "check": {
                                  k: summary.get(k) for k in ("accuracy", "load_seconds")}})
        return summary

    def _checked_stale(self) -> str | None:
        """The check step's stamp vouches for the version it checked; another current version is checked again."""
        stamp = self.runner.recorded_result(Step("check", self.check)) or {}
        checked = stamp.get("model_id")
        return f"the current version is {self.model_id}, not the {checked} checked" if checked and \
            checked != self.model_id else None

    # ----- steps -----------------------------------------------------------------------------------------
    def steps(self) -> list:

        r = self.recipe
        hashed = r.settings_for_hash()
        judged_only = ("fidelity", "auto_threshold")  # thresholds: changing one re-judges, it rebuilds nothing
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
            Step("convert", self._convert,
                 inputs=[self.convert_dir] + ([self.carried.adapter] if self.carried.adapter else []),
                 settings={k: v for k, v in hashed["conversion"].items() if k not in judged_only},
                 outputs=[self.paths.onnx],
                 code=["scripts.convert.olive", "scripts.convert.graph_check", "scripts.convert.exact_route"]),
            Step("package", self._package, inputs=[self.paths.onnx, self.model_dir, settings.TEMPLATES_DIR],
                 settings={**{k: hashed[k] for k in ("family", "foundry", "generation", "name", "description")},
                           "session_options": r.runtime.session_options()},
                 outputs=[self.paths.package],
                 code=["scripts.convert.package", "scripts.convert.install", "scripts.families.select",
                       "scripts.runtimes.genai_smoke"]),
        ]
        if self.gated:
            out.append(Step("fidelity", self._fidelity_gate,
                            inputs=[self.paths.package] + ([r.eval.dataset] if r.eval.dataset else []),
                            settings={"fidelity": hashed["conversion"]["fidelity"], "system": r.eval.system_prompt},
                            code=["scripts.proof.gate"]))
        out += [
            Step("install", self._install, inputs=[self.paths.package],
                 settings={"cache": str(self.cache_root), "foundry": hashed["foundry"]},
                 outputs=[self.installed_dir], code=["scripts.convert.install", "scripts.convert.versions"],
                 verify=self._installed_stale),
            Step("check", self.check, inputs=[self.installed_dir] + [d for d in (r.eval.dataset, r.eval.tools) if d],
                 settings={"eval": hashed["eval"], "model_id": r.foundry.model_id}, verify=self._checked_stale,
                 code=["scripts.runtimes.foundry", "scripts.core.evalset", "scripts.core.tool_evalset"]),
        ]
        return out

    def step(self, name: str) -> Step | None:
        """The step called ``name`` in this recipe's chain (None: the recipe has no such step)."""
        return next((s for s in self.steps() if s.name == name), None)

    def model_steps(self) -> tuple[str, ...]:
        """The names of the steps that make the model to convert: the source's build, the fine-tune, the merge."""
        return tuple(s.name for s in self.steps()[1:] if s.name != "convert" and
                     s.name in {self.recipe.source.info.step, "finetune", "merge-adapter"})

    def run(self, only: Collection[str] | None = None, until: str | None = None) -> dict[str, Any]:
        """Run the steps in order (those named in ``only``, else all; up to and including ``until``) under the recipe's
        lock, and from ``install`` on under the cache target's too; return each step's outcome by name."""
        outcomes = {}
        if until in (None, "install", "check") and not self.take_over and (
                problem := versions.owner_problem(self.installed_dir, self.recipe.path, self.recipe.name)):
            raise InstallError(problem)  # before hours of conversion, not after
        if until in (None, "install", "check") and (problem := folder_problem(self.cache_root)):
            raise StorageError(f"Cannot install into the Foundry cache: {problem}. Point SLMOPS_FOUNDRY_CACHE at a "
                               "writable folder (`check` and `run` still read a read-only cache).")
        with self.locked():
            for step in self.steps():
                if only is not None and step.name not in only:
                    continue
                if step.name == "install":
                    self._locks.enter_context(self.cache_locked())
                outcomes[step.name] = self.runner.run(step)
                if step.name == until:
                    break
        return outcomes


def recipe_locked(recipe: Recipe, announce: Announce = log.info, wait: bool = True):
    """Hold ``recipe``'s build lock (after recovering what a killed run left) for a ``with`` block: for commands that
    run their own steps (compare, tune, ``--precision auto``) on the recipe's folders."""
    return Pipeline(recipe, announce=announce, wait=wait).locked()


# ----- variants of a recipe's build (the fidelity gate's reference, compare, tune) --------------------------------
def prepared_recipe(recipe: Recipe, main: Pipeline) -> Recipe:
    """``recipe`` converting the folder :func:`prepare_model` made (the base, or the base with the fine-tune or adapter
    merged) as a plain folder source: variant builds in their own roots then convert the same model, never retrain."""
    if main.model_dir == main.base_dir and not recipe.adapter and not recipe.finetune.dataset:
        return recipe
    source = parse_source(str(main.model_dir), main.model_dir.parent, "the prepared model")
    return replace(recipe, source=source, adapter=None, finetune=FinetuneSpec())


def require_tool_score(tool_score, recipe: Recipe, where: str) -> None:
    """:class:`QualityError` unless both rates of ``tool_score`` reach the recipe's ``eval.min_accuracy``."""
    if tool_score.passes(recipe.eval.min_accuracy):
        return
    examples = "\n".join(f"  - {f['ask']!r}: expected {f['expected']}, got calls {f['got_calls']} text {f['got_text']!r}"
                         for f in tool_score.failures[:5])
    raise QualityError(f"{recipe.foundry.model_id} on the held-out tool cases of {recipe.eval.tools.name} {where}: "
                       f"{tool_score.figure()}; the recipe requires {100 * recipe.eval.min_accuracy:.0f} % of each "
                       f"(eval.min_accuracy). Failures, e.g.:\n{examples}")
