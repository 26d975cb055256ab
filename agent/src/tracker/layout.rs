//! Tracepoint record layouts, read from the running kernel.
//!
//! Offsets inside a tracepoint record change between kernel versions (`rwbs` of
//! `block_rq_complete` sits at 32 on 5.10 and 6.1, at 34 on 6.18), so they are never
//! hard-coded: [`RqCompleteLayout::parse`] reads them from the tracepoint's `format` file in
//! tracefs and checks every field we use for the size we expect.

use std::{fs, path::Path};

/// Errors reading or validating a tracepoint layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The format file could not be read.
    #[error("cannot read the tracepoint format {path}: {source} (is tracefs mounted?)")]
    Read {
        /// The format file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A field we depend on is missing.
    #[error(
        "this kernel's block_rq_complete tracepoint has no field `{0}`; blkmirror cannot track changes on it"
    )]
    MissingField(&'static str),
    /// A field has a size we cannot read.
    #[error("this kernel's block_rq_complete field `{field}` is {size} bytes, expected {expected}")]
    FieldSize {
        /// The field.
        field: &'static str,
        /// Its size.
        size: u64,
        /// What we read.
        expected: &'static str,
    },
}

/// Offsets of the `block_rq_complete` fields the tracker reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RqCompleteLayout {
    /// `dev_t dev` (4 bytes).
    pub dev: u64,
    /// `sector_t sector` (8 bytes).
    pub sector: u64,
    /// `unsigned int nr_sector` (4 bytes).
    pub nr_sector: u64,
    /// `int error` (4 bytes).
    pub error: u64,
    /// `char rwbs[N]` (N >= 2).
    pub rwbs: u64,
}

/// One `field:` line of a format file.
#[derive(Debug, PartialEq, Eq)]
struct Field<'a> {
    name: &'a str,
    offset: u64,
    size: u64,
}

fn parse_fields(text: &str) -> Vec<Field<'_>> {
    text.lines()
        .filter_map(|line| {
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for part in line.split(';') {
                let part = part.trim();
                if let Some(rest) = part.strip_prefix("field:") {
                    decl = Some(rest);
                } else if let Some(rest) = part.strip_prefix("offset:") {
                    offset = rest.parse().ok();
                } else if let Some(rest) = part.strip_prefix("size:") {
                    size = rest.parse().ok();
                }
            }
            let decl = decl?;
            // The name is the last word of the declaration, without an array suffix.
            let last = decl.split_whitespace().last()?;
            let name = last.split('[').next()?;
            Some(Field {
                name,
                offset: offset?,
                size: size?,
            })
        })
        .collect()
}

impl RqCompleteLayout {
    /// Where the format file lives below the tracefs mount point.
    pub const FORMAT: &'static str = "events/block/block_rq_complete/format";

