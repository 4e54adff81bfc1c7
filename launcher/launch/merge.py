"""`qlaunch merge`: an exported adapter checked and merged into a dense model (safetensors), onto the base's
original weights or the dequantized ones it trained against, refusing non-finite results."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from launcher.rank.export import ADAPTER_FILE, saved_key


def read_adapter(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter, once its file passed the safetensors rules (sources.read_header: a
    regular file, the whole header validated, then the library's own check); one line naming it otherwise."""
    from safetensors.torch import load_file

    from launcher.rank.model.sources import read_header

    path = adapter_dir / ADAPTER_FILE
    read_header(path)
    return load_file(str(path))


def adapter_problem(saved: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> str | None:
    """Why SAVED cannot be the adapter of a model whose LoRA parameters are PARAMS (None: it can): the same
    tensor names, each a float tensor of its parameter's shape, every value finite."""
    from launcher.safe_files import shown

    missing = sorted(set(params) - set(saved))
    if missing:
        return f"adapter has no tensor for {missing[0]} (was it trained with another recipe?)"
    extra = sorted(set(saved) - set(params))
    if extra:
        return (
            f"adapter tensor {shown(extra[0])} is no LoRA parameter of the recipe's model (another recipe's adapter?)"
        )
    for name, p in params.items():
        t = saved[name]
        if not t.is_floating_point():
            return f"adapter tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}, not a float dtype"
        if t.shape != p.shape:
            return (
                f"adapter tensor {name} has shape {list(t.shape)}, but the recipe's model needs {list(p.shape)} "
                "(another model or LoRA rank?)"
            )
        if not bool(torch.isfinite(t.float()).all()):  # float: isfinite has no float8_e4m3fn kernel
            return f"adapter tensor {name} holds NaN or infinite values (a diverged or corrupted adapter)"
    return None


def load_adapter_into(peft_model: torch.nn.Module, adapter_dir: Path) -> None:
    """Copy a saved PEFT adapter into the LoRA parameters of a freshly built (unsharded) model, once it is
    known to fit them exactly (adapter_problem)."""
    saved = read_adapter(adapter_dir)
    params = {saved_key(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    problem = adapter_problem(saved, params)
    if problem:
        from launcher.errors import UserError

        raise UserError(f"{adapter_dir / ADAPTER_FILE}: {problem}; nothing was merged")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k].to(p.dtype))


def first_non_finite(model: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer holding a NaN or infinite value (None: all finite)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def dequantize(layer: torch.nn.Module) -> torch.Tensor:
    """Full fp32 weight of a bitsandbytes Linear4bit or Linear8bitLt (or a plain Linear)."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        packed = layer.weight.data.view(torch.uint8).reshape(-1, 1)
        return bnb.functional.dequantize_4bit(packed, layer.quant_state).float()
    if isinstance(layer, bnb.nn.Linear8bitLt):
        # The row scales sit on the weight until the first forward, then in the layer's matmul state.
        scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        # The expression of bitsandbytes' training matmul (MatMul8bitFp), so fp32 merges are exact.
        return layer.weight.data.float().mul_(scb.float().unsqueeze(1).mul(1.0 / 127.0))
    return layer.weight.detach().float()


def merge_into_dense(peft_model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Replace every LoRA layer by a dense Linear holding W + scale * B @ A (DoRA: each row rescaled to its
    magnitude, m / ||W + scale * B @ A||_row), and dequantize the rest."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    from launcher.rank.model.skeleton import is_tied

    model = peft_model.base_model.model
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            w = dequantize(base)
            for adapter in module.active_adapters:
                a, b = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
                w = w + (b @ a) * module.scaling[adapter]
                if adapter in module.lora_magnitude_vector:
                    m = module.lora_magnitude_vector[adapter].weight.float()
                    w = (m / torch.linalg.norm(w, dim=1))[:, None] * w
            _replace(model, name, _dense(w, base.bias, dtype))
    for name, module in list(model.named_modules()):
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            _replace(model, name, _dense(dequantize(module), module.bias, dtype))
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, flag):
            delattr(model, flag)
    if getattr(model.config, "tie_word_embeddings", False) and not is_tied(model):
        # LoRA on a tied head: the merged head is a weight of its own, and the saved config must say so
        # (saving drops a head that aliases the embedding; loading would tie a head the file does hold).
        model.config.tie_word_embeddings = False
    return model.to(dtype)


def _dense(w: torch.Tensor, bias, dtype) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w.to(dtype))
        if bias is not None:
            lin.bias.copy_(bias.detach().to(dtype))
    return lin


def _replace(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


ONTO = ("original", "dequantized")


def dense_weights_at(recipe) -> bool:
    """Whether the recipe's base exists in its original precision: random init (regenerated from its seed), or
    a model.path of dense weights — not a `qlaunch quantize` output or a bitsandbytes 4-bit checkpoint, which
    hold only the 4-bit bytes and scales."""
    from launcher.plan.model_info import is_bnb_4bit, load_config, resolve_model_dir
    from launcher.rank.model.sources import read_quant_meta

    if recipe.model.init == "random":
        return True
    model_dir = resolve_model_dir(recipe)
    return read_quant_meta(model_dir) is None and not is_bnb_4bit(load_config(recipe, model_dir))


def merge_base(recipe, onto: str) -> str:
    """What the adapter is added to: 'original' (model.path's weights as stored, in fp32; what PEFT's
    merge_and_unload on the original model gives), or 'dequantized' (the 4-bit or int8 weights the adapter
    was trained against). A base with no quantization is its own original; a pre-quantized checkpoint has
    nothing but its dequantized weights."""
    if recipe.quant.bits == "none":
        return "original"
    if onto == "dequantized" or not dense_weights_at(recipe):
        return "dequantized"
    return "original"


def trained_run(run_dir: Path):
    """The run directory RUN_DIR, once it is one and holds an exported adapter (one line naming it otherwise)."""
    from launcher.errors import UserError
    from launcher.rundir import RunDir

    run = RunDir(Path(run_dir))
    if not run.recipe.is_file():
        raise UserError(f"{run_dir}: not a run directory (no recipe.toml)")
    if not os.path.lexists(run.adapter / ADAPTER_FILE):
        raise UserError(f"{run_dir}: the run has no exported adapter (adapter/adapter_model.safetensors)")
    return run


def merge_run(run_dir: Path, out: Path, dtype: str = "bfloat16", onto: str = "original", say=lambda line: None) -> Path:
    """`qlaunch merge`: the run's adapter added to its base (merge_base: the original weights by default,
    or the dequantized ones it trained against) -> a plain Hugging Face model directory. SAY gets one line
    of what was merged onto when it is not what was asked for."""
    from launcher.data.tokenizer import build_tokenizer
    from launcher.errors import UserError
    from launcher.rank.build import build_model
    from launcher.rank.model.skeleton import DTYPES

    run = trained_run(run_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty")
    recipe = run.load_recipe()
    base = merge_base(recipe, onto)
    if onto == "original" and base == "dequantized":
        say(f"merging onto the dequantized 4-bit weights: {recipe.model.path} holds no others")
    # One process, no sharding: the whole model in host memory (the original weights in fp32; the
    # quantized ones at half a byte per weight, one for int8). Add the LoRA product in fp32 (the quantized
    # bytes and scales do not depend on it), round once at the end.
    quant = {"compute_dtype": "float32"} if base == "dequantized" else {"bits": "none", "compute_dtype": "float32"}
    recipe = recipe.model_copy(
        update={
            "parallel": recipe.parallel.model_copy(update={"backend": "none"}),
            "quant": recipe.quant.model_copy(update=quant),
            "model": recipe.model.model_copy(update={"dtype": "float32"}),
        }
    )
    read_adapter(run.adapter)  # a corrupt file is found before the model is built
    built = build_model(recipe, torch.device("cpu"), None)
    load_adapter_into(built.peft_model, run.adapter)
    model = merge_into_dense(built.peft_model, DTYPES[dtype])
    bad = first_non_finite(model)
    if bad is not None:  # the adapter is finite: the base weights are not, or the sum overflows the dtype
        raise UserError(
            f"{out}: not written: the merged weight {bad} holds NaN or infinite values in {dtype} (non-finite "
            f"weights in the base model {recipe.model.path}, or values beyond {dtype}'s range)"
        )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.dtype = dtype
    # A bitsandbytes 4-bit base leaves its quantization_config in the config: the merged model is dense, and
    # the record would make transformers load it as 4-bit (and look for quant states it does not have).
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        build_tokenizer(recipe, built.model_dir).save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as err:  # a parent that is a file or refuses new directories, a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{out}: cannot write the merged model ({err.strerror or type(err).__name__})") from None
    return out
