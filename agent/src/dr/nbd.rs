//! The server side of the Network Block Device protocol (fixed newstyle), as `blkmirror export`
//! speaks it to qemu, qemu-img, qemu-storage-daemon, nbd-client and the libnbd tools.
//!
//! # Why the project speaks NBD itself
//!
//! The issue asked for a well-kept library or nbdkit first. What was tried:
//!
//! * `nbd` 0.3.1 (MIT/Apache): it answers `NBD_OPT_GO` with "unsupported" and `NBD_OPT_LIST`
//!   with one hard-coded name, `rustnbd`. qemu falls back to the list and then refuses every
//!   other export name: `qemu-img info nbd://127.0.0.1:10899/vol1` failed with "No export with
//!   name 'vol1' available" (qemu-img 10.0.2, measured on this machine).
//! * `tokio-nbd` 0.3 is GPL-2.0-or-later, which this MIT/Apache project cannot link.
//! * nbdkit is a separate daemon that is not on a fresh machine; serving through it would mean a
//!   plugin `.so` built from this crate, a second process per export, and a package dependency.
//!
//! The subset here is small (about 300 lines) and is all a client needs: the fixed newstyle
//! handshake with `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST`, `NBD_OPT_EXPORT_NAME` and
//! `NBD_OPT_ABORT`; simple replies (structured replies are declined, which every client
//! accepts); and the `READ`, `WRITE`, `FLUSH` and `DISC` commands, with FUA.
//!
//! # Hostile clients
//!
//! A client is untrusted input. Every length is bounded before anything is allocated: options
//! to [`MAX_OPTION_BYTES`], their number to [`MAX_OPTIONS`], a request's payload to
//! [`MAX_PAYLOAD`]. A request outside the export gets `EINVAL` (a write: `ENOSPC`, as the
//! protocol says), a write to a read-only export `EPERM`. A stream that breaks the protocol (a
//! bad magic number, a write payload over the bound) is closed: nothing after it could be
//! framed. The fuzz target `nbd_session` drives [`serve`] with arbitrary client bytes.

use std::io::{self, Read, Write};

/// The largest payload of one request (what qemu and nbdkit use): larger reads get `EINVAL`,
/// larger writes close the connection.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest option the handshake accepts (an export name is at most 4 KiB).
pub const MAX_OPTION_BYTES: u32 = 64 << 10;
/// Options accepted before the client must choose an export.
pub const MAX_OPTIONS: u32 = 256;

const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
const CLIENT_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_BLOCK_SIZE: u16 = 3;

const TRANSMIT_HAS_FLAGS: u16 = 1 << 0;
const TRANSMIT_READ_ONLY: u16 = 1 << 1;
const TRANSMIT_SEND_FLUSH: u16 = 1 << 2;
const TRANSMIT_SEND_FUA: u16 = 1 << 3;
const TRANSMIT_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1 << 0;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// What an export serves: the protocol's view of a disk.
pub trait Backend: Send + Sync {
    /// The export's size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are accepted.
    fn writable(&self) -> bool;
    /// The block size reads are cheapest at (advertised to clients that ask).
    fn preferred_block(&self) -> u32;
    /// Fills `buf` from `offset` (inside the export: [`serve`] checks the bounds).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `data` at `offset` (inside the export; only when [`Self::writable`]).
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
}

/// Why a session ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The connection failed (or the client closed it without `NBD_CMD_DISC`).
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol; the connection was closed.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// What one session did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Whether the client reached transmission (chose the export).
    pub attached: bool,
    /// Read requests served.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Write requests applied.
    pub writes: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

fn violation(message: impl Into<String>) -> NbdError {
    NbdError::Protocol(message.into())
}

fn read_u32(stream: &mut impl Read) -> io::Result<u32> {
    let mut bytes = [0; 4];
    stream.read_exact(&mut bytes)?;
    Ok(u32::from_be_bytes(bytes))
}

fn read_u64(stream: &mut impl Read) -> io::Result<u64> {
    let mut bytes = [0; 8];
    stream.read_exact(&mut bytes)?;
    Ok(u64::from_be_bytes(bytes))
}

fn option_reply(stream: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    stream.write_all(&out)
}

