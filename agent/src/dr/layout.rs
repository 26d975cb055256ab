//! The object store's data layout: content-addressed chunks packed into pack objects, and
//! points in time as manifests of chunk references. Pure: it encodes, decodes, plans and
//! checks; [`super::objstore`] moves the bytes.
//!
//! # Concepts
//!
//! * **Chunk id.** The BLAKE3 hash of a chunk's content (one chunk of the replica, 64 KiB by
//!   default). Equal content has one id, so a chunk shared by two points, two volumes or two
//!   hosts (a fleet of similar OS disks) is stored once. A chunk of zeros is never stored:
//!   references say "zero".
//! * **Pack** (`packs/ID`). Many chunks in one object of tens of MiB (one PUT per many chunks;
//!   object stores charge and slow down per request), each stored raw or zstd-compressed,
//!   followed by the pack's index and a trailer. `ID` is the BLAKE3 hash of the whole object:
//!   a request retried is the same object. A random salt follows the pack's header
//!   ([`PACK_SALT_BYTES`]), so that two packs of the same chunks are two objects: a commit
//!   that stores again the chunks of a condemned pack must not find that pack "already
//!   there" and reference it, since a collection may be deleting it (readers find chunks by
//!   the index's offsets, so packs written before the salt, without it, read the same).
//! * **Index** (`index/ID`). The pack's table of chunk id → where, how long, which codec. The
//!   same bytes end the pack, so a lost index object can be rebuilt from its pack; the copy
//!   alone lets a receiver learn what the store holds without reading packs. Checksummed.
//! * **Manifest** (`volumes/VOLUME/manifests/SEQ`). One point of one volume: its geometry,
//!   the point's record, and chunk references (chunk number → chunk id or zero; an absent
//!   chunk is zero). A manifest is *full* (every non-zero chunk) or a *delta* against the
//!   previous point's manifest (only the chunks that changed, a chunk that became zero as an
//!   explicit zero), so a point costs what it changed. Every [`FULL_EVERY`]th point is full,
//!   which bounds the chain a read walks. Checksummed.
//! * **Commit.** A cycle's packs and indexes are written first and its manifest last, with a
//!   conditional create (`put_if_absent`): the manifest's existence *is* the commit, and two
//!   writers cannot both commit the same point. A writer killed before the manifest leaves
//!   only unreferenced packs, which garbage collection removes.
//! * **Tombstone.** Retention does not delete a dropped point's manifest: it replaces it with
//!   [`TOMBSTONE`], so that the point's name is never free again. A writer whose lease ran
//!   out while it was paused (or whose request the store applied late) then cannot create a
//!   manifest under a name that retention emptied, where it would lead to points that are
//!   gone: its conditional create is refused. Tombstones are not points; a collection deletes
//!   them after [`TOMBSTONE_KEEP_MS`], far past any lease and any request's lifetime.
//! * **Garbage collection** ([`gc_plan`]). Retention drops manifests; a pack none of whose
//!   chunks a remaining manifest references is deleted, and a pack that is mostly dead is
//!   repacked. Packs younger than a grace period are left alone: a commit in progress may be
//!   about to reference them (its packs are written before its manifest).
//!
//! Every decoder bounds what it reads and checks it, since the store may be shared, damaged,
//! or written by a buggy or hostile peer.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use blkmirror_protocol::wire::{self, PointInfo};

/// A chunk's content hash.
pub type ChunkId = [u8; 32];

/// A pack's hash (of the whole object).
pub type PackId = [u8; 32];

/// A full manifest after this many deltas: a read walks at most this many manifests.
pub const FULL_EVERY: u64 = 32;

/// Bytes of the random salt after a pack's header (see the module docs, "Pack").
pub const PACK_SALT_BYTES: usize = 16;

/// The most chunks one pack holds (an index stays under 1 MiB).
pub const MAX_PACK_CHUNKS: usize = 16_384;

/// The largest chunk a pack holds.
pub const MAX_CHUNK_BYTES: u32 = 16 << 20;

/// The most references one manifest holds: a 64 TiB volume in 64 KiB chunks is 2^30 chunks,
/// which a single object cannot sensibly carry; volumes past 2^28 chunks need a layered
/// manifest (not built).
pub const MAX_MANIFEST_ENTRIES: u64 = 1 << 28;

/// What a dropped point's manifest becomes (see the module docs): shorter than any manifest.
pub const TOMBSTONE: &[u8] = b"BMTS\x01dropped by retention\n";

/// How long a tombstone stays: a day, against leases of seconds and requests that S3-style
/// stores refuse once their signature is 15 minutes old.
pub const TOMBSTONE_KEEP_MS: u64 = 24 * 3600 * 1000;

/// The largest point record in a manifest.
const MAX_POINT_BYTES: u32 = 4096;

const PACK_MAGIC: &[u8; 4] = b"BMPK";
const INDEX_MAGIC: &[u8; 4] = b"BMIX";
const MANIFEST_MAGIC: &[u8; 4] = b"BMMF";
const VERSION: u8 = 1;
const INDEX_ENTRY_BYTES: usize = 32 + 8 + 4 + 4 + 1;
const TRAILER_BYTES: usize = 4 + 4;
/// In an index entry's codec byte: the stored bytes are sealed.
const SEALED_FLAG: u8 = 2;

/// What is wrong with an object of the layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The object is not what its name says, or is damaged.
    #[error("{what}: {detail}")]
    Malformed {
        /// Which kind of object.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A chunk's content does not hash to its id.
    #[error("chunk {} does not match its content (the pack is damaged)", hex(.0))]
    ChunkMismatch(ChunkId),
    /// A delta manifest does not follow the point it is applied to.
    #[error("manifest {seq} is a delta against {base}, but the chain is at {at}")]
    BrokenChain {
        /// The manifest.
        seq: u64,
        /// Its base.
        base: u64,
        /// Where the chain is.
        at: u64,
    },
    /// A pack would exceed its bounds.
    #[error("{0}")]
    PackFull(String),
}

fn malformed(what: &'static str, detail: impl Into<String>) -> LayoutError {
    LayoutError::Malformed {
        what,
        detail: detail.into(),
    }
}

/// Lower-case hex of a hash.
pub fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The id of a chunk's content in a store without encryption.
pub fn chunk_id(content: &[u8]) -> ChunkId {
    *blake3::hash(content).as_bytes()
}

/// The bytes AES-256-GCM adds to each stored chunk (its tag).
pub const SEAL_TAG_BYTES: usize = 16;

/// How a store names and stores chunks: without encryption, a chunk's id is the BLAKE3 hash
/// of its content and its stored bytes are the content (compressed or not); with encryption
/// at rest, the id is a BLAKE3 hash keyed by a key derived from the store's key, and the
/// stored bytes are sealed with AES-256-GCM under another.
///
/// Why a keyed id: the store sees ids, and a plain hash would let it confirm a guess of a
/// chunk's content (a known file's block). Why a nonce derived from the id (the first 96 bits
/// of a third keyed hash): equal ids are equal contents, so a nonce repeats only with the same
/// plaintext, which then seals to the same bytes, and no random source or counter has to be
/// shared between receivers. The id is the associated data, so a chunk's sealed bytes moved
/// under another id do not open.
#[derive(Clone, Default)]
pub struct Sealing {
    keys: Option<std::sync::Arc<SealKeys>>,
}

struct SealKeys {
    id: [u8; 32],
    nonce: [u8; 32],
    check: [u8; 32],
    aead: ring::aead::LessSafeKey,
}

impl std::fmt::Debug for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.write_str(if self.keys.is_some() {
            "Sealing(encrypted)"
        } else {
            "Sealing(plain)"
        })
    }
}

impl Sealing {
    /// No encryption.
    pub fn plain() -> Self {
        Self::default()
    }

    /// Encryption under the store key `key` (256 random bits the receivers share).
    pub fn encrypted(key: &[u8; 32]) -> Self {
        let derive = |context: &str| blake3::derive_key(context, key);
        let aead_key = derive("blkmirror 2026-12 object store chunk sealing");
        let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &aead_key)
            .expect("a 256-bit AES key");
        Self {
            keys: Some(std::sync::Arc::new(SealKeys {
                id: derive("blkmirror 2026-12 object store chunk id"),
                nonce: derive("blkmirror 2026-12 object store chunk nonce"),
                check: derive("blkmirror 2026-12 object store key check"),
                aead: ring::aead::LessSafeKey::new(unbound),
            })),
        }
    }

    /// Whether chunks are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// A value that tells whether two receivers hold the same key, and reveals nothing of
    /// it (a hash under a key derived for that alone); `None` without encryption.
    pub fn key_check(&self) -> Option<String> {
        self.keys.as_ref().map(|keys| hex(&keys.check))
    }

    /// The id of a chunk's content.
    pub fn chunk_id(&self, content: &[u8]) -> ChunkId {
        match &self.keys {
            None => chunk_id(content),
            Some(keys) => *blake3::keyed_hash(&keys.id, content).as_bytes(),
        }
    }

    fn nonce(keys: &SealKeys, id: &ChunkId) -> ring::aead::Nonce {
        let hash = blake3::keyed_hash(&keys.nonce, id);
        let bytes: [u8; 12] = hash.as_bytes()[..12].try_into().expect("12 bytes");
        ring::aead::Nonce::assume_unique_for_key(bytes)
    }

    /// The stored form of chunk `id`'s bytes (content, compressed or not).
    fn seal(&self, id: &ChunkId, mut bytes: Vec<u8>) -> Vec<u8> {
        if let Some(keys) = &self.keys {
            keys.aead
                .seal_in_place_append_tag(
                    Self::nonce(keys, id),
                    ring::aead::Aad::from(id),
                    &mut bytes,
                )
                .expect("a chunk within AES-GCM's limits");
        }
        bytes
    }

    /// The bytes that chunk `id`'s stored form seals; a damaged, moved or foreign (another
    /// key's) chunk is refused as not matching its id.
    fn open(&self, id: &ChunkId, stored: &[u8]) -> Result<Vec<u8>, LayoutError> {
        let Some(keys) = &self.keys else {
            return Ok(stored.to_vec());
        };
        let mut bytes = stored.to_vec();
        let opened = keys
            .aead
            .open_in_place(Self::nonce(keys, id), ring::aead::Aad::from(id), &mut bytes)
            .map_err(|_| LayoutError::ChunkMismatch(*id))?;
        let len = opened.len();
        bytes.truncate(len);
        Ok(bytes)
    }
}

/// The object key of a pack.
pub fn pack_key(id: &PackId) -> String {
    format!("packs/{}", hex(id))
}

/// The object key of a pack's index.
pub fn index_key(id: &PackId) -> String {
    format!("index/{}", hex(id))
}

/// The folder of the log of added packs: one empty object per pack, named by when it was
/// written ([`added_key`]), so that a receiver can list the packs added since it last looked
/// (a listing from a key on) instead of every pack in the store.
pub const ADDED_PREFIX: &str = "added";

