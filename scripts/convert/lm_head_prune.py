"""Logits for the last position only (the model builder's ``prune_lm_head``, recipe ``conversion.prune_lm_head``).

The builder puts ``Gather(axis=1, index -1) → Unsqueeze(axis 1)`` before the LM head, so a prompt of n tokens runs the
vocabulary-sized MatMul once instead of n times; the ``logits`` output becomes ``[batch, 1, vocab]``. Generation needs
nothing else. Teacher-forced scoring (perplexity, KLD, top-1 over held-out text) needs every position:
:func:`full_logits_copy` gives it a copy of the graph with those two nodes taken out — the same weights (hard-linked, not
copied) and the same kernels, logits for every position.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import numpy_helper

from scripts.core.errors import MeasurementError
from scripts.core.fileops import link_or_copy

CONFIG = "genai_config.json"


def last_token_logits(graph: onnx.GraphProto) -> bool | None:
    """Whether the logits output ``[batch, positions, vocab]`` has a fixed positions dimension of 1; None when the graph
    has no logits output (a quantization pass may rename it ``logits_Q4``: the prefix counts)."""
    for out in graph.output:
        if out.name.startswith("logits"):
            dims = out.type.tensor_type.shape.dim
            return len(dims) == 3 and dims[1].dim_value == 1
    return None


def _unprune(graph: onnx.GraphProto) -> None:
    """Remove the last-position selection in place: the Unsqueeze's consumers read the Gather's input again."""
    constants = {i.name: i for i in graph.initializer}  # the builder writes its constants as Constant nodes
    constants.update({n.output[0]: n.attribute[0].t for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    for gather in graph.node:
        if gather.op_type != "Gather" or len(gather.input) < 2 or gather.input[1] not in constants:
            continue
        axis = next((onnx.helper.get_attribute_value(a) for a in gather.attribute if a.name == "axis"), 0)
        index = numpy_helper.to_array(constants[gather.input[1]])
        if axis != 1 or index.shape != () or int(index) != -1:
            continue
        unsqueeze = next((n for n in graph.node if n.op_type == "Unsqueeze" and n.input[0] == gather.output[0]), None)
        if unsqueeze is None:
            continue
        for node in graph.node:
            node.input[:] = [gather.input[0] if x == unsqueeze.output[0] else x for x in node.input]
        graph.node.remove(unsqueeze)
        graph.node.remove(gather)
        _forget_shapes_downstream(graph, gather.input[0])
        for out in graph.output:
            if out.name.startswith("logits"):
                out.type.tensor_type.shape.dim[1].dim_param = "sequence_length"
        return
    raise MeasurementError("The graph returns logits for the last position only, but the Gather(axis 1, index -1) → "
                           "Unsqueeze that selects it was not found: cannot score every position. Rebuild with "
                           "conversion.prune_lm_head false to measure fidelity on this graph.")


def _forget_shapes_downstream(graph: onnx.GraphProto, start: str) -> None:
    """Drop the recorded shapes (``value_info``) of every tensor computed from ``start``: they were inferred with one
    position (Gemma's logit soft-capping Div → Tanh → Mul after the LM head kept ``[batch, 1, vocab]``, and ONNX Runtime
    then refused the full logits)."""
    reached, frontier = set(), {start}
    while frontier:
        outputs = {o for n in graph.node if set(n.input) & frontier for o in n.output} - reached
        reached |= outputs
        frontier = outputs
    keep = [vi for vi in graph.value_info if vi.name not in reached]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def full_logits_copy(model_dir: Path, dest: Path) -> Path:
    """``dest``: ``model_dir`` with a graph returning logits for every position, run in one pass (no
    ``search.chunk_size``: a chunked prefill returns the last chunk's logits only); its other files hard-linked."""
    model_dir, dest = Path(model_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    if last_token_logits(model.graph):
        _unprune(model.graph)
    for path in model_dir.iterdir():  # hard links: ONNX Runtime refuses external data behind a symlink
        if path.is_file() and path.name not in ("model.onnx", CONFIG) and not (dest / path.name).exists():
            link_or_copy(path, dest / path.name)
    config = json.loads((model_dir / CONFIG).read_text(encoding="utf-8"))
    config["search"] = {k: v for k, v in (config.get("search") or {}).items() if k != "chunk_size"}
    (dest / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    onnx.save(model, str(dest / "model.onnx"))
    return dest
