//! `/v1/files`: the files of the Batch API (inputs uploaded as JSONL, results written by the
//! batch runner), kept on disk under `--batch-dir`/files, each visible only to the API key that
//! owns it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::api::ApiError;

/// A stored file as the API shows it, with its owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileMeta {
    /// `file-...`.
    pub id: String,
    /// Always `file`.
    pub object: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// The name it was uploaded with.
    pub filename: String,
    /// `batch` (uploaded) or `batch_output` (written by a batch).
    pub purpose: String,
    /// The API key's name that owns it (None: the server has no keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// `record` as the API shows it: everything but its `owner`.
pub fn without_owner(record: &impl Serialize) -> serde_json::Value {
    let mut v = serde_json::to_value(record).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.remove("owner");
    }
    v
}

impl FileMeta {
    /// The API's view: everything but the owner.
    pub fn public(&self) -> serde_json::Value {
        let mut v = without_owner(self);
        if let Some(m) = v.as_object_mut() {
            m.insert("status".into(), "processed".into());
        }
        v
    }
}

/// The file directory.
pub struct FileStore {
    dir: PathBuf,
    next: AtomicU64,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        format!("{what} {}: {e}", path.display()),
    )
}

fn not_found(id: &str) -> ApiError {
    ApiError {
        param: Some("file_id"),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no file `{id}`"),
        )
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash leaves either
/// the old contents or the new.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // A name of its own: two writers of one path never share a temporary file.
    let tmp = path.with_extension(format!("tmp-{}", NEXT.fetch_add(1, Relaxed)));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)
}

/// A fresh id with `prefix`, unique in this directory (time, process and a counter).
pub fn fresh_id(prefix: &str, counter: &AtomicU64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{prefix}-{nanos:x}{:x}{:x}",
        std::process::id(),
        counter.fetch_add(1, Relaxed)
    )
}

/// Whether `id` is a name this store could have made (no path separators or dots).
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl FileStore {
    /// The store in `dir` (created when missing).
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(FileStore {
            dir,
            next: AtomicU64::new(0),
        })
    }

    /// A fresh file id.
    pub fn new_id(&self) -> String {
        fresh_id("file", &self.next)
    }

    /// Where file `id`'s contents are.
    pub fn content_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.jsonl"))
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Where an upload is written before it is complete.
    pub fn upload_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.upload"))
    }

    /// Records file `meta` whose contents are already at [`Self::content_path`].
    pub fn commit(&self, meta: &FileMeta) -> Result<(), ApiError> {
        let path = self.meta_path(&meta.id);
        let bytes = serde_json::to_vec(meta).unwrap_or_default();
        write_atomic(&path, &bytes).map_err(|e| io_error("cannot write", &path, e))
    }

    /// File `id` when `owner` may see it.
    pub fn get(&self, id: &str, owner: Option<&str>) -> Result<FileMeta, ApiError> {
        if !valid_id(id) {
            return Err(not_found(id));
        }
        let meta: FileMeta = std::fs::read(self.meta_path(id))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| not_found(id))?;
        if meta.owner.as_deref() != owner {
            return Err(not_found(id));
        }
        Ok(meta)
    }

    /// The files `owner` may see, newest first.
    pub fn list(&self, owner: Option<&str>) -> Vec<FileMeta> {
        let mut out: Vec<FileMeta> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<FileMeta>(&b).ok())
            .filter(|m| m.owner.as_deref() == owner)
            .collect();
        out.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        out
    }

    /// Deletes file `id` (when `owner` may see it).
    pub fn delete(&self, id: &str, owner: Option<&str>) -> Result<(), ApiError> {
        self.get(id, owner)?;
        let meta = self.meta_path(id);
        std::fs::remove_file(&meta).map_err(|e| io_error("cannot delete", &meta, e))?;
        let _ = std::fs::remove_file(self.content_path(id));
        Ok(())
    }
}
