//! Helpers shared by the vmcrelay fuzz targets and the seed generator.
//!
//! - [`ticket_key`]: the fixed RSA ticket key, fast enough to make per run.
//! - [`Splits`]: turns a few input bytes into the read sizes a socket would
//!   have delivered, so every target sees arbitrary splits of its stream.
//! - [`reference_frames`]: a naive data-stage parser the deframer target
//!   compares the real one against.

use std::convert::Infallible;
use std::sync::OnceLock;

use rsa::rand_core::{TryCryptoRng, TryRng};
use rsa::traits::PrivateKeyParts;
use vmcrelay::proto::auth::{TicketKey, seeded_rng};
use rsa::pkcs8::EncodePublicKey;
use vmcrelay::proto::consts::{PUBKEY_LEN, TICKET_KEY_BITS};

/// Seed of the one real key generation (any value works; fixed so the
/// committed seed tickets stay valid).
const KEY_SEED: [u8; 32] = *b"vmcrelay-fuzz-ticket-key-seed-01";

/// Bytes per prime of an RSA-1024 key.
const PRIME_BYTES: usize = TICKET_KEY_BITS / 16;

/// What the one real key generation leaves behind.
struct FixedKey {
    /// p then q, little-endian, as `random_bits` reads them from an RNG.
    prime_script: Vec<u8>,
    /// The key's DER SubjectPublicKeyInfo, as rsa encodes it.
    public_der: [u8; PUBKEY_LEN],
}

fn fixed_key() -> &'static FixedKey {
    static FIXED: OnceLock<FixedKey> = OnceLock::new();
    FIXED.get_or_init(|| {
        let mut rng = seeded_rng(KEY_SEED);
        let key = rsa::PrivateKey::new(&mut rng, TICKET_KEY_BITS).expect("fixed key generates");
        let mut prime_script = Vec::with_capacity(2 * PRIME_BYTES);
        for p in key.primes() {
            let le = p.as_ref().to_le_bytes();
            assert!(le[PRIME_BYTES..].iter().all(|&b| b == 0), "prime wider than {PRIME_BYTES} bytes");
            prime_script.extend_from_slice(&le[..PRIME_BYTES]);
        }
        let der = key.to_public_key().to_public_key_der().expect("public key encodes");
        let public_der = der.as_bytes().try_into().expect("RSA-1024 SPKI is 162 bytes");
        FixedKey { prime_script, public_der }
    })
}

/// An "RNG" that first yields a script, then seeded bytes.
///
/// `ServerLink::new` consumes its `TicketKey` and `TicketKey` is neither
/// `Clone` nor constructible from parts, so every run needs a fresh key,
/// and a real keygen costs ~10 ms. RSA keygen draws each prime candidate as
/// `random_bits(512)`, little-endian, and sieves upward from it; when the
/// first candidate already is a prime the search ends at once. Replaying
/// the fixed key's primes therefore rebuilds the very same key in one
/// primality test per prime. This is test scaffolding, not a CSPRNG: the
/// `TryCryptoRng` marker only satisfies `TicketKey::generate`'s bound.
#[derive(Debug)]
struct ReplayRng {
    script: &'static [u8],
    pos: usize,
    /// xorshift64 state for anything asked past the script (nothing is,
    /// with rsa 0.10; [`ticket_key`] checks the result either way).
    fallback: Option<u64>,
}

impl TryRng for ReplayRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        let from_script = dst.len().min(self.script.len() - self.pos);
        dst[..from_script].copy_from_slice(&self.script[self.pos..self.pos + from_script]);
        self.pos += from_script;
        for b in &mut dst[from_script..] {
            let mut x = self.fallback.unwrap_or(0x9e37_79b9_7f4a_7c15);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.fallback = Some(x);
            *b = x.to_le_bytes()[0];
        }
        Ok(())
    }
}

impl TryCryptoRng for ReplayRng {}

/// The fixed key's DER public key (what a server link puts in its reply).
pub fn public_der() -> &'static [u8; PUBKEY_LEN] {
    &fixed_key().public_der
}

/// A fresh copy of the fixed ticket key, for `ServerLink::new` (which
/// consumes one). Every copy has the same key pair, so tickets encrypted
/// for [`public_der`] decrypt with it.
///
/// Uses `TicketKey::clone` if vmcrelay provides it (e.g. as
/// `#[cfg_attr(fuzzing, derive(Clone))]`; cargo-fuzz sets `--cfg fuzzing`
/// for every crate), else the prime replay: ~2 ms, which caps the
/// `server_link` target at a few hundred runs per second.
pub fn ticket_key() -> TicketKey {
    (&KeyProbe(fixed_ticket_key())).fresh_key()
}

/// A key to read with, never consumed (`decrypt_ticket` takes `&self`).
pub fn fixed_ticket_key() -> &'static TicketKey {
    static KEY: OnceLock<TicketKey> = OnceLock::new();
    KEY.get_or_init(replay_key)
}

/// Autoref specialisation: method lookup tries `KeyProbe<T>: ViaClone`
/// (needs `T: Clone`) before `&KeyProbe<TicketKey>: ViaReplay`, so the
/// cheap path switches on by itself once `TicketKey: Clone` exists.
#[allow(dead_code, reason = "read only by ViaClone, which is dead while TicketKey is not Clone")]
struct KeyProbe<'a, T>(&'a T);

