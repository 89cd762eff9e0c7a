"""Text of other kinds that every Debian-like machine carries: licences, package documentation, manual pages, and
Python code of other projects (site-packages). No download, and no stage trains on it unless a recipe says so,
which makes it a cheap test of how much a student forgot outside its training text.

Whatever is missing is skipped (a slim container has no /usr/share/man): a kind that finds nothing gives no
documents, and the data builder leaves that domain out with a warning instead of failing. Files are sorted, and
identical texts (the same licence in forty packages) are kept once, so a machine gives the same documents every
time.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import re
import sysconfig
from pathlib import Path

KINDS = ("licences", "docs", "man", "site_code")
MAX_FILE_BYTES = 2_000_000  # larger files are generated tables or changelogs, not text worth a domain
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def site_packages() -> list[Path]:
    """The interpreter's site-packages folders (purelib and platlib, usually one)."""
    paths = sysconfig.get_paths()
    return sorted({Path(paths[k]) for k in ("purelib", "platlib") if k in paths})


def _everything(root: Path):
    yield from _walk(root)


def _dist_info_licences(root: Path):
    """LICENSE* / COPYING* / NOTICE* and licenses/** inside each *.dist-info folder."""
    if not root.is_dir():
        return
    for info in sorted(root.glob("*.dist-info")):
        for path in _walk(info):
            if _is_licence(path.name) or path.relative_to(info).parts[0] == "licenses":
                yield path


def _readmes(root: Path):
    for path in _walk(root):
        if path.name.upper().startswith("README"):
            yield path


def _markdown(root: Path):
    for path in _walk(root):
        if path.name.lower().endswith(".md") and not _is_licence(path.name) and ".dist-info" not in str(path):
            yield path


def _man_pages(root: Path):
    """English pages only (man/man1/..., not man/de/man1/...)."""
    if not root.is_dir():
        return
    for section in sorted(root.glob("man*")):
        for path in _walk(section):
            if path.parent == section and re.match(r"^[^.].*\.\d\w*(\.(gz|bz2|xz))?$", path.name):
                yield path


def _python(root: Path):
    for path in _walk(root):
        if path.suffix == ".py":
            yield path


# Where each kind looks, as (folder, how to pick files in it). Module-level so that a test (or a user) can point a
# kind elsewhere.
ROOTS: dict[str, list[tuple[Path, object]]] = {
    "licences": [(Path("/usr/share/common-licenses"), _everything), *((p, _dist_info_licences)
                                                                      for p in site_packages())],
    "docs": [(Path("/usr/share/doc"), _readmes), *((p, _markdown) for p in site_packages())],
    "man": [(Path("/usr/share/man"), _man_pages)],
    "site_code": [(p, _python) for p in site_packages()],
}


def _walk(root: Path):
    """Every regular file under `root`, in sorted order; unreadable folders and dangling links are skipped."""
    if not root.is_dir():
        return
    for folder, dirs, names in os.walk(root, onerror=lambda err: None):  # followlinks=False: no cycles
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_file():
                yield path


def _is_licence(name: str) -> bool:
    return name.upper().startswith(("LICEN", "COPYING", "NOTICE"))


def machine_files(kind: str) -> list[Path]:
    """The files of one kind on this machine, sorted; [] where none are found."""
    if kind not in KINDS:
        raise ValueError(f"machine_text kind {kind!r} is not one of {', '.join(KINDS)}")
    found = set()
    for root, pick in ROOTS.get(kind, []):
        found.update(pick(root))
    return sorted(found)


