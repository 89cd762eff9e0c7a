import pytest
import torch

from codexmini import CodexMiniForCausalLM
from codexmini.models.quantized import QuantLinear
from codexmini.quantize import QuantizeConfig, quantize_model, resolve_schemes
from codexmini.quantize.gptq import HessianAccumulator, gptq_quantize
from codexmini.quantize.numerics import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from tests.conftest import seeded_model


def _model(**kw):
    return seeded_model(**{"num_hidden_layers": 3, "layer_types": ["softmax", "linear", "hybrid"],
                           "tie_word_embeddings": False, **kw})


def _correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * (torch.rand(d, generator=g) * 3)[None]
    return torch.randn(n, d, generator=g) @ mix


@pytest.mark.parametrize("bits, group, sym", [(4, 32, True), (4, 16, False), (4, 32, "min"), (8, None, True)])
def test_gptq_layer_error_is_below_rtn_on_the_same_calibration(bits, group, sym):
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    x = _correlated_inputs(512, 64)
    acc = HessianAccumulator(64)
    acc.add(x)
    if bits == 4:
        rtn = dequantize_int4(quantize_int4(w, group, sym))
        gq = dequantize_int4(gptq_quantize(w, acc.value(), 4, group, sym))
    else:
        rtn = dequantize_int8(*quantize_int8(w))
        gq = dequantize_int8(*gptq_quantize(w, acc.value(), 8))
    err = lambda wq: float((x @ (wq - w).t()).pow(2).mean())  # noqa: E731
    assert err(gq) < 0.8 * err(rtn), (err(gq), err(rtn))


def test_gptq_act_order_keeps_the_contiguous_group_layout():
    torch.manual_seed(0)
    w, x = torch.randn(16, 64), _correlated_inputs(256, 64)
    acc = HessianAccumulator(64)
    acc.add(x)
    q = gptq_quantize(w, acc.value(), 4, 32, act_order=True)
    assert q.scale.shape == (16, 2) and q.packed.shape == (16, 32)
    rtn = dequantize_int4(quantize_int4(w, 32))
    err = lambda wq: float((x @ (wq - w).t()).pow(2).mean())  # noqa: E731
    assert err(dequantize_int4(q)) < err(rtn)


def test_rules_pick_schemes_first_match_wins_and_tied_head_is_left_alone():
    model = _model(tie_word_embeddings=True)
    schemes = resolve_schemes(model, [{"pattern": r"mlp\.down_proj", "scheme": "int8"},
                                      {"pattern": r"layers\.0\.", "scheme": "none"},
                                      {"pattern": ".*", "scheme": "int4_g32"}])
    assert schemes["model.layers.1.mlp.down_proj"] == "int8"
    assert "model.layers.0.self_attn.q_proj" not in schemes
    assert schemes["model.layers.2.self_attn.q_proj"] == "int4_g32"
    assert "lm_head" not in schemes
    with pytest.raises(ValueError, match="not one of int8"):
        resolve_schemes(model, [{"pattern": ".*", "scheme": "int3"}])


@pytest.mark.parametrize("method, scheme", [("rtn", "int4_g32"), ("gptq", "int4_g32"), ("awq", "int4_g32"),
                                            ("gptq", "int4_g32_min"), ("rtn", "int3_g32_min")])
