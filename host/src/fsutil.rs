//! File helpers: everything lorahost writes goes through a temporary file and a rename, so
//! a crash never leaves a half-written file in place of a good one.

use std::io::Write;
use std::path::Path;

/// `e` with what was being done (`what`, naming the path) in front, and for a folder that
/// cannot be written the fix; the error kind stays the same.
pub fn io_context(e: std::io::Error, what: impl std::fmt::Display) -> std::io::Error {
    let hint = if e.kind() == std::io::ErrorKind::PermissionDenied
        || e.kind() == std::io::ErrorKind::ReadOnlyFilesystem
    {
        " (make the folder writable, or write somewhere else)"
    } else {
        ""
    };
    std::io::Error::new(e.kind(), format!("{what}: {e}{hint}"))
}

/// Write `bytes` to `path` atomically: write a sibling temp file, fsync it, rename it over.
/// An error names the operation and the path that failed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| io_context(e, format!("cannot create {}", dir.display())))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| {
            io_context(e, format!("cannot create {} (to write {})", tmp.display(), path.display()))
        })?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| io_context(e, format!("cannot write {} (for {})", tmp.display(), path.display())))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| io_context(e, format!("cannot rename {} to {}", tmp.display(), path.display())))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Lower-case hex of bytes (content hashes in cache keys, fingerprints, logs).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first of `name(0)`, `name(1)`, ... that does not exist yet (a place to set something
/// aside without replacing what an earlier time set aside).
pub fn first_free(name: impl Fn(usize) -> std::path::PathBuf) -> std::path::PathBuf {
    (0..).map(name).find(|p| !p.exists()).expect("an unbounded range has a free name")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails names the path and what was being done, and leaves no temp file.
    #[test]
    fn write_atomic_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A folder where the file should go: the rename fails.
        std::fs::create_dir(d.join("taken")).unwrap();
        let e = write_atomic(&d.join("taken"), b"x").unwrap_err().to_string();
        assert!(e.contains("cannot rename") && e.contains(&d.join("taken").display().to_string()), "{e}");
        // A file where the folder should be: creating it fails.
        std::fs::write(d.join("file"), "x").unwrap();
        let e = write_atomic(&d.join("file/sub/a.json"), b"x").unwrap_err().to_string();
        assert!(e.contains("cannot create") && e.contains(&d.join("file/sub").display().to_string()), "{e}");
        let left: Vec<_> = std::fs::read_dir(d).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        write_atomic(&d.join("ok.json"), b"y").unwrap();
        assert_eq!(std::fs::read(d.join("ok.json")).unwrap(), b"y");
    }
}
