"""Train / valid / test GPT datasets through megatron.core.datasets, from ``--data-path``, per-split paths
(``--train-data-path`` / ``--valid-data-path`` / ``--test-data-path``) or the embedded corpus.

    splits = build_datasets(seq_length=128, num_samples=(600, 64, 16))              # embedded Austen text
    splits = build_datasets(seq_length=4096, num_samples=sizes, data_path=["/data/web_text_document"],
                            split="969,30,1", tokenizer=build_tokenizer("NullTokenizer", vocab_size=102399))
    splits = build_datasets(seq_length=2048, num_samples=sizes, train_data_path=["data/open-corpus/open_corpus_train"],
                            valid_data_path=["data/open-corpus/open_corpus_valid"])  # held-out documents; no test

Each split is a megatron-core ``GPTDataset`` (one prefix) or ``BlendedDataset`` (weighted prefixes) whose items are
dicts of ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (each ``[seq_length]``) and, when
``create_attention_mask``, ``attention_mask`` (``[1, seq_length, seq_length]`` bool, True = masked out).
"""

import logging
import os
from typing import Any, Callable, NamedTuple, Sequence

import numpy
import torch

from .dataset_helpers import ensure_dataset_helpers
from .embedded import default_cache_dir, embedded_dataset_prefix
from .tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)


class TrainValidTestDatasets(NamedTuple):
    """One dataset per split; a split whose ``split`` weight is 0, or that has no per-split path, is None."""

    train: Any
    valid: Any
    test: Any


def train_valid_test_num_samples(
    *, train_iters: int, global_batch_size: int, eval_interval: int, eval_iters: int
) -> tuple[int, int, int]:
    """Samples each split must provide, as Megatron-LM computes them for ``pretrain``.

    train: ``train_iters * global_batch_size``; valid: ``(train_iters // eval_interval + 1) * eval_iters *
    global_batch_size`` (every evaluation plus the final one); test: ``eval_iters * global_batch_size``.
    """
    evaluations = train_iters // eval_interval + 1
    return (
        train_iters * global_batch_size,
        evaluations * eval_iters * global_batch_size,
        eval_iters * global_batch_size,
    )


