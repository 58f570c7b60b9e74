"""MoLE: routing and outputs against hand computations, balance loss by hand, init/freeze contracts."""

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from student.mole import (
    MoLEConfig,
    MoLEMLP,
    add_mole,
    mole_balance_loss,
    mole_modules,
    mole_parameters,
    mole_routing_stats,
)

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPVisionModel(CLIPVisionConfig(**TINY)).save_pretrained(path)
    return path


def load(path) -> CLIPVisionModel:
    return CLIPVisionModel.from_pretrained(path).eval()


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def np_(t):
    return t.detach().double().numpy()


def quick_gelu(v):
    return v / (1.0 + np.exp(-1.702 * v))


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def expert(lora, e):
    """Expert e's (A, a_bias, B, b_bias) under the documented stacked layout."""
    r = lora.rank
    return (
        np_(lora.A[e * r : (e + 1) * r]),
        np_(lora.a_bias[e * r : (e + 1) * r]),
        np_(lora.B[:, e * r : (e + 1) * r]),
        np_(lora.b_bias[e]),
    )


def manual_mlp(mlp: MoLEMLP, x: np.ndarray, e: int, gate: float) -> np.ndarray:
    """One token through fc1 + LoRA_e, quick_gelu, fc2 + LoRA_e, written out by hand."""
    s = mlp.cfg.alpha / mlp.cfg.rank
    a1, ab1, b1, bb1 = expert(mlp.lora_fc1, e)
    a2, ab2, b2, bb2 = expert(mlp.lora_fc2, e)
    h = np_(mlp.fc1.weight) @ x + np_(mlp.fc1.bias) + gate * s * (b1 @ (a1 @ x + ab1) + bb1)
    h = quick_gelu(h)
    return np_(mlp.fc2.weight) @ h + np_(mlp.fc2.bias) + gate * s * (b2 @ (a2 @ h + ab2) + bb2)


@pytest.mark.parametrize("gate_scaling", [False, True])
def test_routing_and_output_match_hand_computation(clip_dir, gate_scaling):
    torch.manual_seed(3)
    cfg = MoLEConfig(rank=4, gate_scaling=gate_scaling)
    model = add_mole(load(clip_dir), cfg)
    mlp = model.encoder.layers[1].mlp
    with torch.no_grad():  # router logit e = 3 * x[e]: the token's largest of x[0..2] picks it
        mlp.router.weight.zero_()
        mlp.router.bias.zero_()
        for e in range(3):
            mlp.router.weight[e, e] = 3.0
        for lora in (mlp.lora_fc1, mlp.lora_fc2):
            lora.a_bias.normal_()
            lora.b_bias.normal_()
    want = [[0, 2, 1, 1, 0], [2, 2, 0, 1, 2]]
    x = 0.1 * torch.randn(2, 5, 32)
    for b, row in enumerate(want):
        for t, e in enumerate(row):
            x[b, t, e] = 1.0 + 0.1 * t
    out = mlp(x)
    probs, onehot = mlp.route(x)
    assert onehot.argmax(-1).tolist() == want
    for b, row in enumerate(want):
        for t, e in enumerate(row):
            logits = np_(mlp.router.weight) @ np_(x[b, t]) + np_(mlp.router.bias)
            p = softmax(logits)
            assert int(np.argmax(p)) == e
            np.testing.assert_allclose(np_(probs[b, t]), p, rtol=1e-5)
            expected = manual_mlp(mlp, np_(x[b, t]), e, p[e] if gate_scaling else 1.0)
            np.testing.assert_allclose(np_(out[b, t]), expected, rtol=1e-4, atol=1e-5)


def test_balance_loss_and_stats_by_hand(clip_dir):
    torch.manual_seed(4)
    model = add_mole(load(clip_dir), MoLEConfig(rank=4))
    inputs = {}
    for m in mole_modules(model):
        m.register_forward_hook(lambda mod, args, out: inputs.__setitem__(mod.layer_index, np_(args[0])))
    model(pixels(3))
    loss = mole_balance_loss(model)

    probs, picks = [], []  # per layer: [B, T, E] softmax and one-hot, by hand
    for m in mole_modules(model):
        logits = inputs[m.layer_index] @ np_(m.router.weight).T + np_(m.router.bias)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        probs.append(p)
        picks.append(np.eye(3)[p.argmax(-1)])
    probs, picks = np.stack(probs), np.stack(picks)  # [L, B, T, E]
    expected = 0.0
    for b in range(3):
        pbar = probs[:, b].reshape(-1, 3).mean(0)
        frac = picks[:, b].reshape(-1, 3).mean(0)
        expected += float((pbar * frac).sum()) / 3  # no extra factor E
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    stats = mole_routing_stats(model)
    assert len(stats) == 3 * 3
    for layer in range(3):
        for e in range(3):
            assert stats[f"mole/layer{layer:02d}/expert{e}"] == pytest.approx(picks[layer, :, :, e].mean(), abs=1e-6)

    loss.backward()  # every router learns from it; a LoRA only through later layers' routers
    for m in mole_modules(model):
        assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
    last = mole_modules(model)[-1]
    assert last.lora_fc1.A.grad is None and last.lora_fc2.B.grad is None


@pytest.mark.parametrize("gate_scaling", [False, True])
def test_router_gets_task_gradient_only_with_gate_scaling(clip_dir, gate_scaling):
    model = add_mole(load(clip_dir), MoLEConfig(rank=4, gate_scaling=gate_scaling))
    model(pixels()).last_hidden_state.sum().backward()
    router = model.encoder.layers[0].mlp.router.weight
    assert (router.grad is not None) == gate_scaling
    assert model.encoder.layers[0].mlp.lora_fc1.A.grad.abs().sum() > 0


