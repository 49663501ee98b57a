import importlib

import fp8flow_megatron.data as data


def test_every_public_name_resolves_and_none_is_shadowed_by_a_submodule():
    for name in data.__all__:
        value = getattr(data, name)
        assert not isinstance(value, type(importlib)), f"{name} resolves to a module, not the API object"
    # Importing every submodule binds its name on the package; no public name may be one of them.
    for module in ("datasets", "embedded", "preprocess", "tokenizer", "dataset_helpers"):
        importlib.import_module(f"fp8flow_megatron.data.{module}")
        assert module not in data.__all__
    assert callable(data.preprocess_files) and callable(data.build_datasets)
