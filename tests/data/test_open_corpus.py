"""fp8flow_megatron.data.open_corpus: the R reader, document cutting, the held-out split, the committed sample, the
texts pack and its manifest check. CPU only, no network (downloads are stood in for by archives built here)."""

import hashlib
import io
import json
import os
import re
import shutil
import struct
import tarfile
import zlib

import pytest

from fp8flow_megatron.data import open_corpus as oc
from fp8flow_megatron.data import open_corpus_sources as sources
from fp8flow_megatron.data.rdata import RDataError, iter_rdb_entries, read_strsxp, write_lines_text

# ------------------------------------------------------------------------------------ R serialization, built by hand
ASCII, UTF8, LATIN1 = 1 << 6, 1 << 3, 1 << 2  # CHARSXP encoding "levels" (R's Defn.h), shifted left by 12 in flags


def xdr(*values):
    return b"".join(struct.pack(">i", v) for v in values)


def charsxp(value, level=None):
    if value is None:
        return xdr(9, -1)  # NA_character_
    data = value if isinstance(value, bytes) else value.encode("utf-8")
    if level is None:
        level = ASCII if data.isascii() else UTF8
    return xdr((level << 12) | 9, len(data)) + data


def serialize(elements, version, levels=None):
    header = b"X\n" + xdr(version, 0x040201, 0x030500 if version == 3 else 0x020300)
    if version == 3:
        header += xdr(5) + b"UTF-8"
    levels = levels or [None] * len(elements)
    return header + xdr(16, len(elements)) + b"".join(charsxp(e, lv) for e, lv in zip(elements, levels))


def rdb(*payloads):
    return b"".join(struct.pack(">I", len(p)) + zlib.compress(p) for p in payloads)


ELEMENTS = ["PERSUASION", "", None, "Café — naïve “quoted”", "  indented line"]


@pytest.mark.parametrize("version", [2, 3])
def test_r_character_vectors_are_read_from_an_rdb(version):
    integers = b"X\n" + xdr(version, 0x040201, 0x030500) + (xdr(5) + b"UTF-8" if version == 3 else b"") + \
        xdr(13, 2, 7, 8)  # an INTSXP c(7L, 8L): not text, skipped
    payloads = list(iter_rdb_entries(rdb(serialize(ELEMENTS, version), integers, serialize(["x"], version))))
    assert len(payloads) == 3
    assert read_strsxp(payloads[0]) == ELEMENTS
    assert read_strsxp(payloads[1]) is None
    assert read_strsxp(payloads[2]) == ["x"]
    # R's writeLines: one element per line, NA written as "NA".
    assert write_lines_text(ELEMENTS) == "PERSUASION\n\nNA\nCafé — naïve “quoted”\n  indented line\n"


def test_a_latin1_marked_string_is_decoded_as_latin1():
    raw = serialize([b"caf\xe9", "plain"], 3, levels=[LATIN1, ASCII])
    assert read_strsxp(raw) == ["café", "plain"]


@pytest.mark.parametrize("raw, message", [
    (b"A\n" + xdr(3, 0, 0), "not an XDR"),
    (b"X\n" + xdr(4, 0, 0) + xdr(16, 0), "version 4"),
    (serialize(["abc"], 2)[:-2], "serialization ends"),
    (serialize(["abc"], 2).replace(xdr((ASCII << 12) | 9), xdr(10)), "expected CHARSXP"),
])
def test_malformed_serializations_are_refused(raw, message):
    with pytest.raises(RDataError, match=message):
        read_strsxp(raw)


@pytest.mark.parametrize("blob, message", [
    (struct.pack(">I", 5) + b"not zlib at all", "not a zlib stream"),
    (struct.pack(">I", 99) + zlib.compress(b"X\nshort"), "header says 99"),
    (b"\x00\x00", "truncated entry header"),
])
def test_malformed_rdb_files_are_refused(blob, message):
    with pytest.raises(RDataError, match=message):
        list(iter_rdb_entries(blob))


# ------------------------------------------------------------------------------------ cutting into documents
NOVEL = ["EMMA", "", "By Jane Austen", "", "", "VOLUME I", "", "CHAPTER I", "", "Emma Woodhouse, handsome.", "",
         "CHAPTER II", "Mr. Weston was a native.", "as the chapter said", "Chapter 9",  # no blank above: not a cut
         "", "", "VOLUME II", "", "", "CHAPTER I", "", "Miss Bates.", "", "FINIS", ""]


