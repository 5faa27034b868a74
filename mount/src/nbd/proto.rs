//! The NBD wire format (newstyle fixed handshake, transmission, structured replies), as pure
//! functions over byte slices. Numbers are from the NBD protocol specification
//! (`doc/proto.md` of the NBD project); each constant is frozen by that spec.

/// `"NBDMAGIC"`.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`: starts the newstyle handshake and every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

// Info types (NBD_OPT_INFO / NBD_OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Error values sent to clients (Linux errno numbers, as the spec defines them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

pub const BASE_ALLOCATION: &str = "base:allocation";

/// What a server offers of TLS (NBD_OPT_STARTTLS), as qemu-nbd's and nbdkit's `--tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: NBD_OPT_STARTTLS is refused with NBD_REP_ERR_POLICY.
    Off,
    /// Clients may upgrade with NBD_OPT_STARTTLS or carry on in plain text.
    On,
    /// Nothing but NBD_OPT_STARTTLS (and NBD_OPT_ABORT) is served before TLS.
    Require,
}

/// What option haggling does with an option, given the TLS mode and whether TLS is up, before
/// looking at the option itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsGate {
    /// Handle the option as usual.
    Pass,
    /// NBD_OPT_STARTTLS accepted: reply NBD_REP_ACK, then the TLS handshake on the same socket.
    StartTls,
    /// Answer with this error reply (and message) and carry on haggling.
    Refuse(u32, &'static str),
    /// Close the connection: NBD_OPT_EXPORT_NAME has no way to carry an error.
    Close,
}

pub fn tls_gate(option: u32, mode: TlsMode, in_tls: bool) -> TlsGate {
    match (option, mode, in_tls) {
        (OPT_STARTTLS, _, true) => TlsGate::Refuse(REP_ERR_INVALID, "TLS is already in use"),
        (OPT_STARTTLS, TlsMode::Off, false) => {
            TlsGate::Refuse(REP_ERR_POLICY, "TLS is not enabled on this server")
        }
        (OPT_STARTTLS, _, false) => TlsGate::StartTls,
        (OPT_ABORT, _, _) => TlsGate::Pass,
        (OPT_EXPORT_NAME, TlsMode::Require, false) => TlsGate::Close,
        (_, TlsMode::Require, false) => TlsGate::Refuse(
            REP_ERR_TLS_REQD,
            "this server requires TLS: send NBD_OPT_STARTTLS first",
        ),
        _ => TlsGate::Pass,
    }
}

/// The server's first 18 bytes.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("malformed option data: {0}")]
    Malformed(&'static str),
}

/// Parses the 16-byte header of an option request.
pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, ProtoError> {
    let magic = u64::from_be_bytes(b[..8].try_into().unwrap());
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes(b[8..12].try_into().unwrap()),
        len: u32::from_be_bytes(b[12..16].try_into().unwrap()),
    })
}

/// An option reply: header and `data`.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// An option error reply with a human-readable message.
pub fn option_error(option: u32, reply: u32, message: &str) -> Vec<u8> {
    option_reply(option, reply, message.as_bytes())
}

/// NBD_REP_SERVER data for NBD_OPT_LIST.
pub fn server_entry(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// NBD_INFO_EXPORT data: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let mut d = kind.to_be_bytes().to_vec();
    d.extend_from_slice(text.as_bytes());
    d
}

/// NBD_REP_META_CONTEXT data.
pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut d = id.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// Reads a u32-length-prefixed string at `pos`.
fn string_at(data: &[u8], pos: &mut usize) -> Result<String, ProtoError> {
    let len = data
        .get(*pos..*pos + 4)
        .ok_or(ProtoError::Malformed("truncated string length"))?;
    let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
    *pos += 4;
    let s = data
        .get(
            *pos..pos
                .checked_add(len)
                .ok_or(ProtoError::Malformed("length overflow"))?,
        )
        .ok_or(ProtoError::Malformed("truncated string"))?;
    *pos += len;
    String::from_utf8(s.to_vec()).map_err(|_| ProtoError::Malformed("string is not UTF-8"))
}

/// NBD_OPT_INFO / NBD_OPT_GO data: export name and requested info types.
pub fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), ProtoError> {
    let mut pos = 0;
    let name = string_at(data, &mut pos)?;
    let n = data
        .get(pos..pos + 2)
        .ok_or(ProtoError::Malformed("missing info request count"))?;
    let n = u16::from_be_bytes(n.try_into().unwrap()) as usize;
    pos += 2;
    if data.len() != pos + 2 * n {
        return Err(ProtoError::Malformed(
            "info request count does not match length",
        ));
    }
    let infos = data[pos..]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes(c.try_into().unwrap()))
        .collect();
    Ok((name, infos))
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT data: export name and queries.
pub fn parse_meta_request(data: &[u8]) -> Result<(String, Vec<String>), ProtoError> {
    let mut pos = 0;
    let name = string_at(data, &mut pos)?;
    let n = data
        .get(pos..pos + 4)
        .ok_or(ProtoError::Malformed("missing query count"))?;
    let n = u32::from_be_bytes(n.try_into().unwrap());
    pos += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(string_at(data, &mut pos)?);
    }
    if pos != data.len() {
        return Err(ProtoError::Malformed("trailing bytes after queries"));
    }
    Ok((name, queries))
}

