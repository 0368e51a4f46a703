//! The Batch API: `POST /v1/files` uploads a JSONL file of requests, `POST /v1/batches` runs
//! it at low priority inside the same continuous batch as interactive requests, and the results
//! come back as JSONL files. Everything lives under `--batch-dir`: each batch's record and a
//! results log appended one line per finished request, so a restart (even after SIGKILL)
//! resumes every unfinished batch where it stopped, with no request lost or run twice.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::api::{self, ApiError};
use super::files::{fresh_id, without_owner, write_atomic, FileMeta, FileStore};
use super::handlers::{batch_request, KeyRef, Kind};
use super::{now_s, AppState};

/// The scheduling priority of batch requests: every interactive request goes first, and a
/// batch request is the first preempted when the KV pool runs out.
pub const BATCH_PRIORITY: i32 = -1000;

/// Most requests in one batch file.
pub const MAX_BATCH_LINES: usize = 50_000;

/// Validation errors reported per batch, at most.
const MAX_REPORTED_ERRORS: usize = 100;

type AppResult<T> = Result<T, ApiError>;

/// A batch's request counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counts {
    /// Requests in the input file.
    pub total: u64,
    /// Finished with a 2xx answer.
    pub completed: u64,
    /// Finished with an error.
    pub failed: u64,
}

/// A batch as the API shows it (OpenAI's `batch` object), with its owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    /// `batch-...`.
    pub id: String,
    /// Always `batch`.
    pub object: String,
    /// `/v1/chat/completions` or `/v1/completions`.
    pub endpoint: String,
    /// Why the input file was refused (status `failed`).
    pub errors: Option<Value>,
    /// The requests.
    pub input_file_id: String,
    /// Always `24h`.
    pub completion_window: String,
    /// `in_progress`, `finalizing`, `completed`, `failed`, `cancelling` or `cancelled`.
    pub status: String,
    /// The answers of the requests that succeeded.
    pub output_file_id: Option<String>,
    /// The answers of the requests that failed.
    pub error_file_id: Option<String>,
    /// Timestamps (seconds since the epoch).
    pub created_at: u64,
    /// When it started running.
    pub in_progress_at: Option<u64>,
    /// The end of its completion window (batches here run until done).
    pub expires_at: Option<u64>,
    /// When its output files began to be written.
    pub finalizing_at: Option<u64>,
    /// When it completed.
    pub completed_at: Option<u64>,
    /// When its input was refused.
    pub failed_at: Option<u64>,
    /// Never set: batches here do not expire.
    pub expired_at: Option<u64>,
    /// When a cancel was asked for.
    pub cancelling_at: Option<u64>,
    /// When it was cancelled.
    pub cancelled_at: Option<u64>,
    /// Request counts.
    pub request_counts: Counts,
    /// The caller's metadata.
    pub metadata: Option<Value>,
    /// The API key's name that owns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl Batch {
    fn public(&self) -> Value {
        without_owner(self)
    }

    fn kind(&self) -> Kind {
        if self.endpoint == "/v1/chat/completions" {
            Kind::Chat
        } else {
            Kind::Text
        }
    }
}

/// One request of a batch's input.
struct Line {
    /// Its index among the file's requests.
    index: usize,
    custom_id: String,
    body: Vec<u8>,
}

/// One finished request, as appended to the batch's results log.
#[derive(Serialize, Deserialize)]
struct Outcome {
    line: usize,
    custom_id: String,
    status: u16,
    request_id: String,
    body: Value,
}

/// The batches and files of one server.
pub struct Batches {
    /// The files.
    pub files: FileStore,
    dir: PathBuf,
    table: Mutex<BTreeMap<String, Batch>>,
    /// The batch the runner is on.
    running: Mutex<Option<String>>,
    /// Held while a batch's output files are written (one at a time).
    finalizing: Mutex<()>,
    wake: tokio::sync::Notify,
    next: AtomicU64,
    /// Largest upload in bytes.
    pub max_file_bytes: usize,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        e.to_string(),
    )
}

