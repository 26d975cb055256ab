//! The replication protocol between agent and receiver: messages, framing and the limits every
//! received frame is checked against. Pure: no IO.
//!
//! # Streams
//!
//! One QUIC connection carries one volume. The agent opens one bidirectional *control stream*
//! and, per cycle, several unidirectional *data streams*.
//!
//! * Control, agent → receiver: [`AgentMessage`] (`Hello`, `HashRequest`, `Begin`, `Flush`,
//!   `Commit`, `Resume`); receiver → agent: [`ReceiverMessage`].
//! * A connection that breaks in the middle of a journaled cycle does not lose the cycle: the
//!   receiver keeps its journal and reports it in the next [`Welcome`] of the same agent
//!   ([`OpenCycleReport`]: the cycle, its frame count, the byte ranges journaled), and the
//!   agent continues it with `Resume` instead of `Begin`, sending only what the journal does
//!   not hold (`pass::Resumption`). A `Begin` abandons a kept cycle.
//! * Data streams carry only [`DataFrame`]s of the open cycle. Within one *pass* of a cycle the
//!   frames cover disjoint chunks, so their arrival order across streams does not matter; a
//!   `Flush` barrier separates passes, so a later pass's frame for a chunk always lands in the
//!   journal after an earlier one's.
//!
//! # Framing
//!
//! Every frame is a little-endian `u32` length followed by that many bytes of
//! [postcard](https://docs.rs/postcard). A length above [`MAX_FRAME_BYTES`] is rejected before
//! anything is allocated. Decoded messages are then checked by [`check_data_frame`] and friends
//! against the volume they address; the receiver treats every frame as hostile.

use serde::{Deserialize, Serialize};

/// The protocol version both sides must speak.
pub const PROTOCOL_VERSION: u32 = 7;

/// The largest payload of one [`DataFrame::Write`] (decompressed).
pub const MAX_WRITE_BYTES: u32 = 1 << 20;

/// The largest frame on the wire: a full write plus headroom for its header.
pub const MAX_FRAME_BYTES: u32 = MAX_WRITE_BYTES + 4096;

/// The most chunk hashes one [`AgentMessage::HashRequest`] may ask for.
pub const MAX_HASHES_PER_REQUEST: u32 = 4096;

/// The longest volume name.
pub const MAX_VOLUME_NAME: usize = 64;

/// The longest source identity string.
pub const MAX_SOURCE_ID: usize = 512;

/// The most journaled ranges a [`Welcome`] reports of an interrupted cycle. A cycle whose
/// journal holds more reports only its first ranges; the agent re-sends the rest.
pub const MAX_RESUME_RANGES: usize = 16384;

/// BLAKE3 hash of one chunk.
pub type ChunkHash = [u8; 32];

/// What the agent sends on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message: who and what.
    Hello(Hello),
    /// Asks for the replica's hashes of `count` chunks starting at `first_chunk`.
    HashRequest {
        /// First chunk index.
        first_chunk: u64,
        /// How many chunks.
        count: u32,
    },
    /// Opens cycle `seq`.
    Begin(Begin),
    /// Barrier: reply once `frames` data frames of the open cycle are journaled.
    Flush {
        /// Data frames sent in this cycle so far.
        frames: u64,
    },
    /// Closes the open cycle: commit it once `frames` data frames are journaled.
    Commit {
        /// Data frames sent in this cycle.
        frames: u64,
        /// What the new point is.
        point: PointInfo,
    },
    /// Continues cycle `seq`, which the receiver kept open when the last connection broke
    /// (its [`Welcome::open_cycle`]): the journal keeps what it holds, and data frames and the
    /// frame count go on from there. The receiver replies `Ready`. (Last, so that the other
    /// messages keep their encoding.)
    Resume {
        /// The open cycle.
        seq: u64,
    },
}

/// The agent's introduction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub protocol: u32,
    /// The volume to replicate into.
    pub volume: String,
    /// Stable identity of the source device (see `source::SourceIdentity`).
    pub source_id: String,
    /// Size of the source device in bytes.
    pub size_bytes: u64,
    /// Chunk size in bytes (hashes and frames are per chunk).
    pub chunk_bytes: u64,
}

