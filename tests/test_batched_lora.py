"""Request-batched LoRA (metattt.models.batched_lora) and batched TTT (metattt.ttt.batched): each
row of a batch computes what its request computes alone, with its own adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import MASK_ID

from metattt.losses import draft_hidden
from metattt.models.batched_lora import batched_lora, lora_linears, repeat_lora, stack_lora, unstack_lora
from metattt.models.lora import add_lora, copy_lora, lora_parameters, set_lora
from metattt.ttt.batched import ttt_adapt_batched
from metattt.ttt.inner import Functional, clip_by_global_norm, inner_loop
from metattt.ttt.tasks import TTTConfig, TTTObjective, ttt_adapt

V = 96
KINDS = ["block", "autoregressive"]


def _drafter(kind: str, request):
    if kind == "block":
        return request.getfixturevalue("tiny_drafter")
    from metattt.models.ar_drafter import ARDrafter, ARDrafterConfig

    target = request.getfixturevalue("tiny_target")
    torch.manual_seed(1)
    cfg = ARDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                      num_hidden_layers=2, block_size=4)
    return ARDrafter(cfg).attach_target(target)


def _wrap(drafter, kind: str):
    """peft LoRA on the modules `kind` carries it on by default."""
    targets = ["fc", "q_proj", "k_proj", "v_proj"] if kind == "block" else ["cross_q_proj", "gate_proj", "up_proj",
                                                                            "down_proj"]
    return add_lora(drafter, r=4, alpha=8, target_modules=targets, seed=0)


def _lora_model(kind: str, request):
    return _wrap(_drafter(kind, request), kind)


def _random_adapter(model, seed: int, b_std: float = 0.2) -> dict[str, torch.Tensor]:
    """peft's tensors with random A and a nonzero B (a LoRA that changes the output)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in copy_lora(model).items():
        std = b_std if ".lora_B." in name else 0.3
        out[name] = torch.randn(t.shape, generator=g) * std
    return out


def _batch(target, lengths: list[int], seed: int = 0):
    """Right-padded rows of random tokens: ids (R, C), features (R, C, n·H), valid (R, C), anchors (R, 2)."""
    g = torch.Generator().manual_seed(seed)
    R, C = len(lengths), max(lengths)
    ids = torch.randint(2, V, (R, C), generator=g)
    valid = torch.arange(C)[None] < torch.tensor(lengths)[:, None]
    feats = target(ids).features * valid[..., None]
    anchors = torch.stack([torch.tensor([2, P - 4]) for P in lengths])  # blocks end inside each row
    return ids, feats, valid, anchors


def _hidden(f, ids, feats, valid, anchors):
    return draft_hidden(f, ids, anchors, f.config.block_size, MASK_ID, feats, valid)  # (R, N, S-1, H)


