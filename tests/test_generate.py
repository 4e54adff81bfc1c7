"""`qlaunch generate` and train.samples: a real 2-rank FSDP2 QLoRA run of the tiny model (torch elastic, gloo,
bitsandbytes 4-bit on CPU) whose adapter is then tried, against transformers + bitsandbytes + PEFT as the
reference; the samples it logged; how they show (terminal line, report, TensorBoard); and bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY_MODEL, assert_one_line_error, run_cli

PROMPTS = ["Reverse the word.", "Add the two numbers."]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """recipes/tiny-cpu.toml for 4 steps at a high constant lr (so the adapter changes what the model says),
    2 ranks under FSDP2, sampling PROMPTS at the evaluations (steps 2 and 4)."""
    runs = tmp_path_factory.mktemp("generate") / "runs"
    r = run_cli(
        "run", "recipes/tiny-cpu.toml", "--gpus", "2",
        "--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "train.lr=0.01",
        "--set", "train.warmup_steps=0", "--set", "train.schedule=constant",
        "--set", f"train.samples.prompts={json.dumps(PROMPTS)}",
        "--set", f"train.samples.max_new_tokens={NEW_TOKENS}", "--set", f"log.runs_dir={runs}",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = runs.glob("tiny-cpu/*")
    return run


@pytest.fixture(scope="module")
def generated(trained) -> list[str]:
    """What the function behind `qlaunch generate` gives for each of PROMPTS on the trained run (CPU, greedy)."""
    from launcher.launch.generate import generate_run

    return [generate_run(trained, p, NEW_TOKENS, device="cpu") for p in PROMPTS]


def events(run: Path, kind: str) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in recs if e["event"] == kind]


def alpaca_prompt(prompt: str) -> str:
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def reference_model(run: Path | None, lora_dtype=torch.bfloat16):
    """transformers' own 4-bit loading (BitsAndBytesConfig as the recipe's [quant]) with PEFT's
    PeftModel.from_pretrained(RUN/adapter), or the base alone (RUN None), in eval mode. FSDP2 ran the LoRA
    matmuls in bf16 (its mixed precision), so the reference's LoRA weights are bf16 unless LORA_DTYPE says."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, quantization_config=quant, dtype=torch.bfloat16)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # the kernel training used (quant.replace_with_4bit: no repack)
    if run is not None:
        model = PeftModel.from_pretrained(model, str(run / "adapter"))
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(lora_dtype)
    return model.eval()


