"""Speculative decoding: lossless greedy and sampling, τ bounds, cache cropping, τ metrics."""

from __future__ import annotations

import copy
import itertools
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import MASK_ID, greedy_sequences, train_on_target, varied_target

from metattt.losses import block_prediction_loss
from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
from metattt.models.target import FrozenTarget
from metattt.spec import decode
from metattt.spec.decode import (
    GenerationResult,
    crop_cache,
    sampling_probs,
    speculative_generate,
    target_generate,
    top_p_filter,
)
from metattt.spec.metrics import AcceptanceLength, PerPositionAcceptance, summarize_tau
from metattt.stats import mean_and_stderr

S = 4  # block size of the greedy tests


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny and the loop is sequential: a second intra-op thread only adds
    # synchronisation, and on a loaded 2-core machine it made the sampling tests ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- models -------------------------------------------------------------------------------


def _drafter(target: FrozenTarget, block_size: int = S, layers: int = 2, seed: int = 1) -> BlockDrafter:
    torch.manual_seed(seed)
    cfg = BlockDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                    num_hidden_layers=layers, block_size=block_size)
    return BlockDrafter(cfg).attach_target(target)


def _random_prompt(rng: random.Random, vocab: int = 96) -> torch.Tensor:
    return torch.tensor([[rng.randrange(2, vocab) for _ in range(rng.randint(1, 12))]])


class OracleDrafter:
    """Drafts the target's own greedy continuation of one prompt.

    Its "hidden states" are one-hot rows of the known tokens and `logits` is the identity.
    It also checks the loop's invariant: the context cache covers exactly the positions
    before the block's anchor, and the block opens with the committed token at the anchor.
    """

    def __init__(self, sequence: list[int], vocab_size: int, block_size: int):
        self.sequence, self.vocab_size = sequence, vocab_size  # prompt + greedy continuation
        self.config = SimpleNamespace(block_size=block_size, mask_token_id=MASK_ID)

    def extend_cache(self, cache: int | None, features: torch.Tensor) -> int:
        return (cache or 0) + features.shape[1]  # the cache is just its length here

    def __call__(self, block_ids: torch.Tensor, anchors: torch.Tensor, cache: int) -> torch.Tensor:
        a = int(anchors[0, 0])
        assert cache == a, f"context cache holds {cache} positions, block anchored at {a}"
        assert int(block_ids[0, 0, 0]) == self.sequence[a]
        assert (block_ids[0, 0, 1:] == MASK_ID).all()
        toks = [self.sequence[p] if p < len(self.sequence) else 2 for p in range(a, a + self.config.block_size)]
        return F.one_hot(torch.tensor(toks), self.vocab_size).float()[None, None]  # (1, 1, S, V)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def draft(self, last_token: int, position: int, cache: int, choose):
        """The drafter interface (metattt.models.registry): one block forward, chosen by `choose`."""
        block = torch.full((1, 1, self.config.block_size), MASK_ID, dtype=torch.long)
        block[0, 0, 0] = last_token
        return choose(self.logits(self(block, torch.tensor([[position]]), cache=cache)[0, 0, 1:]).float())


@pytest.fixture(scope="module")
def greedy_target() -> FrozenTarget:
    torch.set_num_threads(1)
    return varied_target()


@pytest.fixture(scope="module")
def trained_drafter(greedy_target) -> BlockDrafter:
    """A drafter briefly trained on the target's greedy continuations of other prompts."""
    torch.set_num_threads(1)
    drafter = _drafter(greedy_target)
    train_on_target(drafter, greedy_target, greedy_sequences(greedy_target), steps=40)
    return drafter


