//! Encryption of secrets at rest (mailbox credentials) with ChaCha20-Poly1305.

use std::path::Path;

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, aead::Aead};

use super::StoreError;

/// Seals and opens secrets with one 32-byte key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(<key>)")
    }
}

const NONCE_LEN: usize = 12;

impl SecretBox {
    pub fn from_key(key: &[u8; 32]) -> Self {
        Self {
            cipher: ChaCha20Poly1305::new(key.into()),
        }
    }

    /// The configured base64 key, or the one kept in `key_file` (created with
    /// mode 0600 on first use).
    pub fn load(configured: Option<&str>, key_file: &Path) -> anyhow::Result<Self> {
        let key = match configured {
            Some(text) => decode_key(text.trim())
                .map_err(|e| anyhow::anyhow!("storage.encryption_key: {e}"))?,
            None if key_file.exists() => {
                let text = std::fs::read_to_string(key_file)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", key_file.display()))?;
                decode_key(text.trim())
                    .map_err(|e| anyhow::anyhow!("{}: {e}", key_file.display()))?
            }
            None => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key)
                    .map_err(|e| anyhow::anyhow!("no randomness for a new key: {e}"))?;
                write_private(key_file, BASE64.encode(key).as_bytes())?;
                key
            }
        };
        Ok(Self::from_key(&key))
    }

    pub fn seal(&self, plaintext: &[u8]) -> Result<String, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| StoreError::Engine(format!("no randomness for a nonce: {e}")))?;
        let ciphertext = self
            .cipher
            .encrypt(&Nonce::from(nonce), plaintext)
            .map_err(|_| StoreError::Engine("encryption failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ciphertext);
        Ok(BASE64.encode(out))
    }

    pub fn open(&self, sealed: &str) -> Result<Vec<u8>, StoreError> {
        let bytes = BASE64.decode(sealed).map_err(|_| StoreError::Decrypt)?;
        if bytes.len() < NONCE_LEN {
            return Err(StoreError::Decrypt);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| StoreError::Decrypt)?;
        self.cipher
            .decrypt(&Nonce::from(nonce), ciphertext)
            .map_err(|_| StoreError::Decrypt)
    }
}

fn decode_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = BASE64
        .decode(text)
        .map_err(|e| format!("not base64: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("must be 32 bytes, is {}", b.len()))
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_tamper_detection() {
        let sb = SecretBox::from_key(&[7u8; 32]);
        let sealed = sb.seal(b"hunter2").unwrap();
        assert!(!sealed.contains("hunter2"));
        assert_eq!(sb.open(&sealed).unwrap(), b"hunter2");
        let other = SecretBox::from_key(&[8u8; 32]);
        assert!(matches!(other.open(&sealed), Err(StoreError::Decrypt)));
        assert!(matches!(sb.open("AAAA"), Err(StoreError::Decrypt)));
    }

    #[test]
    fn generated_key_is_kept_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let first = SecretBox::load(None, &path).unwrap();
        let sealed = first.seal(b"x").unwrap();
        let second = SecretBox::load(None, &path).unwrap();
        assert_eq!(second.open(&sealed).unwrap(), b"x");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
