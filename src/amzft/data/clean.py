"""Cleaning and filtering of trn.json records.

What the real AmazonTitles-1.3MM records hold (checked on the real trn.json): every non-ASCII
character is an HTML entity (``&#8217;``, ``&#xE7;``, ``&quot;``), in titles too; Amazon's
"--This text refers to … edition." boilerplate, often with its spaces missing
(``thePaperbackedition``); double spaces; contents that say nothing ("VHS Tape", "Book by",
"Text: English, French (translation)", the title again); duplicates. What files from other
sources hold: HTML markup (``<br/>``, ``<p>&nbsp;</p>``, also entity-escaped as ``&lt;br&gt;``)
and control characters (NUL, BEL, ...) that would otherwise go into prompts and targets.
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass

# "--This text refers to thePaperbackedition." / "... an alternateHardcoveredition." /
# "... an out of print or unavailable edition of this title." / "... thePrint on Demand
# (Paperback)edition." The lazy ".*?edition" stops at the first "edition", which is the
# format's own word even when run together with it.
_BOILERPLATE = re.compile(
    r"\s*-*\s*This text refers to\s*(?:an?\s*|the\s*)?.{0,80}?edition(?:\s*of this title)?\s*\.?",
    re.IGNORECASE,
)
# Where a boilerplate match can begin: its fixed words (case-insensitive, as _BOILERPLATE).
_BOILERPLATE_WORDS = re.compile(r"This text refers to", re.IGNORECASE)
# Contents that name a format or a language but describe nothing.
_JUNK_EXACT = {
    "vhs tape", "vhs", "dvd", "audio cd", "cd", "book by", "by", "paperback", "hardcover",
    "n/a", "na", "none", "no description", "description", "unknown",
}
_JUNK_LONGEST = max(map(len, _JUNK_EXACT))
# The tags of HTML text formatting, named (not any "<...>"), so that "<5 kg and >2 kg" stays.
# Replaced by a space: "Line one<br>line two" is two words.
_TAG = re.compile(
    r"<!--.*?-->|</?(?:a|b|big|blockquote|br|center|code|dd|div|dl|dt|em|font|h[1-6]|hr|i|img|li|ol|p|pre|"
    r"s|small|span|strike|strong|sub|sup|table|tbody|td|th|thead|tr|tt|u|ul)(?:\s[^<>]*)?/?>",
    re.IGNORECASE | re.DOTALL,
)
# Control characters. C1 ones (U+0080-U+009F) in scraped text are Windows-1252 bytes read as
# Latin-1 ("don\x92t"): they become that character, as html.unescape does for "&#146;". The
# others (C0, DEL, the 5 C1 codes cp1252 leaves undefined) become a space, not nothing: a NUL
# between two words is a separator in the files it comes from ("Mug\x00Blue"), and the whitespace
# collapse removes the space wherever it was not one. Tab and newline are whitespace anyway.
def _control_table() -> dict[int, str]:
    table = {c: " " for c in [*range(0x00, 0x20), 0x7F] if chr(c) not in "\t\n"}
    for c in range(0x80, 0xA0):
        try:
            table[c] = bytes([c]).decode("cp1252")
        except UnicodeDecodeError:
            table[c] = " "
    return table


_CONTROLS = _control_table()
_LANGUAGE_ONLY = re.compile(
    r"^(?:Text:\s*[A-Za-z ,]+(?:\s*\(translation\))?\s*)?(?:Original Language:\s*[A-Za-z ,]+)?$"
)


def clean_text(text: str, strip_boilerplate: bool = True) -> str:
    """Unescape HTML entities, drop HTML tags, control characters and Amazon boilerplate,
    collapse whitespace (``&nbsp;`` is whitespace too)."""
    # The pre-checks skip the slow calls for the many texts that need none (isprintable is
    # False for any control character, and for non-ASCII spaces, which are rare).
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
    r"""``_BOILERPLATE.sub(" ", text)``, faster on the real records, where the note ends a long
    description (docs/performance.md, "Time to the first step"). The regex's leading
    ``\s*-*\s*`` makes ``re`` try a match at every position of the text; no match can begin
    before the whitespace and dashes that precede the first "This text refers to", so the regex
    runs on the text from there only."""
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
        min_content_chars: drop descriptions shorter than this (1: only empty ones, as the
            notebook does).
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
    """Identity of a cleaned (title, description) pair for ``dedupe`` (RecordFilter and the
    parallel build, which dedupes in the parent)."""
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
            # Only the boilerplate's removal counts as boilerplate_only: markup and whitespace
            # ("<p>&nbsp;</p>") are an empty description.
            return title, content, "boilerplate_only" if s.strip_boilerplate and clean_text(raw, False) else "empty_content"
        # The length tests skip casefolding long descriptions (speed): casefold() turns a
        # character into 1 to 3, and no character but "." into one ending in ".".
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