/// An export name the client may ask for: the volume's, or the default (empty) one.
fn names_the_export(requested: &[u8], name: &str) -> bool {
    requested.is_empty() || requested == name.as_bytes()
}

/// The `NBD_OPT_INFO`/`NBD_OPT_GO` payload: the export name and the information requested.
fn parse_go(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let requests = rest.get(2..)?;
    if requests.len() != count * 2 {
        return None;
    }
    Some((
        name,
        requests
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
            .collect(),
    ))
}

fn transmission_flags(backend: &dyn Backend) -> u16 {
    // Every connection of one export sees the same bytes (one overlay per export, one flush
    // for all of it), which is what CAN_MULTI_CONN promises.
    let mut flags = TRANSMIT_HAS_FLAGS | TRANSMIT_SEND_FLUSH | TRANSMIT_CAN_MULTI_CONN;
    if backend.writable() {
        flags |= TRANSMIT_SEND_FUA;
    } else {
        flags |= TRANSMIT_READ_ONLY;
    }
    flags
}

/// Serves export `name` of `backend` to one client on `stream`, from the handshake to the
/// client's disconnect. Returns what the session did; an error says why it ended early.
pub fn serve<S: Read + Write>(
    stream: &mut S,
    name: &str,
    backend: &dyn Backend,
) -> Result<SessionStats, NbdError> {
    let mut stats = SessionStats::default();
    if !handshake(stream, name, backend)? {
        return Ok(stats);
    }
    stats.attached = true;
    transmit(stream, backend, &mut stats)?;
    Ok(stats)
}

/// The handshake: true when the client chose the export, false when it aborted.
pub fn handshake<S: Read + Write>(
    stream: &mut S,
    name: &str,
    backend: &dyn Backend,
) -> Result<bool, NbdError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(NBDMAGIC);
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting)?;
    stream.flush()?;
    let client_flags = read_u32(stream)?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {client_flags:#x}")));
    }
    if client_flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(violation(
            "the client does not speak the fixed newstyle handshake",
        ));
    }
    negotiate(stream, name, backend, client_flags & CLIENT_NO_ZEROES != 0)
}

/// The option haggling. True when the client chose the export, false when it aborted.
fn negotiate<S: Read + Write>(
    stream: &mut S,
    name: &str,
    backend: &dyn Backend,
    no_zeroes: bool,
) -> Result<bool, NbdError> {
    for _ in 0..MAX_OPTIONS {
        let magic = read_u64(stream)?;
        if magic != IHAVEOPT {
            return Err(violation(format!("option magic {magic:#x}")));
        }
        let option = read_u32(stream)?;
        let length = read_u32(stream)?;
        if length > MAX_OPTION_BYTES {
            return Err(violation(format!(
                "option {option} of {length} bytes (at most {MAX_OPTION_BYTES})"
            )));
        }
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                if !names_the_export(&data, name) {
                    // This option has no error reply: the protocol says to close.
                    return Err(violation(format!(
                        "no export named {:?} (this server exports {name:?})",
                        String::from_utf8_lossy(&data)
                    )));
                }
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&backend.size().to_be_bytes());
                reply.extend_from_slice(&transmission_flags(backend).to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0; 124]);
                }
                stream.write_all(&reply)?;
                stream.flush()?;
                return Ok(true);
            }
            OPT_ABORT => {
                option_reply(stream, option, REP_ACK, &[])?;
                stream.flush()?;
                return Ok(false);
            }
            OPT_LIST => {
                if data.is_empty() {
                    let mut entry = (name.len() as u32).to_be_bytes().to_vec();
                    entry.extend_from_slice(name.as_bytes());
                    option_reply(stream, option, REP_SERVER, &entry)?;
                    option_reply(stream, option, REP_ACK, &[])?;
                } else {
                    option_reply(stream, option, REP_ERR_INVALID, b"LIST takes no data")?;
                }
            }
            OPT_INFO | OPT_GO => match parse_go(&data) {
                None => option_reply(
                    stream,
                    option,
                    REP_ERR_INVALID,
                    b"malformed NBD_OPT_INFO/GO payload",
                )?,
                Some((requested, _)) if !names_the_export(requested, name) => {
                    let message =
                        format!("no export named {:?}", String::from_utf8_lossy(requested));
                    option_reply(stream, option, REP_ERR_UNKNOWN, message.as_bytes())?;
                }
                Some((_, wanted)) => {
                    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
                    export.extend_from_slice(&backend.size().to_be_bytes());
                    export.extend_from_slice(&transmission_flags(backend).to_be_bytes());
                    option_reply(stream, option, REP_INFO, &export)?;
                    if wanted.contains(&INFO_NAME) {
                        let mut info = INFO_NAME.to_be_bytes().to_vec();
                        info.extend_from_slice(name.as_bytes());
                        option_reply(stream, option, REP_INFO, &info)?;
                    }
                    if wanted.contains(&INFO_BLOCK_SIZE) {
                        let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        info.extend_from_slice(&1u32.to_be_bytes());
                        info.extend_from_slice(&backend.preferred_block().to_be_bytes());
                        info.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                        option_reply(stream, option, REP_INFO, &info)?;
                    }
                    option_reply(stream, option, REP_ACK, &[])?;
                    if option == OPT_GO {
                        stream.flush()?;
                        return Ok(true);
                    }
                }
            },
            // STARTTLS, STRUCTURED_REPLY, META_CONTEXT, EXTENDED_HEADERS and anything newer.
            _ => option_reply(stream, option, REP_ERR_UNSUP, &[])?,
        }
        stream.flush()?;
    }
    Err(violation(format!(
        "more than {MAX_OPTIONS} options without choosing an export"
    )))
}