#[allow(dead_code, reason = "chosen by method lookup only once TicketKey: Clone")]
trait ViaClone<T> {
    fn fresh_key(&self) -> T;
}

impl<T: Clone> ViaClone<T> for KeyProbe<'_, T> {
    fn fresh_key(&self) -> T {
        self.0.clone()
    }
}

trait ViaReplay {
    fn fresh_key(&self) -> TicketKey;
}

impl ViaReplay for &KeyProbe<'_, TicketKey> {
    fn fresh_key(&self) -> TicketKey {
        replay_key()
    }
}

/// Rebuilds the fixed key through `TicketKey::generate`: two primality
/// tests rather than a prime search.
fn replay_key() -> TicketKey {
    let fixed = fixed_key();
    let mut rng = ReplayRng { script: &fixed.prime_script, pos: 0, fallback: None };
    let key = TicketKey::generate(&mut rng).expect("replayed key generates");
    // Scaffolding invariants, checked every time (cheap next to keygen): a
    // change in how rsa draws primes must fail loudly, not silently slow
    // every run down or invalidate the committed tickets.
    assert!(rng.fallback.is_none(), "keygen read past the prime script");
    assert_eq!(rng.pos, fixed.prime_script.len(), "keygen did not read both primes");
    assert_eq!(key.public_der(), &fixed.public_der, "replayed key differs from the fixed key");
    key
}

/// Reads control bytes off the front of a fuzz input; zeros once empty,
/// so short inputs still mean something.
#[derive(Debug)]
pub struct Control<'a> {
    bytes: &'a [u8],
}

impl<'a> Control<'a> {
    /// Wraps the whole input.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// The next byte, or 0.
    pub fn u8(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((&b, rest)) => {
                self.bytes = rest;
                b
            }
            None => 0,
        }
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = rest;
        head
    }

    /// Read sizes: one count byte (low nibble), then that many size bytes.
    pub fn splits(&mut self) -> Splits<'a> {
        let n = usize::from(self.u8() & 0x0f);
        Splits { sizes: self.take(n), next: 0 }
    }

    /// Everything not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }
}

/// Chunk sizes a socket might have returned, cycled. Size byte `s`: 0 means
/// "everything left", 1..=127 that many bytes, 128..=255 `(s - 127) * 32`
/// bytes (32..=4096), so both byte-at-a-time and page-sized reads occur.
#[derive(Debug, Clone)]
pub struct Splits<'a> {
    sizes: &'a [u8],
    next: usize,
}

impl Splits<'_> {
    /// Length of the next chunk given `remaining` bytes (≥ 1 if any remain).
    pub fn next_len(&mut self, remaining: usize) -> usize {
        if self.sizes.is_empty() {
            return remaining;
        }
        let s = self.sizes[self.next % self.sizes.len()];
        self.next = self.next.wrapping_add(1);
        let len = match s {
            0 => remaining,
            1..=127 => usize::from(s),
            _ => usize::from(s - 127) * 32,
        };
        len.min(remaining)
    }

    /// A value derived from the current split byte, for targets that need
    /// one more choice per chunk (e.g. output buffer sizes).
    pub fn peek_byte(&self) -> u8 {
        if self.sizes.is_empty() { 0 } else { self.sizes[self.next % self.sizes.len()] }
    }
}

/// One message as the naive reference parser sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefFrame {
    /// Message type.
    pub msg_type: u16,
    /// Announced body size.
    pub size: u32,
    /// Serial (0 with the mini header).
    pub serial: u64,
    /// Sub-list offset (0 with the mini header).
    pub sub_list: u32,
    /// Body bytes present in the stream (shorter than `size` only for the
    /// last, cut-off message).
    pub body: Vec<u8>,
}

/// What the reference parser makes of a whole stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefParse {
    /// Messages whose header is complete.
    pub frames: Vec<RefFrame>,
    /// Bytes of a trailing, incomplete header.
    pub partial_header: usize,
}

fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |acc, &x| acc << 8 | u64::from(x))
}

/// Parses a data-stage stream the obvious way, all at once: header fields
/// little-endian at fixed offsets (mini: type u16, size u32; full: serial
/// u64, type u16, size u32, sub_list u32), then `size` body bytes.
pub fn reference_frames(mini: bool, stream: &[u8]) -> RefParse {
    let header_len = if mini { 6 } else { 18 };
    let mut frames = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &stream[pos..];
        if rest.len() < header_len {
            return RefParse { frames, partial_header: rest.len() };
        }
        let h = &rest[..header_len];
        let (serial, msg_type, size, sub_list) = if mini {
            (0, le(&h[0..2]), le(&h[2..6]), 0)
        } else {
            (le(&h[0..8]), le(&h[8..10]), le(&h[10..14]), le(&h[14..18]))
        };
        let size = u32::try_from(size).expect("4-byte field");
        let body_start = pos + header_len;
        let body_end = body_start.saturating_add(size as usize).min(stream.len());
        frames.push(RefFrame {
            msg_type: u16::try_from(msg_type).expect("2-byte field"),
            size,
            serial,
            sub_list: u32::try_from(sub_list).expect("4-byte field"),
            body: stream[body_start..body_end].to_vec(),
        });
        if body_end - body_start < size as usize {
            return RefParse { frames, partial_header: 0 };
        }
        pos = body_end;
    }
}
