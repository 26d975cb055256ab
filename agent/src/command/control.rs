//! Recovery actions through the receiver's control socket, authorized by operator role
//! (`command::roles`).
//!
//! With a `[roles]` section in `receiver.toml`, the receiver's control socket is open to every
//! local user (mode 0666), and the daemon decides, from the kernel's peer credentials, who may
//! do what. A non-root operator runs the usual commands with `--control-socket`:
//!
//! ```text
//! blkmirror points data --control-socket /run/blkmirror/receiver.sock
//! blkmirror restore data --at seq:42 --to ./data.img --control-socket ...
//! ```
//!
//! # Protocol
//!
//! The client sends one JSON line ([`ControlRequest`], at most 4 KiB). The daemon answers with
//! frames: a tag byte, a little-endian `u32` length (at most [`MAX_FRAME`]), the payload.
//!
//! * `O` / `E`: text for the client's standard output / error;
//! * `H`: a restore's header ([`StreamHeader`], JSON);
//! * `D`: a chunk of the point: `u64` byte offset, then the bytes;
//! * `Z`: an all-zero chunk: `u64` offset, `u64` length;
//! * `X`: the end ([`Outcome`], JSON): the exit code and any error.
//!
//! `export` serves the point from the daemon on a Unix socket owned by the client (its URI comes
//! back as text) for as long as the client stays connected.
//! `drill` is queued for the drill runner (`recovery::DRILL_REQUESTS`, run as root by
//! `blkmirror-drills.path`) with the volume's configured check, and the client waits for the
//! record.
//! `points`, `verify` and `reprotect` run as a child process of the daemon (as the daemon's
//! user, with an argument list the daemon builds from the checked request); `restore` and
//! `failover` stream the point, checked chunk by chunk against its hashes, and the *client*
//! writes its target with its own permissions, so the daemon never writes a path a client
//! names. A failover's term is raised only after the client says its copy is written and
//! synced. Every request is audited (`control`) with the user, the role and the outcome.

