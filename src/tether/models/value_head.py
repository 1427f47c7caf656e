"""Language models with a value head: a scalar value per token for PPO's critic, TRL 0.7's classic API.

`AutoModelForCausalLMWithValueHead.from_pretrained(path)` wraps a causal LM (optionally with a PEFT
adapter, optionally quantized) and adds a linear head on the final hidden state; `forward` returns
(lm_logits, loss, value) as TRL's did. `save_pretrained` writes the LM (or its adapter) and the value head
(`value_head.safetensors`); `from_pretrained` reads both back, and also reads a head that TRL saved as
`v_head.*` entries of the LM's own weight files. With `reward_adapter=`, a LoRA reward model trained on the
same base rides along, frozen: `compute_reward_score` scores with it (multi-adapter RLHF: policy adapter,
value head and reward adapter on one base model).

Shapes: b = batch, t = tokens, h = hidden size, v = vocabulary.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from .loading import (
    apply_peft,
    find_model_file,
    is_peft_model,
    load_peft_adapter,
    load_reward_adapter,
    model_init_kwargs,
    read_weights,
    resolve_model_source,
)
from .scoring import adapter_token_scores

VALUE_HEAD_FILE = "value_head.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
# TRL saved the head as `v_head.*` entries inside the LM's weights (a PEFT policy: alone in pytorch_model.bin).
TRL_WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                    ("pytorch_model.bin", "pytorch_model.bin.index.json"))
# The default value head is drawn from its own generator with this fixed seed, never from the global RNG:
# the head a model starts with is then a function of its hidden size only, so a PPO run is reproduced by
# PPOConfig.seed whatever was drawn before PPOTrainer seeded (model loading, data shuffling, other models),
# and every process of a distributed run starts from the same head. A seed taken from the model's config
# would add nothing: two models of one hidden size are different models anyway.
VALUE_HEAD_INIT_SEED = 0
# Likewise for a new LoRA adapter created by from_pretrained(peft_config=...): its random A matrices.
ADAPTER_INIT_SEED = 0
INIT_STRATEGIES = (None, "normal")


def _linear_default_init(linear: nn.Linear, seed: int) -> None:
    """nn.Linear's own initialisation (uniform in +-1/sqrt(fan_in)), drawn from a generator seeded with
    `seed`: the same draws as reset_parameters() under torch.manual_seed(seed), without touching the global RNG."""
    generator = torch.Generator(device=linear.weight.device).manual_seed(seed)
    with torch.no_grad():
        nn.init.kaiming_uniform_(linear.weight, a=5 ** 0.5, generator=generator)
        bound = 1 / linear.in_features ** 0.5
        nn.init.uniform_(linear.bias, -bound, bound, generator=generator)


def _is_peft_config(value: Any) -> bool:
    from peft import PeftConfig

    return isinstance(value, PeftConfig)


class ValueHead(nn.Module):
    """hidden [b, t, h] -> value [b, t]: optional dropout, then one linear unit."""

    def __init__(self, hidden_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.summary.weight.dtype)
        return self.summary(self.dropout(hidden)).squeeze(-1)


def _hidden_size(model: nn.Module) -> int:
    """Width of the final hidden state: what the LM head reads (OPT projects it below hidden_size), else
    the config's size."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(getattr(head, "in_features", None), int):
        return head.in_features
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("word_embed_proj_dim", "hidden_size", "d_model", "n_embd"):
        if getattr(config, name, None):
            return getattr(config, name)
    raise ValueError(f"Cannot find the hidden size in {type(config).__name__}; pass v_head_hidden_size=.")


