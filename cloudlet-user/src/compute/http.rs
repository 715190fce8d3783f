//! `POST /v1/embeddings`, OpenAI-compatible: `input` a string or a list of strings,
//! `model`, optional `encoding_format` (`float` or `base64`) and `user`; the answer holds
//! `data[].embedding` and `usage`. Bad requests get a 400 with an OpenAI-style error object,
//! a full queue a 503 with `Retry-After`.

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Value, json};

use super::{
    MAX_TOKENS, MODEL_NAME,
    dispatch::{DispatchError, Dispatcher},
};

/// Limits of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Inputs in one request at most.
    pub max_inputs: usize,
    /// Request body bytes at most.
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_inputs: 256,
            max_body: 1 << 20,
        }
    }
}

/// The endpoint: the dispatcher behind it and the request limits.
pub struct EmbeddingsService {
    pub dispatcher: Dispatcher,
    pub limits: Limits,
}

/// Names the model is asked by.
const MODEL_ALIASES: &[&str] = &[MODEL_NAME, "sentence-transformers/all-MiniLM-L6-v2"];

/// An OpenAI-style error answer.
fn error(
    status: u16,
    kind: &str,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> http::Response<Bytes> {
    json_answer(
        status,
        &json!({ "error": { "message": message, "type": kind, "param": param, "code": code } }),
    )
}

fn invalid(message: &str, param: &str) -> http::Response<Bytes> {
    error(400, "invalid_request_error", message, Some(param), None)
}

fn json_answer(status: u16, body: &Value) -> http::Response<Bytes> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Bytes::from(body.to_string()))
        .unwrap_or_default()
}

impl EmbeddingsService {
    /// Answers one request from `client` (its fairness key: the peer's address).
    pub async fn handle(
        &self,
        request: http::Request<Bytes>,
        client: &str,
    ) -> http::Response<Bytes> {
        if request.method() != http::Method::POST {
            let mut r = error(405, "invalid_request_error", "use POST", None, None);
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            return r;
        }
        let body = request.body();
        if body.len() > self.limits.max_body {
            return error(
                413,
                "invalid_request_error",
                &format!("the body is over {} bytes", self.limits.max_body),
                None,
                None,
            );
        }
        let v: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return invalid(&format!("the body is not JSON: {e}"), "body"),
        };
        let Some(obj) = v.as_object() else {
            return invalid("the body must be a JSON object", "body");
        };
        match obj.get("model").and_then(Value::as_str) {
            Some(m) if MODEL_ALIASES.contains(&m) => {}
            Some(m) => {
                return error(
                    404,
                    "invalid_request_error",
                    &format!(
                        "the model `{m}` does not exist here; this node serves `{MODEL_NAME}`"
                    ),
                    Some("model"),
                    Some("model_not_found"),
                );
            }
            None => return invalid("`model` must be given, as a string", "model"),
        }
        let base64 = match obj.get("encoding_format") {
            None | Some(Value::Null) => false,
            Some(Value::String(f)) if f == "float" => false,
            Some(Value::String(f)) if f == "base64" => true,
            Some(_) => {
                return invalid(
                    "`encoding_format` must be `float` or `base64`",
                    "encoding_format",
                );
            }
        };
        if obj.contains_key("dimensions") && obj["dimensions"] != json!(384) {
            return invalid("this model has 384 dimensions only", "dimensions");
        }
        let texts: Vec<String> = match obj.get("input") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => {
                if items.is_empty() {
                    return invalid("`input` must not be an empty list", "input");
                }
                if items.len() > self.limits.max_inputs {
                    return invalid(
                        &format!(
                            "`input` holds {} items, at most {} are taken",
                            items.len(),
                            self.limits.max_inputs
                        ),
                        "input",
                    );
                }
                let mut texts = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => texts.push(s.clone()),
                        _ => {
                            return invalid(
                                &format!(
                                    "`input[{i}]` is not a string (token arrays are not taken)"
                                ),
                                "input",
                            );
                        }
                    }
                }
                texts
            }
            Some(_) => return invalid("`input` must be a string or a list of strings", "input"),
            None => return invalid("`input` must be given", "input"),
        };
        let receiver = match self.dispatcher.submit(client, texts) {
            Ok(r) => r,
            Err(DispatchError::Busy { .. }) => {
                let mut r = error(
                    503,
                    "server_error",
                    "the embedding queue is full; retry shortly",
                    None,
                    Some("overloaded"),
                );
                r.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static("1"),
                );
                return r;
            }
            Err(e) => return error(503, "server_error", &e.to_string(), None, None),
        };
        let embeddings = match receiver.await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => return error(500, "server_error", &e.to_string(), None, None),
            Err(_) => {
                return error(
                    503,
                    "server_error",
                    "the dispatcher has stopped",
                    None,
                    None,
                );
            }
        };
        let data: Vec<Value> = embeddings
            .vectors
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({ "object": "embedding", "index": i, "embedding": embedding })
            })
            .collect();
        let mut body = json!({
            "object": "list",
            "data": data,
            "model": MODEL_NAME,
            "usage": { "prompt_tokens": embeddings.tokens, "total_tokens": embeddings.tokens },
        });
        let list = embeddings
            .truncated
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",");
        if !embeddings.truncated.is_empty() {
            // Said twice: in the body for those who read it, in a header for those who do not.
            body["truncated"] = json!({
                "inputs": embeddings.truncated,
                "max_tokens": MAX_TOKENS,
            });
        }
        let mut response = json_answer(200, &body);
        if !list.is_empty()
            && let Ok(v) = http::HeaderValue::from_str(&list)
        {
            response
                .headers_mut()
                .insert("cloudlet-truncated-inputs", v);
        }
        response
    }
}
