import json
import subprocess
import sys

import pytest
import torch

from codexmini.cmx import CmxError, read_cmx
from codexmini.export.to_cmx import export_cmx
from codexmini.quantize import QuantizeConfig, quantize_model
from codexmini.runtime import Runtime, SamplingConfig
from tests.conftest import tiny_model

VARIANTS = {
    "softmax": dict(layer_types=["softmax", "softmax"]),
    "linear_elu_decay": dict(layer_types=["linear", "linear"], linear_decay=True),
    "hybrid_hedgehog": dict(layer_types=["hybrid", "softmax"], feature_map="hedgehog"),
    "mixed_taylor": dict(layer_types=["linear", "hybrid"], feature_map="taylor", linear_decay=True),
    "relu_untied_factored": dict(layer_types=["softmax", "linear"], feature_map="relu", tie_word_embeddings=False,
                                 embedding_rank=16),
}


def _model(**kw):
    return tiny_model(**kw)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(3)
    return torch.randint(4, 300, (1, 40))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_runtime_logits_equal_pytorch_prefill_and_decode(variant, ids, tiny_tokenizer, tmp_path):
    model = _model(**VARIANTS[variant])
    path = export_cmx(model, tiny_tokenizer, tmp_path / "m.cmx")
    rt = Runtime(path)
    with torch.no_grad():
        want = model(ids).logits[0]
    s = rt.new_session()
    got = rt.forward(ids[0], s, all_logits=True)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # A prompt longer than the prefill chunk runs in pieces that continue each other's caches / states.
    rt_small = Runtime(path, prefill_chunk=7)
    torch.testing.assert_close(rt_small.forward(ids[0], rt_small.new_session(), all_logits=True), want,
                               atol=2e-4, rtol=1e-4)
    # Prefill a prefix, then token by token (crossing the hybrid window and the linear chunks).
    s = rt.new_session()
    steps = [rt.forward(ids[0, :13], s, all_logits=True)]
    for t in range(13, 40):
        steps.append(rt.forward(ids[0, t:t + 1], s, all_logits=True))
    torch.testing.assert_close(torch.cat(steps), want, atol=2e-4, rtol=1e-4)


def test_greedy_generation_equals_transformers_generate(tiny_tokenizer, tmp_path):
    model = _model(layer_types=["hybrid", "linear"], feature_map="hedgehog", linear_decay=True)
    rt = Runtime(export_cmx(model, tiny_tokenizer, tmp_path / "m.cmx"))
    prompt = "def add(a, b):"
    pids = tiny_tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    hf = model.generate(pids, max_new_tokens=30, do_sample=False, min_new_tokens=30, pad_token_id=3)
    ref = hf[0, pids.shape[1]:].tolist()
    from codexmini.runtime.sampling import stream_tokens

    got = list(stream_tokens(rt, pids[0].tolist(), SamplingConfig(max_tokens=30, stop_at_eos=False)))
    assert got == ref


@pytest.mark.parametrize("scheme, mode", [("int8", "native"), ("int4_g32", "native"), ("int4_g32_asym", "native"),
                                          ("int4_g16", "native"), ("int3_g32", "native"), ("int2_g16_asym", "auto"),
                                          ("int4_g32", "dequant"), ("int8", "dequant"), ("int3_g16_asym", "auto"),
                                          ("int4_g8", "auto"), ("int4_g8", "native"), ("int4_g32_min", "auto"),
                                          ("int4_g32_min", "native"), ("int3_g32_min", "auto")])
def test_quantized_runtime_equals_the_dequantized_reference(scheme, mode, ids, tiny_tokenizer, tmp_path):
    model = _model(layer_types=["softmax", "hybrid"], hidden_size=64, intermediate_size=128,
                   tie_word_embeddings=False)
    model, _ = quantize_model(model, QuantizeConfig(method="rtn", default=scheme,
                                                    rules=[{"pattern": "lm_head", "scheme": "int8"}]))
    path = export_cmx(model, tiny_tokenizer, tmp_path / "q.cmx")
    with torch.no_grad():
        want = model(ids).logits[0]  # QuantLinear computes with the dequantized weights
    rt = Runtime(path, kernels=mode, act_dtype="float32")
    got = rt.forward(ids[0], rt.new_session(), all_logits=True)
    torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-3)
    # The default feeds the int kernels bf16 activations: equal up to bf16 rounding.
    rt = Runtime(path, kernels=mode)
    got = rt.forward(ids[0], rt.new_session(), all_logits=True)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
    assert (tmp_path / "q.cmx").stat().st_size < 0.6 * sum(p.numel() * 4 for p in _model().parameters())


