//! A WAN in userspace: a UDP relay that sits between agent and receiver and models each
//! direction as a bottleneck router, because this machine has no netem.
//!
//! # The model ([`Direction`], pure: time is an argument)
//!
//! A datagram offered to a direction at time `now`:
//!
//! 1. **Queue.** The link serializes datagrams at `rate` into a FIFO. What is still queued at
//!    `now` is `(busy_until - now) × rate`; a datagram that would take the queue past
//!    `queue_bytes` is dropped at the tail (default: one bandwidth-delay product, the classic
//!    router sizing). A rate of 0 means no bottleneck.
//! 2. **Loss.** A transmitted datagram is lost with the loss probability of the channel's
//!    state: a Gilbert–Elliott chain with a good and a bad state (random loss is the chain
//!    that never leaves the good state). Lost datagrams still used the link.
//! 3. **Delay.** It arrives one-way `delay` after its last bit left, plus a uniform jitter in
//!    `[0, jitter]`. Datagrams keep their order (jitter only delays), except that with
//!    probability `reorder` a datagram is held back an extra `delay / 2 + jitter` and may be
//!    overtaken.
//!
//! # The relay ([`Relay`])
//!
//! It listens on one UDP address; each client that sends there gets its own socket towards the
//! upstream address, so replies find their way back. One thread per direction receives,
//! schedules by the model and sends when due (`poll` with the time to the next delivery). The
//! handle cuts the link both ways ([`RelayHandle::blackout`]) and counts what happened.
//!
//! # GRO and GSO
//!
//! The relay's sockets take trains of datagrams from one sender in one receive (UDP GRO), and
//! it sends each run of due datagrams of one size as one GSO send; the kernel cuts the run
//! into the same datagrams again on the way out. Each datagram of a train still meets its own
//! fate in the model. This is what lifts the relay's ceiling from about 1–2.8 Gbit/s to about
//! 10 Gbit/s of 1200-byte datagrams on two cores (`cargo xtask bench relay`): the cost of a
//! relay is per datagram the kernel handles, and a train is handled once. A kernel that
//! refuses a GSO send makes the relay send one datagram per message from then on.

use std::{
    collections::{BinaryHeap, HashMap},
    io,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// Burst loss: a Gilbert–Elliott channel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    /// Probability, per datagram, of going from the good state to the bad one.
    pub good_to_bad: f64,
    /// Probability, per datagram, of going from the bad state back to the good one.
    pub bad_to_good: f64,
    /// Loss probability in the bad state (the good state's is [`LinkSpec::loss`]).
    pub bad_loss: f64,
}

impl GilbertElliott {
    /// The long-run loss rate of a channel whose good state loses `good_loss`.
    pub fn mean_loss(&self, good_loss: f64) -> f64 {
        let bad_share = self.good_to_bad / (self.good_to_bad + self.bad_to_good);
        bad_share * self.bad_loss + (1.0 - bad_share) * good_loss
    }
}

/// One direction of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSpec {
    /// Bottleneck rate in bits per second; 0 for none.
    pub rate_bits: u64,
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay, uniform in `[0, jitter]`.
    pub jitter: Duration,
    /// Random loss probability (in the good state, with burst loss).
    pub loss: f64,
    /// Burst loss, if any.
    pub burst: Option<GilbertElliott>,
    /// The bottleneck's queue in bytes; `None` for one bandwidth-delay product (of the
    /// round trip, twice `delay`), at least 64 KiB.
    pub queue_bytes: Option<u64>,
    /// Probability that a datagram is held back and may be overtaken.
    pub reorder: f64,
}

impl Default for LinkSpec {
    fn default() -> Self {
        Self {
            rate_bits: 0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            burst: None,
            queue_bytes: None,
            reorder: 0.0,
        }
    }
}

impl LinkSpec {
    /// The queue limit in bytes.
    pub fn queue_limit(&self) -> u64 {
        self.queue_bytes.unwrap_or_else(|| {
            let bdp = self.rate_bits as f64 / 8.0 * (2.0 * self.delay.as_secs_f64());
            (bdp as u64).max(64 << 10)
        })
    }

    /// The long-run loss rate.
    pub fn mean_loss(&self) -> f64 {
        self.burst.map_or(self.loss, |ge| ge.mean_loss(self.loss))
    }
}

/// splitmix64, seeded: the same run of losses for the same seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What became of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It arrives at this time (since the model's start).
    Arrives(Duration),
    /// The queue was full.
    TailDrop,
    /// The channel lost it.
    Lost,
}

/// One direction's state.
#[derive(Debug, Clone)]
pub struct Direction {
    spec: LinkSpec,
    rng: Rng,
    bad: bool,
    /// When the link has sent everything queued so far.
    busy_until: Duration,
    /// The latest arrival scheduled in order (datagrams do not overtake it).
    last_arrival: Duration,
}

impl Direction {
    /// A direction with `spec`, its randomness from `seed`.
    pub fn new(spec: LinkSpec, seed: u64) -> Self {
        Self {
            spec,
            rng: Rng::new(seed),
            bad: false,
            busy_until: Duration::ZERO,
            last_arrival: Duration::ZERO,
        }
    }

    /// The spec.
    pub fn spec(&self) -> &LinkSpec {
        &self.spec
    }