@pytest.mark.parametrize("kind", KINDS)
def test_one_adapter_in_every_row_equals_peft(kind, request, tiny_target):
    model = _lora_model(kind, request)
    adapter = _random_adapter(model, seed=3)
    set_lora(model, adapter)
    ids, feats, valid, anchors = _batch(tiny_target, [12, 17, 20])
    with torch.no_grad():
        ref = _hidden(model, ids, feats, valid, anchors)  # peft's own forward
        with batched_lora(model):
            out = _hidden(Functional(model, repeat_lora(copy_lora(model), 3)), ids, feats, valid, anchors)
        with model.disable_adapter():
            base = _hidden(model, ids, feats, valid, anchors)
    assert not torch.allclose(ref, base, atol=1e-3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_B_is_bitwise_the_drafter_without_lora(kind, request, tiny_target):
    drafter = _drafter(kind, request)
    ids, feats, valid, anchors = _batch(tiny_target, [12, 17, 20])
    with torch.no_grad():
        ref = _hidden(drafter, ids, feats, valid, anchors)
    model = _wrap(drafter, kind)
    rows = [_random_adapter(model, seed=s, b_std=0.0) for s in range(3)]  # each row its own A, B = 0
    assert all(not torch.equal(rows[0][n], rows[1][n]) for n in rows[0] if ".lora_A." in n)
    with torch.no_grad(), batched_lora(model):
        out = _hidden(Functional(model, stack_lora(rows)), ids, feats, valid, anchors)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_each_row_equals_peft_with_its_own_adapter_on_its_own_prompt(kind, request, tiny_target):
    model = _lora_model(kind, request)
    lengths = [11, 20, 15]
    ids, feats, valid, anchors = _batch(tiny_target, lengths)
    rows = [_random_adapter(model, seed=10 + r) for r in range(3)]
    with torch.no_grad(), batched_lora(model):
        out = _hidden(Functional(model, stack_lora(rows)), ids, feats, valid, anchors)
    for r, P in enumerate(lengths):  # alone: peft with row r's adapter, unpadded prompt
        set_lora(model, rows[r])
        with torch.no_grad():
            alone = _hidden(model, ids[r:r + 1, :P], feats[r:r + 1, :P], None, anchors[r:r + 1])
        torch.testing.assert_close(out[r:r + 1], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[2], atol=1e-3)


def test_per_request_scale(request, tiny_target):
    model = _lora_model("block", request)
    ids, feats, valid, anchors = _batch(tiny_target, [12, 12, 12])
    adapter = _random_adapter(model, seed=4)
    with torch.no_grad():
        with batched_lora(model, scale=torch.tensor([1.0, 0.0, 0.5])):
            out = _hidden(Functional(model, repeat_lora(adapter, 3)), ids, feats, valid, anchors)
        with model.disable_adapter():
            base = _hidden(model, ids, feats, valid, anchors)
        set_lora(model, {n: t * 0.5 if ".lora_B." in n else t for n, t in adapter.items()})
        half = _hidden(model, ids, feats, valid, anchors)
        set_lora(model, adapter)
        full = _hidden(model, ids, feats, valid, anchors)
    torch.testing.assert_close(out[0], full[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1], base[1])  # scale 0: that row's LoRA is off
    torch.testing.assert_close(out[2], half[2], rtol=1e-5, atol=1e-6)


def test_rows_load_and_export_under_peft_names(request):
    model = _lora_model("block", request)
    names = set(lora_parameters(model))
    meta = _random_adapter(model, seed=5)
    set_lora(model, meta)
    batched = repeat_lora(copy_lora(model), 4)  # the meta-learned adapter in every row
    assert set(batched) == names
    assert all(t.shape == (4, *meta[n].shape) for n, t in batched.items())
    rows = [_random_adapter(model, seed=s) for s in range(3)]
    back = unstack_lora(stack_lora(rows))
    for row, again in zip(rows, back):
        assert set(again) == names
        set_lora(model, again)  # loads into peft as is
        assert all(torch.equal(copy_lora(model)[n], row[n]) for n in names)
    for row in unstack_lora(batched):
        assert all(torch.equal(row[n], meta[n]) for n in names)


def test_context_restores_peft_and_rejects_bad_weights(request, tiny_target):
    model = _lora_model("block", request)
    layers = lora_linears(model)
    assert layers and all("forward" not in m.__dict__ for m in layers.values())
    ids, feats, valid, anchors = _batch(tiny_target, [12, 14])
    with batched_lora(model), batched_lora(model):  # nested
        pass
    assert all("forward" not in m.__dict__ for m in layers.values())
    with batched_lora(model), pytest.raises(ValueError, match="rows"):
        _hidden(Functional(model, repeat_lora(copy_lora(model), 3)), ids, feats, valid, anchors)
    with pytest.raises(ValueError, match="no peft LoRA"):
        with batched_lora(torch.nn.Sequential(torch.nn.Linear(2, 2))):
            pass


def test_per_row_clip_equals_clipping_each_row_alone():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, 5, generator=g), torch.randn(3, 7, generator=g) * torch.tensor([[0.01], [1], [5]])]
    clipped = clip_by_global_norm(grads, 1.0, per_row=True)
    for r in range(3):
        alone = clip_by_global_norm([t[r] for t in grads], 1.0)
        for a, b in zip(alone, clipped):
            torch.testing.assert_close(b[r], a, rtol=1e-6, atol=1e-7)
    assert clip_by_global_norm(grads, None, per_row=True) is grads