use std::{
    io::{self, BufRead as _, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::command::exit::ExitCode;
use crate::command::roles::{Action, Peer, Role, RoleMap};
use crate::dr::audit::{AuditLog, Event};
use crate::dr::ops::{self, OpsError, PointSelector};
use crate::dr::points::PointsError;
use crate::dr::volume::PointReader;
use blkmirror_protocol::wire;

/// The largest frame either side accepts.
pub const MAX_FRAME: u32 = 2 << 20;

/// The longest request line.
pub const MAX_REQUEST: usize = 4096;

/// How long the daemon waits on a client that stopped reading or writing (a stalled restore
/// holds the volume's lock shared, so the receiver's next commit of that volume waits).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// How often a queued drill's record is looked at.
const DRILL_POLL: Duration = Duration::from_millis(500);
/// When a queued drill nobody took is worth a word to the operator.
const DRILL_UNTAKEN_WARNING: Duration = Duration::from_secs(30);
/// How long a client waits for its drill (drills with a boot may take a while).
const DRILL_WAIT: Duration = Duration::from_secs(6 * 3600);

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase", deny_unknown_fields)]
pub enum ControlRequest {
    /// The points of a volume.
    Points {
        /// The volume.
        volume: String,
        /// JSON lines.
        #[serde(default)]
        json: bool,
    },
    /// Verify points.
    Verify {
        /// The volume.
        volume: String,
        /// `latest`, `all`, `seq:N` or a time.
        at: String,
        /// JSON lines.
        #[serde(default)]
        json: bool,
    },
    /// Stream a point for the client to write.
    Restore {
        /// The volume.
        volume: String,
        /// Which point.
        at: String,
    },
    /// Stream a point, then raise the term once the client has written it.
    Failover {
        /// The volume.
        volume: String,
        /// Which point.
        at: String,
        /// Where the client writes it (for the record).
        to: String,
        /// A failover while one is in force.
        #[serde(default)]
        again: bool,
        /// With `to = "export"`: discard an earlier failover's export that was never failed
        /// back.
        #[serde(default)]
        force: bool,
    },
    /// Make the source primary again.
    Reprotect {
        /// The volume.
        volume: String,
    },
    /// Queue a drill for the drill runner and wait for its record.
    Drill {
        /// The volume.
        volume: String,
        /// Which point.
        at: String,
    },
    /// Serve a point over NBD, on a Unix socket owned by the client, until it disconnects.
    Export {
        /// The volume.
        volume: String,
        /// Which point.
        at: String,
        /// A copy-on-write overlay in front.
        #[serde(default)]
        writable: bool,
        /// The export a `failover --to export` promoted (its point and writes; an admin's).
        #[serde(default)]
        promoted: bool,
    },
}

impl ControlRequest {
    fn action(&self) -> Action {
        match self {
            ControlRequest::Points { .. } => Action::Points,
            ControlRequest::Verify { .. } => Action::Verify,
            ControlRequest::Restore { .. } => Action::Restore,
            ControlRequest::Failover { .. } => Action::Failover,
            ControlRequest::Export { promoted: true, .. } => Action::ExportPromoted,
            ControlRequest::Reprotect { .. } => Action::Reprotect,
            ControlRequest::Export { .. } => Action::Export,
            ControlRequest::Drill { .. } => Action::Drill,
        }
    }

    fn volume(&self) -> &str {
        match self {
            ControlRequest::Points { volume, .. }
            | ControlRequest::Verify { volume, .. }
            | ControlRequest::Restore { volume, .. }
            | ControlRequest::Failover { volume, .. }
            | ControlRequest::Export { volume, .. }
            | ControlRequest::Drill { volume, .. }
            | ControlRequest::Reprotect { volume } => volume,
        }
    }
}

/// What `export` serves a client.
enum ExportKind<'a> {
    /// A point, read-only or with a discarded overlay.
    Point { at: &'a str, writable: bool },
    /// A failover's export, with its kept overlay.
    Promoted,
}

/// A restore stream's first frame.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamHeader {
    /// The point.
    pub seq: u64,
    /// How it is named to people.
    pub describe: String,
    /// The volume's size.
    pub size: u64,
    /// Its chunk size.
    pub chunk_bytes: u64,
}

/// The last frame.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    /// The exit code the client exits with.
    pub code: u8,
    /// What went wrong.
    pub error: Option<String>,
}

/// What the daemon needs to serve requests.
pub struct Actions {
    /// The receiver's data directory.
    pub data_dir: PathBuf,
    /// The roles (replaced on reload).
    pub roles: Arc<Mutex<RoleMap>>,
    /// Where exports for clients put their sockets (`exports/` beside the control socket).
    pub exports_dir: PathBuf,
}

impl Actions {
    /// Whether the socket is open to every local user (roles are configured).
    pub fn open_to_all(&self) -> bool {
        !self.roles.lock().expect("not poisoned").is_empty()
    }

    /// Checks `peer` for the `status` request; the refusal is audited.
    pub fn authorize_status(&self, peer: &Peer) -> Result<Role, String> {
        let roles = self.roles.lock().expect("not poisoned").clone();
        roles
            .authorize(peer, Action::Status)
            .inspect_err(|message| {
                audit(
                    &self.data_dir,
                    peer,
                    Action::Status,
                    None,
                    None,
                    &format!("refused: {message}"),
                );
            })
    }

