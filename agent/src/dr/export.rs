//! `blkmirror export`: any retained point served as a block device over NBD in seconds, beside
//! a running receiver, with no restore first.
//!
//! # Reading a point while the receiver commits
//!
//! A [`PointView`] reads point `P` the way `restore` does: a chunk comes from the oldest undo
//! delta on the way back from the image's point to `P` that holds it, else from the image, and
//! every chunk is checked against its stored hash. Unlike `restore`, the view does not hold the
//! volume's lock for its whole life (the receiver could not commit while a VM runs on the
//! export). It takes the lock shared for each read only, and first checks whether the receiver
//! has moved the image on:
//!
//! * `volume.json` is replaced (a new inode) by every commit. The view keeps the file it last
//!   read open, so that inode cannot be reused: a different inode at the path means a commit,
//!   and the view maps the point again from the new head.
//! * A receiver killed in the middle of applying a cycle leaves `undo-(HEAD+1)-HEAD` written but
//!   `volume.json` not yet replaced. The view then reads the chunks that delta holds from it,
//!   not from the half-written image ([`PointStore::advance_map`]).
//!
//! A point's content never changes, so whatever a view has read stays right.
//!
//! # Pins
//!
//! Retention must not drop an exported point, and a volume whose policy keeps only the newest
//! point would keep no deltas at all. The view pins its point ([`PointPin`]): the receiver keeps
//! a pinned point and captures undo deltas while any pin exists. A pin is a file locked by the
//! export's process, so one left by a killed export is removed by the next commit.
//!
//! # Writable exports
//!
//! `--writable` puts a copy-on-write overlay in front of the view ([`Overlay`]): a sparse file
//! beside the volume, unlinked as soon as it is made (nothing is left behind, even after a
//! SIGKILL). A chunk's first write copies the point's chunk into the overlay; reads of written
//! chunks come from it. The replica and its points are never written.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::{
        fs::{FileExt, MetadataExt as _, OpenOptionsExt as _},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::dr::{
    audit::{AuditLog, Event},
    nbd::{self, Backend},
    ops::{OpsError, PointSelector, select},
    points::{Delta, MappedChunk, PointMap, PointStore},
    storage::{Disk, LocalDisk, OpenMode, StoredFile},
    stored::StoredPoint,
    volume::{PointPin, StoreError, Volume, lock_volume, parse_meta},
};
use blkmirror_protocol::{units, wire};

/// Clients served at once; more wait in the listen queue.
pub const MAX_CLIENTS: usize = 16;
/// The handshake must finish within this (a client that connects and says nothing is dropped).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

fn store_err(error: impl Into<StoreError>) -> io::Error {
    io::Error::other(error.into().to_string())
}

/// What an export reads its point from: the receiver's data directory ([`PointView`]) or the
/// object store ([`crate::dr::storeview::StorePointView`]).
pub trait PointSource: Send + Sync {
    /// The point served.
    fn point(&self) -> &StoredPoint;
    /// The volume's size.
    fn size(&self) -> u64;
    /// The volume's chunk size.
    fn chunk_bytes(&self) -> u64;
    /// Reads `buf.len()` bytes of the point at `offset`, checking every chunk it touches.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl PointSource for PointView {
    fn point(&self) -> &StoredPoint {
        PointView::point(self)
    }

    fn size(&self) -> u64 {
        PointView::size(self)
    }

    fn chunk_bytes(&self) -> u64 {
        PointView::chunk_bytes(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        PointView::read_at(self, buf, offset)
    }
}

/// One retained point of a volume, readable while the receiver goes on committing.
pub struct PointView {
    volume: String,
    point: StoredPoint,
    size: u64,
    chunk_bytes: u64,
    dir: PathBuf,
    disk: Disk,
    _pin: PointPin,
    state: Mutex<ViewState>,
}

struct ViewState {
    /// The `volume.json` the map was built from, held open (see the module docs).
    meta_file: File,
    store: PointStore,
    image: Box<dyn StoredFile>,
    hashes: Box<dyn StoredFile>,
    map: PointMap,
    /// The last chunk read, in `buffer` (a point's content never changes).
    cached: Option<u64>,
    buffer: Vec<u8>,
    /// Times the map was rebuilt or advanced after a commit.
    remaps: u64,
}

impl PointView {
    /// Opens the point `selector` names of volume `name` under `data_dir`, and pins it.
    pub fn open(data_dir: &Path, name: &str, selector: &PointSelector) -> Result<Self, OpsError> {
        if *selector == PointSelector::All {
            return Err(OpsError::Usage(
                "an export serves one point, not --at all".into(),
            ));
        }
        wire::check_volume_name(name).map_err(|error| OpsError::Usage(error.to_string()))?;
        let disk = LocalDisk::shared();
        let dir = Volume::dir_of(data_dir, name);
        let meta_path = dir.join("volume.json");
        if !meta_path.exists() {
            return Err(OpsError::Usage(format!(
                "no volume {name:?} in {}",
                data_dir.display()
            )));
        }
        let _lock = lock_volume(&disk, &dir, true)?;
        let (meta_file, meta) = read_meta_file(&meta_path)?;
        if meta.unsettled {
            return Err(OpsError::Usage(format!(
                "volume {name} is in the middle of an initial sync: it has no point to export yet"
            )));
        }
        let point = select(&meta.points, selector)
            .map_err(OpsError::Usage)?
            .remove(0);
        let pin = PointPin::take(&disk, &dir, point.seq)?;
        let store = PointStore::open(&disk, &dir, meta.chunk_bytes, meta.size_bytes)
            .map_err(StoreError::from)?;
        let image_path = dir.join("image.raw");
        let image = disk
            .open(&image_path, OpenMode::Read)
            .map_err(StoreError::io("opening", &image_path))?;
        let hashes = store.open_hashes().map_err(StoreError::from)?;
        let map = store
            .map_point(meta.committed_seq, point.seq)
            .map_err(StoreError::from)?;
        let state = ViewState {
            meta_file,
            store,
            image,
            hashes,
            map,
            cached: None,
            buffer: vec![0; meta.chunk_bytes as usize],
            remaps: 0,
        };
        let view = Self {
            volume: name.to_owned(),
            point,
            size: meta.size_bytes,
            chunk_bytes: meta.chunk_bytes,
            dir,
            disk,
            _pin: pin,
            state: Mutex::new(state),
        };
        // A receiver killed while applying a cycle: read around its half-written image.
        view.follow_receiver(&mut view.state.lock().expect("not poisoned"))
            .map_err(|error| OpsError::Store(StoreError::Sequence(error.to_string())))?;
        Ok(view)
    }

