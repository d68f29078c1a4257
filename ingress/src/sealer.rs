//! Sealing connector credentials at rest with ChaCha20-Poly1305 (`FLUX_ENCRYPTION_KEY`).
//!
//! Invariant: a credential is stored only sealed — `base64(nonce ‖ ciphertext+tag)` with a
//! fresh random 96-bit nonce per seal — so the log, snapshots and the data directory never hold
//! it in clear. The key is 32 bytes given as 64 hex characters or base64.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

/// Seals and opens credentials with one key.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

impl Sealer {
    /// Parses a 32-byte key from 64 hex characters or base64.
    pub fn from_key_text(text: &str) -> Result<Sealer, String> {
        let text = text.trim();
        let bytes = hex::decode(text)
            .ok()
            .filter(|b| b.len() == 32)
            .or_else(|| STANDARD.decode(text).ok().filter(|b| b.len() == 32))
            .ok_or("the key must be 32 bytes: 64 hex characters or base64")?;
        Ok(Sealer {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&bytes)),
        })
    }

    pub fn seal(&self, secret: &str) -> Result<String, String> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| format!("no randomness: {e}"))?;
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), secret.as_bytes())
            .map_err(|_| "encryption failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(STANDARD.encode(out))
    }

    pub fn open(&self, sealed: &str) -> Result<String, String> {
        let bytes = STANDARD
            .decode(sealed)
            .map_err(|_| "not base64".to_string())?;
        if bytes.len() < 12 + 16 {
            return Err("too short".into());
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), ciphertext)
            .map_err(|_| "wrong key or damaged credential".to_string())?;
        String::from_utf8(plain).map_err(|_| "not UTF-8".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_and_rejects_other_keys() {
        let sealer = Sealer::from_key_text(&"ab".repeat(32)).expect("hex key");
        let sealed = sealer.seal("ghp_secret").expect("seal");
        assert!(!sealed.contains("ghp_secret"));
        assert_ne!(
            sealed,
            sealer.seal("ghp_secret").expect("seal"),
            "fresh nonce per seal"
        );
        assert_eq!(sealer.open(&sealed).expect("open"), "ghp_secret");
        let other = Sealer::from_key_text(&"cd".repeat(32)).expect("hex key");
        assert!(other.open(&sealed).is_err());
        assert!(Sealer::from_key_text("short").is_err());
    }
}
