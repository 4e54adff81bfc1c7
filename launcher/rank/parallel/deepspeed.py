"""DeepSpeed ZeRO-2/3 behind the Engine interface (see launcher/rank/parallel/__init__.py).

The worker runs `deepspeed.initialize` with RUN/deepspeed_config.json, the very file `qlaunch run` wrote
(launcher/plan/configs.py renders it); nothing here re-derives batch sizes, precision, offload or clipping.

Two things the JSON cannot say:
- Gradient scale. The step loop divides each micro-batch loss by the label tokens of the whole global
  batch and expects gradients summed over ranks and micro-steps. DeepSpeed averages over data-parallel
  ranks and (by default) divides the loss by the accumulation steps, so backward multiplies by the
  world size and passes scale_wrt_gas=False. The accumulation boundary is set explicitly, so
  `step()` is the one optimizer step of the global batch (DeepSpeed's documented manual-boundary mode).
- The lr schedule: qlaunch's warmup/cosine/linear multiplier (launcher.rank.optim.lr_lambda) on the optimizer
  DeepSpeed built from the JSON, stepped by DeepSpeed at each optimizer step.

Loading for ZeRO-3 (`zero3_materializer`): the meta skeleton is materialised one unit at a time (one
decoder layer, or the embedding, the final norm, lm_head) and each unit is handed to
`deepspeed.zero.Init(module=unit)` as soon as it is filled, which partitions it and frees the rest. A rank
therefore holds its 1/world share of every parameter, the per-block 4-bit scales (the quant state,
whole on every rank: bitsandbytes needs all of it to dequantize the gathered bytes), and at most one
unfilled unit at a time, never the whole model. The packed 4-bit bytes (a [n/4, 1] Params4bit) are
flattened and split like any other tensor; the Params4bit object survives partitioning, and the module's
`quant_state` is re-attached by bitsandbytes if a gather loses it. ZeRO-2 does not partition parameters:
every rank holds the whole frozen 4-bit (or LLM.int8) model, as with backend 'none'.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launcher.errors import UserError
from launcher.plan.configs import DEEPSPEED_CONFIG_FILE
from launcher.plan.plan import Plan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def require_deepspeed() -> None:
    """In the launching process, before a run directory exists: is DeepSpeed importable here?"""
    import importlib.util

    try:
        found = importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UserError(
            "parallel.backend = 'deepspeed' but DeepSpeed is not installed in this Python environment; "
            "install it (pip install 'qlaunch[deepspeed]') or use parallel.backend = 'fsdp'"
        )


def _deepspeed():
    try:
        import deepspeed
    except ImportError as err:  # a node whose environment lacks it: say so in one line, not a traceback
        raise UserError(
            f"parallel.backend = 'deepspeed' but DeepSpeed cannot be imported on this node ({err})"
        ) from None
    return deepspeed


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / DEEPSPEED_CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing; the run directory was not written by `qlaunch run` or `qlaunch config`")
    return json.loads(path.read_text())


def init_comm(dist_backend: str) -> None:
    """deepspeed.comm on top of the process group the session already created (idempotent)."""
    _deepspeed().init_distributed(dist_backend=dist_backend, dist_init_required=False)


def param_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The dtype DeepSpeed keeps model parameters in (its optimizer holds fp32 masters); None = as built."""
    for key, dtype in DTYPES.items():
        if config.get(key, {}).get("enabled"):
            return dtype
    return None


def zero3_materializer(run_dir: str | Path, dist_backend: str) -> Callable | None:
    """A replacement for launcher.rank.model.fill.materialize that streams units into ZeRO-3 partitions; None unless stage 3."""
    config = read_config(run_dir)
    if config["zero_optimization"]["stage"] != 3:
        return None

    def materializer(root, module_names, quant_layers, source, recipe, device, prequant, progress=None):
        init_comm(dist_backend)
        return materialize_partitioned(
            root, module_names, quant_layers, source, recipe, device, prequant, config, progress
        )

    return materializer


