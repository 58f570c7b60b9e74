"""KD loss against a plain-Python transcription of docs/method.md §6, plus gradient paths."""

import math

import pytest
import torch

from student.adapters import TokenLinearAdapter
from student.kd_loss import KDConfig, kd_loss, total_loss

B, N, D = 2, 6, 4


def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def reference_kd(S, T, A, cls, cfg, clip="clip"):
    """Loops over b, k, j, c in plain Python (float64 lists), straight from docs/method.md §6."""
    S, A, cls = S.tolist(), A.tolist(), cls.tolist()
    T = {k: v.tolist() for k, v in T.items()}
    names = list(T)
    loss, weights, per = 0.0, [], []
    for b in range(B):
        w_tok = _softmax(A[b])
        L, s = [], []
        for k in names:
            total = 0.0
            for j in range(N):
                l_bjk = sum((S[b][j][c] - T[k][b][j][c]) ** 2 for c in range(D)) / D
                tw = 1.0 / N + w_tok[j] if cfg.token_weighting == "attention" else 1.0 / N
                total += tw * l_bjk
            L.append(total)
            s.append(sum(sum(cls[b][c] * T[k][b][j][c] for c in range(D)) for j in range(N)) / N)
        per.append(L)
        weights.append(s)  # scores for now; turned into weights below (the flattening needs the batch)
    if cfg.teacher_weighting == "paper":
        W = [_softmax([x / math.sqrt(D) for x in s]) for s in weights]
        flattened = 0.0
    elif len(names) == 1:
        W, flattened = [[1.0] for _ in range(B)], 0.0
    else:
        others = [i for i, n in enumerate(names) if n != clip]
        wp = [_softmax([s[i] for i in others]) for s in weights]
        batch_mean = [sum(wp[b][i] for b in range(B)) / B for i in range(len(others))]
        flattened = float(max(batch_mean) > cfg.flatten_threshold)
        if flattened:
            wp = [_softmax([x + cfg.flatten_bonus for x in row]) for row in wp]
        W = []
        for b in range(B):
            it = iter(wp[b])
            W.append([cfg.clip_weight if n == clip else (1 - cfg.clip_weight) * next(it) for n in names])
    for b in range(B):
        loss += sum(W[b][k] * per[b][k] for k in range(len(names))) / B
    return loss, W, per, flattened


def make_inputs(seed=0, eva_boost=0.0, scale=1.0, names=("clip", "eva", "convnext", "sam")):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    cls = torch.randn(B, D, generator=g, dtype=torch.float64)
    T = {n: scale * torch.randn(B, N, D, generator=g, dtype=torch.float64) for n in names}
    if "eva" in T:  # push eva's tokens along the CLS direction: its score dominates
        T["eva"] = T["eva"] + eva_boost * cls[:, None, :] / cls.norm(dim=-1)[:, None, None]
    A = torch.rand(B, N, generator=g, dtype=torch.float64) / N
    return S, T, A, cls


def check(cfg, S, T, A, cls, clip="clip"):
    out = kd_loss(S, T, A, cls, cfg, clip_name=clip)
    want, W, per, flattened = reference_kd(S, T, A, cls, cfg, clip)
    assert out["loss"].item() == pytest.approx(want, rel=1e-10)
    assert out["kd_info/flattened"].item() == flattened
    for k, name in enumerate(T):
        assert out[f"weight/{name}"].item() == pytest.approx(sum(W[b][k] for b in range(B)) / B, rel=1e-10)
        assert out[f"kd_unweighted/{name}"].item() == pytest.approx(sum(per[b][k] for b in range(B)) / B, rel=1e-10)
        assert out[f"kd/{name}"].item() == pytest.approx(sum(W[b][k] * per[b][k] for b in range(B)) / B, rel=1e-10)
    return out


@pytest.mark.parametrize("token_weighting", ["attention", "uniform"])
def test_released_not_flattened(token_weighting):
    S, T, A, cls = make_inputs(scale=0.05)  # small scores: w' near uniform
    out = check(KDConfig(token_weighting=token_weighting), S, T, A, cls)
    assert out["kd_info/flattened"].item() == 0.0
    assert out["weight/clip"].item() == pytest.approx(0.8)


def test_released_flattened():
    S, T, A, cls = make_inputs(eva_boost=20.0, scale=0.05)
    out = check(KDConfig(), S, T, A, cls)
    assert out["kd_info/flattened"].item() == 1.0
    # softmax(w' + 0.2) == softmax(w'): the bonus is a no-op, the second softmax flattens.
    assert out["weight/eva"].item() < 0.2 * 0.6 and out["weight/eva"].item() > 0.2 / 3