    /// The point served.
    pub fn point(&self) -> &StoredPoint {
        &self.point
    }

    /// The volume's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The volume's chunk size.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// How many times the view followed a commit of the receiver.
    pub fn remaps(&self) -> u64 {
        self.state.lock().expect("not poisoned").remaps
    }

    /// Brings the map up to the receiver's current head (see the module docs). Called with the
    /// volume's lock held shared.
    fn follow_receiver(&self, state: &mut ViewState) -> io::Result<()> {
        let meta_path = self.dir.join("volume.json");
        let current = fs::metadata(&meta_path)?.ino();
        if current != state.meta_file.metadata()?.ino() {
            let (meta_file, meta) = read_meta_file(&meta_path).map_err(store_err)?;
            if meta.unsettled || !meta.points.iter().any(|p| p.seq == self.point.seq) {
                return Err(io::Error::other(format!(
                    "point {} of volume {} is no longer retained (a receiver without support \
                     for pins, or a re-sync of the volume)",
                    self.point.seq, self.volume
                )));
            }
            state.map = state
                .store
                .map_point(meta.committed_seq, self.point.seq)
                .map_err(store_err)?;
            state.meta_file = meta_file;
            state.remaps += 1;
        }
        let pending = Delta {
            from: state.map.head() + 1,
            to: state.map.head(),
        };
        if state.store.has_delta(pending) {
            state
                .store
                .advance_map(&mut state.map, pending)
                .map_err(store_err)?;
            state.remaps += 1;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of the point at `offset`, checking every chunk it touches.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|end| *end <= self.size)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let _lock = self.disk.lock(&self.dir.join("lock"), true)?;
        let mut guard = self.state.lock().expect("not poisoned");
        let state = &mut *guard;
        self.follow_receiver(state)?;
        let mut at = offset;
        while at < end {
            let chunk = at / self.chunk_bytes;
            let chunk_start = chunk * self.chunk_bytes;
            let len = state.store.chunk_len(chunk) as usize;
            if state.cached != Some(chunk) {
                state.cached = None;
                match state
                    .store
                    .read_mapped_chunk(
                        &state.map,
                        &*state.image,
                        &*state.hashes,
                        chunk,
                        &mut state.buffer,
                    )
                    .map_err(store_err)?
                {
                    MappedChunk::Zero { .. } => state.buffer[..len].fill(0),
                    MappedChunk::Data { intact: true, .. } => {}
                    MappedChunk::Data { intact: false, .. } => {
                        return Err(io::Error::other(format!(
                            "point {} of volume {} is corrupt at byte offset {chunk_start}: the \
                             chunk does not match its stored hash",
                            self.point.seq, self.volume
                        )));
                    }
                }
                state.cached = Some(chunk);
            }
            let from = (at - chunk_start) as usize;
            let take = (len - from).min((end - at) as usize);
            let out = (at - offset) as usize;
            buf[out..out + take].copy_from_slice(&state.buffer[from..from + take]);
            at += take as u64;
        }
        Ok(())
    }
}

/// The operator: the login name behind `sudo`, else the user id.
pub(crate) fn current_user() -> String {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    // Set by the receiver daemon for the commands it runs for a control-socket client.
    if let Ok(name) = std::env::var("BLKMIRROR_OPERATOR")
        && !name.is_empty()
    {
        return format!("{name} via the control socket");
    }
    match std::env::var("SUDO_USER") {
        Ok(name) if !name.is_empty() => format!("{name} (uid {uid} via sudo)"),
        _ => format!("uid {uid}"),
    }
}

fn read_meta_file(path: &Path) -> Result<(File, crate::dr::volume::VolumeMeta), StoreError> {
    let mut file = File::open(path).map_err(StoreError::io("opening", path))?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(StoreError::io("reading", path))?;
    let meta = parse_meta(&text).map_err(|message| StoreError::Meta {
        path: path.to_owned(),
        message,
    })?;
    Ok((file, meta))
}

/// A copy-on-write overlay in front of a [`PointView`]: writes land in a sparse file at chunk
/// granularity; the view is never written.
///
/// A `--writable` export's overlay is unlinked at once ([`Overlay::create`]). A failover to an
/// export keeps its overlay ([`Overlay::open_kept`]): the file stays, and the map of the chunks
/// it holds is written beside it at every flush (after the data is synced), so what a guest
/// flushed survives the export's restart and is what a failback sends back.
pub struct Overlay {
    file: File,
    /// One bit per chunk: copied into the overlay.
    present: Mutex<Vec<u64>>,
    chunk_bytes: u64,
    size: u64,
    /// Where the map is kept, for a kept overlay.
    map: Option<PathBuf>,
    /// A chunk was added since the map was last written.
    map_dirty: AtomicBool,
    /// A kept overlay's lock: one process serves it at a time.
    _lock: Option<File>,
}

/// The overlay file of a kept overlay, in its directory.
pub const KEPT_OVERLAY_FILE: &str = "overlay";
/// Its map.
pub const KEPT_OVERLAY_MAP: &str = "overlay.map";
const OVERLAY_MAP_MAGIC: &[u8; 8] = b"BLKMOVL1";

impl Overlay {
    /// Makes the overlay file in `dir` (and unlinks it at once).
    pub fn create(dir: &Path, size: u64, chunk_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join(format!(".overlay-{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        fs::remove_file(&path)?;
        file.set_len(size)?;
        Ok(Self::with_file(file, size, chunk_bytes, None, None))
    }

    fn with_file(
        file: File,
        size: u64,
        chunk_bytes: u64,
        map: Option<PathBuf>,
        present: Option<Vec<u64>>,
    ) -> Self {
        let words = size.div_ceil(chunk_bytes).div_ceil(64) as usize;
        Self {
            file,
            present: Mutex::new(present.unwrap_or_else(|| vec![0; words])),
            chunk_bytes,
            size,
            map,
            map_dirty: AtomicBool::new(false),
            _lock: None,
        }
    }

    /// Opens the kept overlay in `dir`, or makes it there: the file `overlay` and its map
    /// `overlay.map` (a missing map is an empty overlay; a damaged one is refused). It is
    /// locked (`dir/lock`) for as long as this lives: another process gets `WouldBlock`.
    pub fn open_kept(dir: &Path, size: u64, chunk_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let lock = lock_kept(dir)?;
        let path = dir.join(KEPT_OVERLAY_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            file.set_len(size)?;
        } else if len != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: {len} bytes, the volume has {size}: not this volume's overlay",
                    path.display()
                ),
            ));
        }
        let map_path = dir.join(KEPT_OVERLAY_MAP);
        let present = match fs::read(&map_path) {
            Ok(bytes) => Some(
                decode_overlay_map(&bytes, size, chunk_bytes).map_err(|why| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {why}", map_path.display()),
                    )
                })?,
            ),
            Err(error) if error.kind() == io::ErrorKind::NotFound => None,
            Err(error) => return Err(error),
        };
        Ok(Self {
            _lock: Some(lock),
            ..Self::with_file(file, size, chunk_bytes, Some(map_path), present)
        })
    }

    fn has(present: &[u64], chunk: u64) -> bool {
        present[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    /// Bytes of the overlay's chunks (what the writes cost in space).
    pub fn bytes(&self) -> u64 {
        let present = self.present.lock().expect("not poisoned");
        present
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>()
            * self.chunk_bytes
    }

    /// The chunks written, as half-open chunk ranges (for a failback: what the DR site
    /// changed since the failover).
    pub fn written(&self) -> Vec<(u64, u64)> {
        let present = self.present.lock().expect("not poisoned");
        let chunks = self.size.div_ceil(self.chunk_bytes);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for chunk in 0..chunks {
            if !Self::has(&present, chunk) {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if last.1 == chunk => last.1 = chunk + 1,
                _ => ranges.push((chunk, chunk + 1)),
            }
        }
        ranges
    }

    /// Makes the overlay durable: its data synced, then (a kept overlay) its map written, so
    /// a chunk the map names is always whole in the file.
    pub fn flush(&self) -> io::Result<()> {
        let present = self.present.lock().expect("not poisoned");
        self.file.sync_data()?;
        if let Some(map) = &self.map
            && self.map_dirty.swap(false, Ordering::SeqCst)
        {
            let bytes = encode_overlay_map(&present, self.size, self.chunk_bytes);
            if let Err(error) = LocalDisk::shared().write_atomic(map, &bytes) {
                self.map_dirty.store(true, Ordering::SeqCst);
                return Err(error);
            }
        }
        Ok(())
    }
}

/// Takes the lock of the kept overlay in `dir` (held until the file is closed).
pub fn lock_kept(dir: &Path) -> io::Result<File> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join("lock"))?;
    if crate::tracker::sys::try_lock_exclusive(&lock)? {
        Ok(lock)
    } else {
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "in use by another process (an `export --promoted`, a `failover --to export`, a \
             `failback serve --export`, or the receiver's `[[export]]` with promoted = true): \
             stop it first",
        ))
    }
}

