//! The audit chain that the receivers of one object store share (`audit/blocks/…`).
//!
//! # Why
//!
//! Every receiver keeps its own audit log ([`crate::dr::audit`]): a hash chain in its data
//! directory, written before anything it records is acknowledged. When several receivers
//! serve one store, any of them may have taken any volume's cycles, so an auditor asking "who
//! wrote volume `db`, and was anything refused?" would have to collect every receiver's log,
//! including the logs of receivers that are gone. The receivers therefore copy their logs into
//! the store, into one chain that all of them extend and one command checks.
//!
//! # Layout
//!
//! The chain is a sequence of **blocks**, objects `audit/blocks/NNNNNNNNNNNNNNNNNNNN` (the
//! block number, 20 digits, from 1). A block is a header line and then entries copied
//! byte for byte from one receiver's log. The header names:
//! - the block's number and the BLAKE3 hash of the whole block before it;
//! - the receiver, and its log's *chain id* (the hash of the log's first entry: a receiver
//!   whose data directory was rebuilt starts a new chain under the same name);
//! - the first entry's sequence number and how many entries follow.
//!
//! Two chains are checked together ([`ChainVerifier`]):
//! - the blocks link to each other, which orders every receiver's entries into one sequence;
//! - within that sequence, each receiver's entries continue its own log's hash chain
//!   (sequence numbers and `prev` hashes), so a block cannot drop, reorder or alter an entry
//!   without breaking it, and the store's copy can be compared with the receiver's own log.
//!
//! # Appending
//!
//! The store decides races: a block is created with "create only if absent" at the number
//! after the head. Of two receivers that append at once, one is refused; it reads the
//! winner's block, takes it as the new head and tries the next number. `audit/head` holds a
//! recent block number as a hint, so that a receiver finds the head without listing the
//! chain; the hint may lag (receivers probe forward from it), never lead.
//!
//! # Segments
//!
//! A chain grows by up to one block per receiver every few seconds, so a check of a year's
//! chain would read millions of objects one by one. [`write_segments`] copies each full run of
//! [`SEGMENT_BLOCKS`] old blocks, byte for byte, into one object
//! `audit/segments/FIRST-LAST`, and a check reads a segment instead of its blocks (the writer
//! lists only the blocks after the segments it finds from block 1 on). The
//! blocks stay: they remain the chain, a segment is only a faster way to read them, so no
//! receiver ever has to know about segments to append (nothing is deleted, nothing can be
//! appended twice at a number). A segment is checked like the blocks it holds, by the same
//! links; one that does not decode, or holds other numbers than its name says, is skipped for
//! its blocks.
//!
//! # Nothing lost
//!
//! The local log stays the first record: an entry is durable there before the action it
//! records is acknowledged, and a [`Shipper`] copies it to the store every few seconds. The
//! shipper keeps how far it has shipped in `DATA_DIR/audit.shipped` (byte offset, sequence
//! number, hash), and the block it is creating before it sends it. After a crash or a failed
//! request it settles that block before anything else: it creates it again with the same
//! bytes if it is absent (a request the store had not yet applied could still land later),
//! and takes it as shipped if the bytes there are its own. So an entry is neither skipped nor
//! shipped twice. A receiver that was down
//! ships its backlog when it starts. Entries that were never shipped because the receiver's
//! disk was lost with it are the one gap, and the chain shows its last shipped entry.
//!
//! # What it proves
//!
//! Whoever holds the store's credentials can rewrite the whole chain consistently. The
//! anchors outside their reach are the receivers' journals (each prints the head of its local
//! log at every entry) and the local logs themselves, which `blkmirror store audit --log`
//! compares with their copies in the store.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::{self, Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::dr::audit::{self, Entry, GENESIS};
use crate::dr::objstore::{Created, ObjectStoreClient, StoreError};

/// The folder of the chain's blocks.
pub const BLOCKS: &str = "audit/blocks";
/// The object that holds a recent block number.
pub const HEAD_HINT: &str = "audit/head";
/// The format of the blocks this build writes; a newer one is refused, never reinterpreted.
pub const CHAIN_FORMAT: u32 = 1;
/// The largest block: a backlog is shipped in blocks of at most this size.
pub const MAX_BLOCK_BYTES: usize = 4 << 20;
/// The largest header line.
const MAX_HEADER_BYTES: usize = 4096;
/// How many times an append follows blocks that others created first before it gives up for
/// this round.
const MAX_APPEND_ATTEMPTS: usize = 64;
/// The shipper's record, in the receiver's data directory.
pub const SHIPPED_FILE: &str = "audit.shipped";
/// The folder of segments (copies of runs of old blocks, one object each).
pub const SEGMENTS: &str = "audit/segments";
/// How many blocks a segment holds: only full runs are copied, so the newest blocks stay
/// blocks only until a run is full.
pub const SEGMENT_BLOCKS: u64 = 1024;
/// The first line of a segment.
const SEGMENT_MAGIC: &str = "blkmirror-audit-segment 1";

/// The key of the segment of blocks `first..=last`.
pub fn segment_key(first: u64, last: u64) -> String {
    format!("{SEGMENTS}/{first:020}-{last:020}")
}

/// The blocks a key under [`SEGMENTS`] names, if it is a segment's.
pub fn segment_range(key: &str) -> Option<(u64, u64)> {
    let name = key.strip_prefix(SEGMENTS)?.strip_prefix('/')?;
    let (first, last) = name.split_once('-')?;
    let number = |digits: &str| {
        (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse::<u64>().ok())
            .flatten()
    };
    let (first, last) = (number(first)?, number(last)?);
    (first >= 1 && first <= last).then_some((first, last))
}