def _fork_rng_on(model: nn.Module) -> Any:
    """A context in which the global RNGs (CPU and the model's CUDA devices) may be reseeded and are
    restored on exit, so what is drawn inside leaves the caller's random stream untouched."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


class PreTrainedModelWrapper(nn.Module):
    """A transformers model (`pretrained_model`, possibly a PEFT model) plus a value head (`v_head`), and
    optionally a frozen reward adapter's score head (`score`).

    Subclasses set `transformers_parent_class` (the Auto class that loads the wrapped model) and `forward`.
    `state_dict` and `load_state_dict` are nn.Module's own (keys `pretrained_model.*`, `v_head.*`), which
    accelerate, DeepSpeed and torch.distributed.checkpoint rely on; `save_pretrained` writes the LM the
    transformers way and the head beside it.
    """

    transformers_parent_class: Any = None
    # from_pretrained's keywords that configure the value head (TRL's list); other keywords go to the LM.
    supported_args: tuple[str, ...] = ("summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy")
    # Names of a reward adapter's classification head in its saved weights.
    supported_rm_modules: tuple[str, ...] = ("score",)

    def __init__(self, pretrained_model: PreTrainedModel | nn.Module, *, summary_dropout_prob: float | None = None,
                 v_head_init_strategy: str | None = None, v_head_initializer_range: float = 0.2,
                 v_head_hidden_size: int | None = None, score_module: nn.Module | None = None,
                 supports_rm_adapter: bool = False, rm_adapter_name: str | None = None) -> None:
        """`summary_dropout_prob`: dropout on the head's input (default: the config's `summary_dropout_prob`
        if it has one, else none). `v_head_init_strategy`: None (nn.Linear's initialisation, drawn from a
        fixed-seed generator, see VALUE_HEAD_INIT_SEED) or "normal" (weight ~ N(0, v_head_initializer_range),
        bias 0, from the global RNG as in TRL). `score_module`/`supports_rm_adapter`/`rm_adapter_name`: the
        reward adapter's head and adapter name (set by from_pretrained(reward_adapter=...))."""
        super().__init__()
        if v_head_init_strategy not in INIT_STRATEGIES:
            raise ValueError(f"v_head_init_strategy={v_head_init_strategy!r} is not supported; use None (nn.Linear's "
                             "default initialisation) or 'normal'.")
        if getattr(pretrained_model, "get_output_embeddings", lambda: None)() is None:
            raise ValueError(f"{type(pretrained_model).__name__} has no language-model head; wrap a model loaded "
                             f"with {getattr(self.transformers_parent_class, '__name__', 'an AutoModelFor...LM')}.")
        peft_config = getattr(pretrained_model, "active_peft_config", None)
        if getattr(peft_config, "is_prompt_learning", False):
            raise ValueError(f"{type(peft_config).__name__} (prompt learning) is not supported with a value head; "
                             "use an adapter such as LoraConfig.")
        self.pretrained_model = pretrained_model
        self.config = pretrained_model.config
        self.is_peft_model = is_peft_model(pretrained_model)
        self.is_loaded_in_8bit = bool(getattr(pretrained_model, "is_loaded_in_8bit", False))
        self.is_loaded_in_4bit = bool(getattr(pretrained_model, "is_loaded_in_4bit", False))
        self.is_sequential_parallel = False  # set by post_init when a device_map spreads the LM over devices
        if summary_dropout_prob is None:
            summary_dropout_prob = getattr(self.config, "summary_dropout_prob", None) or 0.0
        self.v_head = ValueHead(v_head_hidden_size or _hidden_size(pretrained_model), summary_dropout_prob)
        self._init_weights(v_head_init_strategy=v_head_init_strategy,
                           v_head_initializer_range=v_head_initializer_range)
        if supports_rm_adapter and (score_module is None or not rm_adapter_name):
            raise ValueError("supports_rm_adapter=True needs score_module= and rm_adapter_name=.")
        self.supports_rm_adapter = supports_rm_adapter
        self.rm_adapter_name = rm_adapter_name
        if score_module is not None:
            self.score = score_module

    def _init_weights(self, v_head_init_strategy: str | None = None, v_head_initializer_range: float = 0.2,
                      seed: int = VALUE_HEAD_INIT_SEED) -> None:
        """Initialise the value head: None -> nn.Linear's initialisation (weight and bias uniform in
        +-1/sqrt(h), TRL's default) from a generator seeded with `seed`; "normal" -> weight
        ~ N(0, v_head_initializer_range) from the global RNG and bias 0, exactly as TRL did.

        A default-initialised head counts as untouched (`has_untouched_value_head`) until other weights are
        loaded or written into it, so a trainer may draw it again from its own seed (PPOTrainer does, with
        PPOConfig.seed)."""
        summary = self.v_head.summary
        self._default_head_drawn = v_head_init_strategy is None
        if v_head_init_strategy == "normal":
            summary.weight.data.normal_(mean=0.0, std=v_head_initializer_range)
            summary.bias.data.zero_()
            return
        if summary.weight.device.type == "meta":
            return
        _linear_default_init(summary, seed)

    def has_untouched_value_head(self) -> bool:
        """Whether the value head still holds exactly the default draw of VALUE_HEAD_INIT_SEED: nothing was
        loaded into it and nobody set or trained its weights since."""
        summary = self.v_head.summary
        if not getattr(self, "_default_head_drawn", False) or summary.weight.device.type == "meta":
            return False
        reference = nn.Linear(summary.in_features, 1, device=summary.weight.device, dtype=summary.weight.dtype)
        _linear_default_init(reference, VALUE_HEAD_INIT_SEED)
        return torch.equal(reference.weight, summary.weight) and torch.equal(reference.bias, summary.bias)

    # ----- loading ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | nn.Module,
        *model_args: Any,
        peft_config: Any = None,
        is_trainable: bool = True,
        reward_adapter: str | None = None,
        reward_adapter_name: str = "reward_adapter",
        summary_dropout_prob: float | None = None,
        v_head_init_strategy: str | None = None,
        v_head_initializer_range: float = 0.2,
        v_head_hidden_size: int | None = None,
        use_gradient_checkpointing: bool = False,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> PreTrainedModelWrapper:
        """Load (or wrap) a model and add a value head, restored if the source holds one.

        Source: a hub id or folder, or a model object (`PreTrainedModel` or PEFT model). A folder with an
        `adapter_config.json` (a saved PEFT policy) loads as its base model (by the path the adapter records)
        plus that adapter, which trains unless `is_trainable=False` (TRL's default was False; tether keeps
        a reloaded PPO checkpoint trainable). The value head comes from `value_head.safetensors`, else from
        TRL's `v_head.*` entries in model.safetensors / pytorch_model.bin (sharded or not); else it is new.

        peft_config: a `peft.PeftConfig` (e.g. LoraConfig): a new adapter, the only trainable part of the LM;
            over a quantized model (load_in_4bit/load_in_8bit/quantization_config) the base is prepared
            for k-bit training first (QLoRA).
        reward_adapter / reward_adapter_name: folder or hub id of a LoRA reward model trained (task SEQ_CLS)
            on the same base model; loaded frozen beside the policy adapter, for `compute_reward_score`.
        summary_dropout_prob, v_head_init_strategy, v_head_initializer_range, v_head_hidden_size: the value
            head (see __init__).
        use_gradient_checkpointing / gradient_checkpointing_kwargs: activation checkpointing in the LM
            (TRL passed these to peft's prepare_model_for_kbit_training).
        kwargs: to the transformers `from_pretrained` (dtype/torch_dtype, device_map, load_in_4bit,
            load_in_8bit, bnb_4bit_*, quantization_config, use_safetensors, token, revision, attn_implementation,
            config overrides, ...); `token` and `revision` also apply to the adapter and value-head files.
        """
        # peft (and the bitsandbytes it imports) only when an adapter is involved: ~55 MiB of memory otherwise
        if peft_config is not None and not _is_peft_config(peft_config):
            raise ValueError(f"peft_config must be a peft.PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}.")
        if reward_adapter is not None and not isinstance(reward_adapter, (str, os.PathLike)):
            raise ValueError("reward_adapter must be the folder or hub id of a PEFT reward adapter, got "
                             f"{type(reward_adapter).__name__}.")
        # A missing local folder is named as such here, not as a malformed hub id by transformers.
        source = resolve_model_source(pretrained_model_name_or_path, "model")
        token, revision = kwargs.get("token"), kwargs.get("revision")
        hub_kwargs = {k: v for k, v in (("token", token), ("revision", revision)) if v is not None}
        if isinstance(source, nn.Module):
            model = source
            if kwargs or model_args:
                warnings.warn(f"from_pretrained got a model object, so the loading arguments {sorted(kwargs)} "
                              "are not used.", UserWarning, stacklevel=2)
            if peft_config is not None and is_peft_model(model):
                raise ValueError("The model already is a PEFT model; drop peft_config to use its adapter.")
        elif not isinstance(source, str):
            raise ValueError("pretrained_model_name_or_path must be a model id, a folder or a PreTrainedModel, got "
                             f"{type(source).__name__}.")
        else:
            if cls.transformers_parent_class is None:
                raise ValueError(f"{cls.__name__} has no transformers_parent_class to load {source!r} with; use "
                                 "AutoModelForCausalLMWithValueHead or AutoModelForSeq2SeqLMWithValueHead.")
            init_kwargs = model_init_kwargs(kwargs)
            if find_model_file(source, ADAPTER_CONFIG_FILE, token, revision) is not None:
                # A saved PEFT policy: its base model (by the path the adapter records) + the adapter.
                if peft_config is not None:
                    raise ValueError(f"{source} already holds a PEFT adapter; drop peft_config to load it.")
                from peft import PeftConfig

                base_path = PeftConfig.from_pretrained(source, **hub_kwargs).base_model_name_or_path
                base_kwargs = {k: v for k, v in init_kwargs.items() if k != "revision"}  # the adapter's revision
                base = cls.transformers_parent_class.from_pretrained(base_path, *model_args, **base_kwargs)
                model = load_peft_adapter(base, source, is_trainable=is_trainable, **hub_kwargs)
            else:
                model = cls.transformers_parent_class.from_pretrained(source, *model_args, **init_kwargs)
        if use_gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
            if is_peft_model(model):  # a loaded adapter under frozen embeddings: checkpointed inputs need grad
                model.enable_input_require_grads()
        if peft_config is not None and not is_peft_model(model):
            with _fork_rng_on(model):  # a new adapter starts the same whatever the caller drew before
                torch.manual_seed(ADAPTER_INIT_SEED)
                model = apply_peft(model, peft_config, activation_checkpointing=use_gradient_checkpointing)

        rm_args = {}
        if reward_adapter is not None:
            if not is_peft_model(model):
                raise ValueError("reward_adapter needs a PEFT policy to share the base model with: pass "
                                 "peft_config= (e.g. LoraConfig(task_type='CAUSAL_LM')) or load a saved adapter.")
            if getattr(model.config, "is_encoder_decoder", False):
                raise ValueError("reward_adapter is supported for causal LMs only.")
            score = load_reward_adapter(model, os.fspath(reward_adapter), reward_adapter_name, cls.supported_rm_modules,
                                        token=token, revision=revision)
            rm_args = {"score_module": score, "supports_rm_adapter": True, "rm_adapter_name": reward_adapter_name}
        wrapper = cls(model, summary_dropout_prob=summary_dropout_prob, v_head_init_strategy=v_head_init_strategy,
                      v_head_initializer_range=v_head_initializer_range, v_head_hidden_size=v_head_hidden_size,
                      **rm_args)
        saved_head = _saved_value_head(source, token, revision) if isinstance(source, str) else None
        wrapper.post_init(saved_head)
        return wrapper

    def post_init(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Load the value head from `state_dict`'s `v_head.*` entries (other entries are ignored; TRL's
        layout puts the LM's weights in the same dict), then place the heads: beside the LM head, and with a
        device_map that spreads the LM over several devices, mark the model sequential-parallel."""
        head_state = {k.split("v_head.", 1)[1]: v for k, v in (state_dict or {}).items() if "v_head." in k}
        if head_state:
            self.v_head.load_state_dict(head_state)
            self._default_head_drawn = False
        device_map = getattr(self.pretrained_model, "hf_device_map", None) or {}
        places = {str(place) for place in device_map.values()}
        if "disk" in places or ("cpu" in places and len(places) > 1):
            raise ValueError("The LM is offloaded to CPU or disk (device_map); value-head models train with every "
                             "weight on a device. Use a device_map without offloading.")
        self.is_sequential_parallel = len(places) > 1
        device = self.pretrained_model.get_output_embeddings().weight.device
        self.v_head.to(device)  # only the heads move: the LM keeps its (possibly quantized) placement
        if hasattr(self, "score"):
            self.score.to(device)

    @classmethod
    def add_and_load_reward_modeling_adapter(cls, pretrained_model: nn.Module, adapter_model_id: str,
                                             adapter_name: str = "reward_model_adapter",
                                             token: str | bool | None = None) -> nn.Linear:
        """Add the frozen reward adapter at `adapter_model_id` to the PEFT model `pretrained_model` and
        return its frozen score head, nn.Linear(h, num_labels) (see loading.load_reward_adapter)."""
        if not is_peft_model(pretrained_model):
            raise ValueError("A reward adapter can only be added to a PEFT model.")
        return load_reward_adapter(pretrained_model, adapter_model_id, adapter_name, cls.supported_rm_modules,
                                   token=token)

    # ----- saving -----------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any,
                        state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        """The LM (its adapter only, for PEFT; never the reward adapter) and `value_head.safetensors`, side
        by side. `state_dict` (e.g. `accelerator.get_state_dict(model)` under ZeRO-3) may be this wrapper's
        state dict or TRL's layout (LM keys unprefixed, head under `v_head.`); other args go to the LM's
        save_pretrained."""
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        head_state = None
        if state_dict is not None:
            lm_state, head_state = _split_state_dict(state_dict)
            kwargs["state_dict"] = lm_state
        if self.is_peft_model and self.supports_rm_adapter and "selected_adapters" not in kwargs:
            kwargs["selected_adapters"] = [name for name in self.pretrained_model.peft_config
                                           if name != self.rm_adapter_name]
        self.pretrained_model.save_pretrained(save_directory, *args, **kwargs)
        head_state = head_state or self.v_head.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in head_state.items()},
                  os.path.join(save_directory, VALUE_HEAD_FILE))

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                    **save_kwargs: Any) -> Any:
        """Upload what `save_pretrained` writes (the LM or its adapter, and the value head) to the hub repo
        `repo_id`, created if missing; `from_pretrained(repo_id)` loads it back. Returns the commit info."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **save_kwargs)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or "Upload model with value head")

    # ----- multi-adapter RLHF -----------------------------------------------------------------------------
    def compute_reward_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                             ppo_adapter_name: str | None = None, **kwargs: torch.Tensor) -> torch.Tensor:
        """The reward adapter's score head at every position: input_ids, attention_mask [b, t] ->
        [b, t, num_labels] float32, without gradient (a sequence's reward is usually read at its last real
        token). The reward adapter computes the hidden states; afterwards `ppo_adapter_name` (default: the
        adapter that was active, the policy's) is active again and nothing else changed."""
        if not self.supports_rm_adapter:
            raise ValueError("This model has no reward adapter: load it with from_pretrained(..., peft_config=..., "
                             "reward_adapter='path/to/reward_adapter').")
        return adapter_token_scores(self.pretrained_model, self.rm_adapter_name, self.score, input_ids,
                                    attention_mask, restore_adapter=ppo_adapter_name, **kwargs)

    # ----- the wrapped model's own methods ----------------------------------------------------------------
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.pretrained_model.generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.pretrained_model.prepare_inputs_for_generation(*args, **kwargs)

    @property
    def generation_config(self) -> Any:
        return getattr(self.pretrained_model, "generation_config", None)

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.pretrained_model.generation_config = value

    def get_output_embeddings(self) -> nn.Module:
        return self.pretrained_model.get_output_embeddings()

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.pretrained_model.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.pretrained_model.gradient_checkpointing_disable()

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        self.pretrained_model.activation_checkpointing_enable(**kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.pretrained_model.activation_checkpointing_disable()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def current_device(self) -> torch.device:
        """Where the values (and logits) come out: the device of the value head."""
        return self.v_head.summary.weight.device

    def _value(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.v_head(hidden.to(self.v_head.summary.weight.device))


def _split_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LM entries, value-head entries) of a wrapper's state dict (`pretrained_model.*`) or of TRL's layout
    (LM entries unprefixed); the reward adapter's score head (`score.*`) is in neither."""
    lm_state, head_state = {}, {}
    for key, value in state_dict.items():
        if key.startswith("v_head."):
            head_state[key[len("v_head."):]] = value
        elif not key.startswith("score."):
            lm_state[key.removeprefix("pretrained_model.")] = value
    return lm_state, head_state


def _is_head_entry(name: str) -> bool:
    return name.startswith("v_head.")


def _saved_value_head(source: str, token: str | bool | None, revision: str | None) -> dict[str, torch.Tensor] | None:
    """The value head saved with a model, as `v_head.*` entries: tether's value_head.safetensors, else TRL's
    entries in the model's weight files (whole or sharded); None for a model saved without one."""
    path = find_model_file(source, VALUE_HEAD_FILE, token, revision)
    if path is not None:
        return {f"v_head.{k}": v for k, v in load_file(path).items()}
    for weights_name, index_name in TRL_WEIGHT_FILES:
        path = find_model_file(source, weights_name, token, revision)
        if path is not None:
            shards = [path]
        elif (index := find_model_file(source, index_name, token, revision)) is not None:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = [find_model_file(source, name, token, revision)
                      for name in sorted({name for key, name in weight_map.items() if _is_head_entry(key)})]
        else:
            continue
        # One save writes one format: the first one present is the one to read (and on the hub, a repo
        # holding both formats is not downloaded twice).
        state = {k: v for shard in shards if shard is not None for k, v in read_weights(shard, _is_head_entry).items()}
        return state or None
    return None


class AutoModelForCausalLMWithValueHead(PreTrainedModelWrapper):
    """A causal LM plus a value head on its final hidden state."""

    transformers_parent_class = AutoModelForCausalLM
    lm_head_namings = ("lm_head", "embed_out")

    def forward(self, input_ids: torch.Tensor | None = None, past_key_values: Any = None,
                attention_mask: torch.Tensor | None = None, **kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(lm_logits [b, t, v] float32, loss or None, value [b, t]); kwargs go to the LM (labels,
        position_ids, logits_to_keep, ...)."""
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        kwargs["output_hidden_states"] = True
        outputs = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        value = self._value(outputs.hidden_states[-1])
        return outputs.logits.float(), getattr(outputs, "loss", None), value


class AutoModelForSeq2SeqLMWithValueHead(PreTrainedModelWrapper):
    """An encoder-decoder LM plus a value head on the decoder's final hidden state."""

    transformers_parent_class = AutoModelForSeq2SeqLM
    lm_head_namings = ("lm_head", "embed_out", "output_projection")
    is_encoder_decoder = True

    def forward(self, input_ids: torch.Tensor | None = None, past_key_values: Any = None,
                attention_mask: torch.Tensor | None = None, **kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(lm_logits [b, t, v] float32, loss or None, value [b, t]) over decoder positions."""
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        kwargs["output_hidden_states"] = True
        outputs = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        value = self._value(outputs.decoder_hidden_states[-1])
        return outputs.logits.float(), getattr(outputs, "loss", None), value


# TRL's `trl.models.SUPPORTED_ARCHITECTURES`.
SUPPORTED_ARCHITECTURES = (AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead)