fn batch_not_found(id: &str) -> ApiError {
    ApiError {
        param: Some("batch_id"),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no batch `{id}`"),
        )
    }
}

/// Reads the requests of a batch input file; the first errors (by line number) when any line
/// is not a request for `endpoint`.
fn read_lines(path: &std::path::Path, endpoint: &str) -> Result<Vec<Line>, Vec<Value>> {
    let file = std::fs::File::open(path).map_err(|e| {
        vec![json!({ "code": "file_unreadable", "message": format!("{}: {e}", path.display()) })]
    })?;
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (n, text) in std::io::BufReader::new(file).lines().enumerate() {
        let line_no = n + 1;
        let mut fail = |code: &str, message: String| {
            if errors.len() < MAX_REPORTED_ERRORS {
                errors.push(json!({ "code": code, "message": message, "line": line_no }));
            }
        };
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                fail("invalid_json_line", format!("line {line_no}: {e}"));
                break;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        if lines.len() == MAX_BATCH_LINES {
            fail(
                "too_many_requests",
                format!("a batch holds at most {MAX_BATCH_LINES} requests"),
            );
            break;
        }
        let v: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                fail("invalid_json_line", format!("line {line_no}: {e}"));
                continue;
            }
        };
        let custom_id = match v.get("custom_id").and_then(Value::as_str) {
            Some(c) if !c.is_empty() && c.len() <= 512 => c.to_string(),
            _ => {
                fail(
                    "missing_required_parameter",
                    format!("line {line_no}: custom_id must be a string of 1 to 512 bytes"),
                );
                continue;
            }
        };
        if v.get("method").and_then(Value::as_str) != Some("POST") {
            fail(
                "invalid_method",
                format!("line {line_no}: method must be POST"),
            );
            continue;
        }
        if v.get("url").and_then(Value::as_str) != Some(endpoint) {
            fail(
                "mismatched_endpoint",
                format!("line {line_no}: url must be the batch's endpoint {endpoint}"),
            );
            continue;
        }
        let Some(body) = v.get("body").filter(|b| b.is_object()) else {
            fail(
                "missing_required_parameter",
                format!("line {line_no}: body must be a JSON object"),
            );
            continue;
        };
        if !seen.insert(custom_id.clone()) {
            fail(
                "duplicate_custom_id",
                format!("line {line_no}: custom_id `{custom_id}` is used twice"),
            );
            continue;
        }
        lines.push(Line {
            index: lines.len(),
            custom_id,
            body: serde_json::to_vec(body).unwrap_or_default(),
        });
    }
    if errors.is_empty() && lines.is_empty() {
        errors.push(json!({ "code": "empty_file", "message": "the file holds no requests" }));
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

impl Batches {
    /// The store under `dir` (created when missing), with every batch recorded there.
    pub fn open(dir: PathBuf, max_file_bytes: usize) -> std::io::Result<Self> {
        let files = FileStore::open(dir.join("files"))?;
        let dir = dir.join("batches");
        std::fs::create_dir_all(&dir)?;
        let mut table = BTreeMap::new();
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Batch>(&b).ok())
            {
                Some(b) => {
                    table.insert(b.id.clone(), b);
                }
                None => tracing::warn!(path = %path.display(), "unreadable batch record skipped"),
            }
        }
        Ok(Batches {
            files,
            dir,
            table: Mutex::new(table),
            running: Mutex::new(None),
            finalizing: Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            next: AtomicU64::new(0),
            max_file_bytes,
        })
    }

    fn results_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.results.jsonl"))
    }

    fn get(&self, id: &str) -> Option<Batch> {
        self.table.lock().ok()?.get(id).cloned()
    }

    /// Changes batch `id` with `f` and writes its record through.
    fn update(&self, id: &str, f: impl FnOnce(&mut Batch)) -> AppResult<Batch> {
        let mut t = self.table.lock().map_err(internal)?;
        let b = t.get_mut(id).ok_or_else(|| batch_not_found(id))?;
        f(b);
        let b = b.clone();
        // Written under the lock: records reach the disk in the order they changed.
        self.save(&b)?;
        Ok(b)
    }

    /// Whether an unfinished batch reads file `id`.
    fn file_in_use(&self, id: &str) -> bool {
        self.table.lock().is_ok_and(|t| {
            t.values().any(|b| {
                b.input_file_id == id
                    && matches!(
                        b.status.as_str(),
                        "in_progress" | "finalizing" | "cancelling"
                    )
            })
        })
    }

    fn save(&self, b: &Batch) -> AppResult<()> {
        let path = self.dir.join(format!("{}.json", b.id));
        write_atomic(&path, &serde_json::to_vec(b).unwrap_or_default())
            .map_err(|e| internal(format!("cannot write {}: {e}", path.display())))
    }

    /// The oldest batch with work left (running, finalizing or cancelling).
    fn next_active(&self) -> Option<Batch> {
        let t = self.table.lock().ok()?;
        t.values()
            .filter(|b| {
                matches!(
                    b.status.as_str(),
                    "in_progress" | "finalizing" | "cancelling"
                )
            })
            .min_by_key(|b| (b.created_at, b.id.clone()))
            .cloned()
    }

    /// The finished requests of batch `id` so far, from its results log (a line cut short by a
    /// crash is dropped, and the log truncated to the lines that are whole).
    fn outcomes(&self, id: &str) -> std::io::Result<Vec<Outcome>> {
        let path = self.results_path(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if whole < bytes.len() {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(whole as u64)?;
        }
        let mut seen = HashSet::new();
        Ok(bytes[..whole]
            .split(|&b| b == b'\n')
            .filter_map(|l| serde_json::from_slice::<Outcome>(l).ok())
            .filter(|o| seen.insert(o.line))
            .collect())
    }
}

