//! The gRPC front end (`bitnet serve --grpc-port PORT`): `bitnet.v1.Generation` from
//! `proto/bitnet.proto`, unary and server-streaming, with server reflection and optional TLS.
//! Each call is the HTTP API's completions or chat request (the same checks, scheduler,
//! API keys and limits), so both front ends answer a request alike.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::StatusCode;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Map, Value};
use tonic::{Request, Response, Status};

use super::api::ApiError;
use super::generate::Piece;
use super::handlers::{start_request, Kind, Started};
use super::AppState;
use crate::error::{Error, Result};

/// The code generated from `proto/bitnet.proto` (service and client).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("bitnet.v1");

    /// The encoded descriptor set of the proto, for server reflection.
    pub const DESCRIPTOR: &[u8] = tonic::include_file_descriptor_set!("bitnet_descriptor");
}

use proto::generate_chunk::Event;
use proto::generate_request::Input;
use proto::generation_server::{Generation, GenerationServer};
use proto::{End, GenerateChunk, GenerateRequest, GenerateResponse, Usage};

/// TLS for the gRPC port: PEM certificate chain and private key files.
#[derive(Debug, Clone)]
pub struct GrpcTls {
    /// The certificate chain.
    pub cert: std::path::PathBuf,
    /// The private key.
    pub key: std::path::PathBuf,
}

fn status(e: ApiError) -> Status {
    let code = match e.status {
        StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => tonic::Code::InvalidArgument,
        StatusCode::UNAUTHORIZED => tonic::Code::Unauthenticated,
        StatusCode::FORBIDDEN => tonic::Code::PermissionDenied,
        StatusCode::NOT_FOUND => tonic::Code::NotFound,
        StatusCode::TOO_MANY_REQUESTS => tonic::Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
        _ => tonic::Code::Internal,
    };
    let message = match e.param {
        Some(p) => format!("{}: {}", p, e.message),
        None => e.message,
    };
    Status::new(code, message)
}

/// The HTTP endpoint's JSON body for `r`, and which endpoint reads it.
fn http_body(r: GenerateRequest) -> (Kind, Value) {
    let mut body = Map::new();
    let kind = match r.input {
        Some(Input::Chat(c)) => {
            let messages: Vec<Value> = c
                .messages
                .into_iter()
                .map(|m| json!({ "role": m.role, "content": m.content }))
                .collect();
            body.insert("messages".into(), messages.into());
            Kind::Chat
        }
        Some(Input::Tokens(t)) => {
            body.insert("prompt".into(), t.ids.into());
            Kind::Text
        }
        Some(Input::Prompt(p)) => {
            body.insert("prompt".into(), p.into());
            Kind::Text
        }
        None => Kind::Text,
    };
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            body.insert(k.into(), v);
        }
    };
    put(
        "model",
        Some(r.model).filter(|m| !m.is_empty()).map(Value::from),
    );
    put("max_tokens", r.max_tokens.map(Value::from));
    put("temperature", r.temperature.map(Value::from));
    put("top_p", r.top_p.map(Value::from));
    put("top_k", r.top_k.map(Value::from));
    put("seed", r.seed.map(Value::from));
    put(
        "stop",
        Some(r.stop).filter(|s| !s.is_empty()).map(Value::from),
    );
    put("presence_penalty", r.presence_penalty.map(Value::from));
    put("frequency_penalty", r.frequency_penalty.map(Value::from));
    put("regex", r.regex.map(Value::from));
    put("grammar", r.grammar.map(Value::from));
    put("priority", r.priority.map(Value::from));
    let schema = r.json_schema.map(|s| {
        // Unparseable text is passed as a string: the schema check names it.
        let schema = serde_json::from_str::<Value>(&s).unwrap_or(Value::String(s));
        json!({ "type": "json_schema", "json_schema": { "name": "output", "schema": schema } })
    });
    put("response_format", schema);
    (kind, Value::Object(body))
}

