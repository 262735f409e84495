//! Transmission-phase framing: request headers in, replies out. Pure
//! functions over byte slices, so they can be fuzzed without sockets.

use crate::proto;

/// Size of a (compact) request header on the wire.
pub const REQUEST_HEADER_BYTES: usize = 28;

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub command: u16,
    /// Opaque handle echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (payload length for WRITE).
    pub length: u32,
}

/// What a request header asks for, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// A well-formed header.
    Valid(RequestHeader),
    /// A header we must answer with `errno` (payload of `drain` bytes
    /// follows and must be skipped first).
    Invalid {
        /// The header as received.
        header: RequestHeader,
        /// NBD errno to reply with.
        errno: u32,
        /// Payload bytes to discard.
        drain: u64,
    },
}

/// Decodes a 28-byte request header. `Err` means the magic is wrong: the
/// stream cannot be resynchronised and the connection must close.
///
/// # Errors
/// The bad magic, for the log line.
pub fn decode_request_header(buf: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader, u32> {
    let magic = u32::from_be_bytes(buf[0..4].try_into().expect("4 bytes"));
    if magic != proto::REQUEST_MAGIC {
        return Err(magic);
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes(buf[4..6].try_into().expect("2 bytes")),
        command: u16::from_be_bytes(buf[6..8].try_into().expect("2 bytes")),
        cookie: u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(buf[16..24].try_into().expect("8 bytes")),
        length: u32::from_be_bytes(buf[24..28].try_into().expect("4 bytes")),
    })
}

/// Validates a header against the export: flags, range, size limits,
/// permissions. Pure; `size` is the export size.
pub fn classify(
    header: RequestHeader,
    size: u64,
    read_only: bool,
    max_payload: u32,
    structured: bool,
) -> Request {
    let drain = if header.command == proto::CMD_WRITE {
        u64::from(header.length)
    } else {
        0
    };
    let invalid = |errno| Request::Invalid {
        header,
        errno,
        drain,
    };
    if header.flags & !proto::CMD_FLAGS_KNOWN != 0 {
        return invalid(proto::EINVAL);
    }
    if header.flags & proto::CMD_FLAG_DF != 0 && !structured {
        return invalid(proto::EINVAL);
    }
    let end = header.offset.checked_add(u64::from(header.length));
    let in_range = end.is_some_and(|end| end <= size);
    let writes = matches!(
        header.command,
        proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
    );
    match header.command {
        proto::CMD_DISC | proto::CMD_FLUSH => Request::Valid(header),
        proto::CMD_READ
        | proto::CMD_WRITE
        | proto::CMD_TRIM
        | proto::CMD_CACHE
        | proto::CMD_WRITE_ZEROES
        | proto::CMD_BLOCK_STATUS => {
            if header.length == 0 {
                return invalid(proto::EINVAL);
            }
            if writes && read_only {
                return invalid(proto::EPERM);
            }
            if matches!(header.command, proto::CMD_READ | proto::CMD_WRITE)
                && header.length > max_payload
            {
                return invalid(proto::EINVAL);
            }
            if !in_range {
                // The spec: out-of-range writes are ENOSPC, everything else EINVAL.
                return invalid(if writes { proto::ENOSPC } else { proto::EINVAL });
            }
            if header.command == proto::CMD_BLOCK_STATUS && !structured {
                return invalid(proto::EINVAL);
            }
            Request::Valid(header)
        }
        _ => invalid(proto::EINVAL),
    }
}

/// A simple reply header (16 bytes).
pub fn simple_reply(cookie: u64, errno: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(16);
    buf.extend_from_slice(&proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&errno.to_be_bytes());
    buf.extend_from_slice(&cookie.to_be_bytes());
    buf
}

/// A structured reply chunk header (20 bytes) for a payload of `len` bytes.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(20 + 16);
    buf.extend_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&flags.to_be_bytes());
    buf.extend_from_slice(&kind.to_be_bytes());
    buf.extend_from_slice(&cookie.to_be_bytes());
    buf.extend_from_slice(&len.to_be_bytes());
    buf
}

