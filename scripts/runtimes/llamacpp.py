"""llama.cpp (``llama-cpp-python``) as a measured peer backend: a GGUF file run with the same chat messages, the
same thread count and the same definitions as the other backends (:mod:`scripts.runtimes.backends`).

- prompt: the chat template of ``chat_dir`` (the deployed folder, so the text is the one Foundry Local renders),
  tokenized by llama.cpp's own tokenizer from the GGUF (special tokens parsed, no BOS added: a template that wants
  one writes it);
- greedy decoding (llama.cpp's greedy sampler), until an end-of-generation token or ``max_new_tokens``;
- a fresh KV cache for every generation (``reset``), so repeated prompts never reuse a cached prefix: prefill is
  always the whole prompt, as in ONNX Runtime GenAI;
- time to first token = prompt processing + the first token, each later token timestamped as it is produced.

Options: ``threads`` (generation and batch threads), ``n_ctx`` (context size), ``chat_dir``, ``n_batch``,
``flash_attn`` (default on: llama.cpp's own CLI and server default, ``-fa auto``, turn flash attention on for the CPU,
while llama-cpp-python's ``Llama`` defaults to off). The KV cache is llama.cpp's default, F16.
"""
from __future__ import annotations

import time
from pathlib import Path

from scripts.core.errors import PeerError
from scripts.peers.llamacpp import install_hint
from scripts.runtimes.backends import Backend, register_backend, render_chat, Trace

DEFAULT_BATCH = 512  # llama.cpp's default logical batch: a prompt up to this length is one forward pass


@register_backend
class LlamaCppBackend(Backend):
    name = "llama.cpp"
    _end_ids: list[int] | None = None  # end-of-generation ids (for exact-length replies), found once
    _scorer = None  # the logits_all context score() uses, made on first use

    def load(self) -> float:
        try:
            import llama_cpp
        except ImportError as exc:
            raise PeerError(f"llama-cpp-python cannot be imported ({exc}): {install_hint()}.") from None
        if not self.model_dir.is_file():
            raise PeerError(f"{self.model_dir} is not a GGUF file; the llama.cpp backend loads one .gguf file.")
        threads = int(self.options.get("threads") or 1)
        self.chat_dir = Path(self.options.get("chat_dir") or self.model_dir.parent)
        t0 = time.perf_counter()
        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(self.model_dir), n_ctx=int(self.options.get("n_ctx") or 0),
                                   n_batch=int(self.options.get("n_batch") or DEFAULT_BATCH), n_threads=threads,
                                   n_threads_batch=threads, seed=0, verbose=False,
                                   flash_attn=bool(self.options.get("flash_attn", True)))
        return time.perf_counter() - t0

    def generate(self, messages, max_new_tokens, exact=False):
        llm = self.llm
        start = time.perf_counter()
        ids = llm.tokenize(render_chat(self.chat_dir, messages).encode("utf-8"), add_bos=False, special=True)
        if len(ids) + max_new_tokens > llm.n_ctx():
            raise PeerError(f"{len(ids)} prompt tokens + {max_new_tokens} new tokens exceed llama.cpp's context of "
                            f"{llm.n_ctx()} tokens.")
        llm.reset()
        times: list[float] = []
        out: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True,
                                  logits_processor=[self._suppress_end] if exact else None):
            times.append(time.perf_counter())
            out.append(int(token))
            if self._end_of_generation(token) or len(out) >= max_new_tokens:
                break
        text = llm.detokenize([t for t in out if not self._end_of_generation(t)]).decode("utf-8", errors="replace")
        return Trace(start, times, len(ids), len(out), text)

    def _suppress_end(self, _ids, scores):
        """Logits processor: no end-of-generation token can win (an exact-length reply, as GenAI's min_length)."""
        if self._end_ids is None:
            self._end_ids = [t for t in range(self.llm.n_vocab()) if self._end_of_generation(t)]
        scores[self._end_ids] = -float("inf")
        return scores

    def score(self, ids):
        """Logits of every position of ``ids`` (teacher forcing), for fidelity to the F32 GGUF: a second context on the
        same file that keeps all logits (``logits_all``), made once and sized to the longest window seen."""
        import numpy as np
        if self._scorer is None or self._scorer.n_ctx() < len(ids):
            if self._scorer is not None:
                self._scorer.close()
            threads = int(self.options.get("threads") or 1)
            self._scorer = self.lib.Llama(model_path=str(self.model_dir), n_ctx=max(len(ids), 512),
                                          n_batch=max(len(ids), 512), n_threads=threads, n_threads_batch=threads,
                                          logits_all=True, seed=0, verbose=False)
        self._scorer.reset()
        self._scorer.eval(list(ids))
        return np.array(self._scorer.scores[:len(ids)], dtype=np.float32)

    def _end_of_generation(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.llm._model.vocab, token))

    def close(self) -> None:
        for llm in (getattr(self, "llm", None), self._scorer):
            if llm is not None:
                llm.close()