/// Opens a cycle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Begin {
    /// The cycle number: the receiver's committed number plus one.
    pub seq: u64,
    /// Upper bound of the data bytes this cycle will send (for the disk-space check).
    pub bytes_estimate: u64,
    /// A step of an initial sync: write straight into the image, without the journal (the
    /// image is not a point in time until the sync completes). The receiver refuses it for a
    /// volume that has ever had a complete point: every re-sync of a replica is journaled.
    pub direct: bool,
    /// For a direct step: the device offset where the step starts. Until the step commits, the
    /// receiver reports this offset as where a resumed sync must start.
    pub from: u64,
}

/// One data frame of the open cycle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataFrame {
    /// Bytes to write at `offset`.
    Write {
        /// The cycle this frame belongs to.
        seq: u64,
        /// Byte offset in the volume (a multiple of 512).
        offset: u64,
        /// How `data` is encoded.
        codec: Codec,
        /// Length of the decoded data (a multiple of 512, at most [`MAX_WRITE_BYTES`]).
        raw_len: u32,
        /// The encoded data.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A range that reads as zeros (discarded, zeroed, or all-zero data): no payload.
    Zero {
        /// The cycle this frame belongs to.
        seq: u64,
        /// Byte offset (a multiple of 512).
        offset: u64,
        /// Length in bytes (a multiple of 512).
        length: u64,
    },
}

impl DataFrame {
    /// The cycle the frame says it belongs to (not yet checked).
    pub fn seq(&self) -> u64 {
        match *self {
            Self::Write { seq, .. } | Self::Zero { seq, .. } => seq,
        }
    }
}

/// A [`DataFrame`] whose payload is borrowed, for the sender: it encodes to exactly the bytes
/// of the owned frame (same variants in the same order), so a payload read from the device is
/// copied once, into the encoded frame, and not first into a frame of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DataFrameRef<'a> {
    /// [`DataFrame::Write`].
    Write {
        /// The cycle this frame belongs to.
        seq: u64,
        /// Byte offset in the volume.
        offset: u64,
        /// How `data` is encoded.
        codec: Codec,
        /// Length of the decoded data.
        raw_len: u32,
        /// The encoded data.
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
    },
    /// [`DataFrame::Zero`].
    Zero {
        /// The cycle this frame belongs to.
        seq: u64,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        length: u64,
    },
}

impl DataFrameRef<'_> {
    /// The owned frame.
    pub fn to_owned(&self) -> DataFrame {
        match *self {
            Self::Write {
                seq,
                offset,
                codec,
                raw_len,
                data,
            } => DataFrame::Write {
                seq,
                offset,
                codec,
                raw_len,
                data: data.to_vec(),
            },
            Self::Zero {
                seq,
                offset,
                length,
            } => DataFrame::Zero {
                seq,
                offset,
                length,
            },
        }
    }
}

/// Encoding of a write's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// As is.
    Raw,
    /// A zstd frame.
    Zstd,
}

/// What the receiver records about a committed point.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    /// The cycle number.
    pub seq: u64,
    /// The tracker's generation and epoch of the last cut in this cycle.
    pub generation: u64,
    /// See `generation`.
    pub epoch: u64,
    /// When the final cut was taken (Unix milliseconds).
    pub time_unix_ms: u64,
    /// Data bytes shipped by the cycle (before compression).
    pub bytes: u64,
    /// Whether the point is crash-consistent (filesystem frozen at the final cut).
    pub consistent: bool,
    /// How long the filesystem was frozen, in milliseconds.
    pub freeze_ms: u64,
    /// Whether the replica is whole after this cycle. `false` for the steps of an initial or
    /// verify sync: the image then mixes old and new content and is not a point in time.
    pub complete: bool,
    /// For incomplete steps: the device offset the sync pass has covered.
    pub synced_to: u64,
    /// The consistency-group cut this point shares with the group's other volumes (they were
    /// all frozen and cut together), if any.
    #[serde(default)]
    pub group_cut: Option<u64>,
    /// When the receiver committed the point (Unix milliseconds, the receiver's clock). Set by
    /// the receiver; what an agent sends here is ignored. Retention ages points by it.
    #[serde(default)]
    pub received_unix_ms: u64,
    /// Whether the application's `pre_freeze` hook succeeded before the freeze of the final cut
    /// (a database checkpoint, a read lock): the point is application-consistent, not only
    /// crash-consistent. Only ever true with `consistent`.
    #[serde(default)]
    pub app_consistent: bool,
}

