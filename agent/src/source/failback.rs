//! Failback, the returned source's side: `blkmirror failback pull`.
//!
//! The source's agent was refused after a failover (exit 6). Its pinned tracker and its state
//! file still say what this host wrote that the receiver never committed. Here those chunks
//! are sent to the DR site (`failback serve`, in `dr::failback`), which adds its own changes
//! since the promotion and the chunks committed after the promoted point, and sends back, for
//! each of them whose hash differs from ours, its content. What this host wrote after its last
//! replicated point is overwritten: those writes are discarded, as after any failover.
//!
//! Before the first byte is written, the agent state records every planned chunk as in flight
//! and the receiver's newest cycle as committed: if this process dies half-way, the DR site is
//! still primary (the roles swap only after `Written`), the agent is still refused, and the
//! next `failback pull` finds the half-written chunks in the tracker. After the swap, the
//! agent's next cycle sends the planned chunks forward, so the receiver's replica equals the
//! device again without a full sync.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::dr::failback::{FailbackReport, chunk_ranges_of, device_size, open_device, read_chunk};
use crate::dr::ops::OpsError;
use crate::link::identity::{Fingerprint, Identity};
use crate::link::net;
use crate::source::agent::{AgentState, load_state, store_state};
use crate::tracker::track::{Origin, TrackOptions, Tracker};
use blkmirror_protocol::extent::{ChangeKind, DirtyBitmaps, Extent, Geometry};
use blkmirror_protocol::failback::{
    self as plan, ChunkRange, DataCursor, FAILBACK_PROTOCOL, FailbackHello, FailbackReply,
    FailbackRequest, MAX_FAILBACK_RANGES, MAX_HASH_BATCH, PlanWalk,
};
use blkmirror_protocol::units;
use blkmirror_protocol::wire;

/// `failback pull`'s inputs.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// This host's device (the volume's original source).
    pub device: PathBuf,
    /// The volume.
    pub volume: String,
    /// The DR site's `failback serve` address.
    pub from: String,
    /// The DR site's receiver fingerprint (the agent's `--receiver-fingerprint`).
    pub receiver_fingerprint: Fingerprint,
    /// The agent's identity.
    pub identity: PathBuf,
    /// The agent's tracking state (chunk size, pins, state directory).
    pub track: TrackOptions,
}

fn say(message: impl std::fmt::Display) {
    eprintln!("blkmirror failback: {message}");
}

fn state_error(error: impl std::fmt::Display) -> OpsError {
    OpsError::State(error.to_string())
}

fn network(what: &str) -> impl FnOnce(net::NetError) -> OpsError + '_ {
    move |error| OpsError::Network(format!("{what}: {error}"))
}

/// What this host changed that the receiver never committed, or `None` with the reason said
/// when its tracking has a gap. Adds the tracker's current changes to the state's in-flight set
/// (durably) before it returns.
fn unreplicated(
    tracker: &mut Tracker,
    state: &mut AgentState,
    state_path: &Path,
    chunk_bytes: u64,
) -> Result<Option<Vec<ChunkRange>>, OpsError> {
    let mut set = inflight_bitmaps(state, tracker);
    let mut gap = None;
    if tracker.origin() != Origin::Adopted {
        gap = Some("the tracker was not running since the last replicated cycle".to_owned());
    }
    if state.needs_full_sync {
        gap = Some("the agent had a full compare due".to_owned());
    }
    // Two cuts read both epoch slots; they are released only after the state holds them.
    for _ in 0..2 {
        let cut = tracker.cut()?;
        if let Some(verify) = cut.needs_verify {
            gap = Some(verify.reason);
        }
        set.union(&cut.bitmaps);
    }
    state.inflight = extents_of(&set);
    store_state(state_path, state).map_err(state_error)?;
    tracker.release()?;
    if let Some(reason) = gap {
        say(format!(
            "this host's tracking has a gap ({reason}): every chunk is compared"
        ));
        return Ok(None);
    }
    let ranges = chunk_ranges_of(&set, chunk_bytes);
    if ranges.len() > MAX_FAILBACK_RANGES {
        say("this host changed too many separate ranges to list: every chunk is compared");
        return Ok(None);
    }
    Ok(Some(ranges))
}

