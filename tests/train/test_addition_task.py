"""The built-in addition task: worked solutions, tokenizer, scoring and the deterministic prompt streams."""

import random

import pytest
import torch

from fastopd.train.task import BOS, EOS, PAD, AdditionTask, CharTokenizer, left_pad, parse_answer, worked_solution


@pytest.mark.parametrize("a,b,expected", [
    pytest.param(347, 285, "7+5=12,4+8+1=13,3+2+1=6|632", id="carries"),
    pytest.param(47, 5, "7+5=12,4+0+1=5|52", id="short-operand"),
    pytest.param(999, 999, "9+9=18,9+9+1=19,9+9+1=19|1998", id="final-carry"),
    pytest.param(0, 0, "0+0=0|0", id="zeros"),
])
def test_worked_solution_examples(a, b, expected):
    assert worked_solution(a, b) == expected


def test_worked_solutions_are_correct_step_by_step():
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randrange(10**4), rng.randrange(10**4)
        text = worked_solution(a, b)
        steps, answer = text.split("|")
        assert int(answer) == a + b == parse_answer(text)
        carry, digits = 0, []
        for i, step in enumerate(steps.split(",")):
            lhs, s = step.split("=")
            terms = [int(t) for t in lhs.split("+")]
            x = a // 10**i % 10
            y = b // 10**i % 10
            assert terms == ([x, y, 1] if carry else [x, y])
            assert int(s) == sum(terms)
            digits.append(int(s) % 10)
            carry = int(s) // 10
        assert int("".join(map(str, ([carry] if carry else []) + digits[::-1]))) == a + b


def test_tokenizer_round_trip_and_errors():
    tok = CharTokenizer()
    ids = tok.encode("12+3=", bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS
    assert tok.decode(ids + [7, 7]) == "12+3="  # stops at EOS
    assert tok.decode([PAD, BOS] + tok.encode("9|9")) == "9|9"
    with pytest.raises(ValueError, match="'x'"):
        tok.encode("1x2")


@pytest.mark.parametrize("completion,answer", [
    ("7+5=12|12", 12), ("1+1=2|2|3", 3), ("no bar", None), ("1+1=2|", None), ("1+1=2|1,2", None)])
def test_parse_answer(completion, answer):
    assert parse_answer(completion) == answer


def test_score_and_streams():
    task = AdditionTask(digits=3)
    probs = [(1, 2), (10, 20)]
    assert task.score(probs, ["1+2=3|3", "0+0=0|31"]) == 0.5
    assert task.train_prompts(5, 4, seed=1) == task.train_prompts(5, 4, seed=1)
    assert task.train_prompts(5, 4, seed=1) != task.train_prompts(6, 4, seed=1)
    assert task.train_prompts(5, 4, seed=1) != task.train_prompts(5, 4, seed=2)
    evals = set(task.eval_problems(300))
    train = {p for k in range(50) for p in task.problems(8, seed=f"fastopd-train-0-{k}")}
    assert len(evals & train) < 5  # independent streams: only chance collisions in 10^6 pairs
    longest = max(len(task.tokenizer.encode(worked_solution(a, b), eos=True)) for a in (999, 990) for b in (999, 9))
    assert task.max_new_tokens == longest == 30
    assert max(len(p) for p in task.prompt_ids([(999, 999)])) == task.prompt_length


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long
