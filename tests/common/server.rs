//! The real `bitnet serve` binary on a loopback port, and an HTTP client for it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A running `bitnet serve` on a loopback port, killed when dropped.
pub struct Server {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The gRPC address (`http(s)://127.0.0.1:PORT`) when started with `--grpc-port`.
    pub grpc: Option<String>,
}

impl Server {
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .args(["serve", "--port", "0", "--threads", "2", "--model"])
            .arg(model)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let grpc = extra.contains(&"--grpc-port").then(|| {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            line.trim()
                .strip_prefix("grpc listening on ")
                .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
                .to_string()
        });
        let s = Server { child, base, grpc };
        let t0 = Instant::now();
        while s.get("/health").0 != 200 {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "server never became ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let r = agent().get(&self.url(path)).call();
        match r {
            Ok(mut r) => (
                r.status().as_u16(),
                r.body_mut().read_to_string().unwrap_or_default(),
            ),
            Err(_) => (0, String::new()),
        }
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, Value, Option<String>) {
        self.post_as(path, body, None)
    }

    /// [`Server::post`] with `Authorization: Bearer KEY`.
    pub fn post_as(
        &self,
        path: &str,
        body: &str,
        key: Option<&str>,
    ) -> (u16, Value, Option<String>) {
        let mut req = agent()
            .post(&self.url(path))
            .header("content-type", "application/json");
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let mut r = req.send(body).unwrap();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r.body_mut().read_to_string().unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        (r.status().as_u16(), v, retry)
    }

    /// A streaming request's data chunks (parsed) and whether [DONE] came.
    pub fn stream_chunks(&self, path: &str, body: Value) -> (Vec<Value>, bool) {
        let r = agent()
            .post(&self.url(path))
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let mut chunks = Vec::new();
        for line in BufReader::new(r.into_body().into_reader()).lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                return (chunks, true);
            }
            chunks.push(serde_json::from_str(data).unwrap());
        }
        (chunks, false)
    }

    /// A streaming request: the concatenated text, the finish reason, whether [DONE] came.
    pub fn stream(&self, path: &str, body: Value) -> (String, String, bool) {
        let (chunks, done) = self.stream_chunks(path, body);
        let mut text = String::new();
        let mut finish = String::new();
        for v in chunks {
            for c in v["choices"].as_array().unwrap() {
                let piece = c["delta"]["content"].as_str().or(c["text"].as_str());
                text.push_str(piece.unwrap_or(""));
                if let Some(f) = c["finish_reason"].as_str() {
                    finish = f.to_string();
                }
            }
        }
        (text, finish, done)
    }

    /// Streams greedy completions of all `prompts` concurrently, one client thread each.
    pub fn stream_all<P: serde::Serialize + Sync>(
        &self,
        prompts: &[P],
        max_tokens: usize,
    ) -> Vec<(String, String, bool)> {
        std::thread::scope(|sc| {
            let hs: Vec<_> = prompts
                .iter()
                .map(|p| {
                    let body = json!({
                        "prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": true
                    });
                    sc.spawn(move || self.stream("/v1/completions", body))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client that returns error statuses as responses.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}