fn inflight_bitmaps(state: &AgentState, tracker: &Tracker) -> DirtyBitmaps {
    let mut set = DirtyBitmaps::new(tracker.geometry());
    for &[offset, length, kind] in &state.inflight {
        set.add_extent(&Extent {
            offset,
            length,
            kind: ChangeKind::from_index(kind),
        });
    }
    set
}

fn extents_of(set: &DirtyBitmaps) -> Vec<[u64; 3]> {
    set.extents()
        .iter()
        .map(|e| [e.offset, e.length, e.kind.index()])
        .collect()
}

/// `blkmirror failback pull`: makes this device equal to the DR site's promoted device.
pub fn pull(options: &PullOptions) -> Result<FailbackReport, OpsError> {
    wire::check_volume_name(&options.volume).map_err(|error| OpsError::Usage(error.to_string()))?;
    let identity = Identity::load(&options.identity)?;
    // The tracker's lock also keeps this volume's agent out while the failback runs.
    crate::tracker::track::prepare_environment()?;
    let (mut tracker, _) = Tracker::open(&options.device, &options.track)?;
    let chunk_bytes = tracker.geometry().chunk_bytes();
    let state_path = options
        .track
        .state_dir
        .join(format!("agent-{}.json", options.volume));
    let source_id = crate::tracker::device::stable_identity(tracker.device());
    let mut state = match load_state(&state_path).map_err(state_error)? {
        Some(state) if state.source_id == source_id => state,
        Some(state) => {
            return Err(OpsError::Usage(format!(
                "{} is {source_id}, but volume {} was replicated from {} (state {}): fail back \
                 onto the original device",
                options.device.display(),
                options.volume,
                state.source_id,
                state_path.display()
            )));
        }
        None => {
            return Err(OpsError::Usage(format!(
                "no agent state for volume {} in {}: this host never replicated it (pass the \
                 agent's --state-dir)",
                options.volume,
                options.track.state_dir.display()
            )));
        }
    };
    let unreplicated = unreplicated(&mut tracker, &mut state, &state_path, chunk_bytes)?;
    let device = open_device(&options.device, true, false)?;
    let size = device_size(&device, &options.device)?;
    let runtime = crate::dr::failback::runtime()?;
    let pull = Pull {
        options,
        identity: &identity,
        device: &device,
        size,
        chunk_bytes,
        geometry: tracker.geometry(),
        state_path: &state_path,
    };
    let report = runtime.block_on(pull.run(&mut state, unreplicated))?;
    drop(tracker);
    say(format!(
        "volume {}: this host is primary again under term {}; {} of {} planned chunk(s) \
         differed and were written ({}); start the agent: its next cycle sends them to the \
         receiver",
        options.volume,
        report.term,
        report.sent_chunks,
        report.planned_chunks,
        units::format_size(report.sent_bytes)
    ));
    Ok(report)
}

struct Pull<'a> {
    options: &'a PullOptions,
    identity: &'a Identity,
    device: &'a File,
    size: u64,
    chunk_bytes: u64,
    geometry: Geometry,
    state_path: &'a Path,
}

