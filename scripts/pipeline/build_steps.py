"""The steps that make the package of a recipe's chain, as methods :class:`~scripts.pipeline.chain.Pipeline` takes
in: the model source, the fine-tune and its merge, convert (Olive, the carried GGUF blocks and LoRA branch, the
graph check), package (inference_model.json, generation settings, the template check, the GenAI smoke test) and
the fidelity gate (:mod:`scripts.proof.gate`)."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import onnx

from scripts.runtimes.genai_smoke import smoke_test
from scripts.convert.attention_scale import fold_attention_scale
from scripts.convert.kv_cache import quantize_kv_cache
from scripts.convert.exact_route import Carried, builder_settings, carry, check_carried, has_blocks
from scripts.convert.graph_check import summarise_graph, verify_options, verify_quantization
from scripts.convert.install import assemble_package
from scripts.convert.olive import olive_config, run_olive
from scripts.convert.package import render_inference_model, with_search, with_session_options
from scripts.doctor import run_doctor
from scripts.convert.deployed_base import weight_digests
from scripts.core.errors import GraphCheckError, ModelSourceError, QualityError
from scripts.core.faults import checkpoint
from scripts.families.registry import AUTO_TEMPLATE
from scripts.families.select import (choose_family, prompt_template_for, refuse_system_prompt, refuse_unconvertible,
                                     with_stop_tokens)
from scripts.families.templates import check_template_agreement, load_tokenizer
from scripts.core.fileops import atomic_dir, folder_size
from scripts.recipe.spec import FinetuneSpec, Recipe
from scripts.proof.gate import describe, failure_message, gate_windows, measure_gate
from scripts.core.hf_folder import CHAT_TEMPLATE_FILE, inspect_model_folder, read_chat_template
from scripts.sources.gguf import KEPT_GGUF
from scripts.core.workers import resolve, run_in_worker

log = logging.getLogger(__name__)


class BuildSteps:
    """Step bodies up to the package and its fidelity gate (mixed into the pipeline: ``self`` is one)."""

    @property
    def carried(self) -> Carried:
        """What the convert step carries into the graph instead of re-quantizing: the source GGUF's blocks (an int4
        build of a GGUF source, ``conversion.gguf`` "exact") and the adapter as a branch (``conversion.adapter``).
        An adapter merged into the weights (``conversion.adapter: "merge"``) makes them other than the GGUF's blocks:
        the merged model is then quantized again whatever ``conversion.gguf`` says (the recipe notes it)."""
        c = self.recipe.conversion
        kept = self.base_dir / KEPT_GGUF
        branch = self.adapter_dir if self.adapter_dir and c.adapter == "branch" else None
        merged = self.adapter_dir is not None and branch is None  # the weights are no longer the GGUF's blocks
        exact = (self.recipe.source.gguf_file and c.gguf == "exact" and c.precision == "int4" and not merged
                 and has_blocks(kept))
        return Carried(kept if exact else None, branch, c.adapter_bits)

    @property
    def trains_on_deployed_base(self) -> bool:
        """Whether ``model.finetune`` trains on the base as the deployed graph computes it
        (:mod:`scripts.convert.deployed_base`): the adapter kept as a branch beside a base the builder quantizes (a
        GGUF carried exactly already is its dequantized blocks; a merged adapter is quantized with the base)."""
        r = self.recipe
        return (bool(r.finetune.dataset) and not r.prepared and r.conversion.adapter == "branch"
                and r.conversion.precision in ("int4", "int8") and self.carried.gguf is None)

    @property
    def train_dir(self) -> Path:
        """The base the fine-tune trains on and the adapter is merged into (the FP32 reference's base)."""
        return self.paths.deployed_base if self.trains_on_deployed_base else self.base_dir

    @property
    def convert_dir(self) -> Path:
        """The Hugging Face folder Olive builds from: the base when the adapter is kept as a branch."""
        return self.base_dir if self.carried.adapter else self.model_dir

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

    def _build_graph(self, model_dir: Path, out_dir: Path, carried: Carried) -> None:
        """Olive's graph of ``model_dir`` at the recipe's conversion (under a carried GGUF: the exact route's)."""
        built, shared = builder_settings(self.recipe.conversion, carried)
        config = olive_config(built, model_dir, out_dir, self.paths.olive_work / "cache", shared_embeddings=shared)
        run_olive(config, self.paths.olive_work, progress=self.status)

    def _deployed_base(self) -> dict:
        """Quantize the base with the recipe's conversion and write it back as the Hugging Face folder the fine-tune
        trains on (:mod:`scripts.convert.deployed_base`)."""
        inspect_model_folder(self.base_dir)
        if self.status:
            self.status(f"quantizing {self.base_dir} as the deployed graph will, for the fine-tune to train on…")
        with atomic_dir(self.paths.deployed_base, label="deployed-base") as staging:
            graph = staging.parent / f"{staging.name}-graph"
            shutil.rmtree(graph, ignore_errors=True)
            try:
                self._build_graph(self.base_dir, graph, Carried())
                result = run_in_worker("scripts.convert.deployed_base:build",
                                       {"base_dir": str(self.base_dir), "onnx_dir": str(graph),
                                        "out_dir": str(staging)},
                                       error=ModelSourceError, what=f"reading the quantized base of {self.base_dir}")
            finally:
                shutil.rmtree(graph, ignore_errors=True)
        self.announce(f"       {result.pop('summary')}")
        return result

    def _check_trained_base(self, model_onnx: Path, where: str) -> None:
        """The graph quantizes the base to exactly the values the fine-tune trained on (the ``deployed-base``
        step's)."""
        recorded = (self.runner.recorded_result(self.step("deployed-base")) or {}).get("digests") or {}
        built = weight_digests(onnx.load(str(model_onnx)))
        differ = sorted(n for n in set(recorded) | set(built) if recorded.get(n) != built.get(n))
        if differ:
            raise GraphCheckError(f"{where}: the builder quantized the base differently from the base the fine-tune "
                                  f"trained on ({len(differ)} of {len(built)} matrices, e.g. {differ[0]}). Rebuild "
                                  "both: `invoke convert --force`.")

    def _convert(self) -> dict:

        self._check_before_converting()
        carried, conversion = self.carried, self.recipe.conversion
        with atomic_dir(self.paths.onnx, label="convert") as staging:
            self._build_graph(self.convert_dir, staging, carried)
            checkpoint("convert:olive-done")
            if self.trains_on_deployed_base:
                self._check_trained_base(staging / "model.onnx", str(staging / "model.onnx"))
            note = carry(staging, conversion, carried)
            folded, _ = fold_attention_scale(staging) if conversion.fold_attention_scale else (0, [])
            kv_layers = quantize_kv_cache(staging) if conversion.kv_cache == "int8" else 0
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
                                                                 "layers)" if folded else "")
                      + (f"; KV cache int8 ({kv_layers} layers, calibrated scales)" if kv_layers else ""))
        return {"graph": summary.describe(), "bytes": folder_size(self.paths.onnx), "attention_scale_folded": folded,
                "carried": note, "kv_cache_int8_layers": kv_layers}

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
        spec, base = self.recipe.finetune, self.train_dir
        inspect_model_folder(base)
        if self.status:
            self.status(f"LoRA fine-tune of {base} on {spec.dataset.name} ({spec.epochs} epochs)…")
        with atomic_dir(self.paths.adapter, label="finetune") as staging:
            result = run_in_worker("scripts.sources.finetune:train",
                                   {"base_dir": str(base), "dataset": str(spec.dataset),
                                    "settings": spec.settings(), "out_dir": str(staging)},
                                   error=ModelSourceError, what=f"fine-tuning {base} on {spec.dataset.name}")
        self.announce(f"       {result.pop('summary')}")
        return result

    def _merge_adapter(self) -> dict:
        base = self.train_dir
        inspect_model_folder(base)
        if self.status:
            self.status(f"merging the LoRA adapter {self.adapter_dir} into {base}…")
        with atomic_dir(self.paths.merged, label="merge") as staging:
            result = run_in_worker("scripts.sources.lora:merge_job",
                                   {"base_dir": str(base), "adapter_dir": str(self.adapter_dir),
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
        genai_config = {**genai_config, "search": {**genai_config["search"], **self.recipe.runtime.search_options()}}
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
        reference = type(self).variant(prepared, r.conversion.reference(), "precisions/fp32",
                                       force=self.force, announce=self.announce, status=self.status)
        reference.run(only=("convert", "package"))
        if self.status:
            self.status("fidelity gate: scoring the build against FP32 (eval answers, held-out text)…")
        windows = gate_windows(self.paths.package, self.eval_set(), r.eval.system_prompt,
                               r.conversion.fidelity.heldout_tokens, self.tool_cases())
        result = measure_gate(self.paths.package, reference.paths.package, windows, r.conversion.fidelity)
        self.announce(f"       fidelity vs FP32: {describe(result.figures)} (scored in {result.seconds:.0f} s)")
        if not result.passed:
            raise QualityError(failure_message(result, self.recipe_arg, r.conversion.precision))
        return result.to_json()


def prepared_recipe(recipe: Recipe, main) -> Recipe:
    """``recipe`` for variant builds in their own roots (compare, tune, ``--precision auto``, the gate's FP32
    reference): the adapter ``main`` trained or was given, nothing to train, and ``main``'s merged model pinned as the
    FP32 model (:attr:`Recipe.prepared`). A variant then carries the source GGUF and the adapter exactly like the
    recipe's own build, or converts the merged model (``adapter: "merge"``, FP32) — and never merges or trains
    again."""
    if main.adapter_dir is None:
        return recipe
    return replace(recipe, adapter=str(main.adapter_dir), finetune=FinetuneSpec(), prepared=str(main.model_dir))
