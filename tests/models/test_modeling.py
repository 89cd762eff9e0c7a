import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from codexmini import CodexMiniCache, CodexMiniConfig, CodexMiniForCausalLM
from tests.conftest import tiny_config

LAYER_TYPES = ["softmax", "linear", "hybrid"]
FEATURE_MAPS = ["elu", "relu", "hedgehog", "taylor"]


def _prefill_then_decode(model, ids, prefill):
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    return torch.cat(steps, dim=1), cache


PARITY_CASES = [("softmax", "elu", False)] + [(t, f, d) for t in ("linear", "hybrid") for f in FEATURE_MAPS
                                               for d in (False, True)]


@pytest.mark.parametrize("layer_type, feature_map, decay", PARITY_CASES)
def test_full_forward_equals_prefill_plus_decode(layer_type, feature_map, decay):
    cfg = tiny_config(layer_types=["softmax", layer_type], feature_map=feature_map, linear_decay=decay)
    model = CodexMiniForCausalLM(cfg).eval()
    ids = torch.randint(4, cfg.vocab_size, (2, 29))  # 29: not a multiple of the chunk (8) or the window (8)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    inc, _ = _prefill_then_decode(model, ids, prefill=11)
    torch.testing.assert_close(inc, full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layer_type", ["linear", "hybrid"])
def test_prefill_in_pieces_equals_full(layer_type):
    """A cache can be continued with a multi-token chunk (a restored session, a second prompt turn)."""
    model = CodexMiniForCausalLM(tiny_config(layer_types=[layer_type, layer_type])).eval()
    ids = torch.randint(4, 300, (1, 40))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        a = model(ids[:, :13], use_cache=True)
        b = model(ids[:, 13:], cache=a.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), full, atol=2e-5, rtol=1e-4)


def test_linear_decode_state_does_not_grow():
    cfg = tiny_config(layer_types=["linear", "hybrid"])
    model = CodexMiniForCausalLM(cfg).eval()
    ids = torch.randint(4, 300, (1, 200))
    sizes = {}
    with torch.no_grad():
        out = model(ids[:, :1], use_cache=True)
        cache = out.cache
        for t in range(1, 200):
            model(ids[:, t:t + 1], cache=cache, use_cache=True)
            if t + 1 in (20, 200):
                sizes[t + 1] = (cache.nbytes(0), cache.nbytes(1))
    assert sizes[20] == sizes[200]
    state = cache.layers[0]["state"]
    # heads x d_k x (d_v + 1): the extra column is the normaliser
    assert state.shape == (1, cfg.num_attention_heads, cfg.head_dim, cfg.head_dim + 1)


def test_softmax_cache_grows_with_context():
    model = CodexMiniForCausalLM(tiny_config(layer_types=["softmax", "softmax"])).eval()
    with torch.no_grad():
        c1 = model(torch.randint(4, 300, (1, 10)), use_cache=True).cache
        c2 = model(torch.randint(4, 300, (1, 40)), use_cache=True).cache
    assert c2.nbytes(0) == 4 * c1.nbytes(0)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_left_padding_gives_the_same_logits_as_no_padding(layer_type):
    model = CodexMiniForCausalLM(tiny_config(layer_types=["softmax", layer_type])).eval()
    ids = torch.randint(4, 300, (1, 12))
    padded = torch.cat([torch.full((1, 5), 3), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = model(ids).logits
        got = model(padded, attention_mask=mask).logits[:, 5:]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_generate_greedy_matches_manual_argmax_loop(layer_type):
    model = CodexMiniForCausalLM(tiny_config(layer_types=[layer_type, "linear"])).eval()
    prompt = torch.randint(4, 300, (1, 6))
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    ids = prompt
    with torch.no_grad():
        for _ in range(10):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_batched_generate_with_padding_runs():
    model = CodexMiniForCausalLM(tiny_config(layer_types=["hybrid", "linear"])).eval()
    ids = torch.randint(4, 300, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape == (2, 12)


def test_save_and_reload_heterogeneous_model(tmp_path):
    cfg = tiny_config(num_hidden_layers=3, layer_types=["softmax", "linear", "hybrid"], head_dim=32,
                      layer_num_attention_heads=[4, 2, 6], layer_num_key_value_heads=[2, 1, 3],
                      layer_intermediate_sizes=[128, 96, 40], feature_map="hedgehog", linear_decay=True)
    model = CodexMiniForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, CodexMiniForCausalLM)
    assert reloaded.config.layer_num_attention_heads == [4, 2, 6]
    assert reloaded.model.layers[2].mlp.up_proj.out_features == 40
    ids = torch.randint(4, 300, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("rank", [None, 16])
def test_embeddings_tied_untied_factored_round_trip(tmp_path, tied, rank):
    cfg = tiny_config(tie_word_embeddings=tied, embedding_rank=rank)
    model = CodexMiniForCausalLM(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    emb = 300 * rank + rank * 64 if rank else 300 * 64
    head = 0 if tied else 300 * 64
    assert n_params == cfg.num_params_estimate()
    assert n_params - emb - head == CodexMiniForCausalLM(tiny_config(tie_word_embeddings=True)).num_parameters() - 300 * 64
    if tied and rank is None:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = CodexMiniForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(4, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_head_dim_is_independent_of_hidden_size():
    cfg = CodexMiniConfig(vocab_size=50, hidden_size=512, num_attention_heads=6, head_dim=64, num_hidden_layers=1,
                          intermediate_size=64)
    model = CodexMiniForCausalLM(cfg)
    assert model.model.layers[0].self_attn.q_proj.out_features == 384
    assert model(torch.randint(0, 50, (1, 4))).logits.shape == (1, 4, 50)


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=60, num_attention_heads=8), "not divisible by num_attention_heads"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "must divide num_attention_heads"),
    (dict(layer_types=["softmax", "mamba"]), "layer_types\\[1\\]"),
    (dict(layer_types=["softmax"]), "layer_types has 1 entries"),
    (dict(feature_map="cosine"), "feature_map"),
    (dict(layer_num_attention_heads=[4]), "layer_num_attention_heads has 1 entries"),
    (dict(embedding_rank=64), "embedding_rank"),
    (dict(head_dim=15), "head_dim must be even"),
])
def test_impossible_shapes_are_rejected_with_the_field_named(fields, message):
    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    base.update(fields)
    with pytest.raises(ValueError, match=message):
        CodexMiniConfig(**base)


def test_config_round_trips_through_json(tmp_path):
    cfg = tiny_config(layer_types=["hybrid", "linear"], feature_map="taylor", linear_decay=True)
    cfg.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, CodexMiniConfig)
    assert again.layer_types == ["hybrid", "linear"] and again.feature_map == "taylor" and again.linear_decay


def test_labels_give_next_token_loss_and_gradients_flow():
    model = CodexMiniForCausalLM(tiny_config(layer_types=["hybrid", "linear"], feature_map="hedgehog"))
    ids = torch.randint(4, 300, (2, 16))
    out = model(ids, labels=ids)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    assert model.model.layers[1].self_attn.feature_map_q.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = CodexMiniForCausalLM(tiny_config(layer_types=["softmax", "hybrid"]))
    ids = torch.randint(4, 300, (2, 16))
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model.train()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5)


def test_cache_reorder_for_beams():
    cache = CodexMiniCache(1)
    cache.layers[0]["state"] = torch.arange(3.0)[:, None].expand(3, 4).clone()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.layers[0]["state"][:, 0].tolist() == [2.0, 2.0, 0.0]