def build_datasets(
    *,
    seq_length: int,
    num_samples: Sequence[int | None],
    data_path: Sequence[str] | str | None = None,
    split: str = "969,30,1",
    train_data_path: Sequence[str] | str | None = None,
    valid_data_path: Sequence[str] | str | None = None,
    test_data_path: Sequence[str] | str | None = None,
    tokenizer=None,
    seed: int = 1234,
    data_cache_path: str | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = True,
    mmap_bin_files: bool = True,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> TrainValidTestDatasets:
    """Build the three splits with ``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig``.

    Must be called on every rank when torch.distributed is initialized (the builder builds the index cache on
    rank 0, then barriers); works without torch.distributed too.

    Args:
        seq_length: tokens per sample (Megatron's ``--seq-length``).
        num_samples: ``(train, valid, test)`` sample counts; datasets repeat epochs to reach them. None = one
            epoch. See :func:`train_valid_test_num_samples`.
        data_path: Megatron's ``--data-path``: ``[prefix]``, ``[weight1, prefix1, weight2, prefix2, ...]``, or the
            same as one whitespace-separated string. Prefixes name ``PREFIX.bin`` / ``PREFIX.idx``. None = the
            embedded corpus (byte-tokenized on first use into ``data_cache_path``).
        split: Megatron's ``--split``: relative train/valid/test weights, split by document in file order. Ignored
            when per-split paths are given.
        train_data_path, valid_data_path, test_data_path: Megatron's ``--train-data-path`` etc.: each split from its
            own prefixes (same forms as ``data_path``), whole datasets, no ``split``; a split without one is None.
            Exclusive with ``data_path``.
        tokenizer: the tokenizer the data was made with (``eod``, ``vocab_size``, ``unique_identifiers``);
            None = :class:`ByteTokenizer`. With the embedded corpus the datasets always use ByteTokenizer (its ids
            are 0..256) and ``tokenizer`` only has to have ``vocab_size >= 257``, so a model with a real vocabulary
            (e.g. NullTokenizer with 102400 ids) can train on it too.
        seed: shuffling seed (Megatron's ``--seed``).
        data_cache_path: where index caches go (Megatron's ``--data-cache-path``). None = beside each ``--data-path``
            prefix (megatron-core's default), or :func:`default_cache_dir` for the embedded corpus. Multi-node runs
            need it on a filesystem that every node sees (rank 0 writes the cache that the other ranks read).
        reset_position_ids, reset_attention_mask, eod_mask_loss, create_attention_mask, mmap_bin_files: the
            ``GPTDatasetConfig`` fields of the same names (Megatron flags ``--reset-position-ids``, ...;
            ``create_attention_mask`` is the inverse of ``--no-create-attention-mask-in-dataloader``).
        is_built_on_rank: megatron-core's hook choosing which ranks build datasets (others get None); None = all.

    Returns:
        :class:`TrainValidTestDatasets` ``(train, valid, test)``.

    Raises:
        FileNotFoundError: a prefix's ``.bin`` or ``.idx`` does not exist.
        ValueError: ``data_path`` together with a per-split path; a split with a nonzero ``split`` weight (or a
            per-split prefix) gets no tokens (too few documents for its share),
            ``num_samples`` is not three entries, the tokenizer is too small for the embedded corpus, or a blend
            (several prefixes, or weights) with ``data_cache_path`` is built without torch.distributed (a
            megatron-core 0.16.1 limitation).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples!r}")
    cache_root = default_cache_dir() if data_cache_path is None else data_cache_path
    ensure_dataset_helpers(os.path.join(cache_root, "build"))

    per_split_paths = [_as_list(p) for p in (train_data_path, valid_data_path, test_data_path)]
    data_path = _as_list(data_path)
    blend_per_split = None
    if any(per_split_paths):
        if data_path:
            raise ValueError(
                "--data-path cannot be combined with --train-data-path / --valid-data-path / --test-data-path "
                "(Megatron-LM's rule): give either one --data-path split by --split, or a path per split"
            )
        blend_per_split = [get_blend_from_list(p) if p else None for p in per_split_paths]
        for name, blend in zip(("--train-data-path", "--valid-data-path", "--test-data-path"), blend_per_split):
            if blend is not None:
                _check_prefixes_exist(name, blend[0])
        shared = set(blend_per_split[0][0] if blend_per_split[0] else ()) & {
            p for b in blend_per_split[1:] if b is not None for p in b[0]}
        if shared:
            logger.warning("the training split shares prefixes %s with valid/test: evaluation sees training data",
                           sorted(shared))
        tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
        path_to_cache = data_cache_path
        # A split of several prefixes builds a BlendedDataset (a single prefix, even weighted, does not).
        is_blended = any(b is not None and len(b[0]) > 1 for b in blend_per_split)
        if is_blended and path_to_cache is not None and not torch.distributed.is_initialized():
            raise ValueError(
                "a per-split path with several prefixes and data_cache_path needs torch.distributed initialized "
                "(megatron-core 0.16.1's BlendedDataset asks for the rank); initialize a process group (gloo works, "
                "world size 1 too) or leave data_cache_path unset"
            )
        blend, split = None, None  # megatron-core: blend_per_split excludes blend and split
    elif not data_path:
        if tokenizer is not None and tokenizer.vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(
                f"the embedded corpus is byte-tokenized (ids 0..{ByteTokenizer.eod}) but the tokenizer has only "
                f"vocab_size={tokenizer.vocab_size}; use a vocabulary of at least {ByteTokenizer.vocab_size} ids"
            )
        prefix = embedded_dataset_prefix(cache_root)
        blend = ([prefix], None)
        tokenizer = ByteTokenizer()
        path_to_cache = os.path.join(os.path.dirname(prefix), "indices") if data_cache_path is None else data_cache_path
        logger.info("no data_path: training on the embedded corpus %s (ByteTokenizer)", prefix)
    else:
        blend = get_blend_from_list(data_path)
        _check_prefixes_exist("--data-path", blend[0])
        tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
        path_to_cache = data_cache_path
        is_blended = len(blend[0]) > 1 or blend[1] is not None  # builds a BlendedDataset over the GPTDatasets
        if is_blended and path_to_cache is not None and not torch.distributed.is_initialized():
            # megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() whenever it writes its cache.
            raise ValueError(
                "a weighted --data-path blend with data_cache_path needs torch.distributed initialized "
                "(megatron-core 0.16.1's BlendedDataset asks for the rank); initialize a process group (gloo works, "
                "world size 1 too) or leave data_cache_path unset"
            )

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=path_to_cache,
        mmap_bin_files=mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    if blend_per_split is None:
        _check_splits_have_tokens(blend[0], config.split_matrix, split)
    else:
        for i, b in enumerate(blend_per_split):
            if b is not None:  # each per-split prefix is used whole: bookends (0, 1) for its split only
                matrix = [(0.0, 1.0) if j == i else None for j in range(3)]
                _check_splits_have_tokens(b[0], matrix, "the per-split paths")
    datasets = BlendedMegatronDatasetBuilder(
        GPTDataset, list(num_samples), is_built_on_rank or (lambda: True), config
    ).build()
    return TrainValidTestDatasets(*datasets)


def _as_list(paths: Sequence[str] | str | None) -> list[str]:
    """A path flag's value as Megatron's list form: None -> [], a whitespace-separated string -> its words."""
    if paths is None:
        return []
    return [str(p) for p in (paths.split() if isinstance(paths, str) else paths)]


def _check_prefixes_exist(flag: str, prefixes: Sequence[str]) -> None:
    # megatron-core fails on a missing prefix deep inside its IndexedDataset with a bare file name; say what to fix.
    for prefix in prefixes:
        missing = [prefix + suffix for suffix in (".bin", ".idx") if not os.path.isfile(prefix + suffix)]
        if not missing:
            continue
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = f"; give the prefix without the suffix ({prefix[:-4]})"
        raise FileNotFoundError(
            f"{flag} {prefix}: {' and '.join(missing)} not found{hint}. A prefix names PREFIX.bin + PREFIX.idx; "
            "build them with python -m fp8flow_megatron.data.preprocess (your text) or "
            "python -m fp8flow_megatron.data.open_corpus (the open corpus)"
        )


def _check_splits_have_tokens(prefixes, split_matrix, split) -> None:
    # megatron-core 0.16.1 loops forever (GPTDataset._get_num_epochs) when a split has no tokens and is asked for a
    # sample count (even 0), e.g. a tiny corpus whose test share of "969,30,1" rounds to zero documents. Fail with
    # the numbers instead.
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    for prefix in prefixes:
        # Copy: the array views the index's mmap, which the IndexedDataset unmaps when it is collected.
        indexed = IndexedDataset(prefix)
        sequence_lengths = numpy.array(indexed.sequence_lengths)
        del indexed
        num_documents = sequence_lengths.shape[0]
        for s in Split:
            bookends = split_matrix[s.value]
            if bookends is None:
                continue
            # The same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
            beg = int(round(bookends[0] * float(num_documents)))
            end = int(round(bookends[1] * float(num_documents)))
            num_tokens = int(numpy.sum(sequence_lengths[beg:end], dtype=numpy.int64))
            if num_tokens == 0:
                raise ValueError(
                    f"split={split!r} gives the {s.name} split of {prefix} documents [{beg}, {end}) of "
                    f"{num_documents}, which hold no tokens; give {s.name} a larger share, or a weight of 0 to "
                    "drop it"
                )
