"""What both experiments share: data loading, batching, the training loop with per-epoch
checkpoints and resume, evaluation, and safe file writing."""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engram import engram_metrics, probe, run_batch, run_single, sentiment_probabilities
from models import VARIANTS, EngramModel, count_parameters


class UsageError(Exception):
    """Bad input or settings: main() prints the message as one line and exits with status 2."""


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- command line


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def unit_interval(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def base_parser(prog: str, description: str, *, epochs: int, batch_size: int, lr: float, out: str) -> argparse.ArgumentParser:
    """A parser with the flags both experiments share, grouped as the help shows them, with the
    given scale's defaults. Unknown flags are errors (argparse exits with status 2)."""
    p = argparse.ArgumentParser(prog=prog, description=description + " Defaults are the study's settings.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", type=Path, default=None,
                   help="folder with GLUE-layout train.tsv and dev.tsv (header sentence<TAB>label); "
                        "default: download stanfordnlp/sst2 from the Hugging Face hub")
    d.add_argument("--max-train", type=positive_int, default=None,
                   help="use only the first N training rows (examples; marks the run as shortened)")
    d.add_argument("--max-eval", type=positive_int, default=None,
                   help="use only the first N validation rows (examples; marks the run as shortened)")
    d.add_argument("--extra-eval", action="append", default=[], metavar="NAME=PATH",
                   help="also evaluate on this labeled TSV after every epoch (repeatable)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=positive_int, default=epochs, help=f"passes over the training set (default {epochs})")
    t.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"examples per optimizer step (default {batch_size}; dual_engram splits it into two halves)")
    t.add_argument("--lr", type=positive_float, default=lr, help=f"learning rate (default {lr})")
    t.add_argument("--seeds", type=int, nargs="+", default=[42], metavar="SEED",
                   help="train every variant once per seed (default: 42)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train (default auto: cuda if present)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out}/)")
    o.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in OUT/checkpoints: finished variants are skipped, "
                        "the one in progress restarts after its last complete epoch")
    o.add_argument("--no-progress", action="store_true", help="no progress bars (one log line per epoch remains)")
    return p


def validate_common(args) -> None:
    if args.batch_size < 2:
        raise UsageError(f"--batch-size {args.batch_size} is too small: dual_engram splits each batch into two halves, so it needs at least 2")
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds repeats a seed: {args.seeds}")


def cli_main(parse_args, run, argv=None):
    """Parse, run, and turn bad input into one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        return run(args, argv)
    except (UsageError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


# ----------------------------------------------------------------------------- files


def write_atomic(path, data) -> None:
    """Write text or bytes to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make outputs private to the writer
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(obj):
    """JSON has no NaN or infinity: such a value (a degenerate statistic) is written as null."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path, obj) -> None:
    write_atomic(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def check_writable(folder) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"output folder {folder} is not writable ({e.strerror}); pass --out with a folder you can write")
    return folder


# ----------------------------------------------------------------------------- data

HUB_DATASET = "stanfordnlp/sst2"


@dataclass
class Split:
    sentences: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> "Split":
        return self if n is None else Split(self.sentences[:n], self.labels[:n])


def read_tsv(path) -> Split:
    """A GLUE-layout TSV: header `sentence<TAB>label`, then one example a line, label 0 or 1.
    Any malformed row is an error naming the file and line; nothing is skipped."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file {path} not found; --data-dir must hold GLUE-layout train.tsv and dev.tsv")
    with open(path, encoding="utf-8", newline="\n") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise UsageError(f"{path} is empty; expected a header `sentence<TAB>label` and examples")
    header = lines[0].rstrip("\r").split("\t")
    if header != ["sentence", "label"]:
        raise UsageError(f"{path}:1: header is {lines[0]!r}; expected `sentence<TAB>label`")
    sentences, labels = [], []
    for n, line in enumerate(lines[1:], start=2):
        cols = line.rstrip("\r").split("\t")
        if len(cols) != 2:
            raise UsageError(f"{path}:{n}: expected 2 tab-separated columns (sentence, label), found {len(cols)}")
        text, label = cols[0].strip(), cols[1].strip()
        if not text:
            raise UsageError(f"{path}:{n}: empty sentence")
        if label not in ("0", "1"):
            raise UsageError(f"{path}:{n}: label {label!r} is not 0 or 1")
        sentences.append(text)
        labels.append(int(label))
    if not labels:
        raise UsageError(f"{path} has a header but no examples")
    return Split(sentences, labels)


