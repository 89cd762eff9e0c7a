import gzip

import pytest
import torch

from codexmini.data import DataConfig, build_data, machine_files
from codexmini.data import machine_text
from codexmini.data.machine_text import KINDS, machine_documents, strip_troff

PAGE = r""".\" a comment that must not survive
.TH GREET 1 "2024" "greet 1.0"
.de XX
.  some macro body
..
.SH NAME
greet \- print a friendly greeting
.SH SYNOPSIS
.B greet
.RB [ \-n\ name ]
.SH DESCRIPTION
The
.B greet
command prints a greeting to
.IR standard " output."
It is \fBvery\fR polite\(em always.
.PP
.nf
  greet -n world
  hello, world
.fi
"""


def test_strip_troff_keeps_the_words_and_drops_the_markup():
    text = strip_troff(PAGE)
    assert "greet - print a friendly greeting" in text
    assert "The greet command prints a greeting to standard output. It is very polite- always." in text
    assert "[-n name]" in text
    assert "  greet -n world\n  hello, world" in text  # no-fill block kept line by line
    for markup in (".TH", ".SH", "\\f", "comment", "macro body", ".B "):
        assert markup not in text
    assert strip_troff(".so man1/other.1\n") == ""


@pytest.fixture
def fake_machine(tmp_path, monkeypatch):
    """A machine with two man pages (one in a language folder, left out), licences and docs."""
    man = tmp_path / "man"
    (man / "man1").mkdir(parents=True)
    (man / "de" / "man1").mkdir(parents=True)
    for folder, name in ((man / "man1", "greet.1.gz"), (man / "de" / "man1", "greet.1.gz")):
        with gzip.open(folder / name, "wt") as f:
            f.write(PAGE)
    (man / "man1" / "link.1").write_text(".so man1/greet.1\n")
    lic = tmp_path / "licenses"
    lic.mkdir()
    (lic / "MIT").write_text("Permission is hereby granted, free of charge, to any person. " * 20)
    (lic / "MIT-copy").write_text("Permission is hereby granted, free of charge, to any person. " * 20)
    site = tmp_path / "site"
    (site / "pkg-1.0.dist-info" / "licenses").mkdir(parents=True)
    (site / "pkg-1.0.dist-info" / "licenses" / "LICENSE").write_text("BSD 3-Clause License. " * 30)
    (site / "pkg-1.0.dist-info" / "METADATA").write_text("Name: pkg")
    (site / "pkg").mkdir()
    (site / "pkg" / "guide.md").write_text("# Guide\n\nHow to use pkg. " * 20)
    (site / "pkg" / "LICENSE.md").write_text("not docs")
    (site / "pkg" / "mod.py").write_text("def pkg_function(x):\n    return x + 1\n" * 10)
    doc = tmp_path / "doc" / "tool"
    doc.mkdir(parents=True)
    with gzip.open(doc / "README.gz", "wt") as f:
        f.write("Tool reads files and writes reports. " * 20)
    (doc / "changelog").write_text("not a readme")
    roots = {"man": [(man, machine_text._man_pages)],
             "licences": [(lic, machine_text._everything), (site, machine_text._dist_info_licences)],
             "docs": [(tmp_path / "doc", machine_text._readmes), (site, machine_text._markdown)],
             "site_code": [(site, machine_text._python)]}
    for kind, value in roots.items():
        monkeypatch.setitem(machine_text.ROOTS, kind, value)
    return tmp_path


def test_machine_files_find_each_kind_sorted(fake_machine):
    names = {kind: [p.name for p in machine_files(kind)] for kind in KINDS}
    assert names == {"man": ["greet.1.gz", "link.1"], "licences": ["MIT", "MIT-copy", "LICENSE"],
                     "docs": ["README.gz", "guide.md"], "site_code": ["mod.py"]}
    # identical licence texts are kept once; a .so link gives nothing; gzip is decompressed
    assert len(machine_documents("licences", machine_files("licences"))) == 2
    man = machine_documents("man", machine_files("man"))
    assert len(man) == 1 and "friendly greeting" in man[0]
    assert "writes reports" in machine_documents("docs", machine_files("docs"))[0]


def test_missing_roots_give_no_files(tmp_path, monkeypatch):
    for kind in KINDS:
        monkeypatch.setitem(machine_text.ROOTS, kind, [(tmp_path / "absent", machine_text._everything)])
        assert machine_files(kind) == []


def test_machine_text_domains_build(fake_machine, tiny_tokenizer):
    cfg = DataConfig(block_size=16, sources=[
        {"source": "stdlib", "max_files": 5},
        {"source": "machine_text", "kind": "licences", "weight": 0.5},
        {"source": "machine_text", "kind": "docs", "eval_only": True},
        {"source": "machine_text", "kind": "man", "eval_only": True}])
    bundle = build_data(cfg, tiny_tokenizer)
    assert list(bundle.val_domains) == ["stdlib", "licences", "docs", "man"]
    assert bundle.stats["domains"]["man"]["kind"] == "man" and bundle.stats["domains"]["docs"]["blocks_train"] == 0
    assert "friendly greeting" in tiny_tokenizer.decode(bundle.val_domains["man"].flatten())
    again = build_data(cfg, tiny_tokenizer)
    assert all(torch.equal(bundle.val_domains[k], again.val_domains[k]) for k in bundle.val_domains)


def test_this_machine_is_searched_without_errors():
    for kind in KINDS:
        files = machine_files(kind)  # whatever this machine has, possibly nothing
        assert files == sorted(files)
