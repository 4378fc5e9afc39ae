"""Speed of the small experiment's training step, against a naive reference, in one process.

    python benchmarks/bench_small.py --data-dir ../shared/data/sst2

For each variant it times --steps optimizer steps (after --warmup) on the real first batches of
epoch 1 (seed 42, batch 64), for the fast implementation and for the naive reference (every
batch padded to 64 tokens, every layer and the LM head on every position). It prints real tokens
per second, the projected seconds per epoch and per full run (8 epochs, training only), the
achieved FLOP rate as a fraction of a plain fp32 matmul peak measured in the same process, and the
speedup over the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram import run_batch  # noqa: E402
from experiment import small_config, small_vocab  # noqa: E402
from models import VARIANTS, SmallConfig, build_small_model  # noqa: E402
from protocols import SMALL  # noqa: E402
from train.data import Encoded, collate, epoch_batches, load_sst2  # noqa: E402


def matmul_peak(n: int = 1024, repeats: int = 20) -> float:
    """Best fp32 FLOP/s of an n x n matmul on this machine with torch's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def step_flops(cfg: SmallConfig, variant: str, mask: torch.Tensor) -> float:
    """Useful training FLOPs of one step: 3x the forward FLOPs of the real tokens (matmuls only).
    The same count is used for the reference, so its extra padded work shows as a lower rate."""
    d, ff, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    B, T = mask.shape
    tokens = int(mask.sum()) + (B if VARIANTS[variant].prefix != "none" else 0)  # the prefix is a real row
    per_token = cfg.n_layers * 2 * (4 * d * d + 2 * d * ff)
    attention = cfg.n_layers * 4 * B * (T + 1) ** 2 * d  # QK^T and AV over the padded grid
    lm = 2 * int((mask.sum(1) - 1).sum()) * d * V if VARIANTS[variant].lm_head else 0
    return 3.0 * (tokens * per_token + attention + lm)


def time_variant(variant: str, impl: str, vocab_size: int, enc: Encoded, batches, warmup: int, seed: int, preset):
    cfg = small_config(preset, vocab_size=vocab_size, impl=impl)
    torch.manual_seed(seed)
    model = build_small_model(variant, cfg, preset.sent_weight, preset.lm_weight)
    if preset.weight_decay:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=preset.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=3e-4, fused=True)
    flops = tokens = 0.0
    for i, idx in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        ids, mask, labels = collate(enc, idx, "cpu")
        out = run_batch(model, ids, mask, labels, mode=preset.engram_mode)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if preset.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), preset.clip_norm)
        opt.step()
        if i >= warmup:
            flops += step_flops(cfg, variant, mask)
            tokens += float(mask.sum())
    seconds = time.perf_counter() - t0
    steps = len(batches) - warmup
    return {"seconds_per_step": seconds / steps, "tokens_per_second": tokens / seconds, "flop_rate": flops / seconds}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="GLUE-layout SST-2 folder (train.tsv, dev.tsv)")
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per variant and implementation")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--protocol", choices=tuple(SMALL), default="written", help="the protocol preset to time")
    p.add_argument("--no-naive", action="store_true", help="time the fast implementation only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_sst2(args.data_dir)
    preset = SMALL[args.protocol]
    vocab = small_vocab(preset, data["train"].sentences)
    enc = Encoded([vocab.encode(s, 64) for s in data["train"].sentences], data["train"].labels, vocab.pad)
    all_batches = epoch_batches(len(enc), preset.batch_size, 42, 1, preset.drop_last)
    batches = all_batches[: args.warmup + args.steps]
    peak = matmul_peak()
    rows = {}
    for variant in VARIANTS:
        fast = time_variant(variant, "packed", len(vocab), enc, batches, args.warmup, 42, preset)
        naive = (
            fast
            if args.no_naive
            else time_variant(variant, "padded", len(vocab), enc, batches, args.warmup, 42, preset)
        )
        rows[variant] = {
            "fast": fast,
            "naive": naive,
            "epoch_seconds": fast["seconds_per_step"] * len(all_batches),
            "naive_epoch_seconds": naive["seconds_per_step"] * len(all_batches),
            "fraction_of_peak": fast["flop_rate"] / peak,
            "speedup": naive["seconds_per_step"] / fast["seconds_per_step"],
        }
    full = 8 * sum(r["epoch_seconds"] for r in rows.values())
    naive_full = 8 * sum(r["naive_epoch_seconds"] for r in rows.values())
    print(
        f"matmul peak (fp32, 1024^3, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s; "
        f"{args.steps} timed steps per row, batch 64, {len(all_batches)} steps per epoch"
    )
    print()
    print("| variant | tokens/s | projected epoch s | fraction of peak | naive epoch s | speedup |")
    print("|---|---|---|---|---|---|")
    for v, r in rows.items():
        print(
            f"| {v} | {r['fast']['tokens_per_second']:,.0f} | {r['epoch_seconds']:.1f} | {r['fraction_of_peak']:.1%} | "
            f"{r['naive_epoch_seconds']:.1f} | {r['speedup']:.2f}x |"
        )
    print()
    print(
        f"projected full run (3 variants x 8 epochs, training only): "
        f"{full / 60:.1f} min; naive reference {naive_full / 60:.1f} min"
    )
    result = {
        "peak_flops": peak,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "variants": rows,
        "projected_full_run_seconds": full,
        "naive_projected_full_run_seconds": naive_full,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
