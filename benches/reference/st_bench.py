#!/usr/bin/env python3
"""The reference side of embed-bench: sentence-transformers (PyTorch) on the CPU, the same
model folder, inputs and batch sizes, in the same run.

    st_bench.py MODEL_DIR INPUTS_JSON BATCHES LATENCY_RUNS

Prints one JSON object: {"torch": version, "threads": n,
"throughput": {batch: embeddings per second}, "latency_ms": [batch-1 latencies]}.
"""
import json
import sys
import time

import torch
from sentence_transformers import SentenceTransformer


def main() -> None:
    model_dir, inputs_path, batches, latency_runs = sys.argv[1:5]
    texts = json.load(open(inputs_path))
    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:8], batch_size=8)  # warm-up
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "throughput": {}}
    for b in [int(x) for x in batches.split(",")]:
        n = len(texts) if b > 1 else min(len(texts), 64)
        # As embed-bench does: one call per batch of `b` inputs, as requests arrive.
        start = time.perf_counter()
        for i in range(0, n, b):
            model.encode(texts[i : i + b], batch_size=b)
        out["throughput"][str(b)] = n / (time.perf_counter() - start)
    latencies = []
    for i in range(int(latency_runs)):
        start = time.perf_counter()
        model.encode([texts[i % len(texts)]], batch_size=1)
        latencies.append((time.perf_counter() - start) * 1e3)
    out["latency_ms"] = latencies
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
