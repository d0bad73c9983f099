"""Precompress a small corpus into an anchor store, then answer its questions through a LangChain
chain from the compressed caches, on the packaged default model and compressor. `make demo`.

    python examples/quickstart.py [--docs examples/demo_corpus] [--questions FILE] [--store DIR]

The store (default: runs/examples/<DOCS name>-<DOCS path hash>-<compressor hash>.store) is kept, so a
rerun compresses nothing again.
Each question is also answered from the full text of the same retrieved chunks, for comparison.
How it works: examples/langchain_rag.py (this runs its main). The same with LlamaIndex:
examples/llama_index_rag.py; without a framework: examples/precompress_and_serve.py.
"""

from _common import run
from langchain_rag import main

if __name__ == "__main__":
    run(lambda: main(doc=__doc__))
