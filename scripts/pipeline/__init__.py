"""The deployment chain for one recipe, as Make-style steps (:class:`~scripts.pipeline.chain.Pipeline`): the chain
and its locks in :mod:`~scripts.pipeline.chain`, the step bodies up to the package and its fidelity gate in
:mod:`~scripts.pipeline.build_steps`, those on the installed model in :mod:`~scripts.pipeline.installed_steps`."""
from scripts.pipeline.build_steps import prepared_recipe
from scripts.pipeline.chain import Announce, Pipeline, recipe_locked

__all__ = ["Announce", "Pipeline", "prepared_recipe", "recipe_locked"]
