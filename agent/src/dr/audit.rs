//! The receiver's audit log: an append-only JSON-lines file (`DATA_DIR/audit.log`) with one
//! entry per operation (receiver start, connect, refused connect, cycle commit, prune,
//! restore, verify, config reload).
//!
//! # Tamper evidence
//!
//! Every entry carries `prev`, the hash of the entry before it, and ends with `hash`, the
//! BLAKE3 hash of the entry's own text up to that field. Editing, inserting or deleting an
//! entry breaks the chain at that place. Cutting entries off the end leaves a valid chain, so
//! the head (last sequence number and hash) is also kept in `audit.head` and printed to the
//! receiver's journal at every entry; `blkmirror audit verify` checks both. An attacker with
//! root on the receiver can rewrite everything; shipping the journal off the host is what
//! anchors the head outside its reach.
//!
//! Writers (the receiver and the `restore`/`verify` commands) take an exclusive `flock` on the
//! log while they read the head and append, so concurrent writers keep one chain.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{durable, tracker::sys};

/// The hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// An audit line longer than this is corrupt.
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// Audit log errors.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// File IO failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The chain is broken.
    #[error("{path}: line {line}: {message}")]
    Broken {
        /// The log.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        message: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> AuditError {
    let path = path.to_owned();
    move |source| AuditError::Io { what, path, source }
}

/// One entry, as written (without its trailing `hash`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// 1, 2, 3, ... in file order.
    pub seq: u64,
    /// The entry's format ([`AUDIT_FORMAT`]; entries of releases before it was written have
    /// none and are format 1).
    #[serde(default = "format_1")]
    pub format: u32,
    /// When (Unix milliseconds).
    pub time_unix_ms: u64,
    /// What happened: `receiver-start`, `connect`, `refused`, `commit`, `prune`, `restore`,
    /// `verify`, `config-reload`.
    pub event: String,
    /// The agent's certificate fingerprint, when an agent is involved.
    pub agent: Option<String>,
    /// The volume, when one is involved.
    pub volume: Option<String>,
    /// `ok`, or what went wrong.
    pub outcome: String,
    /// Event-specific details.
    pub detail: serde_json::Value,
    /// Hash of the previous entry (zeros for the first).
    pub prev: String,
}

/// What a writer supplies.
#[derive(Clone, Debug, Default)]
pub struct Event {
    /// See [`Entry::event`].
    pub event: &'static str,
    /// See [`Entry::agent`].
    pub agent: Option<String>,
    /// See [`Entry::volume`].
    pub volume: Option<String>,
    /// See [`Entry::outcome`].
    pub outcome: String,
    /// See [`Entry::detail`].
    pub detail: serde_json::Value,
}

/// The result of a successful check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verified {
    /// Entries checked.
    pub entries: u64,
    /// The last entry's hash.
    pub head: String,
    /// Benign findings that are not tampering: a torn last line (an append cut off by a power
    /// loss; the next append repairs it) or a head file one entry behind (a crash between the
    /// log's sync and the head's write; the next append catches up).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The audit log of one receiver data directory.
#[derive(Clone, Debug)]
pub struct AuditLog {
    path: PathBuf,
    head_path: PathBuf,
}

/// The format of the entries this build writes.
pub const AUDIT_FORMAT: u32 = 1;

fn format_1() -> u32 {
    1
}

pub(crate) fn entry_hash(body: &str) -> String {
    blake3::hash(body.as_bytes()).to_hex().to_string()
}

/// Splits a line into the entry's text (with `hash` removed, closing brace restored) and the
/// hash it claims.
pub(crate) fn split_line(line: &str) -> Option<(String, &str)> {
    const MARK: &str = ",\"hash\":\"";
    let at = line.rfind(MARK)?;
    let hash = line[at + MARK.len()..].strip_suffix("\"}")?;
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| (format!("{}}}", &line[..at]), hash))
}

impl AuditLog {
    /// The log in `data_dir`.
    pub fn in_dir(data_dir: &Path) -> Self {
        Self::at(&data_dir.join("audit.log"))
    }

