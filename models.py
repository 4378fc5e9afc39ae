"""Network modules of the study: backbones, heads, engram modules and the model that composes them.

A backbone is anything with this interface (`small_transformer.SmallBackbone`, or `HFBackbone`
below around a Hugging Face causal LM):

    hidden_size: int
    embed(input_ids [B,T]) -> [B,T,H]                      token embeddings, no positions
    forward(embeds [B,T,H], mask [B,T], inject=None) -> [B,T,H]   last-layer hidden states (right padding);
                                                           inject(h, batch_index) joins the engram to
                                                           every position's input (small backbone only)
    lm_head_module() -> nn.Linear                         the next-token head (H -> V)

`EngramModel` puts the heads of one variant on a backbone and returns what it computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nets.losses import LinearCrossEntropy, lm_loss_sum, lm_targets  # noqa: F401  (re-exported)
from nets.small_transformer import SmallBackbone, SmallConfig  # noqa: F401  (re-exported)

PREFIXES = ("none", "engram", "learned")


@dataclass(frozen=True)
class Variant:
    """One variant of the study, as data: the model, the training loop, the analyses and the
    reports read these fields, never the variant's name (a new variant is one more entry).

    prefix: "none"; "engram": the compressed pooled state of the previous input, fed back as a
    prefix (the sequential-pair step of engram.run_batch); "learned": one learned vector in the
    engram's place on every input, with nothing fed back (the control for the engram's feedback)."""

    name: str
    lm_head: bool  # the next-token head and its loss beside the sentiment loss
    prefix: str
    label: str  # how reports and figures name it
    colour: str  # its line in the figures

    def __post_init__(self):
        if self.prefix not in PREFIXES:
            raise ValueError(f"unknown prefix {self.prefix!r}; choose from {PREFIXES}")

    @property
    def engram(self) -> bool:
        """It computes an engram (and so has one to feed back, analyse and plot)."""
        return self.prefix == "engram"


# the study's three models, in the study's order (Model 1, 2, 3): tables and grids keep this order;
# iterating VARIANTS gives the names
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("sentiment_only", lm_head=False, prefix="none", label="Model 1: Sentiment Only", colour="tab:blue"),
        Variant("dual_head", lm_head=True, prefix="none", label="Model 2: Dual Head", colour="tab:orange"),
        Variant("dual_engram", lm_head=True, prefix="engram", label="Model 3: Dual + Engram", colour="tab:green"),
    )
}


def variant_entry(name: str) -> Variant:
    """The table's entry for a variant name, with the names there are when there is none."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose from {tuple(VARIANTS)}") from None


def engram_variant(names) -> str | None:
    """Of the variants `names` holds, the first in the table's order whose entry computes an engram:
    the one the engram analyses, figures and report sections describe (the study's Model 3). None
    when none does; names the table does not know are skipped."""
    return next((v for v, entry in VARIANTS.items() if entry.engram and v in names), None)


# ----------------------------------------------------------------------------- Hugging Face backbone


class HFBackbone(nn.Module):
    """A (possibly PEFT-wrapped, possibly 4-bit) Hugging Face causal LM seen through the backbone
    interface. It runs the decoder stack only, so full-vocabulary logits are never computed for
    positions that are not LM targets."""

    def __init__(self, causal_lm: nn.Module, input_dtype: torch.dtype | None = None):
        """input_dtype: the dtype the decoder's input embeddings are cast to (the autocast dtype
        when the decoder runs under autocast); None leaves them in the embedding's own dtype."""
        super().__init__()
        self.lm = causal_lm
        base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
        self._decoder = base.get_decoder()
        self._lm_head = base.get_output_embeddings()
        self.hidden_size = base.config.hidden_size
        self.input_dtype = input_dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._decoder.get_input_embeddings()(input_ids)  # [B,T,H]

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, inject=None) -> torch.Tensor:
        if inject is not None:
            raise ValueError("a Hugging Face backbone takes its engram as a prefix, not by concatenation")
        if self.input_dtype is not None:
            embeds = embeds.to(self.input_dtype)  # [B,T,H]
        out = self._decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
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


