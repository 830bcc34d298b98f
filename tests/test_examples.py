"""The docstring examples of every layer and model run and print what they show."""

import doctest
import importlib
import pkgutil

import pytest

import fmkeras.layers
import fmkeras.models

MODULES = [f"{package.__name__}.{info.name}" for package in (fmkeras.layers, fmkeras.models)
           for info in pkgutil.iter_modules(package.__path__)]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), report=True)
    assert result.failed == 0, f"{result.failed} of {name}'s examples print something else"


def test_the_main_layers_and_models_have_examples():
    finder = doctest.DocTestFinder()
    examples = {name for name in MODULES
                if any(test.examples for test in finder.find(importlib.import_module(name)))}
    expected = {"encoder", "classifier", "tagger", "masked_lm", "causal_lm", "translator",
                "distiller", "multi_head_attention", "transformer_encoder_block",
                "transformer_decoder_block", "text_embedding", "masked_lm_head"}  # fmt: skip
    assert expected <= {name.rsplit(".", 1)[-1] for name in examples}
