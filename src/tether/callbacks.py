"""TRL 1.x's trainer callbacks (`trl.trainer.callbacks`), on tether's generation, data and report stages.

    trainer = DPOTrainer(model, args=DPOConfig(...), train_dataset=..., eval_dataset=...)
    trainer.add_callback(LogCompletionsCallback(trainer, GenerationConfig(max_new_tokens=32), num_prompts=8))
    trainer.add_callback(BEMACallback(update_freq=50))

- `LogCompletionsCallback`: every `freq` steps, completions of the eval set's prompts, appended to the
  run's samples.jsonl (so the report shows them) and logged as a table to W&B / Comet / TensorBoard when
  the run reports to them.
- `RichProgressCallback`: progress bars and the latest metrics in the terminal, with `rich`.
- `WeaveCallback`: completions of the eval prompts, optionally scored, logged to W&B Weave at each evaluation.
- `BEMACallback`: a bias-corrected EMA of the weights (Block & Zhang, 2025), saved to output_dir/bema, and,
  with `update_ref_model=True`, copied into the reference model of a preference trainer.
- `SyncRefModelCallback`: TR-DPO's reference update, which lives in `tether.trainers.ref_sync`.

Shapes: b = batch, r = response tokens.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, TrainerCallback
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import has_length

logger = logging.getLogger(__name__)

COMPLETIONS_TABLE = "completions"


def __getattr__(name: str) -> Any:
    # TR-DPO's callback has one implementation, in trainers/ref_sync.py; imported on first use (it pulls in
    # the model-loading stack).
    if name == "SyncRefModelCallback":
        from .trainers import ref_sync

        for candidate in ("SyncRefModelCallback", "ReferenceSyncCallback"):
            if hasattr(ref_sync, candidate):
                return getattr(ref_sync, candidate)
        raise ImportError("SyncRefModelCallback: tether.trainers.ref_sync defines no reference-sync callback yet; "
                          "set sync_ref_model=True on the config instead (the trainer adds it).")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----- completions of the eval prompts ------------------------------------------------------------------------
def _raw_eval_dataset(trainer: Any, who: str) -> Any:
    """The eval dataset as the user gave it (tether trainers keep a tokenized copy in `eval_dataset`), which
    must have a "prompt" column."""
    dataset = getattr(trainer, "eval_dataset", None)
    if dataset is None:
        raise ValueError(f"{who} needs a trainer with an eval_dataset (its 'prompt' column gives the prompts to "
                         "complete). Fix: pass eval_dataset= to the trainer.")
    if isinstance(dataset, dict):
        raise ValueError(f"{who}: the trainer has several eval datasets ({sorted(dataset)}); it completes the "
                         "prompts of one. Fix: give the trainer a single eval_dataset.")
    for raw, prepared in getattr(trainer, "_prepared_eval", {}).values():
        if prepared is dataset:
            dataset = raw
            break
    if "prompt" not in (getattr(dataset, "column_names", None) or []):
        raise ValueError(f"{who}: the eval dataset has no 'prompt' column (columns: "
                         f"{getattr(dataset, 'column_names', None)}); it needs prompts to complete.")
    return dataset


def _generation_kwargs(generation_config: GenerationConfig | None) -> dict[str, Any]:
    """generate() keyword arguments for the settings a GenerationConfig changes from the defaults (so that
    tether's sampler runs them when it can); {} leaves the model's own generation config in charge."""
    if generation_config is None:
        return {}
    return {k: v for k, v in generation_config.to_diff_dict().items()
            if not k.startswith("_") and k != "transformers_version"}


def complete_eval_prompts(trainer: Any, prompts: list[Any], generation_config: GenerationConfig | None,
                          batch_size: int) -> tuple[list[str], list[str]]:
    """(prompt texts, completion texts) for `prompts` (plain strings, or conversations rendered with the chat
    template and its generation prompt), split over the processes and gathered back, so every process gets
    all of them. Call it on every process (under ZeRO-3 they gather the weights together)."""
    from accelerate.utils import gather_object

    from .data.tokenize import render_chat, tokenize_prompt
    from .distributed import unwrap_model_for_generation
    from .rollout.generation import generate_responses

    tokenizer = trainer.processing_class
    accelerator = trainer.accelerator
    with accelerator.split_between_processes(list(prompts)) as mine:
        texts = [p if isinstance(p, str) else render_chat(tokenizer, p, add_generation_prompt=True) for p in mine]
        ids = [tokenize_prompt(tokenizer, p) for p in mine]
        completions: list[str] = []
        with unwrap_model_for_generation(trainer.model_wrapped, accelerator) as model:
            if ids:
                device = next(model.parameters()).device
                responses = generate_responses(model, [torch.tensor(i, device=device) for i in ids],
                                               tokenizer.pad_token_id, batch_size=batch_size,
                                               **_generation_kwargs(generation_config))
                completions = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    return gather_object(texts), gather_object(completions)


def _markdown_table(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def _log_table(trainer: Any, args: Any, step: int, columns: list[str], all_rows: list[tuple[Any, ...]],
               new_rows: list[tuple[Any, ...]]) -> None:
    """Log the completions table to the run's trackers: W&B and Comet get the whole table so far (as TRL
    logs it), TensorBoard this step's rows as a markdown text."""
    report_to = args.report_to or []
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.log({COMPLETIONS_TABLE: wandb.Table(columns=columns, data=[list(r) for r in all_rows])})
    if "comet_ml" in report_to:
        import comet_ml
        import pandas as pd

        experiment = comet_ml.get_running_experiment()
        if experiment is not None:
            experiment.log_table(tabular_data=pd.DataFrame(all_rows, columns=columns),
                                 filename=f"{COMPLETIONS_TABLE}.csv")
    for callback in trainer.callback_handler.callbacks:
        writer = getattr(callback, "tb_writer", None)  # transformers' TensorBoardCallback, once training began
        if writer is not None:
            writer.add_text(COMPLETIONS_TABLE, _markdown_table(columns, new_rows), global_step=step)
            writer.flush()


