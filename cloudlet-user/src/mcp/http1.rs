//! The guard's HTTP/1.1 client connection to a Streamable HTTP upstream.
//!
//! A request is written with one `write` and its response read in the caller's own task,
//! with no connection task beside it: the guard forwards one call at a time per connection,
//! and each hop between tasks costs more than the parsing itself. Responses are read
//! whole (`Content-Length`, chunked, or up to the end of the connection); interim `1xx`
//! responses are skipped. A connection goes back to the caller for reuse only when its
//! response ended cleanly and did not ask to close.

use std::{
    io,
    task::{Context, Poll},
};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Longest response head read.
const MAX_HEAD: usize = 64 << 10;
/// Most header lines in a response head.
const MAX_HEADERS: usize = 64;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the connection closed before the response ended")]
    Closed,
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("response body over {0} bytes")]
    TooLarge(usize),
}

/// A plain or TLS stream to the upstream.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => s.get_ref().0,
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.write_all(data).await,
            Self::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
        }
    }

    async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 << 10);
        }
        match self {
            Self::Plain(s) => s.read_buf(buf).await,
            Self::Tls(s) => s.read_buf(buf).await,
        }
    }
}

/// One response, read whole.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: Option<String>,
    pub session: Option<String>,
    pub body: Bytes,
}

/// How the body of a response is delimited.
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

/// A kept-alive HTTP/1.1 connection with what it has read ahead.
pub struct Connection {
    stream: Stream,
    buf: BytesMut,
}

