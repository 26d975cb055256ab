//! `points` and `restore` read from the object store (`--from-store receiver.toml`): what
//! receivers published there ([`crate::dr::publish`]), without a receiver or its data
//! directory. This is how a DR site recovers a volume whose receiver is gone.
//!
//! A restore reads the point's manifests back to the last full one, the pack indexes, then
//! the chunks by ranged reads of their packs, many at once and adjacent chunks together
//! ([`objpoints::read_point_into`]); every chunk is checked against its id (its BLAKE3 hash)
//! before it is written.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

use blkmirror_protocol::units;

use crate::dr::{
    layout::{ChunkMap, LayoutError},
    objpoints::{self, PointStoreError},
    objstore::{ObjectStoreClient, StoreConfig},
    ops::{self, OpsError, PointSelector, Progress, RestoreTarget},
    stored::StoredPoint,
};

/// Ranged reads in flight during a restore.
pub const RESTORE_PARALLEL_READS: usize = 16;

/// Checks the volume's name, and makes a runtime and a client of the store.
pub(crate) fn open(
    store: &StoreConfig,
    volume: &str,
) -> Result<(tokio::runtime::Runtime, ObjectStoreClient), OpsError> {
    blkmirror_protocol::wire::check_volume_name(volume)
        .map_err(|error| OpsError::Usage(error.to_string()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| OpsError::Environment(format!("starting a runtime: {error}")))?;
    let client = ObjectStoreClient::connect(store).map_err(PointStoreError::Store)?;
    runtime
        .block_on(objpoints::check_sealing(&client, false))
        .map_err(classify)?;
    Ok((runtime, client))
}

/// A damaged chunk is corruption (exit 7), not a failure of the store.
pub(crate) fn classify(error: PointStoreError) -> OpsError {
    match error {
        PointStoreError::Layout {
            key,
            source: source @ LayoutError::ChunkMismatch(_),
        } => OpsError::Corrupt(format!("object store: {key}: {source}")),
        other => OpsError::ObjectStore(other),
    }
}

fn runtime_and_client(
    store: &StoreConfig,
) -> Result<(tokio::runtime::Runtime, ObjectStoreClient), OpsError> {
    open(store, "store")
}

/// Who runs this command, for the records it writes: `user@host`.
fn operator() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".to_owned());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    format!("{user}@{host}")
}

/// `blkmirror store grants --config FILE [--publish]`: the store's grants, compared with
/// `own` (the file's `[[agent]]` list); `publish` writes `own` as the next version.
pub fn grants(
    store: &StoreConfig,
    file: &Path,
    own: &crate::dr::receiver::Grants,
    publish: bool,
    json: bool,
) -> Result<(), OpsError> {
    use crate::dr::grantstore;
    let (runtime, client) = runtime_and_client(store)?;
    let failed = |error: grantstore::GrantsError| match error {
        grantstore::GrantsError::Store(error) => classify(PointStoreError::Store(error)),
        other => OpsError::Refused(other.to_string()),
    };
    let record = if publish {
        let record = runtime
            .block_on(grantstore::publish(
                &client,
                own,
                &operator(),
                crate::command::status::now_ms(),
            ))
            .map_err(failed)?;
        if !json {
            eprintln!(
                "blkmirror: published the [[agent]] list of {} to object store {} bucket {}: {}; \
                 every receiver applies it within {} s",
                file.display(),
                store.endpoint,
                store.bucket,
                record.summary(),
                grantstore::GRANTS_POLL.as_secs()
            );
        }
        Some(record)
    } else {
        runtime
            .block_on(grantstore::read(&client))
            .map_err(failed)?
            .map(|(record, _)| record)
    };
    let stored = match &record {
        Some(record) => Some(record.grants().map_err(failed)?),
        None => None,
    };
    let differences = stored
        .as_ref()
        .map(|stored| grant_differences(stored, own))
        .unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "store": record,
                "file": file.display().to_string(),
                "file_matches": stored.as_ref() == Some(own),
                "differences": differences,
            })
        );
        return Ok(());
    }
    let Some(record) = record else {
        println!(
            "object store {} bucket {} holds no grants yet: the first receiver to start seeds \
             them with its [[agent]] list (or run this with --publish)",
            store.endpoint, store.bucket
        );
        return Ok(());
    };
    println!(
        "grants in object store {} bucket {}: {}",
        store.endpoint,
        store.bucket,
        record.summary()
    );
    for agent in &record.agents {
        println!("  {}  {}", agent.fingerprint, agent.volumes.join(","));
    }
    if differences.is_empty() {
        println!("{} lists the same grants", file.display());
    } else {
        println!("{} differs (its list is not in force):", file.display());
        for line in &differences {
            println!("  {line}");
        }
    }
    Ok(())
}

