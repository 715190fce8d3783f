//! The CPU backend: the BERT forward pass in f32, matrix products by `gemm` (SIMD kernels,
//! threads through rayon), attention heads in parallel.

use gemm::Parallelism;
use rayon::prelude::*;

use super::{
    Backend, ComputeError, TokenBatch,
    model::{BertWeights, LAYER_NORM_EPS, LayerNorm, Linear},
};

/// The model on the CPU.
pub struct CpuBackend {
    w: BertWeights,
}

impl CpuBackend {
    pub fn new(weights: BertWeights) -> Self {
        Self { w: weights }
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
        let rows = b * t;
        // Embeddings: word + position + token type 0, normalised.
        let mut x = vec![0f32; rows * h];
        for (r, row) in x.chunks_exact_mut(h).enumerate() {
            let id = batch.ids[r] as usize;
            let pos = r % t;
            let word = &self.w.word_embeddings[id * h..(id + 1) * h];
            let position = &self.w.position_embeddings[pos * h..(pos + 1) * h];
            let kind = &self.w.token_type_embeddings[..h];
            for (((o, a), p), k) in row.iter_mut().zip(word).zip(position).zip(kind) {
                *o = a + p + k;
            }
        }
        layer_norm(&mut x, h, &self.w.embeddings_norm);

        let heads = c.heads;
        let head = h / heads;
        let scale = 1.0 / (head as f32).sqrt();
        let (mut q, mut k, mut v) = (
            vec![0f32; rows * h],
            vec![0f32; rows * h],
            vec![0f32; rows * h],
        );
        let mut ctx = vec![0f32; rows * h];
        let mut attn = vec![0f32; rows * h];
        let mut inter = vec![0f32; rows * c.intermediate];
        let mut out = vec![0f32; rows * h];
        for layer in &self.w.layers {
            linear(&x, rows, &layer.query, &mut q);
            linear(&x, rows, &layer.key, &mut k);
            linear(&x, rows, &layer.value, &mut v);
            attention(
                &q,
                &k,
                &v,
                &batch.mask,
                b,
                t,
                h,
                heads,
                head,
                scale,
                &mut ctx,
            );
            linear(&ctx, rows, &layer.attention_out, &mut attn);
            for (a, xi) in attn.iter_mut().zip(&x) {
                *a += xi;
            }
            layer_norm(&mut attn, h, &layer.attention_norm);
            linear(&attn, rows, &layer.intermediate, &mut inter);
            inter
                .par_chunks_mut(4096)
                .for_each(|c| c.iter_mut().for_each(|v| *v = gelu(*v)));
            linear(&inter, rows, &layer.output, &mut out);
            for (o, a) in out.iter_mut().zip(&attn) {
                *o += a;
            }
            layer_norm(&mut out, h, &layer.output_norm);
            std::mem::swap(&mut x, &mut out);
        }
        // Mean of the tokens (not the padding), then unit length.
        Ok((0..b)
            .map(|s| {
                let mut sum = vec![0f32; h];
                let mut n = 0f32;
                for p in 0..t {
                    if batch.mask[s * t + p] == 0 {
                        continue;
                    }
                    n += 1.0;
                    for (o, v) in sum.iter_mut().zip(&x[(s * t + p) * h..(s * t + p + 1) * h]) {
                        *o += v;
                    }
                }
                let n = n.max(1e-9);
                sum.iter_mut().for_each(|v| *v /= n);
                let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                sum.iter_mut().for_each(|v| *v /= norm);
                sum
            })
            .collect())
    }
}

/// `out[rows × lin.output] = x[rows × lin.input] · weightᵀ + bias`.
fn linear(x: &[f32], rows: usize, lin: &Linear, out: &mut [f32]) {
    let (k, n) = (lin.input, lin.output);
    debug_assert_eq!(x.len(), rows * k);
    let out = &mut out[..rows * n];
    for row in out.chunks_exact_mut(n) {
        row.copy_from_slice(&lin.bias);
    }
    // SAFETY: dst is rows × n (row stride n), lhs rows × k (row stride k), rhs the k × n
    // transpose of the n × k weight (element (i, j) at j * k + i); all within their slices.
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
            lin.weight.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
    }
}

/// Scaled dot-product attention of every head of every sequence, padding keys masked out:
/// `ctx` gets each head's output in its columns.
#[allow(clippy::too_many_arguments)]
fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[u32],
    batch: usize,
    t: usize,
    h: usize,
    heads: usize,
    head: usize,
    scale: f32,
    ctx: &mut [f32],
) {
    // Each (sequence, head) writes its own rows and columns of ctx.
    let out = ctx.as_mut_ptr() as usize;
    (0..batch * heads).into_par_iter().for_each(|job| {
        let (s, hd) = (job / heads, job % heads);
        let base = s * t * h + hd * head;
        let mut scores = vec![0f32; t * t];
        // SAFETY: Q is t × head at `base` (row stride h), Kᵀ the head × t transpose of K at
        // `base` (element (d, j) at j * h + d), scores t × t.
        unsafe {
            gemm::gemm(
                t,
                t,
                head,
                scores.as_mut_ptr(),
                1,
                t as isize,
                false,
                q.as_ptr().add(base),
                1,
                h as isize,
                k.as_ptr().add(base),
                h as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        let keys = &mask[s * t..(s + 1) * t];
        for row in scores.chunks_exact_mut(t) {
            for (x, m) in row.iter_mut().zip(keys) {
                if *m == 0 {
                    *x = f32::NEG_INFINITY;
                }
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for x in row.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            row.iter_mut().for_each(|x| *x /= sum);
        }
        // SAFETY: P is t × t, V t × head at `base` (row stride h); the output is this job's
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
                v.as_ptr().add(base),
                1,
                h as isize,
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
    0.5 * x * (1.0 + libm::erff(x / std::f32::consts::SQRT_2))
}
