//! QUIC plumbing: endpoints with pinned mutual TLS, transport tuning, and length-prefixed
//! frames on streams. The protocol itself is in [`blkmirror_protocol::wire`].

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

use quinn::{
    Endpoint, IdleTimeout, TransportConfig, VarInt, congestion,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::link::identity::{self, Fingerprint, Identity, IdentityError};
use blkmirror_protocol::{
    congestion::LossFilter,
    cubic::{FilteredCubic, PathMemory},
    wire::{self, WireError},
};

/// How long a silent connection lives. A receiver host that vanished without a word is
/// noticed after this long; a restarted receiver much sooner (see [`KEEP_ALIVE`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often an otherwise idle connection sends a ping. A restarted receiver answers the
/// first ping after its restart with a stateless reset (its reset key is derived from its
/// identity, so it survives the restart), and the agent notices the dead connection within
/// this interval plus one round trip, instead of waiting out [`IDLE_TIMEOUT`]. A ping is a
/// few dozen bytes a second.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// The UDP socket buffers asked for. The kernel caps `SO_RCVBUF` at `net.core.rmem_max`
/// unless the process may use `SO_RCVBUFFORCE` (root may); a receive buffer that is too
/// small drops datagrams at line rate before QUIC sees them (`RcvbufErrors` in
/// `/proc/net/snmp`), which costs as much as loss on the link.
pub const SOCKET_BUFFER: usize = 16 << 20;

/// The congestion controller of the side that sends data (the agent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Congestion {
    /// Loss-based (RFC 9438); quinn's default. Random loss on a long link throttles it to
    /// the Mathis limit.
    Cubic,
    /// Loss-based (RFC 9002's reference controller).
    #[value(name = "newreno")]
    NewReno,
    /// quinn's BBR (experimental there): model-based, so random loss does not slow it, but
    /// it sends at about twice the bottleneck rate and loses half at a tail-drop queue.
    Bbr,
    /// blkmirror's own Cubic ([`blkmirror_protocol::cubic`]) behind [`LossFilter`]: only
    /// losses that look like congestion (more than 3% of the bytes over two round trips)
    /// reach it, so random loss does not throttle it, and slow start ends when the round trip
    /// shows a standing queue, before the router's queue overflows. `cargo xtask bench wan`
    /// measures the controllers; see the README.
    #[default]
    #[value(name = "filtered-cubic")]
    FilteredCubic,
    /// quinn's Cubic behind [`LossFilter`]: slow start ends only at the first loss (the
    /// default of the releases before 2026-12-06, kept for comparison).
    #[value(name = "filtered-quinn-cubic")]
    FilteredQuinnCubic,
}

/// The initial window of quinn's controllers: 14720 bytes within 2 and 10 datagrams (RFC 9002),
/// which blkmirror's Cubic starts from too.
fn initial_window(mtu: u16) -> u64 {
    14720u64.clamp(2 * u64::from(mtu), 10 * u64::from(mtu))
}

/// What the latest connection observed of its path (its floor round trip and window), which
/// the next connection resumes from (Careful Resume, see [`blkmirror_protocol::cubic`]).
/// The agent's connections share one: a reconnect after a blackout resumes the window of the
/// connection before it, and the agent keeps it on disk for its next run (`--once`).
#[derive(Clone, Debug, Default)]
pub struct PathSlot(Arc<std::sync::Mutex<PathState>>);

#[derive(Debug, Default)]
struct PathState {
    memory: Option<PathMemory>,
    /// The window a connection jumped to from `memory`, until the agent reports it.
    resumed: Option<u64>,
}

impl PathSlot {
    /// A slot holding `memory` (from disk), if any.
    pub fn new(memory: Option<PathMemory>) -> Self {
        Self(Arc::new(std::sync::Mutex::new(PathState {
            memory,
            resumed: None,
        })))
    }

    /// What the latest connection observed.
    pub fn get(&self) -> Option<PathMemory> {
        self.0.lock().expect("path slot lock").memory
    }

