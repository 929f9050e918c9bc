"""The autoregressive cross-attention drafter (drafter.kind: autoregressive): causality, train =
inference, lossless speculative decoding, meta-gradients, LoRA defaults, CLI distill + export."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import (
    MASK_ID,
    check_meta_gradient_by_central_differences,
    greedy_sequences,
    recipe_args,
    train_on_target,
    varied_target,
)

from metattt.export.meta_lora import export_meta_lora, load_meta_lora
from metattt.losses import block_prediction_loss, draft_hidden
from metattt.models.ar_drafter import ARDrafter, ARDrafterConfig, ChainCache
from metattt.models.lora import add_lora, lora_parameters
from metattt.models.target import FrozenTarget
from metattt.spec.decode import speculative_generate, target_generate
from metattt.ttt.meta import meta_batch
from metattt.ttt.tasks import TTTConfig, TTTObjective, make_tasks

S = 4  # block size: the anchor + 3 drafts per verification


def _drafter(target, block_size: int = S, layers: int = 2, seed: int = 1, attn: str = "sdpa",
             dtype=torch.float32) -> ARDrafter:
    torch.manual_seed(seed)
    cfg = ARDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                      num_hidden_layers=layers, block_size=block_size, attn_implementation=attn)
    return ARDrafter(cfg).to(dtype).attach_target(target)


@pytest.fixture(scope="module")
def target() -> FrozenTarget:
    torch.set_num_threads(1)
    return varied_target()


@pytest.fixture(scope="module")
def trained(target) -> ARDrafter:
    """An AR drafter briefly distilled (the distill loss, kind-aware) on the target's greedy outputs."""
    torch.set_num_threads(1)
    drafter = _drafter(target)
    train_on_target(drafter, target, greedy_sequences(target), steps=40)
    return drafter


def _chain_logits(drafter, target, ids, anchors, feats=None):
    feats = target(ids).features if feats is None else feats
    return drafter.logits(draft_hidden(drafter, ids, anchors, S, MASK_ID, feats))  # (B, N, S-1, V)


# --- causality ----------------------------------------------------------------------------


def test_chain_is_causal_and_reads_only_features_before_its_anchor(target):
    drafter = _drafter(target)
    torch.manual_seed(0)
    ids = torch.randint(2, 96, (1, 24))
    anchors = torch.tensor([[6, 14]])
    feats = target(ids).features
    base = _chain_logits(drafter, target, ids, anchors, feats)

    # chain 0 = x_6, x_7, x_8: a later chain token changes later drafts only, never earlier ones
    chain_ids = ids.clone()
    chain_ids[0, 7] = (chain_ids[0, 7] + 1) % 94 + 2
    out = _chain_logits(drafter, target, chain_ids, anchors, feats)  # same features: only the chain input moves
    torch.testing.assert_close(out[0, 0, 0], base[0, 0, 0], rtol=0, atol=0)
    assert not torch.allclose(out[0, 0, 1:], base[0, 0, 1:])
    torch.testing.assert_close(out[0, 1], base[0, 1], rtol=0, atol=0)  # chains never see each other

    # target features of the anchor position and after (tokens not yet committed) are invisible
    later = feats.clone()
    later[0, 6:] += 1.0
    torch.testing.assert_close(_chain_logits(drafter, target, ids, anchors, later)[0, 0], base[0, 0], rtol=0, atol=0)
    # ... the committed feature just before the anchor is read
    before = feats.clone()
    before[0, 5] += 1.0
    assert not torch.allclose(_chain_logits(drafter, target, ids, anchors, before)[0, 0], base[0, 0])

    # a chain anchored at 0 sees no feature: finite outputs and finite gradients (padding anchors)
    zero = torch.tensor([[0, 6]])
    loss = drafter.logits(draft_hidden(drafter, ids, zero, S, MASK_ID, feats)).logsumexp(-1).sum()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in drafter.parameters())