def test_lora_init_is_identity_released_is_not(clip_dir):
    x = pixels()
    with torch.no_grad():
        ref = load(clip_dir)(x, output_hidden_states=True)
        lora = add_mole(load(clip_dir), MoLEConfig(rank=4, init="lora"))(x, output_hidden_states=True)
        rel = add_mole(load(clip_dir), MoLEConfig(rank=4, init="released"))(x, output_hidden_states=True)
    for a, b in zip(ref.hidden_states, lora.hidden_states):
        assert torch.equal(a, b)
    assert torch.equal(ref.last_hidden_state, lora.last_hidden_state)
    assert not torch.allclose(ref.hidden_states[-2], rel.hidden_states[-2])


def test_freeze_contract(clip_dir):
    model = add_mole(load(clip_dir), MoLEConfig(rank=4))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in mole_parameters(model)}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".router." in n or ".lora_fc" in n for n in names)
    assert len(mole_parameters(model)) == 3 * (2 + 2 * 4)  # router w,b + 2 LoRAs x (A, B, a_bias, b_bias)

    open_model = add_mole(load(clip_dir), MoLEConfig(rank=4), freeze_base=False)
    layer = open_model.encoder.layers[0]
    assert layer.self_attn.q_proj.weight.requires_grad and open_model.embeddings.patch_embedding.weight.requires_grad
    assert not layer.mlp.fc1.weight.requires_grad and not layer.mlp.fc2.bias.requires_grad


def test_base_weights_are_the_original_tensors(clip_dir):
    model = load(clip_dir)
    fc1 = model.encoder.layers[2].mlp.fc1
    add_mole(model, MoLEConfig(rank=4))
    assert model.encoder.layers[2].mlp.fc1 is fc1
    assert "encoder.layers.2.mlp.fc1.weight" in model.state_dict()


def test_layer_subset_and_errors(clip_dir):
    model = add_mole(load(clip_dir), MoLEConfig(layers=(0, 2), rank=4))
    assert [type(layer.mlp) is MoLEMLP for layer in model.encoder.layers] == [True, False, True]
    model(pixels())
    assert set(mole_routing_stats(model)) == {f"mole/layer{i:02d}/expert{e}" for i in (0, 2) for e in range(3)}
    with pytest.raises(ValueError, match="already carries MoLE"):
        add_mole(model, MoLEConfig(rank=4))
    with pytest.raises(ValueError, match="out of range"):
        add_mole(load(clip_dir), MoLEConfig(layers=(3,)))
    with pytest.raises(ValueError, match="not an HF CLIP vision model"):
        add_mole(torch.nn.Linear(2, 2))
    for bad in (dict(num_experts=0), dict(rank=0), dict(init="zeros"), dict(dropout=1.0), dict(layers=(1, 1))):
        with pytest.raises(ValueError):
            MoLEConfig(**bad)
    with pytest.raises(ValueError, match="no MoLE routing recorded"):
        mole_balance_loss(add_mole(load(clip_dir), MoLEConfig(rank=4)))


def test_stats_come_from_latest_forward(clip_dir):
    torch.manual_seed(8)
    model = add_mole(load(clip_dir), MoLEConfig(rank=4))
    fresh = add_mole(load(clip_dir), MoLEConfig(rank=4))
    fresh.load_state_dict(model.state_dict())
    model(pixels(2))
    model(pixels(3, seed=7))
    fresh(pixels(3, seed=7))  # saw only the second batch
    assert all(m.last_stats[0].shape == (3, 3) for m in mole_modules(model))
    assert mole_balance_loss(model).item() == mole_balance_loss(fresh).item()
    assert mole_routing_stats(model) == mole_routing_stats(fresh)


def test_state_dict_round_trip(clip_dir):
    torch.manual_seed(5)
    trained = add_mole(load(clip_dir), MoLEConfig(rank=4))
    torch.manual_seed(6)
    fresh = add_mole(load(clip_dir), MoLEConfig(rank=4))
    x = pixels()
    assert not torch.equal(trained(x).last_hidden_state, fresh(x).last_hidden_state)
    fresh.load_state_dict(trained.state_dict(), strict=True)
    assert torch.equal(trained(x).last_hidden_state, fresh(x).last_hidden_state)


def test_gradient_checkpointing_and_dropout_train_mode(clip_dir):
    """Checkpointing recomputes the forward with the same dropout masks: gradients equal the plain run's."""

    def grads(checkpointing: bool):
        torch.manual_seed(9)
        model = add_mole(load(clip_dir), MoLEConfig(rank=4, dropout=0.5)).train()
        if checkpointing:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        torch.manual_seed(10)
        out = model(pixels(), output_hidden_states=True).hidden_states[-2][:, 1:]
        (out.square().mean() + 0.01 * mole_balance_loss(model)).backward()
        return model, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    model, plain = grads(False)
    _, ckpt = grads(True)
    *early, last = mole_modules(model)  # hidden_states[-2]: the last layer's LoRA gets no gradient
    assert last.lora_fc1.A.grad is None and last.router.weight.grad is not None
    for name, g in plain.items():
        if g is None:
            assert ckpt[name] is None, name
        else:
            assert torch.isfinite(g).all() and g.abs().sum() > 0, name
            torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-7)
    assert sum(g is not None for g in plain.values()) == len(plain) - 8  # the last layer: 2 LoRAs x (A, B, biases)
    with torch.no_grad():  # dropout is live in train mode: two passes differ
        x = pixels()
        assert not torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)
