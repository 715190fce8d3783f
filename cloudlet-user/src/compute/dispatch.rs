//! The dispatcher: a bounded queue of embedding jobs, served by one worker thread that
//! batches them.
//!
//! - **Dynamic batching**: the worker waits for the first job, then up to `max_wait` for
//!   more, and starts as soon as `max_batch` inputs are queued. A batch is packed by length
//!   (see [`super::pack`]).
//! - **Backpressure**: a job that would take the queue past `queue` inputs is refused at
//!   once ([`DispatchError::Busy`]: HTTP answers 503 with `Retry-After`).
//! - **Fairness**: jobs are queued per client and batches take them round-robin, one job
//!   per client in turn, so a client with many requests does not starve the others.
//! - **Cancellation**: a job whose caller has gone (its reply receiver dropped) is dropped
//!   from the queue instead of computed.
//! - **Fallback**: when the primary backend fails on a batch, the batch is computed by the
//!   fallback backend (the CPU); the daemon never goes down with a failing device.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use super::{Backend, ComputeError, Embeddings, Tokenizer, embed_packed};

/// Settings of the dispatcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DispatchConfig {
    /// Inputs that start a batch at once.
    pub max_batch: usize,
    /// Longest wait for more jobs after the first.
    pub max_wait: Duration,
    /// Inputs queued at most; more are refused.
    pub queue: usize,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_wait: Duration::from_millis(5),
            queue: 1024,
        }
    }
}

/// Why a job was not done.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("the queue is full ({queued} inputs queued, room for {capacity})")]
    Busy { queued: usize, capacity: usize },
    #[error("the dispatcher has stopped")]
    Stopped,
    #[error(transparent)]
    Compute(#[from] ComputeError),
}

/// Counters of the dispatcher (shared; read by the metrics).
#[derive(Debug, Default)]
pub struct DispatchStats {
    pub jobs: AtomicU64,
    pub inputs: AtomicU64,
    pub tokens: AtomicU64,
    pub batches: AtomicU64,
    pub rejected: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    /// Batches the fallback backend computed after the primary failed.
    pub fallbacks: AtomicU64,
    /// Inputs queued now.
    pub queued: AtomicU64,
}

struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Embeddings, DispatchError>>,
}

#[derive(Default)]
struct Queue {
    /// Jobs by client, each client's in arrival order.
    clients: HashMap<String, VecDeque<Job>>,
    /// Clients with queued jobs, in turn.
    turn: VecDeque<String>,
    /// Inputs queued.
    inputs: usize,
    /// When the oldest queued job arrived.
    since: Option<Instant>,
    stopped: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    config: DispatchConfig,
    stats: Arc<DispatchStats>,
}

/// The handle callers submit jobs through; the worker stops when the last handle is
/// dropped.
pub struct Dispatcher {
    shared: Arc<Shared>,
    backend: &'static str,
}

impl Dispatcher {
    /// Starts the worker with `tokenizer` and `primary`, falling back to `fallback` when
    /// `primary` fails.
    pub fn start(
        config: DispatchConfig,
        tokenizer: Tokenizer,
        primary: Box<dyn Backend>,
        fallback: Option<Box<dyn Backend>>,
    ) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            config,
            stats: Arc::default(),
        });
        let backend = primary.name();
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("cloudlet-compute".into())
            .spawn(move || work(&worker, &tokenizer, primary.as_ref(), fallback.as_deref()))
            .expect("spawning the compute worker");
        Self { shared, backend }
    }

    /// The primary backend's name.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    pub fn stats(&self) -> Arc<DispatchStats> {
        self.shared.stats.clone()
    }

    pub fn config(&self) -> DispatchConfig {
        self.shared.config
    }

    /// Queues `texts` for `client`; the receiver gets the embeddings (or the error). Refused
    /// at once when the queue has no room.
    pub fn submit(
        &self,
        client: &str,
        texts: Vec<String>,
    ) -> Result<oneshot::Receiver<Result<Embeddings, DispatchError>>, DispatchError> {
        let (tx, rx) = oneshot::channel();
        let n = texts.len();
        let mut q = self
            .shared
            .queue
            .lock()
            .map_err(|_| DispatchError::Stopped)?;
        if q.stopped {
            return Err(DispatchError::Stopped);
        }
        let capacity = self.shared.config.queue;
        if q.inputs + n > capacity && q.inputs > 0 {
            self.shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(DispatchError::Busy {
                queued: q.inputs,
                capacity,
            });
        }
        q.inputs += n;
        q.since.get_or_insert_with(Instant::now);
        let jobs = q.clients.entry(client.to_string()).or_default();
        if jobs.is_empty() {
            q.turn.push_back(client.to_string());
        }
        q.clients
            .get_mut(client)
            .expect("just inserted")
            .push_back(Job { texts, reply: tx });
        self.shared
            .stats
            .queued
            .store(q.inputs as u64, Ordering::Relaxed);
        drop(q);
        self.shared.wake.notify_one();
        Ok(rx)
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        if let Ok(mut q) = self.shared.queue.lock() {
            q.stopped = true;
        }
        self.shared.wake.notify_all();
    }
}