/// What the receiver sends on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiverMessage {
    /// Reply to `Hello`.
    Welcome(Welcome),
    /// Reply to `HashRequest`.
    Hashes {
        /// First chunk index.
        first_chunk: u64,
        /// One hash per chunk.
        hashes: Vec<ChunkHash>,
    },
    /// The cycle is open; data streams may start.
    Ready {
        /// The cycle number.
        seq: u64,
    },
    /// Reply to `Flush`.
    Flushed {
        /// Frames journaled.
        frames: u64,
    },
    /// The cycle is durable and applied.
    Committed {
        /// The cycle number.
        seq: u64,
    },
    /// The request was refused; the connection is closed after this.
    Refused {
        /// Machine-readable reason.
        code: RefusalCode,
        /// What was wrong, for a human.
        message: String,
    },
}

/// The receiver's view of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// [`PROTOCOL_VERSION`] of the receiver.
    pub protocol: u32,
    /// Whether the image was just created (all zeros).
    pub new_volume: bool,
    /// The last committed cycle (0: none).
    pub committed_seq: u64,
    /// The last committed cycle's record.
    pub last_point: Option<PointInfo>,
    /// The volume has had a complete point: its history is kept, so every sync is journaled
    /// (a direct `Begin` is refused).
    pub history: bool,
    /// A journaled cycle this agent began and did not finish before its connection broke: the
    /// receiver kept its journal, and the agent may continue it with `Resume`.
    pub open_cycle: Option<OpenCycleReport>,
    /// The volume's term (1 at first; raised by each failover and reprotect at the DR site).
    /// An agent that has seen a higher term refuses to write to this receiver: its authority
    /// record is stale (restored from an old backup, or another receiver).
    pub term: u64,
    /// The term the last failback began (0: none). An agent whose record is below it did not
    /// write down that failback (its state file was on the device the failback overwrote, as
    /// with a protected root disk, or its process died before): what changed on its device is
    /// unknown to it, so it verifies.
    pub failback_term: u64,
}

/// What the journal of an interrupted cycle holds (see [`Welcome::open_cycle`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenCycleReport {
    /// The cycle.
    pub seq: u64,
    /// Data frames journaled.
    pub frames: u64,
    /// Byte ranges `(offset, length)` the journaled frames cover, ascending and disjoint; at
    /// most [`MAX_RESUME_RANGES`].
    pub journaled: Vec<(u64, u64)>,
}

