"""The loop that trains one variant: batches, steps, gradient accumulation, clipping, schedules,
evaluation after every epoch, and a checkpoint after every epoch."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engram import run_batch, run_single, sentiment_probabilities
from models import EngramModel, count_parameters
from train.checkpoints import resume_from, rng_state, save_checkpoint, seed_everything, set_rng_state
from train.data import Encoded, collate, epoch_batches
from train.provenance import code_version, describe_code
from train.stop import STOP, Interrupted, NonFiniteLoss, check_stop
from train.tensorboard_log import TrainLog
from train.weights import WeightSpec, keep_epoch


@dataclass
class Built:
    """A freshly built variant, ready to train."""

    model: EngramModel
    optimizer: torch.optim.Optimizer
    scheduler: object = None
    scaler: object = None
    autocast_dtype: torch.dtype | None = None  # None: no autocast
    scheduler_per: str = "step"  # "step": after every optimizer step; "epoch": after every epoch
    info: dict = field(default_factory=dict)


@dataclass
class Recipe:
    """What one experiment gives the shared loop: how to build a variant and how to feed it.
    The per-variant settings are functions of the variant so that a protocol can give Model 3
    other batches than Models 1 and 2 (as the study's 7B code does)."""

    scale: str  # "small" or "7b"
    build: Callable[[str, int, int], Built]  # (variant, seed, total optimizer steps) -> Built
    batch_size: Callable[[str], int]  # examples per forward batch
    epochs: int
    device: torch.device
    accum_steps: Callable[[str], int] = lambda v: 1  # forward batches per optimizer step
    clip_norm: float | None = None  # gradient-norm clipping before each optimizer step
    drop_last: bool = False  # leave out an epoch's short final batch
    train_mode: str = "pair"  # how dual_engram runs a training batch (engram.run_batch modes)
    eval_mode: str = "pair"  # ... and an evaluation batch
    progress: bool = True
    weights: WeightSpec | None = None  # what each job keeps of its selected and last epochs (weights.py)
    tensorboard: Path | None = None  # --report-to tensorboard: OUT/tensorboard (tensorboard_log.py)
    log_steps: int = 50  # ... training losses every this many batches

    def steps_per_epoch(self, variant: str, n: int) -> int:
        bs = self.batch_size(variant)
        batches = n // bs if self.drop_last else -(-n // bs)
        return -(-batches // self.accum_steps(variant))


def autocast(device: torch.device, dtype):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: EngramModel, enc: Encoded, recipe: Recipe, autocast_dtype=None, mode=None, seed=0) -> dict:
    """Accuracy, mean sentiment loss, mean LM loss (None without an LM head) and per-example
    probabilities, in the file's order, with batches of the variant's training batch size."""
    was_training = model.training
    model.eval()
    bs = recipe.batch_size(model.variant)
    g = torch.Generator().manual_seed(seed)
    probs, sent_sum, lm_sum, lm_count, lm_means = [], 0.0, 0.0, 0, []
    for i in range(0, len(enc), bs):
        check_stop(f"the evaluation of {model.variant}")  # minutes at 7B: a stop does not wait for its end
        ids, mask, labels = collate(enc, np.arange(i, min(i + bs, len(enc))), recipe.device)
        with autocast(recipe.device, autocast_dtype):
            out = run_batch(model, ids, mask, labels, mode=mode or recipe.eval_mode, generator=g)
        probs.append(sentiment_probabilities(out.sent_logits).cpu())
        sent_sum += out.sent_sum
        lm_sum += out.lm_sum
        lm_count += out.lm_count
        if out.lm_mean is not None:
            lm_means.append(out.lm_mean)
    model.train(was_training)
    prob = torch.cat(probs).numpy()
    pred = (prob > 0.5).astype(int)
    return {
        "acc": float((pred == np.asarray(enc.labels)).mean() * 100),
        "sent_loss": sent_sum / len(enc),
        "lm_loss": lm_sum / lm_count if model.uses_lm and lm_count else None,
        "lm_loss_batch_mean": float(np.mean(lm_means)) if model.uses_lm and lm_means else None,  # the study's average
        "prob": prob,
        "pred": pred,
    }


@torch.no_grad()
def zero_prefix_states(model: EngramModel, enc: Encoded, recipe: Recipe, autocast_dtype=None):
    """Each sentence's pooled state [n,H] and, with an engram, its own engram [n,e] from a
    zero-engram pass, so both depend on that sentence alone."""
    was_training = model.training
    model.eval()
    bs = recipe.batch_size(model.variant)
    pooled, engrams = [], []
    for i in range(0, len(enc), bs):
        check_stop(f"the analysis of {model.variant}")
        ids, mask, _ = collate(enc, np.arange(i, min(i + bs, len(enc))), recipe.device)
        with autocast(recipe.device, autocast_dtype):
            out = run_single(model, ids, mask, None)
        pooled.append(out.pooled.float().cpu())
        if out.engram is not None:
            engrams.append(out.engram.float().cpu())
    model.train(was_training)
    return torch.cat(pooled).numpy(), (torch.cat(engrams).numpy() if engrams else None)


def _prediction_record(epoch: int, ev: dict) -> dict:
    return {"epoch": epoch, "pred": ev["pred"].tolist(), "prob": [round(float(p), 6) for p in ev["prob"]]}


def _eval_row(ev: dict) -> dict:
    return {"acc": ev["acc"], "sent_loss": ev["sent_loss"], "lm_loss": ev["lm_loss"]}


def _optimizer_step(built: Built, recipe: Recipe) -> None:
    opt, scaler = built.optimizer, built.scaler
    if recipe.clip_norm:
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], recipe.clip_norm)
    stepped = True
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        stepped = scaler.get_scale() >= scale  # a step skipped for inf/nan gradients lowers the scale
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    # a skipped step leaves the schedule where it was (as transformers' Trainer does)
    if stepped and built.scheduler is not None and built.scheduler_per == "step":
        built.scheduler.step()