/// A segment's bytes: a first line, then each block as a line `NUMBER LENGTH` and its bytes.
pub fn encode_segment(blocks: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = format!("{SEGMENT_MAGIC}\n").into_bytes();
    for (number, bytes) in blocks {
        out.extend_from_slice(format!("{number} {}\n", bytes.len()).as_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// The blocks of the segment of `first..=last`: every number once, in order, each block at
/// most [`MAX_BLOCK_BYTES`]; anything else is refused with what was wrong.
pub fn decode_segment(first: u64, last: u64, bytes: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let mut rest = bytes
        .strip_prefix(format!("{SEGMENT_MAGIC}\n").as_bytes())
        .ok_or("not a segment (its first line)")?;
    let mut blocks = Vec::new();
    for expected in first..=last {
        let end = rest
            .iter()
            .take(64)
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("block {expected}: no heading line"))?;
        let line = std::str::from_utf8(&rest[..end])
            .map_err(|_| format!("block {expected}: a heading line that is not text"))?;
        let (number, length) = line
            .split_once(' ')
            .and_then(|(n, l)| Some((n.parse::<u64>().ok()?, l.parse::<usize>().ok()?)))
            .ok_or_else(|| format!("block {expected}: a malformed heading line {line:?}"))?;
        if number != expected {
            return Err(format!("block {number} where block {expected} belongs"));
        }
        if length > MAX_BLOCK_BYTES || length > rest.len() - end - 1 {
            return Err(format!(
                "block {expected}: a length of {length} bytes that does not fit"
            ));
        }
        let body = &rest[end + 1..end + 1 + length];
        blocks.push((number, body.to_vec()));
        rest = &rest[end + 1 + length..];
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after block {last}", rest.len()));
    }
    Ok(blocks)
}

/// The largest segment: [`SEGMENT_BLOCKS`] blocks of the largest size would not fit one
/// request; a run whose blocks are larger together is left as blocks.
const MAX_SEGMENT_BYTES: usize = 256 << 20;

/// Copies each full run of [`SEGMENT_BLOCKS`] blocks that no segment holds yet into a segment,
/// reading `parallel` blocks at a time. Returns how many segments were written. Safe to run
/// from several receivers at once (each segment is created only if absent, and two copies
/// of immutable blocks are the same bytes) and while receivers append.
pub async fn write_segments(
    client: &ObjectStoreClient,
    parallel: usize,
) -> Result<u64, ChainError> {
    let run = crate::test_hooks::segment_blocks(SEGMENT_BLOCKS);
    write_segments_of(client, parallel, run).await
}

/// [`write_segments`] with runs of `run` blocks (a check reads segments of any length).
async fn write_segments_of(
    client: &ObjectStoreClient,
    parallel: usize,
    run: u64,
) -> Result<u64, ChainError> {
    let segments: Vec<(u64, u64)> = client
        .list(SEGMENTS)
        .await?
        .iter()
        .filter_map(|(key, _, _)| segment_range(key))
        .collect();
    // Only the blocks after those the segments already hold from block 1 on are listed: a
    // year's chain is millions of blocks, a listing returns a thousand keys a request, and
    // this runs at every collection turn.
    let covered = covered_by_segments(&segments, run);
    let listed = if covered == 0 {
        client.list(BLOCKS).await?
    } else {
        client.list_after(BLOCKS, &block_key(covered)).await?
    };
    let mut blocks: Vec<u64> = listed
        .iter()
        .filter_map(|(key, _, _)| block_number(key))
        .filter(|&number| number > covered)
        .collect();
    blocks.sort_unstable();
    let mut written = 0;
    let mut first = covered + 1;
    loop {
        let last = first + run - 1;
        // Only a run of blocks all present: blocks never change once created, so a full run
        // is final (numbers are unique and sorted: the run is there if its last block is
        // `run - 1` places after its first).
        let present = blocks
            .binary_search(&last)
            .is_ok_and(|at| at + 1 >= run as usize && blocks[at + 1 - run as usize] == first);
        if !present {
            break;
        }
        if !segments.contains(&(first, last)) {
            let reads: Vec<ChainRead> = (first..=last).map(ChainRead::Block).collect();
            let mut copied = Vec::with_capacity(reads.len());
            for window in reads.chunks(parallel.max(1)) {
                copied.extend(fetch_reads(client, window).await?);
            }
            let bytes_in_run: usize = copied.iter().map(|(_, bytes)| bytes.len()).sum();
            if bytes_in_run > MAX_SEGMENT_BYTES {
                // Read as blocks by a check, like the newest ones.
                first = last + 1;
                continue;
            }
            client
                .put_if_absent(&segment_key(first, last), encode_segment(&copied))
                .await?;
            written += 1;
        }
        first = last + 1;
    }
    Ok(written)
}

/// The last block of the runs of `run` blocks that `segments` hold one after the other from
/// block 1 on (0 if none): the part of the chain already copied.
fn covered_by_segments(segments: &[(u64, u64)], run: u64) -> u64 {
    if run == 0 {
        return 0;
    }
    let held: HashSet<(u64, u64)> = segments.iter().copied().collect();
    let mut last = 0;
    while held.contains(&(last + 1, last + run)) {
        last += run;
    }
    last
}

/// The key of block `number`.
pub fn block_key(number: u64) -> String {
    format!("{BLOCKS}/{number:020}")
}

/// The block number of a key under [`BLOCKS`], if it is one.
pub fn block_number(key: &str) -> Option<u64> {
    let digits = key.strip_prefix(BLOCKS)?.strip_prefix('/')?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Errors of the shared chain.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A request to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A block is malformed or does not continue the chain.
    #[error("audit chain: block {block}: {message}")]
    Broken {
        /// The block.
        block: u64,
        /// What is wrong.
        message: String,
    },
    /// The receiver's own log or its shipping record.
    #[error("{path}: {message}")]
    Local {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Others kept appending first.
    #[error(
        "the audit chain moved on {MAX_APPEND_ATTEMPTS} times while this receiver appended; \
         it tries again at its next round"
    )]
    Contended,
}

/// A block's first line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockHeader {
    /// [`CHAIN_FORMAT`].
    pub format: u32,
    /// Its number (1, 2, ...; also in its key).
    pub block: u64,
    /// The BLAKE3 hash of the whole block before it ([`GENESIS`] for block 1).
    pub prev_block: String,
    /// The receiver whose log the entries are from.
    pub receiver: String,
    /// That log's chain id: the hash of its first entry.
    pub chain: String,
    /// The first entry's sequence number in that log.
    pub first_seq: u64,
    /// How many entries follow.
    pub entries: u64,
}

/// A decoded block: its header and its entries, each with its hash.
#[derive(Clone, Debug)]
pub struct Block {
    /// The header.
    pub header: BlockHeader,
    /// The entries and their hashes, in log order.
    pub entries: Vec<(Entry, String)>,
}

/// The hash that the next block's `prev_block` names.
pub fn block_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// A block's bytes: the header line, then `lines` (whole log lines, each ending in `\n`).
pub fn encode_block(header: &BlockHeader, lines: &str) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(header).expect("a header serializes");
    bytes.push(b'\n');
    bytes.extend_from_slice(lines.as_bytes());
    bytes
}

fn is_hash(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Checks log lines (each without its newline) that start at sequence number `first_seq`:
/// every line carries its hash, parses, is numbered in order and names the line before it.
/// Pure; shared by the shipper (its own log) and the verifier (a block).
fn check_lines<'a>(
    first_seq: u64,
    lines: impl Iterator<Item = &'a str>,
) -> Result<Vec<(Entry, String)>, String> {
    let mut entries: Vec<(Entry, String)> = Vec::new();
    for (index, line) in lines.enumerate() {
        let seq = first_seq + index as u64;
        if line.len() > audit::MAX_LINE {
            return Err(format!("entry {seq}: longer than any audit entry"));
        }
        let (body, hash) = audit::split_line(line)
            .ok_or_else(|| format!("entry {seq}: no trailing \"hash\" field"))?;
        if audit::entry_hash(&body) != hash {
            return Err(format!("entry {seq}: does not match its hash (edited)"));
        }
        let entry: Entry = serde_json::from_str(&body)
            .map_err(|error| format!("entry {seq}: not an audit entry: {error}"))?;
        if entry.format > audit::AUDIT_FORMAT {
            return Err(format!(
                "entry {seq}: format {} is newer than this build reads ({})",
                entry.format,
                audit::AUDIT_FORMAT
            ));
        }
        if entry.seq != seq {
            return Err(format!(
                "entry {seq}: numbered {} (an entry was removed or inserted)",
                entry.seq
            ));
        }
        if let Some((_, prev)) = entries.last()
            && entry.prev != *prev
        {
            return Err(format!(
                "entry {seq}: does not follow the entry before it (an entry was removed or \
                 inserted)"
            ));
        }
        entries.push((entry, hash.to_owned()));
    }
    Ok(entries)
}

