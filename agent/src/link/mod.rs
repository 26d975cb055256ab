//! What both ends share on the network: QUIC endpoints with mutual TLS, and the identities
//! (keys and certificates) they present.

pub mod identity;
pub mod net;
