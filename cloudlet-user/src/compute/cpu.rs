//! The CPU backend: the BERT forward pass in f32, matrix products by `gemm` (SIMD kernels,
//! threads through rayon), attention heads in parallel.
//!
//! Sequences are not padded here: the tokens of a batch are laid end to end, so the
//! per-token layers (projections, feed-forward, normalisation), nine tenths of the work,
//! compute no padding; attention runs per sequence and head over that sequence's tokens.

use gemm::Parallelism;
use rayon::prelude::*;

use super::{
    Backend, ComputeError, TokenBatch,
    model::{BertWeights, LAYER_NORM_EPS, LayerNorm, Linear},
};

/// A linear layer laid out for the products here: `weight` is the `[in, out]` transpose
/// of the model's, so its rows are contiguous along the output.
struct Dense {
    weight: Vec<f32>,
    bias: Vec<f32>,
    input: usize,
    output: usize,
}

impl Dense {
    /// `parts` stacked along the output (one product for the query, key and value
    /// projections), transposed.
    fn of(parts: &[&Linear]) -> Self {
        let (weight, bias, input, output) = Linear::stacked_transposed(parts);
        Self {
            weight,
            bias,
            input,
            output,
        }
    }
}

struct DenseLayer {
    qkv: Dense,
    attention_out: Dense,
    attention_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: LayerNorm,
}

/// The model on the CPU: the embedding tables, and the layers in the products' layout
/// (the model's own layout of their weights is not kept).
pub struct CpuBackend {
    w: BertWeights,
    layers: Vec<DenseLayer>,
}

