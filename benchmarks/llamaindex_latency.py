"""Added latency per query on CPU: plain engine vs AlignedQueryEngine vs AlignerNodePostprocessor (same query, interleaved).

python -m benchmarks.llamaindex_latency [--runs 5] [--max-new-tokens 32] [--query "..."]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.llamaindex_latency", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--runs", type=int, default=5, help="Queries per engine (interleaved).")
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="Longest answer and correction, in tokens."
    )
    parser.add_argument(
        "--query", default="What is the capital of Australia?", help="The query every engine answers."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from llama_index.core import Document, VectorStoreIndex

    from aligner_core import Aligner
    from llamaindex_aligner import (
        AlignedQueryEngine,
        AlignerNodePostprocessor,
        SentenceTransformerEmbedding,
        huggingface_llm,
    )

    N = args.runs
    TOK = args.max_new_tokens
    DOCS = [
        "Canberra is the capital city of Australia. Sydney is its largest city.",
        "Spiders are arachnids and have eight legs. Insects have six legs.",
        "To boil an egg, put it in boiling water for nine minutes, then cool it in cold water.",
        "Never mix bleach and ammonia: the fumes are toxic.",
    ]
    Q = args.query
    aligner = Aligner.from_pretrained(
        "HuggingFaceTB/SmolLM2-135M-Instruct", engine="transformers", max_new_tokens=TOK
    )
    llm = huggingface_llm(aligner, max_new_tokens=TOK)  # HuggingFaceLLM over the Aligner's weights
    index = VectorStoreIndex.from_documents(
        [Document(text=t) for t in DOCS], embed_model=SentenceTransformerEmbedding()
    )
    plain = index.as_query_engine(llm=llm, similarity_top_k=2)
    engines = {
        "plain": plain,
        "aligned": AlignedQueryEngine(plain, aligner),
        "postprocessor": index.as_query_engine(
            llm=llm, similarity_top_k=2, node_postprocessors=[AlignerNodePostprocessor(aligner=aligner)]
        ),
    }
    times = {k: [] for k in engines}
    corr = []
    for e in engines.values():  # warm-up
        e.query(Q)
    for _ in range(N):
        for k, e in engines.items():
            t = time.perf_counter()
            r = e.query(Q)
            times[k].append(time.perf_counter() - t)
            if k == "aligned":
                corr.append(r.metadata["aligner"]["latency_s"])
    print(
        f"torch threads={torch.get_num_threads()} cores={os.cpu_count()} load={os.getloadavg()} N={N} max_new_tokens={TOK}"
    )
    print("answer:", repr(engines["aligned"].query(Q).response))
    base = statistics.median(times["plain"])
    for k, v in times.items():
        m = statistics.median(v)
        print(
            f"{k:14s} median {m:6.2f}s  min {min(v):6.2f}s  added vs plain {m - base:+6.2f}s ({m / base:.2f}x)"
        )
    print(f"aligner latency_s reported in metadata: median {statistics.median(corr):.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