def _greedy_cases(target: FrozenTarget, n: int = 20, seed: int = 0):
    """(prompt, max_new_tokens, eos) triples with random prompt lengths; half stop at an EOS the
    target really emits (its greedy 3rd..8th token), the others at a random length."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        prompt = _random_prompt(rng)
        max_new = rng.randint(1, 40)
        eos = None
        if i % 2 == 0:
            ref = target_generate(target, prompt, 8, None).tokens
            eos = ref[rng.randint(2, 7)]
            max_new = 40
        cases.append((prompt, max_new, eos))
    return cases


# --- greedy: lossless ---------------------------------------------------------------------


def test_target_generate_equals_uncached_greedy(greedy_target):
    rng = random.Random(5)
    for _ in range(3):
        prompt = _random_prompt(rng)
        ids = prompt
        for _ in range(12):
            nxt = greedy_target(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
        assert target_generate(greedy_target, prompt, 12, None).tokens == ids[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("trained", [False, True], ids=["random_drafter", "trained_drafter"])
def test_greedy_speculative_equals_target_greedy(greedy_target, trained, request):
    drafter = request.getfixturevalue("trained_drafter") if trained else _drafter(greedy_target)
    results, stops = [], set()
    for prompt, max_new, eos in _greedy_cases(greedy_target):
        ref = target_generate(greedy_target, prompt, max_new, eos)
        out = speculative_generate(greedy_target, drafter, prompt, max_new, eos)
        assert out.tokens == ref.tokens, f"prompt {prompt.tolist()} max_new {max_new} eos {eos}"
        assert len(out.tokens) <= max_new
        if eos is not None and eos in out.tokens:
            assert out.tokens.index(eos) == len(out.tokens) - 1 and out.stop_reason == "eos"
        stops.add(out.stop_reason)
        results.append(out)
    assert stops == {"eos", "length"}
    steps = [a for r in results for a in r.accepted]
    assert all(1 <= r.tau <= S for r in results if r.num_steps)
    if trained:
        assert sum(steps) > 0, "the trained drafter never got a draft accepted"
        assert any(0 < a < S - 1 for a in steps), "no partially accepted block"
        # some step was cut short by EOS or max_new_tokens after the verifier accepted more
        assert any(len(r.tokens) < 1 + sum(a + 1 for a in r.accepted) for r in results)


def test_oracle_drafter_reaches_full_blocks_and_stops_mid_block(greedy_target):
    rng = random.Random(3)
    for _ in range(4):
        prompt = _random_prompt(rng)
        greedy = target_generate(greedy_target, prompt, 1 + 3 * S + S, None).tokens
        oracle = OracleDrafter(prompt[0].tolist() + greedy, 96, S)

        # room for whole blocks: every step accepts all S-1 drafts and adds the bonus token
        out = speculative_generate(greedy_target, oracle, prompt, 1 + 3 * S, None)
        assert out.tokens == greedy[: 1 + 3 * S]
        assert out.accepted == [S - 1] * 3 and out.tau == S
        assert out.position_accepted == [3] * (S - 1) == out.position_reached

        # max_new_tokens in the middle of the second block
        out = speculative_generate(greedy_target, oracle, prompt, 1 + S + 2, None)
        assert out.tokens == greedy[: 1 + S + 2] and out.num_steps == 2 and out.stop_reason == "length"

        # EOS = the greedy token at the first block's 2nd draft: stops there, EOS included
        eos = greedy[2]
        first = greedy.index(eos)
        out = speculative_generate(greedy_target, oracle, prompt, 40, eos)
        assert out.tokens == greedy[: first + 1] == target_generate(greedy_target, prompt, 40, eos).tokens
        assert out.stop_reason == "eos"


def test_on_prefill_adapts_the_drafter_on_the_prefill_features(greedy_target, trained_drafter):
    from metattt.models.lora import add_lora, copy_lora, lora_parameters, set_lora

    model = add_lora(copy.deepcopy(trained_drafter), r=4, alpha=8)
    plain = copy_lora(model)
    harmful = {n: torch.randn_like(p) for n, p in lora_parameters(model).items()}  # scrambles the drafts
    prompt = torch.randint(2, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    seen = []

    def adapt(features):
        seen.append((features.clone(), torch.is_grad_enabled()))
        set_lora(model, harmful)

    hooked = speculative_generate(greedy_target, model, prompt, 32, None, on_prefill=adapt)
    assert len(seen) == 1 and seen[0][1], "called once, with gradients enabled"
    torch.testing.assert_close(seen[0][0], greedy_target(prompt, return_logits=False).features)
    assert hooked.adapt_time > 0 and hooked.wall_time >= hooked.prefill_time + hooked.adapt_time
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        speculative_generate(greedy_target, model, prompt, 32, None, on_prefill=adapt)
    set_lora(model, harmful)
    preset = speculative_generate(greedy_target, model, prompt, 32, None)
    assert (hooked.tokens, hooked.accepted) == (preset.tokens, preset.accepted)  # drafted with the hook's LoRA
    set_lora(model, plain)
    unadapted = speculative_generate(greedy_target, model, prompt, 32, None)
    assert unadapted.tokens == hooked.tokens and sum(unadapted.accepted) > sum(hooked.accepted)


def test_tau_bounds_and_position_counts(greedy_target, trained_drafter):
    for prompt, max_new, eos in _greedy_cases(greedy_target, n=8, seed=1):
        out = speculative_generate(greedy_target, trained_drafter, prompt, max_new, eos)
        if out.num_steps == 0:
            assert len(out.tokens) == 1 and out.tau != out.tau  # NaN: no verification step
            continue
        assert 1 <= out.tau <= S
        assert out.position_reached[0] == out.num_steps
        assert all(0 <= a <= r for a, r in zip(out.position_accepted, out.position_reached))
        assert sum(out.position_accepted) == sum(out.accepted)
        assert out.wall_time >= out.prefill_time > 0 and out.draft_time > 0 and out.verify_time > 0


def test_zero_and_one_token_budgets(greedy_target, trained_drafter):
    prompt = torch.tensor([5, 9, 13])  # (P,) is accepted as one prompt
    assert speculative_generate(greedy_target, trained_drafter, prompt, 0, None).tokens == []
    one = speculative_generate(greedy_target, trained_drafter, prompt, 1, None)
    assert one.tokens == target_generate(greedy_target, prompt, 1, None).tokens and one.num_steps == 0
    with pytest.raises(ValueError, match="one request at a time"):
        speculative_generate(greedy_target, trained_drafter, torch.ones(2, 3, dtype=torch.long), 4, None)
    with pytest.raises(ValueError, match="unknown acceptance rule"):
        speculative_generate(greedy_target, trained_drafter, prompt, 4, None, temperature=1.0, rule="nope")


# --- caches -------------------------------------------------------------------------------


def test_crop_removes_tokens_from_the_end(greedy_target):
    ids = torch.randint(2, 96, (1, 10))
    cache = greedy_target(ids[:, :6], use_cache=True).past_key_values
    cache = greedy_target(ids[:, 6:], past_key_values=cache, use_cache=True).past_key_values  # a "verification"
    assert cache.get_seq_length() == 10
    crop_cache(cache, 0)  # no-op (transformers 4.x would have emptied the cache on crop(0))
    assert cache.get_seq_length() == 10
    crop_cache(cache, 3)
    assert cache.get_seq_length() == 7
    nxt = greedy_target(ids[:, 7:8], past_key_values=cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(nxt, greedy_target(ids[:, :8]).logits[0, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        crop_cache(cache, -1)


def test_caches_after_rejections_equal_fresh_forward(greedy_target, trained_drafter):
    prompt = torch.tensor([[7, 30, 41, 2, 88]])
    P = prompt.shape[1]
    for max_new, eos in ((23, None), (40, target_generate(greedy_target, prompt, 12, None).tokens[10])):
        out = speculative_generate(greedy_target, trained_drafter, prompt, max_new, eos, return_cache=True)
        assert any(a < S - 1 for a in out.accepted), "no rejection: nothing was cropped"
        ids = torch.cat([prompt, torch.tensor([out.tokens])], 1)  # (1, P + n)
        L = ids.shape[1] - 1  # every committed position but the last token
        # target: the cropped cache + the last token gives the logits of a fresh full forward
        assert out.target_cache.get_seq_length() == L
        cont = greedy_target(ids[:, L:], past_key_values=out.target_cache, use_cache=True)
        fresh = greedy_target(ids)
        torch.testing.assert_close(cont.logits[0, -1], fresh.logits[0, -1], rtol=1e-5, atol=1e-5)
        # the tapped hidden states are unnormalised and larger than the logits' differences suggest: float32
        # sums in another order (cached vs fresh attention) differ by a few 1e-5 there; a wrong crop by ~1e-1
        torch.testing.assert_close(cont.features[0, -1], fresh.features[0, -1], rtol=1e-4, atol=5e-5)
        # drafter: the context cache equals one built from fresh features of positions 0..L-1
        assert out.drafter_cache.length == L and L > P
        ref = trained_drafter.extend_cache(None, fresh.features[:, :L])
        for (k, v), (k_ref, v_ref) in zip(out.drafter_cache.kv, ref.kv):
            torch.testing.assert_close(k, k_ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-4)


# --- sampling: lossless, statistically ----------------------------------------------------

V, SB, K = 8, 3, 4  # vocab, block size, new tokens per run of the sampling tests
PROMPT = torch.tensor([[3, 5, 2, 6]])


@pytest.fixture(scope="module")
def sampling_models():
    """A tiny-vocabulary target with peaked (not near-uniform) logits, and a drafter trained for
    a few steps on its samples, so that runs have rejections at every block position as well
    as fully accepted blocks (bonus token)."""
    torch.set_num_threads(1)
    target = varied_target(vocab_size=V, layers=2, init=0.6)
    drafter = _drafter(target, block_size=SB, layers=1)
    joint = exact_joint(target, 1.0, 1.0)
    g = torch.Generator().manual_seed(123)
    seqs = decode_index(torch.multinomial(joint, 512, replacement=True, generator=g))  # (512, K)
    ids = torch.cat([PROMPT.expand(512, -1), seqs], 1)
    attn = torch.ones_like(ids)
    anchors, ok = torch.full((512, 1), PROMPT.shape[1]), torch.ones(512, 1, dtype=torch.bool)
    feats = target(ids).features
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    for _ in range(20):
        loss = block_prediction_loss(drafter, feats, ids, attn, attn, anchors, ok, SB, MASK_ID, 4.0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    drafter.requires_grad_(False)
    return target, drafter


def decode_index(idx: torch.Tensor) -> torch.Tensor:
    """Base-V index of a K-token sequence -> the tokens (..., K)."""
    return torch.stack([idx // V ** (K - 1 - j) % V for j in range(K)], -1)


def exact_joint(target: FrozenTarget, temperature: float, top_p: float, prompt: torch.Tensor = PROMPT) -> torch.Tensor:
    """P(t_1..t_K | prompt) under tempered top-p sampling, by enumerating every prefix: (V^K,)."""
    prompt = prompt.reshape(1, -1)
    P = prompt.shape[1]
    prefixes = torch.tensor(list(itertools.product(range(V), repeat=K - 1)))  # (V^(K-1), K-1)
    logits = target(torch.cat([prompt.expand(len(prefixes), -1), prefixes], 1)).logits  # (M, P+K-1, V)
    probs = sampling_probs(logits[:, P - 1:], temperature, top_p)  # (M, K, V): next-token dists
    seqs = decode_index(torch.arange(V ** K))  # (V^K, K)
    row = (seqs[:, : K - 1] * V ** torch.arange(K - 2, -1, -1)).sum(-1)  # index of the K-1 prefix
    joint = torch.ones(V ** K)
    for j in range(K):
        joint = joint * probs[row, j, seqs[:, j]]
    return joint


def chi_square_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's χ² goodness of fit; cells expected below `min_expected` are pooled into one.

    p-value = Q(df/2, χ²/2), the regularized upper incomplete gamma (scipy is not installed).
    """
    n = observed.sum()
    expected = expected_probs.double() * n
    order = expected.argsort(descending=True)
    o, e = observed.double()[order], expected[order]
    k = int((e >= min_expected).sum())
    o = torch.cat([o[:k], o[k:].sum()[None]])
    e = torch.cat([e[:k], e[k:].sum()[None]])
    if e[-1] < min_expected:  # the pooled tail itself is small: merge it into the last kept cell
        o = torch.cat([o[:-2], o[-2:].sum()[None]])
        e = torch.cat([e[:-2], e[-2:].sum()[None]])
    stat = ((o - e) ** 2 / e).sum()
    df = len(o) - 1
    assert df >= 5, "too few cells for a meaningful test"
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def _sample_counts(target, drafter, runs: int, temperature: float, top_p: float, rule: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V ** K)
    accepted = torch.zeros(SB, dtype=torch.long)
    for _ in range(runs):
        if rule == "target":
            out = target_generate(target, PROMPT, K, None, temperature, top_p, generator=g)
        else:
            out = speculative_generate(target, drafter, PROMPT, K, None, temperature, top_p, rule=rule, generator=g)
        counts[sum(t * V ** (K - 1 - j) for j, t in enumerate(out.tokens))] += 1
        for a in out.accepted:
            accepted[a] += 1
    return counts, accepted