def test_novels_are_cut_at_chapter_headings_with_front_matter_and_volume_lines_kept():
    assert sources.split_sections(NOVEL, sources.AUSTEN_CHAPTER, sources.AUSTEN_VOLUME) == [
        ("CHAPTER I", "EMMA\n\nBy Jane Austen\n\n\nVOLUME I\n\nCHAPTER I\n\nEmma Woodhouse, handsome."),
        ("CHAPTER II", "CHAPTER II\nMr. Weston was a native.\nas the chapter said\nChapter 9"),
        ("CHAPTER I", "VOLUME II\n\n\nCHAPTER I\n\nMiss Bates.\n\nFINIS"),
    ]


@pytest.mark.parametrize("heading, is_heading", [
    ("Chapter 1", True), ("CHAPTER XLVIII", True), ("CHAPTER 12.", True), ("  Chapter 3  ", True),
    ("Chapter the last", False), ("CHAPTER I was reading", False), ("chapters 1", False),
])
def test_austen_chapter_headings(heading, is_heading):
    assert bool(sources.AUSTEN_CHAPTER.match(heading)) is is_heading


def test_the_bible_is_cut_at_chapters():
    printout = "\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth.\n\nGenesis 2\n\n  1 Thus the heavens.\n\n" \
               "1 Samuel 3\n\n  1 And the child Samuel 2\n"
    assert sources.split_sections(printout.split("\n"), sources.KJV_CHAPTER) == [
        ("Genesis 1", "Genesis 1\n\n  1 In the beginning.\n  2 And the earth."),
        ("Genesis 2", "Genesis 2\n\n  1 Thus the heavens."),
        ("1 Samuel 3", "1 Samuel 3\n\n  1 And the child Samuel 2"),
    ]


def test_a_text_without_headings_is_one_section():
    assert sources.split_sections(["", "just text", ""], sources.KJV_CHAPTER) == [(None, "just text")]


# ------------------------------------------------------------------------------------ the held-out split
def ids_with_key(predicate, count, prefix="d"):
    found, i = [], 0
    while len(found) < count:
        if predicate(oc.validation_key("s", f"{prefix}{i}")):
            found.append(f"{prefix}{i}")
        i += 1
    return found


def corpus(counts):
    return [{"source": s, "id": f"doc{i}", "text": f"{s} {i}"} for s, n in counts.items() for i in range(n)]


def keys(docs):
    return [(d["source"], d["id"]) for d in docs]


@pytest.mark.parametrize("counts", [{"big": 3000, "small": 3, "pair": 2}, {"a": 40, "b": 41, "c": 1000}])
def test_the_split_is_deterministic_disjoint_and_stratified(counts):
    docs = corpus(counts)
    train, valid = oc.split_train_valid(docs)
    assert (keys(train), keys(valid)) == tuple(keys(x) for x in oc.split_train_valid(docs))
    assert not set(keys(train)) & set(keys(valid)) and sorted(keys(train) + keys(valid)) == sorted(keys(docs))
    assert keys(train) == [k for k in keys(docs) if k in set(keys(train))]  # input order kept
    for source, n in counts.items():
        held = [d for d in valid if d["source"] == source]
        assert 1 <= len(held) < n, source
        if n >= 1000:
            assert 0.02 < len(held) / n < 0.04
    # A document's side depends on its own id only: in a large source, documents leaving (and any input order)
    # move no other document between train and validation.
    largest = max(counts, key=counts.get)
    fewer = [d for d in reversed(docs) if d["source"] == largest][:-100]
    _, valid_again = oc.split_train_valid(fewer)
    assert set(keys(valid_again)) == {k for k in keys(valid) if k[0] == largest} & set(keys(fewer))


@pytest.mark.parametrize("ids, held", [
    (ids_with_key(lambda k: k < oc.VALID_PER_MILLE, 2), 1),  # both would be held out: one stays for training
    (ids_with_key(lambda k: k >= oc.VALID_PER_MILLE, 4), 1),  # none would be: the lowest key is held out
    (ids_with_key(lambda k: True, 1), 0),  # a single document only trains
])
def test_split_edge_cases(ids, held):
    train, valid = oc.split_train_valid([{"source": "s", "id": i, "text": "t"} for i in ids])
    assert len(valid) == held and len(train) == len(ids) - held