/// The key of `pack`'s entry in the log of added packs: the writer's clock at the upload
/// (milliseconds, zero-padded so that keys list in time order), then the pack.
pub fn added_key(written_unix_ms: u64, pack: &PackId) -> String {
    format!("{ADDED_PREFIX}/{written_unix_ms:013}-{}", hex(pack))
}

/// The first key of the log at `unix_ms` or later (for a listing after it).
pub fn added_key_from(unix_ms: u64) -> String {
    format!("{ADDED_PREFIX}/{unix_ms:013}")
}

/// The time and pack an [`added_key`] names; `None` for anything else.
pub fn parse_added_key(key: &str) -> Option<(u64, PackId)> {
    let name = key.strip_prefix(ADDED_PREFIX)?.strip_prefix('/')?;
    let (written, pack) = name.split_once('-')?;
    if written.len() != 13 || !written.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((written.parse().ok()?, parse_hex(pack)?))
}

/// The 32 bytes that 64 hex digits spell ([`hex()`] read back).
pub fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// The object key of a volume's manifest for point `seq` (zero-padded: keys list in order).
pub fn manifest_key(volume: &str, seq: u64) -> String {
    format!("volumes/{volume}/manifests/{seq:020}")
}

/// How a chunk is stored in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// As is.
    Raw,
    /// zstd.
    Zstd,
}

/// Where a chunk is in its pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// The chunk.
    pub id: ChunkId,
    /// Offset in the pack object.
    pub offset: u64,
    /// Bytes in the pack.
    pub stored_len: u32,
    /// Bytes of content.
    pub raw_len: u32,
    /// How it is stored.
    pub codec: Codec,
    /// Whether its stored bytes are sealed ([`Sealing`]: `stored_len` counts the tag).
    pub sealed: bool,
}

/// A pack being filled.
pub struct PackBuilder {
    bytes: Vec<u8>,
    entries: Vec<IndexEntry>,
    ids: HashSet<ChunkId>,
    target_bytes: usize,
    raw_bytes: u64,
}

/// A finished pack: the object's bytes and its index.
pub struct Pack {
    /// The pack's id (the hash of `bytes`).
    pub id: PackId,
    /// The object.
    pub bytes: Vec<u8>,
    /// Its index (also encoded at the end of `bytes`).
    pub index: Vec<IndexEntry>,
    /// Content bytes it holds (before compression).
    pub raw_bytes: u64,
}

impl PackBuilder {
    /// An empty pack that asks to be finished past `target_bytes`, its header followed by
    /// `salt`: random for every pack written, so that no pack is ever the same object as
    /// another (see the module docs, "Pack").
    pub fn new(target_bytes: usize, salt: [u8; PACK_SALT_BYTES]) -> Self {
        let mut bytes = Vec::with_capacity(target_bytes.min(64 << 20) + 4096);
        bytes.extend_from_slice(PACK_MAGIC);
        bytes.push(VERSION);
        bytes.extend_from_slice(&salt);
        Self {
            bytes,
            entries: Vec::new(),
            ids: HashSet::new(),
            target_bytes,
            raw_bytes: 0,
        }
    }

    /// Whether the pack holds this chunk already.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.ids.contains(id)
    }

    /// Chunks in the pack.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the pack holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the pack is as large as it should get.
    pub fn is_full(&self) -> bool {
        self.bytes.len() >= self.target_bytes || self.entries.len() >= MAX_PACK_CHUNKS
    }

    /// Adds a chunk (once: a chunk already in the pack is skipped), zstd-compressed at `level`
    /// when that saves an eighth, then sealed by `sealing`. Returns its id.
    pub fn add(
        &mut self,
        content: &[u8],
        level: Option<i32>,
        sealing: &Sealing,
    ) -> Result<ChunkId, LayoutError> {
        let id = sealing.chunk_id(content);
        if self.ids.contains(&id) {
            return Ok(id);
        }
        let raw_len = u32::try_from(content.len())
            .ok()
            .filter(|&n| n <= MAX_CHUNK_BYTES)
            .ok_or_else(|| {
                LayoutError::PackFull(format!(
                    "a chunk of {} bytes is larger than {MAX_CHUNK_BYTES}",
                    content.len()
                ))
            })?;
        if self.entries.len() >= MAX_PACK_CHUNKS {
            return Err(LayoutError::PackFull(format!(
                "a pack holds at most {MAX_PACK_CHUNKS} chunks"
            )));
        }
        let compressed = level
            .and_then(|level| zstd::bulk::compress(content, level).ok())
            .filter(|packed| packed.len() < content.len() - content.len() / 8);
        let (stored, codec) = match compressed {
            Some(packed) => (packed, Codec::Zstd),
            None => (content.to_vec(), Codec::Raw),
        };
        let stored = sealing.seal(&id, stored);
        self.entries.push(IndexEntry {
            sealed: sealing.is_encrypted(),
            id,
            offset: self.bytes.len() as u64,
            stored_len: stored.len() as u32,
            raw_len,
            codec,
        });
        self.bytes.extend_from_slice(&stored);
        self.ids.insert(id);
        self.raw_bytes += u64::from(raw_len);
        Ok(id)
    }

    /// The finished object: the chunks, then the index, then the index's length and the magic.
    pub fn finish(mut self) -> Pack {
        let index = encode_index(&self.entries);
        self.bytes.extend_from_slice(&index);
        self.bytes
            .extend_from_slice(&(index.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(PACK_MAGIC);
        Pack {
            id: *blake3::hash(&self.bytes).as_bytes(),
            bytes: self.bytes,
            index: self.entries,
            raw_bytes: self.raw_bytes,
        }
    }
}

/// The encoded index of a pack (checksummed).
pub fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + entries.len() * INDEX_ENTRY_BYTES + 32);
    out.extend_from_slice(INDEX_MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for entry in entries {
        out.extend_from_slice(&entry.id);
        out.extend_from_slice(&entry.offset.to_le_bytes());
        out.extend_from_slice(&entry.stored_len.to_le_bytes());
        out.extend_from_slice(&entry.raw_len.to_le_bytes());
        let codec = match entry.codec {
            Codec::Raw => 0,
            Codec::Zstd => 1,
        };
        out.push(codec | if entry.sealed { SEALED_FLAG } else { 0 });
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// A little reader over untrusted bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, at: 0, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], LayoutError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| malformed(self.what, format!("ends early, at byte {}", self.at)))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, LayoutError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, LayoutError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }

    fn u32(&mut self) -> Result<u32, LayoutError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, LayoutError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn hash(&mut self) -> Result<[u8; 32], LayoutError> {
        Ok(self.take(32)?.try_into().expect("32"))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }
}

/// Checks the magic, version and trailing checksum of `bytes`; returns a cursor after the
/// header over the body (the checksum excluded).
fn checked_body<'a>(
    bytes: &'a [u8],
    magic: &[u8; 4],
    what: &'static str,
) -> Result<Cursor<'a>, LayoutError> {
    if bytes.len() < 5 + 32 {
        return Err(malformed(
            what,
            format!("{} bytes is too short", bytes.len()),
        ));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(malformed(what, "checksum mismatch (damaged or truncated)"));
    }
    let mut cursor = Cursor::new(body, what);
    if cursor.take(4)? != magic {
        return Err(malformed(what, "wrong magic"));
    }
    let version = cursor.u8()?;
    if version != VERSION {
        return Err(malformed(
            what,
            format!("format {version} (this build reads {VERSION})"),
        ));
    }
    Ok(cursor)
}

/// Decodes a pack index, checking that every entry lies inside a pack of `pack_len` bytes
/// (before the index itself) and that no chunk is listed twice.
pub fn decode_index(bytes: &[u8], pack_len: Option<u64>) -> Result<Vec<IndexEntry>, LayoutError> {
    const WHAT: &str = "pack index";
    let mut cursor = checked_body(bytes, INDEX_MAGIC, WHAT)?;
    let count = cursor.u32()? as usize;
    if count > MAX_PACK_CHUNKS || cursor.remaining() != count * INDEX_ENTRY_BYTES {
        return Err(malformed(
            WHAT,
            format!("{count} entries do not fit its {} bytes", bytes.len()),
        ));
    }
    let data_end = pack_len.map(|len| len.saturating_sub((bytes.len() + TRAILER_BYTES) as u64));
    let mut entries = Vec::with_capacity(count);
    let mut seen = HashSet::with_capacity(count);
    for _ in 0..count {
        let id = cursor.hash()?;
        let offset = cursor.u64()?;
        let stored_len = cursor.u32()?;
        let raw_len = cursor.u32()?;
        let byte = cursor.u8()?;
        let sealed = byte & SEALED_FLAG != 0;
        let codec = match byte & !SEALED_FLAG {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            _ => return Err(malformed(WHAT, format!("unknown codec {byte}"))),
        };
        let tag = if sealed { SEAL_TAG_BYTES as u32 } else { 0 };
        if raw_len > MAX_CHUNK_BYTES
            || stored_len > MAX_CHUNK_BYTES + tag
            || stored_len < tag
            || (codec == Codec::Raw && stored_len != raw_len + tag)
        {
            return Err(malformed(
                WHAT,
                format!("chunk {}: lengths {stored_len}/{raw_len}", hex(&id)),
            ));
        }
        let end = offset.checked_add(u64::from(stored_len));
        if offset < 5 || end.is_none() || data_end.is_some_and(|limit| end > Some(limit)) {
            return Err(malformed(
                WHAT,
                format!(
                    "chunk {} at {offset}+{stored_len} is outside its pack",
                    hex(&id)
                ),
            ));
        }
        if !seen.insert(id) {
            return Err(malformed(WHAT, format!("chunk {} listed twice", hex(&id))));
        }
        entries.push(IndexEntry {
            sealed,
            id,
            offset,
            stored_len,
            raw_len,
            codec,
        });
    }
    Ok(entries)
}

/// The index at the end of a whole pack object (to rebuild a lost index object), checked
/// against the pack.
pub fn index_of_pack(pack: &[u8]) -> Result<Vec<IndexEntry>, LayoutError> {
    const WHAT: &str = "pack";
    if pack.len() < 5 + TRAILER_BYTES || &pack[..4] != PACK_MAGIC || pack[4] != VERSION {
        return Err(malformed(WHAT, "not a pack of this format"));
    }
    let trailer = &pack[pack.len() - TRAILER_BYTES..];
    if &trailer[4..] != PACK_MAGIC {
        return Err(malformed(WHAT, "no trailer (truncated)"));
    }
    let index_len = u32::from_le_bytes(trailer[..4].try_into().expect("4")) as usize;
    let index_start = (pack.len() - TRAILER_BYTES)
        .checked_sub(index_len)
        .filter(|&start| start >= 5)
        .ok_or_else(|| malformed(WHAT, format!("an index of {index_len} bytes does not fit")))?;
    decode_index(
        &pack[index_start..pack.len() - TRAILER_BYTES],
        Some(pack.len() as u64),
    )
}

