"""Which web documents become candidate responses: the rules, as plain functions.

A line of a Dolma shard is either a Document or a Drop with a reason; ``CandidateFilter``
applies the per-line rules, remembers what it has seen (exact duplicates) and, a batch at a
time, the token-budget rule of docs/method.md:
``len(tokens(text)) + prompt_overhead + max_new_tokens <= context_window``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

# Drop reasons: a closed set, so a check can tell a new failure mode from a known one.
BLANK_LINE = "blank_line"
TOO_LARGE = "too_large"
BAD_UTF8 = "bad_utf8"
BAD_JSON = "bad_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_TEXT = "missing_text"
EMPTY_TEXT = "empty_text"
MISSING_ID = "missing_id"
TOO_SHORT = "too_short"
NOT_ENGLISH = "not_english"
DUPLICATE_TEXT = "duplicate_text"
DUPLICATE_ID = "duplicate_id"
TOO_LONG_FOR_CONTEXT = "too_long_for_context"
BAD_UNICODE = "bad_unicode"
DROP_REASONS = (
    BLANK_LINE, TOO_LARGE, BAD_UTF8, BAD_JSON, NOT_AN_OBJECT, MISSING_TEXT, EMPTY_TEXT,
    MISSING_ID, TOO_SHORT, NOT_ENGLISH, DUPLICATE_TEXT, DUPLICATE_ID, TOO_LONG_FOR_CONTEXT, BAD_UNICODE,
)  # fmt: skip

# The most frequent English function words. Their share of a text's words separates English
# prose from other languages and from boilerplate (Gopher's stop-word rule, datatrove's
# language heuristics) without a language-id model, which cannot be downloaded here.
ENGLISH_STOPWORDS = frozenset(
    "the of and to a in is it that for on was with as are be this by not or at from have an "  # noqa: SIM905
    "but they which you can has his her their we he she were will been if its one all would "
    "there so what when who more do no about also than them into some these only other may "
    "how your our should then could each such".split()
)
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_EXCERPT_CHARS = 200


@dataclass(frozen=True)
class Document:
    line: int
    id: str
    text: str
    source: str | None
    added: str | None
    created: str | None
    metadata: str | None
    n_words: int
    english_score: float
    text_hash: str


@dataclass(frozen=True)
class Drop:
    line: int
    reason: str
    detail: str
    id: str | None = None
    excerpt: str | None = None


@dataclass(frozen=True)
class FilterSettings:
    max_document_bytes: int = 1_000_000
    min_words: int = 20
    english_only: bool = True
    min_english_score: float = 0.2


def english_score(words: Sequence[str]) -> float:
    """Share of words that are common English function words (0 for no words)."""
    return _stopword_share([w.lower() for w in words])


def _stopword_share(lowercase_words: Sequence[str]) -> float:
    # map over the set's __contains__ runs in C: 4x faster than a generator per word, and
    # this runs for every document of every shard.
    if not lowercase_words:
        return 0.0
    return sum(map(ENGLISH_STOPWORDS.__contains__, lowercase_words)) / len(lowercase_words)


def lone_surrogate_in(value: Any, where: str = "text") -> str | None:
    """Where ``value`` (a JSON value) holds a lone surrogate (``"\\ud800"``: valid JSON that
    no UTF-8 writer or hash accepts), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    children = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in children:
        if (
            found := lone_surrogate_in(child, f"{where}.{key}" if where != "text" else str(key))
        ) is not None:
            return found
    return None


def _as_optional_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def parse_line(line_no: int, raw: bytes, settings: FilterSettings) -> Document | Drop:
    """One shard line to a Document, or the reason it cannot be one."""
    if not raw.strip():
        return Drop(line_no, BLANK_LINE, "empty line")
    if len(raw) > settings.max_document_bytes:
        return Drop(
            line_no,
            TOO_LARGE,
            f"{len(raw)} bytes > {settings.max_document_bytes}",
            excerpt=raw[:_EXCERPT_CHARS].decode("utf-8", "replace"),
        )
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Drop(
            line_no, BAD_UTF8, str(exc), excerpt=raw[:_EXCERPT_CHARS].decode("utf-8", "replace")
        )
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as exc:
        return Drop(line_no, BAD_JSON, str(exc), excerpt=decoded[:_EXCERPT_CHARS])
    if not isinstance(record, dict):
        return Drop(
            line_no,
            NOT_AN_OBJECT,
            f"a JSON {type(record).__name__}",
            excerpt=decoded[:_EXCERPT_CHARS],
        )
    kept = {k: record.get(k) for k in ("id", "text", "source", "added", "created", "metadata")}
    if (where := lone_surrogate_in(kept, "record")) is not None:
        # The raw line spells the surrogate as an escape: it is safe to keep as the excerpt.
        return Drop(line_no, BAD_UNICODE, f"{where} holds a lone surrogate (valid JSON, not encodable text)",
                    excerpt=decoded[:_EXCERPT_CHARS])  # fmt: skip
    doc_id = record.get("id")
    doc_id = None if doc_id is None else str(doc_id)
    text = record.get("text")
    if not isinstance(text, str):
        detail = "no text field" if "text" not in record else f"text is {type(text).__name__}"
        return Drop(line_no, MISSING_TEXT, detail, id=doc_id)
    if not text.strip():
        return Drop(line_no, EMPTY_TEXT, "text is blank", id=doc_id)
    if not doc_id:
        return Drop(line_no, MISSING_ID, "no id field", excerpt=text[:_EXCERPT_CHARS])
    words = _WORD.findall(text.lower())  # the pattern is caseless; the score needs lowercase
    if len(words) < settings.min_words:
        return Drop(
            line_no,
            TOO_SHORT,
            f"{len(words)} words < {settings.min_words}",
            id=doc_id,
            excerpt=text[:_EXCERPT_CHARS],
        )
    score = _stopword_share(words)
    if settings.english_only and score < settings.min_english_score:
        return Drop(
            line_no,
            NOT_ENGLISH,
            f"english score {score:.3f} < {settings.min_english_score}",
            id=doc_id,
            excerpt=text[:_EXCERPT_CHARS],
        )
    return Document(
        line=line_no,
        id=doc_id,
        text=text,
        source=_as_optional_text(record.get("source")),
        added=_as_optional_text(record.get("added")),
        created=_as_optional_text(record.get("created")),
        # Dolma writes metadata as an object; some exports write it as a (Python-repr) string.
        metadata=_as_optional_text(record.get("metadata")),
        n_words=len(words),
        english_score=score,
        text_hash=hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest(),
    )


