"""One interface over the three ways a user could run the model, for measurement:

- ``foundry``: the Foundry Local runtime (``foundry-local-sdk``), as the deployed model is used;
- ``genai``: raw ONNX Runtime GenAI on the same converted folder;
- ``torch``: the original Hugging Face model in PyTorch (FP32);
- backends registered from their own modules with :func:`register_backend`: ``http`` (the Foundry Local runtime
  behind ``invoke serve``, streamed through the official ``openai`` client; the server is its own process, its CPU time
  and peak RSS are the ones reported: :mod:`scripts.serve.backend`) and the ``llama.cpp`` peer
  (:mod:`scripts.runtimes.llamacpp`).

Each backend is used inside its own worker process (``python -m scripts.proof.measure``): Foundry's GenAI
native library must not share a process with ``onnxruntime_genai``, and each process's peak RSS is then
that backend's alone. Every backend streams, so each generated token gets a timestamp.

``generate`` takes chat messages (every backend applies the model's own chat template) and returns a
:class:`Trace`. Greedy decoding everywhere; generation stops at the end-of-sequence token or after
``max_new_tokens``.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from scripts.core.errors import MeasurementError, SlmopsError
from scripts.runtimes import foundry_sdk
from scripts.runtimes.heap import one_heap_for_all_threads
from scripts.core.hf_folder import read_chat_template

log = logging.getLogger(__name__)



@dataclass
class Trace:
    """One generation: when it started, when each token (or streamed text piece) arrived, and counts."""

    start: float
    token_times: list[float]
    prompt_tokens: int
    new_tokens: int
    text: str = ""


def chat_template_of(model_dir: Path) -> tuple[str, dict]:
    """The chat template Foundry Local applies (see :func:`scripts.core.hf_folder.read_chat_template`) and the
    tokenizer config."""

    model_dir = Path(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    template = read_chat_template(model_dir)
    if template is None:
        raise SlmopsError(f"{model_dir} has no chat template (tokenizer_config.json chat_template or "
                          "chat_template.jinja); the benchmark needs one to build prompts.")
    return template, cfg


def render_chat(model_dir: Path, messages: Sequence[dict]) -> str:
    """Render ``messages`` with the folder's chat template (Jinja, as Hugging Face does)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template, cfg = chat_template_of(model_dir)

    def raise_exception(msg):
        raise jinja2.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    tokens = {k: (v if isinstance(v, str) else (v or {}).get("content", ""))
              for k, v in cfg.items() if k in ("bos_token", "eos_token")}
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=True, **tokens)


class Backend:
    name = "base"

    def __init__(self, model_dir: Path, **options: Any):
        self.model_dir = Path(model_dir)
        self.options = options

    def load(self) -> float:
        raise NotImplementedError

    def generate(self, messages: Sequence[dict], max_new_tokens: int, exact: bool = False) -> Trace:
        """Greedy reply, up to ``max_new_tokens``; ``exact``: exactly that many (end of text suppressed), for speed
        figures over a fixed number of tokens whatever the model would say."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the process that does the work: this one, unless a backend says otherwise."""
        import psutil
        t = psutil.Process().cpu_times()
        return t.user + t.system

    def peak_rss_bytes(self) -> int | None:
        """Peak RSS of the process that holds the model, when it is not this one (None: this process's)."""
        return None

    def score(self, ids: Sequence[int]) -> Any:
        """Logits (numpy, ``[len(ids), vocab]``) of one forward pass over ``ids`` (teacher forcing)."""
        raise MeasurementError(f"The {self.name} backend cannot return logits; use genai or torch.")


