"""Tests for scripts/convert/deployed_base.py: the base read back out of its quantized graph is what the graph computes
(every projection, a tied head untied), the digests the convert step compares tell a different quantization apart, and
the chain trains a fine-tune kept as a branch on it (and only then)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from scripts.convert.deployed_base import build, projection_rows, weight_digests
from scripts.convert.graph_check import graph_weights


def test_packed_nodes_split_into_the_projections_they_hold():
    rows = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    qkv = {"layers.3.qkv_proj": [("layers.3.q_proj", 3), ("layers.3.k_proj", 2), ("layers.3.v_proj", 2)]}
    parts = projection_rows("/model/layers.3/attn/qkv_proj/MatMul", rows, qkv)
    assert list(parts) == ["layers.3.q_proj", "layers.3.k_proj", "layers.3.v_proj"]
    assert np.array_equal(np.concatenate(list(parts.values())), rows) and parts["layers.3.k_proj"].shape == (2, 2)
    down = {"layers.0.down_proj": [("layers.0.down_proj", 7)]}
    assert list(projection_rows("/model/layers.0/mlp/down_proj/MatMul", rows, down)) == ["layers.0.down_proj"]
    assert list(projection_rows("/lm_head/MatMul", rows, {})) == ["lm_head"]
    with pytest.raises(ValueError, match="not a builder projection node"):
        projection_rows("/model/embed_tokens/Gather", rows, {})


@pytest.fixture(scope="module")
def graph_dir(tiny_onnx_model, tmp_path_factory) -> Path:
    """A private copy of the tiny INT4 graph: other tests hard-link the shared one, and onnx refuses to load external
    data with more than one link."""
    return shutil.copytree(tiny_onnx_model, tmp_path_factory.mktemp("graph") / "onnx")


@pytest.fixture(scope="module")
def read_back(tiny_hf_model, graph_dir, tmp_path_factory):
    """The tiny model's base written back from its INT4 graph, with its head declared tied (as SmolLM2's is)."""
    root = tmp_path_factory.mktemp("deployed_base")
    base = shutil.copytree(tiny_hf_model, root / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    result = build({"base_dir": str(base), "onnx_dir": str(graph_dir), "out_dir": str(root / "out")})
    return base, root / "out", result


def test_the_written_base_holds_exactly_what_the_graph_computes(read_back, graph_dir):
    import torch
    from transformers import AutoModelForCausalLM

    base, out, result = read_back
    graph = onnx.load(str(graph_dir / "model.onnx"))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    computed = graph_weights(graph, tied=False)
    layer0 = computed["/model/layers.0/attn/qkv_proj/MatMul_Q4"]
    q, k = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    assert np.array_equal(np.concatenate([q, k, state["model.layers.0.self_attn.v_proj.weight"]]), layer0)
    assert np.array_equal(state["lm_head.weight"], computed["/lm_head/MatMul_Q4"])
    original = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).state_dict()
    assert not np.array_equal(q, original["model.layers.0.self_attn.q_proj.weight"].numpy())  # it was quantized
    embed = next(t for t in graph.graph.initializer if t.name.endswith("embed_tokens.weight"))
    assert np.array_equal(state["model.embed_tokens.weight"], numpy_helper.to_array(embed))  # float in the graph
    assert result["untied"] and not model.config.tie_word_embeddings
    assert result["matrices"] == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the head
    assert (out / "tokenizer.json").is_file() and "untied" in result["summary"]
    assert result["digests"] == weight_digests(graph)


def test_digests_tell_a_different_quantization_apart(graph_dir):
    graph = onnx.load(str(graph_dir / "model.onnx"))
    before = weight_digests(graph)
    scales = next(t for t in graph.graph.initializer if t.name.endswith("layers.0.mlp.down_proj.MatMul.weight_scales"))
    scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales) * np.float32(1.5), scales.name))
    after = weight_digests(graph)
    assert [n for n in before if before[n] != after[n]] == ["/model/layers.0/mlp/down_proj/MatMul_Q4"]


def test_the_chain_trains_a_branched_finetune_on_the_deployed_base_only(tmp_path, tiny_hf_model):
    from dataclasses import replace

    from scripts.pipeline import Pipeline
    from scripts.recipe.load import parse_recipe

    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    doc = {"model": {"source": str(tiny_hf_model), "family": "chatml", "finetune": {"dataset": "qa.jsonl"}},
           "foundry": {"name": "tiny-ft"}}
    recipe = parse_recipe(doc, tmp_path / "ft.json")
    pipe = Pipeline(recipe)
    names = [s.name for s in pipe.steps()]
    assert names.index("deployed-base") < names.index("finetune") < names.index("merge-adapter")
    assert pipe.train_dir == pipe.paths.deployed_base and pipe.convert_dir == Path(tiny_hf_model)
    assert pipe.step("finetune").inputs[0] == pipe.paths.deployed_base == pipe.step("merge-adapter").inputs[0]
    assert "deployed-base" in pipe.model_steps()
    for other in ({"adapter": "merge"}, {"precision": "fp32"}):
        plain = Pipeline(replace(recipe, conversion=replace(recipe.conversion, **other)))
        assert not plain.trains_on_deployed_base and plain.train_dir == Path(tiny_hf_model)
        assert "deployed-base" not in [s.name for s in plain.steps()]


def test_a_finetune_trained_on_the_deployed_base_is_deployed_exactly(tmp_path, tiny_hf_model, monkeypatch):
    """The real chain on the tiny model: the base quantized and read back, a LoRA trained on it, the merged FP32
    reference built on it, and the convert step's own Olive build of the base checked against it bit for bit (Olive
    quantizes the same base to the same values twice); a base quantized differently is refused with the fix."""
    from scripts.core.errors import GraphCheckError
    from scripts.pipeline import Pipeline
    from scripts.recipe.load import parse_recipe

    monkeypatch.setenv("SLMOPS_BUILD_DIR", str(tmp_path / "build"))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}"}) + "\n"
                                               for i in range(4)))
    doc = {"model": {"source": str(tiny_hf_model), "family": "chatml",
                     "finetune": {"dataset": "qa.jsonl", "epochs": 1, "rank": 4, "alpha": 8}},
           "foundry": {"name": "tiny-ft"}}
    pipe = Pipeline(parse_recipe(doc, tmp_path / "ft.json"))
    pipe.run(only=("deployed-base", "finetune", "merge-adapter", "convert"))
    graph = onnx.load(str(pipe.paths.onnx / "model.onnx"))
    assert sum(n.name.endswith("/branch_add") for n in graph.graph.node) == 2 * 5  # the LoRA kept as a branch
    assert (pipe.paths.merged / "config.json").is_file() and pipe.train_dir == pipe.paths.deployed_base
    recorded = pipe.runner.recorded_result(pipe.step("deployed-base"))["digests"]
    recorded[next(iter(recorded))] = "0" * 64
    stamp = pipe.paths.stamps / "deployed-base.json"
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "result": {"digests": recorded}}))
    with pytest.raises(GraphCheckError, match="quantized the base differently from the base the fine-tune trained on"):
        pipe._check_trained_base(pipe.paths.onnx / "model.onnx", "model.onnx")