def test_a_repeated_document_id_is_refused():
    with pytest.raises(ValueError, match="s/x appears twice"):
        oc.split_train_valid([{"source": "s", "id": "x", "text": "a"}, {"source": "s", "id": "x", "text": "b"}])


# ------------------------------------------------------------------------------------ the committed sample
def test_the_sample_is_small_attributed_and_stratified():
    docs = oc.read_sample()
    data = open(oc.SAMPLE_PATH, "rb").read()
    assert len(data) <= 150_000
    attribution = open(os.path.join(os.path.dirname(oc.SAMPLE_PATH), "ATTRIBUTION.md"), encoding="utf-8").read()
    row = re.search(r"`open_corpus_sample\.jsonl\.xz` \| ([\d,]+) \| `([0-9a-f]{64})`", attribution)
    assert row and int(row[1].replace(",", "")) == len(data) and row[2] == hashlib.sha256(data).hexdigest()
    for licence in ("MIT License", "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2", "Zero-Clause BSD",
                    "Copyright (c) Django Software Foundation", "provided for unrestricted use"):
        assert licence in attribution
    assert [d["source"] for d in docs] == [s for s in oc.SOURCES for _ in range(8)]
    for d in docs:
        assert f"`{d['id']}`" in attribution, d["id"]  # ATTRIBUTION.md lists every sampled document
        assert 0 < len(d["text"].encode("utf-8")) <= oc.SAMPLE_MAX_DOCUMENT_BYTES
    _, valid = oc.split_train_valid(docs)
    assert [d["source"] for d in valid] == [s for s in oc.SOURCES for _ in range(2)]
    # The sample holds out documents the full corpus holds out too (chosen by key, not by the fallback).
    assert all(oc.validation_key(d["source"], d["id"]) < oc.VALID_PER_MILLE for d in valid)


