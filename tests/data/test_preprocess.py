import json
import os

import numpy
import pytest

from fp8flow_megatron.data import (
    ByteTokenizer,
    preprocess_files,
    read_documents,
    split_paragraphs,
    write_indexed_dataset,
)
from fp8flow_megatron.data.preprocess import main

TEXT = (
    "Chapter 1\n\n\n"
    "It is a truth universally acknowledged, that a single man in possession\n"
    "of a good fortune, must be in want of a wife.\n"
    "   \n"  # a whitespace-only line separates paragraphs too
    '           "ELLIOT OF KELLYNCH HALL."\n\n'
    "Café au lait.\n"
)
PARAGRAPHS = [
    "Chapter 1",
    "It is a truth universally acknowledged, that a single man in possession\n"
    "of a good fortune, must be in want of a wife.",
    '           "ELLIOT OF KELLYNCH HALL."',  # leading indentation is text, kept
    "Café au lait.",
]


def load(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def test_split_paragraphs():
    assert split_paragraphs(TEXT) == PARAGRAPHS
    assert split_paragraphs(TEXT.replace("\n", "\r\n")) == PARAGRAPHS
    assert split_paragraphs("\n\n \n") == []


def test_preprocess_writes_one_document_per_paragraph_with_eod(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    stats = preprocess_files(str(path), str(tmp_path / "out" / "book"))

    tok = ByteTokenizer()
    expected = [numpy.append(tok.tokenize(p), tok.eod) for p in PARAGRAPHS]
    assert stats.num_documents == 4 and stats.num_tokens == sum(e.size for e in expected)
    dataset = load(stats.output_prefix)
    assert len(dataset) == 4
    assert dataset.index.dtype == numpy.uint16  # megatron's optimal dtype for a 257-id vocabulary
    for i, want in enumerate(expected):
        got = dataset[i]
        numpy.testing.assert_array_equal(got, want, err_msg=f"document {i}")
        assert tok.detokenize(got) == PARAGRAPHS[i]
    assert sorted(os.listdir(tmp_path / "out")) == ["book.bin", "book.idx"], "temporary files left behind"


def test_preprocess_jsonl_and_several_inputs_in_order(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "", "two\n\nstill two"])))
    txt = tmp_path / "tail.txt"
    txt.write_text("three\n\nfour\n")
    assert list(read_documents(str(jsonl))) == ["one", "", "two\n\nstill two"]

    stats = preprocess_files([str(jsonl), str(txt)], str(tmp_path / "mixed"))
    dataset = load(stats.output_prefix)
    texts = [ByteTokenizer().detokenize(dataset[i]) for i in range(len(dataset))]
    assert texts == ["one", "two\n\nstill two", "three", "four"]  # the empty document is skipped


def test_preprocess_errors(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError, match=r"docs.jsonl:1 has no key 'text'"):
        preprocess_files(str(jsonl), str(tmp_path / "x"))
    assert list(read_documents(str(jsonl), json_key="body")) == ["x"]
    with pytest.raises(ValueError, match="no non-empty document"):
        write_indexed_dataset(["", ""], str(tmp_path / "empty"))
    assert not any(p.name.startswith("empty") for p in tmp_path.iterdir())


def test_cli(tmp_path, capsys):
    path = tmp_path / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    main(["--input", str(path), "--output-prefix", str(tmp_path / "cli")])
    assert "4 documents" in capsys.readouterr().out
    assert len(load(str(tmp_path / "cli"))) == 4
