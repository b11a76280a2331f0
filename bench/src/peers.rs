//! Finding (and, when asked, installing) the programs Ferry is compared against:
//! iperf3 from the system, rathole and dumbpipe built from the Rust package registry
//! into a cache directory outside the repository. A peer that cannot be had is skipped
//! with a line saying why, never silently.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `name` on PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// iperf3, or why not.
pub fn iperf3() -> Result<PathBuf, String> {
    on_path("iperf3").ok_or_else(|| {
        "iperf3 is not installed (apt-get install iperf3; bench/run does it)".to_string()
    })
}

/// A peer built with `cargo install`: its name and the arguments that build it.
pub struct CargoPeer {
    pub binary: &'static str,
    pub install_args: &'static [&'static str],
}

/// rathole 0.5's pinned lock file no longer builds with current compilers, so it is
/// resolved afresh; only the Noise transport is built (no OpenSSL needed).
pub const RATHOLE: CargoPeer = CargoPeer {
    binary: "rathole",
    install_args: &[
        "rathole",
        "--no-default-features",
        "--features",
        "server client noise",
    ],
};

pub const DUMBPIPE: CargoPeer = CargoPeer {
    binary: "dumbpipe",
    install_args: &["--locked", "dumbpipe"],
};

impl CargoPeer {
    /// The peer from `<cache>/bin`, installed there first when `install` is set.
    pub fn find(&self, cache: &Path, install: bool) -> Result<PathBuf, String> {
        let path = cache.join("bin").join(self.binary);
        if path.is_file() {
            return Ok(path);
        }
        if !install {
            return Err(format!(
                "{} is not in {} (run without --no-install to build it there)",
                self.binary,
                cache.join("bin").display()
            ));
        }
        eprintln!(
            "building {} into {} (once; takes minutes)…",
            self.binary,
            cache.display()
        );
        let log = cache.join(format!("{}-install.log", self.binary));
        let status = std::fs::create_dir_all(cache)
            .and_then(|_| std::fs::File::create(&log))
            .and_then(|log_file| {
                let err = log_file.try_clone()?;
                Command::new("cargo")
                    .arg("install")
                    .arg("--root")
                    .arg(cache)
                    .args(self.install_args)
                    .stdout(log_file)
                    .stderr(err)
                    .status()
            });
        match status {
            Ok(s) if s.success() && path.is_file() => Ok(path),
            Ok(s) => Err(format!(
                "cargo install {} failed ({s}); see {}",
                self.binary,
                log.display()
            )),
            Err(e) => Err(format!("cannot run cargo install {}: {e}", self.binary)),
        }
    }
}
