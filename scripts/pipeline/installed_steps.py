"""The steps on the installed model, as methods :class:`~scripts.pipeline.chain.Pipeline` takes in: install (a new
version, verified against its manifest: :mod:`scripts.convert.versions`) and check (Foundry Local lists, loads and
answers the eval set and the held-out tool cases), and what they read: the current version and its integrity."""
from __future__ import annotations

import logging
from typing import Any

from scripts.core import settings
from scripts.convert.install import check_context
from scripts.convert import versions
from scripts.core.errors import InstallError, QualityError
from scripts.families.tools import ToolFormat, reply_calls, served_cases, serving_spec
from scripts.core.fileops import folder_size
from scripts.core.evalset import conversations, score
from scripts.recipe.spec import Recipe
from scripts.core.tool_evalset import load_lines, score_outcomes
from scripts.runtimes.foundry import check_model
from scripts.runtimes.foundry_api import default_client_note
from scripts.core.hf_folder import read_chat_template
from scripts.core.steps import Step

log = logging.getLogger(__name__)


class InstalledSteps:
    """Step bodies from install on (mixed into the pipeline: ``self`` is one)."""

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

    def chat_tools(self) -> list[dict] | None:
        """The tools ``invoke run`` offers: those of the first line of ``eval.tools`` (None without it)."""
        tools = self.recipe.eval.tools
        return (load_lines(tools)[0].get("tools") or None) if tools else None

    def tool_chats(self, cases, chat_dir=None) -> tuple[list[list[dict]], ToolFormat | None]:
        """``cases`` as the plain conversations ``invoke serve`` would hand the runtime for them (the tools written in
        the family format of ``chat_dir``'s chat template, default the installed model's), and that format to parse
        the replies with."""
        if not cases:
            return [], None
        served = served_cases(serving_spec(read_chat_template(chat_dir or self.installed_dir)), cases)
        if served is None:
            raise QualityError(f"{self.recipe.path}: eval.tools is set, but the installed model's chat template "
                               "matches no family with a tool format (templates/families/<family>.tools.json).")
        return served

    @staticmethod
    def score_replies(cases, texts: list[str], fmt: ToolFormat | None):
        """The :class:`~scripts.core.tool_evalset.ToolScore` of raw replies to ``cases`` (in :meth:`tool_chats`' format)."""
        return score_outcomes(cases, [reply_calls(t, fmt) for t in texts])

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
        hello = [] if cases else [[{"role": "user", "content": "Hello"}]]
        chats = (conversations(qa, self.recipe.eval.system_prompt) if qa else hello) + tool_chats
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
                    "precision / smaller block size (conversion.quantization). " + self._failed_check_note(model_id))
        if cases:
            tool_score = self.score_replies(cases, tool_texts, fmt)
            require_tool_score(tool_score, self.recipe, model_id, "through Foundry Local",
                               self._failed_check_note(model_id))
            summary["tools"] = tool_score.to_json()
        headline = (summary.get("accuracy_figure") or "answers").replace(".0 %", "%").replace(" %", "%")
        versions.record_proof(self.cache_root, self.recipe.foundry.publisher, self.recipe.foundry.name,
                              self.installed_dir, {"headline": headline, "check": {
                                  k: summary.get(k) for k in ("accuracy", "load_seconds")}})
        return summary

    def _failed_check_note(self, model_id: str) -> str:
        """What a failed check leaves behind and how to undo it (the check runs on the installed version)."""
        return (f"{model_id} stays installed and current; if an earlier version is kept, `invoke rollback --model "
                f"{self.recipe_arg}` makes it current again (`invoke models` lists them).")

    def _checked_stale(self) -> str | None:
        """The check step's stamp vouches for the version it checked; another current version is checked again."""
        stamp = self.runner.recorded_result(Step("check", self.check)) or {}
        checked = stamp.get("model_id")
        return f"the current version is {self.model_id}, not the {checked} checked" if checked and \
            checked != self.model_id else None


def require_tool_score(tool_score, recipe: Recipe, model_id: str, where: str, after: str = "") -> None:
    """:class:`QualityError` unless every rate of ``tool_score`` reaches the recipe's ``eval.min_accuracy``;
    ``model_id``: the installed version's id (a redeploy may have made it other than the recipe's); ``after``: what the
    failure leaves behind, appended."""
    if tool_score.passes(recipe.eval.min_accuracy):
        return
    examples = "\n".join(f"  - {f['ask']!r}: expected {f['expected']}, got calls {f['got_calls']} text {f['got_text']!r}"
                         for f in tool_score.failures[:5])
    raise QualityError(f"{model_id} on the held-out tool cases of {recipe.eval.tools.name} {where}: "
                       f"{tool_score.figure()}; the recipe requires {100 * recipe.eval.min_accuracy:.0f} % of each "
                       f"(eval.min_accuracy). Failures, e.g.:\n{examples}\nAdd training conversations of the failing "
                       f"kind to the tool set (model.finetune.dataset) or train longer. {after}".rstrip())