/// A chunk's content from its stored bytes (`stored`: the `stored_len` bytes at the entry's
/// offset, as a ranged read returns them), opened by `sealing`, decompressed and checked
/// against its id.
pub fn chunk_from_stored(
    stored: &[u8],
    entry: &IndexEntry,
    sealing: &Sealing,
) -> Result<Vec<u8>, LayoutError> {
    if stored.len() != entry.stored_len as usize {
        return Err(malformed(
            "chunk",
            format!(
                "{} bytes read for {} stored",
                stored.len(),
                entry.stored_len
            ),
        ));
    }
    if entry.sealed != sealing.is_encrypted() {
        return Err(malformed(
            "chunk",
            if entry.sealed {
                "encrypted, and no key was given (the store's encryption_key)"
            } else {
                "stored in the clear where the store is encrypted"
            },
        ));
    }
    let opened = sealing.open(&entry.id, stored)?;
    let content = match entry.codec {
        Codec::Raw => opened,
        // A damaged compressed chunk mostly fails here rather than at the hash: it is the same
        // damage, and is reported the same way (corruption, exit 7).
        Codec::Zstd => zstd::bulk::decompress(&opened, entry.raw_len as usize)
            .map_err(|_| LayoutError::ChunkMismatch(entry.id))?,
    };
    if content.len() != entry.raw_len as usize || sealing.chunk_id(&content) != entry.id {
        return Err(LayoutError::ChunkMismatch(entry.id));
    }
    Ok(content)
}

/// A chunk reference in a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRef {
    /// All zeros.
    Zero,
    /// Stored content.
    Chunk(ChunkId),
}

/// One point of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The volume.
    pub volume: String,
    /// The point (the cycle that committed it).
    pub seq: u64,
    /// `None`: full; `Some(base)`: a delta against point `base`'s manifest.
    pub base: Option<u64>,
    /// The volume's size.
    pub size_bytes: u64,
    /// Its chunk size.
    pub chunk_bytes: u64,
    /// At most this many deltas lead here from the last full manifest (0 for a full one).
    /// Exact as written; retention ([`splice`]) may later shorten the chain under a point
    /// without rewriting the points after it, so along a chain it only has to decrease.
    pub chain: u64,
    /// The point's record.
    pub point: PointInfo,
    /// References, by chunk number. Full: every non-zero chunk (no `Zero`). Delta: the chunks
    /// that changed.
    pub entries: BTreeMap<u64, ChunkRef>,
}

impl Manifest {
    /// The number of chunks of the volume.
    pub fn chunks(&self) -> u64 {
        self.size_bytes.div_ceil(self.chunk_bytes.max(1))
    }
}

/// Encodes a manifest (checksummed).
pub fn encode_manifest(manifest: &Manifest) -> Vec<u8> {
    let point = serde_json::to_vec(&manifest.point).expect("a point serializes");
    let mut out = Vec::with_capacity(64 + point.len() + manifest.entries.len() * 41);
    out.extend_from_slice(MANIFEST_MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(manifest.volume.len() as u16).to_le_bytes());
    out.extend_from_slice(manifest.volume.as_bytes());
    out.extend_from_slice(&manifest.seq.to_le_bytes());
    out.push(u8::from(manifest.base.is_some()));
    out.extend_from_slice(&manifest.base.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&manifest.chain.to_le_bytes());
    out.extend_from_slice(&manifest.size_bytes.to_le_bytes());
    out.extend_from_slice(&manifest.chunk_bytes.to_le_bytes());
    out.extend_from_slice(&(point.len() as u32).to_le_bytes());
    out.extend_from_slice(&point);
    out.extend_from_slice(&(manifest.entries.len() as u64).to_le_bytes());
    for (&chunk, reference) in &manifest.entries {
        out.extend_from_slice(&chunk.to_le_bytes());
        match reference {
            ChunkRef::Zero => out.push(0),
            ChunkRef::Chunk(id) => {
                out.push(1);
                out.extend_from_slice(id);
            }
        }
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// The head of a manifest: everything but its references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestHead {
    /// The volume.
    pub volume: String,
    /// The point.
    pub seq: u64,
    /// `None`: full; `Some(base)`: a delta against point `base`.
    pub base: Option<u64>,
    /// At most this many deltas lead here from the last full manifest.
    pub chain: u64,
    /// The volume's size.
    pub size_bytes: u64,
    /// Its chunk size.
    pub chunk_bytes: u64,
    /// The point's record.
    pub point: PointInfo,
}

/// The most bytes a manifest's head takes (a ranged read of this many holds it).
pub const MAX_MANIFEST_HEAD_BYTES: u64 =
    5 + 2 + wire::MAX_VOLUME_NAME as u64 + 8 + 1 + 8 + 8 + 8 + 8 + 4 + MAX_POINT_BYTES as u64;

/// Decodes the head of a manifest from its first bytes (at least the head; more is ignored).
/// The checksum covers the whole object and is not checked here: a listing of points reads
/// heads; anything that restores or deletes reads the whole manifest.
pub fn decode_manifest_head(prefix: &[u8]) -> Result<ManifestHead, LayoutError> {
    let mut cursor = Cursor::new(prefix, "manifest");
    if cursor.take(4)? != MANIFEST_MAGIC {
        return Err(malformed("manifest", "wrong magic"));
    }
    let version = cursor.u8()?;
    if version != VERSION {
        return Err(malformed(
            "manifest",
            format!("format {version} (this build reads {VERSION})"),
        ));
    }
    manifest_head(&mut cursor)
}

fn manifest_head(cursor: &mut Cursor<'_>) -> Result<ManifestHead, LayoutError> {
    const WHAT: &str = "manifest";
    let name_len = cursor.u16()? as usize;
    let volume = std::str::from_utf8(cursor.take(name_len)?)
        .map_err(|_| malformed(WHAT, "volume name is not UTF-8"))?
        .to_owned();
    wire::check_volume_name(&volume).map_err(|error| malformed(WHAT, error.to_string()))?;
    let seq = cursor.u64()?;
    let is_delta = match cursor.u8()? {
        0 => false,
        1 => true,
        other => return Err(malformed(WHAT, format!("kind {other}"))),
    };
    let base_seq = cursor.u64()?;
    let chain = cursor.u64()?;
    let size_bytes = cursor.u64()?;
    let chunk_bytes = cursor.u64()?;
    if !chunk_bytes.is_power_of_two() || !(512..=u64::from(MAX_CHUNK_BYTES)).contains(&chunk_bytes)
    {
        return Err(malformed(WHAT, format!("chunk size {chunk_bytes}")));
    }
    let chunks = size_bytes.div_ceil(chunk_bytes);
    if chunks > MAX_MANIFEST_ENTRIES {
        return Err(malformed(
            WHAT,
            format!("{chunks} chunks (at most {MAX_MANIFEST_ENTRIES})"),
        ));
    }
    let base = if is_delta {
        if base_seq >= seq || chain == 0 || chain >= FULL_EVERY {
            return Err(malformed(
                WHAT,
                format!("delta {seq} against {base_seq} at chain length {chain}"),
            ));
        }
        Some(base_seq)
    } else {
        if base_seq != 0 || chain != 0 {
            return Err(malformed(WHAT, "a full manifest with a base"));
        }
        None
    };
    let point_len = cursor.u32()?;
    if point_len > MAX_POINT_BYTES {
        return Err(malformed(
            WHAT,
            format!("point record of {point_len} bytes"),
        ));
    }
    let point_bytes = cursor.take(point_len as usize)?;
    let point: PointInfo = serde_json::from_slice(point_bytes)
        .map_err(|error| malformed(WHAT, format!("point record: {error}")))?;
    // Only what the writer writes: one spelling per manifest.
    if serde_json::to_vec(&point).ok().as_deref() != Some(point_bytes) {
        return Err(malformed(WHAT, "point record not in canonical form"));
    }
    if point.seq != seq {
        return Err(malformed(
            WHAT,
            format!("manifest {seq} holds point {}", point.seq),
        ));
    }
    Ok(ManifestHead {
        volume,
        seq,
        base,
        chain,
        size_bytes,
        chunk_bytes,
        point,
    })
}

/// Decodes a manifest, checking it against its own geometry: references in order, inside the
/// volume, a full manifest without zero references, a chain within [`FULL_EVERY`].
pub fn decode_manifest(bytes: &[u8]) -> Result<Manifest, LayoutError> {
    const WHAT: &str = "manifest";
    let mut cursor = checked_body(bytes, MANIFEST_MAGIC, WHAT)?;
    let ManifestHead {
        volume,
        seq,
        base,
        chain,
        size_bytes,
        chunk_bytes,
        point,
    } = manifest_head(&mut cursor)?;
    let is_delta = base.is_some();
    let chunks = size_bytes.div_ceil(chunk_bytes);
    let count = cursor.u64()?;
    // Each entry takes at least 9 bytes: a count the bytes cannot hold is refused before any
    // allocation.
    if count > chunks || count > (cursor.remaining() / 9) as u64 {
        return Err(malformed(
            WHAT,
            format!("{count} references for {chunks} chunks"),
        ));
    }
    let mut entries = BTreeMap::new();
    let mut last = None;
    for _ in 0..count {
        let chunk = cursor.u64()?;
        if chunk >= chunks || last.is_some_and(|last| chunk <= last) {
            return Err(malformed(
                WHAT,
                format!("reference to chunk {chunk} out of order or outside {chunks} chunks"),
            ));
        }
        last = Some(chunk);
        let reference = match cursor.u8()? {
            0 if is_delta => ChunkRef::Zero,
            0 => return Err(malformed(WHAT, "a full manifest lists a zero chunk")),
            1 => ChunkRef::Chunk(cursor.hash()?),
            other => return Err(malformed(WHAT, format!("reference kind {other}"))),
        };
        entries.insert(chunk, reference);
    }
    if cursor.remaining() != 0 {
        return Err(malformed(
            WHAT,
            format!("{} bytes after the references", cursor.remaining()),
        ));
    }
    Ok(Manifest {
        volume,
        seq,
        base,
        size_bytes,
        chunk_bytes,
        chain,
        point,
        entries,
    })
}

/// What a point holds: chunk number → chunk id, for every non-zero chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkMap {
    /// The point the map is at (0: none yet).
    pub seq: u64,
    /// How many deltas since the last full manifest.
    pub chain: u64,
    /// The non-zero chunks.
    pub chunks: BTreeMap<u64, ChunkId>,
}