    /// The window a connection resumed since the last call, if one did.
    pub fn take_resumed(&self) -> Option<u64> {
        self.0.lock().expect("path slot lock").resumed.take()
    }

    fn set(&self, memory: PathMemory) {
        self.0.lock().expect("path slot lock").memory = Some(memory);
    }

    fn set_resumed(&self, window: u64) {
        self.0.lock().expect("path slot lock").resumed = Some(window);
    }
}

/// Builds [`OwnCubic`] controllers, each resuming from what `path` holds.
#[derive(Debug)]
struct OwnCubicFactory {
    path: PathSlot,
}

impl congestion::ControllerFactory for OwnCubicFactory {
    fn build(
        self: Arc<Self>,
        now: std::time::Instant,
        current_mtu: u16,
    ) -> Box<dyn congestion::Controller> {
        let mut controller =
            FilteredCubic::new(u64::from(current_mtu), initial_window(current_mtu));
        if let Some(memory) = self.path.get() {
            controller.cubic.resume_from(memory);
        }
        Box::new(OwnCubic {
            controller,
            epoch: now,
            path: self.path.clone(),
            reported: false,
            recorded_at: None,
        })
    }
}

/// The adapter between blkmirror's pure [`FilteredCubic`] and quinn's controller interface:
/// instants become durations since the connection began.
#[derive(Clone)]
struct OwnCubic {
    controller: FilteredCubic,
    epoch: std::time::Instant,
    /// Where the path's latest memory goes, for the next connection.
    path: PathSlot,
    /// Whether the jump from the path's memory was put in the slot for the agent to report.
    reported: bool,
    /// When the path's memory was last put in the slot (since `epoch`).
    recorded_at: Option<Duration>,
}

/// How often a connection puts its path's memory in the slot: on ack frames, at most this
/// often (the slot's lock is shared by the agent's connections, and a memory this much older
/// than the connection's end changes nothing that halving the window for a resume does not).
const PATH_RECORD_EVERY: Duration = Duration::from_millis(50);

impl OwnCubic {
    fn since(&self, at: std::time::Instant) -> Duration {
        at.saturating_duration_since(self.epoch)
    }
}

impl congestion::Controller for OwnCubic {
    fn on_ack(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        let (now, sent) = (self.since(now), self.since(sent));
        self.controller
            .on_ack(now, sent, bytes, app_limited, rtt.get());
        if self.controller.cubic.resumed && !self.reported {
            self.reported = true;
            self.path.set_resumed(self.controller.cubic.window());
        }
    }

    fn on_end_acks(
        &mut self,
        now: std::time::Instant,
        _in_flight: u64,
        _app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        // Once per ack frame, at most every `PATH_RECORD_EVERY`. A connection that never grew
        // its window (control messages only) has nothing to teach the next one and leaves the
        // memory as it was.
        let now = self.since(now);
        if self
            .recorded_at
            .is_some_and(|at| now.saturating_sub(at) < PATH_RECORD_EVERY)
        {
            return;
        }
        let cubic = &self.controller.cubic;
        if let Some(memory) = cubic.path_memory()
            && memory.window > cubic.initial_window()
        {
            self.path.set(memory);
            self.recorded_at = Some(now);
        }
    }

