import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: multi-process or long-running CPU test")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def megatron_ep1():
    """megatron's parallel state for this one process (world 1, EP=1), set up once per test module."""
    from tests.megatron.mcore_env import free_port, init_megatron, teardown

    init_megatron(0, 1, free_port(), ep=1)
    yield
    teardown()


@pytest.fixture(scope="module")
def megatron_gpu(megatron_ep1):
    """The same, for GPU test modules (the layers there are moved to CUDA by the tests)."""
    yield


@pytest.fixture
def clean_guard():
    """The process's non-finite guard with no flag raised, before and after the test."""
    from fp8flow_megatron.ops.nonfinite import guard

    guard.reset()
    yield guard
    guard.reset()