def load(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def detokenized(prefix):
    from fp8flow_megatron.data import ByteTokenizer

    dataset = load(prefix)
    return [ByteTokenizer().detokenize(dataset[i]) for i in range(len(dataset))]


@pytest.fixture(scope="module")
def sample_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "open-corpus"
    stats = oc.main(["--output-dir", str(out), "--sample"])
    return out, stats


def test_the_sample_builds_train_and_valid_indexed_datasets(sample_build, capsys):
    out, stats = sample_build
    train_docs, valid_docs = oc.split_train_valid(oc.read_sample())
    assert (len(train_docs), len(valid_docs)) == (24, 8)
    assert detokenized(str(out / oc.TRAIN_NAME)) == [d["text"] for d in train_docs]
    assert detokenized(str(out / oc.VALID_NAME)) == [d["text"] for d in valid_docs]
    assert stats["train"]["documents"] == 24 and stats["valid"]["documents"] == 8
    assert stats["valid"]["tokens"] == sum(len(d["text"].encode("utf-8")) + 1 for d in valid_docs)
    assert {s: v[0] for s, v in stats["valid"]["sources"].items()} == {s: 2 for s in oc.SOURCES}
    manifest = json.loads((out / oc.MANIFEST_NAME).read_text())
    assert manifest["kind"] == "sample" and sorted(manifest["texts"]) == sorted(f"{s}.jsonl" for s in oc.SOURCES)
    assert (out / oc.PACK_NAME).is_file()


def test_the_printed_trainer_flags(tmp_path, capsys):
    oc.main(["--output-dir", str(tmp_path), "--sample"])
    printed = capsys.readouterr().out
    assert f"--train-data-path {tmp_path / oc.TRAIN_NAME} --valid-data-path {tmp_path / oc.VALID_NAME}" in printed
    for source in oc.SOURCES:
        assert re.search(rf"^{source} +8 +[\d,]+ +6 +[\d,]+ +2 +[\d,]+$", printed, re.MULTILINE), source


@pytest.mark.parametrize("given", ["pack", "output_dir", "texts_dir"])
def test_from_texts_rebuilds_the_same_datasets(sample_build, tmp_path, given):
    out, _ = sample_build
    source = {"pack": out / oc.PACK_NAME, "output_dir": out, "texts_dir": out / "texts"}[given]
    rebuilt = tmp_path / "rebuilt"
    oc.main(["--output-dir", str(rebuilt), "--from-texts", str(source)])
    for name in (oc.TRAIN_NAME, oc.VALID_NAME):
        for suffix in (".bin", ".idx"):
            assert (rebuilt / (name + suffix)).read_bytes() == (out / (name + suffix)).read_bytes(), name + suffix
    assert (rebuilt / oc.MANIFEST_NAME).read_bytes() == (out / oc.MANIFEST_NAME).read_bytes()


def test_the_pack_is_reproducible(sample_build, tmp_path):
    out, _ = sample_build
    oc.pack(str(out), str(tmp_path / "again.tar.xz"))
    assert (tmp_path / "again.tar.xz").read_bytes() == (out / oc.PACK_NAME).read_bytes()
    with tarfile.open(out / oc.PACK_NAME) as tar:
        assert tar.getnames() == [oc.MANIFEST_NAME] + [f"texts/{s}.jsonl" for s in sorted(oc.SOURCES)]


@pytest.mark.parametrize("damage, message", [
    ("edit", r"texts/kjv\.jsonl has sha256 [0-9a-f]{16}\.\.\. \(\d+ bytes\), the manifest says"),
    ("delete", r"texts/austen\.jsonl is missing"),
    ("extra", r"texts/extra\.jsonl is not in the manifest"),
    ("no_manifest", r"copy has no MANIFEST\.json; give the directory that holds it"),
])
def test_texts_that_do_not_match_the_manifest_are_reported(sample_build, tmp_path, damage, message):
    out, _ = sample_build
    copy = tmp_path / "copy"
    shutil.copytree(out / "texts", copy / "texts")
    shutil.copy(out / oc.MANIFEST_NAME, copy / oc.MANIFEST_NAME)
    if damage == "edit":
        path = copy / "texts" / "kjv.jsonl"
        path.write_text(path.read_text(encoding="utf-8").replace('"text": "', '"text": "X', 1), encoding="utf-8")
    elif damage == "delete":
        (copy / "texts" / "austen.jsonl").unlink()
    elif damage == "extra":
        (copy / "texts" / "extra.jsonl").write_text('{"source": "extra", "id": "1", "text": "x"}\n')
    else:
        (copy / oc.MANIFEST_NAME).unlink()
    with pytest.raises(oc.CorpusError, match=message):
        oc.main(["--output-dir", str(tmp_path / "rebuilt"), "--from-texts", str(copy)])


@pytest.mark.parametrize("name", ["../evil.jsonl", "texts/../../evil.jsonl", "/etc/evil", "texts/a.sh"])
def test_a_pack_with_foreign_members_is_refused(tmp_path, name):
    pack = tmp_path / "bad.tar.xz"
    with tarfile.open(pack, "w:xz") as tar:
        info = tarfile.TarInfo(name)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(oc.CorpusError, match="not an open-corpus pack"):
        oc.unpack(str(pack), str(tmp_path / "out"))
    assert not (tmp_path / "evil.jsonl").exists()


# ------------------------------------------------------------------------------------ extraction, offline
def ar_archive(members):
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


def tar_xz(files):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def fake_deb(path, version, files):
    control = tar_xz({"./control": f"Package: x\nVersion: {version}\n".encode()})
    path.write_bytes(ar_archive([("debian-binary", b"2.0\n"), ("control.tar.xz", control),
                                 ("data.tar.xz", tar_xz(files))]))


def test_austen_extraction_from_a_package_reports_digest_mismatches(tmp_path, capsys):
    persuasion = ["Persuasion", "", "Chapter 1", "", "Sir Walter Elliot.", "", "Chapter 2", "", "Mr Shepherd."]
    other = ["A NEW NOVEL", "", "CHAPTER I", "", "Text."]
    root = "./usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    fake_deb(tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb", "1.0.0-1", {
        root: rdb(serialize(persuasion, 3), serialize(other, 2)),
        "./usr/share/doc/r-cran-janeaustenr/copyright": b"License: MIT\n",
    })
    extracted = sources.extract_austen(str(tmp_path))  # the .deb is there: apt-get is not run
    assert extracted.documents == [
        ("persuasion/01", "Persuasion\n\nChapter 1\n\nSir Walter Elliot."),
        ("persuasion/02", "Chapter 2\n\nMr Shepherd."),
        ("anewnovel/01", "A NEW NOVEL\n\nCHAPTER I\n\nText."),  # a title not in AUSTEN_NOVELS names itself
    ]
    assert extracted.licence == "License: MIT\n"
    assert extracted.archives[0]["version"] == "1.0.0-1" and extracted.archives[0]["registry"] == "debian"
    text = write_lines_text(persuasion).encode()
    assert extracted.texts[0] == {"name": "persuasion", "sha256": hashlib.sha256(text).hexdigest(), "bytes": len(text)}
    # The archive, Persuasion and the unknown novel all differ from what was measured: three warnings, on stderr too.
    assert [c["matches"] for c in extracted.checks] == [False, False, False] and len(extracted.warnings) == 3
    assert "persuasion has sha256" in capsys.readouterr().err


