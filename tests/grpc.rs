//! `bitnet serve --grpc-port`: the generated Rust client against the real server, its streams
//! compared with the HTTP API's SSE streams, reflection, errors, API keys and TLS.
#![cfg(feature = "server")]

use std::collections::HashMap;

use bitnet_inference::serve::grpc::proto::generate_chunk::Event;
use bitnet_inference::serve::grpc::proto::generate_request::Input;
use bitnet_inference::serve::grpc::proto::generation_client::GenerationClient;
use bitnet_inference::serve::grpc::proto::{Chat, ChatMessage, GenerateRequest, TokenIds};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

mod common;

use common::server::Server;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn client(addr: &str) -> GenerationClient<Channel> {
    GenerationClient::connect(addr.to_string()).await.unwrap()
}

/// The text pieces and the end (finish reason, prompt and completion tokens) of a stream.
async fn grpc_stream(
    c: &mut GenerationClient<Channel>,
    r: GenerateRequest,
) -> (Vec<String>, (String, u32, u32)) {
    let mut s = c.generate_stream(r).await.unwrap().into_inner();
    let (mut pieces, mut end) = (Vec::new(), None);
    while let Some(chunk) = s.next().await {
        match chunk.unwrap().event.unwrap() {
            Event::Text(t) => {
                assert!(end.is_none(), "text after the end");
                pieces.push(t)
            }
            Event::End(e) => {
                let u = e.usage.unwrap();
                end = Some((e.finish_reason, u.prompt_tokens, u.completion_tokens));
            }
        }
    }
    (pieces, end.expect("the stream ended without its end"))
}

/// The same over HTTP SSE: every chunk's text (empty role-only openings left out), the end.
fn http_stream(s: &Server, path: &str, mut body: Value) -> (Vec<String>, (String, u32, u32)) {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (chunks, done) = s.stream_chunks(path, body);
    assert!(done);
    let (mut pieces, mut finish, mut usage) = (Vec::new(), String::new(), (0, 0));
    for c in chunks {
        if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
            usage = (
                u["prompt_tokens"].as_u64().unwrap() as u32,
                u["completion_tokens"].as_u64().unwrap() as u32,
            );
        }
        for ch in c["choices"].as_array().unwrap() {
            let text = ch["delta"]["content"].as_str().or(ch["text"].as_str());
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                pieces.push(t.to_string());
            }
            if let Some(f) = ch["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (pieces, (finish, usage.0, usage.1))
}

fn request(input: Input, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        input: Some(input),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

#[test]
fn grpc_streams_equal_the_http_streams_for_greedy_requests() {
    let s = Server::start(&common::fixture(), &["--grpc-port", "0"]);
    let addr = s.grpc.clone().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut c = client(&addr).await;
        let prompts = ["In the beginning", "And God said", "The", "Blessed are"];
        for (i, p) in prompts.iter().enumerate() {
            let max = 8 + 7 * i as u32;
            let g = grpc_stream(&mut c, request(Input::Prompt(p.to_string()), max)).await;
            let h = http_stream(
                &s,
                "/v1/completions",
                json!({"prompt": p, "max_tokens": max, "temperature": 0}),
            );
            assert_eq!(g, h, "prompt {p:?}");
            assert!(g.1 .2 > 0);
            let whole = c
                .generate(request(Input::Prompt(p.to_string()), max))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(whole.text, g.0.concat());
            assert_eq!(whole.finish_reason, g.1 .0);
            assert!(whole.id.starts_with("cmpl-"));
        }
        // Chat, token-id prompts and stop strings.
        let chat = Input::Chat(Chat {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "Who made the light?".into(),
            }],
        });
        let g = grpc_stream(&mut c, request(chat, 20)).await;
        let h = http_stream(
            &s,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Who made the light?"}],
                   "max_tokens": 20, "temperature": 0}),
        );
        assert_eq!(g, h);
        let ids = vec![5, 17, 42, 99];
        let g = grpc_stream(&mut c, request(Input::Tokens(TokenIds { ids: ids.clone() }), 10)).await;
        let h = http_stream(
            &s,
            "/v1/completions",
            json!({"prompt": ids, "max_tokens": 10, "temperature": 0}),
        );
        assert_eq!(g, h);
        let mut r = request(Input::Prompt("In the beginning".into()), 30);
        r.stop = vec!["the".into()];
        let g = grpc_stream(&mut c, r).await;
        let h = http_stream(
            &s,
            "/v1/completions",
            json!({"prompt": "In the beginning", "max_tokens": 30, "temperature": 0, "stop": ["the"]}),
        );
        assert_eq!(g, h);

        // Errors carry the HTTP API's messages under gRPC codes.
        let mut bad = request(Input::Prompt("x".into()), 4);
        bad.temperature = Some(5.0);
        let e = c.generate(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("temperature"), "{}", e.message());
        let e = c
            .generate(GenerateRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let mut other = request(Input::Prompt("x".into()), 4);
        other.model = "no-such-model".into();
        let e = c.generate_stream(other).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
    });
}