impl ChunkMap {
    /// Moves the map to `manifest`'s point: a full manifest replaces it, a delta must follow
    /// the map's point.
    pub fn apply(&mut self, manifest: &Manifest) -> Result<(), LayoutError> {
        match manifest.base {
            None => {
                self.chunks = manifest
                    .entries
                    .iter()
                    .filter_map(|(&chunk, reference)| match reference {
                        ChunkRef::Chunk(id) => Some((chunk, *id)),
                        ChunkRef::Zero => None,
                    })
                    .collect();
            }
            Some(base) if base == self.seq => {
                for (&chunk, reference) in &manifest.entries {
                    match reference {
                        ChunkRef::Chunk(id) => {
                            self.chunks.insert(chunk, *id);
                        }
                        ChunkRef::Zero => {
                            self.chunks.remove(&chunk);
                        }
                    }
                }
            }
            Some(base) => {
                return Err(LayoutError::BrokenChain {
                    seq: manifest.seq,
                    base,
                    at: self.seq,
                });
            }
        }
        self.seq = manifest.seq;
        self.chain = manifest.chain;
        Ok(())
    }

    /// Whether the manifest after this map's point is a full one: there is no point yet, or
    /// the chain of deltas has reached [`FULL_EVERY`].
    pub fn next_is_full(&self) -> bool {
        self.seq == 0 || self.chain + 1 >= FULL_EVERY
    }

    /// The manifest of the point that follows this map after `changes` (chunk number → new
    /// content id, `None` for zeros): a delta against this map's point, or a full manifest
    /// when there is none yet or the chain has reached [`FULL_EVERY`]. Returns the manifest
    /// and the map at the new point, which is this map changed in place: a commit's cost
    /// follows its changes, not the volume's size (a copy of a 500 GB volume's map is
    /// 7.6 million entries), except for the full manifest every [`FULL_EVERY`] points.
    pub fn next_manifest(
        self,
        volume: &str,
        point: PointInfo,
        size_bytes: u64,
        chunk_bytes: u64,
        changes: &BTreeMap<u64, Option<ChunkId>>,
    ) -> (Manifest, ChunkMap) {
        let full = self.next_is_full();
        let (base_seq, base_chain) = (self.seq, self.chain);
        let mut next = self.chunks;
        let mut delta = BTreeMap::new();
        for (&chunk, change) in changes {
            let before = next.get(&chunk).copied();
            if before == *change {
                continue;
            }
            match change {
                Some(id) => {
                    next.insert(chunk, *id);
                    delta.insert(chunk, ChunkRef::Chunk(*id));
                }
                None => {
                    next.remove(&chunk);
                    delta.insert(chunk, ChunkRef::Zero);
                }
            }
        }
        let seq = point.seq;
        let (base, chain, entries) = if full {
            let entries = next
                .iter()
                .map(|(&chunk, id)| (chunk, ChunkRef::Chunk(*id)))
                .collect();
            (None, 0, entries)
        } else {
            (Some(base_seq), base_chain + 1, delta)
        };
        let manifest = Manifest {
            volume: volume.to_owned(),
            seq,
            base,
            size_bytes,
            chunk_bytes,
            chain,
            point,
            entries,
        };
        let map = ChunkMap {
            seq,
            chain,
            chunks: next,
        };
        (manifest, map)
    }
}

/// Retention on the store removes points in runs: consecutive points to drop, and the kept
/// point after them, whose manifest is rewritten so that it no longer leads through them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneRun {
    /// The points to drop, oldest first.
    pub dropped: Vec<u64>,
    /// The kept point after them.
    pub next: u64,
}

/// The runs that remove every point of `points` (a volume's, oldest first) not in `keep`.
/// Points after the last kept one are never dropped: the newest point stays.
pub fn prune_runs(points: &[u64], keep: &BTreeSet<u64>) -> Vec<PruneRun> {
    let mut runs = Vec::new();
    let mut dropped = Vec::new();
    for &seq in points {
        if keep.contains(&seq) {
            if !dropped.is_empty() {
                runs.push(PruneRun {
                    dropped: std::mem::take(&mut dropped),
                    next: seq,
                });
            }
        } else {
            dropped.push(seq);
        }
    }
    runs
}

/// The manifest that replaces `next` once the points of `dropped` (consecutive, oldest first,
/// `next`'s base the last of them) are gone: the same point, leading to the point before the
/// run. `None` if `next` is full and needs no change.
///
/// * If a full manifest is among the dropped, the new one is full (the dropped full and the
///   deltas after it, applied).
/// * Otherwise it is a delta against the first dropped point's base, with the dropped deltas'
///   references merged under its own (later ones win). Its chain length stays: an upper bound
///   still, and the points after it are left as they are.
pub fn splice(dropped: &[Manifest], next: &Manifest) -> Result<Option<Manifest>, LayoutError> {
    const WHAT: &str = "manifest";
    if next.base.is_none() {
        return Ok(None);
    }
    let Some(last) = dropped.last() else {
        return Err(malformed(
            WHAT,
            format!("point {} spliced over nothing", next.seq),
        ));
    };
    if next.base != Some(last.seq) {
        return Err(LayoutError::BrokenChain {
            seq: next.seq,
            base: next.base.unwrap_or(0),
            at: last.seq,
        });
    }
    for pair in dropped.windows(2) {
        if pair[1].base.is_some_and(|base| base != pair[0].seq) {
            return Err(LayoutError::BrokenChain {
                seq: pair[1].seq,
                base: pair[1].base.unwrap_or(0),
                at: pair[0].seq,
            });
        }
    }
    let mut spliced = next.clone();
    if let Some(full) = dropped.iter().rposition(|m| m.base.is_none()) {
        let mut map = ChunkMap::default();
        for manifest in dropped[full..].iter().chain([next]) {
            map.apply(manifest)?;
        }
        spliced.base = None;
        spliced.chain = 0;
        spliced.entries = map
            .chunks
            .iter()
            .map(|(&chunk, id)| (chunk, ChunkRef::Chunk(*id)))
            .collect();
    } else {
        let mut entries = BTreeMap::new();
        for manifest in dropped.iter().chain([next]) {
            entries.extend(manifest.entries.iter().map(|(&c, r)| (c, *r)));
        }
        spliced.base = dropped[0].base;
        spliced.entries = entries;
    }
    Ok(Some(spliced))
}

/// How well content is shared: references against distinct chunks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Dedup {
    /// Non-zero chunk references across the points counted.
    pub referenced: u64,
    /// Distinct chunks among them (what is stored).
    pub distinct: u64,
}

impl Dedup {
    /// Counts the references of `maps` (the newest point of each volume, say).
    pub fn of<'a>(maps: impl IntoIterator<Item = &'a ChunkMap>) -> Self {
        let mut distinct = HashSet::new();
        let mut referenced = 0;
        for map in maps {
            referenced += map.chunks.len() as u64;
            distinct.extend(map.chunks.values().copied());
        }
        Self {
            referenced,
            distinct: distinct.len() as u64,
        }
    }

    /// References per stored chunk (1.0: nothing shared).
    pub fn ratio(&self) -> f64 {
        if self.distinct == 0 {
            1.0
        } else {
            self.referenced as f64 / self.distinct as f64
        }
    }
}

/// A pack as garbage collection sees it.
pub struct PackInfo {
    /// Its index.
    pub index: Vec<IndexEntry>,
    /// When it was written (Unix milliseconds, the store's clock).
    pub written_unix_ms: u64,
    /// When a collection condemned it (its `condemned/ID` marker), if one did.
    pub condemned_unix_ms: Option<u64>,
}

/// What a garbage collection does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcPlan {
    /// Packs no live chunk needs: mark them condemned (a later collection deletes them).
    pub condemn: Vec<PackId>,
    /// Condemned packs still not needed a grace period later: delete them and their indexes.
    pub delete: Vec<PackId>,
    /// Condemned packs that a commit made needed again: lift the condemnation.
    pub revive: Vec<PackId>,
    /// Packs mostly dead: copy their live chunks into a new pack; the old one is then not
    /// needed and is condemned by the next collection.
    pub repack: Vec<PackId>,
    /// Packs left alone for now because they are younger than the grace period.
    pub young: usize,
}

/// Plans a mark-and-sweep in two phases, safe against commits that run at the same time.
///
/// `live` is every chunk a remaining point reads (mark). Each live chunk is kept by one pack:
/// the first (by id) holding it that is not condemned, else the first condemned one. A pack
/// is *needed* when it keeps a live chunk; copies elsewhere (a repack, two writers that stored
/// the same chunk) are not.
///
/// * A pack younger than `grace_ms` is not touched: a commit writes its packs before its
///   manifest, so until the manifest lands its chunks look dead.
/// * An older pack not needed is *condemned*, not deleted. A commit already under way may have
///   found one of its chunks in it (dedup) and be about to reference it: commits do not dedup
///   against condemned packs from then on, and a commit must land within the grace of the
///   moment it read the pack indexes (`objpoints` enforces it).
/// * A condemned pack is deleted when a later collection, at least `grace_ms` after the
///   condemnation, still finds it not needed; if a commit made it needed, it is revived. The
///   condemnation's time is when writers could first see it (`objpoints` takes the later of
///   the marker's own time and the store's: a marker the store applied late counts from then).
/// * A needed pack whose live bytes are under `repack_below` of its stored bytes is repacked.
pub fn gc_plan(
    packs: &BTreeMap<PackId, PackInfo>,
    live: &HashSet<ChunkId>,
    now_unix_ms: u64,
    grace_ms: u64,
    repack_below: f64,
) -> GcPlan {
    // The pack that keeps each live chunk: the first (by id) that holds it outside the
    // condemned packs, else the first condemned one (which is then revived). Every other
    // copy is not needed.
    let mut keeper: HashMap<ChunkId, (bool, PackId)> = HashMap::new();
    for (id, pack) in packs {
        let condemned = pack.condemned_unix_ms.is_some();
        for entry in pack.index.iter().filter(|e| live.contains(&e.id)) {
            keeper
                .entry(entry.id)
                .and_modify(|kept| {
                    if kept.0 && !condemned {
                        *kept = (false, *id);
                    }
                })
                .or_insert((condemned, *id));
        }
    }
    let mut plan = GcPlan::default();
    for (id, pack) in packs {
        let (mut live_bytes, mut all_bytes, mut needed) = (0u64, 0u64, false);
        for entry in &pack.index {
            all_bytes += u64::from(entry.stored_len);
            if live.contains(&entry.id) {
                live_bytes += u64::from(entry.stored_len);
                needed |= keeper.get(&entry.id).is_some_and(|(_, kept)| kept == id);
            }
        }
        if let Some(condemned) = pack.condemned_unix_ms {
            if needed {
                plan.revive.push(*id);
            } else if now_unix_ms.saturating_sub(condemned) >= grace_ms {
                plan.delete.push(*id);
            }
            continue;
        }
        if now_unix_ms.saturating_sub(pack.written_unix_ms) < grace_ms {
            plan.young += 1;
            continue;
        }
        if !needed {
            plan.condemn.push(*id);
        } else if (live_bytes as f64) < repack_below * all_bytes as f64 {
            plan.repack.push(*id);
        }
    }
    plan
}

