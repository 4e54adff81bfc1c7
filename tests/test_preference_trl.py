"""qlaunch's DPO and ORPO against TRL's own trainers (the reference implementation users compare with), on the
same tiny model, pairs, adapter and settings, in fp32.

A qlaunch run trains a fresh adapter for a few steps and evaluates it on the pairs (its `eval` event); TRL then
loads that exported adapter onto the original checkpoint and computes its loss and metrics on the same pairs:
DPOTrainer.evaluate() on the rows (TRL tokenizing them itself, which must give qlaunch's token ids) and
ORPOTrainer.get_batch_loss_metrics() on qlaunch's token ids (the experimental ORPOTrainer tokenizes with an
older scheme of its own). The reference policy is the base model with the adapter disabled on both sides.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from launcher.data.render import DEFAULT_CHAT_TEMPLATE, Renderer
from launcher.plan.recipe_file import validate
from tests.conftest import TINY_DATA, TINY_MODEL, run_cli

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny-dpo-cpu.toml"
PAIRS = 12  # rows of preference.jsonl used: a few packed rows, every pair evaluated
STEPS = 3
TOL = 1e-5


def rows(name: str = "preference.jsonl") -> list[dict]:
    return [json.loads(x) for x in (TINY_DATA / name).read_text().splitlines()[:PAIRS]]


def our_pairs(data: list[dict]):
    cfg = validate(
        {
            "name": "t",
            "model": {"path": str(TINY_MODEL)},
            "data": {"format": "preference", "seq_len": 256, "datasets": [{"path": "x.jsonl"}]},
            "train": {"max_steps": 1, "objective": "dpo"},
        }
    ).data
    from transformers import AutoTokenizer

    renderer = Renderer(cfg, AutoTokenizer.from_pretrained(str(TINY_MODEL)))
    return renderer.tokenize_pairs([renderer.render(r, f"row {i}") for i, r in enumerate(data)])


@pytest.mark.parametrize("name", ["preference.jsonl", "preference-chat.jsonl"])
def test_pairs_tokenize_as_trls_dpo_trainer(name):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    data = rows(name)
    tok = AutoTokenizer.from_pretrained(str(TINY_MODEL))
    tok.chat_template = tok.chat_template or DEFAULT_CHAT_TEMPLATE  # what qlaunch renders chat with here
    # _prepare_dataset reads only the trainer's tokenizer: TRL's own preprocessing, without building a model.
    shell = type("Shell", (), {"_tokenizer": tok})()
    args = DPOConfig(output_dir="unused", max_length=None, report_to=[], use_cpu=True, bf16=False)
    theirs = DPOTrainer._prepare_dataset(shell, Dataset.from_list(data), tok, args, "train")
    ours = our_pairs(data)
    assert len(theirs) == len(ours) == PAIRS
    for mine, t in zip(ours, theirs, strict=True):
        assert (mine.prompt, mine.chosen, mine.rejected) == (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])
        assert mine.chosen[-1] == tok.eos_token_id or name.endswith("chat.jsonl")


def qlaunch_eval(tmp_path: Path, objective: str, *sets: str) -> tuple[dict, Path]:
    """Train STEPS steps from a fresh adapter (lr high enough that the policy leaves the reference), evaluate
    on the PAIRS pairs after the last; returns the eval event and the exported adapter."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    root = tmp_path / "runs"
    r = run_cli(
        "run", str(RECIPE), "--gpus", "1",
        "--set", f'log.runs_dir="{root}"', "--set", f'data.datasets=[{{path="{pairs}"}}]',
        "--set", f'data.val_path="{pairs}"', "--set", f'train.objective="{objective}"',
        "--set", 'model.dtype="float32"', "--set", 'quant.bits="none"',
        "--set", 'quant.compute_dtype="float32"', "--set", 'quant.storage_dtype="float32"',
        "--set", f"train.max_steps={STEPS}", "--set", f"train.eval_every={STEPS}", "--set", "train.lr=0.05",
        "--set", "train.warmup_steps=0", "--set", "train.micro_batch=1", "--set", "train.global_batch=2",
        *sets,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (metrics,) = root.glob("*/*/metrics.jsonl")
    run = metrics.parent
    events = [json.loads(x) for x in metrics.read_text().splitlines()]
    (ev,) = [e for e in events if e["event"] == "eval"]
    assert ev["step"] == STEPS
    return ev, run / "adapter"


def trained_peft(adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter), is_trainable=True)


