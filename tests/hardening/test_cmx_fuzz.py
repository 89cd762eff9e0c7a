"""Issue 16, item 6: the `.cmx` checksum covers the metadata (config, schemes, tokenizer, chat template, format and
version), the reader validates every config value the runtime uses, and a few hundred randomly damaged files
(flipped bytes, truncations, edited header JSON) give `CmxError` from `read_cmx` and `Runtime`, never another
exception type, and never a model that differs from the one exported."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from codexmini.cmx import VERSION, CmxError, payload_checksum, read_cmx, save_safetensors_atomic
from codexmini.runtime import Runtime
from codexmini.runtime.inputs import load_tokenizer


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    return struct.pack("<Q", len(text)) + text + body


def _contents(path):
    with open(path, "rb") as fh:
        header, _ = _split(fh.read())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return header["__metadata__"], {k: f.get_tensor(k) for k in f.keys()}


def _resign(tmp_path, tiny_cmx, edit, name="edited.cmx", version=None):
    """A copy of the file with `edit(config_dict, meta)` applied and a checksum that matches the edit: what only
    the value checks can catch."""
    meta, tensors = _contents(tiny_cmx)
    meta = dict(meta)
    config = json.loads(meta["config"])
    edit(config, meta)
    if "config" not in meta or meta["config"] == json.dumps(json.loads(_contents(tiny_cmx)[0]["config"]),
                                                             sort_keys=True):
        meta["config"] = json.dumps(config, sort_keys=True)
    if version is not None:
        meta["version"] = str(version)
    meta["checksum"] = payload_checksum(tensors, None if meta.get("version") == "1" else meta)
    return save_safetensors_atomic(tensors, tmp_path / name, meta)


def _same_model(got, original) -> bool:
    return (got.config == original.config and got.schemes == original.schemes and
            got.tokenizer_json == original.tokenizer_json and got.chat_template == original.chat_template and
            got.tensors.keys() == original.tensors.keys() and
            all(torch.equal(got.tensors[k], original.tensors[k]) for k in got.tensors))


def test_the_checksum_covers_every_metadata_entry(tiny_cmx, tmp_path):
    """Valid values, hand-edited (the issue's rope_theta moved logits by up to 5.6): refused as modified."""
    meta, tensors = _contents(tiny_cmx)
    assert meta["version"] == str(VERSION) == "3"
    config = json.loads(meta["config"])
    tokenizer = json.loads(meta["tokenizer"])
    tokenizer["added_tokens"] = tokenizer.get("added_tokens", [])[:-1]
    edits = {
        "rope_theta": {"config": json.dumps({**config, "rope_theta": 20000.0}, sort_keys=True)},
        "rms_norm_eps": {"config": json.dumps({**config, "rms_norm_eps": 1e-3}, sort_keys=True)},
        "sliding_window": {"config": json.dumps({**config, "sliding_window": 9}, sort_keys=True)},
        "schemes": {"schemes": json.dumps({**json.loads(meta["schemes"]), "lm_head": "int8"}, sort_keys=True) + " "},
        "tokenizer": {"tokenizer": json.dumps(tokenizer)},
        "chat_template": {"chat_template": "{{ messages }}"},
        "extra key": {"note": "added"},
    }
    for what, change in edits.items():
        path = save_safetensors_atomic(tensors, tmp_path / "e.cmx", {**meta, **change})
        for mmap in (False, True):
            with pytest.raises(CmxError, match="checksum mismatch"):
                read_cmx(path, mmap=mmap)
        with pytest.raises(CmxError, match="checksum mismatch"):
            Runtime(path)
    # Read back unedited, and the format/version entries are signed too: a damaged "3" read as "2" or "1" is
    # refused (by the checksum, or before it by the older version's layout).
    assert _same_model(read_cmx(tiny_cmx), read_cmx(tiny_cmx, mmap=True))
    for old in ("2", "1"):
        downgraded = save_safetensors_atomic(tensors, tmp_path / f"v{old}.cmx", {**meta, "version": old})
        with pytest.raises(CmxError, match="checksum mismatch|tensors missing|version . file holds"):
            read_cmx(downgraded)


def _legacy_layout(meta, tensors):
    """The tensors as format versions 1 and 2 stored them: fp32 scales, a zero tensor for symmetric int4 too."""
    old = {k: (v.float() if k.endswith(".scale") else v) for k, v in tensors.items()}
    for name, scheme in json.loads(meta["schemes"]).items():
        if scheme != "int8" and name + ".zero" not in old:
            old[name + ".zero"] = torch.full(tensors[name + ".scale"].shape, 8, dtype=torch.uint8)
    return old


def test_version_1_files_still_load(tiny_cmx, tmp_path):
    meta, tensors = _contents(tiny_cmx)
    tensors = _legacy_layout(meta, tensors)
    v1 = save_safetensors_atomic(tensors, tmp_path / "v1.cmx",
                                 {**meta, "version": "1", "checksum": payload_checksum(tensors)})
    f = read_cmx(v1, mmap=True)
    assert f.version == 1 and f.schemes == read_cmx(tiny_cmx).schemes
    ids = torch.arange(3, 40)
    a, b = Runtime(tiny_cmx, act_dtype="float32"), Runtime(v1, act_dtype="float32")
    torch.testing.assert_close(b.forward(ids, b.new_session(), all_logits=True),
                               a.forward(ids, a.new_session(), all_logits=True), atol=1e-5, rtol=1e-5)
    flipped = {**tensors, "model.norm.weight": tensors["model.norm.weight"] + 1}
    bad = save_safetensors_atomic(flipped, tmp_path / "v1bad.cmx", {**meta, "version": "1"})
    with pytest.raises(CmxError, match="checksum mismatch"):
        read_cmx(bad)


BAD_VALUES = [
    ("rope_theta", 0), ("rope_theta", -10000.0), ("rope_theta", "10000"), ("rope_theta", None),
    ("rms_norm_eps", 0), ("rms_norm_eps", -1e-5), ("rms_norm_eps", True),
    ("sliding_window", 0), ("sliding_window", -4), ("sliding_window", 8.5), ("sliding_window", None),
    ("linear_chunk_size", 0), ("hidden_size", "64"), ("hidden_size", 0), ("vocab_size", -1),
    ("num_hidden_layers", 0), ("num_hidden_layers", 4), ("head_dim", 15), ("head_dim", 0),
    ("layer_types", ["softmax", "bogus", "hybrid"]), ("layer_types", "softmax"), ("layer_types", ["softmax"]),
    ("feature_map", "bogus"), ("feature_map", None),
    ("layer_num_attention_heads", [4, 3, 4]), ("layer_num_attention_heads", [4, 0, 4]),
    ("layer_num_key_value_heads", [2, 2, 3]), ("layer_intermediate_sizes", [128, -1, 128]),
    ("embedding_rank", 64), ("tie_word_embeddings", "no"),
    ("eos_token_id", "eos"), ("eos_token_id", [-1]), ("max_position_embeddings", 0), ("feature_dim", 0),
]


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_every_config_value_the_runtime_uses_is_checked(tiny_cmx, tmp_path, key, value):
    def edit(config, meta):
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value

    path = _resign(tmp_path, tiny_cmx, edit)
    for mmap in (False, True):
        with pytest.raises(CmxError, match=key):
            read_cmx(path, mmap=mmap)
    with pytest.raises(CmxError, match=key):
        Runtime(path)


def test_a_valid_size_that_does_not_fit_the_tensors_names_the_tensor(tiny_cmx, tmp_path):
    path = _resign(tmp_path, tiny_cmx, lambda config, meta: config.update(layer_intermediate_sizes=[128, 128, 64]))
    with pytest.raises(CmxError, match="tensor model.layers.2.mlp.* has shape .* the config implies"):
        read_cmx(path)


@pytest.mark.parametrize("tokenizer, message", [
    ("garbage", "tokenizer"), ("", "tokenizer"), ("[]", "tokenizer"), ('{"model": 5}', "tokenizer"),
    ('{"model": {"vocab": 3}}', "tokenizer"), ('{"model": {}, "added_tokens": {}}', "tokenizer"),
])
def test_a_tokenizer_that_does_not_parse_is_a_cmx_error(tiny_cmx, tmp_path, tokenizer, message):
    path = _resign(tmp_path, tiny_cmx, lambda config, meta: meta.update(tokenizer=tokenizer))
    with pytest.raises(CmxError, match=message):
        read_cmx(path)
    with pytest.raises(CmxError, match=message):
        Runtime(path)


def test_a_tokenizer_json_the_library_rejects_is_a_cmx_error(tiny_cmx):
    """The reader checks the tokenizer's outline; what only the tokenizers library can tell (an unknown model
    type) is `load_tokenizer`'s CmxError, naming the file."""
    meta, _ = _contents(tiny_cmx)
    assert load_tokenizer(meta["tokenizer"], tiny_cmx).get_vocab_size() > 256
    with pytest.raises(CmxError, match=f"{tiny_cmx}: metadata 'tokenizer'"):
        load_tokenizer('{"model": {"type": "NoSuchModel", "vocab": {}}}', tiny_cmx)


@pytest.mark.parametrize("meta_edit", [
    {"schemes": '{"lm_head": 8}'}, {"schemes": "[]"}, {"config": "[1, 2]"}, {"config": '{"rope_theta": NaN}'},
    {"version": "two"}, {"version": "-1"}, {"version": "٢"}, {"format": "other"},
])
def test_malformed_metadata_entries_are_cmx_errors(tiny_cmx, tmp_path, meta_edit):
    meta, tensors = _contents(tiny_cmx)
    meta = {**meta, **meta_edit}
    meta["checksum"] = payload_checksum(tensors, meta)
    path = save_safetensors_atomic(tensors, tmp_path / "m.cmx", meta)
    with pytest.raises(CmxError):
        read_cmx(path)


def _damage(rng: random.Random, data: bytes) -> bytes:
    header, body = _split(data)
    n = len(data) - len(body)
    kind = rng.choice(["flip", "flip_header", "truncate", "edit_meta", "edit_meta", "edit_tensor_entry",
                       "drop_meta"])
    if kind in ("flip", "flip_header"):
        out = bytearray(data)
        hi = n if kind == "flip_header" else len(data)
        for i in rng.sample(range(hi), rng.randint(1, 8)):
            out[i] ^= rng.randint(1, 255)
        return bytes(out)
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    meta = header["__metadata__"]
    if kind == "drop_meta":
        meta.pop(rng.choice(sorted(meta)))
        return _join(header, body)
    if kind == "edit_tensor_entry":
        name = rng.choice(sorted(k for k in header if k != "__metadata__"))
        entry = header[name]
        choice = rng.randrange(3)
        if choice == 0:
            entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I8", "U8", "I64", "F64", "BOOL"])
        elif choice == 1:
            entry["shape"] = [max(0, d + rng.choice([-1, 1])) for d in entry["shape"]] or [1]
        else:
            header[name + "_x"] = header.pop(name)
        return _join(header, body)
    key = rng.choice(sorted(meta))
    text = meta[key]
    if key in ("config", "schemes") and rng.random() < 0.6:
        value = json.loads(text)
        if isinstance(value, dict) and value:
            field = rng.choice(sorted(value))
            value[field] = rng.choice([0, -1, 1.5, 1e300, "x", None, [], {}, True, 10 ** 12, [0], "softmax"])
            meta[key] = json.dumps(value)
            return _join(header, body)
    if text and rng.random() < 0.7:
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice(["", "0", "\"", "}", "é", "\x00", "9" * 5]) + text[i + 1:]
    else:
        text = rng.choice(["", "null", "{}", "[]", "0", "NaN", "\udcff".encode("utf-8", "surrogatepass").decode(
            "utf-8", "replace")])
    meta[key] = text
    return _join(header, body)


def test_a_few_hundred_damaged_files_give_cmx_errors_only(tiny_cmx, tmp_path):
    original = read_cmx(tiny_cmx)
    data = tiny_cmx.read_bytes()
    rng = random.Random(1616)
    outcomes = {"refused": 0, "harmless": 0}
    path = tmp_path / "damaged.cmx"
    for i in range(300):
        damaged = _damage(rng, data)
        path.write_bytes(damaged)
        for reader in ("copy", "mmap", "runtime"):
            try:
                if reader == "runtime":
                    rt = Runtime(path)
                    got = read_cmx(path)
                    assert rt.config == original.config
                else:
                    got = read_cmx(path, mmap=reader == "mmap")
            except CmxError:
                outcomes["refused"] += 1
                continue
            except Exception as err:  # noqa: BLE001 - exactly what the test is about
                pytest.fail(f"case {i} ({reader}): {type(err).__name__}: {err}")
            # Loaded: only damage that changed nothing that is read (say, header padding) may pass.
            assert _same_model(got, original), f"case {i} ({reader}) loaded a different model"
            outcomes["harmless"] += 1
    assert outcomes["refused"] > 800, outcomes  # nearly every damage is refused
