import numpy
import pytest

from fp8flow_megatron.data import ByteTokenizer, build_tokenizer


@pytest.mark.parametrize(
    "text",
    ["", "a", "It is a truth universally acknowledged.\n\n", "naïve café", "日本語のテキスト", "emoji 🙂 and \x00 nul",
     "\r\n\t"],
)
def test_byte_tokenizer_round_trips(text):
    tok = ByteTokenizer()
    ids = tok.tokenize(text)
    assert ids.dtype == numpy.int32 and ids.shape == (len(text.encode("utf-8")),)
    assert ids.min(initial=0) >= 0 and ids.max(initial=0) < 256, "text ids must be bytes, never the end-of-document id"
    assert tok.detokenize(ids) == text
    assert tok.detokenize(list(ids)) == text  # lists, as megatron passes them, work too


def test_byte_tokenizer_ids_are_utf8_bytes_and_eod_is_dropped():
    tok = ByteTokenizer()
    assert tok.tokenize("Aé").tolist() == [65, 0xC3, 0xA9]
    assert (tok.eod, tok.eos, tok.vocab_size) == (256, 256, 257)
    assert tok.detokenize([72, 105, tok.eod, 33]) == "Hi!"


def test_byte_tokenizer_rejects_ids_outside_its_vocabulary():
    with pytest.raises(ValueError, match=r"\[257\].*0\.\.256"):
        ByteTokenizer().detokenize([65, 257])
    with pytest.raises(ValueError, match="outside"):
        ByteTokenizer().detokenize([-1])


def test_byte_tokenizer_identifies_itself_for_the_index_cache():
    ids = ByteTokenizer().unique_identifiers
    assert ids["class"].endswith("ByteTokenizer") and ids["vocab_size"] == 257


def test_build_tokenizer():
    assert isinstance(build_tokenizer(), ByteTokenizer)
    null = build_tokenizer("NullTokenizer", vocab_size=102399)
    assert (null.vocab_size, null.eod) == (102400, 102399)  # Megatron's convention: one extra id for end-of-document
    with pytest.raises(ValueError, match="does not apply to ByteTokenizer"):
        build_tokenizer("ByteTokenizer", vocab_size=512)
    with pytest.raises(ValueError, match="NullTokenizer needs vocab_size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(ValueError, match="not one of"):
        build_tokenizer("GPT2BPETokenizer")
