"""One optimisation loop for every stage: AdamW, warm-up + cosine, gradient clipping, tqdm.

A stage supplies ``loss_fn(batch_indices) -> loss``; batching, shuffling and the schedule live here."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from .config import TrainSection
from .distributed import LOCAL, Context


def param_groups(params: Iterable[tuple[str, nn.Parameter]], weight_decay: float, lr: float) -> list[dict]:
    """No weight decay on biases, norms and tokens (1-D tensors), as timm does."""
    decay, no_decay = [], []
    for _, p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class BestOnValidation:
    """Keeps a copy of ``modules``' weights at the best validation score seen (ties: the later epoch,
    which has the lower learning rate)."""

    def __init__(self, modules: list[nn.Module], score: Callable[[], float]) -> None:
        self.modules, self.score = modules, score
        self.best, self.best_epoch, self.state = -math.inf, 0, None
        self.history: list[tuple[int, float]] = []

    def __call__(self, epoch: int) -> None:
        for m in self.modules:
            m.eval()
        value = float(self.score())
        self.history.append((epoch, value))
        if value >= self.best:
            self.best, self.best_epoch = value, epoch
            self.state = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules]

    def restore(self) -> dict[str, object]:
        if self.state is not None:
            for m, state in zip(self.modules, self.state, strict=True):
                m.load_state_dict(state)
        return {"best_epoch": self.best_epoch, "val_score": self.best, "val_history": self.history}


def fit(
    groups: list[dict], loss_fn: Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor | float]],
    num_samples: int, cfg: TrainSection, seed: int, desc: str, modules: Iterable[nn.Module] = (),
    validate: Callable[[], float] | None = None, ctx: Context = LOCAL,
) -> dict[str, float]:
    """Train for ``cfg.epochs`` over ``num_samples`` shuffled indices; returns timing and last loss.

    ``loss_fn(global_batch_indices, shard)`` returns ``(sum of per-sample losses, their weight)`` over
    this rank's shard; the step minimises the sum over ranks divided by the total weight, i.e. the
    global batch's mean. Each param group may carry ``lr_scale`` (e.g. fine-tuned students under a
    fresh head). With ``cfg.val_every`` and a ``validate`` score (higher is better, on the validation
    split), the weights of the best-scoring epoch are kept."""
    modules = list(modules)
    keeper = BestOnValidation(modules, validate) if validate is not None and cfg.val_every else None
    generator = torch.Generator().manual_seed(seed)  # the same order on every rank
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = ctx.grad_scaler()
    params = [p for g in groups for p in g["params"]]
    steps_per_epoch = math.ceil(num_samples / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    start, step, last = time.perf_counter(), 0, float("nan")
    with tqdm(total=total, desc=desc, unit="step", mininterval=2.0, dynamic_ncols=True, disable=not ctx.main) as bar:
        for epoch in range(cfg.epochs):
            for m in modules:
                m.train()
            order = torch.randperm(num_samples, generator=generator)
            running = 0.0
            for i in range(steps_per_epoch):
                lr = warmup_cosine(step, total, warmup, cfg.lr, cfg.min_lr)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                loss = _step_loss(loss_fn, order[i * cfg.batch_size:(i + 1) * cfg.batch_size], params, ctx)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: loss became {loss.item()} at epoch {epoch}, step {i}")
                opt.zero_grad(set_to_none=True)
                _backward_and_step(loss, opt, params, cfg.grad_clip, scaler)
                step += 1
                last = float(ctx.all_sum(loss.detach())) / ctx.world  # the global batch's mean
                running += last
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{running / (i + 1):.3f}", lr=f"{lr:.2e}", refresh=False)
            if keeper is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                keeper(epoch + 1)
    for m in modules:
        m.eval()
    stats: dict = {"seconds": time.perf_counter() - start, "epochs": cfg.epochs, "steps": total, "final_loss": last}
    if keeper is not None:
        stats.update(keeper.restore())
    return stats


def _step_loss(loss_fn, idx: torch.Tensor, params: list[nn.Parameter], ctx: Context) -> torch.Tensor:
    """This rank's loss, scaled so that DDP's gradient average is the gradient of the global mean."""
    part = ctx.shard(len(idx))
    with ctx.autocast():
        if part.stop > part.start:
            total, weight = loss_fn(idx, part)
        else:  # a last batch smaller than the world: this rank still joins the gradient all-reduce
            total, weight = sum(p.sum() * 0.0 for p in params), 0.0
    weight = ctx.all_sum(torch.as_tensor(weight, dtype=torch.float64))
    return total.float() * (ctx.world / float(weight.clamp_min(1e-12)))


def _backward_and_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params: list[nn.Parameter],
                       grad_clip: float | None, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        return
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    if grad_clip:
        nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()
