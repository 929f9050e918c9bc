"""Batched speculative decoding (metattt.spec.batched): every row of a batch decodes what its request
decodes alone, greedy and sampled, with per-row LoRA, prefill TTT and online updates."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from conftest import MASK_ID, greedy_sequences, train_on_target, varied_target
from test_spec import K, V, chi_square_pvalue, decode_index, exact_joint

from metattt.config import OnlineConfig, TTTConfig
from metattt.losses import block_prediction_loss
from metattt.models.ar_drafter import ARDrafter, ARDrafterConfig
from metattt.models.batched_lora import stack_lora
from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
from metattt.models.lora import add_lora, copy_lora, set_lora
from metattt.serve import TTTSpeculator
from metattt.spec import decode
from metattt.spec.batched import prefill_ttt_batched, speculative_generate_batch, target_generate_batch
from metattt.spec.decode import speculative_generate, target_generate
from metattt.ttt.batched import ttt_adapt_batched
from metattt.ttt.online import OnlineTTT
from metattt.ttt.tasks import prefill_ttt, ttt_adapt

S = 4
KINDS = ["block", "autoregressive"]


@pytest.fixture(scope="module")
def target():
    torch.set_num_threads(1)
    return varied_target()


def _drafter(target, kind: str, block_size: int = S, layers: int = 2):
    torch.manual_seed(1)
    config_cls, model_cls = (BlockDrafterConfig, BlockDrafter) if kind == "block" else (ARDrafterConfig, ARDrafter)
    cfg = config_cls.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                 num_hidden_layers=layers, block_size=block_size)
    return model_cls(cfg).attach_target(target)


@pytest.fixture(scope="module", params=KINDS)
def drafter(request, target):
    """A drafter of each kind briefly trained on the target's greedy continuations: partial and
    whole-block acceptances both happen."""
    torch.set_num_threads(1)
    d = _drafter(target, request.param)
    train_on_target(d, target, greedy_sequences(target), steps=40)
    return d


def _cases(target, n: int = 24, seed: int = 0):
    """Prompts of 1..16 tokens, per-row budgets, and one EOS token that about half the rows emit
    within their budget (a token the target's greedy continuations often contain)."""
    rng = random.Random(seed)
    prompts = [torch.tensor([rng.randrange(2, 96) for _ in range(rng.randint(1, 16))]) for _ in range(n)]
    limits = [40 if i % 2 else rng.randint(1, 40) for i in range(n)]
    counts: dict[int, int] = {}
    for p, limit in zip(prompts, limits):
        for t in set(target_generate(target, p, limit, None).tokens[1:]):
            counts[t] = counts.get(t, 0) + 1
    eos = min(counts, key=lambda t: (abs(counts[t] - n / 2), t))
    return prompts, limits, eos


# --- greedy: equal to the requests alone -----------------------------------------------------


def test_batched_greedy_equals_each_request_alone(target, drafter):
    prompts, limits, eos = _cases(target)
    alone = [speculative_generate(target, drafter, p, n, eos) for p, n in zip(prompts, limits)]
    batched = speculative_generate_batch(target, drafter, prompts, limits, eos)
    assert len(batched) == len(prompts)
    for p, n, one, row in zip(prompts, limits, alone, batched):
        assert row.tokens == target_generate(target, p, n, eos).tokens, (p.tolist(), n)
        assert (row.tokens, row.accepted, row.stop_reason) == (one.tokens, one.accepted, one.stop_reason)
        assert (row.position_accepted, row.position_reached) == (one.position_accepted, one.position_reached)
        assert row.step_starts == one.step_starts and len(row.tokens) <= n
    assert {r.stop_reason for r in batched} == {"eos", "length"}
    steps = [a for r in batched for a in r.accepted]
    assert any(0 < a < S - 1 for a in steps) and S - 1 in steps, "no partial or no whole-block acceptance"
    # rows ended mid-block (the verifier accepted more than EOS / the budget let them keep)
    assert any(len(r.tokens) < 1 + sum(a + 1 for a in r.accepted) for r in batched)
    assert len({r.num_steps for r in batched}) > 3, "rows should leave the batch at different steps"
    assert all(r.wall_time >= r.prefill_time > 0 for r in batched)


def test_compacting_after_every_step_changes_nothing(target, drafter):
    prompts, limits, eos = _cases(target, n=12, seed=1)
    never = speculative_generate_batch(target, drafter, prompts, limits, eos, compact_slack=10**6)
    every = speculative_generate_batch(target, drafter, prompts, limits, eos, compact_slack=0)
    assert [(r.tokens, r.accepted) for r in never] == [(r.tokens, r.accepted) for r in every]


def test_batched_target_only_equals_target_generate(target):
    prompts, limits, eos = _cases(target, n=12, seed=2)
    rows = target_generate_batch(target, prompts, limits, eos)
    for p, n, row in zip(prompts, limits, rows):
        ref = target_generate(target, p, n, eos)
        assert (row.tokens, row.num_steps, row.stop_reason) == (ref.tokens, ref.num_steps, ref.stop_reason)


def test_zero_and_one_token_budgets(target, drafter):
    prompts = [torch.tensor([5, 9, 13]), torch.tensor([[7, 8]])]  # (P,) and (1, P) both
    assert [r.tokens for r in speculative_generate_batch(target, drafter, prompts, 0, None)] == [[], []]
    rows = speculative_generate_batch(target, drafter, prompts, [1, 0], None)
    assert rows[0].tokens == target_generate(target, prompts[0], 1, None).tokens and rows[0].num_steps == 0
    assert rows[1].tokens == []


# --- per-row LoRA, prefill TTT, online updates -----------------------------------------------


def _lora_model(drafter):
    kind_targets = ["fc", "q_proj", "k_proj", "v_proj"] if isinstance(drafter, BlockDrafter) else \
        ["fc", "cross_k_proj", "cross_v_proj", "cross_q_proj", "up_proj"]
    return add_lora(drafter, r=4, alpha=8, target_modules=kind_targets, seed=0)


def _random_adapter(model, seed: int, b_std: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g) * (b_std if ".lora_B." in n else 0.3)
            for n, t in copy_lora(model).items()}