    fn on_congestion_event(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        let (now, sent) = (self.since(now), self.since(sent));
        self.controller
            .on_loss(now, sent, lost_bytes, is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.controller.cubic.on_mtu_update(u64::from(new_mtu));
    }

    fn window(&self) -> u64 {
        self.controller.cubic.window()
    }

    fn metrics(&self) -> congestion::ControllerMetrics {
        let mut metrics = congestion::ControllerMetrics::default();
        metrics.congestion_window = self.controller.cubic.window();
        metrics.ssthresh = self.controller.cubic.ssthresh();
        metrics
    }

    fn clone_box(&self) -> Box<dyn congestion::Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.controller.cubic.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// A loss-based controller behind a [`LossFilter`]: the adapter between the pure filter and
/// quinn's controller interface.
#[derive(Debug)]
struct FilteredFactory<F>(Arc<F>);

impl<F: congestion::ControllerFactory + Send + Sync + 'static> congestion::ControllerFactory
    for FilteredFactory<F>
{
    fn build(
        self: Arc<Self>,
        now: std::time::Instant,
        current_mtu: u16,
    ) -> Box<dyn congestion::Controller> {
        Box::new(Filtered {
            inner: self.0.clone().build(now, current_mtu),
            filter: LossFilter::new(),
            epoch: now,
            rtt: Duration::from_millis(100),
        })
    }
}

struct Filtered {
    inner: Box<dyn congestion::Controller>,
    filter: LossFilter,
    /// The filter counts time from here.
    epoch: std::time::Instant,
    /// The latest smoothed round trip.
    rtt: Duration,
}

impl congestion::Controller for Filtered {
    fn on_sent(&mut self, now: std::time::Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.rtt = rtt.get();
        self.filter
            .on_ack(now.saturating_duration_since(self.epoch), bytes, self.rtt);
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: std::time::Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        // No bytes lost: an ECN congestion mark, which is never random.
        let congestion = lost_bytes == 0
            || self.filter.on_loss(
                now.saturating_duration_since(self.epoch),
                lost_bytes,
                self.rtt,
                is_persistent_congestion,
            );
        if congestion {
            self.inner
                .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window()
    }

    fn metrics(&self) -> congestion::ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn congestion::Controller> {
        Box::new(Filtered {
            inner: self.inner.clone_box(),
            filter: self.filter.clone(),
            epoch: self.epoch,
            rtt: self.rtt,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// Network errors.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// TLS setup.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Binding the socket.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Connecting.
    #[error("connecting to {addr}: {message}")]
    Connect {
        /// The address.
        addr: String,
        /// What failed.
        message: String,
    },
    /// The connection broke.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("sending: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading a stream failed.
    #[error("receiving: {0}")]
    Read(String),
    /// A frame broke the protocol.
    #[error("protocol violation: {0}")]
    Wire(#[from] WireError),
}

impl NetError {
    /// Whether the TLS handshake was refused (an unknown certificate on either side): a
    /// configuration error, not worth retrying.
    pub fn is_handshake_refusal(&self) -> bool {
        let crypto = |code: quinn::TransportErrorCode| {
            let code = u64::from(code);
            (0x100..0x200).contains(&code)
        };
        match self {
            NetError::Connection(quinn::ConnectionError::TransportError(error)) => {
                crypto(error.code)
            }
            NetError::Connection(quinn::ConnectionError::ConnectionClosed(close)) => {
                crypto(close.error_code)
            }
            _ => false,
        }
    }
}

/// Transport tuning: flow-control windows sized for `window` bytes in flight (at least the
/// link's bandwidth × round-trip time; the default, 32 MiB, suits up to 1 Gbit/s at 250 ms),
/// and the congestion controller.
pub fn transport_config(window: u64, congestion: Congestion) -> TransportConfig {
    transport_config_on(window, congestion, PathSlot::default())
}

/// [`transport_config`] for connections that resume from, and record into, `path` (with
/// `filtered-cubic`; the other controllers start from their initial window).
pub fn transport_config_on(window: u64, congestion: Congestion, path: PathSlot) -> TransportConfig {
    let window = window.clamp(1 << 20, 1 << 30);
    let mut transport = TransportConfig::default();
    let var = |v: u64| VarInt::from_u64(v).expect("window below 2^62");
    transport
        .stream_receive_window(var(window / 4))
        .receive_window(var(window))
        .send_window(window)
        .max_concurrent_uni_streams(var(64))
        .max_concurrent_bidi_streams(var(4))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(IDLE_TIMEOUT).expect("idle timeout in range"),
        ));
    // The initial congestion window stays quinn's; the controllers grow it from there.
    match congestion {
        Congestion::Cubic => {
            transport.congestion_controller_factory(Arc::new(congestion::CubicConfig::default()))
        }
        Congestion::NewReno => {
            transport.congestion_controller_factory(Arc::new(congestion::NewRenoConfig::default()))
        }
        Congestion::Bbr => {
            transport.congestion_controller_factory(Arc::new(congestion::BbrConfig::default()))
        }
        Congestion::FilteredCubic => {
            transport.congestion_controller_factory(Arc::new(OwnCubicFactory { path }))
        }
        Congestion::FilteredQuinnCubic => transport.congestion_controller_factory(Arc::new(
            FilteredFactory(Arc::new(congestion::CubicConfig::default())),
        )),
    };
    transport
}

/// A UDP socket bound to `addr` with [`SOCKET_BUFFER`]-sized buffers (or as close as the
/// kernel allows: the sizes granted are logged when smaller).
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let want = SOCKET_BUFFER as libc::c_int;
    for (force, plain, name, sysctl) in [
        (
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            "receive",
            "net.core.rmem_max",
        ),
        (
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            "send",
            "net.core.wmem_max",
        ),
    ] {
        if set_socket_int(&socket, force, want).is_err() {
            // Not privileged: the plain option, capped by the sysctl.
            let _ = set_socket_int(&socket, plain, want);
        }
        // Linux reports twice the size asked for (it counts its bookkeeping).
        let granted = get_socket_int(&socket, plain).unwrap_or(0) / 2;
        if granted < want {
            tracing::warn!(
                target: "blkmirror",
                "UDP {name} buffer is {} KiB, not the {} KiB asked for: raise {sysctl} (or run \
                 as root) to avoid drops at high rates",
                granted / 1024,
                want / 1024
            );
        }
    }
    Ok(socket)
}

fn set_socket_int(
    socket: &std::net::UdpSocket,
    option: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setsockopt on an open socket we own, with a pointer to a live c_int and its
    // size.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn get_socket_int(socket: &std::net::UdpSocket, option: libc::c_int) -> std::io::Result<i32> {
    use std::os::fd::AsRawFd as _;
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on an open socket we own, into a live c_int whose size `len` holds.
    let done = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if done == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An agent's endpoint: presents `identity`, admits only the receiver `receiver`; its
/// connections resume from and record into `path`.
pub fn client_endpoint(
    identity: &Identity,
    receiver: &identity::ReceiverPins,
    window: u64,
    congestion: Congestion,
    path: PathSlot,
) -> Result<(Endpoint, quinn::ClientConfig), NetError> {
    let tls = identity::client_config(identity, receiver)?;
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|error| IdentityError::Tls(rustls::Error::General(error.to_string())))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config_on(window, congestion, path)));
    let addr: SocketAddr = "[::]:0".parse().expect("valid address");
    let socket = udp_socket(addr)
        .or_else(|_| udp_socket("0.0.0.0:0".parse().expect("valid address")))
        .map_err(|source| NetError::Bind { addr, source })?;
    let endpoint = Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| NetError::Bind { addr, source })?;
    Ok((endpoint, config))
}

/// A receiver's endpoint on `listen`: presents `identity`, admits the `admitted` agents.
pub fn server_endpoint(
    identity: &Identity,
    admitted: BTreeSet<Fingerprint>,
    listen: SocketAddr,
    window: u64,
) -> Result<Endpoint, NetError> {
    let config = server_config(identity, admitted, window)?;
    // The stateless-reset key is derived from the identity, so a restarted receiver can tell
    // agents at once that their old connection is gone (instead of them waiting for the idle
    // timeout).
    let mut seed = b"blkmirror stateless reset key".to_vec();
    seed.extend_from_slice(identity.key.secret_der());
    let secret = ring::digest::digest(&ring::digest::SHA256, &seed);
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref());
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // The connection IDs carry a keyed check that the endpoint verifies before it answers a
    // packet for an unknown connection with a reset. quinn keys it at random per endpoint, so
    // a restarted receiver took the agents' old IDs for forgeries and stayed silent: derive
    // that key from the identity as well.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(
        &ring::digest::digest(
            &ring::digest::SHA256,
            &[b"cid:".as_slice(), secret.as_ref()].concat(),
        )
        .as_ref()[..8],
    );
    let cid_key = u64::from_le_bytes(cid_key);
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let bind_error = |source| NetError::Bind {
        addr: listen,
        source,
    };
    let socket = udp_socket(listen).map_err(bind_error)?;
    Endpoint::new(
        endpoint_config,
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)
}