class LearnedPrefix(nn.Module):
    """One learned vector (H) as the prefix embedding of every input: the engram's place, with no
    engram in it. Initialised as EngramProjector's bias is (uniform ±1/sqrt(e)), so it starts from
    the distribution Model 3's zero-engram prefix starts from."""

    def __init__(self, hidden: int, engram_dim: int):
        super().__init__()
        bound = 1.0 / engram_dim**0.5
        self.vector = nn.Parameter(torch.empty(hidden).uniform_(-bound, bound))  # [H]

    def forward(self, batch: int) -> torch.Tensor:
        return self.vector.expand(batch, -1)  # [B,H]


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
    engram: torch.Tensor | None  # [B,e] this input's engram (variants with an engram only)
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
      - prefix "engram" (Model 3): the prefix is projector(engram) (projector(0) when engram is None),
        prepended to the token embeddings with a 1 in the mask (or, with injection "concat", the
        engram is joined to every position's input); the model also returns this input's own engram.
      - prefix "learned": the prefix is one learned vector, the same for every input (always a
        prefix position: the injection setting is the engram's); it takes no engram.
      - loss = CE(sentiment) without an LM head, lm_weight*LM + sent_weight*CE(sentiment) with one.
      - the pooled state, the sentiment head, the compressor and the projector compute in fp32 with
        autocast off, whatever the backbone's dtype: their outputs are fp32 on every device.
    """

    def __init__(self, backbone: nn.Module, spec: ModelSpec, sentiment_head: nn.Module):
        super().__init__()
        entry = variant_entry(spec.variant)
        if spec.pooling not in ("mean", "last"):
            raise ValueError(f"unknown pooling {spec.pooling!r}")
        if spec.injection not in ("prefix", "concat"):
            raise ValueError(f"unknown engram injection {spec.injection!r}")
        self.spec = spec
        self.backbone = backbone
        self.sentiment_head = sentiment_head
        self.uses_lm = entry.lm_head
        self.uses_engram = entry.engram
        H = backbone.hidden_size
        self.compressor = EngramCompressor(H, spec.engram_dim) if self.uses_engram else None
        injector = EngramProjector if spec.injection == "prefix" else ConcatInjector
        self.projector = injector(spec.engram_dim, H) if self.uses_engram else None
        # registered only where the entry asks for it: the other variants' parameters (and their
        # saved weights' names) are those they always had
        self.learned_prefix = LearnedPrefix(H, spec.engram_dim) if entry.prefix == "learned" else None
        self.prefixed = (self.uses_engram and spec.injection == "prefix") or self.learned_prefix is not None

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
        elif engram is not None and not self.uses_engram:
            raise ValueError(f"{self.variant} takes no engram")
        elif self.prefixed:
            with self._fp32(embeds.device):
                # [B,H] fp32: this input's engram projected, or the one learned vector
                prefix = self.projector(engram.float()) if self.uses_engram else self.learned_prefix(B)
            prefix = prefix.to(embeds.dtype).unsqueeze(1)  # [B,1,H] in the backbone's dtype
            embeds = torch.cat([prefix, embeds], 1)  # [B,1+T,H]
            mask_in = torch.cat([mask.new_ones(B, 1), mask], 1)  # [B,1+T]
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


def free_memory(device: torch.device) -> None:
    """Give a finished (or failed) model's memory back before the next one is built: 4-bit layers
    hold their weights in a reference cycle (each Linear4bit and its Params4bit point at each
    other) that only the cycle collector frees, so empty_cache alone would keep the previous
    variant's base model; then the caching allocator's unused blocks go back to the GPU."""
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def build_small_model(variant: str, cfg: SmallConfig, sent_weight: float = 0.5, lm_weight: float = 0.5) -> EngramModel:
    backbone = SmallBackbone(cfg, with_lm_head=variant_entry(variant).lm_head)
    spec = ModelSpec(
        variant=variant,
        pooling="mean",
        engram_dim=cfg.engram_dim,
        sent_weight=sent_weight,
        lm_weight=lm_weight,
        lm_all_positions=cfg.impl == "padded",
        injection=cfg.engram_injection,
    )
    head = (
        small_sentiment_head(cfg.d_model)
        if cfg.head == "linear"
        else mlp_sentiment_head(cfg.d_model, cfg.head_width, cfg.dropout)
    )
    return EngramModel(backbone, spec, head)
