//! AI workloads: sentence embeddings with all-MiniLM-L6-v2 (BERT, 6 layers, 384
//! dimensions, mean pooling, L2-normalised), computed by a [`Backend`].
//!
//! The model is read from a folder holding `model.safetensors`, `tokenizer.json` and
//! `config.json` (`cargo xtask setup` unpacks it into `data/models/all-MiniLM-L6-v2`);
//! nothing is fetched at run time. Inputs are tokenized as the reference
//! (sentence-transformers) does: lower-cased WordPiece with `[CLS]` and `[SEP]`, truncated to
//! [`MAX_TOKENS`] tokens.

pub mod cpu;
pub mod cuda;
pub mod dispatch;
pub mod http;
pub mod metrics;
pub mod model;

use std::path::{Path, PathBuf};

pub use model::{BertConfig, BertWeights};

/// Tokens per input at most, `[CLS]` and `[SEP]` included (the model's `max_seq_length`).
pub const MAX_TOKENS: usize = 256;

/// Where `cargo xtask setup` puts the model, relative to the repository.
pub const DEFAULT_MODEL_DIR: &str = "data/models/all-MiniLM-L6-v2";

/// The model's name, as requests and responses give it.
pub const MODEL_NAME: &str = "all-MiniLM-L6-v2";

/// Which backend computes: `auto` takes a GPU when one works, else the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// cloudletd's `[compute]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComputeConfig {
    /// The model folder.
    pub model: PathBuf,
    pub backend: BackendChoice,
    pub dispatch: dispatch::DispatchConfig,
    pub limits: http::Limits,
}

/// A primary backend and the one that takes over its failed batches.
pub type Backends = (Box<dyn Backend>, Option<Box<dyn Backend>>);

/// The backends `choice` asks for: the primary, and the CPU as its fallback when the
/// primary is a GPU. `auto` takes the GPU when one works (and says why not otherwise);
/// `cuda` without a working GPU is an error.
pub fn backends(choice: BackendChoice, weights: BertWeights) -> Result<Backends, ComputeError> {
    let gpu = match choice {
        BackendChoice::Cpu => None,
        BackendChoice::Auto | BackendChoice::Cuda => match cuda::CudaBackend::new(&weights) {
            Ok(b) => {
                log::info!("compute: GPU {}", b.device());
                Some(b)
            }
            Err(e) if choice == BackendChoice::Auto => {
                log::info!("compute: no GPU ({e}); computing on the CPU");
                None
            }
            Err(e) => return Err(e),
        },
    };
    let cpu: Box<dyn Backend> = Box::new(cpu::CpuBackend::new(weights));
    Ok(match gpu {
        Some(g) => (Box::new(g), Some(cpu)),
        None => (cpu, None),
    })
}

/// Loads the model and starts the dispatcher `config` describes.
pub fn start(config: &ComputeConfig) -> Result<http::EmbeddingsService, ComputeError> {
    let weights = BertWeights::load(&config.model)?;
    let tokenizer = Tokenizer::load(&config.model)?;
    let (primary, fallback) = backends(config.backend, weights)?;
    Ok(http::EmbeddingsService {
        dispatcher: dispatch::Dispatcher::start(config.dispatch, tokenizer, primary, fallback),
        limits: config.limits,
    })
}

/// Errors from loading the model or computing embeddings.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model {path}: {why}")]
    Model { path: PathBuf, why: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{backend} backend: {why}")]
    Backend { backend: &'static str, why: String },
}

/// Inputs tokenized for one forward pass: `batch` sequences padded to `seq` tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenBatch {
    pub batch: usize,
    pub seq: usize,
    /// `batch * seq` token ids, row by row, padding 0.
    pub ids: Vec<u32>,
    /// `batch * seq`: 1 for a token, 0 for padding.
    pub mask: Vec<u32>,
}

impl TokenBatch {
    /// Pads `sequences` (token ids) into one batch.
    pub fn pad(sequences: &[Vec<u32>]) -> Self {
        let batch = sequences.len();
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![0; batch * seq];
        let mut mask = vec![0; batch * seq];
        for (b, s) in sequences.iter().enumerate() {
            ids[b * seq..b * seq + s.len()].copy_from_slice(s);
            mask[b * seq..b * seq + s.len()].fill(1);
        }
        Self {
            batch,
            seq,
            ids,
            mask,
        }
    }
}

/// Something that turns token batches into embeddings.
pub trait Backend: Send + Sync {
    /// `"cpu"` or `"cuda"`, for logs and metrics.
    fn name(&self) -> &'static str;
    /// One L2-normalised embedding of [`BertConfig::hidden`] values per sequence.
    fn embed(&self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>, ComputeError>;
}

/// One input, tokenized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// Whether the input was longer than [`MAX_TOKENS`] and was cut.
    pub truncated: bool,
}

