"""Network modules of the study: backbones, heads, engram modules and the model that composes them.

A backbone is anything with this interface (the small transformer below, or `HFBackbone` around a
Hugging Face causal LM):

    hidden_size: int
    embed(input_ids [B,T]) -> [B,T,H]                      token embeddings, no positions
    forward(embeds [B,T,H], mask [B,T]) -> [B,T,H]         last-layer hidden states (right padding)
    lm_head_module() -> nn.Linear                         the next-token head (H -> V)

`EngramModel` puts the heads of one variant on a backbone and returns what it computes.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import LinearCrossEntropy, lm_loss_sum, lm_targets  # noqa: F401  (re-exported)

VARIANTS = ("sentiment_only", "dual_head", "dual_engram")
USES_LM = {"sentiment_only": False, "dual_head": True, "dual_engram": True}
USES_ENGRAM = {"sentiment_only": False, "dual_head": False, "dual_engram": True}


# ----------------------------------------------------------------------------- small backbone


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


# ----------------------------------------------------------------------------- Hugging Face backbone


class HFBackbone(nn.Module):
    """A (possibly PEFT-wrapped, possibly 4-bit) Hugging Face causal LM seen through the backbone
    interface. It runs the decoder stack only, so full-vocabulary logits are never computed for
    positions that are not LM targets."""

    def __init__(self, causal_lm: nn.Module, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.lm = causal_lm
        base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
        self._decoder = base.get_decoder()
        self._lm_head = base.get_output_embeddings()
        self.hidden_size = base.config.hidden_size
        self.compute_dtype = compute_dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._decoder.get_input_embeddings()(input_ids)  # [B,T,H]

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, inject=None) -> torch.Tensor:
        if inject is not None:
            raise ValueError("a Hugging Face backbone takes its engram as a prefix, not by concatenation")
        out = self._decoder(inputs_embeds=embeds.to(self.compute_dtype), attention_mask=mask, use_cache=False)
        return out.last_hidden_state  # [B,T,H]

    def lm_head_module(self) -> nn.Linear:
        return self._lm_head


# ----------------------------------------------------------------------------- heads and engram modules


class EngramCompressor(nn.Module):
    """Linear(H -> e) -> Tanh: the engram of a pooled hidden state."""

    def __init__(self, hidden: int, engram_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden, engram_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(pooled))  # [B,e]


class EngramProjector(nn.Module):
    """Linear(e -> H): one prefix embedding from an engram."""

    def __init__(self, engram_dim: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(engram_dim, hidden)

    def forward(self, engram: torch.Tensor) -> torch.Tensor:
        return self.linear(engram)  # [B,H]


class ConcatInjector(nn.Module):
    """Linear(H + e -> H) over [token input, engram] at every position: the study code's injection."""

    def __init__(self, engram_dim: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden + engram_dim, hidden)

    def forward(self, h: torch.Tensor, engram_rows: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([h, engram_rows.to(h.dtype)], -1))  # [N,H]


def small_sentiment_head(hidden: int) -> nn.Module:
    return nn.Linear(hidden, 2)


def mlp_sentiment_head(hidden: int, width: int = 256, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, 2))


# ----------------------------------------------------------------------------- the model


@dataclass
class ModelOutput:
    sent_logits: torch.Tensor  # [B,2] fp32
    sent_loss: torch.Tensor | None  # scalar, mean over the batch
    lm_loss: torch.Tensor | None  # scalar, mean over the batch's LM targets
    lm_sum: torch.Tensor | None  # scalar, summed CE (for exact means across batches)
    lm_count: int  # number of LM targets
    loss: torch.Tensor | None  # the variant's training loss
    engram: torch.Tensor | None  # [B,e] this input's engram (dual_engram only)
    pooled: torch.Tensor  # [B,H] fp32 pooled last-layer state


@dataclass
class ModelSpec:
    variant: str
    pooling: str  # "mean" over real tokens, or "last" real token
    engram_dim: int = 32
    sent_weight: float = 0.5  # loss of the dual variants: sent_weight * CE + lm_weight * LM
    lm_weight: float = 0.5
    lm_chunk_rows: int = 1 << 30
    lm_all_positions: bool = False  # naive reference: LM logits at every position, then masked
    injection: str = "prefix"  # "prefix" embedding, or "concat" to every position (small backbone only)
    prefix_predicts_first: bool = False  # the prefix position is an LM position predicting the first token


