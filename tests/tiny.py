"""Tiny random checkpoints built with transformers itself, laid out as on the hub.

Weights are drawn with std 0.15 (norm weights around their identity) so that greedy
decoding has clear winners and every folded parameter matters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 203  # not a multiple of any chunk size the tests use
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a converted model must give the same outputs as the original",
    "precompute the first layer once for every token in the vocabulary",
    "hello world, this is a tiny tokenizer for tests",
    "rotary position embeddings enter only inside attention",
]
PROMPTS = ["the quick brown fox", "hello world", "a converted model must", "precompute the first layer of"]

_COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3,
               vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False, **_COMMON),
    "llama_tied": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
                       **_COMMON),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None,
                    **_COMMON),
    "mixtral": dict(model_type="mixtral", num_key_value_heads=2, tie_word_embeddings=False, num_local_experts=4,
                    num_experts_per_tok=2, **_COMMON),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=False, **_COMMON),
    "gemma": dict(model_type="gemma", num_key_value_heads=1, head_dim=32, tie_word_embeddings=True, **_COMMON),
    # parallel blocks and the families of issue #4
    "gpt_neox": dict(model_type="gpt_neox", use_parallel_residual=True, tie_word_embeddings=False, **_COMMON),
    "gpt_neox_serial": dict(model_type="gpt_neox", use_parallel_residual=False, tie_word_embeddings=False,
                            **_COMMON),
    "gptj": dict(model_type="gptj", rotary_dim=8, n_inner=96, tie_word_embeddings=False,
                 **{k: v for k, v in _COMMON.items() if k != "intermediate_size"}),
    "phi": dict(model_type="phi", qk_layernorm=False, tie_word_embeddings=False, **_COMMON),
    "phi_qk": dict(model_type="phi", qk_layernorm=True, num_key_value_heads=2, tie_word_embeddings=False,
                   **_COMMON),
    # Falcon-7B style: parallel, one LayerNorm, multi-query, RoPE
    "falcon": dict(model_type="falcon", parallel_attn=True, multi_query=True, new_decoder_architecture=False,
                   alibi=False, ffn_hidden_size=96, tie_word_embeddings=True,
                   **{k: v for k, v in _COMMON.items() if k != "intermediate_size"}),
    # Falcon-40B style: new decoder architecture, grouped kv heads, ln_attn + ln_mlp
    "falcon_new": dict(model_type="falcon", parallel_attn=True, new_decoder_architecture=True, num_kv_heads=2,
                       num_ln_in_parallel_attn=2, alibi=False, ffn_hidden_size=96, bias=True,
                       tie_word_embeddings=True, **{k: v for k, v in _COMMON.items() if k != "intermediate_size"}),
    # new decoder architecture with one shared LayerNorm
    "falcon_new_1ln": dict(model_type="falcon", parallel_attn=True, new_decoder_architecture=True, num_kv_heads=1,
                           num_ln_in_parallel_attn=1, alibi=False, ffn_hidden_size=96, tie_word_embeddings=True,
                           **{k: v for k, v in _COMMON.items() if k != "intermediate_size"}),
    # Falcon-RW style: serial block, ALiBi, multi-head, biases
    "falcon_alibi": dict(model_type="falcon", parallel_attn=False, multi_query=False, new_decoder_architecture=False,
                         alibi=True, bias=True, ffn_hidden_size=96, tie_word_embeddings=True,
                         **{k: v for k, v in _COMMON.items() if k != "intermediate_size"}),
    "cohere": dict(model_type="cohere", num_key_value_heads=2, use_qk_norm=True, tie_word_embeddings=True,
                   logit_scale=0.5, **_COMMON),
    # not in configs/: converted with a profile written by a test (per-head q/k RMSNorms)
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **_COMMON),
    "bloom": dict(model_type="bloom", tie_word_embeddings=True,
                  **{k: v for k, v in _COMMON.items() if k not in ("intermediate_size", "max_position_embeddings")}),
}


_SMALL = dict(_COMMON, num_hidden_layers=2)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
_MOE_SMALL = dict(_SMALL, moe_intermediate_size=32)
# Families of issue #17 (tests/test_families_profile_keys.py): 2 layers; head_dim 24 (q width 96 != hidden 64) where
# the config has the key; GQA 4/2; tied where transformers ties by default.
MORE_FAMILIES: dict[str, dict] = {
    "smollm3": dict(model_type="smollm3", num_key_value_heads=2, tie_word_embeddings=True, **_SMALL),
    "helium": dict(model_type="helium", num_key_value_heads=2, head_dim=16, attention_bias=True,  # o_proj: d x d
                   tie_word_embeddings=False, **_SMALL),
    "arcee": dict(model_type="arcee", num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, **_SMALL),
    "seed_oss": dict(model_type="seed_oss", num_key_value_heads=2, head_dim=24, attention_bias=True,
                     tie_word_embeddings=False, **_SMALL),
    "ministral": dict(model_type="ministral", num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                      **_SMALL),
    "cwm": dict(model_type="cwm", num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, **_SMALL),
    "ernie4_5": dict(model_type="ernie4_5", num_key_value_heads=2, head_dim=24, use_bias=True,
                     tie_word_embeddings=True, **_SMALL),
    "diffllama": dict(model_type="diffllama", num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                      **_SMALL),
    "glm": dict(model_type="glm", num_key_value_heads=2, head_dim=24, attention_bias=True,
                tie_word_embeddings=False, **_SMALL),
    "glm4": dict(model_type="glm4", num_key_value_heads=2, head_dim=24, attention_bias=True,
                 tie_word_embeddings=False, **_SMALL),
    "qwen3_tied": dict(model_type="qwen3", num_key_value_heads=2, head_dim=24, tie_word_embeddings=True, **_SMALL),
    "qwen3_moe": dict(model_type="qwen3_moe", num_key_value_heads=2, head_dim=24, num_experts=4,
                      tie_word_embeddings=False, **_MOE, **_SMALL),
    "qwen2_moe": dict(model_type="qwen2_moe", num_key_value_heads=2, num_experts=4, shared_expert_intermediate_size=48,
                      tie_word_embeddings=False, **_MOE, **_SMALL),
    # the forward multiplies the embedding by a multiplier that bfloat16 cannot hold exactly
    "hunyuan_v1_dense": dict(model_type="hunyuan_v1_dense", num_key_value_heads=2, head_dim=24,
                             tie_word_embeddings=False, **_SMALL),
    "dbrx": dict(model_type="dbrx", d_model=64, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=256,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                 attn_config={"kv_n_heads": 2, "clip_qkv": 1.0, "rope_theta": 10000.0},
                 ffn_config={"ffn_hidden_size": 96, "moe_num_experts": 4, "moe_top_k": 2}),
    "granite": dict(model_type="granite", num_key_value_heads=2, embedding_multiplier=1.7, residual_multiplier=0.6,
                    attention_multiplier=0.3, logits_scaling=2.0, tie_word_embeddings=False, **_SMALL),
    # tied: x is the stored row, left out of the table; the model multiplies the looked-up embedding itself
    "granite_tied": dict(model_type="granite", num_key_value_heads=1, embedding_multiplier=12.0,
                         tie_word_embeddings=True, **_SMALL),
    "granitemoe": dict(model_type="granitemoe", num_key_value_heads=2, embedding_multiplier=1.7, num_local_experts=4,
                       num_experts_per_tok=2, tie_word_embeddings=False, **_SMALL),
    "granitemoeshared": dict(model_type="granitemoeshared", num_key_value_heads=2, embedding_multiplier=1.7,
                             num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48,
                             tie_word_embeddings=False, **_SMALL),
    "apertus": dict(model_type="apertus", num_key_value_heads=2, tie_word_embeddings=False, **_SMALL),
    "gemma2": dict(model_type="gemma2", num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=24,
                   tie_word_embeddings=True, **_SMALL),
    "gemma3_text": dict(model_type="gemma3_text", num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=24,
                        tie_word_embeddings=True, **_SMALL),
    "vaultgemma": dict(model_type="vaultgemma", num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=24,
                       tie_word_embeddings=True, **_SMALL),
    "exaone4": dict(model_type="exaone4", num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, **_SMALL),
    "olmo2": dict(model_type="olmo2", num_key_value_heads=2, tie_word_embeddings=False, **_SMALL),
    "olmo3": dict(model_type="olmo3", num_key_value_heads=2, tie_word_embeddings=False, **_SMALL),
    "olmoe": dict(model_type="olmoe", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, clip_qkv=1.5,
                  tie_word_embeddings=False, **_SMALL),
    "olmo": dict(model_type="olmo", num_key_value_heads=2, clip_qkv=1.0, tie_word_embeddings=False, **_SMALL),
    "phimoe": dict(model_type="phimoe", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                   tie_word_embeddings=False, **_SMALL),
    "nemotron": dict(model_type="nemotron", num_key_value_heads=2, head_dim=24, partial_rotary_factor=0.5,
                     tie_word_embeddings=False, **_SMALL),
    "starcoder2": dict(model_type="starcoder2", num_key_value_heads=2, use_bias=True, tie_word_embeddings=True,
                       **_SMALL),
    "stablelm": dict(model_type="stablelm", num_key_value_heads=2, qk_layernorm=True, use_qkv_bias=True,
                     use_parallel_residual=False, tie_word_embeddings=False, **_SMALL),
    "stablelm_parallel": dict(model_type="stablelm", num_key_value_heads=4, qk_layernorm=False,
                              use_parallel_residual=True, tie_word_embeddings=False, **_SMALL),
    "persimmon": dict(model_type="persimmon", qk_layernorm=True, partial_rotary_factor=0.5,
                      tie_word_embeddings=False, **_SMALL),
    "cohere2": dict(model_type="cohere2", num_key_value_heads=2, head_dim=24, logit_scale=0.5,
                    tie_word_embeddings=True, **_SMALL),
    # a parallel block with a top-k MoE FFN and a shared expert, all folded into the table
    "cohere2_moe": dict(model_type="cohere2_moe", num_key_value_heads=2, head_dim=24, num_experts=4,
                        num_experts_per_tok=2, num_shared_experts=1, shared_expert_combination_strategy="average",
                        logit_scale=0.5, tie_word_embeddings=True, **dict(_SMALL, intermediate_size=32)),
    "cohere2_moe_rms_sum": dict(model_type="cohere2_moe", num_key_value_heads=1, num_experts=4,
                                num_experts_per_tok=1, num_shared_experts=2, shared_expert_combination_strategy="sum",
                                rms_norm_eps=1e-6, tie_word_embeddings=False, **dict(_SMALL, intermediate_size=32)),
    "gpt_oss": dict(model_type="gpt_oss", num_key_value_heads=2, head_dim=24, num_local_experts=4,
                    num_experts_per_tok=2, tie_word_embeddings=False, **dict(_SMALL, intermediate_size=32)),
    "flex_olmo": dict(model_type="flex_olmo", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      tie_word_embeddings=False, **dict(_SMALL, intermediate_size=32)),
    "ernie4_5_moe": dict(model_type="ernie4_5_moe", num_key_value_heads=2, use_bias=True, moe_num_experts=4,
                         moe_k=2, moe_intermediate_size=32, moe_layer_start_index=0, tie_word_embeddings=True,
                         **_SMALL),
    "exaone_moe": dict(model_type="exaone_moe", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                       mlp_layer_types=["sparse", "sparse"], tie_word_embeddings=False, **_MOE_SMALL),
    "solar_open": dict(model_type="solar_open", num_key_value_heads=2, head_dim=24, n_routed_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=32, tie_word_embeddings=False, **_SMALL),
    "jais2": dict(model_type="jais2", num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, **_SMALL),
    "glm4_moe": dict(model_type="glm4_moe", num_key_value_heads=2, use_qk_norm=True, attention_bias=True,
                     n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=0,
                     tie_word_embeddings=False, **_MOE_SMALL),
    "minimax_m2": dict(model_type="minimax_m2", num_key_value_heads=2, head_dim=24, num_local_experts=4,
                       num_experts_per_tok=2, tie_word_embeddings=False, **dict(_SMALL, intermediate_size=32)),
    "phi3": dict(model_type="phi3", num_key_value_heads=2, tie_word_embeddings=False, **_SMALL),
}
_MLA = dict(q_lora_rank=24, kv_lora_rank=20, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
            num_key_value_heads=4)  # query/key heads 20 wide (12 + 8), values 10: no width equals hidden / heads
# Layer-0 shapes of issue #17 beyond attention over q/k/v (tests/test_layer0_shapes.py): latent attention (MLA),
# state-space and short-convolution mixers.
SHAPE_FAMILIES: dict[str, dict] = {
    # layer 0 MoE (first_k_dense_replace 0); the query through q_a_proj -> q_a_layernorm -> q_b_proj
    "deepseek_v3": dict(model_type="deepseek_v3", n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                        first_k_dense_replace=0, tie_word_embeddings=False, **_MLA, **_MOE_SMALL),
    # q_proj (q_lora_rank null), dense layer 0, biases on q_a/kv_a
    "deepseek_v3_q_proj": dict(model_type="deepseek_v3", n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                               topk_group=1, first_k_dense_replace=1, attention_bias=True, tie_word_embeddings=True,
                               **dict(_MLA, q_lora_rank=None), **_MOE_SMALL),
    # every expert taken (top 4 of 4): with top 2 a bfloat16 rounding flips one token's experts in a later layer
    # (measured: one logit row 0.33 off, the rest within rounding), which says nothing about layer 0's table
    "deepseek_v2": dict(model_type="deepseek_v2", n_routed_experts=4, first_k_dense_replace=0,
                        tie_word_embeddings=False, **_MLA, **dict(_MOE_SMALL, num_experts_per_tok=4)),
    "glm4_moe_lite": dict(model_type="glm4_moe_lite", n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                          topk_group=1, mlp_layer_types=["dense", "sparse"], tie_word_embeddings=False, **_MLA,
                          **_MOE_SMALL),
    # no pad id: transformers' YoutuPreTrainedModel._init_weights zeroes the padding row at every load (through
    # .data, past the loaded-weights guard), so the loaded model would not be the stored one
    # Sarvam's MLA config, built by transformers as DeepseekV3ForCausalLM (q_proj: q_lora_rank null)
    "sarvam_mla": dict(model_type="sarvam_mla", n_routed_experts=4, num_experts_per_tok=4, n_group=1, topk_group=1,
                       first_k_dense_replace=1, tie_word_embeddings=False, **dict(_MLA, q_lora_rank=None),
                       **_MOE_SMALL),
    # two MLA sublayers per layer (the first folds), an MoE with zero experts beside them
    "longcat_flash": dict(model_type="longcat_flash", num_layers=2, hidden_size=64, num_attention_heads=4,
                          ffn_hidden_size=96, expert_ffn_hidden_size=32, n_routed_experts=4, zero_expert_num=2,
                          moe_topk=2, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, head_dim=8, tie_word_embeddings=False, **_MLA),  # head_dim: RoPE width
    "youtu": dict(model_type="youtu", tie_word_embeddings=True, **_MLA, **dict(_SMALL, pad_token_id=None)),
    "minicpm3": dict(model_type="minicpm3", scale_emb=3.3, tie_word_embeddings=True, **_MLA, **_SMALL),
    # state-space mixer: 2 layers, inner width 128 (expand 2), tied
    "mamba": dict(model_type="mamba", hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, vocab_size=VOCAB,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True),
    "mamba_untied": dict(model_type="mamba", hidden_size=48, state_size=4, num_hidden_layers=2, expand=3,
                         vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    # 48 wide, untied: the 64-wide tied model of seed 0 measured 1.35x the bfloat16 original's distance (seeds 1
    # and 2: 0.72, 0.75; this one 0.62): its scan amplifies layer 0's rounding either way, by chance
    "falcon_mamba": dict(model_type="falcon_mamba", hidden_size=48, state_size=4, num_hidden_layers=2, expand=3,
                         vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    # 8 SSM heads of 16 (the inner width 128), 2 groups: in_proj 2 * 128 + 2 * 2 * 8 + 8 = 296 wide
    "mamba2": dict(model_type="mamba2", hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, num_heads=8,
                   head_dim=16, n_groups=2, chunk_size=16, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2, tie_word_embeddings=False),
    # hybrids whose layer 0 is a Mamba(-2) mixer; attention later
    "bamba": dict(model_type="bamba", num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16,
                  mamba_n_groups=2, mamba_d_state=8, mamba_expand=2, mamba_chunk_size=16, tie_word_embeddings=False,
                  **_SMALL),
    "jamba": dict(model_type="jamba", num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                  expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=4, mamba_d_state=8,
                  mamba_expand=2, mamba_dt_rank=8, tie_word_embeddings=False, **_SMALL),
    # short convolution in layer 0 (as released LFM2 checkpoints), attention in layer 1
    "lfm2": dict(model_type="lfm2", num_key_value_heads=2, layer_types=["conv", "full_attention"],
                 tie_word_embeddings=True, **dict(_SMALL, intermediate_size=128)),
    "lfm2_attention_first": dict(model_type="lfm2", num_key_value_heads=2, layer_types=["full_attention", "conv"],
                                 block_auto_adjust_ff_dim=False, tie_word_embeddings=False, **_SMALL),
    "lfm3": dict(model_type="lfm3", num_key_value_heads=2, head_dim=16, layer_types=["conv", "full_attention"],
                 tie_word_embeddings=False, **_SMALL),
    "lfm2_moe": dict(model_type="lfm2_moe", num_key_value_heads=2, layer_types=["conv", "full_attention"],
                     num_dense_layers=0, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=True,
                     **_MOE_SMALL),
}
FAMILIES.update(MORE_FAMILIES)
FAMILIES.update(SHAPE_FAMILIES)
# Families the support matrix says "a YAML profile should do" for, without a shipped profile:
# tests/profiles/test_support.py converts each with a profile written from configs/README.md (not in FAMILIES:
# no shipped profile picks them).
PROFILE_SAMPLE_FAMILIES: dict[str, dict] = {
    # only the last layer's attention has a bias (dense_bias): layer 0 is not the last one
    "gpt_neox_japanese": dict(model_type="gpt_neox_japanese", intermediate_multiple_size=2, tie_word_embeddings=False,
                              **{k: v for k, v in _SMALL.items() if k != "intermediate_size"}),
    "ministral3": dict(model_type="ministral3", num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                       **_SMALL),
    "hyperclovax": dict(model_type="hyperclovax", num_key_value_heads=2, embedding_multiplier=1.7,
                        tie_word_embeddings=False, **_SMALL),
    "bitnet": dict(model_type="bitnet", num_key_value_heads=2, tie_word_embeddings=False, **_SMALL),
    "mpt": dict(model_type="mpt", d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, vocab_size=VOCAB,
                max_seq_len=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    # stores its attention sinks as self_attn.softmax_offset (transformers renames them at load); layer 0 dense
    "flint": dict(model_type="flint", num_key_value_heads=2, head_dim=24, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[0],
                  layer_types=["full_attention", "sliding_attention"], sliding_window=8, tie_word_embeddings=False,
                  **_SMALL),
    "codegen": dict(model_type="codegen", n_embd=64, n_head=4, n_layer=2, rotary_dim=8, n_positions=256,
                    vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
}
# Every model type a test converts and compares against transformers (the support matrix reads this).
TESTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted({f["model_type"] for f in FAMILIES.values()}))
OFFSET_NORM_TYPES = ("gemma", "gemma2", "gemma3_text", "vaultgemma", "nemotron")  # norms scale by (1 + w)


def make_config(family: str, **overrides):
    kw = dict(FAMILIES[family] if family in FAMILIES else PROFILE_SAMPLE_FAMILIES[family])
    kw.update(overrides)
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Large random weights; norm weights near their identity (1, or 0 for Gemma's 1 + w).

    Norms are found by module class (LayerNorm, RMSNorm, CohereLayerNorm, ...), not by name, so that
    GPT-J's `ln_1`, Falcon's `ln_attn` and Cohere's per-head [heads, head_dim] q/k norm weights count.
    """
    g = torch.Generator().manual_seed(seed)
    offset_norm = model.config.model_type in OFFSET_NORM_TYPES
    norm_weights = {f"{m_name}.weight" if m_name else "weight" for m_name, m in model.named_modules()
                    if "norm" in type(m).__name__.lower()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.15
            if name in norm_weights:
                p.copy_(noise + (0.0 if offset_norm else 1.0))
            else:
                p.copy_(noise)


def build_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, **overrides))
    randomize(model, seed)
    return model.eval()


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")
    return fast