impl Connection {
    pub fn new(stream: Stream) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(16 << 10),
        }
    }

    /// Whether the peer has closed the idle connection (or sent bytes nobody asked for,
    /// on a plain one). Costs no system call while the connection is quiet.
    pub fn is_closed(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut peek = tokio::io::ReadBuf::new(&mut byte);
        match self.stream.tcp().poll_peek(&mut cx, &mut peek) {
            Poll::Pending => false,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => true,
            // A TLS peer may send records of its own (session tickets) at any time.
            Poll::Ready(Ok(_)) => matches!(self.stream, Stream::Plain(_)),
        }
    }

    /// Sends `request` (a whole request, head and body) and reads its response; the
    /// response and whether the connection may carry another request.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        max_body: usize,
    ) -> Result<(Response, bool), Http1Error> {
        self.stream.write_all(request).await?;
        self.read_response(max_body).await
    }

    async fn fill(&mut self) -> Result<(), Http1Error> {
        match self.stream.read_buf(&mut self.buf).await? {
            0 => Err(Http1Error::Closed),
            _ => Ok(()),
        }
    }

    async fn read_response(&mut self, max_body: usize) -> Result<(Response, bool), Http1Error> {
        let (status, content_type, session, framing, mut reusable) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut head = httparse::Response::new(&mut headers);
            let n = match head.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => {
                    if self.buf.len() > MAX_HEAD {
                        return Err(Http1Error::Malformed(format!("head over {MAX_HEAD} bytes")));
                    }
                    self.fill().await?;
                    continue;
                }
                Err(e) => return Err(Http1Error::Malformed(e.to_string())),
            };
            let status = head.code.unwrap_or(0);
            if (100..200).contains(&status) && status != 101 {
                // Interim (100 Continue, 103 Early Hints): the response follows.
                self.buf.advance(n);
                continue;
            }
            let mut reusable = head.version == Some(1);
            let (mut length, mut chunked) = (None, false);
            let (mut content_type, mut session) = (None, None);
            for h in head.headers.iter() {
                let text = || String::from_utf8_lossy(h.value).trim().to_string();
                if h.name.eq_ignore_ascii_case("content-length") {
                    let v = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .ok_or_else(|| Http1Error::Malformed("bad Content-Length".into()))?;
                    if length.is_some_and(|l| l != v) {
                        return Err(Http1Error::Malformed("conflicting Content-Length".into()));
                    }
                    length = Some(v);
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    let v = text();
                    chunked = v
                        .rsplit(',')
                        .next()
                        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
                    if !chunked {
                        return Err(Http1Error::Malformed(format!(
                            "unsupported Transfer-Encoding {v}"
                        )));
                    }
                } else if h.name.eq_ignore_ascii_case("connection") {
                    if text()
                        .split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("close"))
                    {
                        reusable = false;
                    }
                } else if h.name.eq_ignore_ascii_case("content-type") {
                    content_type = Some(text());
                } else if h.name.eq_ignore_ascii_case("mcp-session-id") {
                    session = Some(text());
                }
            }
            let framing = if status == 204 || status == 304 || status == 101 {
                Framing::Empty
            } else if chunked {
                Framing::Chunked
            } else if let Some(l) = length {
                Framing::Length(l)
            } else {
                Framing::UntilClose
            };
            self.buf.advance(n);
            break (status, content_type, session, framing, reusable);
        };
        let body = match framing {
            Framing::Empty => Bytes::new(),
            Framing::Length(n) => {
                if n > max_body {
                    return Err(Http1Error::TooLarge(max_body));
                }
                while self.buf.len() < n {
                    self.fill().await?;
                }
                self.buf.split_to(n).freeze()
            }
            Framing::Chunked => self.read_chunked(max_body).await?,
            Framing::UntilClose => {
                reusable = false;
                loop {
                    if self.buf.len() > max_body {
                        return Err(Http1Error::TooLarge(max_body));
                    }
                    match self.stream.read_buf(&mut self.buf).await? {
                        0 => break,
                        _ => continue,
                    }
                }
                self.buf.split().freeze()
            }
        };
        // Bytes beyond the response: nothing was asked for them.
        reusable &= self.buf.is_empty();
        Ok((
            Response {
                status,
                content_type,
                session,
                body,
            },
            reusable,
        ))
    }

    /// A chunked body, its trailers skipped.
    async fn read_chunked(&mut self, max_body: usize) -> Result<Bytes, Http1Error> {
        let mut body = BytesMut::new();
        let mut at = 0;
        loop {
            let (n, size) = match httparse::parse_chunk_size(&self.buf[at..]) {
                Ok(httparse::Status::Complete(c)) => c,
                Ok(httparse::Status::Partial) => {
                    self.fill().await?;
                    continue;
                }
                Err(_) => return Err(Http1Error::Malformed("bad chunk size".into())),
            };
            if size == 0 {
                at += n;
                // Trailer lines, up to an empty one.
                loop {
                    match self.buf[at..].windows(2).position(|w| w == b"\r\n") {
                        Some(0) => {
                            at += 2;
                            self.buf.advance(at);
                            return Ok(body.freeze());
                        }
                        Some(line) => at += line + 2,
                        None => self.fill().await?,
                    }
                }
            }
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if size > max_body.saturating_sub(body.len()) {
                return Err(Http1Error::TooLarge(max_body));
            }
            let end = at + n + size;
            while self.buf.len() < end + 2 {
                self.fill().await?;
            }
            if &self.buf[end..end + 2] != b"\r\n" {
                return Err(Http1Error::Malformed("chunk without its CRLF".into()));
            }
            body.extend_from_slice(&self.buf[at + n..end]);
            at = end + 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_runtime as runtime;

    /// A server that reads one request head (and its `Content-Length` body) per entry of
    /// `answers` and writes the entry back, in `pieces` writes; then closes.
    async fn serve(answers: Vec<Vec<u8>>, pieces: usize) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for answer in answers {
                // Read up to the end of a head and its body.
                loop {
                    if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&seen[..end]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                        if seen.len() >= end + 4 + len {
                            seen.drain(..end + 4 + len);
                            break;
                        }
                    }
                    let mut b = [0u8; 4096];
                    let n = s.read(&mut b).await.unwrap();
                    assert!(n > 0, "client closed early");
                    seen.extend_from_slice(&b[..n]);
                }
                let step = answer.len().div_ceil(pieces).max(1);
                for part in answer.chunks(step) {
                    s.write_all(part).await.unwrap();
                    s.flush().await.unwrap();
                    tokio::task::yield_now().await;
                }
            }
        });
        addr
    }

    async fn connect(addr: std::net::SocketAddr) -> Connection {
        Connection::new(Stream::Plain(TcpStream::connect(addr).await.unwrap()))
    }

    const REQUEST: &[u8] = b"POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}";

    #[test]
    fn lengths_chunks_and_interim_responses_are_read_and_the_connection_kept() {
        runtime().block_on(async {
            let answers = vec![
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: s1\r\nContent-Length: 7\r\n\r\n{\"a\":1}".to_vec(),
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\n{\"b\r\n4\r\n\":2}\r\n0\r\nX-Trailer: y\r\n\r\n".to_vec(),
                b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n".to_vec(),
                b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 4\r\n\r\ngone".to_vec(),
            ];
            for pieces in [1, 7] {
                let mut c = connect(serve(answers.clone(), pieces).await).await;
                let (r, keep) = c.exchange(REQUEST, 1 << 20).await.unwrap();
                assert_eq!(
                    (r.status, r.content_type.as_deref(), r.session.as_deref(), &r.body[..], keep),
                    (200, Some("application/json"), Some("s1"), &b"{\"a\":1}"[..], true)
                );
                assert!(!c.is_closed());
                let (r, keep) = c.exchange(REQUEST, 1 << 20).await.unwrap();
                assert_eq!((r.status, &r.body[..], keep), (200, &b"{\"b\":2}"[..], true));
                let (r, keep) = c.exchange(REQUEST, 1 << 20).await.unwrap();
                assert_eq!((r.status, &r.body[..], keep), (202, &b""[..], true));
                let (r, keep) = c.exchange(REQUEST, 1 << 20).await.unwrap();
                assert_eq!((r.status, &r.body[..], keep), (404, &b"gone"[..], false));
            }
        });
    }

    #[test]
    fn a_body_up_to_the_close_ends_the_connection() {
        runtime().block_on(async {
            let answers = vec![b"HTTP/1.1 200 OK\r\n\r\nall of it".to_vec()];
            let mut c = connect(serve(answers, 3).await).await;
            let (r, keep) = c.exchange(REQUEST, 1 << 20).await.unwrap();
            assert_eq!((&r.body[..], keep), (&b"all of it"[..], false));
        });
    }

    #[test]
    fn a_closed_idle_connection_is_seen() {
        runtime().block_on(async {
            let answers = vec![b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()];
            let mut c = connect(serve(answers, 1).await).await;
            c.exchange(REQUEST, 1 << 20).await.unwrap();
            // The server closes after its one answer.
            let mut closed = false;
            for _ in 0..200 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                if c.is_closed() {
                    closed = true;
                    break;
                }
            }
            assert!(closed);
        });
    }

    #[test]
    fn bad_responses_are_errors() {
        runtime().block_on(async {
            let cases: Vec<(&[u8], &str)> = vec![
                (
                    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
                    "closed before",
                ),
                (
                    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                    "bad Content-Length",
                ),
                (
                    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                    "conflicting",
                ),
                (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                    "unsupported Transfer-Encoding",
                ),
                (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                    "bad chunk size",
                ),
                (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd",
                    "without its CRLF",
                ),
                (
                    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
                    "over 50 bytes",
                ),
                (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n",
                    "over 50 bytes",
                ),
                (b"NOT HTTP\r\n\r\n", "malformed"),
            ];
            for (answer, want) in cases {
                let mut c = connect(serve(vec![answer.to_vec()], 1).await).await;
                let e = c.exchange(REQUEST, 50).await.unwrap_err().to_string();
                assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(answer));
            }
        });
    }
}
