"""--report-to tensorboard: each job's training curves as TensorBoard event files, in
OUT/tensorboard/<seed>/<variant>/, so that `tensorboard --logdir OUT/tensorboard` shows a whole grid
while it runs, whichever executor runs its jobs (each job writes its own folder).

One step axis for every scalar: the job's forward batches counted across epochs. Every `log_steps`
batches: the mean training losses (total, sentiment, LM) over those batches and the learning rate;
after each epoch, at that epoch's last batch: the epoch's row of metrics.json's history (training
and validation accuracy and losses, and those of each --extra-eval set)."""

from __future__ import annotations

from pathlib import Path

from train.stop import UsageError

EPOCH_KEYS = ("train_loss", "train_sent_loss", "train_lm_loss", "train_acc", "val_acc", "val_sent_loss", "val_lm_loss")


def tensorboard_root(report_to: str, out: Path) -> Path | None:
    """OUT/tensorboard with --report-to tensorboard (checked importable now, not after hours), else None."""
    if report_to != "tensorboard":
        return None
    try:
        import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
    except ImportError:
        raise UsageError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
    return out / "tensorboard"


class TrainLog:
    """One job's event file; every call does nothing when `root` is None (--report-to none)."""

    def __init__(self, root: Path | None, seed: int, variant: str, every: int, first_step: int):
        """`first_step`: the first batch this process trains; a resume purges what an earlier
        attempt logged from there on, so the curves show each step once."""
        self.writer, self.every = None, every
        self.window = {"loss": [], "sentiment_loss": [], "lm_loss": []}
        if root is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(root / str(seed) / variant), purge_step=first_step if first_step > 1 else None)

    def step(self, global_step: int, loss: float, sent: float | None, lm: float | None, lr: float) -> None:
        if self.writer is None:
            return
        for key, value in (("loss", loss), ("sentiment_loss", sent), ("lm_loss", lm)):
            if value is not None:
                self.window[key].append(value)
        if global_step % self.every == 0:
            self.flush_window(global_step, lr)

    def flush_window(self, global_step: int, lr: float) -> None:
        """The means over the batches since the last write (an epoch's last ones are written at its end)."""
        if self.writer is None or not self.window["loss"]:
            return
        for key, values in self.window.items():
            if values:
                self.writer.add_scalar(f"train/{key}", sum(values) / len(values), global_step)
            values.clear()
        self.writer.add_scalar("train/learning_rate", lr, global_step)

    def epoch(self, global_step: int, row: dict, lr: float) -> None:
        if self.writer is None:
            return
        self.flush_window(global_step, lr)
        for key in EPOCH_KEYS:
            if row.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", row[key], global_step)
        for name, values in row.get("extra", {}).items():
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(f"epoch/{name}_{key}", value, global_step)
        self.writer.add_scalar("epoch/epoch", row["epoch"], global_step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
