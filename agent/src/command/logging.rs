//! Logging through `tracing`, one line per event on stderr, as journald reads it.
//!
//! Lines read `blkmirror agent: message` (the target names the part speaking). Under systemd
//! (`$JOURNAL_STREAM` names our stderr), each line starts with its syslog priority (`<3>` for
//! errors, `<4>` warnings, `<6>` information), which journald turns into the entry's priority,
//! so `journalctl -p warning -u blkmirror-agent` shows only what needs attention. The level
//! filter is `BLKMIRROR_LOG` (`error`, `warn`, `info`, `debug`; default `info`).

use std::fmt;

use tracing::{Level, Subscriber};
use tracing_subscriber::{
    filter::LevelFilter,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// The line format.
struct Line {
    priorities: bool,
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        if self.priorities {
            let priority = match *metadata.level() {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                _ => 7,
            };
            write!(writer, "<{priority}>")?;
        }
        write!(writer, "{}: ", metadata.target())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Whether stderr is the journal stream systemd gave us (`$JOURNAL_STREAM` is `DEV:INODE`).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Installs the subscriber (once per process; later calls do nothing).
pub fn init() {
    let level = match std::env::var("BLKMIRROR_LOG").as_deref() {
        Ok("error") => LevelFilter::ERROR,
        Ok("warn") => LevelFilter::WARN,
        Ok("debug") => LevelFilter::DEBUG,
        Ok("trace") => LevelFilter::TRACE,
        _ => LevelFilter::INFO,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .event_format(Line {
            priorities: stderr_is_journal(),
        })
        .try_init();
}
