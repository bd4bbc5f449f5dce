"""Where a recipe's build outputs live: ``build/<recipe>/`` (``SLMOPS_BUILD_DIR`` moves ``build/``), or the root a
variant build is given (``compare``: ``build/<recipe>/precisions/<p>/``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scripts.core import settings

if TYPE_CHECKING:
    from scripts.recipe.spec import Recipe


@dataclass
class Paths:
    """Where a recipe's build outputs live."""

    root: Path

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> "Paths":
        return cls(settings.build_dir() / recipe.name)

    @property
    def stamps(self) -> Path:
        return self.root / "stamps"

    @property
    def olive_work(self) -> Path:
        return self.root / "olive"

    @property
    def onnx(self) -> Path:
        return self.root / "onnx"

    @property
    def package(self) -> Path:
        return self.root / "package"

    @property
    def adapter(self) -> Path:
        """The LoRA adapter the recipe's ``model.finetune`` trains."""
        return self.root / "adapter"

    @property
    def deployed_base(self) -> Path:
        """The base as the deployed graph computes it (quantized, read back), the fine-tune's training base."""
        return self.root / "deployed-base"

    @property
    def merged(self) -> Path:
        """The base model with the recipe's LoRA adapter merged in."""
        return self.root / "merged"
