import pytest
import torch

from codexmini import CodexMiniForCausalLM
from codexmini.prune import PruneConfig, check_config, prune
from codexmini.prune.width import dependency_graph
from tests.conftest import tiny_config

TYPES = ["softmax", "linear", "hybrid"]


def _model(**kw):
    torch.manual_seed(0)
    fields = dict(num_hidden_layers=3, layer_types=TYPES, num_attention_heads=4, num_key_value_heads=2,
                  feature_map="hedgehog", linear_decay=True, tie_word_embeddings=False)
    fields.update(kw)
    return CodexMiniForCausalLM(tiny_config(**fields)).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture
def calib():
    torch.manual_seed(1)
    return torch.randint(4, 300, (6, 24))


def test_ratio_zero_is_the_identity(calib):
    model = _model()
    new, report = prune(model, PruneConfig(criterion="magnitude"), calib)
    torch.testing.assert_close(_logits(new, calib), _logits(model, calib))
    assert report["params_after"] == report["params_before"]


@pytest.mark.parametrize("mode", ["kv_groups", "query_heads"])
@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "wanda", "random"])
def test_heads_removed_consistently_equal_zeroing_their_output(calib, mode, criterion):
    model = _model()
    new, report = prune(model, PruneConfig(criterion=criterion, heads=0.5, head_mode=mode), calib)
    for i, layer in enumerate(new.model.layers):
        a = layer.self_attn
        if mode == "kv_groups":
            assert (a.num_heads, a.num_key_value_heads) == (2, 1)
        else:
            assert (a.num_heads, a.num_key_value_heads) == (2, 2)
        assert a.q_proj.out_features == a.o_proj.in_features == a.num_heads * a.head_dim
        assert a.k_proj.out_features == a.v_proj.out_features == a.num_key_value_heads * a.head_dim
        assert new.config.layer_num_attention_heads[i] == a.num_heads
    # Heads are independent, so the pruned model equals the original with the removed heads' output zeroed.
    ref = _model()
    with torch.no_grad():
        for layer, info in zip(ref.model.layers, report["layers"]):
            hd = layer.self_attn.head_dim
            for h in info["removed_heads"]:
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    torch.testing.assert_close(_logits(new, calib), _logits(ref, calib), atol=2e-5, rtol=1e-4)