def load_sst2(data_dir=None) -> dict[str, Split]:
    """Train and validation splits: from `data_dir` (train.tsv, dev.tsv), else from the hub.
    The unlabeled test split is never used."""
    if data_dir is not None:
        d = Path(data_dir)
        if not d.is_dir():
            raise UsageError(f"data folder {d} not found; --data-dir must hold GLUE-layout train.tsv and dev.tsv")
        return {"train": read_tsv(d / "train.tsv"), "validation": read_tsv(d / "dev.tsv")}
    try:
        from datasets import load_dataset

        ds = load_dataset(HUB_DATASET)
        return {s: Split(list(ds[s]["sentence"]), [int(x) for x in ds[s]["label"]]) for s in ("train", "validation")}
    except Exception as e:  # the hub is unreachable, or the cache is missing
        raise UsageError(
            f"could not load {HUB_DATASET} from the Hugging Face hub ({type(e).__name__}); "
            "either connect to the hub, or pass --data-dir DIR with GLUE-layout train.tsv and dev.tsv"
        ) from None


def parse_extra_eval(items: list[str]) -> dict[str, Split]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--extra-eval {item!r}: expected NAME=PATH to a GLUE-layout TSV")
        if name in out or name == "validation":
            raise UsageError(f"--extra-eval name {name!r} is used twice or is reserved")
        out[name] = read_tsv(path)
    return out


class Encoded:
    """Token ids of a split, kept as one right-padded matrix so a batch is a single slice."""

    def __init__(self, ids: list[list[int]], labels: list[int], pad_id: int = 0):
        if not ids:
            raise UsageError("no examples to encode")
        self.lengths = np.array([len(r) for r in ids], dtype=np.int64)  # [n]
        if self.lengths.min() < 1:
            raise UsageError("an example encodes to zero tokens")
        self.ids = np.full((len(ids), int(self.lengths.max())), pad_id, dtype=np.int64)  # [n,Tmax]
        for i, r in enumerate(ids):
            self.ids[i, : len(r)] = r
        self.labels = np.asarray(labels, dtype=np.int64)  # [n]

    def __len__(self) -> int:
        return len(self.labels)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's shuffled batches, a pure function of (seed, epoch) so that a resumed run sees
    the same batches as an uninterrupted one."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).numpy()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def collate(enc: Encoded, idx, device):
    """The rows `idx`, right-padded to the longest of them: ids [B,T], mask [B,T], labels [B]."""
    idx = np.asarray(idx)
    lengths = enc.lengths[idx]  # [B]
    T = int(lengths.max())
    ids = torch.from_numpy(enc.ids[idx, :T])  # [B,T]
    mask = torch.from_numpy((np.arange(T)[None, :] < lengths[:, None]).astype(np.int64))  # [B,T]
    labels = torch.from_numpy(enc.labels[idx])  # [B]
    return ids.to(device), mask.to(device), labels.to(device)


