"""Every reference in the repository's text points at something a clone of it contains.

Walks the text files (Python, Markdown, C++/CUDA, shell, TOML, text, the Makefile and CMakeLists.txt, the CI
script) and fails on

* a mention of a document that is not part of the repository (the team's briefing notes, or a path that
  leaves the repository through ``../shared``): the repository's own documents are ``docs/design.md``,
  ``docs/math.md`` and ``docs/performance.md``;
* a dangling path: ``docs/…``, ``tests/…``, ``bond_kernels/…``, ``csrc/…``, ``benchmarks/…``,
  ``python/src/…`` (and the package-relative ``ops/…``, ``reference/…``, ``integrations/…``, csrc-relative
  ``include/…``, ``cpu/…``, ``cuda/…``), or a relative Markdown link ``[text](path)``, that names no file or
  folder of the repository.

Patterns are not paths: ``reference/<op>.py``, ``tests/test_*.py`` and ``{a,b}`` forms are skipped, as are
URLs and paths under output folders that a run creates (``demo_out/``, ``$OUT/``, ``build/``), which lie
outside the prefixes above.  Reads the files only (no import), well under a second.
"""

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

SKIP_DIRS = {
    ".git",
    ".venv",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".benchmarks",
    ".hypothesis",
    ".whl",
    "out",
    "demo_out",
}
TEXT_SUFFIXES = {
    ".py",
    ".md",
    ".cpp",
    ".h",
    ".cu",
    ".cuh",
    ".sh",
    ".toml",
    ".txt",
    ".cfg",
    ".ini",
    ".yml",
    ".yaml",
}
TEXT_NAMES = {"Makefile", "CMakeLists.txt"}

# Spelled in pieces so that this file does not match itself.
_MD = r"\.md"
FORBIDDEN = re.compile(
    r"\b(?:DESIGN|PERFORMANCE|STYLE)" + _MD + r"\b"
    r"|\bBOND-" + r"MATH\b"
    r"|\bCPU-" + r"NOTES\b"
    r"|\.\./" + r"shared\b"
    r"|/work/" + r"shared\b"
)

# A path with at least one '/', starting at one of the repository's folders; not preceded by a path
# character (so 'site-packages/torch/ops/x.py' does not count), and not followed by one of the characters that
# make it a pattern ('*', '<', '{') or by more path.
_ROOTS = (
    r"(?:docs|tests|bond_kernels|csrc|benchmarks|python/src|\.ci|ops|reference|integrations|include|cpu|cuda)"
)
# The lookahead captures the longest path and is never re-entered (an atomic match, on Python 3.9 too): a
# path followed by a pattern character is skipped whole, not shortened until the rest passes.
PATH = re.compile(r"(?<![\w./$~-])(?=(" + _ROOTS + r"(?:/[\w.-]+)+))\1(/?)(?![\w*<>{/$-])")
# "TRL's tests/test_utils.py": a path in a peer's repository, not in ours.
PEER_PATH = re.compile(
    r"\b(?:trl|verl|liger|torch|pytorch|quack|flashinfer|flash-attn|transformers|triton|megatron)'s\s+$", re.I
)
# Upper-case top-level documents (README.md, BENCHMARKS.md, ...).
TOP_DOC = re.compile(r"(?<![\w./-])([A-Z][A-Z0-9_-]*\.md)\b")
MD_LINK = re.compile(r"\]\(([^()\s]+)\)")
URL = re.compile(r"\b(?:https?|ftp|file)://\S+")
# Where a package- or csrc-relative path may start, besides the repository root and the file's own folder.
BASES = ("", "bond_kernels", "csrc", "python/src")


def text_files():
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        rel_dir = pathlib.Path(dirpath).relative_to(ROOT)
        for name in sorted(filenames):
            path = pathlib.Path(dirpath) / name
            in_ci = rel_dir.parts[:1] == (".ci",)
            if path.suffix in TEXT_SUFFIXES or name in TEXT_NAMES or in_ci:
                out.append(path)
    return out


