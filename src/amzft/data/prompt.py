"""Encode stage, text: the notebook's question (Unsloth + TRL's, which amzft replaces) in the Alpaca template."""

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
    input_text: str = ""

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
        """The prompt's text before and after the question: what render() and both templates use."""
        before, _, rest = self.template.partition("{instruction}")
        middle, _, after = rest.partition("{input}")
        return before, middle + self.input_text + after

    def render(self, title: str) -> str:
        before, after = self.around_question()
        return before + self.question_for(title) + after

    def chat_template(self, bos_token: bool) -> str:
        """A Jinja chat template: a user message (the question) becomes exactly this prompt, an assistant message the
        answer and EOS. ``bos_token``: start with BOS, as ``apply_chat_template`` adds no special tokens, training does."""
        before, after = self.around_question()

        def lit(text: str) -> str:  # a JSON string in {{ }}: read back exactly, and no block tag for trim_blocks
            return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"

        return (
            ("{{ bos_token }}" if bos_token else "")
            + "{%- for message in messages -%}"
            + "{%- if message['role'] == 'user' -%}" + lit(before) + "{{ message['content'] }}" + lit(after)
            + "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}"
            + "{%- endif -%}{%- endfor -%}"
        )

    def ollama_template(self) -> str:
        """The same prompt as an Ollama (Go text/template) TEMPLATE; llama.cpp adds BOS itself."""
        before, after = (text.replace("{{", '{{ "{{" }}') for text in self.around_question())  # a literal "{{"
        return before + "{{ .Prompt }}" + after + "{{ .Response }}"


def prompt_format_from(settings: dict | None) -> PromptFormat:
    """The prompt a data section or a checkpoint's data hyper-parameters describe."""
    group = (settings or {}).get("prompt")  # data.prompt.*: a dict, a namespace or a PromptFormat
    settings = vars(group) if hasattr(group, "__dict__") else dict(group or {})
    return PromptFormat(**{name: settings[name] for name in ("question", "template", "input_text") if name in settings})


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front when it adds special tokens, as training does."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos is not None and len(with_special) == len(plain) + 1 and with_special[0] == bos


def chat_template_for(tokenizer, prompt_format: PromptFormat) -> str:
    """The chat template that gives, for one user question, exactly the training prompt's ids."""
    return prompt_format.chat_template(bos_token=adds_bos(tokenizer))