/// Decodes block `number` and checks it on its own (the links to the blocks before it are the
/// [`ChainVerifier`]'s). Pure; the fuzz target drives it with arbitrary input.
pub fn decode_block(number: u64, bytes: &[u8]) -> Result<Block, ChainError> {
    let broken = |message: String| ChainError::Broken {
        block: number,
        message,
    };
    if bytes.len() > MAX_BLOCK_BYTES {
        return Err(broken(format!(
            "{} bytes, more than the {MAX_BLOCK_BYTES} a block can be",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| broken("not UTF-8 text".into()))?;
    let text = text
        .strip_suffix('\n')
        .ok_or_else(|| broken("does not end with a newline (cut short)".into()))?;
    let mut lines = text.split('\n');
    let header_line = lines.next().unwrap_or_default();
    if header_line.len() > MAX_HEADER_BYTES {
        return Err(broken("the header line is too long".into()));
    }
    let header: BlockHeader = serde_json::from_str(header_line)
        .map_err(|error| broken(format!("the header is not a block header: {error}")))?;
    if header.format > CHAIN_FORMAT {
        return Err(broken(format!(
            "format {} is newer than this build reads ({CHAIN_FORMAT})",
            header.format
        )));
    }
    if header.block != number {
        return Err(broken(format!(
            "its header numbers it {} (moved)",
            header.block
        )));
    }
    if !is_hash(&header.prev_block) || !is_hash(&header.chain) {
        return Err(broken("the header's hashes are malformed".into()));
    }
    if header.first_seq == 0 || header.receiver.is_empty() || header.receiver.len() > 256 {
        return Err(broken(
            "the header's receiver or first entry is malformed".into(),
        ));
    }
    let entries = check_lines(header.first_seq, lines).map_err(broken)?;
    if entries.len() as u64 != header.entries || entries.is_empty() {
        return Err(broken(format!(
            "holds {} entries, its header says {}",
            entries.len(),
            header.entries
        )));
    }
    if header.first_seq == 1 && (entries[0].0.prev != GENESIS || entries[0].1 != header.chain) {
        return Err(broken(
            "its first entry starts a log but is not that log's first entry".into(),
        ));
    }
    Ok(Block { header, entries })
}

/// One receiver's log as the chain holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverLog {
    /// The receiver.
    pub receiver: String,
    /// Its log's chain id.
    pub chain: String,
    /// Entries in the store (1 to `last_seq`).
    pub last_seq: u64,
    /// The last one's hash.
    pub last_hash: String,
    /// When the last one was written (Unix milliseconds).
    pub last_unix_ms: u64,
}

/// What a checked chain holds. It is also the whole state of the check: saved, it is a
/// checkpoint from which a later check reads only the blocks added since
/// ([`verify_chain_from`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainReport {
    /// Blocks.
    pub blocks: u64,
    /// Entries, all receivers together.
    pub entries: u64,
    /// The hash of the last block (anchor it to see later that nothing was cut off the end).
    pub head: String,
    /// Per receiver log.
    pub logs: Vec<ReceiverLog>,
    /// Entries per event kind.
    pub events: BTreeMap<String, u64>,
}

/// Checks blocks 1, 2, ... in order. Pure.
#[derive(Debug)]
pub struct ChainVerifier {
    next_block: u64,
    prev_block: String,
    logs: BTreeMap<(String, String), ReceiverLog>,
    entries: u64,
    events: BTreeMap<String, u64>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            next_block: 1,
            prev_block: GENESIS.to_owned(),
            logs: BTreeMap::new(),
            entries: 0,
            events: BTreeMap::new(),
        }
    }
}

impl ChainVerifier {
    /// A verifier that goes on from a report of the blocks checked before (a checkpoint).
    pub fn resume(report: &ChainReport) -> Result<Self, String> {
        if report.blocks == 0 {
            if report.head != GENESIS || !report.logs.is_empty() || report.entries != 0 {
                return Err("a checkpoint of no block holds entries".into());
            }
        } else if !is_hash(&report.head) {
            return Err(format!("head {:?} is not a block hash", report.head));
        }
        let mut logs = BTreeMap::new();
        for log in &report.logs {
            if !is_hash(&log.chain) || !is_hash(&log.last_hash) || log.last_seq == 0 {
                return Err(format!("receiver {}'s log is malformed", log.receiver));
            }
            let key = (log.receiver.clone(), log.chain.clone());
            if logs.insert(key, log.clone()).is_some() {
                return Err(format!("receiver {}'s log is listed twice", log.receiver));
            }
        }
        let next_block = report
            .blocks
            .checked_add(1)
            .ok_or("its block count is out of range")?;
        Ok(Self {
            next_block,
            prev_block: report.head.clone(),
            logs,
            entries: report.entries,
            events: report.events.clone(),
        })
    }

    /// Checks block `number` (`bytes`) and that it continues the blocks before it.
    pub fn add(&mut self, number: u64, bytes: &[u8]) -> Result<(), ChainError> {
        let broken = |message: String| ChainError::Broken {
            block: number,
            message,
        };
        if number != self.next_block {
            return Err(ChainError::Broken {
                block: self.next_block,
                message: format!(
                    "missing: the chain goes from block {} to block {number}",
                    self.next_block - 1
                ),
            });
        }
        let block = decode_block(number, bytes)?;
        let header = &block.header;
        if header.prev_block != self.prev_block {
            return Err(broken(
                "does not follow the block before it (a block was replaced or removed)".into(),
            ));
        }
        let key = (header.receiver.clone(), header.chain.clone());
        let (first, _) = &block.entries[0];
        match self.logs.get(&key) {
            Some(log) if header.first_seq != log.last_seq + 1 || first.prev != log.last_hash => {
                return Err(broken(format!(
                    "receiver {}'s entries go from {} to {}: entries are missing or repeated",
                    header.receiver, log.last_seq, header.first_seq
                )));
            }
            Some(_) => {}
            None if header.first_seq != 1 => {
                return Err(broken(format!(
                    "receiver {}'s log starts at its entry {}; the entries before it are missing",
                    header.receiver, header.first_seq
                )));
            }
            None => {}
        }
        let (last, last_hash) = block.entries.last().expect("a block has entries");
        for (entry, _) in &block.entries {
            *self.events.entry(entry.event.clone()).or_default() += 1;
        }
        self.entries += header.entries;
        self.logs.insert(
            key,
            ReceiverLog {
                receiver: header.receiver.clone(),
                chain: header.chain.clone(),
                last_seq: last.seq,
                last_hash: last_hash.clone(),
                last_unix_ms: last.time_unix_ms,
            },
        );
        self.prev_block = block_hash(bytes);
        self.next_block += 1;
        Ok(())
    }

    /// What the blocks checked so far hold.
    pub fn report(&self) -> ChainReport {
        ChainReport {
            blocks: self.next_block - 1,
            entries: self.entries,
            head: self.prev_block.clone(),
            logs: self.logs.values().cloned().collect(),
            events: self.events.clone(),
        }
    }
}

/// How a receiver's own log compares with its copy in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalComparison {
    /// The log's chain id.
    pub chain: String,
    /// Entries in the local log.
    pub local_entries: u64,
    /// Of those, in the store (the rest are still to be shipped).
    pub in_store: u64,
}

/// Compares a receiver's local log (`text`) with the chain's copy of it: the store's last
/// entry of that log must be the local entry of the same number. Pure.
pub fn compare_local(report: &ChainReport, text: &str) -> Result<LocalComparison, String> {
    let whole = match text.rfind('\n') {
        Some(at) => &text[..at],
        None => "",
    };
    let entries =
        check_lines(1, whole.lines()).map_err(|error| format!("the local log: {error}"))?;
    let Some((first, first_hash)) = entries.first() else {
        return Ok(LocalComparison {
            chain: String::new(),
            local_entries: 0,
            in_store: 0,
        });
    };
    if first.prev != GENESIS {
        return Err("the local log's first entry does not start a log".into());
    }
    // Two logs can start with the same entry (receivers started in the same millisecond
    // with the same first event): the same chain id. The local log is the one whose stored copy it
    // continues, if any.
    let candidates: Vec<_> = report
        .logs
        .iter()
        .filter(|log| log.chain == *first_hash)
        .collect();
    let matching = candidates.iter().find(|stored| {
        entries
            .get(stored.last_seq as usize - 1)
            .is_some_and(|(_, hash)| *hash == stored.last_hash)
    });
    let Some(stored) = matching.or(candidates.first()) else {
        return Ok(LocalComparison {
            chain: first_hash.clone(),
            local_entries: entries.len() as u64,
            in_store: 0,
        });
    };
    match entries.get(stored.last_seq as usize - 1) {
        Some((_, hash)) if *hash == stored.last_hash => Ok(LocalComparison {
            chain: first_hash.clone(),
            local_entries: entries.len() as u64,
            in_store: stored.last_seq,
        }),
        Some(_) => Err(format!(
            "entry {} differs between the local log and the store's copy of it ({})",
            stored.last_seq, stored.receiver
        )),
        None => Err(format!(
            "the store holds {} entries of this log ({}), the local log only {}: entries \
             were cut off the local log",
            stored.last_seq,
            stored.receiver,
            entries.len()
        )),
    }
}

/// The shipper's record (`DATA_DIR/audit.shipped`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Shipped {
    format: u32,
    /// The log's chain id (empty before the first shipment).
    chain: String,
    /// The next entry to ship.
    next_seq: u64,
    /// Where it starts in the log.
    offset: u64,
    /// The hash of the last entry shipped ([`GENESIS`] before the first).
    last_hash: String,
    /// The block being created, if a crash may have cut its creation short.
    pending: Option<Pending>,
}

