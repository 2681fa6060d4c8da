import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from latprof.train import pruning
from latprof.train.spvit import SPViT, StaticSPViT


def tiny_vit(num_classes=5, **kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=num_classes)
    args.update(kw)
    return VisionTransformer(**args)


def spvit(kept=(10, 6, 3)):
    model = SPViT(tiny_vit(), locations=(1, 2, 3), kept=kept)
    # random selector biases so decisions differ between tokens (a fresh selector keeps all)
    torch.manual_seed(1)
    for sel in model.selectors:
        with torch.no_grad():
            sel.b3.normal_(0, 1)
            sel.w3.normal_(0, 1)
    return model.eval()


def test_masking_and_removal_agree():
    model = spvit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        masked = model(x, mode="topk-mask")
        removed = model(x, mode="topk")
    torch.testing.assert_close(masked.logits, removed.logits, rtol=1e-4, atol=1e-5)
    # the kept sets are the top-k ones: exact counts per stage
    for k, pol in zip((10, 6, 3), masked.policy):
        assert pol.sum(1).tolist() == [k] * 3
    # and pruning changes the prediction (the comparison is not vacuous)
    with torch.no_grad():
        dense = model(x, mode="topk", kept=(16, 16, 16)).logits
    assert not torch.allclose(dense, removed.logits, atol=1e-3)


def test_dense_schedule_equals_backbone_when_nothing_pruned():
    model = spvit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.vit(x)
        # nothing pruned: package tokens are zero vectors, which still take part in attention,
        # so compare masked against removed only; and the backbone equals a masked run with no selectors
        a = model(x, mode="topk-mask", kept=(16, 16, 16)).logits
        b = model(x, mode="topk", kept=(16, 16, 16)).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert ref.shape == a.shape


def test_softmax_with_policy_equals_removal():
    torch.manual_seed(0)
    attn = torch.randn(2, 2, 6, 6)
    policy = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float)
    out = pruning.softmax_with_policy(attn, policy)
    for b in range(2):
        alive = policy[b].bool()
        ref = attn[b][:, alive][:, :, alive].softmax(-1)
        torch.testing.assert_close(out[b][:, alive][:, :, alive], ref)
        assert torch.all(out[b][:, alive][:, :, ~alive] == 0)
    assert torch.isfinite(out).all()


def test_fused_attention_bias_matches_reference_values_and_gradients():
    """SDPA with `attention_bias` = the multiplicative reference, in value and in the gradient that
    reaches the policy (dead tokens included: that gradient is what trains the selector)."""
    torch.manual_seed(0)
    B, H, N, D = 2, 3, 7, 4
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    hard = torch.tensor([[1, 0, 1, 1, 0, 1, 0], [1, 1, 1, 0, 0, 0, 1]], dtype=torch.float64)
    weight = torch.randn(B, H, N, D, dtype=torch.float64)

    def run(fused):
        policy = hard.clone().requires_grad_(True)
        if fused:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=pruning.attention_bias(policy))
        else:
            out = pruning.softmax_with_policy(q @ k.transpose(-2, -1) / D ** 0.5, policy) @ v
        grads = torch.autograd.grad((out * weight).sum(), (q, k, v, policy))
        return out, grads

    out_f, grads_f = run(True)
    out_r, grads_r = run(False)
    torch.testing.assert_close(out_f, out_r, rtol=1e-7, atol=1e-8)
    for gf, gr in zip(grads_f, grads_r):
        torch.testing.assert_close(gf, gr, rtol=1e-6, atol=1e-8)
    assert grads_r[3][hard == 0].abs().min() > 1e-4   # dead tokens do get a gradient
    with torch.no_grad():   # without a gradient the bias removes dead keys exactly
        assert torch.isinf(pruning.attention_bias(hard)[0, 0, 0, 1])


def test_gumbel_straight_through_is_hard_and_differentiable():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 2, requires_grad=True)
    scores = logits.log_softmax(-1)
    alive = torch.ones(4, 7)
    alive[:, 0] = 0
    keep = pruning.gumbel_keep(scores, alive)
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(keep[:, 0] == 0)
    keep.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_training_forward_masks_and_backprops():
    model = spvit(kept=None).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.logits.shape == (2, 5)
    assert len(out.policy) == 3
    # monotone: a token dropped at stage s stays dropped
    for prev, cur in zip(out.policy, out.policy[1:]):
        assert torch.all(cur <= prev)
    loss = out.logits.logsumexp(-1).sum() + sum(p.sum() for p in out.keep_prob)
    loss.backward()
    grads = [p.grad for p in model.selectors.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_eval_default_mode_is_static_topk():
    model = spvit()
    out = model(torch.randn(1, 3, 32, 32))
    assert out.policy == []  # removal path
    static = StaticSPViT(model, (10, 6, 3))
    assert static(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_bad_locations():
    with pytest.raises(ValueError):
        SPViT(tiny_vit(), locations=(0, 2))
    with pytest.raises(ValueError):
        SPViT(tiny_vit(), locations=(1, 4))


def test_confident_selector_scores_stay_distinct_and_exact():
    """The selector's log-probabilities are the log of its head-weighted probabilities, computed in log
    space. A confident selector (large weights) saturates its probabilities; clamped before the log, its
    surest tokens all scored the same and top-k chose among them by the runtime's tie-breaking."""
    torch.manual_seed(0)
    sel = pruning.TokenSelector(192, 3).eval()
    with torch.no_grad():
        for w in (sel.w_in, sel.w1, sel.w2, sel.w3):
            w.normal_(0.0, 1.0)
    x = torch.randn(2, 197, 192)
    scores = sel(x, torch.ones(2, 197))
    assert torch.isfinite(scores).all()
    assert torch.allclose(scores.exp().sum(-1), torch.ones(2, 197), atol=1e-5)
    odds = scores[..., 0] - scores[..., 1]
    assert (odds.abs() > 18.5).sum() > 50  # saturated: beyond what a clamp at 1e-8 lets through
    assert all(row.unique().numel() == row.numel() for row in odds)  # no two tokens tie
    # the same as the mixture of the heads' probabilities wherever that is representable
    with torch.no_grad():
        logits, head_logits = sel.logits(x, torch.ones(2, 197))
        probs = (logits.softmax(-1) * head_logits.softmax(-1)[..., None]).sum(2)
    fine = probs > 1e-6
    assert fine.float().mean() > 0.3
    assert torch.allclose(scores[fine], probs[fine].log(), atol=1e-4)