impl OpenCycleReport {
    /// Checks the report against a volume of `size` bytes: ranges in bounds, ascending,
    /// disjoint, not too many.
    pub fn check(&self, size: u64) -> Result<(), WireError> {
        if self.journaled.len() > MAX_RESUME_RANGES {
            return Err(WireError::OpenCycle(format!(
                "an open cycle reports {} journaled ranges, more than {MAX_RESUME_RANGES}",
                self.journaled.len()
            )));
        }
        let mut end_of_last = 0;
        for &(offset, length) in &self.journaled {
            let end = offset.checked_add(length).filter(|&end| end <= size);
            match end {
                Some(end) if length > 0 && offset >= end_of_last => end_of_last = end,
                _ => {
                    return Err(WireError::OpenCycle(format!(
                        "an open cycle reports the journaled range ({offset}, {length}), which \
                         is empty, out of order or past the volume's {size} bytes"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Why the receiver refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    /// Protocol versions differ.
    Protocol,
    /// The agent is not granted this volume (or it does not exist for this agent).
    NotGranted,
    /// The volume was made from another device, or with another size or chunk size.
    SourceMismatch,
    /// A frame broke the rules.
    BadFrame,
    /// Not enough space for the cycle.
    DiskFull,
    /// Storage failed on the receiver.
    Storage,
    /// Message out of order (e.g. data before `Begin`).
    Sequence,
    /// The receiver's policy forbids it: it would remove or rewrite committed history.
    Forbidden,
}

/// The QUIC application close code of a connection the receiver ended for a reason other than
/// a refusal (a revoked grant, no client certificate, a newer connection for the volume): the
/// agent reconnects.
pub const CLOSE_ADMISSION: u32 = 0x40;

impl RefusalCode {
    const ALL: [RefusalCode; 8] = [
        RefusalCode::Protocol,
        RefusalCode::NotGranted,
        RefusalCode::SourceMismatch,
        RefusalCode::BadFrame,
        RefusalCode::DiskFull,
        RefusalCode::Storage,
        RefusalCode::Sequence,
        RefusalCode::Forbidden,
    ];

    /// The QUIC application close code that carries this refusal when the receiver ends the
    /// connection over it (a refusal met on a data stream has no control frame to ride in).
    /// 0 is a clean close, so codes start at 1.
    pub fn close_code(self) -> u32 {
        self as u32 + 1
    }

    /// The refusal a close code carries, if it carries one.
    pub fn from_close_code(code: u64) -> Option<Self> {
        let index = usize::try_from(code.checked_sub(1)?).ok()?;
        Self::ALL.get(index).copied()
    }
}

/// A frame or message that breaks the protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The length prefix is above the limit.
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge(u64),
    /// The bytes do not decode to a known message.
    #[error("frame does not decode: {0}")]
    Decode(String),
    /// Offset or length not a multiple of 512.
    #[error("range {offset}+{length} is not aligned to 512 bytes")]
    Unaligned {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
    },
    /// A range outside the volume.
    #[error("range {offset}+{length} is outside the volume of {size} bytes")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// Volume size.
        size: u64,
    },
    /// A write longer than the limit.
    #[error("write of {0} bytes is larger than the limit of {MAX_WRITE_BYTES} bytes")]
    WriteTooLarge(u64),
    /// Empty write or zero range.
    #[error("empty range")]
    Empty,
    /// Payload does not match its declared length or codec.
    #[error("payload is corrupt: {0}")]
    Payload(String),
    /// A `Welcome`'s report of an open cycle breaks its rules.
    #[error("bad open-cycle report: {0}")]
    OpenCycle(String),
    /// Frame for another cycle.
    #[error("frame for cycle {got} while cycle {open} is open")]
    WrongCycle {
        /// The frame's cycle.
        got: u64,
        /// The open cycle.
        open: u64,
    },
    /// A bad volume name.
    #[error("volume name {0:?} is invalid (1-64 of A-Z a-z 0-9 . _ -, not starting with '.')")]
    VolumeName(String),
    /// A bad hello.
    #[error("{0}")]
    Hello(String),
}

/// Encodes `message` as one frame (length prefix included), in one allocation of the right
/// size: a data frame's payload is copied once, into the frame.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let len =
        postcard::experimental::serialized_size(message).expect("serializing to a Vec cannot fail");
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&(len as u32).to_le_bytes());
    let frame = postcard::serialize_with_flavor(message, FrameFlavor(frame))
        .expect("serializing to a Vec cannot fail");
    debug_assert_eq!(frame.len(), 4 + len);
    frame
}

/// postcard's output appended to a frame that already holds its length prefix.
struct FrameFlavor(Vec<u8>);

impl postcard::ser_flavors::Flavor for FrameFlavor {
    type Output = Vec<u8>;

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Checks a length prefix before anything is read or allocated.
pub fn check_frame_len(len: u32) -> Result<usize, WireError> {
    if len > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(u64::from(len)));
    }
    Ok(len as usize)
}

/// Decodes one frame body (without its length prefix).
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, WireError> {
    if body.len() > MAX_FRAME_BYTES as usize {
        return Err(WireError::TooLarge(body.len() as u64));
    }
    let (message, rest) =
        postcard::take_from_bytes(body).map_err(|error| WireError::Decode(error.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Decode(format!("{} trailing bytes", rest.len())));
    }
    Ok(message)
}

/// Splits a buffer holding zero or more complete frames (and maybe a partial one) into frame
/// bodies; returns them and the number of bytes consumed. Used by the fuzz target and by tests.
pub fn split_frames(buffer: &[u8]) -> Result<(Vec<&[u8]>, usize), WireError> {
    let mut frames = Vec::new();
    let mut at = 0;
    while buffer.len() - at >= 4 {
        let len = u32::from_le_bytes(buffer[at..at + 4].try_into().expect("4 bytes"));
        let len = check_frame_len(len)?;
        if buffer.len() - at - 4 < len {
            break;
        }
        frames.push(&buffer[at + 4..at + 4 + len]);
        at += 4 + len;
    }
    Ok((frames, at))
}

/// Checks a volume name: it becomes a directory name on the receiver.
pub fn check_volume_name(name: &str) -> Result<(), WireError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_VOLUME_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(WireError::VolumeName(name.chars().take(80).collect()))
    }
}

