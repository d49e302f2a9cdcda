"""What the benchmark runs: configurations, models, synthetic data, and the FLOP count for MFU.

Both frameworks build their model and data from the same ``Workload`` in their own process, so
they start from identical weights (same seed, same constructor) and train on identical token ids.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch

SMOLLM2 = "smollm2-135m-instruct"

# Dense bf16 peak of the accelerators we know, for MFU (FLOP/s, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "GH200": 989e12}


@dataclass
class Workload:
    name: str
    title: str
    model: str = "tiny"  # "tiny" (random Llama, shape below) or a preftune preset name
    vocab: int = 50257
    hidden: int = 32
    layers: int = 2
    heads: int = 4
    kv_heads: int | None = None
    intermediate: int = 64
    lora: bool = False
    batch: int = 8  # preference pairs per step (2 × batch sequences per forward)
    prompt_len: int = 64
    completion_len: int = 192
    precision: str = "fp32"  # fp32, or bf16 autocast with fp32 master weights (as preftune's trainer)
    device: str = "cpu"
    steps: int = 4  # timed steps per process (after warm-up)
    warmup: int = 1
    rounds: int = 2  # processes per framework, interleaved with the others'
    references: int = 1  # MRPO: number of references
    frameworks: tuple[str, ...] = ("preftune", "trl")
    learning_rate: float = 1e-5
    beta: float = 0.1
    gradient_checkpointing: bool = False
    data: str = "synthetic"  # or "arithmetic": the bundled pairs in the preset's chat template
    needs_gpu: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def seq(self) -> int:
        return self.prompt_len + self.completion_len

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Workload:
        d = dict(d)
        d["frameworks"] = tuple(d["frameworks"])
        return cls(**d)


CONFIGS: dict[str, Workload] = {
    "1": Workload(
        "1",
        "tiny random Llama, vocab 50,257, seq 256, batch 8, CPU fp32",
        frameworks=("preftune", "trl", "sft-hf", "sft-preftune"),
        steps=4,
        rounds=2,
    ),
    "2a": Workload(
        "2a",
        "SmolLM2-135M full fine-tune, seq 256, batch 4, CPU fp32",
        model=SMOLLM2,
        batch=4,
        frameworks=("preftune", "trl", "sft-hf"),
        steps=3,
        rounds=1,
    ),
    "2b": Workload(
        "2b",
        "SmolLM2-135M LoRA r=16 (all linear), seq 256, batch 4, CPU fp32",
        model=SMOLLM2,
        lora=True,
        batch=4,
        frameworks=("preftune", "trl"),
        steps=3,
        rounds=1,
    ),
    "2c": Workload(
        "2c",
        "SmolLM2-135M full fine-tune on the bundled arithmetic pairs (chat template), batch 4, CPU fp32",
        model=SMOLLM2,
        batch=4,
        data="arithmetic",
        frameworks=("preftune", "trl"),
        steps=3,
        rounds=1,
    ),
    "3": Workload(
        "3",
        "MRPO K=3 precomputed references vs DPO (config 1's model and data; steps alternate in one process)",
        references=3,
        frameworks=("preftune-alternate",),
        steps=6,
        rounds=1,
    ),
    "4a": Workload(
        "4a",
        "random Llama ~1.2B (16 layers, hidden 2048, vocab 128,256), seq 1024, batch 8, GPU bf16",
        vocab=128256,
        hidden=2048,
        layers=16,
        heads=32,
        kv_heads=8,
        intermediate=8192,
        prompt_len=256,
        completion_len=768,
        precision="bf16",
        device="cuda",
        needs_gpu=True,
        frameworks=("preftune", "trl", "sft-hf"),
        steps=5,
        warmup=2,
        rounds=1,
        learning_rate=1e-6,
    ),
}
CONFIGS["4b"] = replace(
    CONFIGS["4a"],
    name="4b",
    title="random Llama ~1.2B (16 layers, hidden 2048, vocab 128,256), seq 2048, batch 8, GPU bf16",
    prompt_len=512,
    completion_len=1536,
)


def quick(w: Workload) -> Workload:
    """The same code path at toy sizes (tests; GPU configurations then run on the CPU)."""
    small = dict(
        vocab=1000,
        hidden=32,
        layers=2,
        heads=4,
        kv_heads=2 if w.kv_heads else None,
        intermediate=64,
        batch=2,
        prompt_len=8,
        completion_len=24,
        steps=2,
        warmup=1,
        rounds=1,
        device="cpu",
    )
    if w.model != "tiny":  # the preset's code path (LoRA, tied head) on a tiny stand-in
        small["model"] = "tiny"
        small["extra"] = {"tie_word_embeddings": True}
    return replace(w, **small)


# --------------------------------------------------------------------------------------------------
# Models


def build_model(w: Workload, seed_offset: int = 0):
    """The policy (seed_offset 0) or a distinct reference model (seed_offset k), on w.device, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(w.device)
    if w.model != "tiny":
        from preftune.models import load_causal_lm, resolve_model

        model, _ = load_causal_lm(str(resolve_model(w.model)), dtype=torch.float32, device=device)
        if seed_offset:  # a distinct reference: same architecture, perturbed weights
            g = torch.Generator(device="cpu").manual_seed(w.seed + seed_offset)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.02 * p.float().std().item())
        return model
    config = LlamaConfig(
        vocab_size=w.vocab,
        hidden_size=w.hidden,
        intermediate_size=w.intermediate,
        num_hidden_layers=w.layers,
        num_attention_heads=w.heads,
        num_key_value_heads=w.kv_heads or w.heads,
        max_position_embeddings=max(2048, w.seq),
        tie_word_embeddings=bool(w.extra.get("tie_word_embeddings", False)),
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(w.seed + seed_offset)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(w.seed + seed_offset)
    with device:
        model = LlamaForCausalLM(config)
    return model


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )


