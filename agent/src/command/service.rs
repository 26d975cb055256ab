//! Running as a service: the control socket (`blkmirror status`), the Prometheus endpoint, and
//! systemd's notification protocol (`READY=1`, `STATUS=`, `WATCHDOG=1`), written by hand: it is
//! one datagram per message on `$NOTIFY_SOCKET`.
//!
//! The control socket is a Unix stream socket, mode 0600 in a 0700 directory (root only). A
//! client sends one line, `status`, and reads one JSON [`Snapshot`] until end of stream.

use sd_notify::NotifyState;
use std::{
    io,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    sync::{Semaphore, watch},
};

use crate::command::status::{self, Snapshot, StatusBoard};

/// Connections one listener serves at once; more are closed at once, so idle clients cannot
/// use up the process's descriptors.
const MAX_CONNECTIONS: usize = 32;

/// How long an accept loop pauses after `accept` failed `streak` times in a row: running out
/// of descriptors (EMFILE) must not spin a core. 10 ms doubling to 1 s.
pub fn accept_backoff(streak: u32) -> Duration {
    Duration::from_millis(10u64 << streak.min(7)).min(Duration::from_secs(1))
}

/// Handles one `accept` outcome for a loop: a stream gets a permit (or is dropped, closing it,
/// when all are taken); an error pauses the loop. Returns the stream and its permit to serve.
async fn admit<S>(
    accepted: io::Result<S>,
    permits: &Arc<Semaphore>,
    streak: &mut u32,
    what: &str,
) -> Option<(S, tokio::sync::OwnedSemaphorePermit)> {
    match accepted {
        Ok(stream) => {
            *streak = 0;
            // Dropping the stream without a permit closes it.
            permits
                .clone()
                .try_acquire_owned()
                .ok()
                .map(|permit| (stream, permit))
        }
        Err(error) => {
            if *streak == 0 {
                tracing::warn!(target: "blkmirror", "{what}: accept failed: {error}; pausing");
            }
            tokio::time::sleep(accept_backoff(*streak)).await;
            *streak = streak.saturating_add(1);
            None
        }
    }
}

/// Service errors.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The control socket could not be set up.
    #[error("control socket {path}: {source}")]
    Control {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The metrics endpoint could not be bound.
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// No daemon answered.
    #[error(
        "no blkmirror {role} is running here: {path}: {source} (is the service started? \
         `systemctl status blkmirror-{role}`)"
    )]
    NotRunning {
        /// agent or receiver.
        role: String,
        /// The socket tried.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The daemon's answer was not a status.
    #[error("{path}: unexpected answer: {message}")]
    BadAnswer {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
}

/// Binds the control socket at `path` (replacing a stale one) and serves snapshots, and, on a
/// receiver with `actions`, the recovery requests of `command::control`, authorized by role.
pub fn serve_control(
    path: &Path,
    board: Arc<StatusBoard>,
    mut shutdown: watch::Receiver<bool>,
    actions: Option<Arc<crate::command::control::Actions>>,
) -> Result<tokio::task::JoinHandle<()>, ServiceError> {
    let control_err = |source| ServiceError::Control {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        // Root only: created 0700 (an existing directory is left as it is).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(control_err)?;
    }
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(control_err(error)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(control_err)?;
    // With operator roles, every local user may connect and the daemon decides by peer
    // credentials; without, the socket stays root's.
    let open = actions.as_ref().is_some_and(|a| a.open_to_all());
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(if open { 0o666 } else { 0o600 }),
    )
    .map_err(control_err)?;
    if open && let Some(dir) = path.parent() {
        open_directory(dir);
    }
    let path = path.to_owned();
    Ok(tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut streak = 0;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let accepted = accepted.map(|(stream, _)| stream);
                    let Some((stream, permit)) =
                        admit(accepted, &permits, &mut streak, "control socket").await
                    else {
                        continue;
                    };
                    let board = board.clone();
                    let actions = actions.clone();
                    tokio::spawn(async move {
                        let _ = answer(stream, &board, actions).await;
                        drop(permit);
                    });
                }
                _ = shutdown.changed() => break,
            }
        }
        let _ = std::fs::remove_file(&path);
    }))
}

