"""The prompt: the seed's question inside the Alpaca template (instruction / input / response)."""

from __future__ import annotations

from dataclasses import dataclass

from amzft.errors import ConfigError

SEED_QUESTION = "What is the description of product {title}?"
# The Alpaca template as used by the seed notebook (Unsloth's alpaca_prompt), up to and
# including the response header; the response text (and EOS) follows it directly.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@dataclass(frozen=True)
class PromptFormat:
    question: str = SEED_QUESTION
    template: str = ALPACA_TEMPLATE
    input_text: str = ""  # Alpaca's "Input" field; the seed leaves it empty

    def __post_init__(self):
        if "{title}" not in self.question:
            raise ConfigError(f"data.question must contain {{title}}, found {self.question!r}")
        for slot in ("{instruction}", "{input}"):
            if slot not in self.template:
                raise ConfigError(f"data.template must contain {slot}, found {self.template[:60]!r}…")

    def render(self, title: str) -> str:
        # str.replace, not str.format: product titles contain braces now and then.
        instruction = self.question.replace("{title}", title)
        before, _, rest = self.template.partition("{instruction}")
        middle, _, after = rest.partition("{input}")
        return before + instruction + middle + self.input_text + after


def prompt_format_from(settings: dict | None) -> PromptFormat:
    """The prompt a data section or a checkpoint's data hyper-parameters describe (defaults:
    the seed's question in the Alpaca template)."""
    settings = settings or {}
    return PromptFormat(
        question=settings.get("question", SEED_QUESTION),
        template=settings.get("template", ALPACA_TEMPLATE),
        input_text=settings.get("input_text", ""),
    )
