"""Training data for fp8flow_megatron: a download-free tokenizer, text -> Megatron indexed dataset, and the
train/valid/test GPT datasets (from ``--data-path`` or the embedded real-text corpus) through megatron.core.datasets.

Names are loaded on first access (PEP 562) so that ``python -m fp8flow_megatron.data.preprocess`` does not import its
own module twice (runpy warns when the package ``__init__`` has already imported the module it is asked to run).
"""

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "TrainValidTestDatasets": "datasets",
    "build_datasets": "datasets",
    "train_valid_test_num_samples": "datasets",
    "default_cache_dir": "embedded",
    "embedded_corpus_paths": "embedded",
    "embedded_dataset_prefix": "embedded",
    "IndexedDatasetStats": "preprocess",
    "preprocess_files": "preprocess",
    "read_documents": "preprocess",
    "split_paragraphs": "preprocess",
    "write_indexed_dataset": "preprocess",
    "TOKENIZER_TYPES": "tokenizer",
    "ByteTokenizer": "tokenizer",
    "build_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .datasets import TrainValidTestDatasets, build_datasets, train_valid_test_num_samples
    from .embedded import default_cache_dir, embedded_corpus_paths, embedded_dataset_prefix
    from .preprocess import (
        IndexedDatasetStats,
        preprocess_files,
        read_documents,
        split_paragraphs,
        write_indexed_dataset,
    )
    from .tokenizer import TOKENIZER_TYPES, ByteTokenizer, build_tokenizer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