class SpyDrafter:
    """Wraps an ARDrafter inside speculative decoding and checks, at every draft forward, that the
    context (cross-attention) cache holds exactly the committed positions before the anchor."""

    def __init__(self, drafter: ARDrafter):
        self.drafter, self.config, self.calls = drafter, drafter.config, 0

    def extend_cache(self, cache, features):
        return self.drafter.extend_cache(cache, features)

    def logits(self, hidden):
        return self.drafter.logits(hidden)

    fc = property(lambda self: self.drafter.fc)

    def draft(self, last_token, position, cache, choose):  # ARDrafter's drafting, every forward through the spy
        return ARDrafter.draft(self, last_token, position, cache, choose)

    def __call__(self, block_ids, anchors, cache, chain_cache):
        assert cache.length == int(anchors[0, 0]), "the drafter would read features past the last committed token"
        assert block_ids.shape == (1, 1, 1)
        self.calls += 1
        return self.drafter(block_ids, anchors, cache=cache, chain_cache=chain_cache)


# --- train = inference ----------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_teacher_forced_training_equals_incremental_drafting(target, attn):
    drafter = _drafter(target, block_size=6, attn=attn)
    ids = torch.randint(2, 96, (1, 30), generator=torch.Generator().manual_seed(3))
    feats = target(ids).features
    anchors = torch.tensor([[4, 11, 20]])
    train = drafter.logits(draft_hidden(drafter, ids, anchors, 6, MASK_ID, feats))  # (1, 3, 5, V)
    with torch.no_grad():
        for n, a in enumerate(anchors[0].tolist()):
            ctx = drafter.extend_cache(None, feats[:, :2])  # committed features 0..a-1, in two pieces
            ctx = drafter.extend_cache(ctx, feats[:, 2:a])
            chain = ChainCache()
            steps = [drafter(ids[:, a + k].view(1, 1, 1), anchors[:, n:n + 1], cache=ctx, chain_cache=chain)
                     for k in range(5)]
            incremental = drafter.logits(torch.cat(steps, dim=2))[0, 0]  # (5, V)
            torch.testing.assert_close(incremental, train[0, n], rtol=1e-5, atol=1e-5)
            assert chain.length == 5
            # two tokens per forward through the same cache: the same logits again
            chain = ChainCache()
            first = drafter(ids[:, a:a + 2].view(1, 1, 2), anchors[:, n:n + 1], cache=ctx, chain_cache=chain)
            rest = drafter(ids[:, a + 2:a + 5].view(1, 1, 3), anchors[:, n:n + 1], cache=ctx, chain_cache=chain)
            torch.testing.assert_close(drafter.logits(torch.cat([first, rest], 2))[0, 0], train[0, n],
                                       rtol=1e-5, atol=1e-5)


# --- speculative decoding: lossless ---------------------------------------------------------