impl Default for Shipped {
    fn default() -> Self {
        Self {
            format: CHAIN_FORMAT,
            chain: String::new(),
            next_seq: 1,
            offset: 0,
            last_hash: GENESIS.to_owned(),
            pending: None,
        }
    }
}

/// A block being created, and where the shipper stands once it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pending {
    block: u64,
    /// The hash of the block before it (the block is rebuilt from it and the log); empty in
    /// a record written before it was kept, when it is read from the store.
    #[serde(default)]
    prev_block: String,
    chain: String,
    first_seq: u64,
    entries: u64,
    end_offset: u64,
    last_hash: String,
}

impl Pending {
    /// The header of the block.
    fn header(&self, receiver: &str) -> BlockHeader {
        BlockHeader {
            format: CHAIN_FORMAT,
            block: self.block,
            prev_block: self.prev_block.clone(),
            receiver: receiver.to_owned(),
            chain: self.chain.clone(),
            first_seq: self.first_seq,
            entries: self.entries,
        }
    }
}

/// Log lines read for shipping.
struct Unshipped {
    /// The lines, each ending in `\n`.
    text: String,
    /// Where they end in the log.
    end_offset: u64,
    entries: Vec<(Entry, String)>,
}

/// Copies one receiver's log into the shared chain.
#[derive(Debug)]
pub struct Shipper {
    client: ObjectStoreClient,
    receiver: String,
    log: PathBuf,
    record: PathBuf,
    shipped: Shipped,
    /// The chain's head as last seen: block number and hash.
    head: Option<(u64, String)>,
}

impl Shipper {
    /// The shipper of the log in `data_dir`, as receiver `receiver`.
    pub fn open(
        client: ObjectStoreClient,
        receiver: String,
        data_dir: &Path,
    ) -> Result<Self, ChainError> {
        let record = data_dir.join(SHIPPED_FILE);
        let local = |message: String| ChainError::Local {
            path: record.clone(),
            message,
        };
        let shipped = match fs::read(&record) {
            Ok(bytes) if bytes.len() > 64 * 1024 => return Err(local("too large".into())),
            Ok(bytes) => serde_json::from_slice::<Shipped>(&bytes)
                .map_err(|error| local(format!("not a shipping record: {error}")))?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => Shipped::default(),
            Err(error) => return Err(local(error.to_string())),
        };
        if shipped.format > CHAIN_FORMAT {
            return Err(local(format!(
                "format {} is newer than this build reads",
                shipped.format
            )));
        }
        Ok(Self {
            client,
            receiver,
            log: audit::AuditLog::in_dir(data_dir).path().to_owned(),
            record,
            shipped,
            head: None,
        })
    }

    /// Entries of the log in the store.
    pub fn shipped_entries(&self) -> u64 {
        self.shipped.next_seq - 1
    }

    /// Ships every complete entry of the log not yet in the store; returns how many.
    pub async fn ship(&mut self) -> Result<u64, ChainError> {
        self.settle_pending().await?;
        let mut total = 0;
        while let Some(unshipped) = self.read_unshipped()? {
            total += self.append(unshipped).await?;
        }
        Ok(total)
    }

    fn save(&self) -> Result<(), ChainError> {
        let bytes = serde_json::to_vec(&self.shipped).expect("a record serializes");
        crate::durable::write_atomic(&self.record, &bytes).map_err(|error| ChainError::Local {
            path: self.record.clone(),
            message: format!("writing: {error}"),
        })
    }

    /// After a crash or a failed request in the middle of creating a block: settles whether
    /// the block is ours.
    ///
    /// A request the shipper stopped waiting for (a timeout, a dropped connection, a store
    /// slowed by a failed node) may still be applied by the store later. Finding the block
    /// absent therefore proves nothing: the request could land after the shipper had shipped
    /// the same entries again elsewhere, and they would be in the chain twice. So the block is
    /// created now, with the very same bytes, if it is not there yet. Once it exists, by
    /// either request or by another receiver, no late request can change it.
    async fn settle_pending(&mut self) -> Result<(), ChainError> {
        let Some(mut pending) = self.shipped.pending.clone() else {
            return Ok(());
        };
        if pending.prev_block.is_empty() {
            // Blocks never change: the one before still hashes as it did.
            pending.prev_block =
                match pending.block.checked_sub(1) {
                    None | Some(0) => GENESIS.to_owned(),
                    Some(before) => block_hash(&self.fetch(before).await?.ok_or_else(|| {
                        ChainError::Broken {
                            block: before,
                            message: "missing, though a block was being created after it".into(),
                        }
                    })?),
                };
        }
        let bytes = self.rebuild_block(&pending)?;
        let key = block_key(pending.block);
        let ours = match self.client.put_if_absent(&key, bytes.clone()).await? {
            Created::Created => true,
            Created::AlreadyExists => match self.fetch(pending.block).await? {
                Some(theirs) => theirs == bytes,
                None => {
                    return Err(ChainError::Broken {
                        block: pending.block,
                        message: "refused as existing, then not found".into(),
                    });
                }
            },
        };
        if ours {
            self.advance(&pending);
            self.head = Some((pending.block, block_hash(&bytes)));
        } else {
            self.head = None;
        }
        self.shipped.pending = None;
        self.save()
    }

    /// The bytes of the block `pending` describes, from the log: the same bytes as were sent.
    fn rebuild_block(&self, pending: &Pending) -> Result<Vec<u8>, ChainError> {
        let local = |message: String| ChainError::Local {
            path: self.log.clone(),
            message,
        };
        let length = pending
            .end_offset
            .checked_sub(self.shipped.offset)
            .filter(|&length| length <= MAX_BLOCK_BYTES as u64)
            .ok_or_else(|| local("the shipping record's block does not fit the log".into()))?;
        let mut text = vec![0; length as usize];
        fs::File::open(&self.log)
            .and_then(|mut file| {
                file.seek(SeekFrom::Start(self.shipped.offset))?;
                file.read_exact(&mut text)
            })
            .map_err(|error| local(format!("reading the block being shipped: {error}")))?;
        let text = String::from_utf8(text).map_err(|_| local("not UTF-8 text".into()))?;
        let entries = check_lines(pending.first_seq, text.lines())
            .map_err(|error| local(format!("the block being shipped: {error}")))?;
        if entries.len() as u64 != pending.entries
            || entries.last().map(|(_, hash)| hash) != Some(&pending.last_hash)
        {
            return Err(local(
                "the log no longer holds the block being shipped (it was edited or replaced; \
                 the store keeps the shipped entries)"
                    .into(),
            ));
        }
        Ok(encode_block(&pending.header(&self.receiver), &text))
    }

    fn advance(&mut self, pending: &Pending) {
        self.shipped.chain = pending.chain.clone();
        self.shipped.next_seq = pending.first_seq + pending.entries;
        self.shipped.offset = pending.end_offset;
        self.shipped.last_hash = pending.last_hash.clone();
    }

