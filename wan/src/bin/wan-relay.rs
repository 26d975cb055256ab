//! `wan-relay`: the project's link emulator (see the `blkmirror_wan` library).
//!
//! * `wan-relay run --listen ADDR --upstream ADDR [link options]` relays until standard input
//!   closes. Lines on standard input control it: `down` cuts the link, `up` restores it,
//!   `down SECONDS` cuts it for that long, `stats` prints both directions' counters as one
//!   JSON line on standard output.
//! * `wan-relay check` measures how faithfully it models a link on this machine: its ceiling
//!   against a direct UDP stream, the delivered rate at a cap, the round trip, and the loss
//!   (`cargo xtask bench relay` runs it in a release build).

use std::{
    io::BufRead as _,
    net::{SocketAddr, UdpSocket},
    process::ExitCode,
    time::Duration,
};

use blkmirror_protocol::units;
use blkmirror_wan::{self as wan, Echo, GilbertElliott, LinkSpec, Relay, Sender};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(about = "A userspace WAN emulator for UDP (QUIC) between agent and receiver")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Relay between a listening address and an upstream one.
    Run {
        /// Where clients (agents) send.
        #[arg(long)]
        listen: SocketAddr,
        /// Where the relay forwards (the receiver).
        #[arg(long)]
        upstream: SocketAddr,
        #[command(flatten)]
        link: LinkArgs,
    },
    /// Measure the emulator's fidelity and ceiling on this machine.
    Check {
        /// Seconds per stream.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
}

/// The link, the same both ways.
#[derive(Args)]
struct LinkArgs {
    /// Bottleneck rate in Mbit/s (0: none).
    #[arg(long, default_value_t = 0.0)]
    rate_mbit: f64,
    /// Round-trip time (half each way), e.g. 80ms.
    #[arg(long, value_parser = units::parse_duration, default_value = "0s")]
    rtt: Duration,
    /// Jitter added to each one-way delay, uniform from zero, e.g. 2ms.
    #[arg(long, value_parser = units::parse_duration, default_value = "0s")]
    jitter: Duration,
    /// Random loss, in percent.
    #[arg(long, default_value_t = 0.0)]
    loss_pct: f64,
    /// Burst loss: P(good→bad),P(bad→good),loss in the bad state (fractions), e.g.
    /// 0.001,0.1,0.5.
    #[arg(long, value_parser = parse_burst)]
    burst: Option<GilbertElliott>,
    /// The bottleneck's queue in bytes (default: one bandwidth-delay product).
    #[arg(long, value_parser = units::parse_size)]
    queue: Option<u64>,
    /// Share of datagrams held back so that others overtake them, in percent.
    #[arg(long, default_value_t = 0.0)]
    reorder_pct: f64,
    /// Seed of the loss and jitter draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn parse_burst(text: &str) -> Result<GilbertElliott, String> {
    let parts: Vec<f64> = text
        .split(',')
        .map(|p| p.trim().parse::<f64>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let [good_to_bad, bad_to_good, bad_loss] = parts[..] else {
        return Err("three fractions: P(good→bad),P(bad→good),bad-state loss".into());
    };
    if parts.iter().any(|p| !(0.0..=1.0).contains(p)) || good_to_bad + bad_to_good == 0.0 {
        return Err(
            "each value is a fraction in [0, 1], and the two transitions are not both 0".into(),
        );
    }
    Ok(GilbertElliott {
        good_to_bad,
        bad_to_good,
        bad_loss,
    })
}

impl LinkArgs {
    fn spec(&self) -> Result<LinkSpec, String> {
        if !(0.0..=100.0).contains(&self.loss_pct) || !(0.0..=100.0).contains(&self.reorder_pct) {
            return Err("--loss-pct and --reorder-pct are percentages, 0 to 100".into());
        }
        if !self.rate_mbit.is_finite() || self.rate_mbit < 0.0 {
            return Err("--rate-mbit must be 0 (no cap) or a positive rate".into());
        }
        Ok(LinkSpec {
            rate_bits: (self.rate_mbit * 1e6) as u64,
            delay: self.rtt / 2,
            jitter: self.jitter,
            loss: self.loss_pct / 100.0,
            burst: self.burst,
            queue_bytes: self.queue,
            reorder: self.reorder_pct / 100.0,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            listen,
            upstream,
            link,
        } => run(listen, upstream, &link),
        Command::Check { seconds } => check(seconds),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("wan-relay: {error}");
            ExitCode::from(2)
        }
    }
}

fn run(listen: SocketAddr, upstream: SocketAddr, link: &LinkArgs) -> Result<bool, String> {
    let spec = link.spec()?;
    let relay = Relay::start(listen, upstream, spec, spec, link.seed)
        .map_err(|e| format!("listening on {listen}: {e}"))?;
    eprintln!(
        "wan-relay: {} -> {upstream}, {spec:?}; stdin: down [SECONDS] | up | stats",
        relay.address()
    );
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["down"] => relay.handle().blackout(true),
            ["up"] => relay.handle().blackout(false),
            ["stats"] => {
                let handle = relay.handle();
                println!(
                    "{{\"up\":{},\"down\":{}}}",
                    stats_json(&handle.up),
                    stats_json(&handle.down)
                );
            }
            ["down", seconds] => match seconds.parse::<f64>() {
                Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => {
                    let handle = relay.handle().clone();
                    handle.blackout(true);
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_secs_f64(seconds));
                        handle.blackout(false);
                    });
                }
                _ => eprintln!("wan-relay: {seconds:?} is not a number of seconds"),
            },
            [] => {}
            _ => eprintln!("wan-relay: unknown command {line:?} (down [SECONDS] | up | stats)"),
        }
    }
    Ok(true)
}

