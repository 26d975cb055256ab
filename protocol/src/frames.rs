//! How the chunks a pass reads become data frames: what is skipped because the replica holds
//! it already, what becomes a zero range, and what is compressed. Pure: the agent's reader
//! hands each piece it read to [`FrameBuilder::piece`] and sends what comes out.

use crate::{
    plan::CompressionPolicy,
    wire::{self, ChunkHash, Codec, DataFrameRef},
};

/// The longest run of chunks one write frame carries (within [`wire::MAX_WRITE_BYTES`]).
pub const MAX_WRITE_RUN: usize = 256 << 10;

/// What the replica is known to hold, to skip what need not be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// Nothing is known: send every chunk (all-zero chunks as zero ranges).
    Nothing,
    /// The replica is all zeros (a new volume): skip all-zero chunks.
    ZeroReplica,
    /// The replica's chunk hashes from `first_chunk` on.
    Hashes {
        /// The first chunk the hashes describe.
        first_chunk: u64,
        /// One per chunk.
        hashes: Vec<ChunkHash>,
    },
}

/// Counts of what a pass produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FrameStats {
    /// Frames produced.
    pub frames: u64,
    /// Bytes read from the device.
    pub read_bytes: u64,
    /// Bytes sent as data (before compression).
    pub data_bytes: u64,
    /// Bytes sent as zero ranges.
    pub zero_bytes: u64,
    /// Bytes skipped because the replica holds them already.
    pub same_bytes: u64,
}

/// Turns the pieces of one pass into frames for cycle `seq`.
pub struct FrameBuilder<'a> {
    seq: u64,
    chunk: u64,
    compare: &'a Compare,
    /// Compression, with its back-off; `None`: never compress.
    compression: Option<&'a mut CompressionPolicy>,
    zero_hash: ChunkHash,
    /// What was produced so far.
    pub stats: FrameStats,
}

impl<'a> FrameBuilder<'a> {
    /// A builder for cycle `seq` with chunks of `chunk` bytes.
    pub fn new(
        seq: u64,
        chunk: u64,
        compare: &'a Compare,
        compression: Option<&'a mut CompressionPolicy>,
    ) -> Self {
        Self {
            seq,
            chunk,
            compare,
            compression,
            zero_hash: wire::chunk_hash(&vec![0u8; chunk as usize]),
            stats: FrameStats::default(),
        }
    }

    /// Passes the driver's measurements of a stretch of the pass to the compression policy
    /// ([`CompressionPolicy::observe`]), which may change the level. Returns the level (`None`
    /// without compression).
    pub fn observe(
        &mut self,
        elapsed: std::time::Duration,
        work: std::time::Duration,
        blocked: std::time::Duration,
        idle_cores: f64,
    ) -> Option<i32> {
        self.compression
            .as_deref_mut()
            .map(|policy| policy.observe(elapsed, work, blocked, idle_cores))
    }

