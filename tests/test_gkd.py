"""GKDTrainer and DistillationTrainer (trainers/gkd.py): the loss against the generalized JSD written out here
from full logits (Agarwal et al., 2024, eq. 2), which completions the loss sees (the dataset's, the student's or the
teacher's, compared with greedy decoding written out), that the student's held-out KL to the teacher falls, same-seed
and kill/resume equality, the options, and the errors on bad input.

The teacher is a tiny decoder with its own random weights and an LM head scaled up, so its next-token distributions
are peaked and far from the student's (nearly uniform) ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from test_kill_resume import KillAfterStep, Killed, assert_equal_weights
from test_reproducibility import disturb_random_streams
from test_resume import DROPOUT
from tether import DistillationConfig, DistillationTrainer, GKDConfig, GKDTrainer
from tether.data.tokenize import tokenize_prompt
from tether.demo.corpus import generate_reviews
from tether.demo.tiny import tiny_llama_config
from tether.reports.callback import RunReportCallback
from tether.trainers.checkpoints import latest_checkpoint

EOS = 1


def save_teacher(path, tokenizer, seed: int = 1, extra_rows: int = 0, extra_scale: float = 0.0) -> str:
    """A tiny decoder with other random weights and an LM head x8 (peaked distributions); `extra_rows` rows past the
    tokenizer's vocabulary (a padded head), their weights scaled by `extra_scale`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer) + extra_rows), attn_implementation="sdpa")
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[len(tokenizer):].mul_(extra_scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    return save_teacher(tmp_path_factory.mktemp("teacher"), AutoTokenizer.from_pretrained(tokenizer_dir))


def pairs(n: int, seed: int = 2) -> Dataset:
    """Prompt-completion rows cut from generated reviews: the first 3 words, then the rest."""
    rows = []
    for review in generate_reviews(n, seed=seed):
        words = review["text"].split(" ")
        rows.append({"prompt": " ".join(words[:3]), "completion": " " + " ".join(words[3:])})
    return Dataset.from_list(rows)


def prompts(n: int, seed: int = 2) -> Dataset:
    return Dataset.from_dict({"prompt": pairs(n, seed)["prompt"]})


COMMON = dict(report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no", seed=3)


def gkd(student, teacher, out, dataset=None, **fields) -> GKDTrainer:
    args = GKDConfig(output_dir=str(out), **{**COMMON, "per_device_train_batch_size": 2, "max_new_tokens": 6,
                                             "max_length": 48, **fields})
    trainer = GKDTrainer(student, teacher, args=args, train_dataset=dataset if dataset is not None else pairs(8))
    trainer.remove_callback(RunReportCallback)  # its plots cost seconds a run
    return trainer


def distill(student, teacher, out, dataset=None, **fields) -> DistillationTrainer:
    args = DistillationConfig(output_dir=str(out), **{**COMMON, "per_device_train_batch_size": 2,
                                                      "max_completion_length": 6, **fields})
    trainer = DistillationTrainer(student, teacher, args=args,
                                  train_dataset=dataset if dataset is not None else prompts(8))
    trainer.remove_callback(RunReportCallback)
    return trainer


# ----- the loss ----------------------------------------------------------------------------------------------------
def jsd_by_definition(student_logits, teacher_logits, beta: float, temperature: float) -> float:
    """JSD_beta(P || Q) for P = softmax(teacher / T), Q = softmax(student / T) of one position, as sums over the
    vocabulary: beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q; KL(P || Q) at beta = 0 and
    KL(Q || P) at beta = 1 (GKD's convention)."""
    p = (teacher_logits.double() / temperature).softmax(-1).tolist()
    q = (student_logits.double() / temperature).softmax(-1).tolist()

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def reference_loss(trainer, batch, beta: float, temperature: float) -> float:
    """Mean over the completion tokens (loss-masked, not the first) of the JSD of the distributions that predict
    them, from each model's full logits; the teacher's cut to the student's vocabulary."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        student = trainer.model(**inputs).logits
        teacher = trainer.teacher_model(**inputs).logits[..., : student.shape[-1]]
    values = [jsd_by_definition(student[b, j - 1], teacher[b, j - 1], beta, temperature)
              for b, j in batch["loss_mask"].nonzero().tolist() if j > 0]
    return sum(values) / len(values)


def hand_built_batch() -> dict[str, torch.Tensor]:
    """Two right-padded rows: prompts of 3 and 5 tokens, completions of 4 and 2 (ids chosen by hand)."""
    rows = [([40, 41, 42], [50, 51, 52, 53]), ([60, 61, 62, 63, 64], [70, 71])]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    attention = torch.zeros(2, width, dtype=torch.long)
    loss_mask = torch.zeros(2, width, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
        loss_mask[i, len(p): len(p) + len(c)] = True
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_loss_is_the_generalized_jsd_at_the_models_own_temperature(beta, tiny_decoder_dir, teacher_dir, tmp_path):
    # temperature 0.7 samples only (TRL's GKD): the divergence compares the models' untempered distributions.
    trainer = gkd(tiny_decoder_dir, teacher_dir, tmp_path, beta=beta, temperature=0.7)
    batch = hand_built_batch()
    loss = trainer.compute_loss(trainer.model, batch).detach()
    want = reference_loss(trainer, batch, beta, 1.0)
    assert want > 0.05  # teacher and student really differ
    assert float(loss) == pytest.approx(want, rel=2e-5)
    # Through the data path: prompt-completion rows count their completion tokens only.
    rows = [trainer.train_dataset[i] for i in range(2)]
    collated = trainer.data_collator(rows)
    for i, raw in enumerate(pairs(8).select(range(2))):
        prompt = tokenize_prompt(trainer.processing_class, raw["prompt"])
        assert collated["prompts"][i][collated["prompt_attention_mask"][i].bool()].tolist() == prompt
        first = int(collated["loss_mask"][i].nonzero()[0])
        assert first == len(prompt)
    assert float(trainer.compute_loss(trainer.model, collated)) == pytest.approx(
        reference_loss(trainer, collated, beta, 1.0), rel=2e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_loss_is_the_generalized_jsd_at_the_temperature(beta, tiny_decoder_dir, teacher_dir, tmp_path):
    trainer = distill(tiny_decoder_dir, teacher_dir, tmp_path, beta=beta, temperature=0.7)
    batch = hand_built_batch()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).detach()
    assert float(loss) == pytest.approx(reference_loss(trainer, batch, beta, 0.7), rel=2e-5)
    assert float(loss) != pytest.approx(reference_loss(trainer, batch, beta, 1.0), rel=1e-3)
    # TRL's `entropy` metric: the student's mean entropy at the temperature over the completion tokens.
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = [(b, j) for b, j in batch["loss_mask"].nonzero().tolist()]
    entropies = [float(-(logp.exp() * logp).sum()) for logp in
                 ((logits[b, j - 1].double() / 0.7).log_softmax(-1) for b, j in targets)]
    assert trainer._metrics["train"]["entropy"][-1] == pytest.approx(sum(entropies) / len(entropies), rel=1e-5)


def test_models_without_a_separable_head_take_the_full_logits_path(tiny_decoder_dir, teacher_dir, tmp_path):
    trainer = distill(tiny_decoder_dir, teacher_dir, tmp_path, beta=0.5, temperature=0.7)
    # A config field that transforms logits after the head makes splittable_head refuse the head (Llama's forward
    # ignores this one, so the logits, and the reference below, stay the same).
    trainer.model.config.final_logit_softcapping = 30.0
    from tether.models.forward import splittable_head

    assert splittable_head(trainer.model) is None
    batch = hand_built_batch()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).detach()
    assert float(loss) == pytest.approx(reference_loss(trainer, batch, 0.5, 0.7), rel=2e-5)


def test_a_teacher_with_a_padded_head_is_cut_and_never_samples_past_the_vocabulary(tiny_decoder_dir, tokenizer,
                                                                                   tmp_path):
    # The rows past the student's vocabulary would win every draw if sampling could reach them.
    padded = save_teacher(tmp_path / "padded", tokenizer, extra_rows=8, extra_scale=50.0)
    trainer = gkd(tiny_decoder_dir, padded, tmp_path / "out", lmbda=0.0, seq_kd=True, beta=0.5)
    batch = hand_built_batch()
    assert float(trainer.compute_loss(trainer.model, batch)) == pytest.approx(
        reference_loss(trainer, batch, 0.5, 1.0), rel=2e-5)
    batches, _ = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 2, trainer.args.device)
    for b in batches:
        assert int(b["input_ids"].max()) < len(tokenizer)


# ----- which completions the loss sees ------------------------------------------------------------------------------
def greedy(model, prompt: list[int], steps: int, penalty: float = 1.0) -> list[int]:
    """Greedy decoding without a cache, one full forward per token, stopping after EOS; with CTRL's repetition
    penalty (a seen token's logit divided by `penalty` if positive, multiplied if not)."""
    sequence = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[0, -1]
        seen = torch.tensor(sorted(set(sequence)))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
        sequence.append(int(logits.argmax()))
        if sequence[-1] == EOS:
            break
    return sequence[len(prompt):]


def completions_of(batch) -> list[list[int]]:
    return [ids[mask].tolist() for ids, mask in zip(batch["input_ids"], batch["loss_mask"].bool())]


@pytest.mark.parametrize("source", ["student", "dataset", "teacher"])
def test_lmbda_and_seq_kd_choose_the_completions_the_loss_sees(source, tiny_decoder_dir, teacher_dir, tmp_path):
    fields = {"student": dict(lmbda=1.0), "dataset": dict(lmbda=0.0), "teacher": dict(lmbda=0.0, seq_kd=True)}
    # A near-zero temperature samples the argmax: the completions are each model's greedy ones, written out below.
    trainer = gkd(tiny_decoder_dir, teacher_dir, tmp_path, temperature=1e-4, max_new_tokens=5, **fields[source])
    raw = list(trainer.get_train_dataloader())[:2]
    batches, count = trainer.get_batch_samples(iter(raw), 2, trainer.args.device)
    assert int(count) == sum(int(b["loss_mask"][:, 1:].sum()) for b in batches)  # the loss normaliser
    for before, after in zip(raw, batches):
        dataset_completions = completions_of(before)
        prompts_ = [row[m.bool()].tolist() for row, m in zip(before["prompts"], before["prompt_attention_mask"])]
        if source == "dataset":
            assert torch.equal(after["input_ids"], before["input_ids"])
            assert torch.equal(after["loss_mask"], before["loss_mask"])
            continue
        model = trainer.model if source == "student" else trainer.teacher_model
        for i, prompt in enumerate(prompts_):
            row = after["input_ids"][i][after["attention_mask"][i].bool()].tolist()
            assert row[: len(prompt)] == prompt
            assert completions_of(after)[i] == row[len(prompt):] == greedy(model, prompt, 5)
            assert completions_of(after)[i] != dataset_completions[i]


def test_a_collator_without_prompts_gets_them_from_the_loss_mask(tiny_decoder_dir, teacher_dir, tmp_path):
    # A user's collator may give input_ids, attention_mask and the loss mask only (no `prompts`).
    trainer = gkd(tiny_decoder_dir, teacher_dir, tmp_path, lmbda=1.0, temperature=1e-4, max_new_tokens=3)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    prompts_ = [row[m.bool()].tolist() for row, m in zip(batch.pop("prompts"), batch.pop("prompt_attention_mask"))]
    (completed,), _ = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    for i, prompt in enumerate(prompts_):
        row = completed["input_ids"][i][completed["attention_mask"][i].bool()].tolist()
        assert row == prompt + greedy(trainer.model, prompt, 3)


def test_lmbda_is_the_share_of_on_policy_micro_batches(tiny_decoder_dir, teacher_dir, tmp_path):
    trainer = gkd(tiny_decoder_dir, teacher_dir, tmp_path, lmbda=0.3)
    sources = []
    for step in range(100):
        trainer.state.global_step = step
        sources += [trainer._completion_source(micro) for micro in range(2)]
    assert sources.count("student") / len(sources) == pytest.approx(0.3, abs=0.07)
    assert set(sources) == {"student", None}


# ----- learning -----------------------------------------------------------------------------------------------------
def held_out_kl(trainer, data: Dataset) -> float:
    """Mean per-token KL(teacher || student) over the completion tokens of `data`, from full logits."""
    batch = trainer.data_collator([trainer._prepare(data, "eval")[i] for i in range(len(data))])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        student = trainer.model(**inputs).logits.log_softmax(-1)
        teacher = trainer.teacher_model(**inputs).logits.log_softmax(-1)
    mask = batch["loss_mask"].clone()
    mask[:, 0] = False
    kl = (teacher.exp() * (teacher - student)).sum(-1)[:, :-1]  # position j - 1 predicts token j
    return float(kl[mask[:, 1:]].mean())


@pytest.fixture(scope="module")
def trained_teacher_dir(tmp_path_factory, tokenizer_dir):
    """A tiny decoder trained for 60 steps on other reviews than the distillation data (a plain AdamW loop)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)), attn_implementation="sdpa")
    texts = [r["text"] + tokenizer.eos_token for r in generate_reviews(64, seed=11)]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(60):
        rows = torch.randperm(64, generator=order)[:16]
        ids, mask = encoded["input_ids"][rows], encoded["attention_mask"][rows]
        teacher(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("trained-teacher")
    teacher.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_the_students_held_out_kl_to_the_teacher_falls(tiny_decoder_dir, trained_teacher_dir, tmp_path):
    trainer = gkd(tiny_decoder_dir, trained_teacher_dir, tmp_path, dataset=pairs(32, seed=4), lmbda=0.5, beta=0.0,
                  per_device_train_batch_size=4, max_steps=40, learning_rate=5e-3, lr_scheduler_type="constant")
    held_out = pairs(8, seed=9)  # other reviews: the student must generalise, not memorise
    before = held_out_kl(trainer, held_out)
    trainer.train()
    after = held_out_kl(trainer, held_out)
    assert before > 1.0 and after < 0.6 * before, (before, after)


# ----- reproducibility and resumption -------------------------------------------------------------------------------
RUNS = {
    # every source of completions in play, dropout on in the student: every random stream must be restored
    "gkd": (gkd, dict(lmbda=0.5, seq_kd=True, disable_dropout=False)),
    "distillation": (distill, dict()),
}


def run_of(name, student, teacher, out, callbacks=(), **fields):
    make, options = RUNS[name]
    trainer = make(student, teacher, out, **{**options, "model_init_kwargs": DROPOUT, "max_steps": 4,
                                             "learning_rate": 1e-3, **fields})
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


@pytest.mark.parametrize("name", list(RUNS))
def test_same_seed_same_weights(name, tiny_decoder_dir, teacher_dir, tmp_path):
    first = run_of(name, tiny_decoder_dir, teacher_dir, tmp_path / "a")
    start = {k: v.clone() for k, v in first.model.state_dict().items()}
    first.train()
    disturb_random_streams()
    second = run_of(name, tiny_decoder_dir, teacher_dir, tmp_path / "b")
    second.train()
    assert any(not torch.equal(v, start[k]) for k, v in first.model.state_dict().items())
    assert_equal_weights(first.model, second.model)


@pytest.mark.parametrize("name", list(RUNS))
def test_killed_run_resumes_to_the_uninterrupted_weights(name, tiny_decoder_dir, teacher_dir, tmp_path):
    full = run_of(name, tiny_decoder_dir, teacher_dir, tmp_path / "full", save_strategy="steps", save_steps=2)
    full.train()
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run_of(name, tiny_decoder_dir, teacher_dir, out, [KillAfterStep(3)], save_strategy="steps",
               save_steps=2).train()
    assert latest_checkpoint(str(out)) == os.path.join(out, "checkpoint-2")
    resumed = run_of(name, tiny_decoder_dir, teacher_dir, out, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert_equal_weights(resumed.model, full.model)
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (resumed, full)]
    assert losses[0] == losses[1]  # the resumed run holds the killed run's first two log rows


# ----- options --------------------------------------------------------------------------------------------------
def test_conversations_complete_their_last_turn(tiny_decoder_dir, teacher_dir, tokenizer, tmp_path):
    chats = [[{"role": "user", "content": f"tell me about film {i}"}, {"role": "assistant", "content": "it was good."}]
             for i in range(4)]
    trainer = gkd(tiny_decoder_dir, teacher_dir, tmp_path, dataset=Dataset.from_dict({"messages": chats}))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for i in range(2):
        want = tokenize_prompt(tokenizer, chats[i][:1])  # the chat template with the generation prompt
        assert batch["prompts"][i][batch["prompt_attention_mask"][i].bool()].tolist() == want
        assert tokenizer.decode(completions_of(batch)[i]).startswith("it was good.")


def test_teacher_by_name_in_the_config_with_its_init_kwargs(tiny_decoder_dir, teacher_dir, tmp_path):
    trainer = gkd(tiny_decoder_dir, None, tmp_path, teacher_model_name_or_path=teacher_dir,
                  teacher_model_init_kwargs=json.dumps({"attention_dropout": 0.25}))
    assert trainer.teacher_model.config.attention_dropout == 0.25
    assert not trainer.teacher_model.training and not any(p.requires_grad for p in trainer.teacher_model.parameters())
    loaded = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert torch.equal(trainer.teacher_model.lm_head.weight, loaded.lm_head.weight)


def test_teacher_model_revision_reaches_from_pretrained(tiny_decoder_dir, teacher_dir, tmp_path, monkeypatch):
    import tether.trainers.gkd as module

    seen, load = [], module.load_language_model
    monkeypatch.setattr(module, "load_language_model", lambda path, **kw: seen.append(kw) or load(path, **kw))
    distill(tiny_decoder_dir, teacher_dir, tmp_path, teacher_model_revision="main")
    assert seen[-1]["revision"] == "main" and seen[-1]["trust_remote_code"] is False


def test_disable_dropout_defaults(tiny_decoder_dir, teacher_dir, tmp_path):
    on = gkd(tiny_decoder_dir, teacher_dir, tmp_path / "gkd", model_init_kwargs=DROPOUT)  # GKD: off by default
    off = distill(tiny_decoder_dir, teacher_dir, tmp_path / "distill", model_init_kwargs=DROPOUT)  # kept on
    assert on.model.model.layers[0].self_attn.attention_dropout == 0.0
    assert off.model.model.layers[0].self_attn.attention_dropout == DROPOUT["attention_dropout"]


# Each keeps only the most likely token: sampling becomes greedy decoding, written out in `greedy`.
@pytest.mark.parametrize("fields", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0),
                                    dict(generation_kwargs={"do_sample": False}),
                                    dict(top_k=1, repetition_penalty=4.0)])
def test_distillation_samples_with_its_sampling_fields(fields, tiny_decoder_dir, teacher_dir, tmp_path):
    trainer = distill(tiny_decoder_dir, teacher_dir, tmp_path, max_completion_length=4, pad_to_multiple_of=8,
                      shuffle_dataset=False, **fields)
    batches, _ = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 2, trainer.args.device)
    expected_prompts = [tokenize_prompt(trainer.processing_class, p) for p in prompts(8)["prompt"][:4]]  # in order
    rows = [row[m.bool()].tolist() for b in batches for row, m in zip(b["input_ids"], b["attention_mask"])]
    for row, prompt in zip(rows, expected_prompts):
        assert row[: len(prompt)] == prompt
        penalty = fields.get("repetition_penalty", 1.0)
        assert row[len(prompt):] == greedy(trainer.model, prompt, 4, penalty)  # at most max_completion_length
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in batches)  # pad_to_multiple_of


def test_shuffle_dataset_shuffles_the_prompts(tiny_decoder_dir, teacher_dir, tmp_path):
    trainer = distill(tiny_decoder_dir, teacher_dir, tmp_path, per_device_train_batch_size=8)
    order = [row[m.bool()].tolist() for row, m in zip(*next(iter(trainer.get_train_dataloader())).values())]
    in_order = [tokenize_prompt(trainer.processing_class, p) for p in prompts(8)["prompt"]]
    assert sorted(order) == sorted(in_order) and order != in_order


def test_chat_template_kwargs_reach_the_template(tiny_decoder_dir, teacher_dir, tokenizer, tmp_path):
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if shout %}!!!{% endif %}"
    args = DistillationConfig(output_dir=str(tmp_path), report_to="none", chat_template_kwargs={"shout": True})
    trainer = DistillationTrainer(tiny_decoder_dir, teacher_dir, args=args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]]}))
    assert trainer.train_dataset[0]["prompt_input_ids"] == tokenizer("hi!!!", add_special_tokens=False)["input_ids"]


def test_log_completions_prints_a_table(tiny_decoder_dir, teacher_dir, tmp_path, capsys):
    trainer = distill(tiny_decoder_dir, teacher_dir, tmp_path, max_steps=1, log_completions=True,
                      num_completions_to_print=1, dataset=Dataset.from_dict({"prompt": ["the film was"] * 4}))
    trainer.train()
    out = capsys.readouterr().out
    assert "| Prompt" in out and out.count("| the film was") == 2  # one row per logging step (step 1 and the end)
    trainer = distill(tiny_decoder_dir, teacher_dir, tmp_path / "unique", max_steps=1, log_completions=True,
                      log_unique_prompts=True, per_device_train_batch_size=4,
                      dataset=Dataset.from_dict({"prompt": ["the film was", "a plot with"] * 2}))
    trainer.train()
    out = capsys.readouterr().out
    assert out.count("| the film was") == out.count("| a plot with") == 2
    logged = trainer.state.log_history[0]
    assert {"entropy", "num_tokens", "completions/mean_length", "completions/clipped_ratio", "step_time"} <= set(logged)


def test_vllm_server_mode_samples_on_the_server(tiny_decoder_dir, teacher_dir, tmp_path):
    from tether.rollout.vllm_server import GenerationServer, TransformersBackend

    backend = TransformersBackend(tiny_decoder_dir, dtype="float32", device="cpu")
    asked, generate = [], backend.generate
    backend.generate = lambda prompts_, request: asked.append(prompts_) or generate(prompts_, request)
    server = GenerationServer(backend, "127.0.0.1", 0)
    thread = server.start_in_thread()
    try:
        trainer = distill(tiny_decoder_dir, teacher_dir, tmp_path, use_vllm=True, vllm_mode="server",
                          vllm_server_base_url=server.url, vllm_server_timeout=5, max_steps=1, top_k=1,
                          shuffle_dataset=False)
        trainer.train()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    expected = [tokenize_prompt(trainer.processing_class, p) for p in prompts(8)["prompt"][:2]]
    assert asked == [expected]


TRL_GKD_DEFAULTS = dict(temperature=0.9, lmbda=0.5, beta=0.5, max_new_tokens=128, teacher_model_name_or_path=None,
                        teacher_model_init_kwargs=None, disable_dropout=True, seq_kd=False)  # trl/experimental/gkd


def test_config_fields_and_defaults_are_trls(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from trl_config_fields import check_field

    snapshot = json.loads((Path(__file__).parent / "data" / "trl_1_16_config_fields.json").read_text())
    ours = {f.name: f.default for f in dataclasses.fields(DistillationConfig)}
    for field, value in snapshot["DistillationConfig"].items():
        assert check_field("DistillationConfig", field, value) is None, field
        assert ours[field] == value, field
    gkd_defaults = {f.name: f.default for f in dataclasses.fields(GKDConfig)}
    assert {k: gkd_defaults[k] for k in TRL_GKD_DEFAULTS} == TRL_GKD_DEFAULTS


# ----- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, field, value", [
    (GKDConfig, "beta", 1.5), (GKDConfig, "beta", -0.1), (GKDConfig, "lmbda", 1.01), (GKDConfig, "lmbda", -1.0),
    (GKDConfig, "temperature", 0.0), (GKDConfig, "max_new_tokens", 0), (DistillationConfig, "beta", 2.0),
    (DistillationConfig, "temperature", -1.0), (DistillationConfig, "top_p", 0.0),
    (DistillationConfig, "max_completion_length", 0),
])
def test_bad_config_values_name_the_field(config, field, value, tmp_path):
    with pytest.raises(ValueError, match=f"{config.__name__}.{field}"):
        config(output_dir=str(tmp_path), **{field: value})


def test_a_missing_teacher_is_an_error_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="teacher_model_name_or_path"):
        GKDTrainer("no/such-model", args=GKDConfig(output_dir=str(tmp_path)), train_dataset=pairs(2))
    with pytest.raises(ValueError, match="teacher_model_name_or_path"):
        DistillationTrainer("no/such-model", args=DistillationConfig(output_dir=str(tmp_path)),
                            train_dataset=prompts(2))


def test_a_teacher_with_a_smaller_vocabulary_is_an_error(tiny_decoder_dir, tokenizer, tmp_path):
    torch.manual_seed(0)
    small = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer) - 10))
    with pytest.raises(ValueError, match=r"teacher's vocabulary \(\d+ tokens\) is smaller than the student's"):
        gkd(tiny_decoder_dir, small, tmp_path)


def test_other_bad_inputs(tiny_decoder_dir, teacher_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with pytest.raises(ValueError, match="teacher_model_init_kwargs"):
        gkd(tiny_decoder_dir, teacher, tmp_path, teacher_model_init_kwargs={"dtype": "float32"})
    with pytest.raises(ValueError, match="formatting_func"):
        GKDTrainer(tiny_decoder_dir, teacher, args=GKDConfig(output_dir=str(tmp_path)), train_dataset=pairs(2),
                   formatting_func=lambda row: row["prompt"])
    with pytest.raises(ValueError, match="needs prompts to complete"):
        gkd(tiny_decoder_dir, teacher, tmp_path, dataset=Dataset.from_dict({"text": ["a film", "a plot"]}))
    user_last = [[{"role": "assistant", "content": "hi"}, {"role": "user", "content": "bye"}]]
    with pytest.raises(ValueError, match="Row 0 of the train dataset, column 'messages'"):
        gkd(tiny_decoder_dir, teacher, tmp_path, dataset=Dataset.from_dict({"messages": user_last}))
    with pytest.raises(ValueError, match="tool calling"):
        DistillationTrainer(tiny_decoder_dir, teacher, args=DistillationConfig(output_dir=str(tmp_path)),
                            train_dataset=prompts(2), tools=[len])
    student = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    with pytest.raises(ValueError, match="the student itself"):
        GKDTrainer(student, student, args=GKDConfig(output_dir=str(tmp_path)), train_dataset=pairs(2))


def test_inapplicable_gkd_fields_warn(tmp_path):
    with pytest.warns(UserWarning, match="GKDConfig.packing=True has no effect"):
        config = GKDConfig(output_dir=str(tmp_path), packing=True)
    assert config.packing is False


@pytest.mark.parametrize("command", ["gkd", "distillation"])
def test_the_commands_train_and_save(command, tiny_decoder_dir, teacher_dir, tmp_path):
    from tether.cli import main

    data = tmp_path / "data.jsonl"
    rows = pairs(8) if command == "gkd" else prompts(8)
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    extra = ["--lmbda", "1", "--max_new_tokens", "4"] if command == "gkd" else ["--max_completion_length", "4"]
    assert main([command, "--model_name_or_path", tiny_decoder_dir, "--teacher_model_name_or_path", teacher_dir,
                 "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "1", *extra,
                 "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no"]) == 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_train_alike(tiny_decoder_dir, teacher_dir, tmp_path):
    from launching import run_two_processes

    result = run_two_processes("gkd_two_process.py", tiny_decoder_dir, teacher_dir, str(tmp_path))
    assert "GKDTrainer ok" in result.stdout and "DistillationTrainer ok" in result.stdout
