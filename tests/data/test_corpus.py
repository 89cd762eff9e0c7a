import json

import pytest
import torch

from codexmini.data import DataConfig, build_data, perplexity, source_files
from codexmini import CodexMiniForCausalLM
from tests.conftest import tiny_config


def test_text_folder_builds_deterministic_blocks(text_corpus):
    cfg = DataConfig(source=str(text_corpus), file_glob="*.txt", block_size=32, tokenizer_vocab_size=300,
                     val_fraction=0.34)
    a, b = build_data(cfg), build_data(cfg)
    assert a.train.shape[1] == 32 and a.train.dtype == torch.int64
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.stats["documents_val"] == 2 and a.stats["documents_train"] == 4
    assert len(a.calibration) == min(cfg.num_calibration, len(a.train))
    # EOS separates documents in the packed stream.
    assert (a.train == a.tokenizer.eos_token_id).any()


def test_seed_changes_the_split(text_corpus):
    cfg = DataConfig(source=str(text_corpus), file_glob="*.txt", block_size=16, tokenizer_vocab_size=300,
                     val_fraction=0.34)
    splits = {tuple(build_data(DataConfig(**{**cfg.__dict__, "seed": s})).val[0, :8].tolist()) for s in range(4)}
    assert len(splits) > 1


def test_jsonl_and_parquet_sources(tmp_path, tiny_tokenizer):
    rows = [{"content": f"def f{i}(x):\n    return x * {i}\n" * 20} for i in range(5)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    bundle = build_data(DataConfig(source=str(jsonl), text_field="content", block_size=16), tiny_tokenizer)
    assert bundle.stats["documents_train"] + bundle.stats["documents_val"] == 5
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
    pq = build_data(DataConfig(source=str(tmp_path / "data.parquet"), text_field="content", block_size=16),
                    tiny_tokenizer)
    assert torch.equal(pq.train, bundle.train)


def test_missing_column_and_missing_files_are_named(tmp_path, tiny_tokenizer):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "x"}\n{"body": "y"}\n')
    with pytest.raises(KeyError, match="text_field 'text'.*columns: \\['body'\\]"):
        build_data(DataConfig(source=str(jsonl)), tiny_tokenizer)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        build_data(DataConfig(source=str(tmp_path / "nothing" / "*.txt")), tiny_tokenizer)


def test_stdlib_corpus_with_a_small_file_limit(tiny_tokenizer):
    cfg = DataConfig(max_files=12, block_size=64)
    files = source_files(cfg)
    assert len(files) == 12 and all(f.suffix == ".py" for f in files)
    bundle = build_data(cfg, tiny_tokenizer)
    assert bundle.stats["documents_val"] >= 1 and len(bundle.val) >= 1
    text = tiny_tokenizer.decode(bundle.train.flatten())
    assert "import " in text and "def " in text


def test_perplexity_of_uniform_model_is_vocab_size():
    model = CodexMiniForCausalLM(tiny_config())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    blocks = torch.randint(0, 300, (3, 10))
    result = perplexity(model, blocks, batch_size=2)
    assert result["tokens"] == 27
    assert abs(result["ppl"] - 300) < 1e-2
