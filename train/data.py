"""SST-2 from GLUE-layout TSV files or the hub, checked line by line; the word vocabulary of the
small experiment; token-id matrices and the batches a seed and an epoch determine."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train.stop import UsageError

HUB_DATASET = "stanfordnlp/sst2"
DATA_FLAG = "--data-dir"  # the flag that names train.tsv / dev.tsv
EXTRA_FLAG = "--extra-eval"


@dataclass
class Split:
    sentences: list[str]
    labels: list[int]
    source: str = ""  # the file it came from, for error messages

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> "Split":
        return self if n is None else Split(self.sentences[:n], self.labels[:n], self.source)


def read_tsv(path, flag: str = DATA_FLAG) -> Split:
    """A GLUE-layout TSV: header `sentence<TAB>label`, then one example a line, label 0 or 1.
    Any problem is one UsageError naming the file, the line, what is wrong and `flag`; nothing
    is skipped. Bytes that are not UTF-8 are named by line, never a UnicodeDecodeError."""
    path = Path(path)
    fix = f"fix the file or pass another with {flag}"
    if not path.is_file():
        want = (
            "NAME=PATH to a GLUE-layout TSV"
            if flag == EXTRA_FLAG
            else "a folder with GLUE-layout train.tsv and dev.tsv"
        )
        raise UsageError(f"data file {path} not found; {flag} must name {want}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror}); {fix}") from None
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise UsageError(f"{path} is empty; expected a header `sentence<TAB>label` and examples; {fix}")
    text = []
    for n, line in enumerate(lines, start=1):
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(
                f"{path}:{n}: bytes that are not UTF-8 (at column {e.start + 1}); save it as UTF-8, or {fix}"
            ) from None
        text.append(s.rstrip("\r"))
    text[0] = text[0].removeprefix("\ufeff")  # a byte-order mark some editors write
    if text[0].split("\t") != ["sentence", "label"]:
        raise UsageError(f"{path}:1: header is {text[0][:60]!r}; expected `sentence<TAB>label`; {fix}")
    sentences, labels = [], []
    for n, line in enumerate(text[1:], start=2):
        cols = line.split("\t")
        if len(cols) != 2:
            raise UsageError(
                f"{path}:{n}: expected 2 tab-separated columns (sentence, label), found {len(cols)}; {fix}"
            )
        sentence, label = cols[0].strip(), cols[1].strip()
        if not sentence.split():
            raise UsageError(f"{path}:{n}: empty sentence; {fix}")
        if label not in ("0", "1"):
            raise UsageError(f"{path}:{n}: label {label[:20]!r} is not 0 or 1; {fix}")
        sentences.append(sentence)
        labels.append(int(label))
    if not labels:
        raise UsageError(f"{path} has a header but no examples; {fix}")
    return Split(sentences, labels, str(path))


def load_sst2(data_dir=None) -> dict[str, Split]:
    """Train and validation splits: from `data_dir` (train.tsv, dev.tsv), else from the hub.
    The unlabeled test split is never used."""
    if data_dir is not None:
        d = Path(data_dir)
        if not d.is_dir():
            raise UsageError(f"data folder {d} not found; {DATA_FLAG} must hold GLUE-layout train.tsv and dev.tsv")
        return {"train": read_tsv(d / "train.tsv"), "validation": read_tsv(d / "dev.tsv")}
    try:
        from datasets import load_dataset

        ds = load_dataset(HUB_DATASET)
        return {
            s: Split(list(ds[s]["sentence"]), [int(x) for x in ds[s]["label"]], f"hub:{HUB_DATASET}/{s}")
            for s in ("train", "validation")
        }
    except Exception as e:  # the hub is unreachable, or the cache is missing
        raise UsageError(
            f"could not load {HUB_DATASET} from the Hugging Face hub ({type(e).__name__}); "
            f"either connect to the hub, or pass {DATA_FLAG} DIR with GLUE-layout train.tsv and dev.tsv"
        ) from None


def parse_extra_eval(items: list[str]) -> dict[str, Split]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{EXTRA_FLAG} {item!r}: expected NAME=PATH to a GLUE-layout TSV")
        if name in out or name == "validation":
            raise UsageError(f"{EXTRA_FLAG} name {name!r} is used twice or is reserved")
        out[name] = read_tsv(path, EXTRA_FLAG)
    return out


def check_analysable(split: Split, folds: int, what: str) -> None:
    """Refuse, before any training, a validation set too small for the analyses that follow it:
    the probes' stratified `folds`-fold cross-validation needs `folds` examples of each label, and
    K-Means, t-SNE and the cosines need both labels."""
    counts = Counter(split.labels)
    short = [f"{counts.get(k, 0)} {name}" for k, name in ((0, "negative"), (1, "positive")) if counts.get(k, 0) < folds]
    if short:
        raise UsageError(
            f"{what} has {' and '.join(short)} example(s); the analyses after training (the probes' "
            f"{folds}-fold cross-validation, K-Means, t-SNE) need at least {folds} of each label; "
            "give a larger set (or a larger --max-eval)"
        )


# ----------------------------------------------------------------------------- vocabulary


class Vocab:
    """Word-level vocabulary of the training split: `specials` first, then the most frequent
    whitespace-separated words. Ties are broken alphabetically, or in first-seen order (as the
    study's code does); either way the vocabulary is a pure function of the data."""

    def __init__(self, specials: tuple[str, ...], words: list[str], bos_eos: bool):
        self.itos = list(specials) + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad, self.unk = self.stoi[specials[0]], self.stoi[specials[1]]
        self.bos_eos = bos_eos
        if bos_eos:
            self.bos, self.eos = self.stoi[specials[2]], self.stoi[specials[3]]

    @classmethod
    def build(cls, sentences: list[str], size: int, specials: tuple[str, ...], bos_eos: bool, ties: str) -> "Vocab":
        """`size` entries in all, the specials included."""
        counts = Counter(w for s in sentences for w in s.lower().split())  # SST-2 is lower-cased already
        if ties == "alphabetical":
            ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        elif ties == "first_seen":
            ranked = counts.most_common()  # stable: equal counts keep their first-seen order
        else:
            raise ValueError(f"unknown tie order {ties!r}")
        return cls(specials, [w for w, _ in ranked[: max(size - len(specials), 0)]], bos_eos)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, sentence: str, max_len: int) -> list[int]:
        """[<bos>] w1 ... wn [<eos>], truncated at max_len tokens."""
        words = [self.stoi.get(w, self.unk) for w in sentence.lower().split()]
        return ([self.bos, *words, self.eos] if self.bos_eos else words)[:max_len]


# ----------------------------------------------------------------------------- batches


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


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False) -> list[np.ndarray]:
    """The epoch's shuffled batches, a pure function of (seed, epoch) so that a resumed run sees
    the same batches as an uninterrupted one. With drop_last a short final batch is left out."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).numpy()
    stop = n - n % batch_size if drop_last else n
    return [perm[i : i + batch_size] for i in range(0, stop, batch_size)]


def collate(enc: Encoded, idx, device):
    """The rows `idx`, right-padded to the longest of them: ids [B,T], mask [B,T], labels [B]."""
    idx = np.asarray(idx)
    lengths = enc.lengths[idx]  # [B]
    T = int(lengths.max())
    ids = torch.from_numpy(enc.ids[idx, :T])  # [B,T]
    mask = torch.from_numpy((np.arange(T)[None, :] < lengths[:, None]).astype(np.int64))  # [B,T]
    labels = torch.from_numpy(enc.labels[idx])  # [B]
    return ids.to(device), mask.to(device), labels.to(device)
