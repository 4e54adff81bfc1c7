"""Chat templates by name (data.chat_template = "llama3", ...): the turn layout of each model family's
instruct models, as Jinja for tokenizer.apply_chat_template. Plain text, so the recipe can check a name
without loading anything.

Each renders a conversation prefix as a prefix of the whole (what locating the assistant replies needs:
data/render.Renderer._chat), ends every assistant turn with the family's end-of-turn token so a fine-tuned
model learns to stop, and writes the family's generation prompt (the assistant header) when asked. Tool calls
and multimodal content are not laid out: a recipe that needs them gives the model's own template
("tokenizer") or its Jinja text.
"""

from __future__ import annotations

# ChatML (OpenHermes, Yi, many fine-tunes): <|im_start|>role\ncontent<|im_end|>\n
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2 / Qwen2.5: ChatML with Qwen's default system turn when the conversation has none.
QWEN = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}" + CHATML
)

# Llama 3 / 3.1 / 3.2 / 3.3 Instruct: headers, contents trimmed, <|eot_id|> after every turn.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Gemma 1/2/3 instruct: user/model turns; a system message is prepended to the first user turn.
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] | trim + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Mistral / Mixtral Instruct (v0.1-v0.3 layout): [INST] user [/INST]assistant</s>; a system message is
# prepended to the first user turn. The prompt ends with [/INST]: there is no separate generation prompt.
MISTRAL = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (prefix if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# Phi-3 / Phi-3.5: <|role|>\ncontent<|end|>\n
PHI = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Phi-4: <|im_start|>role<|im_sep|>content<|im_end|>
PHI4 = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

NAMED: dict[str, str] = {
    "chatml": CHATML,
    "qwen": QWEN,
    "llama3": LLAMA3,
    "gemma": GEMMA,
    "mistral": MISTRAL,
    "phi": PHI,
    "phi4": PHI4,
}

# data.chat_template = "tokenizer": the tokenizer's own template (refused if it has none).
TOKENIZER = "tokenizer"

# data.chat_template = "templates/mine.jinja": a file of Jinja text (what transformers saves as
# chat_template.jinja), relative to the recipe; loading the recipe puts its text in place of the name, so the
# run directory's recipe does not depend on the file afterwards.
TEMPLATE_FILE_SUFFIXES = (".jinja", ".j2", ".jinja2")
MAX_TEMPLATE_BYTES = 1_000_000


def is_template_file(value: str) -> bool:
    """Whether VALUE names a template file rather than being a name or Jinja text (which has braces)."""
    return "{" not in value and "\n" not in value and value.lower().endswith(TEMPLATE_FILE_SUFFIXES)


def is_named_or_file(value: str) -> bool:
    return value in NAMED or value == TOKENIZER or is_template_file(value)


def template_text(value: str | None, tokenizer_template: str | None, fallback: str) -> str:
    """The Jinja text data.chat_template stands for: a name's, the tokenizer's ("tokenizer", or unset when
    the tokenizer has one), the text itself, else FALLBACK. The recipe validated VALUE."""
    if value is None:
        return tokenizer_template or fallback
    if value == TOKENIZER:
        if not tokenizer_template:
            raise ValueError(
                "data.chat_template = 'tokenizer', but the tokenizer has no chat template; name one "
                f"({', '.join(NAMED)}) or give its Jinja text"
            )
        return tokenizer_template
    return NAMED.get(value, value)
