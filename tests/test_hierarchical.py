"""Hierarchical ViTs (PiT, Swin): registry, units that reproduce timm's forward, the pruned-token-count
definitions of latprof.models.staged, MACs against the published dense figures, and a real measured table."""

import pytest
import torch

from latprof.errors import UsageError
from latprof.lut.build import build_and_write
from latprof.measure.runner import default_grid, measure, parse_tokens, store_path, table_tokens, unit_grid
from latprof.models import get_model, list_models
from latprof.predict import model_macs, parse_keep, parse_tokens as parse_block_tokens, predict, unit_tokens
from tests.conftest import decisive_selectors, write_config

# dense GMACs as published (Swin paper, PiT paper; SPViT's tables quote the same)
PUBLISHED_GMACS = {"swin_t": 4.5, "swin_s": 8.7, "pit_s": 2.9, "pit_xs": 1.4}


def test_registry_lists_the_hierarchical_models():
    assert set(PUBLISHED_GMACS) <= set(list_models())
    assert get_model("pit_s").timm_name == "pit_s_224" and get_model("swin_s").timm_name == "swin_small_patch4_window7_224"


@pytest.mark.parametrize("model", sorted(PUBLISHED_GMACS))
def test_dense_macs_match_the_published_figures(model):
    got = model_macs(get_model(model)) / 1e9
    assert abs(got - PUBLISHED_GMACS[model]) / PUBLISHED_GMACS[model] < 0.03, got


def test_pit_units_and_token_ranges():
    spec = get_model("pit_s")
    names = [u.name for u in spec.units]
    assert names[0] == "patch_embed" and names[-1] == "head"
    # one location per stage, after the stage's first block; pooling between stages
    assert names.index("selector.1") == names.index("blocks.0") + 1
    assert names.index("pool.1") < names.index("blocks.2") < names.index("selector.2") < names.index("blocks.4")
    assert names.index("pool.2") < names.index("blocks.8") < names.index("selector.3") < names.index("blocks.9")
    top = {u.shared: spec.unit_max(u) for u in spec.units if u.kind == "tokens"}
    assert top["block.s1"] == 730 and top["block.s2"] == 197 and top["block.s3"] == 50
    assert top["selector.s2"] == 197 and top["merge.s3"] == 50


def test_swin_units_shift_and_prune_in_stage_3():
    spec = get_model("swin_t")
    shared = {u.name: u.shared for u in spec.units}
    assert spec.pruning_locations == (6, 8)
    assert get_model("swin_s").pruning_locations == (10, 16)
    assert shared["blocks.4"] == "block.s3" and shared["blocks.5"] == "block.s3.shift"
    assert shared["blocks.10"] == shared["blocks.11"] == "block.s4"  # one window covers the 7x7 grid: no shift
    assert {spec.unit_max(u) for u in spec.units if u.kind == "tokens"} == {49}
    assert spec.unit("selector.1").kind == "fixed" and spec.unit("selector.1").fixed_tokens == 196


def test_pit_units_chained_reproduce_timm(one_torch_thread):
    spec = get_model("pit_xs")
    model, mods = spec.builder(spec)
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = model(img)
        x = mods["patch_embed"][0](img)
        for st in range(3):
            if st:
                x = mods[f"pool.{st}"][0](x)
            assert x.shape == mods[f"block.s{st + 1}"][1](x.shape[1])
            for blk in model.transformers[st].blocks:
                x = blk(x)
        got = mods["head"][0](x)
    assert torch.allclose(got, want, atol=1e-5)


