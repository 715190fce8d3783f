#!/usr/bin/env python3
"""Golden embeddings of all-MiniLM-L6-v2 for the compute tests, from the reference
implementation (sentence-transformers on PyTorch), for a fixed set of sentences.

    python3 -m venv /tmp/st && /tmp/st/bin/pip install sentence-transformers
    /tmp/st/bin/python scripts/golden_embeddings.py [MODEL_DIR] > tests/fixtures/minilm-golden.json

MODEL_DIR defaults to data/models/all-MiniLM-L6-v2 (what `cargo xtask setup` unpacks).
"""
import json
import sys

from sentence_transformers import SentenceTransformer

SENTENCES = [
    "The edge node filters packets before they reach the service.",
    "A cloudlet is a small cloud next to its users.",
    "Post-quantum key exchange protects today's traffic from tomorrow's computers.",
    "The quick brown fox jumps over the lazy dog.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "素早い茶色の狐がのろまな犬を飛び越える。",
    "مرحبا بالعالم",
    "a",
    "",
    " ",
    "?!",
    "URL: https://example.com/path?q=1&lang=en — e-mail: ops@example.org",
    "Numbers 3.14159, 2,718 and 1e-9 in one line.",
    "emoji 🚀🔥 and accents: naïve café résumé",
    # Longer than the model's 256 tokens: truncated as the reference truncates.
    " ".join(["Edge computing keeps latency low by serving requests close to the users."] * 30),
    " ".join(f"token{i}" for i in range(400)),
]


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else "data/models/all-MiniLM-L6-v2"
    model = SentenceTransformer(model_dir, device="cpu")
    vectors = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    tokens = [len(model.tokenizer(s, truncation=False)["input_ids"]) for s in SENTENCES]
    json.dump(
        {
            "model": "all-MiniLM-L6-v2",
            "reference": "sentence-transformers",
            "max_seq_length": model.max_seq_length,
            "cases": [
                {"text": s, "tokens_untruncated": t, "embedding": [float(x) for x in v]}
                for s, t, v in zip(SENTENCES, tokens, vectors)
            ],
        },
        sys.stdout,
        ensure_ascii=False,
        indent=None,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