impl CpuBackend {
    pub fn new(mut weights: BertWeights) -> Self {
        let layers = std::mem::take(&mut weights.layers)
            .into_iter()
            .map(|l| DenseLayer {
                qkv: Dense::of(&[&l.query, &l.key, &l.value]),
                attention_out: Dense::of(&[&l.attention_out]),
                attention_norm: l.attention_norm,
                intermediate: Dense::of(&[&l.intermediate]),
                output: Dense::of(&[&l.output]),
                output_norm: l.output_norm,
            })
            .collect();
        Self { w: weights, layers }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn embed(&self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>, ComputeError> {
        let c = &self.w.config;
        let (b, t, h) = (batch.batch, batch.seq, c.hidden);
        if t > c.max_position_embeddings {
            return Err(ComputeError::Backend {
                backend: "cpu",
                why: format!("{t} tokens, the model takes {}", c.max_position_embeddings),
            });
        }
        if let Some(id) = batch.ids.iter().find(|id| **id as usize >= c.vocab_size) {
            return Err(ComputeError::Backend {
                backend: "cpu",
                why: format!("token id {id} outside the vocabulary"),
            });
        }
        // Each sequence's first row and length (its tokens: the mask's leading ones).
        let mut spans = Vec::with_capacity(b);
        let mut rows = 0;
        for s in 0..b {
            let len = batch.mask[s * t..(s + 1) * t]
                .iter()
                .take_while(|m| **m != 0)
                .count();
            spans.push((rows, len));
            rows += len;
        }
        // Embeddings: word + position + token type 0, normalised.
        let mut x = vec![0f32; rows * h];
        for (s, &(first, len)) in spans.iter().enumerate() {
            for pos in 0..len {
                let id = batch.ids[s * t + pos] as usize;
                let row = &mut x[(first + pos) * h..(first + pos + 1) * h];
                let word = &self.w.word_embeddings[id * h..(id + 1) * h];
                let position = &self.w.position_embeddings[pos * h..(pos + 1) * h];
                let kind = &self.w.token_type_embeddings[..h];
                for (((o, a), p), k) in row.iter_mut().zip(word).zip(position).zip(kind) {
                    *o = a + p + k;
                }
            }
        }
        layer_norm(&mut x, h, &self.w.embeddings_norm);

        let heads = c.heads;
        let head = h / heads;
        let scale = 1.0 / (head as f32).sqrt();
        let mut qkv = vec![0f32; rows * 3 * h];
        let mut ctx = vec![0f32; rows * h];
        let mut attn = vec![0f32; rows * h];
        let mut inter = vec![0f32; rows * c.intermediate];
        let mut out = vec![0f32; rows * h];
        for dense in &self.layers {
            linear(&x, rows, &dense.qkv, &mut qkv);
            attention(&qkv, &spans, h, heads, head, scale, &mut ctx);
            linear(&ctx, rows, &dense.attention_out, &mut attn);
            for (a, xi) in attn.iter_mut().zip(&x) {
                *a += xi;
            }
            layer_norm(&mut attn, h, &dense.attention_norm);
            linear(&attn, rows, &dense.intermediate, &mut inter);
            inter
                .par_chunks_mut(4096)
                .for_each(|c| c.iter_mut().for_each(|v| *v = gelu(*v)));
            linear(&inter, rows, &dense.output, &mut out);
            for (o, a) in out.iter_mut().zip(&attn) {
                *o += a;
            }
            layer_norm(&mut out, h, &dense.output_norm);
            std::mem::swap(&mut x, &mut out);
        }
        // Mean of each sequence's tokens, then unit length.
        Ok(spans
            .iter()
            .map(|&(first, len)| {
                let mut sum = vec![0f32; h];
                for row in x[first * h..(first + len) * h].chunks_exact(h) {
                    for (o, v) in sum.iter_mut().zip(row) {
                        *o += v;
                    }
                }
                let n = (len as f32).max(1e-9);
                sum.iter_mut().for_each(|v| *v /= n);
                let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                sum.iter_mut().for_each(|v| *v /= norm);
                sum
            })
            .collect())
    }
}

/// `out[rows × output] = x[rows × input] · weight + bias`.
fn linear(x: &[f32], rows: usize, d: &Dense, out: &mut [f32]) {
    let (k, n) = (d.input, d.output);
    debug_assert_eq!(x.len(), rows * k);
    let out = &mut out[..rows * n];
    for row in out.chunks_exact_mut(n) {
        row.copy_from_slice(&d.bias);
    }
    // SAFETY: dst is rows × n (row stride n), lhs rows × k (row stride k), rhs k × n (row
    // stride n); all within their slices.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            d.weight.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
    }
}

/// Scaled dot-product attention of every head of every sequence (`spans`: first row and
/// length): `ctx` gets each head's output in its columns. `qkv` holds each token's query,
/// key and value side by side (`3 * h` a row).
fn attention(
    qkv: &[f32],
    spans: &[(usize, usize)],
    h: usize,
    heads: usize,
    head: usize,
    scale: f32,
    ctx: &mut [f32],
) {
    // Each (sequence, head) writes its own rows and columns of ctx.
    let out = ctx.as_mut_ptr() as usize;
    let stride = 3 * h;
    (0..spans.len() * heads).into_par_iter().for_each(|job| {
        let (s, hd) = (job / heads, job % heads);
        let (first, t) = spans[s];
        if t == 0 {
            return;
        }
        let q = first * stride + hd * head;
        let (k, v) = (q + h, q + 2 * h);
        let base = first * h + hd * head;
        let mut scores = vec![0f32; t * t];
        // SAFETY: Q is t × head at `q` (row stride 3h), Kᵀ the head × t transpose of K at
        // `k` (element (d, j) at j * 3h + d), scores t × t; all within qkv.
        unsafe {
            gemm::gemm(
                t,
                t,
                head,
                scores.as_mut_ptr(),
                1,
                t as isize,
                false,
                qkv.as_ptr().add(q),
                1,
                stride as isize,
                qkv.as_ptr().add(k),
                stride as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        for row in scores.chunks_exact_mut(t) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for x in row.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            row.iter_mut().for_each(|x| *x /= sum);
        }
        // SAFETY: P is t × t, V t × head at `v` (row stride 3h); the output is this job's
        // t × head block of ctx (rows of sequence s, columns of head hd), written by no other
        // job, and ctx outlives the parallel loop.
        unsafe {
            gemm::gemm(
                t,
                head,
                t,
                (out as *mut f32).add(base),
                1,
                h as isize,
                false,
                scores.as_ptr(),
                1,
                t as isize,
                qkv.as_ptr().add(v),
                1,
                stride as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    });
}

/// Normalises each row of `x` (`width` values) to zero mean and unit variance, then scales
/// and shifts.
fn layer_norm(x: &mut [f32], width: usize, norm: &LayerNorm) {
    x.par_chunks_mut(width).for_each(|row| {
        let mean = row.iter().sum::<f32>() / width as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
        let inv = 1.0 / (var + LAYER_NORM_EPS).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&norm.weight).zip(&norm.bias) {
            *v = (*v - mean) * inv * w + b;
        }
    });
}

/// GELU as BERT defines it (with the error function, not the tanh approximation).
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The error function in f32 as Eigen computes it (`generic_fast_erf_float`): a rational
/// function of `x` on [-4, 4] (outside, erf is ±1 to f32 precision). Arithmetic only, so
/// loops over it vectorise, where libm's `erff` branches per value.
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p - 2.101_024e-6;
    p = x2 * p - 5.692_506_4e-5;
    p = x2 * p - 7.349_906_3e-4;
    p = x2 * p - 2.954_6e-3;
    p = x2 * p - 1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 - 2.133_740_6e-4;
    q = x2 * q - 1.682_827e-3;
    q = x2 * q - 7.373_329e-3;
    q = x2 * q - 1.426_474e-2;
    x * p / q
}

#[cfg(test)]
mod tests {
    #[test]
    fn erf_agrees_with_libm() {
        let mut worst = 0f32;
        for i in -60_000..=60_000 {
            let x = i as f32 / 10_000.0;
            worst = worst.max((super::erf(x) - libm::erff(x)).abs());
        }
        assert!(worst < 5e-7, "largest difference {worst}");
    }
}
