import gzip
import json

import pytest

from codexmini.data import DataConfig, build_data, check_data_config
from codexmini.data import machine_text


def _two(first, second=None):
    """A mixture whose source 1 is the one under test."""
    return {"sources": [{"name": "code", "source": "stdlib", "max_files": 5},
                        {"name": "under_test", **first}] + ([second] if second else [])}


@pytest.mark.parametrize("cfg, message", [
    ({"block_size": 1}, r"data.block_size must be >= 2, got 1"),
    ({"max_files": 0}, r"data.max_files must be >= 1 or null, got 0"),
    ({"val_fraction": 1.0}, r"data.val_fraction must be in \(0, 1\), got 1.0"),
    ({"val_fraction": 0}, r"data.val_fraction must be in \(0, 1\)"),
    ({"max_val_blocks": 0}, r"data.max_val_blocks must be >= 1 or null"),
    ({"mixture_stopping": "never"}, r"data.mixture_stopping 'never' is not one of"),
    ({"format": "csv"}, r"data.format 'csv' is not one of auto, text, json, jsonl, parquet, arrow"),
    (_two({"source": "stdlib", "weight": 0}), r"data.sources\[1\].weight must be a positive number, got 0"),
    (_two({"source": "stdlib", "weight": -1.0}), r"data.sources\[1\].weight must be a positive"),
    (_two({"source": "stdlib", "format": "xml"}), r"data.sources\[1\].format 'xml' is not one of"),
    (_two({"source": "stdlib", "max_docs": 0}), r"data.sources\[1\].max_docs must be >= 1 or null"),
    (_two({"source": "stdlib", "val_fraction": 1.5}), r"data.sources\[1\].val_fraction must be in \(0, 1\)"),
    (_two({"source": "stdlib", "name": "code"}), r"data.sources\[1\].name 'code' is also the name of "
                                                 r"data.sources\[0\]"),
    (_two({"source": "stdlib", "name": "a b"}), r"data.sources\[1\].name 'a b' must be a plain name"),
    (_two({"source": "machine_text", "kind": "poems"}), r"data.sources\[1\].kind 'poems' is not one of licences"),
    (_two({"source": "stdlib", "kind": "man"}), r"data.sources\[1\].kind is read only with source=machine_text"),
    (_two({"source": "teacher", "top_p": 0}), r"data.sources\[1\].top_p must be in \(0, 1\]"),
    (_two({"source": "teacher", "temperature": -1}), r"data.sources\[1\].temperature must be >= 0"),
    (_two({"source": "teacher", "gen_batch_size": 0}), r"data.sources\[1\].gen_batch_size must be >= 1"),
    (_two({"source": "teacher", "prompts": "/no/such/prompts.jsonl"}),
     r"data.sources\[1\].prompts '/no/such/prompts.jsonl': no such file"),
    ({"sources": [{"source": "stdlib", "eval_only": True}]}, r"every source is eval_only"),
])
def test_each_config_error_names_its_key(cfg, message):
    with pytest.raises(ValueError, match=message):
        check_data_config(cfg)


def test_file_errors_name_the_key(tmp_path, jsonl_file, text_corpus):
    cases = [
        ({"source": str(jsonl_file), "text_field": "body"},
         r"data.sources\[1\].text_field 'body' is not a column of .*rows.jsonl; columns: \['content', 'id'\]"),
        ({"source": str(tmp_path / "gone.jsonl")}, r"data.sources\[1\].source '.*gone.jsonl': no such file or "
                                                   r"folder"),
        ({"source": str(text_corpus)}, r"data.sources\[1\].source folder .* has no files matching "
                                       r"data.sources\[1\].file_glob='\*\*/\*.py'"),
        ({"source": str(tmp_path / "*.none")}, r"data.sources\[1\].source '.*\*.none' matches no files"),
    ]
    for source, message in cases:
        with pytest.raises(ValueError, match=message):
            check_data_config(_two(source))


def test_compressed_parquet_and_saved_dataset_columns_are_checked(tmp_path, rows):
    import datasets

    gz = tmp_path / "rows.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    pretty = tmp_path / "rows.json"
    pretty.write_text(json.dumps(rows, indent=2))
    for path in (gz, tmp_path / "rows.parquet", tmp_path / "saved", pretty):
        check_data_config(_two({"source": str(path), "text_field": "content"}))
        with pytest.raises(ValueError, match=r"data.sources\[1\].text_field 'text' is not a column of"):
            check_data_config(_two({"source": str(path)}))


def test_too_few_tokens_and_mixed_formats(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("short")
    (tmp_path / "tiny" / "b.txt").write_text("text")
    with pytest.raises(ValueError, match=r"data.sources\[1\].source .* holds at most about 11 tokens .* fewer "
                                         r"than 2 block\(s\) of data.block_size=256"):
        check_data_config(_two({"source": str(tmp_path / "tiny"), "file_glob": "*.txt"}))
    (tmp_path / "tiny" / "c.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"mixes formats \['json', 'text'\]; set data.sources\[1\].format"):
        check_data_config(_two({"source": str(tmp_path / "tiny"), "file_glob": "*"}))


def test_build_data_runs_the_checks_first(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"data.sources\[1\].weight"):
        build_data(DataConfig(**_two({"source": "stdlib", "weight": 0})), tiny_tokenizer)


def test_a_machine_without_the_text_passes_checks_and_leaves_the_domain_out(monkeypatch, tmp_path,
                                                                            tiny_tokenizer):
    monkeypatch.setitem(machine_text.ROOTS, "man", [(tmp_path / "no_man", machine_text._man_pages)])
    cfg = DataConfig(block_size=64, sources=[{"source": "stdlib", "max_files": 6},
                                             {"source": "machine_text", "kind": "man", "eval_only": True}])
    check_data_config(cfg)
    with pytest.warns(UserWarning, match="leaving out domain 'man'"):
        bundle = build_data(cfg, tiny_tokenizer)
    assert list(bundle.val_domains) == ["stdlib"] and "man" in bundle.stats["skipped_domains"]


def test_an_unknown_key_in_a_source_is_named():
    with pytest.raises(ValueError, match=r"data.sources\[0\]: unknown key\(s\) \['wieght'\]"):
        check_data_config({"sources": [{"source": "stdlib", "wieght": 2}]})