/// A kept overlay's map: magic, volume size, chunk size, word count, the bitmap words (all
/// little-endian `u64`), then the BLAKE3 hash of everything before it.
pub(crate) fn encode_overlay_map(present: &[u64], size: u64, chunk_bytes: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(32 + present.len() * 8 + 32);
    bytes.extend_from_slice(OVERLAY_MAP_MAGIC);
    for value in [size, chunk_bytes, present.len() as u64] {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    for word in present {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    let hash = wire::chunk_hash(&bytes);
    bytes.extend_from_slice(&hash);
    bytes
}

/// Checks and decodes a kept overlay's map for a volume of `size` bytes in `chunk_bytes`
/// chunks. Pure: a damaged or planted map is refused with what is wrong.
pub fn decode_overlay_map(bytes: &[u8], size: u64, chunk_bytes: u64) -> Result<Vec<u64>, String> {
    if chunk_bytes == 0 {
        return Err("a chunk size of 0".into());
    }
    let words = size.div_ceil(chunk_bytes).div_ceil(64);
    let expected = 32 + words.saturating_mul(8) + 32;
    if bytes.len() as u64 != expected {
        return Err(format!(
            "{} bytes, a map of this volume has {expected}",
            bytes.len()
        ));
    }
    let (body, hash) = bytes.split_at(bytes.len() - 32);
    if wire::chunk_hash(body)[..] != hash[..] {
        return Err("its checksum does not match (damaged)".into());
    }
    if &body[..8] != OVERLAY_MAP_MAGIC {
        return Err("not an overlay map".into());
    }
    let field = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    if field(8) != size || field(16) != chunk_bytes || field(24) != words {
        return Err(format!(
            "made for {} bytes in {}-byte chunks, the volume has {size} in {chunk_bytes}",
            field(8),
            field(16)
        ));
    }
    Ok(body[32..]
        .chunks_exact(8)
        .map(|word| u64::from_le_bytes(word.try_into().expect("8 bytes")))
        .collect())
}

/// What an export serves: a view, with an overlay when writable.
pub struct ExportDisk {
    view: Box<dyn PointSource>,
    overlay: Option<Overlay>,
    writable: bool,
}

impl ExportDisk {
    /// A read-only export of `view`, or a writable one over `overlay`.
    pub fn new(view: impl PointSource + 'static, overlay: Option<Overlay>) -> Self {
        let writable = overlay.is_some();
        Self {
            view: Box::new(view),
            overlay,
            writable,
        }
    }

    /// An export of `view` with `overlay`'s writes, read-only (a promoted export after the
    /// source became primary again: what the DR site wrote can be read, not added to).
    pub fn read_only_over(view: PointView, overlay: Overlay) -> Self {
        Self {
            view: Box::new(view),
            overlay: Some(overlay),
            writable: false,
        }
    }

    /// The view.
    pub fn view(&self) -> &dyn PointSource {
        self.view.as_ref()
    }

    /// The overlay, when writable.
    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_ref()
    }
}

impl Backend for ExportDisk {
    fn size(&self) -> u64 {
        self.view.size()
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn preferred_block(&self) -> u32 {
        self.view.chunk_bytes() as u32
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(overlay) = &self.overlay else {
            return self.view.read_at(buf, offset);
        };
        let chunk_bytes = overlay.chunk_bytes;
        let present = overlay.present.lock().expect("not poisoned");
        let end = offset + buf.len() as u64;
        let mut at = offset;
        // Runs of chunks from the same side, one read each.
        while at < end {
            let chunk = at / chunk_bytes;
            let in_overlay = Overlay::has(&present, chunk);
            let mut run_end = ((chunk + 1) * chunk_bytes).min(end);
            while run_end < end && Overlay::has(&present, run_end / chunk_bytes) == in_overlay {
                run_end = ((run_end / chunk_bytes + 1) * chunk_bytes).min(end);
            }
            let out = &mut buf[(at - offset) as usize..(run_end - offset) as usize];
            if in_overlay {
                FileExt::read_exact_at(&overlay.file, out, at)?;
            } else {
                self.view.read_at(out, at)?;
            }
            at = run_end;
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let overlay = self
            .overlay
            .as_ref()
            .filter(|_| self.writable)
            .ok_or_else(|| io::Error::from(io::ErrorKind::PermissionDenied))?;
        let chunk_bytes = overlay.chunk_bytes;
        let mut present = overlay.present.lock().expect("not poisoned");
        let end = offset + data.len() as u64;
        let mut copy = vec![0u8; chunk_bytes as usize];
        for chunk in offset / chunk_bytes..end.div_ceil(chunk_bytes) {
            if Overlay::has(&present, chunk) {
                continue;
            }
            let start = chunk * chunk_bytes;
            let len = chunk_bytes.min(self.view.size() - start) as usize;
            // A chunk the write covers whole needs no copy of the point's.
            if !(offset <= start && start + len as u64 <= end) {
                self.view.read_at(&mut copy[..len], start)?;
                FileExt::write_all_at(&overlay.file, &copy[..len], start)?;
            }
            present[(chunk / 64) as usize] |= 1 << (chunk % 64);
            overlay.map_dirty.store(true, Ordering::SeqCst);
        }
        FileExt::write_all_at(&overlay.file, data, offset)
    }

    fn flush(&self) -> io::Result<()> {
        match &self.overlay {
            Some(overlay) => overlay.flush(),
            None => Ok(()),
        }
    }
}

/// Where an export listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

/// Parses `--listen`: `HOST:PORT` (an IP address), or `unix:PATH` / an absolute path.
pub fn parse_listen(text: &str) -> Result<ListenAddr, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    if text.starts_with('/') {
        return Ok(ListenAddr::Unix(PathBuf::from(text)));
    }
    text.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
        format!(
            "{text:?}: expected IP:PORT (such as 127.0.0.1:10809) or unix:PATH for a Unix socket"
        )
    })
}

