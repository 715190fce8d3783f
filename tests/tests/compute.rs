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

mod dispatcher {
    use std::sync::{
        Arc, Mutex,
        atomic::Ordering,
        mpsc::{Receiver, Sender, channel},
    };
    use std::time::Duration;

    use cloudlet::compute::{
        Backend, BertWeights, ComputeError, TokenBatch, Tokenizer,
        cpu::CpuBackend,
        dispatch::{DispatchConfig, DispatchError, Dispatcher},
    };

    use super::root;

    fn model() -> std::path::PathBuf {
        root().join(cloudlet::compute::DEFAULT_MODEL_DIR)
    }

    fn cpu() -> Box<dyn Backend> {
        Box::new(CpuBackend::new(BertWeights::load(&model()).expect("model")))
    }

    /// The real CPU backend, recording the sequences of each forward pass (as token
    /// counts) and holding its first pass until the test lets it go.
    struct Gated {
        inner: Box<dyn Backend>,
        passes: Passes,
        gate: Mutex<Option<Receiver<()>>>,
        started: Mutex<Sender<()>>,
    }

    impl Backend for Gated {
        fn name(&self) -> &'static str {
            "cpu"
        }
        fn embed(&self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>, ComputeError> {
            if let Some(gate) = self.gate.lock().unwrap().take() {
                let _ = self.started.lock().unwrap().send(());
                let _ = gate.recv();
            }
            let lens = (0..batch.batch)
                .map(|b| {
                    batch.mask[b * batch.seq..(b + 1) * batch.seq]
                        .iter()
                        .sum::<u32>() as usize
                })
                .collect();
            self.passes.lock().unwrap().push(lens);
            self.inner.embed(batch)
        }
    }

    /// A device that fails every pass, as a GPU that fell over would.
    struct Failing;