class EngramModel(nn.Module):
    """A backbone with the heads of one variant.

    forward(input_ids, mask, labels=None, engram=None):
      - dual_engram: the prefix is projector(engram) (projector(0) when engram is None), prepended to
        the token embeddings with a 1 in the mask (or, with injection "concat", the engram is joined
        to every position's input); the model also returns this input's own engram.
      - loss = CE(sentiment) for sentiment_only, lm_weight*LM + sent_weight*CE(sentiment) otherwise.
      - the pooled state, the sentiment head, the compressor and the projector compute in fp32 with
        autocast off, whatever the backbone's dtype: their outputs are fp32 on every device.
    """

    def __init__(self, backbone: nn.Module, spec: ModelSpec, sentiment_head: nn.Module):
        super().__init__()
        if spec.variant not in VARIANTS:
            raise ValueError(f"unknown variant {spec.variant!r}; choose from {VARIANTS}")
        if spec.pooling not in ("mean", "last"):
            raise ValueError(f"unknown pooling {spec.pooling!r}")
        if spec.injection not in ("prefix", "concat"):
            raise ValueError(f"unknown engram injection {spec.injection!r}")
        self.spec = spec
        self.backbone = backbone
        self.sentiment_head = sentiment_head
        self.uses_lm = USES_LM[spec.variant]
        self.uses_engram = USES_ENGRAM[spec.variant]
        H = backbone.hidden_size
        self.compressor = EngramCompressor(H, spec.engram_dim) if self.uses_engram else None
        injector = EngramProjector if spec.injection == "prefix" else ConcatInjector
        self.projector = injector(spec.engram_dim, H) if self.uses_engram else None
        self.prefixed = self.uses_engram and spec.injection == "prefix"

    @property
    def variant(self) -> str:
        return self.spec.variant

    def zero_engram(self, batch: int, device) -> torch.Tensor:
        return torch.zeros(batch, self.spec.engram_dim, device=device)  # [B,e]

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B,T,H] over the sentence's own tokens only -> [B,H] fp32."""
        if self.spec.pooling == "mean":
            hidden = hidden.float()  # [B,T,H] the mean is taken in fp32
            m = mask.unsqueeze(-1).to(hidden.dtype)  # [B,T,1]
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1)  # [B,H]
        last = mask.sum(1).long() - 1  # [B] index of the last real token (right padding)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()  # [B,H]

    def _fp32(self, device):
        """Autocast off: the heads and engram modules run in fp32 even inside a bf16/fp16 forward."""
        return torch.autocast(device.type, enabled=False)

    def forward(self, input_ids, mask, labels=None, engram=None) -> ModelOutput:
        B = input_ids.shape[0]
        embeds = self.backbone.embed(input_ids)  # [B,T,H]
        mask_in, inject = mask, None
        if self.uses_engram and engram is None:
            engram = self.zero_engram(B, input_ids.device)
        if self.uses_engram and not self.prefixed:
            def inject(h, batch_index):  # the engram of each row's sentence, joined to its input
                return self.projector(h, engram[batch_index])  # [N,H]
        elif self.uses_engram:
            with self._fp32(embeds.device):
                prefix = self.projector(engram.float())  # [B,H] fp32
            prefix = prefix.to(embeds.dtype).unsqueeze(1)  # [B,1,H] in the backbone's dtype
            embeds = torch.cat([prefix, embeds], 1)  # [B,1+T,H]
            mask_in = torch.cat([mask.new_ones(B, 1), mask], 1)  # [B,1+T]
        elif engram is not None:
            raise ValueError(f"{self.variant} takes no engram")
        full = self.backbone(embeds, mask_in) if inject is None else self.backbone(embeds, mask_in, inject)  # [B,T',H]
        hidden = full[:, 1:] if self.prefixed else full  # [B,T,H]: the prefix position is never pooled nor a target
        with self._fp32(hidden.device):
            pooled = self.pool(hidden, mask)  # [B,H] fp32
            sent_logits = self.sentiment_head(pooled)  # [B,2] fp32
            own_engram = self.compressor(pooled) if self.uses_engram else None  # [B,e] fp32

        sent_loss = F.cross_entropy(sent_logits, labels) if labels is not None else None
        lm_loss = lm_sum = None
        n_lm = 0
        if self.uses_lm:
            lm_ids, lm_mask, lm_hidden = input_ids, mask, hidden
            if self.prefixed and self.spec.prefix_predicts_first:
                # the prefix position predicts the sentence's first token (the study's 7B code); the
                # placeholder id before it is never a target, since nothing precedes position 0
                lm_ids = torch.cat([input_ids[:, :1], input_ids], 1)  # [B,1+T]
                lm_mask, lm_hidden = mask_in, full
            where, targets = lm_targets(lm_ids, lm_mask)  # [B,T'-1], [N]
            n_lm = int(targets.numel())
            if self.spec.lm_all_positions:
                logits = self.backbone.lm_head_module()(lm_hidden[:, :-1])  # [B,T'-1,V]
                ce = F.cross_entropy(logits.transpose(1, 2), lm_ids[:, 1:], reduction="none")  # [B,T'-1]
                lm_sum = (ce * where).sum()
            else:
                rows = lm_hidden[:, :-1][where]  # [N,H] only positions with a real next token
                lm_sum = lm_loss_sum(self.backbone, rows, targets, self.spec.lm_chunk_rows)
            lm_loss = lm_sum / max(n_lm, 1)
        loss = None
        if sent_loss is not None:
            spec = self.spec
            loss = spec.lm_weight * lm_loss + spec.sent_weight * sent_loss if self.uses_lm else sent_loss
        return ModelOutput(sent_logits, sent_loss, lm_loss, lm_sum, n_lm, loss, own_engram, pooled)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) element counts. A 4-bit weight counts as the elements it stores (two
    weights per byte), as the study's ~4.4 B total for Qwen2.5-7B does."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def build_small_model(variant: str, cfg: SmallConfig, sent_weight: float = 0.5, lm_weight: float = 0.5) -> EngramModel:
    backbone = SmallBackbone(cfg, with_lm_head=USES_LM[variant])
    spec = ModelSpec(variant=variant, pooling="mean", engram_dim=cfg.engram_dim, sent_weight=sent_weight,
                     lm_weight=lm_weight, lm_all_positions=cfg.impl == "padded", injection=cfg.engram_injection)
    head = small_sentiment_head(cfg.d_model) if cfg.head == "linear" else mlp_sentiment_head(cfg.d_model, cfg.head_width)
    return EngramModel(backbone, spec, head)