def test_swin_units_chained_reproduce_timm_including_shifted_windows(one_torch_thread):
    from timm.models.swin_transformer import window_partition, window_reverse

    from latprof.models.swin import shifted

    spec = get_model("swin_t")
    model, mods = spec.builder(spec)
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = model(img)
        x = mods["patch_embed"][0](img)
        for st, stage in enumerate(spec.layout.stages):
            if st:
                x = mods[f"downsample.{st}"][0](x)
            for b, blk in zip(stage.blocks, model.layers[st].blocks):
                x_in, x = x, blk(x)
                if not (b == stage.first or (b == stage.first + 1 and shifted(stage, b))):
                    continue  # a stage's unit graphs come from its first (unshifted) and second (shifted) block
                # the window unit between timm's own shift/partition and reverse/unshift
                unit = mods[spec.unit(f"blocks.{b}").shared][0]
                s = blk.shift_size
                w = window_partition(torch.roll(x_in, (-s[0], -s[1]), (1, 2)), (7, 7)).view(-1, 49, stage.dim)
                assert w.shape == mods[spec.unit(f"blocks.{b}").shared][1](49)
                y = window_reverse(unit(w).view(-1, 7, 7, stage.dim), (7, 7), stage.grid, stage.grid)
                x_unit = torch.roll(y, s, (1, 2))
                assert torch.allclose(x_unit, x, atol=1e-5), (st, b)
        got = mods["head"][0](x)
    assert torch.allclose(got, want, atol=1e-5)


def test_pit_schedule_restarts_dense_in_every_stage():
    spec = get_model("pit_s")
    s = parse_keep("0.5,0.9,0.5", spec)  # stage 2 keeps more than stage 1: every stage starts dense
    assert s.kept == (364, 176, 24)
    assert s.block_tokens() == [730, 1 + 364 + 1, 197, 197] + [1 + 176 + 1] * 4 + [50] + [1 + 24 + 1] * 3
    n = unit_tokens(spec, s)
    assert (n["selector.1"], n["merge.1"]) == (730, 730)     # the tokens arriving at the location
    assert (n["selector.2"], n["selector.3"]) == (197, 50)
    assert (n["pool.1"], n["pool.2"], n["head"]) == (730, 197, 50)  # the whole grid, always
    assert parse_block_tokens(",".join(map(str, s.block_tokens())), spec) == s
    # keeping everything is one token too many: the package token would make N exceed the dense stage
    assert parse_keep("1,1,1", spec).block_tokens()[1] == 730


def test_swin_schedule_counts_tokens_per_window():
    spec = get_model("swin_t")
    s = parse_keep("0.7,0.5", spec)
    assert s.kept == (34, 24)
    assert s.block_tokens() == [49] * 6 + [34, 34, 24, 24] + [49, 49]
    assert unit_tokens(spec, s)["selector.2"] == 196
    # fewer MACs than dense, by the share of window tokens skipped in four stage-3 blocks
    dense, pruned = model_macs(spec), model_macs(spec, s)
    assert 0.8 * dense < pruned < dense


@pytest.mark.parametrize("keep, match", [("0.5,0.7", "non-increasing"), ("0.5", "1 keep ratios for 2"),
                                         ("0,0.5", "outside")])
def test_bad_hierarchical_schedules_are_usage_errors(keep, match):
    with pytest.raises(UsageError, match=match):
        parse_keep(keep, get_model("swin_t"))


def test_block_tokens_that_are_no_schedule_are_refused():
    spec = get_model("swin_t")
    with pytest.raises(UsageError, match="not a swin schedule"):
        parse_block_tokens(",".join(["49"] * 6 + ["30", "34", "24", "24", "49", "49"]), spec)


def test_default_grids_scale_with_each_units_range():
    spec = get_model("pit_s")
    assert default_grid(197) == [1, 17, 33, 49, 65, 97, 129, 161, 197]
    assert default_grid(49) == [1, 4, 8, 12, 16, 24, 32, 40, 49]
    grids = {u.shared: unit_grid(spec, u, None) for u in spec.units if u.kind == "tokens"}
    assert grids["block.s1"][-1] == 730 and grids["block.s3"][-1] == 50 and len(grids["block.s1"]) == 9
    # explicit counts: each unit takes those within its range
    assert unit_grid(spec, spec.unit("blocks.8"), parse_tokens("10,50,197,730", spec)) == [10, 50]
    with pytest.raises(UsageError, match="fits pit_s/blocks.8"):
        parse_tokens("100,730", spec)


def test_token_ranges_give_dense_grids():
    spec = get_model("deit_t")
    assert parse_tokens("1-5", spec) == [1, 2, 3, 4, 5]
    # every S-th count, and the range's top always (the dense model must be in the table)
    assert parse_tokens("1-197:50,100", spec) == [1, 51, 100, 101, 151, 197]
    assert parse_tokens("190-197:2", spec) == [190, 192, 194, 196, 197]
    for bad in ("9-3", "1-9:0", "5:2", "1-x", "1-198"):
        with pytest.raises(UsageError):
            parse_tokens(bad, spec)




