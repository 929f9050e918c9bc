"""Short sweep behind the embedded target's defaults: width / depth / vocabulary at equal tokens.

    python scripts/tiny_target_sweep.py --steps 300 --out checkpoints/tiny/sweep

Each point trains for the same number of steps (same tokens) with the recipe's other defaults,
then scores per-domain held-out loss in bits per byte (comparable across vocabularies) and the
measured training throughput. Writes `sweep.json` and `sweep.md` into `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from metattt.config import TinyTargetConfig
from metattt.tiny.corpus import build_corpus, corpus_files
from metattt.tiny.tokenizer import train_tokenizer
from metattt.tiny.train import train_target

POINTS = [
    dict(name="w128-L6-v4k", hidden_size=128, num_layers=6, num_heads=2, intermediate_size=256, vocab_size=4096),
    dict(name="w192-L6-v4k", hidden_size=192, num_layers=6, num_heads=3, intermediate_size=384, vocab_size=4096),
    dict(name="w192-L6-v8k", hidden_size=192, num_layers=6, num_heads=3, intermediate_size=384, vocab_size=8192),
    dict(name="w256-L6-v4k", hidden_size=256, num_layers=6, num_heads=4, intermediate_size=512, vocab_size=4096),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("checkpoints/tiny/sweep"))
    p.add_argument("--corpus", type=Path, default=Path("checkpoints/tiny/corpus"))
    p.add_argument("--only", nargs="*", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not (args.corpus / "corpus_report.json").is_file():
        build_corpus(args.corpus)
    rows = json.loads((args.out / "sweep.json").read_text()) if (args.out / "sweep.json").is_file() else []
    done = {r["name"] for r in rows}
    for point in POINTS:
        name = point["name"]
        if name in done or (args.only and name not in args.only):
            continue
        fields = {k: v for k, v in point.items() if k != "name"}
        tok_dir = args.out / f"tokenizer-{fields['vocab_size']}"
        if not (tok_dir / "tokenizer.json").is_file():
            train_tokenizer(corpus_files(args.corpus, "train"), tok_dir, vocab_size=fields["vocab_size"])
        cfg = TinyTargetConfig(**fields, max_steps=args.steps, warmup_steps=max(1, args.steps // 5),
                               eval_max_tokens=32768, gen_prompts=4)
        rep = train_target(args.corpus, tok_dir, args.out / name, cfg, work_dir=args.out / f"{name}.work")
        rows.append({"name": name, **fields, "params": rep["params"], "steps": rep["steps"],
                     "tokens_seen": rep["tokens_seen"], "tokens_per_s": rep["tokens_seen"] / rep["train_time_s"],
                     "heldout_bits_per_byte": rep["heldout_bits_per_byte"], "heldout_loss": rep["heldout_loss"],
                     "greedy_distinct_4": {d: c.get("greedy_distinct_4") for d, c in rep["continuations"].items()}})
        (args.out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    domains = sorted({d for r in rows for d in r["heldout_bits_per_byte"]})
    lines = ["| point | params | tok/s | " + " | ".join(f"{d} bpb" for d in domains) + " |",
             "|---|---|---|" + "---|" * len(domains)]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['tokens_per_s']:.0f} | "
                     + " | ".join(f"{r['heldout_bits_per_byte'].get(d, float('nan')):.3f}" for d in domains) + " |")
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(dataclasses.asdict(TinyTargetConfig()), indent=1)[:0])


if __name__ == "__main__":
    main()