/// Checks a hello's fields (not the grant: that is the receiver's policy).
pub fn check_hello(hello: &Hello) -> Result<(), WireError> {
    check_volume_name(&hello.volume)?;
    if hello.source_id.is_empty() || hello.source_id.len() > MAX_SOURCE_ID {
        return Err(WireError::Hello(format!(
            "source id must be 1-{MAX_SOURCE_ID} bytes"
        )));
    }
    // It is written to logs, the audit log and volume.json: printable characters only, so an
    // agent cannot forge log lines or terminal escapes.
    if hello.source_id.chars().any(char::is_control) {
        return Err(WireError::Hello(format!(
            "source id {:?} holds control characters",
            hello.source_id.chars().take(80).collect::<String>()
        )));
    }
    if !hello.chunk_bytes.is_power_of_two()
        || !(4096..=u64::from(MAX_WRITE_BYTES)).contains(&hello.chunk_bytes)
    {
        return Err(WireError::Hello(format!(
            "chunk size {} is not a power of two between 4 KiB and 1 MiB",
            hello.chunk_bytes
        )));
    }
    if hello.size_bytes == 0 || !hello.size_bytes.is_multiple_of(512) || hello.size_bytes > 1 << 56
    {
        return Err(WireError::Hello(format!(
            "volume size {} is not a positive multiple of 512 below 2^56",
            hello.size_bytes
        )));
    }
    Ok(())
}

/// Checks a byte range against a volume of `size` bytes.
pub fn check_range(offset: u64, length: u64, size: u64) -> Result<(), WireError> {
    if length == 0 {
        return Err(WireError::Empty);
    }
    if !offset.is_multiple_of(512) || !length.is_multiple_of(512) {
        return Err(WireError::Unaligned { offset, length });
    }
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(WireError::OutOfRange {
            offset,
            length,
            size,
        }),
    }
}

/// A data frame after checking and decoding: what the journal stores.
#[derive(Debug, PartialEq, Eq)]
pub enum CheckedData {
    /// Decoded bytes at an offset.
    Write {
        /// Offset.
        offset: u64,
        /// Decoded bytes.
        data: Vec<u8>,
    },
    /// A zero range.
    Zero {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
    },
}

/// Checks a data frame against the open cycle and the volume size, and decodes its payload
/// (decompression is bounded by the declared length).
pub fn check_data_frame(
    frame: DataFrame,
    open_seq: u64,
    size: u64,
) -> Result<CheckedData, WireError> {
    match frame {
        DataFrame::Write {
            seq,
            offset,
            codec,
            raw_len,
            data,
        } => {
            if seq != open_seq {
                return Err(WireError::WrongCycle {
                    got: seq,
                    open: open_seq,
                });
            }
            if raw_len > MAX_WRITE_BYTES {
                return Err(WireError::WriteTooLarge(u64::from(raw_len)));
            }
            check_range(offset, u64::from(raw_len), size)?;
            let data = match codec {
                Codec::Raw => data,
                Codec::Zstd => zstd::bulk::decompress(&data, raw_len as usize)
                    .map_err(|error| WireError::Payload(format!("zstd: {error}")))?,
            };
            if data.len() != raw_len as usize {
                return Err(WireError::Payload(format!(
                    "{} bytes where {raw_len} were declared",
                    data.len()
                )));
            }
            Ok(CheckedData::Write { offset, data })
        }
        DataFrame::Zero {
            seq,
            offset,
            length,
        } => {
            if seq != open_seq {
                return Err(WireError::WrongCycle {
                    got: seq,
                    open: open_seq,
                });
            }
            check_range(offset, length, size)?;
            Ok(CheckedData::Zero { offset, length })
        }
    }
}

/// Checks a hash request against a volume of `chunks` chunks.
pub fn check_hash_request(first_chunk: u64, count: u32, chunks: u64) -> Result<(), WireError> {
    if count == 0 || count > MAX_HASHES_PER_REQUEST {
        return Err(WireError::Hello(format!(
            "hash request for {count} chunks (1-{MAX_HASHES_PER_REQUEST} allowed)"
        )));
    }
    match first_chunk.checked_add(u64::from(count)) {
        Some(end) if end <= chunks => Ok(()),
        _ => Err(WireError::OutOfRange {
            offset: first_chunk,
            length: u64::from(count),
            size: chunks,
        }),
    }
}

/// The hash of a chunk's content.
pub fn chunk_hash(data: &[u8]) -> ChunkHash {
    *blake3::hash(data).as_bytes()
}

