"""What `tether demo` runs: its sizes, its data's layout and the pipeline YAML it hands to `tether pipeline`.

The YAML is the demo's whole training configuration (`tether demo --print-config` prints it, so users start
from it); `demo_yaml` fills in the output folder, the seed and the sizes of the full demo or of `--quick`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from string import Template

from .corpus import review_prompts


@dataclass(frozen=True)
class DemoSizes:
    """Everything that differs between the full demo and `--quick`."""

    n_reviews: int
    n_eval: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    sft_steps: int
    batch_size: int
    max_length: int
    learning_rate: float
    n_samples: int  # held-out openings whose samples are printed
    n_pairs: int
    reward_steps: int
    dpo_steps: int
    ppo_steps: int
    group_rl_steps: int  # GRPO / RLOO
    eval_samples: int  # sampled reviews per held-out opening in each stage's evaluation


# The corpus has ~300 distinct words: a 1024-token BPE (it stops at ~840, out of merges) makes nearly every
# word one token, and a ~0.9M-parameter model fits it. A high learning rate with a short warmup and cosine
# decay gets the held-out loss from ~6.8 to ~0.9 nats/token (about the corpus' own entropy) in 200 steps,
# about 6 passes over the corpus; 120 steps already read as reviews, 300 barely improve on 200.
FULL = DemoSizes(n_reviews=4000, n_eval=200, vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4,
                 sft_steps=200, batch_size=16, max_length=128, learning_rate=3e-3, n_samples=4,
                 n_pairs=3000, reward_steps=300, dpo_steps=120, ppo_steps=80, group_rl_steps=160,
                 eval_samples=16)
QUICK = DemoSizes(n_reviews=600, n_eval=50, vocab_size=400, hidden_size=64, num_layers=2, num_heads=4,
                  sft_steps=12, batch_size=8, max_length=64, learning_rate=3e-3, n_samples=2,
                  n_pairs=64, reward_steps=4, dpo_steps=4, ppo_steps=2, group_rl_steps=2, eval_samples=4)

# Openings no policy stage (PPO, DPO, GRPO, RLOO) trains on: samples on them show what the policy learned, not
# what it memorised. The others are the prompts of online RL and the prompts of DPO's pairs.
HELD_OUT_OPENINGS = ("this movie", "the plot", "the soundtrack", "for me, the second half")
TRAIN_OPENINGS = tuple(o for o in review_prompts() if o not in HELD_OUT_OPENINGS)
MAX_NEW_TOKENS = 24  # reviews are 6-25 words; the longest continuations take ~22 tokens with their EOS
PROMPT_REPEATS = 8  # data/prompts.jsonl: the training openings, this many times over

# The stages `--method` runs after setup; every stage's name is its folder and its kind.
METHOD_STAGES = {"ppo": ("sft", "reward", "ppo", "dpo"), "grpo": ("sft", "reward", "grpo"),
                 "rloo": ("sft", "reward", "rloo")}

# The data setup writes, under <output_dir>/data: folders hold train.jsonl and test.jsonl (the held-out split).
REVIEWS, RANKED_PAIRS_DIR, POSITIVE_PAIRS_DIR, PROMPTS_FILE = "reviews", "ranked_pairs", "positive_pairs", "prompts.jsonl"

_HEADER = Template("""\
# The pipeline `tether demo$flags` runs, as `tether demo$flags --print-config` prints it.
#
# The demo first writes what this file reads: a generated movie-review corpus, preference pairs and prompts
# under $output_dir/data, and an untrained tiny Llama with its own BPE tokenizer in $output_dir/base.
# Then it runs this file with `tether pipeline`, and after each stage samples the stage's model on review
# openings no stage trains on and scores the samples (tether/demo/evaluate.py). To start from it:
#
#   tether demo$flags --print-config > demo.yaml
#   tether pipeline demo.yaml --plan       # after one `tether demo$flags`: every stage is up to date
#   tether pipeline demo.yaml              # after an edit: the changed stages, and those after them, rerun
#
# Each stage is `tether KIND --config <stage folder>/pipeline_stage.yaml` (`tether KIND --help` lists the
# options of its `config:`).

output_dir: $output_dir_value
model: $base_dir       # where the first stage starts: the untrained tiny Llama
seed: $seed
defaults:                     # options of every stage whose command has them
  report_to: none
  dataloader_pin_memory: false   # CPU only: nothing to pin memory for
  per_device_eval_batch_size: 32
  data_seed: $seed

stages:
""")

_STAGES = {
    "sft": Template("""\
  sft:                        # next-token loss on the reviews, packed into rows of max_length (no padding)
    dataset: {name: $reviews_dir, test_split: test}
    config:
      max_steps: $sft_steps
      per_device_train_batch_size: $batch_size
      learning_rate: $learning_rate
      lr_scheduler_type: cosine
      warmup_steps: $warmup_steps
      packing: true
      max_length: $max_length
      logging_steps: $sft_logging_steps
      eval_on_start: true     # the held-out loss before training; the command evaluates again at the end
      save_steps: 100