def test_fp16_export_is_smaller_and_close(ids, tiny_tokenizer, tmp_path):
    model = _model(layer_types=["softmax", "linear"])
    a = export_cmx(model, tiny_tokenizer, tmp_path / "a.cmx")
    b = export_cmx(model, tiny_tokenizer, tmp_path / "b.cmx", dtype="float16")
    assert b.stat().st_size < 0.6 * a.stat().st_size
    la = Runtime(a).forward(ids[0], Runtime(a).new_session(), all_logits=True)
    rb = Runtime(b)
    lb = rb.forward(ids[0], rb.new_session(), all_logits=True)
    torch.testing.assert_close(la, lb, atol=2e-2, rtol=2e-2)


def test_saved_session_gives_the_same_continuation(tiny_tokenizer, tmp_path):
    model = _model(layer_types=["hybrid", "softmax"], feature_map="hedgehog")
    rt = Runtime(export_cmx(model, tiny_tokenizer, tmp_path / "m.cmx"))
    system = "class Stack:\n    def push(self, x):\n        self.items.append(x)\n"
    s = rt.new_session()
    rt.forward(tiny_tokenizer(system, add_special_tokens=False).input_ids, s)
    rt.save_session(s, tmp_path / "sys.session")
    cfg = SamplingConfig(max_tokens=20, temperature=0.8, top_k=40, top_p=0.9, seed=7, stop_at_eos=False)
    direct = rt.generate("    def pop", cfg, session=s)
    restored = rt.load_session(tmp_path / "sys.session")
    assert restored.pos == len(restored.tokens) > 10
    assert rt.generate("    def pop", cfg, session=restored) == direct
    other = Runtime(export_cmx(_model(), tiny_tokenizer, tmp_path / "other.cmx"))
    with pytest.raises(CmxError, match="different model"):
        other.load_session(tmp_path / "sys.session")


@pytest.mark.parametrize("kernels", ["auto", "native"])
def test_session_saved_mid_decode_continues_identically(kernels, ids, tiny_tokenizer, tmp_path):
    """Saved after token-by-token decoding (the hybrid window past its size, in the fused path's ring buffer; the
    linear state split into kv and normaliser by codexmini's kernels): the file holds the ops functions' forms, and
    the restored session continues with the same logits, in the same or another kernel mode."""
    model = _model(layer_types=["hybrid", "linear"], feature_map="hedgehog", linear_decay=True)
    path = export_cmx(model, tiny_tokenizer, tmp_path / "m.cmx")
    rt = Runtime(path, kernels=kernels)
    s = rt.new_session()
    rt.forward(ids[0, :5], s)
    for t in range(5, 20):  # 15 decoded tokens: the 8-token window wraps
        rt.forward(ids[0, t:t + 1], s)
    rt.save_session(s, tmp_path / "mid.session")
    want = torch.stack([rt.forward(ids[0, t:t + 1], s) for t in range(20, 30)])
    for other in (rt, Runtime(path, kernels="dequant")):
        restored = other.load_session(tmp_path / "mid.session")
        state = restored.layers[1]["state"]  # [H, F, D+1]: the normaliser as the last column
        assert sorted(restored.layers[1]) == ["state"] and state.shape[-1] == rt.layers[1].hd + 1
        got = torch.stack([other.forward(ids[0, t:t + 1], restored) for t in range(20, 30)])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(want, model(ids[:, :30]).logits[0, 20:30], atol=2e-4, rtol=1e-4)


