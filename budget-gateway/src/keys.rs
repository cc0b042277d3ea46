//! API keys: made from the OS's randomness, kept only as hashes, and
//! looked up on the request path without a lock.
//!
//! # How it works
//!
//! A key made by the admin API is `sk-ab-` followed by 40 hex digits: 160
//! bits from the operating system's random source (`getrandom`), so a key
//! cannot be guessed, and its prefix tells a leaked key for what it is
//! (secret scanners look for such prefixes). The key is shown once, in the
//! answer that creates it; what is kept, in the database and in memory, is
//! its SHA-256 ([`KeyHash`]) and its first 12 characters, to tell keys
//! apart in a list. A fast unkeyed hash is enough for keys this random:
//! nobody can search 2^160 candidates for one that matches a stolen hash,
//! so the slow, salted hashes passwords need would only slow every request.
//!
//! [`KeyTable`] maps the hash of every key the gateway accepts, from the
//! file and from the database alike, to its agent. A request's key is
//! hashed (SHA-256 of a 46-byte key is one compression block with the CPU's
//! SHA extensions) and looked up in a `papaya` map: lock-free for readers,
//! so keys created and revoked at runtime never make a request wait. The
//! map's hasher is the digest's first eight bytes, already uniform; the
//! final comparison of two digests is in constant time, as is every
//! comparison of a secret here ([`constant_time_eq`]).
//!
//! A client sends the same key request after request, so each thread
//! remembers the digests of the last keys it hashed
//! ([`KeyHash::of_presented`]), found again by a keyed 128-bit SipHash-1-3
//! of the key. Measured with `cargo bench -p budget-gateway --bench admin
//! -- identify` (one thread, 10,000 keys): a returning key costs 38 ns
//! against 78 with SHA-256 every time on a CPU with SHA extensions, and
//! about 700 instructions against 4,100 under callgrind, which hides them
//! (as many servers' CPUs lack them); a key the thread does not remember
//! costs the SipHash more, 123 ns against 104. The memory holds no key:
//! only its SipHash, under keys drawn per thread from the OS, which tells
//! nothing of it and which another key matches with a chance of 2^-128 a
//! try. The memo maps a key to its digest and nothing else, so a revoked
//! key is refused as soon as the table forgets its digest.
//!
//! A key's last use is recorded off the request path: the lookup sets a
//! flag on the key's entry (once; later requests only read it), and a
//! background task collects the flags every few seconds and writes them to
//! the database in one batch (see [`crate::catalog`]).

use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use agent_budget::AgentId;
use agent_budget_tower::{bearer_key, Identify, Rejection};
use http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// The id of a key made by the admin API (not secret).
pub type KeyId = Uuid;

/// What every generated key starts with.
pub const KEY_PREFIX: &str = "sk-ab-";

/// Random bytes in a generated key: 160 bits.
const SECRET_BYTES: usize = 20;

/// Characters of a key kept to tell it apart: the prefix and 6 hex digits
/// (24 of its 160 bits).
const SHOWN_CHARS: usize = KEY_PREFIX.len() + 6;

/// `a == b`, in a time that depends on their lengths only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// The SHA-256 of a key: what is kept of it.
#[derive(Clone, Copy)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// The hash of `key`.
    pub fn of(key: &str) -> Self {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    /// The hash of `key`, a key a request presented: as [`of`](Self::of),
    /// remembered by this thread for the next request with the same key
    /// (see the module's docs).
    pub fn of_presented(key: &str) -> Self {
        memo::digest_of(key)
    }

    /// As 64 lowercase hex digits (how the database stores it).
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// From [`to_hex`](Self::to_hex)'s form; `None` if it is not that.
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(KeyHash(bytes))
    }
}

impl PartialEq for KeyHash {
    /// In constant time: the four words are compared all, with no branch
    /// on their values (`subtle`'s per-byte barriers cost a lookup more
    /// than the rest of it, for digests whose leak would tell nothing of
    /// a key anyway).
    fn eq(&self, other: &Self) -> bool {
        let word = |bytes: &[u8; 32], i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[8 * i..8 * i + 8]);
            u64::from_ne_bytes(w)
        };
        (0..4).fold(0, |diff, i| diff | (word(&self.0, i) ^ word(&other.0, i))) == 0
    }
}

impl Eq for KeyHash {}

impl Hash for KeyHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyHash({}…)", &self.to_hex()[..8])
    }
}

