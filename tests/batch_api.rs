//! The Batch API of `bitnet serve` (`/v1/files`, `/v1/batches`) as clients use it: uploads,
//! batches run to the end, a SIGKILL mid-batch and a restart, cancels, bad inputs and keys.
#![cfg(feature = "server")]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::server::{agent, Server};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-batch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Uploads `jsonl` with `purpose` through a multipart form, as the OpenAI clients do.
fn upload(s: &Server, jsonl: &str, purpose: &str, key: Option<&str>) -> (u16, Value) {
    let boundary = "bitnet-test-boundary-7f3a";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{jsonl}\r\n--{boundary}--\r\n"
    );
    let mut req = agent().post(&s.url("/v1/files")).header(
        "content-type",
        format!("multipart/form-data; boundary={boundary}"),
    );
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let mut r = req.send(body).unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    (r.status().as_u16(), serde_json::from_str(&text).unwrap())
}

fn get_as(s: &Server, path: &str, key: Option<&str>) -> (u16, String) {
    let mut req = agent().get(&s.url(path));
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let mut r = req.call().unwrap();
    (
        r.status().as_u16(),
        r.body_mut().read_to_string().unwrap_or_default(),
    )
}

fn get_json(s: &Server, path: &str) -> Value {
    let (code, text) = s.get(path);
    assert_eq!(code, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// Polls batch `id` until `done` holds for it (or panics after `limit`).
fn wait_for(s: &Server, id: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let b = get_json(s, &format!("/v1/batches/{id}"));
        if done(&b) {
            return b;
        }
        assert!(t0.elapsed() < limit, "batch never got there: {b}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `n` greedy completion requests; every `bad_every`-th asks for an impossible temperature.
fn requests(n: usize, bad_every: usize) -> String {
    (0..n)
        .map(|i| {
            let temperature = if i % bad_every == bad_every - 1 { 5 } else { 0 };
            json!({
                "custom_id": format!("req-{i}"),
                "method": "POST",
                "url": "/v1/completions",
                "body": {
                    "prompt": format!("In the beginning {i}"),
                    "max_tokens": 24,
                    "temperature": temperature,
                },
            })
            .to_string()
                + "\n"
        })
        .collect()
}

fn file_lines(s: &Server, id: &Value) -> Vec<Value> {
    let id = id.as_str().unwrap();
    let (code, text) = s.get(&format!("/v1/files/{id}/content"));
    assert_eq!(code, 200, "{text}");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn results_log(dir: &Path, batch: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("batches/{batch}.results.jsonl")))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn five_hundred_requests_survive_a_sigkill_and_finish_exactly_once() {
    let dir = temp_dir("kill");
    let model = common::fixture();
    let args = ["--batch-dir", dir.to_str().unwrap(), "--max-batch", "2"];
    let s = Server::start(&model, &args);
    let (code, file) = upload(&s, &requests(500, 100), "batch", None);
    assert_eq!(code, 200, "{file}");
    assert_eq!(file["purpose"], "batch");
    let (code, batch, _) = s.post(
        "/v1/batches",
        &json!({
            "input_file_id": file["id"], "endpoint": "/v1/completions",
            "completion_window": "24h", "metadata": {"job": "nightly"},
        })
        .to_string(),
    );
    assert_eq!(code, 200, "{batch}");
    assert_eq!(batch["status"], "in_progress");
    assert_eq!(batch["request_counts"]["total"], 500);
    let id = batch["id"].as_str().unwrap().to_string();
    // An interactive request meanwhile is served ahead of the batch.
    let (code, v, _) = s.post(
        "/v1/completions",
        r#"{"prompt": "Hello", "max_tokens": 4, "temperature": 0}"#,
    );
    assert_eq!(code, 200, "{v}");
    wait_for(&s, &id, Duration::from_secs(120), |b| {
        b["request_counts"]["completed"].as_u64().unwrap() >= 60
    });
    drop(s); // SIGKILL
    let before = results_log(&dir, &id).len();
    assert!(
        (60..500).contains(&before),
        "the kill came at {before} of 500 results"
    );

    let s = Server::start(&model, &args);
    let done = wait_for(&s, &id, Duration::from_secs(300), |b| {
        b["status"] == "completed"
    });
    assert_eq!(done["request_counts"]["completed"], 495, "{done}");
    assert_eq!(done["request_counts"]["failed"], 5, "{done}");
    assert_eq!(done["metadata"]["job"], "nightly");
    // Every request ran once: the results log holds each line exactly once.
    let log = results_log(&dir, &id);
    assert_eq!(log.len(), 500, "results were lost or repeated");
    let output = file_lines(&s, &done["output_file_id"]);
    let errors = file_lines(&s, &done["error_file_id"]);
    assert_eq!((output.len(), errors.len()), (495, 5));
    let mut seen = std::collections::HashSet::new();
    for (i, row) in output.iter().enumerate() {
        let cid = row["custom_id"].as_str().unwrap();
        assert!(seen.insert(cid.to_string()), "{cid} twice");
        assert_eq!(row["response"]["status_code"], 200);
        assert_eq!(row["response"]["body"]["object"], "text_completion");
        // The answer is the one the same request gets interactively.
        if i % 97 == 0 {
            let n: usize = cid.strip_prefix("req-").unwrap().parse().unwrap();
            let (_, direct, _) = s.post(
                "/v1/completions",
                &json!({"prompt": format!("In the beginning {n}"), "max_tokens": 24, "temperature": 0})
                    .to_string(),
            );
            assert_eq!(
                row["response"]["body"]["choices"][0]["text"],
                direct["choices"][0]["text"]
            );
        }
    }
    for row in &errors {
        let n: usize = row["custom_id"].as_str().unwrap()[4..].parse().unwrap();
        assert_eq!(n % 100, 99);
        assert_eq!(row["response"]["status_code"], 400);
        assert_eq!(row["response"]["body"]["error"]["param"], "temperature");
    }
    let listed = get_json(&s, "/v1/batches?limit=5");
    assert_eq!(listed["data"][0]["id"], id.as_str());
    let files = get_json(&s, "/v1/files");
    assert_eq!(files["data"].as_array().unwrap().len(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_cancels_and_other_keys_batches() {
    let dir = temp_dir("misc");
    let keys = dir.join("keys.json");
    std::fs::write(
        &keys,
        r#"[{"name": "alice", "key": "alice-key-1"}, {"name": "bob", "key": "bob-key-22"}]"#,
    )
    .unwrap();
    let off = Server::start(&common::fixture(), &[]);
    let (code, v) = upload(&off, "{}\n", "batch", None);
    assert_eq!(code, 404);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--batch-dir"));
    drop(off);

    let s = Server::start(
        &common::fixture(),
        &[
            "--batch-dir",
            dir.join("store").to_str().unwrap(),
            "--api-keys",
            keys.to_str().unwrap(),
            "--max-batch",
            "2",
            "--max-file-mb",
            "1",
        ],
    );
    let post = |path: &str, body: Value, key: &str| s.post_as(path, &body.to_string(), Some(key));
    // Wrong purpose, too large a file.
    let (code, v) = upload(&s, "{}\n", "fine-tune", Some("alice-key-1"));
    assert_eq!((code, v["error"]["param"].as_str()), (400, Some("purpose")));
    let big = "x".repeat(1 << 20) + "\n";
    let (code, _) = upload(&s, &big, "batch", Some("alice-key-1"));
    assert_eq!(code, 413);
    // Bad lines fail the batch at once, each named by its line.
    let bad = [
        json!({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}).to_string(),
        "not json".into(),
        json!({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}).to_string(),
        json!({"custom_id": "b", "method": "GET", "url": "/v1/completions", "body": {}}).to_string(),
        json!({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {}}).to_string(),
    ]
    .join("\n");
    let (_, f) = upload(&s, &bad, "batch", Some("alice-key-1"));
    let create = json!({"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h"});
    let (code, b, _) = post("/v1/batches", create.clone(), "alice-key-1");
    assert_eq!(code, 200);
    assert_eq!(b["status"], "failed");
    let errs: Vec<(u64, &str)> = b["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        errs,
        [
            (2, "invalid_json_line"),
            (3, "duplicate_custom_id"),
            (4, "invalid_method"),
            (5, "mismatched_endpoint")
        ]
    );
    // Wrong endpoint and window.
    let (code, v, _) = post(
        "/v1/batches",
        json!({"input_file_id": f["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}),
        "alice-key-1",
    );
    assert_eq!(
        (code, v["error"]["param"].as_str()),
        (400, Some("endpoint"))
    );
    let (code, v, _) = post(
        "/v1/batches",
        json!({"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "1h"}),
        "alice-key-1",
    );
    assert_eq!(
        (code, v["error"]["param"].as_str()),
        (400, Some("completion_window"))
    );
    // Bob sees none of alice's files or batches.
    let (code, _) = get_as(
        &s,
        &format!("/v1/files/{}", f["id"].as_str().unwrap()),
        Some("bob-key-22"),
    );
    assert_eq!(code, 404);
    let (code, v, _) = post("/v1/batches", create, "bob-key-22");
    assert_eq!(code, 404, "{v}");
    let (code, _) = get_as(
        &s,
        &format!("/v1/batches/{}", b["id"].as_str().unwrap()),
        Some("bob-key-22"),
    );
    assert_eq!(code, 404);
    let (_, list) = get_as(&s, "/v1/files", Some("bob-key-22"));
    assert_eq!(
        serde_json::from_str::<Value>(&list).unwrap()["data"],
        json!([])
    );
    let (code, _) = get_as(&s, "/v1/files/..%2Fkeys", Some("alice-key-1"));
    assert_eq!(code, 404);

    // A cancel stops a running batch; what finished is written out.
    let (_, f) = upload(&s, &requests(2000, 10000), "batch", Some("alice-key-1"));
    let (_, b, _) = post(
        "/v1/batches",
        json!({"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h"}),
        "alice-key-1",
    );
    let id = b["id"].as_str().unwrap();
    // A second batch queued behind it is cancelled at once, none of it run.
    let (_, f2) = upload(&s, &requests(5, 1000), "batch", Some("alice-key-1"));
    let (_, b2, _) = post(
        "/v1/batches",
        json!({"input_file_id": f2["id"], "endpoint": "/v1/completions", "completion_window": "24h"}),
        "alice-key-1",
    );
    let (code, v, _) = post(
        &format!("/v1/batches/{}/cancel", b2["id"].as_str().unwrap()),
        json!({}),
        "alice-key-1",
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(v["request_counts"]["completed"], 0, "{v}");
    // The running batch's input cannot be deleted from under it.
    let r = agent()
        .delete(&s.url(&format!("/v1/files/{}", f["id"].as_str().unwrap())))
        .header("authorization", "Bearer alice-key-1")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let t0 = Instant::now();
    loop {
        let (_, v) = get_as(&s, &format!("/v1/batches/{id}"), Some("alice-key-1"));
        let v: Value = serde_json::from_str(&v).unwrap();
        if v["request_counts"]["completed"].as_u64().unwrap() >= 10 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(10));
    }
    let (code, v, _) = post(
        &format!("/v1/batches/{id}/cancel"),
        json!({}),
        "alice-key-1",
    );
    assert_eq!(code, 200, "{v}");
    let t0 = Instant::now();
    let done = loop {
        let (_, v) = get_as(&s, &format!("/v1/batches/{id}"), Some("alice-key-1"));
        let v: Value = serde_json::from_str(&v).unwrap();
        if v["status"] == "cancelled" {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{v}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let finished = done["request_counts"]["completed"].as_u64().unwrap();
    assert!((10..2000).contains(&finished), "{done}");
    assert_eq!(done["request_counts"]["failed"], 0, "{done}");
    let (code, out) = get_as(
        &s,
        &format!(
            "/v1/files/{}/content",
            done["output_file_id"].as_str().unwrap()
        ),
        Some("alice-key-1"),
    );
    assert_eq!(code, 200);
    assert_eq!(out.lines().count() as u64, finished);
    // Deleting a file.
    let fid = f["id"].as_str().unwrap();
    let r = agent()
        .delete(&s.url(&format!("/v1/files/{fid}")))
        .header("authorization", "Bearer alice-key-1")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (code, _) = get_as(&s, &format!("/v1/files/{fid}"), Some("alice-key-1"));
    assert_eq!(code, 404);
    let _ = std::fs::remove_dir_all(&dir);
}