ALPHA = 1e-3


@pytest.mark.parametrize("rule,temperature,top_p", [("exact", 1.0, 1.0), ("speculative", 0.8, 0.9), ("dflash", 1.0, 1.0)])
def test_sampling_keeps_the_target_distribution(sampling_models, rule, temperature, top_p):
    target, drafter = sampling_models
    counts, accepted = _sample_counts(target, drafter, 1500, temperature, top_p, rule, seed=0)
    # every path ran: rejection of the first draft, partial acceptance, whole block + bonus
    assert (accepted > 20).all(), f"acceptance histogram {accepted.tolist()}"
    p = chi_square_pvalue(counts, exact_joint(target, temperature, top_p))
    assert p > ALPHA, f"{rule}: output distribution differs from the target's (p = {p:.2e})"


def test_dflash_protocol_drafts_the_argmax_and_accepts_by_equality(sampling_models, monkeypatch):
    """rule="dflash" (DFlash's loop): argmax drafts (q one-hot at each draft), the exact rule."""
    target, drafter = sampling_models
    seen: dict[str, list] = {"exact": [], "speculative": []}

    def spy(name):
        def rule(p, q, drafts, generator):
            seen[name].append((q.clone(), drafts.clone()))
            return decode.accept_exact(p, q, drafts, generator) if name == "exact" else \
                decode.accept_speculative(p, q, drafts, generator)
        return rule

    for name in seen:
        monkeypatch.setitem(decode.ACCEPT_RULES, name, spy(name))
    for rule in ("dflash", "exact"):
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            speculative_generate(target, drafter, PROMPT, K, None, 1.0, 1.0, rule=rule, generator=g)
    dflash, exact = seen["exact"][: len(seen["exact"]) // 2], seen["exact"][len(seen["exact"]) // 2:]
    assert dflash and not seen["speculative"]
    for q, drafts in dflash:
        assert torch.equal(q, F.one_hot(drafts, V).to(q.dtype)), "dflash drafted something other than the argmax"
    assert any(not torch.equal(q, F.one_hot(d, V).to(q.dtype)) for q, d in exact), "exact alone samples the drafts"


def test_dflash_protocol_is_greedy_lossless(greedy_target, trained_drafter):
    for prompt, max_new, eos in _greedy_cases(greedy_target)[:6]:
        ref = target_generate(greedy_target, prompt, max_new, eos)
        assert speculative_generate(greedy_target, trained_drafter, prompt, max_new, eos, rule="dflash").tokens == ref.tokens
    with pytest.raises(ValueError, match="dflash"):
        speculative_generate(greedy_target, trained_drafter, torch.tensor([[3, 4]]), 4, None, 1.0, rule="nonsense")


def test_target_sampling_matches_enumeration(sampling_models):
    target, _ = sampling_models
    counts, _ = _sample_counts(target, None, 500, 0.8, 0.9, "target", seed=1)
    assert chi_square_pvalue(counts, exact_joint(target, 0.8, 0.9)) > ALPHA


def _accept_every_draft(p, q, drafts, generator):
    n = drafts.shape[0]
    return n, int(torch.multinomial(p[n], 1, generator=generator))


def _resample_from_p(p, q, drafts, generator):
    """The classic bug: speculative acceptance, but a rejected draft is resampled from p, not p - q."""
    n = drafts.shape[0]
    rows = torch.arange(n)
    ok = torch.rand(n, generator=generator) * q[rows, drafts] < p[rows, drafts]
    a = int(ok.long().cumprod(0).sum())
    return a, int(torch.multinomial(p[a], 1, generator=generator))


@pytest.mark.parametrize("wrong", [_accept_every_draft, _resample_from_p], ids=["accept_all", "resample_from_p"])
def test_the_sampling_test_rejects_a_wrong_rule(sampling_models, monkeypatch, wrong):
    target, drafter = sampling_models
    monkeypatch.setitem(decode.ACCEPT_RULES, "wrong", wrong)
    counts, _ = _sample_counts(target, drafter, 600, 1.0, 1.0, "wrong", seed=0)
    p = chi_square_pvalue(counts, exact_joint(target, 1.0, 1.0))
    assert p < ALPHA, f"a wrong rule passed the distribution test (p = {p:.2e})"


def test_top_p_filter_keeps_smallest_set_reaching_top_p():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([0.0, 0.5, 0.0, 0.25]) / 0.75)
    torch.testing.assert_close(top_p_filter(probs, 0.75), torch.tensor([0.0, 0.5, 0.0, 0.25]) / 0.75)
    torch.testing.assert_close(top_p_filter(probs, 0.3), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert top_p_filter(probs, 1.0) is probs


# --- metrics ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")  # compute() before update(): NaN
def test_acceptance_length_metric_and_merging():
    steps_a, steps_b = [0, 3, 1, 2], [3, 3, 0]
    m = AcceptanceLength()
    m.update(steps_a)
    assert m.compute().item() == pytest.approx(sum(a + 1 for a in steps_a) / 4)

    # two "ranks": merging their sum-reduced states equals one metric over all steps
    rank0, rank1, everything = AcceptanceLength(), AcceptanceLength(), AcceptanceLength()
    rank0.update(steps_a)
    rank1.update(torch.tensor(steps_b))
    everything.update(steps_a + steps_b)
    rank0.merge_state(rank1)
    assert rank0.compute().item() == pytest.approx(everything.compute().item())
    assert everything.compute().item() == pytest.approx(sum(a + 1 for a in steps_a + steps_b) / 7)
    assert torch.isnan(AcceptanceLength().compute())

    pos = PerPositionAcceptance(block_size=4)
    pos.update(steps_a)
    out = pos.compute()
    assert out["reached"].tolist() == [4, 3, 2] and out["accepted"].tolist() == [3, 2, 1]
    torch.testing.assert_close(out["marginal"], torch.tensor([3, 2, 1]) / 4)
    other = PerPositionAcceptance(block_size=4)
    other.update(steps_b)
    pos.merge_state(other)
    assert pos.compute()["accepted"].tolist() == [5, 4, 3]
    with pytest.raises(ValueError):
        pos.update([4])


def test_metrics_agree_with_generation_results(greedy_target, trained_drafter):
    results = [speculative_generate(greedy_target, trained_drafter, prompt, max_new, eos)
               for prompt, max_new, eos in _greedy_cases(greedy_target, n=6, seed=2)]
    tau, pos = AcceptanceLength(), PerPositionAcceptance(S)
    for r in results:
        tau.update(r.accepted)
        pos.update(r.accepted)
    steps = [a for r in results for a in r.accepted]
    assert tau.compute().item() == pytest.approx(sum(a + 1 for a in steps) / len(steps))
    assert pos.compute()["accepted"].tolist() == [sum(x) for x in zip(*(r.position_accepted for r in results))]
    assert pos.compute()["reached"].tolist() == [sum(x) for x in zip(*(r.position_reached for r in results))]

    summary = summarize_tau(r.accepted for r in results)
    with_steps = [r for r in results if r.num_steps]
    assert summary["tau"] == pytest.approx(sum(r.tau for r in with_steps) / len(with_steps))
    assert summary["tau_pooled"] == pytest.approx(tau.compute().item())
    mean, se = mean_and_stderr([1.0, 2.0, 3.0])
    assert mean == 2.0 and se == pytest.approx(1.0 / 3**0.5)
    assert isinstance(results[0], GenerationResult)
