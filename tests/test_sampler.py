"""The batched sampler against the distributions it must draw from, and the logits processors
against their definitions (no daemon, no model)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from daemon.engine import token_choice  # noqa: E402
from daemon.engine.grammar import TokenMasks  # noqa: E402
from daemon.engine.kernels import cpu as kernels  # noqa: E402
from daemon.engine.logits_processors import apply_processors  # noqa: E402
from daemon.engine.sampler import SamplingParams, sample  # noqa: E402
from daemon.engine.token_choice import choose_tokens  # noqa: E402
from daemon.engine.token_counts import TokenCounts  # noqa: E402

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


def test_a_nan_fails_a_greedy_row_alone_and_an_infinite_logit_is_its_choice():
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(8))
    logits[0, 33] = float("nan")
    logits[1, 17] = logits[1, 30] = float("inf")
    logits[2] = float("-inf")  # nothing possible: argmax's answer, the first
    params = [SamplingParams(temperature=0.0)] * 3 + [SamplingParams(temperature=1.0)]
    drawn = sample(logits, params, [None] * 4, torch.Generator().manual_seed(9))
    assert isinstance(drawn[0], ValueError) and "NaN or inf" in str(drawn[0])
    assert drawn[1] == 17 and drawn[2] == 0 and isinstance(drawn[3], int)


# --- what the options do to the logits (logits_processors.py) and the counts they read ------------------


def counts_of(sequences: dict[int, tuple[list[int], list[int]]], vocab: int) -> TokenCounts:
    """Token counts of sequences given as {seq_id: (prompt, output)}, fed as a worker feeds them:
    the prompt in a chunk, then each output token in a step of its own."""
    counts = TokenCounts(vocab, torch.device("cpu"))
    for seq_id, (prompt, output) in sequences.items():
        counts.start(seq_id, prompt)
        counts.feed([(seq_id, 0, prompt)])  # a prefill feeds the prompt again: nothing to count
        for i, token in enumerate(output):
            counts.feed([(seq_id, len(prompt) + i, [token])])
    return counts


def test_penalties_follow_vllms_definitions_row_by_row():
    vocab = 12
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(8)) * 3
    sequences = {5: ([1, 2, 2], [3, 3, 3, 4]), 9: ([7], [8, 1]), 11: ([0], [0])}
    counts = counts_of(sequences, vocab)
    params = [
        SamplingParams(repetition_penalty=1.7, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(frequency_penalty=-0.3),
        SamplingParams(),  # not penalised: its row is left alone
    ]
    got = apply_processors(logits.clone(), params, [5, 9, 11], counts)
    for row, (seq_id, p) in enumerate(zip([5, 9, 11], params, strict=True)):
        prompt, output = sequences[seq_id]
        want = logits[row].clone()
        for token in set(prompt) | set(output):
            value = want[token]
            want[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(output):
            want[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
        if not p.penalised:
            want = logits[row]
        torch.testing.assert_close(got[row], want)


def test_recomputing_after_a_preemption_counts_nothing_twice():
    counts = counts_of({3: ([4, 5], [6, 6])}, vocab=10)
    assert counts.generated(3) == 2
    counts.feed([(3, 0, [4, 5, 6, 6])])  # readmitted: its tokens are computed again, then it decodes on
    counts.feed([(3, 4, [7])])
    assert counts.generated(3) == 3
    assert counts.output[counts.rows_of([3])[0]].tolist() == [0, 0, 0, 0, 0, 0, 2, 1, 0, 0]
    assert counts.prompt[counts.rows_of([3])[0]].nonzero().flatten().tolist() == [4, 5]


def test_released_rows_are_reused_clean_and_the_table_grows():
    counts = counts_of({i: ([i], [i + 1]) for i in range(9)}, vocab=16)  # past the first 8 rows
    counts.release(2)
    counts.start(20, [15])
    row = counts.rows_of([20])[0]
    assert counts.output[row].sum() == 0 and counts.prompt[row].nonzero().flatten().tolist() == [15]
    assert counts.generated(8) == 1 and counts.output[counts.rows_of([8])[0], 9] == 1


def test_min_tokens_bias_and_allowed_ids_shape_the_greedy_choice():
    vocab = 6
    logits = torch.zeros(4, vocab)
    logits[:, 2] = 5.0  # the stop token, likeliest
    counts = counts_of({0: ([1], [3]), 1: ([1], [3, 3]), 2: ([1], []), 3: ([1], [])}, vocab)
    params = [
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(2, 99)),  # 1 generated: held back
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(2,)),  # 2 generated: free
        SamplingParams(temperature=0, logit_bias=((4, 10.0), (2, -100.0))),
        SamplingParams(temperature=0, allowed_token_ids=(5, 1)),
    ]
    processed = apply_processors(logits, params, [0, 1, 2, 3], counts)
    assert sample(processed, params, [None] * 4) == [0, 2, 4, 1]


def test_min_p_keeps_only_tokens_near_the_likeliest():
    logits = torch.tensor([2.0, 1.9, 1.0, 0.0, -1.0])
    probs = torch.softmax(logits.double(), dim=-1)
    params = [SamplingParams(min_p=0.5)] * DRAWS  # keeps p >= 0.5 p_max: tokens 0 and 1 only
    drawn = sample(logits.repeat(DRAWS, 1), params, [None] * DRAWS, torch.Generator().manual_seed(9))
    kept = probs[:2] / probs[:2].sum()
    assert (frequencies(drawn, 5)[:2] - kept).abs().max() < 0.03 and frequencies(drawn, 5)[2:].sum() == 0
    everything = sample(logits.repeat(DRAWS, 1), [SamplingParams(min_p=0.0)] * DRAWS, [None] * DRAWS)
    assert (frequencies(everything, 5) - probs).abs().max() < 0.03


# --- the CPU kernel's draw (kernels/sample.c) ------------------------------------------------------


def kernel_draws(row: torch.Tensor, draws: int, **options: float) -> list[int]:
    """`row` drawn `draws` times with evenly spread uniform numbers: every interval of the
    cumulative distribution wider than 1/draws gets at least one."""
    rows = row.repeat(draws, 1)
    params = SamplingParams(
        temperature=options.get("temperature", 1.0),
        top_k=int(options.get("top_k", 0)),
        top_p=options.get("top_p", 1.0),
        min_p=options.get("min_p", 0.0),
    )
    uniform = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    tokens, _scores = kernels.sample_rows(rows, params.kernel_row * draws, uniform)
    return tokens


@pytest.mark.skipif(not kernels.available(), reason="the CPU kernels were not built")
@pytest.mark.parametrize("vocab", [7, 1024, 20_000])
def test_the_kernel_draws_the_whole_nucleus_and_nothing_else(vocab):
    generator = torch.Generator().manual_seed(vocab)
    draws = 400
    for scale in (0.1, 1.0, 8.0):
        logits = torch.randn(vocab, generator=generator) * scale
        probs = torch.softmax(logits.double(), dim=-1)
        ordered, order = probs.sort(descending=True)
        for p in (1e-7, 0.3, 0.9):
            share = torch.tensor(p, dtype=torch.float32).item()  # as the kernel sees it
            kept = int(((ordered.cumsum(0) - ordered) < share).sum())  # the smallest prefix reaching p
            nucleus = set(order[:kept].tolist())
            drawn = kernel_draws(logits, draws, top_p=p)
            assert set(drawn) <= nucleus, (scale, p)
            weights = probs[order[:kept]] / probs[order[:kept]].sum()
            assert {t for t, w in zip(order[:kept].tolist(), weights.tolist(), strict=True) if w > 2 / draws} <= set(
                drawn
            ), (scale, p)


@pytest.mark.skipif(not kernels.available(), reason="the CPU kernels were not built")
def test_the_kernel_keeps_ties_at_a_threshold_and_never_draws_a_minus_infinity():
    logits = torch.tensor([0.1, 0.25, 0.25, 0.25, 0.15]).log()
    assert set(kernel_draws(logits, 300, top_p=0.3)) == {1, 2, 3}  # every 0.25 kept, as a sort would not
    assert set(kernel_draws(logits, 300, top_k=2)) == {1, 2, 3}
    assert set(kernel_draws(logits, 300, min_p=0.9)) == {1, 2, 3}
    banned = torch.tensor([0.0, float("-inf"), 0.0, float("-inf")] * 5)
    assert set(kernel_draws(banned, 500, temperature=2.0)) <= {i for i in range(20) if i % 2 == 0}


def test_the_torch_path_draws_from_the_same_distribution(monkeypatch):
    """Where the kernels are not built (or not on the CPU) torch's operators draw: the same
    distribution, checked as the kernel's is above."""
    monkeypatch.setattr(kernels, "available", lambda: False)
    test_draws_follow_the_tempered_distribution()
    test_top_k_and_top_p_keep_only_their_tokens_row_by_row()
    test_tokens_of_probability_zero_are_never_drawn()
    test_min_p_keeps_only_tokens_near_the_likeliest()
    test_an_infinite_logit_fails_a_sampled_row_alone()
    test_greedy_rows_beside_sampled_rows_take_the_first_maximum()
    test_a_nan_fails_a_greedy_row_alone_and_an_infinite_logit_is_its_choice()
    test_a_seeded_row_draws_the_same_whatever_the_batch_around_it()


