"""Pooling that knows the padding, the layers that matter, and the layers plot (issue 22, parts 1, 3 and 5).

Real tiny ``transformers`` models built from configs: a sequence's pooled hidden state must be the same whatever
padding it comes with (length, side, the batch around it), for encoders and decoders, in the hooks, the probes and
the teacher cache; the probe candidates are each architecture's blocks, found from its structure.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from kdray.core.blocks import block_paths, resolve_pooling, top_level_paths
from kdray.core.cache import CacheRequest, teacher_outputs
from kdray.core.hooks import FeatureHooks, list_layers, module_order
from kdray.core.probes import ProbeSpec, pool
from kdray.core.text import PAD

tf = pytest.importorskip("transformers")

VOCAB, HIDDEN = 60, 16
TOKEN_POOLINGS = ("seq_mean", "mean", "max", "first", "last", "auto")


def small(cls, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=64)
    return cls(**{**common, **extra})


@pytest.fixture(scope="module")
def token_models():
    from kdray.models.hf import HFSequenceClassifier
    from kdray.models.hf_lm import HFCausalLM

    torch.manual_seed(0)
    bert = tf.BertForSequenceClassification(small(tf.BertConfig, num_labels=3, pad_token_id=0)).eval()
    qwen = tf.AutoModelForCausalLM.from_config(small(tf.Qwen2Config, num_key_value_heads=1)).eval()
    return {"encoder": (HFSequenceClassifier(bert, pad_token_id=0), "model.bert.encoder.layer.1"),
            "decoder": (HFCausalLM(qwen, [5, 6, 7]), "model.model.layers.1")}


def padded(rows: list[list[int]], sides: list[str], extra: int) -> torch.Tensor:
    """Rows padded with kdray's -1 to the longest + ``extra``, each on its side."""
    t = max(map(len, rows)) + extra
    out = torch.full((len(rows), t), PAD, dtype=torch.long)
    for i, (r, side) in enumerate(zip(rows, sides)):
        if side == "left":
            out[i, t - len(r):] = torch.tensor(r)
        else:
            out[i, :len(r)] = torch.tensor(r)
    return out


def pooled_states(model: nn.Module, layer: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad(), FeatureHooks(model, [layer]) as hooks:
        model(x)
    how = {p: resolve_pooling(model, layer, p) for p in TOKEN_POOLINGS}
    return {p: pool(hooks.outputs[layer], how[p], hooks.masks[layer]) for p in TOKEN_POOLINGS}


rows_st = st.lists(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=9), min_size=1, max_size=4)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows_st, sides=st.lists(st.sampled_from(["left", "right"]), min_size=4, max_size=4),
       extra=st.integers(0, 4))
def test_a_sequence_pools_the_same_whatever_its_padding_side_length_and_batch(token_models, kind, rows, sides, extra):
    model, layer = token_models[kind]
    batch = pooled_states(model, layer, padded(rows, sides[:len(rows)], extra))
    for i, r in enumerate(rows):
        alone = pooled_states(model, layer, torch.tensor([r]))
        for how in TOKEN_POOLINGS:
            torch.testing.assert_close(batch[how][i], alone[how][0], atol=2e-5, rtol=1e-4, msg=f"{kind} {how}")


def test_auto_pooling_is_the_last_token_for_decoders_and_the_mean_for_encoders_and_maps(token_models):
    from kdray.models.mnist1d import MNIST1DCNN

    assert resolve_pooling(token_models["decoder"][0], "model.model.layers.0", "auto") == "last"
    assert resolve_pooling(token_models["encoder"][0], "model.bert.encoder.layer.0", "auto") == "seq_mean"
    assert resolve_pooling(MNIST1DCNN(10), "relu1", "auto") == "mean"
    assert resolve_pooling(token_models["decoder"][0], "model.model.layers.0", "max") == "max"


def test_masked_pooling_reads_only_real_tokens():
    x = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)
    mask = torch.tensor([[True, True, False, False], [False, True, True, True]])
    torch.testing.assert_close(pool(x, "seq_mean", mask), torch.stack([x[0, :2].mean(0), x[1, 1:].mean(0)]))
    torch.testing.assert_close(pool(x, "max", mask), torch.stack([x[0, 1], x[1, 3]]))
    torch.testing.assert_close(pool(x, "first", mask), torch.stack([x[0, 0], x[1, 1]]))
    torch.testing.assert_close(pool(x, "last", mask), torch.stack([x[0, 1], x[1, 3]]))
    assert pool(torch.ones(3, 5, 2), "auto").shape == (3, 5)  # no mask: a (B, C, L) map, mean over positions