def test_django_docs_extraction_from_an_sdist(tmp_path):
    root = f"django-{sources.DJANGO_VERSION}"
    buffer = io.BytesIO()
    files = {f"{root}/docs/index.txt": b"Django documentation\n", f"{root}/docs/ref/models.txt": "Modèles\n".encode(),
             f"{root}/docs/requirements.txt": b"Sphinx\n", f"{root}/docs/_theme/x/LICENSE.txt": b"font\n",
             f"{root}/docs/conf.py": b"x = 1\n", f"{root}/LICENSE": b"BSD\n"}
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / f"django-{sources.DJANGO_VERSION}.tar.gz").write_bytes(buffer.getvalue())
    extracted = sources.extract_django_docs(str(tmp_path))  # the sdist is there: pip is not run
    assert extracted.documents == [("index", "Django documentation\n"), ("ref/models", "Modèles\n")]
    assert extracted.licence == "BSD\n" and extracted.archives[0]["registry"] == "pypi"
    assert extracted.checks[-1]["name"] == "tree digest of the 2 files" and not extracted.checks[-1]["matches"]


def test_jsonl_round_trip_keeps_unicode_and_rejects_bad_records(tmp_path):
    docs = [{"source": "s", "id": "a/b", "text": "Café\nline two\n\u2028sep"}]
    record = oc.write_jsonl(docs, str(tmp_path / "texts" / "s.jsonl"))
    assert record["documents"] == 1 and "Café" in (tmp_path / "texts" / "s.jsonl").read_text(encoding="utf-8")
    assert oc.read_texts(str(tmp_path / "texts")) == docs
    with pytest.raises(oc.CorpusError, match="is not a {source, id, text} document"):
        oc.read_jsonl(['{"source": "s", "text": "no id"}'], "x.jsonl")


@pytest.mark.parametrize("present, chosen", [
    (["r-cran-janeaustenr_0.9-1_all.deb", "r-cran-janeaustenr_1.0.0-1_all.deb"], "r-cran-janeaustenr_1.0.0-1_all.deb"),
    (["r-cran-janeaustenr_1.0.1-1_all.deb"], "r-cran-janeaustenr_1.0.1-1_all.deb"),  # another version is reused
])
def test_downloads_are_reused(tmp_path, present, chosen):
    for name in present:
        (tmp_path / name).write_bytes(b"")
    assert os.path.basename(sources.apt_download("r-cran-janeaustenr", str(tmp_path))) == chosen


def test_the_sample_cannot_be_written_from_the_sample(sample_build, tmp_path):
    out, _ = sample_build
    with pytest.raises(SystemExit):
        oc.main(["--output-dir", str(tmp_path), "--sample", "--write-sample", str(tmp_path / "s.jsonl.xz")])
    with pytest.raises(oc.CorpusError, match="--write-sample needs the full corpus"):
        oc.main(["--output-dir", str(tmp_path), "--from-texts", str(out / oc.PACK_NAME), "--write-sample",
                 str(tmp_path / "s.jsonl.xz")])
    assert not (tmp_path / "s.jsonl.xz").exists()


def test_python_docs_extraction_from_a_package(tmp_path):
    base = sources.PYTHON_SOURCES
    fake_deb(tmp_path / "python3.11-doc_3.11.2-6+deb12u8_all.deb", "3.11.2-6+deb12u8", {
        f"{base}library/os.rst.txt": b":mod:`os`\n=========\n", f"{base}about.rst.txt": "Über\n".encode(),
        f"{base}library/os.html": b"<html>", "./usr/share/doc/python3.11/html/os.html": b"<html>",
        "./usr/share/doc/python3.11-doc/copyright": b"PSF\n",
    })
    extracted = sources.extract_python_docs(str(tmp_path))
    assert extracted.documents == [("about", "Über\n"), ("library/os", ":mod:`os`\n=========\n")]
    assert extracted.licence == "PSF\n" and extracted.archives[0]["version"] == "3.11.2-6+deb12u8"
    assert [t["name"] for t in extracted.texts] == ["about", "library/os"]
