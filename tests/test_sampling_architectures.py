"""The group sampler (rollout/sampling.py `sample_groups`) on every family of decoder whose cache or forward
differs: plain KV caches (Llama, Qwen2, Mistral with a sliding window), MoE models whose config asks for router
logits (Qwen3-MoE, GptOss, which also has attention sinks and sliding layers), alternating sliding / full
attention (Gemma2, Gemma3, Cohere2, Olmo3), MLA with a value head size unlike the key's (DeepSeek-V3), short
convolutions (Lfm2), Mamba-2 and attention hybrids (NemotronH, Jamba, FalconH1, GraniteMoeHybrid, Bamba),
gated delta-net linear attention (Qwen3-Next), lightning attention with state held outside the cache's layers
(MiniMax), pure state-space models (Mamba, Mamba2) and GPT-2 (learned absolute positions).

For each, on a tiny model built from its config: (a) sample_groups runs with groups of several completions and
rows ending at different steps; (b) greedy completions equal `model.generate(do_sample=False)` prompt by prompt
(unpadded, one at a time: the reference knows nothing of tether's left padding, shared prompt encoding or
dropped rows); (c) the sampled tokens' behaviour log-probs equal a full forward pass's log_softmax over the
unpadded prompt + completion, per row.

Shapes: n = completions, c = completion tokens, v = vocabulary.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from tether.rollout import sampling
from tether.rollout.sampling import sample_groups

VOCAB = 64
PAD = 0
MAX_NEW = 7
# Prompts of different lengths (left-padded inside the sampler), longer than the sliding windows below.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19, 20]]
WINDOW = 4  # sliding-window size: prompt + completion exceed it, so the window really slides
ATTN = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, pad_token_id=PAD,
            bos_token_id=1, eos_token_id=2, max_position_embeddings=64, tie_word_embeddings=False)

# name -> (config class name, arguments beyond BASE). Names missing from this transformers are skipped.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", ATTN),
    "qwen2": ("Qwen2Config", ATTN),
    "mistral_sliding": ("MistralConfig", {**ATTN, "sliding_window": WINDOW}),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                pad_token_id=PAD, eos_token_id=2, bos_token_id=1)),
    "qwen3_moe": ("Qwen3MoeConfig", {**ATTN, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 16, "output_router_logits": True}),
    "gpt_oss": ("GptOssConfig", {**ATTN, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW,
                                 "layer_types": ["sliding_attention", "full_attention"],
                                 "output_router_logits": True}),
    "gemma2": ("Gemma2Config", {**ATTN, "sliding_window": WINDOW}),
    "gemma3": ("Gemma3TextConfig", {**ATTN, "sliding_window": WINDOW,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "cohere2": ("Cohere2Config", {**ATTN, "sliding_window": WINDOW,
                                  "layer_types": ["sliding_attention", "full_attention"]}),
    "olmo3": ("Olmo3Config", {**ATTN, "sliding_window": WINDOW,
                              "layer_types": ["sliding_attention", "full_attention"]}),
    "deepseek_v3": ("DeepseekV3Config", dict(num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                                             q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
                                             n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                             moe_intermediate_size=16, first_k_dense_replace=1)),
    "lfm2": ("Lfm2Config", {**ATTN, "layer_types": ["conv", "full_attention"], "block_auto_adjust_ff_dim": False}),
    "nemotron_h": ("NemotronHConfig", {**ATTN, "layers_block_type": ["linear_attention", "full_attention"],
                                       "mamba_num_heads": 4, "mamba_head_dim": 8, "ssm_state_size": 8,
                                       "n_groups": 1, "expand": 1, "chunk_size": 8}),
    "qwen3_next": ("Qwen3NextConfig", {**ATTN, "layer_types": ["linear_attention", "full_attention"],
                                       "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                                       "linear_num_key_heads": 2, "linear_num_value_heads": 4, "num_experts": 4,
                                       "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                       "shared_expert_intermediate_size": 16}),
    "jamba": ("JambaConfig", {**ATTN, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
                              "expert_layer_offset": 1, "num_experts": 4, "num_experts_per_tok": 2,
                              "mamba_d_state": 8, "mamba_dt_rank": 4, "mamba_expand": 1,
                              "use_mamba_kernels": False}),
    "falcon_h1": ("FalconH1Config", {**ATTN, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8,
                                     "mamba_d_state": 8, "mamba_chunk_size": 8, "mamba_expand": 1}),
    "granite_moe_hybrid": ("GraniteMoeHybridConfig", {**ATTN, "layer_types": ["mamba", "attention"],
                                                      "num_local_experts": 4, "num_experts_per_tok": 2,
                                                      "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8,
                                                      "mamba_chunk_size": 8, "mamba_expand": 1}),
    "minimax": ("MiniMaxConfig", {**ATTN, "layer_types": ["linear_attention", "full_attention"],
                                  "num_local_experts": 4, "num_experts_per_tok": 2, "block_size": 4}),
    "mamba": ("MambaConfig", dict(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=1,
                                  time_step_rank=4, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)),
    "mamba2": ("Mamba2Config", dict(vocab_size=VOCAB, hidden_size=32, num_heads=4, head_dim=8, state_size=8,
                                    num_hidden_layers=2, expand=1, n_groups=1, chunk_size=8,
                                    pad_token_id=PAD, bos_token_id=1, eos_token_id=2)),
}


def build(name: str):
    class_name, extra = ARCHITECTURES[name]
    config_class = getattr(transformers, class_name, None)
    if config_class is None:
        pytest.skip(f"{class_name} is not in this transformers")
    arguments = dict(extra) if class_name in ("GPT2Config", "MambaConfig", "Mamba2Config") else {**BASE, **extra}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = config_class(**arguments)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    # Scale the random weights up so the tiny model's next-token distributions are far from uniform: greedy
    # ties and near-ties (which float reordering could flip) become unlikely, and log-probs vary.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def generate_greedy(model, prompt: list[int], eos: list[int] | None, name: str = "") -> list[int]:
    """transformers' own greedy decoding of one unpadded prompt (see PADDING_SENSITIVE); ends after an EOS
    (kept)."""
    ids, mask = left_padded(model, name, prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=MAX_NEW, pad_token_id=PAD, eos_token_id=eos, min_new_tokens=0)
    row = out[0, ids.shape[1]:].tolist()
    if eos:
        for j, token in enumerate(row):
            if token in eos:
                return row[: j + 1]
    return row


@pytest.fixture()
def path_taken(monkeypatch):
    """Records whether each call shared the prompt encoding (the fast path) or re-encoded it."""
    taken = []
    original = sampling.shared_prompt_cache

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        taken.append("shared" if result[2] is not None else "re-encoded")
        return result

    monkeypatch.setattr(sampling, "shared_prompt_cache", spy)
    return taken


# MiniMax's lightning attention does not honour a left-padding attention mask: transformers' own batched
# generate() of left-padded prompts (what TRL runs) differs from unpadded generation too. For it the references
# are computed with the same left padding the sampler uses (prompts padded to the longest), and the log-probs
# are checked on the unpadded (longest) prompt's rows only: on padded rows MiniMax's one-token decoding steps and
# its full forward disagree by ~1e-2 (transformers' own numbers, not the sampler's).
PADDING_SENSITIVE = {"minimax"}


def left_padded(model, name: str, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, t] ids and mask of `prompt`, left-padded to the longest prompt for padding-sensitive models."""
    width = max(map(len, PROMPTS)) if name in PADDING_SENSITIVE else len(prompt)
    ids = torch.tensor([[PAD] * (width - len(prompt)) + prompt])
    return ids, (torch.arange(width) >= width - len(prompt)).long()[None]