    /// Serves one request line from `peer` on `stream` (blocking).
    pub fn serve(&self, stream: UnixStream, peer: &Peer, line: &str) -> io::Result<()> {
        stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        let mut out = io::BufWriter::with_capacity(1 << 20, stream.try_clone()?);
        let request: ControlRequest = match serde_json::from_str(line) {
            Ok(request) => request,
            Err(error) => {
                return finish(
                    &mut out,
                    ExitCode::Usage,
                    Some(format!(
                        "not a request: {error} (send \"status\" or a JSON request; see \
                         `command::control`)"
                    )),
                );
            }
        };
        let action = request.action();
        if let Err(error) = wire::check_volume_name(request.volume()) {
            return finish(&mut out, ExitCode::Usage, Some(error.to_string()));
        }
        // A point selector is parsed here, and handed on only in its `--at=` form: a value
        // such as `--data-dir=/elsewhere` cannot become an option of the child.
        if let ControlRequest::Verify { at, .. }
        | ControlRequest::Restore { at, .. }
        | ControlRequest::Export { at, .. }
        | ControlRequest::Drill { at, .. }
        | ControlRequest::Failover { at, .. } = &request
            && let Err(message) = ops::parse_selector(at)
        {
            return finish(&mut out, ExitCode::Usage, Some(message));
        }
        let roles = self.roles.lock().expect("not poisoned").clone();
        let role = match roles.authorize(peer, action) {
            Ok(role) => role,
            Err(message) => {
                audit(
                    &self.data_dir,
                    peer,
                    action,
                    None,
                    Some(request.volume()),
                    &format!("refused: {message}"),
                );
                return finish(
                    &mut out,
                    ExitCode::Refused,
                    Some(format!("refused: {message}")),
                );
            }
        };
        let result = match &request {
            ControlRequest::Points { volume, json } => {
                let mut args = vec!["points", volume.as_str()];
                if *json {
                    args.push("--json");
                }
                self.child(&mut out, peer, &args)
            }
            ControlRequest::Verify { volume, at, json } => {
                let at = format!("--at={at}");
                let mut args = vec!["verify", volume.as_str(), at.as_str()];
                if *json {
                    args.push("--json");
                }
                self.child(&mut out, peer, &args)
            }
            ControlRequest::Reprotect { volume } => {
                self.child(&mut out, peer, &["reprotect", volume])
            }
            ControlRequest::Restore { volume, at } => self
                .stream_point(&mut out, volume, at)
                .map(|outcome| outcome.map(|_| ())),
            ControlRequest::Failover {
                volume,
                at,
                to,
                again,
                force,
            } if to == "export" => {
                let promoted = ops::parse_selector(at)
                    .map_err(OpsError::Usage)
                    .and_then(|at| {
                        crate::dr::recovery::promote_export(
                            &self.data_dir,
                            volume,
                            &at,
                            *force,
                            *again,
                            &format!("{} via the control socket", peer.name),
                        )
                    });
                match promoted {
                    Ok((_, message)) => {
                        frame(&mut out, b'E', format!("blkmirror: {message}\n").as_bytes())?;
                        self.export(&mut out, stream, peer, volume, ExportKind::Promoted)
                    }
                    Err(error) => Ok(Err((ExitCode::from(&error), error.to_string()))),
                }
            }
            ControlRequest::Failover {
                volume,
                at,
                to,
                again,
                ..
            } => self.failover(&mut out, stream, peer, volume, at, to, *again),
            ControlRequest::Export {
                volume,
                promoted: true,
                ..
            } => self.export(&mut out, stream, peer, volume, ExportKind::Promoted),
            ControlRequest::Export {
                volume,
                at,
                writable,
                ..
            } => self.export(
                &mut out,
                stream,
                peer,
                volume,
                ExportKind::Point {
                    at,
                    writable: *writable,
                },
            ),
            ControlRequest::Drill { volume, at } => self.drill(&mut out, peer, role, volume, at),
        };
        let (code, error) = match result {
            Ok(Ok(())) => (ExitCode::Success, None),
            Ok(Err((code, message))) => (code, Some(message)),
            Err(error) => (ExitCode::Failure, Some(error.to_string())),
        };
        audit(
            &self.data_dir,
            peer,
            action,
            Some(role),
            Some(request.volume()),
            error
                .as_deref()
                .map_or("ok".to_owned(), |e| format!("failed: {e}"))
                .as_str(),
        );
        finish(&mut out, code, error)
    }