def test_quantized_model_equals_its_dequantized_reference_and_reloads(method, scheme, calib, tmp_path):
    model = _model()
    ref_float = _model()
    model, report = quantize_model(model, QuantizeConfig(method=method, default=scheme,
                                                         rules=[{"pattern": "lm_head", "scheme": "int8"}]), calib)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.scheme.name == "int8"
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert 3 < report["bits_per_weight"] < 32
    # The dequantized reference: a float model holding dequantize(codes) gives the same logits.
    deq = _model()
    state = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            state[f"{name}.weight"] = mod.dequantized_weight()
    float_state = {k: v for k, v in model.state_dict().items() if not k.endswith(("qweight", "scale", "zero", "min"))}
    deq.load_state_dict({**float_state, **state}, strict=True)
    with torch.no_grad():
        a, b = model(calib).logits, deq(calib).logits
        f = ref_float(calib).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - f).abs().mean() < 0.5 * f.abs().mean()  # close to the float model, not equal to it
    model.save_pretrained(tmp_path)
    back = CodexMiniForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(back.model.layers[0].self_attn.q_proj, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(back(calib).logits, a)


def test_calibrated_methods_beat_rtn_on_output_error(calib):
    torch.manual_seed(0)
    ref = _model(hidden_size=128, intermediate_size=256)
    with torch.no_grad():
        want = torch.log_softmax(ref(calib).logits, -1)
    errs = {}
    for method in ("rtn", "gptq", "awq"):
        m = _model(hidden_size=128, intermediate_size=256)
        m, _ = quantize_model(m, QuantizeConfig(method=method, default="int4_g64_asym"), calib)
        with torch.no_grad():
            got = torch.log_softmax(m(calib).logits, -1)
        errs[method] = float((want.exp() * (want - got)).sum(-1).mean())  # KL(float || quantized)
    assert errs["gptq"] < errs["rtn"], errs
    assert errs["awq"] <= errs["rtn"] * 1.0001, errs


def test_group_size_that_does_not_divide_is_refused_or_falls_back(calib):
    model = _model(intermediate_size=96)  # down_proj input 96: not a multiple of 64
    with pytest.raises(ValueError, match="does not divide its input width 96"):
        quantize_model(model, QuantizeConfig(method="rtn", default="int4_g64"))
    model, report = quantize_model(_model(intermediate_size=96),
                                   QuantizeConfig(method="rtn", default="int4_g64", on_bad_group="int8"))
    assert report["schemes"]["model.layers.0.mlp.down_proj"] == "int8"
    assert report["schemes"]["model.layers.0.mlp.up_proj"] == "int4_g64"


def test_fake_quant_training_uses_the_grid_and_leaves_float_weights(calib):
    from codexmini.quantize.apply import plan
    from codexmini.models.qat import fake_quantized

    model = _model()
    # QAT trains through the round-to-nearest grid: the quantize stage's without its grid search
    cfg = QuantizeConfig(method="rtn", default="int4_g32", embedding="none", search=False)
    schemes = plan(model, cfg)
    rtn, _ = quantize_model(_model(), cfg)
    with fake_quantized(model, schemes):
        with torch.no_grad():
            torch.testing.assert_close(model(calib).logits, rtn(calib).logits, atol=1e-5, rtol=1e-5)
        loss = model(calib, labels=calib).loss
        loss.backward()  # straight through: the float weights get gradients
        grad = model.model.layers[0].mlp.up_proj.parametrizations.weight.original.grad
        assert grad is not None and grad.abs().sum() > 0
    assert type(model.model.layers[0].mlp.up_proj.weight) is torch.nn.Parameter
    assert "parametrizations" not in "".join(model.state_dict())


@pytest.mark.parametrize("mode, module", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit"), ("fp4", "Linear4bit")])
def test_bitsandbytes_conversion_of_a_saved_student(mode, module, tmp_path, calib):
    pytest.importorskip("bitsandbytes")
    from codexmini.quantize.bnb import load_bnb

    model = _model(hidden_size=128, intermediate_size=256)
    model.save_pretrained(tmp_path)
    q = load_bnb(tmp_path, mode)
    assert type(q.model.layers[0].mlp.up_proj).__name__ == module
    assert q.get_memory_footprint() < 0.6 * model.get_memory_footprint()
    with torch.no_grad():
        a, b = model(calib).logits, q(calib).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95
    with pytest.raises(ValueError, match="not one of"):
        load_bnb(tmp_path, "int3")


def test_qlora_adapters_train_on_a_4bit_student(tmp_path, calib):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from codexmini.quantize.bnb import load_bnb

    _model(hidden_size=128, intermediate_size=256).save_pretrained(tmp_path)
    q = load_bnb(tmp_path, "nf4")
    lora = peft.get_peft_model(q, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                  lora_dropout=0.0))
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in lora.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = lora(input_ids=calib, labels=calib).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_untie_head_quantizes_the_tied_head_and_keeps_float_lookups(calib, tmp_path):
    model = _model(tie_word_embeddings=True)
    emb = model.model.embed_tokens.weight.detach().clone()
    cfg = QuantizeConfig(method="rtn", default="int4_g32", rules=[{"pattern": "^lm_head$", "scheme": "int8"}],
                         untie_head=True, embedding="none")
    model, report = quantize_model(model, cfg)
    assert report["schemes"]["lm_head"] == "int8" and not model.config.tie_word_embeddings
    assert isinstance(model.lm_head, QuantLinear)
    torch.testing.assert_close(model.lm_head.dequantized_weight(), emb, atol=emb.abs().max() / 100, rtol=0)
    assert torch.equal(model.model.embed_tokens.weight, emb)
    model.save_pretrained(tmp_path)
    back = CodexMiniForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(calib).logits, model(calib).logits)


