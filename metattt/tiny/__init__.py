"""The embedded world: a multi-domain corpus from files every install has, its tokenizer, and the
target trained on it (shipped in ``data/tiny_target``; ``make target`` rebuilds it).

    corpus.py     stdlib + site-packages -> python / c / prose (/ data) jsonl, train | heldout, new_to_both
    tokenizer.py  byte-level BPE on every domain's train split
    train.py      the target's training loop and its report
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from metattt.config import CorpusConfig, TinyTargetConfig
from metattt.tiny.corpus import REPORT_NAME as CORPUS_REPORT
from metattt.tiny.corpus import build_corpus, corpus_files, count_tokens
from metattt.tiny.tokenizer import train_tokenizer
from metattt.tiny.train import REPORT_NAME, STATE_NAME, file_sha256, train_target

log = logging.getLogger("metattt.tiny")

__all__ = ["CorpusConfig", "TinyTargetConfig", "build_plan", "build_target", "ensure_corpus",
           "verify_shipped_target", "REPORT_NAME"]


def ensure_corpus(cfg: CorpusConfig, tokenizer_path: str | Path | None = None) -> Path | None:
    """``cfg.dir``, built first when ``cfg.build`` and it has no report yet; None when not used.
    With ``tokenizer_path`` (the target's folder) the report gains token counts."""
    corpus = Path(cfg.dir)
    if (corpus / CORPUS_REPORT).is_file():
        return corpus
    if not cfg.build:
        return None
    log.info("building the embedded corpus into %s (once; later stages reuse it)", corpus)
    build_corpus(corpus, seed=cfg.seed)
    if tokenizer_path is not None and (Path(tokenizer_path) / "tokenizer.json").is_file():
        from metattt.data.tokenizer import load_tokenizer

        count_tokens(corpus, load_tokenizer(tokenizer_path))
    return corpus


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{max(1, round(seconds / 60))} min"


def build_plan(out_dir: Path, corpus: CorpusConfig, config: TinyTargetConfig | None = None) -> str:
    """What `build_target` is about to do: what it builds, where, roughly how long, how to stop it.
    A mistyped folder would otherwise start a long build silently."""
    cfg = config or TinyTargetConfig()
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".work")
    steps = [f"building the embedded target into {out_dir} (work files in {work})"]
    if not (Path(corpus.dir) / CORPUS_REPORT).is_file():
        steps.append(f"the corpus from this machine's Python installation, into {corpus.dir}")
    if not (work / "tokenizer" / "tokenizer.json").is_file():
        steps.append(f"a {cfg.vocab_size}-token byte-level BPE tokenizer")
    tokens = cfg.max_steps * cfg.batch_size * cfg.seq_len
    state = work / STATE_NAME
    steps.append(f"a Qwen3-style LM ({cfg.num_layers} layers, width {cfg.hidden_size}) trained for {cfg.max_steps} "
                 f"steps of {cfg.batch_size} x {cfg.seq_len} tokens" + (f", resuming from {state}" if state.is_file()
                                                                        else ""))
    report = out_dir / REPORT_NAME
    earlier = json.loads(report.read_text()) if report.is_file() else {}
    if earlier.get("train_time_s") and earlier.get("tokens_seen"):
        # the previous build's pace on its machine: a rough figure, not a promise
        how_long = (f"roughly {_duration(earlier['train_time_s'] * tokens / earlier['tokens_seen'])} of training at "
                    f"the pace of the build in {report}")
    else:
        how_long = "no earlier build here to time it by: hours on a few CPU cores; the progress lines give an ETA"
    stop = (f"Ctrl-C stops it; running it again resumes from the training state in {work} (saved every "
            f"{cfg.checkpoint_every} steps); {out_dir} is replaced only when training ends")
    return "\n".join(["metattt build-target: " + steps[0], *(f"  - {s}" for s in steps[1:]),
                      f"  time: {how_long}", f"  stop: {stop}"])


def build_target(out_dir: Path, corpus: CorpusConfig, config: TinyTargetConfig | None = None) -> Path:
    """Corpus (if missing) → tokenizer → target, published at ``out_dir``. Returns ``out_dir``.

    The tokenizer is trained into ``out_dir`` + ``.work/tokenizer`` and shipped inside the target's
    folder, as a downloaded checkpoint carries its tokenizer.
    """
    cfg = config or TinyTargetConfig()
    out_dir = Path(out_dir)
    print(build_plan(out_dir, corpus, cfg), file=sys.stderr, flush=True)
    corpus_dir = ensure_corpus(CorpusConfig(dir=corpus.dir, seed=corpus.seed, build=True))
    work = out_dir.with_name(out_dir.name + ".work")
    tok_dir = work / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        from metattt.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = train_tokenizer(corpus_files(corpus_dir, "train"), tok_dir, vocab_size=cfg.vocab_size)
    count_tokens(corpus_dir, tokenizer)
    train_target(corpus_dir, tokenizer, out_dir, cfg, work_dir=work)
    return out_dir


class ShippedTargetError(FileNotFoundError):
    """The embedded target is missing or does not match its report."""


def verify_shipped_target(path: Path) -> None:
    """For a folder that carries a tiny-target report: its weights must hash to the recorded sha256.

    Raises:
        ShippedTargetError: weights missing, truncated or changed; the message says how to rebuild.
    """
    path = Path(path)
    report = path / REPORT_NAME
    if not report.is_file():
        return
    expected = json.loads(report.read_text()).get("weights_sha256")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ShippedTargetError(f"the embedded target at {path} has no model.safetensors: restore it "
                                 f"(`git checkout -- {path}`) or rebuild it with `make target`")
    if expected and file_sha256(weights) != expected:
        raise ShippedTargetError(f"the embedded target's weights {weights} do not match the sha256 in {report} "
                                 f"(truncated or changed): restore them (`git checkout -- {path}`) or rebuild "
                                 "with `make target`")
