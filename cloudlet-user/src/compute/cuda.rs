//! The CUDA backend, through cudarc: the driver and NVRTC loaded at run time (nothing links
//! against CUDA, and a machine without it runs the CPU backend), cuBLAS for the matrix
//! products, and kernels of our own, compiled by NVRTC at start, for the embeddings, layer
//! norms, GELU, attention and pooling.
//!
//! Layout as on the CPU: the tokens of a batch end to end (no padding), weights transposed
//! to `[in, out]` once, at load, and the query, key and value projections in one product.

use std::sync::Arc;

use cudarc::{
    cublas::{CudaBlas, Gemm as _, GemmConfig, sys::cublasOperation_t},
    driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg as _},
};

use super::{
    Backend, ComputeError, TokenBatch,
    model::{BertWeights, LAYER_NORM_EPS, LayerNorm, Linear},
};

/// The kernels, compiled by NVRTC when the backend starts.
const KERNELS: &str = r#"
extern "C" __global__ void embed(float *x, const unsigned int *ids, const unsigned int *pos,
        const float *word, const float *position, const float *kind, int h) {
    int row = blockIdx.x;
    const float *w = word + (size_t)ids[row] * h;
    const float *p = position + (size_t)pos[row] * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x)
        x[(size_t)row * h + i] = w[i] + p[i] + kind[i];
}

// y = LayerNorm(x + r) (r may be null), one block of 128 threads a row.
extern "C" __global__ void add_norm(float *y, const float *x, const float *r,
        const float *gamma, const float *beta, int h, float eps) {
    __shared__ float part[128];
    int row = blockIdx.x;
    const float *xr = x + (size_t)row * h;
    const float *rr = r ? r + (size_t)row * h : 0;
    float s = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) s += xr[i] + (rr ? rr[i] : 0.f);
    part[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
        __syncthreads();
    }
    float mean = part[0] / h;
    __syncthreads();
    float v = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float d = xr[i] + (rr ? rr[i] : 0.f) - mean;
        v += d * d;
    }
    part[threadIdx.x] = v;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
        __syncthreads();
    }
    float inv = rsqrtf(part[0] / h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float d = xr[i] + (rr ? rr[i] : 0.f) - mean;
        y[(size_t)row * h + i] = d * inv * gamma[i] + beta[i];
    }
}

// out[row, :] = bias (before a product accumulates onto it).
extern "C" __global__ void fill_bias(float *out, const float *bias, int n) {
    int row = blockIdx.x;
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[(size_t)row * n + i] = bias[i];
}

extern "C" __global__ void gelu(float *x, int count) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) { float v = x[i]; x[i] = 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); }
}

// One warp per (query token, head): scores against the sequence's keys, softmax, and the
// weighted sum of its values. qkv rows hold query, key and value side by side (3h).
// starts/lens: each sequence's first row and length; seq_of: each row's sequence.
extern "C" __global__ void attention(float *ctx, const float *qkv, const unsigned int *seq_of,
        const unsigned int *starts, const unsigned int *lens, int h, int head, float scale) {
    __shared__ float p[256];
    int row = blockIdx.x, hd = blockIdx.y, lane = threadIdx.x;
    unsigned int s = seq_of[row], first = starts[s], len = lens[s];
    int stride = 3 * h;
    const float *q = qkv + (size_t)row * stride + hd * head;
    float qd = lane < head ? q[lane] : 0.f;
    float max = -1e30f;
    for (unsigned int j = 0; j < len; j++) {
        const float *k = qkv + (size_t)(first + j) * stride + h + hd * head;
        float d = lane < head ? qd * k[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffff, d, o);
        d *= scale;
        if (lane == 0) p[j] = d;
        max = fmaxf(max, d);
    }
    __syncwarp();
    float sum = 0.f;
    for (unsigned int j = lane; j < len; j += 32) { float e = __expf(p[j] - max); p[j] = e; sum += e; }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    __syncwarp();
    if (lane < head) {
        float acc = 0.f;
        for (unsigned int j = 0; j < len; j++)
            acc += p[j] * qkv[(size_t)(first + j) * stride + 2 * h + hd * head + lane];
        ctx[(size_t)row * h + hd * head + lane] = acc / sum;
    }
}

