"""Clean stage: markup, control characters, Amazon boilerplate removed, empty / junk / duplicate records dropped."""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass

# "--This text refers to thePaperbackedition." (spaces often missing) / "... an out of print or
# unavailable edition of this title.": the lazy ".*?edition" stops at the format's own word.
_BOILERPLATE = re.compile(r"\s*-*\s*This text refers to\s*(?:an?\s*|the\s*)?.{0,80}?edition(?:\s*of this title)?\s*\.?", re.IGNORECASE)
# Where a boilerplate match can begin: its fixed words (case-insensitive, as _BOILERPLATE).
_BOILERPLATE_WORDS = re.compile(r"This text refers to", re.IGNORECASE)
# Contents that name a format or a language but describe nothing.
_JUNK_EXACT = {"vhs tape", "vhs", "dvd", "audio cd", "cd", "book by", "by", "paperback", "hardcover",
               "n/a", "na", "none", "no description", "description", "unknown"}
_JUNK_LONGEST = max(map(len, _JUNK_EXACT))
# The tags of HTML text formatting, named (not any "<...>"), so that "<5 kg and >2 kg" stays.
# Replaced by a space: "Line one<br>line two" is two words.
_TAG = re.compile(r"<!--.*?-->|</?(?:a|b|big|blockquote|br|center|code|dd|div|dl|dt|em|font|h[1-6]|hr|i|img|li|ol|p|pre|"
                  r"s|small|span|strike|strong|sub|sup|table|tbody|td|th|thead|tr|tt|u|ul)(?:\s[^<>]*)?/?>", re.IGNORECASE | re.DOTALL)
# C1 controls in scraped text are Windows-1252 bytes read as Latin-1 ("don\x92t"): they become
# that character, as html.unescape does for "&#146;". Other controls become a space (a NUL often
# separates words: "Mug\x00Blue"), which the whitespace collapse removes where it was none.
_CONTROLS = {**{c: " " for c in [*range(0x00, 0x20), 0x7F] if chr(c) not in "\t\n"},
             **{c: bytes([c]).decode("cp1252", "ignore") or " " for c in range(0x80, 0xA0)}}
_LANGUAGE_ONLY = re.compile(r"^(?:Text:\s*[A-Za-z ,]+(?:\s*\(translation\))?\s*)?(?:Original Language:\s*[A-Za-z ,]+)?$")


def clean_text(text: str, strip_boilerplate: bool = True) -> str:
    """Unescape HTML entities, drop HTML tags, control characters and Amazon boilerplate, collapse whitespace."""
    # The pre-checks skip the slow calls for the many texts that need none (isprintable is False
    # for any control character and non-ASCII space).
    if "&" in text:
        text = html.unescape(text)  # first: tags arrive entity-escaped too ("&lt;br&gt;")
    if "<" in text:
        text = _TAG.sub(" ", text)
    printable = text.isprintable()
    if not printable:
        text = text.translate(_CONTROLS)
        printable = text.isprintable()  # non-ASCII spaces are still unprintable
    if strip_boilerplate and "efers to" in text:
        text = _strip_boilerplate(text)  # removes text, adds only " ": as printable as before
    if printable and "  " not in text and text[:1] != " " and text[-1:] != " ":
        return text  # nothing to collapse: every whitespace character but " " is unprintable
    return " ".join(text.split())  # collapse all whitespace runs; faster than a regex


def _strip_boilerplate(text: str) -> str:
    r"""``_BOILERPLATE.sub(" ", text)``, faster: its leading ``\s*-*\s*`` would try every position,
    so it runs only from the whitespace and dashes before the first "This text refers to"."""
    if text.isascii():  # lower() keeps positions, and IGNORECASE matches ASCII only to ASCII
        start = text.lower().find("this text refers to")  # a plain find: much faster than the regex
        if start < 0:
            return text
    else:
        found = _BOILERPLATE_WORDS.search(text)
        if found is None:
            return text
        start = found.start()
    while start and (text[start - 1].isspace() or text[start - 1] == "-"):
        start -= 1
    return text[:start] + _BOILERPLATE.sub(" ", text[start:])


@dataclass(frozen=True)
class FilterSettings:
    """Which records are kept (``data.filters.*``).

    Args:
        min_content_chars: drop descriptions shorter than this (1: only empty ones, as the notebook).
        drop_title_only: drop descriptions that just repeat the title.
        drop_junk: drop descriptions such as "VHS Tape", "Book by", "Text: English".
        strip_boilerplate: remove Amazon's "--This text refers to … edition." notes.
        dedupe: drop repeated identical (title, description) pairs (after cleaning).
    """

    min_content_chars: int = 1
    drop_title_only: bool = True
    drop_junk: bool = True
    strip_boilerplate: bool = True
    dedupe: bool = True

    def problems(self) -> list[str]:
        if self.min_content_chars < 1:
            return [f"data.filters.min_content_chars must be >= 1, found {self.min_content_chars}"]
        return []


def dedupe_key(title: str, content: str) -> bytes:
    """Identity of a cleaned (title, description) pair for ``dedupe``."""
    return hashlib.blake2b(f"{title}\x00{content}".encode(), digest_size=12).digest()


class RecordFilter:
    """Cleans a record and says why it is dropped (``None`` when kept). Stateful for dedupe."""

    def __init__(self, settings: FilterSettings):
        self.settings = settings
        self._seen: set[bytes] = set()

    def __call__(self, title: str, content: str) -> tuple[str, str, str | None]:
        s = self.settings
        title = clean_text(title, s.strip_boilerplate)
        raw, content = content, clean_text(content, s.strip_boilerplate)
        if not title:
            return title, content, "empty_title"
        if not content:
            # Only the boilerplate's removal is boilerplate_only: markup alone is an empty description.
            return title, content, "boilerplate_only" if s.strip_boilerplate and clean_text(raw, False) else "empty_content"
        # The length tests skip casefolding long descriptions: casefold() makes a character 1 to 3.
        if s.drop_title_only and len(content) <= 3 * len(title) and content.casefold() == title.casefold():
            return title, content, "content_equals_title"
        if s.drop_junk and ((len(content.rstrip(".")) <= _JUNK_LONGEST and content.casefold().rstrip(".") in _JUNK_EXACT)
                            or _LANGUAGE_ONLY.match(content)):
            return title, content, "junk_content"
        if len(content) < s.min_content_chars:
            return title, content, "too_short"
        if s.dedupe:
            key = dedupe_key(title, content)
            if key in self._seen:
                return title, content, "duplicate"
            self._seen.add(key)
        return title, content, None