    /// Queues a drill for the drill runner (`blkmirror-drills.path` starts `drill --due` when
    /// the queue is not empty) and waits for the record of a drill that started after the
    /// request. The check is the one `receiver.toml` gives the volume: a client cannot name a
    /// command for root to run.
    fn drill(
        &self,
        out: &mut impl Write,
        peer: &Peer,
        role: Role,
        volume: &str,
        at: &str,
    ) -> io::Result<Result<(), (ExitCode, String)>> {
        use crate::dr::recovery::{self, DrillRequest};
        if let Err(error) = PointReader::open(&self.data_dir, volume) {
            let error = OpsError::from(error);
            return Ok(Err((ExitCode::from(&error), error.to_string())));
        }
        let request = DrillRequest {
            volume: volume.to_owned(),
            at: at.to_owned(),
            user: format!("{}, {}", peer.name, role.name()),
            requested_unix_ms: crate::command::status::now_ms(),
        };
        let queued = match recovery::queue_drill(&self.data_dir, &request) {
            Ok(queued) => queued,
            Err(error) => return Ok(Err((ExitCode::from(&error), error.to_string()))),
        };
        let path = recovery::drill_request_path(&self.data_dir, volume);
        frame(
            out,
            b'E',
            format!(
                "blkmirror: drill of volume {volume} queued{}; waiting for the drill runner \
                 (blkmirror-drills.service, started by blkmirror-drills.path)\n",
                if queued == request {
                    String::new()
                } else {
                    format!(" (joining the request of {})", queued.user)
                }
            )
            .as_bytes(),
        )?;
        out.flush()?;
        let started = std::time::Instant::now();
        let mut warned = false;
        loop {
            std::thread::sleep(DRILL_POLL);
            let record = recovery::read_drill_record(&self.data_dir, volume)
                .filter(|record| record.time_unix_ms >= queued.requested_unix_ms);
            let pending = path.exists();
            match record {
                Some(record) if !pending => {
                    let mut text = String::new();
                    for step in &record.steps {
                        text.push_str(&format!(
                            "blkmirror: drill: {}: {} in {} ms{}\n",
                            step.step,
                            if step.ok { "ok" } else { "FAILED" },
                            step.ms,
                            if step.detail.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", step.detail)
                            }
                        ));
                    }
                    frame(out, b'E', text.as_bytes())?;
                    frame(
                        out,
                        b'O',
                        format!("{}\n", serde_json::to_string(&record).expect("serializes"))
                            .as_bytes(),
                    )?;
                    return Ok(if record.ok {
                        Ok(())
                    } else {
                        Err((
                            ExitCode::DrillFailed,
                            format!(
                                "the drill of point {} failed: {}",
                                record.seq,
                                record.failure.unwrap_or_default()
                            ),
                        ))
                    });
                }
                None if !pending => {
                    return Ok(Err((
                        ExitCode::Failure,
                        "the drill runner took the request but recorded no drill (see \
                         `journalctl -u blkmirror-drills`)"
                            .into(),
                    )));
                }
                _ => {}
            }
            if pending && !warned && started.elapsed() >= DRILL_UNTAKEN_WARNING {
                warned = true;
                frame(
                    out,
                    b'E',
                    b"blkmirror: no drill runner has taken the request yet: is \
                      blkmirror-drills.path enabled (`systemctl enable --now \
                      blkmirror-drills.path`)?\n",
                )?;
                out.flush()?;
            }
            if started.elapsed() >= DRILL_WAIT {
                return Ok(Err((
                    ExitCode::Failure,
                    format!(
                        "no drill result within {}; the request stays queued in {}",
                        blkmirror_protocol::units::format_duration(DRILL_WAIT),
                        path.display()
                    ),
                )));
            }
        }
    }

    /// Runs this binary with `args` on the data directory; its output goes to the client.
    /// Returns the child's failure as `Ok(Err(..))`.
    fn child(
        &self,
        out: &mut impl Write,
        peer: &Peer,
        args: &[&str],
    ) -> io::Result<Result<(), (ExitCode, String)>> {
        let exe = std::env::current_exe()?;
        let output = Command::new(exe)
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("BLKMIRROR_OPERATOR", &peer.name)
            .stdin(std::process::Stdio::null())
            .output()?;
        frame(out, b'O', &output.stdout)?;
        frame(out, b'E', &output.stderr)?;
        let code = output.status.code().unwrap_or(1);
        Ok(if code == 0 {
            Ok(())
        } else {
            Err((
                exit_code(code as u8),
                format!("{} exited with {code}", args[0]),
            ))
        })
    }

    /// Streams a point; returns it (for a failover) or the failure.
    fn stream_point(
        &self,
        out: &mut impl Write,
        volume: &str,
        at: &str,
    ) -> io::Result<Result<crate::dr::stored::StoredPoint, (ExitCode, String)>> {
        let failed = |error: OpsError| Ok(Err((ExitCode::from(&error), error.to_string())));
        let selector = match ops::parse_selector(at) {
            Ok(PointSelector::All) => {
                return failed(OpsError::Usage("one point, not --at all".into()));
            }
            Ok(selector) => selector,
            Err(message) => return failed(OpsError::Usage(message)),
        };
        let reader = match PointReader::open(&self.data_dir, volume) {
            Ok(reader) => reader,
            Err(error) => return failed(error.into()),
        };
        let point = match ops::select(reader.points(), &selector) {
            Ok(mut points) => points.remove(0),
            Err(message) => return failed(OpsError::Usage(message)),
        };
        // The whole point is checked before the first byte goes out: a client writing a
        // device gets nothing from a corrupt point.
        match reader.read_point(point.seq, false, |_, _| Ok(())) {
            Ok(bad) if bad.is_empty() => {}
            Ok(bad) => {
                return failed(OpsError::Corrupt(format!(
                    "point {} of volume {volume} is corrupt at byte offset {}; nothing was sent",
                    point.seq, bad[0]
                )));
            }
            Err(error) => return failed(error.into()),
        }
        let size = reader.meta().size_bytes;
        let chunk = reader.meta().chunk_bytes;
        let header = StreamHeader {
            seq: point.seq,
            describe: ops::describe(&point),
            size,
            chunk_bytes: chunk,
        };
        frame(out, b'H', &serde_json::to_vec(&header).expect("serializes"))?;
        let mut sent: io::Result<()> = Ok(());
        let streamed = reader.read_point(point.seq, false, |offset, data| {
            let len = chunk.min(size - offset);
            let result = match data {
                Some(data) if !wire::is_zero(data) => {
                    let mut payload = Vec::with_capacity(8 + data.len());
                    payload.extend_from_slice(&offset.to_le_bytes());
                    payload.extend_from_slice(data);
                    frame(out, b'D', &payload)
                }
                _ => {
                    let mut payload = offset.to_le_bytes().to_vec();
                    payload.extend_from_slice(&len.to_le_bytes());
                    frame(out, b'Z', &payload)
                }
            };
            result.map_err(|source| {
                let message = source.to_string();
                sent = Err(source);
                PointsError::Io {
                    what: "sending to the client",
                    path: PathBuf::from(message),
                    source: io::Error::other("the client went away"),
                }
            })
        });
        sent?;
        match streamed {
            Ok(bad) if bad.is_empty() => Ok(Ok(point)),
            Ok(bad) => failed(OpsError::Corrupt(format!(
                "point {} of volume {volume} became unreadable at byte offset {}",
                point.seq, bad[0]
            ))),
            Err(error) => failed(error.into()),
        }
    }

    /// Serves the point on a Unix socket that only `peer` (and root) may connect to, and
    /// prints its URI to the client; the export ends when the client's connection does.
    fn export(
        &self,
        out: &mut io::BufWriter<UnixStream>,
        stream: UnixStream,
        peer: &Peer,
        volume: &str,
        kind: ExportKind<'_>,
    ) -> io::Result<Result<(), (ExitCode, String)>> {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        let failed = |error: OpsError| Ok(Err((ExitCode::from(&error), error.to_string())));
        let (at, writable, promoted) = match kind {
            ExportKind::Point { at, writable } => match ops::parse_selector(at) {
                Ok(at) => (at, writable, false),
                Err(message) => return failed(OpsError::Usage(message)),
            },
            ExportKind::Promoted => (PointSelector::Latest, false, true),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.exports_dir)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = self
            .exports_dir
            .join(format!("{volume}-{}-{nanos}.sock", peer.uid));
        let options = crate::dr::export::ExportOptions {
            data_dir: self.data_dir.clone(),
            volume: volume.to_owned(),
            at,
            listen: crate::dr::export::ListenAddr::Unix(path.clone()),
            writable,
            overlay_dir: None,
            allow_remote: false,
            promoted,
            store: None,
        };
        let export = match crate::dr::export::DaemonExport::start(&options) {
            Ok(export) => export,
            Err(error) => return failed(error),
        };
        // The socket is the client's alone (made under the daemon's umask, so nobody else
        // could connect before this).
        std::os::unix::fs::chown(&path, Some(peer.uid), None)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        frame(out, b'O', format!("{}\n", export.uri).as_bytes())?;
        out.flush()?;
        // The client's connection is the export's lease.
        stream.set_read_timeout(None)?;
        let _ = io::copy(&mut (&stream).take(1 << 20), &mut io::sink());
        drop(export);
        let _ = std::fs::remove_file(&path);
        Ok(Ok(()))
    }

    #[allow(clippy::too_many_arguments)]
    fn failover(
        &self,
        out: &mut io::BufWriter<UnixStream>,
        stream: UnixStream,
        peer: &Peer,
        volume: &str,
        at: &str,
        to: &str,
        again: bool,
    ) -> io::Result<Result<(), (ExitCode, String)>> {
        let disk = crate::dr::storage::LocalDisk::shared();
        let dir = crate::dr::volume::Volume::dir_of(&self.data_dir, volume);
        let refused = |error: OpsError| Ok(Err((ExitCode::from(&error), error.to_string())));
        match crate::dr::authority::read(&disk, &dir) {
            Ok(current) => {
                if let Err(message) = current.may_fail_over(again) {
                    return refused(OpsError::Usage(message));
                }
            }
            Err(error) => return refused(error.into()),
        }
        let point = match self.stream_point(out, volume, at)? {
            Ok(point) => point,
            Err(failure) => return Ok(Err(failure)),
        };
        frame(out, b'W', b"")?;
        out.flush()?;
        // The client writes and syncs its copy, then says so.
        let mut line = String::new();
        io::BufReader::new((&stream).take(64)).read_line(&mut line)?;
        if line.trim() != "written" {
            return Ok(Err((
                ExitCode::Failure,
                "the client did not confirm its copy; the term was not changed".into(),
            )));
        }
        match crate::dr::recovery::raise_term(&self.data_dir, volume, &point, to, &peer.name, again)
        {
            Ok(term) => {
                frame(
                    out,
                    b'E',
                    format!(
                        "blkmirror: volume {volume} failed over: {} is now at {to}; term {term}, \
                         the DR site is primary\n",
                        ops::describe(&point)
                    )
                    .as_bytes(),
                )?;
                Ok(Ok(()))
            }
            Err(error) => refused(error),
        }
    }
}