/// Whether `data` is all zeros.
pub fn is_zero(data: &[u8]) -> bool {
    // Block by block: each block is one vectorized OR of its words, and data that is not zero
    // (most of what a sync reads) is told by its first block, not after the whole chunk.
    data.chunks(256).all(|block| {
        let words = block.chunks_exact(8);
        let tail = words.remainder();
        words
            .map(|word| u64::from_ne_bytes(word.try_into().expect("8 bytes")))
            .fold(0, |acc, word| acc | word)
            == 0
            && tail.iter().all(|&b| b == 0)
    })
}

/// The receiver's whole decoding path for untrusted bytes, for the fuzzer and the corpus replay
/// test: split into frames, decode each as every message type, and check data frames against a
/// small volume. Must never panic, whatever `bytes` holds.
pub fn fuzz_decode(bytes: &[u8]) {
    let Ok((bodies, _)) = split_frames(bytes) else {
        return;
    };
    for body in bodies {
        if let Ok(AgentMessage::Hello(hello)) = decode::<AgentMessage>(body) {
            let _ = check_hello(&hello);
        }
        if let Ok(AgentMessage::HashRequest { first_chunk, count }) = decode::<AgentMessage>(body) {
            let _ = check_hash_request(first_chunk, count, 1 << 14);
        }
        if let Ok(ReceiverMessage::Welcome(Welcome {
            open_cycle: Some(open),
            ..
        })) = decode::<ReceiverMessage>(body)
        {
            let _ = open.check(1 << 30);
        }
        if let Ok(frame) = decode::<DataFrame>(body) {
            let _ = check_data_frame(frame, 1, 1 << 30);
        }
        crate::failback::fuzz_check(body);
    }
}