def _exists(ref: str, here: pathlib.Path) -> bool:
    ref = ref.rstrip(".,;:")
    if not ref:
        return True
    candidates = [here.parent / ref] + [ROOT / base / ref for base in BASES]
    return any(c.exists() for c in candidates)


def problems_in(path: pathlib.Path, text: str):
    """``[(line number, message)]`` for one file's text."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in FORBIDDEN.finditer(line):
            found.append((lineno, f"names {m.group(0)!r}, which is not part of the repository"))
        line = URL.sub(" ", line)
        for m in PATH.finditer(line):
            ref = m.group(1).rstrip(".,;:")
            # Checked: a file name with an extension, or a folder written with its trailing '/'.  Left alone:
            # prose such as "cuda/triton", and module-like names without an extension.
            checked = "." in ref.rsplit("/", 1)[-1] or m.group(2)
            if checked and not PEER_PATH.search(line[: m.start()]) and not _exists(ref, path):
                found.append((lineno, f"refers to {ref!r}, which does not exist"))
        for m in TOP_DOC.finditer(line):
            if not FORBIDDEN.match(m.group(1)) and not _exists(m.group(1), path):
                found.append((lineno, f"refers to {m.group(1)!r}, which does not exist"))
        if path.suffix == ".md":
            for m in MD_LINK.finditer(line):
                target = m.group(1).split("#", 1)[0]
                if target and not target.startswith(("mailto:", "$")) and not _exists(target, path):
                    found.append((lineno, f"links to {m.group(1)!r}, which does not exist"))
    return found


def test_every_reference_resolves():
    files = text_files()
    # The walk must see the repository, not an empty folder.
    assert any(p.name == "README.md" for p in files) and len(files) > 50
    bad = []
    for path in files:
        if path == pathlib.Path(__file__).resolve():
            continue  # its probes below are bad references on purpose
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, msg in problems_in(path, text):
            bad.append(f"{path.relative_to(ROOT)}:{lineno}: {msg}")
    assert not bad, "dangling or external references:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "line, kind",
    [
        ("see docs/nowhere.md", "does not exist"),
        ("as in tests/test_no_such_file.py", "does not exist"),
        ("the kernel in csrc/cpu/missing.cpp", "does not exist"),
        ("package-relative ops/missing_op.py", "does not exist"),
        ("a [link](docs/absent.md#part)", "does not exist"),
        ("the briefing's " + "DESIGN" + ".md section 2", "not part of the repository"),
        ("BOND-" + "MATH section 4", "not part of the repository"),
        ("../" + "shared/notes", "not part of the repository"),
        ("GONE" + ".md", "does not exist"),
        ("a folder: csrc/nothing_here/", "does not exist"),
    ],
)
def test_the_checker_catches(line, kind):
    """Each kind of bad reference is reported (a checker that finds nothing passes every repository)."""
    msgs = [msg for _, msg in problems_in(ROOT / "README.md", line)]
    assert msgs and all(kind in msg for msg in msgs), msgs


@pytest.mark.parametrize(
    "line",
    [
        "docs/design.md, tests/test_doc_references.py and bond_kernels/ops/linear_engine.py.",
        "csrc/cpu/ and csrc/include/bond/ hold the C++; python/src/module.cpp binds it",
        "one file per op: reference/<op>.py, ops/<op>.py, tests/test_*.py and python/src/<op>.cpp",
        "written to ./demo_out/metrics.json and $OUT/summary.md",
        "https://github.com/example/repo/blob/main/docs/not_ours.md",
        "[BENCHMARKS.md](BENCHMARKS.md) and [a section](#odd-inputs)",
        "site-packages/torch/ops/anything.py is somebody else's",
        "TRL's tests/test_nothing.py (4, 32, 1024) and verl's tests/utils/none.py",
        "reward_quantiles: cuda/triton, bit-exact",
        ': "${GPU_CHECK_TESTS:=tests/test_gpu_bond.py}"',
    ],
)
def test_the_checker_passes(line):
    """Existing paths, patterns, output folders, URLs and anchors are not reported."""
    assert problems_in(ROOT / "README.md", line) == []
