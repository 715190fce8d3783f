//! cloudletd's admin endpoint: a small HTTP/1.1 server on a Unix socket (so it is reachable
//! from every network namespace), and the client `cloudlet stats` uses.
//!
//! Routes: `GET /stats` (JSON counters), `GET /metrics` (Prometheus), `GET /healthz`. The
//! same routes can also be served on a TCP address for Prometheus to scrape.

use std::{
    io::{Read as _, Write as _},
    path::Path,
    sync::Arc,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::UnixListener,
};

/// An answer to a request.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    /// A JSON answer.
    pub fn json(status: u16, body: String) -> Self {
        Self {
            status,
            content_type: "application/json",
            body,
        }
    }
}

/// Produces the response for a route, or None for 404.
pub type Handler = Arc<dyn Fn(&str) -> Option<Response> + Send + Sync>;

/// Errors from the admin endpoint and its client.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Binding or connecting to the socket failed.
    #[error("admin socket {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Another process answers on the socket already (another cloudletd?).
    #[error("admin socket {0} is in use by another process")]
    InUse(String),
    /// The daemon answered with an error status.
    #[error("admin endpoint answered {status}: {body}")]
    Status { status: u16, body: String },
    /// The answer was not HTTP.
    #[error("admin endpoint sent a malformed response")]
    Malformed,
}

/// Binds the admin socket. A stale socket file is replaced; a socket that another process
/// still answers on is left alone and reported.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let sock_err = |source| AdminError::Socket {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AdminError::InUse(path.display().to_string()));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    UnixListener::bind(path).map_err(sock_err)
}

/// Serves requests on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, handler: Handler) {
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, handler.clone()));
        }
    }
}

/// Serves the same routes on a TCP listener (for Prometheus) until the task is dropped.
pub async fn serve_tcp(listener: tokio::net::TcpListener, handler: Handler) {
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, handler.clone()));
        }
    }
}

/// Reads one request head (bounded) and writes the answer; one request per connection.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, handler: Handler) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let r = if method != "GET" {
        Response::json(405, "{\"error\":\"only GET is supported\"}".to_string())
    } else {
        handler(target)
            .unwrap_or_else(|| Response::json(404, "{\"error\":\"no such route\"}".to_string()))
    };
    let reason = match r.status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let response = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        r.status,
        r.content_type,
        r.body.len(),
        r.body
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

/// `GET target` on the admin socket (blocking); returns the body of a 200 answer.
pub fn get(path: &Path, target: &str) -> Result<String, AdminError> {
    let sock_err = |source| AdminError::Socket {
        path: path.display().to_string(),
        source,
    };
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(sock_err)?;
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: cloudletd\r\nConnection: close\r\n\r\n"
    )
    .map_err(sock_err)?;
    let mut response = String::new();
    s.read_to_string(&mut response).map_err(sock_err)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or(AdminError::Malformed)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(AdminError::Malformed)?;
    if status != 200 {
        return Err(AdminError::Status {
            status,
            body: body.to_string(),
        });
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_runtime as runtime;

    #[test]
    fn serves_routes_and_keeps_a_live_socket() {
        let dir = std::env::temp_dir().join(format!("cloudlet-admin-{}", std::process::id()));
        let path = dir.join("a.sock");
        let handler: Handler =
            Arc::new(|t: &str| (t == "/x").then(|| Response::json(200, "{\"x\":1}".to_string())));
        let (tx, rx) = std::sync::mpsc::channel();
        let server_path = path.clone();
        // The server runs on its own thread for the rest of the test binary's life.
        std::thread::spawn(move || {
            runtime().block_on(async {
                let listener = bind(&server_path).unwrap();
                tx.send(()).unwrap();
                serve(listener, handler).await;
            })
        });
        rx.recv().unwrap();
        assert_eq!(get(&path, "/x").unwrap(), "{\"x\":1}");
        assert!(matches!(
            get(&path, "/nope"),
            Err(AdminError::Status { status: 404, .. })
        ));
        // A second daemon must not steal the socket of a live one.
        let second = runtime().block_on(async { bind(&path) });
        assert!(matches!(second, Err(AdminError::InUse(_))), "{second:?}");
        assert_eq!(get(&path, "/x").unwrap(), "{\"x\":1}");

        // A stale socket file (nobody answering) is replaced.
        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        assert!(runtime().block_on(async { bind(&stale) }).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
