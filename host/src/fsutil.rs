//! File helpers: everything lorahost writes goes through a temporary file and a rename, so
//! a crash never leaves a half-written file in place of a good one.

use std::io::Write;
use std::path::Path;

/// Write `bytes` to `path` atomically: write a sibling temp file, fsync it, rename it over.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
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
