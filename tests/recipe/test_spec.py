"""Tests for scripts/recipe/spec.py: each recipe key is declared once, in the schema; the spec dataclasses take their
defaults from it and cover exactly its keys."""
from __future__ import annotations

from dataclasses import dataclass, fields

import pytest

from scripts.core.schema import defaults_from, Field, Obj
from scripts.recipe.runtime import RuntimeSpec, SCHEMA as RUNTIME_SCHEMA
from scripts.recipe.spec import (Conversion, FidelitySpec, FinetuneSpec, Generation, Quantization, section,
                                 ValidateSpec)

SPECS = [(Quantization, section("conversion", "quantization")), (FidelitySpec, section("conversion", "fidelity")),
         (Conversion, section("conversion")), (FinetuneSpec, section("model", "finetune")),
         (Generation, section("generation")), (ValidateSpec, section("validate")), (RuntimeSpec, RUNTIME_SCHEMA)]


@pytest.mark.parametrize("spec, obj", SPECS, ids=[s.__name__ for s, _ in SPECS])
def test_every_spec_has_exactly_its_schema_keys_with_the_schema_defaults(spec, obj):
    assert {f.name for f in fields(spec)} == set(obj.fields)
    for f in fields(spec):
        declared = obj.fields[f.name]
        if isinstance(declared, Field):
            assert f.default == declared.default, f"{spec.__name__}.{f.name}"


def test_a_spec_field_the_schema_does_not_declare_is_refused():
    with pytest.raises(TypeError, match="not a key"):
        @dataclass
        @defaults_from(Obj({"a": Field(int, default=1)}))
        class Drifted:
            a: int
            b: int
