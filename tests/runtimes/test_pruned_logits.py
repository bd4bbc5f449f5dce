"""A graph built with ``prune_lm_head`` (logits for the last position only) still scores every position through
GenAI (:meth:`scripts.runtimes.backends.GenAIBackend.score` loads :func:`full_logits_copy` of it), with the same
figures as the full graph, and the graph check tells the two layouts apart."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from scripts.convert.graph_check import summarise_graph, verify_quantization
from scripts.convert.lm_head_prune import full_logits_copy
from scripts.core.errors import GraphCheckError
from scripts.proof.measure import run_worker
from scripts.recipe.spec import Conversion, Quantization
from tests.conftest import _isolated_env, _run


def _build(root, hf, prune: bool):
    out = root / ("pruned" if prune else "full")
    _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-o", str(out), "-p", "fp32",
          "-e", "cpu", "-c", str(root / "cache"), "--extra_options", f"prune_lm_head={str(prune).lower()}"],
         _isolated_env(root / "home"), "Converting the tiny model")
    return out


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny_hf_model):
    root = tmp_path_factory.mktemp("prune")
    return {prune: _build(root, tiny_hf_model, prune) for prune in (False, True)}


def test_graph_check_tells_last_position_logits_from_all(graphs):
    full, pruned = (summarise_graph(graphs[p] / "model.onnx") for p in (False, True))
    assert (full.last_token_logits, pruned.last_token_logits) == (False, True)
    verify_quantization(pruned, Conversion("fp32", Quantization(32, True, 4, "default")), "m")
    with pytest.raises(GraphCheckError, match="prune_lm_head: asked logits for the last position only"):
        verify_quantization(full, Conversion("fp32", Quantization(32, True, 4, "default")), "m")
    with pytest.raises(GraphCheckError, match="asked logits for every position"):
        verify_quantization(pruned, Conversion("fp32", Quantization(32, True, 4, "default"), prune_lm_head=False), "m")


def test_pruned_graph_scores_every_position_like_the_full_graph(graphs):
    windows = [list(range(5, 45)), list(range(100, 131))]
    job = {"kind": "logits", "windows": windows}
    full, pruned = (run_worker("genai", graphs[p], [job])["jobs"][0]["windows"] for p in (False, True))
    for f, p, ids in zip(full, pruned, windows):
        assert len(p["argmax"]) == len(f["argmax"]) == len(ids) - 1
        assert p["argmax"] == f["argmax"]
        np.testing.assert_allclose(p["nll"], f["nll"], rtol=1e-3, atol=1e-4)


def test_full_logits_copy_removes_the_selection_and_links_the_rest(graphs, tmp_path):
    copy = full_logits_copy(graphs[True], tmp_path / "copy")
    assert summarise_graph(copy / "model.onnx").last_token_logits is False
    assert summarise_graph(graphs[True] / "model.onnx").last_token_logits is True  # the original is untouched
    assert (copy / "model.onnx.data").stat().st_ino == (graphs[True] / "model.onnx.data").stat().st_ino
    # a graph already returning every position (a chunked prefill's folder): copied as it is, minus the chunking
    chunked = tmp_path / "chunked"
    shutil.copytree(graphs[False], chunked)
    config = json.loads((chunked / "genai_config.json").read_text())
    (chunked / "genai_config.json").write_text(json.dumps({**config, "search": {**config["search"], "chunk_size": 16}}))
    copy = full_logits_copy(chunked, tmp_path / "not-pruned")
    assert summarise_graph(copy / "model.onnx").last_token_logits is False
    assert "chunk_size" not in json.loads((copy / "genai_config.json").read_text())["search"]