/// How `own` differs from `stored`, a line per agent: `+FP vol` only in `own`, `-FP vol` only
/// in `stored`.
fn grant_differences(
    stored: &crate::dr::receiver::Grants,
    own: &crate::dr::receiver::Grants,
) -> Vec<String> {
    let mut lines = Vec::new();
    let empty = std::collections::BTreeSet::new();
    let agents: std::collections::BTreeSet<_> = stored.keys().chain(own.keys()).collect();
    for agent in agents {
        let (theirs, ours) = (
            stored.get(agent).unwrap_or(&empty),
            own.get(agent).unwrap_or(&empty),
        );
        let added: Vec<_> = ours.difference(theirs).cloned().collect();
        let removed: Vec<_> = theirs.difference(ours).cloned().collect();
        if !added.is_empty() {
            lines.push(format!("+{agent} {}", added.join(",")));
        }
        if !removed.is_empty() {
            lines.push(format!("-{agent} {}", removed.join(",")));
        }
    }
    lines
}

/// The format of a `store audit --checkpoint` file.
const CHECKPOINT_FORMAT: u32 = 1;

/// A `store audit --checkpoint` file: the report of the last check.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditCheckpoint {
    format: u32,
    endpoint: String,
    bucket: String,
    chain: crate::dr::auditchain::ChainReport,
}

/// The checkpoint at `path`, if the file exists (a first check starts without one).
fn read_checkpoint(
    path: &Path,
    store: &StoreConfig,
) -> Result<Option<crate::dr::auditchain::ChainReport>, OpsError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(OpsError::Target {
                what: "reading",
                path: path.to_owned(),
                source,
            });
        }
    };
    let refused = |what: String| OpsError::Usage(format!("{}: {what}", path.display()));
    if bytes.len() > 64 << 20 {
        return Err(refused("larger than any audit checkpoint".into()));
    }
    let checkpoint: AuditCheckpoint = serde_json::from_slice(&bytes)
        .map_err(|error| refused(format!("not an audit checkpoint: {error}")))?;
    if checkpoint.format != CHECKPOINT_FORMAT {
        return Err(refused(format!(
            "checkpoint format {} (this build reads {CHECKPOINT_FORMAT})",
            checkpoint.format
        )));
    }
    if (checkpoint.endpoint.as_str(), checkpoint.bucket.as_str())
        != (store.endpoint.as_str(), store.bucket.as_str())
    {
        return Err(refused(format!(
            "a checkpoint of bucket {} at {}, not of bucket {} at {}",
            checkpoint.bucket, checkpoint.endpoint, store.bucket, store.endpoint
        )));
    }
    Ok(Some(checkpoint.chain))
}

