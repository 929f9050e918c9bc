"""The embedded world: a multi-domain corpus from files every install has, its tokenizer, and the
target trained on it (shipped in ``data/tiny_target``; ``make target`` rebuilds it).

    corpus.py     stdlib + site-packages -> python / c / prose (/ data) jsonl, train | heldout, new_to_both
    tokenizer.py  byte-level BPE on every domain's train split
    train.py      the target's training loop and its report
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from metattt.config import CorpusConfig, TinyTargetConfig
from metattt.tiny.corpus import REPORT_NAME as CORPUS_REPORT
from metattt.tiny.corpus import build_corpus, corpus_files, count_tokens
from metattt.tiny.tokenizer import train_tokenizer
from metattt.tiny.train import REPORT_NAME, file_sha256, train_target

log = logging.getLogger("metattt.tiny")

__all__ = ["CorpusConfig", "TinyTargetConfig", "build_target", "ensure_corpus", "verify_shipped_target",
           "REPORT_NAME"]


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


def build_target(out_dir: Path, corpus: CorpusConfig, config: TinyTargetConfig | None = None) -> Path:
    """Corpus (if missing) → tokenizer → target, published at ``out_dir``. Returns ``out_dir``.

    The tokenizer is trained into ``out_dir`` + ``.work/tokenizer`` and shipped inside the target's
    folder, as a downloaded checkpoint carries its tokenizer.
    """
    cfg = config or TinyTargetConfig()
    out_dir = Path(out_dir)
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