def close(ours: float, theirs: float, what: str) -> None:
    assert abs(ours - theirs) <= TOL * max(1.0, abs(theirs)), (what, ours, theirs)


DPO_CASES = {
    "sigmoid": ([], dict(beta=0.1, loss_type=["sigmoid"])),
    "ipo": (["--set", 'train.dpo.loss="ipo"', "--set", "train.dpo.beta=0.5"], dict(beta=0.5, loss_type=["ipo"])),
    "robust": (
        ["--set", 'train.dpo.loss="robust"', "--set", "train.dpo.label_smoothing=0.2"],
        dict(beta=0.1, loss_type=["robust"], label_smoothing=0.2),
    ),
}


@pytest.mark.parametrize("case", sorted(DPO_CASES))
def test_dpo_matches_trls_dpo_trainer(tmp_path, case):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    sets, settings = DPO_CASES[case]
    ev, adapter = qlaunch_eval(tmp_path, "dpo", *sets)
    tok = AutoTokenizer.from_pretrained(str(TINY_MODEL))
    ds = Dataset.from_list(rows())
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_eval_batch_size=PAIRS, max_length=None, report_to=[],
        use_cpu=True, bf16=False, **settings,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=trained_peft(adapter), args=args, train_dataset=ds, eval_dataset=ds, processing_class=tok
    )
    # TRL takes a loaded adapter as the reference ("ref", a copy of it: re-training an SFT adapter); qlaunch
    # trains a fresh adapter against the base, which is TRL's reference once that copy is gone.
    trainer.model.delete_adapter("ref")
    theirs = trainer.evaluate()
    assert abs(ev["eval_reward_margin"]) > 100 * TOL  # the policy has left the reference: a real comparison
    for ours_key, their_key in [
        ("eval_loss", "eval_loss"),
        ("eval_rewards_chosen", "eval_rewards/chosen"),
        ("eval_rewards_rejected", "eval_rewards/rejected"),
        ("eval_reward_margin", "eval_rewards/margins"),
        ("eval_reward_accuracy", "eval_rewards/accuracies"),
        ("eval_logps_chosen", "eval_logps/chosen"),
        ("eval_logps_rejected", "eval_logps/rejected"),
    ]:
        close(ev[ours_key], theirs[their_key], ours_key)


def orpo_batch(pairs, pad: int) -> dict[str, torch.Tensor]:
    """ORPOTrainer's batch layout from qlaunch's token ids: prompt + completion per side, prompt unlabelled."""
    out = {}
    for side in ("chosen", "rejected"):
        seqs = [(p.prompt + getattr(p, side), len(p.prompt)) for p in pairs]
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), pad)
        labels = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, n) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, n : len(s)] = torch.tensor(s[n:])
            mask[i, : len(s)] = 1
        out.update({f"{side}_input_ids": ids, f"{side}_labels": labels, f"{side}_attention_mask": mask})
    return out


def test_orpo_matches_trls_orpo_trainer(tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    ev, adapter = qlaunch_eval(tmp_path, "orpo", "--set", "train.orpo.odds_ratio_weight=0.2")
    tok = AutoTokenizer.from_pretrained(str(TINY_MODEL))
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=0.2, report_to=[], use_cpu=True, bf16=False)
    model = trained_peft(adapter)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows()), processing_class=tok)
    model.eval()
    with torch.no_grad():
        loss, theirs = trainer.get_batch_loss_metrics(model, orpo_batch(our_pairs(rows()), 0), "eval")
    assert abs(ev["eval_reward_margin"]) > 100 * TOL
    close(ev["eval_loss"], float(loss), "eval_loss")
    for key in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "nll_loss", "log_odds_ratio"]:  # fmt: skip
        ours_key = "eval_" + {"rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy"}.get(
            key, key.replace("/", "_")
        )
        close(ev[ours_key], float(theirs["eval_" + key]), ours_key)
    assert math.isfinite(ev["eval_nll_loss"])