// One block per sequence: the mean of its rows, then unit length.
extern "C" __global__ void pool(float *out, const float *x, const unsigned int *starts,
        const unsigned int *lens, int h) {
    __shared__ float part[128];
    int s = blockIdx.x;
    unsigned int first = starts[s], len = lens[s];
    float sq = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float acc = 0.f;
        for (unsigned int j = 0; j < len; j++) acc += x[(size_t)(first + j) * h + i];
        acc /= fmaxf((float)len, 1e-9f);
        out[(size_t)s * h + i] = acc;
        sq += acc * acc;
    }
    part[threadIdx.x] = sq;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
        __syncthreads();
    }
    float norm = fmaxf(sqrtf(part[0]), 1e-12f);
    for (int i = threadIdx.x; i < h; i += blockDim.x) out[(size_t)s * h + i] /= norm;
}
"#;

/// Whether a CUDA driver can be loaded here and has a device: never panics (cudarc's loader
/// does when the library is missing, so that is caught).
pub fn available() -> bool {
    std::panic::catch_unwind(|| {
        // SAFETY: only tries to open the driver library (libcuda) by its usual names.
        let present = unsafe { cudarc::driver::sys::is_culib_present() };
        present
            && cudarc::driver::result::init().is_ok()
            && cudarc::driver::result::device::get_count().is_ok_and(|n| n > 0)
    })
    .unwrap_or(false)
}

/// One block of 128 threads for each of `rows` rows.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn err(why: impl std::fmt::Display) -> ComputeError {
    ComputeError::Backend {
        backend: "cuda",
        why: why.to_string(),
    }
}

/// A linear layer on the device, `[in, out]`.
struct Dense {
    weight: CudaSlice<f32>,
    bias: CudaSlice<f32>,
    input: usize,
    output: usize,
}

struct Norm {
    gamma: CudaSlice<f32>,
    beta: CudaSlice<f32>,
}

struct Layer {
    qkv: Dense,
    attention_out: Dense,
    attention_norm: Norm,
    intermediate: Dense,
    output: Dense,
    output_norm: Norm,
}

struct Kernels {
    embed: CudaFunction,
    add_norm: CudaFunction,
    fill_bias: CudaFunction,
    gelu: CudaFunction,
    attention: CudaFunction,
    pool: CudaFunction,
}

/// The model on a GPU.
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    hidden: usize,
    heads: usize,
    intermediate: usize,
    vocab: usize,
    positions: usize,
    word: CudaSlice<f32>,
    position: CudaSlice<f32>,
    kind: CudaSlice<f32>,
    embeddings_norm: Norm,
    layers: Vec<Layer>,
    name: String,
}

// SAFETY: the dispatcher's one worker thread is the only user of the backend; cudarc's
// handles are bound to the context, which `embed` binds to the calling thread.
unsafe impl Send for CudaBackend {}
// SAFETY: as above: calls are never concurrent.
unsafe impl Sync for CudaBackend {}