    /// Offers a datagram of `len` bytes at `now`.
    pub fn offer(&mut self, now: Duration, len: usize) -> Fate {
        let start = self.busy_until.max(now);
        let sent = if self.spec.rate_bits == 0 {
            now
        } else {
            let queued =
                (start - now).as_secs_f64() * self.spec.rate_bits as f64 / 8.0 + len as f64;
            if queued > self.spec.queue_limit() as f64 {
                return Fate::TailDrop;
            }
            let serialize = Duration::from_secs_f64(len as f64 * 8.0 / self.spec.rate_bits as f64);
            self.busy_until = start + serialize;
            self.busy_until
        };
        let loss = match self.spec.burst {
            Some(ge) => {
                let flip = if self.bad {
                    ge.bad_to_good
                } else {
                    ge.good_to_bad
                };
                if self.rng.unit() < flip {
                    self.bad = !self.bad;
                }
                if self.bad {
                    ge.bad_loss
                } else {
                    self.spec.loss
                }
            }
            None => self.spec.loss,
        };
        if loss > 0.0 && self.rng.unit() < loss {
            return Fate::Lost;
        }
        let jitter = self.spec.jitter.mul_f64(self.rng.unit());
        let arrival = sent + self.spec.delay + jitter;
        if self.spec.reorder > 0.0 && self.rng.unit() < self.spec.reorder {
            return Fate::Arrives(arrival + self.spec.delay / 2 + self.spec.jitter);
        }
        self.last_arrival = self.last_arrival.max(arrival);
        Fate::Arrives(self.last_arrival)
    }
}

/// Counts of one direction.
#[derive(Debug, Default)]
pub struct DirectionStats {
    /// Datagrams received from the sender.
    pub offered: AtomicU64,
    /// Datagrams delivered.
    pub delivered: AtomicU64,
    /// Bytes delivered.
    pub delivered_bytes: AtomicU64,
    /// Dropped at the queue's tail.
    pub tail_drops: AtomicU64,
    /// Lost on the channel.
    pub lost: AtomicU64,
    /// Dropped because the link was cut.
    pub blackout_drops: AtomicU64,
}

/// A running relay's controls and counters.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    blackout: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Agent to receiver.
    pub up: Arc<DirectionStats>,
    /// Receiver to agent.
    pub down: Arc<DirectionStats>,
    /// Where clients send.
    pub address: SocketAddr,
}

impl RelayHandle {
    /// Cuts the link both ways (everything sent meanwhile is dropped), or restores it.
    pub fn blackout(&self, on: bool) {
        self.blackout.store(on, Ordering::SeqCst);
    }

    /// Whether the link is cut.
    pub fn is_blacked_out(&self) -> bool {
        self.blackout.load(Ordering::SeqCst)
    }
}

/// A running relay; stops its threads when dropped.
#[derive(Debug)]
pub struct Relay {
    handle: RelayHandle,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Relay {
    /// Listens on `listen` and relays to `upstream`: `up` models agent → receiver, `down` the
    /// way back. `seed` makes the losses reproducible.
    pub fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        up: LinkSpec,
        down: LinkSpec,
        seed: u64,
    ) -> io::Result<Self> {
        let front = Arc::new(UdpSocket::bind(listen)?);
        set_buffers(&front);
        enable_gro(&front);
        let handle = RelayHandle {
            blackout: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            up: Arc::default(),
            down: Arc::default(),
            address: front.local_addr()?,
        };
        let epoch = Instant::now();
        let clients: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
        let mut threads = Vec::new();
        // Agent → receiver: from the front socket to each client's own upstream socket.
        {
            let handle = handle.clone();
            let front = front.clone();
            let clients = clients.clone();
            let (down_handle, down_front) = (handle.clone(), front.clone());
            let spawned = Arc::new(Mutex::new(Vec::new()));
            let spawned_for_stop = spawned.clone();
            threads.push(thread::spawn(move || {
                let mut direction = Direction::new(up, seed);
                let mut seed = seed;
                forward(
                    &front,
                    &handle.up,
                    &handle,
                    epoch,
                    &mut direction,
                    |from| {
                        let mut clients = clients.lock().expect("clients");
                        if let Some(socket) = clients.get(&from) {
                            return Some(socket.clone());
                        }
                        let socket = UdpSocket::bind(("127.0.0.1", 0)).ok()?;
                        socket.connect(upstream).ok()?;
                        set_buffers(&socket);
                        enable_gro(&socket);
                        let socket = Arc::new(socket);
                        clients.insert(from, socket.clone());
                        // Receiver → this client.
                        seed = seed.wrapping_add(0x1234_5678);
                        let (socket_back, handle, front) =
                            (socket.clone(), down_handle.clone(), down_front.clone());
                        let mut back = Direction::new(down, seed);
                        spawned
                            .lock()
                            .expect("threads")
                            .push(thread::spawn(move || {
                                forward(
                                    &socket_back,
                                    &handle.down,
                                    &handle,
                                    epoch,
                                    &mut back,
                                    |_| Some(front.clone()),
                                    Some(from),
                                );
                            }));
                        Some(socket)
                    },
                    None,
                );
                for thread in spawned_for_stop.lock().expect("threads").drain(..) {
                    let _ = thread.join();
                }
            }));
        }
        Ok(Self { handle, threads })
    }

    /// The controls.
    pub fn handle(&self) -> &RelayHandle {
        &self.handle
    }

