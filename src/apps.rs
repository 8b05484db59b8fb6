//! App rules shared by the server and the CLI: valid names, valid file paths, and the
//! deploy upload format (`{"files": [{"path", "base64"}]}`).

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::store::AppFile;

/// Largest deploy upload (the encoded request body).
pub const MAX_UPLOAD_BYTES: usize = 50 << 20;
/// Most files one app may have.
pub const MAX_FILES: usize = 10_000;
/// Longest file path inside an app.
pub const MAX_PATH_BYTES: usize = 512;

/// `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`
pub fn check_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok_char = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let valid = !b.is_empty()
        && b.len() <= 63
        && ok_char(&b[0])
        && ok_char(&b[b.len() - 1])
        && b.iter().all(|c| ok_char(c) || *c == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid app name '{name}': use 1-63 lower-case letters, digits and '-', \
             starting and ending with a letter or digit"
        ))
    }
}

/// A file path inside an app: relative, `/`-separated, no `.`/`..`/empty segments,
/// no backslashes or control characters.
pub fn check_path(path: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid file path '{path}': {why}"));
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > MAX_PATH_BYTES {
        return bad("too long");
    }
    if path.starts_with('/') || path.contains(':') && path.chars().nth(1) == Some(':') {
        return bad("absolute paths are not allowed");
    }
    if path.contains('\\') {
        return bad("use '/' as the separator");
    }
    if path.chars().any(|c| c.is_control()) {
        return bad("control characters are not allowed");
    }
    for seg in path.split('/') {
        match seg {
            "" => return bad("empty path segment"),
            "." | ".." => return bad("'.' and '..' are not allowed"),
            _ => {}
        }
    }
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Upload {
    pub files: Vec<UploadFile>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UploadFile {
    pub path: String,
    pub base64: String,
}

/// Parses and validates a deploy upload into files ready to store.
pub fn parse_upload(body: &[u8]) -> Result<Vec<AppFile>, String> {
    let upload: Upload = serde_json::from_slice(body).map_err(|e| {
        format!("malformed deploy body (expected {{\"files\":[{{\"path\",\"base64\"}}]}}): {e}")
    })?;
    if upload.files.len() > MAX_FILES {
        return Err(format!(
            "too many files: {} (the limit is {MAX_FILES})",
            upload.files.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut files = Vec::with_capacity(upload.files.len());
    for f in upload.files {
        check_path(&f.path)?;
        if !seen.insert(f.path.clone()) {
            return Err(format!("duplicate file path '{}'", f.path));
        }
        let content = base64::engine::general_purpose::STANDARD
            .decode(f.base64.as_bytes())
            .map_err(|e| format!("file '{}' is not valid base64: {e}", f.path))?;
        files.push(AppFile {
            path: f.path,
            content,
        });
    }
    Ok(files)
}

/// Encodes files for upload (used by the CLI and tests).
pub fn encode_upload(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let upload = Upload {
        files: files
            .iter()
            .map(|(p, c)| UploadFile {
                path: p.clone(),
                base64: base64::engine::general_purpose::STANDARD.encode(c),
            })
            .collect(),
    };
    serde_json::to_vec(&upload).unwrap_or_default()
}

/// Reads every file below `dir` (skipping dot-files and dot-directories) for upload.
pub fn read_dir_files(dir: &std::path::Path) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let rel = path
                    .strip_prefix(dir)
                    .map_err(std::io::Error::other)?
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((rel, std::fs::read(&path)?));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "mall", "my-app-2", "0", &"a".repeat(63)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Mall",
            "a_b",
            "a.b",
            &"a".repeat(64),
            "../x",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths() {
        for ok in ["index.html", "api/main.js", "a/b/c.txt", "..hidden", "a..b"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a\\b",
            "./a",
            "C:/x",
            "a\0b",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upload_round_trip_and_errors() {
        let body = encode_upload(&[("index.html".into(), b"hi".to_vec())]);
        let files = parse_upload(&body).expect("valid upload");
        assert_eq!(files[0].content, b"hi");
        assert!(parse_upload(b"{").is_err());
        let dup = encode_upload(&[("a".into(), vec![]), ("a".into(), vec![])]);
        assert!(parse_upload(&dup).unwrap_err().contains("duplicate"));
        let trav = encode_upload(&[("../a".into(), vec![])]);
        assert!(parse_upload(&trav).is_err());
    }
}