class GenAIBackend(Backend):
    name = "genai"
    _scorer = None  # the model score() runs (see _scoring_model)
    _scorer_dir = None
    _logits_name = "logits"

    def load(self) -> float:
        import onnxruntime_genai as og
        one_heap_for_all_threads()  # as for Foundry Local in our processes: same memory behaviour, fair comparison
        t0 = time.perf_counter()
        self.og = og
        self.model = og.Model(str(self.model_dir))
        self.tokenizer = og.Tokenizer(self.model)
        return time.perf_counter() - t0

    def generate(self, messages, max_new_tokens, exact=False):
        og = self.og
        start = time.perf_counter()
        ids = self.tokenizer.encode(render_chat(self.model_dir, messages))
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens,
                                  **({"min_length": len(ids) + max_new_tokens} if exact else {}))
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)
        times, out = [], []
        while not gen.is_done() and len(out) < max_new_tokens:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
            times.append(time.perf_counter())
        del gen
        return Trace(start, times, len(ids), len(out), self.tokenizer.decode(out))

    def score(self, ids):
        model = self._scoring_model()  # also reads the logits output's name
        params = self.og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids))  # a window may fill the whole context
        gen = self.og.Generator(model, params)
        gen.append_tokens(list(ids))
        logits = gen.get_output(self._logits_name)[0]
        del gen
        return logits

    def _scoring_model(self):
        """The loaded model, or — when its graph returns the last position's logits only (``prune_lm_head``) or its
        prefill runs in chunks (``search.chunk_size``: the last chunk's logits only) — the same weights with every
        position's logits in one pass, built once in a temporary folder and loaded beside it."""
        if self._scorer is None:
            import onnx
            # The graph's logits output may have been renamed by a quantization pass (genai_config says which);
            # asking GenAI for a name the graph lacks crashes the process. Read once, not per scored window.
            cfg = json.loads((self.model_dir / "genai_config.json").read_text(encoding="utf-8"))
            self._logits_name = ((cfg["model"]["decoder"].get("outputs") or {}).get("logits")) or "logits"
            from scripts.convert.lm_head_prune import full_logits_copy, last_token_logits
            graph = onnx.load(str(self.model_dir / "model.onnx"), load_external_data=False).graph
            if not last_token_logits(graph) and not (cfg.get("search") or {}).get("chunk_size"):
                self._scorer = self.model
            else:
                self._scorer_dir = tempfile.TemporaryDirectory(prefix="slmops-full-logits-")
                self._scorer = self.og.Model(str(full_logits_copy(self.model_dir, Path(self._scorer_dir.name))))
        return self._scorer

    def close(self) -> None:
        self._scorer = None
        if self._scorer_dir is not None:
            self._scorer_dir.cleanup()
            self._scorer_dir = None
        super().close()


class TorchBackend(Backend):
    """The Hugging Face original in PyTorch (FP32). Option ``chat_dir``: render prompts with that folder's chat template
    (the deployed package's) instead of the tokenizer's own, which a base model may not have."""

    name = "torch"

    def load(self) -> float:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        t0 = time.perf_counter()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        self.model.eval()
        return time.perf_counter() - t0

    def generate(self, messages, max_new_tokens, exact=False):
        from transformers.generation.streamers import BaseStreamer

        times: list[float] = []

        class Clock(BaseStreamer):
            def __init__(self):
                self.prompt_seen = False

            def put(self, value):
                if self.prompt_seen:
                    times.append(time.perf_counter())
                self.prompt_seen = True

            def end(self):
                pass

        start = time.perf_counter()
        chat_dir = self.options.get("chat_dir")  # the deployed package's template (a base model may have none)
        prompt = (render_chat(Path(chat_dir), messages) if chat_dir else
                  self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        gc = self.model.generation_config
        with self.torch.inference_mode():
            out = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=Clock(),
                                      eos_token_id=gc.eos_token_id, pad_token_id=gc.pad_token_id,
                                      min_new_tokens=max_new_tokens if exact else None)
        new = out[0, ids["input_ids"].shape[1]:]
        return Trace(start, times, int(ids["input_ids"].shape[1]), int(new.shape[0]),
                     self.tokenizer.decode(new, skip_special_tokens=True))

    def score(self, ids):
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([list(ids)])).logits[0].float().numpy()


