"""`qlaunch generate`: a trained adapter tried on a prompt, in this process: the base built as the run trained
it (the same loader, bitsandbytes 4-bit or int8 layers in the run's compute dtype, LoRA in the dtype its
matmuls ran in), the prompt rendered as training rendered one, transformers' generate."""

from __future__ import annotations

from pathlib import Path

from launcher.errors import UserError
from launcher.plan.eval_samples import MAX_NEW_TOKENS

BASES = ("quantized", "original")
DEVICES = ("auto", "cpu", "cuda")


def sampling_settings(temperature: float | None, top_p: float | None):
    """None (greedy) unless --temperature or --top-p asks for sampling; bad values name their flag."""
    from launcher.rank.sample import Sampling

    if temperature is None and top_p is None:
        return None
    if temperature is not None and not 0 < temperature <= 100:
        raise UserError(f"--temperature {temperature:g}: use a number above 0 (at most 100); leave it out for greedy")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p:g}: use a number in (0, 1]")
    return Sampling(temperature=1.0 if temperature is None else temperature, top_p=1.0 if top_p is None else top_p)


def check_flags(prompt: str, max_new_tokens: int, device: str, base: str) -> None:
    """The flags that need no run directory, checked before anything is loaded."""
    if not prompt.strip():
        raise UserError("--prompt is empty: give the text to complete")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens {max_new_tokens}: use 1..{MAX_NEW_TOKENS}")
    if device not in DEVICES:
        raise UserError(f"--device {device}: use {', '.join(DEVICES)}")
    if base not in BASES:
        raise UserError(f"--base {base}: use {' or '.join(BASES)}")


def pick_device(device: str):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here; use --device cpu (or auto)")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def generation_recipe(recipe, base: str):
    """The run's recipe for one unsharded process: base 'quantized' keeps [quant] as trained; 'original' runs
    the adapter on model.path's own weights (merge.merge_base decides whether there are any)."""
    from launcher.launch.merge import merge_base

    update = {"parallel": recipe.parallel.model_copy(update={"backend": "none"})}
    if base == "original" and recipe.quant.bits != "none":
        if merge_base(recipe, "original") == "dequantized":
            raise UserError(f"--base original: {recipe.model.path} holds only quantized weights; use --base quantized")
        update["quant"] = recipe.quant.model_copy(update={"bits": "none"})
    return recipe.model_copy(update=update)


def trained_lora_dtype(recipe):
    """The dtype the LoRA matmuls ran in: FSDP2's mixed precision and DeepSpeed's bf16/fp16 mode compute in
    quant.compute_dtype; one unsharded process computes with the fp32 masters."""
    import torch

    from launcher.rank.model.skeleton import DTYPES

    return torch.float32 if recipe.parallel.backend == "none" else DTYPES[recipe.quant.compute_dtype]


def load_trained(run_dir: Path, device: str = "auto", base: str = "quantized"):
    """(the built model with the run's adapter loaded, its tokenizer, the recipe it was built from, the
    torch device): the base as the run trained it, or its original weights (BASE 'original')."""
    from launcher.data.tokenizer import build_tokenizer
    from launcher.launch.merge import load_adapter_into, read_adapter, trained_run
    from launcher.rank.build import build_model

    run = trained_run(run_dir)
    trained = run.load_recipe()
    recipe = generation_recipe(trained, base)
    where = pick_device(device)
    read_adapter(run.adapter)  # a corrupt file is found before the model is built
    built = build_model(recipe, where, None)
    load_adapter_into(built.peft_model, run.adapter)
    lora = trained_lora_dtype(trained)
    for p in built.peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.to(lora)
    return built, build_tokenizer(recipe, built.model_dir), recipe, where


def generate_run(
    run_dir: Path,
    prompt: str,
    max_new_tokens: int = 128,
    device: str = "auto",
    base: str = "quantized",
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> str:
    """The completion of PROMPT by the run's exported adapter (greedy unless temperature or top_p is given)."""
    from launcher.rank.sample import rendered_prompts, sample_texts

    check_flags(prompt, max_new_tokens, device, base)
    sampling = sampling_settings(temperature, top_p)
    built, tokenizer, recipe, where = load_trained(run_dir, device, base)
    prompts, stop_ids = rendered_prompts(recipe.data, tokenizer, [prompt])
    (done,) = sample_texts(
        built.causal_lm, tokenizer, prompts, max_new_tokens, stop_ids, where, sampling=sampling, seed=seed
    )
    return done["completion"]
