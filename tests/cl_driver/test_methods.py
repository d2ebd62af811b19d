"""The method registry: every kind a config may name makes a method, and the chains and stores the
methods read are what the loop trains and fuses."""

import pytest

from cl_driver.config import METHOD_KINDS, MethodConfig
from cl_driver.methods import METHODS, make_methods
from cl_driver.training import CHAINS, chains_needed


def test_every_method_kind_of_the_config_has_a_method_reading_known_chains():
    assert set(METHODS) == set(METHOD_KINDS)
    for kind in METHOD_KINDS:
        method = METHODS[kind](MethodConfig.model_validate(kind))
        assert method.config.kind == kind and set(method.chains) <= set(CHAINS)
        assert (method.store is not None) == (kind == "condu")


def test_the_run_trains_the_chains_its_methods_read_in_one_order(tiny_config):
    methods = make_methods(tiny_config.methods)
    assert [m.config.name for m in methods] == [m.name for m in tiny_config.methods]
    assert chains_needed(m.chains for m in methods) == ["individual", "sequential"]
    assert sorted({m.store for m in methods if m.store}) == ["model", "tensor"]
    only = make_methods(tuple(MethodConfig.model_validate(k) for k in ("magmax", "zero_shot")))
    assert chains_needed(m.chains for m in only) == ["sequential"]
    assert chains_needed(m.chains for m in make_methods((MethodConfig.model_validate("zero_shot"),))) == []
    with pytest.raises(ValueError, match=r"chains \['lwf'\] are not in training.CHAINS"):
        chains_needed([("individual",), ("lwf",)])