fn exit_code(code: u8) -> ExitCode {
    match code {
        0 => ExitCode::Success,
        2 => ExitCode::Usage,
        3 => ExitCode::Environment,
        4 => ExitCode::Device,
        5 => ExitCode::Busy,
        6 => ExitCode::Refused,
        7 => ExitCode::Corrupt,
        8 => ExitCode::DrillFailed,
        78 => ExitCode::Config,
        _ => ExitCode::Failure,
    }
}

fn frame(out: &mut impl Write, tag: u8, payload: &[u8]) -> io::Result<()> {
    if payload.is_empty() && tag != b'W' {
        return Ok(());
    }
    for piece in payload
        .chunks(MAX_FRAME as usize)
        .chain(payload.is_empty().then_some(&[][..]))
    {
        out.write_all(&[tag])?;
        out.write_all(&(piece.len() as u32).to_le_bytes())?;
        out.write_all(piece)?;
    }
    Ok(())
}

fn finish(out: &mut impl Write, code: ExitCode, error: Option<String>) -> io::Result<()> {
    let outcome = Outcome {
        code: code.code(),
        error,
    };
    let body = serde_json::to_vec(&outcome).expect("serializes");
    out.write_all(b"X")?;
    out.write_all(&(body.len() as u32).to_le_bytes())?;
    out.write_all(&body)?;
    out.flush()
}