def reference(run: Path | None, prompts: list[str]) -> list[str]:
    """Greedy completions by reference_model, the prompt in the alpaca layout the recipe trains on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = reference_model(run)
    out = []
    for prompt in prompts:
        ids = tok(alpaca_prompt(prompt))["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=[tok.eos_token_id],
                pad_token_id=tok.pad_token_id,
            )
        out.append(tok.decode(y[0, len(ids) :], skip_special_tokens=True))
    return out


def test_generate_is_peft_on_the_4bit_base_token_for_token(trained, generated):
    ref = reference(trained, PROMPTS)
    base = reference(None, PROMPTS)
    assert ref != base, "the adapter changes nothing: this test could not tell a missing adapter"
    # The command line once (a process of its own costs seconds), the function behind it for every prompt.
    r = run_cli(
        "generate", str(trained), "--prompt", PROMPTS[0], "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == ref[0] + "\n"  # only the completion, nothing else on stdout
    assert r.stderr == ""  # no library noise
    assert generated == ref


def test_generate_builds_the_function_the_run_trained(trained):
    """Logits, not only greedy tokens (which a small difference rarely flips): the model generate builds
    computes what the PEFT reference with bf16 LoRA computes, and not what fp32 LoRA would."""
    from launcher.launch.generate import load_trained

    built, tok, _, _ = load_trained(trained, "cpu")
    x = torch.tensor([tok(alpaca_prompt(PROMPTS[0]))["input_ids"]])
    with torch.no_grad():
        ours = built.causal_lm.eval()(input_ids=x).logits.float()
        bf16 = reference_model(trained)(input_ids=x).logits.float()
        fp32 = reference_model(trained, torch.float32)(input_ids=x).logits.float()
    assert torch.equal(ours, bf16), (ours - bf16).abs().max()
    assert not torch.equal(ours, fp32)


def test_fsdp_samples_at_the_last_step_are_what_generate_gives(trained, generated):
    logged = events(trained, "samples")
    assert [e["step"] for e in logged] == [2, 4]  # every train.eval_every steps, and the last
    assert [s["prompt"] for s in logged[-1]["samples"]] == PROMPTS
    assert [s["completion"] for s in logged[-1]["samples"]] == generated


def test_report_and_terminal_show_the_last_samples(trained):
    from launcher.progress import format_event

    r = run_cli("report", str(trained))
    assert r.returncode == 0, r.stderr
    last = events(trained, "samples")[-1]
    for i, s in enumerate(last["samples"], 1):
        row = next(line for line in r.stdout.splitlines() if f"sample {i} (step 4)" in line)
        assert repr(s["prompt"]) in row and repr(s["completion"]) in row
    line = format_event(last)
    assert line.startswith("samples step 4  'Reverse the word.' -> ") and "\n" not in line


def test_samples_line_cuts_long_text_and_keeps_one_line():
    from launcher.progress import format_event

    e = {"event": "samples", "step": 7, "samples": [{"prompt": "a\nb", "completion": "x" * 100}]}
    assert format_event(e) == "samples step 7  'a\\nb' -> '" + "x" * 45 + "...'"


def test_tensorboard_text_of_a_samples_record():
    from launcher.rank.sinks import scalars, texts

    rec = {
        "event": "samples",
        "step": 3,
        "samples": [{"prompt": "Hi\n```", "completion": "there"}, {"prompt": "2", "completion": ""}],
    }
    step, md = texts(rec)
    assert step == 3 and list(md) == ["samples/0", "samples/1"]
    assert md["samples/0"] == "**prompt**\n\n    Hi\n    ```\n\n**completion**\n\n    there"
    assert scalars(rec) == (None, {})  # no number to plot
    assert texts({"event": "eval", "step": 3, "eval_loss": 1.0}) == (None, {})


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_event_files_hold_the_samples(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launcher.rank.sinks import TensorBoardSink

    tb = TensorBoardSink(tmp_path / "tb")
    tb.write({"event": "samples", "time": 1.0, "step": 5, "samples": [{"prompt": "p", "completion": "c"}]})
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "samples/0" in str(acc.Tags())


def tiny_lm():
    """The tiny architecture with random weights, in fp32 on CPU, in training mode with checkpointing on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL), dtype=torch.float32)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    lm.model.layers[0].eval()  # one module whose own flag differs: it must come back as it was
    return lm


def test_sampling_leaves_training_as_it_was():
    from transformers import AutoTokenizer

    from launcher.rank.sample import Sampling, sample_texts

    lm, tok = tiny_lm(), AutoTokenizer.from_pretrained(TINY_MODEL)
    compiles = []

    def counting_backend(gm, inputs):
        compiles.append(gm)
        return gm.forward

    for layer in lm.model.layers:  # as build.compile_layers does
        layer.forward = torch.compile(layer.forward, backend=counting_backend)
    modes = [m.training for m in lm.modules()]
    rng = torch.random.get_rng_state()
    prompt, cpu = [("hi", tok("hi")["input_ids"])], torch.device("cpu")
    (drawn,) = sample_texts(lm, tok, prompt, 5, [tok.eos_token_id], cpu, sampling=Sampling(temperature=1.0), seed=1)
    assert isinstance(drawn["completion"], str)
    assert compiles == []  # generation ran the layers eagerly
    assert torch.equal(torch.random.get_rng_state(), rng)  # the seeded draws did not move the training's stream
    assert [m.training for m in lm.modules()] == modes and lm.is_gradient_checkpointing
    assert torch.is_grad_enabled()
    greedy = sample_texts(lm, tok, prompt, 5, [tok.eos_token_id], cpu)
    assert sample_texts(lm, tok, prompt, 5, [tok.eos_token_id], cpu) == greedy  # greedy: the same again


