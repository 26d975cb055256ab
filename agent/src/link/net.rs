//! QUIC plumbing: endpoints with pinned mutual TLS, transport tuning, and length-prefixed
//! frames on streams. The protocol itself is in [`blkmirror_protocol::wire`].

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

use quinn::{
    Endpoint, IdleTimeout, TransportConfig, VarInt,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::link::identity::{self, Fingerprint, Identity, IdentityError};
use blkmirror_protocol::wire::{self, WireError};

/// How long a silent connection lives (keep-alives are sent at a third of it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

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

/// Transport tuning: flow-control windows sized for `window` bytes in flight (set it to the
/// link's bandwidth × round-trip time; the default suits up to ~1 Gbit/s at 100 ms).
pub fn transport_config(window: u64) -> TransportConfig {
    let window = window.clamp(1 << 20, 1 << 30);
    let mut transport = TransportConfig::default();
    let var = |v: u64| VarInt::from_u64(v).expect("window below 2^62");
    transport
        .stream_receive_window(var(window / 4))
        .receive_window(var(window))
        .send_window(window)
        .max_concurrent_uni_streams(var(64))
        .max_concurrent_bidi_streams(var(4))
        .keep_alive_interval(Some(IDLE_TIMEOUT / 3))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(IDLE_TIMEOUT).expect("idle timeout in range"),
        ));
    transport
}

/// An agent's endpoint: presents `identity`, admits only the receiver `receiver`.
pub fn client_endpoint(
    identity: &Identity,
    receiver: &Fingerprint,
    window: u64,
) -> Result<(Endpoint, quinn::ClientConfig), NetError> {
    let tls = identity::client_config(identity, receiver)?;
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|error| IdentityError::Tls(rustls::Error::General(error.to_string())))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(window)));
    let addr: SocketAddr = "[::]:0".parse().expect("valid address");
    let endpoint = Endpoint::client(addr)
        .or_else(|_| Endpoint::client("0.0.0.0:0".parse().expect("valid address")))
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
    let endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    let bind_error = |source| NetError::Bind {
        addr: listen,
        source,
    };
    let socket = std::net::UdpSocket::bind(listen).map_err(bind_error)?;
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
    config.transport_config(Arc::new(transport_config(window)));
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
    send.write_all(&wire::encode(message)).await?;
    Ok(())
}

/// Writes an already encoded frame.
pub async fn write_encoded(send: &mut quinn::SendStream, frame: &[u8]) -> Result<(), NetError> {
    send.write_all(frame).await?;
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
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|error| NetError::Read(error.to_string()))?;
    Ok(Some(wire::decode(&body)?))
}

/// Raw QUIC throughput on 127.0.0.1 with blkmirror's TLS and transport settings: `bytes` sent
/// in 1 MiB writes over `streams` unidirectional streams, nothing done with them but count.
/// The baseline of `cargo xtask bench replication`. Returns bytes per second.
pub async fn loopback_throughput(bytes: u64, streams: usize, window: u64) -> Result<f64, NetError> {
    let dir = std::env::temp_dir().join(format!("blkmirror-transport-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server_fp = identity::generate(&dir.join("server"), "server")?;
    let client_fp = identity::generate(&dir.join("client"), "client")?;
    let server_id = Identity::load(&dir.join("server"))?;
    let client_id = Identity::load(&dir.join("client"))?;
    let _ = std::fs::remove_dir_all(&dir);
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
    let (client, config) = client_endpoint(&client_id, &server_fp, window)?;
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