/// A bound export socket.
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = fs::remove_file(path);
        }
    }
}

/// A client's stream, either kind.
enum Client {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl io::Read for Client {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(stream) => stream.read(buf),
            Self::Unix(stream) => stream.read(buf),
        }
    }
}

impl io::Write for Client {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(stream) => io::Write::write(stream, buf),
            Self::Unix(stream) => io::Write::write(stream, buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Client {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(stream) => stream.set_read_timeout(timeout),
            Self::Unix(stream) => stream.set_read_timeout(timeout),
        }
    }
}

/// The options of `blkmirror export`.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// The receiver's data directory.
    pub data_dir: PathBuf,
    /// The volume (also the export's name).
    pub volume: String,
    /// The point.
    pub at: PointSelector,
    /// Where to listen.
    pub listen: ListenAddr,
    /// A copy-on-write overlay in front.
    pub writable: bool,
    /// Where the overlay file goes (default: the volume's directory).
    pub overlay_dir: Option<PathBuf>,
    /// Allow a TCP address other than loopback.
    pub allow_remote: bool,
    /// Serve the export a `failover --to export` promoted (`at`, `writable` and `overlay_dir`
    /// are then the failover's, not these).
    pub promoted: bool,
    /// Serve the point from this object store instead of the data directory (which then only
    /// takes the audit entry, if it exists).
    pub store: Option<crate::dr::objstore::StoreConfig>,
}

/// `blkmirror export`: serves until the process is stopped. Prints the export's NBD URI on
/// standard output as its first line, once clients can connect.
pub fn export(options: &ExportOptions) -> Result<(), OpsError> {
    let (listener, disk, uri) = start(options)?;
    println!("{uri}");
    let _ = io::Write::flush(&mut io::stdout());
    serve_forever(&listener, &disk, &options.volume)
}

/// An export the receiver daemon serves from `receiver.toml`'s `[[export]]` sections: its
/// accept loop runs on a thread until [`DaemonExport::stop`] (or drop).
pub struct DaemonExport {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    disk: Arc<ExportDisk>,
    /// Its NBD URI.
    pub uri: String,
}

impl DaemonExport {
    /// Opens the point, binds, audits, and serves on a thread.
    pub fn start(options: &ExportOptions) -> Result<Self, OpsError> {
        let (listener, disk, uri) = if options.promoted {
            start_promoted(options)?
        } else {
            start(options)?
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, name, served) = (stop.clone(), options.volume.clone(), disk.clone());
        let thread = std::thread::Builder::new()
            .name(format!("export-{name}"))
            .spawn(move || serve_until(&listener, &served, &name, &flag))
            .map_err(|source| OpsError::Target {
                what: "starting a thread for",
                path: PathBuf::from(&uri),
                source,
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
            disk,
            uri,
        })
    }

    /// Stops accepting clients and waits for the accept loop (connected clients finish on
    /// their own threads; the point stays pinned until the last one goes).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
            // A promoted export's overlay keeps what was written up to now.
            if let Some(Err(error)) = self.disk.overlay().map(Overlay::flush) {
                eprintln!(
                    "blkmirror: export {}: flushing its overlay: {error}",
                    self.uri
                );
            }
        }
    }
}