    /// The complete entries after what was shipped, at most a block's worth.
    fn read_unshipped(&self) -> Result<Option<Unshipped>, ChainError> {
        let local = |message: String| ChainError::Local {
            path: self.log.clone(),
            message,
        };
        let mut file = match fs::File::open(&self.log) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(local(error.to_string())),
        };
        let len = file
            .metadata()
            .map_err(|error| local(error.to_string()))?
            .len();
        if len < self.shipped.offset {
            return Err(local(format!(
                "the log is {len} bytes, shorter than the {} already shipped: it was cut or \
                 replaced (the store keeps the shipped entries)",
                self.shipped.offset
            )));
        }
        let room = (MAX_BLOCK_BYTES - MAX_HEADER_BYTES) as u64;
        let mut buffer = Vec::new();
        file.seek(SeekFrom::Start(self.shipped.offset))
            .and_then(|_| file.take(room).read_to_end(&mut buffer))
            .map_err(|error| local(error.to_string()))?;
        let Some(end) = buffer.iter().rposition(|&b| b == b'\n') else {
            return Ok(None);
        };
        buffer.truncate(end + 1);
        let text = String::from_utf8(buffer).map_err(|_| local("not UTF-8 text".into()))?;
        let entries = check_lines(self.shipped.next_seq, text.lines()).map_err(|error| {
            local(format!(
                "{error}; the log no longer continues what was shipped to the store, which \
                 keeps the shipped entries (run `blkmirror audit verify`)"
            ))
        })?;
        if entries[0].0.prev != self.shipped.last_hash {
            return Err(local(format!(
                "entry {} does not follow the last entry shipped to the store (the log was \
                 edited or replaced; the store keeps the shipped entries)",
                self.shipped.next_seq
            )));
        }
        Ok(Some(Unshipped {
            end_offset: self.shipped.offset + text.len() as u64,
            text,
            entries,
        }))
    }

    /// Appends one block of `unshipped` at the chain's head; returns its entry count.
    async fn append(&mut self, unshipped: Unshipped) -> Result<u64, ChainError> {
        let (_, last_hash) = unshipped.entries.last().expect("read entries");
        let pending = Pending {
            block: 0,
            prev_block: String::new(),
            chain: if self.shipped.next_seq == 1 {
                unshipped.entries[0].1.clone()
            } else {
                self.shipped.chain.clone()
            },
            first_seq: self.shipped.next_seq,
            entries: unshipped.entries.len() as u64,
            end_offset: unshipped.end_offset,
            last_hash: last_hash.clone(),
        };
        let (mut number, mut prev) = self.head().await?;
        for _ in 0..MAX_APPEND_ATTEMPTS {
            let attempt = Pending {
                block: number + 1,
                prev_block: prev.clone(),
                ..pending.clone()
            };
            let bytes = encode_block(&attempt.header(&self.receiver), &unshipped.text);
            self.shipped.pending = Some(attempt.clone());
            self.save()?;
            let created = match self
                .client
                .put_if_absent(&block_key(number + 1), bytes.clone())
                .await
            {
                Ok(Created::Created) => true,
                Ok(Created::AlreadyExists) => false,
                Err(error) => {
                    // The block may have been created all the same, or may still be: the
                    // next round's settling decides.
                    self.head = None;
                    return Err(error.into());
                }
            };
            let taken = if created {
                None
            } else {
                let Some(theirs) = self.fetch(number + 1).await? else {
                    // Created and deleted in between: only a hand at the store does that.
                    return Err(ChainError::Broken {
                        block: number + 1,
                        message: "refused as existing, then not found".into(),
                    });
                };
                // A retried request whose first try had created it.
                (theirs != bytes).then_some(theirs)
            };
            match taken {
                None => {
                    self.advance(&attempt);
                    self.shipped.pending = None;
                    self.save()?;
                    self.head = Some((number + 1, block_hash(&bytes)));
                    if let Err(error) = self
                        .client
                        .put(HEAD_HINT, (number + 1).to_string().into_bytes())
                        .await
                    {
                        tracing::warn!(
                            target: "blkmirror receiver",
                            "audit chain: the head hint was not written (receivers will probe \
                             further for the head): {error}"
                        );
                    }
                    return Ok(pending.entries);
                }
                Some(theirs) => {
                    (number, prev) = (number + 1, block_hash(&theirs));
                    self.head = Some((number, prev.clone()));
                }
            }
        }
        self.shipped.pending = None;
        self.save()?;
        Err(ChainError::Contended)
    }

    async fn fetch(&self, number: u64) -> Result<Option<Vec<u8>>, ChainError> {
        Ok(self
            .client
            .get(&block_key(number), MAX_BLOCK_BYTES)
            .await?
            .map(|(bytes, _)| bytes))
    }

    /// The chain's last block: from the hint (or a listing without one), probing forward.
    async fn head(&mut self) -> Result<(u64, String), ChainError> {
        if let Some(head) = &self.head {
            return Ok(head.clone());
        }
        let hint = match self.client.get(HEAD_HINT, 64).await? {
            Some((bytes, _)) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok()),
            None => None,
        };
        let mut number = match hint {
            Some(number) => number,
            None => last_listed(&self.client).await?,
        };
        let mut hash = GENESIS.to_owned();
        if number > 0 {
            match self.fetch(number).await? {
                Some(bytes) => hash = block_hash(&bytes),
                None => {
                    // A hint past the chain: never written so, but a hint is only a hint.
                    number = last_listed(&self.client).await?;
                    if number > 0 {
                        let bytes = self.fetch(number).await?.unwrap_or_default();
                        hash = block_hash(&bytes);
                    }
                }
            }
        }
        while let Some(bytes) = self.fetch(number + 1).await? {
            number += 1;
            hash = block_hash(&bytes);
        }
        self.head = Some((number, hash.clone()));
        Ok((number, hash))
    }
}

/// The highest block number listed (0 for none).
async fn last_listed(client: &ObjectStoreClient) -> Result<u64, ChainError> {
    Ok(client
        .list(BLOCKS)
        .await?
        .iter()
        .filter_map(|(key, _, _)| block_number(key))
        .max()
        .unwrap_or(0))
}

/// Reads and checks the whole chain, `parallel` blocks at a time; `progress` is told each
/// block checked and the last block listed.
pub async fn verify_chain(
    client: &ObjectStoreClient,
    parallel: usize,
    progress: impl FnMut(u64, u64),
) -> Result<ChainReport, ChainError> {
    verify_chain_from(client, None, parallel, progress).await
}

/// Checks the chain from a checkpoint (the report of an earlier check), or whole without
/// one: only the blocks after the checkpoint are read, and the checkpoint's last block must
/// be the one it checked. A checkpoint kept where the store's credentials do not reach is an
/// anchor: a chain rewritten behind it, however consistently, no longer leads on from it.
pub async fn verify_chain_from(
    client: &ObjectStoreClient,
    from: Option<&ChainReport>,
    parallel: usize,
    mut progress: impl FnMut(u64, u64),
) -> Result<ChainReport, ChainError> {
    let mut verifier = match from {
        None => ChainVerifier::default(),
        Some(report) => ChainVerifier::resume(report).map_err(|message| ChainError::Broken {
            block: report.blocks,
            message: format!("the checkpoint: {message}"),
        })?,
    };
    let after = verifier.next_block - 1;
    let listed = if after == 0 {
        client.list(BLOCKS).await?
    } else {
        let bytes = client
            .get(&block_key(after), MAX_BLOCK_BYTES)
            .await?
            .ok_or_else(|| ChainError::Broken {
                block: after,
                message: "missing, though the checkpoint ends at it".into(),
            })?
            .0;
        if block_hash(&bytes) != verifier.prev_block {
            return Err(ChainError::Broken {
                block: after,
                message: "not the block the checkpoint checked (rewritten since)".into(),
            });
        }
        client.list_after(BLOCKS, &block_key(after)).await?
    };
    let mut numbers: Vec<u64> = listed
        .iter()
        .filter_map(|(key, _, _)| block_number(key))
        .filter(|&number| number > after)
        .collect();
    numbers.sort_unstable();
    let total = numbers.last().copied().unwrap_or(after);
    // Segments wholly after the checkpoint whose blocks are all listed: each is read in one
    // request instead of its blocks.
    let mut segments: Vec<(u64, u64)> = client
        .list(SEGMENTS)
        .await?
        .iter()
        .filter_map(|(key, _, _)| segment_range(key))
        .filter(|&(first, last)| {
            first > after
                && numbers.binary_search(&first).is_ok_and(|at| {
                    usize::try_from(last - first)
                        .ok()
                        .and_then(|span| at.checked_add(span))
                        .and_then(|end| numbers.get(end))
                        == Some(&last)
                })
        })
        .collect();
    segments.sort_unstable();
    let mut reads = Vec::new();
    let mut segments = segments.into_iter().peekable();
    let mut at = 0;
    while at < numbers.len() {
        let number = numbers[at];
        while segments.next_if(|&(first, _)| first < number).is_some() {}
        match segments.next_if(|&(first, _)| first == number) {
            Some((first, last)) => {
                reads.push(ChainRead::Segment(first, last));
                at += (last - first + 1) as usize;
            }
            None => {
                reads.push(ChainRead::Block(number));
                at += 1;
            }
        }
    }
    for window in reads.chunks(parallel.max(1)) {
        for (number, bytes) in fetch_reads(client, window).await? {
            verifier.add(number, &bytes)?;
            progress(number, total);
        }
    }
    Ok(verifier.report())
}