@pytest.fixture(scope="module")
def lora_model(drafter):
    import copy

    return _lora_model(copy.deepcopy(drafter))


def test_each_row_drafts_with_its_own_adapter(target, lora_model):
    model = lora_model
    prompts, limits, eos = _cases(target, n=8, seed=3)
    adapters = [_random_adapter(model, seed=i) for i in range(len(prompts))]
    alone = []
    for p, n, a in zip(prompts, limits, adapters):
        set_lora(model, a)
        alone.append(speculative_generate(target, model, p, n, eos))
    set_lora(model, _random_adapter(model, seed=99))  # the model's own LoRA must not matter
    rows = speculative_generate_batch(target, model, prompts, limits, eos, lora=stack_lora(adapters))
    assert [(r.tokens, r.accepted) for r in rows] == [(r.tokens, r.accepted) for r in alone]
    assert len({tuple(r.accepted) for r in alone}) > 1
    with pytest.raises(ValueError, match="one row per prompt"):
        speculative_generate_batch(target, model, prompts, limits, eos, lora=stack_lora(adapters[:2]))


def test_prefill_ttt_per_row_equals_each_request_alone(target, lora_model):
    model = lora_model
    init = _random_adapter(model, seed=7)
    ttt = TTTConfig(steps=2, lr=0.3, clip=1.0, num_anchors=6)  # gamma None: by block size, as ttt_adapt
    prompts = [torch.randint(2, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (9, 14, 6, 20)]
    seeds = [0, 1, 2, 3]
    adapted_alone, alone = [], []
    for p, s in zip(prompts, seeds):
        hook = prefill_ttt(model, init, p, ttt, s, None, [])

        def spy(features, hook=hook):
            hook(features)
            adapted_alone.append(copy_lora(model))

        alone.append(speculative_generate(target, model, p, 24, None, on_prefill=spy))
    seen = []
    batched_hook = prefill_ttt_batched(model, init, prompts, ttt, seeds)

    def batched_spy(features):
        seen.append([f.shape for f in features])
        out = batched_hook(features)
        seen.append(out)
        return out

    rows = speculative_generate_batch(target, model, prompts, 24, None, on_prefill=batched_spy)
    assert seen[0] == [(1, p.shape[1], target.hidden_size * 2) for p in prompts]
    for b, adapted in enumerate(adapted_alone):
        assert any(not torch.equal(adapted[n], init[n]) for n in init), "TTT changed nothing"
        for n, t in adapted.items():
            torch.testing.assert_close(seen[1][n][b], t, rtol=1e-5, atol=1e-5)
    assert [(r.tokens, r.accepted) for r in rows] == [(r.tokens, r.accepted) for r in alone]
    assert all(r.adapt_time > 0 for r in rows)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        speculative_generate_batch(target, model, prompts, 4, None, on_prefill=batched_spy)


def test_batched_ttt_reads_a_null_gamma_by_block_size(target, lora_model):
    model = lora_model
    init = _random_adapter(model, seed=8)
    ttt = TTTConfig(steps=2, lr=0.3, num_anchors=4)
    prompts = [torch.randint(2, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (10, 16)]
    feats = [target(p, return_logits=False).features for p in prompts]
    batched = ttt_adapt_batched(model, init, prompts, feats, ttt, [torch.Generator().manual_seed(i) for i in (0, 1)])
    for i, (p, f) in enumerate(zip(prompts, feats)):
        one = ttt_adapt(model, init, p, f, ttt, torch.Generator().manual_seed(i))
        for n, t in one.params.items():
            torch.testing.assert_close(batched[i].params[n], t, rtol=1e-5, atol=1e-6)


ONLINE = OnlineConfig(every=2, steps=1, window=24, num_anchors=6, prompt_anchors=2, lr=0.5)


@pytest.mark.parametrize("detach_context", [False, True])
def test_online_updates_per_row_equal_each_request_alone(target, lora_model, detach_context):
    """With detach_context, each row's update reads its own slots of the batch's context cache."""
    model = lora_model
    cfg = replace(ONLINE, detach_context=detach_context)
    init = _random_adapter(model, seed=9)
    prompts, limits, eos = _cases(target, n=8, seed=4)
    alone, updates = [], 0
    for i, (p, n) in enumerate(zip(prompts, limits)):
        set_lora(model, init)
        online = OnlineTTT(model, init, TTTConfig(), cfg, p.numel(), seed=i)
        alone.append(speculative_generate(target, model, p, n, eos, online=online))
        updates += online.updates
    updaters = [OnlineTTT(model, None, TTTConfig(), cfg, p.numel(), seed=i) for i, p in enumerate(prompts)]
    rows = speculative_generate_batch(target, model, prompts, limits, eos, lora=stack_lora([init] * len(prompts)),
                                      online=updaters)
    assert updates > 5 and sum(o.updates for o in updaters) == updates
    for one, row in zip(alone, rows):
        assert (row.tokens, row.accepted, row.online_updates) == (one.tokens, one.accepted, one.online_updates)
    assert sum(r.online_updates for r in rows) > 0, "no update asked for a context rebuild"


# --- sampling: the target's distribution, per row ---------------------------------------------

SB = 3  # block size; vocab V and new tokens per run K are test_spec's, whose exact_joint enumerates them
PROMPTS = [torch.tensor([3, 5, 2, 6]), torch.tensor([0, 0]), torch.tensor([4, 3, 3, 6, 4, 7, 7])]  # ragged, not too peaked


@pytest.fixture(scope="module")
def sampling_models():
    """A tiny-vocabulary target with peaked logits and a drafter trained a few steps on its samples
    after every prompt, so runs see rejections at every position and whole blocks."""
    torch.set_num_threads(1)
    target = varied_target(vocab_size=V, layers=2, init=0.6)
    drafter = _drafter(target, "block", block_size=SB, layers=1)
    g = torch.Generator().manual_seed(123)
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    batches = []
    for prompt in PROMPTS:
        seqs = decode_index(torch.multinomial(exact_joint(target, 1.0, 1.0, prompt), 256, replacement=True,
                                               generator=g))
        ids = torch.cat([prompt.expand(256, -1), seqs], 1)
        batches.append((ids, target(ids).features, torch.full((256, 1), prompt.numel())))
    for _ in range(20):
        for ids, feats, anchors in batches:
            attn = torch.ones_like(ids)
            loss = block_prediction_loss(drafter, feats, ids, attn, attn, anchors, torch.ones_like(anchors).bool(),
                                         SB, MASK_ID, 4.0).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    drafter.requires_grad_(False)
    return target, drafter


def _batched_counts(target, drafter, runs: int, temperature: float, top_p: float, rule: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(PROMPTS), V ** K)
    accepted = torch.zeros(SB, dtype=torch.long)
    for _ in range(runs):
        rows = speculative_generate_batch(target, drafter, PROMPTS, K, None, temperature, top_p, rule=rule,
                                          generators=g)
        for b, row in enumerate(rows):
            counts[b, sum(t * V ** (K - 1 - j) for j, t in enumerate(row.tokens))] += 1
            for a in row.accepted:
                accepted[a] += 1
    return counts, accepted


ALPHA = 1e-3


# "dflash" is "exact" with argmax drafts: the per-row generator test below shows it samples what one
# request samples, whose distribution tests/test_spec.py checks
@pytest.mark.parametrize("rule,temperature,top_p", [("exact", 1.0, 1.0), ("speculative", 0.8, 0.9)])
def test_sampling_keeps_the_target_distribution_in_every_row(sampling_models, rule, temperature, top_p):
    target, drafter = sampling_models
    counts, accepted = _batched_counts(target, drafter, 600, temperature, top_p, rule, seed=0)
    assert (accepted > 20).all(), f"acceptance histogram {accepted.tolist()}"
    for b, prompt in enumerate(PROMPTS):
        p = chi_square_pvalue(counts[b], exact_joint(target, temperature, top_p, prompt))
        assert p > ALPHA, f"{rule}, row {b}: output distribution differs from the target's (p = {p:.2e})"


def test_the_batched_sampling_test_rejects_a_wrong_rule(sampling_models, monkeypatch):
    def accept_every_draft(p, q, drafts, generator):
        n = drafts.shape[0]
        return n, int(torch.multinomial(p[n], 1, generator=generator))

    target, drafter = sampling_models
    monkeypatch.setitem(decode.ACCEPT_RULES, "wrong", accept_every_draft)
    counts, _ = _batched_counts(target, drafter, 400, 1.0, 1.0, "wrong", seed=0)
    assert max(chi_square_pvalue(counts[b], exact_joint(target, 1.0, 1.0, p)) for b, p in enumerate(PROMPTS)) < ALPHA


@pytest.mark.parametrize("rule", ["exact", "speculative", "dflash"])
def test_per_row_generators_sample_what_each_request_samples_alone(sampling_models, rule):
    target, drafter = sampling_models
    for seed in range(6):
        gens = [torch.Generator().manual_seed(seed * 10 + b) for b in range(len(PROMPTS))]
        rows = speculative_generate_batch(target, drafter, PROMPTS, K + 3, None, 1.0, 0.95, rule=rule,
                                          generators=gens)
        for b, (prompt, row) in enumerate(zip(PROMPTS, rows)):
            one = speculative_generate(target, drafter, prompt, K + 3, None, 1.0, 0.95, rule=rule,
                                       generator=torch.Generator().manual_seed(seed * 10 + b))
            assert (row.tokens, row.accepted) == (one.tokens, one.accepted)
    gens = [torch.Generator().manual_seed(b) for b in range(len(PROMPTS))]
    rows = target_generate_batch(target, PROMPTS, 6, None, 0.8, 0.9, generators=gens)
    for b, (prompt, row) in enumerate(zip(PROMPTS, rows)):
        assert row.tokens == target_generate(target, prompt, 6, None, 0.8, 0.9,
                                             generator=torch.Generator().manual_seed(b)).tokens


# --- serving ----------------------------------------------------------------------------------


def test_speculator_generates_a_list_of_prompts_as_each_alone(target, lora_model):
    spec = TTTSpeculator(target, lora_model, TTTConfig(steps=2, lr=0.3, num_anchors=6),
                         _random_adapter(lora_model, seed=11))
    prompts = [torch.randint(2, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 12, 5)]
    for kw in ({}, {"adapt": False}, {"online": ONLINE}):
        alone = [spec.generate(p, max_new_tokens=20, **kw) for p in prompts]
        with torch.inference_mode():  # as serving code often runs; TTT still gets its gradients
            rows = spec.generate(prompts, max_new_tokens=20, **kw)
        assert isinstance(rows, list) and len(rows) == len(prompts)
        assert [(r.tokens, r.accepted) for r in rows] == [(r.tokens, r.accepted) for r in alone], kw
    spec.max_batch_size = 2
    with pytest.raises(ValueError, match="maximum batch size 2"):
        spec.generate(prompts, max_new_tokens=4)


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input_is_refused_clearly(target, drafter):
    context = target.config.max_position_embeddings
    ok = [torch.tensor([3, 4, 5])]
    for fn in (lambda p, **kw: speculative_generate_batch(target, drafter, p, 4, None, **kw),
               lambda p, **kw: target_generate_batch(target, p, 4, None, **kw)):
        with pytest.raises(ValueError, match="no prompts"):
            fn([])
        with pytest.raises(ValueError, match="longer than the target's context"):
            fn([torch.tensor([3, 4]), torch.full((context + 1,), 3)])
        with pytest.raises(ValueError, match="past the target's context"):
            fn([torch.full((context - 2,), 3)])
        with pytest.raises(ValueError, match="maximum batch size 2"):
            fn(ok * 3, max_batch_size=2)
        with pytest.raises(ValueError, match="prompt 1 is empty"):
            fn([torch.tensor([3]), torch.tensor([], dtype=torch.long)])
        with pytest.raises(ValueError, match=r"prompt 0 has shape \(2, 3\)"):
            fn([torch.ones(2, 3, dtype=torch.long)])
        with pytest.raises(TypeError, match="list of"):
            fn(torch.ones(2, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="2 generators"):
            fn(ok, generators=[None, None])
    with pytest.raises(ValueError, match="1 prompts but 2 max_new_tokens"):
        speculative_generate_batch(target, drafter, ok, [3, 4], None)
    with pytest.raises(ValueError, match="unknown acceptance rule"):
        speculative_generate_batch(target, drafter, ok, 4, None, temperature=1.0, rule="nope")
    with pytest.raises(ValueError, match="online updaters"):
        speculative_generate_batch(target, drafter, ok, 4, None, online=[])