def test_table_tokens_remeasure_each_shared_graphs_own_counts():
    import pandas as pd

    spec = get_model("pit_s")
    frame = pd.DataFrame({"unit": ["blocks.0", "blocks.1", "blocks.8", "head"], "tokens": [730, 10, 50, 1]})
    counts = table_tokens(spec, frame)
    # blocks.0 and blocks.1 share the stage-1 graph: their counts join; a unit the table lacks gets none
    assert counts(spec.unit("blocks.0")) == [10, 730] == counts(spec.unit("blocks.1"))
    assert counts(spec.unit("blocks.8")) == [50] and counts(spec.unit("head")) == [1]
    assert counts(spec.unit("blocks.4")) == []


def test_static_pit_pruned_tokens_bypass_the_rest_of_their_stage(one_torch_thread):
    spec = get_model("pit_xs")
    k = 300
    model = spec.pruned(spec, (k, 100, 20))
    seen = {}
    model.pit.transformers[0].blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("b0", o))
    model.pit.transformers[1].pool.register_forward_hook(lambda m, i, o: seen.__setitem__("pool_in", i[0]))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    after_b0 = seen["b0"][0, 1:]                               # [729, C]: features at the pruning location
    at_pool = seen["pool_in"][0].flatten(1).transpose(0, 1)    # [729, C]: what the pooling reads
    unchanged = (after_b0 - at_pool).abs().amax(1) == 0
    assert int(unchanged.sum()) == 729 - k                     # exactly the pruned ones skipped block 1


def test_static_swin_processes_k_tokens_per_window(one_torch_thread):
    spec = get_model("swin_t")
    model = spec.pruned(spec, (30, 20))
    stage = spec.layout.stages[2]
    x, score = torch.randn(1, 14, 14, stage.dim), torch.randn(1, 14, 14, 1)
    with torch.no_grad():
        for j in (2, 3):  # an unshifted and a shifted block of stage 3
            blk = model.swin.layers[2].blocks[j]
            y = model._pruned_block(2, j, blk, x, score, 30, 14)
            assert int(((y - x).abs().amax(-1) == 0).sum()) == stage.windows * (49 - 30)
            # all 49 tokens through the gather path is the dense block exactly
            full = model._pruned_block(2, j, blk, x, score, 49, 14)
            assert torch.allclose(full, model._dense_block(2, j, blk, x, 14), atol=1e-5)
        dense = spec.pruned(spec, (49, 49))
        img = torch.randn(1, 3, 224, 224)
        assert torch.allclose(dense(img), dense.swin(img), atol=1e-5)  # no pruning: timm's Swin


@pytest.mark.parametrize("model, kept", [("pit_xs", (364, 98, 24)), ("swin_t", (34, 24))])
def test_static_pruned_models_export_and_import_into_tvm(model, kept, tmp_path, one_torch_thread):
    from latprof.compile import tvmlib
    from latprof.export import export_unit
    from latprof.validate import pruned_model

    spec = get_model(model)
    g = export_unit(pruned_model(spec, kept), (1, 3, 224, 224), tmp_path, model, "e2e", 0)
    assert g.ort_max_abs_err < 1e-3  # onnxruntime agrees with torch on the logits
    tvmlib.import_onnx(g.path)       # static shapes only: no shape arithmetic TVM's importer refuses