/// The worker: takes batches until stopped.
fn work(
    shared: &Shared,
    tokenizer: &Tokenizer,
    primary: &dyn Backend,
    fallback: Option<&dyn Backend>,
) {
    loop {
        let Some(jobs) = next_batch(shared) else {
            return;
        };
        run(shared, tokenizer, primary, fallback, jobs);
    }
}

/// Waits for a batch's worth of jobs (or the wait to run out), then takes jobs
/// round-robin across clients up to `max_batch` inputs. `None` once stopped and empty.
fn next_batch(shared: &Shared) -> Option<Vec<Job>> {
    let config = shared.config;
    let mut q = shared.queue.lock().ok()?;
    loop {
        if q.inputs == 0 {
            if q.stopped {
                return None;
            }
            q = shared.wake.wait(q).ok()?;
            continue;
        }
        let waited = q.since.map_or(Duration::ZERO, |s| s.elapsed());
        if q.inputs >= config.max_batch || waited >= config.max_wait || q.stopped {
            break;
        }
        q = shared
            .wake
            .wait_timeout(q, config.max_wait - waited)
            .ok()?
            .0;
    }
    let mut taken = Vec::new();
    let mut inputs = 0;
    while inputs < config.max_batch {
        let Some(client) = q.turn.pop_front() else {
            break;
        };
        let jobs = q
            .clients
            .get_mut(&client)
            .expect("a client in turn has jobs");
        let job = jobs.pop_front().expect("a client in turn has jobs");
        let more = !jobs.is_empty();
        if more {
            q.turn.push_back(client);
        } else {
            q.clients.remove(&client);
        }
        q.inputs -= job.texts.len();
        if job.reply.is_closed() {
            shared.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        inputs += job.texts.len();
        taken.push(job);
    }
    q.since = (q.inputs > 0).then(Instant::now);
    shared
        .stats
        .queued
        .store(q.inputs as u64, Ordering::Relaxed);
    Some(taken)
}

/// Computes one batch of jobs and answers each.
fn run(
    shared: &Shared,
    tokenizer: &Tokenizer,
    primary: &dyn Backend,
    fallback: Option<&dyn Backend>,
    jobs: Vec<Job>,
) {
    if jobs.is_empty() {
        return;
    }
    let stats = &shared.stats;
    let texts: Vec<&str> = jobs
        .iter()
        .flat_map(|j| j.texts.iter().map(String::as_str))
        .collect();
    let result = tokenizer.encode(&texts).and_then(|tokens| {
        let vectors = embed_packed(&tokens, |batch| {
            stats.batches.fetch_add(1, Ordering::Relaxed);
            match (primary.embed(batch), fallback) {
                (Ok(out), _) => Ok(out),
                (Err(e), Some(f)) => {
                    log::warn!(
                        "compute: {} backend failed on a batch ({e}); computing it on {}",
                        primary.name(),
                        f.name()
                    );
                    stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                    f.embed(batch)
                }
                (Err(e), None) => Err(e),
            }
        })?;
        Ok((tokens, vectors))
    });
    match result {
        Ok((tokens, vectors)) => {
            let mut tokens = tokens.into_iter();
            let mut vectors = vectors.into_iter();
            for job in jobs {
                let n = job.texts.len();
                let t: Vec<_> = tokens.by_ref().take(n).collect();
                let e = Embeddings::of(&t, vectors.by_ref().take(n).collect());
                stats.jobs.fetch_add(1, Ordering::Relaxed);
                stats.inputs.fetch_add(n as u64, Ordering::Relaxed);
                stats.tokens.fetch_add(e.tokens as u64, Ordering::Relaxed);
                // The caller may have gone meanwhile: nothing to answer then.
                let _ = job.reply.send(Ok(e));
            }
        }
        Err(e) => {
            log::error!("compute: batch of {} inputs failed: {e}", texts.len());
            let why = e.to_string();
            for job in jobs {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                let _ = job
                    .reply
                    .send(Err(DispatchError::Compute(ComputeError::Backend {
                        backend: primary.name(),
                        why: why.clone(),
                    })));
            }
        }
    }
}
