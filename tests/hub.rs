//! `--model owner/name[@revision]` against a local server with the Hub's URL layout
//! (`HF_ENDPOINT=http://127.0.0.1:PORT`): the first run downloads into `HF_HOME`, the second
//! runs offline from the cache, an interrupted download resumes where it stopped, and a
//! missing repository names itself. The CLI binary runs as users run it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

mod common;
use common::TempDir;

const REPO: &str = "tiny-org/tiny-bitnet";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// What the server saw and how it misbehaves.
#[derive(Default)]
struct State {
    /// (path, Range header) of every request.
    log: Vec<(String, Option<String>)>,
    /// Cut the body of this file's first full download halfway.
    cut_once: Option<String>,
}

/// A Hub lookalike serving `files` of one repository at one commit.
struct Hub {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl Hub {
    fn start(files: HashMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let (files, st) = (Arc::new(files), state.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (files, st) = (files.clone(), st.clone());
                std::thread::spawn(move || serve(stream, &files, &st));
            }
        });
        Hub { port, state }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

fn serve(mut s: TcpStream, files: &HashMap<String, Vec<u8>>, st: &Mutex<State>) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.trim().split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    st.lock().unwrap().log.push((path.clone(), range.clone()));
    let info = format!("/api/models/{REPO}/revision/main");
    if path == info {
        let siblings: Vec<_> = files
            .keys()
            .map(|f| serde_json::json!({"rfilename": f}))
            .collect();
        let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
        let h = vec![("Content-Length".into(), body.len().to_string())];
        return respond(&mut s, "200 OK", &h, body.as_bytes());
    }
    let prefix = format!("/{REPO}/resolve/main/");
    let Some(data) = path.strip_prefix(&prefix).and_then(|f| files.get(f)) else {
        let body = b"Repository not found";
        let h = vec![("Content-Length".into(), body.len().to_string())];
        return respond(&mut s, "404 Not Found", &h, body);
    };
    let file = path[prefix.len()..].to_string();
    let n = data.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b = if b.is_empty() {
                n - 1
            } else {
                b.parse().unwrap()
            };
            (a, b.min(n - 1))
        }
        None => (0, n - 1),
    };
    let body = &data[start..=end];
    let mut h = vec![
        ("x-repo-commit".to_string(), COMMIT.to_string()),
        ("etag".to_string(), format!("\"{:016x}{n:08x}\"", fnv(data))),
        ("Content-Length".to_string(), body.len().to_string()),
        (
            "Content-Range".to_string(),
            format!("bytes {start}-{end}/{n}"),
        ),
    ];
    h.push(("Accept-Ranges".into(), "bytes".into()));
    let cut = {
        let mut g = st.lock().unwrap();
        let cut = body.len() > 1 && g.cut_once.as_deref() == Some(file.as_str());
        if cut {
            g.cut_once = None;
        }
        cut
    };
    let body = if cut { &body[..body.len() / 2] } else { body };
    respond(&mut s, "206 Partial Content", &h, body);
}

fn fnv(d: &[u8]) -> u64 {
    d.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

fn fixture_files() -> HashMap<String, Vec<u8>> {
    let dir = Path::new("tests/fixtures/tiny");
    [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ]
    .iter()
    .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
    .collect()
}

fn generate(hub: &Hub, home: &Path, model: &str, offline: bool) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bitnet"));
    c.args([
        "generate",
        "--model",
        model,
        "--backend",
        "cpu",
        "--prompt",
        "The harbour",
        "--max-tokens",
        "6",
        "--json",
    ])
    .env("HF_HOME", home)
    .env("HF_ENDPOINT", hub.endpoint())
    .env_remove("HF_TOKEN");
    if offline {
        c.env("HF_HUB_OFFLINE", "1");
    }
    c.output().unwrap()
}

fn text_of(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["text"].as_str().unwrap().to_string()
}

#[test]
fn downloads_then_runs_offline_resumes_and_names_missing_repos() {
    let hub = Hub::start(fixture_files());
    let home = TempDir::new("hf-home");
    // A path on disk is used as it is; no request reaches the server.
    let local = generate(&hub, home.path(), "tests/fixtures/tiny", false);
    let want = text_of(&local);

    // An interrupted download of the weights: the first run fails, the second resumes.
    hub.state.lock().unwrap().cut_once = Some("model.safetensors".into());
    let first = generate(&hub, home.path(), REPO, false);
    assert!(!first.status.success(), "a cut download must fail");
    let err = String::from_utf8_lossy(&first.stderr).to_string();
    assert!(
        err.contains("model.safetensors") && err.contains(REPO),
        "{err}"
    );
    hub.state.lock().unwrap().log.clear();
    assert_eq!(text_of(&generate(&hub, home.path(), REPO, false)), want);
    let resumed = hub.state.lock().unwrap().log.iter().any(|(p, r)| {
        p.ends_with("/model.safetensors")
            && r.as_deref()
                .is_some_and(|r| r != "bytes=0-0" && !r.starts_with("bytes=0-"))
    });
    assert!(resumed, "the second run must resume with a Range request");
    let snapshot = home
        .path()
        .join("hub/models--tiny-org--tiny-bitnet/snapshots")
        .join(COMMIT)
        .join("model.safetensors");
    assert_eq!(
        std::fs::read(&snapshot).unwrap(),
        std::fs::read("tests/fixtures/tiny/model.safetensors").unwrap()
    );

    // Offline: no request reaches the server.
    hub.state.lock().unwrap().log.clear();
    assert_eq!(text_of(&generate(&hub, home.path(), REPO, true)), want);
    assert!(hub.state.lock().unwrap().log.is_empty());

    // A repository the server does not have.
    let out = generate(&hub, home.path(), "tiny-org/missing", false);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("tiny-org/missing") && err.contains("404"),
        "{err}"
    );
    // Offline with nothing cached: a clear error too.
    let out = generate(&hub, home.path(), "tiny-org/missing", true);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("offline") && err.contains("tiny-org/missing"),
        "{err}"
    );
}