/// Runs `reads` at once; returns their blocks in block order.
async fn fetch_reads(
    client: &ObjectStoreClient,
    reads: &[ChainRead],
) -> Result<Vec<(u64, Vec<u8>)>, ChainError> {
    let mut in_flight = tokio::task::JoinSet::new();
    for &read in reads {
        let client = client.clone();
        in_flight.spawn(async move { read.fetch(&client).await });
    }
    let mut fetched = Vec::new();
    while let Some(joined) = in_flight.join_next().await {
        fetched.extend(joined.expect("a chain read does not panic")?);
    }
    fetched.sort_unstable_by_key(|(number, _)| *number);
    Ok(fetched)
}

/// One read of a check: a block, or a segment of blocks.
#[derive(Clone, Copy, Debug)]
enum ChainRead {
    Block(u64),
    Segment(u64, u64),
}

impl ChainRead {
    /// The blocks it reads, with their numbers. A segment that is gone or does not decode is
    /// read as its blocks: the blocks are the chain, a segment only a faster way to read them.
    async fn fetch(self, client: &ObjectStoreClient) -> Result<Vec<(u64, Vec<u8>)>, ChainError> {
        let block = |number: u64| async move {
            let bytes = client.get(&block_key(number), MAX_BLOCK_BYTES).await?;
            let (bytes, _) = bytes.ok_or_else(|| ChainError::Broken {
                block: number,
                message: "listed, then not found (deleted while being read)".into(),
            })?;
            Ok::<_, ChainError>((number, bytes))
        };
        match self {
            Self::Block(number) => Ok(vec![block(number).await?]),
            Self::Segment(first, last) => {
                let key = segment_key(first, last);
                let decoded = match client.get(&key, MAX_SEGMENT_BYTES).await? {
                    Some((bytes, _)) => decode_segment(first, last, &bytes),
                    None => Err("listed, then not found".into()),
                };
                match decoded {
                    Ok(blocks) => Ok(blocks),
                    Err(why) => {
                        tracing::warn!(
                            target: "blkmirror store",
                            "audit chain: segment {key}: {why}; reading its blocks instead"
                        );
                        let mut blocks = Vec::new();
                        for number in first..=last {
                            blocks.push(block(number).await?);
                        }
                        Ok(blocks)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dr::audit::{AuditLog, Event};

    async fn block_bytes(client: &ObjectStoreClient, number: u64) -> Vec<u8> {
        let bytes = client
            .get(&block_key(number), MAX_BLOCK_BYTES)
            .await
            .unwrap();
        bytes.expect("the block exists").0
    }

    fn event(name: &'static str) -> Event {
        Event {
            event: name,
            volume: Some("db".into()),
            outcome: "ok".into(),
            ..Event::default()
        }
    }

    #[tokio::test]
    async fn receivers_racing_make_one_chain_and_each_log_is_shipped_once_in_order() {
        let client = ObjectStoreClient::in_memory();
        let dirs: Vec<_> = (0..3)
            .map(|n| crate::testing::TempDir::new(&format!("auditchain-{n}")))
            .collect();
        let mut shippers: Vec<_> = dirs
            .iter()
            .enumerate()
            .map(|(n, dir)| Shipper::open(client.clone(), format!("rx-{n}"), &dir.0).unwrap())
            .collect();
        for round in 0..5 {
            for dir in &dirs {
                for _ in 0..=round {
                    AuditLog::in_dir(&dir.0).append(event("commit")).unwrap();
                }
            }
            // Each shipper's cached head is stale by the others' blocks of the round before:
            // its first try is refused, and it follows their blocks to the head.
            for shipper in &mut shippers {
                assert_eq!(shipper.ship().await.unwrap(), round as u64 + 1);
            }
        }
        let report = verify_chain(&client, 4, |_, _| {}).await.unwrap();
        assert_eq!(report.blocks, 15);
        assert_eq!(report.entries, 45);
        assert_eq!(report.logs.len(), 3);
        for (dir, log) in dirs.iter().zip(&report.logs) {
            assert_eq!(log.last_seq, 15);
            let text = fs::read_to_string(dir.0.join("audit.log")).unwrap();
            let compared = compare_local(&report, &text).unwrap();
            assert_eq!((compared.local_entries, compared.in_store), (15, 15));
        }
        // Nothing new: nothing shipped, no block added.
        assert_eq!(shippers[0].ship().await.unwrap(), 0);
        assert_eq!(
            verify_chain(&client, 4, |_, _| {}).await.unwrap().blocks,
            15
        );
    }

    #[tokio::test]
    async fn a_crash_after_creating_a_block_neither_loses_nor_repeats_entries() {
        let client = ObjectStoreClient::in_memory();
        let dir = crate::testing::TempDir::new("auditchain-crash");
        let log = AuditLog::in_dir(&dir.0);
        for _ in 0..3 {
            log.append(event("commit")).unwrap();
        }
        let mut shipper = Shipper::open(client.clone(), "rx".into(), &dir.0).unwrap();
        assert_eq!(shipper.ship().await.unwrap(), 3);
        let record = dir.0.join(SHIPPED_FILE);
        let before = fs::read(&record).unwrap();
        log.append(event("restore")).unwrap();
        assert_eq!(shipper.ship().await.unwrap(), 1);
        // A crash between the block's creation and the record's update: the record still
        // says "creating block 2".
        let mut stale: Shipped = serde_json::from_slice(&before).unwrap();
        let after: Shipped = serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
        stale.pending = Some(Pending {
            block: 2,
            prev_block: String::new(),
            chain: after.chain.clone(),
            first_seq: 4,
            entries: 1,
            end_offset: after.offset,
            last_hash: after.last_hash.clone(),
        });
        // Written as a build before `prev_block` was kept wrote it: the shipper reads the
        // hash from block 1.
        let mut written = serde_json::to_value(&stale).unwrap();
        written["pending"]
            .as_object_mut()
            .unwrap()
            .remove("prev_block");
        fs::write(&record, serde_json::to_vec(&written).unwrap()).unwrap();
        log.append(event("verify")).unwrap();
        let mut restarted = Shipper::open(client.clone(), "rx".into(), &dir.0).unwrap();
        assert_eq!(restarted.ship().await.unwrap(), 1, "only entry 5 is new");
        let report = verify_chain(&client, 2, |_, _| {}).await.unwrap();
        assert_eq!((report.blocks, report.entries), (3, 5));
        assert_eq!(report.events["verify"], 1);
    }

    #[tokio::test]
    async fn a_block_whose_creation_failed_is_settled_so_a_late_request_cannot_repeat_it() {
        let client = ObjectStoreClient::in_memory();
        let dir = crate::testing::TempDir::new("auditchain-late");
        let log = AuditLog::in_dir(&dir.0);
        log.append(event("commit")).unwrap();
        let mut shipper = Shipper::open(client.clone(), "rx".into(), &dir.0).unwrap();
        assert_eq!(shipper.ship().await.unwrap(), 1);
        let head = block_bytes(&client, 1).await;
        // Entries 2 and 3 were sent as block 2 and the request failed (a timeout): the
        // record names the block, and the store has not (yet) applied it.
        log.append(event("commit")).unwrap();
        log.append(event("restore")).unwrap();
        let text = fs::read_to_string(log.path()).unwrap();
        let unshipped = shipper.read_unshipped().unwrap().unwrap();
        assert_eq!(unshipped.entries.len(), 2);
        let sent = Pending {
            block: 2,
            prev_block: block_hash(&head),
            chain: shipper.shipped.chain.clone(),
            first_seq: 2,
            entries: 2,
            end_offset: text.len() as u64,
            last_hash: unshipped.entries[1].1.clone(),
        };
        let sent_bytes = encode_block(&sent.header("rx"), &unshipped.text);
        shipper.shipped.pending = Some(sent);
        shipper.save().unwrap();

        // Settling (here after a restart) creates the block itself, with the same bytes.
        log.append(event("verify")).unwrap();
        let mut restarted = Shipper::open(client.clone(), "rx".into(), &dir.0).unwrap();
        assert_eq!(restarted.ship().await.unwrap(), 1, "only entry 4 is new");
        assert_eq!(restarted.shipped_entries(), 4);
        // The failed request lands late: the block is there already, so it changes nothing.
        assert_eq!(
            client
                .put_if_absent(&block_key(2), sent_bytes.clone())
                .await
                .unwrap(),
            Created::AlreadyExists
        );
        let in_store = client.get(&block_key(2), MAX_BLOCK_BYTES).await.unwrap();
        assert_eq!(in_store.unwrap().0, sent_bytes);
        let report = verify_chain(&client, 2, |_, _| {}).await.unwrap();
        assert_eq!((report.blocks, report.entries), (3, 4));
        assert_eq!(report.events["restore"], 1);

        // Another receiver took the block number first: the entries go after its block.
        log.append(event("commit")).unwrap();
        let unshipped = restarted.read_unshipped().unwrap().unwrap();
        let other = crate::testing::TempDir::new("auditchain-late-other");
        AuditLog::in_dir(&other.0).append(event("commit")).unwrap();
        let mut other_shipper = Shipper::open(client.clone(), "rx-2".into(), &other.0).unwrap();
        let end_offset = fs::metadata(log.path()).unwrap().len();
        restarted.shipped.pending = Some(Pending {
            block: 4,
            prev_block: block_hash(&block_bytes(&client, 3).await),
            chain: restarted.shipped.chain.clone(),
            first_seq: 5,
            entries: 1,
            end_offset,
            last_hash: unshipped.entries[0].1.clone(),
        });
        restarted.save().unwrap();
        assert_eq!(other_shipper.ship().await.unwrap(), 1);
        assert_eq!(restarted.ship().await.unwrap(), 1);
        let report = verify_chain(&client, 2, |_, _| {}).await.unwrap();
        assert_eq!((report.blocks, report.entries), (5, 6));
        let compared = compare_local(&report, &fs::read_to_string(log.path()).unwrap()).unwrap();
        assert_eq!((compared.local_entries, compared.in_store), (5, 5));
    }

    #[tokio::test]
    async fn a_check_from_a_checkpoint_reads_only_new_blocks_and_finds_a_rewritten_chain() {
        let client = ObjectStoreClient::in_memory();
        let dirs: Vec<_> = (0..2)
            .map(|n| crate::testing::TempDir::new(&format!("auditchain-checkpoint-{n}")))
            .collect();
        let ship_round = async |client: &ObjectStoreClient, receivers: &[&str]| {
            for (dir, receiver) in dirs.iter().zip(receivers) {
                AuditLog::in_dir(&dir.0).append(event("commit")).unwrap();
                let mut shipper =
                    Shipper::open(client.clone(), receiver.to_string(), &dir.0).unwrap();
                shipper.ship().await.unwrap();
            }
        };
        for _ in 0..3 {
            ship_round(&client, &["rx-0", "rx-1"]).await;
        }
        let checkpoint = verify_chain(&client, 4, |_, _| {}).await.unwrap();
        assert_eq!((checkpoint.blocks, checkpoint.entries), (6, 6));
        // Nothing new: the checkpoint's own block is read, nothing else.
        let again = verify_chain_from(&client, Some(&checkpoint), 4, |_, _| {})
            .await
            .unwrap();
        assert_eq!(again, checkpoint);
        for _ in 0..2 {
            ship_round(&client, &["rx-0", "rx-1"]).await;
        }
        let mut checked = Vec::new();
        let later = verify_chain_from(&client, Some(&checkpoint), 4, |number, last| {
            checked.push((number, last))
        })
        .await
        .unwrap();
        assert_eq!(checked, [(7, 10), (8, 10), (9, 10), (10, 10)]);
        // The same result as a whole check: each log's continuity went on from the
        // checkpoint.
        assert_eq!(later, verify_chain(&client, 4, |_, _| {}).await.unwrap());
        assert_eq!(
            later.logs.iter().map(|l| l.last_seq).collect::<Vec<_>>(),
            [5, 5]
        );

        // A block that repeats entries after the checkpoint is found from it too.
        let repeated = block_bytes(&client, 9).await;
        let text = String::from_utf8(repeated).unwrap();
        let (header_line, lines) = text.split_once('\n').unwrap();
        let mut header: BlockHeader = serde_json::from_str(header_line).unwrap();
        header.block = 11;
        header.prev_block = block_hash(&block_bytes(&client, 10).await);
        client
            .put(&block_key(11), encode_block(&header, lines))
            .await
            .unwrap();
        let error = verify_chain_from(&client, Some(&later), 4, |_, _| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing or repeated"), "{error}");
        client.delete(&block_key(11)).await.unwrap();

        // The whole chain replaced by a consistent one of other entries: a whole check
        // passes, a check from the checkpoint does not.
        for number in 1..=10 {
            client.delete(&block_key(number)).await.unwrap();
        }
        let forged: Vec<_> = (0..2)
            .map(|n| crate::testing::TempDir::new(&format!("auditchain-forged-chain-{n}")))
            .collect();
        for round in 0..5 {
            for (n, dir) in forged.iter().enumerate() {
                AuditLog::in_dir(&dir.0).append(event("restore")).unwrap();
                let mut shipper = Shipper::open(client.clone(), format!("rx-{n}"), &dir.0).unwrap();
                assert_eq!(shipper.ship().await.unwrap(), 1, "round {round}");
            }
        }
        let whole = verify_chain(&client, 4, |_, _| {}).await.unwrap();
        assert_eq!((whole.blocks, whole.entries), (10, 10));
        let error = verify_chain_from(&client, Some(&later), 4, |_, _| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("block 10") && error.contains("rewritten"),
            "{error}"
        );

        // A malformed checkpoint is refused before anything is read.
        let mut malformed = later.clone();
        malformed.head = "not a hash".into();
        let error = verify_chain_from(&client, Some(&malformed), 4, |_, _| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("the checkpoint"), "{error}");
    }

    #[tokio::test]
    async fn tampering_in_the_store_or_the_local_log_is_found() {
        let client = ObjectStoreClient::in_memory();
        let dir = crate::testing::TempDir::new("auditchain-tamper");
        let log = AuditLog::in_dir(&dir.0);
        let mut shipper = Shipper::open(client.clone(), "rx".into(), &dir.0).unwrap();
        for _ in 0..3 {
            log.append(event("commit")).unwrap();
            shipper.ship().await.unwrap();
        }
        let original = block_bytes(&client, 2).await;
        let text = String::from_utf8(original.clone()).unwrap();

        // An entry edited (its hash no longer matches).
        let edited = text.replace("\"outcome\":\"ok\"", "\"outcome\":\"no\"");
        client
            .put(&block_key(2), edited.into_bytes())
            .await
            .unwrap();
        let error = verify_chain(&client, 2, |_, _| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("block 2") && error.contains("edited"),
            "{error}"
        );

        // A block removed: block 3 no longer follows.
        client.delete(&block_key(2)).await.unwrap();
        let error = verify_chain(&client, 2, |_, _| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing"), "{error}");

        // A block replaced by a consistent block of other entries: block 3 does not follow.
        let forged_dir = crate::testing::TempDir::new("auditchain-forged");
        let forged = AuditLog::in_dir(&forged_dir.0);
        forged.append(event("commit")).unwrap();
        forged.append(event("commit")).unwrap();
        let forged_text = fs::read_to_string(forged.path()).unwrap();
        let first = block_bytes(&client, 1).await;
        let first_block_hash = block_hash(&first);
        let header: BlockHeader = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let second_line = forged_text.lines().nth(1).unwrap().to_owned() + "\n";
        let forged_block = encode_block(
            &BlockHeader {
                prev_block: first_block_hash,
                ..header
            },
            &second_line,
        );
        client.put(&block_key(2), forged_block).await.unwrap();
        let error = verify_chain(&client, 2, |_, _| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("block 2") || error.contains("block 3"),
            "{error}"
        );

        // Restored: it verifies, and the local log agrees with it.
        client.put(&block_key(2), original).await.unwrap();
        let report = verify_chain(&client, 2, |_, _| {}).await.unwrap();
        let local = fs::read_to_string(log.path()).unwrap();
        assert_eq!(compare_local(&report, &local).unwrap().in_store, 3);

        // The local log edited after shipping: the shipper refuses to go on, and the
        // comparison names the difference.
        log.append(event("commit")).unwrap();
        let rewritten = local.replacen("\"commit\"", "\"comm1t\"", 1);
        let tail = fs::read_to_string(log.path()).unwrap()[local.len()..].to_owned();
        fs::write(log.path(), rewritten + &tail).unwrap();
        let _ = shipper.ship().await.unwrap();
        let error = compare_local(&report, &fs::read_to_string(log.path()).unwrap()).unwrap_err();
        assert!(error.contains("edited"), "{error}");
    }

    #[tokio::test]
    async fn a_check_reads_segments_for_their_blocks_and_a_bad_segment_for_its_blocks() {
        let client = ObjectStoreClient::in_memory();
        let dir = crate::testing::TempDir::new("auditchain-segments");
        let mut shipper = Shipper::open(client.clone(), "rx-0".into(), &dir.0).unwrap();
        let mut at_six = None;
        for block in 1..=11 {
            AuditLog::in_dir(&dir.0).append(event("commit")).unwrap();
            assert_eq!(shipper.ship().await.unwrap(), 1);
            if block == 6 {
                at_six = Some(verify_chain(&client, 4, |_, _| {}).await.unwrap());
            }
        }

        // Full runs of 4 only: 1-4 and 5-8; 9-11 stay blocks only. Written once.
        assert_eq!(write_segments_of(&client, 3, 4).await.unwrap(), 2);
        assert_eq!(write_segments_of(&client, 3, 4).await.unwrap(), 0);
        let mut keys: Vec<String> = client
            .list(SEGMENTS)
            .await
            .unwrap()
            .into_iter()
            .map(|(key, _, _)| key)
            .collect();
        keys.sort();
        assert_eq!(keys, [segment_key(1, 4), segment_key(5, 8)]);
        // The blocks stay, and the chain goes on at its head.
        assert!(!block_bytes(&client, 2).await.is_empty());
        AuditLog::in_dir(&dir.0).append(event("commit")).unwrap();
        assert_eq!(shipper.ship().await.unwrap(), 1);
        let mut checked = Vec::new();
        let whole = verify_chain(&client, 4, |number, _| checked.push(number))
            .await
            .unwrap();
        assert_eq!(checked, (1..=12).collect::<Vec<_>>());
        assert_eq!((whole.blocks, whole.entries), (12, 12));

        // What a check reads is the segment: a block changed under it goes unread (both are
        // in the same credentials' reach; the anchors are the local logs and checkpoints).
        let original = block_bytes(&client, 2).await;
        client
            .put(&block_key(2), b"not a block".to_vec())
            .await
            .unwrap();
        assert_eq!(verify_chain(&client, 4, |_, _| {}).await.unwrap(), whole);
        client.put(&block_key(2), original).await.unwrap();

        // A segment is checked like its blocks: an entry changed in it breaks the chain.
        let key = segment_key(5, 8);
        let (segment, _) = client.get(&key, MAX_SEGMENT_BYTES).await.unwrap().unwrap();
        let changed = String::from_utf8(segment.clone())
            .unwrap()
            .replacen("\"commit\"", "\"comm1t\"", 1)
            .into_bytes();
        assert_ne!(changed, segment);
        client.put(&key, changed).await.unwrap();
        let error = verify_chain(&client, 4, |_, _| {}).await.unwrap_err();
        assert!(matches!(error, ChainError::Broken { .. }), "{error}");

        // One that does not decode is read as its blocks.
        client
            .put(&key, b"blkmirror-audit-segment 1\n5 3\nabc".to_vec())
            .await
            .unwrap();
        assert_eq!(verify_chain(&client, 4, |_, _| {}).await.unwrap(), whole);
        client.put(&key, segment).await.unwrap();

        // A segment whose name claims more than the listed blocks is not read.
        client
            .put(
                &format!("{SEGMENTS}/{:020}-{:020}", 9, u64::MAX),
                b"x".to_vec(),
            )
            .await
            .unwrap();
        assert_eq!(verify_chain(&client, 4, |_, _| {}).await.unwrap(), whole);

        // From a checkpoint inside a segment (at block 6), the rest of that segment is read
        // as blocks, then the rest of the chain, to the same result as a whole check.
        let mut from_six = Vec::new();
        let later = verify_chain_from(&client, at_six.as_ref(), 4, |n, _| from_six.push(n))
            .await
            .unwrap();
        assert_eq!(from_six, (7..=12).collect::<Vec<_>>());
        assert_eq!(later, whole);
    }

    /// Segments are written from where the segments so far end: the blocks they hold are
    /// not listed again (shown here by deleting two of them, which only a hand at the store
    /// does: before, the walk from block 1 stopped at the first missing one).
    #[tokio::test]
    async fn segments_are_written_after_those_already_written_without_listing_their_blocks() {
        let client = ObjectStoreClient::in_memory();
        let dir = crate::testing::TempDir::new("auditchain-segments-after");
        let mut shipper = Shipper::open(client.clone(), "rx-0".into(), &dir.0).unwrap();
        for _ in 0..9 {
            AuditLog::in_dir(&dir.0).append(event("commit")).unwrap();
            assert_eq!(shipper.ship().await.unwrap(), 1);
        }
        assert_eq!(write_segments_of(&client, 2, 4).await.unwrap(), 2);
        client.delete(&block_key(1)).await.unwrap();
        client.delete(&block_key(6)).await.unwrap();
        for _ in 0..3 {
            AuditLog::in_dir(&dir.0).append(event("commit")).unwrap();
            assert_eq!(shipper.ship().await.unwrap(), 1);
        }
        assert_eq!(write_segments_of(&client, 2, 4).await.unwrap(), 1);
        assert!(
            client
                .get(&segment_key(9, 12), MAX_SEGMENT_BYTES)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            covered_by_segments(&[(1, 4), (9, 12), (5, 8), (17, 20)], 4),
            12
        );
        assert_eq!(covered_by_segments(&[(5, 8)], 4), 0);
        assert_eq!(covered_by_segments(&[(1, 4)], 0), 0);
    }

    #[test]
    fn segments_decode_only_as_written() {
        let blocks = vec![
            (7, b"seven\n".to_vec()),
            (8, Vec::new()),
            (9, b"9".to_vec()),
        ];
        let bytes = encode_segment(&blocks);
        assert_eq!(decode_segment(7, 9, &bytes).unwrap(), blocks);
        assert!(
            decode_segment(7, 8, &bytes)
                .unwrap_err()
                .contains("after block 8")
        );
        assert!(
            decode_segment(6, 9, &bytes)
                .unwrap_err()
                .contains("where block 6")
        );
        assert!(
            decode_segment(7, 10, &bytes)
                .unwrap_err()
                .contains("block 10")
        );
        assert!(decode_segment(7, 9, &bytes[1..]).is_err());
        let mut long = bytes.clone();
        long.truncate(bytes.len() - 1);
        assert!(
            decode_segment(7, 9, &long)
                .unwrap_err()
                .contains("does not fit")
        );
        assert_eq!(segment_range(&segment_key(7, 9)), Some((7, 9)));
        assert_eq!(segment_range(&segment_key(9, 7)), None);
        assert_eq!(segment_range(&segment_key(0, 7)), None);
        assert_eq!(segment_range("audit/segments/7-9"), None);
        assert_eq!(segment_range(&block_key(7)), None);
    }

    #[test]
    fn block_keys_round_trip_and_odd_keys_are_not_blocks() {
        assert_eq!(block_number(&block_key(42)), Some(42));
        assert_eq!(block_number("audit/blocks/42"), None);
        assert_eq!(block_number("audit/head"), None);
        assert!(decode_block(1, b"").is_err());
        assert!(decode_block(1, b"{}\n").is_err());
    }
}