def test_measure_table_and_predict_pit_and_swin_on_local(workdir, tmp_path, one_torch_thread):
    """The real path: ONNX export checked against torch, onnxruntime on the local RPC device, build-lut,
    predict; small grids."""
    cfg = write_config(tmp_path / "ort.yaml", name="ortdev", engine="onnxruntime",
                       measure={"repeats": 3, "reference_every": 0})
    for model, tokens in (("pit_xs", [1, 50, 197, 730]), ("swin_t", [12, 49])):
        spec = get_model(model)
        r = measure(str(cfg), model, tokens, progress=False)
        shared = {u.shared: u for u in spec.units}
        assert r.measured == sum(1 if u.kind == "fixed" else len(unit_grid(spec, u, tokens)) for u in shared.values())
    table = build_and_write(store_path(workdir, "ortdev"), tmp_path / "h.csv")
    assert set(table.frame["model"]) == {"pit_xs", "swin_t"}
    assert table.token_range("pit_xs", "blocks.1") == (1, 730) and table.token_range("pit_xs", "blocks.9") == (1, 50)
    p = predict(table, "pit_xs", parse_keep("0.05,0.2,1", get_model("pit_xs")))
    assert p.block_tokens[:3] == [730, 1 + 36 + 1, 197] and p.block_tokens[8:] == [50, 50, 50, 50]
    dense = predict(table, "pit_xs", parse_keep("1,1,1", get_model("pit_xs")))
    assert p.total_ms < dense.total_ms
    s = predict(table, "swin_t", parse_keep("0.5,0.25", get_model("swin_t")))
    dense = predict(table, "swin_t", parse_keep("1,1", get_model("swin_t")))
    assert s.total_ms < dense.total_ms and s.macs < dense.macs
    # whole pruned models measured end to end against the prediction
    from latprof.validate import format_validation, validate

    for model in ("pit_xs", "swin_t"):
        v = validate(str(cfg), model, tmp_path / "h.csv", configs=2, progress=False, echo=lambda *a: None)
        assert len(v.configs) == 2 and all(c.measured_ms > 0 and c.predicted_ms > 0 for c in v.configs)
        assert all(0.3 < c.predicted_ms / c.measured_ms < 3 for c in v.configs)  # the same order of magnitude
        assert ("kept tokens per window" in format_validation(v)) == (model == "swin_t")


# -- the keep-ratio solver for hierarchical models ----------------------------------------------------
def staged_table(model: str, seed: int = 0):
    """A synthetic table for every unit of `model` on its default grid: a + b N + c N^2 per graph."""
    import numpy as np
    import pandas as pd

    from latprof.lut.table import COLUMNS, LutTable

    spec, rng, rows, coef = get_model(model), np.random.default_rng(seed), [], {}
    for u in spec.units:
        a, b, c = coef.setdefault(u.shared, (rng.uniform(0.01, 0.1), rng.uniform(1e-3, 5e-3), rng.uniform(0, 2e-5)))
        for n in [u.fixed_tokens] if u.kind == "fixed" else default_grid(spec.unit_max(u)):
            med = a + b * n + c * n * n
            rows.append(dict(model=model, unit=u.name, kind=u.kind, position=u.position, tokens=n, median_ms=med,
                             q1_ms=med, q3_ms=med, ci_low_ms=med, ci_high_ms=med, n_samples=3, engine="onnxruntime",
                             tuning="none", graph=f"{u.shared}-g", samples_ms=f"{med:.6g}"))
    return LutTable(pd.DataFrame(rows)[COLUMNS], {"device": "synthetic"})


def brute_force(table, spec):
    """(predicted ms, information, kept) of every combination of grid kept counts that the schedule's
    own rules accept, with latprof.predict's sum of units."""
    import itertools

    lay = spec.layout
    grids = []
    for s, loc in enumerate(lay.locations):
        ns = table.curve(spec.name, f"blocks.{loc}")[0]
        grids.append(sorted({lay.kept_for(s, int(n)) for n in ns if 1 <= lay.kept_for(s, int(n)) <= lay.limit(s)}))
    out = []
    for kept in itertools.product(*grids):
        try:
            sched = lay.schedule(kept)
        except UsageError:
            continue  # increases within a stage
        info = sum(kept[lay.unit_location(f"blocks.{b}")] * lay.stages[lay.stage_index(b)].windows
                   for b in range(lay.depth) if lay.unit_location(f"blocks.{b}") is not None)
        out.append((predict(table, spec.name, sched).sum_ms, info, kept))
    return out


def best_within(points, budget):
    ok = [p for p in points if p[0] <= budget + 1e-9]  # the solver sums in another order: rounding
    return max(ok, key=lambda p: (p[1], -p[0]))


