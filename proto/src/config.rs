//! Pieces of configuration handling shared by the programs: TOML files whose unknown
//! keys are errors, default data directories, and small value parsers.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "config file {path} does not exist; check the --config path (Ferry never falls back to defaults silently)"
    )]
    Missing { path: PathBuf },
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Largest file Ferry reads whole: config files, access lists, stores, keys. Far above
/// any real one (an allowlist of 100,000 node IDs is about 6 MiB), yet a config that
/// points at `/dev/zero` or a runaway file gives an error instead of exhausting memory.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Reads a whole UTF-8 file, refusing one larger than [`MAX_FILE_BYTES`] with an
/// `InvalidData` error that says so. A missing file stays `NotFound`, which callers
/// that treat "missing" as "empty" rely on.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    // One byte over the limit tells "exactly the limit" from "larger".
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "larger than {} MiB; is this the right file?",
                MAX_FILE_BYTES >> 20
            ),
        ));
    }
    Ok(text)
}

/// Reads a TOML file into `T`. `T` should use `#[serde(deny_unknown_fields)]` so that
/// a misspelt key is reported (with its name and line) instead of ignored.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = match read_text(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConfigError::Missing {
                path: path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    parse_toml(&text, path)
}

/// Parses a config file's text (`path` names it in errors); what [`load_toml`] does
/// once the file is read.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', " "),
    })
}

/// Logs to stderr (stdout is kept for machine-readable lines), filtered by `FERRY_LOG`
/// in `tracing` EnvFilter syntax, `info` by default.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Where a program keeps its state when no `--data-dir` is given: systemd's
/// `$STATE_DIRECTORY`, else `$XDG_DATA_HOME/<app>`, else `~/.local/share/<app>`,
/// else `./<app>-data`.
pub fn default_data_dir(app: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join(app);
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/share").join(app);
    }
    PathBuf::from(format!("{app}-data"))
}

/// Replaces `path` with `bytes` atomically and durably: a temporary file next to it,
/// fsync, rename over the old file, fsync of the directory. A crash leaves either the
/// old or the new content, never a mix. Used for every file a program rewrites.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let written = std::fs::File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(e) = written {
        // A half-written temporary file (disk full, say) would only take more of
        // the space that is missing; the old file is untouched either way.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        listen: Option<String>,
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("ferry-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "listen = \"x\"\nlsiten = \"y\"\n").unwrap();
        let err = load_toml::<Sample>(&path).unwrap_err().to_string();
        assert!(err.contains("lsiten"), "{err}");
        let err = load_toml::<Sample>(&dir.join("nope.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_larger_than_the_limit_is_refused_unread() {
        // /dev/zero never ends: without the limit this would exhaust memory.
        let err = load_toml::<Sample>(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("larger than 64 MiB"), "{err}");
    }
}
