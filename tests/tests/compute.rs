//! The embedding model on the CPU backend against golden embeddings of the reference
//! (sentence-transformers on PyTorch, `scripts/golden_embeddings.py`), for sentences in
//! several languages, near-empty inputs and inputs past the model's 256 tokens.

use std::path::{Path, PathBuf};

use cloudlet::compute::{Embedder, MAX_TOKENS, cosine};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Case {
    text: String,
    tokens_untruncated: usize,
    embedding: Vec<f32>,
}

fn golden() -> Vec<Case> {
    let path = root().join("tests/fixtures/minilm-golden.json");
    let text = std::fs::read_to_string(&path).expect("golden fixtures");
    let v: serde_json::Value = serde_json::from_str(&text).expect("fixtures are JSON");
    v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_string(),
            tokens_untruncated: c["tokens_untruncated"].as_u64().expect("tokens") as usize,
            embedding: c["embedding"]
                .as_array()
                .expect("embedding")
                .iter()
                .map(|x| x.as_f64().expect("number") as f32)
                .collect(),
        })
        .collect()
}

fn embedder() -> Embedder {
    Embedder::cpu(&root().join(cloudlet::compute::DEFAULT_MODEL_DIR))
        .expect("model (cargo xtask setup)")
}

#[test]
fn cpu_embeddings_match_the_reference_in_one_batch() {
    let cases = golden();
    assert!(cases.len() >= 20);
    let e = embedder();
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let out = e.embed(&texts).expect("embed");
    assert_eq!(out.vectors.len(), cases.len());
    let mut least = f64::MAX;
    for (i, (c, v)) in cases.iter().zip(&out.vectors).enumerate() {
        assert_eq!(v.len(), 384);
        let sim = cosine(v, &c.embedding);
        assert!(sim >= 0.9999, "case {i} {:?}: cosine {sim}", c.text);
        least = least.min(sim);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "case {i}: norm {norm}");
    }
    eprintln!("least cosine similarity to the reference: {least:.8}");
    // Inputs past the model's window are cut, and say so.
    let long: Vec<usize> = cases
        .iter()
        .enumerate()
        .filter(|(_, c)| c.tokens_untruncated > MAX_TOKENS)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        long.len(),
        2,
        "the fixtures hold two inputs past 256 tokens"
    );
    assert_eq!(out.truncated, long);
}

#[test]
fn padding_does_not_change_an_embedding() {
    let cases = golden();
    let e = embedder();
    // Alone (no padding) and beside the longest input (mostly padding).
    let longest = cases
        .iter()
        .max_by_key(|c| c.tokens_untruncated)
        .expect("cases");
    for c in cases.iter().filter(|c| c.tokens_untruncated < 20) {
        let alone = e.embed(&[c.text.as_str()]).expect("embed");
        let padded = e
            .embed(&[c.text.as_str(), longest.text.as_str()])
            .expect("embed");
        let sim = cosine(&alone.vectors[0], &padded.vectors[0]);
        assert!(
            sim >= 0.99999,
            "{:?}: cosine {sim} alone against padded",
            c.text
        );
        assert!(cosine(&alone.vectors[0], &c.embedding) >= 0.9999);
    }
}
