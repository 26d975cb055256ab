//! The grants that the receivers of one object store share (the object `grants`).
//!
//! Which agent may write which volumes is, on one receiver, its `receiver.toml`'s `[[agent]]`
//! list. Receivers that serve one store must agree on it: an agent moves to another receiver
//! when one dies, and a grant revoked on one receiver but not on the others would still let
//! the agent in. So with a store, the grants live in the store, in one small versioned
//! record, and every receiver enforces that record:
//! - the first receiver to start over an empty store seeds it with its own list;
//! - `blkmirror store grants --publish --config receiver.toml` replaces it with that file's
//!   list (one version more), and every receiver applies it within [`GRANTS_POLL`]: new
//!   handshakes admit exactly the new agents, and sessions whose grant was withdrawn are
//!   closed, as a local reload does;
//! - a receiver whose own list differs says so at start and on reload, and enforces the
//!   store's.
//!
//! Every change is a conditional write against the version read ("create only if absent",
//! then "replace only if unchanged"), so two operators publishing at once cannot both win
//! with the same version number. Whoever holds the store's credentials can change the grants,
//! as they can change the points; each receiver records every version it applies in its audit
//! log, which the shared audit chain ([`crate::dr::auditchain`]) carries to the store.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dr::objstore::{Created, ObjectStoreClient, StoreError};
use crate::dr::receiver::Grants;
use crate::link::identity::Fingerprint;
use blkmirror_protocol::wire;

/// The object.
pub const GRANTS_KEY: &str = "grants";
/// The format of the record this build writes; a newer one is refused, never reinterpreted.
pub const GRANTS_FORMAT: u32 = 1;
/// The largest record read (about 100 bytes per agent and volume).
pub const MAX_GRANTS_BYTES: usize = 4 << 20;
/// The most agents a record may name.
pub const MAX_GRANTED_AGENTS: usize = 100_000;
/// How often a receiver reads the record to apply a new version.
pub const GRANTS_POLL: Duration = Duration::from_secs(5);
/// How many times a publish retries after losing a race.
const MAX_PUBLISH_ATTEMPTS: usize = 8;

/// Errors of the shared grants.
#[derive(Debug, thiserror::Error)]
pub enum GrantsError {
    /// A request failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The record is not a grants record.
    #[error("object store: the grants record ({GRANTS_KEY}) is malformed: {0}")]
    Malformed(String),
    /// Others kept changing it.
    #[error(
        "object store: the grants changed {MAX_PUBLISH_ATTEMPTS} times while this publish ran; \
         nothing was written, try again"
    )]
    Contended,
    /// The store gave no version to write against.
    #[error(
        "object store: reading the grants gave no ETag, so they cannot be changed safely \
         (this store lacks conditional writes)"
    )]
    NoVersion,
}

/// One agent's grant, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentGrant {
    /// The agent's certificate fingerprint.
    pub fingerprint: String,
    /// The volumes it may write.
    pub volumes: Vec<String>,
}

/// The record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsRecord {
    /// [`GRANTS_FORMAT`].
    pub format: u32,
    /// 1, 2, ...: one more at every change.
    pub version: u64,
    /// When it was written (Unix milliseconds).
    pub published_unix_ms: u64,
    /// Who wrote it (a receiver's id, or `user@host` for the command).
    pub by: String,
    /// The grants.
    pub agents: Vec<AgentGrant>,
}

impl GrantsRecord {
    /// A record of `grants`.
    pub fn of(grants: &Grants, version: u64, by: &str, now_unix_ms: u64) -> Self {
        Self {
            format: GRANTS_FORMAT,
            version,
            published_unix_ms: now_unix_ms,
            by: by.to_owned(),
            agents: grants
                .iter()
                .map(|(fingerprint, volumes)| AgentGrant {
                    fingerprint: fingerprint.to_string(),
                    volumes: volumes.iter().cloned().collect(),
                })
                .collect(),
        }
    }