def _greedy_cases(target, n: int = 20, seed: int = 0):
    """Random prompts; half stop at an EOS the target really emits (its greedy 3rd..8th token),
    the others at a random length: both land in the middle of drafted blocks."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        prompt = torch.tensor([[rng.randrange(2, 96) for _ in range(rng.randint(1, 12))]])
        max_new, eos = rng.randint(1, 40), None
        if i % 2 == 0:
            eos, max_new = target_generate(target, prompt, 8, None).tokens[rng.randint(2, 7)], 40
        cases.append((prompt, max_new, eos))
    return cases


@pytest.mark.parametrize("trained_drafter", [False, True], ids=["random_drafter", "trained_drafter"])
def test_greedy_speculative_equals_target_greedy(target, trained_drafter, request):
    drafter = request.getfixturevalue("trained") if trained_drafter else _drafter(target)
    spy = SpyDrafter(drafter)
    results, stops = [], set()
    for prompt, max_new, eos in _greedy_cases(target):
        ref = target_generate(target, prompt, max_new, eos)
        out = speculative_generate(target, spy, prompt, max_new, eos)
        assert out.tokens == ref.tokens, f"prompt {prompt.tolist()} max_new {max_new} eos {eos}"
        if eos is not None and eos in out.tokens:
            assert out.tokens.index(eos) == len(out.tokens) - 1 and out.stop_reason == "eos"
        stops.add(out.stop_reason)
        results.append(out)
    assert stops == {"eos", "length"}
    steps = [a for r in results for a in r.accepted]
    assert spy.calls == (S - 1) * len(steps)  # one forward per draft
    assert all(1 <= r.tau <= S for r in results if r.num_steps)
    if trained_drafter:
        assert sum(steps) > 0, "the trained drafter never got a draft accepted"
        assert any(0 < a < S - 1 for a in steps), "no partially accepted block"
        assert any(a == S - 1 for a in steps), "no fully accepted block"
        # some step was cut short by EOS or max_new_tokens after the verifier accepted more
        assert any(len(r.tokens) < 1 + sum(a + 1 for a in r.accepted) for r in results)


def test_sampling_keeps_the_target_distribution():
    """Sequential drafts need q_k conditioned on d_1..d_{k-1}: the speculative rule stays exact.

    (Checked by hand: giving the rule the first draft's q for the second draft fails at p ≈ 4e-11.)
    """
    from test_spec import PROMPT, K, V, chi_square_pvalue, decode_index, exact_joint

    tgt = varied_target(vocab_size=V, layers=2, init=0.6)
    drafter = _drafter(tgt, block_size=3, layers=1)
    # a few steps on the target's own samples: drafts get accepted at every position, not always
    g = torch.Generator().manual_seed(123)
    ids = torch.cat([PROMPT.expand(512, -1),
                     decode_index(torch.multinomial(exact_joint(tgt, 1.0, 1.0), 512, replacement=True, generator=g))], 1)
    ones = torch.ones_like(ids)
    anchors, ok = torch.full((512, 1), PROMPT.shape[1]), torch.ones(512, 1, dtype=torch.bool)
    feats = tgt(ids).features
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    for _ in range(20):
        loss = block_prediction_loss(drafter, feats, ids, ones, ones, anchors, ok, 3, MASK_ID, 4.0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    drafter.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V ** K)
    accepted = torch.zeros(3, dtype=torch.long)
    for _ in range(1000):
        out = speculative_generate(tgt, drafter, PROMPT, K, None, 0.9, 1.0, rule="speculative", generator=g)
        counts[sum(t * V ** (K - 1 - j) for j, t in enumerate(out.tokens))] += 1
        for a in out.accepted:
            accepted[a] += 1
    assert (accepted > 20).all(), f"acceptance histogram {accepted.tolist()}"
    p = chi_square_pvalue(counts, exact_joint(tgt, 0.9, 1.0))
    assert p > 1e-3, f"output distribution differs from the target's (p = {p:.2e})"


# --- meta-learning and LoRA -------------------------------------------------------------------


def cyclic_batch(g: torch.Generator, B: int = 1, T: int = 20, V: int = 24) -> dict:
    ids = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        order = torch.randperm(16, generator=g) + 2
        start = int(torch.randint(0, 16, (1,), generator=g))
        ids[b] = order[(torch.arange(T) + start) % 16]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}


def test_maml_meta_gradient_matches_finite_differences_float64():
    tgt = varied_target(vocab_size=24, dtype=torch.float64)
    drafter = _drafter(tgt, attn="eager", seed=0, dtype=torch.float64)
    model = add_lora(drafter, r=2, alpha=4, target_modules=list(ARDrafter.default_lora_targets)).to(torch.float64)
    phi = lora_parameters(model)
    with torch.no_grad():  # B ≠ 0 so every LoRA tensor has a non-trivial meta-gradient
        for n, p in phi.items():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    batch = cyclic_batch(torch.Generator().manual_seed(0))
    feats = tgt(batch["input_ids"]).features
    kwargs = dict(algorithm="maml", steps=2, lr=0.3, clip=None, inner_anchors=8, outer_anchors=8,
                  objective=TTTObjective(), gamma=4.0)

    def meta_loss() -> torch.Tensor:
        g = torch.Generator().manual_seed(5)
        return meta_batch(model, phi, make_tasks(batch, feats, 10, 12, S, g), generator=g, **kwargs).loss

    checked = check_meta_gradient_by_central_differences(
        meta_loss, phi, lambda n: "layers.1" in n  # the last layer: cross-attention query and MLP
    )
    assert checked >= 16


def test_lora_defaults_zero_init_and_peft_export(tmp_path, target):
    from metattt.config import LoraConfig
    from metattt.loading import load_drafter, lora_targets

    drafter = _drafter(target)
    ids = torch.randint(2, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    anchors = torch.tensor([[5, 11]])
    ref = _chain_logits(drafter, target, ids, anchors)
    drafter_dir = drafter.save_pretrained(tmp_path / "drafter")
    assert json.loads((drafter_dir / "config.json").read_text())["architectures"] == ["ARCrossAttnDraftModel"]

    targets = lora_targets(LoraConfig(), drafter)
    assert targets == ["cross_q_proj", "gate_proj", "up_proj", "down_proj"]
    model = add_lora(drafter, r=4, alpha=8, target_modules=targets)
    names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_parameters(model)}
    assert names == set(targets)  # the cross-attention query and the MLP; not self-attention, not fc
    assert torch.equal(_chain_logits(model, target, ids, anchors), ref)  # B = 0: bitwise unchanged

    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.2)
    out = export_meta_lora(model, tmp_path / "meta_lora", TTTConfig(steps=2), drafter_dir)
    loaded, ttt, _ = load_meta_lora(load_drafter(drafter_dir).attach_target(target), out)
    assert isinstance(loaded.get_base_model(), ARDrafter) and ttt.steps == 2
    torch.testing.assert_close(_chain_logits(loaded, target, ids, anchors), _chain_logits(model, target, ids, anchors),
                               rtol=0, atol=0)


# --- the CLI ----------------------------------------------------------------------------------


def _cli_args(workspace, tmp_path) -> list[str]:
    return recipe_args(
        workspace, f"--run.output_root={tmp_path}", "--drafter.kind=autoregressive", "--lora.target_modules=null",
        "--distill.max_steps=2", "--distill.val_check_interval=2",
        "--meta.max_steps=1", "--meta.context_min=12", "--meta.context_max=24", "--meta.ttt.num_anchors=4",
        "--meta.outer_anchors=4", "--meta.ttt.steps=2", "--meta.val_check_interval=1",
        f"--eval.splits={{in_domain: {workspace / 'corpus' / 'validation.jsonl'}}}",
        "--eval.num_prompts=2", "--eval.prompt_len=20", "--eval.max_new_tokens=10",
        "--eval.conditions=[target, static, ttt_zero, ttt_meta]",
    )


@pytest.mark.e2e
def test_distill_cli_with_autoregressive_kind_exports_and_reloads(workspace, tmp_path):
    from metattt.cli import main

    main(["distill", *_cli_args(workspace, tmp_path)])
    out = tmp_path / "t"
    config = json.loads((out / "drafter" / "config.json").read_text())
    assert config["architectures"] == ["ARCrossAttnDraftModel"] and config["kind"] == "autoregressive"
    state = torch.load(out / "distill" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2

    drafter = ARDrafter.from_pretrained(out / "drafter")
    tgt = FrozenTarget.from_pretrained(workspace / "target", layer_ids=drafter.config.target_layer_ids)
    drafter.attach_target(tgt)
    native = ARDrafter(drafter.config)
    native.load_state_dict({k[len("drafter."):]: v for k, v in state["state_dict"].items() if k.startswith("drafter.")})
    native.attach_target(tgt)
    ids = torch.randint(4, 200, (1, 20), generator=torch.Generator().manual_seed(0))
    anchors = torch.tensor([[5, 11]])
    torch.testing.assert_close(_chain_logits(drafter, tgt, ids, anchors), _chain_logits(native, tgt, ids, anchors),
                               rtol=0, atol=0)


@pytest.mark.e2e
def test_meta_train_and_eval_cli_run_unchanged_on_an_autoregressive_drafter(workspace, tmp_path):
    from metattt.cli import main

    args = _cli_args(workspace, tmp_path)
    main(["meta-train", *args])  # distills the autoregressive drafter first
    adapter = json.loads((tmp_path / "t" / "meta_lora" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(ARDrafter.default_lora_targets)  # lora.target_modules: null -> kind default
    main(["eval", *args])
    report = json.loads((tmp_path / "t" / "eval" / "report.json").read_text())
    assert report["meta"]["drafter_kind"] == "autoregressive"
    for name, s in report["summary"]["in_domain"].items():
        if name != "target":
            assert s["lossless"] is True and 1.0 <= s["tau"] <= S, (name, s)
