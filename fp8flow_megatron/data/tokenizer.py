"""Tokenizers that need no download, in the shape megatron.core.datasets expects.

megatron-core 0.16.1's GPTDataset reads only ``vocab_size`` (to pick the token dtype), ``eod`` (for the position-id and
loss-mask resets) and ``unique_identifiers`` (hashed into the index-cache file names); ``pad`` is optional (a missing
one makes GPTDataset pad with -1 and mask it). ``tokenize`` / ``detokenize`` are what the preprocessing tool and
sample printing use.
"""

from collections import OrderedDict

import numpy

TOKENIZER_TYPES = ("ByteTokenizer", "NullTokenizer")


class ByteTokenizer:
    """UTF-8 bytes as token ids: ids 0..255 are the bytes, id 256 ends a document; ``vocab_size`` is 257.

    Any text round-trips exactly (``detokenize(tokenize(s)) == s``); there is nothing to train or download. The model's
    embedding table may be larger (Megatron pads it to ``make_vocab_size_divisible_by``); ids >= 257 never occur.
    """

    eod = 256
    vocab_size = 257

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> OrderedDict:
        # Part of the GPTDataset index-cache key: a different tokenizer must never hit the same cache.
        return OrderedDict(
            {"class": f"{type(self).__module__}.{type(self).__qualname__}", "vocab_size": self.vocab_size}
        )

    def tokenize(self, text: str) -> numpy.ndarray:
        """``text`` -> int32 ids, shape ``[len(text.encode("utf-8"))]``; no end-of-document id is appended."""
        return numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8).astype(numpy.int32)

    def detokenize(self, ids) -> str:
        """Ids -> text. End-of-document ids are dropped; a byte sequence that is not UTF-8 decodes with U+FFFD."""
        ids = numpy.asarray(ids, dtype=numpy.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids > self.eod)]
        if bad.size:
            raise ValueError(f"ids {bad[:8].tolist()} are outside ByteTokenizer's range 0..{self.eod}")
        return ids[ids != self.eod].astype(numpy.uint8).tobytes().decode("utf-8", errors="replace")


def build_tokenizer(tokenizer_type: str = "ByteTokenizer", *, vocab_size: int | None = None):
    """The tokenizer object named by Megatron's ``--tokenizer-type`` (both need no download).

    - ``"ByteTokenizer"``: :class:`ByteTokenizer` (257 ids); ``vocab_size`` must be None.
    - ``"NullTokenizer"``: megatron-core's NullTokenizer for data tokenized elsewhere (e.g. Megatron-LM's
      ``tools/preprocess_data.py`` with the model's real tokenizer). ``vocab_size`` is Megatron's ``--vocab-size``;
      the tokenizer adds one id for end-of-document, so ``vocab_size=102399`` gives 102400 ids, ``eod == 102399``.
    """
    if tokenizer_type == "ByteTokenizer":
        if vocab_size is not None:
            raise ValueError(
                f"vocab_size={vocab_size} does not apply to ByteTokenizer (it has 257 ids); drop vocab_size, "
                "or use tokenizer_type NullTokenizer for data tokenized with another vocabulary"
            )
        return ByteTokenizer()
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or vocab_size < 1:
            raise ValueError(f"NullTokenizer needs vocab_size >= 1 (Megatron's --vocab-size), got {vocab_size}")
        from ..megatron.compat import null_tokenizer  # the same ids under every admitted megatron-core

        return null_tokenizer(vocab_size)
    raise ValueError(f"tokenizer_type={tokenizer_type!r} is not one of {TOKENIZER_TYPES}")
