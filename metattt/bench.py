"""`make bench`: costs and τ gains, each timing a ratio of two things measured in the same run.

    python -m metattt.bench --config recipes/tiny.yaml            # quick preset (CPU)
    python -m metattt.bench --config recipes/tiny.yaml --full     # GPU preset: Qwen3-4B-sized model

Sections (all written to bench/results.json, then printed as tables):
  meta_step     one outer step of maml / fomaml / reptile (k inner steps) ÷ one distillation
                step on the same tokens; peak-memory ratio (CUDA allocator peak on GPU, bytes
                of tensors saved for backward on CPU)
  task_batching the same at 1, 4 and 16 tasks, tasks batched (one forward per inner step) and
                one by one, side by side (`--qwen3-4b-meta`: at Qwen3-4B's shape)
  ttt_prefill   k TTT steps ÷ the target's prefill of the same prompt, by prompt length
  draft_cost    drafting one block: block drafter vs autoregressive drafter (same widths)
  batched       tokens/s at batch 1, 2, 4, 8, 16 for target-only, static and ttt_meta decoding, batched
                (metattt.spec.batched), beside one request at a time; batched TTT of R prompts ÷ R
                single TTTs (`--batched`: this section alone)
  online        one online TTT update (metattt.ttt.online, at the recipe's eval.online) ÷ one target
                verification forward of a block after a KV cache of a generation's length; speculative
                decoding with updates every 1 / 4 / 16 steps beside the same without them and target-only
                decoding: overhead, online seconds per token, speedup over target-only, τ
  scaling       maml step ÷ distill step by context length and by k
  tau           the eval stage on the recipe: τ ± s.e. for static / TTT-zero / TTT-meta per split,
                wall-clock speedup over target-only decoding and speedup ÷ τ
Costs use randomly initialised models of the recipe's dimensions (`--full`: Qwen3-4B's), since
timing does not depend on the weights; τ uses the trained tiny target, drafter and meta-LoRA.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import json
import logging
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metattt.anchors import sample_anchors, valid_anchor_mask
from metattt.atomic import atomic_write_json
from metattt.config import OnlineConfig, Recipe, default_gamma
from metattt.losses import block_prediction_loss
from metattt.models.base import set_attn_implementation
from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
from metattt.models.lora import add_lora, copy_lora, lora_parameters, set_lora
from metattt.models.target import FrozenTarget
from metattt.stats import fmt
from metattt.ttt.meta import meta_batch
from metattt.ttt.tasks import Task, TTTConfig, TTTObjective, ttt_adapt

log = logging.getLogger("metattt")

QWEN3_4B = dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, rope_theta=1_000_000.0, tie_word_embeddings=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    """Median seconds of `reps` calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _interleaved_medians(runs: dict[str, Callable[[], object]], device: torch.device, reps: int) -> dict[str, float]:
    """Median seconds per contender, timed in turn rep by rep after one warm-up each, so a load
    spike on the machine hits every contender alike."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


class _SavedBytes:
    """Bytes of tensors autograd saves for backward: a portable activation-memory measure."""

    def __init__(self):
        self.total = 0

    @contextlib.contextmanager
    def __call__(self):
        def pack(t: torch.Tensor):
            self.total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")


def _resident_peak(fn: Callable[[], None]) -> int | None:
    """Bytes the process's resident set grows by at its peak while `fn` runs (Linux: the
    high-water mark reset through /proc/self/clear_refs, freed heap handed back to the system
    first so that `fn` cannot hide in it); None where that is not available."""
    try:
        libc = _libc()
        gc.collect()
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _proc_status_kib("VmRSS")
    except (OSError, AttributeError):
        return None
    fn()
    return max(0, _proc_status_kib("VmHWM") - base) * 1024


def _peak(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory of `fn`: CUDA's allocator peak; on the CPU the resident-set growth at its peak
    (`_resident_peak`), or, where that cannot be read, the bytes autograd saves for the backward."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    resident = _resident_peak(fn)
    if resident is not None:
        return resident
    saved = _SavedBytes()
    with saved():
        fn()
    return saved.total


def build_models(target_config: dict, num_layers: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 lora_r: int = 16):
    target = FrozenTarget.from_config(dict(target_config), num_draft_layers=num_layers, dtype=dtype).to(device)
    cfg = BlockDrafterConfig.from_target(target.config, mask_token_id=1, target_layer_ids=target.layer_ids,
                                    num_hidden_layers=num_layers, block_size=block_size)
    drafter = BlockDrafter(cfg).to(device=device, dtype=dtype).attach_target(target)
    model = add_lora(drafter, r=lora_r, alpha=2 * lora_r).to(device=device, dtype=dtype)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return target, model


def _batch(vocab: int, B: int, T: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (B, T), generator=g).to(device)
    ones = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}


def _step_fns(target, model, batch: dict, context_len: int, inner_steps: int, anchors: int):
    """One distillation step and one meta step (per algorithm; tasks batched or one by one) on the
    same tokens, each a full optimizer step; meta steps skip the before-adaptation score, as
    training does on all but its logging steps."""
    S = model.config.block_size
    gamma = default_gamma(S)
    phi = lora_parameters(model)
    opt = torch.optim.AdamW(phi.values(), lr=1e-4)
    obj = TTTObjective()

    def distill_step(kl: float = 0.0) -> None:
        t = target(batch["input_ids"], return_logits=False, return_final_hidden=kl > 0)
        valid = valid_anchor_mask(batch["loss_mask"], batch["attention_mask"], S)
        a, ok = sample_anchors(valid, anchors, torch.Generator().manual_seed(0))
        out = block_prediction_loss(model, t.features, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                    a, ok, S, model.config.mask_token_id, gamma, target_hidden=t.final_hidden,
                                    kl_weight=kl)
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    def meta_step(algorithm: str, batched: bool = True) -> Callable[[], None]:
        checkpoint = algorithm.endswith("_checkpointed")  # inner steps recomputed in the outer backward
        algorithm = algorithm.removesuffix("_checkpointed")

        def run() -> None:
            feats = target(batch["input_ids"], return_logits=False).features
            tasks = [Task(batch["input_ids"][i : i + 1], feats[i : i + 1], batch["loss_mask"][i : i + 1], context_len)
                     for i in range(batch["input_ids"].shape[0])]
            res = meta_batch(model, phi, tasks, algorithm=algorithm, steps=inner_steps, lr=1e-3, clip=1.0,
                             inner_anchors=anchors, outer_anchors=anchors, objective=obj, gamma=gamma,
                             generator=torch.Generator().manual_seed(0), batched=batched, score_before=False,
                             checkpoint=checkpoint)
            opt.zero_grad()
            res.loss.backward()
            opt.step()
        return run

    return distill_step, meta_step


def step_costs(target, model, batch: dict, context_len: int, inner_steps: int, anchors: int,
               algorithms: tuple[str, ...], reps: int, kl_weight: float | None = None) -> dict:
    """Seconds and peak memory of one distill step and one meta step per algorithm (tasks batched),
    same tokens; with `kl_weight`, also a distill step that mixes in KL to the target (`distill_kl`)."""
    device = batch["input_ids"].device
    distill_step, meta_step = _step_fns(target, model, batch, context_len, inner_steps, anchors)
    out: dict = {}
    # the same attention kernel for every row, so ratios compare algorithms, not kernels
    set_attn_implementation(model, "eager")
    runs = {"distill": distill_step, **{a: meta_step(a) for a in algorithms}}
    if kl_weight:
        runs["distill_kl"] = lambda: distill_step(kl_weight)
    times = _interleaved_medians(runs, device, reps)
    out["distill_s"] = times["distill"]
    out["distill_mem"] = _peak(distill_step, device)
    for algo in [*algorithms, *(["distill_kl"] if kl_weight else [])]:
        t = times[algo]
        m = _peak(runs[algo], device)
        out[algo] = {"seconds": t, "step_ratio": t / out["distill_s"], "mem_ratio": m / max(1, out["distill_mem"])}
    return out


def task_batching_costs(target, model, seq_len: int, context_len: int, inner_steps: int, anchors: int,
                        task_counts: tuple[int, ...] = (1, 4, 16),
                        algorithms: tuple[str, ...] = ("maml", "fomaml", "reptile"), reps: int = 3) -> list[dict]:
    """Per task count n: a meta step on n sequences as n tasks, batched (one forward per inner step
    for all of them) and one task after another, beside a distillation step on the same n sequences,
    all timed in turn rep by rep; time and peak-memory ratios to the distillation step and
    per-task ÷ batched."""
    device = next(model.parameters()).device
    set_attn_implementation(model, "eager")  # one kernel for every contender (maml needs eager)
    rows = []
    for n in task_counts:
        batch = _batch(target.config.vocab_size, n, seq_len, device)
        distill_step, meta_step = _step_fns(target, model, batch, context_len, inner_steps, anchors)
        runs = {"distill": distill_step}
        for a in algorithms:
            runs[f"{a}/batched"], runs[f"{a}/per_task"] = meta_step(a, True), meta_step(a, False)
        log.info("bench: meta steps with %d task(s)", n)
        t = _interleaved_medians(runs, device, reps)
        mem = {name: _peak(fn, device) for name, fn in runs.items()}
        row: dict = {"tasks": n, "distill_s": t["distill"], "distill_mem": mem["distill"]}
        for a in algorithms:
            b, p = f"{a}/batched", f"{a}/per_task"
            row[a] = {"batched_s": t[b], "per_task_s": t[p], "batched_over_distill": t[b] / t["distill"],
                      "per_task_over_distill": t[p] / t["distill"], "per_task_over_batched": t[p] / t[b],
                      "batched_mem_ratio": mem[b] / max(1, mem["distill"]),
                      "per_task_mem_ratio": mem[p] / max(1, mem["distill"])}
        rows.append(row)
    return rows


def format_task_batching(rows: list[dict]) -> list[str]:
    algos = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    lines = ["| tasks | meta step | batched ÷ distill | per task ÷ distill | per task ÷ batched | "
             "peak memory, batched ÷ distill | peak memory, per task ÷ distill |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for a in algos:
            v = row[a]
            lines.append(f"| {row['tasks']} | {a} | {fmt(v['batched_over_distill'])} | "
                         f"{fmt(v['per_task_over_distill'])} | {fmt(v['per_task_over_batched'])} | "
                         f"{fmt(v['batched_mem_ratio'])} | {fmt(v['per_task_mem_ratio'])} |")
    return lines


def ttt_prefill_costs(target, model, lengths: list[int], steps: int, anchors: int, reps: int,
                      more_anchors: tuple[int, ...] = ()) -> list[dict]:
    """k TTT steps on `anchors` blocks of the prompt ÷ the target's prefill of it, by prompt length;
    `more_anchors`: also TTT with these block counts, against the same prefill timing
    (`ttt_over_prefill_by_anchors`): TTT's cost is mostly anchors × (S-1) rows of the vocabulary head."""
    device = next(target.parameters()).device
    init = copy_lora(model)
    set_attn_implementation(model, "sdpa")  # inference: first-order TTT runs on the fast kernel
    rows = []
    for T in lengths:
        ids = _batch(target.config.vocab_size, 1, T, device)["input_ids"]
        with torch.no_grad():
            feats = target(ids, return_logits=False).features
        runs = {"prefill": lambda ids=ids: target(ids, return_logits=False)}
        for n in (anchors, *more_anchors):
            ttt = TTTConfig(steps=steps, lr=1e-3, num_anchors=n, gamma=default_gamma(model.config.block_size))
            runs[n] = lambda ids=ids, feats=feats, ttt=ttt: ttt_adapt(model, init, ids, feats, ttt)
        t = _interleaved_medians(runs, device, reps)
        row = {"prompt_len": T, "prefill_s": t["prefill"], "ttt_s": t[anchors],
               "ttt_over_prefill": t[anchors] / t["prefill"]}
        if more_anchors:
            row["ttt_over_prefill_by_anchors"] = {str(n): t[n] / t["prefill"] for n in (anchors, *more_anchors)}
        rows.append(row)
    return rows