    /// The log at `path` (its head is `path` with `.head` for `.log`).
    pub fn at(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            head_path: path.with_extension("head"),
        }
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an entry and returns its hash. Durable before it returns.
    pub fn append(&self, event: Event) -> Result<String, AuditError> {
        let path = &self.path;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)
            .map_err(io_err("opening", path))?;
        sys::lock(&file, false).map_err(io_err("locking", path))?;
        // An append cut off by a power loss leaves a torn last line. It was never acknowledged
        // (appends sync before they return): cut it off, and say so in the log itself.
        let torn = cut_torn_tail(&mut file).map_err(io_err("repairing", path))?;
        let (mut seq, mut prev) = self.tail(&mut file)?;
        if let Some(torn) = torn {
            let repair = Entry {
                seq,
                format: AUDIT_FORMAT,
                time_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                event: "audit-repaired".into(),
                agent: None,
                volume: None,
                outcome: "ok".into(),
                detail: serde_json::json!({
                    "torn_bytes": torn.len(),
                    "torn_blake3": blake3::hash(&torn).to_hex().to_string(),
                }),
                prev,
            };
            let hash = write_entry(&mut file, path, &repair)?;
            (seq, prev) = (seq + 1, hash);
        }
        let entry = Entry {
            seq,
            format: AUDIT_FORMAT,
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            event: event.event.to_owned(),
            agent: event.agent,
            volume: event.volume,
            outcome: event.outcome,
            detail: event.detail,
            prev,
        };
        let hash = write_entry(&mut file, path, &entry)?;
        durable::write_atomic(&self.head_path, format!("{seq} {hash}\n").as_bytes())
            .map_err(io_err("writing", &self.head_path))?;
        Ok(hash)
    }

    /// The sequence number and previous hash for the next entry.
    fn tail(&self, file: &mut File) -> Result<(u64, String), AuditError> {
        let path = &self.path;
        match last_line(file).map_err(io_err("reading", path))? {
            None => Ok((1, GENESIS.to_owned())),
            Some(line) => {
                let (body, hash) = split_line(&line).ok_or_else(|| AuditError::Broken {
                    path: path.clone(),
                    line: 0,
                    message: "the last entry is malformed; run `blkmirror audit verify`".into(),
                })?;
                let entry: Entry =
                    serde_json::from_str(&body).map_err(|error| AuditError::Broken {
                        path: path.clone(),
                        line: 0,
                        message: format!("the last entry is malformed: {error}"),
                    })?;
                Ok((entry.seq + 1, hash.to_owned()))
            }
        }
    }

    /// Checks the whole chain and the head file.
    pub fn verify(&self) -> Result<Verified, AuditError> {
        let path = &self.path;
        let text = fs::read_to_string(path).map_err(io_err("reading", path))?;
        let head = match fs::read_to_string(&self.head_path) {
            Ok(head) => Some(head),
            Err(error) if error.kind() == io::ErrorKind::NotFound => None,
            Err(error) => return Err(io_err("reading", &self.head_path)(error)),
        };
        self.verify_text(&text, head.as_deref())
    }

    /// Checks the chain of `text` (the log) and `head` (the head file, if there is one). Pure;
    /// the fuzz target drives it with arbitrary input.
    pub fn verify_text(&self, text: &str, head: Option<&str>) -> Result<Verified, AuditError> {
        let path = &self.path;
        let broken = |line: u64, message: String| AuditError::Broken {
            path: path.clone(),
            line,
            message,
        };
        let mut notes = Vec::new();
        // A torn last line is an append that never completed: noted, not tampering.
        let whole = match text.rfind('\n') {
            _ if text.is_empty() || text.ends_with('\n') => text,
            Some(at) => {
                notes.push(format!(
                    "the last line is torn ({} bytes after entry {}): an append was cut off; \
                     the next append removes it and records that",
                    text.len() - at - 1,
                    text[..at].lines().count()
                ));
                &text[..=at]
            }
            None => {
                notes.push(format!(
                    "the only line is torn ({} bytes): an append was cut off",
                    text.len()
                ));
                ""
            }
        };
        let mut prev = GENESIS.to_owned();
        let mut before_last = GENESIS.to_owned();
        let mut entries = 0u64;
        for (index, line) in whole.lines().enumerate() {
            let number = index as u64 + 1;
            if line.len() > MAX_LINE {
                return Err(broken(number, "line too long".into()));
            }
            let (body, hash) = split_line(line)
                .ok_or_else(|| broken(number, "no trailing \"hash\" field".into()))?;
            if entry_hash(&body) != hash {
                return Err(broken(
                    number,
                    "the entry does not match its hash (edited)".into(),
                ));
            }
            let entry: Entry = serde_json::from_str(&body)
                .map_err(|error| broken(number, format!("not an audit entry: {error}")))?;
            if entry.format > AUDIT_FORMAT {
                return Err(broken(
                    number,
                    format!(
                        "entry format {} is newer than this build reads ({AUDIT_FORMAT})",
                        entry.format
                    ),
                ));
            }
            if entry.prev != prev {
                return Err(broken(
                    number,
                    "does not follow the entry before it (an entry was removed or inserted)".into(),
                ));
            }
            if entry.seq != number {
                return Err(broken(
                    number,
                    format!("sequence {} out of order", entry.seq),
                ));
            }
            before_last = std::mem::replace(&mut prev, hash.to_owned());
            entries += 1;
        }
        match head {
            Some(head) => {
                let expected = format!("{entries} {prev}");
                let one_behind = format!("{} {before_last}", entries.saturating_sub(1));
                if entries > 0 && head.trim() == one_behind {
                    notes.push(format!(
                        "{} is one entry behind the log: an append was interrupted after the \
                         log's sync; the next append catches up",
                        self.head_path.display()
                    ));
                } else if head.trim() != expected {
                    return Err(broken(
                        entries,
                        format!(
                            "the log ends at entry {entries}, but {} records the head as {:?} \
                             (entries were cut off the end)",
                            self.head_path.display(),
                            head.trim().chars().take(200).collect::<String>()
                        ),
                    ));
                }
            }
            None if entries <= 1 => {
                if entries == 1 {
                    notes.push("no head file yet: the first append was interrupted".into());
                }
            }
            None => {
                return Err(broken(
                    entries,
                    format!(
                        "{} is missing but the log has {entries} entries",
                        self.head_path.display()
                    ),
                ));
            }
        }
        Ok(Verified {
            entries,
            head: prev,
            notes,
        })
    }
}