/// A transmission-phase request (28 bytes on the wire; a write's payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

pub const REQUEST_LEN: usize = 28;

pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let magic = u32::from_be_bytes(b[..4].try_into().unwrap());
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic as u64));
    }
    Ok(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
        kind: u16::from_be_bytes(b[6..8].try_into().unwrap()),
        cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        len: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.kind.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// A simple reply header (a read's data follows it).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// A structured NBD_REPLY_TYPE_ERROR chunk (final).
pub fn chunk_error(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut out = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    )
    .to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// A structured NBD_REPLY_TYPE_BLOCK_STATUS chunk (final): (length, flags) descriptors.
pub fn chunk_block_status(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len() as u32;
    let mut out = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len).to_vec();
    out.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// With `require`, every option but STARTTLS and ABORT is refused with ERR_TLS_REQD before
    /// TLS (EXPORT_NAME, which cannot carry an error, closes); inside TLS all pass and a second
    /// STARTTLS is invalid. `on` and `off` pass everything in plain text.
    #[test]
    fn options_before_starttls_need_tls_when_it_is_required() {
        use TlsGate::*;
        for opt in [
            OPT_LIST,
            OPT_INFO,
            OPT_GO,
            OPT_STRUCTURED_REPLY,
            OPT_LIST_META_CONTEXT,
            OPT_SET_META_CONTEXT,
            42,
        ] {
            assert!(
                matches!(
                    tls_gate(opt, TlsMode::Require, false),
                    Refuse(REP_ERR_TLS_REQD, _)
                ),
                "option {opt}"
            );
            assert_eq!(tls_gate(opt, TlsMode::Require, true), Pass);
            assert_eq!(tls_gate(opt, TlsMode::On, false), Pass);
            assert_eq!(tls_gate(opt, TlsMode::Off, false), Pass);
        }
        assert_eq!(REP_ERR_TLS_REQD, 0x8000_0005);
        assert_eq!(tls_gate(OPT_EXPORT_NAME, TlsMode::Require, false), Close);
        assert_eq!(tls_gate(OPT_EXPORT_NAME, TlsMode::Require, true), Pass);
        assert_eq!(tls_gate(OPT_ABORT, TlsMode::Require, false), Pass);
        assert_eq!(tls_gate(OPT_STARTTLS, TlsMode::Require, false), StartTls);
        assert_eq!(tls_gate(OPT_STARTTLS, TlsMode::On, false), StartTls);
        assert!(matches!(
            tls_gate(OPT_STARTTLS, TlsMode::Require, true),
            Refuse(REP_ERR_INVALID, _)
        ));
        assert!(matches!(
            tls_gate(OPT_STARTTLS, TlsMode::Off, false),
            Refuse(REP_ERR_POLICY, _)
        ));
    }

    #[test]
    fn greeting_bytes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn option_header_and_reply() {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(b"IHAVEOPT");
        h[8..12].copy_from_slice(&7u32.to_be_bytes());
        h[12..].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&h).unwrap(),
            OptionHeader {
                option: OPT_GO,
                len: 9
            }
        );
        h[0] = b'X';
        assert!(parse_option_header(&h).is_err());
        let r = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(
            r,
            [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]
        );
    }

    #[test]
    fn info_request_parsing() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&d).unwrap(),
            ("disk".to_string(), vec![INFO_BLOCK_SIZE, INFO_NAME])
        );
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        assert!(parse_info_request(&[0, 0, 0, 200, b'x']).is_err());
    }

    #[test]
    fn meta_request_parsing() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_meta_request(&d).unwrap(),
            (String::new(), vec![BASE_ALLOCATION.to_string()])
        );
        d.push(0);
        assert!(parse_meta_request(&d).is_err());
    }

    #[test]
    fn replies() {
        let r = simple_reply(EIO, 0x0102030405060708);
        assert_eq!(
            r,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        let c = chunk_block_status(9, 1, &[(4096, 0), (8192, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(&c[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&c[4..8], &[0, 1, 0, 5]);
        assert_eq!(&c[16..20], &20u32.to_be_bytes());
        assert_eq!(&c[20..24], &1u32.to_be_bytes());
        assert_eq!(&c[32..40], &[0, 0, 0x20, 0, 0, 0, 0, 3]);
        let e = chunk_error(1, EINVAL, "bad");
        assert_eq!(&e[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&e[20..], &[0, 0, 0, 22, 0, 3, b'b', b'a', b'd']);
    }

    proptest! {
        #[test]
        fn request_roundtrip(flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(),
                             offset in any::<u64>(), len in any::<u32>()) {
            let r = Request { flags, kind, cookie, offset, len };
            prop_assert_eq!(parse_request(&encode_request(&r)).unwrap(), r);
        }

        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_request(&data);
            if data.len() >= REQUEST_LEN {
                let _ = parse_request(data[..REQUEST_LEN].try_into().unwrap());
            }
            if data.len() >= 16 {
                let _ = parse_option_header(data[..16].try_into().unwrap());
            }
        }
    }
}
