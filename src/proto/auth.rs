//! RSA ticket authentication: RSA-1024, OAEP with SHA-1 and MGF1(SHA-1),
//! empty label, as spice-server and spice-gtk do it.
//!
//! The server needs a fresh key per link. Generating one costs
//! milliseconds, so [`TicketKey`] is a plain value that a pool, refilled
//! by a helper thread off the data path, hands to each
//! [`ServerLink`](super::server_link::ServerLink). Each key decrypts at
//! most one ticket, which also makes decryption-timing attacks moot.

use rand::{CryptoRng, Rng};
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use rsa::{Oaep, PrivateKey, PublicKey};
use sha1::Sha1;

use super::consts::{MAX_PASSWORD_LEN, PUBKEY_LEN, TICKET_KEY_BITS, TICKET_LEN};

/// Authentication failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The server's public key does not parse as a DER RSA key.
    #[error("server public key is not a valid RSA key")]
    BadPublicKey,
    /// Password longer than SPICE allows.
    #[error("password longer than {MAX_PASSWORD_LEN} bytes")]
    PasswordTooLong,
    /// The RSA operation failed.
    #[error("RSA operation failed")]
    Rsa,
}

/// One link's RSA key pair with its public half pre-encoded for the reply.
///
/// Not `Clone`: each key serves one link. [`TicketKey::share`] exists for
/// an explicit, documented key-reuse window (see the relay's
/// `--key-reuse`): a ticket sniffed on one link could be replayed on
/// another link that got the same key, so reuse trades that risk for link
/// set-up rate.
#[cfg_attr(fuzzing, derive(Clone))]
pub struct TicketKey {
    inner: std::sync::Arc<KeyPair>,
}

struct KeyPair {
    private: PrivateKey,
    public_der: [u8; PUBKEY_LEN],
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKey").finish_non_exhaustive()
    }
}

impl TicketKey {
    /// Generates a fresh RSA-1024 key (milliseconds: keep it off the data path).
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Result<Self, AuthError> {
        let private = PrivateKey::new(rng, TICKET_KEY_BITS).map_err(|_| AuthError::Rsa)?;
        let der = private.to_public_key().to_public_key_der().map_err(|_| AuthError::Rsa)?;
        let public_der: [u8; PUBKEY_LEN] = der.as_bytes().try_into().map_err(|_| AuthError::Rsa)?;
        Ok(Self { inner: std::sync::Arc::new(KeyPair { private, public_der }) })
    }

    /// Another handle on the same key pair, for a deliberate reuse window.
    pub fn share(&self) -> Self {
        Self { inner: std::sync::Arc::clone(&self.inner) }
    }

    /// The 162-byte DER SubjectPublicKeyInfo sent in the link reply.
    pub fn public_der(&self) -> &[u8; PUBKEY_LEN] {
        &self.inner.public_der
    }

    /// Decrypts a ticket. Returns the password bytes up to the first NUL
    /// (spice-gtk sends `password\0`; a missing NUL is accepted as
    /// spice-server does), or `None` if decryption fails.
    pub fn decrypt_ticket(&self, ticket: &[u8; TICKET_LEN]) -> Option<Vec<u8>> {
        let mut plain = self.inner.private.decrypt(Oaep::<Sha1>::new(), ticket).ok()?;
        if let Some(nul) = plain.iter().position(|&b| b == 0) {
            plain.truncate(nul);
        }
        Some(plain)
    }
}

/// Encrypts `password` + NUL for the server's key, as spice-gtk does.
pub fn encrypt_ticket<R: CryptoRng + ?Sized>(
    rng: &mut R,
    server_key_der: &[u8],
    password: &[u8],
) -> Result<[u8; TICKET_LEN], AuthError> {
    if password.len() > MAX_PASSWORD_LEN {
        return Err(AuthError::PasswordTooLong);
    }
    let key = PublicKey::from_public_key_der(server_key_der).map_err(|_| AuthError::BadPublicKey)?;
    let mut plain = [0u8; MAX_PASSWORD_LEN + 1];
    plain[..password.len()].copy_from_slice(password);
    let ct = key.encrypt(rng, Oaep::<Sha1>::new(), &plain[..=password.len()]).map_err(|_| AuthError::Rsa)?;
    ct.as_slice().try_into().map_err(|_| AuthError::BadPublicKey)
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A seeded RNG for deterministic tests and for the client link's OAEP
/// padding (seed it from the OS in production).
pub fn seeded_rng(seed: [u8; 32]) -> rand::rngs::StdRng {
    rand::SeedableRng::from_seed(seed)
}

/// Fills a 32-byte seed from any RNG.
pub fn seed_from<R: Rng + ?Sized>(rng: &mut R) -> [u8; 32] {
    let mut s = [0u8; 32];
    rng.fill_bytes(&mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_round_trip() {
        let mut rng = seeded_rng([7; 32]);
        let key = TicketKey::generate(&mut rng).expect("keygen");
        assert_eq!(&key.public_der()[..4], &[0x30, 0x81, 0x9f, 0x30]);
        let t = encrypt_ticket(&mut rng, key.public_der(), b"s3cret").expect("encrypt");
        assert_eq!(key.decrypt_ticket(&t).as_deref(), Some(&b"s3cret"[..]));
        let t = encrypt_ticket(&mut rng, key.public_der(), b"").expect("encrypt");
        assert_eq!(key.decrypt_ticket(&t).as_deref(), Some(&b""[..]));
        assert_eq!(key.decrypt_ticket(&[0x55; TICKET_LEN]), None);
        assert_eq!(encrypt_ticket(&mut rng, key.public_der(), &[b'a'; 61]), Err(AuthError::PasswordTooLong));
        assert_eq!(encrypt_ticket(&mut rng, &[0u8; 162], b"x"), Err(AuthError::BadPublicKey));
    }

    #[test]
    fn ct_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
