"""Text -> Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), byte-tokenized.

    python -m fp8flow_megatron.data.preprocess --input book.txt --output-prefix data/book
    python -m fp8flow_megatron.data.preprocess --input a.jsonl b.jsonl --output-prefix data/ab --json-key text

Documents: a ``.jsonl`` / ``.json`` input has one JSON object per line and the document is its ``--json-key`` field
(Megatron-LM's ``tools/preprocess_data.py`` convention); any other file is plain UTF-8 text with one document per
paragraph (paragraphs are separated by blank lines). Each document gets the end-of-document id appended, as
``--append-eod`` does upstream. The output is what ``--data-path PREFIX`` (and :func:`build_datasets`) reads. For a
real subword vocabulary, tokenize with Megatron-LM's ``tools/preprocess_data.py`` instead and train with
``tokenizer_type: NullTokenizer``.
"""

import argparse
import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy

from .tokenizer import ByteTokenizer

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class IndexedDatasetStats:
    """What :func:`write_indexed_dataset` wrote: ``num_tokens`` counts the appended end-of-document ids too."""

    output_prefix: str
    num_documents: int
    num_tokens: int


def split_paragraphs(text: str) -> list[str]:
    """Plain text -> its paragraphs (blank-line separated), line breaks inside a paragraph kept, empty ones dropped."""
    text = text.replace("\r\n", "\n")
    return [p.strip("\n") for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def read_documents(path: str, *, json_key: str = "text") -> Iterator[str]:
    """The documents of one input file, in file order (see the module docstring for the two formats)."""
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if json_key not in record:
                    raise KeyError(f"{path}:{line_number} has no key {json_key!r} (keys: {sorted(record)})")
                yield record[json_key]
    else:
        with open(path, encoding="utf-8") as f:
            yield from split_paragraphs(f.read())


def write_indexed_dataset(documents: Iterable[str], output_prefix: str, *, tokenizer=None) -> IndexedDatasetStats:
    """Tokenize ``documents`` and write ``output_prefix.bin`` / ``.idx``; returns counts.

    ``tokenizer``: any object with ``tokenize(str) -> ids``, ``eod`` and ``vocab_size``; None means
    :class:`ByteTokenizer`. Documents that tokenize to nothing are skipped. The files are written under temporary
    names and renamed into place, so a concurrent reader (another rank building the same cache) never sees a partial
    file; two writers of the same content are harmless.
    """
    # Lazy: importing megatron.core costs seconds; `--help` and the paragraph splitter should not pay it.
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    output_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(output_dir, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    dtype = DType.optimal_dtype(tokenizer.vocab_size)  # uint16 for a vocabulary below 65500 ids
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
    num_documents = num_tokens = 0
    try:
        for text in documents:
            ids = numpy.asarray(tokenizer.tokenize(text), dtype=numpy.int64)
            if ids.size == 0:
                continue
            ids = numpy.append(ids, tokenizer.eod)
            builder.add_document(ids, [ids.size])
            num_documents += 1
            num_tokens += ids.size
        builder.finalize(tmp_prefix + ".idx")
        if num_documents == 0:
            raise ValueError(f"no non-empty document to write to {output_prefix}")
        os.replace(tmp_prefix + ".bin", output_prefix + ".bin")
        os.replace(tmp_prefix + ".idx", output_prefix + ".idx")
    finally:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp_prefix + suffix):
                os.remove(tmp_prefix + suffix)
    return IndexedDatasetStats(output_prefix, num_documents, num_tokens)


def preprocess_files(
    input_paths: Sequence[str] | str, output_prefix: str, *, json_key: str = "text", tokenizer=None
) -> IndexedDatasetStats:
    """Files -> one indexed dataset at ``output_prefix``: the documents of every file, in the order given."""
    if isinstance(input_paths, str):
        input_paths = [input_paths]

    def documents() -> Iterator[str]:
        for path in input_paths:
            yield from read_documents(path, json_key=json_key)

    return write_indexed_dataset(documents(), output_prefix, tokenizer=tokenizer)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fp8flow_megatron.data.preprocess",
        description="Byte-tokenize text into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).",
    )
    parser.add_argument("--input", nargs="+", required=True, help="plain-text files (one document per paragraph) "
                        "or .jsonl files (one document per line)")
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    parser.add_argument("--json-key", default="text", help="the document field of .jsonl input (default: text)")
    args = parser.parse_args(argv)
    stats = preprocess_files(args.input, args.output_prefix, json_key=args.json_key)
    print(
        f"wrote {stats.output_prefix}.bin/.idx: {stats.num_documents} documents, {stats.num_tokens} tokens "
        f"(ByteTokenizer, end-of-document id {ByteTokenizer.eod})"
    )


if __name__ == "__main__":
    main()