def test_the_cached_pass_gives_the_same_pooled_states_at_any_eval_batch_size(token_models):
    model, layer = token_models["decoder"]
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(2, 14, (23,), generator=g)]
    x = padded(rows, ["right"] * len(rows), 0)
    req = CacheRequest((), tuple(ProbeSpec(layer, how, 1e-3, 50) for how in ("last", "seq_mean", "first", "max")))
    runs = [teacher_outputs(model, x, req, bs, torch.device("cpu")) for bs in (3, 8, 64)]
    for col in runs[0]:
        for other in runs[1:]:
            np.testing.assert_allclose(runs[0][col], other[col], atol=2e-5, rtol=1e-4, err_msg=col)


def test_padding_is_zeroed_in_captured_token_sequences(token_models):
    model, layer = token_models["encoder"]
    x = padded([[3, 4, 5], [6]], ["right", "left"], 2)
    with torch.no_grad(), FeatureHooks(model, [layer]) as hooks:
        model(x)
    mask = hooks.masks[layer]
    assert mask.sum(1).tolist() == [3, 1]
    assert (hooks.outputs[layer][~mask] == 0).all() and (hooks.outputs[layer][mask] != 0).any()


# --------------------------------------------------------------------------------------------------
# the layers that matter


def causal(cls, **extra):
    return tf.AutoModelForCausalLM.from_config(small(cls, **extra))


ARCHITECTURES = {
    "qwen2": (lambda: causal(tf.Qwen2Config, num_key_value_heads=1), "model.layers"),
    "llama": (lambda: causal(tf.LlamaConfig, num_key_value_heads=1), "model.layers"),
    "mixtral (MoE)": (lambda: causal(tf.MixtralConfig, num_key_value_heads=1, num_local_experts=2,
                                     num_experts_per_tok=1), "model.layers"),
    "qwen2_moe (MoE)": (lambda: causal(tf.Qwen2MoeConfig, num_key_value_heads=1, num_experts=2, num_experts_per_tok=1,
                                       moe_intermediate_size=8, shared_expert_intermediate_size=8), "model.layers"),
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2,
                                                      n_positions=64)), "transformer.h"),
    "bert": (lambda: tf.BertModel(small(tf.BertConfig)), "encoder.layer"),
    "roberta": (lambda: tf.RobertaForSequenceClassification(small(tf.RobertaConfig)), "roberta.encoder.layer"),
    "distilbert": (lambda: tf.DistilBertForSequenceClassification(
        tf.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=32)),
        "distilbert.transformer.layer"),
    "deberta-v2": (lambda: tf.DebertaV2ForSequenceClassification(small(tf.DebertaV2Config)), "deberta.encoder.layer"),
    "electra": (lambda: tf.ElectraForSequenceClassification(small(tf.ElectraConfig, embedding_size=HIDDEN)),
                "electra.encoder.layer"),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_probe_candidates_of_hugging_face_models_are_their_blocks(arch):
    make, stack = ARCHITECTURES[arch]
    wrapped = nn.Module()
    wrapped.model = make()
    assert block_paths(wrapped) == [f"model.{stack}.0", f"model.{stack}.1"]


def test_probe_candidates_of_a_resnet_are_its_stages_and_blocks_and_of_a_cnn_its_top_level_modules():
    from kdray.models.mnist1d import MNIST1DCNN
    from kdray.models.resnet import CifarResNet

    resnet = CifarResNet(14, (16, 16, 32, 64), 10)  # 2 blocks per stage
    assert block_paths(resnet) == ["conv1", "bn1", "relu", "layer1.0", "layer1", "layer2.0", "layer2", "layer3.0",
                                   "layer3", "avgpool", "fc"]
    cnn = MNIST1DCNN(10)
    assert block_paths(cnn) == [name for name, _ in cnn.named_children()]
    assert block_paths(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))) == ["0", "1", "2"]
    assert len(top_level_paths(tf.BertModel(small(tf.BertConfig)))) < 5


def test_module_order_follows_the_forward_of_a_cnn_not_the_alphabet():
    from kdray.models.mnist1d import MNIST1DCNN

    cnn = MNIST1DCNN(10)
    order = module_order(cnn)
    ran = [i.path for i in sorted((i for i in list_layers(cnn, torch.randn(2, 40)) if i.order is not None),
                                  key=lambda i: i.order)]
    assert sorted(ran, key=order.get) == ran
    assert order["conv2"] < order["relu2"] < order["conv3"]


def test_layers_plot_draws_layers_in_forward_order_with_their_names():
    from kdray.report.plots import probe_layers_figure

    records = [{"layer": name, "pooling": "mean", "val_acc": 0.5 + 0.1 * d, "train_acc": 0.9, "depth": d}
               for d, name in enumerate(["conv1", "relu1", "conv2", "relu2", "fc"])]
    fig = probe_layers_figure(list(reversed(records)), 0.4)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1", "relu1", "conv2", "relu2", "fc"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.5, 0.6, 0.7, 0.8, 0.9])
    blocks = [{"layer": f"model.model.layers.{i}", "pooling": "last", "val_acc": 0.5, "depth": i} for i in range(12)]
    ax = probe_layers_figure(blocks, None).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(12)]
    assert "model.model.layers." in ax.get_xlabel()
