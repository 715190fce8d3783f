//! The MCP servers behind the guard: processes cloudletd starts and talks to over stdio
//! (newline-delimited JSON-RPC), and remote servers reached over Streamable HTTP.
//!
//! Each upstream has a supervisor task that connects (starting the process, or opening a
//! session), runs the `initialize` handshake and keeps the connection. When the process
//! exits or the remote stops answering, requests in flight fail at once with
//! [`UpstreamError::Unavailable`], and the supervisor reconnects after a backoff that
//! doubles from 250 ms to 30 s and resets once a connection has stayed up. Other upstreams
//! are not affected.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::http1;
use serde_json::{Value, json, value::RawValue};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    sync::{Notify, oneshot, watch},
};

/// The CA certificates trusted for `https://` when no `ca` is given (Debian's bundle).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The protocol revision the guard asks upstreams for.
pub const UPSTREAM_PROTOCOL: &str = "2025-11-25";
/// Longest upstream message read (one JSON-RPC line or HTTP body).
pub const MAX_MESSAGE: usize = 16 << 20;
/// First and longest wait between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that stayed up this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);

/// How an upstream is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A process cloudletd starts, speaking MCP on its stdin and stdout.
    Stdio {
        command: Vec<String>,
        env: BTreeMap<String, String>,
        cwd: Option<PathBuf>,
    },
    /// A Streamable HTTP endpoint (`http://` or `https://`).
    Http {
        url: String,
        /// CA certificates (PEM) an `https://` server's certificate must chain to.
        ca: Option<PathBuf>,
        headers: BTreeMap<String, String>,
    },
}

/// One `[[mcp.upstreams]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Name in logs, metrics and the audit log.
    pub name: String,
    /// Tool names are shown to clients as `PREFIX__TOOL`.
    pub prefix: String,
    pub transport: Transport,
    /// How long a request may wait for the upstream's answer.
    pub timeout: Duration,
}

/// Why an upstream request failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Not connected (starting, restarting after a crash, or unreachable).
    #[error("upstream {0} is unavailable: {1}")]
    Unavailable(String, String),
    #[error("upstream {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    /// The upstream answered with a JSON-RPC error.
    #[error("upstream {upstream} answered error {code}: {message}")]
    Rpc {
        upstream: String,
        code: i64,
        message: String,
        data: Option<Value>,
    },
    /// The upstream answered something that is not MCP.
    #[error("upstream {0} broke the protocol: {1}")]
    Protocol(String, String),
    /// The upstream reconnected since the caller last listed its tools: what it serves
    /// may have changed.
    #[error("upstream {0} restarted since its tools were listed")]
    Restarted(String),
}

/// Requests waiting on a stdio upstream, by id: each gets its answer's result (as the
/// upstream wrote it) or error.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Box<RawValue>, UpstreamError>>>>>;

/// A live stdio connection.
struct StdioConn {
    stdin: tokio::sync::Mutex<tokio::process::ChildStdin>,
    pending: Pending,
}

/// A live Streamable HTTP session.
struct HttpConn {
    client: HttpClient,
    session: Option<String>,
    protocol: String,
}

enum Conn {
    Stdio(StdioConn),
    Http(HttpConn),
}

/// One upstream: its configuration, live connection and last tool listing.
pub struct Upstream {
    pub config: UpstreamConfig,
    conn: tokio::sync::RwLock<Option<Arc<Conn>>>,
    /// Woken when the live connection is found broken.
    broken: Notify,
    /// Becomes true once the first connection attempt has finished (either way).
    tried: watch::Sender<bool>,
    next_id: AtomicU64,
    /// Why the last connection attempt or connection failed.
    last_error: Mutex<String>,
    restarts: AtomicU64,
    /// Connections made so far; the live one's number (changed under `conn`'s write lock).
    generation: AtomicU64,
}

