"""Real English text available offline everywhere: the documentation topics shipped with Python itself
(``pydoc_data.topics``, ~465k characters), never copied into the repository.

Two disjoint uses: the fidelity gate scores a build on the text's *head* (:func:`heldout_text`, then its first
``conversion.fidelity.heldout_tokens`` tokens), and calibration (the KV cache's scales,
:mod:`scripts.convert.kv_cache`) reads its *tail* (:func:`calibration_text`), so no build is tuned on the text that
judges it.
"""
from __future__ import annotations

#: Characters of the text's tail that calibration reads (~16k tokens): far from the head the gate scores.
CALIBRATION_CHARS = 64_000


def heldout_text() -> str:
    """Python's own documentation topics, in a fixed order."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key] for key in sorted(topics))


def calibration_text(chars: int = CALIBRATION_CHARS) -> str:
    """The last ``chars`` characters of :func:`heldout_text` (the gate scores its head)."""
    return heldout_text()[-chars:]