@pytest.mark.parametrize("checkpoint", [False, True])
def test_inner_loop_with_per_row_clip_equals_one_loop_per_row(checkpoint):
    """Second order too (create_graph, checkpointed steps): the path batched meta-training takes."""
    g = torch.Generator().manual_seed(1)
    a, w0 = torch.randn(3, 4, generator=g) * torch.tensor([[0.1], [3.0], [10.0]]), torch.randn(4, generator=g)
    lr = {"w": torch.tensor(0.2)}

    def row_loss(w, target):  # (..., 4) -> (...)
        return ((w - target) ** 2).sum(-1) * 0.5 + (w ** 4).sum(-1) * 0.1

    phi = w0.clone().requires_grad_(True)
    batched = inner_loop(lambda p, step: row_loss(p["w"], a).sum(), {"w": phi.expand(3, 4)}, steps=3, lr=lr,
                         clip=1.0, create_graph=True, checkpoint=checkpoint, clip_per_row=True)
    meta = torch.autograd.grad(batched.params["w"].pow(2).sum(), phi)[0]
    want = torch.zeros(4)
    for r in range(3):
        alone = inner_loop(lambda p, step, r=r: row_loss(p["w"], a[r]), {"w": phi}, steps=3, lr=lr, clip=1.0,
                           create_graph=True, checkpoint=checkpoint)
        torch.testing.assert_close(batched.params["w"][r], alone.params["w"], rtol=1e-6, atol=1e-6)
        want = want + torch.autograd.grad(alone.params["w"].pow(2).sum(), phi)[0]
    torch.testing.assert_close(meta, want, rtol=1e-5, atol=1e-6)


def _ttt_inputs(target, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, V, (1, P), generator=g) for P in lengths]
    return prompts, [target(p).features for p in prompts]


def _learned_lrs(model) -> dict[str, float]:
    return {n: 0.2 + 0.05 * (i % 5) for i, n in enumerate(lora_parameters(model))}