/// `blkmirror store audit --config FILE [--log FILE] [--checkpoint FILE] [--write-segments]`:
/// checks the shared audit chain (from a checkpoint: only what was added since), and a
/// receiver's own log against its copy; first copies full runs of old blocks into segments
/// if asked.
pub fn audit(
    store: &StoreConfig,
    log: Option<&Path>,
    checkpoint: Option<&Path>,
    write_segments: bool,
    json: bool,
) -> Result<(), OpsError> {
    use crate::dr::auditchain::{self, ChainError};
    let from = match checkpoint {
        Some(path) => read_checkpoint(path, store)?,
        None => None,
    };
    let (runtime, client) = runtime_and_client(store)?;
    let chain_error = |error: ChainError| match error {
        ChainError::Store(error) => classify(PointStoreError::Store(error)),
        other => OpsError::Corrupt(other.to_string()),
    };
    if write_segments {
        let written = runtime
            .block_on(auditchain::write_segments(&client, 16))
            .map_err(chain_error)?;
        if !json {
            eprintln!("blkmirror: audit chain: {written} new segment(s) written");
        }
    }
    let started = Instant::now();
    let mut last_said = Instant::now();
    let report = runtime
        .block_on(auditchain::verify_chain_from(
            &client,
            from.as_ref(),
            16,
            |number, last| {
                if !json && last_said.elapsed().as_secs() >= 2 {
                    last_said = Instant::now();
                    eprintln!("blkmirror: audit chain: block {number} of {last} checked");
                }
            },
        ))
        .map_err(|error| match error {
            ChainError::Store(error) => classify(PointStoreError::Store(error)),
            other => OpsError::Corrupt(match checkpoint {
                Some(path) => format!("{other} (checked from {})", path.display()),
                None => other.to_string(),
            }),
        })?;
    let from_block = from.as_ref().map_or(0, |from| from.blocks) + 1;
    if let Some(path) = checkpoint {
        let saved = AuditCheckpoint {
            format: CHECKPOINT_FORMAT,
            endpoint: store.endpoint.clone(),
            bucket: store.bucket.clone(),
            chain: report.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&saved).expect("a checkpoint serializes");
        crate::durable::write_atomic(path, &bytes).map_err(|source| OpsError::Target {
            what: "writing the checkpoint",
            path: path.to_owned(),
            source,
        })?;
    }
    let local = match log {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| OpsError::Target {
                what: "reading",
                path: path.to_owned(),
                source,
            })?;
            Some(
                auditchain::compare_local(&report, &text)
                    .map_err(|error| OpsError::Corrupt(format!("{}: {error}", path.display())))?,
            )
        }
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "chain": report,
                "from_block": from_block,
                "local": local,
                "ok": true
            })
        );
        return Ok(());
    }
    println!(
        "audit chain of object store {} bucket {}: intact, {} block(s), {} entries, head {} \
         ({} in {:.1} s)",
        store.endpoint,
        store.bucket,
        report.blocks,
        report.entries,
        report.head,
        match (checkpoint, from.is_some()) {
            (Some(path), true) => format!(
                "blocks {from_block}..{} checked on from checkpoint {}",
                report.blocks,
                path.display()
            ),
            _ => "checked whole".to_owned(),
        },
        started.elapsed().as_secs_f64()
    );
    for log in &report.logs {
        println!(
            "  {}  log {}  entries 1..{}  last at {}",
            log.receiver,
            &log.chain[..12],
            log.last_seq,
            units::format_utc(log.last_unix_ms)
        );
    }
    let events: Vec<String> = report
        .events
        .iter()
        .map(|(event, count)| format!("{event} {count}"))
        .collect();
    println!("  events: {}", events.join(", "));
    if let (Some(path), Some(local)) = (log, local) {
        println!(
            "{}: {} entries, {} of them in the store, the same as there{}",
            path.display(),
            local.local_entries,
            local.in_store,
            if local.in_store < local.local_entries {
                " (the rest are still to be copied)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// `blkmirror store gc --config FILE`: one garbage collection, if no receiver is running one
/// (the store-wide collection lease), with the `[store]` grace; `dry_run` plans only.
pub fn collect(store: &StoreConfig, dry_run: bool, json: bool) -> Result<(), OpsError> {
    let (runtime, client) = runtime_and_client(store)?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    let holder = format!("{host}/blkmirror-store-gc/{}", std::process::id());
    let started = Instant::now();
    if !json {
        eprintln!(
            "blkmirror: collecting the garbage of object store {} bucket {} (grace {}){}",
            store.endpoint,
            store.bucket,
            units::format_duration(store.gc_grace),
            if dry_run { ", planning only" } else { "" }
        );
    }
    let report = runtime
        .block_on(crate::dr::publish::collect_once(
            &client,
            &holder,
            store.gc_grace,
            dry_run,
        ))
        .map_err(|error| match error {
            crate::dr::publish::PublishError::Store(error) => classify(error),
            other => OpsError::Refused(other.to_string()),
        })?
        .ok_or_else(|| {
            OpsError::Refused(format!(
                "object store {} bucket {}: another collection holds the store-wide turn \
                 ({}); try again later",
                store.endpoint,
                store.bucket,
                objpoints::GC_LEASE_KEY
            ))
        })?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "dry_run": dry_run,
                "packs": report.packs,
                "pack_bytes": report.pack_bytes,
                "live_chunks": report.live_chunks,
                "condemned": report.condemned,
                "deleted": report.deleted,
                "deleted_bytes": report.deleted_bytes,
                "revived": report.revived,
                "repacked": report.repacked,
                "repack_written": report.repack_written,
                "repack_bytes": report.repack_bytes,
                "young": report.young,
                "tombstones_swept": report.tombstones_swept,
                "strays_deleted": report.strays_deleted,
                "indexes_rebuilt": report.indexes_rebuilt,
                "elapsed_ms": started.elapsed().as_millis() as u64,
            })
        );
    } else {
        println!(
            "{}{} in {:.1} s",
            if dry_run { "would do: " } else { "" },
            crate::dr::publish::describe_gc(&report),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `blkmirror store usage --config FILE`: per volume, its points and the chunks of its newest
/// point; across volumes, how much the newest points share (the dedup ratio) and what the
/// packs take.
pub fn usage(store: &StoreConfig, json: bool) -> Result<(), OpsError> {
    let (runtime, client) = runtime_and_client(store)?;
    let (volumes, pack_bytes, packs) = runtime
        .block_on(async {
            let mut volumes = Vec::new();
            for volume in objpoints::list_volumes(&client).await? {
                let seqs = objpoints::list_points(&client, &volume).await?;
                let Some(&newest) = seqs.last() else {
                    continue;
                };
                let (map, manifest) = objpoints::read_point(&client, &volume, newest).await?;
                volumes.push((volume, seqs.len(), manifest, map));
            }
            let packs = client.list("packs").await.map_err(PointStoreError::Store)?;
            let bytes: u64 = packs.iter().map(|(_, size, _)| size).sum();
            Ok::<_, PointStoreError>((volumes, bytes, packs.len()))
        })
        .map_err(classify)?;
    let dedup = crate::dr::layout::Dedup::of(volumes.iter().map(|(_, _, _, map)| map));
    let chunk_bytes = volumes.first().map_or(0, |(_, _, m, _)| m.chunk_bytes);
    if json {
        let list: Vec<_> = volumes
            .iter()
            .map(|(volume, points, manifest, map)| {
                serde_json::json!({
                    "volume": volume,
                    "points": points,
                    "newest": manifest.seq,
                    "size_bytes": manifest.size_bytes,
                    "chunk_bytes": manifest.chunk_bytes,
                    "chunks": map.chunks.len(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "volumes": list,
                "packs": packs,
                "pack_bytes": pack_bytes,
                "referenced_chunks": dedup.referenced,
                "distinct_chunks": dedup.distinct,
                "dedup_ratio": dedup.ratio(),
            })
        );
        return Ok(());
    }
    for (volume, points, manifest, map) in &volumes {
        println!(
            "{volume}: {points} point(s), newest {} of {}, {} non-zero chunk(s)",
            manifest.seq,
            units::format_size(manifest.size_bytes),
            map.chunks.len()
        );
    }
    println!(
        "{} volume(s): their newest points reference {} chunk(s), {} distinct (dedup ratio \
         {:.2}); {} pack(s) take {}{}",
        volumes.len(),
        dedup.referenced,
        dedup.distinct,
        dedup.ratio(),
        packs,
        units::format_size(pack_bytes),
        if chunk_bytes > 0 {
            format!(
                " (the newest points alone would take {} undeduplicated)",
                units::format_size(dedup.referenced * chunk_bytes)
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `blkmirror points VOLUME --from-store FILE`: the heads of the manifests only.
pub fn points(store: &StoreConfig, volume: &str, json: bool) -> Result<(), OpsError> {
    let (runtime, client) = open(store, volume)?;
    let listed = runtime
        .block_on(objpoints::list_point_heads(&client, volume))
        .map_err(classify)?;
    if listed.is_empty() {
        return Err(OpsError::Usage(format!(
            "volume {volume} has no point in object store {} bucket {}",
            store.endpoint, store.bucket
        )));
    }
    for listed in &listed {
        let (head, point) = (&listed.head, &listed.head.point);
        let kind = if head.base.is_some() { "delta" } else { "full" };
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "seq": head.seq,
                    "time": units::format_utc(point.time_unix_ms),
                    "time_unix_ms": point.time_unix_ms,
                    "consistent": point.consistent,
                    "bytes": point.bytes,
                    "size_bytes": head.size_bytes,
                    "manifest": kind,
                    "manifest_bytes": listed.manifest_bytes,
                })
            );
        } else {
            println!(
                "{:>8}  {}  {}  {} ({} manifest of {})",
                head.seq,
                units::format_utc(point.time_unix_ms),
                if point.consistent {
                    "consistent "
                } else {
                    "crash-consistent"
                },
                units::format_size(point.bytes),
                kind,
                units::format_size(listed.manifest_bytes),
            );
        }
    }
    Ok(())
}

/// The points of the store `selector` names (one, or every one for `all`), oldest first, by
/// the rules of the data directory's `--at` ([`ops::select`]). Only a selector by time or by
/// group cut reads the manifests' heads (for their records); `latest` and `seq:N` need the
/// listing alone.
pub(crate) async fn choose(
    client: &ObjectStoreClient,
    store: &StoreConfig,
    volume: &str,
    selector: &PointSelector,
) -> Result<Vec<u64>, OpsError> {
    let points: Vec<StoredPoint> = match selector {
        PointSelector::Latest | PointSelector::Seq(_) | PointSelector::All => {
            objpoints::list_points(client, volume)
                .await
                .map_err(classify)?
                .into_iter()
                .map(|seq| StoredPoint {
                    seq,
                    ..StoredPoint::default()
                })
                .collect()
        }
        PointSelector::AtOrBefore(_) | PointSelector::GroupCut(_) => {
            objpoints::list_point_heads(client, volume)
                .await
                .map_err(classify)?
                .iter()
                .map(|p| StoredPoint::received(&p.head.point, p.head.point.received_unix_ms))
                .collect()
        }
    };
    let chosen = ops::select(&points, selector).map_err(|problem| {
        OpsError::Usage(format!(
            "volume {volume} in object store {} bucket {}: {problem} (see `blkmirror points \
             {volume} --from-store ...`)",
            store.endpoint, store.bucket
        ))
    })?;
    if chosen.is_empty() {
        return Err(OpsError::Usage(format!(
            "volume {volume} has no point in object store {} bucket {}",
            store.endpoint, store.bucket
        )));
    }
    Ok(chosen.into_iter().map(|p| p.seq).collect())
}

/// `blkmirror restore VOLUME --from-store FILE --at POINT --to PATH`.
pub fn restore(
    store: &StoreConfig,
    volume: &str,
    selector: &PointSelector,
    to: &Path,
    force: bool,
    json: bool,
) -> Result<(), OpsError> {
    if *selector == PointSelector::All {
        return Err(OpsError::Usage(
            "restore needs one point, not --at all".into(),
        ));
    }
    let (runtime, client) = open(store, volume)?;
    runtime.block_on(async {
        let seq = choose(&client, store, volume, selector).await?[0];
        let started = Instant::now();
        let (point, view) = tokio::join!(
            objpoints::read_point(&client, volume, seq),
            objpoints::load_view(&client)
        );
        let (map, manifest) = point.map_err(classify)?;
        let view = view.map_err(classify)?;
        let size = manifest.size_bytes;
        let chunk = manifest.chunk_bytes as usize;
        let target = RestoreTarget::open(to, size, chunk, force)?;
        if target.is_device() {
            // A device is written in place: check every chunk of the point first, so a damaged
            // store leaves the device as it was.
            eprintln!(
                "blkmirror: checking point {seq} of volume {volume} in the object store before \
                 writing to {}",
                to.display()
            );
            let ids = map.chunks.values().copied().collect();
            if let Err(error) =
                objpoints::verify_chunks(&client, &view.locations, &ids, RESTORE_PARALLEL_READS)
                    .await
            {
                return Err(match classify(error) {
                    OpsError::Corrupt(message) => OpsError::Corrupt(format!(
                        "point {seq} of volume {volume}: {message}; {} was not written",
                        to.display()
                    )),
                    other => other,
                });
            }
        }
        eprintln!(
            "blkmirror: restoring volume {volume} point {seq} ({}) from object store {} to {}",
            units::format_utc(manifest.point.time_unix_ms),
            store.endpoint,
            to.display()
        );
        // Test builds only: the root test lets retention drop this point from the store here.
        tokio::task::block_in_place(crate::test_hooks::hold_restore);
        let setup_ms = started.elapsed().as_millis() as u64;
        // The read tasks write their chunks themselves (positional writes), so the writing
        // spreads over the runtime's threads with the hashing.
        let target = Arc::new(target);
        let progress = Arc::new(Mutex::new((
            Progress::new(format!("restore of {volume}"), size, json),
            0u64,
        )));
        let write_error = Arc::new(Mutex::new(None));
        let sink: objpoints::ChunkSink = {
            let (target, progress, write_error) =
                (target.clone(), progress.clone(), write_error.clone());
            Arc::new(move |offset, data| {
                let len = chunk.min((size - offset) as usize);
                if let Err(error) = target.write(offset, data, len) {
                    let message = error.to_string();
                    *write_error.lock().expect("error lock") = Some(error);
                    return Err(PointStoreError::Missing(format!(
                        "a place to write the point ({message})"
                    )));
                }
                let mut progress = progress.lock().expect("progress lock");
                progress.1 += len as u64;
                let done = progress.1;
                progress.0.update(done);
                Ok(())
            })
        };
        let read = objpoints::read_point_into(
            &client,
            &view.locations,
            &map,
            (manifest.size_bytes, manifest.chunk_bytes),
            RESTORE_PARALLEL_READS,
            sink,
        )
        .await;
        // Every read task has ended: the target is ours alone again.
        let target = Arc::into_inner(target).expect("no read task is left");
        let write_error = write_error.lock().expect("error lock").take();
        let report = match (read, write_error) {
            (Ok(report), None) => report,
            (_, Some(error)) => {
                target.abandon();
                return Err(error);
            }
            (Err(error), None) => {
                target.abandon();
                return Err(classify(error));
            }
        };
        let read_ms = started.elapsed().as_millis() as u64 - setup_ms;
        target.finish()?;
        let elapsed = started.elapsed().as_secs_f64();
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "event": "restored", "volume": volume, "seq": seq,
                    "time": units::format_utc(manifest.point.time_unix_ms),
                    "consistent": manifest.point.consistent, "to": to.display().to_string(),
                    "bytes": size, "duration_ms": (elapsed * 1000.0) as u64,
                    "from": "object-store", "requests": report.requests,
                    "fetched_bytes": report.fetched_bytes, "chunks": report.chunks,
                    "zero_chunks": report.zero_chunks,
                    "setup_ms": setup_ms, "read_ms": read_ms,
                })
            );
        } else {
            println!(
                "restored volume {volume} point {seq} ({}) from the object store to {}: {} in \
                 {elapsed:.1}s ({} fetched in {} ranged reads), every chunk checked against its \
                 id",
                units::format_utc(manifest.point.time_unix_ms),
                to.display(),
                units::format_size(size),
                units::format_size(report.fetched_bytes),
                report.requests
            );
        }
        Ok(())
    })
}

