"""Training throughput: SPViT-DeiT-T (masking, Gumbel selectors at 3,6,9) vs dense DeiT-T, images/s.

    python benchmarks/train_throughput.py            # CUDA: batch 128, fp32 and bf16; CPU: a small run
    python benchmarks/train_throughput.py --batch 32 --steps 10

One training step = forward, cross-entropy (+ latency-sparsity loss for SPViT), backward, AdamW step.
Timing excludes warm-up steps and synchronises the GPU only around the timed loop, never per step.
Random inputs, random init: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time


def step_fn(model, spvit, crit, opt, images, labels, dtype):
    import torch
    import torch.nn.functional as F

    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(images)
        logits = out.logits if spvit else out
        loss = F.cross_entropy(logits.float(), labels)
        if spvit:
            loss = loss + 2.0 * crit([p.float() for p in out.keep_prob]).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def measure(spvit: bool, dtype, batch: int, steps: int, warmup: int, device) -> float:
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
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    for _ in range(warmup):
        step_fn(model, spvit, crit, opt, images, labels, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn(model, spvit, crit, opt, images, labels, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    import torch

    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128 if cuda else 8)
    ap.add_argument("--steps", type=int, default=20 if cuda else 3)
    ap.add_argument("--warmup", type=int, default=5 if cuda else 1)
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtypes = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} threads), "
          f"batch {args.batch}, {args.steps} timed steps")
    print(f"{'dtype':6} {'dense img/s':>12} {'spvit img/s':>12} {'spvit/dense':>12}")
    for name, dtype in dtypes:
        dense = measure(False, dtype, args.batch, args.steps, args.warmup, device)
        sp = measure(True, dtype, args.batch, args.steps, args.warmup, device)
        print(f"{name:6} {dense:12.1f} {sp:12.1f} {sp / dense:12.2f}")


if __name__ == "__main__":
    main()
