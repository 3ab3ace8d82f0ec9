"""The model side shared by training, evaluation and serving: the tokenizer, the compute dtype,
loading a base or tuned model, and applying the tuning method (LoRA, QLoRA, full) for training."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from instructune_jobs.config import TrainConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger("instructune.models")

Precision = Literal["bf16", "fp16", "fp32"]
# The training recipe's manifest in final/ (artifacts.py): evaluation checks its templateHash
# against the template it renders with.
MANIFEST_NAME = "manifest.json"


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        # Padding is masked out everywhere; any id works, eos is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_compute_dtype(precision: Precision, device: Any) -> torch.dtype:
    """bf16/fp16 on GPUs as configured; fp32 on CPU, where half precision is slow and lossy (bf16
    matmuls would also shift the loss evaluation compares with training's)."""
    import torch

    if device.type != "cuda":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


# ---------------------------------------------------------------------------------------------
# Trained weights: finding and loading them (evaluation, serving)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedArtifacts:
    kind: str  # "adapter" (PEFT save_pretrained) or "full" (a complete model)
    weights_dir: Path
    tokenizer_dir: Path | None
    manifest: dict[str, Any]
    source: str  # the uri or directory it came from


def locate_trained_artifacts(root: Path, source: str) -> TrainedArtifacts:
    """Find the weights in the layouts the training recipe writes: final/{adapter,model,tokenizer}/,
    or a directory that is itself an adapter or a model."""
    manifest = json.loads((root / MANIFEST_NAME).read_text()) if (root / MANIFEST_NAME).is_file() else {}
    tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else None
    # The adapter wins over a merged model/ (output.merge writes both): same weights, and the
    # base is then had by disabling the adapter instead of loading a second model.
    for kind, sub in (("adapter", "adapter"), ("full", "model")):
        candidate = root / sub
        marker = "adapter_config.json" if kind == "adapter" else "config.json"
        if (candidate / marker).is_file():
            return TrainedArtifacts(kind, candidate, tokenizer_dir, manifest, source)
    if (root / "adapter_config.json").is_file():
        return TrainedArtifacts("adapter", root, tokenizer_dir or _tokenizer_here(root), manifest, source)
    if (root / "config.json").is_file():
        return TrainedArtifacts("full", root, tokenizer_dir or _tokenizer_here(root), manifest, source)
    raise FileNotFoundError(f"no adapter or model under {source} (expected adapter/ or model/ with weights)")


def _tokenizer_here(path: Path) -> Path | None:
    return path if (path / "tokenizer_config.json").is_file() else None


def load_causal_lm(model_dir: Path, precision: Precision) -> Any:
    """A causal LM from a local directory, through transformers' real loading code, in eval mode on
    the default device."""
    from transformers import AutoModelForCausalLM

    device = default_device()
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=resolve_compute_dtype(precision, device)
    )
    return model.to(device).eval()


def load_tuned_model(artifacts: TrainedArtifacts, base_ref: Path | None, precision: Precision) -> Any:
    if artifacts.kind == "full":
        return load_causal_lm(artifacts.weights_dir, precision)
    if base_ref is None:
        raise ValueError("an adapter needs its base model")
    from peft import PeftModel

    base = load_causal_lm(base_ref, precision)
    return PeftModel.from_pretrained(base, str(artifacts.weights_dir), is_trainable=False).eval()


def merge_adapter(base_path: Path, adapter_dir: Path, out_dir: Path, dtype: Any) -> None:
    """Base + adapter folded into plain weights (for runtimes that cannot load adapters)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    del base, merged


# ---------------------------------------------------------------------------------------------
# The model to train: base weights and the tuning method
# ---------------------------------------------------------------------------------------------


def build_model(
    cfg: TrainConfig, base_path: Path, device: Any, compute_dtype: Any, ds_config: dict[str, Any] | None
) -> Any:
    """The base model through transformers' loading code, wrapped with PEFT for (Q)LoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    # Frozen weights load in the compute dtype. Full fine-tuning under DDP keeps fp32 master weights
    # and autocasts (DeepSpeed keeps its own fp32 master copy of 16-bit weights).
    load_dtype = torch.float32 if cfg.method.type == "full" and ds_config is None else compute_dtype
    kwargs: dict[str, Any] = {"dtype": load_dtype, "attn_implementation": attention_implementation(device)}
    zero3_context: Any = None
    if cfg.method.type == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        kwargs["device_map"] = {"": device.index or 0}
    elif ds_config is not None and cfg.distributed.zero_stage == 3:
        # ZeRO-3: from_pretrained partitions the weights as it loads them (zero.Init), so no rank
        # ever holds the whole model: 8 ranks of a node would otherwise each load all of it into
        # host memory. PEFT then builds LoRA (and modules_to_save copies, gathered) around them.
        from transformers.integrations import HfDeepSpeedConfig

        zero3_context = HfDeepSpeedConfig(ds_config)  # must stay referenced while loading
    model = AutoModelForCausalLM.from_pretrained(str(base_path), **kwargs)
    if zero3_context is not None:
        weights = list(model.parameters())
        held = sum(p.ds_tensor.numel() for p in weights if hasattr(p, "ds_tensor"))
        log.info(
            "ZeRO-3: base weights partitioned as loaded, %d of %d elements on this rank",
            held,
            sum(getattr(p, "ds_numel", p.numel()) for p in weights),
        )
    del zero3_context
    return apply_method(cfg, model, device, keep_on_cpu=ds_config is not None)


def apply_method(cfg: TrainConfig, model: Any, device: Any, keep_on_cpu: bool) -> Any:
    """Gradient checkpointing and, for (Q)LoRA, the PEFT adapter; trainable weights in fp32.
    keep_on_cpu: DeepSpeed places the model itself."""
    import torch

    model.config.use_cache = False  # the KV cache only costs memory in training
    if cfg.training.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without input grads hacks.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method.type == "full":
        return model if keep_on_cpu else model.to(device)

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method.type == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = cfg.method.lora
    # Adapter initialisation draws random numbers: seed right before, so it is the same every run.
    torch.manual_seed(cfg.training.seed)
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT scales by alpha / r: floats work
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            modules_to_save=lora.modules_to_save or None,
            task_type="CAUSAL_LM",
        ),
    )
    # Trainable weights in fp32 (AdamW updates are lost in bf16); the frozen base stays in 16 bit.
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return model if keep_on_cpu or cfg.method.type == "qlora" else model.to(device)


def attention_implementation(device: Any) -> str:
    """flash-attention 2 on GPUs when installed (packed sequences by position_ids, no mask);
    sdpa otherwise, which takes the block-diagonal mask the packed collator builds."""
    if device.type == "cuda":
        with contextlib.suppress(ImportError):
            import flash_attn  # noqa: F401

            return "flash_attention_2"
    return "sdpa"
