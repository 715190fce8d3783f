//! Prometheus metrics of the compute dispatcher, read from its counters at each scrape:
//! the backend in use, jobs, inputs, tokens, batches, refusals, cancellations, failures,
//! fallbacks and the queue's depth.

use std::sync::{Arc, atomic::Ordering};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::dispatch::DispatchStats;

/// Encodes a dispatcher's counters.
#[derive(Debug)]
pub struct ComputeCollector {
    pub backend: &'static str,
    pub stats: Arc<DispatchStats>,
}

impl Collector for ComputeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let backend = [("backend", self.backend)];
        let mut m = encoder.encode_descriptor(
            "cloudlet_compute_backend",
            "The backend computing embeddings (1 for the one in use)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(m.encode_family(&backend)?)?;
        let s = &self.stats;
        for (name, help, value) in [
            (
                "cloudlet_compute_jobs",
                "Embedding requests answered",
                &s.jobs,
            ),
            ("cloudlet_compute_inputs", "Inputs embedded", &s.inputs),
            (
                "cloudlet_compute_tokens",
                "Tokens read by the model",
                &s.tokens,
            ),
            ("cloudlet_compute_batches", "Forward passes run", &s.batches),
            (
                "cloudlet_compute_rejected",
                "Requests refused because the queue was full (503)",
                &s.rejected,
            ),
            (
                "cloudlet_compute_cancelled",
                "Requests dropped from the queue because their client had gone",
                &s.cancelled,
            ),
            (
                "cloudlet_compute_failed",
                "Requests whose batch failed",
                &s.failed,
            ),
            (
                "cloudlet_compute_fallbacks",
                "Forward passes recomputed on the fallback backend after the primary failed",
                &s.fallbacks,
            ),
        ] {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value.load(Ordering::Relaxed)).encode(m.encode_family(&backend)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "cloudlet_compute_queued_inputs",
            "Inputs waiting in the queue",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(s.queued.load(Ordering::Relaxed) as i64)
            .encode(m.encode_family(&backend)?)?;
        Ok(())
    }
}