class LogCompletionsCallback(TrainerCallback):
    """Every `freq` optimizer steps (default: the trainer's eval_steps when set, else its logging_steps), completes
    the prompts of the trainer's eval dataset (its first `num_prompts`, default all) with
    `generation_config` (default: the model's own generation config), and records (step, prompt, completion):
    in output_dir/samples.jsonl (shown by the run's report), in `self.table` (every row so far), and in the
    trackers the run reports to (W&B and Comet: the table so far, as TRL; TensorBoard: this step's rows)."""

    columns = ["step", "prompt", "completion"]

    def __init__(self, trainer: Any, generation_config: GenerationConfig | None = None,
                 num_prompts: int | None = None, freq: int | None = None) -> None:
        if freq is not None and freq < 1:
            raise ValueError(f"LogCompletionsCallback: freq={freq}; it counts optimizer steps, so it is >= 1.")
        self.trainer = trainer
        self.generation_config = generation_config
        self.freq = freq
        self.table: list[tuple[str, str, str]] = []
        self._last_logged_step = -1
        self.eval_dataset = _raw_eval_dataset(trainer, type(self).__name__)
        if num_prompts is not None:
            self.eval_dataset = self.eval_dataset.select(range(min(num_prompts, len(self.eval_dataset))))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # TRL's default is state.eval_steps, which is TrainerState's arbitrary 500 when eval_steps is unset
        # (eval_strategy "no"); then the logging steps are the natural rhythm.
        freq = self.freq or (state.eval_steps if args.eval_steps is not None else state.logging_steps)
        if state.global_step == self._last_logged_step or not freq or state.global_step % freq != 0:
            return
        prompts, completions = complete_eval_prompts(self.trainer, list(self.eval_dataset["prompt"]),
                                                     self.generation_config, args.per_device_eval_batch_size)
        rows = [(str(state.global_step), p, c) for p, c in zip(prompts, completions)]
        self.table.extend(rows)
        samples = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
        if hasattr(self.trainer, "write_samples"):  # a tether trainer: kept with its own samples for the report
            self.trainer.write_samples(samples)
        elif state.is_world_process_zero:
            from .reports.runfiles import SAMPLES_FILE, write_jsonl

            write_jsonl(os.path.join(args.output_dir, SAMPLES_FILE),
                        [{"step": state.global_step, **s} for s in samples])
        if state.is_world_process_zero:
            _log_table(self.trainer, args, state.global_step, self.columns, self.table, rows)
        self._last_logged_step = state.global_step