impl Drop for DaemonExport {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Refuses a TCP address that is not loopback unless allowed (NBD has no authentication).
fn check_listen(options: &ExportOptions) -> Result<(), OpsError> {
    if let ListenAddr::Tcp(addr) = &options.listen
        && !addr.ip().is_loopback()
        && !options.allow_remote
    {
        return Err(OpsError::Usage(format!(
            "{addr} is not a loopback address: NBD has no authentication, so anyone who can \
             reach it could read the volume; use a Unix socket, 127.0.0.1 with an SSH tunnel, \
             or --allow-remote on a trusted network"
        )));
    }
    Ok(())
}

/// Checks, opens the point (and overlay), binds and audits an export; returns its listener,
/// disk and URI.
fn start(options: &ExportOptions) -> Result<(Listener, Arc<ExportDisk>, String), OpsError> {
    check_listen(options)?;
    let started = Instant::now();
    if let Some(store) = &options.store {
        let view = crate::dr::storeview::StorePointView::open(store, &options.volume, &options.at)?;
        let overlay = if options.writable {
            let dir = options.overlay_dir.clone().ok_or_else(|| {
                OpsError::Usage(
                    "--writable with --from-store needs --overlay-dir DIR: where the \
                     copy-on-write overlay goes (there is no volume directory)"
                        .into(),
                )
            })?;
            Some(overlay_for(&view, &dir)?)
        } else {
            None
        };
        return announce(options, ExportDisk::new(view, overlay), started, false);
    }
    let view = PointView::open(&options.data_dir, &options.volume, &options.at)?;
    let overlay = if options.writable {
        let dir = options
            .overlay_dir
            .clone()
            .unwrap_or_else(|| Volume::dir_of(&options.data_dir, &options.volume));
        Some(overlay_for(&view, &dir)?)
    } else {
        None
    };
    announce(options, ExportDisk::new(view, overlay), started, false)
}

/// A new copy-on-write overlay in `dir` for the point `view` reads.
pub(crate) fn overlay_for(view: &dyn PointSource, dir: &Path) -> Result<Overlay, OpsError> {
    Overlay::create(dir, view.size(), view.chunk_bytes()).map_err(|source| OpsError::Target {
        what: "creating the overlay in",
        path: dir.to_owned(),
        source,
    })
}

/// Binds, audits and announces an export of `disk`.
fn announce(
    options: &ExportOptions,
    disk: ExportDisk,
    started: Instant,
    promoted: bool,
) -> Result<(Listener, Arc<ExportDisk>, String), OpsError> {
    let point = disk.view().point().clone();
    let writable = disk.writable();
    let disk = Arc::new(disk);
    let (listener, uri) = bind(&options.listen, &options.volume)?;
    // From the store, the data directory may not exist (a DR machine without a receiver).
    let audit = AuditLog::in_dir(&options.data_dir);
    let record = if options.store.is_some() && !options.data_dir.is_dir() {
        Ok(String::new())
    } else {
        audit.append(Event {
        event: "export",
        volume: Some(options.volume.clone()),
        outcome: "ok".into(),
        detail: serde_json::json!({
            "seq": point.seq,
            "point_time_unix_ms": point.time_unix_ms,
            "writable": writable,
            "promoted": promoted,
            "listen": uri,
            "user": current_user(),
            "from_store": options.store.as_ref().map(|store| format!("{} bucket {}", store.endpoint, store.bucket)),
        }),
        ..Default::default()
    })
    };
    if let Err(error) = record {
        eprintln!("blkmirror: warning: audit log: {error}");
    }
    eprintln!(
        "blkmirror: exporting volume {} point {} ({}, {}) {} at {uri}, ready in {} ms",
        options.volume,
        point.seq,
        units::format_utc(point.time_unix_ms),
        if point.consistent {
            "consistent"
        } else {
            "fuzzy"
        },
        match (promoted, writable) {
            (true, true) => format!(
                "promoted, writable (the failover's overlay, {} written so far)",
                units::format_size(disk.overlay().map_or(0, Overlay::bytes))
            ),
            (true, false) => "promoted, read-only (the failover is no longer in force)".into(),
            (false, true) => "writable (copy-on-write: the replica is not written)".into(),
            (false, false) => "read-only".into(),
        },
        started.elapsed().as_millis()
    );
    Ok((listener, disk, uri))
}

/// Checks, opens the promoted export (locked while its overlay lives), binds and audits.
fn start_promoted(
    options: &ExportOptions,
) -> Result<(Listener, Arc<ExportDisk>, String), OpsError> {
    check_listen(options)?;
    let started = Instant::now();
    let opened = crate::dr::failback::open_promoted_export(&options.data_dir, &options.volume)?;
    announce(options, opened.disk, started, true)
}

/// `blkmirror export VOLUME --promoted` (and the serving half of `failover --to export`):
/// serves the export a failover promoted, its writes kept in its overlay, until SIGINT or
/// SIGTERM; then flushes the overlay. `options.at` and `options.writable` are not used: the
/// failover decided them.
pub fn export_promoted(options: &ExportOptions) -> Result<(), OpsError> {
    let stop_signals = crate::dr::recovery::StopSignals::install()?;
    let (listener, disk, uri) = start_promoted(options)?;
    println!("{uri}");
    let _ = io::Write::flush(&mut io::stdout());
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        stop_signals.wait();
        flag.store(true, Ordering::SeqCst);
    });
    serve_until(&listener, &disk, &options.volume, &stop);
    // Clients still connected lose what they did not flush, as with a disk pulled out.
    let flushed = disk.overlay().map_or(Ok(()), Overlay::flush);
    let written = disk.overlay().map_or(0, Overlay::bytes);
    flushed.map_err(|source| OpsError::Target {
        what: "flushing the overlay of",
        path: Volume::dir_of(&options.data_dir, &options.volume)
            .join(crate::dr::failback::PROMOTED_EXPORT_DIR),
        source,
    })?;
    eprintln!(
        "blkmirror: promoted export of volume {} stopped; its overlay keeps {} written at the DR \
         site (`blkmirror export {} --promoted` serves it again, `blkmirror failback serve {} \
         --export` sends it back)",
        options.volume,
        units::format_size(written),
        options.volume,
        options.volume
    );
    Ok(())
}

/// Accepts clients of `listener` for ever, a thread each (at most [`MAX_CLIENTS`] at once).
pub(crate) fn serve_forever(listener: &Listener, disk: &Arc<ExportDisk>, name: &str) -> ! {
    serve_until(listener, disk, name, &AtomicBool::new(false));
    unreachable!("nothing stops the export");
}