/// The receiver's QUIC configuration admitting exactly `admitted` (also used to swap the
/// admitted set of a running endpoint on a configuration reload).
pub fn server_config(
    identity: &Identity,
    admitted: BTreeSet<Fingerprint>,
    window: u64,
) -> Result<quinn::ServerConfig, NetError> {
    let tls = identity::server_config(identity, admitted)?;
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|error| IdentityError::Tls(rustls::Error::General(error.to_string())))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // The receiver sends little (acks, replies, hashes): the controller matters for the agent.
    config.transport_config(Arc::new(transport_config(window, Congestion::default())));
    Ok(config)
}

/// The fingerprint of the certificate the peer presented.
pub fn peer_fingerprint(connection: &quinn::Connection) -> Option<Fingerprint> {
    let identity = connection.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|cert| Fingerprint::of(cert))
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
) -> Result<(), NetError> {
    write_encoded(send, wire::encode(message)).await
}

/// Writes an already encoded frame. The stream takes the buffer as it is: a data frame of
/// 1 MiB is not copied again on its way to the packets.
pub async fn write_encoded(send: &mut quinn::SendStream, frame: Vec<u8>) -> Result<(), NetError> {
    send.write_chunk(bytes::Bytes::from(frame)).await?;
    Ok(())
}

/// Reads one frame; `None` when the stream ended cleanly between frames.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, NetError> {
    let mut head = [0u8; 4];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(error) => return Err(NetError::Read(error.to_string())),
    }
    let len = wire::check_frame_len(u32::from_le_bytes(head))?;
    // Gathered from the stream's own buffers, without zeroing a buffer first.
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(NetError::Read(format!(
                    "the stream ended inside a frame, after {} of its {len} bytes",
                    body.len()
                )));
            }
            Err(error) => return Err(NetError::Read(error.to_string())),
        }
    }
    Ok(Some(wire::decode(&body)?))
}

