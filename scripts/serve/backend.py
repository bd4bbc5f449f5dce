"""The ``http`` measuring backend: the Foundry Local runtime behind ``invoke serve``'s server, streamed through the
official ``openai`` client (registered with :func:`~scripts.runtimes.backends.register_backend`)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from scripts.runtimes import foundry_sdk
from scripts.runtimes.backends import Backend, Trace, probe_model_id, register_backend, require_fixed_length, vm_hwm_bytes
from scripts.serve import client as serve_client
from scripts.serve import server as serve


@register_backend
class HttpBackend(Backend):
    """Options as :class:`FoundryBackend`. :meth:`load` starts ``invoke serve``'s server on a free loopback port (its
    load time is the server's whole start: process, runtime, model); :meth:`generate` streams through the ``openai``
    client, greedy (``temperature`` 0) with ``max_tokens``, timing each content piece as it arrives."""

    name = "http"

    def load(self) -> float:
        cache_dir = self.options.get("cache_dir")
        if not cache_dir:
            self._tmp = tempfile.TemporaryDirectory(prefix="slmops-measure-cache-")
            cache_dir = self._tmp.name
        self.model_id = self.options.get("model_id") or probe_model_id(self.model_dir)
        self.genai_config = foundry_sdk.validate_model_dir(self.model_dir)
        plan = serve.plan_serve(Path(cache_dir), self.model_dir, self.model_id, port=0)
        self._log = tempfile.NamedTemporaryFile(prefix="slmops-serve-", suffix=".log", delete=False)
        self._log.close()
        t0 = time.perf_counter()
        self.server = serve.ServerProcess(plan, log_path=Path(self._log.name)).start()
        seconds = time.perf_counter() - t0
        self.client = serve_client.openai_client(self.server.base_url)
        self._peak = None
        return seconds

    def generate(self, messages, max_new_tokens, exact=False):
        require_fixed_length(self.genai_config, self.model_dir, exact)
        a = serve_client.stream_answer(self.client, self.model_id, list(messages), max_tokens=max_new_tokens,
                                       temperature=0)
        return Trace(a.start, a.token_times, a.prompt_tokens, a.completion_tokens, a.text)

    def _server(self):
        import psutil
        return psutil.Process(self.server.pid)

    def cpu_seconds(self) -> float:
        t = self._server().cpu_times()
        return t.user + t.system

    def peak_rss_bytes(self) -> int | None:
        if self._peak is None and getattr(self, "server", None) is not None and self.server.running():
            self._peak = vm_hwm_bytes(self.server.pid)
        return self._peak

    def close(self) -> None:
        try:
            if getattr(self, "server", None) is not None:
                self.peak_rss_bytes()
                self.server.stop()
        finally:
            if getattr(self, "_log", None):
                Path(self._log.name).unlink(missing_ok=True)
            if getattr(self, "_tmp", None):
                self._tmp.cleanup()
