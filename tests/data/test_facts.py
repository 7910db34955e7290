"""engram.data.facts: synthetic facts are deterministic, distinct, balanced over the paraphrases, and their held-out
paraphrase is never among the training texts."""

import pytest

from engram.data.facts import (PARAPHRASE_TEMPLATES, TRAIN_TEMPLATES, make_facts, make_names, prompt_of,
                               training_texts)

WORDS = ["harbour", "copper", "lantern", "meadow"]


def test_facts_are_a_function_of_the_seed():
    assert make_facts(50, WORDS, seed=3) == make_facts(50, WORDS, seed=3)
    assert make_facts(50, WORDS, seed=3) != make_facts(50, WORDS, seed=4)
    assert make_names(10, seed=1) == make_names(40, seed=1)[:10]  # more names extend the list


def test_names_are_distinct_and_the_facts_balanced():
    facts = make_facts(300, WORDS, seed=0)
    assert len({f.name for f in facts}) == 300
    assert all(part[0].isupper() and part[1:].islower() for f in facts for part in f.name.split(" "))
    counts = [sum(f.paraphrase == i for f in facts) for i in range(len(PARAPHRASE_TEMPLATES))]
    assert counts == [100, 100, 100]
    assert {f.answer for f in facts} == set(WORDS)


def test_the_paraphrase_is_held_out_and_prompts_complete_to_the_texts():
    facts = make_facts(30, WORDS, seed=0)
    texts = training_texts(facts, seed=0)
    assert len(texts) == 30 * len(TRAIN_TEMPLATES) and sorted(texts) == sorted(t for f in facts
                                                                                 for t in f.training_texts())
    assert not {f.paraphrase_text() for f in facts} & set(texts)
    for fact in facts:
        assert fact.paraphrase_text() == fact.paraphrase_prompt() + fact.completion + "."
        assert fact.training_texts()[0] == fact.trained_prompt() + fact.completion + "."
        assert fact.name in fact.paraphrase_prompt() and not fact.paraphrase_prompt().endswith(" ")


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="single words"):
        make_facts(3, ["two words"])
    with pytest.raises(ValueError, match="single words"):
        make_facts(3, [])
    with pytest.raises(ValueError, match="space before"):
        prompt_of("The code of {name} is:{answer}", "X")
    with pytest.raises(ValueError, match="n must be"):
        make_names(-1)
