"""Build offline stand-ins for the hub ids TRL's trainer tests load.

    python benchmarks/trl_tests_replay/build_standins.py [--out benchmarks/trl_tests_replay/_build] [--force]

Writes, under ``OUT`` (git-ignored):

- ``hf_home/hub/models--trl-internal-testing--<name>/...``: tiny models in the layout of the Hugging Face hub
  cache, so that with ``HF_HOME=OUT/hf_home HF_HUB_OFFLINE=1`` a plain
  ``AutoModelForCausalLM.from_pretrained("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5")`` resolves to them in
  TRL and tether alike, with no patching of either library. Each is the same architecture as the hub model
  (hidden 32, 2 layers), with a byte-level BPE tokenizer trained here (``tether.demo.tiny.train_tokenizer``) and
  given the model family's special tokens and its original chat template (read from the installed TRL's
  ``chat_templates/`` folder, so TRL's exact-match template detection behaves as with the real checkpoint).
- ``datasets/<org>/<name>/<config>/<split>.parquet``: the datasets, produced by running the generator scripts
  of TRL's git mirror (``scripts/generate_{zen,toolcall,harmony}_dataset.py``) with their hub upload redirected
  to local parquet files; ``conftest.py`` routes ``datasets.load_dataset("<org>/<name>", config, ...)`` there.
- ``standins.json``: the ids built (and the ones that failed, with why), read by the conftest and ``run.py``.

What differs from the hub: the vocabulary (~700 tokens instead of ~150k), so tests that hard-code token ids of
the real Qwen tokenizer fail on TRL too and are left out of the comparison by construction.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "_build"
TRL_MIRROR = Path("/work/.mirror/huggingface+trl/repo")
TRL116_SITE = Path("/work/.venv-trl116/lib/python3.11/site-packages/trl")
ORG = "trl-internal-testing"

# A ChatML template for families whose original template TRL does not ship (Mistral, Olmo3, GPT-NeoX).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
)

# family -> tokenizer special tokens and chat template (a file of TRL's chat_templates/ or a literal).
FAMILIES: dict[str, dict] = {
    "qwen2_5": dict(template="qwen2_5.jinja", bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                    special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "qwen3": dict(template="qwen3.jinja", bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                  special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "llama3_2": dict(template="llama3_2.jinja", bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                     special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]),
    "llama3_1": dict(template="llama3_1.jinja", bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                     special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]),
    "llama3": dict(template="llama3.jinja", bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                   special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"]),
    "mistral": dict(template_text=MISTRAL, bos="<s>", eos="</s>", pad=None, special=["<s>", "</s>", "<unk>"]),
    "gptoss": dict(template="gptoss.jinja", bos="<|startoftext|>", eos="<|return|>", pad="<|endoftext|>",
                   special=["<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>",
                            "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]),
    "gpt_neox": dict(template_text=None, bos="<|endoftext|>", eos="<|endoftext|>", pad=None,
                     special=["<|endoftext|>", "<|padding|>"]),
    "cohere": dict(template="cohere.jinja", bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>",
                   special=["<BOS_TOKEN>", "<PAD>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                            "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"]),
    "cohere2": dict(template="cohere2.jinja", bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>",
                    special=["<BOS_TOKEN>", "<PAD>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                             "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>",
                             "<|START_RESPONSE|>", "<|END_RESPONSE|>"]),
    "gemma": dict(template="gemma.jinja", bos="<bos>", eos="<eos>", pad="<pad>",
                  special=["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]),
    "phi3": dict(template="phi3.jinja", bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>",
                 special=["<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]),
    "deepseekv3": dict(template="deepseekv3.jinja", bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>",
                       pad="<｜end▁of▁sentence｜>",
                       special=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]),
    "glm4moe": dict(template="glm4moe.jinja", bos=None, eos="<|endoftext|>", pad="<|endoftext|>",
                    special=["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                             "<|observation|>"]),
    "lfm2": dict(template="lfm2.jinja", bos="<|startoftext|>", eos="<|im_end|>", pad="<|pad|>",
                 special=["<|startoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]),
    "lfm2_2_5": dict(template="lfm2_2_5.jinja", bos="<|startoftext|>", eos="<|im_end|>", pad="<|pad|>",
                     special=["<|startoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]),
    "olmo3": dict(template_text=CHATML, bos=None, eos="<|im_end|>", pad="<|pad|>",
                  special=["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]),
    "nemotron": dict(template="nemotron_3_nano.jinja", bos="<s>", eos="<|im_end|>", pad="<unk>",
                     special=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]),
}

# Non-special added tokens the templates emit (Qwen-style tool and reasoning tags).
ADDED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# hub name -> (transformers model_type, head: "causal" | "seqcls", family, extra config fields)
MODELS: dict[str, tuple[str, str, str, dict]] = {
    "tiny-Qwen2ForCausalLM-2.5": ("qwen2", "causal", "qwen2_5", {}),
    "tiny-Qwen2ForSequenceClassification-2.5": ("qwen2", "seqcls", "qwen2_5", {}),
    "tiny-Qwen3ForCausalLM": ("qwen3", "causal", "qwen3", {}),
    "tiny-Qwen3ForSequenceClassification": ("qwen3", "seqcls", "qwen3", {}),
    "tiny-Qwen3MoeForCausalLM": ("qwen3_moe", "causal", "qwen3",
                                 dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "tiny-LlamaForCausalLM-3.2": ("llama", "causal", "llama3_2", {}),
    "tiny-LlamaForCausalLM-3.1": ("llama", "causal", "llama3_1", {}),
    "tiny-LlamaForCausalLM-3": ("llama", "causal", "llama3", {}),
    "tiny-LlamaForSequenceClassification-3.2": ("llama", "seqcls", "llama3_2", {}),
    "tiny-MistralForCausalLM-0.1": ("mistral", "causal", "mistral", {}),
    "tiny-MistralForCausalLM-0.2": ("mistral", "causal", "mistral", {}),
    "tiny-GptOssForCausalLM": ("gpt_oss", "causal", "gptoss", dict(num_local_experts=4, num_experts_per_tok=2)),
    "tiny-GPTNeoXForCausalLM": ("gpt_neox", "causal", "gpt_neox", {}),
    "tiny-CohereForCausalLM": ("cohere", "causal", "cohere", {}),
    "tiny-Cohere2ForCausalLM": ("cohere2", "causal", "cohere2", {}),
    "tiny-GemmaForCausalLM": ("gemma", "causal", "gemma", {}),
    "tiny-Gemma2ForCausalLM": ("gemma2", "causal", "gemma", {}),
    "tiny-Phi3ForCausalLM": ("phi3", "causal", "phi3", {}),
    "tiny-DeepseekV3ForCausalLM": ("deepseek_v3", "causal", "deepseekv3",
                                   dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=16,
                                        kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                        head_dim=4)),
    "tiny-DeepseekV3ForCausalLM-0528": ("deepseek_v3", "causal", "deepseekv3",
                                        dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                             n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=16,
                                             kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                             v_head_dim=8, head_dim=4)),
    "tiny-Glm4MoeForCausalLM": ("glm4_moe", "causal", "glm4moe",
                                dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                     n_group=1, topk_group=1, first_k_dense_replace=1)),
    "tiny-Lfm2ForCausalLM": ("lfm2", "causal", "lfm2", {}),
    "tiny-Lfm2ForCausalLM-2.5": ("lfm2", "causal", "lfm2_2_5", {}),
    "tiny-Olmo3ForCausalLM": ("olmo3", "causal", "olmo3", {}),
    "tiny-NemotronHForCausalLM-nano": ("nemotron_h", "causal", "nemotron", {}),
}

# (hub dataset name, generator script in TRL's mirror)
DATASETS = [("zen", "scripts/generate_zen_dataset.py"), ("toolcall", "scripts/generate_toolcall_dataset.py"),
            ("harmony", "scripts/generate_harmony_dataset.py")]

TOKENIZER_TEXT = [
    "Beautiful is better than ugly.", "Explicit is better than implicit.", "Simple is better than complex.",
    "Complex is better than complicated.", "Flat is better than nested.", "Sparse is better than dense.",
    "Readability counts.", "Errors should never pass silently.", "Now is better than never.",
    "What is better than ugly? Beautiful. system user assistant tool", "The capital of France is Paris.",
    '{"name": "get_weather", "arguments": {"location": "Paris", "a": 3, "b": 4}}', "0 1 2 3 4 5 6 7 8 9 + - * /",
    "You are a helpful assistant. Cutting Knowledge Date: December 2023 Today Date:",
]


def _commit_hash(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def _base_tokenizer():
    from tether.demo.corpus import generate_reviews
    from tether.demo.tiny import train_tokenizer

    texts = [r["text"] for r in generate_reviews(400, seed=3)] + TOKENIZER_TEXT * 20
    return train_tokenizer(texts, vocab_size=700)


def _family_tokenizer(base_dir: Path, family: str):
    """The shared BPE with this family's special tokens, eos/pad/bos and chat template."""
    from transformers import AutoTokenizer

    spec = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": spec["special"]}, replace_extra_special_tokens=True)
    tok.add_tokens(ADDED_TOKENS)
    # The base tokenizer's own <pad>/<eos>/<bos> stay in the vocabulary but stop being the named tokens.
    tok.bos_token = spec["bos"]
    tok.eos_token = spec["eos"]
    tok.pad_token = spec["pad"]
    if "template" in spec:
        tok.chat_template = (TRL116_SITE / "chat_templates" / spec["template"]).read_text(encoding="utf-8")
    else:
        tok.chat_template = spec["template_text"]
    return tok


