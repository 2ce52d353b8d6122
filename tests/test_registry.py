"""The method registry is the one place a method is named, configured and found."""

import pydantic
import pytest

from pipeline.params import ParamsError, parse_params

from distillery.methods.base import DistillationMethod
from distillery.methods.cd import ConsistencyDistillation
from distillery.methods.diff_instruct import DiffInstruct
from distillery.methods.dmd2 import DMD2
from distillery.methods.gdd import GDD, GDDI
from distillery.methods.pd import ProgressiveDistillation
from distillery.methods.sid import SiD
from distillery.methods.sim import SIM
from distillery.registry import METHODS

CLASSES = {
    "sid": SiD,
    "sim": SIM,
    "diff_instruct": DiffInstruct,
    "gdd": GDD,
    "gdd_i": GDDI,
    "dmd2": DMD2,
    "cd": ConsistencyDistillation,
    "pd": ProgressiveDistillation,
}


def test_every_method_is_registered_with_its_class():
    assert {name: m.load() for name, m in METHODS.items()} == CLASSES


@pytest.mark.parametrize("name", list(METHODS))
def test_params_build_the_registered_method_with_their_settings(name):
    # a non-default value of every scalar setting the method keeps reaches the method object
    m = METHODS[name]
    defaults = m.settings()
    changed = {
        k: v * 0.5
        for k, v in defaults.model_dump().items()
        if isinstance(v, float) and hasattr(m.build(), k) and k != "augment_p"
    }
    assert changed, "every method keeps at least one numeric setting"
    params = parse_params({"study": {"methods": [name]}, name: changed})
    method = params.method(name)
    assert type(method) is CLASSES[name] and isinstance(method, DistillationMethod)
    assert {k: getattr(method, k) for k in changed} == changed
    # and the defaults are the settings' own: the class adds none of its own
    assert {k: getattr(m.build(), k) for k in changed} == {k: getattr(defaults, k) for k in changed}


def test_the_schema_has_one_section_per_registered_method_and_refuses_others():
    params = parse_params({})
    assert all(isinstance(getattr(params, name), m.settings) for name, m in METHODS.items())
    with pytest.raises(ParamsError, match="study.methods"):
        parse_params({"study": {"methods": ["dmd"]}})


def test_a_misspelt_setting_is_refused_naming_it():
    with pytest.raises(pydantic.ValidationError, match="alhpa"):
        SiD(alhpa=1.0)
    with pytest.raises(ParamsError, match="sid.alhpa"):
        parse_params({"sid": {"alhpa": 1.0}})
