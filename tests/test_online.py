"""Online TTT during decoding (metattt.ttt.online): lossless, cache consistent after an update, no
state between requests, and updates that read only what the target committed."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from conftest import MASK_ID, greedy_sequences, train_on_target, varied_target

from metattt.config import OnlineConfig, TTTConfig
from metattt.models.ar_drafter import ARDrafter, ARDrafterConfig
from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
from metattt.models.lora import add_lora, copy_lora, lora_parameters, set_lora
from metattt.spec.decode import speculative_generate, target_generate
from metattt.ttt.online import OnlineTTT, online_anchors

S = 4
ONLINE = OnlineConfig(every=2, steps=1, window=24, num_anchors=6, prompt_anchors=2, lr=0.5)


@pytest.fixture(scope="module")
def target():
    torch.set_num_threads(1)
    return varied_target()


def _model(target, kind: str, targets: list[str] | None = None):
    torch.manual_seed(1)
    if kind == "block":
        cfg = BlockDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                             num_hidden_layers=2, block_size=S)
        drafter = BlockDrafter(cfg).attach_target(target)
    else:
        cfg = ARDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                          num_hidden_layers=2, block_size=S)
        drafter = ARDrafter(cfg).attach_target(target)
    train_on_target(drafter, target, greedy_sequences(target, n=12), steps=15)
    if targets is None:
        targets = ["fc", "k_proj", "v_proj"] if kind == "block" else ["fc", "cross_k_proj", "cross_v_proj", "up_proj"]
    return add_lora(drafter, r=4, alpha=8, target_modules=targets, seed=0)


@pytest.fixture(scope="module", params=["block", "autoregressive"])
def model(request, target):
    return _model(target, request.param)


def _cases(target, n: int = 20, seed: int = 0):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        prompt = torch.tensor([[rng.randrange(2, 96) for _ in range(rng.randint(6, 20))]])
        max_new, eos = rng.randint(5, 40), None
        if i % 2 == 0:
            eos = target_generate(target, prompt, 10, None).tokens[rng.randint(4, 9)]
            max_new = 40
        cases.append((prompt, max_new, eos))
    return cases


def test_greedy_with_online_updates_equals_target_greedy(target, model):
    init = copy_lora(model)
    stops, updates = set(), 0
    for i, (prompt, max_new, eos) in enumerate(_cases(target)):
        set_lora(model, init)
        online = OnlineTTT(model, init, TTTConfig(), ONLINE, prompt.shape[1], seed=i)
        out = speculative_generate(target, model, prompt, max_new, eos, online=online)
        assert out.tokens == target_generate(target, prompt, max_new, eos).tokens, (prompt.tolist(), max_new, eos)
        stops.add(out.stop_reason)
        updates += online.updates
        assert len(out.step_starts) == len(out.accepted) and out.step_starts == sorted(out.step_starts)
    assert stops == {"eos", "length"} and updates > 20


def test_context_cache_after_updates_equals_one_rebuilt_from_scratch(target, model):
    init = copy_lora(model)
    prompt = torch.tensor([[5, 9, 13, 2, 40, 41, 7, 8, 19, 33]])
    online = OnlineTTT(model, init, TTTConfig(), ONLINE, prompt.shape[1], seed=0)
    seen = []

    def hook(step, ids, features, cache):
        rebuild = online(step, ids, features, cache)
        if rebuild:
            seen.append(features.clone())  # what the loop rebuilds the cache from
        return rebuild

    out = speculative_generate(target, model, prompt, 30, None, online=hook, return_cache=True)
    assert online.updates >= 3 and out.online_updates == online.updates  # every update touched the cache
    assert any((copy_lora(model)[n] - init[n]).abs().max() > 1e-4 for n in init)
    with torch.no_grad():  # the last update's weights on the features the loop stored: the cache it rebuilt
        fresh = model.extend_cache(None, seen[-1])
    n = fresh.length
    for (k0, v0), (k1, v1) in zip(out.drafter_cache.kv, fresh.kv):
        torch.testing.assert_close(k0[:, :, :n], k1, atol=1e-6, rtol=0)
        torch.testing.assert_close(v0[:, :, :n], v1, atol=1e-6, rtol=0)
    committed = torch.cat([prompt, torch.tensor([out.tokens])], 1)
    with torch.no_grad():  # and what followed it, against the target's features of the whole output
        whole = model.extend_cache(None, target(committed[:, :-1]).features)
    assert out.drafter_cache.length == whole.length == committed.shape[1] - 1
    for (k0, v0), (k1, v1) in zip(out.drafter_cache.kv, whole.kv):
        torch.testing.assert_close(k0, k1, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(v0, v1, atol=2e-5, rtol=1e-4)


def test_two_requests_in_a_row_equal_each_alone(target, model):
    init = copy_lora(model)
    prompts = [torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]]), torch.tensor([[50, 2, 61, 7, 70, 11, 12]])]

    def one(p, seed):
        set_lora(model, init)  # a serving loop starts every request from the init
        online = OnlineTTT(model, init, TTTConfig(), ONLINE, p.shape[1], seed=seed)
        res = speculative_generate(target, model, p, 24, None, online=online)
        return res.accepted, copy_lora(model)

    alone = [one(p, i) for i, p in enumerate(prompts)]
    in_a_row = [one(p, i) for i, p in enumerate(prompts)]
    for (acc_a, lora_a), (acc_b, lora_b) in zip(alone, in_a_row):
        assert acc_a == acc_b
        assert all(torch.equal(lora_a[n], lora_b[n]) for n in lora_a)


def test_updates_see_only_committed_tokens_and_their_features(target, model):
    """The hook gets exactly the committed prefix and the target's own features of it: a rejected
    draft or a future token can change nothing it reads."""
    seen = []

    def spy(step, ids, features, cache):
        seen.append((step, ids.clone(), features.clone(), cache))
        return False

    prompt = torch.tensor([[5, 9, 13, 2, 40, 41, 7, 8]])
    out = speculative_generate(target, model, prompt, 30, None, online=spy)
    committed = torch.cat([prompt, torch.tensor([out.tokens])], 1)
    assert [s for s, *_ in seen] == list(range(len(seen))) and len(seen) == len(out.accepted) - 1
    with torch.no_grad():
        reference = target(committed).features
        for _, ids, features, cache in seen:
            L = ids.shape[1]
            assert torch.equal(ids, committed[:, :L])  # a prefix of the final output: nothing rejected, nothing ahead
            assert features.shape[1] == L - 1
            torch.testing.assert_close(features, reference[:, : L - 1], atol=1e-5, rtol=1e-4)
            # the drafter's context cache it reads holds those positions only, from those features
            assert cache.length == L - 1
            # (float32 noise of the features, a few 1e-5, grows through fc and the norms)
            for (k0, v0), (k1, v1) in zip(cache.kv, model.extend_cache(None, reference[:, : L - 1]).kv):
                torch.testing.assert_close(k0, k1, atol=1e-4, rtol=1e-3)
                torch.testing.assert_close(v0, v1, atol=1e-4, rtol=1e-3)


def test_online_anchors_stay_in_the_window_and_the_prompt():
    cfg = OnlineConfig(window=10, num_anchors=50, prompt_anchors=50)
    anchors, ok = online_anchors(60, 20, 4, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    a = anchors[ok]
    recent, prompt = a[a >= 20], a[a < 20]
    assert recent.numel() and prompt.numel()
    assert (recent >= 50).all() and (recent + 3 <= 59).all()  # labels committed: a + S - 1 < 60
    assert (prompt >= 1).all() and (prompt + 3 < 20).all()


def test_lora_off_the_context_modules_asks_for_no_rebuild(target):
    torch.manual_seed(1)
    cfg = BlockDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                         num_hidden_layers=2, block_size=S)
    q_only = add_lora(BlockDrafter(cfg).attach_target(target), r=4, alpha=8, target_modules=["q_proj"])
    online = OnlineTTT(q_only, copy_lora(q_only), TTTConfig(), ONLINE, 8, seed=0)
    assert not online.changes_context and len(lora_parameters(q_only)) == 4


def test_online_settings_left_unset_are_the_ones_the_init_was_meta_trained_for():
    from metattt.config import TTTOnlineConfig

    trained = TTTOnlineConfig(chunk=12, steps=2, window=40, num_anchors=9)
    mine = OnlineConfig(every=3, window=24).resolved(trained)
    assert (mine.every, mine.steps, mine.window, mine.num_anchors) == (3, 2, 24, 9)
    # an init meta-trained for prefill TTT only says nothing about online updates: the defaults
    untrained = OnlineConfig().resolved(TTTOnlineConfig(chunk=0, steps=5, window=100, num_anchors=3))
    assert (untrained.steps, untrained.window, untrained.num_anchors) == (1, 64, 16)


def test_online_updates_run_the_exported_online_settings_unless_told_otherwise(target):
    from metattt.config import TTTOnlineConfig

    cfg = BlockDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                         num_hidden_layers=2, block_size=S)
    model = add_lora(BlockDrafter(cfg).attach_target(target), r=4, alpha=8)
    ttt = TTTConfig(online=TTTOnlineConfig(chunk=8, steps=2, window=40, num_anchors=5))
    assert OnlineTTT(model, None, ttt, OnlineConfig(), 8).cfg.window == 40
    assert OnlineTTT(model, None, ttt, OnlineConfig(window=12), 8).cfg.window == 12


def _committed(target, n: int = 40):
    ids = torch.tensor([[(7 * i + 3) % 90 + 2 for i in range(n)]])
    with torch.no_grad():
        return ids, target(ids).features[:, : n - 1]


@pytest.mark.parametrize("kind, targets", [("block", ["q_proj"]), ("autoregressive", ["cross_q_proj", "up_proj"])])
def test_an_update_reading_the_cache_is_exact_where_lora_misses_the_context_modules(target, kind, targets):
    model = _model(target, kind, targets)
    ids, feats = _committed(target)
    init = copy_lora(model)
    with torch.no_grad():
        cache = model.extend_cache(None, feats)
    adapted = []
    for c in (None, cache):
        set_lora(model, init)
        online = OnlineTTT(model, init, TTTConfig(), replace(ONLINE, every=1), 10, seed=3)
        assert not online.changes_context
        online(0, ids, feats, c)
        adapted.append(online.params)
    assert any((adapted[0][n] - init[n]).abs().max() > 1e-4 for n in init)  # it did learn
    for n in init:
        torch.testing.assert_close(adapted[1][n], adapted[0][n], atol=1e-6, rtol=0)


def test_detach_context_keeps_the_loss_and_changes_only_the_gradient_through_older_positions(target):
    from metattt.ttt.inner import Functional
    from metattt.ttt.tasks import context_loss

    torch.manual_seed(1)
    cfg = BlockDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                         num_hidden_layers=2, block_size=S)
    model = add_lora(BlockDrafter(cfg).attach_target(target), r=4, alpha=8,
                     target_modules=["fc", "q_proj", "k_proj", "v_proj"], seed=0)
    params = {n: t + 0.05 * torch.randn_like(t) for n, t in copy_lora(model).items()}  # B != 0: LoRA reaches K/V
    set_lora(model, params)
    ids, feats = _committed(target)
    L = ids.shape[1]
    detached = OnlineTTT(model, None, TTTConfig(), replace(ONLINE, detach_context=True), 10)
    with torch.no_grad():
        constant = detached.constant_context(model.extend_cache(None, feats), L - 1)
    assert detached.changes_context and constant.length == L - 1 - ONLINE.window
    anchors, ok = online_anchors(L, 10, S, replace(ONLINE, prompt_anchors=0), torch.Generator().manual_seed(0),
                                 ids.device)
    losses, grads = [], []
    for c in (None, constant):
        p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        loss = context_loss(Functional(model, p), ids, feats, torch.ones_like(ids), anchors, ok,
                            TTTConfig().objective, 0.5, cache=c)
        losses.append(loss)
        grads.append(dict(zip(p, torch.autograd.grad(loss, list(p.values())))))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)  # the forward reads the same K/V
    for n in params:
        if "q_proj" in n:  # queries do not compute the context: their gradient is the same
            torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)
    fc = [n for n in params if ".fc." in n and "lora_B" in n]
    assert fc and all((grads[1][n] - grads[0][n]).abs().max() > 1e-6 for n in fc)  # the old positions' share is gone


def test_greedy_with_detached_context_updates_equals_target_greedy(target, model):
    init = copy_lora(model)
    for i, (prompt, max_new, eos) in enumerate(_cases(target, n=6, seed=1)):
        set_lora(model, init)
        online = OnlineTTT(model, init, TTTConfig(), replace(ONLINE, detach_context=True, window=8), prompt.shape[1],
                           seed=i)
        out = speculative_generate(target, model, prompt, max_new, eos, online=online)
        assert out.tokens == target_generate(target, prompt, max_new, eos).tokens