def require_fixed_length(genai_config: dict, model_dir: Path, exact: bool) -> None:
    """Foundry Local takes no per-request minimum length: an exact-length reply needs the folder's own
    ``search.min_length`` at ``max_length`` (:func:`scripts.proof.bench.fixed_length_copy`)."""
    search = genai_config.get("search") or {}
    if exact and (search.get("min_length") or 0) < (search.get("max_length") or 1):
        raise MeasurementError(f"{model_dir}: Foundry Local cannot be asked for an exact number of new tokens per "
                               "request; measure a copy whose genai_config.json search.min_length equals max_length "
                               "(scripts.proof.bench.fixed_length_copy).")


def probe_model_id(model_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(model_dir).resolve().name).strip("-.") or "model"
    return f"{name[:48]}-measure:1"


class FoundryBackend(Backend):
    """Options: ``cache_dir`` and ``model_id`` (register there, idempotently, as ``check`` does); without
    them the folder is registered in a throw-away cache under a derived id (registration never copies)."""

    name = "foundry"

    def load(self) -> float:
        fr = self.fr = foundry_sdk
        self.genai_config = fr.validate_model_dir(self.model_dir)
        cache_dir = self.options.get("cache_dir")
        if not cache_dir:
            self._tmp = tempfile.TemporaryDirectory(prefix="slmops-measure-cache-")
            cache_dir = self._tmp.name
        model_id = self.options.get("model_id") or probe_model_id(self.model_dir)
        manager = fr.open_manager(Path(cache_dir))
        self.model, _ = fr.ensure_registered(fr.local_catalog(manager), self.model_dir, model_id)
        if self.model.is_loaded:
            self.model.unload()
        return fr.load_model(self.model)

    def search(self, max_new_tokens: int, raw: bool = False) -> dict:
        if raw:  # as given, bypassing our own validation: used to probe the runtime itself
            return {"max_output_tokens": max_new_tokens, "do_sample": False}
        return self.fr.search_options_from_genai_config(self.genai_config, max_new_tokens)

    def generate(self, messages, max_new_tokens, exact=False, raw: bool = False):
        require_fixed_length(self.genai_config, self.model_dir, exact)
        start = time.perf_counter()
        times, parts, usage = [], [], None
        for kind, value in self.fr.stream_reply(self.model, messages, self.search(max_new_tokens, raw)):
            if kind == "text":
                times.append(time.perf_counter())
                parts.append(value)
            else:
                usage = value
        prompt = usage.prompt_tokens if usage is not None else 0
        new = usage.completion_tokens if usage is not None else len(times)
        return Trace(start, times, prompt, new, "".join(parts))

    def close(self) -> None:
        try:
            self.fr.close_manager()
        except Exception as exc:  # measurement results are already taken
            log.warning("Closing Foundry Local failed: %s", exc)
        if getattr(self, "_tmp", None):
            self._tmp.cleanup()


def vm_hwm_bytes(pid: int) -> int | None:
    """Peak resident set size of another process (Linux ``/proc/PID/status`` ``VmHWM``), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


BACKEND_CLASSES: dict[str, type[Backend]] = {"foundry": FoundryBackend, "genai": GenAIBackend, "torch": TorchBackend}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make ``cls`` available to :func:`make_backend` under ``cls.name`` (names are unique)."""
    if cls.name in BACKEND_CLASSES and BACKEND_CLASSES[cls.name] is not cls:
        raise ValueError(f"backend name {cls.name!r} is registered twice")
    BACKEND_CLASSES[cls.name] = cls
    return cls


def make_backend(name: str, model_dir: Path, **options: Any) -> Backend:
    if name not in BACKEND_CLASSES:
        raise MeasurementError(f"Unknown backend {name!r}; choose one of: {', '.join(BACKEND_CLASSES)}.")
    return BACKEND_CLASSES[name](model_dir, **options)