/// Writes one entry as a line (with its hash) and syncs; returns the hash.
fn write_entry(file: &mut File, path: &Path, entry: &Entry) -> Result<String, AuditError> {
    let body = serde_json::to_string(entry).expect("entry serializes");
    let hash = entry_hash(&body);
    let line = format!("{},\"hash\":\"{hash}\"}}\n", &body[..body.len() - 1]);
    file.write_all(line.as_bytes())
        .map_err(io_err("appending to", path))?;
    file.sync_data().map_err(io_err("syncing", path))?;
    Ok(hash)
}

/// The last `MAX_LINE + 1` bytes of `file` and where they start (`None` for an empty file).
fn read_tail(file: &mut File) -> io::Result<Option<(u64, Vec<u8>)>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let start = len.saturating_sub(MAX_LINE as u64 + 1);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    Ok(Some((start, tail)))
}

/// If `file` does not end with a newline, cuts it back to its last complete line and returns
/// the bytes cut off.
fn cut_torn_tail(file: &mut File) -> io::Result<Option<Vec<u8>>> {
    let Some((start, tail)) = read_tail(file)? else {
        return Ok(None);
    };
    if tail.last() == Some(&b'\n') {
        return Ok(None);
    }
    let keep = match tail.iter().rposition(|&b| b == b'\n') {
        Some(at) => start + at as u64 + 1,
        None if start == 0 => 0,
        // A torn line longer than any entry: not an interrupted append; leave it for
        // `audit verify` to report.
        None => return Ok(None),
    };
    let torn = tail[(keep - start) as usize..].to_vec();
    file.set_len(keep)?;
    file.sync_data()?;
    Ok(Some(torn))
}