/// `blkmirror verify VOLUME --from-store FILE --at POINT` (`all`: every point): reads every
/// chunk the points reference, each once, and checks it against its id. Stops at the first
/// damaged chunk (exit 7).
pub fn verify(
    store: &StoreConfig,
    volume: &str,
    selector: &PointSelector,
    json: bool,
) -> Result<(), OpsError> {
    let (runtime, client) = open(store, volume)?;
    runtime.block_on(async {
        let seqs = choose(&client, store, volume, selector).await?;
        let started = Instant::now();
        // Oldest first, each manifest applied to the map of the point before it: `--at all`
        // reads every manifest once (a point alone is read through its chain).
        let mut ids = std::collections::HashSet::new();
        let mut map = ChunkMap::default();
        for &seq in &seqs {
            let manifest = objpoints::read_manifest(&client, volume, seq)
                .await
                .map_err(classify)?;
            objpoints::advance(&client, volume, &mut map, &manifest)
                .await
                .map_err(classify)?;
            ids.extend(map.chunks.values().copied());
        }
        let view = objpoints::load_view(&client).await.map_err(classify)?;
        let report =
            objpoints::verify_chunks(&client, &view.locations, &ids, RESTORE_PARALLEL_READS)
                .await
                .map_err(classify)?;
        let elapsed = started.elapsed().as_secs_f64();
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "event": "verified", "volume": volume, "points": seqs,
                    "chunks": report.chunks, "fetched_bytes": report.fetched_bytes,
                    "requests": report.requests, "duration_ms": (elapsed * 1000.0) as u64,
                    "from": "object-store",
                })
            );
        } else {
            println!(
                "verified {} point(s) of volume {volume} in the object store in {elapsed:.1}s: \
                 {} chunk(s) ({} in {} ranged reads), every one matching its id",
                seqs.len(),
                report.chunks,
                units::format_size(report.fetched_bytes),
                report.requests
            );
        }
        Ok(())
    })
}