fn audit(
    data_dir: &Path,
    peer: &Peer,
    action: Action,
    role: Option<Role>,
    volume: Option<&str>,
    outcome: &str,
) {
    let record = AuditLog::in_dir(data_dir).append(Event {
        event: "control",
        volume: volume.map(str::to_owned),
        outcome: outcome.to_owned(),
        detail: serde_json::json!({
            "action": action.name(),
            "user": peer.name,
            "uid": peer.uid,
            "role": role.map(Role::name),
        }),
        ..Event::default()
    });
    if let Err(error) = record {
        tracing::warn!(target: "blkmirror receiver", "audit log: {error}");
    }
}

/// One frame from the daemon.
enum Frame {
    Out(Vec<u8>),
    Err(Vec<u8>),
    Header(StreamHeader),
    Data(u64, Vec<u8>),
    Zero(u64, u64),
    Written,
    End(Outcome),
}

fn read_frame(input: &mut impl Read) -> Result<Frame, OpsError> {
    let broken = |error: io::Error| OpsError::Network(format!("the control socket: {error}"));
    let mut head = [0u8; 5];
    input.read_exact(&mut head).map_err(broken)?;
    let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes"));
    if len > MAX_FRAME {
        return Err(OpsError::Network(format!(
            "a frame of {len} bytes from the daemon"
        )));
    }
    let mut body = vec![0u8; len as usize];
    input.read_exact(&mut body).map_err(broken)?;
    let short = || OpsError::Network("a short frame from the daemon".into());
    let offset = |body: &[u8]| -> Result<u64, OpsError> {
        Ok(u64::from_le_bytes(
            body.get(..8)
                .ok_or_else(short)?
                .try_into()
                .expect("8 bytes"),
        ))
    };
    Ok(match head[0] {
        b'O' => Frame::Out(body),
        b'E' => Frame::Err(body),
        b'H' => Frame::Header(
            serde_json::from_slice(&body).map_err(|e| OpsError::Network(e.to_string()))?,
        ),
        b'D' => Frame::Data(offset(&body)?, body[8..].to_vec()),
        b'Z' => Frame::Zero(offset(&body)?, offset(body.get(8..).ok_or_else(short)?)?),
        b'W' => Frame::Written,
        b'X' => {
            Frame::End(serde_json::from_slice(&body).map_err(|e| OpsError::Network(e.to_string()))?)
        }
        other => {
            return Err(OpsError::Network(format!(
                "an unknown frame {other:#04x} from the daemon"
            )));
        }
    })
}