fn count(outcomes: &[Outcome]) -> (u64, u64) {
    let ok = outcomes
        .iter()
        .filter(|o| (200..300).contains(&o.status))
        .count() as u64;
    (ok, outcomes.len() as u64 - ok)
}

/// Runs one request of a batch: waits out a loading model, a full queue or its key's limits
/// (retrying); None when the batch was cancelled before the request could run.
async fn run_line(state: &Arc<AppState>, batches: &Batches, b: &Batch, l: Line) -> Option<Outcome> {
    let request_id = state.new_id("req");
    let (status, body) = loop {
        match batch_request(state, b.kind(), &l.body, BATCH_PRIORITY, b.owner.as_deref()).await {
            Ok(v) => break (200, v),
            Err(e)
                if matches!(
                    e.status,
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                ) =>
            {
                if batches.get(&b.id).is_none_or(|b| b.status != "in_progress") {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                let status = e.status.as_u16();
                let body = json!({ "error": {
                    "message": e.message, "type": e.kind, "param": e.param, "code": status,
                }});
                break (status, body);
            }
        }
    };
    Some(Outcome {
        line: l.index,
        custom_id: l.custom_id,
        status,
        request_id,
        body,
    })
}

/// Runs batch `b`'s unfinished requests, up to the scheduler's batch size at once, appending
/// each outcome to the results log as it ends; then writes its output files.
async fn run_batch(state: &Arc<AppState>, batches: &Batches, b: Batch) -> AppResult<()> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let id = b.id.clone();
    if b.status == "in_progress" {
        let input = batches.files.content_path(&b.input_file_id);
        let endpoint = b.endpoint.clone();
        let lines = tokio::task::spawn_blocking(move || read_lines(&input, &endpoint))
            .await
            .map_err(internal)?
            .map_err(|e| internal(format!("the input file became unreadable: {e:?}")))?;
        let done = batches.outcomes(&id).map_err(internal)?;
        let (mut ok, mut failed) = count(&done);
        let done: HashSet<usize> = done.iter().map(|o| o.line).collect();
        let path = batches.results_path(&id);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| internal(format!("cannot open {}: {e}", path.display())))?;
        let mut pending = lines.into_iter().filter(|l| !done.contains(&l.index));
        let mut running = FuturesUnordered::new();
        loop {
            let active = batches.get(&id).is_some_and(|b| b.status == "in_progress");
            if !active {
                break;
            }
            let width = state.model().map_or(8, |m| m.max_batch().max(1));
            while running.len() < width {
                let Some(l) = pending.next() else { break };
                running.push(run_line(state, batches, &b, l));
            }
            let o = match tokio::select! {
                o = running.next() => o,
                _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
            } {
                None => break,
                Some(None) => continue,
                Some(Some(o)) => o,
            };
            let mut line = serde_json::to_vec(&o).unwrap_or_default();
            line.push(b'\n');
            log.write_all(&line)
                .map_err(|e| internal(format!("cannot write {}: {e}", path.display())))?;
            if (200..300).contains(&o.status) {
                ok += 1;
            } else {
                failed += 1;
            }
            if let Ok(mut t) = batches.table.lock() {
                if let Some(b) = t.get_mut(&id) {
                    b.request_counts.completed = ok;
                    b.request_counts.failed = failed;
                }
            }
        }
        drop(running);
        batches.update(&id, |b| {
            if b.status == "in_progress" {
                b.status = "finalizing".into();
                b.finalizing_at = Some(now_s());
            }
        })?;
    }
    finalize(batches, &id, None)
}