fn simple_reply(out: &mut [u8], error: u32, cookie: u64) {
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

fn error_reply(stream: &mut impl Write, error: u32, cookie: u64) -> io::Result<()> {
    let mut reply = [0u8; 16];
    simple_reply(&mut reply, error, cookie);
    stream.write_all(&reply)
}

fn in_bounds(offset: u64, length: u32, size: u64) -> bool {
    length > 0
        && offset
            .checked_add(u64::from(length))
            .is_some_and(|end| end <= size)
}

/// The requests, until `NBD_CMD_DISC` or the end of the stream; counts what they did in `stats`.
pub fn transmit<S: Read + Write>(
    stream: &mut S,
    backend: &dyn Backend,
    stats: &mut SessionStats,
) -> Result<(), NbdError> {
    let size = backend.size();
    // Reply header and read data in one buffer: one write per reply.
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let mut request = [0u8; 28];
        stream.read_exact(&mut request)?;
        let field = |range: std::ops::Range<usize>| &request[range];
        let magic = u32::from_be_bytes(field(0..4).try_into().expect("4"));
        if magic != REQUEST_MAGIC {
            return Err(violation(format!("request magic {magic:#x}")));
        }
        let flags = u16::from_be_bytes(field(4..6).try_into().expect("2"));
        let command = u16::from_be_bytes(field(6..8).try_into().expect("2"));
        let cookie = u64::from_be_bytes(field(8..16).try_into().expect("8"));
        let offset = u64::from_be_bytes(field(16..24).try_into().expect("8"));
        let length = u32::from_be_bytes(field(24..28).try_into().expect("4"));
        match command {
            CMD_READ => {
                if length > MAX_PAYLOAD || !in_bounds(offset, length, size) {
                    stats.errors += 1;
                    error_reply(stream, EINVAL, cookie)?;
                } else {
                    buffer.resize(16 + length as usize, 0);
                    match backend.read_at(&mut buffer[16..], offset) {
                        Ok(()) => {
                            simple_reply(&mut buffer[..16], 0, cookie);
                            stream.write_all(&buffer)?;
                            stats.reads += 1;
                            stats.read_bytes += u64::from(length);
                        }
                        Err(error) => {
                            tracing::warn!(
                                target: "blkmirror export",
                                "read of {length} bytes at offset {offset} failed: {error}"
                            );
                            stats.errors += 1;
                            error_reply(stream, EIO, cookie)?;
                        }
                    }
                }
            }
            CMD_WRITE => {
                if length > MAX_PAYLOAD {
                    return Err(violation(format!(
                        "write of {length} bytes (at most {MAX_PAYLOAD})"
                    )));
                }
                buffer.resize(length as usize, 0);
                stream.read_exact(&mut buffer)?;
                let error = if !backend.writable() {
                    EPERM
                } else if !in_bounds(offset, length, size) {
                    ENOSPC
                } else {
                    let written = backend.write_at(&buffer, offset).and_then(|()| {
                        if flags & CMD_FLAG_FUA != 0 {
                            backend.flush()
                        } else {
                            Ok(())
                        }
                    });
                    match written {
                        Ok(()) => {
                            stats.writes += 1;
                            stats.written_bytes += u64::from(length);
                            0
                        }
                        Err(error) => {
                            tracing::warn!(
                                target: "blkmirror export",
                                "write of {length} bytes at offset {offset} failed: {error}"
                            );
                            EIO
                        }
                    }
                };
                if error != 0 {
                    stats.errors += 1;
                }
                error_reply(stream, error, cookie)?;
            }
            CMD_DISC => return Ok(()),
            CMD_FLUSH => {
                let error = match backend.flush() {
                    Ok(()) => 0,
                    Err(_) => EIO,
                };
                error_reply(stream, error, cookie)?;
            }
            // TRIM, CACHE, WRITE_ZEROES and BLOCK_STATUS are not advertised; none carries a
            // payload, so the stream stays framed.
            _ => {
                stats.errors += 1;
                error_reply(stream, EINVAL, cookie)?;
            }
        }
        stream.flush()?;
    }
}