/// A complete structured error chunk (with DONE) carrying `message`.
pub fn error_chunk(cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    let message = &message.as_bytes()[..message.len().min(4096)];
    let mut buf = chunk_header(
        cookie,
        proto::REPLY_FLAG_DONE,
        proto::REPLY_TYPE_ERROR,
        6 + message.len() as u32,
    );
    buf.extend_from_slice(&errno.to_be_bytes());
    buf.extend_from_slice(&(message.len() as u16).to_be_bytes());
    buf.extend_from_slice(message);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn out_of_range_writes_are_enospc_and_reads_einval() {
        let size = 1 << 20;
        let bad = |cmd| classify(header(cmd, 0, size - 512, 1024), size, false, 1 << 25, true);
        assert!(matches!(
            bad(proto::CMD_WRITE),
            Request::Invalid {
                errno: proto::ENOSPC,
                drain: 1024,
                ..
            }
        ));
        assert!(matches!(
            bad(proto::CMD_READ),
            Request::Invalid {
                errno: proto::EINVAL,
                drain: 0,
                ..
            }
        ));
        assert!(matches!(
            bad(proto::CMD_TRIM),
            Request::Invalid {
                errno: proto::ENOSPC,
                ..
            }
        ));
        // Offset overflow must not wrap into range.
        assert!(matches!(
            classify(
                header(proto::CMD_READ, 0, u64::MAX - 10, 512),
                size,
                false,
                1 << 25,
                true
            ),
            Request::Invalid {
                errno: proto::EINVAL,
                ..
            }
        ));
    }

    #[test]
    fn read_only_exports_refuse_writes_with_eperm_and_drain() {
        let r = classify(
            header(proto::CMD_WRITE, 0, 0, 4096),
            1 << 20,
            true,
            1 << 25,
            true,
        );
        assert_eq!(
            r,
            Request::Invalid {
                header: header(proto::CMD_WRITE, 0, 0, 4096),
                errno: proto::EPERM,
                drain: 4096
            }
        );
    }

    #[test]
    fn unknown_flags_and_commands_are_einval() {
        assert!(matches!(
            classify(
                header(proto::CMD_READ, 1 << 9, 0, 512),
                4096,
                false,
                1 << 25,
                true
            ),
            Request::Invalid {
                errno: proto::EINVAL,
                ..
            }
        ));
        assert!(matches!(
            classify(header(42, 0, 0, 512), 4096, false, 1 << 25, true),
            Request::Invalid {
                errno: proto::EINVAL,
                ..
            }
        ));
        assert!(matches!(
            classify(
                header(proto::CMD_BLOCK_STATUS, 0, 0, 512),
                4096,
                false,
                1 << 25,
                false
            ),
            Request::Invalid {
                errno: proto::EINVAL,
                ..
            }
        ));
    }

    proptest! {
        /// Fuzz: any 28 bytes decode without panicking, and any decoded
        /// header classifies without panicking; an invalid WRITE always
        /// drains exactly its payload.
        #[test]
        fn arbitrary_headers_never_panic(bytes in proptest::array::uniform28(any::<u8>()), size in 0u64..(1 << 40), ro: bool, sr: bool) {
            if let Ok(h) = decode_request_header(&bytes) {
                match classify(h, size, ro, 1 << 25, sr) {
                    Request::Invalid { drain, header, .. } if header.command == proto::CMD_WRITE => {
                        prop_assert_eq!(drain, u64::from(header.length));
                    }
                    Request::Valid(v)
                        if v.command != proto::CMD_DISC && v.command != proto::CMD_FLUSH => {
                            prop_assert!(v.offset + u64::from(v.length) <= size);
                        }
                    _ => {}
                }
            }
        }

        #[test]
        fn valid_magic_round_trips(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let mut bytes = [0u8; REQUEST_HEADER_BYTES];
            bytes[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
            bytes[4..6].copy_from_slice(&flags.to_be_bytes());
            bytes[6..8].copy_from_slice(&command.to_be_bytes());
            bytes[8..16].copy_from_slice(&cookie.to_be_bytes());
            bytes[16..24].copy_from_slice(&offset.to_be_bytes());
            bytes[24..28].copy_from_slice(&length.to_be_bytes());
            prop_assert_eq!(decode_request_header(&bytes), Ok(RequestHeader { flags, command, cookie, offset, length }));
        }
    }
}
