//! Models from the Hugging Face Hub: `owner/name[@revision]` downloaded into the standard cache
//! (`HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` respected) with the `hf-hub`
//! crate: progress bars, interrupted downloads resumed from their `.part` files, every file's
//! size checked against the server's, and the cached snapshot used when offline.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// Files a model directory may hold besides its weights.
const SIDE_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

/// A Hub model reference: `owner/name` with an optional `@revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// `owner/name`.
    pub repo: String,
    /// Branch, tag or commit (`main` when absent).
    pub revision: String,
}

impl HubRef {
    /// Parses `owner/name[@revision]` (also with an `hf://` prefix); None for anything else
    /// (absolute or relative paths, more or fewer than two components).
    pub fn parse(spec: &str) -> Option<Self> {
        let spec = spec.strip_prefix("hf://").unwrap_or(spec);
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, rev),
            Some(_) => return None,
            None => (spec, "main"),
        };
        let ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let mut parts = repo.split('/');
        let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        (ok(owner) && ok(name)).then(|| HubRef {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    fn hf_repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone())
    }
}

/// `model` itself when it exists on disk; else, when it names a Hub model, its local copy (a
/// snapshot directory, or the GGUF file in it), downloaded first unless offline.
pub fn resolve(model: &Path) -> Result<PathBuf> {
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    let Some(hub) = model.to_str().and_then(HubRef::parse) else {
        return Ok(model.to_path_buf());
    };
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    if offline {
        return cached(&hub);
    }
    download(&hub)
}

fn hub_error(hub: &HubRef, file: Option<&str>, e: impl std::fmt::Display) -> Error {
    let what = match file {
        Some(f) => format!("`{f}` of {}@{}", hub.repo, hub.revision),
        None => format!("{}@{}", hub.repo, hub.revision),
    };
    let msg = e.to_string();
    let hint = if msg.contains("404") {
        " (not found: check the repository, revision and file name)"
    } else if msg.contains("401") || msg.contains("403") {
        " (not authorized: set HF_TOKEN for private or gated repositories)"
    } else {
        ""
    };
    Error::Request(format!("Hub: {what}: {msg}{hint}"))
}

/// The files of `hub` to fetch: the side files, then either the safetensors weights (single
/// file or index + shards) or the one GGUF file.
fn pick(hub: &HubRef, names: &[String]) -> Result<(Vec<String>, Option<String>)> {
    let has = |n: &str| names.iter().any(|x| x == n);
    let mut files: Vec<String> = SIDE_FILES
        .iter()
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    let shards: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors") && !n.contains('/'))
        .collect();
    if has("config.json") && !shards.is_empty() {
        if has("model.safetensors.index.json") {
            files.push("model.safetensors.index.json".into());
        }
        files.extend(shards.into_iter().cloned());
        return Ok((files, None));
    }
    let ggufs: Vec<&String> = names.iter().filter(|n| n.ends_with(".gguf")).collect();
    match ggufs.as_slice() {
        [one] => {
            files.push((*one).clone());
            Ok((files, Some((*one).clone())))
        }
        [] => Err(hub_error(
            hub,
            None,
            "neither config.json with *.safetensors nor a .gguf file in the repository",
        )),
        many => Err(hub_error(
            hub,
            None,
            format!(
                "several GGUF files ({}); download the one you want and pass its path",
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn api_repo(hub: &HubRef) -> Result<(Api, ApiRepo)> {
    let cache = Cache::from_env();
    let token = std::env::var("HF_TOKEN").ok().or_else(|| cache.token());
    let api = ApiBuilder::from_env()
        .with_token(token)
        .with_progress(true)
        .build()
        .map_err(|e| hub_error(hub, None, e))?;
    let repo = api.repo(hub.hf_repo());
    Ok((api, repo))
}

fn download(hub: &HubRef) -> Result<PathBuf> {
    let (api, repo) = api_repo(hub)?;
    let info = repo.info().map_err(|e| hub_error(hub, None, e))?;
    let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let (files, gguf) = pick(hub, &names)?;
    let mut dir = None;
    for f in &files {
        let path = repo.get(f).map_err(|e| hub_error(hub, Some(f), e))?;
        check_size(hub, &api, &repo, f, &path)?;
        dir = path.parent().map(Path::to_path_buf);
    }
    let dir = dir.ok_or_else(|| hub_error(hub, None, "no files"))?;
    Ok(match gguf {
        Some(g) => dir.join(g),
        None => dir,
    })
}

/// The downloaded file's size against the server's; a mismatch removes the cached copy.
fn check_size(hub: &HubRef, api: &Api, repo: &ApiRepo, file: &str, path: &Path) -> Result<()> {
    let want = api
        .metadata(&repo.url(file))
        .map_err(|e| hub_error(hub, Some(file), e))?
        .size() as u64;
    let got = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if got != want {
        // The snapshot entry links to a blob: both go, so the next run downloads again.
        if let Ok(blob) = std::fs::canonicalize(path) {
            let _ = std::fs::remove_file(blob);
        }
        let _ = std::fs::remove_file(path);
        return Err(hub_error(
            hub,
            Some(file),
            format!("downloaded {got} bytes but the server has {want}; removed, run again"),
        ));
    }
    Ok(())
}

/// The cached snapshot of `hub` (offline): `refs/{revision}` names the commit whose snapshot
/// directory holds the files (a commit hash as revision names its snapshot directly).
fn cached(hub: &HubRef) -> Result<PathBuf> {
    let offline =
        |what: String| hub_error(hub, None, format!("offline (HF_HUB_OFFLINE) and {what}"));
    let root = Cache::from_env()
        .path()
        .join(format!("models--{}", hub.repo.replace('/', "--")));
    let refs = root.join("refs").join(&hub.revision);
    let commit = match std::fs::read_to_string(&refs) {
        Ok(c) => c.trim().to_string(),
        Err(_) => hub.revision.clone(),
    };
    let dir = root.join("snapshots").join(&commit);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|_| offline(format!("no cached snapshot at {}", dir.display())))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let (files, gguf) = pick(hub, &names)?;
    if let Some(f) = files.iter().find(|f| !dir.join(f).exists()) {
        return Err(offline(format!("`{f}` is not in the cache")));
    }
    Ok(match gguf {
        Some(g) => dir.join(g),
        None => dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_references() {
        let r = HubRef::parse("microsoft/bitnet-b1.58-2B-4T@v1.0").unwrap();
        assert_eq!(
            (r.repo.as_str(), r.revision.as_str()),
            ("microsoft/bitnet-b1.58-2B-4T", "v1.0")
        );
        assert_eq!(HubRef::parse("hf://a/b").unwrap().revision, "main");
        for bad in [
            "a",
            "a/b/c",
            "/a/b",
            "./x",
            "a/b@",
            "../b",
            "a b/c",
            "models/../x",
        ] {
            assert_eq!(HubRef::parse(bad), None, "{bad}");
        }
    }
}