    /// A zero range known without reading (a discard or write-zeroes the tracker saw).
    pub fn zero_range<E>(
        &mut self,
        offset: u64,
        length: u64,
        emit: &mut dyn FnMut(DataFrameRef<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.stats.frames += 1;
        self.stats.zero_bytes += length;
        emit(DataFrameRef::Zero {
            seq: self.seq,
            offset,
            length,
        })
    }

    fn same_as_replica(&self, at: u64, bytes: &[u8], zero: bool) -> bool {
        match self.compare {
            Compare::Nothing => false,
            Compare::ZeroReplica => zero,
            Compare::Hashes {
                first_chunk,
                hashes,
            } => {
                let replica = (at / self.chunk)
                    .checked_sub(*first_chunk)
                    .and_then(|index| hashes.get(index as usize));
                let mine = if zero && bytes.len() as u64 == self.chunk {
                    self.zero_hash
                } else {
                    wire::chunk_hash(bytes)
                };
                replica == Some(&mine)
            }
        }
    }

    /// Frames for `data`, read at device offset `offset` (chunk-aligned): chunks the replica
    /// holds are skipped, runs of all-zero chunks become one zero range, and runs of the other
    /// chunks become writes of up to [`MAX_WRITE_RUN`] bytes, compressed as one unit when that
    /// pays (zstd finds more to share in a run than in one chunk, and a run is one frame).
    pub fn piece<E>(
        &mut self,
        offset: u64,
        data: &[u8],
        emit: &mut dyn FnMut(DataFrameRef<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.stats.read_bytes += data.len() as u64;
        let chunk = self.chunk as usize;
        let longest_run = (MAX_WRITE_RUN / chunk).max(1) * chunk;
        let mut zero_run: Option<(u64, u64)> = None;
        // A run of chunks to write: its start within `data`, and its end.
        let mut write_run: Option<(usize, usize)> = None;
        for (index, bytes) in data.chunks(chunk).enumerate() {
            let start = index * chunk;
            let at = offset + start as u64;
            let len = bytes.len() as u64;
            let zero = wire::is_zero(bytes);
            let same = self.same_as_replica(at, bytes, zero);
            if same {
                self.stats.same_bytes += len;
            }
            let write = !same && !zero;
            // A zero run ends at a chunk that is not sent as zeros.
            if (same || !zero)
                && let Some((run_at, run)) = zero_run.take()
            {
                self.zero_range(run_at, run, emit)?;
            }
            // A write run ends at a chunk that is not written, or when it is as long as a
            // frame may be.
            if let Some((run_start, run_end)) = write_run
                && (!write || run_end - run_start + bytes.len() > longest_run)
            {
                write_run = None;
                self.write(offset + run_start as u64, &data[run_start..run_end], emit)?;
            }
            if write {
                write_run = Some(match write_run {
                    Some((run_start, _)) => (run_start, start + bytes.len()),
                    None => (start, start + bytes.len()),
                });
            } else if zero && !same {
                zero_run = Some(match zero_run {
                    Some((run_at, run)) => (run_at, run + len),
                    None => (at, len),
                });
            }
        }
        if let Some((run_start, run_end)) = write_run {
            self.write(offset + run_start as u64, &data[run_start..run_end], emit)?;
        }
        if let Some((run_at, run)) = zero_run {
            self.zero_range(run_at, run, emit)?;
        }
        Ok(())
    }

    /// One write frame for `bytes` at `at`, compressed where that pays.
    fn write<E>(
        &mut self,
        at: u64,
        bytes: &[u8],
        emit: &mut dyn FnMut(DataFrameRef<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut packed = None;
        if let Some(policy) = self.compression.as_deref_mut()
            && policy.should_try(bytes.len())
        {
            packed = zstd::bulk::compress(bytes, policy.level())
                .ok()
                .filter(|packed| policy.record(bytes.len(), packed.len()));
        }
        let (codec, payload) = match &packed {
            Some(packed) => (Codec::Zstd, packed.as_slice()),
            None => (Codec::Raw, bytes),
        };
        self.stats.frames += 1;
        self.stats.data_bytes += bytes.len() as u64;
        emit(DataFrameRef::Write {
            seq: self.seq,
            offset: at,
            codec,
            raw_len: bytes.len() as u32,
            data: payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::DataFrame;

    const CHUNK: u64 = 4096;

    fn run(compare: &Compare, data: &[u8]) -> (Vec<DataFrame>, FrameStats) {
        let mut frames = Vec::new();
        let mut builder = FrameBuilder::new(7, CHUNK, compare, None);
        builder
            .piece::<()>(CHUNK, data, &mut |frame| {
                frames.push(frame.to_owned());
                Ok(())
            })
            .unwrap();
        (frames, builder.stats)
    }

    fn device(chunks: &[u8]) -> Vec<u8> {
        chunks
            .iter()
            .flat_map(|&fill| vec![fill; CHUNK as usize])
            .collect()
    }

    #[test]
    fn zero_chunks_merge_into_one_range_and_data_chunks_are_written() {
        let (frames, stats) = run(&Compare::Nothing, &device(&[1, 0, 0, 2]));
        assert_eq!(frames.len(), 3);
        assert!(matches!(frames[0], DataFrame::Write { offset: CHUNK, .. }));
        assert_eq!(
            frames[1],
            DataFrame::Zero {
                seq: 7,
                offset: 2 * CHUNK,
                length: 2 * CHUNK
            }
        );
        assert!(matches!(frames[2], DataFrame::Write { offset, .. } if offset == 4 * CHUNK));
        assert_eq!(stats.zero_bytes, 2 * CHUNK);
        assert_eq!(stats.data_bytes, 2 * CHUNK);
    }

    #[test]
    fn adjacent_data_chunks_travel_as_one_write_of_at_most_a_run() {
        let longest = MAX_WRITE_RUN as u64 / CHUNK;
        // 70 data chunks, then a zero, then one more: two runs (the first at the limit), a
        // zero range and a one-chunk write.
        let mut chunks = vec![3u8; 70];
        chunks.extend([0, 4]);
        let (frames, stats) = run(&Compare::Nothing, &device(&chunks));
        let shape: Vec<(u64, u64, bool)> = frames
            .iter()
            .map(|frame| match frame {
                DataFrame::Write {
                    offset, raw_len, ..
                } => (offset / CHUNK, u64::from(*raw_len) / CHUNK, true),
                DataFrame::Zero { offset, length, .. } => (offset / CHUNK, length / CHUNK, false),
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (1, longest, true),
                (1 + longest, 70 - longest, true),
                (71, 1, false),
                (72, 1, true)
            ]
        );
        assert_eq!(stats.frames, 4);
        assert_eq!(stats.data_bytes, 71 * CHUNK);
        // Every frame decodes to what was read.
        let data = device(&chunks);
        for frame in frames {
            if let wire::CheckedData::Write { offset, data: got } =
                wire::check_data_frame(frame, 7, 1 << 30).unwrap()
            {
                let at = (offset - CHUNK) as usize;
                assert_eq!(got, data[at..at + got.len()]);
            }
        }
    }

    #[test]
    fn what_the_replica_holds_is_skipped() {
        let data = device(&[1, 0, 2]);
        let hashes = data
            .chunks(CHUNK as usize)
            .map(wire::chunk_hash)
            .collect::<Vec<_>>();
        let mut changed = hashes.clone();
        changed[2] = [9; 32];
        let compare = Compare::Hashes {
            first_chunk: 1,
            hashes: changed,
        };
        let (frames, stats) = run(&compare, &data);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert!(matches!(frames[0], DataFrame::Write { offset, .. } if offset == 3 * CHUNK));
        assert_eq!(stats.same_bytes, 2 * CHUNK);
        // A new volume: zeros are not sent at all.
        let (frames, _) = run(&Compare::ZeroReplica, &device(&[0, 3, 0]));
        assert_eq!(frames.len(), 1);
        // Hashes that do not cover a chunk never make it "the same".
        let short = Compare::Hashes {
            first_chunk: 5,
            hashes: hashes.clone(),
        };
        assert_eq!(run(&short, &data).0.len(), 3);
    }

    #[test]
    fn compressible_chunks_are_compressed_and_decode_back() {
        let mut policy = CompressionPolicy::default();
        let compare = Compare::Nothing;
        let mut builder = FrameBuilder::new(1, CHUNK, &compare, Some(&mut policy));
        let data = device(&[5]);
        let mut frames = Vec::new();
        builder
            .piece::<()>(0, &data, &mut |frame| {
                frames.push(frame.to_owned());
                Ok(())
            })
            .unwrap();
        let DataFrame::Write { codec, .. } = &frames[0] else {
            panic!("{frames:?}")
        };
        assert_eq!(*codec, Codec::Zstd);
        let checked = wire::check_data_frame(frames.remove(0), 1, 1 << 20).unwrap();
        assert_eq!(checked, wire::CheckedData::Write { offset: 0, data });
    }
}
