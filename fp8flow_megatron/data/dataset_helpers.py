"""Make megatron-core's C++ dataset helpers importable (``megatron.core.datasets.helpers_cpp``).

GPTDataset builds its sample index with ``helpers_cpp``, a pybind11 extension. The megatron-core wheels on the package
registry ship it prebuilt (0.16.1: cp311 and cp312 manylinux x86_64), so on a normal install this module only checks
the import. It is missing when megatron-core comes from a source tree on ``PYTHONPATH`` or from an sdist built
without pybind11 (setup.py marks the extension optional, so that build succeeds silently); upstream's
``compile_helpers()`` runs ``make`` in the package directory, and the wheel ships no Makefile. In that case
:func:`ensure_dataset_helpers` compiles the ``helpers.cpp`` that megatron-core ships, with pybind11 and the system
C++ compiler, into a cache directory, and registers the result under the upstream module name.
"""

import hashlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid

_MODULE = "megatron.core.datasets.helpers_cpp"


def ensure_dataset_helpers(build_dir: str) -> str:
    """Import ``helpers_cpp``, compiling it into ``build_dir`` first if megatron-core lacks it; returns its path.

    Raises ``RuntimeError`` naming what is missing (pybind11, a C++ compiler) when it can be neither imported nor
    built.
    """
    try:
        return importlib.import_module(_MODULE).__file__
    except ImportError:
        pass
    module = load_compiled_helpers(compile_helpers(build_dir))
    import megatron.core.datasets as datasets_pkg

    sys.modules[_MODULE] = module
    datasets_pkg.helpers_cpp = module
    return module.__file__


def compile_helpers(build_dir: str, *, optimize: str = "-O3") -> str:
    """Compile megatron-core's ``helpers.cpp`` into ``build_dir`` (reused while source and interpreter match).

    Returns the path of the shared library. ``optimize`` is the compiler's optimization flag (upstream uses -O3).
    """
    import megatron.core.datasets as datasets_pkg

    source = os.path.join(os.path.dirname(datasets_pkg.__file__), "helpers.cpp")
    if not os.path.isfile(source):
        raise RuntimeError(f"megatron-core ships no {source}; reinstall megatron-core from its wheel")
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX")
    with open(source, "rb") as f:
        key = hashlib.sha256(f.read() + ext_suffix.encode() + optimize.encode()).hexdigest()[:16]
    target = os.path.join(build_dir, f"helpers-{key}", "helpers_cpp" + ext_suffix)
    if os.path.isfile(target):
        return target

    try:
        import pybind11
    except ImportError as err:
        raise RuntimeError(
            f"{_MODULE} is not built and pybind11 is missing to build it: pip install pybind11"
        ) from err
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError(f"{_MODULE} is not built and no C++ compiler was found: install g++ (or set CXX)")

    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    command = [
        compiler, optimize, "-Wall", "-shared", "-std=c++17", "-fPIC",
        f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
        source, "-o", tmp,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {source} failed ({' '.join(command)}):\n{result.stderr[-4000:]}")
    os.replace(tmp, target)  # atomic: ranks compiling at once all end with one complete file
    return target


def load_compiled_helpers(path: str, name: str = _MODULE):
    """Load a library built by :func:`compile_helpers` as module ``name`` (not registered in ``sys.modules``).

    CPython keeps one single-phase extension module per name: while megatron-core's own ``helpers_cpp`` is loaded,
    loading another under the same name returns that one, so load a second copy under another name (the last
    component must stay ``helpers_cpp``, the name of its init function).
    """
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
