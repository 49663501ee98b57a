"""megatron/compat.py: the tested megatron-core series import, a ported one only when opted in, anything else fails
at import with the admitted versions and a pip command that has a wheel for this Python; setup.py admits exactly the
tested series (issue 18)."""

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from fp8flow_megatron.megatron import compat

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("version, outcome", [
    ("0.16.1", "ok"), ("0.16.2", "ok"), ("0.19.2", "ok"), ("0.19.3", "ok"), ("0.19.2+02dc2e1", "ok"),
    ("0.16.0", "refused"), ("0.17.0", "refused"), ("0.18.1", "refused"), ("0.19.1", "refused"), ("0.20.0", "refused"),
    ("0.15.3", "refused"),
])
@pytest.mark.parametrize("opt_in", [False, True], ids=["default", "opted-in"])
def test_the_version_gate(monkeypatch, version, outcome, opt_in):
    monkeypatch.setattr(compat, "mcore_version", lambda: Version(version))
    monkeypatch.setenv(compat.ALLOW_PORTED_ENV, "1" if opt_in else "0")
    if outcome == "ok":
        assert compat.check_mcore_version() == Version(version)
    else:  # the opt-in admits only a ported series, and none is ported now
        with pytest.raises(ImportError, match=r">=0\.16\.1,<0\.17, >=0\.19\.2,<0\.20 \(tested\); found "
                           + re.escape(version) + r".*pip install 'megatron-core==0\.1[69]\.[12]'"):
            compat.check_mcore_version()


@pytest.mark.parametrize("version", ["0.20.0", "0.20.4"])
@pytest.mark.parametrize("opt_in", [False, True], ids=["default", "opted-in"])
def test_a_ported_series_imports_only_when_opted_in(monkeypatch, version, opt_in):
    monkeypatch.setattr(compat, "PORTED_MCORE", ("0.20.0",))
    monkeypatch.setattr(compat, "mcore_version", lambda: Version(version))
    monkeypatch.setenv(compat.ALLOW_PORTED_ENV, "1" if opt_in else "0")
    if opt_in:
        assert compat.check_mcore_version() == Version(version)
    else:
        with pytest.raises(ImportError, match=re.escape(version) + r" is ported .*not GPU-verified.*"
                           r"export FP8FLOW_ALLOW_PORTED_MCORE=1"):
            compat.check_mcore_version()


@pytest.mark.parametrize("python, pin", [((3, 11), "0.16.1"), ((3, 12), "0.19.2"), ((3, 13), "0.19.2")])
def test_the_suggested_pin_has_a_wheel_for_this_python(python, pin):
    assert compat.suggested_pin(python) == f"pip install 'megatron-core=={pin}'"


def test_install_requirement_spells_the_series():
    assert compat.install_requirement(("0.16.1",)) == "megatron-core>=0.16.1,<0.17"
    assert (compat.install_requirement(("0.16.1", "0.19.2"))
            == "megatron-core>=0.16.1,!=0.17.*,!=0.18.*,!=0.19.0,!=0.19.1,<0.20")
    assert compat.install_requirement(("0.19.0",)) == "megatron-core>=0.19.0,<0.20"


@pytest.mark.parametrize("version", ["0.16.1", "0.16.4", "0.19.2", "0.19.9", "0.17.0", "0.18.3", "0.19.1", "0.20.0"])
def test_promoted_requirement_admits_what_the_gate_would(version):
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(compat.install_requirement(("0.16.1", "0.19.2")).removeprefix("megatron-core"))
    assert (Version(version) in spec) == compat._in_series(Version(version), ("0.16.1", "0.19.2"))


def test_setup_py_admits_exactly_the_tested_series():
    assert f'"{compat.install_requirement(compat.TESTED_MCORE)}"' in (ROOT / "setup.py").read_text()


def test_spec_helpers_read_both_styles():
    from megatron.core.transformer.spec_utils import ModuleSpec

    class A:
        pass

    class B:
        pass

    subs, new_subs = object(), object()
    ms = ModuleSpec(module=A, params={"p": 1}, submodules=subs, metainfo={"m": 2})
    part = functools.partial(A, submodules=subs, p=1)
    assert compat.spec_module(ms) is A and compat.spec_module(part) is A and compat.spec_module(A) is A
    assert compat.spec_submodules(ms) is subs and compat.spec_submodules(part) is subs
    ms2, part2 = compat.spec_with(ms, B, new_subs), compat.spec_with(part, B, new_subs)
    assert isinstance(ms2, ModuleSpec) and ms2.module is B and ms2.submodules is new_subs
    assert ms2.params == {"p": 1} and ms2.metainfo == {"m": 2}
    assert isinstance(part2, functools.partial) and part2.func is B
    assert part2.keywords == {"submodules": new_subs, "p": 1}


def _import_under(version: str, opt_in: str):
    code = (f"import megatron.core; megatron.core.__version__ = '{version}'\n"
            "import fp8flow_megatron.megatron\n")
    env = dict(__import__("os").environ, FP8FLOW_ALLOW_PORTED_MCORE=opt_in)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_importing_the_plugin_under_an_unsupported_megatron_core_fails_with_the_fix():
    proc = _import_under("0.18.0", "1")
    assert proc.returncode != 0
    assert "ImportError: fp8flow_megatron supports megatron-core >=0.16.1,<0.17, >=0.19.2,<0.20 (tested)" in proc.stderr
    assert "pip install 'megatron-core==0.16.1'" in proc.stderr


def test_importing_the_plugin_under_megatron_core_0_19_needs_no_opt_in():
    proc = _import_under("0.19.2", "")
    assert proc.returncode == 0, proc.stderr[-2000:]
