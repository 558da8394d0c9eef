"""The one default decoding of every answer amzft gives (``ask``, ``evaluate``, ``demo``,
``predict``, ``val/rougeL``) and ships (``export``'s generation_config.json, the GGUF Modelfile),
and the ``--decoding`` / ``--repetition_penalty`` / ``--no_repeat_ngram_size`` /
``--length_decay_start`` / ``--length_decay_factor`` options that change it. No torch here: the
commands resolve their options before the heavy imports."""

from __future__ import annotations

from dataclasses import dataclass, replace

from amzft.errors import ConfigError


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding options (greedy unless ``do_sample``; sampling is seeded).

    The dataclass's own defaults are raw greedy decoding (no penalty, no n-gram ban);
    ``DEFAULT_DECODING`` is what the commands use.
    """

    max_new_tokens: int = 128
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # From this many new tokens on (0: never), the end-of-answer token's score grows by
    # ``length_decay_factor`` per token (transformers' exponential_decay_length_penalty): an
    # answer that would run on ends at the next likely stop instead of mid-word at the cap.
    length_decay_start: int = 0
    length_decay_factor: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 3407

    def generate_kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size > 0:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if self.length_decay:
            kwargs["exponential_decay_length_penalty"] = self.length_decay
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs

    def __post_init__(self):
        if self.length_decay_start < 0:
            raise ConfigError(f"length_decay_start must be >= 0 (0: off), found {self.length_decay_start}")
        if not self.length_decay_factor >= 1.0:
            raise ConfigError(f"length_decay_factor must be >= 1.0 (1.0: off), found {self.length_decay_factor}")

    @property
    def length_decay(self) -> tuple[int, float] | None:
        """transformers' ``exponential_decay_length_penalty`` (start, factor), or None when off."""
        if self.length_decay_start > 0 and self.length_decay_factor > 1.0:
            return (self.length_decay_start, self.length_decay_factor)
        return None


# Greedy with a repetition penalty, an n-gram ban and a length decay, chosen side by side on
# real-record checkpoints (docs/performance.md, "Decoding"): raw greedy makes fine-tuned
# answers loop; of the settings that keep looping and never-stopped answers rare, this
# penalty scored the best ROUGE-L (a weaker one scored higher but left answers running to the
# token cap, a stronger one scored lower). The 4-gram ban changed nothing there; it stays as
# the guard against verbatim loops a penalty lets through. A checkpoint that recalls its
# products also runs on past them; encouraging the end from ``length_decay_start`` on ends
# those answers at no cost in ROUGE-L (an earlier, gentler decay cost a little). The one place
# to change them.
DEFAULT_DECODING = GenerationOptions(repetition_penalty=1.15, no_repeat_ngram_size=4,
                                     length_decay_start=96, length_decay_factor=1.1)
# Raw greedy: no penalty, ban or decay (how docs/performance.md's older figures were decoded).
GREEDY = GenerationOptions()
PRESETS = {"default": DEFAULT_DECODING, "greedy": GREEDY}
# The options, also YAML keys (the length decay's two are GenerationOptions fields of the same names).
DECODING_KEYS = ("decoding", "repetition_penalty", "no_repeat_ngram_size", "length_decay_start", "length_decay_factor")


def resolve_decoding(decoding: str | None = "default", repetition_penalty: float | None = None,
                     no_repeat_ngram_size: int | None = None, **overrides) -> GenerationOptions:
    """A preset (``default`` or ``greedy``), then the two overrides when given (None: the
    preset's), then any other field given and not None (``max_new_tokens``, the length decay …);
    a bad length decay raises ConfigError (``GenerationOptions.__post_init__``)."""
    overrides = {key: value for key, value in overrides.items() if value is not None}
    name = decoding or "default"
    if name not in PRESETS:
        raise ConfigError(f"--decoding takes {' or '.join(PRESETS)}; found {name!r}")
    if repetition_penalty is not None:
        if not repetition_penalty > 0:
            raise ConfigError(f"--repetition_penalty must be > 0 (1.0: none), found {repetition_penalty}")
        overrides["repetition_penalty"] = float(repetition_penalty)
    if no_repeat_ngram_size is not None:
        if no_repeat_ngram_size < 0:
            raise ConfigError(f"--no_repeat_ngram_size must be >= 0 (0: none), found {no_repeat_ngram_size}")
        overrides["no_repeat_ngram_size"] = int(no_repeat_ngram_size)
    return replace(PRESETS[name], **overrides)


def add_decoding_arguments(parser) -> None:
    """The same five options in every command's parser (ask, evaluate, demo, export, and the
    LightningCLI's fit / validate / test / predict): one YAML key set for all of them."""
    parser.add_argument("--decoding", type=str | None, default="default",
                        help="default (greedy + repetition penalty + n-gram ban, docs/performance.md) or greedy (raw)")
    parser.add_argument("--repetition_penalty", type=float | None, default=None,
                        help=f"override the decoding's repetition penalty (default {DEFAULT_DECODING.repetition_penalty:g}; 1.0: none)")
    parser.add_argument("--no_repeat_ngram_size", type=int | None, default=None,
                        help=f"override its no-repeat n-gram size (default {DEFAULT_DECODING.no_repeat_ngram_size}; 0: none)")
    parser.add_argument("--length_decay_start", type=int | None, default=None,
                        help=f"override from which new token the end of the answer is encouraged (default "
                        f"{DEFAULT_DECODING.length_decay_start}; 0: never)")
    parser.add_argument("--length_decay_factor", type=float | None, default=None,
                        help=f"override how fast, per token (default {DEFAULT_DECODING.length_decay_factor:g}; 1.0: off)")


def decoding_from(cfg, **overrides) -> GenerationOptions:
    """``resolve_decoding`` from a parsed config's top-level ``DECODING_KEYS`` (absent: the
    default), then ``overrides``."""
    get = cfg.get if hasattr(cfg, "get") else lambda key: getattr(cfg, key, None)
    return resolve_decoding(**({key: get(key) for key in DECODING_KEYS} | overrides))


def describe(options: GenerationOptions) -> str:
    """Which decoding produced a figure, in words: the preset it equals (lengths aside) or
    ``custom``, with its settings."""
    same = [name for name, preset in PRESETS.items() if replace(options, max_new_tokens=preset.max_new_tokens) == preset]
    settings = f"repetition_penalty {options.repetition_penalty:g}, no_repeat_ngram_size {options.no_repeat_ngram_size}"
    if options.length_decay:
        settings += f", ending encouraged from token {options.length_decay_start} (x{options.length_decay_factor:g} a token)"
    if options.do_sample:
        settings += f", sampling (temperature {options.temperature:g}, top_p {options.top_p:g}, seed {options.seed})"
    return f"{same[0] if same else 'custom'} ({settings}, max_new_tokens {options.max_new_tokens})"


def generation_config(options: GenerationOptions, eos_token_id: int, pad_token_id: int | None) -> dict:
    """The options as transformers ``GenerationConfig`` fields (export's generation_config.json),
    so ``model.generate(ids)`` of an exported model decodes as amzft does."""
    # generate()'s keywords (the one map from options to transformers' names), with the two
    # penalties written even when off, so the file states them.
    config = {"repetition_penalty": options.repetition_penalty, "no_repeat_ngram_size": options.no_repeat_ngram_size,
              **options.generate_kwargs()}
    if "exponential_decay_length_penalty" in config:
        config["exponential_decay_length_penalty"] = list(config["exponential_decay_length_penalty"])
    return config | {"eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
