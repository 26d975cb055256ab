//! Entry points for the fuzz targets (`fuzz/fuzz_targets/`, run by `cargo xtask fuzz`): every
//! parser of untrusted or damaged input on the receiver, and whole sequences of receiver
//! operations. Each must never panic, whatever the bytes; the session target also checks that
//! no sequence of operations changes a committed point.
//!
//! The committed corpora (`fuzz/corpus/TARGET/`) are replayed by this module's tests, and the
//! same tests feed each entry point random inputs (proptest), so CI exercises them without
//! libFuzzer.

use std::{collections::BTreeMap, path::Path};

use crate::{
    command::config,
    dr::audit::AuditLog,
    dr::nbd,
    dr::volume::{self, Volume},
};
use blkmirror_protocol::wire::{self, CheckedData, DataFrame, Hello, PROTOCOL_VERSION, PointInfo};

/// The names of the fuzz targets beside `frame_decoder` (one corpus folder each).
pub const TARGETS: [&str; 8] = [
    "journal_recovery",
    "volume_meta",
    "overlay_map",
    "audit_log",
    "config",
    "receiver_session",
    "nbd_session",
    "store_layout",
];

/// The journal recovery parsers on arbitrary bytes (a torn or corrupted journal): the commit
/// scan, and the scan a restarted receiver keeps an open cycle by, whose finding must stay
/// within the bytes and the volume.
pub fn journal_recovery(bytes: &[u8]) {
    for committed in [0, 1, u64::MAX] {
        let _ = volume::scan_records(bytes, committed);
        if let Some(open) = volume::scan_open_cycle(bytes, committed, 1 << 20) {
            assert!(open.whole_bytes <= bytes.len() as u64);
            assert!(open.frames > 0 || open.journaled.ranges().next().is_none());
            assert!(open.journaled.ranges().all(|(_, end)| end <= 1 << 20));
        }
    }
}

/// `volume.json` on arbitrary text.
pub fn volume_meta(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = volume::parse_meta(text);
    }
}