def test_mlp_channels_go_together_and_equal_zeroing_down_columns(calib):
    model = _model()
    new, report = prune(model, PruneConfig(criterion="wanda", mlp=0.5, round_to=16), calib)
    assert new.config.layer_intermediate_sizes == [64, 64, 64]
    for layer in new.model.layers:
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == layer.mlp.down_proj.in_features
    # Which channels were kept: the pruned gate rows are a subset of the original rows.
    ref = _model()
    with torch.no_grad():
        for old, kept in zip(ref.model.layers, new.model.layers):
            rows = (old.mlp.gate_proj.weight[:, None, :] == kept.mlp.gate_proj.weight[None]).all(-1).any(1)
            assert rows.sum() == 64
            old.mlp.down_proj.weight[:, ~rows] = 0
    torch.testing.assert_close(_logits(new, calib), _logits(ref, calib), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_every_layer_type_prunes_everything_reloads_and_still_decodes(calib, tmp_path, tied):
    model = _model(tie_word_embeddings=tied)
    new, report = prune(model, PruneConfig(criterion="taylor", heads=0.5, mlp=0.25, hidden=0.25, round_to=16),
                        calib)
    assert new.config.hidden_size == 48 and new.model.embed_tokens.weight.shape == (300, 48)
    assert report["params_after"] < 0.7 * report["params_before"]
    if tied:
        assert new.lm_head.weight.data_ptr() == new.model.embed_tokens.weight.data_ptr()
    new.save_pretrained(tmp_path)
    back = CodexMiniForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(back, calib), _logits(new, calib))
    assert back.config.layer_num_attention_heads == [2, 2, 2]
    # Prefill vs token-by-token decode parity holds in the pruned model, for every layer type.
    ids = calib[:1, :20]
    full = _logits(new, ids)
    with torch.no_grad():
        out = new(input_ids=ids[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 20):
            out = new(input_ids=ids[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_parameter_budget_is_met_within_one_round_to_step(calib):
    model = _model(num_hidden_layers=3, intermediate_size=256)
    cfg = PruneConfig(criterion="magnitude", param_budget=0.6, budget_dims=["mlp"], round_to=16)
    new, report = prune(model, cfg, calib)
    goal = 0.6 * report["params_before"]
    step = 16 * 3 * model.config.hidden_size * model.config.num_hidden_layers  # one round_to step of every MLP
    assert goal - step < report["params_after"] <= goal


def test_impossible_targets_are_refused_before_any_work():
    config = _model().config
    for kw, msg in [(dict(heads=1.0), r"prune.heads = 1.0 must be in \[0, 1\)"),
                    (dict(mlp=-0.1), "prune.mlp"),
                    (dict(heads=0.9, head_mode="query_heads"), "query heads per group of layer 0 leaves none"),
                    (dict(drop_layers=3), "would remove all 3 layers"),
                    (dict(criterion="l3"), "prune.criterion"),
                    (dict(param_budget=0.5, mlp=0.2), "not both"),
                    (dict(budget_dims=["width"], param_budget=0.5), "budget_dims")]:
        with pytest.raises(ValueError, match=msg):
            check_config(PruneConfig(**kw), config)
    with pytest.raises(ValueError, match="cannot be met"):
        prune(_model(), PruneConfig(criterion="magnitude", param_budget=0.05, budget_dims=["heads"]))


def test_dependency_graph_traces_with_rope_bypassed_and_couples_the_hidden_size(calib):
    import torch_pruning as tp

    model = _model()
    graph = dependency_graph(model, calib[:1, :8])  # would never finish with RoPE traced (torch-pruning #527)
    group = graph.get_pruning_group(model.model.embed_tokens, tp.prune_embedding_out_channels, idxs=[0, 1])
    touched = {dep.target.name for dep, _ in group}
    for i in range(3):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert any(f"layers.{i}.self_attn.{proj}" in t for t in touched), (i, proj)
    assert any("lm_head" in t for t in touched)


def test_depth_pruning_keeps_source_layers_and_types(calib):
    model = _model(num_hidden_layers=4, layer_types=["softmax", "linear", "hybrid", "softmax"])
    model.config.source_layers = [0, 3, 5, 7]
    for method in ("block_influence", "contiguous"):
        new, report = prune(model, PruneConfig(drop_layers=2, depth_method=method, criterion="magnitude"), calib)
        kept = [i for i in range(4) if i not in report["removed_layers"]]
        assert new.config.num_hidden_layers == 2
        assert new.config.layer_types == [model.config.layer_types[i] for i in kept]
        assert new.config.source_layers == [[0, 3, 5, 7][i] for i in kept]
        if method == "contiguous":
            assert report["removed_layers"][1] == report["removed_layers"][0] + 1 and 3 in kept


def test_llama_teacher_converts_and_prunes_to_a_codexmini_model(tiny_llama_dir, calib):
    from codexmini.models.from_teacher import student_from_teacher
    from codexmini.models.teacher import load_teacher

    llama, tok = load_teacher(tiny_llama_dir)
    ids = calib.clamp(max=len(tok) - 1)
    student = student_from_teacher(llama)
    same, _ = prune(student, PruneConfig(criterion="wanda"), ids)
    torch.testing.assert_close(_logits(same, ids), _logits(llama, ids), atol=1e-5, rtol=1e-5)
    new, report = prune(student, PruneConfig(criterion="wanda", heads=0.5, mlp=0.5, round_to=32), ids)
    assert new.config.model_type == "codexmini"
    assert new.config.layer_num_key_value_heads == [1] * 4 and new.config.layer_intermediate_sizes == [64] * 4
