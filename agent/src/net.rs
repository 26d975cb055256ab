//! QUIC plumbing: endpoints with pinned mutual TLS, transport tuning, and length-prefixed
//! frames on streams. The protocol itself is in [`crate::wire`].

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

use quinn::{
    Endpoint, IdleTimeout, TransportConfig, VarInt,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    identity::{self, Fingerprint, Identity, IdentityError},
    wire::{self, WireError},
};

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
    let tls = identity::server_config(identity, admitted)?;
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|error| IdentityError::Tls(rustls::Error::General(error.to_string())))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(window)));
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