/// A promoted export's overlay map (`VOLUME/promoted-export/overlay.map`) on arbitrary
/// bytes: for the geometry the bytes claim (so the checksum and geometry checks are passed by
/// the seeds) and for fixed ones.
pub fn overlay_map(bytes: &[u8]) {
    let field = |at: usize| {
        bytes
            .get(at..at + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let claimed = (field(8), field(16).max(1));
    for (size, chunk_bytes) in [claimed, (1 << 20, 65536), (0, 4096), (u64::MAX, 1)] {
        if let Ok(words) = crate::dr::export::decode_overlay_map(bytes, size, chunk_bytes) {
            assert_eq!(words.len() as u64, size.div_ceil(chunk_bytes).div_ceil(64));
        }
    }
}

/// The object store's decoders (`dr::layout`) on arbitrary bytes: a manifest, a pack index, and
/// a whole pack. What decodes must encode back to the same bytes (nothing is accepted that the
/// writer could not have written), and a decoded index must lie inside its pack.
pub fn store_layout(bytes: &[u8]) {
    use crate::dr::layout;
    if let Ok(manifest) = layout::decode_manifest(bytes) {
        assert_eq!(layout::encode_manifest(&manifest), bytes);
    }
    if let Ok(index) = layout::decode_index(bytes, None) {
        assert_eq!(layout::encode_index(&index), bytes);
    }
    // The store's shared grants record: what decodes encodes back to a record that decodes
    // the same.
    if let Ok(record) = crate::dr::grantstore::GrantsRecord::decode(bytes) {
        let again = crate::dr::grantstore::GrantsRecord::decode(&record.encode())
            .expect("an encoded record decodes");
        assert_eq!(again, record);
    }
    if let Ok(index) = layout::index_of_pack(bytes) {
        for entry in &index {
            let start = entry.offset as usize;
            let stored = &bytes[start..start + entry.stored_len as usize];
            let _ = layout::chunk_from_stored(stored, entry, &layout::Sealing::plain());
            let _ = layout::chunk_from_stored(stored, entry, &fuzz_sealing());
        }
    }
}

/// An encrypted store's sealing, for the decoders (a fixed key).
fn fuzz_sealing() -> crate::dr::layout::Sealing {
    crate::dr::layout::Sealing::encrypted(&[7; 32])
}

/// A disk in memory for the NBD target: 1 MiB, writable.
struct MemoryDisk(std::sync::Mutex<Vec<u8>>);

impl nbd::Backend for MemoryDisk {
    fn size(&self) -> u64 {
        self.0.lock().expect("not poisoned").len() as u64
    }
    fn writable(&self) -> bool {
        true
    }
    fn preferred_block(&self) -> u32 {
        4096
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let disk = self.0.lock().expect("not poisoned");
        buf.copy_from_slice(&disk[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let mut disk = self.0.lock().expect("not poisoned");
        disk[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A client's bytes in, the server's out (discarded).
struct ClientBytes<'a>(&'a [u8]);

impl std::io::Read for ClientBytes<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for ClientBytes<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The NBD server (`blkmirror export`) on an arbitrary client byte stream: it must never
/// panic, never touch the disk outside its bounds (the in-memory disk would panic), and
/// never allocate more than its bounds allow.
pub fn nbd_session(bytes: &[u8]) {
    let disk = MemoryDisk(std::sync::Mutex::new(vec![0; 1 << 20]));
    let _ = nbd::serve(&mut ClientBytes(bytes), "vol", &disk);
}

/// The audit-log reader on arbitrary text; the first line is taken as the head file.
pub fn audit_log(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let log = AuditLog::at(Path::new("/nonexistent/audit.log"));
    let (head, body) = text.split_once('\n').unwrap_or((text, ""));
    let _ = log.verify_text(body, Some(head));
    let _ = log.verify_text(text, None);
    // The same text as a block of the store's shared chain, and as a receiver's log compared
    // with a chain.
    let mut chain = crate::dr::auditchain::ChainVerifier::default();
    if chain.add(1, bytes).is_ok() {
        let report = chain.report();
        assert_eq!(report.blocks, 1);
        let _ = crate::dr::auditchain::compare_local(&report, body);
    }
    // The same text as the report of a `store audit --checkpoint` file: a verifier resumed
    // from it takes the next block or refuses it.
    if let Ok(report) = serde_json::from_str::<crate::dr::auditchain::ChainReport>(text)
        && let Ok(mut resumed) = crate::dr::auditchain::ChainVerifier::resume(&report)
    {
        let _ = resumed.add(report.blocks.saturating_add(1), bytes);
        let _ = resumed.add(report.blocks.saturating_add(1), body.as_bytes());
    }
    // The same bytes as a segment of blocks: what decodes holds each number of its name once,
    // in order, and no more bytes than the segment.
    for (first, last) in [(1, 1), (1, 3), (5, 9)] {
        if let Ok(blocks) = crate::dr::auditchain::decode_segment(first, last, bytes) {
            assert!(blocks.iter().map(|(n, _)| *n).eq(first..=last));
            assert!(blocks.iter().map(|(_, b)| b.len()).sum::<usize>() <= bytes.len());
        }
    }
}

/// Both configuration parsers on arbitrary text.
pub fn config(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let path = Path::new("fuzz.toml");
        let _ = config::agent_from_str(path, text);
        let _ = config::receiver_from_str(path, text);
    }
}

const SESSION_SIZE: u64 = 256 * 1024;
const SESSION_CHUNK: u64 = 4096;

/// A sequence of receiver operations decoded from `bytes` (begin, data frames checked as the
/// receiver checks them, commit, abort, crash and reopen) against a real volume in a temporary
/// directory. After every operation, every retained point must read back exactly as it was
/// committed: whatever an agent sends, it cannot change one.
pub fn receiver_session(bytes: &[u8]) {
    // Not shared with other inputs: each run starts from a new volume.
    let dir = crate::testing::TempDir::new("fuzz-session");
    let Ok((mut volume, _, _)) = Volume::open_or_create(&dir.0, &session_hello()) else {
        return;
    };
    // The image the open cycle leads to (journaled cycles), and every committed point's image.
    let mut image = vec![0u8; SESSION_SIZE as usize];
    let mut pending: Option<(u64, bool, Vec<u8>)> = None;
    let mut committed: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut input = bytes.iter().copied();
    let mut next = move || input.next();
    while let Some(op) = next() {
        let arg = |next: &mut dyn FnMut() -> Option<u8>| u64::from(next().unwrap_or(0));
        match op % 6 {
            0 => {
                let seq = volume.meta().committed_seq + arg(&mut next) % 3;
                let direct = arg(&mut next) % 2 == 0;
                let from = arg(&mut next) * SESSION_CHUNK;
                if volume.begin(seq, 0, direct, from).is_ok() {
                    pending = Some((seq, direct, image.clone()));
                } else {
                    pending = None;
                }
            }
            1 | 2 => {
                let Some((seq, direct, next_image)) = pending.as_mut() else {
                    continue;
                };
                let offset = arg(&mut next) * 2048;
                let length = (arg(&mut next) + 1) * 512;
                let byte = next().unwrap_or(1);
                let frame = if op % 6 == 1 {
                    DataFrame::Write {
                        seq: *seq,
                        offset,
                        codec: wire::Codec::Raw,
                        raw_len: length as u32,
                        data: vec![byte; length as usize],
                    }
                } else {
                    DataFrame::Zero {
                        seq: *seq,
                        offset,
                        length: length * 64,
                    }
                };
                let Ok(checked) = wire::check_data_frame(frame, *seq, SESSION_SIZE) else {
                    continue;
                };
                let range = match &checked {
                    CheckedData::Write { offset, data } => {
                        (*offset as usize, *offset as usize + data.len(), byte)
                    }
                    CheckedData::Zero { offset, length } => {
                        (*offset as usize, (*offset + *length) as usize, 0)
                    }
                };
                if volume.journal(checked).is_err() {
                    pending = None;
                    continue;
                }
                next_image[range.0..range.1].fill(range.2);
                if *direct {
                    // Written straight into the image: no point covers it yet.
                    image[range.0..range.1].fill(range.2);
                }
            }
            3 => {
                let complete = arg(&mut next) % 2 == 0;
                let point = PointInfo {
                    complete,
                    time_unix_ms: arg(&mut next) << 40,
                    ..PointInfo::default()
                };
                if let Some((seq, _, next_image)) = pending.take()
                    && volume.commit(point).is_ok()
                {
                    image = next_image;
                    if volume.meta().points.last().is_some_and(|p| p.seq == seq) {
                        committed.insert(seq, image.clone());
                    }
                }
            }
            4 => {
                volume.abort();
                pending = None;
            }
            _ => {
                // A crash: the open cycle's bookkeeping is lost.
                drop(volume);
                let Ok((reopened, _)) = Volume::open(&dir.0, "v") else {
                    panic!("a volume no longer opens after a crash");
                };
                volume = reopened;
                pending = None;
            }
        }
        check_points(&dir.0, &volume, &committed);
    }
}

fn session_hello() -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        volume: "v".into(),
        source_id: "fuzz:source".into(),
        size_bytes: SESSION_SIZE,
        chunk_bytes: SESSION_CHUNK,
    }
}

/// Every retained point reads back as committed.
fn check_points(dir: &Path, volume: &Volume, committed: &BTreeMap<u64, Vec<u8>>) {
    if volume.meta().unsettled {
        return;
    }
    let kept: Vec<u64> = volume.meta().points.iter().map(|p| p.seq).collect();
    let reader = volume::PointReader::open(dir, "v").expect("points reader");
    for seq in kept {
        let Some(expected) = committed.get(&seq) else {
            panic!("point {seq} is listed but was never committed as complete");
        };
        let mut got = vec![0u8; SESSION_SIZE as usize];
        let bad = reader
            .read_point(seq, true, |offset, data| {
                if let Some(data) = data {
                    got[offset as usize..offset as usize + data.len()].copy_from_slice(data);
                }
                Ok(())
            })
            .expect("reading a point");
        assert!(bad.is_empty(), "point {seq}: corrupt chunks at {bad:?}");
        assert!(
            got == *expected,
            "point {seq} does not read back as committed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(target: &str) -> Vec<Vec<u8>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (the corpus is committed)", dir.display()))
            .map(|entry| std::fs::read(entry.expect("entry").path()).expect("corpus file"))
            .collect()
    }

    fn run(target: &str, bytes: &[u8]) {
        match target {
            "journal_recovery" => journal_recovery(bytes),
            "volume_meta" => volume_meta(bytes),
            "overlay_map" => overlay_map(bytes),
            "audit_log" => audit_log(bytes),
            "config" => config(bytes),
            "receiver_session" => receiver_session(bytes),
            "nbd_session" => nbd_session(bytes),
            "store_layout" => store_layout(bytes),
            other => panic!("unknown target {other}"),
        }
    }

    #[test]
    fn every_committed_corpus_replays_without_panics() {
        for target in TARGETS {
            let inputs = corpus(target);
            assert!(!inputs.is_empty(), "{target}: empty corpus");
            for bytes in inputs {
                run(target, &bytes);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        #[test]
        fn parsers_take_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            journal_recovery(&bytes);
            volume_meta(&bytes);
            overlay_map(&bytes);
            audit_log(&bytes);
            config(&bytes);
            nbd_session(&bytes);
            store_layout(&bytes);
        }

        #[test]
        fn no_operation_sequence_changes_a_committed_point(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..160)) {
            receiver_session(&bytes);
        }
    }

    /// Writes the seed inputs into the corpora (`cargo xtask fuzz --seeds`): real artifacts
    /// made by the real code, so the fuzzer starts from well-formed input.
    #[test]
    #[ignore = "writes into the source tree; run by `cargo xtask fuzz --seeds`"]
    fn write_fuzz_seeds() {
        use std::io::Write as _;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let write = |target: &str, name: &str, bytes: &[u8]| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).expect("corpus dir");
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed");
        };
        let tmp = crate::testing::TempDir::new("seeds");
        // A journal holding a Begin, its agent and a Write (an open cycle a restarted receiver
        // keeps), and a volume.json.
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &session_hello()).unwrap();
        volume.begin(1, 0, false, 0).unwrap();
        volume
            .commit(PointInfo {
                complete: true,
                ..PointInfo::default()
            })
            .unwrap();
        volume
            .begin_held(2, 0, false, 0, Some(&"ab".repeat(32)))
            .unwrap();
        volume
            .journal(CheckedData::Write {
                offset: 4096,
                data: vec![5; 4096],
            })
            .unwrap();
        drop(volume);
        write(
            "journal_recovery",
            "open-cycle",
            &std::fs::read(tmp.0.join("v/journal")).unwrap(),
        );
        write("journal_recovery", "empty", b"");
        write(
            "nbd_session",
            "typical",
            &nbd::client_bytes::typical_session("vol"),
        );
        write(
            "nbd_session",
            "export-name",
            &nbd::client_bytes::export_name_session("vol"),
        );
        write(
            "volume_meta",
            "volume",
            &std::fs::read(tmp.0.join("v/volume.json")).unwrap(),
        );
        // A kept overlay's map: 100 chunks of 64 KiB, chunks 0, 1, 3 and 70 written.
        write(
            "overlay_map",
            "three-words",
            &crate::dr::export::encode_overlay_map(&[0b1011, 1 << 6], 100 * 65536, 65536),
        );
        // An audit log of three entries, its head first.
        let log = AuditLog::in_dir(&tmp.0);
        for n in 0..3 {
            log.append(crate::dr::audit::Event {
                event: "commit",
                volume: Some("v".into()),
                outcome: "ok".into(),
                detail: serde_json::json!({ "seq": n }),
                ..crate::dr::audit::Event::default()
            })
            .unwrap();
        }
        let mut seed = std::fs::read(tmp.0.join("audit.head")).unwrap();
        seed.extend(std::fs::read(tmp.0.join("audit.log")).unwrap());
        write("audit_log", "three-entries", &seed);
        // The same log as block 1 of a store's shared chain.
        {
            use crate::dr::auditchain::{BlockHeader, CHAIN_FORMAT, encode_block};
            let text = std::fs::read_to_string(tmp.0.join("audit.log")).unwrap();
            let first = text.lines().next().unwrap();
            let chain = &first[first.rfind("\"hash\":\"").unwrap() + 8..first.len() - 2];
            let header = BlockHeader {
                format: CHAIN_FORMAT,
                block: 1,
                prev_block: crate::dr::audit::GENESIS.to_owned(),
                receiver: "dr-1/0123456789abcdef".into(),
                chain: chain.to_owned(),
                first_seq: 1,
                entries: 3,
            };
            let block = encode_block(&header, &text);
            assert!(crate::dr::auditchain::decode_block(1, &block).is_ok());
            write("audit_log", "chain-block", &block);
            // The report of a check of that chain, as a `store audit --checkpoint` keeps it.
            let mut verifier = crate::dr::auditchain::ChainVerifier::default();
            verifier.add(1, &block).unwrap();
            let report = serde_json::to_vec_pretty(&verifier.report()).unwrap();
            write("audit_log", "chain-checkpoint", &report);
        }
        // A grants record of the store.
        let grants =
            crate::dr::receiver::parse_grants(&[format!("{}=db,logs", "ab".repeat(32))]).unwrap();
        write(
            "store_layout",
            "grants",
            &crate::dr::grantstore::GrantsRecord::of(&grants, 3, "ops@dr-1", 1_700_000_000_000)
                .encode(),
        );
        // A pack of two chunks (one compressible), its index, and a full and a delta manifest.
        {
            use crate::dr::layout::{self, ChunkMap, PackBuilder};
            let mut pack = PackBuilder::new(1 << 20, [0; layout::PACK_SALT_BYTES]);
            let plain = layout::Sealing::plain();
            let text = pack
                .add(&b"blkmirror ".repeat(410), Some(3), &plain)
                .unwrap();
            let other = pack.add(&[7u8; 4096], None, &plain).unwrap();
            let pack = pack.finish();
            write("store_layout", "pack", &pack.bytes);
            let mut sealed = PackBuilder::new(1 << 20, [0; layout::PACK_SALT_BYTES]);
            sealed
                .add(&b"blkmirror ".repeat(410), Some(3), &fuzz_sealing())
                .unwrap();
            write("store_layout", "pack-sealed", &sealed.finish().bytes);
            write("store_layout", "index", &layout::encode_index(&pack.index));
            let point = |seq| PointInfo {
                seq,
                complete: true,
                ..PointInfo::default()
            };
            let changes = [(0, Some(text)), (3, Some(other))].into_iter().collect();
            let (full, map) =
                ChunkMap::default().next_manifest("vol", point(1), 1 << 20, 65536, &changes);
            write(
                "store_layout",
                "manifest-full",
                &layout::encode_manifest(&full),
            );
            let changes = [(0, None), (5, Some(text))].into_iter().collect();
            let (delta, _) = map.next_manifest("vol", point(2), 1 << 20, 65536, &changes);
            write(
                "store_layout",
                "manifest-delta",
                &layout::encode_manifest(&delta),
            );
        }
        // The shipped example configurations.
        let packaging = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
        for name in ["agent", "receiver"] {
            write(
                "config",
                name,
                &std::fs::read(packaging.join(format!("{name}.toml"))).unwrap(),
            );
        }
        // Sessions: an honest cycle; a direct begin after a point; a crash mid-cycle.
        let mut honest = Vec::new();
        honest
            .write_all(&[0, 1, 1, 0, 1, 2, 3, 9, 3, 0, 0])
            .unwrap();
        write("receiver_session", "honest", &honest);
        write(
            "receiver_session",
            "direct-after-point",
            &[
                0, 1, 1, 0, 1, 2, 3, 9, 3, 0, 0, 0, 1, 0, 0, 2, 0, 255, 3, 1, 0,
            ],
        );
        write(
            "receiver_session",
            "crash",
            &[0, 1, 0, 0, 1, 2, 3, 9, 5, 0, 1, 1, 0, 2, 4, 9, 3, 0, 0, 5],
        );
    }
}
