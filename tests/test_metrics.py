import pytest

from slmforge import metrics as m


def test_key_accuracy_on_korean_variants():
    assert m.contains_key("대한민국의 수도는 서울특별시입니다.", ["서울", "서울특별시"])
    assert m.contains_key("답은 열둘이에요", ["12", "열둘"])
    assert not m.contains_key("프랑스의 수도는 리옹입니다.", ["파리", "Paris"])
    assert m.contains_key("The capital is PARIS.", ["파리", "Paris"])


def test_numeric_keys_match_whole_numbers_only():
    assert m.contains_key("6 더하기 6은 12입니다.", ["12"])
    assert not m.contains_key("정답은 112입니다.", ["12"])
    assert not m.contains_key("1.25입니다", ["12"])
    assert not m.contains_key("", ["12"])


def test_char_f1_known_values():
    assert m.char_f1("서울입니다", "서울입니다") == 1.0
    # prediction {서,울} vs reference {서,울,이,다}: P=1, R=0.5 -> F1=2/3
    assert m.char_f1("서울", "서울이다") == pytest.approx(2 / 3)
    assert m.char_f1("abc", "xyz") == 0.0


def test_echoing_the_question_scores_high_char_f1_but_no_key():
    q, ref, key = "프랑스의 수도는 어디인가요?", "프랑스의 수도는 파리입니다.", ["파리"]
    s = m.score_answer(q, ref, key)
    assert s["char_f1"] > 0.5 and s["key_accuracy"] == 0.0


def test_exact_match_ignores_spacing_and_punctuation():
    assert m.exact_match("서울 입니다!", "서울입니다.")
    assert not m.exact_match("서울", "서울입니다")


def test_chrf_bounds():
    assert m.chrf("서울입니다", "서울입니다") == pytest.approx(1.0)
    assert m.chrf("abc", "xyz") == 0.0
    assert 0 < m.chrf("서울이에요", "서울입니다") < 1


def test_corpus_chrf_pools_statistics_instead_of_averaging_sentences():
    """One long right answer and one short wrong one: the corpus score weighs the long one by its
    n-grams, the mean of sentence scores weighs both alike."""
    hyps, refs = ["대한민국의 수도는 서울특별시입니다", "아니요"], ["대한민국의 수도는 서울특별시입니다", "네"]
    corpus = m.corpus_chrf(hyps, refs)
    mean = sum(m.chrf(h, r) for h, r in zip(hyps, refs)) / 2
    assert corpus > 0.8 and mean == pytest.approx(0.5) and corpus > mean
    assert m.corpus_chrf([], []) is None
