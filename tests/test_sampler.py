"""The batched sampler against the distributions it must draw from (no daemon, no model)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from daemon.engine.sampler import SamplingParams, sample  # noqa: E402

DRAWS = 6000  # rows of one batch: frequencies within 0.03 of their probabilities at ~5 sigma


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    for temperature in (1.0, 0.5, 2.0):
        params = [SamplingParams(temperature=temperature)] * DRAWS
        drawn = sample(logits.repeat(DRAWS, 1), params, [None] * DRAWS, torch.Generator().manual_seed(1))
        expected = torch.softmax(logits.double() / temperature, dim=-1)
        assert (frequencies(drawn, 6) - expected).abs().max() < 0.03, temperature


def test_top_k_and_top_p_keep_only_their_tokens_row_by_row():
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0])
    probs = torch.softmax(logits.double(), dim=-1)  # 0.48 0.29 0.18 0.06 ...
    kinds = [SamplingParams(top_k=2), SamplingParams(top_p=0.7), SamplingParams(top_k=3, top_p=0.5), SamplingParams()]
    params = [kinds[i % 4] for i in range(4 * DRAWS)]
    drawn = sample(logits.repeat(len(params), 1), params, [None] * len(params), torch.Generator().manual_seed(2))
    by_kind = [frequencies(drawn[i::4], 8) for i in range(4)]
    top2 = probs[:2] / probs[:2].sum()
    assert (by_kind[0][:2] - top2).abs().max() < 0.03 and by_kind[0][2:].sum() == 0
    # top_p 0.7: the smallest prefix reaching 0.7 is the first two tokens (0.48 + 0.29)
    assert (by_kind[1][:2] - top2).abs().max() < 0.03 and by_kind[1][2:].sum() == 0
    assert by_kind[2][0] == 1.0  # top_p 0.5 after top_k 3: the first token alone reaches it
    assert (by_kind[3] - probs).abs().max() < 0.03  # no limits: the whole distribution


def test_tokens_of_probability_zero_are_never_drawn():
    logits = torch.full((DRAWS, 50), float("-inf"))
    logits[:, 7], logits[:, 31] = 0.0, 0.0  # the only two possible tokens
    params = [SamplingParams(temperature=1.5)] * DRAWS
    drawn = sample(logits, params, [None] * DRAWS, torch.Generator().manual_seed(3))
    assert set(drawn) == {7, 31}


def test_a_seeded_row_draws_the_same_whatever_the_batch_around_it():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 100, generator=generator)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=11)

    def draw(rows: list[int], shared_seed: int) -> list[int]:
        params = [seeded if r == 2 else SamplingParams(temperature=0.8) for r in rows]
        generators = [torch.Generator().manual_seed(11) if r == 2 else None for r in rows]
        drawn = sample(logits[rows], params, generators, torch.Generator().manual_seed(shared_seed))
        return drawn[rows.index(2)]

    alone = draw([2], 0)
    assert draw([0, 1, 2, 3, 4], 5) == alone == draw([4, 2], 6)
    seeds = {sample(logits[[2]], [SamplingParams(seed=s)], [torch.Generator().manual_seed(s)])[0] for s in range(40)}
    assert len(seeds) > 1  # the seed does choose the draw


def test_greedy_rows_beside_sampled_rows_take_the_first_maximum():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0], [9.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 3.0]])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(top_k=1)]
    drawn = sample(logits, params, [None] * 3, torch.Generator().manual_seed(5))
    assert drawn[0] == 1 and drawn[2] == 2 and drawn[1] in range(4)


def test_an_infinite_logit_fails_a_sampled_row_alone():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(6))
    logits[1, 4] = float("inf")
    params = [SamplingParams(temperature=1.0)] * 3
    drawn = sample(logits, params, [None] * 3, torch.Generator().manual_seed(7))
    assert isinstance(drawn[1], ValueError) and "NaN or inf" in str(drawn[1])
    assert isinstance(drawn[0], int) and isinstance(drawn[2], int)
