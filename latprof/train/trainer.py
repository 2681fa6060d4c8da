"""The SPViT training run: data, model, solver targets, loss, AdamW + cosine, checkpoints, resume, DDP.

`run(TrainConfig)` is what `latprof train` calls. Under torchrun (WORLD_SIZE > 1) it joins the
process group itself (nccl on CUDA, gloo on CPU); rank 0 alone writes files and shows progress.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from latprof.errors import UsageError, require


@dataclass
class TrainConfig:
    lut: str
    budget_ms: float
    data: str
    out: str
    model: str = "deit_t"
    checkpoint: str | None = None
    random_init: bool = False
    teacher: str | None = None
    epochs: int = 30
    resume: bool = False
    batch_size: int = 64
    lr: float = 1e-3                  # selectors (new parameters)
    backbone_lr_scale: float = 0.01   # backbone LR = lr x this
    weight_decay: float = 0.05
    latency_weight: float = 2.0
    distill_weight: float = 0.5
    locations: tuple | None = None    # default: the model's pruning locations
    img_size: int | None = None       # default: the model's
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (tiny configs)
    every_count: bool = False         # solver over every kept count instead of the table's grid
    workers: int = 2
    seed: int = 0
    max_steps: int | None = None      # stop each epoch after this many steps (smoke runs)
    progress: bool = True
    engine: str | None = None         # table engine when the table mixes several
    precision: str = "fp32"           # fp32 | bf16 (autocast; the residual stream stays fp32)
    compile: bool = False             # torch.compile the training model (fuses the masked attention)


def create_backbone(timm_name: str, num_classes: int, img_size, model_kwargs: dict):
    timm = require("timm", "train")
    kw = dict(model_kwargs)
    if img_size:
        kw["img_size"] = img_size
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kw)


def build_from_checkpoint(ckpt: dict):
    """The SPViT model of a training checkpoint (for export and evaluation)."""
    from latprof.train.spvit import SPViT

    c = ckpt["config"]
    from latprof.models import get_model

    spec = get_model(c["model"])
    if spec.layout is not None:
        from latprof.train.staged import StagedSPViT

        model = StagedSPViT(create_backbone(c["timm_name"], c["num_classes"], None, {}), spec.layout, kept=c["kept"])
        model.load_state_dict(ckpt["model"])
        return model.eval()
    vit = create_backbone(c["timm_name"], c["num_classes"], c["img_size"], c["model_kwargs"])
    model = SPViT(vit, c["locations"], kept=c["kept"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def _dist_setup():
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), world, device


def run(cfg: TrainConfig, log=print) -> dict:
    """Train; returns {'history': [...per epoch...], 'kept': (...), 'predicted_ms': float, 'out': path}."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from latprof.lut.table import read_lut
    from latprof.models import get_model
    from latprof.train.data import image_folders
    from latprof.train.latency import LatencyModel
    from latprof.train.loss import LatencySparsityLoss
    from latprof.predict import budget_on_sum, calibrated
    from latprof.train.solver import solve, solve_calibrated, solve_staged
    from latprof.train.spvit import SPViT
    from latprof.train.staged import StagedSPViT
    from latprof.train.weights import load_backbone, load_checkpoint, save_checkpoint

    tqdm = require("tqdm", "train").tqdm
    spec = get_model(cfg.model)
    staged = spec.layout is not None  # PiT, Swin: latprof.models.staged and latprof.train.staged
    if staged and (cfg.locations or cfg.model_kwargs or (cfg.img_size and cfg.img_size != 224)):
        raise UsageError(f"{cfg.model}'s pruning locations, image size (224) and structure are fixed by "
                         "latprof.models.staged", "drop --locations, --img-size and --model-kwargs")
    if cfg.checkpoint is None and not cfg.random_init:
        raise UsageError("no --checkpoint given", "pass --checkpoint FILE (a local timm state dict) or --random-init")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UsageError(f"--epochs {cfg.epochs} and --batch-size {cfg.batch_size} must be positive", "pass values >= 1")
    out = Path(cfg.out)
    last = out / "last.pt"
    if cfg.resume and not last.is_file():
        raise UsageError(f"--resume but no checkpoint at {last}", "drop --resume to start a new run in that --out")
    if not cfg.resume and last.is_file():
        raise UsageError(f"{last} exists from an earlier run", "pass --resume to continue it or choose another --out")

    rank, world, device = _dist_setup()
    torch.manual_seed(cfg.seed + rank)
    say = log if rank == 0 else (lambda *a, **k: None)

    # backbone first: its patch grid and depth define the token schedule
    probe = create_backbone(spec.timm_name, 2, cfg.img_size, cfg.model_kwargs)
    img_size = probe.patch_embed.img_size[0]
    train_ds, val_ds = image_folders(cfg.data, img_size)
    classes = train_ds.classes
    vit = create_backbone(spec.timm_name, len(classes), cfg.img_size, cfg.model_kwargs)
    if cfg.checkpoint and not cfg.resume:
        load_backbone(vit, cfg.checkpoint, log=say)
    locations = tuple(cfg.locations or spec.pruning_locations)
    table = read_lut(cfg.lut)
    if cfg.engine:
        table = table.for_engine(cfg.engine)
    # a calibrated table's budget is on the corrected prediction, as in `latprof solve` and `predict`
    table, overhead = calibrated(cfg.lut, table, cfg.model)
    calls = len(spec.units)
    sum_budget = budget_on_sum(cfg.budget_ms, overhead, calls)
    if staged:
        lm = LatencyModel.from_staged(table, spec)
        target = solve_calibrated(lambda b: solve_staged(table, spec, b, every_count=cfg.every_count), cfg.budget_ms,
                                  overhead, calls, cfg.model)
        patches = list(lm.whole)
        model = StagedSPViT(vit, spec.layout, kept=target.kept)
    else:
        depth, patches = len(vit.blocks), int(vit.patch_embed.num_patches)
        lm = LatencyModel.from_table(table, cfg.model, patches, locations, depth)
        target = solve_calibrated(lambda b: solve(lm, b, every_count=cfg.every_count), cfg.budget_ms, overhead, calls,
                                  cfg.model)
        model = SPViT(vit, locations, kept=target.kept)

    def corrected(sum_ms: float) -> float:  # what `predict` says for a sum of units (the budget's terms)
        return overhead.apply(sum_ms, calls) if overhead else sum_ms

    predicted_ms = corrected(target.latency_ms)
    say(f"schedule for {cfg.budget_ms:g} ms: kept patches {list(target.kept)} of {patches}, predicted {predicted_ms:.4g} ms"
        + (f" (sum of units {target.latency_ms:.4g} ms, corrected by the table's calibration for {cfg.model})" if overhead else "")
        + f" (fastest sum of units {target.fastest_ms:.4g} ms)")
    model = model.to(device)
    teacher = None
    if cfg.teacher:
        teacher = create_backbone(spec.timm_name, len(classes), cfg.img_size, cfg.model_kwargs)
        load_backbone(teacher, cfg.teacher, log=say)
        teacher = teacher.to(device).eval().requires_grad_(False)
    criterion = LatencySparsityLoss(lm, sum_budget, target.kept).to(device)  # lm adds up units: the budget on that sum

    sampler = None
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train_ds, world, rank, shuffle=True, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None,
                                         sampler=sampler, num_workers=cfg.workers, drop_last=False,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    steps_per_epoch = len(loader) if cfg.max_steps is None else min(len(loader), cfg.max_steps)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    optimizer = torch.optim.AdamW([
        {"params": list(model.selector_parameters()), "lr": cfg.lr},
        {"params": list(model.backbone_parameters()), "lr": cfg.lr * cfg.backbone_lr_scale},
    ], weight_decay=cfg.weight_decay, fused=device.type == "cuda")  # fused: one kernel, not one per tensor
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))

    config = dict(model=cfg.model, timm_name=spec.timm_name, num_classes=len(classes), classes=list(classes),
                  img_size=img_size, model_kwargs=dict(cfg.model_kwargs), locations=list(locations),
                  kept=list(target.kept), budget_ms=cfg.budget_ms, predicted_ms=predicted_ms,
                  lut=str(cfg.lut), run=_jsonable(asdict(cfg)))
    start_epoch, history = 0, []
    if cfg.resume:
        ckpt = load_checkpoint(last)
        old = ckpt["config"]
        for key in ("model", "num_classes", "img_size", "locations"):
            if old[key] != config[key]:
                raise UsageError(f"--resume: {key} was {old[key]} in {last}, now {config[key]}",
                                 "resume with the same --model, data classes, image size and --locations")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        config["kept"] = old["kept"]
        model.kept = tuple(old["kept"])
        say(f"resumed from {last} after epoch {start_epoch}")

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "schedule.json").write_text(json.dumps(dict(
            kept=config["kept"], locations=list(locations), patches=patches, budget_ms=cfg.budget_ms,
            budget_on_sum_ms=sum_budget, predicted_ms=predicted_ms, sum_ms=target.latency_ms,
            fastest_ms=target.fastest_ms, dense_ms=target.dense_ms,
            block_tokens=target.schedule.block_tokens()), indent=2) + "\n")

    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        sums = torch.zeros(4, device=device)  # loss, correct, seen, latency x seen
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0 or not cfg.progress,
                   leave=False, dynamic_ncols=True)
        for step, (images, labels) in enumerate(loader):
            if step >= steps_per_epoch:
                break
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                output = net(images)
                logits = output.logits.float()
                loss = F.cross_entropy(logits, labels)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(images).float()
                    kl = F.kl_div(logits.log_softmax(-1), t_logits.log_softmax(-1), reduction="batchmean",
                                  log_target=True)
                    loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kl
            lat = criterion([p.float() for p in output.keep_prob])
            loss = loss + cfg.latency_weight * lat.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            n = labels.shape[0]
            # torch.full, not torch.tensor(n, device=...): a host-to-device copy would sync every step
            sums += torch.stack([loss.detach() * n, (logits.argmax(-1) == labels).sum().float(),
                                 torch.full((), float(n), device=device), lat.latency_ms * n])
            if rank == 0 and cfg.progress and (step % 10 == 0 or step == steps_per_epoch - 1):
                s = sums.tolist()  # a sync every 10 steps for the bar, never inside forward
                bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{s[1] / s[2]:.3f}", lat_ms=f"{corrected(s[3] / s[2]):.3g}")
            bar.update(1)
        bar.close()
        if world > 1:
            dist.all_reduce(sums)
        s = sums.tolist()
        record = dict(epoch=epoch + 1, loss=s[0] / max(s[2], 1), train_acc=s[1] / max(s[2], 1),
                      expected_ms=corrected(s[3] / max(s[2], 1)), predicted_ms=predicted_ms, kept=config["kept"])
        if val_ds is not None:
            record["val_acc"] = evaluate(model, val_ds, cfg.batch_size, device)
        history.append(record)
        if rank == 0:
            save_checkpoint(last, dict(epoch=epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                       scheduler=scheduler.state_dict(), config=config, history=history))
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    if world > 1:
        dist.barrier()
    return dict(history=history, kept=tuple(config["kept"]), predicted_ms=predicted_ms, out=str(out),
                rank=rank, world=world)


def evaluate(model, dataset, batch_size: int, device) -> float:
    """Top-1 accuracy of the deployed form (static top-k, real removal)."""
    import torch

    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    correct = seen = 0
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images.to(device), mode="topk").logits
            correct += int((logits.argmax(-1).cpu() == labels).sum())
            seen += labels.shape[0]
    return correct / max(seen, 1)


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
