"""`ModelConfig`: which model to load and how (dtype, attention, LoRA, 4/8-bit), as TRL 0.7's example
scripts parse it from the command line, and the configs it builds for transformers and peft.

    parser = HfArgumentParser((ScriptArguments, TrainingArguments, ModelConfig))
    args, training_args, model_config = parser.parse_args_into_dataclasses()
    model = AutoModelForCausalLM.from_pretrained(model_config.model_name_or_path,
                                                 **model_config.to_model_init_kwargs())
    trainer = SFTTrainer(model, ..., peft_config=get_peft_config(model_config))

`torch_dtype` keeps TRL 0.7's name and string values ("auto", "bfloat16", "float16", "float32").
transformers 5 calls the from_pretrained argument `dtype`: `model_config.dtype` is the value to pass
there (a torch.dtype, "auto" or None), and `to_model_init_kwargs()` does the renaming.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..ops.dicts import flatten_dict

TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")
FOUR_BIT_QUANT_TYPES = ("nf4", "fp4")


@dataclass
class ModelConfig:
    """Model loading settings (TRL 0.7.11's fields and defaults). Validation runs in __post_init__."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Hub id or local path of the model to load."})
    model_revision: str = field(default="main", metadata={
        "help": "Branch, tag or commit of the model on the Hub."})
    torch_dtype: str | None = field(default=None, metadata={
        "help": "Load the weights in this dtype; 'auto' takes the checkpoint's (passed to from_pretrained as "
                "`dtype`).", "choices": list(TORCH_DTYPES)})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run modelling code from the model's repository (off: only transformers' own code runs)."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel, e.g. 'sdpa', 'eager' or 'flash_attention_2' (needs flash-attn)."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int | None = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float | None = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Module names to adapt (default: peft's choice for the architecture)."})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained in full and saved with the adapter (e.g. a new score head)."})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "Load the base weights in 8 bits (bitsandbytes); train with LoRA."})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "Load the base weights in 4 bits (bitsandbytes, QLoRA); train with LoRA."})
    bnb_4bit_quant_type: str | None = field(default="nf4", metadata={
        "help": "4-bit data type: 'nf4' or 'fp4'.", "choices": list(FOUR_BIT_QUANT_TYPES)})
    use_bnb_nested_quant: bool = field(default=False, metadata={
        "help": "Quantize the 4-bit quantization constants too (double quantization)."})

    def __post_init__(self) -> None:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("ModelConfig: load_in_8bit and load_in_4bit are both True; set only one "
                             "(--load_in_4bit for QLoRA).")
        if self.torch_dtype is not None and self.torch_dtype not in TORCH_DTYPES:
            raise ValueError(f"ModelConfig: torch_dtype={self.torch_dtype!r}; use one of {TORCH_DTYPES} or None.")
        if self.bnb_4bit_quant_type is not None and self.bnb_4bit_quant_type not in FOUR_BIT_QUANT_TYPES:
            raise ValueError(f"ModelConfig: bnb_4bit_quant_type={self.bnb_4bit_quant_type!r}; use 'nf4' or 'fp4'.")
        if self.use_peft and (self.lora_r is None or self.lora_r < 1):
            raise ValueError(f"ModelConfig: lora_r={self.lora_r}; a LoRA rank is a positive integer.")

    @property
    def dtype(self) -> torch.dtype | str | None:
        """`torch_dtype` as transformers 5's from_pretrained `dtype` takes it: a torch.dtype, "auto" or None."""
        if self.torch_dtype in (None, "auto"):
            return self.torch_dtype
        return getattr(torch, self.torch_dtype)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a flat dict (for trackers)."""
        return flatten_dict(asdict(self))

    def to_model_init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `from_pretrained(model_name_or_path, **...)`: revision, trust_remote_code,
        dtype (from torch_dtype), attn_implementation when set, and for 4/8-bit loading the
        quantization_config with the device_map that puts each process's copy on its own device."""
        kwargs: dict[str, Any] = {"revision": self.model_revision, "trust_remote_code": self.trust_remote_code}
        if self.dtype is not None:
            kwargs["dtype"] = self.dtype
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        quantization_config = get_quantization_config(self)
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
            kwargs["device_map"] = get_kbit_device_map()
        return kwargs


def get_peft_config(model_config: ModelConfig) -> Any:
    """A peft `LoraConfig` from the lora_* fields (bias "none", task "CAUSAL_LM", as TRL's), or None
    when use_peft is False. For a reward model, set `task_type="SEQ_CLS"` on the result (RewardTrainer
    does so itself, with a warning)."""
    if not model_config.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError("use_peft=True needs peft (pip install peft), which cannot be imported.") from error
    return LoraConfig(
        r=model_config.lora_r,
        lora_alpha=model_config.lora_alpha,
        lora_dropout=model_config.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=model_config.lora_target_modules,
        modules_to_save=model_config.lora_modules_to_save,
    )


def get_quantization_config(model_config: ModelConfig) -> Any:
    """A transformers `BitsAndBytesConfig` for load_in_4bit (quant type, double quantization, and compute
    dtype = torch_dtype, float32 when that is None or "auto") or load_in_8bit; None otherwise.

    Built by `models.loading.resolve_quantization`, the one place TRL-style quantization flags become a
    config; it raises an ImportError with the install command when bitsandbytes is missing (TRL's
    version returned the config and failed later, at loading).
    """
    from .loading import resolve_quantization

    if model_config.load_in_4bit:
        compute_dtype = model_config.dtype if isinstance(model_config.dtype, torch.dtype) else torch.float32
        flags = {"load_in_4bit": True, "bnb_4bit_quant_type": model_config.bnb_4bit_quant_type or "nf4",
                 "use_bnb_nested_quant": model_config.use_bnb_nested_quant,
                 "bnb_4bit_compute_dtype": compute_dtype}
    elif model_config.load_in_8bit:
        flags = {"load_in_8bit": True}
    else:
        return None
    return resolve_quantization(flags)["quantization_config"]


def get_kbit_device_map() -> dict[str, int | str] | None:
    """{"": this process's local device} for quantized loading on an accelerator (CUDA: the local
    process index; XPU/NPU: "xpu:<index>" / "npu:<index>"), None on a CPU-only machine. Quantized
    weights cannot be moved after loading, so each process must load onto its own device."""
    from accelerate import PartialState

    if torch.cuda.is_available():
        return {"": PartialState().local_process_index}
    for kind in ("xpu", "npu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            return {"": f"{kind}:{PartialState().local_process_index}"}
    return None
