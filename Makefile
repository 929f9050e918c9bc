# metattt — `make setup run` then `make test`. RECIPE selects recipes/$(RECIPE).yaml.
RECIPE ?= tiny
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG := recipes/$(RECIPE).yaml
ARGS ?=

.PHONY: setup run test test-fast lint target prepare distill meta-train eval eval-full online online-cheap sweep guided-eval bench world-results clean-tiny help

help:
	@echo "make setup            virtualenv + CPU torch 2.13.0 + metattt (editable, with dev tools)"
	@echo "make run              the whole pipeline for RECIPE (default: tiny, on the CPU)"
	@echo "make target           rebuild the embedded target in data/tiny_target (corpus, tokenizer, LM; hours on 2 cores)"
	@echo "make prepare          data -> target-regenerated, tokenized Arrow -> checkpoints/RECIPE/data/"
	@echo "make distill          distill the drafter -> checkpoints/RECIPE/drafter/"
	@echo "make meta-train       meta-learn the LoRA init -> checkpoints/RECIPE/meta_lora/ (distills first if needed)"
	@echo "make eval             prefill TTT + speculative decoding -> checkpoints/RECIPE/eval/report.md"
	@echo "make eval-full        eval at prompt lengths 256 / 1024 and temperatures 0 / 1 -> checkpoints/RECIPE/eval_full/"
	@echo "make online           init meta-trained for online TTT + eval of online updates at 512 tokens -> checkpoints/RECIPE_online/"
	@echo "make online-cheap     after make online: its eval, updates every 16 steps, older context from the cache"
	@echo "make sweep            TTT sweep (steps, lr, rank, placement) -> checkpoints/RECIPE/sweep/sweep.md"
	@echo "make guided-eval      draft-guided decoding on context-learning tasks -> checkpoints/RECIPE/guided/report.md"
	@echo "make bench            cost ratios + τ table -> bench/results.json and README Results"
	@echo "make test             the test suite (CPU): unit and end-to-end tests"
	@echo "make test-fast        the unit tests only (no stage run end to end)"
	@echo "make lint             ruff"
	@echo "RECIPE=qwen3_4b ARGS='--trainer.devices=8' make distill   (any recipe, any override)"

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

setup: $(PY)
	# CPU wheel (on GPU machines install the CUDA torch you use first, then `pip install -e .`)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"

run: prepare distill meta-train eval

# PASSIVE: OpenMP workers sleep instead of spinning when the cores are shared (hours of training)
target:
	OMP_WAIT_POLICY=PASSIVE $(PY) -m metattt build-target --config $(CONFIG) $(ARGS)

prepare:
	$(PY) -m metattt prepare --config $(CONFIG) $(ARGS)

distill:
	$(PY) -m metattt distill --config $(CONFIG) $(ARGS)

meta-train:
	$(PY) -m metattt meta-train --config $(CONFIG) $(ARGS)

eval:
	$(PY) -m metattt eval --config $(CONFIG) $(ARGS)

# Four more evaluations beside the default one, each in its own folder.
eval-full:
	for len in 256 1024; do for t in 0.0 1.0; do \
	  $(PY) -m metattt eval --config $(CONFIG) --eval.prompt_len=$$len --eval.temperature=$$t \
	    --eval.output_dir=checkpoints/$(RECIPE)/eval_full/len$$len-t$$t $(ARGS) || exit 1; done; done

# Online TTT while decoding (after make run's distill): an init meta-trained for online updates from
# the same drafter and data, then static / prefill TTT / online TTT on 512-token generations.
ONLINE_RUN = --run.name=$(RECIPE)_online --meta.drafter_path=checkpoints/$(RECIPE)/drafter \
  --data.train_files=checkpoints/$(RECIPE)/data/train --data.feature_cache=checkpoints/$(RECIPE)/features
ONLINE_META ?= --meta.ttt.online.chunk=8 --meta.ttt.online.max_chunks=4
ONLINE_EVAL ?= --eval.drafter_path=checkpoints/$(RECIPE)/drafter --eval.max_new_tokens=512 \
  --eval.conditions=[static,ttt_meta,online_zero,online_meta] \
  --eval.splits='{"drafter_shifted": "checkpoints/$(RECIPE)/corpus/c.heldout.jsonl", "in_domain": ["checkpoints/$(RECIPE)/corpus/python.heldout.jsonl", "checkpoints/$(RECIPE)/corpus/prose.heldout.jsonl"]}'
online:
	$(PY) -m metattt meta-train --config $(CONFIG) $(ONLINE_RUN) $(ONLINE_META) $(ARGS)
	$(PY) -m metattt eval --config $(CONFIG) $(ONLINE_RUN) $(ONLINE_EVAL) $(ARGS)

# After make online: the same evaluation with updates every 16 verification steps that read the
# context before their window from the decoding cache (eval.online.detach_context).
ONLINE_CHEAP ?= --eval.online.every=16 --eval.online.detach_context=true \
  --eval.output_dir=checkpoints/$(RECIPE)_online/eval_cheap
online-cheap:
	$(PY) -m metattt eval --config $(CONFIG) $(ONLINE_RUN) $(ONLINE_EVAL) $(ONLINE_CHEAP) $(ARGS)

sweep:
	$(PY) -m metattt sweep --config $(CONFIG) $(ARGS)

guided-eval:
	$(PY) -m metattt guided-eval --config $(CONFIG) $(ARGS)

bench:
	$(PY) -m metattt bench --config $(CONFIG) $(ARGS)
	@if [ -f checkpoints/$(RECIPE)/eval/tau_by_condition.png ]; then cp checkpoints/$(RECIPE)/eval/tau_by_condition.png bench/; fi
	$(PY) scripts/readme_results.py

test:
	$(PY) -m pytest -q -ra $(ARGS)

# the unit tier: functions of tensors and small objects, seconds each (no stage run end to end)
test-fast:
	$(PY) -m pytest -q -ra -m "not e2e" $(ARGS)

lint:
	$(PY) -m ruff check metattt tests

# the README's "Results on the embedded world" from the tiny recipe's reports (make run, the AR run, sweep, guided-eval)
world-results:
	$(PY) scripts/world_results.py --collect

clean-tiny:
	rm -rf checkpoints/tiny