@pytest.mark.parametrize("model", ["pit_xs", "swin_t", "swin_s"])
def test_staged_solver_matches_brute_force(model):
    from latprof.train.solver import solve_staged

    spec, table = get_model(model), staged_table(model)
    fastest = solve_staged(table, spec, 1e9).fastest_ms
    top = solve_staged(table, spec, 1e9).latency_ms
    points = brute_force(table, spec)
    for budget in [fastest, fastest + 0.3 * (top - fastest), fastest + 0.7 * (top - fastest), top]:
        r = solve_staged(table, spec, budget)
        lat, info, kept = best_within(points, budget)
        assert (r.kept, r.information) == (kept, info) and abs(r.latency_ms - lat) < 1e-9
        assert abs(predict(table, model, r.schedule).sum_ms - r.latency_ms) < 1e-9


def test_staged_solver_refuses_an_impossible_budget_naming_the_fastest():
    from latprof.errors import InfeasibleError
    from latprof.train.solver import solve_staged

    spec, table = get_model("pit_xs"), staged_table("pit_xs")
    fastest = solve_staged(table, spec, 1e9).fastest_ms
    with pytest.raises(InfeasibleError, match=f"{fastest:.4g} ms"):
        solve_staged(table, spec, fastest * 0.9)


def test_solve_cli_meets_the_budget_with_and_without_the_overhead_sidecar(tmp_path):
    from click.testing import CliRunner

    from latprof.cli import main
    from latprof.lut.table import write_lut
    from latprof.predict import Overhead, write_overhead
    from latprof.train.synthetic import synthetic_table

    for model, table in (("pit_xs", staged_table("pit_xs")), ("deit_t", synthetic_table(tokens=range(2, 200), selectors=True))):
        path = tmp_path / f"{model}.csv"
        write_lut(table, path)
        out = CliRunner().invoke(main, ["solve", "--lut", str(path), "--model", model, "--budget", "1000ms"])
        assert out.exit_code == 0, out.output
        loose = float(out.output.split("sum of units ")[1].split(" ms")[0])
        budget = 0.8 * loose
        out = CliRunner().invoke(main, ["solve", "--lut", str(path), "--model", model, "--budget", f"{budget}ms"])
        assert out.exit_code == 0 and float(out.output.split("predicted latency ")[1].split(" ms")[0]) <= budget
        # with a sidecar the corrected prediction, not the plain sum, meets the budget
        write_overhead(path, Overhead(per_call_ms=0.001, scale=1.2, n_configs=3, model=model, engine=table.engine,
                                     tuning=str(table.frame["tuning"].iloc[0])))
        budget *= 1.2  # feasible: the plain-sum schedule above, corrected
        out = CliRunner().invoke(main, ["solve", "--lut", str(path), "--model", model, "--budget", f"{budget}ms"])
        assert out.exit_code == 0 and "overhead correction" in out.output, out.output
        assert float(out.output.split("predicted latency ")[1].split(" ms")[0]) <= budget
        out = CliRunner().invoke(main, ["solve", "--lut", str(path), "--model", model, "--budget", "0.001ms"])
        assert out.exit_code == 2 and "below the fastest" in out.output and "Traceback" not in out.output


# -- SPViT on PiT (training modes) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def pit_spvit():
    from latprof.models import timm_model
    from latprof.train.staged import StagedSPViT

    spec = get_model("pit_xs")
    torch.manual_seed(0)
    return StagedSPViT(timm_model(spec.timm_name), spec.layout)


def test_pit_masking_and_real_removal_agree(pit_spvit, one_torch_thread):
    m = pit_spvit.eval()
    with torch.no_grad():
        for sel in m.selectors:  # decisive scores: no ties at the top-k boundary
            for w in (sel.w_in, sel.w1, sel.w2, sel.w3):
                w.normal_(0.0, 0.3)
        img = torch.randn(2, 3, 224, 224)
        masked = m(img, mode="topk-mask", kept=(300, 100, 20))
        removed = m(img, mode="topk", kept=(300, 100, 20))
    assert torch.allclose(masked.logits, removed.logits, atol=1e-4)
    assert [int(k.sum(1)[0]) for k in masked.policy] == [300, 100, 20]
    # pruning changes the result (the decisions matter)
    with torch.no_grad():
        other = m(img, mode="topk", kept=(30, 10, 2)).logits
    assert not torch.allclose(other, removed.logits, atol=1e-3)


