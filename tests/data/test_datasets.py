import hashlib
import os
import re
import signal

import numpy
import pytest
import torch

from fp8flow_megatron.data import (
    ByteTokenizer,
    build_datasets,
    build_tokenizer,
    embedded_corpus_paths,
    embedded_dataset_prefix,
    preprocess_files,
    train_valid_test_num_samples,
)

SEQ = 64
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="module")
def corpus():
    return {os.path.basename(p): open(p, encoding="utf-8").read() for p in embedded_corpus_paths()}


def pieces(tokens):
    """The texts between end-of-document ids of one sample."""
    ids = numpy.asarray(tokens)
    cuts = numpy.flatnonzero(ids == TOK.eod)
    return [TOK.detokenize(part) for part in numpy.split(ids, cuts) if part.size]


def test_embedded_corpus_is_what_attribution_describes():
    attribution = open(os.path.join(os.path.dirname(embedded_corpus_paths()[0]), "ATTRIBUTION.md")).read()
    assert "public domain" in attribution and "MIT" in attribution
    total = 0
    for path in embedded_corpus_paths():
        data = open(path, "rb").read()
        total += len(data)
        row = re.search(rf"`{os.path.basename(path)}` \| ([\d,]+) \| `([0-9a-f]{{64}})`", attribution)
        assert row, f"{path} has no row in ATTRIBUTION.md"
        assert int(row[1].replace(",", "")) == len(data) and row[2] == hashlib.sha256(data).hexdigest(), path
        data.decode("utf-8")
    assert 500_000 <= total <= 2_000_000


def test_embedded_dataset_is_built_once_and_cached(cache_dir):
    prefix = embedded_dataset_prefix(cache_dir)
    stamp = os.stat(prefix + ".bin").st_mtime_ns, os.stat(prefix + ".idx").st_mtime_ns
    assert embedded_dataset_prefix(cache_dir) == prefix
    assert (os.stat(prefix + ".bin").st_mtime_ns, os.stat(prefix + ".idx").st_mtime_ns) == stamp

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    assert len(dataset) == 3161  # paragraphs of the two novels
    assert TOK.detokenize(dataset[0]) == "PRIDE AND PREJUDICE"
    assert TOK.detokenize(dataset[len(dataset) - 1]) == "Finis"


