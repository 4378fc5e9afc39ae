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

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("sentiment_only", "dual_head", "dual_engram")
USES_LM = {"sentiment_only": False, "dual_head": True, "dual_engram": True}
USES_ENGRAM = {"sentiment_only": False, "dual_head": False, "dual_engram": True}


# ----------------------------------------------------------------------------- small backbone


@dataclass
class SmallConfig:
    vocab_size: int = 7004  # 4 specials + 7,000 words
    max_len: int = 64  # tokens per sentence, <bos> and <eos> included
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
    """Pre-LN causal transformer block that runs on packed rows or on a padded batch."""

    def __init__(self, cfg: SmallConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, d)
        self.dropout = cfg.dropout
        self.drop = Dropout(cfg.dropout)

    def attention(self, qkv: torch.Tensor) -> torch.Tensor:
        B, T, three_d = qkv.shape  # [B,T,3d]
        d = three_d // 3
        q, k, v = qkv.view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # 3x[B,h,T,dh]
        # Right padding + causal mask: a real token never sees a pad, so no padding mask is needed.
        if self.training and self.dropout > 0:
            # SDPA would fall back to its math path with bernoulli_ dropout here; the same math
            # with the faster dropout above.
            scores = (q @ k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)  # [B,h,T,T]
            # Adding -inf above the diagonal gives the same scores as masked_fill_, and its backward
            # is the identity instead of another masked_fill over [B,h,T,T].
            future = torch.full((T, T), float("-inf"), device=q.device).triu_(1)  # [T,T] -inf on future keys
            att = dropout(scores.add_(future).softmax(-1), self.dropout, True)
            y = att @ v  # [B,h,T,dh]
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B,h,T,dh]
        return y.transpose(1, 2).reshape(B, T, d)  # [B,T,d]

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None, shape=None) -> torch.Tensor:
        """x: [N,d] packed real rows (rows = their flat indices in the [B*T] grid, shape = (B,T)),
        or [B,T,d] padded when rows is None."""
        qkv = self.qkv(self.ln1(x))  # [N,3d] or [B,T,3d]
        if rows is None:
            a = self.attention(qkv)  # [B,T,d]
        else:
            B, T = shape
            grid = qkv.new_zeros(B * T, qkv.shape[-1]).index_copy_(0, rows, qkv)  # [B*T,3d]
            a = self.attention(grid.view(B, T, -1)).reshape(B * T, -1).index_select(0, rows)  # [N,d]
        x = x + self.drop(self.proj(a))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class SmallBackbone(nn.Module):
    """Token + learned position embeddings, pre-LN causal blocks, final LayerNorm.

    The LM head is optional so that `sentiment_only` carries no LM parameters."""

    def __init__(self, cfg: SmallConfig, with_lm_head: bool):
        super().__init__()
        self.cfg = cfg
        self.hidden_size = cfg.d_model
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len + 1, cfg.d_model)  # +1: the engram prefix slot
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size) if with_lm_head else None
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok(input_ids)  # [B,T,d]

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, d = embeds.shape
        if T > self.pos.num_embeddings:
            raise ValueError(f"sequence of {T} positions exceeds the model's {self.pos.num_embeddings}")
        x = embeds + self.pos.weight[:T]  # [B,T,d]
        if self.cfg.impl == "padded":
            x = F.pad(x, (0, 0, 0, self.pos.num_embeddings - T))  # [B,max_len+1,d]
            x = self.drop(x)
            for blk in self.blocks:
                x = blk(x)
            return self.ln_f(x)[:, :T]  # [B,T,d]
        rows = mask.reshape(-1).nonzero().squeeze(1)  # [N] flat indices of real positions
        h = self.drop(x.reshape(B * T, d).index_select(0, rows))  # [N,d]
        for blk in self.blocks:
            h = blk(h, rows, (B, T))
        h = self.ln_f(h)  # [N,d]
        return h.new_zeros(B * T, d).index_copy_(0, rows, h).view(B, T, d)  # [B,T,d], pads are 0

    def lm_head_module(self) -> nn.Linear:
        return self.lm_head


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

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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


def small_sentiment_head(hidden: int) -> nn.Module:
    return nn.Linear(hidden, 2)


def mlp_sentiment_head(hidden: int, width: int = 256, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, 2))


# ----------------------------------------------------------------------------- losses


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


class EngramModel(nn.Module):
    """A backbone with the heads of one variant.

    forward(input_ids, mask, labels=None, engram=None):
      - dual_engram: the prefix is projector(engram) (projector(0) when engram is None), prepended to
        the token embeddings with a 1 in the mask; the model also returns this input's own engram.
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
        self.spec = spec
        self.backbone = backbone
        self.sentiment_head = sentiment_head
        self.uses_lm = USES_LM[spec.variant]
        self.uses_engram = USES_ENGRAM[spec.variant]
        H = backbone.hidden_size
        self.compressor = EngramCompressor(H, spec.engram_dim) if self.uses_engram else None
        self.projector = EngramProjector(spec.engram_dim, H) if self.uses_engram else None

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
        mask_in = mask
        if self.uses_engram:
            if engram is None:
                engram = self.zero_engram(B, input_ids.device)
            with self._fp32(embeds.device):
                prefix = self.projector(engram.float())  # [B,H] fp32
            prefix = prefix.to(embeds.dtype).unsqueeze(1)  # [B,1,H] in the backbone's dtype
            embeds = torch.cat([prefix, embeds], 1)  # [B,1+T,H]
            mask_in = torch.cat([mask.new_ones(B, 1), mask], 1)  # [B,1+T]
        elif engram is not None:
            raise ValueError(f"{self.variant} takes no engram")
        hidden = self.backbone(embeds, mask_in)  # [B,T',H]
        if self.uses_engram:
            hidden = hidden[:, 1:]  # [B,T,H]: the prefix position is never pooled nor a target
        with self._fp32(hidden.device):
            pooled = self.pool(hidden, mask)  # [B,H] fp32
            sent_logits = self.sentiment_head(pooled)  # [B,2] fp32
            own_engram = self.compressor(pooled) if self.uses_engram else None  # [B,e] fp32

        sent_loss = F.cross_entropy(sent_logits, labels) if labels is not None else None
        lm_loss = lm_sum = None
        n_lm = 0
        if self.uses_lm:
            where, targets = lm_targets(input_ids, mask)  # [B,T-1], [N]
            n_lm = int(targets.numel())
            if self.spec.lm_all_positions:
                logits = self.backbone.lm_head_module()(hidden[:, :-1])  # [B,T-1,V]
                ce = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")  # [B,T-1]
                lm_sum = (ce * where).sum()
            else:
                rows = hidden[:, :-1][where]  # [N,H] only positions with a real next token
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
                     lm_weight=lm_weight, lm_all_positions=cfg.impl == "padded")
    return EngramModel(backbone, spec, small_sentiment_head(cfg.d_model))