def _tiny_config(model_type: str, head: str, tok, extra: dict):
    from transformers import AutoConfig

    fields = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, head_dim=8,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    fields.update(extra)
    if head == "seqcls":
        fields["num_labels"] = 1
    config = AutoConfig.for_model(model_type, **fields)
    # Some configs derive per-layer lists from their defaults rather than from num_hidden_layers.
    for name in ("layer_types", "mlp_layer_types", "hybrid_override_pattern"):
        value = getattr(config, name, None)
        if isinstance(value, (list, str)) and len(value) > config.num_hidden_layers:
            setattr(config, name, value[: config.num_hidden_layers])
    return config


def _init_tiny(model) -> None:
    """Xavier-uniform linear layers and N(0, 0.02) embeddings: well-scaled logits for a 2-layer model."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


def _write_snapshot(hub_dir: Path, repo: str, kind: str, src: Path) -> None:
    """Place the files of `src` as the 'main' snapshot of `repo` in a hub-cache folder."""
    commit = _commit_hash(repo)
    root = hub_dir / f"{kind}s--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    if root.exists():
        shutil.rmtree(root)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for f in src.iterdir():
        shutil.copy2(f, snap / f.name)


def build_model(name: str, base_dir: Path, hub_dir: Path, tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    model_type, head, family, extra = MODELS[name]
    tok = _family_tokenizer(base_dir, family)
    config = _tiny_config(model_type, head, tok, extra)
    auto = AutoModelForSequenceClassification if head == "seqcls" else AutoModelForCausalLM
    model = auto.from_config(config)
    _init_tiny(model)
    model = model.to(torch.bfloat16)  # the hub's tiny models are stored in bf16
    with torch.no_grad():  # smoke test: a forward pass without NaNs
        out = model(input_ids=torch.tensor([[1, 2, 3, 4]]))
        assert not torch.isnan(out.logits.float()).any(), f"{name}: NaN logits"
    out_dir = tmp / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    if head == "causal":
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id).save_pretrained(out_dir)
    _write_snapshot(hub_dir, f"{ORG}/{name}", "model", out_dir)


def build_datasets(out: Path) -> list[str]:
    """Run TRL's dataset generator scripts with the hub upload redirected to local parquet files."""
    built = []
    for name, script in DATASETS:
        source = subprocess.run(["git", "-C", str(TRL_MIRROR), "show", f"HEAD:{script}"], check=True,
                                capture_output=True, text=True).stdout
        code = (
            "import sys, datasets\n"
            "from pathlib import Path\n"
            "root = Path(sys.argv[1])\n"
            "def _save(self, repo_id, config_name='default', **kw):\n"
            "    for split, ds in self.items():\n"
            "        p = root / repo_id / config_name / f'{split}.parquet'\n"
            "        p.parent.mkdir(parents=True, exist_ok=True)\n"
            "        ds.to_parquet(str(p))\n"
            "datasets.DatasetDict.push_to_hub = _save\n"
            "ns = {'__name__': 'generator'}\n"
            "exec(compile(sys.stdin.read(), 'generator', 'exec'), ns)\n"
            f"ns['main'](0.1, True, '{ORG}/{name}')\n"
        )
        subprocess.run([sys.executable, "-c", code, str(out / "datasets")], input=source, check=True, text=True)
        built.append(f"{ORG}/{name}")
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="rebuild even if standins.json exists")
    args = parser.parse_args()
    out: Path = args.out
    manifest_path = out / "standins.json"
    if manifest_path.exists() and not args.force:
        print(f"stand-ins already built: {manifest_path}")
        return
    import torch

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    hub_dir = out / "hf_home" / "hub"
    hub_dir.mkdir(parents=True, exist_ok=True)
    tmp = out / "tmp"
    base_dir = tmp / "base-tokenizer"
    _base_tokenizer().save_pretrained(base_dir)
    manifest: dict = {"models": [], "failed_models": {}, "datasets": []}
    for name in MODELS:
        try:
            build_model(name, base_dir, hub_dir, tmp)
            manifest["models"].append(f"{ORG}/{name}")
            print(f"built {ORG}/{name}")
        except Exception as exc:  # one exotic architecture must not stop the others
            manifest["failed_models"][f"{ORG}/{name}"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"FAILED {ORG}/{name}: {exc}")
            traceback.print_exc(limit=2)
    manifest["datasets"] = build_datasets(out)
    shutil.rmtree(tmp)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    print(f"wrote {manifest_path}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