/// Writes batch `id`'s output and error files from its results log (in input order) and
/// marks it completed, cancelled when a cancel was asked for, or failed with `failure`. Does
/// nothing to a batch that is not finalizing or cancelling (or failing), so it is safe to
/// repeat.
fn finalize(batches: &Batches, id: &str, failure: Option<String>) -> AppResult<()> {
    let _turn = batches.finalizing.lock().map_err(internal)?;
    let Some(b) = batches.get(id) else {
        return Err(batch_not_found(id));
    };
    if failure.is_none() && !matches!(b.status.as_str(), "finalizing" | "cancelling") {
        return Ok(());
    }
    let mut outcomes = batches.outcomes(id).map_err(internal)?;
    outcomes.sort_by_key(|o| o.line);
    let (ok, failed) = count(&outcomes);
    let write = |good: bool, suffix: &str| -> AppResult<Option<String>> {
        let mut text = Vec::new();
        for o in outcomes
            .iter()
            .filter(|o| (200..300).contains(&o.status) == good)
        {
            let row = json!({
                "id": format!("{id}-req-{}", o.line),
                "custom_id": o.custom_id,
                "response": { "status_code": o.status, "request_id": o.request_id, "body": o.body },
                "error": null,
            });
            text.extend_from_slice(row.to_string().as_bytes());
            text.push(b'\n');
        }
        if text.is_empty() {
            return Ok(None);
        }
        let file_id = format!("file-{id}-{suffix}");
        let path = batches.files.content_path(&file_id);
        write_atomic(&path, &text)
            .map_err(|e| internal(format!("cannot write {}: {e}", path.display())))?;
        batches.files.commit(&FileMeta {
            id: file_id.clone(),
            object: "file".into(),
            bytes: text.len() as u64,
            created_at: now_s(),
            filename: format!("{id}_{suffix}.jsonl"),
            purpose: "batch_output".into(),
            owner: b.owner.clone(),
        })?;
        Ok(Some(file_id))
    };
    let output = write(true, "output")?;
    let errors = write(false, "errors")?;
    batches.update(id, |b| {
        b.output_file_id = output;
        b.error_file_id = errors;
        b.request_counts.completed = ok;
        b.request_counts.failed = failed;
        if let Some(message) = failure {
            b.status = "failed".into();
            b.failed_at = Some(now_s());
            b.errors = Some(json!({ "object": "list", "data": [
                { "code": "server_error", "message": message }
            ]}));
        } else if b.status == "cancelling" {
            b.status = "cancelled".into();
            b.cancelled_at = Some(now_s());
        } else {
            b.status = "completed".into();
            b.completed_at = Some(now_s());
        }
    })?;
    Ok(())
}