def read_text(path: Path) -> str:
    """A file's text, decompressed by its suffix, undecodable bytes replaced; '' if it cannot be read."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return ""
        opener = _OPENERS.get(path.suffix.lower(), open)
        with opener(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES * 4)
    except (OSError, EOFError, lzma.LZMAError):
        return ""  # a damaged archive or a file that vanished: one document less, not a failed run
    if b"\0" in data[:4096]:
        return ""  # binary
    return data.decode("utf-8", errors="replace")


def machine_documents(kind: str, files: list[Path]) -> list[str]:
    """The cleaned, non-empty texts of `files`, each kept once (identical texts dropped)."""
    out, seen = [], set()
    for path in files:
        text = read_text(path)
        if kind == "man":
            text = strip_troff(text)
        text = text.strip()
        digest = hashlib.sha256(text.encode()).digest()
        if text and digest not in seen:
            seen.add(digest)
            out.append(text)
    return out


# --------------------------------------------------------------------------- manual pages
_ESCAPES = {"em": "-", "en": "-", "hy": "-", "bu": "*", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'",
            "cq": "'", "co": "(c)", "rg": "(R)", "tm": "(TM)", "mu": "x", "<=": "<=", ">=": ">=", "->": "->",
            "<-": "<-", "ga": "`", "ti": "~", "ha": "^", "rs": "\\", "ba": "|", "de": "deg"}
_ESCAPE = re.compile(r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[+-]?\d+|\((..)|\[([^\]]*)\]|\*(?:\(..|\[[^\]]*\]|.)|"
                     r"([-e&|^c%:{}\s\\'`.\"])|$)")
_ARGS = re.compile(r'"([^"]*)"|(\S+)')
_TEXT_MACROS = {"SH", "SS", "B", "I", "SM", "SB", "TP", "IP", "UR", "MT", "Nm", "Sh", "Ss", "Nd", "Fn", "Ar",
                "Fl", "Pa", "Xr", "Dl", "It"}
_ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}


def _unescape(text: str) -> str:
    def sub(m: re.Match) -> str:
        two, named, char = m.group(1), m.group(2), m.group(3)
        if two is not None or named is not None:
            return _ESCAPES.get(two or named, "")
        if char is not None:
            return {"-": "-", "e": "\\", "\\": "\\", " ": " ", "'": "'", "`": "`", ".": ".", '"': ""}.get(
                char, " " if char.isspace() else "")
        return ""  # font, size and string escapes

    return _ESCAPE.sub(sub, text)


def strip_troff(source: str) -> str:
    """Rough plain text from a troff / mdoc manual page: comments, requests and macro definitions dropped, the
    words of text macros (.SH, .B, .BR, ...) kept, escapes resolved or removed, filled lines joined into
    paragraphs (troff would reflow them) and no-fill blocks (.nf / .EX) kept line by line. Good enough to measure a
    model's perplexity on man-page prose; not a renderer."""
    if source.lstrip().startswith(".so "):
        return ""  # a link to another page
    out: list[str] = []
    para: list[str] = []
    skipping, filling = False, True

    def flush(blank: bool = True) -> None:
        if para:
            out.append(" ".join(para))
            para.clear()
        if blank and out and out[-1]:
            out.append("")

    def emit(text: str) -> None:
        if filling:
            para.append(text)
        else:
            out.append(text)

    for line in source.splitlines():
        if skipping:
            skipping = not line.startswith("..")
            continue
        if line.startswith((".\\\"", "'\\\"", "\\\"")):
            continue
        if not line.startswith((".", "'")):
            text = _unescape(line).rstrip()
            if text.strip():
                emit(text.strip() if filling else text)
            elif filling:
                flush()
            continue
        macro, _, rest = line[1:].strip().partition(" ")
        if macro in ("de", "de1", "am", "ig"):
            skipping = True
        elif macro in ("nf", "EX"):
            flush()
            filling = False
        elif macro in ("fi", "EE"):
            filling = True
            flush()
        elif macro in ("SH", "SS", "Sh", "Ss"):
            flush()
            heading = _macro_text(macro, rest)
            if heading:
                out.extend([heading, ""])
        elif macro in ("PP", "LP", "P", "sp", "Pp", "TP", "IP", "HP", "Bl", "El"):
            flush()
            if macro == "IP" and (tag := _macro_text(macro, rest)):
                para.append(tag)
        elif macro == "br":
            flush(blank=False)
        elif macro in _TEXT_MACROS or macro in _ALTERNATING:
            text = _macro_text(macro, rest)
            if text:
                emit(text)
    flush()
    return "\n".join(out).strip()


def _macro_text(macro: str, rest: str) -> str:
    rest = rest.replace("\\ ", "\0")  # an escaped space joins words: keep it inside one argument
    args = [(a or b).replace("\0", " ") for a, b in _ARGS.findall(rest)]
    if macro == "IP":
        args = args[:1]  # .IP tag indent
    return _unescape(("" if macro in _ALTERNATING else " ").join(args)).strip()
