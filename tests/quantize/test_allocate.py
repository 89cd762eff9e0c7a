"""Bits where they matter: calibration statistics, per-tensor sensitivity, and the size-budget allocation."""

import pytest
import torch

from codexmini.export.to_cmx import export_cmx, model_tensors
from codexmini.quantize import QuantizeConfig, quantize_model
from codexmini.quantize.allocate import CalibrationStats, allocate, collect_stats, sensitivity, tensor_bytes
from codexmini.quantize.gptq import HessianAccumulator, gptq_quantize
from codexmini.ops.layouts import dequantize_group, quantize_rtn
from tests.conftest import seeded_model


def test_statistics_are_mean_squared_inputs_and_output_gradients(calib):
    model = seeded_model()
    name = "model.layers.0.mlp.down_proj"
    stats = collect_stats(model, calib, [name, "model.embed_tokens"], fisher=True)
    seen = []
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        model(calib)
    h.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    torch.testing.assert_close(stats.importance[name], x.pow(2).mean(0), rtol=1e-4, atol=1e-7)
    assert stats.tokens == calib.numel() and stats.fisher[name].shape == (64,)
    assert (stats.fisher[name] > 0).all()
    # the tied table: its head input (the final norm's output) and the gradients at every looked-up row
    assert stats.importance["model.embed_tokens"].shape == (64,)
    assert stats.lookup_ids.shape == (calib.numel(),) and stats.lookup_fisher.shape == (calib.numel(), 64)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # nothing trained


def test_a_tensor_with_more_fisher_weight_gets_more_bits():
    model = seeded_model()
    a, b = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule(b).weight.copy_(model.get_submodule(a).weight)  # same weights, different weight
    stats = CalibrationStats(importance={a: torch.ones(64), b: torch.ones(64)},
                             fisher={a: torch.full((128,), 100.0), b: torch.ones(128)}, tokens=1)
    cands = ["int2_g32_asym", "int4_g32", "int8"]
    assert sensitivity(model, a, "int4_g32", stats, True) == pytest.approx(
        100 * sensitivity(model, b, "int4_g32", stats, True), rel=1e-5)
    budget = tensor_bytes(model, a, "int8") + tensor_bytes(model, b, "int2_g32_asym")
    schemes, report = allocate(model, [a, b], cands, budget, stats)
    assert schemes == {a: "int8", b: "int2_g32_asym"}
    assert report["quantized_mb"] * 1e6 <= budget and report["counts"] == {"int8": 1, "int2_g32_asym": 1}
    # a budget below the smallest candidates is refused, naming the keys to change
    with pytest.raises(ValueError, match="quantize.target_mb / target_bits"):
        allocate(model, [a, b], cands, tensor_bytes(model, a, "int2_g32_asym"), stats)


def test_size_budget_end_to_end_fits_and_beats_the_uniform_scheme_of_that_size(calib):
    teacher = seeded_model(tie_word_embeddings=True)
    with torch.no_grad():
        want = torch.log_softmax(teacher(calib).logits, -1)

    def kl(m):
        with torch.no_grad():
            got = torch.log_softmax(m(calib).logits, -1)
        return float((want.exp() * (want - got)).sum(-1).mean())

    uniform, _ = quantize_model(seeded_model(tie_word_embeddings=True),
                                QuantizeConfig(method="gptq", default="int3_g32", embedding="int4_g32"), calib)
    size = sum(t.numel() * t.element_size() for t in model_tensors(uniform, "float16").values())
    cfg = QuantizeConfig(method="gptq", target_mb=size / 1e6, candidates=["int2_g32_asym", "int3_g32", "int4_g32",
                                                                            "int8"])
    allocated, report = quantize_model(seeded_model(tie_word_embeddings=True), cfg, calib)
    got = sum(t.numel() * t.element_size() for t in model_tensors(allocated, "float16").values())
    assert got <= size
    assert len(report["allocation"]["counts"]) > 1 and set(report["schemes"]) == set(report["allocation"]["sensitivity"])
    assert kl(allocated) < kl(uniform), (kl(allocated), kl(uniform))
    with pytest.raises(ValueError, match="both set"):
        quantize_model(seeded_model(), QuantizeConfig(target_mb=1.0, target_bits=4.0), calib)
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_model(seeded_model(), QuantizeConfig(method="rtn", target_bits=4.0))


def test_rules_pin_tensors_outside_the_budget(calib):
    cfg = QuantizeConfig(method="rtn", target_bits=5.0, rules=[{"pattern": "down_proj", "scheme": "int8"}])
    _, report = quantize_model(seeded_model(), cfg, calib)
    assert all(s == "int8" for n, s in report["schemes"].items() if "down_proj" in n)
    assert not any("down_proj" in n for n in report["allocation"]["sensitivity"])