/// Runs the batches one after another, oldest first, for as long as the server runs (resuming
/// those a previous run left unfinished).
pub async fn runner(state: Arc<AppState>, batches: Arc<Batches>) {
    loop {
        match batches.next_active() {
            Some(b) => {
                let id = b.id.clone();
                tracing::info!(batch = %id, status = %b.status, "running batch");
                if let Ok(mut r) = batches.running.lock() {
                    *r = Some(id.clone());
                }
                let result = run_batch(&state, &batches, b).await;
                if let Ok(mut r) = batches.running.lock() {
                    *r = None;
                }
                if let Err(e) = result {
                    tracing::error!(batch = %id, error = %e.message, "batch failed");
                    // What finished is still written out.
                    if let Err(e2) = finalize(&batches, &id, Some(e.message.clone())) {
                        tracing::error!(batch = %id, error = %e2.message, "batch output lost");
                        let _ = batches.update(&id, |b| {
                            b.status = "failed".into();
                            b.failed_at = Some(now_s());
                        });
                    }
                }
            }
            None => batches.wake.notified().await,
        }
    }
}

fn enabled(state: &AppState) -> AppResult<&Arc<Batches>> {
    state.batches.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "the Batch API is off: start the server with --batch-dir DIR",
        )
    })
}

fn owner(key: &Option<Extension<KeyRef>>) -> Option<String> {
    key.as_ref().map(|k| k.name().to_string())
}

/// `POST /v1/files` (multipart: `purpose` = `batch` and the JSONL `file`), streamed to disk
/// within `--max-file-mb`.
pub async fn upload_file(
    State(state): State<Arc<AppState>>,
    key: Option<Extension<KeyRef>>,
    form: Result<Multipart, MultipartRejection>,
) -> AppResult<Json<Value>> {
    let batches = enabled(&state)?;
    let mut form = form.map_err(|e| ApiError::invalid(None, e.body_text()))?;
    let bad = |e: axum::extract::multipart::MultipartError| {
        ApiError::new(e.status(), "invalid_request_error", e.body_text())
    };
    let id = batches.files.new_id();
    let upload = batches.files.upload_path(&id);
    let idle = Duration::from_secs(state.opts.body_timeout.max(1));
    let (mut purpose, mut file) = (None, None);
    let result = async {
        while let Some(mut field) = tokio::time::timeout(idle, form.next_field())
            .await
            .map_err(|_| ApiError::invalid(None, "the upload stalled"))?
            .map_err(bad)?
        {
            match field.name() {
                Some("purpose") => purpose = Some(field.text().await.map_err(bad)?),
                Some("file") => {
                    let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                    let mut out = std::fs::File::create(&upload).map_err(internal)?;
                    let mut bytes = 0usize;
                    while let Some(chunk) = tokio::time::timeout(idle, field.chunk())
                        .await
                        .map_err(|_| ApiError::invalid(Some("file"), "the upload stalled"))?
                        .map_err(bad)?
                    {
                        bytes += chunk.len();
                        if bytes > batches.max_file_bytes {
                            return Err(ApiError::new(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                "invalid_request_error",
                                format!(
                                    "the file is larger than this server's limit of {} bytes \
                                     (--max-file-mb)",
                                    batches.max_file_bytes
                                ),
                            ));
                        }
                        out.write_all(&chunk).map_err(internal)?;
                    }
                    out.sync_data().map_err(internal)?;
                    file = Some((name, bytes));
                }
                _ => {}
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&upload);
        return Err(e);
    }
    let Some((filename, bytes)) = file else {
        let _ = std::fs::remove_file(&upload);
        return Err(ApiError::invalid(
            Some("file"),
            "the form has no `file` field",
        ));
    };
    if purpose.as_deref() != Some("batch") {
        let _ = std::fs::remove_file(&upload);
        return Err(ApiError::invalid(
            Some("purpose"),
            "purpose must be `batch` (the only files this server keeps)",
        ));
    }
    std::fs::rename(&upload, batches.files.content_path(&id)).map_err(internal)?;
    let meta = FileMeta {
        id,
        object: "file".into(),
        bytes: bytes as u64,
        created_at: now_s(),
        filename,
        purpose: "batch".into(),
        owner: owner(&key),
    };
    batches.files.commit(&meta)?;
    Ok(Json(meta.public()))
}

/// `GET /v1/files`.
pub async fn list_files(
    State(state): State<Arc<AppState>>,
    key: Option<Extension<KeyRef>>,
) -> AppResult<Json<Value>> {
    let batches = enabled(&state)?;
    let data: Vec<Value> = batches
        .files
        .list(owner(&key).as_deref())
        .iter()
        .map(FileMeta::public)
        .collect();
    Ok(Json(
        json!({ "object": "list", "data": data, "has_more": false }),
    ))
}

/// `GET /v1/files/{id}`.
pub async fn get_file(
    State(state): State<Arc<AppState>>,
    key: Option<Extension<KeyRef>>,
    UrlPath(id): UrlPath<String>,
) -> AppResult<Json<Value>> {
    let batches = enabled(&state)?;
    Ok(Json(
        batches.files.get(&id, owner(&key).as_deref())?.public(),
    ))
}

/// `GET /v1/files/{id}/content`.
pub async fn file_content(
    State(state): State<Arc<AppState>>,
    key: Option<Extension<KeyRef>>,
    UrlPath(id): UrlPath<String>,
) -> AppResult<Response> {
    let batches = enabled(&state)?;
    batches.files.get(&id, owner(&key).as_deref())?;
    let path = batches.files.content_path(&id);
    let bytes = tokio::fs::read(&path).await.map_err(internal)?;
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], bytes).into_response())
}

