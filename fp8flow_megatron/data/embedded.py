"""The real-text corpus shipped in the package (two Jane Austen novels, public domain; see corpus/ATTRIBUTION.md).

It is the default training data: on first use it is byte-tokenized into an indexed dataset under a cache directory
whose name carries a hash of the text and of the tokenization, so an edited corpus or tokenizer never reuses a stale
cache.
"""

import hashlib
import os

from .preprocess import preprocess_files
from .tokenizer import ByteTokenizer

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
# Document order is file order: with a split such as "969,30,1" the validation and test documents are the last
# paragraphs of Persuasion.
EMBEDDED_CORPUS_FILES = ("austen_pride_and_prejudice.txt", "austen_persuasion.txt")
# Bump when the text -> documents -> ids mapping changes; it is part of the cache key.
_PREPROCESS_VERSION = "paragraphs-v1"


def embedded_corpus_paths() -> list[str]:
    """Absolute paths of the shipped text files, in document order."""
    paths = [os.path.join(CORPUS_DIR, name) for name in EMBEDDED_CORPUS_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"the embedded corpus is missing from this install ({', '.join(missing)}); install from a source "
            "checkout with pip install -e ., or train on your own data with --data-path"
        )
    return paths


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/fp8flow_megatron`` (``~/.cache/fp8flow_megatron`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fp8flow_megatron")


def _corpus_key() -> str:
    digest = hashlib.sha256(_PREPROCESS_VERSION.encode())
    digest.update(repr(sorted(ByteTokenizer().unique_identifiers.items())).encode())
    for path in embedded_corpus_paths():
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def embedded_dataset_prefix(cache_dir: str | None = None) -> str:
    """Path prefix of the embedded corpus as an indexed dataset (``PREFIX.bin`` / ``.idx``), built if missing.

    Safe to call from every rank at once: each rank that misses the cache writes it under a temporary name and
    renames it into place (same bytes from every writer), so no barrier is needed. ``cache_dir`` must be writable;
    None means :func:`default_cache_dir`.
    """
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    prefix = os.path.join(cache_dir, f"austen-bytes-{_corpus_key()}", "austen_text_document")
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        preprocess_files(embedded_corpus_paths(), prefix, tokenizer=ByteTokenizer())
    return prefix