def test_pit_gumbel_training_steps_lower_the_loss_and_reach_the_selectors(pit_spvit, one_torch_thread):
    m = pit_spvit.train()
    torch.manual_seed(0)
    img, target = torch.randn(4, 3, 224, 224), torch.tensor([1, 2, 3, 4])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        out = m(img, mode="gumbel")
        # cross-entropy plus a push toward keeping half of each stage: both must train
        ratio = sum(((p.sum(1) / p.shape[1]) - 0.5).pow(2).mean() for p in out.keep_prob)
        loss = torch.nn.functional.cross_entropy(out.logits, target) + ratio
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.selectors[0].parameters() if p.requires_grad)
        opt.step()
    assert losses[-1] < losses[0]


def test_swin_masking_and_real_removal_agree_per_window(one_torch_thread):
    from latprof.models import timm_model
    from latprof.train.staged import StagedSPViT

    spec = get_model("swin_t")
    torch.manual_seed(0)
    m = StagedSPViT(timm_model(spec.timm_name), spec.layout).eval()
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for sel in m.selectors:
            for w in (sel.w_in, sel.w1, sel.w2, sel.w3):
                w.normal_(0.0, 0.3)
        masked = m(img, mode="topk-mask", kept=(30, 20)).logits
        removed = m(img, mode="topk", kept=(30, 20)).logits
        assert torch.allclose(masked, removed, atol=1e-4)
        assert torch.allclose(m(img, mode="topk", kept=(49, 49)).logits, m.backbone(img), atol=1e-4)  # keep all = timm
    m.train()
    out = m(img, mode="gumbel")
    out.logits.square().mean().backward()
    assert len(out.policy) == 2 and all(p.shape == (2, 196) for p in out.policy)
    assert m.selectors[0].w1.grad is not None and m.selectors[0].w1.grad.abs().sum() > 0


