import gzip
import json

import pytest

from bft_assets import filters as c

from conftest import MULTILINGUAL_SHARD

SETTINGS = c.FilterSettings(max_document_bytes=10_000, min_words=5)
ENGLISH = "The library reads the file and returns a list of the rows that it found in the table."


def _line(**record) -> bytes:
    return json.dumps(record).encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"   ", c.BLANK_LINE),
        (b"x" * 10_001, c.TOO_LARGE),
        (b'{"id": "a", "text": "caf\xe9 au lait"}', c.BAD_UTF8),
        (b'{"id": "a", "text": ', c.BAD_JSON),
        (b'["id", "text"]', c.NOT_AN_OBJECT),
        (_line(id="a"), c.MISSING_TEXT),
        (_line(id="a", text=None), c.MISSING_TEXT),
        (_line(id="a", text=42), c.MISSING_TEXT),
        (_line(id="a", text="  \n "), c.EMPTY_TEXT),
        (_line(text=ENGLISH), c.MISSING_ID),
        (_line(id="a", text="Too short here."), c.TOO_SHORT),
        (
            _line(id="a", text="Der Hund läuft schnell über die Straße und bellt laut im Park."),
            c.NOT_ENGLISH,
        ),
    ],
)
def test_each_malformed_line_gets_its_reason(raw, reason):
    parsed = c.parse_line(7, raw, SETTINGS)
    assert isinstance(parsed, c.Drop)
    assert (parsed.reason, parsed.line) == (reason, 7)


def test_metadata_as_object_or_string_is_kept_as_text():
    as_object = c.parse_line(1, _line(id="a", text=ENGLISH, metadata={"url": "u"}), SETTINGS)
    as_string = c.parse_line(2, _line(id="b", text=ENGLISH, metadata="{'url': 'u'}"), SETTINGS)
    assert json.loads(as_object.metadata) == {"url": "u"}
    assert as_string.metadata == "{'url': 'u'}"


def test_non_english_can_be_kept_when_configured():
    german = _line(id="a", text="Der Hund läuft schnell über die Straße und bellt laut im Park.")
    assert isinstance(
        c.parse_line(1, german, c.FilterSettings(min_words=5, english_only=False)), c.Document
    )


def test_english_score_separates_languages_on_real_common_crawl(shared_data):
    scores = []
    with gzip.open(MULTILINGUAL_SHARD) as lines:
        for raw in lines:
            text = json.loads(raw).get("text") or ""
            words = c._WORD.findall(text)
            if len(words) >= 20:
                scores.append(c.english_score(words))
    english = sum(s >= c.FilterSettings().min_english_score for s in scores)
    # PROVENANCE.md: ~290 of 670 documents look English by a crude stopword test.
    assert 180 <= english <= 320, english
    assert english < len(scores) / 2


def _counter(texts):
    return [len(t.split()) for t in texts]


def test_filter_accounts_for_every_line_and_applies_the_token_budget():
    rules = c.CandidateFilter(SETTINGS, _counter, token_budget=20)
    long_text = " ".join(["the cat sat on the mat"] * 5)  # 30 "tokens" > 20
    lines = [
        (1, _line(id="a", text=ENGLISH)),
        (2, _line(id="b", text=ENGLISH)),  # same text as line 1
        (3, _line(id="a", text=ENGLISH + " And more of the same.")),  # same id as line 1
        (4, _line(id="c", text=long_text)),
        (5, b"not json"),
        (6, _line(id="d", text="It is a fine day and the sun is out in the park today.")),
    ]
    kept, drops = rules.process(lines)
    assert [d.id for d, _ in kept] == ["a", "d"]
    assert {d.line: d.reason for d in drops} == {
        2: c.DUPLICATE_TEXT,
        3: c.DUPLICATE_ID,
        4: c.TOO_LONG_FOR_CONTEXT,
        5: c.BAD_JSON,
    }
    assert rules.lines_read == 6 and rules.kept == 2
    assert sum(rules.drops_by_reason.values()) == 4


def test_duplicates_are_found_across_batches():
    rules = c.CandidateFilter(SETTINGS, _counter, token_budget=100)
    rules.process([(1, _line(id="a", text=ENGLISH))])
    kept, drops = rules.process([(2, _line(id="b", text=ENGLISH))])
    assert not kept and drops[0].reason == c.DUPLICATE_TEXT


def test_no_room_for_a_document_is_a_clear_error():
    with pytest.raises(ValueError, match="context window"):
        c.CandidateFilter(SETTINGS, _counter, token_budget=0)


def test_the_key_set_is_exact_across_settling():
    from bft_assets.filters import KeySet

    keys = KeySet(settle_every=4)
    added = [0, 2**64 - 1, 17, 5, 2**63, 99, 3]
    for key in added:
        assert key not in keys
        keys.add(key)
        assert key in keys
    assert len(keys) == len(added)
    assert all(k in keys for k in added)  # settled into the sorted array and still found
    assert not any(k in keys for k in (1, 4, 2**64 - 2, 2**63 + 1))


def test_a_document_at_the_budget_fits_every_prompt_it_goes_through(smollm2):
    """At the budget, the backtranslation, scoring and rewriting prompts each fit the base
    model's context with their own generation budget (the rewrite's: min_room by default, or
    the ratio cap that follows the document)."""
    from bft_assets.budget import document_budget, message_tokens, rewrite_tokens
    from bft_assets.prompts import BACKTRANSLATE, REWRITE, SCORE
    from bft_assets.specs import GenerationSpec

    count = message_tokens(smollm2)
    tokenizer = smollm2.tokenizer()
    for window, generation in ((4096, GenerationSpec()), (2048, GenerationSpec.model_validate(
            {"scoring": {"mode": "logprobs"}, "rewriting": {"length_cap": "ratio", "rewrite_length_ratio": 1.0}}))):  # fmt: skip
        budget = document_budget(count, window, generation)
        text = " ".join(["The parser reads each line and returns the records it found."] * 400)
        document = tokenizer.decode(
            tokenizer(text, add_special_tokens=False)["input_ids"][: budget.tokens]
        )
        n = len(tokenizer(document, add_special_tokens=False)["input_ids"])
        assert budget.tokens - 2 <= n <= budget.tokens
        instruction_budget = generation.backtranslation.max_new_tokens
        instruction = tokenizer.decode(
            tokenizer(text, add_special_tokens=False)["input_ids"][:instruction_budget]
        )
        reply = 1 if generation.scoring.mode == "logprobs" else generation.scoring.max_new_tokens
        rewriting = generation.rewriting
        room = (
            rewriting.min_room
            if rewriting.length_cap == "context"
            else rewrite_tokens(n, generation)
        )
        needs = {
            "backtranslation": count(BACKTRANSLATE.render(response=document)) + instruction_budget,
            "scoring": count(SCORE.render(generated_instruction=instruction, output=document)) + reply,
            "rewriting": count(REWRITE.render(response=document, instruction=instruction)) + room,
        }  # fmt: skip
        assert all(need <= window for need in needs.values()), (window, needs, budget)
        assert max(needs.values()) > window - 64  # and the budget is not wasted: one is nearly full
