"""Multi-turn episodes on CPU: tether's sampler with the KV cache kept across turns, against re-encoding the
whole conversation at every turn.

    python benchmarks/multiturn.py              # the bench model (harness.py's ~23M Llama, 32k vocabulary)
    python benchmarks/multiturn.py --quick      # tiny smoke run

The work, the same for every contender: E = 16 episodes (`--episodes`) of T = 3 model turns (`--turns`) of
exactly N = 32 sampled tokens each (`--turn-tokens`; EOS is not a stop, so every turn has its full length),
prompts of 32 tokens, and after each turn but the last an observation of O = 24 tokens (`--observation-tokens`,
a fixed text from an environment object) appended to the conversation. Sampling at temperature 1.

Contenders:
- tether, KV kept: `rollout.multiturn.sample_episodes` (every live episode in one batch; the cache kept across
  turns, observations fed on top of it);
- tether, re-encoded: the same with `reuse_cache=False` (the running episodes re-encoded after each turn);
- generate loop: what a plain script does, turn by turn `model.generate(conversations so far, left-padded,
  max_new_tokens=N, do_sample=True)` over all episodes, then the observations appended to the token lists (no
  re-tokenising), so each turn re-encodes the whole conversation.
Each contender runs `--repeats` times after one warm-up, in one process, `--threads` torch threads; episodes/s
= E / seconds, generated tokens/s = E * T * N / seconds; medians. "Prefilled tokens" is what each schedule
feeds through the model besides the one-token decoding steps: with the cache kept, each prompt once and each
observation once (E * (P + (T - 1) * O)); re-encoding, the whole conversation so far at every turn
(E * sum over t < T of (P + t * (N + O)))
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import build_base_assets  # noqa: E402


class FixedObservation:
    """An environment whose every answer is the same observation; the episode ends after `turns` turns."""

    def __init__(self, observation: str, turns: int) -> None:
        self.observation, self.turns, self.done = observation, turns, 0

    def reset(self, prompt: object = None) -> None:
        self.done = 0

    def step(self, text: str) -> tuple[str | None, float, bool]:
        self.done += 1
        return self.observation, 0.0, self.done >= self.turns


def tether_episodes(model, tok, prompts, observation, args, reuse: bool) -> None:
    from tether.rollout.multiturn import sample_episodes

    envs = [FixedObservation(observation, args.turns) for _ in prompts]
    budget = args.turns * args.turn_tokens + (args.turns - 1) * args.observation_tokens
    out = sample_episodes(model, tok, prompts, envs, max_completion_length=budget, max_turns=args.turns,
                          eos_token_ids=[], pad_token_id=tok.pad_token_id, max_turn_tokens=args.turn_tokens,
                          max_observation_tokens=args.observation_tokens, reuse_cache=reuse,
                          generator=torch.Generator().manual_seed(0))
    assert int(out.completion_mask.sum()) == len(prompts) * args.turns * args.turn_tokens


def generate_loop(model, tok, prompts, observation_ids, args) -> None:
    conversations = [list(p) for p in prompts]
    for turn in range(args.turns):
        width = max(map(len, conversations))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(c)) + c for c in conversations])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in conversations])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.turn_tokens,
                             min_new_tokens=args.turn_tokens, do_sample=True, top_k=0, pad_token_id=tok.pad_token_id,
                             eos_token_id=None)
        for c, row in zip(conversations, out[:, width:].tolist()):
            c += row + (observation_ids if turn + 1 < args.turns else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--turn-tokens", type=int, default=32)
    p.add_argument("--observation-tokens", type=int, default=24)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", default="/tmp/tether-bench-multiturn")
    p.add_argument("--json", default=None, help="Write the results here too.")
    args = p.parse_args()
    if args.quick:
        args.episodes, args.turn_tokens, args.repeats = 4, 8, 2
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok, docs, _, info = build_base_assets(work, args.quick)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "model").eval()
    stream = [t for d in docs for t in tok(d)["input_ids"]]
    prompts = [stream[i * args.prompt_tokens:(i + 1) * args.prompt_tokens] for i in range(args.episodes)]
    observation_ids = stream[-args.observation_tokens:]
    observation = tok.decode(observation_ids)
    observation_ids = tok.encode(observation, add_special_tokens=False)[:args.observation_tokens]

    contenders = {
        "tether, KV kept across turns": lambda: tether_episodes(model, tok, prompts, observation, args, True),
        "tether, re-encoded each turn": lambda: tether_episodes(model, tok, prompts, observation, args, False),
        "generate loop (re-encodes each turn)": lambda: generate_loop(model, tok, prompts, observation_ids, args),
    }
    generated = args.episodes * args.turns * args.turn_tokens
    results = {}
    with torch.no_grad():
        for name, run in contenders.items():
            run()  # warm-up
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - started)
            median = statistics.median(seconds)
            results[name] = {"seconds": median, "episodes_per_s": args.episodes / median,
                             "generated_tokens_per_s": generated / median, "all_seconds": seconds}
    base = results["generate loop (re-encodes each turn)"]["seconds"]
    e, t, n, o, q = args.episodes, args.turns, args.turn_tokens, len(observation_ids), args.prompt_tokens
    prefilled = {"tether, KV kept across turns": e * (q + (t - 1) * o)}
    prefilled["tether, re-encoded each turn"] = prefilled["generate loop (re-encodes each turn)"] = e * sum(
        q + turn * (n + o) for turn in range(t))
    for name in results:
        results[name]["prefilled_tokens"] = prefilled[name]
    print(f"\n{info['params_M']}M-parameter Llama, {args.episodes} episodes x {args.turns} turns x "
          f"{args.turn_tokens} tokens, observations of {len(observation_ids)} tokens, prompts of "
          f"{args.prompt_tokens}, {args.threads} threads, median of {args.repeats}\n")
    print("| contender | s / round | episodes/s | generated tokens/s | prefilled tokens | speed-up vs generate loop |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.2f} | {r['episodes_per_s']:.2f} | {r['generated_tokens_per_s']:.0f} | "
              f"{r['prefilled_tokens']} | {base / r['seconds']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "model": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