def test_flatten_condition_is_max_of_batch_mean():
    # sample 0 prefers eva, sample 1 convnext: mean_b max_k w' ~ 1 but max_k mean_b w' ~ 0.5
    S, T, A, cls = make_inputs(scale=0.05)
    unit = cls / cls.norm(dim=-1, keepdim=True)
    T["eva"][0] += 20.0 * unit[0]
    T["convnext"][1] += 20.0 * unit[1]
    out = check(KDConfig(), S, T, A, cls)
    assert out["kd_info/flattened"].item() == 0.0


def test_released_single_other_teacher_and_single_teacher():
    S, T, A, cls = make_inputs(names=("clip", "eva"))
    out = check(KDConfig(), S, T, A, cls)
    assert (out["weight/clip"].item(), out["weight/eva"].item()) == pytest.approx((0.8, 0.2))
    assert out["kd_info/flattened"].item() == 1.0  # w' = (1) always exceeds 0.8; softmax leaves (1)
    S, T, A, cls = make_inputs(names=("clip",))
    out = check(KDConfig(), S, T, A, cls)
    assert out["weight/clip"].item() == 1.0


def test_paper_weighting():
    S, T, A, cls = make_inputs(eva_boost=3.0)
    out = check(KDConfig(teacher_weighting="paper"), S, T, A, cls)
    assert sum(out[f"weight/{n}"].item() for n in T) == pytest.approx(1.0)


def test_fixed_weighting_and_no_clip_set():
    S, T, A, cls = make_inputs()
    out = kd_loss(S, T, A, cls, KDConfig(teacher_weighting="fixed"))
    assert [out[f"weight/{n}"].item() for n in T] == pytest.approx([0.8, 0.2 / 3, 0.2 / 3, 0.2 / 3])
    out = kd_loss(S, T, A, cls, KDConfig(), clip_name=None)  # released code without CLIP: softmax(s)
    s = torch.stack([torch.einsum("bnd,bd->bn", t, cls).mean(1) for t in T.values()], 1)
    assert [out[f"weight/{n}"].item() for n in T] == pytest.approx(s.softmax(-1).mean(0).tolist())


@pytest.mark.parametrize("eva_boost", [0.0, 20.0])
def test_gradcheck_through_teacher_scores(eva_boost):
    S, T, A, cls = make_inputs(eva_boost=eva_boost, scale=0.05)
    eva = T.pop("eva").requires_grad_(True)

    def f(eva_tokens):
        return kd_loss(S, {**T, "eva": eva_tokens}, A, cls, KDConfig())["loss"]

    assert torch.autograd.gradcheck(f, (eva,))


def test_gradient_reaches_adapter_only_through_scores():
    torch.manual_seed(0)
    raw = {"eva": torch.randn(B, 16, 5), "convnext": torch.randn(B, 9, 3)}
    ad = {"eva": TokenLinearAdapter(5, 16, D, N), "convnext": TokenLinearAdapter(3, 9, D, N)}
    cls, A = torch.randn(B, D), torch.rand(B, N)
    for weighting, expect_grad in (("released", True), ("fixed", False)):
        for a in ad.values():
            a.zero_grad()
        T = {n: ad[n](x) for n, x in raw.items()}
        T["clip"] = torch.randn(B, N, D)
        S = T["eva"].detach()  # eva's MSE term and its gradient are exactly zero
        kd_loss(S, T, A, cls, KDConfig(teacher_weighting=weighting))["loss"].backward()
        g = ad["eva"].channel_proj.weight.grad
        assert (g is not None and g.abs().sum().item() > 0) == expect_grad
        assert ad["convnext"].channel_proj.weight.grad.abs().sum() > 0


def test_total_loss():
    S, T, A, cls = make_inputs()
    kd = kd_loss(S, T, A, cls)
    text, bal = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    out = total_loss(text, bal, kd, KDConfig())
    assert out["loss"].item() == pytest.approx(2.0 + 0.01 * 0.4 + 0.5 * kd["loss"].item())
    assert out["loss/kd"].item() == kd["loss"].item() and "weight/eva" in out
    assert total_loss(text, None, None)["loss"].item() == 2.0


def test_input_validation():
    S, T, A, cls = make_inputs()
    with pytest.raises(ValueError, match="do not match"):
        kd_loss(S, {**T, "eva": T["eva"][:, :3]}, A, cls)
    with pytest.raises(ValueError, match="needs cls_attn"):
        kd_loss(S, T, None, cls)
    with pytest.raises(ValueError, match="needs cls_state"):
        kd_loss(S, T, A, None)
    with pytest.raises(ValueError, match="at least one teacher"):
        kd_loss(S, {}, A, cls)
    with pytest.raises(ValueError):
        KDConfig(teacher_weighting="attention")
    assert kd_loss(S, T, None, None, KDConfig(token_weighting="uniform", teacher_weighting="fixed"))["loss"] > 0


def test_float32_with_bf16_student():
    S, T, A, cls = make_inputs()
    out = kd_loss(S.to(torch.bfloat16), {n: t.float() for n, t in T.items()}, A.float(), cls.float())
    assert out["loss"].dtype == torch.float32
