"""The small transformer backbone trained from scratch: its config, blocks (pre- or post-LN, causal
or bidirectional, on packed real rows or a padded batch), positions and the fast dropout."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SmallConfig:
    vocab_size: int = 7004  # 4 specials + 7,000 words
    max_len: int = 64  # tokens per sentence, specials included
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 512
    dropout: float = 0.1
    engram_dim: int = 32
    # "packed" runs the per-token layers on real tokens only and the LM head on LM targets only;
    # "padded" is the naive reference: every batch padded to max_len + 1 positions, every layer
    # and the LM head run on every position. Both compute the same function of the real tokens.
    impl: str = "packed"
    # The architecture options the two readings of the study differ on (protocols.py sets them):
    causal: bool = True  # causal attention; False: bidirectional with a key-padding mask
    norm_first: bool = True  # pre-LN blocks; False: post-LN (LayerNorm after each residual add)
    final_norm: bool = True  # a LayerNorm after the last block
    positions: str = "learned"  # "learned" embeddings or fixed "sinusoidal" ones
    ff_dropout: bool = False  # dropout between the feed-forward layers too (PyTorch's encoder layer)
    init: str = "normal"  # "normal": N(0, 0.02) weights, zero biases; "torch": PyTorch's default inits
    head: str = "linear"  # sentiment head: "linear" Linear(d -> 2) or "mlp" Linear(d -> w) GELU Dropout Linear(w -> 2)
    head_width: int = 64
    engram_injection: str = "prefix"  # "prefix": one prepended embedding; "concat": [token, engram] -> Linear -> d


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout with a mask from torch.rand: the same distribution as F.dropout, and about
    twice as fast on CPU, where bernoulli_ is slow."""
    if not training or p == 0.0:
        return x
    # The mask is built in place in the fresh random tensor: the same values as
    # (rand >= p) * 1/(1-p), without a bool and a float temporary per call.
    return x * torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class Block(nn.Module):
    """A transformer block (pre-LN or post-LN, causal or bidirectional) that runs on packed rows or
    on a padded batch."""

    def __init__(self, cfg: SmallConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.causal, self.norm_first, self.ff_dropout = cfg.causal, cfg.norm_first, cfg.ff_dropout
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, d)
        self.dropout = cfg.dropout
        self.drop = Dropout(cfg.dropout)

    def attention(self, qkv: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """keep [B,1,1,T] bool marks the real keys (bidirectional attention); causal attention over
        right padding needs no mask, since a real token never sees a later pad."""
        B, T, three_d = qkv.shape  # [B,T,3d]
        d = three_d // 3
        q, k, v = qkv.view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # 3x[B,h,T,dh]
        if self.training and self.dropout > 0:
            # SDPA would fall back to its math path with bernoulli_ dropout here; the same math
            # with the faster dropout above.
            scores = (q @ k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)  # [B,h,T,T]
            if self.causal:
                # Adding -inf above the diagonal gives the same scores as masked_fill_, and its
                # backward is the identity instead of another masked_fill over [B,h,T,T].
                scores.add_(torch.full((T, T), float("-inf"), device=q.device).triu_(1))  # -inf on future keys
            if keep is not None:
                scores.masked_fill_(~keep, float("-inf"))  # pad keys
            y = dropout(scores.softmax(-1), self.dropout, True) @ v  # [B,h,T,dh]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=self.causal)  # [B,h,T,dh]
        return y.transpose(1, 2).reshape(B, T, d)  # [B,T,d]

    def _attend(self, x, rows, shape, keep):
        qkv = self.qkv(x)  # [N,3d] or [B,T,3d]
        if rows is None:
            return self.attention(qkv, keep)  # [B,T,d]
        B, T = shape
        grid = qkv.new_zeros(B * T, qkv.shape[-1]).index_copy_(0, rows, qkv)  # [B*T,3d]
        return self.attention(grid.view(B, T, -1), keep).reshape(B * T, -1).index_select(0, rows)  # [N,d]

    def _ff(self, x):
        h = F.gelu(self.fc1(x))  # [N,ff]
        return self.fc2(self.drop(h) if self.ff_dropout else h)  # [N,d]

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None, shape=None, keep=None) -> torch.Tensor:
        """x: [N,d] packed real rows (rows = their flat indices in the [B*T] grid, shape = (B,T)),
        or [B,T,d] padded when rows is None."""
        if self.norm_first:
            x = x + self.drop(self.proj(self._attend(self.ln1(x), rows, shape, keep)))
            return x + self.drop(self._ff(self.ln2(x)))
        x = self.ln1(x + self.drop(self.proj(self._attend(x, rows, shape, keep))))
        return self.ln2(x + self.drop(self._ff(x)))


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """pe[p, 2k] = sin(p / 10000^(2k/d)), pe[p, 2k+1] = cos(...): [n,d]."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]  # [n,1]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))  # [d/2]
    pe = torch.zeros(n, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class SmallBackbone(nn.Module):
    """Token embeddings plus positions, transformer blocks, an optional final LayerNorm.

    The LM head is optional so that `sentiment_only` carries no LM parameters."""

    def __init__(self, cfg: SmallConfig, with_lm_head: bool):
        super().__init__()
        self.cfg = cfg
        self.hidden_size = cfg.d_model
        torch_init = cfg.init == "torch"
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=0 if torch_init else None)
        if cfg.positions == "learned":
            self.pos = nn.Embedding(cfg.max_len + 1, cfg.d_model)  # +1: the engram prefix slot
        else:
            self.register_buffer("pe", sinusoidal_positions(cfg.max_len + 1, cfg.d_model), persistent=False)
        self.drop = Dropout(cfg.dropout)
        if torch_init:  # PyTorch's encoder copies one layer, so its layers start identical
            first = Block(cfg)
            _torch_attention_init(first)
            self.blocks = nn.ModuleList(copy.deepcopy(first) for _ in range(cfg.n_layers))
        else:
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.final_norm else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size) if with_lm_head else None
        if not torch_init:
            self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def n_positions(self) -> int:
        return self.cfg.max_len + 1

    def positions(self, T: int) -> torch.Tensor:
        return self.pos.weight[:T] if self.cfg.positions == "learned" else self.pe[:T]  # [T,d]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok(input_ids)  # [B,T,d]

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, inject=None) -> torch.Tensor:
        """inject(h [N,d], batch_index [N]) -> [N,d], when given, runs on every position's input
        after positions and dropout (the concatenated engram of the study's code)."""
        B, T, d = embeds.shape
        if T > self.n_positions:
            raise ValueError(f"sequence of {T} positions exceeds the model's {self.n_positions}")
        x = embeds + self.positions(T)  # [B,T,d]
        if self.cfg.impl == "padded":
            P = self.n_positions
            x = self.drop(F.pad(x, (0, 0, 0, P - T)))  # [B,P,d]
            if inject is not None:
                x = inject(x.reshape(B * P, d), torch.arange(B, device=x.device).repeat_interleave(P)).view(B, P, d)
            keep = None if self.cfg.causal else F.pad(mask, (0, P - T)).bool()[:, None, None, :]  # [B,1,1,P]
            for blk in self.blocks:
                x = blk(x, keep=keep)
            x = x if self.ln_f is None else self.ln_f(x)
            return x[:, :T]  # [B,T,d]
        keep = None if self.cfg.causal else mask.bool()[:, None, None, :]  # [B,1,1,T]
        rows = mask.reshape(-1).nonzero().squeeze(1)  # [N] flat indices of real positions
        h = self.drop(x.reshape(B * T, d).index_select(0, rows))  # [N,d]
        if inject is not None:
            h = inject(h, rows // T)  # [N,d]
        for blk in self.blocks:
            h = blk(h, rows, (B, T), keep)
        if self.ln_f is not None:
            h = self.ln_f(h)  # [N,d]
        return h.new_zeros(B * T, d).index_copy_(0, rows, h).view(B, T, d)  # [B,T,d], pads are 0

    def lm_head_module(self) -> nn.Linear:
        return self.lm_head


def _torch_attention_init(block: Block) -> None:
    """nn.MultiheadAttention's own init for the fused q,k,v projection and the output bias."""
    nn.init.xavier_uniform_(block.qkv.weight)
    nn.init.zeros_(block.qkv.bias)
    nn.init.zeros_(block.proj.bias)