fn connect(socket: &Path, request: &ControlRequest) -> Result<UnixStream, OpsError> {
    let mut stream = UnixStream::connect(socket).map_err(|error| {
        OpsError::Network(format!(
            "no blkmirror receiver answers on {}: {error} (is it running, and does \
             receiver.toml grant roles?)",
            socket.display()
        ))
    })?;
    let mut line = serde_json::to_vec(request).expect("serializes");
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|error| OpsError::Network(format!("the control socket: {error}")))?;
    Ok(stream)
}

/// The daemon's failure as this process's error (its exit code kept).
fn ended(outcome: Outcome) -> Result<(), OpsError> {
    match (outcome.code, outcome.error) {
        (0, _) => Ok(()),
        (code, error) => {
            let message = error.unwrap_or_else(|| format!("exit {code}"));
            Err(match exit_code(code) {
                ExitCode::Usage => OpsError::Usage(message),
                ExitCode::Refused => OpsError::Refused(message),
                ExitCode::Corrupt => OpsError::Corrupt(message),
                ExitCode::Environment => OpsError::Environment(message),
                _ => OpsError::Network(message),
            })
        }
    }
}

/// `points`, `verify`, `reprotect` and `export` through the daemon: prints what it printed
/// (an export's URI at once, then it holds the connection until this process is stopped).
pub fn run_text(socket: &Path, request: &ControlRequest) -> Result<(), OpsError> {
    let mut stream = io::BufReader::new(connect(socket, request)?);
    loop {
        match read_frame(&mut stream)? {
            Frame::Out(text) => {
                let mut stdout = io::stdout();
                let _ = stdout.write_all(&text);
                let _ = stdout.flush();
            }
            Frame::Err(text) => {
                let _ = io::stderr().write_all(&text);
            }
            Frame::End(outcome) => return ended(outcome),
            _ => {
                return Err(OpsError::Network(
                    "an unexpected frame from the daemon".into(),
                ));
            }
        }
    }
}

