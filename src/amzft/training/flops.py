"""The FLOPs of one LoRA training step, counted from the model's shapes (2 per multiply-add), for
benchmarks to divide by a step's time. Matmuls only: element-wise work, the optimizer and
recomputation are not counted. tests/test_flops.py checks it against torch's FlopCounterMode."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

# A decoder layer's projections in order of computation.
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")
PROJECTIONS = (*ATTENTION_INPUTS, "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a Llama-family decoder that its FLOPs depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> ModelShape:
        """From a transformers config (``LlamaConfig`` and its kin)."""
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
                   heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab=config.vocab_size)

    def projections(self) -> dict[str, tuple[int, int]]:
        """Each projection's (in, out) features."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass(frozen=True)
class StepTokens:
    """What a step computes on: positions (T), Σ of squared row lengths (S), LM-head positions (H)."""

    tokens: int
    squares: int
    head_tokens: int

    @classmethod
    def of_rows(cls, lengths: Iterable[int], head_tokens: int) -> StepTokens:
        """``lengths``: the positions each row computes (padding excluded)."""
        lengths = [int(n) for n in lengths]
        return cls(sum(lengths), sum(n * n for n in lengths), int(head_tokens))

    def __add__(self, other: StepTokens) -> StepTokens:
        return StepTokens(self.tokens + other.tokens, self.squares + other.squares, self.head_tokens + other.head_tokens)


@dataclass(frozen=True)
class StepFlops:
    """A step's FLOPs by part (``step_flops``); ``total`` is their sum."""

    base_forward: int
    base_backward: int
    lora_forward: int
    lora_backward: int
    attention_forward: int
    attention_backward: int
    head_forward: int
    head_backward: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    @property
    def backward(self) -> int:
        return sum(n for part, n in asdict(self).items() if part.endswith("_backward"))


def first_layer_gradients(targets: frozenset[str]) -> tuple[frozenset[str], int]:
    """Layer 0's projections whose input needs a gradient (an adapter lies upstream: the frozen
    embeddings need none), and how many of attention's backward products (dV, dP, dQ, dK) run there."""
    q, k, v = (name in targets for name in ATTENTION_INPUTS)
    attention_products = v + (q or k) + q + k  # dP feeds dQ and dK
    attended = q or k or v  # the attention's output depends on an adapter
    stream = attended or "o_proj" in targets  # the residual stream after attention
    gated = stream or "gate_proj" in targets or "up_proj" in targets  # down's input
    needs = {"o_proj": attended, "gate_proj": stream, "up_proj": stream, "down_proj": gated}
    return frozenset(name for name, needed in needs.items() if needed), attention_products


def step_flops(shape: ModelShape, r: int, targets: Sequence[str], work: StepTokens) -> StepFlops:
    """The FLOPs of a training step of ``shape`` with rank-``r`` LoRA on ``targets`` over ``work``.

    Per position, each projection (in -> out) costs 2·in·out forward and again backward (input
    gradient only: frozen weights get none); LoRA 2·r·(in + out) forward, twice that backward.
    Attention's QK^T and AV cost 2·S·head_dim·heads each (the full L x L square, as SDPA's math
    path computes), backward twice that; the head 2·hidden·vocab·H each way. In layer 0 only the
    gradients an adapter needs are counted (``first_layer_gradients``)."""
    projections = shape.projections()
    targets = frozenset(targets)
    if not targets or not targets <= projections.keys():
        raise ValueError(f"LoRA targets must be among {PROJECTIONS} (at least one), found {sorted(targets)}")
    first_needs, first_attention = first_layer_gradients(targets)
    t, layers, rest = work.tokens, shape.layers, shape.layers - 1

    def products(names, per) -> int:  # FLOPs per position of one layer's ``names``, each costing per(in, out)
        return sum(per(*projections[name]) for name in names)

    base = products(PROJECTIONS, lambda i, o: 2 * i * o)
    lora = products(targets, lambda i, o: 2 * r * (i + o))
    # LoRA backward in layer 0: weight gradients of A and B, B's input gradient, A's where needed.
    first_lora = products(targets, lambda i, o: 2 * r * (i + 2 * o)) + products(targets & first_needs, lambda i, o: 2 * r * i)
    square = 2 * work.squares * shape.head_dim * shape.heads  # one of attention's L x L products, one layer
    head = 2 * shape.hidden * shape.vocab * work.head_tokens
    return StepFlops(
        base_forward=base * t * layers,
        base_backward=(products(first_needs, lambda i, o: 2 * i * o) + base * rest) * t,
        lora_forward=lora * t * layers,
        lora_backward=(first_lora + 2 * lora * rest) * t,
        attention_forward=2 * square * layers,
        attention_backward=(first_attention + 4 * rest) * square,
        head_forward=head,
        head_backward=head,
    )