def test_prompts_are_rendered_as_training_renders_them():
    from transformers import AutoTokenizer

    from launcher.data.render import Renderer
    from launcher.plan.recipe import DataConfig

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    data = [{"path": "x.jsonl"}]
    alpaca = Renderer(DataConfig(datasets=data, format="alpaca"), tok)
    (segments,) = [alpaca.render({"instruction": "Do it.", "output": "Done."}, "row 1")]
    assert alpaca.prompt_ids("Do it.") == alpaca.bos + tok(segments[0][0], add_special_tokens=False)["input_ids"]
    chat = Renderer(DataConfig(datasets=data, format="chat", chat_template="llama3"), tok)
    rendered = chat._apply([{"role": "user", "content": "Hi"}], True, "x")
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert chat.prompt_ids("Hi") == tok(rendered, add_special_tokens=False)["input_ids"]


# --- bad input: one line naming the flag or key, exit 2 -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--prompt", "  "], ["--prompt is empty"]),
        (["--prompt", "x", "--max-new-tokens", "0"], ["--max-new-tokens 0", "1..4096"]),
        (["--prompt", "x", "--device", "tpu"], ["--device tpu", "auto, cpu, cuda"]),
        (["--prompt", "x", "--base", "merged"], ["--base merged", "quantized or original"]),
    ],
    ids=["empty-prompt", "max-tokens", "device", "base"],
)
def test_generate_bad_flags(tmp_path, args, expect):
    assert_one_line_error(run_cli("generate", str(tmp_path), *args, cwd=tmp_path), expect, tmp_path / "runs")


def test_generate_needs_a_run_with_an_adapter(tmp_path):
    r = run_cli("generate", str(tmp_path), "--prompt", "x", cwd=tmp_path)
    assert_one_line_error(r, [str(tmp_path), "not a run directory"], tmp_path / "runs")
    (tmp_path / "recipe.toml").write_text("")
    r = run_cli("generate", str(tmp_path), "--prompt", "x", cwd=tmp_path)
    assert_one_line_error(r, ["the run has no exported adapter"], tmp_path / "runs")


def test_generate_sampling_flags_are_checked(trained):
    r = run_cli("generate", str(trained), "--prompt", "x", "--temperature", "0", cwd=ROOT)
    assert_one_line_error(r, ["--temperature 0", "above 0"], trained / "nothing")


@pytest.mark.parametrize(
    ("setting", "expect"),
    [
        ('train.samples.prompts=["ok", ""]', ["train.samples.prompts[1]", "needs text"]),
        ("train.samples.max_new_tokens=0", ["train.samples.max_new_tokens", "greater than or equal to 1"]),
    ],
    ids=["empty-prompt", "max-tokens"],
)
def test_bad_samples_keys(tmp_path, recipe_file, setting, expect):
    r = run_cli("run", str(recipe_file()), "--set", setting, cwd=tmp_path)
    assert_one_line_error(r, expect, tmp_path / "runs")


def test_a_chat_reply_stops_at_the_templates_end_of_turn_token():
    from transformers import AutoTokenizer

    from launcher.data.render import Renderer
    from launcher.plan.recipe import DataConfig

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    data = [{"path": "x.jsonl"}]
    assert Renderer(DataConfig(datasets=data, format="chat", chat_template="llama3"), tok).stop_ids() == [
        tok.eos_token_id,
        eot,
    ]
    # ChatML's <|im_end|> is no token of this tokenizer, and alpaca replies end with EOS alone.
    assert Renderer(DataConfig(datasets=data, format="chat", chat_template="chatml"), tok).stop_ids() == [
        tok.eos_token_id
    ]
    assert Renderer(DataConfig(datasets=data, format="alpaca"), tok).stop_ids() == [tok.eos_token_id]