def train_variant(
    recipe: Recipe, variant: str, seed: int, train: Encoded, evals: dict[str, Encoded], ckpt: Path, resume: bool
):
    """Train one variant for recipe.epochs, evaluating after every epoch; checkpoint every epoch.

    Returns (result dict, the Built variant). `evals` holds "validation" and any extra sets."""
    seed_everything(seed)
    built = recipe.build(variant, seed, recipe.steps_per_epoch(variant, len(train)) * recipe.epochs)
    model, opt = built.model, built.optimizer
    bs = recipe.batch_size(variant)
    total, trainable = count_parameters(model)
    dtype = f"; compute dtype {built.info['compute_dtype']}" if "compute_dtype" in built.info else ""
    print(
        f"[{variant} seed {seed}] parameters: {trainable:,} trainable of {total:,} "
        f"({100 * trainable / total:.2f} %){dtype}"
    )
    code = code_version()
    state = {"history": [], "best": None, "final": None, "seconds": 0.0, "code": [code]}
    start_epoch, done_steps, partial = 1, 0, None
    loaded = resume_from(ckpt, f"{variant} seed {seed}", model, opt, built.scheduler, built.scaler) if resume else None
    if loaded is not None:
        state = loaded
        start_epoch = state.pop("epoch") + 1
        done_steps, partial = state.pop("step", 0), state.pop("partial", None)
        where = f"step {done_steps} of epoch {start_epoch}" if done_steps else f"epoch {start_epoch - 1}"
        print(f"[{variant} seed {seed}] resuming after {where} from {ckpt}")
        # the code that made the checkpoint: a resume under other code goes on, and says so once here
        # and in the result (state["code"] lists every version the job ran under; REPORT.md names them)
        state["code"] = state.get("code") or [None]
        if (state["code"][-1] or {}).get("sources") != code["sources"]:
            print(
                f"note: {variant} seed {seed}: its checkpoint was made by {describe_code(state['code'][-1])}, this is "
                f"{describe_code(code)}; it continues, and its result names both",
                file=sys.stderr,
            )
            state["code"].append(code)

    def stop_position(epoch: int, step: int, sums: dict, seconds: float) -> None:
        """A checkpoint `step` steps into `epoch` (its running sums and every random state), so
        that a stop loses nothing trained."""
        now = {**state, "partial": {"sums": sums, "seconds": seconds}}
        saved = save_checkpoint(ckpt, epoch - 1, model, opt, built.scheduler, built.scaler, now, step=step)
        print(f"[{variant} seed {seed}] stopped at step {step} of epoch {epoch}: checkpoint {saved}")

    n_batches = len(epoch_batches(len(train), bs, seed, 1, recipe.drop_last))
    log = TrainLog(recipe.tensorboard, seed, variant, recipe.log_steps, (start_epoch - 1) * n_batches + done_steps + 1)
    try:
        _epochs(
            recipe,
            variant,
            seed,
            train,
            evals,
            ckpt,
            built,
            state,
            start_epoch,
            done_steps,
            partial,
            stop_position,
            log,
            code,
        )
    finally:
        log.close()
    return {"total": total, "trainable": trainable, "info": built.info, **state}, built


