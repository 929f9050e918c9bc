"""Target taps and the block drafter: masks, caching, kernels, checkpoint layout, learning."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MASK_ID, llama_config, qwen3_config

from metattt.anchors import block_targets, make_blocks, sample_anchors, valid_anchor_mask
from metattt.config import default_gamma
from metattt.losses import block_prediction_loss
from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
from metattt.models.target import FrozenTarget, default_target_layer_ids


def test_default_layer_ids_follow_dflash_rule():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert default_target_layer_ids(28, 5) == [1, 7, 13, 19, 25]
    assert default_target_layer_ids(6, 2) == [1, 3]
    assert default_target_layer_ids(8, 1) == [4]


@pytest.mark.parametrize("make_config", [qwen3_config, llama_config], ids=["qwen3", "llama"])
def test_feature_taps_equal_transformers_hidden_states(make_config):
    target = FrozenTarget.from_config(make_config(), layer_ids=[0, 2], seed=0)
    ids = torch.randint(2, 96, (2, 11))
    out = target(ids)
    ref = target.model(ids, output_hidden_states=True)
    H = target.hidden_size
    assert out.features.shape == (2, 11, 2 * H)
    torch.testing.assert_close(out.features[..., :H], ref.hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(out.features[..., H:], ref.hidden_states[3], rtol=0, atol=0)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    assert not any(p.requires_grad for p in target.parameters())


def test_layer_id_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="out of range.*4 decoder layers"):
        FrozenTarget.from_config(qwen3_config(layers=4), layer_ids=[1, 4])


def test_missing_target_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        FrozenTarget.from_pretrained(tmp_path / "nope")


def _block_logits(drafter, target, ids, anchors, S=4):
    feats = target(ids).features
    blocks = make_blocks(ids, anchors, S, MASK_ID)
    return drafter.logits(drafter(blocks, anchors, context_features=feats))  # (B, N, S, V)


def test_block_sees_only_its_context_and_its_own_block(tiny_target, tiny_drafter):
    torch.manual_seed(0)
    ids = torch.randint(2, 96, (1, 24))
    anchors = torch.tensor([[6, 14]])
    base = _block_logits(tiny_drafter, tiny_target, ids, anchors)

    # a token after block 0's anchor (inside block 0's span, and before block 1) leaves block 0 alone
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 94 + 2
    out = _block_logits(tiny_drafter, tiny_target, changed, anchors)
    torch.testing.assert_close(out[:, 0], base[:, 0], rtol=0, atol=0)
    assert not torch.allclose(out[:, 1], base[:, 1])  # block 1 sees position 9 as context

    # block 1's anchor token (another block) leaves block 0 alone; block 1 changes
    changed = ids.clone()
    changed[0, 14] = (changed[0, 14] + 1) % 94 + 2
    out = _block_logits(tiny_drafter, tiny_target, changed, anchors)
    torch.testing.assert_close(out[:, 0], base[:, 0], rtol=0, atol=0)
    assert not torch.allclose(out[:, 1], base[:, 1])

    # the anchor position itself is not context: its *feature* is invisible to its block
    feats = tiny_target(ids).features
    blocks = make_blocks(ids, anchors, 4, MASK_ID)
    h0 = tiny_drafter(blocks, anchors, context_features=feats)
    feats2 = feats.clone()
    feats2[0, 6:] += 1.0
    h1 = tiny_drafter(blocks, anchors, context_features=feats2)
    torch.testing.assert_close(h1[:, 0], h0[:, 0], rtol=0, atol=0)

    # context strictly before the anchor does change the block
    changed = ids.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 94 + 2
    out = _block_logits(tiny_drafter, tiny_target, changed, anchors)
    assert not torch.allclose(out[:, 0], base[:, 0])


def test_blocks_are_bidirectional_inside(tiny_target, tiny_drafter):
    ids = torch.randint(2, 96, (1, 16))
    anchors = torch.tensor([[5]])
    feats = tiny_target(ids).features
    blocks = make_blocks(ids, anchors, 4, MASK_ID)
    h0 = tiny_drafter(blocks, anchors, context_features=feats)
    blocks2 = blocks.clone()
    blocks2[0, 0, 3] = 7  # a later block position influences earlier ones
    h1 = tiny_drafter(blocks2, anchors, context_features=feats)
    assert not torch.allclose(h0[0, 0, 1], h1[0, 0, 1])


def test_cached_context_equals_full_forward_and_kernels_agree(tiny_target, tiny_drafter):
    ids = torch.randint(2, 96, (2, 20))
    feats = tiny_target(ids).features
    anchors = torch.tensor([[13], [13]])
    blocks = make_blocks(ids, anchors, 4, MASK_ID)
    full = tiny_drafter(blocks, anchors, context_features=feats)
    cache = tiny_drafter.extend_cache(None, feats[:, :7])
    cache = tiny_drafter.extend_cache(cache, feats[:, 7:13])
    cached = tiny_drafter(blocks, anchors, cache=cache)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)

    tiny_drafter.config.attn_implementation = "eager"
    for layer in tiny_drafter.layers:
        layer.self_attn.impl = "eager"
    eager = tiny_drafter(blocks, anchors, context_features=feats)
    torch.testing.assert_close(eager, full, rtol=1e-5, atol=1e-5)


def test_anchor_sampling_respects_loss_mask_and_block_room():
    lmask = torch.zeros(2, 20, dtype=torch.long)
    lmask[0, 5:15] = 1
    lmask[1, :] = 1
    attn = torch.ones(2, 20, dtype=torch.long)
    attn[1, 12:] = 0
    valid = valid_anchor_mask(lmask, attn, block_size=4)
    assert valid[0].nonzero().flatten().tolist() == list(range(4, 14))
    assert valid[1].nonzero().flatten().tolist() == list(range(1, 9))  # a + 3 < 12
    g = torch.Generator().manual_seed(0)
    anchors, ok = sample_anchors(valid, 50, g)
    assert ok[1].sum() == 8 and sorted(anchors[1][ok[1]].tolist()) == list(range(1, 9))
    ids = torch.arange(20).expand(2, 20)
    labels, w = block_targets(ids, lmask, anchors, ok, 4, gamma=4.0)
    a = anchors[0, 0].item()
    assert labels[0, 0].tolist() == [a + 1, a + 2, a + 3]
    torch.testing.assert_close(w[0, 0], torch.exp(-torch.arange(3.0) / 4) * lmask[0, a + 1 : a + 4].float())
    assert default_gamma(16) == 7 and default_gamma(8) == 4


def test_drafter_overfits_a_fixed_batch():
    # a target whose (tied) embedding has a usable scale: with std 0.02 the frozen lm_head caps
    # the logits so low that CE cannot fall far even when every argmax is right
    cfg = qwen3_config()
    cfg.initializer_range = 0.3
    tiny_target = FrozenTarget.from_config(cfg, num_draft_layers=2, seed=0)
    dcfg = BlockDrafterConfig.from_target(tiny_target.config, mask_token_id=MASK_ID, target_layer_ids=tiny_target.layer_ids,
                                     num_hidden_layers=2, block_size=4)
    torch.manual_seed(0)
    tiny_drafter = BlockDrafter(dcfg).attach_target(tiny_target)
    ids = torch.randint(2, 96, (2, 32))
    attn = torch.ones_like(ids)
    feats = tiny_target(ids).features
    valid = valid_anchor_mask(attn, attn, 4)
    anchors, ok = sample_anchors(valid, 8, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(tiny_drafter.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        out = block_prediction_loss(tiny_drafter, feats, ids, attn, attn, anchors, ok, 4, MASK_ID, 2.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
    assert first > 3.0
    assert out.loss.item() < 0.5, f"drafter failed to overfit: {first:.2f} -> {out.loss.item():.2f}"


def test_kl_distillation_matches_the_targets_own_next_token_distributions(tiny_target, tiny_drafter):
    """KL(p_target ‖ p_drafter) of draft k uses the target's logits at position a+k-1, computed
    here independently from the full logits of one target forward; w mixes CE and KL."""
    import torch.nn.functional as F

    from metattt.losses import draft_hidden

    torch.manual_seed(0)
    ids = torch.randint(2, 96, (2, 24))
    attn = torch.ones_like(ids)
    lmask = (torch.rand(2, 24) > 0.2).long()
    out = tiny_target(ids, return_final_hidden=True)
    anchors, ok = sample_anchors(valid_anchor_mask(lmask, attn, 4), 6, torch.Generator().manual_seed(1))
    args = (tiny_drafter, out.features, ids, attn, lmask, anchors, ok, 4, MASK_ID, 2.0)

    labels, w = block_targets(ids, lmask, anchors, ok, 4, 2.0)
    logp = torch.log_softmax(tiny_drafter.logits(draft_hidden(tiny_drafter, ids, anchors, 4, MASK_ID, out.features)), -1)
    pos = anchors[:, :, None] + torch.arange(3)  # (B, N, S-1): the position before each draft
    t_logp = torch.log_softmax(torch.stack([out.logits[b, pos[b]] for b in range(2)]), -1)  # (B, N, S-1, V)
    kl = (t_logp.exp() * (t_logp - logp)).sum(-1)
    ce = F.nll_loss(logp.flatten(0, 2), labels.flatten(), reduction="none").view_as(labels)
    expect_kl, expect_ce = (kl * w).sum() / w.sum(), (ce * w).sum() / w.sum()
    assert expect_kl > 0.01 and (kl[w > 0] >= 0).all()

    only_ce = block_prediction_loss(*args)
    torch.testing.assert_close(only_ce.loss, expect_ce, rtol=1e-5, atol=1e-6)
    for weight in (0.0, 0.3, 1.0):
        mixed = block_prediction_loss(*args, target_hidden=out.final_hidden, kl_weight=weight)
        torch.testing.assert_close(mixed.kl, expect_kl, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed.ce, expect_ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed.loss, (1 - weight) * expect_ce + weight * expect_kl, rtol=1e-5, atol=1e-6)
    mixed.loss.backward()  # gradients reach the drafter only (the target is frozen, its logits detached)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_drafter.parameters())
    assert all(p.grad is None for p in tiny_target.parameters())


def test_dflash_layout_round_trip(tmp_path, tiny_target, tiny_drafter):
    path = tiny_drafter.save_pretrained(tmp_path / "drafter")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"]
    assert cfg["dflash_config"] == {"mask_token_id": MASK_ID, "target_layer_ids": tiny_target.layer_ids}
    assert cfg["block_size"] == 4 and cfg["num_target_layers"] == 4
    from safetensors.torch import load_file

    keys = set(load_file(str(path / "model.safetensors")))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight"} <= keys
    assert all(k.split(".")[0] in {"fc", "hidden_norm", "norm", "layers"} for k in keys)

    loaded = BlockDrafter.from_pretrained(path).attach_target(tiny_target)
    ids = torch.randint(2, 96, (1, 16))
    anchors = torch.tensor([[5, 9]])
    torch.testing.assert_close(_block_logits(loaded, tiny_target, ids, anchors),
                               _block_logits(tiny_drafter, tiny_target, ids, anchors), rtol=0, atol=0)


def test_drafter_without_target_head_says_what_to_do(tiny_target):
    cfg = BlockDrafterConfig.from_target(tiny_target.config, mask_token_id=MASK_ID, target_layer_ids=[1, 2],
                                    num_hidden_layers=1, block_size=4)
    with pytest.raises(RuntimeError, match="attach_target"):
        BlockDrafter(cfg)(torch.zeros(1, 1, 4, dtype=torch.long), torch.tensor([[3]]),
                          context_features=torch.zeros(1, 3, 64))


def test_batch_without_any_block_gives_a_zero_loss_with_a_graph(tiny_target, tiny_drafter):
    ids = torch.randint(2, 96, (1, 6))
    attn = torch.ones_like(ids)
    valid = valid_anchor_mask(attn, attn, 8)  # block of 8 cannot fit in 6 tokens
    assert not valid.any()
    anchors, ok = sample_anchors(valid, 4)
    out = block_prediction_loss(tiny_drafter, tiny_target(ids).features, ids, attn, attn, anchors, ok, 4, MASK_ID, 2.0)
    assert out.loss.item() == 0.0
    out.loss.backward()  # does not raise: Lightning can step over such a batch


@pytest.mark.parametrize("config, shard", [(qwen3_config, False), (llama_config, True)], ids=["tied", "untied_sharded"])
def test_heads_only_target_loads_embedding_and_head_and_refuses_to_run(tmp_path, config, shard):
    full = FrozenTarget.from_config(config(), num_draft_layers=2, seed=0)
    full.model.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "5GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    heads = FrozenTarget.load_heads_only(tmp_path, num_draft_layers=2)
    assert heads.layer_ids == full.layer_ids and heads.hidden_size == full.hidden_size
    torch.testing.assert_close(heads.embed_tokens.weight, full.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(heads.lm_head.weight, full.lm_head.weight, rtol=0, atol=0)
    kept = {p.data_ptr() for p in heads.parameters()}
    assert kept == {p.data_ptr() for p in (heads.embed_tokens.weight, heads.lm_head.weight)}  # no decoder weights
    assert all(t.device.type == "cpu" for t in [*heads.parameters(), *heads.buffers()])
    heads.to(torch.float64)  # moves like any module: nothing is left on the meta device
    with pytest.raises(RuntimeError, match="embedding and LM head"):
        heads(torch.ones(1, 3, dtype=torch.long))