def _assert_rows_equal(batched, single, init):
    assert len(batched) == len(single)
    for b, s in zip(batched, single):
        assert b.skipped == s.skipped and set(b.params) == set(init)
        for n in init:
            torch.testing.assert_close(b.params[n], s.params[n], rtol=0, atol=1e-5)
        assert len(b.losses) == len(s.losses)
        for lb, ls in zip(b.losses, s.losses):
            assert lb.item() == pytest.approx(ls.item(), abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_ttt_equals_one_ttt_adapt_per_prompt(kind, request, tiny_target):
    model = _lora_model(kind, request)
    init = _random_adapter(model, seed=7, b_std=0.05)  # a "meta-learned" init, not peft's zero B
    lengths = [9, 30, 4, 21, 14]  # ragged; 4 is too short for a block of 4 after an anchor
    prompts, feats = _ttt_inputs(tiny_target, lengths)
    ttt = TTTConfig(steps=3, lr=0.3, learned_lrs=_learned_lrs(model), clip=0.05, num_anchors=6, gamma=2.0)

    single = [ttt_adapt(model, init, p, f, ttt, torch.Generator().manual_seed(r))
              for r, (p, f) in enumerate(zip(prompts, feats))]
    batched = ttt_adapt_batched(model, init, prompts, feats, ttt,
                                [torch.Generator().manual_seed(r) for r in range(len(prompts))])
    _assert_rows_equal(batched, single, init)
    assert all(torch.equal(batched[2].params[n], init[n]) for n in init) and not batched[2].losses
    moved = [max((r.params[n] - init[n]).abs().max().item() for n in init) for r in batched]
    assert all(m > 1e-4 for i, m in enumerate(moved) if i != 2), moved

    # clipping is active: without it every adapted row would differ
    unclipped = ttt_adapt_batched(model, init, prompts, feats, TTTConfig(**{**ttt.__dict__, "clip": None}),
                                  [torch.Generator().manual_seed(r) for r in range(len(prompts))])
    for i, (a, b) in enumerate(zip(batched, unclipped)):
        if i != 2:
            assert any(not torch.allclose(a.params[n], b.params[n], atol=1e-5) for n in init)

    # one generator shared by the requests: what sequential calls sharing it give
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    _assert_rows_equal(ttt_adapt_batched(model, init, prompts, feats, ttt, g1),
                       [ttt_adapt(model, init, p, f, ttt, g2) for p, f in zip(prompts, feats)], init)


def test_batched_ttt_per_row_inits_and_other_objectives(request, tiny_target):
    model = _lora_model("block", request)
    inits = [_random_adapter(model, seed=20 + r, b_std=0.05) for r in range(3)]
    prompts, feats = _ttt_inputs(tiny_target, [16, 10, 25], seed=1)
    H = tiny_target.hidden_size
    torch.manual_seed(0)
    head = torch.nn.Linear(H, H, bias=False)
    ttt = TTTConfig(steps=2, lr=0.3, learned_lrs=_learned_lrs(model), clip=0.1, num_anchors=5, gamma=2.0,
                    objective=TTTObjective(block=1.0, clm=0.5, feature=0.3))
    single = [ttt_adapt(model, inits[r], p, f, ttt, None, head) for r, (p, f) in enumerate(zip(prompts, feats))]
    _assert_rows_equal(ttt_adapt_batched(model, inits, prompts, feats, ttt, None, head), single, inits[0])


def test_a_non_finite_row_is_dropped_alone(request, tiny_target):
    model = _lora_model("block", request)
    init = _random_adapter(model, seed=8, b_std=0.05)
    prompts, feats = _ttt_inputs(tiny_target, [12, 18, 15], seed=2)
    feats[1] = feats[1].clone()
    feats[1][0, 3] = float("nan")
    ttt = TTTConfig(steps=2, lr=0.3, clip=1.0, num_anchors=4, gamma=2.0)
    single = [ttt_adapt(model, init, p, f, ttt, torch.Generator().manual_seed(r))
              for r, (p, f) in enumerate(zip(prompts, feats))]
    batched = ttt_adapt_batched(model, init, prompts, feats, ttt, [torch.Generator().manual_seed(r) for r in range(3)])
    assert [r.skipped for r in single] == [False, True, False]
    _assert_rows_equal(batched, single, init)


def test_batched_ttt_rejects_bad_input(request, tiny_target):
    model = _lora_model("block", request)
    init = copy_lora(model)
    prompts, feats = _ttt_inputs(tiny_target, [12, 14])
    ttt = TTTConfig(steps=1, num_anchors=4)
    with pytest.raises(ValueError, match="no prompts"):
        ttt_adapt_batched(model, init, [], [], ttt)
    with pytest.raises(ValueError, match="feature tensors"):
        ttt_adapt_batched(model, init, prompts, feats[:1], ttt)
    with pytest.raises(ValueError, match=r"\(1, P\)"):
        ttt_adapt_batched(model, init, [prompts[0][0]], [feats[0]], ttt)
    with pytest.raises(ValueError, match="generators"):
        ttt_adapt_batched(model, init, prompts, feats, ttt, [torch.Generator()])
    with pytest.raises(ValueError, match="initial adapters"):
        ttt_adapt_batched(model, [init], prompts, feats, ttt)
    with pytest.raises(ValueError, match="attn_entropy"):
        ttt_adapt_batched(model, init, prompts, feats, TTTConfig(objective=TTTObjective(attn_entropy=0.1)))