/// The hasher of [`KeyTable`]: a digest's first eight bytes are its hash.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is called by `KeyHash`; anything else is folded
        // in, so the hasher stays correct if it ever is.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A key just made: the secret to show once, and what is kept of it.
pub struct NewKey {
    /// The key itself, `sk-ab-…`: shown once, never stored.
    pub secret: String,
    /// Its hash.
    pub hash: KeyHash,
    /// Its first characters, to tell it apart in a list.
    pub shown: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("shown", &self.shown)
            .finish_non_exhaustive()
    }
}

/// Makes a key from the operating system's random source.
pub fn generate() -> Result<NewKey, getrandom::Error> {
    let mut random = [0u8; SECRET_BYTES];
    getrandom::fill(&mut random)?;
    let secret = format!("{KEY_PREFIX}{}", hex(&random));
    Ok(NewKey {
        hash: KeyHash::of(&secret),
        shown: secret[..SHOWN_CHARS].to_owned(),
        secret,
    })
}

/// One accepted key: its agent, and for a key of the database its id and
/// whether it was used since the last collection.
struct Entry {
    agent: AgentId,
    id: Option<KeyId>,
    used: AtomicBool,
}

/// Every key the gateway accepts, by hash: the layer's way to tell the
/// agent from `Authorization: Bearer <key>`. Clones share the table.
#[derive(Clone)]
pub struct KeyTable {
    keys: Arc<papaya::HashMap<KeyHash, Entry, BuildHasherDefault<DigestHasher>>>,
}

impl Default for KeyTable {
    fn default() -> Self {
        KeyTable {
            keys: Arc::new(papaya::HashMap::with_hasher(BuildHasherDefault::default())),
        }
    }
}

impl std::fmt::Debug for KeyTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTable")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl KeyTable {
    /// Accepts the key of `hash` for `agent` from now on; `id` is the
    /// database's id of the key (`None` for a key of the file).
    pub fn insert(&self, hash: KeyHash, agent: AgentId, id: Option<KeyId>) {
        let entry = Entry {
            agent,
            id,
            used: AtomicBool::new(false),
        };
        self.keys.pin().insert(hash, entry);
    }

    /// Refuses the key of `hash` from now on.
    pub fn remove(&self, hash: &KeyHash) {
        self.keys.pin().remove(hash);
    }

    /// The agent of `key`, if it is accepted.
    pub fn agent_of(&self, key: &str) -> Option<AgentId> {
        self.agent_of_hash(&KeyHash::of_presented(key))
    }

    /// The agent of the key whose hash is `hash`, if it is accepted.
    pub fn agent_of_hash(&self, hash: &KeyHash) -> Option<AgentId> {
        let keys = self.keys.pin();
        let entry = keys.get(hash)?;
        // Relaxed: a hint for the collector, which publishes nothing
        // through it. Read first, so a key in use is written once per
        // collection, not by every request.
        if entry.id.is_some() && !entry.used.load(Ordering::Relaxed) {
            entry.used.store(true, Ordering::Relaxed);
        }
        Some(entry.agent)
    }

    /// The database's keys used since the last call, their flags cleared.
    pub fn take_used(&self) -> Vec<KeyId> {
        let keys = self.keys.pin();
        keys.values()
            .filter(|e| e.used.swap(false, Ordering::Relaxed))
            .filter_map(|e| e.id)
            .collect()
    }

    /// How many keys are accepted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is accepted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl Identify for KeyTable {
    fn identify(&self, request: &Parts) -> Result<AgentId, Rejection> {
        let key = bearer_key(&request.headers).ok_or_else(|| {
            Rejection::unauthenticated(
                "You didn't provide an API key: send it as `Authorization: Bearer <key>`.",
            )
        })?;
        self.agent_of(key)
            .ok_or_else(|| Rejection::unauthenticated("Incorrect API key provided."))
    }
}

/// The digests of the keys this thread hashed last.
mod memo {
    use std::cell::RefCell;

    use siphasher::sip128::SipHasher13;

    use super::KeyHash;

    /// Keys remembered per thread: a gateway's clients with one key each,
    /// on a worker, rarely number more.
    const SLOTS: usize = 64;

    struct Memo {
        /// `None` where the OS gave no randomness: every key is hashed.
        fingerprint: Option<SipHasher13>,
        /// A key's fingerprint and its digest, in the slot its fingerprint's
        /// low bits choose.
        slots: [Option<(u128, KeyHash)>; SLOTS],
    }