    /// Reads the layout from tracefs mounted at `tracefs`.
    pub fn read(tracefs: &Path) -> Result<Self, LayoutError> {
        let path = tracefs.join(Self::FORMAT);
        let text = fs::read_to_string(&path).map_err(|source| LayoutError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses a format file's text.
    pub fn parse(text: &str) -> Result<Self, LayoutError> {
        let fields = parse_fields(text);
        let find = |name: &'static str, sizes: &[u64], expected: &'static str| {
            let field = fields
                .iter()
                .find(|f| f.name == name)
                .ok_or(LayoutError::MissingField(name))?;
            if !sizes.contains(&field.size) {
                return Err(LayoutError::FieldSize {
                    field: name,
                    size: field.size,
                    expected,
                });
            }
            Ok(field.offset)
        };
        let rwbs_field = fields
            .iter()
            .find(|f| f.name == "rwbs")
            .ok_or(LayoutError::MissingField("rwbs"))?;
        if rwbs_field.size < 2 {
            return Err(LayoutError::FieldSize {
                field: "rwbs",
                size: rwbs_field.size,
                expected: "at least 2",
            });
        }
        Ok(Self {
            dev: find("dev", &[4], "4")?,
            sector: find("sector", &[8], "8")?,
            nr_sector: find("nr_sector", &[4], "4")?,
            error: find("error", &[4], "4")?,
            rwbs: rwbs_field.offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Verbatim from Linux 6.18 (this project's CI machine).
    const FORMAT_6_18: &str = "name: block_rq_complete
ID: 2107
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:44;\tsize:4;\tsigned:0;

print fmt: \"%d,%d %s (%s) %llu + %u %s,%u,%u [%d]\"
";

    /// The 5.10/6.1 shape: no ioprio, so rwbs sits at 32.
    const FORMAT_6_1: &str = "name: block_rq_complete
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:char rwbs[8];\toffset:32;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:40;\tsize:4;\tsigned:1;
";

    #[test]
    fn parses_6_18() {
        let layout = RqCompleteLayout::parse(FORMAT_6_18).unwrap();
        assert_eq!(
            layout,
            RqCompleteLayout {
                dev: 8,
                sector: 16,
                nr_sector: 24,
                error: 28,
                rwbs: 34
            }
        );
    }

    #[test]
    fn parses_6_1() {
        let layout = RqCompleteLayout::parse(FORMAT_6_1).unwrap();
        assert_eq!(layout.rwbs, 32);
    }

    proptest::proptest! {
        /// Any text is parsed or rejected without a panic.
        #[test]
        fn arbitrary_format_text_never_panics(text in ".{0,400}") {
            let _ = RqCompleteLayout::parse(&text);
        }

        /// Field lines in any order, with any offsets, parse to exactly those offsets.
        #[test]
        fn offsets_are_taken_from_the_text(
            offsets in proptest::array::uniform5(0u64..4096),
            order in Just([0usize, 1, 2, 3, 4]).prop_shuffle(),
        ) {
            let decls = [
                ("dev_t dev", 4), ("sector_t sector", 8), ("unsigned int nr_sector", 4),
                ("int error", 4), ("char rwbs[8]", 8),
            ];
            let mut text = String::from("name: block_rq_complete\nformat:\n");
            for &i in &order {
                text.push_str(&format!(
                    "\tfield:{};\toffset:{};\tsize:{};\tsigned:0;\n",
                    decls[i].0, offsets[i], decls[i].1
                ));
            }
            let layout = RqCompleteLayout::parse(&text).unwrap();
            prop_assert_eq!(
                [layout.dev, layout.sector, layout.nr_sector, layout.error, layout.rwbs],
                offsets
            );
        }
    }

    #[test]
    fn rejects_missing_and_resized_fields() {
        let no_error = FORMAT_6_1.replace("int error", "int status");
        assert!(matches!(
            RqCompleteLayout::parse(&no_error),
            Err(LayoutError::MissingField("error"))
        ));
        let wide_dev = FORMAT_6_1.replace(
            "dev_t dev;\toffset:8;\tsize:4",
            "dev_t dev;\toffset:8;\tsize:8",
        );
        assert!(matches!(
            RqCompleteLayout::parse(&wide_dev),
            Err(LayoutError::FieldSize { field: "dev", .. })
        ));
        assert!(RqCompleteLayout::parse("garbage").is_err());
    }
}

/// What the raw-tracepoint hook reads from `struct request` and the values of `enum req_op`,
/// from the kernel's BTF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLayout {
    /// `request.cmd_flags` (4 bytes; the low 8 bits are the operation).
    pub rq_cmd_flags: u64,
    /// `request.__sector` (8 bytes).
    pub rq_sector: u64,
    /// `request.q` (pointer).
    pub rq_q: u64,
    /// `request_queue.disk` (pointer).
    pub q_disk: u64,
    /// 1 when the kernel's `request_queue` has no `disk` (before 5.15): then `rq_q` is the
    /// offset of `request.rq_disk`, which points to the disk directly.
    pub disk_in_rq: u64,
    /// `gendisk.major` (4 bytes).
    pub disk_major: u64,
    /// `gendisk.first_minor` (4 bytes).
    pub disk_first_minor: u64,
    /// `REQ_OP_READ`.
    pub op_read: u64,
    /// `REQ_OP_WRITE`.
    pub op_write: u64,
    /// `REQ_OP_FLUSH`.
    pub op_flush: u64,
    /// `REQ_OP_DISCARD`.
    pub op_discard: u64,
    /// `REQ_OP_SECURE_ERASE`.
    pub op_secure_erase: u64,
    /// `REQ_OP_WRITE_ZEROES`.
    pub op_write_zeroes: u64,
    /// `REQ_OP_DRV_OUT` (passthrough writes: their target range is unknown).
    pub op_drv_out: u64,
}

impl RequestLayout {
    /// Reads the layout from parsed BTF.
    pub fn from_btf(
        btf: &crate::tracker::btf::Btf<'_>,
    ) -> Result<Self, crate::tracker::btf::BtfError> {
        let member =
            |strukt: &str, name: &str, size: u32| -> Result<u64, crate::tracker::btf::BtfError> {
                let (offset, actual) = btf.member(strukt, name)?;
                if actual != size {
                    return Err(crate::tracker::btf::BtfError::Malformed(
                        "a struct member has an unexpected size",
                    ));
                }
                Ok(u64::from(offset))
            };
        // Newer kernels reach the disk through the queue; older ones (5.10) name it in the
        // request itself.
        let (rq_q, q_disk, disk_in_rq) = match member("request_queue", "disk", 8) {
            Ok(q_disk) => (member("request", "q", 8)?, q_disk, 0),
            Err(_) => (member("request", "rq_disk", 8)?, 0, 1),
        };
        Ok(Self {
            rq_cmd_flags: member("request", "cmd_flags", 4)?,
            rq_sector: member("request", "__sector", 8)?,
            rq_q,
            q_disk,
            disk_in_rq,
            disk_major: member("gendisk", "major", 4)?,
            disk_first_minor: member("gendisk", "first_minor", 4)?,
            op_read: btf.enumerator("REQ_OP_READ")?,
            op_write: btf.enumerator("REQ_OP_WRITE")?,
            op_flush: btf.enumerator("REQ_OP_FLUSH")?,
            op_discard: btf.enumerator("REQ_OP_DISCARD")?,
            op_secure_erase: btf.enumerator("REQ_OP_SECURE_ERASE")?,
            op_write_zeroes: btf.enumerator("REQ_OP_WRITE_ZEROES")?,
            op_drv_out: btf.enumerator("REQ_OP_DRV_OUT")?,
        })
    }

    /// Reads the running kernel's layout from `/sys/kernel/btf/vmlinux`.
    pub fn from_running_kernel() -> Result<Self, String> {
        let blob = fs::read(crate::tracker::environment::VMLINUX_BTF)
            .map_err(|e| format!("{}: {e}", crate::tracker::environment::VMLINUX_BTF))?;
        let btf = crate::tracker::btf::Btf::parse(&blob).map_err(|e| e.to_string())?;
        Self::from_btf(&btf).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod kernel_tests {
    use super::*;

    /// The machines this project builds on have BTF; the layout must be found there.
    #[test]
    fn running_kernel_request_layout() {
        if !Path::new(crate::tracker::environment::VMLINUX_BTF).exists() {
            eprintln!("no kernel BTF here; nothing to check");
            return;
        }
        let layout = RequestLayout::from_running_kernel().expect("layout from BTF");
        assert_eq!(layout.op_write, 1);
        assert_eq!(layout.op_read, 0);
        assert!(layout.rq_sector > layout.rq_cmd_flags);
    }
}
