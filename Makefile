# Every target installs into .venv first when needed (idempotent: a stamp file records the install).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines pin the CPU torch wheel; on a GPU machine run `make install CONSTRAINTS=/dev/null`.
CONSTRAINTS ?= constraints.txt
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),)
# Extra arguments for `make fit` (e.g. FIT_ARGS="--trainer.max_steps 10"); tests/test_readme.py passes tiny ones.
FIT_ARGS ?=

.PHONY: install fit pipeline test test-slow test-eval format clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m pip install --quiet uv
	$(PYTHON) -m uv venv --allow-existing $(VENV) --python $(PYTHON)
	$(PYTHON) -m uv pip install --python $(BIN)/python --compile-bytecode $(FIND_LINKS) \
		-c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

fit: $(STAMP)
	$(BIN)/python -m lit_internvl fit --config recipes/stage1.yaml $(FIT_ARGS)

# The embedded default's stages, each starting from the last one's checkpoint, a table after each:
#   stage 1 → stage 2 → SFT → MPO → online RL;  InternVL3's NMP → SFT;
#   the step-by-step policy → its critic's data; SFT → the critic's start → the critic → Best-of-N with both.
pipeline: $(STAMP)
	$(BIN)/python -m lit_internvl fit --config recipes/stage1.yaml
	$(BIN)/python -m lit_internvl report runs/stage1
	$(BIN)/python -m lit_internvl fit --config recipes/stage2.yaml
	$(BIN)/python -m lit_internvl report runs/stage1 runs/stage2
	$(BIN)/python -m lit_internvl fit --config recipes/sft.yaml
	$(BIN)/python -m lit_internvl report runs/stage1 runs/stage2 runs/sft
	$(BIN)/python -m lit_internvl fit --config recipes/mpo.yaml
	$(BIN)/python -m lit_internvl report runs/stage1 runs/stage2 runs/sft runs/mpo
	$(BIN)/python -m lit_internvl fit --config recipes/rl.yaml
	$(BIN)/python -m lit_internvl report runs/stage1 runs/stage2 runs/sft runs/mpo runs/rl
	$(BIN)/python -m lit_internvl fit --config recipes/nmp.yaml
	$(BIN)/python -m lit_internvl fit --config recipes/sft.yaml --model.init_args.init_from runs/nmp/checkpoints/last.ckpt \
		--trainer.default_root_dir runs/sft_from_nmp
	$(BIN)/python -m lit_internvl report runs/nmp runs/sft_from_nmp
	$(BIN)/python -m lit_internvl fit --config recipes/sft_steps.yaml
	$(BIN)/python -m lit_internvl critic_data --policy runs/sft_steps/checkpoints/last.ckpt
	$(BIN)/python -m lit_internvl fit --config recipes/critic_base.yaml
	$(BIN)/python -m lit_internvl fit --config recipes/critic.yaml
	$(BIN)/python -m lit_internvl report runs/sft_steps runs/critic_base runs/critic
	$(BIN)/python benchmarks/best_of_n.py --policy runs/sft_steps/checkpoints/last.ckpt --critic runs/critic/checkpoints/last.ckpt

# Lint and format findings fail the run before any test does (`make format` applies the fixes).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The lmms-eval bridge through the real `lmms-eval` command, in an environment of its own: the eval extra pins
# filelock below 4 (lmms-eval 0.7 imports filelock._api) and brings packages the main environment does not need.
test-eval:
	$(PYTHON) -m pip install --quiet uv
	$(PYTHON) -m uv venv --allow-existing $(VENV)-eval --python $(PYTHON)
	$(PYTHON) -m uv pip install --python $(VENV)-eval/bin/python $(FIND_LINKS) -c $(CONSTRAINTS) -e '.[dev,eval]'
	$(VENV)-eval/bin/python -m pytest -q -m slow tests/test_lmms_bridge.py

clean:
	rm -rf $(VENV) $(VENV)-eval lightning_logs runs