def real_shape_ttt(out: Path, lengths: list[int], anchor_counts: list[int], steps: int = 5, reps: int = 1) -> dict:
    """TTT vs prefill at Qwen3-4B's shape (random weights, bf16, 5-layer drafter, block 16) on
    whatever device there is: the cost goal's question for a target that dwarfs its drafter."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    log.info("bench: building a Qwen3-4B-shaped target in bf16 on %s", device)
    target, model = build_models(QWEN3_4B, 5, 16, torch.bfloat16, device)
    results = {"machine": _machine(device, "qwen3_4b_shape"),
               "setup": {"target": {k: QWEN3_4B[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
                         "drafter_layers": 5, "block_size": 16, "dtype": "torch.bfloat16", "ttt_steps": steps,
                         "lora_r": 16},
               "ttt_prefill": ttt_prefill_costs(target, model, lengths, steps, anchor_counts[0], reps,
                                                tuple(anchor_counts[1:]))}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    print(format_real_shape(results))
    return results


def real_shape_meta(out: Path, seq_len: int | None = None, context_len: int | None = None,
                    anchors: int | None = None, task_counts: tuple[int, ...] | None = None, steps: int = 3,
                    reps: int = 2) -> dict:
    """Meta steps, tasks batched and one by one, ÷ a distillation step at Qwen3-4B's shape (random
    weights, bf16, 5-layer drafter, block 16), on whatever device there is: what the tiny widths
    cannot show, a target that dwarfs its drafter. Unset sizes: on a GPU 512 tokens (context 256),
    64 blocks, 1 / 4 / 16 tasks; on a CPU, where one target forward of 4B parameters takes seconds,
    40 tokens (context 20), 2 blocks, 1 / 4 tasks."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    seq_len = seq_len or (512 if gpu else 40)
    context_len = context_len or (256 if gpu else 20)
    anchors = anchors or (64 if gpu else 2)
    task_counts = task_counts or ((1, 4, 16) if gpu else (1, 4))
    torch.manual_seed(0)
    log.info("bench: building a Qwen3-4B-shaped target in bf16 on %s", device)
    target, model = build_models(QWEN3_4B, 5, 16, torch.bfloat16, device)
    results = {"machine": _machine(device, "qwen3_4b_shape"),
               "setup": {"target": {k: QWEN3_4B[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
                         "drafter_layers": 5, "block_size": 16, "dtype": "torch.bfloat16", "seq_len": seq_len,
                         "context_len": context_len, "anchors": anchors, "inner_steps": steps, "lora_r": 16,
                         "reps": reps},
               "task_batching": task_batching_costs(target, model, seq_len, context_len, steps, anchors, task_counts,
                                                    reps=reps)}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    print(format_real_shape_meta(results))
    return results


def format_real_shape_meta(res: dict) -> str:
    return "\n".join([f"Machine: {res['machine']['device']}, torch {res['machine']['torch']}",
                      f"Setup: {json.dumps(res['setup'])}", "", *format_task_batching(res["task_batching"])])


def format_real_shape(res: dict) -> str:
    rows = res["ttt_prefill"]
    counts = list(rows[0].get("ttt_over_prefill_by_anchors", {str(res["setup"].get("anchors", "")): None}))
    lines = [f"Machine: {res['machine']['device']}, torch {res['machine']['torch']}",
             f"Setup: {json.dumps(res['setup'])}", "",
             "| prompt tokens | target prefill (s) | " + " | ".join(f"5 TTT steps ÷ prefill, {n} blocks" for n in counts)
             + " |", "|---|---|" + "---|" * len(counts)]
    for row in rows:
        by = row.get("ttt_over_prefill_by_anchors") or {counts[0]: row["ttt_over_prefill"]}
        lines.append(f"| {row['prompt_len']} | {fmt(row['prefill_s'], '.1f')} | "
                     + " | ".join(fmt(by[n]) for n in counts) + " |")
    return "\n".join(lines)


def draft_costs(target, num_layers: int, block_size: int, context_len: int, reps: int) -> dict:
    """Seconds to draft one block with each drafter kind (same widths), timed alternately, plus
    one target verification forward of the block for scale."""
    from metattt.models.ar_drafter import ARDrafter, ARDrafterConfig
    from metattt.spec.decode import draft

    device = next(target.parameters()).device
    dtype = next(target.parameters()).dtype
    kw = dict(mask_token_id=1, target_layer_ids=target.layer_ids, num_hidden_layers=num_layers,
              block_size=block_size)
    drafters = {
        "block": BlockDrafter(BlockDrafterConfig.from_target(target.config, **kw)),
        "autoregressive": ARDrafter(ARDrafterConfig.from_target(target.config, **kw)),
    }
    ids = _batch(target.config.vocab_size, 1, context_len + block_size, device)["input_ids"]
    feats = target(ids[:, :context_len], return_logits=False).features
    runs = {}
    for name, drafter in drafters.items():
        drafter = drafter.to(device=device, dtype=dtype).attach_target(target).eval()
        ctx = drafter.extend_cache(None, feats)
        runs[name] = (lambda d=drafter, c=ctx: draft(d, 5, context_len, c, 0.0, 1.0, None, False))
    runs["target_verify"] = lambda: target(ids[:, :block_size], return_logits=True)
    with torch.no_grad():
        out = _interleaved_medians(runs, device, reps)
    out["autoregressive_over_block"] = out["autoregressive"] / out["block"]
    return out


def _distilled_block_drafter(target, layers: int, S: int, seqs: list[torch.Tensor], steps: int, anchors: int = 16,
                             lr: float = 3e-3) -> BlockDrafter:
    """A block drafter distilled for `steps` AdamW steps on sequences `seqs` (T_i,) the target wrote
    (right-padded into one batch)."""
    device = seqs[0].device
    dtype = next(target.parameters()).dtype
    cfg = BlockDrafterConfig.from_target(target.config, mask_token_id=1, target_layer_ids=target.layer_ids,
                                         num_hidden_layers=layers, block_size=S)
    torch.manual_seed(0)
    drafter = BlockDrafter(cfg).to(device=device, dtype=dtype).attach_target(target)
    T = max(x.numel() for x in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    feats = None
    for b, x in enumerate(seqs):
        f = target(x[None], return_logits=False).features[0]  # (T_b, n·H)
        feats = f.new_zeros(len(seqs), T, f.shape[-1]) if feats is None else feats
        ids[b, : x.numel()], attn[b, : x.numel()], feats[b, : x.numel()] = x, 1, f
    valid = valid_anchor_mask(attn, attn, S)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(drafter.parameters(), lr=lr)
    for _ in range(steps):
        a, ok = sample_anchors(valid, anchors, g)
        loss = block_prediction_loss(drafter, feats, ids, attn, attn, a, ok, S, 1, default_gamma(S)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return drafter.requires_grad_(False).eval()


def _distilled_setup(tcfg: dict, layers: int, S: int, dtype: torch.dtype, device: torch.device, n_prompts: int,
                     n_unseen: int, prompt_lens: tuple[int, int], new_tokens: int, distill_steps: int,
                     init_range: float, lora_r: int
                     ) -> tuple[FrozenTarget, torch.nn.Module, list[torch.Tensor], list[torch.Tensor], list]:
    """A random target at `tcfg`'s widths (weights of std `init_range`), `n_prompts` + `n_unseen`
    random prompts of `prompt_lens` tokens, their greedy continuations of `new_tokens` by the target
    (of the first `n_prompts`), and a LoRA-wrapped block drafter (peft's init, B = 0) distilled on
    those continuations. A drafter distilled briefly on a random target's continuations does not
    generalise to new prompts (τ ≈ 1), so the decoding sections distil it on their own prompts'
    continuations to time a well-matched drafter. Returns target, model, prompts, unseen prompts, continuations."""
    from metattt.spec.batched import target_generate_batch

    torch.manual_seed(0)
    target = FrozenTarget.from_config(dict(tcfg, initializer_range=init_range), num_draft_layers=layers,
                                      dtype=dtype).to(device)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(prompt_lens[0], prompt_lens[1] + 1, (n_prompts + n_unseen,), generator=g).tolist()
    prompts = [torch.randint(4, tcfg["vocab_size"], (n,), generator=g).to(device) for n in lengths]
    prompts, unseen = prompts[:n_prompts], prompts[n_prompts:]
    refs = target_generate_batch(target, prompts, new_tokens, None, max_batch_size=None)
    seqs = [torch.cat([p, p.new_tensor(r.tokens)]) for p, r in zip(prompts, refs)]
    drafter = _distilled_block_drafter(target, layers, S, seqs, distill_steps)
    model = add_lora(drafter, r=lora_r, alpha=2 * lora_r).to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return target, model, prompts, unseen, refs


def batched_costs(tcfg: dict, layers: int, S: int, dtype: torch.dtype, device: torch.device, ttt: TTTConfig,
                  batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16), new_tokens: int = 64,
                  prompt_lens: tuple[int, int] = (48, 96), reps: int = 3, distill_steps: int = 150,
                  init_range: float = 0.05, lora_r: int = 8, unseen_at: tuple[int, ...] = (1, 8)) -> dict:
    """Batched decoding and batched TTT, every contender of a batch size timed in turn rep by rep.

    Per batch size R (the same first R of 16 prompts, 48..96 tokens, `new_tokens` each, EOS off,
    greedy): tokens/s of `target` (batched target-only decoding), `static` (batched speculative
    decoding, one drafter for every row) and `ttt_meta` (batched prefill TTT of each row's LoRA, then
    batched speculative decoding with per-row LoRA), at R = 1 the single-request loops too, and at
    R in `unseen_at` `static` on prompts the drafter never saw. Then `ttt_adapt_batched` on R
    prompts ÷ R `ttt_adapt` calls.

    The target is random at the recipe's widths, its weights drawn with std `init_range`. A drafter
    distilled briefly on a random target's continuations does not generalise to new prompts (τ ≈ 1,
    the `static_unseen` rows), so for the speeds it is distilled on the bench prompts' own greedy
    continuations: a well-matched drafter, τ between 1 and S, reported beside every speed. The TTT
    init is peft's (B = 0): a random target has no meta-learned init, and TTT costs the same from any.
    """
    from metattt.spec.batched import prefill_ttt_batched, speculative_generate_batch, target_generate_batch
    from metattt.spec.decode import speculative_generate, target_generate
    from metattt.stats import distinct_n
    from metattt.ttt.batched import ttt_adapt_batched

    n_max = max(batch_sizes)
    log.info("bench: batched decoding: distilling a drafter on the prompts' greedy continuations")
    target, model, prompts, unseen, refs = _distilled_setup(tcfg, layers, S, dtype, device, n_max,
                                                            max(unseen_at, default=0), prompt_lens, new_tokens,
                                                            distill_steps, init_range, lora_r)
    init = copy_lora(model)
    set_attn_implementation(model, "sdpa")
    results: dict = {"setup": {"new_tokens": new_tokens, "prompt_lens": list(prompt_lens), "init_range": init_range,
                               "distill_steps": distill_steps, "lora_r": lora_r, "ttt_steps": ttt.steps,
                               "ttt_anchors": ttt.num_anchors, "reps": reps,
                               "target_distinct_2": statistics.fmean(distinct_n(r.tokens, 2) for r in refs)},
                     "decoding": [], "ttt": []}
    last: dict = {}

    def keep(name: str, fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            last[name] = fn()
        return run

    for R in batch_sizes:
        ps = prompts[:R]
        runs = {
            "target": keep("target", lambda ps=ps: target_generate_batch(target, ps, new_tokens, None,
                                                                          max_batch_size=None)),
            "static": keep("static", lambda ps=ps: speculative_generate_batch(target, model, ps, new_tokens, None,
                                                                              max_batch_size=None)),
            "ttt_meta": keep("ttt_meta", lambda ps=ps: speculative_generate_batch(
                target, model, ps, new_tokens, None, max_batch_size=None,
                on_prefill=prefill_ttt_batched(model, init, ps, ttt))),
        }
        if R in unseen_at:
            runs["static_unseen"] = keep("static_unseen", lambda us=unseen[:R]: speculative_generate_batch(
                target, model, us, new_tokens, None, max_batch_size=None))
        if R == 1:
            runs["target/single"] = keep("target/single", lambda p=ps[0]: [target_generate(target, p, new_tokens,
                                                                                             None)])
            runs["static/single"] = keep("static/single", lambda p=ps[0]: [speculative_generate(target, model, p,
                                                                                                 new_tokens, None)])
        log.info("bench: batched decoding, batch %d", R)
        times = _interleaved_medians(runs, device, reps)
        row: dict = {"batch": R}
        for name, t in times.items():
            outs = last[name]
            n_tokens = sum(len(o.tokens) for o in outs)
            taus = [o.tau for o in outs if o.num_steps and name.split("/")[0] != "target"]
            row[name] = {"seconds": t, "tokens": n_tokens, "tokens_per_s": n_tokens / t,
                         "tau": statistics.fmean(taus) if taus else None}
        results["decoding"].append(row)
    base = results["decoding"][0]
    for row in results["decoding"]:
        for name in ("target", "static", "ttt_meta"):
            row[name]["over_batch_1"] = row[name]["tokens_per_s"] / base[name]["tokens_per_s"]
        for name in ("static", "ttt_meta", "static_unseen"):
            if name in row:
                row[name]["over_target"] = row[name]["tokens_per_s"] / row["target"]["tokens_per_s"]

    log.info("bench: batched TTT vs one TTT per prompt")
    with torch.no_grad():
        feats = [target(p[None], return_logits=False).features for p in prompts]
    for R in batch_sizes:
        ps, fs = [p[None] for p in prompts[:R]], feats[:R]
        runs = {"batched": lambda ps=ps, fs=fs: ttt_adapt_batched(model, init, ps, fs, ttt),
                "one_by_one": lambda ps=ps, fs=fs: [ttt_adapt(model, init, p, f, ttt) for p, f in zip(ps, fs)]}
        t = _interleaved_medians(runs, device, reps)
        results["ttt"].append({"batch": R, "batched_s": t["batched"], "one_by_one_s": t["one_by_one"],
                               "batched_over_one_by_one": t["batched"] / t["one_by_one"]})
    one = results["ttt"][0]["batched_s"]
    for row in results["ttt"]:
        row["batched_over_one_request"] = row["batched_s"] / one
    return results


def format_batched(res: dict) -> list[str]:
    su = res["setup"]
    lines = [f"Batched decoding: greedy, {su['new_tokens']} new tokens per row, prompts of {su['prompt_lens'][0]}-"
             f"{su['prompt_lens'][1]} tokens; random target (init std {su['init_range']}, distinct-2 of its "
             f"continuations {fmt(su.get('target_distinct_2'))}), drafter distilled {su['distill_steps']} steps on "
             "these prompts' continuations; "
             f"ttt_meta: {su['ttt_steps']} TTT steps on {su['ttt_anchors']} blocks per row.", "",
             "| batch | target tok/s | static tok/s | ttt_meta tok/s | target ÷ batch 1 | static ÷ batch 1 | "
             "ttt_meta ÷ batch 1 | static ÷ target | ttt_meta ÷ target | τ static | τ ttt_meta |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["decoding"]:
        t, s, m = row["target"], row["static"], row["ttt_meta"]
        lines.append(f"| {row['batch']} | {fmt(t['tokens_per_s'], '.0f')} | {fmt(s['tokens_per_s'], '.0f')} | "
                     f"{fmt(m['tokens_per_s'], '.0f')} | {fmt(t['over_batch_1'])} | {fmt(s['over_batch_1'])} | "
                     f"{fmt(m['over_batch_1'])} | {fmt(s['over_target'])} | {fmt(m['over_target'])} | "
                     f"{fmt(s['tau'])} | {fmt(m['tau'])} |")
    unseen = [row for row in res["decoding"] if "static_unseen" in row]
    if unseen:
        lines += ["", "static on prompts the drafter never saw: " + "; ".join(
            f"batch {row['batch']}: {fmt(row['static_unseen']['tokens_per_s'], '.0f')} tok/s, "
            f"τ {fmt(row['static_unseen']['tau'])}, ÷ target {fmt(row['static_unseen']['over_target'])}"
            for row in unseen) + "."]
    first = res["decoding"][0]
    if "static/single" in first:
        lines += ["", f"One request at a time (the single-request loops): target {fmt(first['target/single']['tokens_per_s'], '.0f')}"
                  f" tok/s, static {fmt(first['static/single']['tokens_per_s'], '.0f')} tok/s."]
    lines += ["", "| requests R | batched TTT (s) | R single TTTs (s) | batched ÷ R single | batched ÷ one request's TTT |",
              "|---|---|---|---|---|"]
    for row in res["ttt"]:
        lines.append(f"| {row['batch']} | {fmt(row['batched_s'], '.3f')} | {fmt(row['one_by_one_s'], '.3f')} | "
                     f"{fmt(row['batched_over_one_by_one'])} | {fmt(row['batched_over_one_request'])} |")
    return lines


def online_update_costs(target: FrozenTarget, model: torch.nn.Module, ttt: TTTConfig, online: OnlineConfig,
                        context_lens: list[int], reps: int) -> list[dict]:
    """Per committed-context length L: one online update (`OnlineTTT` at `online`'s steps,
    num_anchors and window, on L committed tokens and their target features), the rebuild of the
    drafter's context cache it asks for, and one target verification forward of a block (S tokens
    after a KV cache of L), timed in turn. Each update starts from the fast weights the one before
    left, as in decoding (`model`'s LoRA is restored afterwards). `online_over_verify` is what decoding pays per update (the rebuild
    included where the update asks for it) ÷ one verification."""
    from metattt.spec.decode import crop_cache
    from metattt.ttt.online import OnlineTTT

    device = next(target.parameters()).device
    S = model.config.block_size
    init = copy_lora(model)
    every_step = dataclasses.replace(online, every=1)  # every call updates, whatever the recipe's `every`
    set_attn_implementation(model, "sdpa")  # as decoding runs it
    rows = []
    for L in context_lens:
        ids = _batch(target.config.vocab_size, 1, L + S, device)["input_ids"]
        context, block = ids[:, :L], ids[:, L:]
        with torch.no_grad():
            out = target(context, use_cache=True, logits_to_keep=1)
        cache, feats = out.past_key_values, out.features  # positions 0..L-1
        # one request's hook, called again and again: each call is one update from the current fast
        # weights, as decoding's are; the first half of the context as its prompt (only
        # `online.prompt_anchors` reads it)
        hook = OnlineTTT(model, init, ttt, every_step, L // 2)
        # the same updates reading the decoding cache's K/V before the window as constants
        detached = OnlineTTT(model, init, ttt, dataclasses.replace(every_step, detach_context=True), L // 2)
        with torch.no_grad():
            drafter_cache = model.extend_cache(None, feats[:, : L - 1])  # what decoding holds at the update

        def verify(block=block, cache=cache) -> None:
            target(block, past_key_values=cache, use_cache=True)
            crop_cache(cache, S)  # back to L positions for the next rep

        runs = {"update": lambda hook=hook, context=context, feats=feats: hook(0, context, feats),
                "detached": lambda hook=detached, context=context, feats=feats, c=drafter_cache: hook(0, context, feats, c),
                "rebuild": lambda feats=feats: model.extend_cache(None, feats), "verify": verify}
        with torch.no_grad():
            t = _interleaved_medians(runs, device, reps)
        rebuild = t["rebuild"] if hook.changes_context else 0.0
        rows.append({"context_len": L, "update_s": t["update"], "detached_update_s": t["detached"],
                     "rebuild_s": t["rebuild"], "verify_s": t["verify"],
                     "rebuilds": hook.changes_context, "update_over_verify": t["update"] / t["verify"],
                     "detached_over_verify": t["detached"] / t["verify"],
                     "rebuild_over_verify": t["rebuild"] / t["verify"],
                     "online_over_verify": (t["update"] + rebuild) / t["verify"],
                     "detached_online_over_verify": (t["detached"] + rebuild) / t["verify"]})
    set_lora(model, init)
    return rows


def online_decoding_costs(tcfg: dict, layers: int, S: int, dtype: torch.dtype, device: torch.device, ttt: TTTConfig,
                          online: OnlineConfig, everies: tuple[int, ...] = (1, 4, 16), n_prompts: int = 4,
                          prompt_lens: tuple[int, int] = (256, 512), new_tokens: int = 256, reps: int = 3,
                          distill_steps: int = 150, init_range: float = 0.05, lora_r: int = 8) -> dict:
    """Speculative decoding with online updates every e verification steps (e in `everies`, the rest
    of `online` as given) beside the same decoding without them and target-only decoding: the same
    prompts one request at a time (`new_tokens` each, EOS off, greedy), the same drafter, every
    contender timed in turn rep by rep. The drafter and target are `_distilled_setup`'s (τ between 1
    and S, reported beside every speed); online updates start from its LoRA init (peft's, B = 0) on
    every request, as a request without prefill TTT does.

    Per e: `overhead` = (seconds with updates − seconds without) ÷ seconds without, `online_s_per_token`
    = the updates' own time (`GenerationResult.online_time`, rebuilds included) ÷ tokens written, and
    `speedup` = target-only seconds ÷ seconds (for `static` too)."""
    from metattt.spec.decode import speculative_generate, target_generate
    from metattt.ttt.online import OnlineTTT

    log.info("bench: online TTT: distilling a drafter on the prompts' greedy continuations")
    target, model, prompts, _, _ = _distilled_setup(tcfg, layers, S, dtype, device, n_prompts, 0, prompt_lens,
                                                    new_tokens, distill_steps, init_range, lora_r)
    init = copy_lora(model)
    set_attn_implementation(model, "sdpa")
    last: dict = {}
    updates: dict[str, int] = {}

    def speculative(name: str, every: int, detach: bool = False) -> Callable[[], None]:
        def run() -> None:
            outs, hooks = [], []
            for p in prompts:
                set_lora(model, init)  # nothing an earlier request learned carries over
                cfg = dataclasses.replace(online, every=every, detach_context=detach)
                hook = OnlineTTT(model, init, ttt, cfg, p.numel()) if every else None
                outs.append(speculative_generate(target, model, p, new_tokens, None, online=hook))
                hooks += [hook] if hook else []
            last[name], updates[name] = outs, sum(h.updates for h in hooks)
        return run

    def target_only() -> None:
        last["target"] = [target_generate(target, p, new_tokens, None) for p in prompts]

    runs = {"target": target_only, "static": speculative("static", 0),
            **{f"online@{e}": speculative(f"online@{e}", e) for e in everies},
            **{f"detached@{e}": speculative(f"detached@{e}", e, True) for e in everies}}
    log.info("bench: online TTT: decoding with updates every %s steps, without them, and target-only", everies)
    t = _interleaved_medians(runs, device, reps)
    set_lora(model, init)

    def row(name: str) -> dict:
        outs = last[name]
        tokens = sum(len(o.tokens) for o in outs)
        return {"seconds": t[name], "tokens": tokens, "tokens_per_s": tokens / t[name],
                "tau": statistics.fmean(o.tau for o in outs) if name != "target" else None,
                "speedup": t["target"] / t[name]}

    static = row("static")
    results: dict = {"setup": {"n_prompts": n_prompts, "prompt_lens": list(prompt_lens), "new_tokens": new_tokens,
                               "init_range": init_range, "distill_steps": distill_steps, "lora_r": lora_r,
                               "reps": reps, "online": dataclasses.asdict(online)},
                     "target": row("target"), "static": static, "online": []}
    for detach in (False, True):
        for e in everies:
            name = f"{'detached' if detach else 'online'}@{e}"
            r = row(name)
            online_s = sum(o.online_time for o in last[name])
            results["online"].append({"every": e, "detach_context": detach, **r, "online_s": online_s,
                                      "updates": updates[name],
                                      "overhead": (r["seconds"] - static["seconds"]) / static["seconds"],
                                      "online_s_per_token": online_s / r["tokens"]})
    return results


def format_online(res: dict) -> list[str]:
    """The `online` section: per-update cost ÷ a verification forward, then amortized over decoding."""
    lines = ["| committed tokens | online update ÷ verification forward | context rebuild ÷ verification | "
             "update as decoding pays it (rebuild included) ÷ verification | the same, older context detached |",
             "|---|---|---|---|---|"]
    for row in res["update"]:
        lines.append(f"| {row['context_len']} | {fmt(row['update_over_verify'])} | {fmt(row['rebuild_over_verify'])} | "
                     f"{fmt(row['online_over_verify'])} | {fmt(row.get('detached_online_over_verify'))} |")
    d = res["decoding"]
    su = d["setup"]
    o = su["online"]
    lines += ["", f"Online TTT while decoding: {su['n_prompts']} prompts of {su['prompt_lens'][0]}-{su['prompt_lens'][1]}"
              f" tokens, {su['new_tokens']} new tokens each, greedy, one request at a time; random target, drafter "
              f"distilled {su['distill_steps']} steps on these prompts' continuations; {o['steps']} step(s) on "
              f"{o['num_anchors']} blocks of the last {o['window']} tokens per update.", "",
              "| decoding | online every | τ | tok/s | overhead vs static | online s per token | "
              "speedup over target |", "|---|---|---|---|---|---|---|",
              f"| target-only | | | {fmt(d['target']['tokens_per_s'], '.0f')} | | | 1.00 |",
              f"| static | | {fmt(d['static']['tau'])} | {fmt(d['static']['tokens_per_s'], '.0f')} | | | "
              f"{fmt(d['static']['speedup'])} |"]
    for row in d["online"]:
        name = "online, older context detached" if row.get("detach_context") else "online"
        lines.append(f"| {name} | {row['every']} | {fmt(row['tau'])} | {fmt(row['tokens_per_s'], '.0f')} | "
                     f"{fmt(100 * row['overhead'], '+.1f')} % | {fmt(row['online_s_per_token'] * 1e3, '.3f')} ms | "
                     f"{fmt(row['speedup'])} |")
    return lines


def _tiny_widths(r: Recipe) -> dict:
    t = r.tiny_target
    return dict(model_type="qwen3", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
                max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=True)


def batched_section(r: Recipe, out: Path) -> dict:
    """`--batched`: only the batched decoding / TTT section, at the tiny recipe's widths (GPU if any)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tcfg = _tiny_widths(r)
    ttt = TTTConfig(steps=r.meta.ttt.steps, lr=r.meta.ttt.lr, clip=r.meta.ttt.clip, num_anchors=r.meta.ttt.num_anchors)
    res = batched_costs(tcfg, r.drafter.num_hidden_layers, r.drafter.block_size, torch.float32, device, ttt)
    results = {"machine": _machine(device, "batched"),
               "setup": {"target": {k: tcfg[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
                         "drafter_layers": r.drafter.num_hidden_layers, "block_size": r.drafter.block_size},
               "batched": res}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    print("\n".join([f"Machine: {results['machine']['device']}, torch {results['machine']['torch']}",
                     f"Setup: {json.dumps(results['setup'])}", "", *format_batched(res)]))
    return results


def tau_section(r: Recipe, reuse: bool) -> dict:
    """τ from the eval stage of the recipe (meta-training and distilling first where missing).

    reuse: take `{out}/eval/report.json` when it is newer than the meta-learned adapter (its
    speedups were measured side by side within that eval run) instead of evaluating again.
    """
    from metattt.stages import STAGES

    meta_dir = r.run.out_dir / "meta_lora"
    report_path = r.run.out_dir / "eval" / "report.json"
    if not (meta_dir / "adapter_config.json").is_file():
        STAGES["meta-train"].run(r)
    fresh = report_path.is_file() and report_path.stat().st_mtime > (meta_dir / "adapter_config.json").stat().st_mtime
    if not (reuse and fresh):
        STAGES["eval"].run(r)
    report = json.loads(report_path.read_text())
    summary = report["summary"]
    target_report = Path(r.target.path) / "tiny_target_report.json"
    quality = json.loads(target_report.read_text()) if target_report.is_file() else {}
    return {"summary": summary, "meta": report["meta"],
            "target_quality": {k: quality.get(k) for k in ("val_loss", "shifted_loss", "distinct_2", "distinct_4")}}


def _machine(device: torch.device, preset: str) -> dict:
    name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "preset": preset}


#: The sections of a quick / full run, in the order they run (`bench.sections` picks some).
SECTIONS = ("meta_step", "task_batching", "ttt_prefill", "draft_cost", "batched", "online", "scaling", "tau")


def run(r: Recipe, full: bool, out: Path, skip_tau: bool = False, reuse_eval: bool = True,
        sections: list[str] | None = None) -> dict:
    """Every section (or those `sections` names, merged into the results already at `out`, each
    section's contenders still timed side by side in this run), written to `out` and printed."""
    device = torch.device("cuda" if full and torch.cuda.is_available() else "cpu")
    if full and device.type != "cuda":
        raise RuntimeError("bench.full is the GPU preset and needs CUDA; run without it on CPU")
    unknown = sorted(set(sections or ()) - set(SECTIONS))
    if unknown:
        raise ValueError(f"bench.sections: unknown {unknown}; choose from {list(SECTIONS)}")
    if full:
        tcfg, layers, S, dtype = QWEN3_4B, 5, 16, torch.bfloat16
        B, T, ctx, anchors, lengths, reps = 1, 2048, 1024, 256, [256, 1024, 4096], 5
        ks, ctxs = [1, 2, 4], [512, 1024, 1536]
    else:
        tcfg = _tiny_widths(r)
        layers, S, dtype = r.drafter.num_hidden_layers, r.drafter.block_size, torch.float32
        B, T, ctx, anchors, lengths, reps = 2, 256, 128, r.meta.ttt.num_anchors, [256, 1024], 3
        ks, ctxs = [1, 2, 4], [64, 128, 192]
    torch.manual_seed(0)
    target, model = build_models(tcfg, layers, S, dtype, device)
    batch = _batch(tcfg["vocab_size"], B, T, device)
    k = r.meta.ttt.steps
    results: dict = {}
    if sections and out.is_file():
        results = json.loads(out.read_text())
    results.update({
        "machine": _machine(device, "full" if full else "quick"),
        "setup": {"target": {k2: tcfg[k2] for k2 in ("hidden_size", "num_hidden_layers", "vocab_size")},
                  "drafter_layers": layers, "block_size": S, "dtype": str(dtype), "batch": B, "seq_len": T,
                  "context_len": ctx, "inner_steps": k, "anchors": anchors},
    })
    ttt = TTTConfig(steps=r.meta.ttt.steps, lr=r.meta.ttt.lr, clip=r.meta.ttt.clip, num_anchors=r.meta.ttt.num_anchors)
    online = r.eval.online.resolved(ttt.online)  # what OnlineTTT runs: the setup records it
    everies = tuple(sorted({1, 4, 16} | ({online.every} if online.every else set())))  # and the recipe's own
    lengths = [n for n in lengths if n <= tcfg["max_position_embeddings"]]

    def scaling() -> dict:
        return {
            "by_context": [{"context_len": c, **{a: v["step_ratio"] for a, v in step_costs(
                target, model, batch, c, k, anchors, ("maml",), reps).items() if isinstance(v, dict)}} for c in ctxs],
            "by_k": [{"k": kk, **{a: v["step_ratio"] for a, v in step_costs(
                target, model, batch, ctx, kk, anchors, ("maml", "fomaml"), reps).items() if isinstance(v, dict)}}
                for kk in ks],
        }

    runs: dict[str, tuple[str, Callable[[], dict | list]]] = {
        "meta_step": ("meta-step costs", lambda: step_costs(target, model, batch, ctx, k, anchors,
                                                            ("maml", "maml_checkpointed", "fomaml", "reptile"), reps,
                                                            kl_weight=0.5)),
        "task_batching": ("meta steps with tasks batched and one by one", lambda: task_batching_costs(
            target, model, min(T, 512), min(ctx, 256), k, anchors, (1, 4, 16), reps=reps)),
        "ttt_prefill": ("TTT vs prefill", lambda: ttt_prefill_costs(target, model, lengths, 5, anchors, reps)),
        "draft_cost": ("drafting cost per block, both drafter kinds",
                       lambda: draft_costs(target, layers, S, ctx, reps=max(5, reps * 3))),
        # the tiny recipe's widths even in the full preset: batching pays where per-step overheads dominate
        "batched": ("batched decoding and batched TTT", lambda: batched_costs(
            _tiny_widths(r), r.drafter.num_hidden_layers, r.drafter.block_size, torch.float32,
            device, ttt, reps=reps)),
        "online": ("online TTT: one update ÷ one verification forward, and amortized over decoding", lambda: {
            # a context as at the end of an eval generation; the full preset at the lengths TTT ÷ prefill uses
            "update": online_update_costs(target, model, ttt, online,
                                          [1024, 4096] if full else [r.eval.prompt_len + r.eval.max_new_tokens], reps),
            # decoding at the tiny recipe's widths even in the full preset, as `batched`: it needs a distilled drafter
            "decoding": online_decoding_costs(_tiny_widths(r), r.drafter.num_hidden_layers,
                                              r.drafter.block_size, torch.float32, device, ttt, online, everies,
                                              prompt_lens=(r.eval.prompt_len // 2, r.eval.prompt_len), reps=reps)}),
        "scaling": ("scaling", scaling),
    }
    for name, (what, fn) in runs.items():
        if not sections or name in sections:
            log.info("bench: %s", what)
            results[name] = fn()
    target = model = None  # freed before the eval stage loads its own models
    if not skip_tau and not full and (not sections or "tau" in sections):
        log.info("bench: τ on the recipe (eval stage)")
        results["tau"] = tau_section(r, reuse=reuse_eval)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    print(format_tables(results))
    return results


def format_tables(res: dict) -> str:
    lines = [f"Machine: {res['machine']['device']}, torch {res['machine']['torch']}, preset {res['machine']['preset']}",
             f"Setup: {json.dumps(res['setup'])}", "",
             "| meta step (k inner steps) | step time ÷ distill step | peak memory ÷ distill step |", "|---|---|---|"]
    for algo in ("maml", "maml_checkpointed", "fomaml", "reptile"):
        v = res["meta_step"].get(algo)
        if v:
            name = "maml, inner steps checkpointed" if algo == "maml_checkpointed" else algo
            lines.append(f"| {name} | {fmt(v['step_ratio'])} | {fmt(v['mem_ratio'])} |")
    if "distill_kl" in res["meta_step"]:
        v = res["meta_step"]["distill_kl"]
        lines.append(f"| distill step with KL to the target (w = 0.5), for scale | {fmt(v['step_ratio'])} | "
                     f"{fmt(v['mem_ratio'])} |")
    if res.get("task_batching"):
        lines += ["", *format_task_batching(res["task_batching"])]
    lines += ["", "| prompt tokens | 5 TTT steps ÷ target prefill |", "|---|---|"]
    for row in res["ttt_prefill"]:
        lines.append(f"| {row['prompt_len']} | {fmt(row['ttt_over_prefill'])} |")
    if "draft_cost" in res:
        d = res["draft_cost"]
        lines += ["", "| drafting one block | ms | ÷ block drafter |", "|---|---|---|",
                  f"| block drafter (1 forward) | {fmt(d['block'] * 1e3)} | 1.00 |",
                  f"| autoregressive drafter (S-1 forwards) | {fmt(d['autoregressive'] * 1e3)} | "
                  f"{fmt(d['autoregressive_over_block'])} |",
                  f"| target verification forward (for scale) | {fmt(d['target_verify'] * 1e3)} | "
                  f"{fmt(d['target_verify'] / d['block'])} |"]
    lines += ["", "| context tokens | maml step ÷ distill step |", "|---|---|"]
    for row in res["scaling"]["by_context"]:
        lines.append(f"| {row['context_len']} | {fmt(row['maml'])} |")
    lines += ["", "| inner steps k | maml ÷ distill | fomaml ÷ distill |", "|---|---|---|"]
    for row in res["scaling"]["by_k"]:
        lines.append(f"| {row['k']} | {fmt(row['maml'])} | {fmt(row['fomaml'])} |")
    if res.get("batched"):
        lines += ["", *format_batched(res["batched"])]
    if res.get("online"):
        lines += ["", *format_online(res["online"])]
    if "tau" in res:
        lines += ["", "| split | condition | τ | ± s.e. | n | speedup | speedup ÷ τ |", "|---|---|---|---|---|---|---|"]
        for split, conds in res["tau"]["summary"].items():
            for cond, s in conds.items():
                if cond == "target":
                    continue
                lines.append(f"| {split} | {cond} | {fmt(s.get('tau'))} | {fmt(s.get('tau_stderr'))} | {s['n']} | "
                             f"{fmt(s.get('speedup'))} | {fmt(s.get('speedup_over_tau'))} |")
        q = res["tau"].get("target_quality") or {}
        if q:
            lines += ["", f"Tiny target: held-out loss {fmt(q.get('val_loss'))} (in-domain), "
                          f"{fmt(q.get('shifted_loss'))} (shifted); distinct-2/4 of greedy continuations "
                          f"{fmt(q.get('distinct_2'))}/{fmt(q.get('distinct_4'))}."]
    return "\n".join(lines)


def bench(r: Recipe) -> dict | None:
    """The `bench` stage: what `r.bench` asks for, on the recipe's dimensions."""
    cfg = r.bench
    if cfg.batched:
        kind = "gpu" if torch.cuda.is_available() else "cpu"
        batched_section(r, Path(cfg.out) if cfg.out else Path(f"bench/results_batched_{kind}.json"))
        return None
    if cfg.qwen3_4b_meta:
        kind = "gpu" if torch.cuda.is_available() else "cpu"
        real_shape_meta(Path(cfg.out) if cfg.out else Path(f"bench/results_qwen3_4b_meta_{kind}.json"))
        return None
    if cfg.qwen3_4b_ttt:
        kind = "gpu" if torch.cuda.is_available() else "cpu"
        real_shape_ttt(Path(cfg.out) if cfg.out else Path(f"bench/results_qwen3_4b_{kind}.json"), [256, 1024, 4096],
                       [16, 64])
        return None
    out = Path(cfg.out) if cfg.out else Path("bench/results_gpu.json" if cfg.full else "bench/results.json")
    return run(r, cfg.full, out, cfg.skip_tau, reuse_eval=not cfg.fresh_eval, sections=cfg.sections)


if __name__ == "__main__":  # `python -m metattt.bench [--full] ...` is `python -m metattt bench --bench.full=true ...`
    import sys

    from metattt.cli import main

    flags = {"--full": "--bench.full=true", "--skip-tau": "--bench.skip_tau=true",
             "--fresh-eval": "--bench.fresh_eval=true", "--qwen3-4b-ttt": "--bench.qwen3_4b_ttt=true",
             "--qwen3-4b-meta": "--bench.qwen3_4b_meta=true", "--batched": "--bench.batched=true"}
    args = [flags.get(a, a) for a in sys.argv[1:]]
    main(["bench", *args] if "--config" in args else ["bench", "--config", "recipes/tiny.yaml", *args])