/// Starts `req` as its HTTP twin would be started.
async fn start(state: &Arc<AppState>, req: Request<GenerateRequest>) -> Result<Started, Status> {
    let bearer = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let (kind, body) = http_body(req.into_inner());
    if body.get("prompt").is_none() && body.get("messages").is_none() {
        return Err(Status::invalid_argument(
            "input: one of prompt, tokens or chat is required",
        ));
    }
    start_request(state, kind, body.to_string().as_bytes(), &bearer)
        .await
        .map_err(status)
}

fn usage(prompt: usize, completion: usize) -> Usage {
    Usage {
        prompt_tokens: prompt as u32,
        completion_tokens: completion as u32,
    }
}

/// The service over the server's state.
pub struct Service(Arc<AppState>);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Generation for Service {
    async fn generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let mut s = start(&self.0, req).await?;
        let mut text = String::new();
        while let Some(p) = s.pieces.next().await {
            match p.map_err(Status::internal)? {
                Piece::Text(t, _) => text.push_str(&t),
                Piece::End {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    if let Some(c) = &mut s.charge {
                        c.generated(completion_tokens);
                    }
                    return Ok(Response::new(GenerateResponse {
                        id: s.id,
                        model: s.model,
                        text,
                        finish_reason: finish.into(),
                        usage: Some(usage(prompt_tokens, completion_tokens)),
                    }));
                }
            }
        }
        Err(Status::internal("generation ended without a result"))
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let s = start(&self.0, req).await?;
        let mut charge = s.charge;
        let chunks = s.pieces.map(move |p| {
            let event = match p.map_err(Status::internal)? {
                Piece::Text(t, _) => Event::Text(t),
                Piece::End {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    if let Some(c) = &mut charge {
                        c.generated(completion_tokens);
                    }
                    Event::End(End {
                        finish_reason: finish.into(),
                        usage: Some(usage(prompt_tokens, completion_tokens)),
                    })
                }
            };
            Ok(GenerateChunk { event: Some(event) })
        });
        Ok(Response::new(Box::pin(chunks)))
    }
}

/// Serves gRPC on `listener` until `shutdown` resolves.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    tls: Option<GrpcTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::DESCRIPTOR)
        .build_v1()
        .map_err(|e| Error::Backend(format!("gRPC reflection: {e}")))?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| Error::Request(format!("{}: {e}", p.display())))
        };
        let identity = tonic::transport::Identity::from_pem(read(&t.cert)?, read(&t.key)?);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| Error::Request(format!("--grpc-tls-cert/--grpc-tls-key: {e}")))?;
    }
    let max = state.opts.max_body_bytes;
    let incoming = permitted(listener, state.connections.clone());
    builder
        .concurrency_limit_per_connection(CALLS_PER_CONNECTION)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(reflection)
        .add_service(GenerationServer::new(Service(state)).max_decoding_message_size(max))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::Backend(format!("gRPC server: {e}")))
}

/// Calls one connection may have in flight at once.
const CALLS_PER_CONNECTION: usize = 256;

/// A gRPC connection holding one of the server's connection permits (shared with HTTP).
struct Permitted {
    io: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tokio::io::AsyncRead for Permitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Permitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Permitted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The connections `listener` accepts, each once a permit is free (at `--max-connections`
/// open connections, HTTP and gRPC together, the next waits).
fn permitted(
    listener: tokio::net::TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
) -> impl Stream<Item = std::io::Result<Permitted>> {
    futures_util::stream::unfold((listener, permits), |(listener, permits)| async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return None;
            };
            match listener.accept().await {
                Ok((io, _)) => {
                    let _ = io.set_nodelay(true);
                    let conn = Permitted {
                        io,
                        _permit: permit,
                    };
                    return Some((Ok(conn), (listener, permits)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// Binds the gRPC port on `host`.
pub async fn bind(host: &str, port: u16) -> Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .map_err(|e| Error::Request(format!("cannot listen on {host}:{port} (gRPC): {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Backend(e.to_string()))?;
    Ok((listener, local))
}