    thread_local! {
        static MEMO: RefCell<Memo> = RefCell::new(Memo {
            fingerprint: getrandom::u64()
                .and_then(|k0| Ok((k0, getrandom::u64()?)))
                .ok()
                .map(|(k0, k1)| SipHasher13::new_with_keys(k0, k1)),
            slots: [None; SLOTS],
        });
    }

    pub(super) fn digest_of(key: &str) -> KeyHash {
        MEMO.try_with(|memo| {
            let mut memo = memo.borrow_mut();
            let Some(fingerprint) = memo.fingerprint.as_ref() else {
                return KeyHash::of(key);
            };
            let fingerprint = fingerprint.hash(key.as_bytes()).as_u128();
            let slot = &mut memo.slots[fingerprint as usize % SLOTS];
            match slot {
                // A fingerprint says nothing of the key; compared plainly.
                Some((known, digest)) if *known == fingerprint => *digest,
                _ => {
                    let digest = KeyHash::of(key);
                    *slot = Some((fingerprint, digest));
                    digest
                }
            }
        })
        // A thread being torn down: no memo, the digest as it is.
        .unwrap_or_else(|_| KeyHash::of(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"admin", b"admin"));
        assert!(!constant_time_eq(b"admin", b"admim"));
        assert!(!constant_time_eq(b"admin", b"admin2"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn generated_keys_are_long_random_and_recognizable() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a.secret, b.secret);
        assert!(a.secret.starts_with(KEY_PREFIX));
        assert_eq!(a.secret.len(), KEY_PREFIX.len() + 2 * SECRET_BYTES);
        assert!(a.secret[KEY_PREFIX.len()..]
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert!(a.secret.starts_with(&a.shown));
        assert_eq!(a.hash, KeyHash::of(&a.secret));
        assert!(!format!("{a:?}").contains(&a.secret[SHOWN_CHARS..]));
    }

    #[test]
    fn hashes_round_trip_through_hex() {
        let h = KeyHash::of("sk-1");
        // SHA-256("sk-1"), as `printf sk-1 | sha256sum` prints it.
        assert_eq!(
            h.to_hex(),
            "0f2c10bf3d128c719c6bfa4ecbae94b7fceebaea6e4438fef38a90e5acc326f3"
        );
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        // Equal only when every byte is: the last one decides here.
        let mut last = h.to_hex();
        last.replace_range(63.., if last.ends_with('0') { "1" } else { "0" });
        assert_ne!(KeyHash::from_hex(&last).unwrap(), h);
        let mut first = h.to_hex();
        first.replace_range(..1, if first.starts_with('0') { "1" } else { "0" });
        assert_ne!(KeyHash::from_hex(&first).unwrap(), h);
        assert_eq!(KeyHash::from_hex("zz"), None);
        assert_eq!(KeyHash::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn a_presented_key_gets_its_own_digest_however_many_share_the_memo() {
        // More keys than the memo has slots, so slots are shared and
        // overwritten; keys one character apart; each presented three
        // times, in rounds, so that some are found and some were replaced.
        let keys: Vec<String> = (0..500)
            .flat_map(|i| [format!("sk-ab-{i:040}"), format!("sk-ab-{i:039}x")])
            .collect();
        for round in 0..3 {
            for key in keys.iter().skip(round) {
                assert_eq!(KeyHash::of_presented(key), KeyHash::of(key), "{key}");
                assert_eq!(KeyHash::of_presented(key), KeyHash::of(key), "{key}");
            }
        }
        // Another thread has its own memo, and the same answers.
        std::thread::spawn(move || {
            for key in &keys {
                assert_eq!(KeyHash::of_presented(key), KeyHash::of(key), "{key}");
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_table_identifies_marks_and_forgets_keys() {
        let table = KeyTable::default();
        let (agent, id) = (AgentId::from_u128(1), KeyId::from_u128(2));
        table.insert(KeyHash::of("sk-file"), agent, None);
        table.insert(KeyHash::of("sk-db"), agent, Some(id));
        assert_eq!(table.agent_of("sk-file"), Some(agent));
        assert_eq!(table.agent_of("sk-other"), None);
        assert!(table.take_used().is_empty(), "file keys are not tracked");
        assert_eq!(table.agent_of("sk-db"), Some(agent));
        assert_eq!(table.agent_of("sk-db"), Some(agent));
        assert_eq!(table.take_used(), [id]);
        assert!(table.take_used().is_empty(), "collected once");
        table.remove(&KeyHash::of("sk-db"));
        assert_eq!(table.agent_of("sk-db"), None);
        assert_eq!(table.len(), 1);
    }
}
