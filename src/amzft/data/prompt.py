"""The prompt: the notebook's question inside the Alpaca template (instruction / input / response).

"The notebook" is the Unsloth + TRL notebook amzft replaces; its recipe is ``configs/base.yaml``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from amzft.errors import ConfigError

NOTEBOOK_QUESTION = "What is the description of product {title}?"
# The Alpaca template as used by the notebook (Unsloth's alpaca_prompt), up to and
# including the response header; the response text (and EOS) follows it directly.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def _jinja_literal(text: str) -> str:
    # A JSON string inside {{ }}: Jinja reads it back exactly, whatever braces or quotes the
    # template holds, and it is no block tag, so transformers' trim_blocks cannot eat a newline.
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _go_literal(text: str) -> str:
    # A literal "{{" would open an action in a Go template; print it as a string instead.
    return text.replace("{{", '{{ "{{" }}')


@dataclass(frozen=True)
class PromptFormat:
    """The prompt every example, answer and export uses (``data.prompt.*``).

    Args:
        question: the instruction; ``{title}`` is replaced by the cleaned product title.
        template: prompt template with ``{instruction}`` and ``{input}``; the response follows it.
        input_text: the Alpaca "Input" field (empty in the notebook).
    """

    question: str = NOTEBOOK_QUESTION
    template: str = ALPACA_TEMPLATE
    input_text: str = ""  # Alpaca's "Input" field; the notebook leaves it empty

    def __post_init__(self):
        if "{title}" not in self.question:
            raise ConfigError(f"data.prompt.question must contain {{title}}, found {self.question!r}")
        for slot in ("{instruction}", "{input}"):
            if slot not in self.template:
                raise ConfigError(f"data.prompt.template must contain {slot}, found {self.template[:60]!r}…")

    def question_for(self, title: str) -> str:
        # str.replace, not str.format: product titles contain braces now and then.
        return self.question.replace("{title}", title)

    def around_question(self) -> tuple[str, str]:
        """The prompt's text before and after the question: the one definition of the prompt,
        from which render(), the exports' chat template and the Ollama template are all made."""
        before, _, rest = self.template.partition("{instruction}")
        middle, _, after = rest.partition("{input}")
        return before, middle + self.input_text + after

    def render(self, title: str) -> str:
        before, after = self.around_question()
        return before + self.question_for(title) + after

    def chat_template(self, bos_token: bool) -> str:
        """A Jinja chat template: a user message is the question (the instruction), rendered into
        exactly this prompt, response header included (so ``add_generation_prompt`` adds
        nothing); an assistant message is the answer and EOS, as in training. ``bos_token``:
        start with the tokenizer's BOS, because ``apply_chat_template`` tokenises without special
        tokens while training adds them (Llama-3.2 adds BOS, SmolLM2 does not)."""
        before, after = self.around_question()
        lit = _jinja_literal
        return (
            ("{{ bos_token }}" if bos_token else "")
            + "{%- for message in messages -%}"
            + "{%- if message['role'] == 'user' -%}" + lit(before) + "{{ message['content'] }}" + lit(after)
            + "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}"
            + "{%- endif -%}{%- endfor -%}"
        )

    def ollama_template(self) -> str:
        """The same prompt as an Ollama (Go text/template) TEMPLATE: the user's message is the
        question. BOS is not written: llama.cpp adds it when the GGUF says the tokenizer does."""
        before, after = self.around_question()
        go = _go_literal
        return go(before) + "{{ .Prompt }}" + go(after) + "{{ .Response }}"


def prompt_format_from(settings: dict | None) -> PromptFormat:
    """The prompt a data section or a checkpoint's data hyper-parameters describe (defaults:
    the notebook's question in the Alpaca template)."""
    settings = settings or {}
    group = settings.get("prompt")  # data.prompt.*: a dict, a namespace or a PromptFormat
    settings = vars(group) if hasattr(group, "__dict__") else dict(group or {})
    return PromptFormat(
        question=settings.get("question", NOTEBOOK_QUESTION),
        template=settings.get("template", ALPACA_TEMPLATE),
        input_text=settings.get("input_text", ""),
    )


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front when it adds special tokens, as training does."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos is not None and len(with_special) == len(plain) + 1 and with_special[0] == bos


def chat_template_for(tokenizer, prompt_format: PromptFormat) -> str:
    """The chat template that gives, for one user question, exactly the training prompt's ids."""
    return prompt_format.chat_template(bos_token=adds_bos(tokenizer))