/// What a client sends, for the tests and the fuzz target's seeds.
#[doc(hidden)]
pub mod client_bytes {
    use super::*;

    /// The client's flags (fixed newstyle, no zeroes).
    pub fn greeting() -> Vec<u8> {
        (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec()
    }

    /// An option.
    pub fn option(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    /// `NBD_OPT_GO` for `name`, asking for `infos`.
    pub fn go(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for info in infos {
            data.extend_from_slice(&info.to_be_bytes());
        }
        option(OPT_GO, &data)
    }

    /// A request header.
    pub fn request(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut out = REQUEST_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&command.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        out
    }

    /// A whole session: structured replies (declined), a list, GO, a read, a FUA write, a
    /// flush, a read past the end, and the disconnect.
    pub fn typical_session(name: &str) -> Vec<u8> {
        let mut out = greeting();
        out.extend(option(8, &[]));
        out.extend(option(OPT_LIST, &[]));
        out.extend(go(name, &[INFO_BLOCK_SIZE, INFO_NAME]));
        out.extend(request(CMD_READ, 0, 1, 0, 4096));
        out.extend(request(CMD_WRITE, CMD_FLAG_FUA, 2, 512, 8));
        out.extend([7; 8]);
        out.extend(request(CMD_FLUSH, 0, 3, 0, 0));
        out.extend(request(CMD_READ, 0, 4, u64::MAX - 1, 2));
        out.extend(request(CMD_DISC, 0, 5, 0, 0));
        out
    }

    /// The old way in: `NBD_OPT_EXPORT_NAME`, then a read and the disconnect.
    pub fn export_name_session(name: &str) -> Vec<u8> {
        let mut out = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        out.extend(option(OPT_EXPORT_NAME, name.as_bytes()));
        out.extend(request(CMD_READ, 0, 1, 4096, 512));
        out.extend(request(CMD_DISC, 0, 2, 0, 0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::client_bytes::{go, option, request};
    use super::*;
    use std::sync::Mutex;

    /// A disk in memory.
    struct MemoryDisk {
        bytes: Mutex<Vec<u8>>,
        writable: bool,
    }

    impl Backend for MemoryDisk {
        fn size(&self) -> u64 {
            self.bytes.lock().unwrap().len() as u64
        }
        fn writable(&self) -> bool {
            self.writable
        }
        fn preferred_block(&self) -> u32 {
            4096
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let bytes = self.bytes.lock().unwrap();
            buf.copy_from_slice(&bytes[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
            let mut bytes = self.bytes.lock().unwrap();
            bytes[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A client's whole byte stream in, the server's bytes out.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn disk(writable: bool) -> MemoryDisk {
        MemoryDisk {
            bytes: Mutex::new((0..65536u32).map(|i| (i % 251) as u8).collect()),
            writable,
        }
    }

    fn run(client: Vec<u8>, backend: &MemoryDisk) -> (Result<SessionStats, NbdError>, Vec<u8>) {
        let mut script = Script {
            input: io::Cursor::new(client),
            output: Vec::new(),
        };
        let result = serve(&mut script, "vol", backend);
        (result, script.output)
    }

    /// Splits the server's option replies after the 18-byte greeting: (option, kind, data).
    fn option_replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut replies = Vec::new();
        while out.len() >= 20 && out[..8] == OPTION_REPLY_MAGIC.to_be_bytes() {
            let option = u32::from_be_bytes(out[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(out[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
            replies.push((option, kind, out[20..20 + len].to_vec()));
            out = &out[20 + len..];
        }
        replies
    }

    #[test]
    fn go_reports_the_size_and_read_only_flags_and_reads_return_the_disk() {
        let backend = disk(false);
        let mut client = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        client.extend(option(8, &[])); // STRUCTURED_REPLY: declined
        client.extend(option(OPT_LIST, &[]));
        client.extend(go("vol", &[INFO_BLOCK_SIZE]));
        client.extend(request(CMD_READ, 0, 7, 4096, 512));
        client.extend(request(CMD_WRITE, 0, 8, 0, 4));
        client.extend([1, 2, 3, 4]);
        client.extend(request(CMD_READ, 0, 9, 65536 - 8, 16));
        client.extend(request(CMD_DISC, 0, 10, 0, 0));
        let (result, out) = run(client, &backend);
        let stats = result.unwrap();
        assert_eq!(&out[..8], NBDMAGIC);
        let replies = option_replies(&out[18..]);
        assert_eq!(replies[0].1, REP_ERR_UNSUP);
        assert_eq!(replies[1].1, REP_SERVER);
        assert_eq!(&replies[1].2[4..], b"vol");
        let export = &replies[3];
        assert_eq!((export.0, export.1), (OPT_GO, REP_INFO));
        assert_eq!(
            u64::from_be_bytes(export.2[2..10].try_into().unwrap()),
            65536
        );
        let flags = u16::from_be_bytes(export.2[10..12].try_into().unwrap());
        assert_ne!(flags & TRANSMIT_READ_ONLY, 0);
        assert_eq!(replies[4].2[..2], INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(replies.last().unwrap().1, REP_ACK);
        let consumed: usize = replies.iter().map(|r| 20 + r.2.len()).sum();
        let transmission = &out[18 + consumed..];
        // The read: header, then the disk's bytes at 4096.
        assert_eq!(&transmission[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&transmission[4..8], 0u32.to_be_bytes());
        assert_eq!(&transmission[8..16], 7u64.to_be_bytes());
        let expected: Vec<u8> = (4096..4608u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(&transmission[16..16 + 512], &expected[..]);
        // The write to a read-only export: EPERM, and the disk is unchanged.
        let write_reply = &transmission[16 + 512..16 + 512 + 16];
        assert_eq!(&write_reply[4..8], EPERM.to_be_bytes());
        assert_eq!(backend.bytes.lock().unwrap()[0], 0);
        // The read across the end: EINVAL.
        assert_eq!(
            &transmission[16 + 512 + 20..16 + 512 + 24],
            EINVAL.to_be_bytes()
        );
        assert_eq!(stats.reads, 1);
        assert_eq!(stats.errors, 2);
    }

    #[test]
    fn a_writable_export_takes_writes_and_export_name_falls_back_without_zeroes() {
        let backend = disk(true);
        let mut client = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        client.extend(option(OPT_EXPORT_NAME, b"vol"));
        client.extend(request(CMD_WRITE, CMD_FLAG_FUA, 1, 100, 3));
        client.extend([9, 9, 9]);
        client.extend(request(CMD_WRITE, 0, 2, 65535, 2));
        client.extend([1, 1]);
        client.extend(request(CMD_FLUSH, 0, 3, 0, 0));
        client.extend(request(CMD_DISC, 0, 4, 0, 0));
        let (result, out) = run(client, &backend);
        assert_eq!(result.unwrap().writes, 1);
        // Size and flags, no 124 zeroes.
        let transmission = &out[18 + 10..];
        assert_eq!(&transmission[4..8], 0u32.to_be_bytes());
        assert_eq!(&transmission[16 + 4..16 + 8], ENOSPC.to_be_bytes());
        assert_eq!(&transmission[32 + 4..32 + 8], 0u32.to_be_bytes());
        assert_eq!(&backend.bytes.lock().unwrap()[100..103], &[9, 9, 9]);
    }

    #[test]
    fn a_wrong_export_name_is_refused_and_other_names_are_not_served() {
        let backend = disk(false);
        let mut client = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        client.extend(go("other", &[]));
        client.extend(option(OPT_ABORT, &[]));
        let (result, out) = run(client, &backend);
        assert!(!result.unwrap().attached);
        let replies = option_replies(&out[18..]);
        assert_eq!(replies[0].1, REP_ERR_UNKNOWN);
        assert_eq!(replies[1].1, REP_ACK);

        let mut client = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        client.extend(option(OPT_EXPORT_NAME, b"other"));
        let (result, _) = run(client, &backend);
        assert!(matches!(result, Err(NbdError::Protocol(m)) if m.contains("other")));
    }

    #[test]
    fn hostile_lengths_and_magic_close_the_connection_without_allocating() {
        let backend = disk(true);
        let mut client = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        let mut huge = IHAVEOPT.to_be_bytes().to_vec();
        huge.extend_from_slice(&OPT_GO.to_be_bytes());
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        client.extend(huge);
        assert!(matches!(
            run(client, &backend).0,
            Err(NbdError::Protocol(_))
        ));

        let mut client = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        client.extend(go("", &[]));
        client.extend(request(CMD_WRITE, 0, 1, 0, u32::MAX));
        assert!(
            matches!(run(client, &backend).0, Err(NbdError::Protocol(m)) if m.contains("write"))
        );

        let mut client = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        client.extend(go("", &[]));
        let mut bad = request(CMD_READ, 0, 1, 0, 1);
        bad[0] ^= 1;
        client.extend(bad);
        assert!(
            matches!(run(client, &backend).0, Err(NbdError::Protocol(m)) if m.contains("magic"))
        );

        // A huge read is refused with EINVAL; the session goes on.
        let mut client = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        client.extend(go("", &[]));
        client.extend(request(CMD_READ, 0, 1, 0, u32::MAX));
        client.extend(request(CMD_READ, 0, 2, u64::MAX, 1));
        client.extend(request(CMD_DISC, 0, 3, 0, 0));
        let (result, _) = run(client, &backend);
        assert_eq!(result.unwrap().errors, 2);

        // Unknown client flags, and an old client.
        let client = 0x80u32.to_be_bytes().to_vec();
        assert!(matches!(
            run(client, &backend).0,
            Err(NbdError::Protocol(_))
        ));
        let client = 0u32.to_be_bytes().to_vec();
        assert!(matches!(
            run(client, &backend).0,
            Err(NbdError::Protocol(_))
        ));
    }

    #[test]
    fn malformed_go_payloads_get_an_error_reply() {
        for payload in [
            vec![],
            vec![0, 0, 0, 9, b'v'],
            vec![0, 0, 0, 0, 0, 2, 0, 1],
            vec![255, 255, 255, 255, 0, 0],
        ] {
            let backend = disk(false);
            let mut client = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
            client.extend(option(OPT_INFO, &payload));
            client.extend(option(OPT_ABORT, &[]));
            let (result, out) = run(client, &backend);
            assert!(!result.unwrap().attached);
            assert_eq!(
                option_replies(&out[18..])[0].1,
                REP_ERR_INVALID,
                "{payload:?}"
            );
        }
    }

    #[test]
    fn too_many_options_end_the_handshake() {
        let backend = disk(false);
        let mut client = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        for _ in 0..=MAX_OPTIONS {
            client.extend(option(OPT_LIST, &[]));
        }
        assert!(
            matches!(run(client, &backend).0, Err(NbdError::Protocol(m)) if m.contains("options"))
        );
    }
}