impl Upstream {
    /// The upstream, not yet connected: [`spawn`](Self::spawn) its supervisor.
    pub fn new(config: UpstreamConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            conn: tokio::sync::RwLock::new(None),
            broken: Notify::new(),
            tried: watch::channel(false).0,
            next_id: AtomicU64::new(1),
            last_error: Mutex::new("not connected yet".into()),
            restarts: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        })
    }

    /// Starts the supervisor on the current tokio runtime; it runs until the runtime ends.
    pub fn spawn(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.supervise().await });
    }

    /// Waits (up to `limit`) until the first connection attempt has finished.
    pub async fn first_attempt(&self, limit: Duration) {
        let mut rx = self.tried.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|t| *t)).await;
    }

    /// Whether a connection is up.
    pub async fn is_up(&self) -> bool {
        self.conn.read().await.is_some()
    }

    /// The number of the latest connection (0 before the first): it changes whenever the
    /// upstream reconnects, so a listing made on an older one is stale.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Times the upstream has been reconnected after a failure.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    async fn supervise(self: Arc<Self>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let since = Instant::now();
            match self.connect().await {
                Ok((conn, exited)) => {
                    log::info!(
                        "MCP upstream {} connected ({})",
                        self.config.name,
                        self.describe()
                    );
                    {
                        let mut live = self.conn.write().await;
                        self.generation.fetch_add(1, Ordering::Relaxed);
                        *live = Some(conn);
                    }
                    self.tried.send_replace(true);
                    let why = match exited {
                        Some(exited) => tokio::select! {
                            status = exited => status.unwrap_or_else(|_| "exited".into()),
                            () = self.broken.notified() => "stopped answering".into(),
                        },
                        None => {
                            self.broken.notified().await;
                            "stopped answering".into()
                        }
                    };
                    *self.conn.write().await = None;
                    log::warn!("MCP upstream {} {why}; reconnecting", self.config.name);
                    *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = why;
                    self.restarts.fetch_add(1, Ordering::Relaxed);
                    if since.elapsed() >= STABLE {
                        backoff = BACKOFF_MIN;
                    }
                }
                Err(e) => {
                    log::warn!(
                        "MCP upstream {}: {e}; retrying in {backoff:?}",
                        self.config.name
                    );
                    *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e.to_string();
                    self.tried.send_replace(true);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn describe(&self) -> String {
        match &self.config.transport {
            Transport::Stdio { command, .. } => format!("stdio: {}", command.join(" ")),
            Transport::Http { url, .. } => url.clone(),
        }
    }

    fn unavailable(&self, why: impl Into<String>) -> UpstreamError {
        UpstreamError::Unavailable(self.config.name.clone(), why.into())
    }

    /// Connects and runs the handshake. For a process, also returns a receiver that
    /// resolves with its exit status.
    async fn connect(
        &self,
    ) -> Result<(Arc<Conn>, Option<oneshot::Receiver<String>>), UpstreamError> {
        match &self.config.transport {
            Transport::Stdio { command, env, cwd } => {
                let (conn, exited) = self.start_process(command, env, cwd.as_ref())?;
                let conn = Arc::new(Conn::Stdio(conn));
                let params = initialize_params();
                match self.exchange(&conn, "initialize", Some(&params)).await {
                    Ok(_) => {
                        self.notify(&conn, "notifications/initialized").await?;
                        Ok((conn, Some(exited)))
                    }
                    // Dropping the connection closes the process's stdin; kill_on_drop
                    // ends it.
                    Err(e) => Err(e),
                }
            }
            Transport::Http { url, ca, headers } => {
                let client =
                    HttpClient::new(url, ca.as_ref(), headers).map_err(|e| self.unavailable(e))?;
                let mut conn = HttpConn {
                    client,
                    session: None,
                    protocol: UPSTREAM_PROTOCOL.into(),
                };
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let msg = json!({"jsonrpc": "2.0", "id": id, "method": "initialize",
                    "params": initialize_params()});
                let reply = conn
                    .client
                    .post(&msg, None, None, self.config.timeout)
                    .await
                    .map_err(|e| self.unavailable(e.to_string()))?;
                let session = reply.session.clone();
                let result = rpc_result(&self.config.name, self.answer_in(&reply, id)?)?;
                #[derive(serde::Deserialize)]
                struct Initialized {
                    #[serde(rename = "protocolVersion")]
                    protocol_version: Option<String>,
                }
                if let Ok(Initialized {
                    protocol_version: Some(v),
                }) = serde_json::from_str(result.get())
                {
                    conn.protocol = v;
                }
                conn.session = session;
                let conn = Arc::new(Conn::Http(conn));
                self.notify(&conn, "notifications/initialized").await?;
                Ok((conn, None))
            }
        }
    }

    fn protocol(&self, why: impl Into<String>) -> UpstreamError {
        UpstreamError::Protocol(self.config.name.clone(), why.into())
    }

    fn start_process(
        &self,
        command: &[String],
        env: &BTreeMap<String, String>,
        cwd: Option<&PathBuf>,
    ) -> Result<(StdioConn, oneshot::Receiver<String>), UpstreamError> {
        let (program, args) = command
            .split_first()
            .ok_or_else(|| self.unavailable("empty command"))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| self.unavailable(format!("cannot start {program}: {e}")))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(self.unavailable("no pipes to the process"));
        };
        let pending: Pending = Arc::default();
        let name = self.config.name.clone();
        tokio::spawn({
            let name = name.clone();
            async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log::info!(target: "cloudlet::mcp::upstream", "{name}: {line}");
                }
            }
        });
        let (exit_tx, exit_rx) = oneshot::channel();
        tokio::spawn({
            let pending = pending.clone();
            async move {
                let mut reader = BufReader::new(stdout);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match (&mut reader)
                        .take(MAX_MESSAGE as u64)
                        .read_until(b'\n', &mut line)
                        .await
                    {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    if line.last() != Some(&b'\n') && line.len() >= MAX_MESSAGE {
                        log::warn!(
                            "MCP upstream {name} sent a message over {MAX_MESSAGE} bytes; stopping it"
                        );
                        // Ended, so the supervisor restarts it.
                        let _ = child.start_kill();
                        break;
                    }
                    route_reply(&name, &pending, &line);
                }
                // Fail everything in flight at once: the senders are dropped.
                pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
                let status = match child.wait().await {
                    Ok(s) => format!("exited ({s})"),
                    Err(e) => format!("exited (status unknown: {e})"),
                };
                let _ = exit_tx.send(status);
            }
        });
        Ok((
            StdioConn {
                stdin: tokio::sync::Mutex::new(stdin),
                pending,
            },
            exit_rx,
        ))
    }

    /// Sends a request on `conn` and waits for its result, which comes as the upstream
    /// wrote it.
    async fn exchange<P: serde::Serialize>(
        &self,
        conn: &Conn,
        method: &str,
        params: Option<&P>,
    ) -> Result<Box<RawValue>, UpstreamError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let msg = Outgoing {
            jsonrpc: "2.0",
            id,
            method,
            params,
        };
        let timeout = self.config.timeout;
        match conn {
            Conn::Stdio(c) => {
                let (tx, rx) = oneshot::channel();
                c.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, tx);
                if let Err(e) = self.write_line(c, &msg).await {
                    c.pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    return Err(e);
                }
                match tokio::time::timeout(timeout, rx).await {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(_)) => Err(self.unavailable("the process exited")),
                    Err(_) => {
                        c.pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id);
                        Err(UpstreamError::Timeout(self.config.name.clone(), timeout))
                    }
                }
            }
            Conn::Http(c) => {
                let reply = c
                    .client
                    .post(&msg, c.session.as_deref(), Some(&c.protocol), timeout)
                    .await;
                let reply = match reply {
                    Ok(r) => r,
                    Err(HttpFailure::Timeout) => {
                        return Err(UpstreamError::Timeout(self.config.name.clone(), timeout));
                    }
                    Err(e) => {
                        // Connection refused, session gone (404): reconnect.
                        self.broken.notify_one();
                        return Err(self.unavailable(e.to_string()));
                    }
                };
                rpc_result(&self.config.name, self.answer_in(&reply, id)?)
            }
        }
    }

    /// The answer to request `id` in `reply`.
    fn answer_in<'r>(&self, reply: &'r HttpReply, id: u64) -> Result<Incoming<'r>, UpstreamError> {
        reply
            .answer(id)
            .ok_or_else(|| self.protocol(format!("no answer to request {id} in the response")))
    }

    /// Writes one message, a line, to the process's stdin.
    async fn write_line(
        &self,
        c: &StdioConn,
        msg: &impl serde::Serialize,
    ) -> Result<(), UpstreamError> {
        let mut line = serde_json::to_vec(msg).map_err(|e| self.protocol(e.to_string()))?;
        line.push(b'\n');
        let mut stdin = c.stdin.lock().await;
        let written = async {
            stdin.write_all(&line).await?;
            stdin.flush().await
        };
        written
            .await
            .map_err(|e| self.unavailable(format!("writing to the process: {e}")))
    }

    async fn notify(&self, conn: &Conn, method: &str) -> Result<(), UpstreamError> {
        let msg = json!({"jsonrpc": "2.0", "method": method});
        match conn {
            Conn::Stdio(c) => self.write_line(c, &msg).await,
            Conn::Http(c) => c
                .client
                .post(
                    &msg,
                    c.session.as_deref(),
                    Some(&c.protocol),
                    self.config.timeout,
                )
                .await
                .map(drop)
                .map_err(|e| self.unavailable(e.to_string())),
        }
    }

    /// Sends `method` with `params` to the upstream and returns its result.
    pub async fn request(
        &self,
        method: &str,
        params: Option<Value>,
    ) -> Result<Value, UpstreamError> {
        let (_, result) = self.request_on(None, method, params.as_ref()).await?;
        self.parsed(&result)
    }

    /// Sends `method` with `params` on the connection numbered `generation` only (another
    /// one gives [`UpstreamError::Restarted`]) and returns the result as the upstream wrote
    /// it: what the guard relays is the upstream's own text.
    pub async fn request_if(
        &self,
        generation: u64,
        method: &str,
        params: &impl serde::Serialize,
    ) -> Result<Box<RawValue>, UpstreamError> {
        self.request_on(Some(generation), method, Some(params))
            .await
            .map(|(_, v)| v)
    }

    /// A result as a value.
    fn parsed(&self, result: &RawValue) -> Result<Value, UpstreamError> {
        serde_json::from_str(result.get()).map_err(|e| self.protocol(e.to_string()))
    }

    /// Sends the request on the live connection (if it is number `expect`, when given);
    /// the connection's number and the result.
    async fn request_on<P: serde::Serialize>(
        &self,
        expect: Option<u64>,
        method: &str,
        params: Option<&P>,
    ) -> Result<(u64, Box<RawValue>), UpstreamError> {
        let (conn, generation) = {
            let live = self.conn.read().await;
            (live.clone(), self.generation())
        };
        if conn.is_some() && expect.is_some_and(|g| g != generation) {
            return Err(UpstreamError::Restarted(self.config.name.clone()));
        }
        let Some(conn) = conn else {
            let why = self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            return Err(self.unavailable(why));
        };
        self.exchange(&conn, method, params)
            .await
            .map(|v| (generation, v))
    }

    /// All of the upstream's tools (following `nextCursor`), as it describes them.
    /// The number of the connection they were listed on comes with them.
    pub async fn list_tools(&self) -> Result<(u64, Vec<Value>), UpstreamError> {
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        let mut on = None;
        for _ in 0..1000 {
            let params = cursor.as_ref().map(|c| json!({ "cursor": c }));
            // Every page from the same connection.
            let (generation, result) = self.request_on(on, "tools/list", params.as_ref()).await?;
            let result = self.parsed(&result)?;
            on = Some(generation);
            match result.get("tools") {
                Some(Value::Array(page)) => tools.extend(page.iter().cloned()),
                _ => return Err(self.protocol("tools/list result has no `tools` list")),
            }
            cursor = result
                .get("nextCursor")
                .and_then(Value::as_str)
                .map(str::to_string);
            if cursor.is_none() {
                return Ok((generation, tools));
            }
        }
        Err(self.protocol("tools/list pages never end"))
    }
}