impl CudaBackend {
    /// Opens device 0, compiles the kernels and uploads `w`.
    pub fn new(w: &BertWeights) -> Result<Self, ComputeError> {
        if !available() {
            return Err(err("no CUDA driver or no device"));
        }
        let ctx = CudaContext::new(0).map_err(err)?;
        let name = ctx.name().map_err(err)?;
        let stream = ctx.default_stream();
        let ptx = cudarc::nvrtc::compile_ptx(KERNELS).map_err(err)?;
        let module = ctx.load_module(ptx).map_err(err)?;
        let f = |n: &str| module.load_function(n).map_err(err);
        let k = Kernels {
            embed: f("embed")?,
            add_norm: f("add_norm")?,
            fill_bias: f("fill_bias")?,
            gelu: f("gelu")?,
            attention: f("attention")?,
            pool: f("pool")?,
        };
        let blas = CudaBlas::new(stream.clone()).map_err(err)?;
        let up = |v: &[f32]| stream.clone_htod(v).map_err(err);
        let dense = |parts: &[&Linear]| -> Result<Dense, ComputeError> {
            let (weight, bias, input, output) = Linear::stacked_transposed(parts);
            Ok(Dense {
                weight: up(&weight)?,
                bias: up(&bias)?,
                input,
                output,
            })
        };
        let norm = |n: &LayerNorm| -> Result<Norm, ComputeError> {
            Ok(Norm {
                gamma: up(&n.weight)?,
                beta: up(&n.bias)?,
            })
        };
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    qkv: dense(&[&l.query, &l.key, &l.value])?,
                    attention_out: dense(&[&l.attention_out])?,
                    attention_norm: norm(&l.attention_norm)?,
                    intermediate: dense(&[&l.intermediate])?,
                    output: dense(&[&l.output])?,
                    output_norm: norm(&l.output_norm)?,
                })
            })
            .collect::<Result<Vec<_>, ComputeError>>()?;
        let c = &w.config;
        if c.hidden / c.heads > 32 {
            return Err(err("heads wider than a warp"));
        }
        Ok(Self {
            blas,
            k,
            hidden: c.hidden,
            heads: c.heads,
            intermediate: c.intermediate,
            vocab: c.vocab_size,
            positions: c.max_position_embeddings,
            word: up(&w.word_embeddings)?,
            position: up(&w.position_embeddings)?,
            kind: up(&w.token_type_embeddings[..c.hidden])?,
            embeddings_norm: norm(&w.embeddings_norm)?,
            layers,
            name,
            stream,
        })
    }

    /// The device's name.
    pub fn device(&self) -> &str {
        &self.name
    }

    /// `out[rows × d.output] = x[rows × d.input] · weight + bias`, row-major.
    fn linear(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        d: &Dense,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), ComputeError> {
        let n = d.output as i32;
        let mut b = self.stream.launch_builder(&self.k.fill_bias);
        b.arg(&mut *out).arg(&d.bias).arg(&n);
        // SAFETY: out holds rows × n floats, bias n.
        unsafe { b.launch(per_row(rows)) }.map_err(err)?;
        // Row-major C = X·W is column-major Cᵀ = Wᵀ·Xᵀ: cuBLAS's m = out, n = rows, k = in.
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n,
            n: rows as i32,
            k: d.input as i32,
            alpha: 1.0f32,
            lda: n,
            ldb: d.input as i32,
            beta: 1.0f32,
            ldc: n,
        };
        // SAFETY: the shapes above match the buffers' sizes.
        unsafe { self.blas.gemm(cfg, &d.weight, x, out) }.map_err(err)
    }

    fn add_norm(
        &self,
        y: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        r: Option<&CudaSlice<f32>>,
        norm: &Norm,
        rows: usize,
    ) -> Result<(), ComputeError> {
        let h = self.hidden as i32;
        let eps = LAYER_NORM_EPS;
        let mut b = self.stream.launch_builder(&self.k.add_norm);
        b.arg(&mut *y).arg(x);
        match r {
            Some(r) => b.arg(r),
            None => b.arg(&0u64),
        };
        b.arg(&norm.gamma).arg(&norm.beta).arg(&h).arg(&eps);
        // SAFETY: y, x and r hold rows × h floats; the kernel uses 128 threads a row.
        unsafe { b.launch(per_row(rows)) }.map_err(err)?;
        Ok(())
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn embed(&self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>, ComputeError> {
        let (t, h) = (batch.seq, self.hidden);
        if t > self.positions.min(256) {
            return Err(err(format!("{t} tokens, at most 256")));
        }
        if batch.ids.iter().any(|id| *id as usize >= self.vocab) {
            return Err(err("token id outside the vocabulary"));
        }
        self.stream.context().bind_to_thread().map_err(err)?;
        // Each sequence's tokens, end to end.
        let (mut ids, mut pos, mut seq_of, mut starts, mut lens) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for s in 0..batch.batch {
            let len = batch.mask[s * t..(s + 1) * t]
                .iter()
                .take_while(|m| **m != 0)
                .count();
            starts.push(ids.len() as u32);
            lens.push(len as u32);
            for p in 0..len {
                ids.push(batch.ids[s * t + p]);
                pos.push(p as u32);
                seq_of.push(s as u32);
            }
        }
        let rows = ids.len();
        if rows == 0 {
            return Ok(vec![vec![0.0; h]; batch.batch]);
        }
        let st = &self.stream;
        let up = |v: &[u32]| st.clone_htod(v).map_err(err);
        let (ids, pos, seq_of, starts, lens) =
            (up(&ids)?, up(&pos)?, up(&seq_of)?, up(&starts)?, up(&lens)?);
        let zeros = |n: usize| st.alloc_zeros::<f32>(n).map_err(err);
        let (mut x, mut tmp) = (zeros(rows * h)?, zeros(rows * h)?);
        let mut qkv = zeros(rows * 3 * h)?;
        let mut ctx = zeros(rows * h)?;
        let mut attn = zeros(rows * h)?;
        let mut inter = zeros(rows * self.intermediate)?;
        let hi = h as i32;
        let rows_cfg = per_row(rows);
        let mut b = st.launch_builder(&self.k.embed);
        b.arg(&mut tmp)
            .arg(&ids)
            .arg(&pos)
            .arg(&self.word)
            .arg(&self.position)
            .arg(&self.kind)
            .arg(&hi);
        // SAFETY: tmp holds rows × h floats; ids and pos rows; the tables their sizes.
        unsafe { b.launch(rows_cfg) }.map_err(err)?;
        self.add_norm(&mut x, &tmp, None, &self.embeddings_norm, rows)?;
        let head = (h / self.heads) as i32;
        let scale = 1.0 / (head as f32).sqrt();
        for l in &self.layers {
            self.linear(&x, rows, &l.qkv, &mut qkv)?;
            let mut b = st.launch_builder(&self.k.attention);
            b.arg(&mut ctx)
                .arg(&qkv)
                .arg(&seq_of)
                .arg(&starts)
                .arg(&lens)
                .arg(&hi)
                .arg(&head)
                .arg(&scale);
            // SAFETY: one warp per (row, head); sequences of at most 256 tokens (checked).
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (rows as u32, self.heads as u32, 1),
                    block_dim: (32, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(err)?;
            self.linear(&ctx, rows, &l.attention_out, &mut tmp)?;
            self.add_norm(&mut attn, &tmp, Some(&x), &l.attention_norm, rows)?;
            self.linear(&attn, rows, &l.intermediate, &mut inter)?;
            let count = (rows * self.intermediate) as i32;
            let mut b = st.launch_builder(&self.k.gelu);
            b.arg(&mut inter).arg(&count);
            // SAFETY: inter holds `count` floats.
            unsafe { b.launch(LaunchConfig::for_num_elems(count as u32)) }.map_err(err)?;
            self.linear(&inter, rows, &l.output, &mut tmp)?;
            self.add_norm(&mut x, &tmp, Some(&attn), &l.output_norm, rows)?;
        }
        let mut out = zeros(batch.batch * h)?;
        let mut b = st.launch_builder(&self.k.pool);
        b.arg(&mut out).arg(&x).arg(&starts).arg(&lens).arg(&hi);
        // SAFETY: out holds one vector a sequence.
        unsafe { b.launch(per_row(batch.batch)) }.map_err(err)?;
        let host = st.clone_dtoh(&out).map_err(err)?;
        Ok(host.chunks_exact(h).map(<[f32]>::to_vec).collect())
    }
}