/// Raw QUIC throughput on 127.0.0.1 with blkmirror's TLS and transport settings: `bytes` sent
/// in 1 MiB writes over `streams` unidirectional streams, nothing done with them but count.
/// The baseline of `cargo xtask bench replication`. Returns bytes per second.
pub async fn loopback_throughput(
    bytes: u64,
    streams: usize,
    window: u64,
    congestion: Congestion,
) -> Result<f64, NetError> {
    let (server_id, server_fp, client_id, client_fp) = throwaway_peers()?;
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let server = server_endpoint(&server_id, BTreeSet::from([client_fp]), listen, window)?;
    let addr = server.local_addr().map_err(|source| NetError::Bind {
        addr: listen,
        source,
    })?;
    let sink = tokio::spawn(async move {
        let Some(incoming) = server.accept().await else {
            return 0u64;
        };
        let Ok(connection) = incoming.await else {
            return 0;
        };
        let mut readers = Vec::new();
        while let Ok(mut stream) = connection.accept_uni().await {
            readers.push(tokio::spawn(async move {
                let mut total = 0u64;
                while let Ok(Some(chunk)) = stream.read_chunk(1 << 20, false).await {
                    total += chunk.bytes.len() as u64;
                }
                total
            }));
        }
        let mut total = 0;
        for reader in readers {
            total += reader.await.unwrap_or(0);
        }
        total
    });
    let (client, config) = client_endpoint(
        &client_id,
        &server_fp.clone().into(),
        window,
        congestion,
        PathSlot::default(),
    )?;
    let connection = client
        .connect_with(config, addr, "blkmirror")
        .map_err(|error| NetError::Connect {
            addr: addr.to_string(),
            message: error.to_string(),
        })?
        .await?;
    let started = std::time::Instant::now();
    let per_stream = bytes / streams.max(1) as u64;
    let mut writers = Vec::new();
    for _ in 0..streams.max(1) {
        let mut stream = connection.open_uni().await?;
        writers.push(tokio::spawn(async move {
            let block = vec![0x5au8; 1 << 20];
            let mut sent = 0;
            while sent < per_stream {
                stream.write_all(&block).await?;
                sent += block.len() as u64;
            }
            stream.finish().ok();
            stream.stopped().await.ok();
            Ok::<_, NetError>(())
        }));
    }
    for writer in writers {
        writer.await.expect("writer task")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    connection.close(quinn::VarInt::from_u32(0), b"done");
    let received = sink.await.unwrap_or(0);
    client.wait_idle().await;
    Ok(received as f64 / seconds)
}

/// A server and a client identity for the transport benchmarks, made in a temporary directory
/// that is removed at once: (server, its fingerprint, client, its fingerprint).
fn throwaway_peers() -> Result<(Identity, Fingerprint, Identity, Fingerprint), NetError> {
    let dir = std::env::temp_dir().join(format!("blkmirror-transport-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let made = (|| {
        let server_fp = identity::generate(&dir.join("server"), "server")?;
        let client_fp = identity::generate(&dir.join("client"), "client")?;
        let server_id = Identity::load(&dir.join("server"))?;
        let client_id = Identity::load(&dir.join("client"))?;
        Ok::<_, IdentityError>((server_id, server_fp, client_id, client_fp))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(made?)
}

/// The baseline for raw QUIC: `bytes` over one TCP connection on 127.0.0.1 with the same
/// TLS 1.3 configuration (rustls, pinned identities, the same cipher suites), a thread on each
/// side, 1 MiB writes. Returns bytes per second, timed from the end of the handshake to the
/// last byte read, as [`loopback_throughput`] is.
pub fn loopback_tls_tcp_throughput(bytes: u64) -> Result<f64, NetError> {
    use std::io::{Read as _, Write as _};
    let (server_id, server_fp, client_id, client_fp) = throwaway_peers()?;
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let bind = |source| NetError::Bind {
        addr: listen,
        source,
    };
    let listener = std::net::TcpListener::bind(listen).map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    let server_tls = Arc::new(identity::server_config(
        &server_id,
        BTreeSet::from([client_fp]),
    )?);
    let tls_error = |error: rustls::Error| NetError::Read(format!("TLS over TCP: {error}"));
    let io_error = |error: std::io::Error| NetError::Read(format!("TCP: {error}"));
    let sink = std::thread::spawn(move || -> Result<(u64, std::time::Instant), NetError> {
        let (socket, _) = listener.accept().map_err(io_error)?;
        let connection = rustls::ServerConnection::new(server_tls).map_err(tls_error)?;
        let mut stream = rustls::StreamOwned::new(connection, socket);
        let mut buffer = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => total += read as u64,
                // The client closed the socket after its close_notify.
                Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(error) => return Err(io_error(error)),
            }
        }
        Ok((total, std::time::Instant::now()))
    });
    let client_tls = Arc::new(identity::client_config(&client_id, &server_fp.into())?);
    let name = rustls::pki_types::ServerName::try_from("blkmirror").expect("a valid name");
    let mut connection = rustls::ClientConnection::new(client_tls, name).map_err(tls_error)?;
    let mut socket = std::net::TcpStream::connect(addr).map_err(io_error)?;
    socket.set_nodelay(true).map_err(io_error)?;
    while connection.is_handshaking() {
        connection.complete_io(&mut socket).map_err(io_error)?;
    }
    let started = std::time::Instant::now();
    let mut stream = rustls::StreamOwned::new(connection, socket);
    let block = vec![0x5au8; 1 << 20];
    let mut sent = 0;
    while sent < bytes {
        stream.write_all(&block).map_err(io_error)?;
        sent += block.len() as u64;
    }
    stream.conn.send_close_notify();
    stream.flush().map_err(io_error)?;
    let _ = stream.sock.shutdown(std::net::Shutdown::Write);
    let (received, ended) = sink.join().expect("TCP sink thread")?;
    if received < sent {
        return Err(NetError::Read(format!(
            "TCP: {received} of {sent} bytes arrived"
        )));
    }
    Ok(received as f64 / ended.duration_since(started).as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tcp_baseline_carries_its_bytes_over_tls() {
        let rate = loopback_tls_tcp_throughput(32 << 20).expect("a TLS transfer over TCP");
        assert!(rate > 1e6, "{rate} bytes/s");
    }

    struct Peers {
        dir: std::path::PathBuf,
        server: Identity,
        server_fp: Fingerprint,
        client: Identity,
        client_fp: Fingerprint,
    }

    impl Peers {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("blkmirror-net-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let server_fp = identity::generate(&dir.join("server"), "server").unwrap();
            let client_fp = identity::generate(&dir.join("client"), "client").unwrap();
            Self {
                server: Identity::load(&dir.join("server")).unwrap(),
                client: Identity::load(&dir.join("client")).unwrap(),
                dir,
                server_fp,
                client_fp,
            }
        }

        /// A receiver endpoint on `listen` in a runtime of its own, holding every connection
        /// it accepts until the runtime goes.
        fn serve(&self, listen: SocketAddr) -> (tokio::runtime::Runtime, SocketAddr) {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let endpoint = {
                let _entered = runtime.enter();
                server_endpoint(
                    &self.server,
                    BTreeSet::from([self.client_fp.clone()]),
                    listen,
                    32 << 20,
                )
                .unwrap()
            };
            let address = endpoint.local_addr().unwrap();
            runtime.spawn(async move {
                let mut held = Vec::new();
                while let Some(incoming) = endpoint.accept().await {
                    if let Ok(connection) = incoming.await {
                        held.push(connection);
                    }
                }
            });
            (runtime, address)
        }
    }

    impl Drop for Peers {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A receiver that dies without a word (its runtime is torn down: no close frame) and
    /// comes back on the same port is noticed by a connected, idle agent within 2 s, by a
    /// stateless reset, over an 80 ms link.
    #[test]
    fn an_idle_agent_notices_a_restarted_receiver_within_two_seconds() {
        let peers = Peers::new("restart");
        let (first, address) = peers.serve("127.0.0.1:0".parse().unwrap());
        let link = blkmirror_wan::LinkSpec {
            delay: Duration::from_millis(40),
            ..blkmirror_wan::LinkSpec::default()
        };
        let relay =
            blkmirror_wan::Relay::start("127.0.0.1:0".parse().unwrap(), address, link, link, 7)
                .unwrap();
        let client = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let connection = client.block_on(async {
            let (endpoint, config) = client_endpoint(
                &peers.client,
                &peers.server_fp.clone().into(),
                32 << 20,
                Congestion::default(),
                PathSlot::default(),
            )
            .unwrap();
            endpoint
                .connect_with(config, relay.address(), "blkmirror")
                .unwrap()
                .await
                .unwrap()
        });
        // The receiver crashes: its tasks and socket are dropped, nothing is sent.
        first.shutdown_timeout(Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            connection.close_reason().is_none(),
            "a crashed receiver says nothing, and the idle timeout is far"
        );
        let (_second, _) = peers.serve(address);
        let restarted = std::time::Instant::now();
        let reason = client
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(5), connection.closed()).await
            })
            .expect("the dead connection is noticed within 5 s");
        let noticed = restarted.elapsed();
        assert!(
            matches!(reason, quinn::ConnectionError::Reset),
            "noticed by a stateless reset, not {reason:?}"
        );
        assert!(
            noticed <= Duration::from_secs(2),
            "noticed after {noticed:?}"
        );
    }
}
