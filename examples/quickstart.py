"""Answer questions about a folder of documents from their compressed caches.

    python examples/quickstart.py [--docs examples/demo_corpus] [--questions FILE]

Every document is compressed once (r times fewer K/V entries than its tokens); each question is
then answered from all the caches, and once more from the full text for comparison.
"""

import argparse
import time
from pathlib import Path

from sac_rag import SAC, GenerationConfig

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", default=str(HERE / "demo_corpus"), help="folder of .txt/.md files")
    parser.add_argument("--questions", help="one question per line (default: DOCS/questions.txt)")
    parser.add_argument("--compressor", default="smollm2-135m-sac-5x")
    args = parser.parse_args()

    docs = sorted(p for p in Path(args.docs).rglob("*") if p.suffix in (".txt", ".md") and p.name != "questions.txt")
    texts = [p.read_text(encoding="utf-8") for p in docs]
    questions_file = Path(args.questions or Path(args.docs) / "questions.txt")
    questions = [q.strip() for q in questions_file.read_text().splitlines() if q.strip()]

    sac = SAC.from_pretrained(args.compressor, generation=GenerationConfig(max_new_tokens=24, stop=("\n",)))
    t0 = time.perf_counter()
    caches = [sac.compress(text) for text in texts]
    seconds = time.perf_counter() - t0
    tokens = sum(c.n_tokens for chunks in caches for c in chunks)
    anchors = sum(c.n_anchors for chunks in caches for c in chunks)
    kv_bytes = sum(c.nbytes for chunks in caches for c in chunks)
    print(f"compressed {len(docs)} documents: {tokens} tokens -> {anchors} anchor K/V entries "
          f"({tokens / anchors:.1f}x fewer, {kv_bytes / 1e6:.1f} MB) in {seconds:.1f} s\n")

    for question in questions:
        t = time.perf_counter()
        first = sac.generator.generate(sac.prompt(question, caches), GenerationConfig(max_new_tokens=1))
        ttft_sac = time.perf_counter() - t
        t = time.perf_counter()
        sac.generator.generate(sac.prompt(question, texts, full_text=True), GenerationConfig(max_new_tokens=1))
        ttft_text = time.perf_counter() - t
        answer = sac.answer(question, caches)
        print(f"Q: {question}\nA: {answer.text.strip()}\n   read {answer.text_tokens} text tokens + "
              f"{first.cached_tokens} cached entries (for {first.context_tokens} context tokens); "
              f"time to first token {ttft_sac * 1000:.0f} ms vs {ttft_text * 1000:.0f} ms from full text\n")


if __name__ == "__main__":
    main()