impl Pull<'_> {
    async fn run(
        &self,
        state: &mut AgentState,
        unreplicated: Option<Vec<ChunkRange>>,
    ) -> Result<FailbackReport, OpsError> {
        let (endpoint, client_config) = net::client_endpoint(
            self.identity,
            &self.options.receiver_fingerprint.clone().into(),
            32 << 20,
            net::Congestion::default(),
            net::PathSlot::default(),
        )
        .map_err(network("preparing the connection"))?;
        let addr = tokio::net::lookup_host(&self.options.from)
            .await
            .map_err(|error| {
                OpsError::Network(format!("resolving {}: {error}", self.options.from))
            })?
            .next()
            .ok_or_else(|| OpsError::Network(format!("{} has no address", self.options.from)))?;
        let connection = endpoint
            .connect_with(client_config, addr, "blkmirror")
            .map_err(|error| OpsError::Network(format!("connecting to {addr}: {error}")))?
            .await
            .map_err(|error| {
                OpsError::Network(format!(
                    "connecting to {addr}: {error} (is `blkmirror failback serve` running there, \
                     and does it --allow this agent's fingerprint?)"
                ))
            })?;
        let started = Instant::now();
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|error| OpsError::Network(format!("opening the stream: {error}")))?;
        net::write_frame(
            &mut send,
            &FailbackRequest::Hello(FailbackHello {
                protocol: FAILBACK_PROTOCOL,
                volume: self.options.volume.clone(),
                size: self.size,
                chunk_bytes: self.chunk_bytes,
                term: state.term,
                committed_seq: state.committed_seq,
                unreplicated,
            }),
        )
        .await
        .map_err(network("sending the hello"))?;
        let chunks = plan::chunk_count(self.size, self.chunk_bytes);
        let (mut planned, mut written_chunks, mut written_bytes) = (0u64, 0u64, 0u64);
        let mut first: Option<plan::FailbackPlan> = None;
        // One round, or, after a pre-copy at the DR site, more (the final delta), until the
        // roles are swapped.
        let term = loop {
            let plan = match read_reply(&mut recv).await? {
                FailbackReply::Plan(plan) => plan,
                FailbackReply::Complete { term } => match &first {
                    Some(first) if term > first.term => break term,
                    _ => return Err(unexpected("a plan", &FailbackReply::Complete { term })),
                },
                other => return Err(unexpected("a plan", &other)),
            };
            if first
                .as_ref()
                .is_some_and(|first| first.term != plan.term || first.head_seq != plan.head_seq)
            {
                return Err(OpsError::Refused(
                    "failback protocol: a later round names another term or cycle".into(),
                ));
            }
            let ranges = plan::normalize(plan.chunks.clone(), chunks)
                .map_err(|error| OpsError::Refused(error.to_string()))?;
            let round_planned = plan::covered(&ranges);
            planned += round_planned;
            say(format!(
                "volume {}: term {}, point {} promoted, receiver at cycle {}; round {}: \
                 {round_planned} of {chunks} chunk(s) to compare{}",
                self.options.volume,
                plan.term,
                plan.point_seq,
                plan.head_seq,
                plan.round,
                if plan.compare_all {
                    " (every chunk: a tracking gap)"
                } else {
                    ""
                }
            ));
            // Durable before the first write: the forward direction must send every planned
            // chunk (or, after a gap, compare everything), from the receiver's newest cycle on.
            self.record_forward(state, &plan, &ranges)?;
            let hashes = self.send_hashes(&mut send, ranges.clone());
            let data = self.receive_data(&mut recv, ranges);
            let (hashed, written) = tokio::join!(hashes, data);
            hashed?;
            let (round_chunks, round_bytes) = written?;
            written_chunks += round_chunks;
            written_bytes += round_bytes;
            self.device.sync_all().map_err(|source| OpsError::Target {
                what: "syncing",
                path: self.options.device.clone(),
                source,
            })?;
            net::write_frame(
                &mut send,
                &FailbackRequest::Written {
                    chunks: round_chunks,
                },
            )
            .await
            .map_err(network("confirming the writes"))?;
            if plan.round > 1 {
                say(format!("round {} written", plan.round));
            } else {
                say("written; waiting for the DR site to swap the roles (or for its final delta)");
            }
            first.get_or_insert(plan);
        };
        let compare_all = first.as_ref().is_some_and(|p| p.compare_all);
        state.term = state.term.max(term);
        store_state(self.state_path, state).map_err(state_error)?;
        let _ = send.finish();
        connection.close(quinn::VarInt::from_u32(0), b"done");
        let stats = connection.stats();
        endpoint.wait_idle().await;
        Ok(FailbackReport {
            volume: self.options.volume.clone(),
            term,
            compare_all,
            planned_chunks: planned,
            sent_chunks: written_chunks,
            sent_bytes: written_bytes,
            device_chunks: chunks,
            wire_tx_bytes: stats.udp_tx.bytes,
            wire_rx_bytes: stats.udp_rx.bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// After the failback this device equals the DR site's, and the receiver's replica is at
    /// `plan.head_seq`: they differ at most in the planned chunks.
    fn record_forward(
        &self,
        state: &mut AgentState,
        plan: &plan::FailbackPlan,
        ranges: &[ChunkRange],
    ) -> Result<(), OpsError> {
        state.committed_seq = plan.head_seq;
        state.term = state.term.max(plan.term);
        state.sync_generation = None;
        state.sync_base_seq = None;
        if plan.compare_all {
            // A gap: the forward direction compares every chunk too (a verify sync).
            state.needs_full_sync = true;
        } else {
            let mut set = DirtyBitmaps::new(self.geometry);
            for &[offset, length, kind] in &state.inflight {
                set.add_extent(&Extent {
                    offset,
                    length,
                    kind: ChangeKind::from_index(kind),
                });
            }
            for &(first, end) in ranges {
                let offset = first * self.chunk_bytes;
                set.add_extent(&Extent {
                    offset,
                    length: (end * self.chunk_bytes).min(self.size) - offset,
                    kind: ChangeKind::Write,
                });
            }
            state.inflight = extents_of(&set);
        }
        store_state(self.state_path, state).map_err(state_error)
    }

    async fn send_hashes(
        &self,
        send: &mut quinn::SendStream,
        ranges: Vec<ChunkRange>,
    ) -> Result<(), OpsError> {
        let mut walk = PlanWalk::new(ranges);
        let mut buffer = vec![0u8; self.chunk_bytes as usize];
        let mut batch = Vec::with_capacity(MAX_HASH_BATCH);
        while let Some(chunk) = walk.next() {
            let data = read_chunk(
                self.device,
                &self.options.device,
                self.size,
                self.chunk_bytes,
                chunk,
                &mut buffer,
            )?;
            batch.push(wire::chunk_hash(data));
            if batch.len() == MAX_HASH_BATCH || walk.remaining() == 0 {
                net::write_frame(send, &FailbackRequest::Hashes(std::mem::take(&mut batch)))
                    .await
                    .map_err(network("sending hashes"))?;
            }
        }
        Ok(())
    }

    async fn receive_data(
        &self,
        recv: &mut quinn::RecvStream,
        ranges: Vec<ChunkRange>,
    ) -> Result<(u64, u64), OpsError> {
        let mut cursor = DataCursor::new(ranges, self.size, self.chunk_bytes);
        let zeros = vec![0u8; self.chunk_bytes as usize];
        let mut bytes = 0u64;
        let mut progress = Instant::now();
        loop {
            let (offset, data) = match read_reply(recv).await? {
                FailbackReply::Data { chunk, data, zstd } => {
                    let data = plan::unpack(
                        data,
                        zstd,
                        plan::chunk_len(self.size, self.chunk_bytes, chunk),
                    )
                    .map_err(|error| OpsError::Refused(error.to_string()))?;
                    let (offset, _) = cursor
                        .accept(chunk, Some(data.len()))
                        .map_err(|error| OpsError::Refused(error.to_string()))?;
                    (offset, data)
                }
                FailbackReply::Zero { chunk } => {
                    let (offset, len) = cursor
                        .accept(chunk, None)
                        .map_err(|error| OpsError::Refused(error.to_string()))?;
                    (offset, zeros[..len as usize].to_vec())
                }
                FailbackReply::Sent { chunks } => {
                    let chunks = cursor
                        .finish(chunks)
                        .map_err(|error| OpsError::Refused(error.to_string()))?;
                    return Ok((chunks, bytes));
                }
                other => return Err(unexpected("data", &other)),
            };
            self.device
                .write_all_at(&data, offset)
                .map_err(|source| OpsError::Target {
                    what: "writing",
                    path: self.options.device.clone(),
                    source,
                })?;
            bytes += data.len() as u64;
            if progress.elapsed().as_secs() >= 5 {
                progress = Instant::now();
                say(format!("written {}", units::format_size(bytes)));
            }
        }
    }
}

async fn read_reply(recv: &mut quinn::RecvStream) -> Result<FailbackReply, OpsError> {
    match net::read_frame::<FailbackReply>(recv).await {
        Ok(Some(FailbackReply::Refused { message })) => Err(OpsError::Refused(format!(
            "the DR site refused the failback: {}",
            message.chars().take(1000).collect::<String>()
        ))),
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(OpsError::Network("the DR site closed the stream".into())),
        Err(error) => Err(OpsError::Network(format!(
            "reading from the DR site: {error}"
        ))),
    }
}

fn unexpected(what: &str, got: &FailbackReply) -> OpsError {
    let text: String = format!("{got:?}").chars().take(60).collect();
    OpsError::Refused(format!("failback protocol: expected {what}, got {text}"))
}