/// Where each chunk is: the union of pack indexes (a chunk in two packs, after a repack or
/// a race of two writers, is found in either; a pack not condemned is preferred).
///
/// Every receiver of a store holds one for the whole store (its view), so its size per chunk
/// is what bounds the unique data a store can hold (the capacity model in ARCHITECTURE.md).
/// Hence the compact layout:
/// * each pack id is kept once (`packs`) and a chunk's entry names it by number, without the
///   copy of the chunk id an [`IndexEntry`] carries: an entry takes 56 bytes with its id,
///   against 128 when the map held the pack id and the whole index entry;
/// * most entries are in one vector sorted by id (`sorted`), which takes those 56 bytes and
///   no more, found by a binary search of the run of entries that share the first bits of
///   the id (a directory of the runs takes a byte an entry). A hash table keeps 1/8 to 1/2
///   of its buckets spare (65 to 130 bytes an entry here), and doubles at once when it grows;
/// * a view is loaded at once ([`ChunkLocations::from_packs`]: one sort). What is added
///   after (the packs of each commit, the indexes a refresh reads) goes to a table
///   (`added`), which is merged into the vector, in place, once it holds a sixteenth as many
///   entries (and at least [`MERGE_AT_LEAST`]).
///
/// `agent/tests/view_memory.rs` counts the bytes per chunk with an allocator.
#[derive(Debug, Default)]
pub struct ChunkLocations {
    /// Sorted by id, each id once.
    sorted: Vec<(ChunkId, Slot)>,
    /// Where each run of `sorted` with the same first `directory_bits` bits of id starts
    /// (and, last, its length): ids are hashes, so a run holds about 8 entries, and a lookup
    /// searches one run instead of the whole vector (a binary search of billions of entries
    /// misses the cache some twenty times). Empty below 16 entries. Built at each merge.
    directory: Vec<u64>,
    directory_bits: u32,
    /// Added since the last merge; an id here stands for the same id in `sorted`.
    added: HashMap<ChunkId, Slot>,
    /// How many ids of `added` are in `sorted` too (so that [`ChunkLocations::len`] counts
    /// each chunk once).
    shadowing: usize,
    /// Each pack once, numbered by its first appearance.
    packs: Vec<PackId>,
    pack_numbers: HashMap<PackId, u32>,
}

/// The fewest added entries [`ChunkLocations`] merges into its sorted vector: below that a
/// merge would cost more than the table saves.
pub const MERGE_AT_LEAST: usize = 1 << 16;

/// A chunk's place, compact: see [`ChunkLocations`]. Fields of at most 4-byte alignment, so
/// that a slot beside its 32-byte key takes 56 bytes, not 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    /// The pack, by its number in `ChunkLocations::packs`.
    pack: u32,
    offset_low: u32,
    offset_high: u32,
    stored_len: u32,
    raw_len: u32,
    codec: Codec,
    /// [`Slot::SEALED`], [`Slot::CONDEMNED`].
    flags: u8,
}

impl Slot {
    const SEALED: u8 = 1;
    const CONDEMNED: u8 = 2;

    fn of(pack: u32, entry: &IndexEntry, condemned: bool) -> Slot {
        Slot {
            pack,
            offset_low: entry.offset as u32,
            offset_high: (entry.offset >> 32) as u32,
            stored_len: entry.stored_len,
            raw_len: entry.raw_len,
            codec: entry.codec,
            flags: if entry.sealed { Self::SEALED } else { 0 }
                | if condemned { Self::CONDEMNED } else { 0 },
        }
    }

    fn condemned(&self) -> bool {
        self.flags & Self::CONDEMNED != 0
    }

    fn entry(&self, id: ChunkId) -> IndexEntry {
        IndexEntry {
            id,
            offset: (u64::from(self.offset_high) << 32) | u64::from(self.offset_low),
            stored_len: self.stored_len,
            raw_len: self.raw_len,
            codec: self.codec,
            sealed: self.flags & Self::SEALED != 0,
        }
    }
}

impl ChunkLocations {
    /// Adds a pack's index; `condemned`: a collection has marked the pack for deletion.
    pub fn add(&mut self, pack: PackId, index: &[IndexEntry], condemned: bool) {
        let mut number = None;
        for entry in index {
            // One search of each side: a chunk new to `added` but in `sorted` shadows it.
            let (known, shadows) = match self.added.get(&entry.id) {
                Some(slot) => (Some(*slot), false),
                None => match self.sorted_index(&entry.id) {
                    Some(at) => (Some(self.sorted[at].1), true),
                    None => (None, false),
                },
            };
            let replace = match known {
                None => true,
                Some(known) => known.condemned() && !condemned,
            };
            if !replace {
                continue;
            }
            let pack = *number.get_or_insert_with(|| self.number_of(pack));
            self.added
                .insert(entry.id, Slot::of(pack, entry, condemned));
            if shadows {
                self.shadowing += 1;
            }
        }
        if self.added.len() >= MERGE_AT_LEAST.max(self.sorted.len() / 16) {
            self.merge();
        }
    }

    /// Marks the chunks this view places in `pack` (whose index is `index`) condemned: a
    /// collection marked the pack for deletion, and new points must not reference it. A chunk
    /// the view places in another pack stays where it is. Returns how many were marked.
    pub fn condemn(&mut self, pack: PackId, index: &[IndexEntry]) -> usize {
        let Some(&number) = self.pack_numbers.get(&pack) else {
            return 0;
        };
        let mut marked = 0;
        for entry in index {
            if let Some(slot) = self.slot_mut(&entry.id)
                && slot.pack == number
                && !slot.condemned()
            {
                slot.flags |= Slot::CONDEMNED;
                marked += 1;
            }
        }
        marked
    }

    /// Forgets every chunk this view places in one of `packs` (gone from the store): one
    /// pass over the view, so that the packs of a collection are forgotten together. Returns
    /// how many were forgotten.
    pub fn forget_packs(&mut self, packs: &HashSet<PackId>) -> usize {
        let numbers: HashSet<u32> = packs
            .iter()
            .filter_map(|pack| self.pack_numbers.get(pack).copied())
            .collect();
        if numbers.is_empty() {
            return 0;
        }
        if !self.added.is_empty() {
            self.merge();
        }
        let before = self.sorted.len();
        self.sorted
            .retain(|(_, slot)| !numbers.contains(&slot.pack));
        self.build_directory();
        before - self.sorted.len()
    }

    /// The visible slot of `id`, to change in place (an added one shadows a sorted one).
    fn slot_mut(&mut self, id: &ChunkId) -> Option<&mut Slot> {
        if self.added.contains_key(id) {
            return self.added.get_mut(id);
        }
        let at = self.sorted_index(id)?;
        Some(&mut self.sorted[at].1)
    }

    /// Moves the added entries into the sorted vector, in place: the vector grows by what is
    /// new, and is filled from its end, taking the larger id of the two sides each time (an
    /// added entry replaces the sorted one of the same id).
    fn merge(&mut self) {
        let mut added: Vec<(ChunkId, Slot)> = self.added.drain().collect();
        self.added.shrink_to_fit();
        added.sort_unstable_by_key(|(id, _)| *id);
        let old_len = self.sorted.len();
        let new_len = old_len + added.len() - self.shadowing;
        self.sorted.reserve_exact(new_len - old_len);
        self.sorted.resize(new_len, ([0; 32], Slot::filler()));
        // Writing at `write`, reading the old entries below `old` and the added ones below
        // `next`: `write - old` is the added entries left less those that will replace an old
        // one, never negative, so no old entry is overwritten before it is read.
        let (mut write, mut old, mut next) = (new_len, old_len, added.len());
        while next > 0 {
            write -= 1;
            let take_old = old > 0 && self.sorted[old - 1].0 > added[next - 1].0;
            if take_old {
                old -= 1;
                self.sorted[write] = self.sorted[old];
            } else {
                next -= 1;
                if old > 0 && self.sorted[old - 1].0 == added[next].0 {
                    old -= 1;
                }
                self.sorted[write] = added[next];
            }
        }
        debug_assert_eq!(write, old, "the old entries below are in place");
        self.shadowing = 0;
        self.build_directory();
    }

    /// The run of `sorted` that `id` belongs to, by the first `bits` bits of its id.
    fn run_of(id: &ChunkId, bits: u32) -> usize {
        let first = u64::from_be_bytes(id[..8].try_into().expect("8 bytes"));
        (first >> (64 - bits)) as usize
    }

    fn build_directory(&mut self) {
        let bits = (self.sorted.len() / 8).max(1).ilog2();
        self.directory_bits = bits;
        self.directory = Vec::new();
        if bits == 0 {
            return;
        }
        let runs = 1usize << bits;
        self.directory.reserve_exact(runs + 1);
        let mut at = 0;
        for run in 0..runs {
            while at < self.sorted.len() && Self::run_of(&self.sorted[at].0, bits) < run {
                at += 1;
            }
            self.directory.push(at as u64);
        }
        self.directory.push(self.sorted.len() as u64);
    }

    /// Where `id` is in `sorted`, if it is there.
    fn sorted_index(&self, id: &ChunkId) -> Option<usize> {
        let (start, end) = if self.directory.is_empty() {
            (0, self.sorted.len())
        } else {
            let run = Self::run_of(id, self.directory_bits);
            (
                self.directory[run] as usize,
                self.directory[run + 1] as usize,
            )
        };
        self.sorted[start..end]
            .binary_search_by(|(known, _)| known.cmp(id))
            .ok()
            .map(|at| start + at)
    }

    fn slot(&self, id: &ChunkId) -> Option<&Slot> {
        if self.shadowing == 0 {
            // No id is on both sides: the vector first, where most chunks are, without
            // hashing the id for the table.
            return match self.sorted_index(id) {
                Some(at) => Some(&self.sorted[at].1),
                None => self.added.get(id),
            };
        }
        match self.added.get(id) {
            Some(slot) => Some(slot),
            None => self.sorted_index(id).map(|at| &self.sorted[at].1),
        }
    }

    /// The view of these packs' indexes (`true`: condemned), built at once: one sort of
    /// every entry, instead of the merges [`ChunkLocations::add`] makes as it grows. Each
    /// chunk is where `add` in this order would put it (the first pack not condemned that
    /// holds it, else the first that does).
    pub fn from_packs<'a>(
        packs: impl IntoIterator<Item = (PackId, &'a [IndexEntry], bool)> + Clone,
    ) -> ChunkLocations {
        let mut locations = ChunkLocations::default();
        let total = packs
            .clone()
            .into_iter()
            .map(|(_, index, _)| index.len())
            .sum();
        let mut all: Vec<(ChunkId, Slot)> = Vec::with_capacity(total);
        for (pack, index, condemned) in packs {
            if index.is_empty() {
                continue;
            }
            let pack = locations.number_of(pack);
            all.extend(
                index
                    .iter()
                    .map(|entry| (entry.id, Slot::of(pack, entry, condemned))),
            );
        }
        // Stable: of a chunk's entries, the order of the packs stays among equals.
        all.sort_by_key(|(id, slot)| (*id, slot.condemned()));
        all.dedup_by(|later, first| later.0 == first.0);
        locations.sorted = all;
        locations.build_directory();
        locations
    }