def test_float16_kv_caches_halve_the_cache_and_stay_close(ids, tiny_tokenizer, tmp_path):
    """kv_dtype: "auto" keeps float16 KV caches with codexmini's kernels (half the bytes) and float32 with torch's;
    float16 logits stay within float16 rounding of float32's, which match the PyTorch model tightly; a session
    saved from one loads into the other in the loader's dtype; a bad value names the choices."""
    from codexmini.runtime import native

    model = _model(layer_types=["softmax", "hybrid"], feature_map="hedgehog")
    path = export_cmx(model, tiny_tokenizer, tmp_path / "m.cmx")
    with torch.no_grad():
        want = model(ids[:, :30]).logits[0]
    exact = Runtime(path, kv_dtype="float32")
    s32 = exact.new_session()
    torch.testing.assert_close(exact.forward(ids[0, :30], s32, all_logits=True), want, atol=2e-4, rtol=1e-4)
    assert Runtime(path, kernels="native").kv_dtype == torch.float32
    ext = native.load()
    # auto: float16 where codexmini's kernels attend in AVX-512
    assert Runtime(path).kv_dtype == (torch.float16 if ext is not None and ext.vector_attention() else torch.float32)
    half = Runtime(path, kv_dtype="float16")
    s16 = half.new_session()
    got = torch.cat([half.forward(ids[0, :12], s16, all_logits=True)]
                    + [half.forward(ids[0, t:t + 1], s16, all_logits=True) for t in range(12, 30)])
    assert s16.layers[0]["k"].dtype == torch.float16 and s32.layers[0]["k"].dtype == torch.float32
    assert s16.layers[0]["k"].nbytes * 2 == s32.layers[0]["k"].nbytes
    torch.testing.assert_close(got, want, atol=5e-3, rtol=5e-3)
    half.save_session(s16, tmp_path / "half.session")
    restored = exact.load_session(tmp_path / "half.session")
    assert restored.layers[0]["k"].dtype == torch.float32
    torch.testing.assert_close(exact.forward(ids[0, 30:31], restored), half.forward(ids[0, 30:31], s16),
                               atol=5e-3, rtol=5e-3)
    with pytest.raises(ValueError, match="kv_dtype must be one of auto, float16, float32"):
        Runtime(path, kv_dtype="bfloat16")


def test_sampling_options_and_stop_strings(tiny_tokenizer, tmp_path):
    rt = Runtime(export_cmx(_model(), tiny_tokenizer, tmp_path / "m.cmx"))
    cfg = SamplingConfig(max_tokens=25, temperature=1.0, seed=1, stop_at_eos=False)
    assert rt.generate("def", cfg) == rt.generate("def", cfg)  # seeded
    pieces = list(rt.stream("def", cfg))
    assert "".join(pieces) == rt.generate("def", cfg) and len(pieces) > 1
    full = rt.generate("def", SamplingConfig(max_tokens=25, stop_at_eos=False))
    stop = full[5:8]
    cut = rt.generate("def", SamplingConfig(max_tokens=25, stop=[stop], stop_at_eos=False))
    assert cut == full[:full.find(stop)]
    assert len(rt.generate_batch(["def", "class"], SamplingConfig(max_tokens=5, stop_at_eos=False))) == 2
    with pytest.raises(ValueError, match="top_p"):
        rt.generate("def", SamplingConfig(top_p=0))
    # Repetition penalty changes greedy output away from repeats; top_k=1 is greedy.
    greedy = rt.generate("def", SamplingConfig(max_tokens=10, stop_at_eos=False))
    assert rt.generate("def", SamplingConfig(max_tokens=10, temperature=1.0, top_k=1, seed=3,
                                             stop_at_eos=False)) == greedy


def test_bad_files_are_refused_with_their_own_message(tiny_tokenizer, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = export_cmx(_model(), tiny_tokenizer, tmp_path / "m.cmx")
    data = good.read_bytes()
    (tmp_path / "trunc.cmx").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    (tmp_path / "flip.cmx").write_bytes(bytes(flipped))
    for mmap in (False, True):  # copied tensors, and the runtime's memory-mapped ones
        with pytest.raises(CmxError, match="truncated"):
            read_cmx(tmp_path / "trunc.cmx", mmap=mmap)
        with pytest.raises(CmxError, match="checksum mismatch"):
            read_cmx(tmp_path / "flip.cmx", mmap=mmap)
    copied, mapped = read_cmx(good), read_cmx(good, mmap=True)
    assert copied.tensors.keys() == mapped.tensors.keys() and copied.checksum == mapped.checksum
    assert all(torch.equal(copied.tensors[k], mapped.tensors[k]) for k in copied.tensors)
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "newer.cmx"), metadata={**meta, "version": "99"})
    with pytest.raises(CmxError, match="version 99.*upgrade"):
        read_cmx(tmp_path / "newer.cmx")
    cfg = json.loads(meta["config"])
    cfg["hidden_size"] = 80
    save_file(tensors, str(tmp_path / "edited.cmx"), metadata={**meta, "config": json.dumps(cfg)})
    with pytest.raises(CmxError, match="shape"):
        read_cmx(tmp_path / "edited.cmx")
    save_file(tensors, str(tmp_path / "scheme.cmx"),
              metadata={**meta, "schemes": json.dumps({"model.layers.0.mlp.up_proj": "int3"})})
    with pytest.raises(CmxError, match="unknown quantization scheme 'int3'"):
        read_cmx(tmp_path / "scheme.cmx")
    save_file(tensors, str(tmp_path / "other.cmx"), metadata={"format": "something"})
    with pytest.raises(CmxError, match="not a codexmini .cmx file"):
        Runtime(tmp_path / "other.cmx")


