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
  scaling       maml step ÷ distill step by context length and by k
  tau           the eval stage on the recipe: τ ± s.e. for static / TTT-zero / TTT-meta per split,
                wall-clock speedup over target-only decoding and speedup ÷ τ
Costs use randomly initialised models of the recipe's dimensions (`--full`: Qwen3-4B's), since
timing does not depend on the weights; τ uses the trained tiny target, drafter and meta-LoRA.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metattt.anchors import sample_anchors, valid_anchor_mask
from metattt.atomic import atomic_write_json
from metattt.config import Recipe, default_gamma
from metattt.losses import block_prediction_loss
from metattt.models.base import set_attn_implementation
from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
from metattt.models.lora import add_lora, copy_lora, lora_parameters
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


def _peak(fn: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
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
        def run() -> None:
            feats = target(batch["input_ids"], return_logits=False).features
            tasks = [Task(batch["input_ids"][i : i + 1], feats[i : i + 1], batch["loss_mask"][i : i + 1], context_len)
                     for i in range(batch["input_ids"].shape[0])]
            res = meta_batch(model, phi, tasks, algorithm=algorithm, steps=inner_steps, lr=1e-3, clip=1.0,
                             inner_anchors=anchors, outer_anchors=anchors, objective=obj, gamma=gamma,
                             generator=torch.Generator().manual_seed(0), batched=batched, score_before=False)
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


def run(r: Recipe, full: bool, out: Path, skip_tau: bool = False, reuse_eval: bool = True) -> dict:
    device = torch.device("cuda" if full and torch.cuda.is_available() else "cpu")
    if full and device.type != "cuda":
        raise RuntimeError("bench.full is the GPU preset and needs CUDA; run without it on CPU")
    if full:
        tcfg, layers, S, dtype = QWEN3_4B, 5, 16, torch.bfloat16
        B, T, ctx, anchors, lengths, reps = 1, 2048, 1024, 256, [256, 1024, 4096], 5
        ks, ctxs = [1, 2, 4], [512, 1024, 1536]
    else:
        t = r.tiny_target
        tcfg = dict(model_type="qwen3", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                    intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                    num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
                    max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=True)
        layers, S, dtype = r.drafter.num_hidden_layers, r.drafter.block_size, torch.float32
        B, T, ctx, anchors, lengths, reps = 2, 256, 128, r.meta.ttt.num_anchors, [256, 1024], 3
        ks, ctxs = [1, 2, 4], [64, 128, 192]
    torch.manual_seed(0)
    target, model = build_models(tcfg, layers, S, dtype, device)
    batch = _batch(tcfg["vocab_size"], B, T, device)
    k = r.meta.ttt.steps
    results: dict = {
        "machine": _machine(device, "full" if full else "quick"),
        "setup": {"target": {k2: tcfg[k2] for k2 in ("hidden_size", "num_hidden_layers", "vocab_size")},
                  "drafter_layers": layers, "block_size": S, "dtype": str(dtype), "batch": B, "seq_len": T,
                  "context_len": ctx, "inner_steps": k, "anchors": anchors},
    }
    log.info("bench: meta-step costs")
    results["meta_step"] = step_costs(target, model, batch, ctx, k, anchors, ("maml", "fomaml", "reptile"), reps,
                                      kl_weight=0.5)
    log.info("bench: meta steps with tasks batched and one by one")
    results["task_batching"] = task_batching_costs(target, model, min(T, 512), min(ctx, 256), k, anchors, (1, 4, 16),
                                                   reps=reps)
    log.info("bench: TTT vs prefill")
    lengths = [n for n in lengths if n <= tcfg["max_position_embeddings"]]
    results["ttt_prefill"] = ttt_prefill_costs(target, model, lengths, 5, anchors, reps)
    log.info("bench: drafting cost per block, both drafter kinds")
    results["draft_cost"] = draft_costs(target, layers, S, ctx, reps=max(5, reps * 3))
    log.info("bench: scaling")
    results["scaling"] = {
        "by_context": [{"context_len": c, **{a: v["step_ratio"] for a, v in step_costs(
            target, model, batch, c, k, anchors, ("maml",), reps).items() if isinstance(v, dict)}} for c in ctxs],
        "by_k": [{"k": kk, **{a: v["step_ratio"] for a, v in step_costs(
            target, model, batch, ctx, kk, anchors, ("maml", "fomaml"), reps).items() if isinstance(v, dict)}}
            for kk in ks],
    }
    del target, model
    if not skip_tau and not full:
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
    for algo in ("maml", "fomaml", "reptile"):
        v = res["meta_step"][algo]
        lines.append(f"| {algo} | {fmt(v['step_ratio'])} | {fmt(v['mem_ratio'])} |")
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
    return run(r, cfg.full, out, cfg.skip_tau, reuse_eval=not cfg.fresh_eval)


if __name__ == "__main__":  # `python -m metattt.bench [--full] ...` is `python -m metattt bench --bench.full=true ...`
    import sys

    from metattt.cli import main

    flags = {"--full": "--bench.full=true", "--skip-tau": "--bench.skip_tau=true",
             "--fresh-eval": "--bench.fresh_eval=true", "--qwen3-4b-ttt": "--bench.qwen3_4b_ttt=true",
             "--qwen3-4b-meta": "--bench.qwen3_4b_meta=true"}
    args = [flags.get(a, a) for a in sys.argv[1:]]
    main(["bench", *args] if "--config" in args else ["bench", "--config", "recipes/tiny.yaml", *args])