def load_units(root: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(module, recurse) in load order: the input embedding, each decoder layer whole, then every other
    module that has parameters of its own (final norm, lm_head)."""
    from launcher.rank.model.skeleton import decoder_layers

    layers = list(decoder_layers(root.lm))
    inside = {id(m) for layer in layers for m in layer.modules()}
    emb = root.lm.get_input_embeddings()
    rest = [
        m
        for m in root.modules()
        if id(m) not in inside and m is not emb and next(m.parameters(recurse=False), None) is not None
    ]
    return [(emb, False)] + [(layer, True) for layer in layers] + [(m, False) for m in rest]


def materialize_partitioned(
    root: nn.Module,
    module_names: dict[nn.Module, str],
    quant_layers: set[nn.Module],
    source,
    recipe,
    device: torch.device,
    prequant: str | None,
    config: dict[str, Any],
    progress: Callable[[str], None] | None = None,
):
    """Fill one unit, partition it, go on; see the module docstring for what each rank holds."""
    from launcher.rank.model.fill import fill_base_param, lora_filler
    from launcher.rank.model.shard import LoadStats

    deepspeed = _deepspeed()
    stats = LoadStats()
    t0 = time.perf_counter()
    cast = param_dtype(config)
    names = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
    fill_lora = lora_filler(root, module_names, source, recipe, device, prequant)
    # Every (module, key) holding each parameter: a tied weight (embedding = lm_head) has two.
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in root.modules():
        for key, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, key))
    with torch.no_grad():
        for m in root.modules():  # buffers (rotary tables) stay whole and are never partitioned
            for key, b in m._buffers.items():
                if b is not None:
                    m._buffers[key] = b.to(device)
        for unit, recurse in load_units(root):
            modules = list(unit.modules()) if recurse else [unit]
            for m in modules:
                for pname, p in list(m._parameters.items()):
                    if p is None or not p.is_meta:
                        continue  # absent, or tied to a parameter an earlier unit already partitioned
                    empty = torch.empty(p.shape, dtype=p.dtype, device=device)
                    m._parameters[pname] = nn.Parameter(empty, requires_grad=p.requires_grad)
                    full_name = names[id(p)]
                    new = m._parameters[pname]
                    if m in module_names:
                        hf_name = f"{module_names[m]}.{pname}" if module_names[m] else pname
                        fill_base_param(
                            m, pname, new, hf_name, source, recipe, device, prequant, quant_layers, stats, progress
                        )
                    else:
                        fill_lora(new, full_name, tuple(new.shape), 0, new.shape[0])
                    for owner, key in owners[id(p)]:  # re-tie: the other holders get the filled tensor too
                        owner._parameters[key] = m._parameters[pname]
                    if cast is not None and m._parameters[pname].requires_grad:
                        # DeepSpeed leaves the dtype of a model partitioned before initialize alone, and keeps
                        # fp32 masters of the trainable parameters in its optimizer.
                        m._parameters[pname].data = m._parameters[pname].data.to(cast)
            # Partition now: every rank filled the same bytes (DeepSpeed broadcasts rank 0's copy while
            # partitioning; identical, so harmless), then frees all but its own share.
            deepspeed.zero.Init(module=unit, config_dict_or_path=copy.deepcopy(config))
    stats.bytes_read = getattr(source, "bytes_read", 0)
    stats.seconds = time.perf_counter() - t0
    return stats


def partitioned_bytes(root: nn.Module) -> dict[str, int]:
    """What this rank holds for the model: parameter storage (ZeRO-3 partitions or whole tensors) and 4-bit scales."""
    seen: set[int] = set()
    params = 0
    for p in root.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        local = p.ds_tensor if hasattr(p, "ds_tensor") and p.ds_tensor is not None else p.data
        params += local.numel() * local.element_size()
    states = 0
    for m in root.modules():
        qs = getattr(m, "quant_state", None)
        if qs is not None:
            for t in _quant_state_tensors(qs):
                states += t.numel() * t.element_size()
    return {"param_bytes": params, "quant_state_bytes": states}


def _quant_state_tensors(qs) -> list[torch.Tensor]:
    out = [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor)]
    if getattr(qs, "state2", None) is not None:
        out += _quant_state_tensors(qs.state2)
    return out


def zero3_whole_layers(causal_lm: nn.Module) -> None:
    """Make each decoder layer one ZeRO-3 unit, gathered and released whole, as FSDP2 does.

    By default ZeRO-3 hooks every submodule that owns parameters: per decoder layer that is each 4-bit
    base linear, each LoRA A and B, and the norms, ~30 fetch/release hook pairs, each a Python call into
    DeepSpeed's parameter coordinator, in forward, in the recompute and in backward. That host work,
    not the GPU, bounded the ZeRO-3 rows of bench/RESULTS.md (1,756 tok/s/GPU against 4,879 for eager
    FSDP2 at the same settings). As a "leaf" (deepspeed.utils.set_z3_leaf_modules) a layer is fetched in
    one coalesced all-gather by one hook and nothing inside it is hooked, so its forward can also be
    compiled (train.compile) with no DeepSpeed code inside the graph.

    DeepSpeed reduces a leaf's gradients from the layer's full backward hook, and torch runs that hook as
    soon as the layer's *output* gradient exists when none of the layer's inputs requires grad (it has no
    input gradient to wait for): the first layer's LoRA gradients would be reduced before they exist. The
    embedding output is therefore marked as requiring grad, which costs the first layer's input gradient.
    """
    from deepspeed.utils import set_z3_leaf_modules

    from launcher.rank.model.skeleton import decoder_layers

    layers = list(decoder_layers(causal_lm))
    set_z3_leaf_modules(causal_lm, list({type(layer) for layer in layers}))

    def input_requires_grad(module, args, output):
        output.requires_grad_(True)

    causal_lm.get_input_embeddings().register_forward_hook(input_requires_grad)


class DeepSpeedEngine:
    """deepspeed.initialize on the LoRA model with RUN/deepspeed_config.json; see the module docstring."""

    def __init__(self, built, recipe, plan: Plan, total_steps: int, device: torch.device, run_dir: str | Path):
        from launcher.rank.optim import lr_lambda

        deepspeed = _deepspeed()
        config = read_config(run_dir)
        init_comm(plan.dist_backend)
        loss_model = built.loss_model
        if config["zero_optimization"]["stage"] == 3:
            # CausalLMLoss reads lm_head.weight outside lm_head's own forward: have the root gather it.
            from launcher.rank.model.skeleton import head_weight

            deepspeed.zero.register_external_parameter(loss_model, head_weight(built.causal_lm))
            zero3_whole_layers(built.causal_lm)
        t = recipe.train
        schedule = lr_lambda(t.schedule, t.warmup_steps, total_steps, t.min_lr_ratio)
        params = [p for p in loss_model.parameters() if p.requires_grad]
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=loss_model,
            model_parameters=params,
            config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            dist_init_required=False,
        )
        self.model = self.engine  # a module: (input_ids, labels, position_ids) -> (loss_sum, n_tokens)
        self.accum = int(config["gradient_accumulation_steps"])
        self.world = self.engine.dp_world_size
        self._micro = 0
        # The module file of a checkpoint keeps only the trainable weights: DeepSpeed's exclude_frozen_parameters
        # still writes every 4-bit layer's quantization scales (~3% of the 4-bit bytes; under ZeRO-3 from every
        # rank), which a resume rebuilds from the model anyway.
        trainable = self._trainable = {n for n, p in self.engine.module.named_parameters() if p.requires_grad}
        full_state_dict = self.engine.module_state_dict

        def module_state_dict(**kwargs):
            return {k: v for k, v in full_state_dict(**kwargs).items() if k in trainable}

        self.engine.module_state_dict = module_state_dict

    def backward(self, loss: torch.Tensor) -> None:
        self._micro += 1
        # Reduce (ZeRO-2) / finish reducing (ZeRO-3) only on the global batch's last micro-batch.
        self.engine.set_gradient_accumulation_boundary(self._micro == self.accum)
        # DeepSpeed averages over ranks; the step loop wants the sum (loss is already normalised globally).
        self.engine.backward(loss * self.world, scale_wrt_gas=False)

    def step(self) -> float:
        if self._micro != self.accum:
            raise RuntimeError(f"{self._micro} backward passes before step(), expected {self.accum}")
        self.engine.step()  # clip (gradient_clipping), optimizer step, lr schedule step, zero grads
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # Checkpoints: DeepSpeed's own format in DIR/deepspeed (CHECKPOINT_TAG). Every rank writes its optimizer
    # partition (fp32 masters + AdamW moments) and a module file (trainable weights, DeepSpeed's step counters;
    # ZeRO-2: rank 0 only, ZeRO-3: every rank its placeholders). Frozen 4-bit weights are left out: a resume
    # rebuilds them from the model.
    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True
        )
        if dist.get_rank() == 0:
            # DeepSpeed's offline converters, not data; a checkpoint directory holds no code.
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                (directory / script).unlink(missing_ok=True)

    def load_state(self, directory: Path) -> None:
        saved_by = len(list((directory / CHECKPOINT_TAG).glob("*zero_pp_rank_*_optim_states.pt")))
        if not saved_by:
            raise UserError(f"{directory}: no DeepSpeed optimizer states under {CHECKPOINT_TAG}/")
        if saved_by != self.world:
            # ZeRO's optimizer files are partitions over the data-parallel ranks that wrote them.
            raise UserError(
                f"{directory}: a DeepSpeed checkpoint written by {saved_by} ranks cannot be resumed on {self.world}; "
                f"resume with --gpus {saved_by} (the same world size)"
            )
        _tensor_only_loads(self.engine.checkpoint_engine)

        # The fp32 masters come from the optimizer partitions (DeepSpeed's load_from_fp32_weights), but ZeRO-2
        # does not copy them back into the model's (bf16) weights: those come from the module file, whose
        # trainable entries only are applied (ZeRO-3's are empty placeholders; its partitions are restored
        # from the masters). The schedule comes from meta.json (load_scheduler_state).
        def load_trainable(src: dict, dst: nn.Module) -> None:
            missing = sorted(self._trainable - src.keys())
            if missing:
                raise UserError(
                    f"{directory}: the DeepSpeed module file lacks {len(missing)} weights ({missing[0]}, ...)"
                )
            dst.load_state_dict({k: v for k, v in src.items() if k in self._trainable}, strict=False)

        path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=CHECKPOINT_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            custom_load_fn=load_trainable,
        )
        if path is None:
            raise UserError(f"{directory}: no DeepSpeed checkpoint under {CHECKPOINT_TAG}/")

    # The schedule is qlaunch's LambdaLR (see __init__): its counters go to meta.json as JSON, as for the
    # other backends; DeepSpeed's pickled copy in the module file is not read back.
    def scheduler_state(self) -> dict:
        return {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}

    def load_scheduler_state(self, state: dict) -> None:
        self.scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(self.scheduler.optimizer.param_groups)})


CHECKPOINT_TAG = "deepspeed"


def _tensor_only_loads(checkpoint_engine) -> None:
    """Make DeepSpeed read checkpoint files with torch.load(weights_only=True).

    DeepSpeed's TorchCheckpointEngine.load calls torch.load(weights_only=False), a full unpickle: a crafted
    checkpoint file could run code. Every file of a ZeRO-2/3 load goes through that one method (DeepSpeed's
    universal checkpoints, which read files with torch.load directly, are never enabled here), so it is
    replaced on this engine's instance by a weights-only load that also admits the few plain DeepSpeed
    types the files hold (enums and small records, rebuilt field by field, no code of their own)."""

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                why = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
                raise UserError(
                    f"{path}: refusing to unpickle {why.group(1) if why else 'an object that is not a tensor'}; "
                    "qlaunch reads checkpoints as tensors and plain data only"
                ) from None

    checkpoint_engine.load = load


def _deepspeed_safe_globals() -> list:
    # What ZeRO-2/3 optimizer files pickle besides tensors and builtins (torch.serialization's
    # get_unsafe_globals_in_checkpoint on real files): the stage enum, the loss scaler, static (bf16, fp32)
    # or dynamic (fp16), and ZeRO-2's parameter slice records, all restored as plain attribute dicts.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-2: (numel, start) of each param

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]
