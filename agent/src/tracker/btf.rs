//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): struct member offsets and
//! enumerator values. Pure: it parses bytes handed to it.
//!
//! The raw-tracepoint hook reads `struct request` and friends directly, and their layouts
//! differ between kernels (6.1 keeps `bd_inode` where 6.18 has `bd_dev`). The offsets therefore
//! come from the running kernel's BTF, never from constants compiled in.

use std::collections::HashMap;

/// BTF parsing errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    /// Not BTF, or truncated.
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    /// An unknown type kind (a newer kernel); we cannot walk past it.
    #[error("BTF type kind {0} is unknown to blkmirror")]
    UnknownKind(u32),
    /// A struct is missing.
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    /// A member is missing.
    #[error("the kernel's BTF has no member {member} in struct {strukt}")]
    NoMember {
        /// The struct.
        strukt: String,
        /// The member.
        member: String,
    },
    /// A member is a bitfield or not byte aligned.
    #[error("struct {strukt} member {member} is a bitfield")]
    Bitfield {
        /// The struct.
        strukt: String,
        /// The member.
        member: String,
    },
    /// An enumerator is missing.
    #[error("the kernel's BTF has no enumerator {0}")]
    NoEnumerator(String),
}

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Copy, Debug)]
struct TypeHeader {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    size_or_type: u32,
    /// Byte offset of the type's trailing data in the type section.
    data: usize,
}

