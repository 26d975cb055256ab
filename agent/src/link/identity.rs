//! Identities and mutual TLS by pinned fingerprints.
//!
//! Each side has a key and a self-signed certificate made by `blkmirror keygen`. There is no
//! certificate authority: each side is told the other's SHA-256 certificate *fingerprint* and
//! admits exactly that certificate. The TLS handshake still proves possession of the key (the
//! signature checks are rustls's), so a copied certificate without its key is useless.

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

/// ALPN protocol name of blkmirror's replication protocol.
pub const ALPN: &[u8] = b"blkmirror/1";

/// The name of the key file in an identity directory.
pub const KEY_FILE: &str = "identity.key";
/// The name of the certificate file in an identity directory.
pub const CERT_FILE: &str = "identity.crt";

/// Identity and TLS errors.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing identity files failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The directory already holds an identity.
    #[error("{0} already holds an identity; refusing to overwrite it (remove it first)")]
    Exists(PathBuf),
    /// A PEM file does not hold what it should.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Making the key or certificate failed.
    #[error("generating the identity: {0}")]
    Generate(#[from] rcgen::Error),
    /// A fingerprint is not 64 hex digits.
    #[error(
        "fingerprint {0:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed); \
         `blkmirror keygen` prints it"
    )]
    Fingerprint(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A certificate's SHA-256 fingerprint, lower-case hex.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(cert: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, cert);
        Self(hex::encode(digest.as_ref()))
    }

    /// Parses 64 hex digits, with or without colons, any case.
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let digits: String = text
            .trim()
            .chars()
            .filter(|&c| c != ':')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if digits.len() == 64 && digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(digits))
        } else {
            Err(IdentityError::Fingerprint(text.chars().take(100).collect()))
        }
    }

    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The receivers an agent accepts: the fingerprints of one receiver, or of the several
/// receivers of a DR site that share an object store. Written comma-separated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiverPins(Vec<Fingerprint>);

/// The most receivers an agent is given.
pub const MAX_RECEIVERS: usize = 16;

impl ReceiverPins {
    /// Parses `FP[,FP...]`: at least one, at most [`MAX_RECEIVERS`], duplicates dropped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pins: Vec<Fingerprint> = Vec::new();
        for part in text.split(',') {
            let fingerprint = Fingerprint::parse(part).map_err(|error| error.to_string())?;
            if !pins.contains(&fingerprint) {
                pins.push(fingerprint);
            }
        }
        if pins.len() > MAX_RECEIVERS {
            return Err(format!(
                "{} receiver fingerprints; at most {MAX_RECEIVERS}",
                pins.len()
            ));
        }
        Ok(Self(pins))
    }

    /// The fingerprints.
    pub fn fingerprints(&self) -> &[Fingerprint] {
        &self.0
    }
}

impl From<Fingerprint> for ReceiverPins {
    fn from(fingerprint: Fingerprint) -> Self {
        Self(vec![fingerprint])
    }
}

impl std::fmt::Display for ReceiverPins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, fingerprint) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{fingerprint}")?;
        }
        Ok(())
    }
}

/// Parses a receiver list, `HOST:PORT[,HOST:PORT...]`: at least one, at most
/// [`MAX_RECEIVERS`].
pub fn parse_receivers(text: &str) -> Result<Vec<String>, String> {
    let receivers: Vec<String> = text.split(',').map(|s| s.trim().to_owned()).collect();
    for receiver in &receivers {
        if receiver
            .rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(format!("{receiver:?} is not HOST:PORT"));
        }
    }
    if receivers.len() > MAX_RECEIVERS {
        return Err(format!(
            "{} receivers; at most {MAX_RECEIVERS}",
            receivers.len()
        ));
    }
    Ok(receivers)
}

/// A loaded identity: certificate and key.
pub struct Identity {
    /// The certificate (DER).
    pub cert: CertificateDer<'static>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The certificate's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    /// Loads `DIR/identity.crt` and `DIR/identity.key`.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let cert =
            CertificateDer::from_pem_file(&cert_path).map_err(|error| IdentityError::Pem {
                path: cert_path.clone(),
                message: format!("no certificate: {error} (create one with `blkmirror keygen`)"),
            })?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|error| IdentityError::Pem {
            path: key_path.clone(),
            message: format!("no private key: {error}"),
        })?;
        Ok(Self { cert, key })
    }
}