class WeaveCallback(TrainerCallback):
    """At each evaluation, completes the eval dataset's prompts (as `LogCompletionsCallback`) and logs them
    to W&B Weave with an `EvaluationLogger`: predictions only ("tracing"), or, given `scorers` (name ->
    f(prompt, completion) -> number), each prediction's scores and their means ("evaluation").

    Weave's project: `project_name`, else the running Weave client's, else the active W&B run's
    (entity/project). Needs the `weave` package."""

    def __init__(self, trainer: Any, project_name: str | None = None,
                 scorers: dict[str, Callable[[str, str], float]] | None = None,
                 generation_config: GenerationConfig | None = None, num_prompts: int | None = None,
                 dataset_name: str = "eval_dataset", model_name: str | None = None) -> None:
        try:
            import weave  # noqa: F401
        except ImportError as error:
            raise ImportError("WeaveCallback needs the `weave` package (W&B Weave), which cannot be imported. "
                              "Install it with: pip install weave") from error
        self.trainer = trainer
        self.project_name = project_name
        self.scorers = dict(scorers or {})
        self.generation_config = generation_config
        self.dataset_name = dataset_name
        self.model_name = model_name
        self._last_logged_step = -1
        self._client = None
        self.eval_dataset = _raw_eval_dataset(trainer, type(self).__name__)
        if num_prompts is not None:
            self.eval_dataset = self.eval_dataset.select(range(min(num_prompts, len(self.eval_dataset))))

    @property
    def is_evaluation_mode(self) -> bool:
        """Whether predictions are scored (scorers given) rather than only traced."""
        return bool(self.scorers)

    def _init_weave(self) -> None:
        if self._client is not None:
            return
        import weave
        from weave.trace.context import weave_client_context

        self._client = weave_client_context.get_weave_client()
        if self._client is None:
            if self.project_name is None:
                try:
                    import wandb

                    if wandb.run is not None:
                        self.project_name = f"{wandb.run.entity}/{wandb.run.project}"
                except ImportError:
                    pass
            if self.project_name is None:
                raise ValueError("WeaveCallback: no Weave client is running and no project to start one in. Fix: "
                                 "call weave.init('project'), pass project_name=..., or start a wandb run.")
            self._client = weave.init(self.project_name)
        if self.model_name is None:
            config = getattr(self.trainer.accelerator.unwrap_model(self.trainer.model), "config", None)
            self.model_name = getattr(config, "_name_or_path", None) or "unknown_model"

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._init_weave()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self._last_logged_step:
            return
        prompts, completions = complete_eval_prompts(self.trainer, list(self.eval_dataset["prompt"]),
                                                     self.generation_config, args.per_device_eval_batch_size)
        if state.is_world_process_zero:
            self._init_weave()
            self._log(prompts, completions, state.global_step)
        self._last_logged_step = state.global_step

    def _log(self, prompts: list[str], completions: list[str], step: int) -> None:
        from weave import EvaluationLogger

        attributes = {"training_step": step, "model_name": self.model_name,
                      "generation_config": self.generation_config.to_dict() if self.generation_config else None}
        evaluation = EvaluationLogger(model=self.model_name, dataset=self.dataset_name, eval_attributes=attributes)
        scores: dict[str, list[float]] = {name: [] for name in self.scorers}
        logged = 0
        for prompt, completion in zip(prompts, completions):
            try:  # a logging failure must not stop training
                prediction = evaluation.log_prediction(inputs={"prompt": prompt}, output=completion)
                for name, scorer in self.scorers.items():
                    try:
                        score = scorer(prompt, completion)
                    except Exception as error:
                        logger.warning("WeaveCallback: scorer %r failed: %s", name, error)
                        continue
                    prediction.log_score(scorer=name, score=score)
                    scores[name].append(score)
                prediction.finish()
                logged += 1
            except Exception as error:
                logger.warning("WeaveCallback: could not log a prediction: %s", error)
        try:
            if self.is_evaluation_mode and any(scores.values()):
                summary: dict[str, Any] = {"total_predictions": len(prompts), "successful_predictions": logged}
                summary.update({f"avg_{name}": sum(v) / len(v) for name, v in scores.items() if v})
                evaluation.log_summary(summary)
            else:
                evaluation.finish()
        except Exception as error:
            logger.warning("WeaveCallback: could not finish the evaluation log: %s", error)


