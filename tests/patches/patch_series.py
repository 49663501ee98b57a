"""The patch series under patches/ and how to apply them to a directory of files (no git repository needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[2]
MEGATRON_SERIES = REPO / "patches" / "megatron-lm" / "core_v0.16.1"
MEGATRON_019_SERIES = REPO / "patches" / "megatron-lm" / "core_v0.19.0"
# the megatron-core release each Megatron-LM series is checked against (its megatron/ files are the tag's)
MEGATRON_SERIES_WHEEL = {MEGATRON_SERIES: "0.16.1", MEGATRON_019_SERIES: "0.19.2"}
TE_SERIES = REPO / "patches" / "transformer-engine" / "v2.20.2"

_DIFF_HEADER = re.compile(r"^diff --git a/(\S+) b/(\S+)$", re.M)


def series(directory: Path) -> List[Path]:
    """The series' patch files in application order."""
    return sorted(directory.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def touched_files(patch: Path) -> List[str]:
    """Repository-relative paths a git format-patch file touches."""
    return [b for _, b in _DIFF_HEADER.findall(patch.read_text())]


def new_files(patch: Path) -> List[str]:
    """Paths the patch creates (no pre-image to check)."""
    text = patch.read_text()
    out = []
    for block in re.split(r"(?=^diff --git )", text, flags=re.M):
        m = _DIFF_HEADER.match(block)
        if m and re.search(r"^new file mode ", block, re.M):
            out.append(m.group(2))
    return out


def git_apply(cwd: Path, patches: List[Path], *, check: bool, include: List[str] = (), exclude: List[str] = ()) -> subprocess.CompletedProcess:
    """`git apply [--check]` of patches in order, in a plain directory (paths as in the upstream repository)."""
    git = shutil.which("git")
    if git is None:
        raise RuntimeError("git is needed to check the patch series")
    cmd = [git, "apply", "--verbose"] + (["--check"] if check else [])
    cmd += [f"--include={p}" for p in include] + [f"--exclude={p}" for p in exclude]
    cmd += [str(p) for p in patches]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def stage_files(src_root: Path, dst_root: Path, rel_paths: List[str], mapping: Dict[str, str] = None) -> List[str]:
    """Copy src_root/<rel> to dst_root/<rel> for each rel that exists; returns the missing ones."""
    missing = []
    for rel in rel_paths:
        src = src_root / (mapping or {}).get(rel, rel)
        if not src.is_file():
            missing.append(rel)
            continue
        dst = dst_root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return missing