/// `DELETE /v1/files/{id}`.
pub async fn delete_file(
    State(state): State<Arc<AppState>>,
    key: Option<Extension<KeyRef>>,
    UrlPath(id): UrlPath<String>,
) -> AppResult<Json<Value>> {
    let batches = enabled(&state)?;
    batches.files.get(&id, owner(&key).as_deref())?;
    if batches.file_in_use(&id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            format!("file `{id}` is the input of an unfinished batch"),
        ));
    }
    batches.files.delete(&id, owner(&key).as_deref())?;
    Ok(Json(json!({ "id": id, "object": "file", "deleted": true })))
}

/// `POST /v1/batches`' body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<Value>,
}

/// `POST /v1/batches`: checks every line of the input file (a batch with bad lines is
/// `failed` at once, its errors naming the lines), then queues it.
pub async fn create_batch(
    State(state): State<Arc<AppState>>,
    key: Option<Extension<KeyRef>>,
    super::handlers::Body(body): super::handlers::Body,
) -> AppResult<Json<Value>> {
    let batches = enabled(&state)?.clone();
    let req: CreateBatch = api::parse(&body)?;
    if !matches!(
        req.endpoint.as_str(),
        "/v1/chat/completions" | "/v1/completions"
    ) {
        return Err(ApiError::invalid(
            Some("endpoint"),
            "endpoint must be /v1/chat/completions or /v1/completions",
        ));
    }
    if req.completion_window != "24h" {
        return Err(ApiError::invalid(
            Some("completion_window"),
            "completion_window must be 24h",
        ));
    }
    let owner = owner(&key);
    let input = batches.files.get(&req.input_file_id, owner.as_deref())?;
    if input.purpose != "batch" {
        return Err(ApiError::invalid(
            Some("input_file_id"),
            "the input file must have purpose `batch`",
        ));
    }
    let path = batches.files.content_path(&input.id);
    let endpoint = req.endpoint.clone();
    let checked =
        tokio::task::spawn_blocking(move || read_lines(&path, &endpoint).map(|l| l.len()))
            .await
            .map_err(internal)?;
    let now = now_s();
    let mut b = Batch {
        id: fresh_id("batch", &batches.next),
        object: "batch".into(),
        endpoint: req.endpoint,
        errors: None,
        input_file_id: input.id,
        completion_window: req.completion_window,
        status: "in_progress".into(),
        output_file_id: None,
        error_file_id: None,
        created_at: now,
        in_progress_at: Some(now),
        expires_at: Some(now + 24 * 3600),
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        request_counts: Counts::default(),
        metadata: req.metadata,
        owner,
    };
    match checked {
        Ok(n) => b.request_counts.total = n as u64,
        Err(errors) => {
            b.status = "failed".into();
            b.in_progress_at = None;
            b.failed_at = Some(now);
            b.errors = Some(json!({ "object": "list", "data": errors }));
        }
    }
    batches.save(&b)?;
    if let Ok(mut t) = batches.table.lock() {
        t.insert(b.id.clone(), b.clone());
    }
    batches.wake.notify_one();
    Ok(Json(b.public()))
}