# ----------------------------------------------------------------------------- devices and seeds


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def rng_state() -> tuple[dict, dict]:
    """(tensors, json) capturing the Python, NumPy, torch and CUDA generators."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------- checkpoints

MARKER = "COMPLETE"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters only: the whole small model, or LoRA adapters and heads of a 7B run."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, epoch: int, model, optimizer, scheduler, scaler, state: dict) -> Path:
    """Write epoch `epoch` into a temporary folder, the marker last, then rename it into place and
    drop older epochs. A folder without the marker is never loaded."""
    from safetensors.torch import save_file

    final = folder / f"epoch_{epoch:03d}"
    tmp = folder / f".epoch_{epoch:03d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    train_state = {"optimizer": optimizer.state_dict()}
    if scheduler is not None:
        train_state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        train_state["scaler"] = scaler.state_dict()
    torch.save(train_state, tmp / "train_state.pt")
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "epoch": epoch, "rng": rng_meta}, allow_nan=False))
    (tmp / MARKER).write_text("ok\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in folder.glob("epoch_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("epoch_*") if (p / MARKER).is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise UsageError(f"checkpoint {path} does not match this model's trainable parameters; rerun without --resume")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    train_state = torch.load(path / "train_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(train_state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(train_state["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(train_state["scaler"])
    state = json.loads((path / "state.json").read_text())
    set_rng_state(load_file(str(path / "rng.safetensors")), state.pop("rng"))
    return state


# ----------------------------------------------------------------------------- the loop


@dataclass
class Built:
    """A freshly built variant, ready to train."""

    model: EngramModel
    optimizer: torch.optim.Optimizer
    scheduler: object = None
    scaler: object = None
    autocast_dtype: torch.dtype | None = None  # None: no autocast
    info: dict = field(default_factory=dict)


@dataclass
class Recipe:
    """What one experiment gives the shared loop."""

    scale: str  # "small" or "7b"
    build: Callable[[str, int, int], Built]  # (variant, seed, total optimizer steps) -> Built
    batch_size: int
    epochs: int
    device: torch.device
    progress: bool = True


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: EngramModel, enc: Encoded, recipe: Recipe, autocast_dtype=None, mode="pair", seed=0) -> dict:
    """Accuracy, mean sentiment loss, mean LM loss (None without an LM head) and per-example
    probabilities, in the file's order, with batches of the training batch size."""
    was_training = model.training
    model.eval()
    bs = recipe.batch_size
    g = torch.Generator().manual_seed(seed)
    probs, sent_sum, lm_sum, lm_count = [], 0.0, 0.0, 0
    for i in range(0, len(enc), bs):
        ids, mask, labels = collate(enc, np.arange(i, min(i + bs, len(enc))), recipe.device)
        with _autocast(recipe.device, autocast_dtype):
            out = run_batch(model, ids, mask, labels, mode=mode, generator=g)
        probs.append(sentiment_probabilities(out.sent_logits).cpu())
        sent_sum += out.sent_sum
        lm_sum += out.lm_sum
        lm_count += out.lm_count
    model.train(was_training)
    prob = torch.cat(probs).numpy()
    pred = (prob > 0.5).astype(int)
    return {
        "acc": float((pred == np.asarray(enc.labels)).mean() * 100),
        "sent_loss": sent_sum / len(enc),
        "lm_loss": lm_sum / lm_count if model.uses_lm and lm_count else None,
        "prob": prob,
        "pred": pred,
    }


@torch.no_grad()
def zero_prefix_states(model: EngramModel, enc: Encoded, recipe: Recipe, autocast_dtype=None):
    """Each sentence's pooled state [n,H] and, with an engram, its own engram [n,e] from a
    zero-prefix pass, so both depend on that sentence alone."""
    was_training = model.training
    model.eval()
    bs = recipe.batch_size
    pooled, engrams = [], []
    for i in range(0, len(enc), bs):
        ids, mask, _ = collate(enc, np.arange(i, min(i + bs, len(enc))), recipe.device)
        with _autocast(recipe.device, autocast_dtype):
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


