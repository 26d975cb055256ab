//! The process exit codes, in one place.
//!
//! Every command ends in one [`ExitCode`]; each subsystem's error type says which through a
//! `From` impl, so a new error variant is classified where its type is defined, once. The
//! numbers are stable and documented in the README (systemd units rely on 78 to stop
//! restarting on a bad configuration file).

use std::fmt::Display;

use blkmirror_protocol::wire::RefusalCode;

use crate::{
    command::config::ConfigError,
    dr::ops::OpsError,
    source::{agent::AgentError, read::ReadError},
    tracker::track::TrackError,
};

/// How the process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// 0: done.
    Success = 0,
    /// 1: a runtime failure (BPF load, IO, the network, the store).
    Failure = 1,
    /// 2: a bad command line or argument.
    Usage = 2,
    /// 3: a bad environment (privileges, bpffs, tracefs, kernel features, sockets).
    Environment = 3,
    /// 4: a device problem (not a block device, unsupported, vanished, not the one paired).
    Device = 4,
    /// 5: the device is already tracked by another process.
    Busy = 5,
    /// 6: the receiver refused this agent (not granted, another source, protocol, forbidden).
    Refused = 6,
    /// 7: `verify` or `restore` found data that does not match its hashes.
    Corrupt = 7,
    /// 8: a drill found that a point does not recover.
    DrillFailed = 8,
    /// 78 (`EX_CONFIG`): a bad configuration file.
    Config = 78,
}

impl ExitCode {
    /// The number the process exits with.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Of the codes of several loops, the one the process reports: the first failure.
    pub fn first_failure(self, other: Self) -> Self {
        if self == Self::Success { other } else { self }
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(code: ExitCode) -> Self {
        std::process::ExitCode::from(code.code())
    }
}

impl From<&TrackError> for ExitCode {
    fn from(error: &TrackError) -> Self {
        match error {
            TrackError::Env(_) | TrackError::Layout(_) => Self::Environment,
            TrackError::Device(_) => Self::Device,
            TrackError::Busy { .. } => Self::Busy,
            TrackError::ChunkSize(_) | TrackError::TooLarge { .. } => Self::Usage,
            _ => Self::Failure,
        }
    }
}

impl From<&AgentError> for ExitCode {
    fn from(error: &AgentError) -> Self {
        match error {
            AgentError::Track(error) => error.into(),
            AgentError::DeviceMismatch { .. } => Self::Device,
            AgentError::Refused {
                code:
                    RefusalCode::NotGranted
                    | RefusalCode::SourceMismatch
                    | RefusalCode::Protocol
                    | RefusalCode::Forbidden,
                ..
            } => Self::Refused,
            AgentError::Net(error) if error.is_handshake_refusal() => Self::Refused,
            AgentError::Handshake { .. } => Self::Refused,
            AgentError::Read(ReadError::Open { .. }) => Self::Device,
            _ => Self::Failure,
        }
    }
}

impl From<&OpsError> for ExitCode {
    fn from(error: &OpsError) -> Self {
        match error {
            OpsError::Usage(_) => Self::Usage,
            OpsError::Store(_) | OpsError::Target { .. } => Self::Failure,
            OpsError::Corrupt(_) => Self::Corrupt,
            OpsError::Environment(_) => Self::Environment,
            OpsError::DrillFailed(_) => Self::DrillFailed,
            OpsError::Track(error) => error.into(),
            OpsError::Network(_) | OpsError::State(_) | OpsError::ObjectStore(_) => Self::Failure,
            OpsError::Refused(_) => Self::Refused,
            OpsError::Identity(_) => Self::Environment,
        }
    }
}

impl From<&ConfigError> for ExitCode {
    fn from(_: &ConfigError) -> Self {
        Self::Config
    }
}

/// Prints the error and returns `code`.
pub fn fail(code: ExitCode, error: impl Display) -> ExitCode {
    eprintln!("blkmirror: error: {error}");
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_documented_numbers() {
        let documented = [
            (ExitCode::Success, 0),
            (ExitCode::Failure, 1),
            (ExitCode::Usage, 2),
            (ExitCode::Environment, 3),
            (ExitCode::Device, 4),
            (ExitCode::Busy, 5),
            (ExitCode::Refused, 6),
            (ExitCode::Corrupt, 7),
            (ExitCode::Config, 78),
        ];
        for (code, number) in documented {
            assert_eq!(code.code(), number, "{code:?}");
        }
        assert_eq!(
            ExitCode::Success.first_failure(ExitCode::Device),
            ExitCode::Device
        );
        assert_eq!(
            ExitCode::Busy.first_failure(ExitCode::Device),
            ExitCode::Busy
        );
    }

    #[test]
    fn ops_errors_map_to_their_codes() {
        assert_eq!(
            ExitCode::from(&OpsError::Corrupt("x".into())),
            ExitCode::Corrupt
        );
        assert_eq!(
            ExitCode::from(&OpsError::Usage("x".into())),
            ExitCode::Usage
        );
    }
}