def test_runtime_imports_without_transformers_hydra_datasets_accelerate(tiny_tokenizer, tmp_path):
    path = export_cmx(_model(layer_types=["hybrid", "linear"]), tiny_tokenizer, tmp_path / "m.cmx")
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('transformers', 'hydra', 'datasets', 'accelerate', 'omegaconf'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from codexmini.runtime import Runtime, SamplingConfig
rt = Runtime({str(path)!r})
print(len(rt.generate('def', SamplingConfig(max_tokens=5, stop_at_eos=False))) >= 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_mixed_schemes_in_one_layer_use_separate_kernels(ids, tiny_tokenizer, tmp_path):
    model = _model(layer_types=["linear", "softmax"], tie_word_embeddings=False)
    rules = [{"pattern": r"k_proj|up_proj", "scheme": "int8"}]
    model, _ = quantize_model(model, QuantizeConfig(method="rtn", default="int4_g32", rules=rules))
    rt = Runtime(export_cmx(model, tiny_tokenizer, tmp_path / "mixed.cmx"), act_dtype="float32")
    assert rt.layers[0].qkv is None and rt.layers[0].gate_up is None and rt.layers[0].k is not None
    with torch.no_grad():
        want = model(ids).logits[0]
    torch.testing.assert_close(rt.forward(ids[0], rt.new_session(), all_logits=True), want, atol=5e-4, rtol=1e-3)


def test_int8_embedding_table_in_the_runtime(ids, tiny_tokenizer, tmp_path):
    model = _model(layer_types=["hybrid", "softmax"], feature_map="hedgehog")
    cfg = QuantizeConfig(method="rtn", default="int4_g32", untie_head=True,
                         rules=[{"pattern": "embed_tokens", "scheme": "int8"},
                                {"pattern": "lm_head", "scheme": "int8"}])
    model, _ = quantize_model(model, cfg)
    rt = Runtime(export_cmx(model, tiny_tokenizer, tmp_path / "e.cmx"), act_dtype="float32")
    with torch.no_grad():
        want = model(ids).logits[0]
    torch.testing.assert_close(rt.forward(ids[0], rt.new_session(), all_logits=True), want, atol=5e-4, rtol=1e-3)


@pytest.mark.parametrize("scheme", ["int8", "int4_g32", "int4_g16_asym", "int3_g32", "int2_g32_asym"])
@pytest.mark.parametrize("mode", ["auto", "native", "dequant"])
def test_quantized_tied_table_is_the_head_in_the_runtime(scheme, mode, ids, tiny_tokenizer, tmp_path):
    """One quantized table, stored once: lookups dequantize its rows, the head reads it through an int kernel."""
    model = _model(layer_types=["hybrid", "softmax"], feature_map="hedgehog")
    model, _ = quantize_model(model, QuantizeConfig(method="rtn", default="int4_g32", embedding=scheme))
    path = export_cmx(model, tiny_tokenizer, tmp_path / "tied.cmx")
    f = read_cmx(path)
    assert f.config["tie_word_embeddings"] and f.schemes["model.embed_tokens"] == scheme
    assert not any(k.startswith("lm_head") for k in f.tensors) and "model.embed_tokens.weight" not in f.tensors
    assert f.tensors["model.embed_tokens.scale"].dtype == torch.float16
    rt = Runtime(path, kernels=mode, act_dtype="float32")
    with torch.no_grad():
        want = model(ids).logits[0]
    torch.testing.assert_close(rt.forward(ids[0], rt.new_session(), all_logits=True), want, atol=5e-4, rtol=1e-3)
    rows = torch.tensor([5, 299, 5, 0])
    torch.testing.assert_close(rt.lookup(rows), model.model.embed_tokens(rows), atol=0, rtol=0)


def test_version_2_quantized_files_still_load(ids, tiny_tokenizer, tmp_path):
    """Version 2 stored fp32 scales and a zero tensor for symmetric int4 (codes 1..15): same formula, same logits."""
    from codexmini.cmx import payload_checksum, save_safetensors_atomic
    from safetensors import safe_open

    model = _model(layer_types=["softmax", "linear"], tie_word_embeddings=False)
    model, _ = quantize_model(model, QuantizeConfig(method="rtn", default="int4_g32", embedding="none"))
    path = export_cmx(model, tiny_tokenizer, tmp_path / "v3.cmx")
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    old = {k: (v.float() if k.endswith(".scale") else v) for k, v in tensors.items()}
    for name, scheme in json.loads(meta["schemes"]).items():
        old[name + ".zero"] = torch.full(tensors[name + ".scale"].shape, 8, dtype=torch.uint8)
    meta = {**meta, "version": "2"}
    meta["checksum"] = payload_checksum(old, meta)
    v2 = save_safetensors_atomic(old, tmp_path / "v2.cmx", meta)
    assert read_cmx(v2).version == 2
    save_safetensors_atomic(old, tmp_path / "v3bad.cmx", {**meta, "version": "3"})
    with pytest.raises(CmxError, match="unexpected tensors"):  # version 3 stores no zero for symmetric int4
        read_cmx(tmp_path / "v3bad.cmx", verify_checksum=False)
    for kernels in ("auto", "native"):
        a, b = Runtime(path, kernels=kernels, act_dtype="float32"), Runtime(v2, kernels=kernels, act_dtype="float32")
        torch.testing.assert_close(b.forward(ids[0], b.new_session(), all_logits=True),
                                   a.forward(ids[0], a.new_session(), all_logits=True), atol=1e-5, rtol=1e-5)


def test_untied_embedding_rows_are_read_from_the_file_not_mapped(tiny_tokenizer, tmp_path):
    """An untied embedding table is looked up with reads of its rows (`FileRows`): the same rows as the mapped
    tensor, in the order asked, repeats included; an id outside the vocabulary is refused. A tied one, which the
    head reads whole, stays mapped."""
    from codexmini.runtime.model import FileRows

    path = export_cmx(_model(layer_types=["softmax", "linear"], tie_word_embeddings=False), tiny_tokenizer,
                      tmp_path / "u.cmx")
    rt = Runtime(path)
    assert isinstance(rt.embed, FileRows) and rt.embed.shape == (300, 64)
    table = read_cmx(path).tensors["model.embed_tokens.weight"]
    for ids in ([7], [5, 299, 5, 0, 17], list(range(300))[::-1]):
        torch.testing.assert_close(rt.embed[torch.tensor(ids)], table[ids], atol=0, rtol=0)
    with pytest.raises(IndexError, match="outside the vocabulary of 300"):
        rt.embed[torch.tensor([3, 300])]
    tied = Runtime(export_cmx(_model(layer_types=["softmax", "linear"]), tiny_tokenizer, tmp_path / "t.cmx"))
    assert torch.is_tensor(tied.embed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_weights_are_used_in_place_from_the_files_mapping(tiny_tokenizer, tmp_path):
    """Memory: the runtime computes with the file's mapped pages, not copies. Float q/k/v and gate/up stay side by
    side (a concatenated copy once doubled the fp32 model's weights); int4 layers with codexmini's kernels read
    the packed codes where they lie."""
    from codexmini.runtime import native

    def mapped_ranges(path):
        out = []
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith(str(path)):
                lo, hi = (int(a, 16) for a in line.split()[0].split("-"))
                out.append((lo, hi))
        return out

    def in_file(t, ranges):
        return any(lo <= t.data_ptr() < hi for lo, hi in ranges)

    model = _model(layer_types=["softmax", "linear"], tie_word_embeddings=False)
    path = export_cmx(model, tiny_tokenizer, tmp_path / "f32.cmx", dtype="float32")
    rt = Runtime(path)
    ranges = mapped_ranges(path)
    assert ranges
    for layer in rt.layers:
        for fused in (layer.qkv, layer.gate_up):
            assert all(in_file(p.weight, ranges) for p in fused.parts)
        assert in_file(layer.o.weight, ranges) and in_file(layer.down.weight, ranges)
    if native.load() is not None:
        qmodel, _ = quantize_model(model, QuantizeConfig(method="rtn", default="int4_g32"))
        qpath = export_cmx(qmodel, tiny_tokenizer, tmp_path / "q4.cmx")
        qrt = Runtime(qpath, kernels="cmx", act_dtype="float32")
        qranges = mapped_ranges(qpath)
        assert all(in_file(p.packed, qranges) for layer in qrt.layers for p in layer.qkv.parts)
        # the fast (int8) activations on a CPU with the panel kernel: a repacked copy of the same size instead
        fast = Runtime(qpath, kernels="cmx")
        qranges = mapped_ranges(qpath)  # this runtime's own mapping of the file too
        panels = native.load().panels() > 0
        for layer, exact in zip(fast.layers, qrt.layers):
            for p, q in zip(layer.qkv.parts, exact.qkv.parts):
                assert p.panels == panels and in_file(p.packed, qranges) != panels and p.nbytes == q.nbytes


def test_adjusted_row_adds_biases_and_takes_penalties_on_a_copy():
    """OpenAI's logit_bias and frequency / presence penalties, in float32 on a private copy of the row."""
    from collections import Counter

    from codexmini.runtime.sampling import adjusted_row

    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    counts = Counter([3, 3, 7])
    got = adjusted_row(logits, {5: -100.0, 9: 2.5}, counts, frequency=0.5, presence=0.25)
    want = logits.clone()
    want[torch.tensor([5, 9])] += torch.tensor([-100.0, 2.5])
    want[torch.tensor([3, 7])] -= 0.5 * torch.tensor([2.0, 1.0]) + 0.25
    assert torch.equal(got, want) and torch.equal(logits, before)
    assert torch.equal(adjusted_row(logits, {}, counts), logits)  # no penalty asked: the counts do nothing


def test_repacked_int4_layers_release_the_files_pages(tiny_tokenizer, tmp_path, monkeypatch):
    """Int4 layers repacked into panels compute from their copy: the file's pages under them, read once for the
    repack, leave the process (`CmxFile.release`), so the weights are not resident twice; the file maps back in
    when read again."""
    from codexmini.cmx import CmxFile
    from codexmini.runtime import native

    ext = native.load()
    if ext is None or not ext.panels():
        pytest.skip("the int4 panel kernels need a build with AVX-512 VNNI")

    def resident(path):  # kB of the file's mappings resident in this process
        total, ours = 0, False
        for line in open("/proc/self/smaps"):
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                ours = line.rstrip().endswith(str(path))
            elif ours and line.startswith("Rss:"):
                total += int(line.split()[1])
        return total

    model = _model(layer_types=["softmax", "softmax"], hidden_size=256, intermediate_size=1024)
    qmodel, _ = quantize_model(model, QuantizeConfig(method="rtn", default="int4_g32"))
    path = export_cmx(qmodel, tiny_tokenizer, tmp_path / "q4.cmx")
    int4_kb = sum(t.numel() for n, t in read_cmx(path).tensors.items() if n.endswith(".qweight")) // 1024
    ids = torch.arange(4, 30)
    exact = Runtime(path, act_dtype="float32")  # no panels: computes from the file's pages
    want = exact.forward(ids, exact.new_session())
    del exact
    assert resident(path) == 0  # that map is gone with it
    rt = Runtime(path)
    released = resident(path)
    assert released < int4_kb / 4, (released, int4_kb)
    torch.testing.assert_close(rt.forward(ids, rt.new_session()), want, atol=5e-2, rtol=5e-2)
    monkeypatch.setattr(CmxFile, "release", lambda self, t: None)
    kept = Runtime(path)
    assert resident(path) - released > int4_kb * 0.9  # without the release: the repacked pages stay
    del kept
