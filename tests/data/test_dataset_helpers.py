"""The fallback that compiles megatron-core's C++ dataset helpers when an install lacks them."""

import importlib
import os
import shutil
import subprocess
import sys

import numpy
import pytest

from fp8flow_megatron.data import dataset_helpers

MODULE = "megatron.core.datasets.helpers_cpp"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_compiler = pytest.mark.skipif(
    not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler"
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    # -O0: this checks the build and its results, not speed (-O3 takes twice as long to compile).
    return dataset_helpers.compile_helpers(str(tmp_path_factory.mktemp("helpers")), optimize="-O0")


def sample_index(helpers):
    sizes = numpy.array([5, 9, 2, 30, 7, 11], dtype=numpy.int32)
    documents = numpy.array([3, 0, 5, 1, 4, 2] + [2, 5, 0, 4, 1, 3], dtype=numpy.int32)  # two shuffled epochs
    return helpers.build_sample_idx_int32(sizes, documents, 8, 2, int(sizes.sum()), True, 1)


@needs_compiler
@pytest.mark.slow
def test_compiled_helpers_match_the_shipped_ones(compiled):
    shipped = importlib.import_module(MODULE)
    built = dataset_helpers.load_compiled_helpers(compiled, name="fp8flow_test_build.helpers_cpp")
    assert built.__file__ == compiled != shipped.__file__
    numpy.testing.assert_array_equal(sample_index(built), sample_index(shipped))
    build_dir = os.path.dirname(os.path.dirname(compiled))
    assert dataset_helpers.compile_helpers(build_dir, optimize="-O0") == compiled  # reused, not rebuilt


@needs_compiler
@pytest.mark.slow
def test_missing_helpers_are_built_and_used_by_the_datasets(compiled, tmp_path):
    # A fresh interpreter whose megatron-core "lacks" helpers_cpp (None in sys.modules makes its import fail).
    script = f"""
import sys
sys.modules[{MODULE!r}] = None
from fp8flow_megatron.data import dataset_helpers, build_datasets
dataset_helpers.compile_helpers = lambda build_dir: {compiled!r}  # the -O0 build above, instead of a 15 s -O3 one
train = build_datasets(seq_length=32, num_samples=(8, 2, 2), data_cache_path={str(tmp_path)!r}).train
print(sys.modules[{MODULE!r}].__file__)
print(int(train[3]["tokens"].sum()))
"""
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    helpers_file, token_sum = result.stdout.split()[-2:]
    assert helpers_file == compiled

    from fp8flow_megatron.data import build_datasets

    train = build_datasets(seq_length=32, num_samples=(8, 2, 2), data_cache_path=str(tmp_path / "shipped")).train
    assert int(token_sum) == int(train[3]["tokens"].sum())


def test_present_helpers_are_only_imported(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_helpers, "compile_helpers", lambda build_dir: pytest.fail("compiled needlessly"))
    assert dataset_helpers.ensure_dataset_helpers(str(tmp_path / "build")) == importlib.import_module(MODULE).__file__
    assert not (tmp_path / "build").exists()