/// Accepts clients of `listener` until `stop` is set (checked every 50 ms; the listener is
/// made non-blocking for that), a thread each (at most [`MAX_CLIENTS`] at once). Clients
/// already connected are served until they disconnect.
pub(crate) fn serve_until(
    listener: &Listener,
    disk: &Arc<ExportDisk>,
    name: &str,
    stop: &AtomicBool,
) {
    let clients = Arc::new(AtomicUsize::new(0));
    let _ = match listener {
        Listener::Tcp(listener) => listener.set_nonblocking(true),
        Listener::Unix(listener, _) => listener.set_nonblocking(true),
    };
    while !stop.load(Ordering::SeqCst) {
        let client = match &listener {
            Listener::Tcp(listener) => listener.accept().and_then(|(stream, peer)| {
                stream.set_nonblocking(false)?;
                let _ = stream.set_nodelay(true);
                Ok((Client::Tcp(stream), peer.to_string()))
            }),
            Listener::Unix(listener, _) => listener.accept().and_then(|(stream, _)| {
                stream.set_nonblocking(false)?;
                Ok((Client::Unix(stream), "unix socket".to_owned()))
            }),
        };
        let (mut client, peer) = match client {
            Ok(client) => client,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(error) => {
                eprintln!("blkmirror: export: accept: {error}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if clients.load(Ordering::SeqCst) >= MAX_CLIENTS {
            eprintln!("blkmirror: export: {peer} refused: {MAX_CLIENTS} clients already");
            continue;
        }
        clients.fetch_add(1, Ordering::SeqCst);
        let (disk, clients, name) = (disk.clone(), clients.clone(), name.to_owned());
        std::thread::spawn(move || {
            let _ = client.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
            let result = serve_client(&mut client, &name, &disk);
            match result {
                Ok(stats) if stats.attached => eprintln!(
                    "blkmirror: export: {peer} disconnected: {} read in {} request(s), {} \
                     written, {} error(s)",
                    units::format_size(stats.read_bytes),
                    stats.reads,
                    units::format_size(stats.written_bytes),
                    stats.errors
                ),
                Ok(_) => {}
                // A client killed (a drill's guest once healthy, qemu-img interrupted) ends
                // without NBD_CMD_DISC; its writes are in the overlay already.
                Err(crate::dr::nbd::NbdError::Io(error))
                    if error.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    eprintln!("blkmirror: export: {peer} went away without a disconnect request")
                }
                Err(error) => eprintln!("blkmirror: export: {peer}: {error}"),
            }
            clients.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// One client: the handshake under a timeout, then requests for as long as it likes (a VM's
/// disk may be idle for hours).
fn serve_client(
    client: &mut Client,
    name: &str,
    disk: &ExportDisk,
) -> Result<nbd::SessionStats, nbd::NbdError> {
    let mut stats = nbd::SessionStats::default();
    if !nbd::handshake(client, name, disk)? {
        return Ok(stats);
    }
    client.set_read_timeout(None)?;
    stats.attached = true;
    nbd::transmit(client, disk, &mut stats)?;
    Ok(stats)
}

/// Binds `listen` for export `volume`; returns the listener and the export's NBD URI.
pub(crate) fn bind(listen: &ListenAddr, volume: &str) -> Result<(Listener, String), OpsError> {
    match listen {
        ListenAddr::Tcp(addr) => {
            let listener = TcpListener::bind(addr).map_err(|source| OpsError::Target {
                what: "listening on",
                path: PathBuf::from(addr.to_string()),
                source,
            })?;
            let local = listener.local_addr().map_err(|source| OpsError::Target {
                what: "listening on",
                path: PathBuf::from(addr.to_string()),
                source,
            })?;
            let host = match local {
                SocketAddr::V4(v4) => v4.ip().to_string(),
                SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
            };
            Ok((
                Listener::Tcp(listener),
                format!("nbd://{host}:{}/{volume}", local.port()),
            ))
        }
        ListenAddr::Unix(path) => {
            if path.exists() {
                // A socket left by an export that was killed: nobody answers on it.
                if UnixStream::connect(path).is_ok() {
                    return Err(OpsError::Usage(format!(
                        "{} is in use by another export",
                        path.display()
                    )));
                }
                let _ = fs::remove_file(path);
            }
            let listener = UnixListener::bind(path).map_err(|source| OpsError::Target {
                what: "listening on",
                path: path.clone(),
                source,
            })?;
            Ok((
                Listener::Unix(listener, path.clone()),
                format!("nbd+unix:///{volume}?socket={}", path.display()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;
    use blkmirror_protocol::{
        retention::RetentionPolicy,
        wire::{CheckedData, Hello, PROTOCOL_VERSION, PointInfo},
    };

    const CHUNK: u64 = 65536;
    const SIZE: u64 = 16 * CHUNK;

    fn volume(data: &Path) -> Volume {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            volume: "v".into(),
            source_id: "test:source".into(),
            size_bytes: SIZE,
            chunk_bytes: CHUNK,
        };
        Volume::open_or_create(data, &hello).unwrap().0
    }

    /// A volume whose retention keeps only the newest point (so nothing but a pin keeps
    /// another).
    fn volume_keeping_newest_only(data: &Path) -> Volume {
        let mut volume = volume(data);
        volume.set_retention(RetentionPolicy {
            all: Duration::ZERO,
            hourly: Duration::ZERO,
            daily: Duration::ZERO,
            locked: Duration::ZERO,
        });
        volume
    }

    /// Commits the next cycle: each write fills `len` bytes at `offset` with `byte`.
    fn commit(volume: &mut Volume, writes: &[(u64, usize, u8)]) -> u64 {
        let seq = volume.meta().committed_seq + 1;
        volume.begin(seq, 0, false, 0).unwrap();
        for &(offset, len, byte) in writes {
            volume
                .journal(CheckedData::Write {
                    offset,
                    data: vec![byte; len],
                })
                .unwrap();
        }
        volume
            .commit(PointInfo {
                seq,
                complete: true,
                ..PointInfo::default()
            })
            .unwrap();
        seq
    }

    fn read(view: &PointView, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xEE; len];
        view.read_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn a_view_keeps_its_point_while_the_receiver_commits_and_pins_it_against_retention() {
        let tmp = TempDir::new("export-view");
        let data = tmp.0.join("data");
        // Only the newest point is kept, so without the pin no delta would be captured at all.
        let mut volume = volume_keeping_newest_only(&data);
        let first = commit(&mut volume, &[(0, 4096, 1), (3 * CHUNK, 100, 3)]);
        let view = PointView::open(&data, "v", &PointSelector::Latest).unwrap();
        assert_eq!(view.point().seq, first);
        assert_eq!(read(&view, 0, 4096), vec![1; 4096]);
        // Two more cycles rewrite what the point holds, with the view open.
        commit(&mut volume, &[(0, 8192, 2), (5 * CHUNK, 10, 5)]);
        commit(&mut volume, &[(100, 50, 9), (3 * CHUNK, CHUNK as usize, 7)]);
        assert_eq!(read(&view, 0, 4096), vec![1; 4096]);
        let across = read(&view, 3 * CHUNK - 10, 120);
        assert_eq!(&across[..10], &[0; 10]);
        assert_eq!(&across[10..110], &[3; 100]);
        assert_eq!(&across[110..], &[0; 10]);
        assert_eq!(read(&view, 5 * CHUNK, 10), vec![0; 10]);
        assert!(view.remaps() >= 1);
        // The pinned point is retained beside the newest.
        let seqs: Vec<u64> = volume.meta().points.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, vec![first, first + 2]);
        // Reads past the end are refused.
        let mut buf = [0u8; 2];
        assert!(view.read_at(&mut buf, SIZE - 1).is_err());
        drop(view);
        assert!(
            fs::read_dir(Volume::dir_of(&data, "v").join("pins"))
                .unwrap()
                .next()
                .is_none()
        );
        commit(&mut volume, &[(0, 1, 4)]);
        let seqs: Vec<u64> = volume.meta().points.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, vec![first + 3], "the unpinned point is pruned");
    }

    #[test]
    fn a_promoted_export_pins_its_point_and_is_read_only_when_its_failover_is_not_in_force() {
        let tmp = TempDir::new("export-promoted");
        let data = tmp.0.join("data");
        let mut volume = volume_keeping_newest_only(&data);
        let first = commit(&mut volume, &[(0, 4096, 1)]);
        let promoted = crate::dr::failback::promote_to_export(&data, "v", first, 2, false).unwrap();
        assert!(promoted.export);
        // A second promotion would discard the first one's writes: only with --force.
        assert!(matches!(
            crate::dr::failback::promote_to_export(&data, "v", first, 2, false),
            Err(OpsError::Usage(m)) if m.contains("--force")
        ));
        // The receiver commits on (as after a reprotect) and keeps the promoted point.
        commit(&mut volume, &[(0, 4096, 2)]);
        commit(&mut volume, &[(0, 4096, 3)]);
        let seqs: Vec<u64> = volume.meta().points.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, vec![first, first + 2]);
        // No failover is in force (the term never rose): it is served read-only, as the point.
        let opened = crate::dr::failback::open_promoted_export(&data, "v").unwrap();
        assert!(!opened.writable);
        assert!(!opened.disk.writable());
        assert!(opened.disk.write_at(&[9], 0).is_err());
        assert_eq!(read_disk(&opened.disk, 0, 4096), vec![1; 4096]);
        // One holder at a time.
        assert!(matches!(
            crate::dr::failback::open_promoted_export(&data, "v"),
            Err(OpsError::Usage(m)) if m.contains("in use")
        ));
        drop(opened);
        // Once its overlay is gone (a failback), the point is pruned like any other.
        fs::remove_dir_all(
            Volume::dir_of(&data, "v").join(crate::dr::failback::PROMOTED_EXPORT_DIR),
        )
        .unwrap();
        commit(&mut volume, &[(0, 1, 4)]);
        let seqs: Vec<u64> = volume.meta().points.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, vec![first + 3]);
    }

    fn read_disk(disk: &ExportDisk, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        disk.read_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn a_pin_left_by_a_dead_export_is_removed_and_does_not_hold_its_point() {
        let tmp = TempDir::new("export-stale-pin");
        let data = tmp.0.join("data");
        let mut volume = volume_keeping_newest_only(&data);
        let first = commit(&mut volume, &[(0, 10, 1)]);
        let pins = Volume::dir_of(&data, "v").join("pins");
        fs::create_dir_all(&pins).unwrap();
        let stale = pins.join(format!("{first}-999999-1"));
        File::create(&stale).unwrap();
        commit(&mut volume, &[(0, 10, 2)]);
        assert!(!stale.exists());
        assert_eq!(volume.meta().points.len(), 1);
    }

    #[test]
    fn a_view_reads_around_a_cycle_the_receiver_died_applying() {
        let tmp = TempDir::new("export-half-applied");
        let data = tmp.0.join("data");
        let mut volume = volume(&data);
        let first = commit(&mut volume, &[(0, 4096, 1)]);
        let view = PointView::open(&data, "v", &PointSelector::Seq(first)).unwrap();
        drop(volume);
        // What a receiver killed in the middle of applying cycle 2 leaves: its undo delta, and
        // chunk 0 of the image (and its hash) already rewritten; volume.json still at cycle 1.
        let dir = Volume::dir_of(&data, "v");
        let disk = LocalDisk::shared();
        let store = PointStore::open(&disk, &dir, CHUNK, SIZE).unwrap();
        let image = disk
            .open(&dir.join("image.raw"), OpenMode::ReadWrite)
            .unwrap();
        let mut first_chunk = crate::dr::points::ChunkRanges::default();
        first_chunk.insert(0, 1);
        store
            .capture(
                &*image,
                Delta {
                    from: first + 1,
                    to: first,
                },
                &first_chunk,
            )
            .unwrap();
        image.write_all_at(&[8; 4096], 0).unwrap();
        store
            .update_hashes(&*image, &Default::default(), [0])
            .unwrap();
        assert_eq!(read(&view, 0, 4096), vec![1; 4096]);
    }

    #[test]
    fn a_writable_export_keeps_its_writes_in_the_overlay_and_never_writes_the_replica() {
        let tmp = TempDir::new("export-overlay");
        let data = tmp.0.join("data");
        let mut volume = volume(&data);
        commit(&mut volume, &[(0, CHUNK as usize * 2, 1)]);
        let image_path = volume.image_path();
        let before = fs::read(&image_path).unwrap();
        let view = PointView::open(&data, "v", &PointSelector::Latest).unwrap();
        let overlay = Overlay::create(&tmp.0.join("overlay"), SIZE, CHUNK).unwrap();
        let disk = ExportDisk::new(view, Some(overlay));
        assert!(disk.writable());
        // A partial write into chunk 1 keeps the rest of the chunk's content.
        disk.write_at(&[7; 100], CHUNK + 10).unwrap();
        // A write covering chunk 4 whole.
        disk.write_at(&vec![6; CHUNK as usize], 4 * CHUNK).unwrap();
        disk.flush().unwrap();
        let mut buf = vec![0u8; 5 * CHUNK as usize];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf[..CHUNK as usize + 10].iter().all(|&b| b == 1));
        assert!(
            buf[CHUNK as usize + 10..CHUNK as usize + 110]
                .iter()
                .all(|&b| b == 7)
        );
        assert!(
            buf[CHUNK as usize + 110..2 * CHUNK as usize]
                .iter()
                .all(|&b| b == 1)
        );
        assert!(
            buf[2 * CHUNK as usize..4 * CHUNK as usize]
                .iter()
                .all(|&b| b == 0)
        );
        assert!(buf[4 * CHUNK as usize..].iter().all(|&b| b == 6));
        assert_eq!(disk.overlay().unwrap().bytes(), 2 * CHUNK);
        // The overlay file is unlinked; the replica and the point are as they were.
        assert!(
            fs::read_dir(tmp.0.join("overlay"))
                .unwrap()
                .next()
                .is_none()
        );
        assert_eq!(fs::read(&image_path).unwrap(), before);
        let mut point = vec![0u8; 100];
        disk.view().read_at(&mut point, CHUNK + 10).unwrap();
        assert_eq!(point, vec![1; 100]);
        // A read-only export refuses writes.
        let view = PointView::open(&data, "v", &PointSelector::Latest).unwrap();
        let read_only = ExportDisk::new(view, None);
        assert!(read_only.write_at(&[1], 0).is_err());
    }

    #[test]
    fn a_kept_overlay_keeps_what_was_flushed_across_a_restart_and_names_its_chunks() {
        let tmp = TempDir::new("export-kept-overlay");
        let data = tmp.0.join("data");
        let mut volume = volume(&data);
        commit(&mut volume, &[(0, CHUNK as usize * 2, 1)]);
        let kept = tmp.0.join("kept");
        let open = || {
            let view = PointView::open(&data, "v", &PointSelector::Latest).unwrap();
            let overlay = Overlay::open_kept(&kept, SIZE, CHUNK).unwrap();
            ExportDisk::new(view, Some(overlay))
        };
        let disk = open();
        disk.write_at(&[7; 100], CHUNK + 10).unwrap();
        disk.write_at(&vec![6; CHUNK as usize * 2], 4 * CHUNK)
            .unwrap();
        disk.flush().unwrap();
        // Written after the last flush: not in the map, so not kept (a disk pulled out).
        disk.write_at(&[9; 10], 8 * CHUNK).unwrap();
        assert_eq!(
            disk.overlay().unwrap().written(),
            vec![(1, 2), (4, 6), (8, 9)]
        );
        drop(disk);
        let disk = open();
        assert_eq!(disk.overlay().unwrap().written(), vec![(1, 2), (4, 6)]);
        let mut buf = vec![0u8; 9 * CHUNK as usize];
        disk.read_at(&mut buf, 0).unwrap();
        let at = |chunk: u64, offset: u64| buf[(chunk * CHUNK + offset) as usize];
        assert_eq!((at(1, 9), at(1, 10), at(1, 109), at(1, 110)), (1, 7, 7, 1));
        assert_eq!((at(4, 0), at(5, CHUNK - 1)), (6, 6));
        assert_eq!(at(8, 0), 0, "an unflushed write was kept");
        // A damaged map, or one of another volume, is refused with what is wrong.
        drop(disk);
        let map = kept.join(KEPT_OVERLAY_MAP);
        let mut bytes = fs::read(&map).unwrap();
        bytes[40] ^= 1;
        fs::write(&map, &bytes).unwrap();
        let error = Overlay::open_kept(&kept, SIZE, CHUNK).err().unwrap();
        assert!(error.to_string().contains("checksum"), "{error}");
        bytes[40] ^= 1;
        assert!(
            decode_overlay_map(&bytes, SIZE * 8, CHUNK)
                .unwrap_err()
                .contains("bytes")
        );
        assert!(
            decode_overlay_map(&bytes, SIZE * 2, CHUNK)
                .unwrap_err()
                .contains("made for")
        );
        assert!(decode_overlay_map(&bytes, SIZE, CHUNK).is_ok());
        assert!(decode_overlay_map(&[], SIZE, CHUNK).is_err());
    }

    #[test]
    fn export_refuses_what_it_cannot_serve() {
        let tmp = TempDir::new("export-refusals");
        let data = tmp.0.join("data");
        assert!(matches!(
            PointView::open(&data, "v", &PointSelector::Latest),
            Err(OpsError::Usage(m)) if m.contains("no volume")
        ));
        let mut volume = volume(&data);
        assert!(matches!(
            PointView::open(&data, "v", &PointSelector::Latest),
            Err(OpsError::Usage(m)) if m.contains("no retained point")
        ));
        commit(&mut volume, &[(0, 1, 1)]);
        assert!(matches!(
            PointView::open(&data, "v", &PointSelector::Seq(99)),
            Err(OpsError::Usage(m)) if m.contains("99")
        ));
        assert!(matches!(
            PointView::open(&data, "../v", &PointSelector::Latest),
            Err(OpsError::Usage(_))
        ));
        assert_eq!(
            parse_listen("unix:/run/x.sock"),
            Ok(ListenAddr::Unix("/run/x.sock".into()))
        );
        assert!(parse_listen("localhost:99").is_err());
        let remote = export(&ExportOptions {
            data_dir: data.clone(),
            volume: "v".into(),
            at: PointSelector::Latest,
            listen: parse_listen("192.0.2.1:10809").unwrap(),
            writable: false,
            overlay_dir: None,
            allow_remote: false,
            promoted: false,
            store: None,
        });
        assert!(matches!(remote, Err(OpsError::Usage(m)) if m.contains("loopback")));
    }
}