# Every family but MiniMax has a cache that transformers' reorder_cache gathers by rows: they must keep the fast
# path (shared prompt encoding, finished rows dropped); a regression to the re-encoding path fails here.
# MiniMaxCache keeps its linear-attention state outside its layers, which reorder_cache misses, and its own
# batch_select_indices fails (IndexError) on it: the sampler must notice and re-encode the prompts.
RE_ENCODED = {"minimax"}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_sampler_on_architecture(name, path_taken):
    model = build(name)
    # EOS ids that greedy decoding emits at different steps for different prompts, so rows end at different
    # steps (and finished rows are dropped on the fast path); none occurs in the last prompt's output.
    full = [generate_greedy(model, prompt, None, name) for prompt in PROMPTS]
    eos = sorted({full[0][1], full[1][4]} - set(full[2]))

    # (b) greedy equals generate, rows ending at different steps
    greedy = sample_groups(model, PROMPTS, 2, MAX_NEW, PAD, eos, temperature=0.0, top_k=1)
    lengths = greedy.completion_mask.sum(-1).tolist()
    for i, prompt in enumerate(PROMPTS):
        expected = generate_greedy(model, prompt, eos, name)
        for row in (2 * i, 2 * i + 1):
            assert greedy.completion_ids[row, : lengths[row]].tolist() == expected, (name, i)
    assert lengths[4] == MAX_NEW and min(lengths) < MAX_NEW  # non-vacuous: some rows stopped early

    # (a) + (c) sampled groups; behaviour log-probs equal a full forward's log_softmax at the sampled tokens
    generator = torch.Generator().manual_seed(0)
    sampled = sample_groups(model, PROMPTS, 3, MAX_NEW, PAD, eos, temperature=1.0, generator=generator)
    assert sampled.completion_ids.shape[0] == 3 * len(PROMPTS)
    for row in range(sampled.completion_ids.shape[0]):
        if name in PADDING_SENSITIVE and len(PROMPTS[row // 3]) < max(map(len, PROMPTS)):
            continue  # its decoding steps and its full forward treat the padding differently (see above)
        length = int(sampled.completion_mask[row].sum())
        completion = sampled.completion_ids[row, :length]
        prompt_ids, prompt_mask = left_padded(model, name, PROMPTS[row // 3])
        ids = torch.cat([prompt_ids, completion[None]], dim=1)
        mask = torch.cat([prompt_mask, torch.ones_like(completion)[None]], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[0].float()  # [t, v]
        reference = logits[prompt_ids.shape[1] - 1: -1].log_softmax(-1).gather(-1, completion[:, None])[:, 0]
        torch.testing.assert_close(sampled.logps[row, :length], reference, atol=2e-4, rtol=1e-4)
        assert (sampled.logps[row, length:] == 0).all()

    assert path_taken == ["re-encoded" if name in RE_ENCODED else "shared"] * 2
