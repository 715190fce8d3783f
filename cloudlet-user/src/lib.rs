//! Cloudlet user space: the library behind `cloudletd` and `cloudlet`.
//!
//! One module per subsystem: [`policy`] (the policy file), [`geoip`] (the IP-to-country
//! database), [`dataplane`] (compiling policies into the XDP program's maps, loading,
//! attaching, classifying and counting), [`config`] (cloudletd's configuration),
//! [`admin`] (the daemon's local HTTP endpoint), [`quic`] (post-quantum TLS and QUIC
//! configurations), [`compute`] (AI workloads: sentence embeddings), [`mcp`] (threat checks
//! of the MCP guard), and [`frame`] (building test frames).

pub mod admin;
pub mod compute;
pub mod config;
pub mod dataplane;
pub mod frame;
pub mod geoip;
pub mod mcp;
pub mod node;
pub mod policy;
pub mod quic;

/// The XDP object built by build.rs (cloudlet-ebpf, bpfel).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cloudlet"));

/// An error and its causes on one line, each cause once: causes whose text the message
/// already carries are left out.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// A single-threaded runtime with timers and I/O, for unit tests of async code.
#[cfg(test)]
pub(crate) fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
