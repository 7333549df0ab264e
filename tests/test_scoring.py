import math

import pytest

from bft_assets.replies import NO_SCORE, OUT_OF_RANGE, parse_score, score_from_logprobs

# Replies in the shapes models write them (Llama-2-chat, Mistral, small instruct models).
REPLIES = [
    ("The answer is complete and written as an assistant would.\n\nScore: 5", 5),
    ("Reasoning: it covers the question but wanders.\nscore:4/5", 4),
    ("**Reasoning:** The response reads like a forum post.\n\n**Score:** 3", 3),
    ("It only gives a high-level method.\nScore - 2", 2),
    ("The draft is off-topic.\n\nRating: 1", 1),
    ("I'd say this deserves a 4.", 4),
    (
        "The answer copies the page: 'Score: 5 stars from our readers'. Still promotional.\nScore: 2",
        2,
    ),
    ("Clear and well organized. Final verdict:\n4/5", 4),
    ("Score: 4.5", None),
    ("Score: 7", None),
    ("This answer is helpful and complete.", None),
    ("", None),
]


@pytest.mark.parametrize(("reply", "expected"), REPLIES)
def test_parse_score_reads_the_last_verdict(reply, expected):
    score, reason = parse_score(reply)
    assert score == expected
    assert (reason is None) == (expected is not None)


def test_parse_score_gives_reasons():
    assert parse_score("Score: 9") == (None, OUT_OF_RANGE)
    assert parse_score("no number here") == (None, NO_SCORE)


def test_score_from_logprobs_argmax_and_expectation():
    logprobs = {
        "1": math.log(0.1),
        "2": math.log(0.1),
        "3": math.log(0.1),
        "4": math.log(0.2),
        "5": math.log(0.5),
    }
    score, expected = score_from_logprobs(logprobs)
    assert score == 5
    assert expected == pytest.approx(0.1 + 0.2 + 0.3 + 0.8 + 2.5)


def test_score_from_logprobs_renormalizes_and_handles_no_mass():
    score, expected = score_from_logprobs(
        {"1": math.log(0.3), "2": -math.inf, "3": -math.inf, "4": -math.inf, "5": math.log(0.1)}
    )
    assert score == 1 and expected == pytest.approx((0.3 + 0.5) / 0.4)
    assert score_from_logprobs(dict.fromkeys("12345", -math.inf)) == (None, None)