/// The last complete line of `file` (without its newline).
fn last_line(file: &mut File) -> io::Result<Option<String>> {
    let Some((_, tail)) = read_tail(file)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&tail);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(Some(text.rsplit('\n').next().unwrap_or(text).to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &'static str, n: u64) -> Event {
        Event {
            event: name,
            agent: Some("ab".repeat(32)),
            volume: Some("db".into()),
            outcome: "ok".into(),
            detail: serde_json::json!({ "seq": n }),
        }
    }

    #[test]
    fn chain_verifies_and_every_kind_of_tampering_is_found() {
        let dir = crate::testing::TempDir::new("audit-chain");
        let log = AuditLog::in_dir(&dir.0);
        for n in 0..5 {
            log.append(event("commit", n)).unwrap();
        }
        let verified = log.verify().unwrap();
        assert_eq!(verified.entries, 5);
        let original = fs::read_to_string(log.path()).unwrap();
        let lines: Vec<&str> = original.lines().collect();

        // Edit a field of entry 3.
        fs::write(log.path(), original.replace("\"seq\":2}", "\"seq\":9}")).unwrap();
        let error = log.verify().unwrap_err().to_string();
        assert!(
            error.contains("line 3") && error.contains("edited"),
            "{error}"
        );

        // Remove entry 2.
        let removed: Vec<&str> = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, l)| *l)
            .collect();
        fs::write(log.path(), removed.join("\n") + "\n").unwrap();
        let error = log.verify().unwrap_err().to_string();
        assert!(
            error.contains("line 2") && error.contains("removed"),
            "{error}"
        );

        // Cut the last entry off: the chain is valid, the head is not.
        fs::write(log.path(), lines[..4].join("\n") + "\n").unwrap();
        let error = log.verify().unwrap_err().to_string();
        assert!(error.contains("cut off"), "{error}");

        // Restored, and appending continues the chain.
        fs::write(log.path(), &original).unwrap();
        log.append(event("restore", 6)).unwrap();
        assert_eq!(log.verify().unwrap().entries, 6);
    }

    /// Finding 11 of the hardening issue: a torn last line (power loss mid-append) made every
    /// later append fail, and a crash between the log's sync and the head's write raised a
    /// false "cut off" alarm.
    #[test]
    fn a_torn_tail_is_repaired_by_the_next_append_and_a_lagging_head_is_no_alarm() {
        let dir = crate::testing::TempDir::new("audit-torn");
        let log = AuditLog::in_dir(&dir.0);
        for n in 0..3 {
            log.append(event("commit", n)).unwrap();
        }
        // A crash after the log's sync, before the head's write: the head is one behind.
        let head_before = fs::read_to_string(log.head_path.clone()).unwrap();
        log.append(event("commit", 3)).unwrap();
        fs::write(&log.head_path, &head_before).unwrap();
        let verified = log.verify().unwrap();
        assert_eq!(verified.entries, 4);
        assert!(
            verified.notes[0].contains("one entry behind"),
            "{verified:?}"
        );
        // Power loss in the middle of the next append.
        let mut file = OpenOptions::new().append(true).open(log.path()).unwrap();
        file.write_all(b"{\"seq\":5,\"time_unix_ms\":17").unwrap();
        drop(file);
        let verified = log.verify().unwrap();
        assert!(
            verified.notes.iter().any(|n| n.contains("torn")),
            "{verified:?}"
        );
        // The next append cuts the torn bytes off, records that, and the chain holds.
        log.append(event("commit", 5)).unwrap();
        let verified = log.verify().unwrap();
        assert_eq!(verified.entries, 6);
        assert!(verified.notes.is_empty(), "{verified:?}");
        let text = fs::read_to_string(log.path()).unwrap();
        assert!(text.lines().nth(4).unwrap().contains("audit-repaired"));
        // Tampering is still found: an edited entry.
        fs::write(log.path(), text.replace("\"seq\":1}", "\"seq\":7}")).unwrap();
        assert!(log.verify().is_err());
    }
}