/// A parsed BTF blob.
pub struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Index `id - 1` → header.
    headers: Vec<TypeHeader>,
    structs: HashMap<&'a str, u32>,
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, BtfError> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl<'a> Btf<'a> {
    /// Parses a little-endian BTF blob.
    pub fn parse(blob: &'a [u8]) -> Result<Self, BtfError> {
        let magic = blob
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(BtfError::Malformed("empty"))?;
        if magic != MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(blob, 4)? as usize;
        let type_off = u32_at(blob, 8)? as usize;
        let type_len = u32_at(blob, 12)? as usize;
        let str_off = u32_at(blob, 16)? as usize;
        let str_len = u32_at(blob, 20)? as usize;
        let section = |off: usize, len: usize| {
            hdr_len
                .checked_add(off)
                .and_then(|start| Some(start..start.checked_add(len)?))
                .and_then(|range| blob.get(range))
                .ok_or(BtfError::Malformed("section out of bounds"))
        };
        let types = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        let mut btf = Self {
            types,
            strings,
            headers: Vec::new(),
            structs: HashMap::new(),
        };
        let mut at = 0;
        while at < types.len() {
            let name_off = u32_at(types, at)?;
            let info = u32_at(types, at + 4)?;
            let size_or_type = u32_at(types, at + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let data = at + 12;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen as usize,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen as usize,
                other => return Err(BtfError::UnknownKind(other)),
            };
            let header = TypeHeader {
                name_off,
                kind,
                vlen,
                kind_flag: info >> 31 == 1,
                size_or_type,
                data,
            };
            btf.headers.push(header);
            if kind == KIND_STRUCT && name_off != 0 {
                let name = btf.string(name_off)?;
                let id = btf.headers.len() as u32;
                // Keep the first complete definition of a name.
                btf.structs.entry(name).or_insert(id);
            }
            at = data + extra;
        }
        if at != types.len() {
            return Err(BtfError::Malformed("type section ends inside a type"));
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> Result<&'a str, BtfError> {
        let rest = self
            .strings
            .get(off as usize..)
            .ok_or(BtfError::Malformed("string offset out of bounds"))?;
        let end = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(BtfError::Malformed("unterminated string"))?;
        std::str::from_utf8(&rest[..end]).map_err(|_| BtfError::Malformed("non-UTF-8 name"))
    }

    fn header(&self, id: u32) -> Result<TypeHeader, BtfError> {
        id.checked_sub(1)
            .and_then(|i| self.headers.get(i as usize))
            .copied()
            .ok_or(BtfError::Malformed("type id out of range"))
    }

    /// Size in bytes of type `id`, following typedefs and qualifiers.
    pub fn size_of(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..32 {
            let h = self.header(id)?;
            match h.kind {
                KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_STRUCT | KIND_UNION | KIND_FLOAT => {
                    return Ok(h.size_or_type);
                }
                KIND_PTR => return Ok(8),
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = h.size_or_type;
                }
                _ => return Err(BtfError::Malformed("type has no size")),
            }
        }
        Err(BtfError::Malformed("type chain too long"))
    }

    /// Byte offset and size of `strukt.member`.
    pub fn member(&self, strukt: &str, member: &str) -> Result<(u32, u32), BtfError> {
        let id = *self
            .structs
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let h = self.header(id)?;
        for i in 0..h.vlen as usize {
            let at = h.data + 12 * i;
            let name_off = u32_at(self.types, at)?;
            if self.string(name_off)? != member {
                continue;
            }
            let type_id = u32_at(self.types, at + 4)?;
            let raw = u32_at(self.types, at + 8)?;
            let (bit_offset, bitfield_size) = if h.kind_flag {
                (raw & 0x00ff_ffff, raw >> 24)
            } else {
                (raw, 0)
            };
            if bitfield_size != 0 || bit_offset % 8 != 0 {
                return Err(BtfError::Bitfield {
                    strukt: strukt.to_owned(),
                    member: member.to_owned(),
                });
            }
            return Ok((bit_offset / 8, self.size_of(type_id)?));
        }
        Err(BtfError::NoMember {
            strukt: strukt.to_owned(),
            member: member.to_owned(),
        })
    }

    /// The value of the enumerator `name` (in any enum).
    pub fn enumerator(&self, name: &str) -> Result<u64, BtfError> {
        for h in &self.headers {
            let width = match h.kind {
                KIND_ENUM => 8,
                KIND_ENUM64 => 12,
                _ => continue,
            };
            for i in 0..h.vlen as usize {
                let at = h.data + width * i;
                if self.string(u32_at(self.types, at)?)? == name {
                    let lo = u64::from(u32_at(self.types, at + 4)?);
                    let hi = if width == 12 {
                        u64::from(u32_at(self.types, at + 8)?)
                    } else {
                        0
                    };
                    return Ok(hi << 32 | lo);
                }
            }
        }
        Err(BtfError::NoEnumerator(name.to_owned()))
    }

    /// The name of type `id` (empty for anonymous types).
    pub fn name_of(&self, id: u32) -> Result<&'a str, BtfError> {
        self.string(self.header(id)?.name_off)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a BTF blob: int, ptr, typedef, struct request { u32 cmd_flags; u64 __sector; ptr q }
    /// and enum req_op { REQ_OP_WRITE = 1, REQ_OP_WRITE_ZEROES = 9 }.
    pub(crate) fn sample() -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut name = |s: &str| {
            let off = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let (n_u32, n_u64, n_req, n_flags, n_sector, n_q, n_op, n_w, n_wz, n_opf) = (
            name("unsigned int"),
            name("long long unsigned int"),
            name("request"),
            name("cmd_flags"),
            name("__sector"),
            name("q"),
            name("req_op"),
            name("REQ_OP_WRITE"),
            name("REQ_OP_WRITE_ZEROES"),
            name("blk_opf_t"),
        );
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        push(&[n_u32, KIND_INT << 24, 4, 32]); // 1: u32
        push(&[n_u64, KIND_INT << 24, 8, 64]); // 2: u64
        push(&[0, KIND_PTR << 24, 0]); // 3: void *
        push(&[n_opf, KIND_TYPEDEF << 24, 1]); // 4: blk_opf_t
        push(&[n_req, KIND_STRUCT << 24 | 3, 24]); // 5: struct request
        push(&[n_flags, 4, 0]);
        push(&[n_sector, 2, 64]);
        push(&[n_q, 3, 128]);
        push(&[n_op, KIND_ENUM << 24 | 2, 4]); // 6: enum req_op
        push(&[n_w, 1]);
        push(&[n_wz, 9]);
        let mut blob = Vec::new();
        for w in [
            u32::from(MAGIC) | 1 << 16,
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&w.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(&strings);
        blob
    }

    #[test]
    fn finds_members_and_enumerators() {
        let blob = sample();
        let btf = Btf::parse(&blob).unwrap();
        assert_eq!(btf.member("request", "cmd_flags"), Ok((0, 4)));
        assert_eq!(btf.member("request", "__sector"), Ok((8, 8)));
        assert_eq!(btf.member("request", "q"), Ok((16, 8)));
        assert_eq!(btf.enumerator("REQ_OP_WRITE_ZEROES"), Ok(9));
        assert!(matches!(
            btf.member("request", "part"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member("gendisk", "major"),
            Err(BtfError::NoStruct(_))
        ));
        assert!(matches!(
            btf.enumerator("REQ_OP_NOPE"),
            Err(BtfError::NoEnumerator(_))
        ));
        assert_eq!(btf.name_of(5), Ok("request"));
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(b"\x9f\xeb\x01\x00").is_err());
        let mut blob = sample();
        blob.truncate(blob.len() - 10);
        assert!(Btf::parse(&blob).is_err());
        let mut blob = sample();
        blob[0] = 0;
        assert!(Btf::parse(&blob).is_err());
    }

    proptest::proptest! {
        /// Corrupted BTF (random bytes written over a valid blob) is rejected or parsed, never
        /// a panic or an out-of-bounds read.
        #[test]
        fn corrupted_blobs_never_panic(
            patches in proptest::collection::vec((0usize..400, proptest::prelude::any::<u8>()), 1..20)
        ) {
            let mut blob = sample();
            for (at, byte) in patches {
                let len = blob.len();
                blob[at % len] = byte;
            }
            if let Ok(btf) = Btf::parse(&blob) {
                let _ = btf.member("request", "cmd_flags");
                let _ = btf.enumerator("REQ_OP_WRITE");
                for id in 0..10 {
                    let _ = btf.size_of(id);
                    let _ = btf.name_of(id);
                }
            }
        }
    }

    #[test]
    fn parses_every_truncation_without_panicking() {
        let blob = sample();
        for len in 0..blob.len() {
            let _ = Btf::parse(&blob[..len]);
        }
    }
}