/// Creates a new identity in `dir` (key mode 0600) and returns its fingerprint.
pub fn generate(dir: &Path, name: &str) -> Result<Fingerprint, IdentityError> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if cert_path.exists() || key_path.exists() {
        return Err(IdentityError::Exists(dir.to_owned()));
    }
    fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
        what: "creating",
        path: dir.to_owned(),
        source,
    })?;
    let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()])?;
    write_new(
        &key_path,
        certified.key_pair.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&cert_path, certified.cert.pem().as_bytes(), 0o644)?;
    Ok(Fingerprint::of(certified.cert.der()))
}

fn write_new(path: &Path, content: &[u8], mode: u32) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        what: "writing",
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(content).map_err(io)?;
    file.sync_all().map_err(io)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pinned(
    admitted: &BTreeSet<Fingerprint>,
    cert: &CertificateDer<'_>,
) -> Result<(), rustls::Error> {
    if admitted.contains(&Fingerprint::of(cert)) {
        Ok(())
    } else {
        Err(rustls::Error::General(format!(
            "certificate {} is not admitted",
            Fingerprint::of(cert)
        )))
    }
}

/// Admits the receiver whose fingerprint the agent was given.
#[derive(Debug)]
struct PinnedServer {
    admitted: BTreeSet<Fingerprint>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        pinned(&self.admitted, end_entity).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Admits agents whose fingerprints the receiver was given; a certificate is mandatory.
#[derive(Debug)]
struct PinnedClients {
    admitted: BTreeSet<Fingerprint>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        pinned(&self.admitted, end_entity).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// TLS 1.3 client configuration for an agent: presents `identity`, admits only `receiver`.
pub fn client_config(
    identity: &Identity,
    receivers: &ReceiverPins,
) -> Result<rustls::ClientConfig, IdentityError> {
    let provider = provider();
    let verifier = PinnedServer {
        admitted: receivers.fingerprints().iter().cloned().collect(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// TLS 1.3 server configuration for a receiver: presents `identity`, requires a client
/// certificate with one of the `admitted` fingerprints.
pub fn server_config(
    identity: &Identity,
    admitted: BTreeSet<Fingerprint>,
) -> Result<rustls::ServerConfig, IdentityError> {
    let provider = provider();
    let verifier = PinnedClients {
        admitted,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_common_spellings() {
        let plain = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(
            Fingerprint::parse(&plain).unwrap(),
            Fingerprint::parse(&colons).unwrap()
        );
        assert!(Fingerprint::parse("abc").is_err());
        assert!(Fingerprint::parse(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn receiver_lists_are_bounded_checked_and_deduplicated() {
        let (a, b) = ("a".repeat(64), "B".repeat(64));
        let pins = ReceiverPins::parse(&format!("{a}, {b},{a}")).unwrap();
        assert_eq!(pins.fingerprints().len(), 2);
        assert_eq!(pins.to_string(), format!("{a},{}", "b".repeat(64)));
        assert!(ReceiverPins::parse(&format!("{a},")).is_err());
        assert!(ReceiverPins::parse("").is_err());
        let many: Vec<String> = (0..17).map(|i| format!("{i:064x}")).collect();
        assert!(
            ReceiverPins::parse(&many.join(","))
                .unwrap_err()
                .contains("at most 16")
        );
        assert_eq!(
            parse_receivers("dr-a:7443, [::1]:7443").unwrap(),
            vec!["dr-a:7443".to_owned(), "[::1]:7443".to_owned()]
        );
        for bad in ["dr-a", "dr-a:7443,", ":7443", "dr-a:port"] {
            assert!(parse_receivers(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keygen_writes_a_private_key_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("blkmirror-keygen-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let fingerprint = generate(&dir, "test").unwrap();
        let mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let identity = Identity::load(&dir).unwrap();
        assert_eq!(identity.fingerprint(), fingerprint);
        assert!(matches!(
            generate(&dir, "test"),
            Err(IdentityError::Exists(_))
        ));
        client_config(&identity, &fingerprint.clone().into()).unwrap();
        server_config(&identity, BTreeSet::from([fingerprint])).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