/// `restore` (or, with `failover`, a failover) through the daemon: the point arrives in
/// frames and this process writes `to` (as a local restore does: a new file renamed into
/// place, or a device not in use).
pub fn run_restore(
    socket: &Path,
    request: &ControlRequest,
    to: &Path,
    force: bool,
) -> Result<(), OpsError> {
    let stream = connect(socket, request)?;
    let mut input = io::BufReader::with_capacity(
        1 << 20,
        stream
            .try_clone()
            .map_err(|e| OpsError::Network(e.to_string()))?,
    );
    let mut target = None;
    let mut header_seen = None;
    loop {
        match read_frame(&mut input)? {
            Frame::Out(text) => {
                let _ = io::stdout().write_all(&text);
            }
            Frame::Err(text) => {
                let _ = io::stderr().write_all(&text);
            }
            Frame::Header(header) => {
                if header.chunk_bytes == 0 || header.chunk_bytes > u64::from(MAX_FRAME) {
                    return Err(OpsError::Network("a bad header from the daemon".into()));
                }
                eprintln!(
                    "blkmirror: restoring {} through the receiver to {}",
                    header.describe,
                    to.display()
                );
                target = Some(ops::RestoreTarget::open(
                    to,
                    header.size,
                    header.chunk_bytes as usize,
                    force,
                )?);
                header_seen = Some(header);
            }
            Frame::Data(offset, data) => {
                let (Some(target), Some(header)) = (&target, &header_seen) else {
                    return Err(OpsError::Network("data before the header".into()));
                };
                if offset % header.chunk_bytes != 0
                    || offset.saturating_add(data.len() as u64) > header.size
                {
                    return Err(OpsError::Network(format!(
                        "a chunk at {offset} out of bounds"
                    )));
                }
                target.write(offset, Some(&data), data.len())?;
            }
            Frame::Zero(offset, len) => {
                let (Some(target), Some(header)) = (&target, &header_seen) else {
                    return Err(OpsError::Network("data before the header".into()));
                };
                if offset % header.chunk_bytes != 0
                    || len > header.chunk_bytes
                    || offset.saturating_add(len) > header.size
                {
                    return Err(OpsError::Network(format!(
                        "a zero chunk at {offset} out of bounds"
                    )));
                }
                target.write(offset, None, len as usize)?;
            }
            Frame::Written => {
                // A failover: the copy must be whole and durable before the term changes.
                let target = target
                    .take()
                    .ok_or_else(|| OpsError::Network("no data".into()))?;
                target.finish()?;
                let mut writer = &stream;
                writer
                    .write_all(b"written\n")
                    .map_err(|e| OpsError::Network(e.to_string()))?;
            }
            Frame::End(outcome) => {
                if outcome.code != 0 {
                    if let Some(target) = target {
                        target.abandon();
                    }
                    return ended(outcome);
                }
                if let Some(target) = target {
                    target.finish()?;
                }
                if header_seen.is_none() {
                    return Err(OpsError::Network("the daemon sent no point".into()));
                }
                return Ok(());
            }
        }
    }
}
