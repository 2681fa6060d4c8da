"""Training throughput: SPViT-DeiT-T (masking, Gumbel selectors at 3,6,9) vs dense DeiT-T, images/s.

    python benchmarks/train_throughput.py            # CUDA: batch 128, fp32 and bf16; CPU: a small run
    python benchmarks/train_throughput.py --batch 32 --steps 10 --rounds 3

One training step = forward, cross-entropy (+ latency-sparsity loss for SPViT), backward, AdamW step.
Dense and SPViT are timed in alternating rounds (the median round is reported), so drift on a shared
machine hits both alike. Timing excludes warm-up steps and synchronises the GPU only around each timed
round, never per step. With --sync-check, one SPViT step also runs under
`torch.cuda.set_sync_debug_mode("error")`, which raises on any host-device synchronisation.
Random inputs, random init: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def step_fn(model, crit, opt, images, labels, dtype):
    import torch
    import torch.nn.functional as F

    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(images)
        logits = out.logits if crit is not None else out
        loss = F.cross_entropy(logits.float(), labels)
        if crit is not None:
            loss = loss + 2.0 * crit([p.float() for p in out.keep_prob]).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def build(spvit: bool, device, compile: str | None = None):
    import timm
    import torch

    from latprof.train.latency import LatencyModel
    from latprof.train.loss import LatencySparsityLoss
    from latprof.train.spvit import SPViT
    from latprof.train.synthetic import synthetic_table

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    crit = None
    if spvit:
        lm = LatencyModel.from_table(synthetic_table("deit_t"), "deit_t", 196, (3, 6, 9), 12)
        crit = LatencySparsityLoss(lm, lm.predict_ms((137, 96, 67)), (137, 96, 67)).to(device)
        model = SPViT(model, (3, 6, 9))
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    if compile:
        model = torch.compile(model, mode=compile)
    return model, crit, opt


def timed(setup, dtype, batch, steps, device) -> float:
    import torch

    model, crit, opt, images, labels = setup
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn(model, crit, opt, images, labels, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def sync_check(device, dtype) -> str:
    import torch

    model, crit, opt = build(True, device)
    images = torch.randn(8, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (8,), device=device)
    step_fn(model, crit, opt, images, labels, dtype)   # first step: lazy init may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step_fn(model, crit, opt, images, labels, dtype)
        return "none"
    except RuntimeError as e:
        return f"SYNC: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main() -> None:
    import torch

    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128 if cuda else 8)
    ap.add_argument("--steps", type=int, default=20 if cuda else 3)
    ap.add_argument("--warmup", type=int, default=5 if cuda else 1)
    ap.add_argument("--rounds", type=int, default=5 if cuda else 1)
    ap.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                    help="also time both models under torch.compile (mode: default, reduce-overhead, ...)")
    ap.add_argument("--sync-check", action="store_true", help="CUDA: fail if an SPViT step synchronises")
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 means fp32 for both models
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, batch {args.batch}, {args.rounds} rounds x {args.steps} steps")
    print(f"{'mode':20} {'dense img/s':>12} {'spvit img/s':>12} {'spvit/dense':>12} {'mem ratio':>10}")
    runs = [(f"{d} eager", dtype, None) for d, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]]
    if args.compile:
        runs += [(f"{d} {args.compile}", dtype, args.compile) for d, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]]
    for name, dtype, compile in runs:
        setups, mem = {}, {}
        for spvit in (False, True):
            model, crit, opt = build(spvit, device, compile)
            images = torch.randn(args.batch, 3, 224, 224, device=device)
            labels = torch.randint(0, 1000, (args.batch,), device=device)
            setups[spvit] = (model, crit, opt, images, labels)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup):
                step_fn(model, crit, opt, images, labels, dtype)
            mem[spvit] = torch.cuda.max_memory_allocated() if cuda else float("nan")
        rates = {False: [], True: []}
        for _ in range(args.rounds):
            for spvit in (False, True):
                rates[spvit].append(timed(setups[spvit], dtype, args.batch, args.steps, device))
        dense, sp = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"{name:20} {dense:12.1f} {sp:12.1f} {sp / dense:12.2f} {mem[True] / mem[False]:10.2f}", flush=True)
        del setups
    if cuda and args.sync_check:
        for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
            print(f"host-device syncs in one SPViT training step ({name}): {sync_check(device, dtype)}")


if __name__ == "__main__":
    from latprof.errors import run_script

    sys.exit(run_script(main))
