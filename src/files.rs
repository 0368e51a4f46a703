//! Bounded reads of a model directory's files: regular files only (a device, FIFO, socket or
//! directory behind a name or a link is refused before it is opened), each under a size limit
//! far above any real file of its kind.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Limit for `config.json`, `generation_config.json`, `tokenizer_config.json` and
/// `model.safetensors.index.json`.
pub const JSON_LIMIT: u64 = 16 << 20;
/// Limit for `tokenizer.json`.
pub const TOKENIZER_LIMIT: u64 = 64 << 20;
/// Limit for `chat_template.jinja`.
pub const TEMPLATE_LIMIT: u64 = 1 << 20;

fn refuse(path: &Path, msg: String) -> Error {
    Error::File {
        path: path.to_path_buf(),
        msg,
    }
}

/// The size of `path` after following links, or an error when it is not a regular file.
pub fn regular_file_len(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(refuse(
            path,
            "not a regular file (a directory, device, FIFO or socket)".into(),
        ));
    }
    Ok(meta.len())
}

/// Reads the regular file `path` whole, refusing it when it holds more than `limit` bytes
/// (checked before reading, and again while reading in case it grows).
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let too_big = |n: u64| {
        refuse(
            path,
            format!("{n} bytes is more than the {limit}-byte limit for this file"),
        )
    };
    let len = regular_file_len(path)?;
    if len > limit {
        return Err(too_big(len));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = Vec::with_capacity(len as usize);
    file.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > limit {
        return Err(too_big(buf.len() as u64));
    }
    Ok(buf)
}

/// [`read_limited`] for UTF-8 text.
pub fn read_text_limited(path: &Path, limit: u64) -> Result<String> {
    String::from_utf8(read_limited(path, limit)?)
        .map_err(|e| refuse(path, format!("not UTF-8 text: {e}")))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn refuses_devices_fifos_directories_and_oversized_files() {
        let dev = read_limited(Path::new("/dev/zero"), JSON_LIMIT).unwrap_err();
        assert!(dev.to_string().contains("not a regular file"), "{dev}");
        let dir = std::env::temp_dir().join(format!("bitnet-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let e = read_limited(&fifo, JSON_LIMIT).unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        let e = read_limited(&dir, JSON_LIMIT).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let big = dir.join("big.json");
        std::fs::write(&big, vec![b' '; 100]).unwrap();
        let e = read_limited(&big, 99).unwrap_err().to_string();
        assert!(e.contains("big.json") && e.contains("99-byte limit"), "{e}");
        assert_eq!(read_limited(&big, 100).unwrap().len(), 100);
        std::fs::write(&big, [0xff, 0xfe]).unwrap();
        assert!(read_text_limited(&big, 100)
            .unwrap_err()
            .to_string()
            .contains("not UTF-8"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