def test_importance_weighted_search_and_gptq_lower_the_output_error():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    x = torch.randn(512, 64) * torch.linspace(0.05, 3, 64)  # columns of very different scale
    imp = x.pow(2).mean(0)
    err = lambda wq: float((x @ (wq - w).t()).pow(2).mean())  # noqa: E731
    plain = err(dequantize_group(quantize_rtn(w, "int3_g32")))
    weighted = err(dequantize_group(quantize_rtn(w, "int3_g32", imp, search=True)))
    assert weighted < 0.9 * plain
    acc = HessianAccumulator(64)
    acc.add(x)
    for bits in (4, 3, 2):
        g = gptq_quantize(w, acc.value(), bits, 32, bits != 2, search=False)
        gs = gptq_quantize(w, acc.value(), bits, 32, bits != 2, search=True)
        assert g.bits == gs.bits == bits
        assert err(dequantize_group(gs)) <= err(dequantize_group(g)) * 1.02


def test_budget_file_round_trips_through_the_cmx_and_runtime(calib, tiny_tokenizer, tmp_path):
    from codexmini.runtime import Runtime

    model, report = quantize_model(seeded_model(tie_word_embeddings=True),
                                   QuantizeConfig(method="rtn", target_bits=4.0), calib)
    path = export_cmx(model, tiny_tokenizer, tmp_path / "b.cmx", dtype="float16")
    rt = Runtime(path, act_dtype="float32")
    with torch.no_grad():
        want = model(calib[:1]).logits[0]
    torch.testing.assert_close(rt.forward(calib[0], rt.new_session(), all_logits=True), want, atol=5e-4, rtol=1e-3)


@pytest.mark.parametrize("scheme", ["int8", "int4_g32", "int3_g16_asym", "int2_g32_asym"])
@pytest.mark.parametrize("search", [False, True])
def test_the_unpacked_error_equals_the_packed_round_trip(scheme, search):
    from codexmini.quantize.allocate import quant_error
    from codexmini.ops.layouts import GroupWeight, dequantize_int8

    torch.manual_seed(0)
    w, imp = torch.randn(24, 64), torch.rand(64)
    q = quantize_rtn(w, scheme, imp, search)
    want = (dequantize_group(q) if isinstance(q, GroupWeight) else dequantize_int8(*q)) - w
    torch.testing.assert_close(quant_error(w, scheme, imp, search), want, atol=1e-7, rtol=0)


def test_file_overhead_covers_what_a_cmx_holds_besides_its_tensors(tiny_tokenizer, tmp_path):
    """The bytes a size budget reserves for the header: the tokenizer and chat template as the header stores them
    (JSON-escaped: a template of quotes and newlines takes twice its length there), and an index entry per tensor."""
    import copy

    from codexmini.quantize.apply import file_overhead_bytes

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = '{{ "\\n" }}"' * 20_000  # 200 KB of characters JSON escapes, far above the fixed margin
    model = seeded_model()
    reserved = file_overhead_bytes(tok, model)
    quantized, _ = quantize_model(model, QuantizeConfig(method="rtn", default="int4_g32_asym"))
    path = export_cmx(quantized, tok, tmp_path / "m.cmx", dtype="float16")
    tensors = sum(t.numel() * t.element_size() for t in model_tensors(quantized, "float16").values())
    actual = path.stat().st_size - tensors
    assert actual <= reserved <= 1.1 * actual, (actual, reserved)  # and not far above it: tiny files fit too


def test_a_grid_scheme_joins_only_the_tensors_that_sit_on_it_exactly(calib):
    """Weights on llama.cpp's Q4_1 grid (int4_g32_min) requantize onto it for free: the allocation takes it there,
    and leaves it out for tensors that only lie near that grid (a fine-tuned copy) or on none."""
    from codexmini.ops.layouts import fake_quant
    from codexmini.quantize.allocate import on_grid

    model = seeded_model()
    exact, near = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        w = fake_quant(model.get_submodule(exact).weight, "int4_g32_min")
        model.get_submodule(exact).weight.copy_(w)
        model.get_submodule(near).weight.copy_(w + 1e-4 * torch.randn_like(w))
    assert on_grid(model.get_submodule(exact).weight.detach(), "int4_g32_min")
    assert not on_grid(model.get_submodule(near).weight.detach(), "int4_g32_min")
    stats = collect_stats(model, calib, [exact, near], fisher=True)
    budget = 2 * tensor_bytes(model, exact, "int4_g32_min")
    schemes, report = allocate(model, [exact, near], ["int3_g32", "int4_g32", "int8"], budget, stats,
                               ["int4_g32_min"])
    assert schemes[exact] == "int4_g32_min" and report["on_grid"] == {"int4_g32_min": 1}
    assert "int4_g32_min" not in report["sensitivity"][near] and schemes[near] != "int4_g32_min"
    assert report["sensitivity"][exact]["int4_g32_min"] == 0.0
    with pytest.raises(ValueError, match=r"quantize.grid_schemes\[0\]"):
        quantize_model(seeded_model(), QuantizeConfig(target_bits=5.0, grid_schemes=["int5_g32_min"]), calib)
