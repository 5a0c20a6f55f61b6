"""The public surface: every exported name resolves, and functions stay functions."""

import importlib

import normlab as nl
from normlab import probes


def test_every_exported_name_resolves():
    for name in nl.__all__:
        assert getattr(nl, name) is not None, name
    for name in probes.__all__:
        assert callable(getattr(probes, name)), name


def test_functions_named_like_their_module_stay_functions():
    importlib.import_module("normlab.train")
    importlib.import_module("normlab.probes.step_loss")
    importlib.import_module("normlab.probes.landscape")
    assert callable(nl.train) and nl.train.__module__ == "normlab.train.loop"
    assert probes.step_loss.__name__ == "step_loss" and callable(probes.step_loss)
    assert callable(probes.landscape) and callable(probes.mean_gradient)