def test_the_torch_path_applies_the_same_penalties(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    test_penalties_follow_vllms_definitions_row_by_row()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("top", [0, 3, 40])
def test_token_logprobs_are_the_log_softmax_its_rank_and_top(monkeypatch, kernel, top):
    from daemon.engine.logprobs import token_logprobs

    if not kernel:
        monkeypatch.setattr(kernels, "available", lambda: False)
    elif not kernels.available():
        pytest.skip("the CPU kernels were not built")
    logits = torch.randn(5, 3000, generator=torch.Generator().manual_seed(top)) * 4
    logits[4, 100:] = float("-inf")  # a row where few tokens are possible at all
    tokens = [7, 2999, 0, 1500, 50]
    found = token_logprobs(logits, tokens, [top] * 5)
    reference = torch.log_softmax(logits.double(), dim=-1)
    for row, (token, entry) in enumerate(zip(tokens, found, strict=True)):
        assert entry.logprob == pytest.approx(reference[row, token].item(), abs=1e-5)
        assert entry.rank == 1 + int((logits[row] > logits[row, token]).sum())
        values, ids = reference[row].topk(top)
        assert entry.top_ids == ids.tolist()
        assert entry.top_logprobs == pytest.approx(values.tolist(), abs=1e-5)


# --- a step's whole choice (token_choice.py): one kernel call, or stage by stage ----------------------


def penalised_by_definition(row: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    want = row.clone()
    for token in set(prompt) | set(output):
        want[token] = want[token] / p.repetition_penalty if want[token] > 0 else want[token] * p.repetition_penalty
    for token in set(output):
        want[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    return want


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_a_steps_choice_penalises_then_chooses_and_scores_the_raw_logits(monkeypatch, kernel):
    """Every kind of row in one step: greedy and drawn, penalised or not, with logprobs or not,
    biased (the torch processors before the kernel), and a biased row that asks for logprobs
    (which sends the step stage by stage). Greedy rows take the argmax of the logits as vLLM's
    definitions leave them; every logprob is of the raw logits."""
    if not kernel:
        monkeypatch.setattr(kernels, "available", lambda: False)
    elif not kernels.available():
        pytest.skip("the CPU kernels were not built")
    vocab = 300
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(12)) * 3
    penalties = {"repetition_penalty": 1.4, "frequency_penalty": 0.6, "presence_penalty": 0.3}
    params = [
        SamplingParams(temperature=0.0, logprobs=3, **penalties),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0, top_p=0.9, logprobs=40, **penalties),
        SamplingParams(temperature=0.0, logit_bias=((7, 100.0),), presence_penalty=0.5),
        SamplingParams(temperature=0.7, min_p=0.1),
        SamplingParams(temperature=0.0, **penalties),
    ]
    seq_ids = [20, 21, 22, 23, 24, 25]
    history = {s: (list(range(s, s + 5)), [int(logits[i].argmax()), 9, 9]) for i, s in enumerate(seq_ids)}
    raw = torch.log_softmax(logits.double(), dim=-1)
    for biased_row_asks in (False, True):
        if biased_row_asks:  # a biased row that asks for logprobs: its raw logits must be kept first
            params[3] = SamplingParams(temperature=0.0, logit_bias=((7, 100.0),), logprobs=2)
        counts = counts_of({s: history[s] for s, p in zip(seq_ids, params, strict=True) if p.needs_counts}, vocab)
        assert token_choice._in_one_call(logits, params) == (kernel and not biased_row_asks)
        shared = torch.Generator().manual_seed(3)
        drawn, found = choose_tokens(logits.clone(), params, seq_ids, [None] * len(params), shared, counts)
        for row in (0, 5):
            want = penalised_by_definition(logits[row], *history[seq_ids[row]], params[row])
            assert drawn[row] == int(want.argmax()), row
        assert drawn[1] == int(logits[1].argmax()) and drawn[3] == 7
        assert all(isinstance(token, int) for token in drawn)
        assert sorted(found) == [row for row, p in enumerate(params) if p.logprobs is not None]
        for row, entry in found.items():
            assert entry.logprob == pytest.approx(raw[row, drawn[row]].item(), abs=1e-5), row
            assert entry.rank == 1 + int((logits[row] > logits[row, drawn[row]]).sum())
            values, ids = raw[row].topk(params[row].logprobs)
            assert entry.top_ids == ids.tolist()
            assert entry.top_logprobs == pytest.approx(values.tolist(), abs=1e-5)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_grammar_masks_allow_only_their_tokens_and_logprobs_stay_raw(monkeypatch, kernel):
    """Rows that follow a grammar draw only tokens their bitmask allows (xgrammar's layout: bit i %
    32 of word i // 32), greedy or drawn, penalised or not, beside rows without one; a masked row's
    logprobs are of its raw logits, as any row's."""
    if not kernel:
        monkeypatch.setattr(kernels, "available", lambda: False)
    elif not kernels.available():
        pytest.skip("the CPU kernels were not built")
    vocab = 300
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(5)) * 3
    allowed = {0: {3, 40, 299}, 2: {64, 65}, 3: {1, 2, 250}}  # row 1 follows no grammar
    bitmask = torch.zeros(4, (vocab + 31) // 32, dtype=torch.int32)
    for row, tokens in allowed.items():
        for token in tokens:
            bitmask[row, token // 32] |= torch.tensor(1 << (token % 32)).to(torch.int32)
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, top_p=0.95),
    ]
    seq_ids = [1, 2, 3, 4]
    counts = counts_of({3: ([64], [65])}, vocab)
    raw = torch.log_softmax(logits.double(), dim=-1)
    for seed in range(20):
        masks = TokenMasks(bitmask, sorted(allowed))
        drawn, found = choose_tokens(
            logits.clone(), params, seq_ids, [None] * 4, torch.Generator().manual_seed(seed), counts, masks
        )
        assert all(drawn[row] in tokens for row, tokens in allowed.items()), drawn
        assert drawn[0] == max(allowed[0], key=lambda t: logits[0, t]) and drawn[1] == int(logits[1].argmax())
        assert found[0].logprob == pytest.approx(raw[0, drawn[0]].item(), abs=1e-5)
        assert found[0].top_ids == raw[0].topk(2).indices.tolist()  # the raw likeliest, allowed or not
