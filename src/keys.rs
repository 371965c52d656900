//! WireGuard keys: `genkey`, `pubkey`, `genpsk`, byte-compatible with `wg`.
//!
//! A key's text form is standard base64 with padding: 44 characters for 32 bytes. `wg genkey`
//! prints a clamped Curve25519 scalar; `wg pubkey` reads one on stdin and prints its public key;
//! `wg genpsk` prints 32 random bytes. Each output ends with one newline.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::rngs::OsRng;
use rand::RngCore as _;

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a key's base64 text.
pub const KEY_B64_LEN: usize = 44;

/// A key's text was not 32 bytes of base64.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyError {
    /// What was wrong with it, without the key itself.
    pub reason: &'static str,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason)
    }
}

impl std::error::Error for KeyError {}

/// Base64 text of a key, as `wg` prints it (no newline).
pub fn encode(key: &[u8; KEY_LEN]) -> String {
    STANDARD.encode(key)
}

/// Parses a key's base64 text (surrounding whitespace is ignored, like `wg`).
pub fn decode(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(KeyError {
            reason: "the key is empty",
        });
    }
    if text.len() != KEY_B64_LEN {
        return Err(KeyError {
            reason: "a key is 44 characters of base64 ending in '='",
        });
    }
    let bytes = STANDARD.decode(text).map_err(|_| KeyError {
        reason: "the key is not valid base64",
    })?;
    bytes.try_into().map_err(|_| KeyError {
        reason: "a key is 44 characters of base64 ending in '='",
    })
}

/// Clears and sets the bits of a Curve25519 scalar the way `wg genkey` does.
pub fn clamp(key: &mut [u8; KEY_LEN]) {
    key[0] &= 248;
    key[31] = (key[31] & 127) | 64;
}

/// A new random private key, clamped like `wg genkey`.
pub fn generate_private() -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    OsRng.fill_bytes(&mut key);
    clamp(&mut key);
    key
}

/// A new random preshared key, like `wg genpsk`.
pub fn generate_psk() -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    OsRng.fill_bytes(&mut key);
    key
}

/// The public key of a private key (clamping is part of the scalar multiplication, so an
/// unclamped private key gives the same result as with `wg pubkey`).
pub fn public_from_private(private: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    let secret = x25519_dalek::StaticSecret::from(*private);
    x25519_dalek::PublicKey::from(&secret).to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7748_public_key() {
        // RFC 7748 section 6.1: Alice's private and public key.
        let private: [u8; 32] = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let public: [u8; 32] = [
            0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e,
            0xf7, 0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e,
            0xaa, 0x9b, 0x4e, 0x6a,
        ];
        assert_eq!(public_from_private(&private), public);
    }

    #[test]
    fn generated_private_key_is_clamped() {
        for _ in 0..32 {
            let k = generate_private();
            assert_eq!(k[0] & 7, 0);
            assert_eq!(k[31] & 128, 0);
            assert_eq!(k[31] & 64, 64);
        }
    }

    #[test]
    fn round_trip_and_rejects() {
        let k = generate_psk();
        let text = encode(&k);
        assert_eq!(text.len(), KEY_B64_LEN);
        assert_eq!(decode(&format!("  {text}\n")), Ok(k));
        assert!(decode("").is_err());
        assert!(decode(&text[..43]).is_err());
        // 44 characters but not base64.
        assert!(decode("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=").is_err());
        // Valid base64 of 33 bytes is not a key.
        assert!(decode(&STANDARD.encode([1u8; 33])).is_err());
    }
}