@pytest.mark.parametrize("scheme", ["int8", "int4_g32", "int4_g16_asym", "int3_g32", "int4_g32_min"])
@pytest.mark.parametrize("tied", [False, True])
def test_quantized_embedding_table_is_the_tied_head_or_a_table_beside_it(tied, scheme, calib, tmp_path):
    from codexmini.models.quantized import QuantEmbedding

    model = _model(tie_word_embeddings=tied)
    emb = model.model.embed_tokens.weight.detach().clone()
    head = model.lm_head.weight.detach().clone()  # the embedding itself when tied
    with torch.no_grad():
        float_logits = model(calib).logits
    cfg = QuantizeConfig(method="rtn", default="none", embedding=scheme)
    model, report = quantize_model(model, cfg)
    table = model.model.embed_tokens
    assert isinstance(table, QuantEmbedding) and report["schemes"]["model.embed_tokens"] == scheme
    assert model.config.tie_word_embeddings == tied
    if tied:  # one quantized matrix serves lookups and the head
        assert model.lm_head is None and "lm_head" not in report["schemes"]
        assert not any(n.startswith("lm_head") for n in model.state_dict())
    else:
        torch.testing.assert_close(model.lm_head.weight, head)  # an untied head is left as it was
    # one step of each grid (a symmetric grid's short end clips by up to one step)
    step = {"int8": 1 / 120, "int4_g32": 1 / 7, "int4_g16_asym": 1 / 10, "int3_g32": 1 / 3,
            "int4_g32_min": 1 / 7}[scheme]
    torch.testing.assert_close(table.dequantized_weight(), emb, atol=float(emb.abs().max()) * step, rtol=0)
    ids = torch.tensor([[3, 7, 3], [49, 0, 1]])
    torch.testing.assert_close(table(ids), table.dequantized_weight()[ids], atol=0, rtol=0)  # rows alone
    with torch.no_grad():
        logits = model(calib).logits
    assert (logits - float_logits).abs().max() < 8 * step * float_logits.abs().max()
    model.save_pretrained(tmp_path)
    back = CodexMiniForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(back.model.embed_tokens, QuantEmbedding) and (back.lm_head is None) == tied
    with torch.no_grad():
        torch.testing.assert_close(back(calib).logits, logits)


def test_untied_head_beside_a_quantized_table_keeps_its_float_copy(calib):
    model = _model(tie_word_embeddings=True)
    head = model.lm_head.weight.detach().clone()
    model, report = quantize_model(model, QuantizeConfig(method="rtn", default="none", embedding="int8",
                                                         untie_head=True))
    assert not model.config.tie_word_embeddings and "lm_head" not in report["schemes"]
    torch.testing.assert_close(model.lm_head.weight, head)