def save_checkpoint(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float32,
                    shard_kb: int | None = 40) -> Path:
    """save_pretrained in `dtype`, sharded (small max_shard_size) unless shard_kb is None, plus a tokenizer."""
    path = Path(path)
    m = model.to(dtype)
    kw = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {"max_shard_size": "1GB"}
    m.save_pretrained(path, **kw)
    make_tokenizer().save_pretrained(path)
    model.to(torch.float32)
    return path


def lay_out_hub_cache(hf_home: Path, repo_id: str, src: Path, revision: str = "0" * 40) -> Path:
    """Place a checkpoint into HF_HOME as huggingface_hub's cache does (blobs, snapshot symlinks, refs)."""
    import hashlib

    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for f in sorted(Path(src).iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    return snap


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False)
    return dst


# "A YAML profile should do": profiles written from configs/README.md for some PROFILE_SAMPLE_FAMILIES, each converting
# a tiny model exactly (tests/profiles/test_support.py; the self-check uses gpt_neox_japanese's).

_LLAMA_LIKE = """
name: {name}-written
match: {{model_types: [{name}]}}
block: serial
sizes: {{hidden_size: [hidden_size], num_heads: [num_attention_heads], num_kv_heads: [num_key_value_heads],
        head_dim: [head_dim], vocab_size: [vocab_size], n_layers: [num_hidden_layers],
        intermediate_size: [intermediate_size]}}
embedding: {{tensor: model.embed_tokens.weight, module: model.embed_tokens{extra_embedding}}}
attn_norm: {{kind: rms, weight: model.layers.0.input_layernorm.weight, eps: [rms_norm_eps],
            module: model.layers.0.input_layernorm}}
projections:
  - {{role: q, weight: model.layers.0.self_attn.q_proj.weight, module: model.layers.0.self_attn.q_proj}}
  - {{role: k, weight: model.layers.0.self_attn.k_proj.weight, module: model.layers.0.self_attn.k_proj}}
  - {{role: v, weight: model.layers.0.self_attn.v_proj.weight, module: model.layers.0.self_attn.v_proj}}
attention_module: model.layers.0.self_attn
"""
WRITTEN_PROFILES = {
    "ministral3": _LLAMA_LIKE.format(name="ministral3", extra_embedding=""),
    # the forward multiplies the embedding module's output: embedding.multiplier, not scale
    "hyperclovax": _LLAMA_LIKE.format(name="hyperclovax",
                                      extra_embedding=", multiplier: {config: embedding_multiplier}"),
    # attn_sub_norm acts on the attention's output, before o_proj: after layer 0's projections, so nothing to say
    "bitnet": _LLAMA_LIKE.format(name="bitnet", extra_embedding=""),
    # per-head q/k norms; attention sinks stored under another name than the module's (the self-check reads them
    # under transformers' renaming); a mixture of experts whose layer 0 is dense (mlp_only_layers)
    "flint": _LLAMA_LIKE.format(name="flint", extra_embedding="").replace(
        "intermediate_size: [intermediate_size]}",
        "intermediate_size: [moe_intermediate_size], n_experts: [num_experts]}") + """qk_norm:
  q: {kind: rms, weight: model.layers.0.self_attn.q_norm.weight, eps: [rms_norm_eps],
      module: model.layers.0.self_attn.q_norm}
  k: {kind: rms, weight: model.layers.0.self_attn.k_norm.weight, eps: [rms_norm_eps],
      module: model.layers.0.self_attn.k_norm}
dense_layers: {indices: [mlp_only_layers], intermediate_size: [intermediate_size]}
""",
    # a fused per-head qkv without q/k norms: its layout does not matter (the table keeps the module's own);
    # only the last layer's attention has a bias (dense_bias), which layer 0 does not
    "gpt_neox_japanese": """
name: gpt_neox_japanese-written
match: {model_types: [gpt_neox_japanese]}
block: serial
sizes: {hidden_size: [hidden_size], num_heads: [num_attention_heads], vocab_size: [vocab_size],
        n_layers: [num_hidden_layers], intermediate_size: ["hidden_size * intermediate_multiple_size"]}
embedding: {tensor: gpt_neox_japanese.embed_in.weight, module: gpt_neox_japanese.embed_in}
attn_norm: {kind: layer, weight: gpt_neox_japanese.layers.0.input_layernorm.weight,
            bias: gpt_neox_japanese.layers.0.input_layernorm.bias, eps: [layer_norm_eps],
            module: gpt_neox_japanese.layers.0.input_layernorm}
projections:
  - {role: qkv, weight: gpt_neox_japanese.layers.0.attention.query_key_value.weight, heads_interleaved: true,
     module: gpt_neox_japanese.layers.0.attention.query_key_value}
attention_module: gpt_neox_japanese.layers.0.attention
ffn: {kind: mlp, activation: {config: hidden_act, default: gelu},
      up: gpt_neox_japanese.layers.0.mlp.dense_h_to_4h.weight,
      down: gpt_neox_japanese.layers.0.mlp.dense_4h_to_h.weight, module: gpt_neox_japanese.layers.0.mlp}
""",
    # ALiBi (nothing to say), a LayerNorm without bias, a fused [q | k | v]; MPT's FFN is 4 x d_model whatever
    # expansion_ratio says (plan's count only)
    "mpt": """
name: mpt-written
match: {model_types: [mpt]}
block: serial
sizes: {hidden_size: [d_model], num_heads: [n_heads], vocab_size: [vocab_size], n_layers: [n_layers],
        intermediate_size: ["4 * d_model"]}
embedding: {tensor: transformer.wte.weight, module: transformer.wte}
attn_norm: {kind: layer, weight: transformer.blocks.0.norm_1.weight, eps: [layer_norm_epsilon],
            module: transformer.blocks.0.norm_1}
projections:
  - {role: qkv, weight: transformer.blocks.0.attn.Wqkv.weight, module: transformer.blocks.0.attn.Wqkv}
attention_module: transformer.blocks.0.attn
ffn: {kind: mlp, activation: gelu, up: transformer.blocks.0.ffn.up_proj.weight,
      down: transformer.blocks.0.ffn.down_proj.weight, module: transformer.blocks.0.ffn}
""",
    # a parallel block with one shared LayerNorm (as GPT-J); qkv_proj's layout (mp_num groups) is the module's own
    "codegen": """
name: codegen-written
match: {model_types: [codegen]}
block: parallel
sizes: {hidden_size: [n_embd], num_heads: [n_head], vocab_size: [vocab_size], n_layers: [n_layer],
        intermediate_size: [n_inner, "4 * n_embd"]}
embedding: {tensor: transformer.wte.weight, module: transformer.wte}
attn_norm: {kind: layer, weight: transformer.h.0.ln_1.weight, bias: transformer.h.0.ln_1.bias,
            eps: [layer_norm_epsilon], module: transformer.h.0.ln_1}
projections:
  - {role: qkv, weight: transformer.h.0.attn.qkv_proj.weight, module: transformer.h.0.attn.qkv_proj}
attention_module: transformer.h.0.attn
ffn: {kind: mlp, activation: {config: activation_function, default: gelu_tanh},
      up: {weight: transformer.h.0.mlp.fc_in.weight, bias: transformer.h.0.mlp.fc_in.bias},
      down: {weight: transformer.h.0.mlp.fc_out.weight, bias: transformer.h.0.mlp.fc_out.bias},
      module: transformer.h.0.mlp}
""",
}
