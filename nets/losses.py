"""The LM loss without full logits: a linear cross-entropy that keeps at most one chunk of
[rows x vocabulary] logits alive, and the positions that are LM targets."""

from __future__ import annotations

import torch
import torch.nn as nn


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, t_i) without keeping more than `chunk_rows` rows of logits alive.

    Logits are computed in W's dtype and reduced in fp32. With one chunk the softmax is kept for
    backward (fast path of the small model); with several chunks, backward recomputes each chunk's
    logits, so a 152k-word vocabulary never has fp32 logits for the whole batch at once."""

    @staticmethod
    def _logits(h, weight, bias):
        h = h.to(weight.dtype)
        z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())  # [n,V]
        return z.float()  # [n,V] fp32

    @staticmethod
    def _softmax_(z):
        """In place: z [n,V] becomes softmax(z); returns logsumexp(z) [n]. One pass fewer than
        logsumexp followed by exp, which matters when V is the vocabulary."""
        m = z.amax(1, keepdim=True)  # [n,1]
        s = z.sub_(m).exp_().sum(1, keepdim=True)  # [n,1]
        z.div_(s)
        return (m + s.log()).squeeze(1)  # [n]

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows):
        n = h.shape[0]
        keep = n <= chunk_rows
        total = h.new_zeros((), dtype=torch.float32)
        probs = None
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, n, chunk_rows):
                z = LinearCrossEntropy._logits(h[i : i + chunk_rows], weight, bias)  # [c,V]
                t = targets[i : i + chunk_rows]  # [c]
                target_logit = z.gather(1, t[:, None]).squeeze(1)  # [c]
                lse = LinearCrossEntropy._softmax_(z)  # z is now the softmax
                total += (lse - target_logit).sum()
                if keep:
                    probs = z  # [n,V], reused in backward
        ctx.save_for_backward(h, weight, bias, targets)
        # The kept softmax is an attribute, not a saved tensor: backward turns it into the gradient
        # in place, and a second backward (retain_graph) then recomputes it instead of failing
        # autograd's in-place check on a saved tensor.
        ctx.probs = probs
        ctx.chunk_rows = chunk_rows
        return total

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets = ctx.saved_tensors
        probs, ctx.probs = ctx.probs, None  # used up below; a later backward recomputes it
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        c = ctx.chunk_rows
        one_chunk = 0 < h.shape[0] <= c  # one chunk: gradients are written, not accumulated
        gh = torch.empty_like(h) if need_h else None
        # With one chunk the gradients are written, not accumulated into zeros: the same values
        # without a fill and an add over [V,H].
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w and not one_chunk else None
        gb = torch.zeros_like(bias, dtype=torch.float32) if need_b and not one_chunk else None
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.shape[0], c):
                hc, t = h[i : i + c], targets[i : i + c]
                if probs is None:  # several chunks, or a second backward
                    g = LinearCrossEntropy._logits(hc, weight, bias)  # [c,V]
                    LinearCrossEntropy._softmax_(g)
                else:
                    g = probs
                g[torch.arange(len(t), device=g.device), t] -= 1.0  # d CE / d logits = softmax - onehot
                g.mul_(grad_out)
                if need_h:
                    gh[i : i + c] = (g.to(weight.dtype) @ weight).to(h.dtype)  # [c,H]
                if need_w:
                    gw = g.t() @ hc.float() if one_chunk else gw.add_(g.t() @ hc.float())  # [V,H]
                if need_b:
                    gb = g.sum(0) if one_chunk else gb.add_(g.sum(0))  # [V]
        return gh, (gw.to(weight.dtype) if need_w else None), (gb.to(bias.dtype) if need_b else None), None, None


def lm_loss_sum(backbone: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) of `hidden` rows [N,H] against `targets` [N]."""
    head = backbone.lm_head_module()
    return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_rows)


def lm_targets(input_ids: torch.Tensor, mask: torch.Tensor):
    """Positions that predict a real next token, and those tokens. Masked by the attention mask,
    not by token id, so a pad id that happens to be a real word is never a target."""
    has_next = (mask[:, :-1] * mask[:, 1:]).bool()  # [B,T-1]: position t predicts real token t+1
    return has_next, input_ids[:, 1:][has_next]  # [B,T-1], [N]