class KeySet:
    """An exact set of 64-bit keys that costs ~8 bytes a key: recent keys sit in a Python
    set (~70 bytes each), and every ``settle_every`` of them are merged into one sorted
    numpy array. The dedup keys of a shard live as long as the shard is read, so memory
    stays flat as shards grow."""

    def __init__(self, settle_every: int = 1 << 18):
        self._settled = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()
        self._settle_every = settle_every

    def __contains__(self, key: int) -> bool:
        if key in self._recent:
            return True
        at = int(self._settled.searchsorted(np.uint64(key)))
        return at < self._settled.size and int(self._settled[at]) == key

    def __len__(self) -> int:
        return self._settled.size + len(self._recent)

    def add(self, key: int) -> None:
        self._recent.add(key)
        if len(self._recent) >= self._settle_every:
            recent = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            self._settled = np.union1d(self._settled, recent)
            self._recent.clear()


def _key64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class CandidateFilter:
    """Applies the rules to a stream of lines, in batches, keeping the counts.

    ``count_tokens`` maps a batch of texts to their token counts under the base model's
    tokenizer; ``token_budget`` is what a document may use of the context window.
    """

    def __init__(
        self,
        settings: FilterSettings,
        count_tokens: Callable[[list[str]], list[int]],
        token_budget: int,
    ):
        if token_budget <= 0:
            raise ValueError(
                f"no room left for a document: the prompt and the generation budget fill the "
                f"context window (budget {token_budget} tokens)"
            )
        self.settings = settings
        self.count_tokens = count_tokens
        self.token_budget = token_budget
        # 64-bit keys, not the strings (a false duplicate needs a 64-bit collision: ~3e-8
        # at a million documents), in sets that cost ~8 bytes a key.
        self._seen_texts = KeySet()
        self._seen_ids = KeySet()
        self.lines_read = 0
        self.drops_by_reason: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    @property
    def kept(self) -> int:
        return self.lines_read - sum(self.drops_by_reason.values())

    def _drop(self, drop: Drop, drops: list[Drop]) -> None:
        self.drops_by_reason[drop.reason] += 1
        drops.append(drop)

    def process(
        self, lines: Sequence[tuple[int, bytes]]
    ) -> tuple[list[tuple[Document, int]], list[Drop]]:
        """Kept (document, token count) pairs and drops for one batch of numbered lines."""
        drops: list[Drop] = []
        survivors: list[Document] = []
        for line_no, raw in lines:
            self.lines_read += 1
            parsed = parse_line(line_no, raw, self.settings)
            if isinstance(parsed, Drop):
                self._drop(parsed, drops)
            elif (text_key := int(parsed.text_hash[:16], 16)) in self._seen_texts:
                self._drop(
                    Drop(
                        line_no,
                        DUPLICATE_TEXT,
                        f"same text as an earlier line ({parsed.text_hash})",
                        id=parsed.id,
                    ),
                    drops,
                )
            elif (id_key := _key64(parsed.id)) in self._seen_ids:
                self._drop(
                    Drop(
                        line_no,
                        DUPLICATE_ID,
                        "id seen on an earlier line",
                        id=parsed.id,
                        excerpt=parsed.text[:_EXCERPT_CHARS],
                    ),
                    drops,
                )
            else:
                self._seen_texts.add(text_key)
                self._seen_ids.add(id_key)
                survivors.append(parsed)
        kept: list[tuple[Document, int]] = []
        counts = self.count_tokens([doc.text for doc in survivors]) if survivors else []
        for doc, n_tokens in zip(survivors, counts, strict=True):
            if n_tokens > self.token_budget:
                self._drop(
                    Drop(
                        doc.line,
                        TOO_LONG_FOR_CONTEXT,
                        f"{n_tokens} tokens > budget {self.token_budget}",
                        id=doc.id,
                        excerpt=doc.text[:_EXCERPT_CHARS],
                    ),
                    drops,
                )
            else:
                kept.append((doc, n_tokens))
        return kept, drops


def numbered_batches(lines: Iterable[bytes], size: int) -> Iterator[list[tuple[int, bytes]]]:
    numbered = enumerate(lines, start=1)
    while batch := list(islice(numbered, size)):
        yield batch