"""),
    "reward": Template("""\
  reward:                     # from the SFT model with a new score head (InstructGPT); pairs of reviews ranked
    dataset: {name: $ranked_pairs_dir, test_split: test}  # positive > neutral > negative
    config:
      max_steps: $reward_steps
      per_device_train_batch_size: 32
      learning_rate: 5.0e-4
      center_rewards_coefficient: 0.01   # pulls the mean score to 0: neutral reviews land near 0
      max_length: $max_length
      logging_steps: $reward_logging_steps
      eval_on_start: true
      save_steps: 150
"""),
    "ppo": Template("""\
  ppo:                        # policy and reference: the SFT model; reward: the reward stage's model
    dataset: $prompts_file
    config:
      total_steps: $ppo_steps
      batch_size: 32
      mini_batch_size: 16
      ppo_epochs: 2
      learning_rate: 1.5e-4
      # A fixed KL coefficient high enough that the policy keeps the SFT model's words: the reward model
      # cannot tell every broken review from a whole one; the KL penalty is what keeps the samples fluent.
      init_kl_coef: 0.3
      adap_kl_ctrl: false
      max_new_tokens: $max_new_tokens
      missing_eos_penalty: 1.0
      logging_steps: $ppo_logging_steps
      save_steps: 40
"""),
    "dpo": Template("""\
  dpo:                        # from the SFT model (not PPO's policy), on pairs that always prefer the positive
    from: {model: sft}
    dataset: {name: $positive_pairs_dir, test_split: test}
    config:
      max_steps: $dpo_steps
      per_device_train_batch_size: $batch_size
      learning_rate: 4.0e-4
      beta: 0.1
      # DPO plus an NLL term on the chosen reviews (RPO): DPO alone lowers the rejected reviews' tokens faster
      # than it raises the chosen ones', and the mass it frees lands on broken words.
      loss_type: [sigmoid, sft]
      loss_weights: [1.0, 3.0]
      max_length: $max_length
      max_prompt_length: 16
      precompute_ref_log_probs: true   # reference log-probs computed once: no reference model held
      logging_steps: $dpo_logging_steps
      save_steps: 60
"""),
}
# GRPO and RLOO: 160 steps and these KL coefficients stop short of the collapse that comes next (at 200 steps
# with beta 0.1, GRPO wrote "was not bad at all." for 50 of 64 held-out samples).
_GROUP_RL = Template("""\
  $method:                       # groups of 4 sampled reviews per prompt, rewarded by the reward stage's model
    dataset: $prompts_file
    config:
      max_steps: $group_rl_steps
      per_device_train_batch_size: 16
      num_generations: 4
      max_completion_length: $max_new_tokens
      learning_rate: 2.0e-4
      beta: $beta               # KL to the SFT model$beta_note
      logging_steps: $group_rl_logging_steps
      save_steps: 80
""")
_GROUP_RL_BETA = {"grpo": ("0.2", "; at 0.1, GRPO collapses onto a few phrases past ~160 steps"), "rloo": ("0.1", "")}


def _yaml_text(text: str) -> str:
    """`text` as a YAML scalar: as is when YAML reads it back unchanged, else double-quoted."""
    import json

    import yaml

    plain = "#" not in text and not text.startswith(("{", "[", "'", '"'))
    return text if plain and yaml.safe_load(text) == text else json.dumps(text)


def demo_yaml(output_dir: str, sizes: DemoSizes, seed: int = 0, method: str = "ppo", flags: str = "") -> str:
    """The pipeline YAML of `tether demo` (`flags`: the demo's options, as the header repeats them)."""
    values = {**asdict(sizes), "output_dir": output_dir, "seed": seed, "flags": flags,
              "warmup_steps": max(1, sizes.sft_steps // 20), "max_new_tokens": MAX_NEW_TOKENS,
              "output_dir_value": _yaml_text(output_dir), "base_dir": _yaml_text(f"{output_dir}/base")}
    for key, name in (("reviews_dir", REVIEWS), ("ranked_pairs_dir", RANKED_PAIRS_DIR),
                      ("positive_pairs_dir", POSITIVE_PAIRS_DIR), ("prompts_file", PROMPTS_FILE)):
        values[key] = _yaml_text(f"{output_dir}/data/{name}")
    for stage, steps, every in (("sft", sizes.sft_steps, 6), ("reward", sizes.reward_steps, 4),
                                ("dpo", sizes.dpo_steps, 4), ("ppo", sizes.ppo_steps, 5),
                                ("group_rl", sizes.group_rl_steps, 5)):
        values[f"{stage}_logging_steps"] = max(1, steps // every)
    stages = []
    for stage in METHOD_STAGES[method]:
        if stage in _GROUP_RL_BETA:
            beta, note = _GROUP_RL_BETA[stage]
            stages.append(_GROUP_RL.substitute(values, method=stage, beta=beta, beta_note=note))
        else:
            stages.append(_STAGES[stage].substitute(values))
    return _HEADER.substitute(values) + "\n".join(stages)