#[test]
fn reflection_lists_the_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let s = Server::start(&common::fixture(), &["--grpc-port", "0"]);
    let addr = s.grpc.clone().unwrap();
    runtime().block_on(async {
        let channel = Channel::from_shared(addr).unwrap().connect().await.unwrap();
        let mut c = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = c
            .server_reflection_info(futures_util::stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let msg = resp.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("not a service list: {msg:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.iter().any(|n| n == "bitnet.v1.Generation"),
            "{names:?}"
        );
    });
}

#[test]
fn api_keys_and_tls_guard_the_grpc_port() {
    let dir = std::env::temp_dir().join(format!("bitnet-grpc-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    std::fs::write(dir.join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &key_pem).unwrap();
    std::fs::write(
        dir.join("keys.json"),
        r#"[{"name": "alice", "key": "alice-key-1", "requests_per_minute": 3}]"#,
    )
    .unwrap();
    let s = Server::start(
        &common::fixture(),
        &[
            "--grpc-port",
            "0",
            "--grpc-tls-cert",
            dir.join("cert.pem").to_str().unwrap(),
            "--grpc-tls-key",
            dir.join("key.pem").to_str().unwrap(),
            "--api-keys",
            dir.join("keys.json").to_str().unwrap(),
        ],
    );
    let addr = s.grpc.clone().unwrap();
    assert!(addr.starts_with("https://"), "{addr}");
    let port = addr.rsplit(':').next().unwrap().to_string();
    runtime().block_on(async {
        // Without TLS the handshake fails.
        let plain = GenerationClient::connect(format!("http://127.0.0.1:{port}")).await;
        if let Ok(mut c) = plain {
            assert!(c
                .generate(request(Input::Prompt("x".into()), 2))
                .await
                .is_err());
        }
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&cert_pem))
            .domain_name("localhost");
        let channel = Channel::from_shared(format!("https://localhost:{port}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = GenerationClient::new(channel);
        let e = c
            .generate(request(Input::Prompt("x".into()), 2))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut codes = HashMap::new();
        for _ in 0..5 {
            let mut r = tonic::Request::new(request(Input::Prompt("In the".into()), 4));
            r.metadata_mut()
                .insert("authorization", "Bearer alice-key-1".parse().unwrap());
            let code = match c.generate(r).await {
                Ok(resp) => {
                    assert!(!resp.into_inner().text.is_empty());
                    tonic::Code::Ok
                }
                Err(e) => e.code(),
            };
            *codes.entry(code).or_insert(0) += 1;
        }
        assert_eq!(codes.get(&tonic::Code::Ok), Some(&3), "{codes:?}");
        assert_eq!(
            codes.get(&tonic::Code::ResourceExhausted),
            Some(&2),
            "{codes:?}"
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}
