"""preftune's scoring equals each architecture's own logits, and shared-prompt rows are offered only
where they give the plain rows' numbers.

Every architecture is a tiny random model (2 layers, hidden 32, vocabulary 128). The reference is the
model's own forward: ``log_softmax(model(...).logits)`` gathered at the completion tokens.
"""

from __future__ import annotations

import pytest
import torch

from preftune.data.collate import collate_sequences, collate_shared_prompt_pairs
from preftune.scoring import backbone_and_head, score_batch
from preftune.scoring_probe import probe_scoring, shared_prompt_support

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# model_type -> (extra config, whether shared-prompt rows are exact for it)
ARCHITECTURES = {
    "llama": ({}, True),
    "qwen2": ({}, True),
    "qwen3": ({"head_dim": 8}, True),
    "mistral": ({"sliding_window": None}, True),
    "gemma": ({"head_dim": 8}, True),
    "gemma2": ({"head_dim": 8, "final_logit_softcapping": 3.0, "sliding_window": 64}, True),
    "gemma3_text": ({"head_dim": 8, "final_logit_softcapping": 3.0, "sliding_window": 64}, True),
    "phi": ({}, True),
    "phi3": ({}, True),
    "olmo2": ({}, True),
    "gpt2": ({"n_positions": 128}, True),
    "gpt_neox": ({}, True),
    "falcon": ({"new_decoder_architecture": True, "num_kv_heads": 2}, True),
    "stablelm": ({}, True),
    "exaone4": (
        {"head_dim": 8, "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]},
        True,
    ),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}, True),
    "qwen2_moe": (
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
        True,
    ),
    # output scalings the chunked head must apply
    "cohere": ({"logit_scale": 0.25}, True),
    "granite": ({"logits_scaling": 8.0}, True),
    "falcon_h1": (
        {
            "lm_head_multiplier": 0.5,
            "mamba_d_ssm": 32,
            "mamba_n_heads": 4,
            "mamba_d_head": 8,
            "mamba_n_groups": 1,
            "mamba_d_state": 8,
            "mamba_d_conv": 4,
            "head_dim": 8,
        },
        False,
    ),
    # ALiBi: attention biases that depend on the distance, which the shared-prompt row changes
    "mpt": ({"d_model": 32, "n_heads": 4, "n_layers": 2, "expansion_ratio": 2, "max_seq_len": 128}, False),
    "bloom": ({"n_head": 4, "n_layer": 2}, False),
    "falcon-alibi": ({"alibi": True, "new_decoder_architecture": False, "multi_query": True}, False),
    # state-space hybrids: the recurrent state crosses any custom mask
    "jamba": (
        {
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "expert_layer_period": 2,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "mamba_d_state": 8,
            "mamba_dt_rank": 4,
            "use_mamba_kernels": False,
        },
        False,
    ),
    "bamba": (
        {
            "mamba_n_heads": 4,
            "mamba_d_head": 16,
            "mamba_n_groups": 1,
            "mamba_d_state": 8,
            "attn_layer_indices": [1],
        },
        False,
    ),
    "zamba2": (
        {
            "mamba_d_state": 8,
            "mamba_headdim": 8,
            "n_mamba_heads": 8,
            "num_mem_blocks": 1,
            "layers_block_type": ["linear_attention", "hybrid"],
            "use_mem_rope": True,
        },
        False,
    ),
    "lfm2": ({"layer_types": ["conv", "full_attention"], "block_ff_dim": 64}, False),
    "qwen3_next": (
        {
            "layer_types": ["linear_attention", "full_attention"],
            "head_dim": 8,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 2,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
        },
        False,
    ),
}


def build(name: str, **overrides):
    """A tiny random ``name`` (COMMON and its ARCHITECTURES entry; ``overrides`` on top)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = name.split("-")[0]
    extra, _ = ARCHITECTURES[name]
    torch.manual_seed(0)
    try:
        config = AutoConfig.for_model(model_type, **{**COMMON, **extra, **overrides})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as error:  # noqa: BLE001 - the reason is reported in the skip
        pytest.skip(f"transformers cannot build a tiny {name}: {type(error).__name__}: {error}")
    return model.eval()


def pairs(seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = [(4, 5, 3), (6, 2, 4), (3, 4, 6), (5, 3, 2)]
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [ids(p) for p, _, _ in lengths], [ids(c) for _, c, _ in lengths], [ids(r) for _, _, r in lengths]


def own_logps(model, batch) -> torch.Tensor:
    """The model's own answer: full-vocabulary logits, log_softmax, gathered at completion tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@torch.no_grad()
def test_scoring_equals_the_models_own_logits_and_shares_prompts_only_where_exact(name):
    model = build(name)
    backbone_and_head(model)  # a causal LM preftune can split
    prompts, chosen, rejected = pairs()
    plain = collate_sequences(prompts * 2, chosen + rejected, pad_token_id=0)
    want = own_logps(model, plain)

    probe = probe_scoring(model)
    got = score_batch(model, **plain).logps  # as the probe decided
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # every architecture listed has a chunked head that preftune knows how to finish exactly
    assert probe.fused_exact, probe
    torch.testing.assert_close(score_batch(model, **plain, exact=False).logps, want, atol=1e-4, rtol=1e-5)

    exact_expected = ARCHITECTURES[name][1]
    why_not = shared_prompt_support(model, max_length=32)
    assert (why_not is None) == exact_expected, why_not
    if why_not is None:
        shared = score_batch(model, **collate_shared_prompt_pairs(prompts, chosen, rejected, 0)).logps
        torch.testing.assert_close(shared, want, atol=1e-4, rtol=1e-5)
    else:
        assert probe.architecture in why_not


def test_an_unknown_output_scaling_falls_back_to_the_models_own_logits(caplog):
    """A head whose forward scales logits in a way preftune does not know: the probe notices, warns in
    one line, and scoring uses the model's logits, so the numbers are still the model's."""
    model = build("llama")

    class Scaled(type(model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model.__class__ = Scaled
    prompts, chosen, rejected = pairs()
    plain = collate_sequences(prompts * 2, chosen + rejected, pad_token_id=0)
    with torch.no_grad():
        want = own_logps(model, plain)
        with caplog.at_level("WARNING"):
            probe = probe_scoring(model)
        assert not probe.fused_exact
        assert len(caplog.records) == 1 and "Scaled" in caplog.text and "own logits" in caplog.text
        torch.testing.assert_close(score_batch(model, **plain).logps, want, atol=1e-4, rtol=1e-5)
    # and gradients flow through the exact path
    model.train()
    score_batch(model, **plain).logps.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