def train_variant(recipe: Recipe, variant: str, seed: int, train: Encoded, evals: dict[str, Encoded], ckpt: Path, resume: bool):
    """Train one variant for recipe.epochs, evaluating after every epoch; checkpoint every epoch.

    Returns (result dict, the Built variant). `evals` holds "validation" and any extra sets."""
    batches_per_epoch = -(-len(train) // recipe.batch_size)
    seed_everything(seed)
    built = recipe.build(variant, seed, batches_per_epoch * recipe.epochs)
    model, opt = built.model, built.optimizer
    total, trainable = count_parameters(model)
    dtype = f"; compute dtype {built.info['compute_dtype']}" if "compute_dtype" in built.info else ""
    print(f"[{variant} seed {seed}] parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f} %){dtype}")
    state = {"history": [], "best": None, "final": None, "seconds": 0.0}
    start_epoch = 1
    last = latest_checkpoint(ckpt) if resume else None
    if last is not None:
        state = load_checkpoint(last, model, opt, built.scheduler, built.scaler)
        start_epoch = state.pop("epoch") + 1
        print(f"[{variant} seed {seed}] resuming after epoch {start_epoch - 1} from {last}")
    model.train()
    for epoch in range(start_epoch, recipe.epochs + 1):
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "sent": 0.0, "lm": 0.0, "lm_n": 0, "correct": 0, "n": 0, "steps": 0}
        batches = epoch_batches(len(train), recipe.batch_size, seed, epoch)
        bar = _progress(batches, recipe, f"{variant} s{seed} e{epoch}/{recipe.epochs}")
        for step, idx in enumerate(bar, start=1):
            ids, mask, labels = collate(train, idx, recipe.device)
            with _autocast(recipe.device, built.autocast_dtype):
                out = run_batch(model, ids, mask, labels, mode="pair")
            loss_value = out.loss.item()
            if not np.isfinite(loss_value):
                raise NonFiniteLoss(
                    f"{variant} (seed {seed}): non-finite loss {loss_value} at epoch {epoch}, step {step}; "
                    f"the last good checkpoint is kept in {ckpt}"
                )
            opt.zero_grad(set_to_none=True)
            if built.scaler is not None:
                built.scaler.scale(out.loss).backward()
                built.scaler.step(opt)
                built.scaler.update()
            else:
                out.loss.backward()
                opt.step()
            if built.scheduler is not None:
                built.scheduler.step()
            sums["loss"] += loss_value
            sums["steps"] += 1
            sums["sent"] += out.sent_sum
            sums["lm"] += out.lm_sum
            sums["lm_n"] += out.lm_count
            sums["correct"] += int((out.sent_logits.argmax(-1) == labels).sum())
            sums["n"] += len(idx)
            if hasattr(bar, "set_postfix") and step % 20 == 0:
                bar.set_postfix(loss=f"{sums['loss'] / sums['steps']:.3f}", acc=f"{100 * sums['correct'] / sums['n']:.1f}")
        train_seconds = time.perf_counter() - t0
        results = {name: evaluate(model, enc, recipe, built.autocast_dtype) for name, enc in evals.items()}
        val = results["validation"]
        row = {
            "epoch": epoch,
            "train_loss": sums["loss"] / sums["steps"],
            "train_sent_loss": sums["sent"] / sums["n"],
            "train_lm_loss": sums["lm"] / sums["lm_n"] if model.uses_lm else None,
            "train_acc": 100 * sums["correct"] / sums["n"],
            "val_acc": val["acc"],
            "val_sent_loss": val["sent_loss"],
            "val_lm_loss": val["lm_loss"],
            "extra": {k: _eval_row(v) for k, v in results.items() if k != "validation"},
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0,
        }
        state["history"].append(row)
        state["seconds"] += row["seconds"]
        if state["best"] is None or val["acc"] > state["best"]["acc"]:
            state["best"] = {"acc": val["acc"], **_prediction_record(epoch, val)}
        state["final"] = _prediction_record(epoch, val)
        print(_epoch_line(variant, seed, row))
        save_checkpoint(ckpt, epoch, model, opt, built.scheduler, built.scaler, state)
    return {"total": total, "trainable": trainable, "info": built.info, **state}, built


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