    /// Where clients send.
    pub fn address(&self) -> SocketAddr {
        self.handle.address
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.handle.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Asks for large socket buffers: a relay that drops in its own socket is a worse link than
/// the one it models. (The kernel caps them at `net.core.rmem_max`/`wmem_max`.)
fn set_buffers(socket: &UdpSocket) {
    let size: libc::c_int = 8 << 20;
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt on an open socket we own, with a pointer to a live c_int and its
        // size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Datagrams (or GRO trains) per `recvmmsg`/`sendmmsg` call.
const BATCH: usize = 64;
/// The largest datagram relayed (a UDP payload's limit), and the largest GRO train.
const MAX_DATAGRAM: usize = 65536;
/// The most datagrams in one GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64 before Linux
/// 6.9 and 128 since).
const MAX_SEGMENTS: usize = 64;
/// The most payload bytes in one GSO send: an IPv4 packet's 65535 less its IP and UDP
/// headers, rounded down.
const MAX_GSO_BYTES: usize = 65000;
/// Control-message space per message: one `cmsghdr` and an int, 8-byte aligned.
const CONTROL_WORDS: usize = 4;

/// Receive batches between two looks at what is due to be sent.
const RECV_BATCHES_PER_TURN: usize = 4;
/// Set when the kernel refused a GSO send (a device without segmentation offload): the
/// relay then sends one datagram per message, as before.
static GSO_REFUSED: AtomicBool = AtomicBool::new(false);

/// Asks the kernel to hand over trains of datagrams from one sender in one buffer (UDP GRO),
/// with the size of each in a control message, instead of one datagram per buffer. A GSO
/// sender (quinn sends so) then costs the relay one receive per train. A kernel without it
/// leaves the socket as it was, which [`recv_batch`] handles too.
fn enable_gro(socket: &UdpSocket) {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on an open socket we own, with a pointer to a live c_int and its
    // size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Receive buffers for [`recv_batch`].
struct RecvBatch {
    buffers: Vec<Vec<u8>>,
    lens: Vec<usize>,
    /// Each message's datagram size: its length, or the GRO segment size of a train.
    segment_sizes: Vec<usize>,
    addrs: Vec<libc::sockaddr_storage>,
    controls: Vec<[u64; CONTROL_WORDS]>,
}

impl RecvBatch {
    fn new() -> Self {
        Self {
            buffers: (0..BATCH).map(|_| vec![0u8; MAX_DATAGRAM]).collect(),
            lens: vec![0; BATCH],
            segment_sizes: vec![0; BATCH],
            // SAFETY: sockaddr_storage is plain old data; all zeros is a valid value.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            controls: vec![[0; CONTROL_WORDS]; BATCH],
        }
    }

    fn from(&self, index: usize) -> Option<SocketAddr> {
        socket_address(&self.addrs[index])
    }

    /// The datagrams of message `index`: one, or the segments of a GRO train (the last may
    /// be shorter).
    fn datagrams(&self, index: usize) -> impl Iterator<Item = &[u8]> {
        let data = &self.buffers[index][..self.lens[index]];
        // A zero-length datagram is still one, which `chunks` of an empty slice would not
        // yield.
        let empty = data.is_empty().then_some(data);
        empty
            .into_iter()
            .chain(data.chunks(self.segment_sizes[index].max(1)))
    }

    /// How many datagrams message `index` holds.
    fn datagram_count(&self, index: usize) -> usize {
        self.datagrams(index).count()
    }
}

/// Converts what the kernel wrote into a `sockaddr_storage`.
fn socket_address(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large and
            // aligned enough for.
            let v4 = unsafe { &*(std::ptr::from_ref(storage).cast::<libc::sockaddr_in>()) };
            Some(SocketAddr::from((
                u32::from_be(v4.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(v4.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let v6 = unsafe { &*(std::ptr::from_ref(storage).cast::<libc::sockaddr_in6>()) };
            Some(SocketAddr::from((
                v6.sin6_addr.s6_addr,
                u16::from_be(v6.sin6_port),
            )))
        }
        _ => None,
    }
}

/// The `sockaddr` form of `address`, with its length.
fn raw_address(address: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all zeros is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match address {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            let raw =
                unsafe { &mut *(std::ptr::from_mut(&mut storage).cast::<libc::sockaddr_in>()) };
            raw.sin_family = libc::AF_INET as libc::sa_family_t;
            raw.sin_port = v4.port().to_be();
            raw.sin_addr.s_addr = u32::from_be_bytes(v4.ip().octets()).to_be();
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let raw =
                unsafe { &mut *(std::ptr::from_mut(&mut storage).cast::<libc::sockaddr_in6>()) };
            raw.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            raw.sin6_port = v6.port().to_be();
            raw.sin6_addr.s6_addr = v6.ip().octets();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Receives up to [`BATCH`] messages without waiting; returns how many (0 when none). A
/// message is one datagram, or a GRO train of them ([`RecvBatch::datagrams`]).
fn recv_batch(socket: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    let mut iovecs: Vec<libc::iovec> = batch
        .buffers
        .iter_mut()
        .map(|buffer| libc::iovec {
            iov_base: buffer.as_mut_ptr().cast(),
            iov_len: buffer.len(),
        })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .zip(batch.addrs.iter_mut())
        .zip(batch.controls.iter_mut())
        .map(|((iovec, addr), control)| {
            // SAFETY: msghdr is plain old data; all zeros is a valid (empty) header.
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_name = std::ptr::from_mut(addr).cast();
            header.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_iov = std::ptr::from_mut(iovec);
            header.msg_iovlen = 1;
            header.msg_control = control.as_mut_ptr().cast();
            header.msg_controllen = size_of::<[u64; CONTROL_WORDS]>();
            libc::mmsghdr {
                msg_hdr: header,
                msg_len: 0,
            }
        })
        .collect();
    // SAFETY: every header points at a live buffer, iovec, address and control buffer in
    // `batch`/`iovecs`, which outlive the call; the count is the array's length.
    let got = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            headers.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if got < 0 {
        let error = io::Error::last_os_error();
        return match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
            _ => Err(error),
        };
    }
    let got = got as usize;
    for (index, header) in headers.iter().enumerate().take(got) {
        let len = header.msg_len as usize;
        batch.lens[index] = len;
        batch.segment_sizes[index] = gro_segment_size(&header.msg_hdr).unwrap_or(len);
    }
    Ok(got)
}

/// The segment size of a GRO train, from the `UDP_GRO` control message the kernel wrote into
/// `header` (none when the message is a single datagram).
fn gro_segment_size(header: &libc::msghdr) -> Option<usize> {
    // SAFETY: `header` is what recvmmsg filled in: its control pointer and length describe
    // the live, 8-byte aligned buffer of `RecvBatch::controls` (or a length of 0). The CMSG
    // macros only walk within that length, and a UDP_GRO message carries a c_int, which is
    // read unaligned.
    unsafe {
        let mut message = libc::CMSG_FIRSTHDR(header);
        while !message.is_null() {
            if (*message).cmsg_level == libc::SOL_UDP && (*message).cmsg_type == libc::UDP_GRO {
                let size = libc::CMSG_DATA(message)
                    .cast::<libc::c_int>()
                    .read_unaligned();
                return usize::try_from(size).ok().filter(|&size| size > 0);
            }
            message = libc::CMSG_NXTHDR(header, message);
        }
    }
    None
}

/// Groups `datagrams` into GSO sends: runs of one size (the last of a run may be shorter),
/// at most [`MAX_SEGMENTS`] datagrams and [`MAX_GSO_BYTES`] bytes each. Returns each send's
/// range of `datagrams` and its segment size.
fn gso_runs(datagrams: &[&[u8]]) -> Vec<(std::ops::Range<usize>, usize)> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < datagrams.len() {
        let size = datagrams[start].len();
        let (mut end, mut bytes) = (start + 1, size);
        // A zero-length datagram cannot be a segment; it goes alone.
        while size > 0
            && end < datagrams.len()
            && end - start < MAX_SEGMENTS
            && bytes + datagrams[end].len() <= MAX_GSO_BYTES
            && datagrams[end].len() <= size
        {
            bytes += datagrams[end].len();
            end += 1;
            if datagrams[end - 1].len() < size {
                break;
            }
        }
        runs.push((start..end, size));
        start = end;
    }
    runs
}

/// Sends `datagrams` through `socket` (to `to`, or to its connected peer) with as few
/// `sendmmsg` calls as it takes, runs of equal-sized datagrams as one GSO send each (the
/// kernel cuts them into the same datagrams again, past the relay's socket); returns how
/// many datagrams were sent.
fn send_batch(socket: &UdpSocket, to: Option<SocketAddr>, datagrams: &[&[u8]]) -> usize {
    send_datagrams(socket, to, datagrams, !GSO_REFUSED.load(Ordering::Relaxed))
}

/// [`send_batch`], with GSO or one datagram per message.
fn send_datagrams(
    socket: &UdpSocket,
    to: Option<SocketAddr>,
    datagrams: &[&[u8]],
    gso: bool,
) -> usize {
    let (mut address, address_len) = match to {
        Some(to) => raw_address(to),
        // SAFETY: sockaddr_storage is plain old data; all zeros is a valid value.
        None => (unsafe { std::mem::zeroed() }, 0),
    };
    let runs = if gso {
        gso_runs(datagrams)
    } else {
        (0..datagrams.len())
            .map(|i| (i..i + 1, datagrams[i].len()))
            .collect()
    };
    let mut iovecs: Vec<libc::iovec> = datagrams
        .iter()
        .map(|data| libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        })
        .collect();
    let mut controls = vec![[0u64; CONTROL_WORDS]; runs.len()];
    let mut headers: Vec<libc::mmsghdr> = Vec::with_capacity(runs.len());
    for ((range, size), control) in runs.iter().zip(controls.iter_mut()) {
        // SAFETY: msghdr is plain old data; all zeros is a valid (empty) header.
        let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
        if to.is_some() {
            header.msg_name = std::ptr::from_mut(&mut address).cast();
            header.msg_namelen = address_len;
        }
        header.msg_iov = iovecs[range.clone()].as_mut_ptr();
        header.msg_iovlen = range.len();
        if range.len() > 1 {
            header.msg_control = control.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            header.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
            // SAFETY: the control buffer is live, 8-byte aligned and CONTROL_WORDS × 8 = 32
            // bytes, more than CMSG_SPACE(2) = 24, so the first header and its 2 data bytes
            // lie within it.
            unsafe {
                let message = libc::CMSG_FIRSTHDR(&raw const header);
                (*message).cmsg_level = libc::SOL_UDP;
                (*message).cmsg_type = libc::UDP_SEGMENT;
                (*message).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                libc::CMSG_DATA(message)
                    .cast::<u16>()
                    .write_unaligned(*size as u16);
            }
        }
        headers.push(libc::mmsghdr {
            msg_hdr: header,
            msg_len: 0,
        });
    }
    let mut at = 0;
    while at < headers.len() {
        let count = (headers.len() - at).min(BATCH);
        // SAFETY: the headers point at live iovecs (into `datagrams`, which the kernel only
        // reads), control buffers and `address`, all outliving the call; the count stays
        // within the array.
        let done = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                headers[at..].as_mut_ptr(),
                count as libc::c_uint,
                0,
            )
        };
        if done <= 0 {
            let error = io::Error::last_os_error();
            if gso && matches!(error.raw_os_error(), Some(libc::EIO | libc::EINVAL)) {
                // No segmentation offload on this path: send the rest one by one, from now on.
                GSO_REFUSED.store(true, Ordering::Relaxed);
                let sent: usize = runs[..at].iter().map(|(range, _)| range.len()).sum();
                return sent + send_datagrams(socket, to, &datagrams[sent..], false);
            }
            // A full socket buffer or a refused peer: what is left is dropped, as a router's
            // queue would.
            break;
        }
        at += done as usize;
    }
    runs[..at].iter().map(|(range, _)| range.len()).sum()
}

/// A datagram waiting for its arrival time.
#[derive(Debug, PartialEq, Eq)]
struct Pending {
    at: Duration,
    order: u64,
    to: Option<SocketAddr>,
    out: usize,
    data: Vec<u8>,
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // A min-heap on (arrival, order).
        (other.at, other.order).cmp(&(self.at, self.order))
    }
}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One direction's loop: receive from `from_socket`, schedule by the model, send each
/// datagram when due through the socket `route` picks for its sender (to `reply_to`, or to
/// the socket's connected peer).
fn forward(
    from_socket: &UdpSocket,
    stats: &DirectionStats,
    handle: &RelayHandle,
    epoch: Instant,
    direction: &mut Direction,
    mut route: impl FnMut(SocketAddr) -> Option<Arc<UdpSocket>>,
    reply_to: Option<SocketAddr>,
) {
    // The sockets stay blocking: receiving never waits (`MSG_DONTWAIT`, after `poll`), and a
    // send into a full socket buffer waits for room instead of dropping the rest of a batch.
    // (The other direction's thread sends through this socket too, and `O_NONBLOCK` would
    // apply to both.)
    let mut outs: Vec<Arc<UdpSocket>> = Vec::new();
    let mut queue: BinaryHeap<Pending> = BinaryHeap::new();
    let mut order = 0u64;
    let mut batch = RecvBatch::new();
    let mut due: Vec<Pending> = Vec::new();
    // The last sender and where its datagrams go (most datagrams come from one peer).
    let mut last_route: Option<(SocketAddr, usize)> = None;
    while !handle.stop.load(Ordering::SeqCst) {
        // Send what is due, in batches of consecutive datagrams for the same socket.
        let now = epoch.elapsed();
        due.clear();
        while queue.peek().is_some_and(|p| p.at <= now) {
            due.push(queue.pop().expect("peeked"));
        }
        if handle.is_blacked_out() {
            stats
                .blackout_drops
                .fetch_add(due.len() as u64, Ordering::Relaxed);
            due.clear();
        }
        let mut start = 0;
        while start < due.len() {
            let (out, to) = (due[start].out, due[start].to);
            let end = start
                + due[start..]
                    .iter()
                    .take_while(|p| p.out == out && p.to == to)
                    .count();
            let datagrams: Vec<&[u8]> = due[start..end].iter().map(|p| &p.data[..]).collect();
            let sent = send_batch(&outs[out], to, &datagrams);
            let bytes: usize = datagrams[..sent].iter().map(|d| d.len()).sum();
            stats.delivered.fetch_add(sent as u64, Ordering::Relaxed);
            stats
                .delivered_bytes
                .fetch_add(bytes as u64, Ordering::Relaxed);
            start = end;
        }
        // Wait for a datagram or the next arrival (at most 50 ms, to notice a stop).
        let wait = queue
            .peek()
            .map_or(Duration::from_millis(50), |p| {
                p.at.saturating_sub(epoch.elapsed())
            })
            .min(Duration::from_millis(50));
        let mut poll = libc::pollfd {
            fd: from_socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = wait.as_micros().div_ceil(1000) as libc::c_int;
        // SAFETY: one valid pollfd for an open socket we own; the count says one.
        unsafe { libc::poll(&raw mut poll, 1, timeout) };
        // Take what is there, a batch at a time, but go back to sending what is due after a
        // few batches: a sender faster than the relay would otherwise keep it receiving, and
        // nothing would leave.
        for _ in 0..RECV_BATCHES_PER_TURN {
            let got = match recv_batch(from_socket, &mut batch) {
                Ok(0) => break,
                Ok(got) => got,
                // A refused peer (an ICMP error queued on the socket): keep going.
                Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(_) => break,
            };
            let datagrams: usize = (0..got).map(|index| batch.datagram_count(index)).sum();
            stats.offered.fetch_add(datagrams as u64, Ordering::Relaxed);
            if handle.is_blacked_out() {
                stats
                    .blackout_drops
                    .fetch_add(datagrams as u64, Ordering::Relaxed);
                continue;
            }
            let now = epoch.elapsed();
            for index in 0..got {
                let Some(from) = batch.from(index) else {
                    continue;
                };
                let out = match last_route {
                    Some((last, out)) if last == from => out,
                    _ => {
                        let Some(out) = route(from) else { continue };
                        let out = match outs.iter().position(|o| Arc::ptr_eq(o, &out)) {
                            Some(out) => out,
                            None => {
                                outs.push(out);
                                outs.len() - 1
                            }
                        };
                        last_route = Some((from, out));
                        out
                    }
                };
                // Each datagram of a GRO train meets its own fate, as on the modelled link.
                for data in batch.datagrams(index) {
                    match direction.offer(now, data.len()) {
                        Fate::Arrives(at) => {
                            order += 1;
                            queue.push(Pending {
                                at,
                                order,
                                to: reply_to,
                                out,
                                data: data.to_vec(),
                            });
                        }
                        Fate::TailDrop => {
                            stats.tail_drops.fetch_add(1, Ordering::Relaxed);
                        }
                        Fate::Lost => {
                            stats.lost.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
}

/// What a paced stream through a relay measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Delivered payload rate, bits per second, over the stream's steady part.
    pub rate_bits: f64,
    /// Fraction of datagrams that did not arrive.
    pub loss: f64,
}

/// How a [`stream`]'s sender hands its datagrams to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// Runs of datagrams as one GSO send each, as quinn sends on Linux.
    Gso,
    /// One datagram per message (batched by `sendmmsg`).
    Single,
}

/// Sends `seconds` of `len`-byte datagrams at `offered_bits` per second (0: as fast as the
/// sender can) to `to`, and counts what arrives at `sink` (which takes GRO trains). The rate
/// is measured between the first and the last arrival.
pub fn stream(
    to: SocketAddr,
    sink: &UdpSocket,
    offered_bits: u64,
    seconds: f64,
    len: usize,
    how: Sender,
) -> io::Result<Measured> {
    set_buffers(sink);
    enable_gro(sink);
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    set_buffers(&sender);
    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sending = {
        let (done, sent) = (done.clone(), sent.clone());
        thread::spawn(move || {
            let payload = vec![0x5au8; len];
            let datagrams = vec![&payload[..]; BATCH];
            let start = Instant::now();
            let mut total = 0u64;
            while start.elapsed().as_secs_f64() < seconds {
                // Paced by the clock: send what is due, in batches.
                let due = if offered_bits == 0 {
                    total + BATCH as u64
                } else {
                    (start.elapsed().as_secs_f64() * offered_bits as f64 / (len as f64 * 8.0))
                        as u64
                };
                if due <= total {
                    thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let count = ((due - total) as usize).min(BATCH);
                let gso = how == Sender::Gso && !GSO_REFUSED.load(Ordering::Relaxed);
                total += send_datagrams(&sender, Some(to), &datagrams[..count], gso) as u64;
            }
            sent.store(total, Ordering::SeqCst);
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut batch = RecvBatch::new();
    let (mut received, mut bytes, mut first, mut last) = (0u64, 0u64, None, None);
    let mut quiet_since = Instant::now();
    loop {
        let mut poll = libc::pollfd {
            fd: sink.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for an open socket we own; the count says one.
        unsafe { libc::poll(&raw mut poll, 1, 50) };
        let got = recv_batch(sink, &mut batch)?;
        if got == 0 {
            if done.load(Ordering::SeqCst) && quiet_since.elapsed() > Duration::from_millis(300) {
                break;
            }
            continue;
        }
        let now = Instant::now();
        quiet_since = now;
        for index in 0..got {
            for data in batch.datagrams(index) {
                if first.is_none() {
                    first = Some(now);
                } else {
                    bytes += data.len() as u64;
                }
                received += 1;
            }
        }
        last = Some(now);
    }
    let _ = sending.join();
    let sent = sent.load(Ordering::SeqCst).max(1);
    let span = match (first, last) {
        (Some(first), Some(last)) if last > first => (last - first).as_secs_f64(),
        _ => f64::INFINITY,
    };
    Ok(Measured {
        rate_bits: bytes as f64 * 8.0 / span,
        loss: 1.0 - received as f64 / sent as f64,
    })
}

/// The round trip of `count` small datagrams through the relay at `to` to an echo server,
/// one at a time: the median.
pub fn round_trip(to: SocketAddr, count: u32) -> io::Result<Duration> {
    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buffer = [0u8; 64];
    let mut times = Vec::new();
    for i in 0..count {
        let start = Instant::now();
        client.send_to(&i.to_le_bytes(), to)?;
        loop {
            let (len, _) = client.recv_from(&mut buffer)?;
            if buffer[..len] == i.to_le_bytes() {
                break;
            }
        }
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// A UDP echo server on 127.0.0.1 for [`round_trip`]; stops when dropped.
#[derive(Debug)]
pub struct Echo {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Echo {
    /// Starts one.
    pub fn start() -> io::Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let address = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::spawn(move || {
            let mut buffer = [0u8; 65536];
            while !stopping.load(Ordering::SeqCst) {
                if let Ok((len, from)) = socket.recv_from(&mut buffer) {
                    let _ = socket.send_to(&buffer[..len], from);
                }
            }
        });
        Ok(Self {
            address,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn spec(rate_bits: u64, delay_ms: u64) -> LinkSpec {
        LinkSpec {
            rate_bits,
            delay: MS * delay_ms as u32,
            ..LinkSpec::default()
        }
    }

    /// Offers `count` datagrams of `len` bytes every `gap`; returns the fates.
    fn run(direction: &mut Direction, count: u32, len: usize, gap: Duration) -> Vec<Fate> {
        (0..count).map(|i| direction.offer(gap * i, len)).collect()
    }

    /// The arrival times of `fates`, which must all arrive.
    fn all_arrive(fates: Vec<Fate>) -> Vec<Duration> {
        fates
            .into_iter()
            .map(|f| match f {
                Fate::Arrives(at) => at,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_idle_link_delivers_after_the_delay_plus_serialization() {
        let mut link = Direction::new(spec(8_000_000, 40), 1);
        // 1000 bytes at 8 Mbit/s: 1 ms on the wire.
        assert_eq!(link.offer(Duration::ZERO, 1000), Fate::Arrives(MS * 41));
    }

    #[test]
    fn an_overdriven_link_delivers_its_rate_and_drops_the_excess_at_the_tail() {
        // 100 Mbit/s, 20 ms: the queue is one BDP of the 40 ms round trip, 500 kB.
        let mut link = Direction::new(spec(100_000_000, 20), 1);
        assert_eq!(link.spec().queue_limit(), 500_000);
        // Offered at 200 Mbit/s for 2 s: 1250-byte datagrams every 50 µs.
        let fates = run(&mut link, 40_000, 1250, Duration::from_micros(50));
        let arrivals: Vec<Duration> = fates
            .iter()
            .filter_map(|f| match f {
                Fate::Arrives(at) => Some(*at),
                _ => None,
            })
            .collect();
        let drops = fates.iter().filter(|f| **f == Fate::TailDrop).count();
        let (first, last) = (arrivals[0], *arrivals.last().unwrap());
        let rate = (arrivals.len() - 1) as f64 * 1250.0 * 8.0 / (last - first).as_secs_f64();
        assert!((rate / 100e6 - 1.0).abs() < 0.01, "delivered {rate} bit/s");
        assert!(
            (drops as f64 / 40_000.0 - 0.5).abs() < 0.02,
            "{drops} tail drops"
        );
        // The queue bounds the delay: at most one BDP of queueing on top of the path delay.
        let worst = fates
            .iter()
            .enumerate()
            .filter_map(|(i, fate)| match fate {
                Fate::Arrives(at) => Some(*at - Duration::from_micros(50) * i as u32),
                _ => None,
            })
            .max()
            .unwrap();
        assert!(worst <= MS * 61, "worst one-way delay {worst:?}");
    }

    #[test]
    fn random_loss_matches_the_configured_rate() {
        let mut link = Direction::new(
            LinkSpec {
                loss: 0.01,
                ..spec(0, 10)
            },
            7,
        );
        let fates = run(&mut link, 200_000, 1200, MS);
        let lost = fates.iter().filter(|f| **f == Fate::Lost).count() as f64 / 200_000.0;
        assert!((lost - 0.01).abs() < 0.001, "lost {lost}");
    }

    #[test]
    fn burst_loss_comes_in_runs_with_the_chain_s_mean() {
        let ge = GilbertElliott {
            good_to_bad: 0.001,
            bad_to_good: 0.1,
            bad_loss: 0.5,
        };
        let mut link = Direction::new(
            LinkSpec {
                burst: Some(ge),
                ..spec(0, 10)
            },
            9,
        );
        let fates = run(&mut link, 500_000, 1200, MS);
        let lost: Vec<bool> = fates.iter().map(|f| *f == Fate::Lost).collect();
        let rate = lost.iter().filter(|l| **l).count() as f64 / lost.len() as f64;
        let mean = ge.mean_loss(0.0);
        assert!(
            (rate / mean - 1.0).abs() < 0.15,
            "lost {rate}, chain mean {mean}"
        );
        // Bursty: a loss is followed by another far more often than the mean rate.
        let pairs = lost.windows(2).filter(|w| w[0]).count() as f64;
        let follow = lost.windows(2).filter(|w| w[0] && w[1]).count() as f64 / pairs;
        assert!(
            follow > 10.0 * mean,
            "P(loss | loss) {follow} vs mean {mean}"
        );
    }

    #[test]
    fn jitter_keeps_order_and_reordering_lets_datagrams_overtake() {
        let mut jittery = Direction::new(
            LinkSpec {
                jitter: MS * 5,
                ..spec(0, 10)
            },
            3,
        );
        let arrivals = all_arrive(run(&mut jittery, 10_000, 100, Duration::from_micros(100)));
        assert!(
            arrivals.windows(2).all(|w| w[0] <= w[1]),
            "jitter reordered"
        );
        assert!(arrivals.iter().any(|at| *at > MS * 12));
        let mut reordering = Direction::new(
            LinkSpec {
                reorder: 0.01,
                ..spec(0, 10)
            },
            3,
        );
        let arrivals = all_arrive(run(
            &mut reordering,
            10_000,
            100,
            Duration::from_micros(100),
        ));
        let overtaken = arrivals.windows(2).filter(|w| w[0] > w[1]).count();
        assert!((50..200).contains(&overtaken), "{overtaken} overtaken");
    }

    #[test]
    fn the_relay_passes_datagrams_both_ways_and_a_blackout_cuts_them() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo_address = echo.local_addr().unwrap();
        echo.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let echo_stop = stop.clone();
        let echo_thread = thread::spawn(move || {
            let mut buffer = [0u8; 2048];
            while !echo_stop.load(Ordering::SeqCst) {
                if let Ok((len, from)) = echo.recv_from(&mut buffer) {
                    let _ = echo.send_to(&buffer[..len], from);
                }
            }
        });
        let relay = Relay::start(
            "127.0.0.1:0".parse().unwrap(),
            echo_address,
            spec(0, 5),
            spec(0, 5),
            1,
        )
        .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buffer = [0u8; 2048];
        client.send_to(b"ping", relay.address()).unwrap();
        let (len, _) = client
            .recv_from(&mut buffer)
            .expect("an echo through the relay");
        assert_eq!(&buffer[..len], b"ping");
        relay.handle().blackout(true);
        client.send_to(b"lost", relay.address()).unwrap();
        assert!(
            client.recv_from(&mut buffer).is_err(),
            "nothing passes a blackout"
        );
        relay.handle().blackout(false);
        client.send_to(b"back", relay.address()).unwrap();
        let (len, _) = client
            .recv_from(&mut buffer)
            .expect("an echo after the blackout");
        assert_eq!(&buffer[..len], b"back");
        assert_eq!(relay.handle().up.blackout_drops.load(Ordering::Relaxed), 1);
        drop(relay);
        stop.store(true, Ordering::SeqCst);
        echo_thread.join().unwrap();
    }

    #[test]
    fn large_datagrams_pass_a_capped_relay_at_its_rate() {
        // 8 KiB datagrams (jumbo-sized, as GSO-less senders on loopback may use) at 1.5x a
        // 200 Mbit/s cap: the cap's rate comes through, not nothing.
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let link = spec(200_000_000, 5);
        let relay = Relay::start(
            "127.0.0.1:0".parse().unwrap(),
            sink.local_addr().unwrap(),
            link,
            link,
            3,
        )
        .unwrap();
        let measured = stream(relay.address(), &sink, 300_000_000, 1.0, 8192, Sender::Gso).unwrap();
        let ratio = measured.rate_bits / 200e6;
        assert!((0.9..1.05).contains(&ratio), "{ratio:.3} of the cap");
    }

    #[test]
    fn gso_runs_are_equal_sized_datagrams_within_the_kernel_s_limits() {
        let sizes = |lens: &[usize]| -> Vec<(std::ops::Range<usize>, usize)> {
            let buffers: Vec<Vec<u8>> = lens.iter().map(|&len| vec![0; len]).collect();
            let datagrams: Vec<&[u8]> = buffers.iter().map(|b| &b[..]).collect();
            gso_runs(&datagrams)
        };
        // A shorter datagram ends a run; a longer one starts the next.
        assert_eq!(
            sizes(&[1200, 1200, 900, 1200, 1300, 1300]),
            vec![(0..3, 1200), (3..4, 1200), (4..6, 1300)]
        );
        // A zero-length datagram goes alone.
        assert_eq!(sizes(&[0, 0, 100]), vec![(0..1, 0), (1..2, 0), (2..3, 100)]);
        // At most 64 segments, and at most 65000 bytes.
        assert_eq!(
            sizes(&[100; 130]),
            vec![(0..64, 100), (64..128, 100), (128..130, 100)]
        );
        assert_eq!(sizes(&[1200; 60]), vec![(0..54, 1200), (54..60, 1200)]);
    }

    #[test]
    fn a_gso_train_through_the_relay_arrives_as_its_datagrams_each_with_its_own_fate() {
        // A sink without GRO sees single datagrams, so the train must come out cut as it went
        // in (sizes and contents), and a lossy link must lose datagrams, not whole trains.
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        // Room for all 400 datagrams of the second part, so none is dropped at the sink.
        set_buffers(&sink);
        let relay = Relay::start(
            "127.0.0.1:0".parse().unwrap(),
            sink.local_addr().unwrap(),
            spec(0, 1),
            spec(0, 1),
            5,
        )
        .unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let buffers: Vec<Vec<u8>> = (0..40u8)
            .map(|i| vec![i; if i == 39 { 700 } else { 1200 }])
            .collect();
        let datagrams: Vec<&[u8]> = buffers.iter().map(|b| &b[..]).collect();
        assert_eq!(
            send_datagrams(&sender, Some(relay.address()), &datagrams, true),
            40
        );
        let mut buffer = [0u8; 65536];
        for i in 0..40u8 {
            let (len, _) = sink.recv_from(&mut buffer).expect("every datagram arrives");
            assert_eq!(&buffer[..len], &buffers[usize::from(i)][..], "datagram {i}");
        }
        assert_eq!(relay.handle().up.offered.load(Ordering::Relaxed), 40);
        // The relay counts a batch as delivered once its send returns, which can be after the
        // sink has read it (a CI run read 0 here): wait for the count, briefly.
        let delivered = &relay.handle().up.delivered;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while delivered.load(Ordering::Relaxed) < 40 && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(delivered.load(Ordering::Relaxed), 40);
        drop(relay);

        let lossy = LinkSpec {
            loss: 0.5,
            ..spec(0, 1)
        };
        let relay = Relay::start(
            "127.0.0.1:0".parse().unwrap(),
            sink.local_addr().unwrap(),
            lossy,
            lossy,
            9,
        )
        .unwrap();
        for _ in 0..10 {
            send_datagrams(&sender, Some(relay.address()), &datagrams, true);
            thread::sleep(Duration::from_millis(5));
        }
        let mut arrived = 0;
        sink.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        while sink.recv_from(&mut buffer).is_ok() {
            arrived += 1;
        }
        let up = &relay.handle().up;
        assert_eq!(up.offered.load(Ordering::Relaxed), 400);
        assert_eq!(
            up.lost.load(Ordering::Relaxed) + arrived,
            400,
            "each datagram is lost or arrives"
        );
        assert!(
            (140..260).contains(&arrived),
            "{arrived} of 400 arrived at 50% loss: datagrams, not trains, are lost"
        );
    }
}