def apply_lora(w: Workload, model):
    from peft import get_peft_model

    torch.manual_seed(w.seed + 1000)  # same adapter initialisation on both sides
    return get_peft_model(model, lora_config())


def model_vocab(w: Workload) -> int:
    if w.model == "tiny":
        return w.vocab
    import json

    from preftune.models import resolve_model

    return json.loads((resolve_model(w.model) / "config.json").read_text())["vocab_size"]


# --------------------------------------------------------------------------------------------------
# Data


def total_steps(w: Workload) -> int:
    return w.warmup + w.steps


def synthetic_pairs(w: Workload, vocab: int) -> list[tuple[list[int], list[int], list[int]]]:
    """One fresh batch per step: (prompt, chosen, rejected) token ids.

    Synthetic data has fixed lengths. Ids 0-2 are pad/bos/eos; every completion ends with eos (2),
    so TRL appends nothing. ``w.data == "arithmetic"`` takes the bundled training pairs instead.
    """
    if w.data == "arithmetic":
        return arithmetic_pairs(w.model, w.batch * total_steps(w))
    g = torch.Generator().manual_seed(w.seed + 7)
    rows = []
    for _ in range(w.batch * total_steps(w)):
        prompt = torch.randint(3, vocab, (w.prompt_len,), generator=g).tolist()
        chosen = torch.randint(3, vocab, (w.completion_len - 1,), generator=g).tolist() + [2]
        rejected = torch.randint(3, vocab, (w.completion_len - 1,), generator=g).tolist() + [2]
        rows.append((prompt, chosen, rejected))
    return rows


def arithmetic_pairs(model: str, n: int) -> list[tuple[list[int], list[int], list[int]]]:
    """The first n bundled arithmetic pairs as the preset's trainer sees them (its chat template).

    Real prompts and completions: variable lengths, the prompt about three quarters of each
    sequence. SmolLM2's <|im_end|> is id 2 like the word tokenizer's eos; each completion gets it last
    if the template left a newline after it, so TRL appends nothing and both sides score the same
    tokens.
    """
    from transformers import AutoTokenizer

    from preftune.data.arithmetic import arithmetic_path
    from preftune.data.loading import load_examples
    from preftune.data.tokenize import tokenize_dataset
    from preftune.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    loaded = load_examples(str(arithmetic_path("train")), max_rows=n)
    tokenized, _ = tokenize_dataset(loaded, tokenizer, max_length=None, progress=False)
    return [
        (t.prompt_ids, *(ids if ids[-1] == 2 else [*ids, 2] for ids in (t.chosen_ids, t.rejected_ids)))
        for t in tokenized
    ]


SPECIAL_WORDS = ("<pad>", "<s>", "</s>")


def _word(i: int) -> str:
    return SPECIAL_WORDS[i] if i < len(SPECIAL_WORDS) else f"w{i}"


def word_tokenizer(vocab: int):
    """A word-level tokenizer where the text "w17" is token 17: lets TRL tokenize our exact ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({_word(i): i for i in range(vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def as_text(ids: list[int], leading_space: bool) -> str:
    return (" " if leading_space else "") + " ".join(_word(i) for i in ids)


# --------------------------------------------------------------------------------------------------
# FLOPs (for MFU)


def flops_per_step(w: Workload, n_params_body: int, hidden: int, layers: int, vocab: int) -> float:
    """Model FLOPs of one preference step (forward + backward, 2·B sequences).

    6·N per token for the transformer body (all linear layers but the output head), causal attention
    6·L·S·d per token (half of the 12·L·S·d of full attention), and the output head 6·d·V only at the
    positions whose next token is a completion token: the work the step needs, which both frameworks
    count the same way (a framework that projects every position does more than this).
    """
    tokens = 2 * w.batch * w.seq
    predicted = 2 * w.batch * w.completion_len
    body = 6 * n_params_body * tokens
    attention = 6 * layers * w.seq * hidden * tokens
    head = 6 * hidden * vocab * predicted
    return float(body + attention + head)


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def describe_params(model) -> tuple[int, int]:
    """(all parameters, parameters of the body: everything but embeddings and the output head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    total = sum(p.numel() for p in base.parameters())
    emb = base.get_input_embeddings().weight
    head = base.get_output_embeddings().weight
    excluded = emb.numel() + (0 if head is emb else head.numel())
    return total, total - excluded


def fmt_bytes(mb: float | None) -> str:
    if mb is None or (isinstance(mb, float) and math.isnan(mb)):
        return "-"
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"