# ----------------------------------------------------------------------------- the study


def analyse(model: EngramModel, val: Encoded, recipe: Recipe, autocast_dtype, seed: int) -> tuple[dict, dict]:
    """After training: probes of the pooled state (and engrams), and for dual_engram the engram
    metrics and the evaluation ablation. Returns (json-able analysis, arrays for figures)."""
    labels = np.asarray(val.labels)
    pooled, engrams = zero_prefix_states(model, val, recipe, autocast_dtype)
    analysis = {"probe_pooled": probe(pooled, labels, seed)}
    arrays = {"labels": labels}
    if engrams is not None:
        metrics, clusters = engram_metrics(engrams, labels, seed)
        analysis["engram"] = metrics
        analysis["probe_engram"] = probe(engrams, labels, seed)
        runs = {mode: evaluate(model, val, recipe, autocast_dtype, mode=mode, seed=seed) for mode in ("pair", "zero", "shuffled")}
        analysis["ablation"] = {mode: r["acc"] for mode, r in runs.items()}
        for mode in ("zero", "shuffled"):  # predictions that differ from the trained pairing
            analysis["ablation"][f"changed_{mode}"] = int((runs[mode]["pred"] != runs["pair"]["pred"]).sum())
        arrays.update(engrams=engrams, clusters=clusters)
    return analysis, arrays


RESUME_FREE = ("resume", "no_progress", "seeds", "out", "device")  # settings a resumed run may change


def prepare_checkpoints(ckpt_root: Path, settings: dict, resume: bool) -> None:
    """A fresh run clears old checkpoints; a resumed one only continues checkpoints made with the
    same settings (seeds may be added)."""
    if not resume:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    path = ckpt_root / "run.json"
    mine = {k: v for k, v in settings.items() if k not in RESUME_FREE}
    if resume and path.is_file():
        theirs = json.loads(path.read_text())
        diff = [f"{k}: {theirs.get(k)} -> {mine.get(k)}" for k in sorted(set(mine) | set(theirs)) if theirs.get(k) != mine.get(k)]
        if diff:
            raise UsageError(f"checkpoints in {ckpt_root} were made with other settings ({'; '.join(diff)}); "
                             "resume with the same flags, or run without --resume to start over")
    write_json(path, mine)


def run_study(recipe: Recipe, seeds: list[int], train: Encoded, evals: dict[str, Encoded], out: Path,
              resume: bool, settings: dict, on_progress: Callable[[dict, bool], None]) -> dict:
    """Train every variant once per seed, in turn. Each finished variant's result is kept in its
    checkpoint folder (so --resume skips it) and `on_progress(results, complete)` is called so
    that the outputs are rewritten after every finished variant."""
    ckpt_root = out / "checkpoints"
    prepare_checkpoints(ckpt_root, settings, resume)
    results: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        results[seed] = {}
        for variant in VARIANTS:
            folder = ckpt_root / f"seed{seed}" / variant
            done = folder / "result.json"
            if resume and done.is_file():
                print(f"[{variant} seed {seed}] finished in an earlier run; skipping")
                results[seed][variant] = json.loads(done.read_text())
                continue
            result, built = train_variant(recipe, variant, seed, train, evals, folder, resume)
            analysis, arrays = analyse(built.model, evals["validation"], recipe, built.autocast_dtype, seed)
            result["analysis"] = analysis
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            write_atomic(folder / "arrays.npz", buf.getvalue())
            write_json(done, result)
            results[seed][variant] = result
            del built
            if recipe.device.type == "cuda":
                torch.cuda.empty_cache()
            on_progress(results, False)
    on_progress(results, True)
    return results


def load_arrays(out: Path, seed: int, variant: str) -> dict:
    with np.load(out / "checkpoints" / f"seed{seed}" / variant / "arrays.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