/// Makes the socket's directory reachable by every local user, when it is this process's own
/// private directory (0700, ours); any other directory is left as it is.
fn open_directory(dir: &Path) {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if let Ok(meta) = std::fs::metadata(dir)
        && meta.uid() == euid
        && meta.mode() & 0o777 == 0o700
    {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
}

/// Reads the request line: at most 4 KiB, byte by byte so that nothing after it is consumed
/// (a failover's client speaks again later on the same stream).
async fn request_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < crate::command::control::MAX_REQUEST {
        if stream.read(&mut byte).await? == 0 || byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

async fn answer(
    mut stream: UnixStream,
    board: &StatusBoard,
    actions: Option<Arc<crate::command::control::Actions>>,
) -> io::Result<()> {
    let line = tokio::time::timeout(Duration::from_secs(5), request_line(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let peer = match &actions {
        Some(actions) if actions.open_to_all() => {
            let uid = stream.peer_cred()?.uid();
            Some(
                tokio::task::spawn_blocking(move || crate::command::roles::peer_identity(uid))
                    .await
                    .map_err(io::Error::other)?,
            )
        }
        _ => None,
    };
    let reply = match line.trim() {
        "status" => {
            let refusal = match (&actions, &peer) {
                (Some(actions), Some(peer)) => actions.authorize_status(peer).err(),
                _ => None,
            };
            match refusal {
                Some(message) => serde_json::json!({ "error": format!("refused: {message}") })
                    .to_string(),
                None => serde_json::to_string(&board.snapshot(status::now_ms()))
                    .expect("snapshot serializes"),
            }
        }
        request if actions.is_some() && request.starts_with('{') => {
            let actions = actions.expect("checked");
            // Root only without roles: the socket's mode let nobody else in.
            let peer = match peer {
                Some(peer) => peer,
                None => {
                    let uid = stream.peer_cred()?.uid();
                    crate::command::roles::peer_identity(uid)
                }
            };
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            let request = request.to_owned();
            return tokio::task::spawn_blocking(move || actions.serve(stream, &peer, &request))
                .await
                .map_err(io::Error::other)?;
        }
        other => {
            serde_json::json!({ "error": format!("unknown request {:?}; send \"status\"", other.chars().take(80).collect::<String>()) })
                .to_string()
        }
    };
    stream.write_all(reply.as_bytes()).await?;
    stream.write_all(b"\n").await?;
    stream.shutdown().await
}

/// Asks the daemon at `path` for its status.
pub async fn query(path: &Path, role: &str) -> Result<Snapshot, ServiceError> {
    let not_running = |source| ServiceError::NotRunning {
        role: role.to_owned(),
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).await.map_err(not_running)?;
    stream.write_all(b"status\n").await.map_err(not_running)?;
    let mut text = String::new();
    stream
        .take(16 << 20)
        .read_to_string(&mut text)
        .await
        .map_err(not_running)?;
    serde_json::from_str(&text).map_err(|error| ServiceError::BadAnswer {
        path: path.to_owned(),
        message: format!("{error}: {}", text.chars().take(200).collect::<String>()),
    })
}

/// Serves `GET /metrics` (Prometheus text format) on `addr`.
pub async fn serve_metrics(
    addr: SocketAddr,
    board: Arc<StatusBoard>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, ServiceError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServiceError::Metrics { addr, source })?;
    Ok(tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut streak = 0;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let accepted = accepted.map(|(stream, _)| stream);
                    let Some((stream, permit)) =
                        admit(accepted, &permits, &mut streak, "metrics").await
                    else {
                        continue;
                    };
                    let board = board.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(10), http(stream, &board)).await;
                        drop(permit);
                    });
                }
                _ = shutdown.changed() => break,
            }
        }
    }))
}