/// A request to an upstream, serialised as it stands.
#[derive(serde::Serialize)]
struct Outgoing<'a, P> {
    jsonrpc: &'static str,
    id: u64,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<&'a P>,
}

/// A JSON-RPC message from an upstream, read as far as routing it needs: its result stays
/// text, relayed as the upstream wrote it (key order, number spelling and all).
#[derive(serde::Deserialize)]
struct Incoming<'a> {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default, borrow, deserialize_with = "present")]
    result: Option<&'a RawValue>,
    /// An `"error": null` beside a result (JSON-RPC 1.0's habit) is no error.
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    method: Option<String>,
}

impl<'a> Incoming<'a> {
    /// Reads a message: a JSON object (an array, which would fill the fields in order, is
    /// refused: the guard sends no batches).
    fn read(text: &'a str) -> serde_json::Result<Self> {
        if !text.trim_start().starts_with('{') {
            return Err(serde::de::Error::custom("a JSON-RPC message is an object"));
        }
        serde_json::from_str(text)
    }

    /// The request this answers (with a result or an error), if it is an answer.
    fn answer_to(&self) -> Option<u64> {
        self.id
            .as_ref()
            .and_then(Value::as_u64)
            .filter(|_| self.result.is_some() || self.error.is_some())
    }

    fn answers(&self, id: u64) -> bool {
        self.answer_to() == Some(id)
    }
}