/// The model's tokenizer, set up as the reference uses it.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Reads `tokenizer.json` from the model folder.
    pub fn load(dir: &Path) -> Result<Self, ComputeError> {
        let path = dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ComputeError::Tokenizer(format!("{}: {e}", path.display())))?;
        // The file pads and truncates to 128 for its own uses; the embedding model reads up to
        // 256 tokens, unpadded (batches are padded by the caller).
        inner.with_padding(None);
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| ComputeError::Tokenizer(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Tokenizes `texts`.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Tokens>, ComputeError> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ComputeError::Tokenizer(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| Tokens {
                truncated: !e.get_overflowing().is_empty(),
                ids: e.get_ids().to_vec(),
            })
            .collect())
    }
}

/// The model: tokenizer and backend.
pub struct Embedder {
    pub tokenizer: Tokenizer,
    pub backend: Box<dyn Backend>,
}

/// Embeddings of a list of inputs.
#[derive(Clone, Debug)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens read, over all inputs.
    pub tokens: usize,
    /// Indexes of the inputs cut to [`MAX_TOKENS`].
    pub truncated: Vec<usize>,
}

impl Embedder {
    /// The model in `dir` on the CPU.
    pub fn cpu(dir: &Path) -> Result<Self, ComputeError> {
        let weights = BertWeights::load(dir)?;
        Ok(Self {
            tokenizer: Tokenizer::load(dir)?,
            backend: Box::new(cpu::CpuBackend::new(weights)),
        })
    }

    /// Embeds `texts`: sorted by length and run in batches of similar lengths (see
    /// [`pack`]), so short inputs are not padded to the longest.
    pub fn embed(&self, texts: &[&str]) -> Result<Embeddings, ComputeError> {
        let tokens = self.tokenizer.encode(texts)?;
        let vectors = embed_packed(&tokens, |b| self.backend.embed(b))?;
        Ok(Embeddings::of(&tokens, vectors))
    }
}

impl Embeddings {
    /// The embeddings of inputs tokenized as `tokens`.
    pub fn of(tokens: &[Tokens], vectors: Vec<Vec<f32>>) -> Self {
        Self {
            vectors,
            tokens: tokens.iter().map(|t| t.ids.len()).sum(),
            truncated: tokens
                .iter()
                .enumerate()
                .filter(|(_, t)| t.truncated)
                .map(|(i, _)| i)
                .collect(),
        }
    }
}

/// Runs `tokens` through `forward` in batches of similar lengths (see [`pack`]); the
/// vectors come back in the order of `tokens`.
pub fn embed_packed(
    tokens: &[Tokens],
    mut forward: impl FnMut(&TokenBatch) -> Result<Vec<Vec<f32>>, ComputeError>,
) -> Result<Vec<Vec<f32>>, ComputeError> {
    let ids: Vec<Vec<u32>> = tokens.iter().map(|t| t.ids.clone()).collect();
    let mut vectors = vec![Vec::new(); ids.len()];
    for group in pack(&ids, MAX_BATCH, MAX_BATCH_TOKENS) {
        let seqs: Vec<Vec<u32>> = group.iter().map(|i| ids[*i].clone()).collect();
        let out = forward(&TokenBatch::pad(&seqs))?;
        for (i, v) in group.into_iter().zip(out) {
            vectors[i] = v;
        }
    }
    Ok(vectors)
}

/// Sequences in one forward pass at most.
pub const MAX_BATCH: usize = 64;
/// Padded tokens (sequences × longest) in one forward pass at most.
pub const MAX_BATCH_TOKENS: usize = 8192;

/// Groups the indexes of `sequences` into batches of similar lengths: by length, shortest
/// first, each batch at most `max_batch` sequences and `max_tokens` padded tokens (a
/// sequence longer than that goes alone).
pub fn pack(sequences: &[Vec<u32>], max_batch: usize, max_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|i| sequences[*i].len());
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        // Sorted: this sequence is the longest of the batch so far.
        let padded = (current.len() + 1) * sequences[i].len();
        if !current.is_empty() && (current.len() == max_batch || padded > max_tokens) {
            out.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_groups_similar_lengths_within_the_limits() {
        let lens = [5usize, 300, 7, 6, 120, 5, 9, 250];
        let seqs: Vec<Vec<u32>> = lens.iter().map(|n| vec![1; *n]).collect();
        let groups = pack(&seqs, 3, 600);
        // Every index once.
        let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..lens.len()).collect::<Vec<_>>());
        for g in &groups {
            assert!(g.len() <= 3);
            let longest = g.iter().map(|i| lens[*i]).max().unwrap();
            assert!(g.len() * longest <= 600 || g.len() == 1, "{g:?}");
        }
        // Shortest first: the short ones share a batch, the long ones do not pad them.
        assert_eq!(groups, vec![vec![0, 5, 3], vec![2, 6, 4], vec![7, 1]]);
        // A sequence over the token limit goes alone.
        assert_eq!(pack(&seqs, 3, 200).last().unwrap(), &vec![1]);
        assert!(pack(&[], 3, 600).is_empty());
    }

    #[test]
    fn padding_marks_tokens_and_zero_fills() {
        let b = TokenBatch::pad(&[vec![101, 7, 102], vec![101, 102]]);
        assert_eq!((b.batch, b.seq), (2, 3));
        assert_eq!(b.ids, vec![101, 7, 102, 101, 102, 0]);
        assert_eq!(b.mask, vec![1, 1, 1, 1, 1, 0]);
    }
}