    /// The number of `pack`, given it now if it has none.
    fn number_of(&mut self, pack: PackId) -> u32 {
        *self.pack_numbers.entry(pack).or_insert_with(|| {
            self.packs.push(pack);
            u32::try_from(self.packs.len() - 1).expect("fewer than 2^32 packs in a view")
        })
    }

    /// Where the chunks of `map` are (those known here): a small copy for a long read, so
    /// that the whole set need not stay locked.
    pub fn subset(&self, map: &ChunkMap) -> ChunkLocations {
        let mut subset = ChunkLocations::default();
        for id in map.chunks.values() {
            if let Some(slot) = self.slot(id) {
                let pack = subset.number_of(self.packs[slot.pack as usize]);
                subset.added.insert(*id, Slot { pack, ..*slot });
            }
        }
        subset
    }

    /// Where a chunk can be read (from a condemned pack too: a point that a commit made
    /// reference it is still readable until the next collection revives the pack).
    pub fn get(&self, id: &ChunkId) -> Option<(PackId, IndexEntry)> {
        self.slot(id)
            .map(|slot| (self.packs[slot.pack as usize], slot.entry(*id)))
    }

    /// Whether a new point may reference this chunk without storing it again: the store
    /// holds it in a pack that is not condemned.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.slot(id).is_some_and(|slot| !slot.condemned())
    }

    /// Chunks known.
    pub fn len(&self) -> usize {
        self.sorted.len() + self.added.len() - self.shadowing
    }

    /// Whether no chunk is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The heap this takes, in bytes, from the capacities: what `status` reports as the
    /// view's memory. The hash tables' layout is the standard library's (a control byte
    /// beside each bucket, up to 7/8 of the buckets used, a power of two of them), so this is
    /// an estimate, which `agent/tests/view_memory.rs` checks against an allocator's count.
    pub fn memory_bytes(&self) -> u64 {
        fn table<K, V>(map: &HashMap<K, V>) -> u64 {
            let capacity = map.capacity() as u64;
            if capacity == 0 {
                return 0;
            }
            // `capacity()` is 7/8 of the buckets past 8 of them.
            let buckets = if capacity < 8 {
                capacity + 1
            } else {
                (capacity * 8 / 7).next_power_of_two()
            };
            buckets * (std::mem::size_of::<(K, V)>() as u64 + 1) + 16
        }
        fn vector<T>(vector: &Vec<T>) -> u64 {
            (vector.capacity() * std::mem::size_of::<T>()) as u64
        }
        vector(&self.sorted)
            + vector(&self.directory)
            + table(&self.added)
            + vector(&self.packs)
            + table(&self.pack_numbers)
    }

    /// The chunks of `map` the store does not hold readable (a point cannot be committed
    /// while any is missing).
    pub fn missing(&self, map: &ChunkMap) -> BTreeSet<u64> {
        map.chunks
            .iter()
            .filter(|(_, id)| self.slot(id).is_none())
            .map(|(&chunk, _)| chunk)
            .collect()
    }
}

