//! Node identities: ed25519 keys, their 52-character base32 node IDs, and the key
//! files that hold them (created 0600, refused when group or others can read them).

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::LazyLock;

use data_encoding::{Encoding, Specification};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

/// Lowercase RFC 4648 base32 without padding: 32 key bytes become 52 characters that
/// survive DNS names, file names and case-folding tools.
pub(crate) static BASE32: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    // The specification is a constant and known-valid; `encoding()` cannot fail on it.
    spec.encoding()
        .unwrap_or_else(|_| unreachable!("constant base32 specification"))
});

/// Length of a node ID in characters.
pub const NODE_ID_LEN: usize = 52;

/// First line marker of a Ferry key file, so a wrong file is recognised as such.
const KEY_FILE_PREFIX: &str = "ferry-ed25519-secret-key:";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "invalid node ID {0:?}: expected {NODE_ID_LEN} lowercase base32 characters (a-z, 2-7), as printed by `ferry-shim id`"
    )]
    InvalidNodeId(String),
    #[error(
        "key file {path} can be read by group or others (mode {mode:o}); fix it with: chmod 600 {path}"
    )]
    KeyFileTooOpen { path: PathBuf, mode: u32 },
    #[error(
        "key file {path} is not a Ferry key file ({why}); move it away and run `ferry-shim init` to create a new key"
    )]
    BadKeyFile { path: PathBuf, why: String },
    #[error("no key file at {path}; create one with `ferry-shim init --data-dir {dir}`")]
    MissingKeyFile { path: PathBuf, dir: PathBuf },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError {
    let path = path.to_path_buf();
    move |source| IdentityError::Io { what, path, source }
}

/// A node's public identity: an ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 32]);

impl NodeId {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        NodeId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The ed25519 verifying key, or `None` when the bytes are not a valid curve point.
    pub fn verifying_key(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).ok()
    }

    /// Short prefix for log lines where the whole ID would drown the message.
    pub fn short(&self) -> String {
        self.to_string()[..10].to_string()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32.encode(&self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::InvalidNodeId(s.to_string());
        if s.len() != NODE_ID_LEN {
            return Err(bad());
        }
        let bytes = BASE32.decode(s.as_bytes()).map_err(|_| bad())?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        let id = NodeId(bytes);
        // Reject strings that decode but are not a usable public key: nobody could
        // ever authenticate as them, so accepting them only hides a typo.
        id.verifying_key().ok_or_else(bad)?;
        Ok(id)
    }
}

impl serde::Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A node's secret key. Never printed; `Debug` shows only the public ID.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public: {})", self.node_id())
    }
}

impl SecretKey {
    pub fn generate() -> Self {
        SecretKey(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    pub fn node_id(&self) -> NodeId {
        NodeId(self.0.verifying_key().to_bytes())
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.0
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// Loads the key at `path`, refusing a file that group or others can read.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IdentityError::MissingKeyFile {
                    path: path.to_path_buf(),
                    dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                });
            }
            Err(e) => return Err(io_err("read", path)(e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::KeyFileTooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = crate::config::read_text(path).map_err(io_err("read", path))?;
        Self::parse_key_file(&text).map_err(|why| IdentityError::BadKeyFile {
            path: path.to_path_buf(),
            why: why.to_string(),
        })
    }

    /// Parses a key file's text, as [`SecretKey::save_new`] writes it.
    pub fn parse_key_file(text: &str) -> Result<Self, &'static str> {
        let encoded = text
            .trim()
            .strip_prefix(KEY_FILE_PREFIX)
            .ok_or("missing the ferry-ed25519-secret-key: prefix")?;
        let seed = BASE32
            .decode(encoded.trim().as_bytes())
            .map_err(|_| "the key is not valid base32")?;
        let seed: [u8; 32] = seed
            .try_into()
            .map_err(|_| "the key is not 32 bytes long")?;
        Ok(SecretKey::from_seed(seed))
    }

    /// Writes the key to a new file at `path` with mode 0600. Never overwrites.
    pub fn save_new(&self, path: &Path) -> Result<(), IdentityError> {
        if let Some(dir) = path.parent() {
            create_private_dir(dir)?;
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err("create key file", path))?;
        let line = format!("{KEY_FILE_PREFIX}{}\n", BASE32.encode(self.0.as_bytes()));
        file.write_all(line.as_bytes())
            .and_then(|_| file.sync_all())
            .map_err(io_err("write key file", path))?;
        Ok(())
    }

    /// Loads the key at `path`, creating a new one there if none exists yet.
    /// Returns the key and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), IdentityError> {
        match Self::load(path) {
            Ok(key) => Ok((key, false)),
            Err(IdentityError::MissingKeyFile { .. }) => {
                let key = Self::generate();
                key.save_new(path)?;
                Ok((key, true))
            }
            Err(e) => Err(e),
        }
    }
}

/// Creates `dir` (and parents) readable only by its owner when it does not exist yet.
pub fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_52_lowercase_base32_and_round_trips() {
        let id = SecretKey::generate().node_id();
        let text = id.to_string();
        assert_eq!(text.len(), NODE_ID_LEN);
        assert!(
            text.chars()
                .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c))
        );
        assert_eq!(text.parse::<NodeId>().unwrap(), id);
    }

    #[test]
    fn malformed_node_ids_are_refused_with_a_hint() {
        let id = SecretKey::generate().node_id().to_string();
        for bad in [
            String::new(),
            id[..51].to_string(),
            id.to_uppercase(),
            format!("{}1", &id[..51]),
        ] {
            let err = bad.parse::<NodeId>().unwrap_err().to_string();
            assert!(err.contains("ferry-shim id"), "{err}");
        }
    }

    #[test]
    fn key_file_round_trip_and_permissions() {
        let dir = std::env::temp_dir().join(format!("ferry-id-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("node.key");
        let (key, created) = SecretKey::load_or_create(&path).unwrap();
        assert!(created);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, created) = SecretKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again.node_id(), key.node_id());

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "garbage").unwrap();
        let err = SecretKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a Ferry key file"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