    /// The record's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a record serializes")
    }

    /// Parses and checks a stored record. Pure; the fuzz target drives it.
    pub fn decode(bytes: &[u8]) -> Result<Self, GrantsError> {
        let malformed = GrantsError::Malformed;
        if bytes.len() > MAX_GRANTS_BYTES {
            return Err(malformed(format!(
                "{} bytes, more than the {MAX_GRANTS_BYTES} a record can be",
                bytes.len()
            )));
        }
        let record: Self =
            serde_json::from_slice(bytes).map_err(|error| malformed(error.to_string()))?;
        if record.format > GRANTS_FORMAT {
            return Err(malformed(format!(
                "format {} is newer than this build reads ({GRANTS_FORMAT})",
                record.format
            )));
        }
        if record.version == 0 {
            return Err(malformed("version 0".into()));
        }
        if record.agents.len() > MAX_GRANTED_AGENTS {
            return Err(malformed(format!(
                "{} agents, more than {MAX_GRANTED_AGENTS}",
                record.agents.len()
            )));
        }
        if record.by.len() > 256 {
            return Err(malformed("`by` is longer than 256 bytes".into()));
        }
        record.grants()?;
        Ok(record)
    }

    /// The grants it holds.
    pub fn grants(&self) -> Result<Grants, GrantsError> {
        let mut grants = Grants::new();
        for agent in &self.agents {
            let fingerprint = Fingerprint::parse(&agent.fingerprint)
                .map_err(|error| GrantsError::Malformed(error.to_string()))?;
            if grants.contains_key(&fingerprint) {
                return Err(GrantsError::Malformed(format!(
                    "agent {fingerprint} is listed twice"
                )));
            }
            if agent.volumes.is_empty() {
                return Err(GrantsError::Malformed(format!(
                    "agent {fingerprint} is granted no volume"
                )));
            }
            let mut volumes = std::collections::BTreeSet::new();
            for volume in &agent.volumes {
                wire::check_volume_name(volume).map_err(|error| {
                    GrantsError::Malformed(format!("agent {fingerprint}: {error}"))
                })?;
                volumes.insert(volume.clone());
            }
            grants.insert(fingerprint, volumes);
        }
        Ok(grants)
    }

    /// One line for logs and the command's output.
    pub fn summary(&self) -> String {
        format!(
            "version {}, {} agent(s), published by {} at {}",
            self.version,
            self.agents.len(),
            self.by,
            blkmirror_protocol::units::format_utc(self.published_unix_ms)
        )
    }
}

/// The store's record and its ETag, if it has one.
pub async fn read(
    client: &ObjectStoreClient,
) -> Result<Option<(GrantsRecord, String)>, GrantsError> {
    match client.get(GRANTS_KEY, MAX_GRANTS_BYTES).await? {
        None => Ok(None),
        Some((bytes, e_tag)) => {
            let record = GrantsRecord::decode(&bytes)?;
            Ok(Some((record, e_tag.ok_or(GrantsError::NoVersion)?)))
        }
    }
}

/// The store's grants; if it has none, `grants` become version `version`: 1 for a new store,
/// or the version in force on a receiver that finds the record gone (so that an emptied store
/// gets back the grants in force, not the list a receiver started with, which may re-admit
/// agents revoked since).
pub async fn seed(
    client: &ObjectStoreClient,
    grants: &Grants,
    version: u64,
    by: &str,
    now_unix_ms: u64,
) -> Result<GrantsRecord, GrantsError> {
    if let Some((record, _)) = read(client).await? {
        return Ok(record);
    }
    let record = GrantsRecord::of(grants, version.max(1), by, now_unix_ms);
    match client.put_if_absent(GRANTS_KEY, record.encode()).await? {
        Created::Created => Ok(record),
        // Another receiver seeded it first: theirs holds.
        Created::AlreadyExists => read(client)
            .await?
            .map(|(record, _)| record)
            .ok_or_else(|| GrantsError::Malformed("created, then not found".into())),
    }
}

