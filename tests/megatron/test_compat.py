"""megatron/compat.py: only the tested megatron-core series is admitted, at install and at import (issue 18)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fp8flow_megatron.megatron import compat

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("version, ok", [("0.16.1", True), ("0.16.0", False), ("0.17.0", False), ("0.19.2", False),
                                         ("0.15.3", False)])
def test_the_version_gate(monkeypatch, version, ok):
    from packaging.version import Version

    monkeypatch.setattr(compat, "mcore_version", lambda: Version(version))
    if ok:
        assert compat.check_mcore_version() == Version(version)
    else:
        with pytest.raises(ImportError, match=r">=0\.16\.1,<0\.17 .*found " + re.escape(version) +
                           r".*pip install 'megatron-core==0\.16\.1'"):
            compat.check_mcore_version()


def test_setup_py_admits_exactly_the_supported_range():
    lo, hi = compat.SUPPORTED_RANGE
    assert f'"megatron-core>={lo},<{hi}"' in (ROOT / "setup.py").read_text()


def test_importing_the_plugin_under_an_unsupported_megatron_core_fails_with_the_fix():
    code = ("import megatron.core; megatron.core.__version__ = '0.19.2'\n"
            "import fp8flow_megatron.megatron\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ImportError: fp8flow_megatron supports megatron-core >=0.16.1,<0.17" in proc.stderr
    assert "pip install 'megatron-core==0.16.1'" in proc.stderr