fn visible(batches: &Batches, id: &str, owner: Option<&str>) -> AppResult<Batch> {
    batches
        .get(id)
        .filter(|b| b.owner.as_deref() == owner)
        .ok_or_else(|| batch_not_found(id))
}

/// `GET /v1/batches/{id}`.
pub async fn get_batch(
    State(state): State<Arc<AppState>>,
    key: Option<Extension<KeyRef>>,
    UrlPath(id): UrlPath<String>,
) -> AppResult<Json<Value>> {
    let batches = enabled(&state)?;
    Ok(Json(
        visible(batches, &id, owner(&key).as_deref())?.public(),
    ))
}

/// `GET /v1/batches`' query.
#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
}

/// `GET /v1/batches` (newest first; `limit` ≤ 100, `after` an id of the previous page).
pub async fn list_batches(
    State(state): State<Arc<AppState>>,
    key: Option<Extension<KeyRef>>,
    Query(q): Query<ListQuery>,
) -> AppResult<Json<Value>> {
    let batches = enabled(&state)?;
    let owner = owner(&key);
    let mut all: Vec<Batch> = batches
        .table
        .lock()
        .map_err(internal)?
        .values()
        .filter(|b| b.owner == owner)
        .cloned()
        .collect();
    all.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
    let start = match &q.after {
        Some(a) => all
            .iter()
            .position(|b| b.id == *a)
            .map_or(all.len(), |i| i + 1),
        None => 0,
    };
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(Batch::public)
        .collect();
    let has_more = all.len() > start + page.len();
    Ok(Json(json!({
        "object": "list",
        "data": page,
        "first_id": page.first().map(|b| b["id"].clone()),
        "last_id": page.last().map(|b| b["id"].clone()),
        "has_more": has_more,
    })))
}

/// `POST /v1/batches/{id}/cancel`: requests still queued never run, those running are
/// stopped, and what finished is written out as usual.
pub async fn cancel_batch(
    State(state): State<Arc<AppState>>,
    key: Option<Extension<KeyRef>>,
    UrlPath(id): UrlPath<String>,
) -> AppResult<Json<Value>> {
    let batches = enabled(&state)?;
    visible(batches, &id, owner(&key).as_deref())?;
    let mut b = batches.update(&id, |b| {
        if b.status == "in_progress" {
            b.status = "cancelling".into();
            b.cancelling_at = Some(now_s());
        }
    })?;
    let running = batches
        .running
        .lock()
        .map_err(internal)?
        .as_deref()
        .is_some_and(|r| r == id);
    if b.status == "cancelling" && !running {
        // Not started (queued behind another batch): done now.
        let (store, bid) = (batches.clone(), id.clone());
        tokio::task::spawn_blocking(move || finalize(&store, &bid, None))
            .await
            .map_err(internal)??;
        b = batches.get(&id).ok_or_else(|| batch_not_found(&id))?;
    }
    batches.wake.notify_one();
    Ok(Json(b.public()))
}