@pytest.mark.parametrize("model", ["pit_xs", "swin_t"])
def test_latprof_train_runs_spvit_on_hierarchical_models(model, tmp_path, one_torch_thread):
    """The training command end to end on generated images: the solver's schedule for the budget, Gumbel
    training steps with the latency-sparsity loss, evaluation with tokens really removed, a checkpoint."""
    import json

    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from latprof.lut.table import write_lut
    from latprof.train.cli import export, train
    from latprof.train.solver import solve_staged

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for c in range(2):
            d = tmp_path / "data" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(count):
                Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    table = staged_table(model)
    write_lut(table, tmp_path / "lut.csv")
    spec = get_model(model)
    fastest, top = solve_staged(table, spec, 1e9).fastest_ms, solve_staged(table, spec, 1e9).latency_ms
    budget = fastest + 0.5 * (top - fastest)
    out = tmp_path / "run"
    args = ["--lut", str(tmp_path / "lut.csv"), "--budget", f"{budget}ms", "--data", str(tmp_path / "data"),
            "--out", str(out), "--model", model, "--batch-size", "2", "--workers", "0", "--no-progress",
            "--random-init", "--epochs", "1", "--max-steps", "2"]
    res = CliRunner().invoke(train, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    sched = json.loads((out / "schedule.json").read_text())
    assert tuple(sched["kept"]) == solve_staged(table, spec, budget).kept and sched["predicted_ms"] <= budget
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["expected_ms"] > 0 and 0.0 <= record["val_acc"] <= 1.0
    # wrong settings for a hierarchical model say what to do
    bad = CliRunner().invoke(train, args[:-6] + ["--locations", "1,2,3", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "fixed by" in str(bad.exception)
    # the trained model with its static schedule, tokens really removed, as ONNX that onnxruntime runs
    decisive_selectors(out / "last.pt", tmp_path / "decisive.pt")
    res = CliRunner().invoke(export, ["--checkpoint", str(tmp_path / "decisive.pt"), "--out", str(tmp_path / "m.onnx")],
                             catch_exceptions=False)
    assert res.exit_code == 0 and "onnxruntime max |diff|" in res.output, res.output
    from latprof.compile import tvmlib
    from latprof.train.export import read_export

    assert read_export(tmp_path / "m.onnx")["kept"] == list(sched["kept"])
    tvmlib.import_onnx(tmp_path / "m.onnx")  # shapes folded: TVM's importer needs them static
    # the export computes what the trained model computes (Swin's is built as `validate` builds it)
    import onnxruntime as ort
    import torch

    from latprof.train.trainer import build_from_checkpoint
    from latprof.train.weights import load_checkpoint

    trained = build_from_checkpoint(load_checkpoint(tmp_path / "decisive.pt")).eval()
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = trained(images, mode="topk", kept=tuple(sched["kept"])).logits.numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})[0]
    assert np.abs(got - want).max() < 1e-3


def test_tuning_anchors_follow_each_units_range():
    from latprof.measure.runner import unit_anchors

    spec = get_model("pit_s")
    got = {u.shared: unit_anchors(spec, u, None) for u in spec.units if u.kind == "tokens"}
    assert got["block.s1"] == [704] and got["block.s2"] == [192] and got["block.s3"] == [32]
    assert unit_anchors(spec, spec.unit("blocks.8"), [64, 128]) == [32]      # none of them fits 1..50
    assert unit_anchors(spec, spec.unit("blocks.3"), [64, 128]) == [64, 128]
    assert unit_anchors(get_model("swin_t"), get_model("swin_t").unit("blocks.6"), None) == [32]


@pytest.mark.parametrize("model", ["pit_xs", "swin_t"])
def test_on_grid_schedules_run_every_unit_at_a_measured_count(model):
    """`validate --on-grid` draws among the solver's candidates: every unit of every schedule runs at a
    token count the table holds, so nothing is interpolated (tuned TVM: nothing to transfer)."""
    from latprof.predict import unit_tokens
    from latprof.train.solver import grid_candidates
    from latprof.validate import random_schedules

    spec, table = get_model(model), staged_table(model)
    cands = grid_candidates(table, spec)
    scheds = random_schedules(table, spec, 12, seed=2, on_grid=True)
    assert len({s.kept for s in scheds}) == 12
    for s in scheds:
        assert all(k in ks for k, ks in zip(s.kept, cands))
        for unit, n in unit_tokens(spec, s).items():
            assert n in set(table.curve(model, unit)[0]), (s.kept, unit, n)
    drawn = random_schedules(table, spec, 12, seed=2)  # the default: anywhere in the measured ranges
    assert any(n not in set(table.curve(model, u)[0]) for s in drawn for u, n in unit_tokens(spec, s).items())


@pytest.mark.parametrize("model", ["pit_xs", "swin_t"])
def test_drift_reference_follows_each_stage_by_its_share_of_the_schedule(model):
    """One reference unit per stage (its first block, dense); a schedule's drift weighs each stage's
    ratio by its blocks' predicted time, so a stage that slowed counts as much as it costs."""
    from latprof.validate import reference_figures, reference_units, reference_weights, weighted_drift

    spec, table = get_model(model), staged_table(model)
    lay = spec.layout
    refs = reference_units(spec)
    assert list(refs) == list(range(len(lay.stages)))
    assert list(refs.values()) == [f"blocks.{st.first}" for st in lay.stages]
    figures = reference_figures(spec, table)
    for st, name in refs.items():
        n = spec.unit_max(spec.unit(name))
        assert figures[name] == (n, pytest.approx(table.latency_ms(model, name, n)))

    sched = lay.from_ratios([0.5] * len(lay.locations))
    p = predict(table, model, sched)
    w = reference_weights(spec, p)
    blocks = [u for u in p.units if u.unit.startswith("blocks.")]
    assert sum(w.values()) == pytest.approx(sum(u.median_ms for u in blocks))
    for st, name in refs.items():
        assert w[name] == pytest.approx(sum(u.median_ms for u in blocks if lay.stage_index(int(u.unit[7:])) == st))
    # only the first stage slowed, by 20%: the schedule's drift is 20% times that stage's share
    ratios = {name: 1.2 if st == 0 else 1.0 for st, name in refs.items()}
    share = w[refs[0]] / sum(w.values())
    assert weighted_drift(ratios, w) == pytest.approx(1 + 0.2 * share)
    assert 1.0 < weighted_drift(ratios, w) < 1.2
    # a record of one reference (written before the per-stage reference) falls back to it alone
    assert weighted_drift({refs[0]: 1.2}, w) == pytest.approx(1.2)
    assert weighted_drift({}, w) is None