impl Slot {
    /// A value to grow the sorted vector by before the merge overwrites it.
    fn filler() -> Slot {
        Slot {
            pack: 0,
            offset_low: 0,
            offset_high: 0,
            stored_len: 0,
            raw_len: 0,
            codec: Codec::Raw,
            flags: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(seq: u64) -> PointInfo {
        PointInfo {
            seq,
            generation: 1,
            epoch: seq,
            time_unix_ms: 1_000 * seq,
            bytes: 0,
            consistent: true,
            freeze_ms: 1,
            complete: true,
            synced_to: 0,
            group_cut: None,
            received_unix_ms: 0,
            app_consistent: false,
        }
    }

    fn content(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| seed.wrapping_mul(31) ^ (i as u8))
            .collect()
    }

    #[test]
    fn a_pack_stores_each_chunk_once_and_reads_back_checked() {
        let mut builder = PackBuilder::new(1 << 20, [7; PACK_SALT_BYTES]);
        let text = b"blkmirror ".repeat(6554)[..65536].to_vec();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        let a = builder.add(&text, Some(3), &Sealing::plain()).unwrap();
        let b = builder.add(&random, Some(3), &Sealing::plain()).unwrap();
        assert_eq!(builder.add(&text, Some(3), &Sealing::plain()).unwrap(), a);
        assert_eq!(builder.len(), 2);
        let pack = builder.finish();
        assert_eq!(pack.id, *blake3::hash(&pack.bytes).as_bytes());
        assert_eq!(pack.index[0].codec, Codec::Zstd);
        assert!(pack.index[0].stored_len < 65536 / 8);
        assert_eq!(pack.index[1].codec, Codec::Raw);
        // The index at the pack's end equals the separate one.
        let index = index_of_pack(&pack.bytes).unwrap();
        assert_eq!(index, pack.index);
        assert_eq!(
            decode_index(&encode_index(&index), Some(pack.bytes.len() as u64)).unwrap(),
            index
        );
        for (entry, expected) in index.iter().zip([&text, &random]) {
            let start = entry.offset as usize;
            let stored = &pack.bytes[start..start + entry.stored_len as usize];
            assert_eq!(
                &chunk_from_stored(stored, entry, &Sealing::plain()).unwrap(),
                expected
            );
        }
        assert_eq!((index[0].id, index[1].id), (a, b));
        // A flipped bit in a stored chunk is caught by its id.
        let entry = &index[1];
        let mut stored =
            pack.bytes[entry.offset as usize..(entry.offset + 65536) as usize].to_vec();
        stored[100] ^= 1;
        assert_eq!(
            chunk_from_stored(&stored, entry, &Sealing::plain()),
            Err(LayoutError::ChunkMismatch(entry.id))
        );
        // So is damage to a compressed chunk, which mostly breaks its decompression first
        // (found by the ext4 points test on the store: it was reported as a store error).
        let entry = &index[0];
        assert_eq!(entry.codec, Codec::Zstd);
        let start = entry.offset as usize;
        let mut stored = pack.bytes[start..start + entry.stored_len as usize].to_vec();
        stored[10] ^= 0xff;
        assert_eq!(
            chunk_from_stored(&stored, entry, &Sealing::plain()),
            Err(LayoutError::ChunkMismatch(entry.id))
        );
    }

    /// Two packs of the same chunks are two objects (their salts differ), and a pack written
    /// before the salt (its first chunk right after the header) reads as before.
    #[test]
    fn packs_of_the_same_chunks_differ_by_their_salt_and_unsalted_ones_still_read() {
        let content = b"salted ".repeat(600);
        let build = |salt: [u8; PACK_SALT_BYTES]| {
            let mut builder = PackBuilder::new(1 << 20, salt);
            builder.add(&content, Some(3), &Sealing::plain()).unwrap();
            builder.add(&[9; 4096], None, &Sealing::plain()).unwrap();
            builder.finish()
        };
        let (one, other) = (build([1; PACK_SALT_BYTES]), build([2; PACK_SALT_BYTES]));
        assert_ne!(one.id, other.id);
        assert_eq!(one.bytes.len(), other.bytes.len());
        assert_eq!(one.index[0].offset, 5 + PACK_SALT_BYTES as u64);
        // The unsalted form: header, chunks, index (offsets 16 lower), trailer.
        let index: Vec<IndexEntry> = one
            .index
            .iter()
            .map(|entry| IndexEntry {
                offset: entry.offset - PACK_SALT_BYTES as u64,
                ..entry.clone()
            })
            .collect();
        let chunks_end = one.index.last().map(|e| e.offset + u64::from(e.stored_len));
        let mut unsalted = one.bytes[..5].to_vec();
        unsalted.extend_from_slice(&one.bytes[5 + PACK_SALT_BYTES..chunks_end.unwrap() as usize]);
        let encoded = encode_index(&index);
        unsalted.extend_from_slice(&encoded);
        unsalted.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        unsalted.extend_from_slice(PACK_MAGIC);
        assert_eq!(index_of_pack(&unsalted).unwrap(), index);
        let first = &index[0];
        let stored = &unsalted[first.offset as usize..][..first.stored_len as usize];
        assert_eq!(
            chunk_from_stored(stored, first, &Sealing::plain()).unwrap(),
            content
        );
    }

    #[test]
    fn damaged_or_lying_indexes_are_refused() {
        let mut builder = PackBuilder::new(1 << 20, [7; PACK_SALT_BYTES]);
        builder
            .add(&content(1, 4096), None, &Sealing::plain())
            .unwrap();
        let pack = builder.finish();
        let index = encode_index(&pack.index);
        // Truncated, or one bit flipped: the checksum.
        assert!(decode_index(&index[..index.len() - 1], None).is_err());
        let mut flipped = index.clone();
        flipped[12] ^= 0x40;
        assert!(decode_index(&flipped, None).is_err());
        // Well checksummed, but pointing past its pack.
        let mut lying = pack.index.clone();
        lying[0].offset = 1 << 40;
        let lying = encode_index(&lying);
        let error = decode_index(&lying, Some(pack.bytes.len() as u64)).unwrap_err();
        assert!(error.to_string().contains("outside its pack"), "{error}");
        // A chunk listed twice.
        let twice = encode_index(&[pack.index[0].clone(), pack.index[0].clone()]);
        assert!(
            decode_index(&twice, None)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        // A truncated pack has no trailer.
        assert!(index_of_pack(&pack.bytes[..pack.bytes.len() - 3]).is_err());
    }

    #[test]
    fn manifests_are_deltas_with_a_full_one_every_so_often_and_read_back_the_same() {
        let chunk_bytes = 65536;
        let size = 64 * chunk_bytes;
        let mut map = ChunkMap::default();
        let mut chain: Vec<Manifest> = Vec::new();
        let mut expected: BTreeMap<u64, ChunkId> = BTreeMap::new();
        for seq in 1..=(FULL_EVERY + 5) {
            let mut changes = BTreeMap::new();
            for chunk in [seq % 64, (seq * 7) % 64] {
                let change = (seq % 5 != 0).then(|| chunk_id(&content(seq as u8, 512)));
                changes.insert(chunk, change);
            }
            let (manifest, next) =
                map.next_manifest("vol", point(seq), size, chunk_bytes, &changes);
            for (&chunk, change) in &changes {
                match change {
                    Some(id) => expected.insert(chunk, *id),
                    None => expected.remove(&chunk),
                };
            }
            assert_eq!(next.chunks, expected, "point {seq}");
            if seq == 1 || seq == FULL_EVERY + 1 {
                assert_eq!(manifest.base, None, "point {seq} should be full");
            } else {
                assert_eq!(manifest.base, Some(seq - 1));
                assert!(manifest.entries.len() <= 2, "a delta holds what changed");
            }
            let decoded = decode_manifest(&encode_manifest(&manifest)).unwrap();
            assert_eq!(decoded, manifest);
            chain.push(decoded);
            map = next;
        }
        // Reading the newest point walks back to the last full manifest only.
        let full = chain.iter().rposition(|m| m.base.is_none()).unwrap();
        let mut read = ChunkMap::default();
        for manifest in &chain[full..] {
            read.apply(manifest).unwrap();
        }
        assert_eq!(read.chunks, expected);
        // A delta applied out of order is refused.
        let mut wrong = ChunkMap::default();
        wrong.apply(&chain[0]).unwrap();
        assert!(matches!(
            wrong.apply(&chain[2]),
            Err(LayoutError::BrokenChain { .. })
        ));
    }

    #[test]
    fn damaged_or_inconsistent_manifests_are_refused() {
        let mut changes = BTreeMap::new();
        changes.insert(3, Some(chunk_id(b"x")));
        let (full, map) =
            ChunkMap::default().next_manifest("vol", point(1), 1 << 20, 65536, &changes);
        changes.insert(4, None);
        changes.insert(3, Some(chunk_id(b"y")));
        let (delta, _) = map.next_manifest("vol", point(2), 1 << 20, 65536, &changes);
        for manifest in [&full, &delta] {
            let bytes = encode_manifest(manifest);
            for cut in [0, 1, 10, bytes.len() / 2, bytes.len() - 1] {
                assert!(decode_manifest(&bytes[..cut]).is_err(), "cut at {cut}");
            }
        }
        let refused = |manifest: &Manifest, words: &str| {
            let error = decode_manifest(&encode_manifest(manifest)).unwrap_err();
            assert!(error.to_string().contains(words), "{error}");
        };
        let mut outside = full.clone();
        outside.entries.insert(16, ChunkRef::Chunk([1; 32]));
        refused(&outside, "outside 16 chunks");
        let mut zero_in_full = full.clone();
        zero_in_full.entries.insert(5, ChunkRef::Zero);
        refused(&zero_in_full, "zero chunk");
        let mut other_point = full.clone();
        other_point.point.seq = 9;
        refused(&other_point, "holds point 9");
        let mut bad_name = full.clone();
        bad_name.volume = "../etc".into();
        assert!(decode_manifest(&encode_manifest(&bad_name)).is_err());
        let mut long_chain = delta.clone();
        long_chain.chain = FULL_EVERY;
        refused(&long_chain, "chain length");
        let mut odd_chunk = full;
        odd_chunk.chunk_bytes = 1000;
        refused(&odd_chunk, "chunk size 1000");
    }

    #[test]
    fn dedup_counts_shared_chunks_once() {
        let shared = chunk_id(b"the same OS files");
        let mut one = ChunkMap::default();
        let mut two = ChunkMap::default();
        for chunk in 0..10 {
            one.chunks.insert(chunk, shared);
            two.chunks.insert(chunk, shared);
        }
        two.chunks.insert(10, chunk_id(b"a host's own data"));
        let dedup = Dedup::of([&one, &two]);
        assert_eq!(dedup.referenced, 21);
        assert_eq!(dedup.distinct, 2);
        assert!((dedup.ratio() - 10.5).abs() < 1e-9);
    }

    #[test]
    fn gc_condemns_then_deletes_revives_what_a_commit_needs_and_spares_young_packs() {
        let entry = |id: u8, stored_len: u32| IndexEntry {
            sealed: false,
            id: [id; 32],
            offset: 5,
            stored_len,
            raw_len: stored_len,
            codec: Codec::Raw,
        };
        let pack = |entries: Vec<IndexEntry>, written: u64, condemned: Option<u64>| PackInfo {
            index: entries,
            written_unix_ms: written,
            condemned_unix_ms: condemned,
        };
        let mut packs = BTreeMap::new();
        let old = 1_000;
        packs.insert([1; 32], pack(vec![entry(1, 100), entry(2, 100)], old, None));
        packs.insert([2; 32], pack(vec![entry(3, 10), entry(4, 990)], old, None));
        packs.insert([3; 32], pack(vec![entry(5, 100)], old, None));
        // A commit in progress: its pack is written, its manifest not yet.
        packs.insert([4; 32], pack(vec![entry(6, 100)], 99_000, None));
        let live: HashSet<ChunkId> = [[1; 32], [3; 32], [5; 32]].into_iter().collect();
        let plan = gc_plan(&packs, &live, 100_000, 60_000, 0.5);
        assert_eq!(plan.condemn, Vec::<PackId>::new());
        assert_eq!(plan.repack, vec![[2; 32]]);
        assert_eq!(plan.young, 1);
        // Points deleted: packs 2 and 3 hold nothing live. They are condemned, not deleted.
        let live: HashSet<ChunkId> = [[1; 32]].into_iter().collect();
        let plan = gc_plan(&packs, &live, 100_000, 60_000, 0.5);
        assert_eq!(plan.condemn, vec![[2; 32], [3; 32]]);
        assert_eq!(plan.delete, Vec::<PackId>::new());
        // Meanwhile a commit that had read the indexes before referenced chunk 5 (dedup into
        // pack 3): the next collection revives pack 3 and deletes pack 2 once the grace is over.
        for id in [[2; 32], [3; 32]] {
            packs.get_mut(&id).unwrap().condemned_unix_ms = Some(100_000);
        }
        let live: HashSet<ChunkId> = [[1; 32], [5; 32]].into_iter().collect();
        let early = gc_plan(&packs, &live, 130_000, 60_000, 0.5);
        assert_eq!(early.revive, vec![[3; 32]]);
        assert_eq!(early.delete, Vec::<PackId>::new(), "within the grace");
        let late = gc_plan(&packs, &live, 160_000, 60_000, 0.5);
        assert_eq!(late.revive, vec![[3; 32]]);
        assert_eq!(late.delete, vec![[2; 32]]);
        // A condemned pack whose live chunk another (uncondemned) pack holds is not needed:
        // after a repack, the old pack goes.
        packs.insert([5; 32], pack(vec![entry(5, 100)], old, None));
        let plan = gc_plan(&packs, &live, 160_000, 60_000, 0.5);
        assert_eq!(plan.delete, vec![[2; 32], [3; 32]]);
        assert_eq!(plan.revive, Vec::<PackId>::new());
    }

    proptest::proptest! {
        /// The sorted vector and the table of additions answer as one map with the rule of
        /// `add` would (the model below), whenever they merge; so do a refresh's changes of
        /// what it knows: a pack condemned in place, packs forgotten.
        #[test]
        fn the_compact_locations_answer_as_a_plain_map_across_merges(
            steps in proptest::collection::vec(
                (0u8..10, 0u8..6, proptest::collection::vec((0u8..40, 0u64..1 << 36), 0..20),
                 proptest::bool::ANY, proptest::bool::ANY),
                1..40,
            )
        ) {
            let mut locations = ChunkLocations::default();
            let mut model: HashMap<ChunkId, (PackId, IndexEntry, bool)> = HashMap::new();
            let mut packs: Vec<(PackId, Vec<IndexEntry>, bool)> = Vec::new();
            let mut only_added = true;
            for (action, pack, entries, condemned, merge) in steps {
                let pack = [pack; 32];
                if action >= 7 {
                    only_added = false;
                    let index: Vec<IndexEntry> = packs
                        .iter()
                        .filter(|(id, _, _)| *id == pack)
                        .flat_map(|(_, index, _)| index.iter().cloned())
                        .collect();
                    if action == 9 {
                        locations.forget_packs(&HashSet::from([pack]));
                        model.retain(|_, (held_by, _, _)| *held_by != pack);
                    } else {
                        locations.condemn(pack, &index);
                        for (held_by, _, is_condemned) in model.values_mut() {
                            *is_condemned |= *held_by == pack;
                        }
                    }
                }
                let mut seen = HashSet::new();
                let index: Vec<IndexEntry> = entries
                    .into_iter()
                    .filter(|(id, _)| seen.insert(*id))
                    .map(|(id, offset)| IndexEntry {
                        // Spread over the first byte, so that the directory's runs differ.
                        id: [id.wrapping_mul(6); 32],
                        offset,
                        stored_len: id.into(),
                        raw_len: u32::from(id) * 2,
                        codec: if id % 2 == 0 { Codec::Raw } else { Codec::Zstd },
                        sealed: id % 3 == 0,
                    })
                    .collect();
                if action < 7 {
                    locations.add(pack, &index, condemned);
                    packs.push((pack, index.clone(), condemned));
                    for entry in &index {
                        match model.get(&entry.id) {
                            Some((_, _, false)) => {}
                            Some((_, _, true)) if condemned => {}
                            _ => {
                                model.insert(entry.id, (pack, entry.clone(), condemned));
                            }
                        }
                    }
                }
                if merge {
                    locations.merge();
                }
                proptest::prop_assert_eq!(locations.len(), model.len());
                for id in 0u8..40 {
                    let id = [id.wrapping_mul(6); 32];
                    let expected = model.get(&id);
                    proptest::prop_assert_eq!(
                        locations.get(&id),
                        expected.map(|(pack, entry, _)| (*pack, entry.clone()))
                    );
                    proptest::prop_assert_eq!(
                        locations.contains(&id),
                        expected.is_some_and(|(_, _, condemned)| !condemned)
                    );
                }
            }
            proptest::prop_assert!(locations.sorted.windows(2).all(|w| w[0].0 < w[1].0));
            if !only_added {
                // A pack condemned in place may hide another that holds a chunk too (what a
                // whole reload finds, by design); the view built at once is not the same.
                return Ok(());
            }
            // Built at once from the same packs: the same answers.
            let built = ChunkLocations::from_packs(
                packs.iter().map(|(pack, index, condemned)| (*pack, index.as_slice(), *condemned)),
            );
            proptest::prop_assert_eq!(built.len(), model.len());
            for id in 0u8..40 {
                let id = [id.wrapping_mul(6); 32];
                let expected = model.get(&id);
                proptest::prop_assert_eq!(
                    built.get(&id),
                    expected.map(|(pack, entry, _)| (*pack, entry.clone()))
                );
            }
        }
    }

    /// Thousands of hashed ids, merged at uneven sizes: every one is found through the
    /// directory, and ids never added are not.
    #[test]
    fn the_directory_finds_every_chunk_after_merges_of_any_size() {
        let entry = |n: u32| IndexEntry {
            id: chunk_id(&n.to_le_bytes()),
            offset: u64::from(n) << 20,
            stored_len: n,
            raw_len: n,
            codec: Codec::Raw,
            sealed: false,
        };
        let mut locations = ChunkLocations::default();
        let mut next = 0u32;
        for (pack, size) in [3u32, 20, 1, 200, 777, 1500, 9].into_iter().enumerate() {
            let index: Vec<IndexEntry> = (next..next + size).map(entry).collect();
            next += size;
            locations.add([pack as u8; 32], &index, false);
            locations.merge();
            let bits = locations.directory_bits;
            assert_eq!(
                locations.directory.len(),
                if bits == 0 { 0 } else { (1 << bits) + 1 }
            );
            for n in 0..next + 50 {
                let wanted = entry(n);
                let found = locations.get(&wanted.id);
                if n < next {
                    assert_eq!(found.map(|(_, entry)| entry), Some(wanted), "chunk {n}");
                } else {
                    assert_eq!(found, None, "chunk {n} was never added");
                }
            }
        }
        assert_eq!(locations.len(), next as usize);
        assert!(
            locations.directory_bits >= 8,
            "{}",
            locations.directory_bits
        );
    }

    #[test]
    fn keys_of_the_log_of_added_packs_list_in_time_order_and_parse_back_only_when_well_formed() {
        let pack = [0xc4; 32];
        let key = added_key(1_765_000_000_123, &pack);
        assert_eq!(parse_added_key(&key), Some((1_765_000_000_123, pack)));
        // In time order, and a listing after `added_key_from(t)` starts at `t`.
        assert!(added_key(999, &[0xff; 32]) < added_key(1000, &[0; 32]));
        assert!(added_key_from(1000) < added_key(1000, &[0; 32]));
        assert!(added_key_from(1000) > added_key(999, &[0xff; 32]));
        for odd in [
            "added/1765000000123".to_owned(),
            format!("added/1765000000123-{}-12", hex(&pack)),
            format!("added/176500000012-{}", hex(&pack)),
            format!("added/+765000000123-{}", hex(&pack)),
            format!("added/1765000000123-{}", "zz".repeat(32)),
            format!("index/1765000000123-{}", hex(&pack)),
        ] {
            assert_eq!(parse_added_key(&odd), None, "{odd}");
        }
    }

    #[test]
    fn a_new_point_never_dedups_into_a_condemned_pack_but_can_read_from_one() {
        let entry = IndexEntry {
            sealed: false,
            id: [9; 32],
            offset: 5,
            stored_len: 10,
            raw_len: 10,
            codec: Codec::Raw,
        };
        let mut locations = ChunkLocations::default();
        locations.add([1; 32], std::slice::from_ref(&entry), true);
        assert!(!locations.contains(&[9; 32]));
        assert_eq!(locations.get(&[9; 32]).map(|(p, _)| p), Some([1; 32]));
        let mut map = ChunkMap::default();
        map.chunks.insert(0, [9; 32]);
        assert!(locations.missing(&map).is_empty());
        // The same chunk in a live pack is preferred, whichever index comes first.
        locations.add([2; 32], std::slice::from_ref(&entry), false);
        locations.add([3; 32], std::slice::from_ref(&entry), true);
        assert!(locations.contains(&[9; 32]));
        assert_eq!(locations.get(&[9; 32]).map(|(p, _)| p), Some([2; 32]));
    }

    /// A volume's manifests in memory, read as `objpoints::read_point` reads the store.
    fn read_in_memory(manifests: &BTreeMap<u64, Manifest>, seq: u64) -> ChunkMap {
        let mut chain = vec![&manifests[&seq]];
        while let Some(base) = chain.last().unwrap().base {
            let manifest = &manifests[&base];
            assert!(
                manifest.chain < chain.last().unwrap().chain,
                "chain decreases"
            );
            chain.push(manifest);
        }
        assert!(chain.len() as u64 <= FULL_EVERY);
        let mut map = ChunkMap::default();
        for manifest in chain.iter().rev() {
            map.apply(manifest).unwrap();
        }
        map
    }

    #[test]
    fn retention_splices_points_out_and_every_kept_point_reads_the_same() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut random = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for round in 0..40 {
            // 80 points of a 64-chunk volume (two full manifests on the way).
            let mut manifests = BTreeMap::new();
            let mut maps = BTreeMap::new();
            let mut map = ChunkMap::default();
            for seq in 1..=80u64 {
                let changes: BTreeMap<u64, Option<ChunkId>> = (0..random(6))
                    .map(|_| {
                        let chunk = random(64);
                        let id = (random(4) > 0).then(|| chunk_id(&random(1000).to_le_bytes()));
                        (chunk, id)
                    })
                    .collect();
                let (manifest, next) = map.next_manifest("v", point(seq), 64 << 12, 4096, &changes);
                manifests.insert(seq, manifest);
                maps.insert(seq, next.chunks.clone());
                map = next;
            }
            // Prune twice, as retention does over time: a sparse keep, then a sparser one.
            let mut keep: BTreeSet<u64> = (1..=80).filter(|_| random(3) == 0).collect();
            keep.insert(80);
            for pass in 0..2 {
                if pass == 1 {
                    keep.retain(|_| random(2) == 0);
                    keep.insert(80);
                }
                let seqs: Vec<u64> = manifests.keys().copied().collect();
                for run in prune_runs(&seqs, &keep) {
                    let dropped: Vec<Manifest> = run
                        .dropped
                        .iter()
                        .map(|seq| manifests[seq].clone())
                        .collect();
                    if let Some(spliced) = splice(&dropped, &manifests[&run.next]).unwrap() {
                        let encoded = encode_manifest(&spliced);
                        assert_eq!(decode_manifest(&encoded).unwrap(), spliced);
                        manifests.insert(run.next, spliced);
                    }
                    for seq in &run.dropped {
                        manifests.remove(seq);
                    }
                }
                let left: BTreeSet<u64> = manifests.keys().copied().collect();
                assert_eq!(left, keep, "round {round} pass {pass}");
                for &seq in &keep {
                    assert_eq!(
                        read_in_memory(&manifests, seq).chunks,
                        maps[&seq],
                        "round {round} pass {pass} point {seq}"
                    );
                }
                // The oldest point left is full: nothing leads out of the store.
                assert_eq!(manifests.values().next().unwrap().base, None);
            }
        }
        // Nothing to drop, or nothing kept after: no run.
        assert!(prune_runs(&[1, 2, 3], &BTreeSet::from([1, 2, 3])).is_empty());
        assert!(prune_runs(&[1, 2, 3], &BTreeSet::new()).is_empty());
        assert_eq!(
            prune_runs(&[1, 2, 3, 4, 5], &BTreeSet::from([1, 4, 5])),
            vec![PruneRun {
                dropped: vec![2, 3],
                next: 4
            }]
        );
    }

    #[test]
    fn a_manifest_head_reads_from_its_first_bytes() {
        let mut map = ChunkMap::default();
        let changes = BTreeMap::from([(3, Some(chunk_id(b"x")))]);
        let (manifest, next) = map.next_manifest("vol-a", point(7), 1 << 20, 4096, &changes);
        map = next;
        let bytes = encode_manifest(&manifest);
        let head_bytes = &bytes[..(MAX_MANIFEST_HEAD_BYTES as usize).min(bytes.len())];
        let head = decode_manifest_head(head_bytes).unwrap();
        assert_eq!(
            (head.volume.as_str(), head.seq, head.base),
            ("vol-a", 7, None)
        );
        assert_eq!(head.point, manifest.point);
        // A delta's head, from a prefix cut anywhere after the point record.
        let changes = BTreeMap::from([(5, Some(chunk_id(b"y")))]);
        let (delta, _) = map.next_manifest("vol-a", point(9), 1 << 20, 4096, &changes);
        let delta = encode_manifest(&delta);
        let head = decode_manifest_head(&delta[..delta.len() - 40]).unwrap();
        assert_eq!((head.seq, head.base, head.chain), (9, Some(7), 1));
        // Cut inside the point record, or not a manifest.
        assert!(decode_manifest_head(&bytes[..60]).is_err());
        assert!(decode_manifest_head(b"BMPK\x01").is_err());
    }

    #[test]
    fn an_encrypted_pack_hides_its_chunks_and_opens_only_with_its_key() {
        let key = Sealing::encrypted(&[42; 32]);
        let other = Sealing::encrypted(&[43; 32]);
        let text = b"the quick brown fox ".repeat(3277)[..65536].to_vec();
        let mut builder = PackBuilder::new(1 << 20, [7; PACK_SALT_BYTES]);
        let id = builder.add(&text, Some(3), &key).unwrap();
        let again = builder.add(&content(5, 4096), None, &key).unwrap();
        // Keyed ids: not the plain hash, not another key's, the same for the same content.
        assert_ne!(id, chunk_id(&text));
        assert_ne!(id, other.chunk_id(&text));
        assert_eq!(id, key.chunk_id(&text));
        let pack = builder.finish();
        assert!(
            !pack.bytes.windows(20).any(|w| w == b"the quick brown fox "),
            "plaintext in the pack"
        );
        let index = index_of_pack(&pack.bytes).unwrap();
        // Compressed, then sealed: the tag is the only growth.
        assert_eq!(index[0].codec, Codec::Zstd);
        assert!((index[0].stored_len as usize) < 65536 / 8);
        assert_eq!(index[1].stored_len as usize, 4096 + SEAL_TAG_BYTES);
        let stored = |entry: &IndexEntry| {
            pack.bytes[entry.offset as usize..(entry.offset + u64::from(entry.stored_len)) as usize]
                .to_vec()
        };
        assert_eq!(
            chunk_from_stored(&stored(&index[0]), &index[0], &key).unwrap(),
            text
        );
        // Another key, no key, one flipped bit, or sealed bytes moved under another id.
        for sealing in [&other, &Sealing::plain()] {
            assert!(chunk_from_stored(&stored(&index[0]), &index[0], sealing).is_err());
        }
        let mut flipped = stored(&index[1]);
        flipped[9] ^= 1;
        assert_eq!(
            chunk_from_stored(&flipped, &index[1], &key),
            Err(LayoutError::ChunkMismatch(again))
        );
        let moved = IndexEntry {
            stored_len: index[1].stored_len,
            raw_len: index[1].raw_len,
            codec: index[1].codec,
            ..index[0].clone()
        };
        assert_eq!(
            chunk_from_stored(&stored(&index[1]), &moved, &key),
            Err(LayoutError::ChunkMismatch(id))
        );
        // Sealing is deterministic (two receivers storing one chunk store the same bytes),
        // and the key check tells keys apart without showing them.
        let mut twice = PackBuilder::new(1 << 20, [7; PACK_SALT_BYTES]);
        twice.add(&text, Some(3), &key).unwrap();
        let twice = twice.finish();
        let entry = &twice.index[0];
        assert_eq!(
            twice.bytes[entry.offset as usize..][..entry.stored_len as usize],
            stored(&index[0])
        );
        assert_eq!(key.key_check(), Sealing::encrypted(&[42; 32]).key_check());
        assert_ne!(key.key_check(), other.key_check());
        assert_eq!(Sealing::plain().key_check(), None);
        assert!(!format!("{key:?}").contains("42"));
    }
}