async fn http(stream: tokio::net::TcpStream, board: &StatusBoard) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    // Requests are small; anything longer than 8 KiB of headers is cut off and answered.
    let mut reader = BufReader::new(read.take(8192));
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, content_type, body) = match (method, target) {
        ("GET", "/metrics") => (
            "200 OK",
            status::METRICS_CONTENT_TYPE,
            status::prometheus(&board.snapshot(status::now_ms())),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "see /metrics\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    write.write_all(head.as_bytes()).await?;
    write.write_all(body.as_bytes()).await?;
    write.shutdown().await
}

/// Tells systemd of a state change, if it is listening (`$NOTIFY_SOCKET`). A failure only
/// costs the notification, so it is logged, not returned.
pub fn notify(state: NotifyState<'_>) {
    if let Err(error) = sd_notify::notify(&[state]) {
        tracing::debug!(target: "blkmirror", "sd_notify: {error}");
    }
}

/// The watchdog interval systemd asked for (`$WATCHDOG_USEC`), for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|interval| !interval.is_zero())
}

/// Pings the watchdog and refreshes `STATUS=` every few seconds while `alive()` says the
/// replication loops are turning. A loop that stops ticking stops the pings, and systemd
/// restarts the service.
pub fn spawn_watchdog(
    board: Arc<StatusBoard>,
    alive: impl Fn() -> bool + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let watchdog = watchdog_interval();
    let period = watchdog
        .map(|w| w / 3)
        .unwrap_or(Duration::from_secs(5))
        .min(Duration::from_secs(5));
    tokio::spawn(async move {
        loop {
            let line = status::status_line(&board.snapshot(status::now_ms()));
            notify(NotifyState::Status(&line));
            if watchdog.is_some() && alive() {
                notify(NotifyState::Watchdog);
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => break,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_listening_socket() {
        let dir = std::env::temp_dir().join(format!("blkmirror-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // SAFETY: test-only; no other thread of this test binary reads NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        notify(NotifyState::Ready);
        // SAFETY: as above.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        // The protocol is newline-separated assignments (sd_notify(3)).
        assert_eq!(&buf[..n], b"READY=1\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn control_socket_answers_status_and_rejects_other_requests() {
        let dir = std::env::temp_dir().join(format!("blkmirror-control-{}", std::process::id()));
        let path = dir.join("agent.sock");
        let board = Arc::new(StatusBoard::new("agent"));
        board.update("db", |s| s.backlog_bytes = 5);
        let (_tx, rx) = watch::channel(false);
        let _server = serve_control(&path, board, rx, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Finding 15 of the hardening issue: the directory was created 0755.
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let snapshot = query(&path, "agent").await.unwrap();
        assert_eq!(snapshot.volumes[0].backlog_bytes, 5);
        let mut stream = UnixStream::connect(&path).await.unwrap();
        stream.write_all(b"shutdown\n").await.unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        assert!(text.contains("unknown request"), "{text}");
        let missing = query(&dir.join("nothing.sock"), "agent").await.unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("no blkmirror agent is running")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Finding 10: idle connections used up the descriptors and a failing accept spun a core.
    #[tokio::test]
    async fn idle_clients_cannot_take_every_connection_and_failures_back_off() {
        let dir = std::env::temp_dir().join(format!("blkmirror-idle-{}", std::process::id()));
        let path = dir.join("receiver.sock");
        let board = Arc::new(StatusBoard::new("receiver"));
        let (_tx, rx) = watch::channel(false);
        let _server = serve_control(&path, board, rx, None).unwrap();
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(UnixStream::connect(&path).await.unwrap());
        }
        // Past the bound, a connection is closed at once (end of stream, no answer).
        let mut extra = UnixStream::connect(&path).await.unwrap();
        let _ = extra.write_all(b"status\n").await;
        let mut text = String::new();
        let read = tokio::time::timeout(Duration::from_secs(3), extra.read_to_string(&mut text))
            .await
            .expect("an over-the-bound connection must be closed at once");
        assert!(read.is_err() || text.is_empty(), "{text}");
        // Once the idle ones go (they time out after 5 s, or close), status works again.
        drop(idle);
        let snapshot = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Ok(snapshot) = query(&path, "receiver").await {
                    return snapshot;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(snapshot.role, "receiver");
        std::fs::remove_dir_all(&dir).unwrap();
        // The pause after a failed accept grows and is capped.
        assert_eq!(accept_backoff(0), Duration::from_millis(10));
        assert!(accept_backoff(3) > accept_backoff(2));
        assert_eq!(accept_backoff(40), Duration::from_secs(1));
    }
}
