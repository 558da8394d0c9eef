"""amzft.training.flops against torch's own count: one training step (amzft's loss, forward +
backward) of a tiny random Llama with LoRA, built as ``fit`` builds it (LoraCausalLM), run under
``torch.utils.flop_counter.FlopCounterMode``, must come within 10 % of the count from the shapes.

SDPA runs its math path here: FlopCounterMode has no formula for the CPU's fused attention
kernel (it would count attention as 0), and the math path's matrix products are what the count
stands for (the full L x L square, module doc of amzft.training.flops)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from amzft.data.collate import Collator
from amzft.model.module import LoraCausalLM
from amzft.model.settings import DEFAULT_TARGETS, LoraOptions
from amzft.training.flops import ModelShape, StepFlops, StepTokens, step_flops
from amzft.training.throughput import row_lengths

VOCAB, RANK, PROMPT = 256, 8, 12
LENGTHS = (20, 27, 33, 40)  # a padded batch of several real lengths
TOLERANCE = 0.10
# small: attention, the LoRA factors and the head are each a sizeable share of the step;
# large: the frozen projections dominate, as in a real model.
SHAPES = {
    "small": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "large": dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2),
}


def word_tokenizer():
    """A tokenizer of VOCAB words: build_hf loads one from the model folder, the batches below
    never use it (they hold random ids); the Llama-3.2 one would take seconds to save and load."""
    words = Tokenizer(WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", pad_token="w0", eos_token="w1")


@pytest.fixture(scope="module")
def lora_module(tmp_path_factory):
    """``lora_module(shape, targets)``: a LoraCausalLM (rank RANK) built as ``fit`` builds it, on
    a random 2-layer Llama of ``SHAPES[shape]`` with a VOCAB-word vocabulary; built once each."""
    dirs, built = {}, {}

    def get(shape: str, targets=tuple(DEFAULT_TARGETS)) -> LoraCausalLM:
        if shape not in dirs:
            dirs[shape] = tmp_path_factory.mktemp(f"flops-{shape}")
            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=512, **SHAPES[shape])
            LlamaForCausalLM(config).save_pretrained(dirs[shape])
            word_tokenizer().save_pretrained(dirs[shape])
        if (shape, tuple(targets)) not in built:
            module = LoraCausalLM(name_or_path=str(dirs[shape]), lora=LoraOptions(r=RANK, target_modules=list(targets)))
            module.configure_model()
            built[shape, tuple(targets)] = module
        return built[shape, tuple(targets)]

    return get


def collated(lengths, rows=None, share_prefix=False) -> dict:
    """The real collator's batch of random examples of ``lengths`` (prompts of PROMPT tokens,
    all starting with the same 6 tokens); ``rows``: examples per packed row."""
    generator = torch.Generator().manual_seed(0)
    preamble = list(range(1, 7))
    seqs = [preamble + torch.randint(0, VOCAB, (n - len(preamble),), generator=generator).tolist() for n in lengths]
    return Collator(pad_id=0, share_prefix=share_prefix)({"input_ids": seqs, "prompt_len": [PROMPT] * len(seqs), "rows": rows})


def counted(module, batch) -> dict[str, int]:
    """FlopCounterMode's count of one training step on ``batch``, per operator and in all."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_sum, n = module.token_loss_sum(batch)
        (loss_sum / n).backward()
    module.model.zero_grad()
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    return {"total": counter.get_total_flops(), "mm": by_op.get("aten.mm", 0), "bmm": by_op.get("aten.bmm", 0)}


def predicted(module, lengths, head_tokens) -> StepFlops:
    shape = ModelShape.of(module.model.get_base_model().config)
    return step_flops(shape, RANK, module.lora.target_modules, StepTokens.of_rows(lengths, head_tokens))


def off_by(count: int, reference: int) -> float:
    return abs(count / reference - 1)


