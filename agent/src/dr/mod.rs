//! The disaster-recovery side: the receiver's sessions, volume storage with its journal and
//! atomic apply, points in time, the audit log, and the operator commands that read them.

pub mod audit;
pub mod auditchain;
pub mod authority;
pub mod export;
pub mod failback;
pub mod fromstore;
pub mod grantstore;
pub mod layout;
pub mod lease;
pub mod nbd;
pub mod objpoints;
pub mod objstore;
pub mod ops;
pub mod points;
pub mod publish;
pub mod receiver;
pub mod recovery;
pub mod storage;
pub mod stored;
pub mod storeview;
pub mod volume;