/// For a field that is `Some` whenever its key is there, `null` included (with
/// `#[serde(default)]` for when it is not).
pub(super) fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

fn initialize_params() -> Value {
    json!({
        "protocolVersion": UPSTREAM_PROTOCOL,
        "capabilities": {},
        "clientInfo": {"name": "cloudlet-mcp-guard", "version": env!("CARGO_PKG_VERSION")},
    })
}

/// Hands an upstream's message to the request waiting for it. Requests from the upstream
/// (sampling, elicitation) are not supported by the guard and go unanswered here; the
/// upstream's own timeout ends them.
fn route_reply(name: &str, pending: &Pending, line: &[u8]) {
    let Some(incoming) = std::str::from_utf8(line)
        .ok()
        .and_then(|text| Incoming::read(text).ok())
    else {
        log::debug!(
            "MCP upstream {name}: not a JSON-RPC message: {}",
            String::from_utf8_lossy(line)
        );
        return;
    };
    match incoming.answer_to() {
        Some(id) => {
            if let Some(tx) = pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id)
            {
                let _ = tx.send(rpc_result(name, incoming));
            }
        }
        None => log::debug!(
            "MCP upstream {name}: ignored {}",
            incoming.method.as_deref().unwrap_or("a message")
        ),
    }
}

/// The `result` of a JSON-RPC answer, or its error.
fn rpc_result(upstream: &str, answer: Incoming) -> Result<Box<RawValue>, UpstreamError> {
    if let Some(error) = &answer.error {
        return Err(UpstreamError::Rpc {
            upstream: upstream.to_string(),
            code: error.get("code").and_then(Value::as_i64).unwrap_or(-32603),
            message: error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            data: error.get("data").cloned(),
        });
    }
    match answer.result {
        Some(r) => Ok(r.to_owned()),
        None => Err(UpstreamError::Protocol(
            upstream.to_string(),
            "an answer with neither result nor error".into(),
        )),
    }
}