def agrees(flops: StepFlops, measured: dict[str, int]) -> None:
    """In all, and split as FlopCounterMode splits it: attention's products are aten.bmm (with
    RoPE's tiny one), everything else aten.mm."""
    attention = flops.attention_forward + flops.attention_backward
    assert off_by(flops.total, measured["total"]) < TOLERANCE, (flops, measured)
    assert off_by(attention, measured["bmm"]) < TOLERANCE, (flops, measured)
    assert off_by(flops.total - attention, measured["mm"]) < TOLERANCE, (flops, measured)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_padded_batch_costs_what_flop_counter_mode_counts(lora_module, shape):
    """SDPA and every projection run over the padded width: counted at it, the count agrees.
    Without its backward terms it would be off by far more than the tolerance (the check can fail)."""
    module = lora_module(shape)
    batch = collated(LENGTHS)
    measured = counted(module, batch)
    width = batch["input_ids"].shape[1]
    flops = predicted(module, [width] * len(LENGTHS), int(batch["label_tokens"]))
    agrees(flops, measured)
    assert off_by(flops.total - flops.backward, measured["total"]) > TOLERANCE
    assert off_by(flops.total - flops.head_backward - flops.base_backward, measured["total"]) > TOLERANCE


def test_real_lengths_count_each_row_as_if_alone(lora_module):
    """Counted at the rows' real lengths, the step costs what its rows cost one by one without
    padding: the work a padding-free step does (what the benchmark's utilisation credits); the
    padded batch's work is more (attention's squares and the projections over the pads)."""
    module = lora_module("small")
    batches = [collated([n]) for n in LENGTHS]
    alone = [counted(module, b) for b in batches]
    measured = {k: sum(c[k] for c in alone) for k in ("total", "mm", "bmm")}
    flops = predicted(module, LENGTHS, sum(int(b["label_tokens"]) for b in batches))
    agrees(flops, measured)
    padded = collated(LENGTHS)
    assert row_lengths(padded) == list(LENGTHS)
    assert counted(module, padded)["total"] > 1.2 * flops.total


@pytest.mark.parametrize("targets", [("q_proj",), ("v_proj", "down_proj"), ("gate_proj",)])
def test_adapters_on_some_projections(lora_module, targets):
    """Backward starts at the first adapter: layer 0's products before it get no gradient."""
    module = lora_module("small", targets)
    batch = collated(LENGTHS)
    flops = predicted(module, [batch["input_ids"].shape[1]] * len(LENGTHS), int(batch["label_tokens"]))
    agrees(flops, counted(module, batch))


def test_a_shared_preamble_is_counted_once(lora_module):
    """A packed row with data.batches.share_prefix holds the preamble once: its length, as
    row_lengths reads it, is what the row computes."""
    module = lora_module("small")
    batch = collated([30, 34, 26], rows=[3], share_prefix=True)
    lengths = row_lengths(batch)
    assert lengths == [int(batch["input_tokens"])] and lengths[0] < int(batch["real_tokens"])
    agrees(predicted(module, lengths, int(batch["label_tokens"])), counted(module, batch))


@pytest.mark.parametrize("layout", ["plain", "packed", "packed+share"])
def test_row_lengths_add_up_to_the_processed_tokens(layout):
    """Per row, the positions computed; in all, the batch's input_tokens (padding excluded)."""
    rows = None if layout == "plain" else [2, 3]
    batch = collated([20, 38, 25, 31, 22], rows=rows, share_prefix=layout.endswith("share"))
    lengths = row_lengths(batch)
    assert len(lengths) == batch["input_ids"].shape[0] and sum(lengths) == int(batch["input_tokens"])
    assert min(lengths) < batch["input_ids"].shape[1]  # some row is padded: its pads are not counted


def test_unknown_targets_are_refused():
    shape = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=VOCAB)
    with pytest.raises(ValueError, match="LoRA targets"):
        step_flops(shape, RANK, ["lm_head"], StepTokens.of_rows([10], 5))
    with pytest.raises(ValueError, match="LoRA targets"):
        step_flops(shape, RANK, [], StepTokens.of_rows([10], 5))