# ----- progress display -----------------------------------------------------------------------------------------
class RichProgressCallback(TrainerCallback):
    """Training and evaluation progress bars and the latest logged metrics (grouped by their "group/" prefix)
    in a live terminal panel, drawn with `rich`, on the main process."""

    def __init__(self) -> None:
        from transformers.utils import is_rich_available

        if not is_rich_available():
            raise ImportError("RichProgressCallback needs the `rich` package, which cannot be imported. Install it "
                              "with: pip install rich")
        self._reset()

    def _reset(self) -> None:
        self.training_bar = self.evaluation_bar = self.training_task = self.evaluation_task = None
        self.rich_group = self.rich_console = self.training_status = None
        self.current_step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        from rich.console import Console, Group
        from rich.live import Live
        from rich.panel import Panel
        from rich.progress import Progress

        self.training_bar, self.evaluation_bar = Progress(), Progress()
        self.rich_console = Console()
        self.training_status = self.rich_console.status("Nothing logged yet ...")
        self.rich_group = Live(Panel(Group(self.training_bar, self.evaluation_bar, self.training_status)),
                               console=self.rich_console)
        self.rich_group.start()
        self.training_task = self.training_bar.add_task("[blue]Training  ", total=state.max_steps,
                                                        completed=state.global_step)  # resumed runs start there
        self.current_step = state.global_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.training_bar is None:
            return
        self.training_bar.update(self.training_task, advance=state.global_step - self.current_step, refresh=True)
        self.current_step = state.global_step

    def on_prediction_step(self, args: Any, state: Any, control: Any, eval_dataloader: Any = None,
                           **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.evaluation_bar is None or not has_length(eval_dataloader):
            return
        if self.evaluation_task is None:
            self.evaluation_task = self.evaluation_bar.add_task("[blue]Evaluation", total=len(eval_dataloader))
        self.evaluation_bar.update(self.evaluation_task, advance=1, refresh=True)

    def _end_evaluation(self, state: Any) -> None:
        if state.is_world_process_zero and self.evaluation_task is not None:
            self.evaluation_bar.remove_task(self.evaluation_task)
            self.evaluation_task = None

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end_evaluation(state)

    def on_predict(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end_evaluation(state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.training_status is None or not logs:
            return
        from rich.columns import Columns
        from rich.panel import Panel
        from rich.table import Table

        groups: dict[str | None, dict[str, Any]] = {}
        for key, value in logs.items():
            group, name = key.split("/", 1) if "/" in key else (None, key)  # "rewards/chosen": group "rewards"
            groups.setdefault(group, {})[name] = value
        panels = []
        for group, metrics in groups.items():
            table = Table(title=f"[bold blue]{group}[/]" if group else None, header_style="bold magenta", box=None)
            table.add_column("Metric", justify="left", no_wrap=True)
            table.add_column("Value", justify="right")
            for name, value in metrics.items():
                table.add_row(name, f"{value:.3f}" if isinstance(value, (int, float)) else str(value))
            panels.append(Panel(table, border_style="cyan", padding=(0, 1)))
        self.latest_logs = dict(logs)
        self.training_status.update(Panel(Columns(panels, equal=False, expand=True),
                                          title=f"[bold green]Step {state.global_step}[/bold green]",
                                          border_style="green"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.rich_group is None:
            return
        self.rich_group.stop()
        self._reset()


# ----- BEMA ---------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DeepSpeed / FSDP / (Distributed)DataParallel wrappers."""
    if hasattr(model, "_fsdp_wrapped_module"):
        return model._fsdp_wrapped_module
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


class BEMACallback(TrainerCallback):
    """BEMA, the bias-corrected exponential moving average of the weights (Block & Zhang, 2025, "EMA Without
    the Lag: Bias-Corrected Iterate Averaging Schemes", Algorithm 1). For each trainable parameter, at the
    optimizer steps t = tau + k * phi (k >= 1):

        beta_t  = max((rho + gamma * t) ** -kappa, min_ema_multiplier)
        alpha_t = (rho + gamma * t) ** -eta
        EMA_t   = (1 - beta_t) * EMA_prev + beta_t * theta_t
        BEMA_t  = EMA_t + alpha_t * (theta_t - theta_0)

    with tau = update_after (theta_0 and the EMA are set to theta_tau at step tau; with tau = 0, to the
    weights training starts from), phi = update_freq, rho = lag, gamma = multiplier, kappa = ema_power
    (0: no averaging, BEMA_t = theta_t + alpha_t (theta_t - theta_0)), eta = bias_power (large: no bias
    correction, plain EMA). t is the trainer's global step, as in TRL. BEMA_t is kept in `running_model`, a
    copy of the model on `device` (keep it off the training accelerator to save its memory), saved to
    output_dir/bema at the end of training.

    `update_ref_model=True` (TRL's experimental `bema_for_ref_model`) also loads BEMA_t into the trainer's
    reference model at the steps t = ref_model_update_after + k * ref_model_update_freq (k >= 0, t >= 1),
    so DPO's reference becomes a lagged, smoothed copy of the policy. It needs a trainer that passes its
    separate `ref_model` to callbacks (see `RefModelCallbackHandler`); a PEFT policy whose reference is
    itself with the adapter off has no separate reference and is refused.
    """

    def __init__(self, update_freq: int = 400, ema_power: float = 0.5, bias_power: float = 0.2, lag: int = 10,
                 update_after: int = 0, multiplier: float = 1.0, min_ema_multiplier: float = 0.0,
                 device: str = "cpu", update_ref_model: bool = False, ref_model_update_freq: int = 400,
                 ref_model_update_after: int = 0) -> None:
        for name, value in (("update_freq", update_freq), ("ref_model_update_freq", ref_model_update_freq)):
            if value < 1:
                raise ValueError(f"BEMACallback: {name}={value}; it counts optimizer steps, so it is >= 1.")
        if lag + multiplier <= 0:
            raise ValueError(f"BEMACallback: lag + multiplier = {lag + multiplier}; the schedule (lag + multiplier "
                             "* t) ** -power needs a positive base.")
        self.update_freq = update_freq
        self.ema_power = ema_power
        self.bias_power = bias_power
        self.lag = lag
        self.update_after = update_after
        self.multiplier = multiplier
        self.min_ema_multiplier = min_ema_multiplier
        self.device = device
        self.update_ref_model = update_ref_model
        self.ref_model_update_freq = ref_model_update_freq
        self.ref_model_update_after = ref_model_update_after
        self.param_names: list[str] = []
        self.thetat_params: list[nn.Parameter] = []  # the live trainable parameters
        self.theta0_params: list[torch.Tensor] = []  # theta_0, on `device`
        self.ema_params: list[torch.Tensor] = []  # the EMA, on `device`
        self.running_model: nn.Module | None = None  # BEMA weights, on `device`
        self._running_params: list[nn.Parameter] = []

    def _ema_beta(self, step: int) -> float:
        """beta_t = max((rho + gamma t)^-kappa, min_ema_multiplier)."""
        return max((self.lag + self.multiplier * step) ** -self.ema_power, self.min_ema_multiplier)

    def _bema_alpha(self, step: int) -> float:
        """alpha_t = (rho + gamma t)^-eta."""
        return (self.lag + self.multiplier * step) ** -self.bias_power

    @torch.no_grad()
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        model = _unwrap(model)
        if self.update_ref_model:
            self._check_reference(kwargs, model)
        # A copy of the whole model (frozen parts included), so it can be saved and run as the model is.
        self.running_model = copy.deepcopy(model).to(self.device)
        self.running_model.requires_grad_(False)
        running = dict(self.running_model.named_parameters())
        self.param_names, self.thetat_params, self.theta0_params, self.ema_params = [], [], [], []
        self._running_params = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            self.param_names.append(name)
            self.thetat_params.append(param)
            self.theta0_params.append(param.detach().to(self.device, copy=True))
            self.ema_params.append(param.detach().to(self.device, copy=True))
            self._running_params.append(running[name])

    def _check_reference(self, callback_kwargs: dict[str, Any], model: nn.Module) -> None:
        if "ref_model" not in callback_kwargs:
            raise ValueError("BEMACallback(update_ref_model=True) needs the trainer's reference model, which this "
                             "trainer does not pass to its callbacks. Fix: use a trainer with a reference model "
                             "(DPOTrainer, KTOTrainer), or install RefModelCallbackHandler on it.")
        if callback_kwargs["ref_model"] is None:
            raise ValueError("BEMACallback(update_ref_model=True): the trainer has no separate reference model (a "
                             "PEFT policy whose reference is itself with the adapter off, reference_free=True, or "
                             "precomputed reference log-probs), so there is nothing to update. Fix: set "
                             "update_ref_model=False, or train without peft_config.")

    def _update_bema_weights(self, step: int) -> None:
        beta, alpha = self._ema_beta(step), self._bema_alpha(step)
        for theta_t, theta_0, ema, running in zip(self.thetat_params, self.theta0_params, self.ema_params,
                                                  self._running_params):
            theta_t = theta_t.detach().to(self.device, ema.dtype)
            ema.mul_(1.0 - beta).add_(theta_t, alpha=beta)  # EMA_t = (1 - beta) EMA + beta theta_t
            running.copy_(ema + alpha * (theta_t - theta_0))  # BEMA_t = EMA_t + alpha (theta_t - theta_0)

    @torch.no_grad()
    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                    **kwargs: Any) -> None:
        step = state.global_step
        if step == self.update_after:
            for theta_t, theta_0, ema in zip(self.thetat_params, self.theta0_params, self.ema_params):
                theta_0.copy_(theta_t.detach())
                ema.copy_(theta_t.detach())
        elif step > self.update_after and (step - self.update_after) % self.update_freq == 0:
            self._update_bema_weights(step)
            logger.info("BEMA weights updated at step %d", step)
        if (self.update_ref_model and step >= self.ref_model_update_after
                and (step - self.ref_model_update_after) % self.ref_model_update_freq == 0):
            self._check_reference(kwargs, model)
            reference = _unwrap(kwargs["ref_model"])
            try:
                reference.load_state_dict(self.running_model.state_dict())
            except RuntimeError as error:
                raise ValueError("BEMACallback(update_ref_model=True): the reference model's parameters are not the "
                                 "policy's, so it cannot take the BEMA weights. Fix: let the trainer copy the policy "
                                 f"(ref_model=None) or pass a reference of the same architecture. ({error})") from error
            logger.info("BEMA weights loaded into the reference model at step %d", step)

    @torch.no_grad()
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.running_model is not None:
            path = os.path.join(args.output_dir, "bema")
            if hasattr(self.running_model, "save_pretrained"):
                self.running_model.save_pretrained(path)
            else:  # a plain nn.Module
                from safetensors.torch import save_model

                os.makedirs(path, exist_ok=True)
                save_model(self.running_model, os.path.join(path, "model.safetensors"))
            logger.info("BEMA model saved to %s", path)


class RefModelCallbackHandler(CallbackHandler):
    """transformers' callback handler, also passing the trainer's reference model (`trainer.ref_model`,
    looked up at each event: it may be replaced, e.g. by model_init) to every callback as `ref_model`.
    BEMACallback(update_ref_model=True) reads it. `RefModelCallbackHandler.install(trainer)` swaps it in."""

    def __init__(self, callbacks: list, model: Any, processing_class: Any, optimizer: Any, lr_scheduler: Any,
                 ref_model_of: Callable[[], Any] | None = None) -> None:
        super().__init__(callbacks, model, processing_class, optimizer, lr_scheduler)
        self.ref_model_of = ref_model_of or (lambda: None)

    @classmethod
    def install(cls, trainer: Any) -> None:
        """Replace `trainer.callback_handler` by one that passes `trainer.ref_model` (same callbacks, in order)."""
        if isinstance(trainer.callback_handler, cls):
            return
        # The old handler's state as it is (callbacks, model, optimizer, dataloaders...): building one through
        # __init__ would add the callbacks again and warn that a list without DefaultFlowCallback was given.
        handler = cls.__new__(cls)
        handler.__dict__.update(vars(trainer.callback_handler))
        handler.ref_model_of = lambda: getattr(trainer, "ref_model", None)
        trainer.callback_handler = handler

    def call_event(self, event: str, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return super().call_event(event, args, state, control, ref_model=self.ref_model_of(), **kwargs)


# SyncRefModelCallback resolves through __getattr__ above.
__all__ = ["BEMACallback", "LogCompletionsCallback", "RefModelCallbackHandler", "RichProgressCallback",
           "WeaveCallback", "complete_eval_prompts"]