def test_build_datasets_from_embedded_text(cache_dir, corpus):
    sizes = train_valid_test_num_samples(train_iters=20, global_batch_size=4, eval_interval=10, eval_iters=2)
    assert sizes == (80, 24, 8)
    train, valid, test = build_datasets(seq_length=SEQ, num_samples=sizes, data_cache_path=cache_dir)
    assert len(train) >= 80 and len(valid) >= 24 and len(test) >= 8

    everything = "\n".join(corpus.values())
    for name, dataset in (("train", train), ("valid", valid), ("test", test)):
        for i in (0, len(dataset) // 2, len(dataset) - 1):
            sample = dataset[i]
            assert {k: tuple(v.shape) for k, v in sample.items()} == {
                "tokens": (SEQ,), "labels": (SEQ,), "loss_mask": (SEQ,), "position_ids": (SEQ,),
                "attention_mask": (1, SEQ, SEQ),
            }, (name, i)
            tokens, labels = sample["tokens"], sample["labels"]
            assert tokens.dtype == torch.int64 and int(tokens.max()) <= TOK.eod
            assert torch.equal(labels[:-1], tokens[1:]), "labels are the tokens shifted by one"
            assert torch.equal(sample["position_ids"], torch.arange(SEQ))
            assert bool(sample["loss_mask"].eq(1).all())
            assert torch.equal(sample["attention_mask"][0], torch.ones(SEQ, SEQ).triu(1).bool())  # True = masked
            for piece in pieces(torch.cat([tokens, labels[-1:]])):
                assert piece in everything, f"{name}[{i}] is not corpus text: {piece!r}"

    # Splits follow document order: validation and test are the last paragraphs of Persuasion.
    persuasion, pride = corpus["austen_persuasion.txt"], corpus["austen_pride_and_prejudice.txt"]
    for dataset in (valid, test):
        text = max(pieces(dataset[0]["tokens"]), key=len)
        assert text in persuasion and text not in pride


def test_build_datasets_is_deterministic_per_seed(cache_dir):
    def first_tokens(seed):
        train = build_datasets(seq_length=SEQ, num_samples=(16, 4, 4), seed=seed, data_cache_path=cache_dir).train
        return torch.stack([train[i]["tokens"] for i in range(8)])

    assert torch.equal(first_tokens(7), first_tokens(7))
    assert not torch.equal(first_tokens(7), first_tokens(8))


def make_prefixes(directory):
    """Two small indexed datasets: paragraphs "alpha paragraph i." and "beta paragraph i."."""
    prefixes = []
    for name in ("alpha", "beta"):
        (directory / f"{name}.txt").write_text("\n\n".join(f"{name} paragraph {i}." for i in range(200)))
        prefixes.append(preprocess_files(str(directory / f"{name}.txt"), str(directory / name)).output_prefix)
    return prefixes


def beta_share(dataset, num_samples):
    text = "".join(TOK.detokenize(dataset[i]["tokens"]) for i in range(num_samples))
    return text.count("beta") / (text.count("beta") + text.count("alpha"))


def test_build_datasets_from_data_path_blend(tmp_path):
    prefix_a, prefix_b = make_prefixes(tmp_path)
    single = build_datasets(seq_length=32, num_samples=(10, 2, 2), data_path=[prefix_a], split="90,5,5",
                            data_cache_path=str(tmp_path / "cache"))
    text = "".join(TOK.detokenize(single.train[i]["tokens"]) for i in range(10))
    assert "alpha paragraph" in text and "beta" not in text

    # Megatron's weighted form, as one string; without data_cache_path the GPTDataset indices go beside the data.
    blended = build_datasets(seq_length=32, num_samples=(400, 20, 20), data_path=f"0.25 {prefix_a} 0.75 {prefix_b}",
                             split="90,5,5")
    assert type(blended.train).__name__ == "BlendedDataset" and len(blended.train) == 400
    assert 0.6 < beta_share(blended.train, 400) < 0.9
    assert os.path.isdir(os.path.join(prefix_a, "cache", "GPTDataset_indices"))

    for data_path in (["1", prefix_a, "3", prefix_b], ["1", prefix_a]):
        with pytest.raises(ValueError, match="needs torch.distributed initialized"):
            build_datasets(seq_length=32, num_samples=(400, 20, 20), data_path=data_path, split="90,5,5",
                           data_cache_path=str(tmp_path / "cache"))


def test_zero_weight_split_is_none(tmp_path):
    (tmp_path / "t.txt").write_text("\n\n".join(f"paragraph {i}" for i in range(50)))
    preprocess_files(str(tmp_path / "t.txt"), str(tmp_path / "t"))
    splits = build_datasets(seq_length=8, num_samples=(10, 2, 2), data_path=[str(tmp_path / "t")], split="98,2,0",
                            data_cache_path=str(tmp_path / "cache"))
    assert splits.train is not None and splits.valid is not None and splits.test is None


def test_split_without_documents_fails_instead_of_hanging(tmp_path):
    (tmp_path / "t.txt").write_text("one\n\ntwo\n\nthree\n")
    preprocess_files(str(tmp_path / "t.txt"), str(tmp_path / "t"))

    def timeout(signum, frame):
        raise TimeoutError("build_datasets hung on a split without documents")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(30)
    try:
        with pytest.raises(ValueError, match=r"valid split .* documents \[3, 3\) of 3, which hold no tokens"):
            build_datasets(seq_length=8, num_samples=(10, 2, 2), data_path=[str(tmp_path / "t")],
                           split="969,30,1", data_cache_path=str(tmp_path / "cache"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_embedded_text_with_a_larger_model_vocabulary(cache_dir):
    # A real-vocabulary model (NullTokenizer, 102400 ids) can train on the byte corpus; the datasets keep byte ids.
    train = build_datasets(seq_length=SEQ, num_samples=(8, 2, 2), data_cache_path=cache_dir,
                           tokenizer=build_tokenizer("NullTokenizer", vocab_size=102399)).train
    assert isinstance(train.config.tokenizer, ByteTokenizer) and int(train[0]["tokens"].max()) <= TOK.eod

    class Small:
        vocab_size = 128

    with pytest.raises(ValueError, match="vocab_size=128"):
        build_datasets(seq_length=SEQ, num_samples=(8, 2, 2), data_cache_path=cache_dir, tokenizer=Small())
    with pytest.raises(ValueError, match=r"\(train, valid, test\)"):
        build_datasets(seq_length=SEQ, num_samples=(8, 2), data_cache_path=cache_dir)


def _gloo_worker(rank, world_size, port, cache_dir, prefixes, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        train, valid, _ = build_datasets(seq_length=SEQ, num_samples=(32, 8, 8), data_cache_path=cache_dir)
        blend = build_datasets(seq_length=32, num_samples=(400, 20, 20), data_path=["1", prefixes[0], "3", prefixes[1]],
                               split="90,5,5", data_cache_path=cache_dir).train
        torch.save({"train": torch.stack([train[i]["tokens"] for i in range(32)]), "valid": valid[0]["tokens"],
                    "beta_share": beta_share(blend, 400)}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_build_the_same_datasets(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache_dir = str(tmp_path / "fresh_cache")  # nothing cached: both ranks build the embedded corpus at once
    prefixes = make_prefixes(tmp_path)
    mp.spawn(_gloo_worker, args=(2, port, cache_dir, prefixes, str(tmp_path)), nprocs=2, join=True)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = build_datasets(seq_length=SEQ, num_samples=(32, 8, 8), data_cache_path=cache_dir)
    assert torch.equal(ranks[0]["train"], ranks[1]["train"]) and torch.equal(ranks[0]["valid"], ranks[1]["valid"])
    assert torch.equal(ranks[0]["train"], torch.stack([single.train[i]["tokens"] for i in range(32)]))
    assert ranks[0]["beta_share"] == ranks[1]["beta_share"] and 0.6 < ranks[0]["beta_share"] < 0.9


def test_a_missing_corpus_says_how_to_fix_it(tmp_path, monkeypatch):
    from fp8flow_megatron.data import embedded

    monkeypatch.setattr(embedded, "CORPUS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"missing from this install .* pip install -e \."):
        build_datasets(seq_length=SEQ, num_samples=(8, 2, 2), data_cache_path=str(tmp_path))


def texts_of(dataset, num_samples):
    return "".join(TOK.detokenize(dataset[i]["tokens"]) for i in range(num_samples))


@pytest.mark.parametrize("form", ["lists", "strings"])
def test_build_datasets_from_per_split_paths(tmp_path, form):
    prefix_a, prefix_b = make_prefixes(tmp_path)
    paths = {"train_data_path": [prefix_a], "valid_data_path": [prefix_b]}
    if form == "strings":  # one whitespace-separated string, as a YAML value may be
        paths = {k: " ".join(v) for k, v in paths.items()}
    # split="1,0,0" would leave no validation split: with per-split paths it is ignored.
    splits = build_datasets(seq_length=32, num_samples=(40, 8, 4), split="1,0,0",
                            data_cache_path=str(tmp_path / "cache"), **paths)
    assert splits.test is None  # no --test-data-path
    train_text, valid_text = texts_of(splits.train, 40), texts_of(splits.valid, 8)
    assert "alpha paragraph" in train_text and "beta" not in train_text
    assert "beta paragraph" in valid_text and "alpha" not in valid_text
    # Each per-split prefix is used whole: all 200 paragraphs (documents) of each.
    assert splits.train.indices.tolist() == list(range(200)) == splits.valid.indices.tolist()


def test_per_split_paths_with_a_weighted_training_blend(tmp_path):
    prefix_a, prefix_b = make_prefixes(tmp_path)
    splits = build_datasets(seq_length=32, num_samples=(400, 8, 4), train_data_path=["1", prefix_a, "3", prefix_b],
                            valid_data_path=[prefix_b], test_data_path=[prefix_a])
    assert type(splits.train).__name__ == "BlendedDataset" and len(splits.train) == 400
    assert 0.6 < beta_share(splits.train, 400) < 0.9
    assert "alpha" in texts_of(splits.test, 4) and "beta" not in texts_of(splits.test, 4)
    with pytest.raises(ValueError, match="several prefixes and data_cache_path needs torch.distributed"):
        build_datasets(seq_length=32, num_samples=(400, 8, 4), train_data_path=[prefix_a, prefix_b],
                       data_cache_path=str(tmp_path / "cache"))


@pytest.mark.parametrize("per_split", ["train_data_path", "valid_data_path", "test_data_path"])
def test_data_path_and_per_split_paths_are_exclusive(tmp_path, per_split):
    prefix_a, prefix_b = make_prefixes(tmp_path)
    with pytest.raises(ValueError, match="--data-path cannot be combined with --train-data-path"):
        build_datasets(seq_length=32, num_samples=(10, 2, 2), data_path=[prefix_a], **{per_split: [prefix_b]},
                       data_cache_path=str(tmp_path / "cache"))


@pytest.mark.parametrize("flag, kwarg, suffix", [
    ("--data-path", "data_path", ""), ("--train-data-path", "train_data_path", ""),
    ("--valid-data-path", "valid_data_path", ".bin"), ("--test-data-path", "test_data_path", ".idx"),
])
def test_a_missing_prefix_says_what_to_do(tmp_path, flag, kwarg, suffix):
    prefix_a, _ = make_prefixes(tmp_path)
    given = prefix_a + suffix if suffix else str(tmp_path / "nowhere")
    paths = {kwarg: ["1", given]}
    if kwarg in ("valid_data_path", "test_data_path"):
        paths["train_data_path"] = [prefix_a]
    expected = re.escape(f"{flag} {given}: {given}.bin and {given}.idx not found")
    with pytest.raises(FileNotFoundError, match=expected) as e:
        build_datasets(seq_length=32, num_samples=(10, 2, 2), data_cache_path=str(tmp_path / "cache"), **paths)
    assert "python -m fp8flow_megatron.data.preprocess" in str(e.value)
    if suffix:
        assert f"give the prefix without the suffix ({prefix_a})" in str(e.value)


def test_the_trainer_flags_reach_build_datasets(monkeypatch, tmp_path):
    import fp8flow_megatron.data as data
    from fp8flow_megatron import train
    from megatron.core import parallel_state

    config = tmp_path / "c.yaml"
    config.write_text("valid_data_path: [v1, v2]\n")
    args = train.parse_config(["--config", str(config), "--train-data-path", "0.3", "t1", "0.7", "t2",
                               "--test-data-path", "x"])
    assert (args.train_data_path, args.valid_data_path, args.test_data_path, args.data_path) == (
        ["0.3", "t1", "0.7", "t2"], ["v1", "v2"], ["x"], None)
    seen = {}
    monkeypatch.setattr(data, "build_datasets", lambda **kw: seen.update(kw))
    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda: 0)
    train.build_data(args)
    assert (seen["train_data_path"], seen["valid_data_path"], seen["test_data_path"]) == (
        ["0.3", "t1", "0.7", "t2"], ["v1", "v2"], ["x"])