def _epochs(
    recipe: Recipe,
    variant: str,
    seed: int,
    train: Encoded,
    evals: dict,
    ckpt: Path,
    built: Built,
    state: dict,
    start_epoch: int,
    done_steps: int,
    partial,
    stop_position,
    log: TrainLog,
    code: dict,
) -> None:
    """The epochs of train_variant from start_epoch on: train, evaluate, keep the weights, checkpoint."""
    model, opt = built.model, built.optimizer
    bs, accum = recipe.batch_size(variant), recipe.accum_steps(variant)
    model.train()
    opt.zero_grad(set_to_none=True)
    for epoch in range(start_epoch, recipe.epochs + 1):
        t0 = time.perf_counter()
        sums = {
            "loss": 0.0,
            "sent": 0.0,
            "lm": 0.0,
            "lm_n": 0,
            "correct": 0,
            "n": 0,
            "steps": 0,
            "sent_bm": 0.0,
            "lm_bm": 0.0,
        }
        skip, elapsed = 0, 0.0
        if epoch == start_epoch and partial is not None:  # a mid-epoch checkpoint: its sums, then the steps after it
            sums, skip, elapsed = partial["sums"], done_steps, partial["seconds"]
        batches = epoch_batches(len(train), bs, seed, epoch, recipe.drop_last)
        bar = _progress(batches[skip:], recipe, f"{variant} s{seed} e{epoch}/{recipe.epochs}")
        for step, idx in enumerate(bar, start=skip + 1):
            if STOP and (step - 1) % accum == 0:
                # a stop request (Ctrl-C, SIGTERM, a preemption) waits for an optimizer-step boundary
                # (mid-accumulation the gradients of the group's first batches are not in any
                # checkpoint); at step 1 the last epoch's checkpoint already holds everything
                if step > 1:
                    stop_position(epoch, step - 1, sums, elapsed + time.perf_counter() - t0)
                check_stop(f"{variant} seed {seed}, epoch {epoch}, step {step}")
            ids, mask, labels = collate(train, idx, recipe.device)
            with autocast(recipe.device, built.autocast_dtype):
                out = run_batch(model, ids, mask, labels, mode=recipe.train_mode)
            loss_value = out.loss.item()
            if not np.isfinite(loss_value):
                raise NonFiniteLoss(
                    f"{variant} (seed {seed}): non-finite loss {loss_value} at epoch {epoch}, step {step}; "
                    f"the last good checkpoint is kept in {ckpt}"
                )
            loss = out.loss / accum if accum > 1 else out.loss  # the mean over an optimizer step's batches
            (built.scaler.scale(loss) if built.scaler is not None else loss).backward()
            if step % accum == 0 or step == len(batches):  # a short final group still steps
                _optimizer_step(built, recipe)
            sums["loss"] += loss_value
            sums["steps"] += 1
            sums["sent"] += out.sent_sum
            sums["lm"] += out.lm_sum
            sums["lm_n"] += out.lm_count
            sums["sent_bm"] += out.sent_mean
            sums["lm_bm"] += out.lm_mean or 0.0
            sums["correct"] += int((out.sent_logits.argmax(-1) == labels).sum())
            sums["n"] += len(idx)
            lr = opt.param_groups[0]["lr"]
            log.step((epoch - 1) * len(batches) + step, loss_value, out.sent_mean, out.lm_mean, lr)
            if hasattr(bar, "set_postfix") and step % 20 == 0:
                bar.set_postfix(
                    loss=f"{sums['loss'] / sums['steps']:.3f}", acc=f"{100 * sums['correct'] / sums['n']:.1f}"
                )
        if STOP and skip < len(batches):
            # every step is done, the evaluation not yet (at 7B it takes minutes, longer than a
            # preemption's grace): keep the trained epoch; a resume skips straight to its evaluation
            stop_position(epoch, len(batches), sums, elapsed + time.perf_counter() - t0)
            check_stop(f"{variant} seed {seed}, epoch {epoch}, before its evaluation")
        train_seconds = elapsed + time.perf_counter() - t0
        before = rng_state(recipe.device)  # the evaluation draws from no global generator; kept to be sure
        try:
            results = {name: evaluate(model, enc, recipe, built.autocast_dtype) for name, enc in evals.items()}
            best = state["best"] is None or results["validation"]["acc"] > state["best"]["acc"]
            keep_epoch(
                recipe,
                model,
                ckpt,
                epoch,
                evals["validation"],
                results["validation"]["pred"],
                best,
                built.autocast_dtype,
                seed,
                code,
            )
        except Interrupted as e:
            # a stop during the evaluation: the trained epoch is kept as the position after its last step
            # (the state the evaluation started from); the resume evaluates it again
            set_rng_state(*before, recipe.device)
            stop_position(epoch, len(batches), sums, train_seconds)
            raise Interrupted(
                f"{STOP.name} during {variant} seed {seed}, epoch {epoch}, its evaluation", e.signum
            ) from None
        if built.scheduler is not None and built.scheduler_per == "epoch":
            # after the evaluation (which no learning rate touches): a stop in it saved the state before
            built.scheduler.step()
        val = results["validation"]
        row = {
            "epoch": epoch,
            "train_loss": sums["loss"] / sums["steps"],
            "train_sent_loss": sums["sent"] / sums["n"],
            "train_lm_loss": sums["lm"] / sums["lm_n"] if model.uses_lm else None,
            "train_acc": 100 * sums["correct"] / sums["n"],
            # the study's way: the mean over batches of each batch's mean (above: over examples, tokens)
            "train_sent_loss_batch_mean": sums["sent_bm"] / sums["steps"],
            "train_lm_loss_batch_mean": sums["lm_bm"] / sums["steps"] if model.uses_lm else None,
            "val_acc": val["acc"],
            "val_sent_loss": val["sent_loss"],
            "val_lm_loss": val["lm_loss"],
            "val_lm_loss_batch_mean": val["lm_loss_batch_mean"],
            "extra": {k: _eval_row(v) for k, v in results.items() if k != "validation"},
            "train_seconds": train_seconds,
            "seconds": elapsed + time.perf_counter() - t0,
        }
        state["history"].append(row)
        state["seconds"] += row["seconds"]
        if best:
            state["best"] = {"acc": val["acc"], **_prediction_record(epoch, val)}
        state["final"] = _prediction_record(epoch, val)
        print(_epoch_line(variant, seed, row))
        log.epoch(epoch * len(batches), row, opt.param_groups[0]["lr"])
        save_checkpoint(ckpt, epoch, model, opt, built.scheduler, built.scaler, state)


def _epoch_line(variant: str, seed: int, row: dict) -> str:
    lm = f" lm {row['train_lm_loss']:.3f}/{row['val_lm_loss']:.3f}" if row["train_lm_loss"] is not None else ""
    extra = "".join(f" {k} {v['acc']:.2f}" for k, v in row["extra"].items())
    return (
        f"[{variant} seed {seed}] epoch {row['epoch']}: loss {row['train_loss']:.4f} "
        f"sent {row['train_sent_loss']:.4f}/{row['val_sent_loss']:.4f}{lm} "
        f"train acc {row['train_acc']:.2f} val acc {row['val_acc']:.2f}{extra} ({row['seconds']:.1f}s)"
    )


def _progress(items, recipe: Recipe, desc: str):
    if not recipe.progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch", leave=False, mininterval=2.0)