/// Why an HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
enum HttpFailure {
    #[error("{0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("HTTP {0}: {1}")]
    Status(u16, String),
    #[error("{0}")]
    Body(String),
}

/// One POST's outcome.
#[derive(Debug)]
struct HttpReply {
    session: Option<String>,
    /// JSON-RPC messages in the body (one for a JSON answer, any number in an SSE stream).
    messages: Vec<Box<RawValue>>,
}

impl HttpReply {
    /// The answer to request `id`.
    fn answer(&self, id: u64) -> Option<Incoming<'_>> {
        self.messages
            .iter()
            .find_map(|m| Incoming::read(m.get()).ok().filter(|m| m.answers(id)))
    }
}

/// A small HTTP/1.1 client for one Streamable HTTP endpoint, keeping idle connections.
struct HttpClient {
    authority: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// What follows the method in every request: the target, `Host` and the configured
    /// headers.
    head: Vec<u8>,
    /// Lower-case names of the configured headers, which replace the client's own.
    configured: Vec<String>,
    idle: Mutex<Vec<http1::Connection>>,
}

/// Whether `value` may go into a header line as it is.
fn header_safe(value: &str) -> bool {
    !value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

impl HttpClient {
    fn new(
        url: &str,
        ca: Option<&PathBuf>,
        headers: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
        let host = uri.host().ok_or_else(|| format!("no host in {url}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("{url}: only http:// and https:// are supported")),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let authority = if bare.contains(':') {
            format!("[{bare}]:{port}")
        } else {
            format!("{bare}:{port}")
        };
        let tls = if https {
            let ca = ca.map_or(Path::new(SYSTEM_CA_BUNDLE), PathBuf::as_path);
            let roots =
                crate::quic::roots_from_pem(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            let config =
                crate::quic::client_config(crate::quic::PqMode::Preferred, roots, &[b"http/1.1"])
                    .map_err(|e| e.to_string())?;
            let name = rustls::pki_types::ServerName::try_from(bare.to_string())
                .map_err(|e| format!("{url}: {e}"))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        let mut configured = Vec::new();
        let mut lines = String::new();
        for (k, v) in headers {
            let name =
                http::HeaderName::try_from(k.as_str()).map_err(|e| format!("header {k}: {e}"))?;
            // Visible ASCII and tabs only: nothing that could end the line.
            http::HeaderValue::try_from(v.as_str()).map_err(|e| format!("header {k}: {e}"))?;
            lines.push_str(&format!("{}: {v}\r\n", name.as_str()));
            configured.push(name.as_str().to_string());
        }
        let target = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = format!(" {target} HTTP/1.1\r\n");
        if !configured.iter().any(|n| n == "host") {
            head.push_str(&format!("host: {authority}\r\n"));
        }
        head.push_str(&lines);
        Ok(Self {
            authority,
            tls,
            head: head.into_bytes(),
            configured,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// A whole request: `method`, the client's `fields` (left out where the configuration
    /// sets the same header) and `body` with its length.
    fn request(
        &self,
        method: &str,
        fields: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Vec<u8>, HttpFailure> {
        let body_len = body.map_or(0, <[u8]>::len);
        let mut r = Vec::with_capacity(method.len() + self.head.len() + 192 + body_len);
        r.extend_from_slice(method.as_bytes());
        r.extend_from_slice(&self.head);
        for (name, value) in fields {
            if self.configured.iter().any(|n| n == name) {
                continue;
            }
            if !header_safe(value) {
                return Err(HttpFailure::Body(format!(
                    "{name}: control characters in {value:?}"
                )));
            }
            for part in [name.as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
                r.extend_from_slice(part);
            }
        }
        if let Some(body) = body {
            r.extend_from_slice(format!("content-length: {body_len}\r\n\r\n").as_bytes());
            r.extend_from_slice(body);
        } else {
            r.extend_from_slice(b"\r\n");
        }
        Ok(r)
    }

    /// An idle connection that is still open, or a new one.
    async fn connection(&self) -> Result<http1::Connection, HttpFailure> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match idle {
                Some(c) if !c.is_closed() => return Ok(c),
                Some(_) => continue,
                None => break,
            }
        }
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| HttpFailure::Connect(format!("connecting to {}: {e}", self.authority)))?;
        let _ = tcp.set_nodelay(true);
        let stream = match &self.tls {
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await.map_err(|e| {
                    HttpFailure::Connect(format!("TLS with {}: {e}", self.authority))
                })?;
                http1::Stream::Tls(Box::new(tls))
            }
            None => http1::Stream::Plain(tcp),
        };
        Ok(http1::Connection::new(stream))
    }

    /// Sends `request` on an idle connection (or a new one) and reads the whole answer;
    /// the connection goes back to the idle ones if it stays open. Non-2xx answers are
    /// errors carrying the start of their body.
    async fn exchange(&self, request: &[u8]) -> Result<http1::Response, HttpFailure> {
        let mut conn = self.connection().await?;
        let (response, reusable) =
            conn.exchange(request, MAX_MESSAGE)
                .await
                .map_err(|e| match e {
                    http1::Http1Error::Io(_) | http1::Http1Error::Closed => {
                        HttpFailure::Connect(format!("{}: {e}", self.authority))
                    }
                    other => HttpFailure::Body(other.to_string()),
                })?;
        if reusable {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        }
        if !(200..300).contains(&response.status) {
            let body = &response.body;
            return Err(HttpFailure::Status(
                response.status,
                String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            ));
        }
        Ok(response)
    }

    /// `GET` of the URL's path; the body as text (2xx only).
    async fn get(&self, timeout: Duration) -> Result<String, HttpFailure> {
        let fetch = async {
            let request = self.request("GET", &[("accept", "application/json")], None)?;
            let response = self.exchange(&request).await?;
            String::from_utf8(response.body.to_vec()).map_err(|e| HttpFailure::Body(e.to_string()))
        };
        tokio::time::timeout(timeout, fetch)
            .await
            .map_err(|_| HttpFailure::Timeout)?
    }

    async fn post(
        &self,
        msg: &impl serde::Serialize,
        session: Option<&str>,
        protocol: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpReply, HttpFailure> {
        tokio::time::timeout(timeout, self.post_now(msg, session, protocol))
            .await
            .map_err(|_| HttpFailure::Timeout)?
    }

    async fn post_now(
        &self,
        msg: &impl serde::Serialize,
        session: Option<&str>,
        protocol: Option<&str>,
    ) -> Result<HttpReply, HttpFailure> {
        let body = serde_json::to_vec(msg).map_err(|e| HttpFailure::Body(e.to_string()))?;
        let mut fields = vec![
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
        ];
        if let Some(s) = session {
            fields.push(("mcp-session-id", s));
        }
        if let Some(p) = protocol {
            fields.push(("mcp-protocol-version", p));
        }
        let request = self.request("POST", &fields, Some(&body))?;
        let response = self.exchange(&request).await?;
        let sse = response.content_type.as_deref().is_some_and(|k| {
            k.get(..17)
                .is_some_and(|k| k.eq_ignore_ascii_case("text/event-stream"))
        });
        let messages = if response.status == 202 || response.body.is_empty() {
            Vec::new()
        } else if sse {
            sse_messages(&response.body)
        } else {
            vec![
                serde_json::from_slice(&response.body)
                    .map_err(|e| HttpFailure::Body(e.to_string()))?,
            ]
        };
        Ok(HttpReply {
            session: response.session,
            messages,
        })
    }
}

/// The JSON messages in an SSE body: each event's `data:` lines joined with newlines.
fn sse_messages(body: &[u8]) -> Vec<Box<RawValue>> {
    let text = String::from_utf8_lossy(body);
    let mut out = Vec::new();
    let mut data = String::new();
    for line in text.lines().chain(std::iter::once("")) {
        if line.is_empty() {
            if !data.is_empty()
                && let Ok(v) = RawValue::from_string(std::mem::take(&mut data))
            {
                out.push(v);
            }
        } else if let Some(rest) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
        }
    }
    out
}

/// Fetches `url` (`http://` or `https://`, trusting `ca` or the system's bundle) and returns
/// its body as text: a JWKS, for the guard's issuers.
pub async fn fetch_text(
    url: &str,
    ca: Option<&PathBuf>,
    timeout: Duration,
) -> Result<String, String> {
    let client = HttpClient::new(url, ca, &BTreeMap::new())?;
    client.get(timeout).await.map_err(|e| format!("{url}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_bodies_give_their_json_messages() {
        let body = b": comment\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\n\ndata: not json\n\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\ndata: \"result\":{}}\n\n";
        let msgs = sse_messages(body);
        assert_eq!(msgs.len(), 1);
        assert_eq!(
            msgs[0].get(),
            "{\"jsonrpc\":\"2.0\",\"id\":7,\n\"result\":{}}"
        );
        let reply = HttpReply {
            session: None,
            messages: msgs,
        };
        assert!(reply.answer(7).is_some() && reply.answer(8).is_none());
    }

    #[test]
    fn json_rpc_errors_are_kept_and_results_relayed_as_written() {
        let answer = |text: &str| rpc_result("u", Incoming::read(text).unwrap());
        let e = answer(r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"bad"}}"#)
            .unwrap_err();
        assert!(matches!(e, UpstreamError::Rpc { code: -32602, .. }), "{e}");
        // Key order, spacing and numbers past f64's precision stay as the upstream wrote them.
        let result = r#"{"z": 1, "a": 123456789012345678901234567890, "e": 1.0e3}"#;
        let text = format!(r#"{{"jsonrpc":"2.0","id":1,"result":{result},"error":null}}"#);
        assert_eq!(answer(&text).unwrap().get(), result);
        // A null result is a result.
        assert_eq!(
            answer(r#"{"jsonrpc":"2.0","id":1,"result":null}"#)
                .unwrap()
                .get(),
            "null"
        );
        assert!(matches!(
            answer(r#"{"jsonrpc":"2.0","id":1}"#),
            Err(UpstreamError::Protocol(..))
        ));
        let incoming = Incoming::read(&text).unwrap();
        assert!(incoming.answers(1) && !incoming.answers(2));
        let notification =
            Incoming::read(r#"{"jsonrpc":"2.0","method":"notifications/message"}"#).unwrap();
        assert!(!notification.answers(1));
        // An array would fill the fields in order (an id, then a result): not a message.
        assert!(serde_json::from_str::<Incoming>(r#"[1, {"a": 1}]"#).is_ok_and(|m| m.answers(1)));
        assert!(Incoming::read(r#"[1, {"a": 1}]"#).is_err());
    }

    /// An HTTPS upstream: requests carry the client's and the configured headers (these
    /// replacing the client's own), ride one kept-alive TLS connection, and header values
    /// with line breaks are refused before anything is sent.
    #[test]
    fn https_requests_share_one_connection_and_carry_their_headers() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = std::env::temp_dir().join(format!("cloudlet-https-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let id = crate::quic::self_signed(&["localhost"]).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &id.cert_pem).unwrap();
        let config = crate::quic::server_config(
            crate::quic::PqMode::Preferred,
            vec![id.cert.clone()],
            id.key.clone_key(),
            &[b"http/1.1"],
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        runtime().block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let (heads_tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<String>();
            tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut tls = acceptor.accept(tcp).await.unwrap();
                let mut seen = Vec::new();
                for n in 0.. {
                    let end = loop {
                        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end;
                        }
                        let mut b = [0u8; 4096];
                        match tls.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => seen.extend_from_slice(&b[..k]),
                        }
                    };
                    let head = String::from_utf8_lossy(&seen[..end]).into_owned();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.parse().unwrap());
                    while seen.len() < end + 4 + len {
                        let mut b = [0u8; 4096];
                        let k = tls.read(&mut b).await.unwrap();
                        seen.extend_from_slice(&b[..k]);
                    }
                    let body: Value = serde_json::from_slice(&seen[end + 4..end + 4 + len]).unwrap();
                    seen.drain(..end + 4 + len);
                    heads_tx.send(head).unwrap();
                    let answer = json!({"jsonrpc": "2.0", "id": body["id"], "result": {"n": n}}).to_string();
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nmcp-session-id: s-{n}\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    tls.write_all(reply.as_bytes()).await.unwrap();
                }
            });
            let headers: BTreeMap<String, String> = [
                ("authorization".to_string(), "Bearer k".to_string()),
                ("Accept".to_string(), "application/json".to_string()),
            ]
            .into();
            let client = HttpClient::new(
                &format!("https://localhost:{port}/mcp?x=1"),
                Some(&ca),
                &headers,
            )
            .unwrap();
            for n in 0..2 {
                let msg = json!({"jsonrpc": "2.0", "id": 40 + n, "method": "ping"});
                let reply = client
                    .post(&msg, Some("s"), Some("2025-11-25"), Duration::from_secs(5))
                    .await
                    .unwrap();
                assert_eq!(reply.session.as_deref(), Some(format!("s-{n}").as_str()));
                let result = rpc_result("u", reply.answer(40 + n).unwrap()).unwrap();
                let result: Value = serde_json::from_str(result.get()).unwrap();
                assert_eq!(result["n"], n);
                let head = heads.recv().await.unwrap();
                let lines: Vec<&str> = head.split("\r\n").collect();
                assert_eq!(lines[0], "POST /mcp?x=1 HTTP/1.1", "{head}");
                for want in [
                    format!("host: localhost:{port}"),
                    "authorization: Bearer k".into(),
                    "accept: application/json".into(),
                    "content-type: application/json".into(),
                    "mcp-session-id: s".into(),
                    "mcp-protocol-version: 2025-11-25".into(),
                ] {
                    assert!(lines.contains(&want.as_str()), "{want} missing: {head}");
                }
                assert_eq!(lines.iter().filter(|l| l.starts_with("accept:")).count(), 1, "{head}");
            }
            let msg = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
            let e = client
                .post(&msg, Some("s\r\nx-injected: 1"), None, Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(e.to_string().contains("control characters"), "{e}");
            assert!(heads.try_recv().is_err(), "a refused request was sent");
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    use crate::test_runtime as runtime;

    /// A shell-script MCP server: answers `initialize` and `tools/list`, exits on `tools/call`.
    fn script_upstream(dir: &std::path::Path) -> Arc<Upstream> {
        let script = dir.join("server.sh");
        std::fs::write(
            &script,
            r#"while read -r line; do
  id=$(printf '%s' "$line" | sed -n 's/.*"id":\([0-9]*\).*/\1/p')
  case "$line" in
    *'"initialize"'*) echo "{\"jsonrpc\":\"2.0\",\"id\":$id,\"result\":{\"protocolVersion\":\"2025-11-25\",\"capabilities\":{},\"serverInfo\":{\"name\":\"sh\",\"version\":\"1\"}}}" ;;
    *'"tools/list"'*) echo "{\"jsonrpc\":\"2.0\",\"id\":$id,\"result\":{\"tools\":[{\"name\":\"t\",\"inputSchema\":{\"type\":\"object\"}}]}}" ;;
    *'"tools/call"'*) exit 3 ;;
  esac
done
"#,
        )
        .unwrap();
        Upstream::new(UpstreamConfig {
            name: "sh".into(),
            prefix: "sh".into(),
            transport: Transport::Stdio {
                command: vec!["sh".into(), script.display().to_string()],
                env: BTreeMap::new(),
                cwd: None,
            },
            timeout: Duration::from_secs(5),
        })
    }

    #[test]
    fn a_crashed_process_fails_its_requests_and_is_restarted() {
        let dir = std::env::temp_dir().join(format!("cloudlet-upstream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let up = script_upstream(&dir);
        runtime().block_on(async {
            up.spawn();
            let t = Instant::now();
            up.first_attempt(Duration::from_secs(5)).await;
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "first attempt not reported"
            );
            assert!(up.is_up().await);
            let (first, tools) = up.list_tools().await.unwrap();
            assert_eq!(tools[0]["name"], "t");
            assert_eq!(first, up.generation());
            let e = up
                .request("tools/call", Some(json!({"name":"t"})))
                .await
                .unwrap_err();
            assert!(matches!(e, UpstreamError::Unavailable(..)), "{e}");
            // Back within the first backoff step.
            let deadline = Instant::now() + Duration::from_secs(5);
            while up.restarts() == 0 || !up.is_up().await {
                assert!(Instant::now() < deadline, "not restarted");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (second, tools) = up.list_tools().await.unwrap();
            assert_eq!(tools.len(), 1);
            assert!(second > first, "{second} after {first}");
            // A request bound to the first connection is refused on the new one.
            let e = up
                .request_if(first, "tools/list", &json!({}))
                .await
                .unwrap_err();
            assert!(matches!(e, UpstreamError::Restarted(..)), "{e}");
            up.request_if(second, "tools/list", &json!({}))
                .await
                .unwrap();
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_command_that_cannot_start_is_unavailable() {
        let up = Upstream::new(UpstreamConfig {
            name: "none".into(),
            prefix: "none".into(),
            transport: Transport::Stdio {
                command: vec!["/nonexistent/mcp-server".into()],
                env: BTreeMap::new(),
                cwd: None,
            },
            timeout: Duration::from_secs(1),
        });
        runtime().block_on(async {
            up.spawn();
            up.first_attempt(Duration::from_secs(5)).await;
            let e = up.list_tools().await.unwrap_err();
            assert!(e.to_string().contains("cannot start"), "{e}");
        });
    }
}
