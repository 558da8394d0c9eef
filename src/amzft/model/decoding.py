"""The one default decoding of every answer amzft gives or ships, and the command-line options
that change it. No torch here: commands resolve their options before the heavy imports."""

from __future__ import annotations

from dataclasses import dataclass, replace

from amzft.errors import ConfigError


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding options (greedy unless ``do_sample``; sampling is seeded): raw greedy by default (the commands use ``DEFAULT_DECODING``)."""

    max_new_tokens: int = 128
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # From this many new tokens on (0: never), EOS's score grows by ``length_decay_factor`` a token
    # (transformers' exponential_decay_length_penalty): a long answer ends at a likely stop, not mid-word.
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
        on = self.length_decay_start > 0 and self.length_decay_factor > 1.0
        return (self.length_decay_start, self.length_decay_factor) if on else None


# Raw greedy makes fine-tuned answers loop; values chosen side by side (docs/performance.md, "Decoding").
DEFAULT_DECODING = GenerationOptions(repetition_penalty=1.15, no_repeat_ngram_size=4,
                                     length_decay_start=96, length_decay_factor=1.1)
GREEDY = GenerationOptions()
PRESETS = {"default": DEFAULT_DECODING, "greedy": GREEDY}
# The options, also YAML keys.
DECODING_KEYS = ("decoding", "repetition_penalty", "no_repeat_ngram_size", "length_decay_start", "length_decay_factor")


def resolve_decoding(decoding: str | None = "default", repetition_penalty: float | None = None,
                     no_repeat_ngram_size: int | None = None, **overrides) -> GenerationOptions:
    """A preset (``default`` or ``greedy``) with the options given (None: the preset's) on top."""
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
    """The same five options in every command's parser: one YAML key set for all of them."""
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
    """``resolve_decoding`` from a parsed config's ``DECODING_KEYS``, then ``overrides``."""
    get = cfg.get if hasattr(cfg, "get") else lambda key: getattr(cfg, key, None)
    return resolve_decoding(**({key: get(key) for key in DECODING_KEYS} | overrides))


def describe(options: GenerationOptions) -> str:
    """Which decoding produced a figure, in words: the preset it equals (lengths aside) or ``custom``."""
    same = [name for name, preset in PRESETS.items() if replace(options, max_new_tokens=preset.max_new_tokens) == preset]
    settings = f"repetition_penalty {options.repetition_penalty:g}, no_repeat_ngram_size {options.no_repeat_ngram_size}"
    if options.length_decay:
        settings += f", ending encouraged from token {options.length_decay_start} (x{options.length_decay_factor:g} a token)"
    if options.do_sample:
        settings += f", sampling (temperature {options.temperature:g}, top_p {options.top_p:g}, seed {options.seed})"
    return f"{same[0] if same else 'custom'} ({settings}, max_new_tokens {options.max_new_tokens})"


def generation_config(options: GenerationOptions, eos_token_id: int, pad_token_id: int | None) -> dict:
    """The options as ``GenerationConfig`` fields (export's generation_config.json), penalties stated even when off."""
    config = {"repetition_penalty": options.repetition_penalty, "no_repeat_ngram_size": options.no_repeat_ngram_size,
              **options.generate_kwargs()}
    if "exponential_decay_length_penalty" in config:
        config["exponential_decay_length_penalty"] = list(config["exponential_decay_length_penalty"])
    return config | {"eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