/// Replaces the store's grants with `grants` (one version more); returns what was written.
pub async fn publish(
    client: &ObjectStoreClient,
    grants: &Grants,
    by: &str,
    now_unix_ms: u64,
) -> Result<GrantsRecord, GrantsError> {
    for _ in 0..MAX_PUBLISH_ATTEMPTS {
        let written = match read(client).await? {
            None => {
                let record = GrantsRecord::of(grants, 1, by, now_unix_ms);
                (client.put_if_absent(GRANTS_KEY, record.encode()).await? == Created::Created)
                    .then_some(record)
            }
            Some((current, e_tag)) => {
                let record = GrantsRecord::of(grants, current.version + 1, by, now_unix_ms);
                client
                    .replace_if_unchanged(GRANTS_KEY, record.encode(), &e_tag)
                    .await?
                    .then_some(record)
            }
        };
        if let Some(record) = written {
            return Ok(record);
        }
    }
    Err(GrantsError::Contended)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(specs: &[&str]) -> Grants {
        crate::dr::receiver::parse_grants(&specs.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[tokio::test]
    async fn the_first_seed_holds_and_publishes_raise_the_version() {
        let client = ObjectStoreClient::in_memory();
        let first = grants(&[&format!("{A}=db,logs")]);
        let other = grants(&[&format!("{B}=web")]);
        let seeded = seed(&client, &first, 1, "rx-1", 1).await.unwrap();
        assert_eq!(
            (seeded.version, seeded.grants().unwrap()),
            (1, first.clone())
        );
        // A second receiver with another list does not replace it.
        let second = seed(&client, &other, 1, "rx-2", 2).await.unwrap();
        assert_eq!(second, seeded);
        // A publish does, one version up; a later publish goes on from there.
        let published = publish(&client, &other, "ops@host", 3).await.unwrap();
        assert_eq!(published.version, 2);
        let (stored, _) = read(&client).await.unwrap().unwrap();
        assert_eq!(stored.grants().unwrap(), other);
        assert_eq!(publish(&client, &first, "ops", 4).await.unwrap().version, 3);
        // The record deleted by hand: a receiver puts back the version in force (3, `first`),
        // not its start list, and a publish goes on from there.
        client.delete(GRANTS_KEY).await.unwrap();
        let restored = seed(&client, &first, 3, "rx-2", 5).await.unwrap();
        assert_eq!((restored.version, restored.grants().unwrap()), (3, first));
        assert_eq!(publish(&client, &other, "ops", 6).await.unwrap().version, 4);
    }

    #[test]
    fn malformed_records_are_refused_with_what_is_wrong() {
        let good = GrantsRecord::of(&grants(&[&format!("{A}=db")]), 1, "rx", 1);
        assert_eq!(GrantsRecord::decode(&good.encode()).unwrap(), good);
        let cases = [
            (
                r#"{"format":9,"version":1,"published_unix_ms":0,"by":"x","agents":[]}"#,
                "newer",
            ),
            (
                r#"{"format":1,"version":0,"published_unix_ms":0,"by":"x","agents":[]}"#,
                "version 0",
            ),
            (
                r#"{"format":1,"version":1,"published_unix_ms":0,"by":"x","agents":[{"fingerprint":"zz","volumes":["a"]}]}"#,
                "fingerprint",
            ),
            (
                r#"{"format":1,"version":1,"published_unix_ms":0,"by":"x","agents":[{"fingerprint":"AA","volumes":["../x"]}]}"#,
                "",
            ),
            ("not json", ""),
        ];
        for (text, expected) in cases {
            let text = text.replace("\"AA\"", &format!("\"{A}\""));
            let error = GrantsRecord::decode(text.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
        let twice = format!(
            r#"{{"format":1,"version":1,"published_unix_ms":0,"by":"x","agents":[{{"fingerprint":"{A}","volumes":["a"]}},{{"fingerprint":"{A}","volumes":["b"]}}]}}"#
        );
        let error = GrantsRecord::decode(twice.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(error.contains("twice"), "{error}");
    }
}