/// One direction's counters as a JSON object.
fn stats_json(stats: &wan::DirectionStats) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    format!(
        "{{\"offered\":{},\"delivered\":{},\"delivered_bytes\":{},\"tail_drops\":{},\
         \"lost\":{},\"blackout_drops\":{}}}",
        stats.offered.load(Relaxed),
        stats.delivered.load(Relaxed),
        stats.delivered_bytes.load(Relaxed),
        stats.tail_drops.load(Relaxed),
        stats.lost.load(Relaxed),
        stats.blackout_drops.load(Relaxed),
    )
}

/// One line of the report; returns whether it is within its tolerance.
fn line(what: &str, measured: f64, goal: f64, tolerance: f64, unit: &str) -> bool {
    let ok = (measured / goal - 1.0).abs() <= tolerance;
    println!(
        "{what:<44} {measured:>10.2} {unit:<7} configured {goal:>8.2} {unit:<7} ratio {:.3} {}",
        measured / goal,
        if ok { "ok" } else { "OUT OF TOLERANCE" }
    );
    ok
}

fn check(seconds: f64) -> Result<bool, String> {
    let io = |e: std::io::Error| e.to_string();
    let mut ok = true;
    println!(
        "wan-relay check: paced UDP streams of 1200-byte datagrams on 127.0.0.1, {seconds} s each"
    );

    // The ceiling: a direct stream, then the same through a relay without impairments; for a
    // sender that sends as quinn does (GSO runs) and for one that sends datagram by datagram.
    // The goal (2 Gbit/s) is for the first: that is what the relay carries in the tests.
    for how in [Sender::Gso, Sender::Single] {
        let sink = UdpSocket::bind("127.0.0.1:0").map_err(io)?;
        let direct = wan::stream(sink.local_addr().map_err(io)?, &sink, 0, seconds, 1200, how)
            .map_err(io)?;
        let relay = Relay::start(
            "127.0.0.1:0".parse().expect("address"),
            sink.local_addr().map_err(io)?,
            LinkSpec::default(),
            LinkSpec::default(),
            1,
        )
        .map_err(io)?;
        let relayed = wan::stream(relay.address(), &sink, 0, seconds, 1200, how).map_err(io)?;
        drop(relay);
        let verdict = match (how, relayed.rate_bits >= 2e9) {
            (Sender::Gso, true) => "ok (>= 2 Gbit/s)",
            (Sender::Gso, false) => "BELOW 2 Gbit/s",
            (Sender::Single, _) => "(no goal)",
        };
        println!(
            "{:<44} {:>10.2} Gbit/s  direct     {:>8.2} Gbit/s  ratio {:.3} {verdict}",
            match how {
                Sender::Gso => "ceiling, GSO sender (as quinn), no impairment",
                Sender::Single => "ceiling, one datagram per send",
            },
            relayed.rate_bits / 1e9,
            direct.rate_bits / 1e9,
            relayed.rate_bits / direct.rate_bits,
        );
        if how == Sender::Gso {
            ok &= relayed.rate_bits >= 2e9;
        }
    }

    // Rate caps, offered at 1.5x.
    for (mbit, rtt_ms) in [(100.0, 40u64), (1000.0, 20)] {
        let sink = UdpSocket::bind("127.0.0.1:0").map_err(io)?;
        let spec = LinkSpec {
            rate_bits: (mbit * 1e6) as u64,
            delay: Duration::from_millis(rtt_ms / 2),
            ..LinkSpec::default()
        };
        let relay = Relay::start(
            "127.0.0.1:0".parse().expect("address"),
            sink.local_addr().map_err(io)?,
            spec,
            spec,
            1,
        )
        .map_err(io)?;
        let measured = wan::stream(
            relay.address(),
            &sink,
            (mbit * 1.5e6) as u64,
            seconds,
            1200,
            Sender::Gso,
        )
        .map_err(io)?;
        ok &= line(
            &format!("rate cap {mbit} Mbit/s, {rtt_ms} ms, offered 1.5x"),
            measured.rate_bits / 1e6,
            mbit,
            0.05,
            "Mbit/s",
        );
    }

    // Round trip.
    for rtt_ms in [20u64, 80, 200] {
        let echo = Echo::start().map_err(io)?;
        let spec = LinkSpec {
            delay: Duration::from_millis(rtt_ms / 2),
            ..LinkSpec::default()
        };
        let relay = Relay::start(
            "127.0.0.1:0".parse().expect("address"),
            echo.address(),
            spec,
            spec,
            1,
        )
        .map_err(io)?;
        let measured = wan::round_trip(relay.address(), 20).map_err(io)?;
        ok &= line(
            &format!("round trip, configured {rtt_ms} ms"),
            measured.as_secs_f64() * 1e3,
            rtt_ms as f64,
            0.05,
            "ms",
        );
    }

    // Loss, below the cap so that no tail drop mixes in.
    for loss_pct in [0.1, 1.0] {
        let sink = UdpSocket::bind("127.0.0.1:0").map_err(io)?;
        let spec = LinkSpec {
            rate_bits: 100_000_000,
            delay: Duration::from_millis(20),
            loss: loss_pct / 100.0,
            ..LinkSpec::default()
        };
        let relay = Relay::start(
            "127.0.0.1:0".parse().expect("address"),
            sink.local_addr().map_err(io)?,
            spec,
            LinkSpec::default(),
            7,
        )
        .map_err(io)?;
        let measured = wan::stream(
            relay.address(),
            &sink,
            80_000_000,
            seconds,
            1200,
            Sender::Gso,
        )
        .map_err(io)?;
        // About 25000 datagrams: at 0.1% that is 25 losses, so the tolerance is wide.
        ok &= line(
            &format!("loss {loss_pct}% at 80 of 100 Mbit/s"),
            measured.loss * 100.0,
            loss_pct,
            if loss_pct < 1.0 { 0.5 } else { 0.2 },
            "%",
        );
    }
    Ok(ok)
}