    impl Backend for Failing {
        fn name(&self) -> &'static str {
            "cuda"
        }
        fn embed(&self, _: &TokenBatch) -> Result<Vec<Vec<f32>>, ComputeError> {
            Err(ComputeError::Backend {
                backend: "cuda",
                why: "device lost".into(),
            })
        }
    }

    /// The sequences (token counts) of each forward pass.
    type Passes = Arc<Mutex<Vec<Vec<usize>>>>;

    /// A dispatcher whose first pass waits for the returned sender.
    fn gated(config: DispatchConfig) -> (Dispatcher, Sender<()>, Receiver<()>, Passes) {
        let (open, gate) = channel();
        let (started_tx, started) = channel();
        let passes = Arc::new(Mutex::new(Vec::new()));
        let backend = Gated {
            inner: cpu(),
            passes: passes.clone(),
            gate: Mutex::new(Some(gate)),
            started: Mutex::new(started_tx),
        };
        let d = Dispatcher::start(
            config,
            Tokenizer::load(&model()).expect("tokenizer"),
            Box::new(backend),
            None,
        );
        (d, open, started, passes)
    }

    /// Inputs of distinct token counts, so a pass's lengths say whose inputs it held:
    /// `[CLS]`, `n` words, `[SEP]`.
    fn words(n: usize) -> String {
        vec!["edge"; n].join(" ")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn clients_take_turns_and_gone_callers_are_skipped() {
        let config = DispatchConfig {
            max_batch: 2,
            max_wait: Duration::from_millis(1),
            queue: 64,
        };
        let (d, open, started, passes) = gated(config);
        // Hold the worker in its first pass.
        let first = d.submit("c", vec![words(1)]).unwrap();
        started
            .recv_timeout(Duration::from_secs(30))
            .expect("first pass");
        // Client a queues four jobs, then b one, then a caller that leaves.
        let a: Vec<_> = (0..4)
            .map(|i| d.submit("a", vec![words(10 + i)]).unwrap())
            .collect();
        let b = d.submit("b", vec![words(30)]).unwrap();
        let gone = d.submit("z", vec![words(40)]).unwrap();
        drop(gone);
        open.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap().vectors.len(), 1);
        let b = b.await.unwrap().unwrap();
        assert_eq!(b.vectors.len(), 1);
        assert_eq!(b.tokens, 32);
        for r in a {
            assert_eq!(r.await.unwrap().unwrap().vectors.len(), 1);
        }
        let passes = passes.lock().unwrap().clone();
        // The pass after the first holds a's first job and b's, not a's second: turns.
        let mut second = passes[1].clone();
        second.sort_unstable();
        assert_eq!(second, vec![12, 32], "{passes:?}");
        // The caller that left was never computed.
        assert!(!passes.iter().flatten().any(|n| *n == 42), "{passes:?}");
        let stats = d.stats();
        assert_eq!(stats.cancelled.load(Ordering::Relaxed), 1);
        assert_eq!(stats.jobs.load(Ordering::Relaxed), 6);
        assert_eq!(stats.inputs.load(Ordering::Relaxed), 6);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_refuses_at_once() {
        let config = DispatchConfig {
            max_batch: 1,
            max_wait: Duration::from_millis(1),
            queue: 3,
        };
        let (d, open, started, _) = gated(config);
        let first = d.submit("a", vec![words(1)]).unwrap();
        started
            .recv_timeout(Duration::from_secs(30))
            .expect("first pass");
        let queued = d.submit("a", vec![words(2), words(3)]).unwrap();
        match d.submit("b", vec![words(4), words(5)]) {
            Err(DispatchError::Busy {
                queued: 2,
                capacity: 3,
            }) => {}
            other => panic!("expected Busy, got {:?}", other.map(|_| ())),
        }
        // One more input still fits.
        let fits = d.submit("b", vec![words(4)]).unwrap();
        open.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(queued.await.unwrap().unwrap().vectors.len(), 2);
        fits.await.unwrap().unwrap();
        assert_eq!(d.stats().rejected.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failing_device_falls_back_to_the_cpu() {
        let tokenizer = Tokenizer::load(&model()).expect("tokenizer");
        let d = Dispatcher::start(
            DispatchConfig::default(),
            tokenizer,
            Box::new(Failing),
            Some(cpu()),
        );
        let texts = vec!["A cloudlet is a small cloud next to its users.".to_string()];
        let e = d
            .submit("a", texts.clone())
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        let reference = cloudlet::compute::Embedder::cpu(&model()).unwrap();
        let want = reference.embed(&[texts[0].as_str()]).unwrap();
        assert!(cloudlet::compute::cosine(&e.vectors[0], &want.vectors[0]) > 0.99999);
        assert_eq!(d.stats().fallbacks.load(Ordering::Relaxed), 1);
        // Without a fallback, the caller gets the error and the dispatcher keeps serving.
        let tokenizer = Tokenizer::load(&model()).expect("tokenizer");
        let d = Dispatcher::start(
            DispatchConfig::default(),
            tokenizer,
            Box::new(Failing),
            None,
        );
        for _ in 0..2 {
            match d.submit("a", texts.clone()).unwrap().await.unwrap() {
                Err(DispatchError::Compute(e)) => {
                    assert!(e.to_string().contains("device lost"), "{e}")
                }
                other => panic!("expected the device's error, got {:?}", other.map(|_| ())),
            }
        }
        assert_eq!(d.stats().failed.load(Ordering::Relaxed), 2);
    }
}

/// The backend `auto` picks: the GPU where one works (then its embeddings must match the
/// reference too, with the CPU behind it), else the CPU, without a panic; `cuda` without a
/// GPU is a clear error.
#[test]
fn auto_takes_the_gpu_when_one_works_else_the_cpu() {
    use cloudlet::compute::{BackendChoice, BertWeights, backends, cuda};
    let model = root().join(cloudlet::compute::DEFAULT_MODEL_DIR);
    let weights = || BertWeights::load(&model).expect("model");
    let (primary, fallback) = backends(BackendChoice::Auto, weights()).expect("auto");
    if cuda::available() {
        assert_eq!(primary.name(), "cuda");
        assert_eq!(fallback.map(|f| f.name()), Some("cpu"));
        let e = Embedder {
            tokenizer: cloudlet::compute::Tokenizer::load(&model).expect("tokenizer"),
            backend: primary,
        };
        let cases = golden();
        let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
        let out = e.embed(&texts).expect("embed on the GPU");
        for (c, v) in cases.iter().zip(&out.vectors) {
            let sim = cosine(v, &c.embedding);
            assert!(sim >= 0.9999, "{:?}: cosine {sim} on the GPU", c.text);
        }
    } else {
        assert_eq!(primary.name(), "cpu");
        assert!(fallback.is_none());
        match backends(BackendChoice::Cuda, weights()) {
            Err(e) => assert!(e.to_string().contains("no CUDA driver"), "{e}"),
            Ok(_) => panic!("`cuda` without a GPU must be refused"),
        }
    }
}
