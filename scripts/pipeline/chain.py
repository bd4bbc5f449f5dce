"""The deployment chain for one recipe, as Make-style steps:
doctor → model source (demo / synthetic / tiny model / GGUF import / download, when the recipe names one) →
deployed-base (the base quantized and read back, for a fine-tune kept as a branch) → finetune (LoRA, when the
recipe asks for one) → merge-adapter (LoRA) →
convert (Olive, graph check) → package (inference_model.json, generation settings, template check, GenAI smoke
test) → install (Foundry cache) → check (Foundry runtime: listed, loads, answers the eval set) → bench →
validate (see :mod:`scripts.proof.run`)."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

from scripts.core import settings
from scripts.convert.install import install_dir
from scripts.convert import versions
from scripts.doctor import folder_problem
from scripts.core.errors import InstallError, StorageError
from scripts.core.faults import checkpoint
from scripts.core.fileops import recover_dir
from scripts.core.locks import held, hold
from scripts.core.evalset import load_qa
from scripts.core.tool_evalset import load_cases
from scripts.recipe.paths import Paths
from scripts.recipe.spec import Recipe
from scripts.runtimes.foundry import cache_root
from scripts.runtimes.foundry_api import RUNTIME_DIR_NAME
from scripts.core.steps import Step, StepRunner
from scripts.pipeline.build_steps import BuildSteps
from scripts.pipeline.installed_steps import InstalledSteps

log = logging.getLogger(__name__)
Announce = Callable[[str], None]


@dataclass
class Pipeline(BuildSteps, InstalledSteps):
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
    @classmethod
    def variant(cls, recipe: Recipe, conversion, folder: str, **options) -> "Pipeline":
        """A pipeline for ``recipe`` converted with ``conversion``, building in ``build/<recipe>/<folder>/`` (compare's
        precisions, tune's candidates, the fidelity gate's FP32 reference)."""
        return cls(replace(recipe, conversion=conversion), root=Paths.for_recipe(recipe).root / folder, **options)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the recipe's build-folder lock (and its built model source's) for the block, after recovering what a
        killed run left there. The cache target's lock joins them from the install step on (:meth:`run`)."""
        if self._locks is not None:
            yield
            return
        recipe_root = Paths.for_recipe(self.recipe).root
        outermost = not held(recipe_root)  # a variant build (the gate's FP32 reference) re-enters this process's lock
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
                if outermost:
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
        reference of fidelity and answer checks; a variant build's: the one its recipe's pipeline made)."""
        if self.recipe.prepared:
            return Path(self.recipe.prepared)
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

    # ----- step bodies --------------------------------------------------------------------------------

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
        if self.trains_on_deployed_base:
            layout = {k: v for k, v in hashed["conversion"].items() if k in ("precision", "quantization", "gguf")}
            out.append(Step("deployed-base", self._deployed_base, inputs=[self.base_dir], settings=layout,
                            outputs=[self.paths.deployed_base],
                            code=["scripts.convert.deployed_base", "scripts.convert.olive"]))
        if r.finetune.dataset:
            out.append(Step("finetune", self._finetune, inputs=[self.train_dir, r.finetune.dataset],
                            settings=r.finetune.settings(), outputs=[self.paths.adapter],
                            code=["scripts.sources.finetune"]))
        if self.adapter_dir and not r.prepared:  # a variant's model was merged by the recipe's own pipeline
            out.append(Step("merge-adapter", self._merge_adapter, inputs=[self.train_dir, self.adapter_dir],
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
                     s.name in {self.recipe.source.info.step, "deployed-base", "finetune", "merge-adapter"})

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


