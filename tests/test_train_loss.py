import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from latprof.train.latency import LatencyModel, interp
from latprof.train.loss import LatencySparsityLoss
from latprof.train.spvit import SPViT
from latprof.train.synthetic import synthetic_table


def tiny_lm(selectors=True):
    table = synthetic_table("tiny", depth=4, patches=16, tokens=[2, 5, 9, 13, 17, 18, 19, 20], selectors=selectors,
                            jitter=0.02, seed=1)
    return table, LatencyModel.from_table(table, "tiny", 16, (1, 2, 3), 4)


def test_torch_latency_equals_table_and_has_slope():
    table, lm = tiny_lm()
    pred = lm.torch_predictor(dtype=torch.float64)
    for kept in [(15.5, 11.3, 6.7), (10.2, 9.6, 3.3), (5, 4.5, 2.25)]:  # off the grid kinks
        k = [torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for v in kept]
        got = pred(k)
        assert float(got.detach()) == pytest.approx(lm.predict_ms(kept), rel=1e-9)
        got.backward()
        # d latency / d kept_s by finite differences of the table itself
        for s in range(3):
            hi = list(kept); lo = list(kept)
            hi[s] += 1e-4; lo[s] -= 1e-4
            fd = (lm.predict_ms(hi) - lm.predict_ms(lo)) / 2e-4
            assert float(k[s].grad) == pytest.approx(fd, rel=1e-4, abs=1e-9)
    # selector/merge units are counted: the table with them predicts more
    _, lm_plain = tiny_lm(selectors=False)
    assert lm.predict_ms((8, 6, 4)) > lm_plain.predict_ms((8, 6, 4))


def test_interp_matches_numpy():
    xs = torch.tensor([2.0, 5.0, 9.0, 20.0])
    ys = torch.tensor([1.0, 3.0, 2.0, 7.0])
    x = torch.tensor([2.0, 3.5, 8.0, 9.0, 19.9, 20.0])
    np.testing.assert_allclose(interp(x, xs, ys).numpy(), np.interp(x.numpy(), xs.numpy(), ys.numpy()), rtol=1e-6)


def test_latency_term_only_above_budget():
    _, lm = tiny_lm()
    full = [torch.ones(2, 16)] * 3
    over = LatencySparsityLoss(lm, lm.predict_ms((16, 16, 16)) - 0.01, (16, 16, 16))(full)
    under = LatencySparsityLoss(lm, lm.predict_ms((16, 16, 16)) + 0.01, (16, 16, 16))(full)
    assert float(over.loss) > 0
    assert float(under.loss) == pytest.approx(0.0, abs=1e-7)
    assert float(under.latency_ms) == pytest.approx(lm.predict_ms((16, 16, 16)), rel=1e-5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train_ratio(target, steps=30):
    _, lm = tiny_lm()
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3)
    model = SPViT(vit, (1, 2, 3)).train()
    crit = LatencySparsityLoss(lm, 1e3, target)  # generous budget: only the ratio term acts
    opt = torch.optim.Adam(model.selector_parameters(), lr=3e-2)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        start = crit(model(x).keep_prob).shares
    for _ in range(steps):
        terms = crit(model(x).keep_prob)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
    with torch.no_grad():
        end = torch.stack([crit(model(x).keep_prob).shares for _ in range(4)]).mean(0)
    return start, end


def test_ratio_term_drives_kept_share_to_target():
    start, low = _train_ratio((4, 2, 1))        # shares 0.25, 0.125, 0.0625: prune hard
    goal = torch.tensor([0.25, 0.125, 0.0625])
    assert low.mean() < start.mean() - 0.2, (start, low)
    assert (low - goal).abs().sum() < 0.5 * (start - goal).abs().sum(), (start, low)
    _, high = _train_ratio((16, 16, 16))       # keep everything: shares go up from the fresh selector
    assert high.mean() > start.mean(), (start, high)
    assert high.mean() - low.mean() > 0.3, (high, low)


def test_few_steps_lower_the_loss():
    torch.manual_seed(0)
    _, lm = tiny_lm()
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3)
    model = SPViT(vit, (1, 2, 3)).train()
    crit = LatencySparsityLoss(lm, lm.predict_ms((10, 8, 6)), (10, 8, 6))
    opt = torch.optim.AdamW([{"params": model.selector_parameters(), "lr": 3e-3},
                             {"params": model.backbone_parameters(), "lr": 1e-3}])
    x, y = torch.randn(12, 3, 32, 32), torch.randint(0, 3, (12,))

    def total():
        out = model(x)
        return F.cross_entropy(out.logits, y) + 2.0 * crit(out.keep_prob).loss

    torch.manual_seed(1)
    with torch.no_grad():
        before = sum(float(total()) for _ in range(4)) / 4
    for _ in range(30):
        loss = total()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(1)
    with torch.no_grad():
        after = sum(float(total()) for _ in range(4)) / 4
    assert after < 0.7 * before, (before, after)