/// Well-formed frames of every kind, to seed the fuzzer's corpus.
pub fn corpus_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        volume: "vol".into(),
        source_id: "loop:/var/tmp/disk.img".into(),
        size_bytes: 1 << 30,
        chunk_bytes: 65536,
    };
    let packed = zstd::bulk::compress(&[7u8; 4096], 1).expect("zstd");
    vec![
        ("hello", encode(&AgentMessage::Hello(hello))),
        (
            "hash-request",
            encode(&AgentMessage::HashRequest {
                first_chunk: 3,
                count: 16,
            }),
        ),
        (
            "begin",
            encode(&AgentMessage::Begin(Begin {
                seq: 1,
                bytes_estimate: 1 << 20,
                direct: false,
                from: 0,
            })),
        ),
        ("flush", encode(&AgentMessage::Flush { frames: 9 })),
        ("resume", encode(&AgentMessage::Resume { seq: 4 })),
        (
            "welcome-open-cycle",
            encode(&ReceiverMessage::Welcome(Welcome {
                protocol: PROTOCOL_VERSION,
                new_volume: false,
                committed_seq: 3,
                last_point: None,
                history: true,
                open_cycle: Some(OpenCycleReport {
                    seq: 4,
                    frames: 17,
                    journaled: vec![(0, 1 << 20), (4 << 20, 65536)],
                }),
                term: 2,
                failback_term: 0,
            })),
        ),
        (
            "commit",
            encode(&AgentMessage::Commit {
                frames: 2,
                point: PointInfo {
                    seq: 1,
                    complete: true,
                    consistent: true,
                    group_cut: Some(1_795_690_476_603),
                    ..PointInfo::default()
                },
            }),
        ),
        (
            "write-raw",
            encode(&DataFrame::Write {
                seq: 1,
                offset: 65536,
                codec: Codec::Raw,
                raw_len: 512,
                data: vec![0xab; 512],
            }),
        ),
        (
            "write-zstd",
            encode(&DataFrame::Write {
                seq: 1,
                offset: 0,
                codec: Codec::Zstd,
                raw_len: 4096,
                data: packed,
            }),
        ),
        (
            "zero",
            encode(&DataFrame::Zero {
                seq: 1,
                offset: 1 << 20,
                length: 1 << 20,
            }),
        ),
        (
            "refused",
            encode(&ReceiverMessage::Refused {
                code: RefusalCode::BadFrame,
                message: "no".into(),
            }),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            volume: "db-1".into(),
            source_id: "loop:/tmp/x".into(),
            size_bytes: 1 << 30,
            chunk_bytes: 65536,
        }
    }

    #[test]
    fn every_refusal_survives_a_close_code_and_other_codes_carry_none() {
        for code in RefusalCode::ALL {
            assert_eq!(
                RefusalCode::from_close_code(code.close_code().into()),
                Some(code)
            );
        }
        for other in [0, u64::from(CLOSE_ADMISSION), 9, u64::MAX] {
            assert_eq!(RefusalCode::from_close_code(other), None, "{other}");
        }
    }

    #[test]
    fn an_open_cycle_report_is_checked_against_the_volume() {
        let report = |journaled: Vec<(u64, u64)>| OpenCycleReport {
            seq: 2,
            frames: 1,
            journaled,
        };
        assert!(report(vec![]).check(4096).is_ok());
        assert!(
            report(vec![(0, 512), (512, 512), (2048, 2048)])
                .check(4096)
                .is_ok()
        );
        for bad in [
            vec![(0, 0)],
            vec![(0, 8192)],
            vec![(u64::MAX, 2)],
            vec![(1024, 512), (0, 512)],
            vec![(0, 1024), (512, 512)],
        ] {
            let error = report(bad.clone()).check(4096).unwrap_err();
            assert!(matches!(error, WireError::OpenCycle(_)), "{bad:?}: {error}");
        }
        let many = report(
            (0..=MAX_RESUME_RANGES as u64)
                .map(|i| (i * 1024, 512))
                .collect(),
        );
        assert!(many.check(u64::MAX).is_err());
    }

    proptest! {
        /// The sender's borrowed frames are the receiver's frames, byte for byte.
        #[test]
        fn a_borrowed_frame_encodes_as_the_owned_one(
            seq: u64,
            offset: u64,
            length: u64,
            raw_len: u32,
            zstd: bool,
            data in proptest::collection::vec(any::<u8>(), 0..3000),
        ) {
            let codec = if zstd { Codec::Zstd } else { Codec::Raw };
            let frames = [
                DataFrameRef::Write { seq, offset, codec, raw_len, data: &data },
                DataFrameRef::Zero { seq, offset, length },
            ];
            for frame in frames {
                let encoded = encode(&frame);
                prop_assert_eq!(&encoded, &encode(&frame.to_owned()));
                prop_assert_eq!(decode::<DataFrame>(&encoded[4..]).unwrap(), frame.to_owned());
            }
        }
    }

    #[test]
    fn messages_round_trip() {
        let message = AgentMessage::Hello(hello());
        let frame = encode(&message);
        let (bodies, used) = split_frames(&frame).unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(decode::<AgentMessage>(bodies[0]).unwrap(), message);
    }

    #[test]
    fn oversized_length_is_rejected_before_reading() {
        let mut frame = (MAX_FRAME_BYTES + 1).to_le_bytes().to_vec();
        frame.extend_from_slice(&[0; 16]);
        assert_eq!(
            split_frames(&frame).unwrap_err(),
            WireError::TooLarge(u64::from(MAX_FRAME_BYTES) + 1)
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut body = postcard::to_stdvec(&AgentMessage::Flush { frames: 3 }).unwrap();
        body.push(0);
        assert!(matches!(
            decode::<AgentMessage>(&body),
            Err(WireError::Decode(_))
        ));
    }

    #[test]
    fn volume_names() {
        for good in ["a", "db-1", "vol_2.img", &"x".repeat(64)] {
            check_volume_name(good).unwrap();
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "ü", &"x".repeat(65)] {
            assert!(check_volume_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hello_limits() {
        check_hello(&hello()).unwrap();
        // Finding 14 of the hardening issue: the source id is echoed into logs and files.
        for forged in [
            "loop:/x\nblkmirror receiver: forged",
            "a\u{1b}[2Jb",
            "nul\0",
        ] {
            let mut bad = hello();
            bad.source_id = forged.into();
            let error = check_hello(&bad).unwrap_err().to_string();
            assert!(error.contains("control characters"), "{error}");
        }
        let mut unicode = hello();
        unicode.source_id = "loop:/var/tmp/disque-é.img".into();
        check_hello(&unicode).unwrap();
        let mut bad = hello();
        bad.chunk_bytes = 3000;
        assert!(check_hello(&bad).is_err());
        let mut bad = hello();
        bad.size_bytes = 1000;
        assert!(check_hello(&bad).is_err());
        let mut bad = hello();
        bad.source_id = String::new();
        assert!(check_hello(&bad).is_err());
    }

    #[test]
    fn data_frames_are_checked_against_cycle_and_size() {
        let size = 1 << 20;
        let write = |seq, offset, raw_len: u32, data: Vec<u8>| DataFrame::Write {
            seq,
            offset,
            codec: Codec::Raw,
            raw_len,
            data,
        };
        assert!(check_data_frame(write(1, 0, 512, vec![1; 512]), 1, size).is_ok());
        assert!(matches!(
            check_data_frame(write(2, 0, 512, vec![1; 512]), 1, size),
            Err(WireError::WrongCycle { .. })
        ));
        assert!(matches!(
            check_data_frame(write(1, size - 512, 1024, vec![1; 1024]), 1, size),
            Err(WireError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_data_frame(write(1, u64::MAX - 511, 512, vec![1; 512]), 1, size),
            Err(WireError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_data_frame(write(1, 100, 512, vec![1; 512]), 1, size),
            Err(WireError::Unaligned { .. })
        ));
        assert!(matches!(
            check_data_frame(write(1, 0, 1024, vec![1; 512]), 1, size),
            Err(WireError::Payload(_))
        ));
        let zero = DataFrame::Zero {
            seq: 1,
            offset: 0,
            length: 0,
        };
        assert_eq!(check_data_frame(zero, 1, size), Err(WireError::Empty));
    }

    #[test]
    fn zstd_payload_is_bounded_by_declared_length() {
        let data = vec![7u8; 8192];
        let packed = zstd::bulk::compress(&data, 1).unwrap();
        let frame = |raw_len| DataFrame::Write {
            seq: 1,
            offset: 0,
            codec: Codec::Zstd,
            raw_len,
            data: packed.clone(),
        };
        assert_eq!(
            check_data_frame(frame(8192), 1, 1 << 20).unwrap(),
            CheckedData::Write { offset: 0, data }
        );
        // Declared shorter than the real content: decompression refuses to grow past it.
        assert!(check_data_frame(frame(4096), 1, 1 << 20).is_err());
    }

    /// Replays the fuzzer's committed corpus (`fuzz/corpus/frame_decoder`), and checks that the
    /// seeds there are the current encoding of [`corpus_seeds`].
    #[test]
    fn fuzz_corpus_replays_without_panics() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_decoder");
        let mut replayed = 0;
        for entry in std::fs::read_dir(&dir).expect("the fuzz corpus is committed") {
            let bytes = std::fs::read(entry.expect("entry").path()).expect("corpus file");
            fuzz_decode(&bytes);
            replayed += 1;
        }
        for (name, bytes) in corpus_seeds() {
            let committed = std::fs::read(dir.join(format!("seed-{name}"))).unwrap_or_else(|e| {
                panic!("seed-{name} missing ({e}): run `cargo xtask fuzz --seeds`")
            });
            assert_eq!(
                committed, bytes,
                "seed-{name} is stale: run `cargo xtask fuzz --seeds`"
            );
        }
        assert!(replayed >= corpus_seeds().len());
    }

    /// Writes the seeds into the corpus directory (`cargo xtask fuzz --seeds`).
    #[test]
    #[ignore = "writes into the source tree; run by `cargo xtask fuzz --seeds`"]
    fn write_fuzz_seeds() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_decoder");
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (name, bytes) in corpus_seeds()
            .into_iter()
            .chain(crate::failback::corpus_seeds())
        {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed");
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 4099]));
        let mut data = vec![0u8; 4099];
        data[4098] = 1;
        assert!(!is_zero(&data));
        data[4098] = 0;
        data[1] = 1;
        assert!(!is_zero(&data));
        // A set byte in every position of the blocks, their tails and the last short block.
        for at in [0, 255, 256, 511, 4095, 4096] {
            let mut data = vec![0u8; 4099];
            data[at] = 0x80;
            assert!(!is_zero(&data), "byte {at}");
        }
        assert!(is_zero(&[]));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok((bodies, _)) = split_frames(&bytes) {
                for body in bodies {
                    let _ = decode::<AgentMessage>(body);
                    if let Ok(frame) = decode::<DataFrame>(body) {
                        let _ = check_data_frame(frame, 1, 1 << 30);
                    }
                }
            }
            let _ = decode::<DataFrame>(&bytes);
            let _ = decode::<ReceiverMessage>(&bytes);
        }

        #[test]
        fn data_frames_round_trip(offset in 0u64..1 << 40, len in 1u32..8, seq: u64) {
            let frame = DataFrame::Write {
                seq, offset: offset * 512, codec: Codec::Raw, raw_len: len * 512,
                data: vec![3; (len * 512) as usize],
            };
            let encoded = encode(&frame);
            let (bodies, _) = split_frames(&encoded).unwrap();
            prop_assert_eq!(decode::<DataFrame>(bodies[0]).unwrap(), frame);
        }
    }
}
