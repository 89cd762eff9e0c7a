import gzip
import json

import pytest
import torch

from codexmini.data import DataConfig, MissingSource, build_data, source_files
from codexmini.data.sources import file_format, is_saved_dataset


@pytest.mark.parametrize("name, fmt", [("a.jsonl.gz", "json"), ("a.json.gz", "json"), ("a.JSONL", "json"),
                                       ("a.parquet", "parquet"), ("a.arrow", "arrow"), ("a.txt.gz", "text"),
                                       ("README.gz", "text"), ("mod.py", "text"), ("notes.v2.md", "text")])
def test_format_comes_from_the_full_suffix(tmp_path, name, fmt):
    assert file_format(tmp_path / name) == fmt


def test_gzipped_json_lines_are_read_as_rows_not_as_text(tmp_path, rows, jsonl_file, tiny_tokenizer):
    gz = tmp_path / "rows.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    plain = build_data(DataConfig(source=str(jsonl_file), text_field="content", block_size=16), tiny_tokenizer)
    packed = build_data(DataConfig(source=str(gz), text_field="content", block_size=16), tiny_tokenizer)
    assert torch.equal(plain.train, packed.train) and torch.equal(plain.val, packed.val)
    text = tiny_tokenizer.decode(packed.train.flatten())
    assert "return x *" in text and '"content"' not in text and "\\n" not in text


def test_saved_datasets_and_arrow_files(tmp_path, rows, jsonl_file, tiny_tokenizer):
    import datasets

    reference = build_data(DataConfig(source=str(jsonl_file), text_field="content", block_size=16),
                           tiny_tokenizer)
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(train=ds, test=ds.select([0])).save_to_disk(str(tmp_path / "saved_dict"))
    assert is_saved_dataset(tmp_path / "saved") and is_saved_dataset(tmp_path / "saved_dict")
    for folder in ("saved", "saved_dict"):
        bundle = build_data(DataConfig(source=str(tmp_path / folder), text_field="content", block_size=16),
                            tiny_tokenizer)
        assert torch.equal(bundle.train, reference.train) and torch.equal(bundle.val, reference.val)
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))[0]
    from_arrow = build_data(DataConfig(source=str(arrow), text_field="content", block_size=16), tiny_tokenizer)
    assert torch.equal(from_arrow.train, reference.train)


def test_a_mixture_of_formats_with_its_own_fields(tmp_path, rows, jsonl_file, text_corpus, tiny_tokenizer):
    import datasets

    datasets.Dataset.from_list([{"body": r["content"]} for r in rows]).to_parquet(str(tmp_path / "rows.parquet"))
    cfg = DataConfig(block_size=16, sources=[
        {"name": "code_rows", "source": str(jsonl_file), "text_field": "content", "weight": 1},
        {"name": "parquet_rows", "source": str(tmp_path / "rows.parquet"), "text_field": "body", "weight": 1},
        {"name": "files", "source": str(text_corpus), "file_glob": "*.txt", "max_files": 4, "weight": 2}])
    bundle = build_data(cfg, tiny_tokenizer)
    assert list(bundle.val_domains) == ["code_rows", "parquet_rows", "files"]
    assert bundle.stats["domains"]["files"]["documents_train"] + bundle.stats["domains"]["files"][
        "documents_val"] == 4
    # max_docs: a seeded sample of rows
    cfg.sources[0].max_docs = 3
    assert build_data(cfg, tiny_tokenizer).stats["domains"]["code_rows"]["documents_train"] == 2


def test_missing_file_and_folder_are_named_as_such(tmp_path, text_corpus):
    with pytest.raises(MissingSource, match=r"data.source '.*none.jsonl': no such file or folder"):
        source_files(DataConfig(source=str(tmp_path / "none.jsonl")))
    with pytest.raises(MissingSource, match=r"folder .* has no files matching data.file_glob='\*\*/\*.py'"):
        source_files(DataConfig(source=str(text_corpus)))
    with pytest.raises(ValueError, match="matches no files"):  # a glob
        source_files(DataConfig(source=str(tmp_path / "*.nothing")))
    assert len(source_files(DataConfig(source=str(text_corpus / "*.txt")))) == 6
