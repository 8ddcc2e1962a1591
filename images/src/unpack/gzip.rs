//! gzip decoding for layers: ISA-L's igzip (statically linked, built from the `isal-sys`
//! crate's vendored sources) where it is built in (the `isal` feature), zlib-rs through flate2
//! otherwise. igzip inflates in about two thirds of zlib-rs's CPU time on x86-64 (SIMD Huffman
//! decoding, PCLMUL CRC-32), and inflating is one of the three threads a compressed layer's
//! unpacking runs on.
//!
//! Both read every member of a multi-member stream (as `gzip -d` and Go's `gzip.Reader` do),
//! check each member's CRC-32 and ISIZE, and fail on a stream that ends inside a member or has
//! anything but another gzip member after one.

use std::io::{BufRead, Read};

/// A decoder of the whole gzip stream `input`.
pub(super) fn decoder<'a, R: BufRead + Send + 'a>(input: R) -> Box<dyn Read + Send + 'a> {
    #[cfg(feature = "isal")]
    {
        Box::new(isal::MultiGzDecoder::new(input))
    }
    #[cfg(not(feature = "isal"))]
    {
        Box::new(flate2::bufread::MultiGzDecoder::new(input))
    }
}

#[cfg(feature = "isal")]
mod isal {
    use std::io::{self, BufRead, Read};

    use isal_sys::igzip_lib as sys;

    /// `isal_inflate` over a `BufRead`, member after member.
    pub(crate) struct MultiGzDecoder<R> {
        input: R,
        /// About 40 KiB (history and output buffers): on the heap.
        state: Box<sys::inflate_state>,
    }

    // SAFETY: the state's pointers are only set for the duration of one `isal_inflate` call,
    // made from `read` with buffers it borrows, and cleared after it: between calls the state
    // refers to nothing outside itself, so it may move to another thread.
    unsafe impl<R: Send> Send for MultiGzDecoder<R> {}

    impl<R: BufRead> MultiGzDecoder<R> {
        pub(crate) fn new(input: R) -> Self {
            let layout = std::alloc::Layout::new::<sys::inflate_state>();
            // SAFETY: the layout is that of `inflate_state`, which is not zero-sized; an all-zero
            // `inflate_state` (integers, arrays of integers, null pointers) is a valid value, and
            // `isal_inflate_init` then sets it up. The pointer, checked for null, was allocated
            // by the global allocator with that layout, as `Box` requires.
            let mut state = unsafe {
                let raw = std::alloc::alloc_zeroed(layout).cast::<sys::inflate_state>();
                if raw.is_null() {
                    std::alloc::handle_alloc_error(layout);
                }
                sys::isal_inflate_init(raw);
                Box::from_raw(raw)
            };
            state.crc_flag = sys::ISAL_GZIP;
            MultiGzDecoder { input, state }
        }

        fn member_finished(&self) -> bool {
            self.state.block_state == sys::isal_block_state_ISAL_BLOCK_FINISH
        }
    }

    fn error(rc: i32) -> io::Error {
        let what = match rc {
            sys::ISAL_INVALID_BLOCK => "invalid deflate block",
            sys::ISAL_INVALID_SYMBOL => "invalid deflate symbol",
            sys::ISAL_INVALID_LOOKBACK => "invalid deflate back-reference distance",
            sys::ISAL_INVALID_WRAPPER => "invalid gzip header (not gzip data)",
            sys::ISAL_UNSUPPORTED_METHOD => "gzip header names an unsupported compression method",
            sys::ISAL_INCORRECT_CHECKSUM => "gzip member's CRC-32 or length (ISIZE) does not match its data",
            _ => "gzip decoding failed",
        };
        io::Error::new(io::ErrorKind::InvalidData, format!("{what} (ISA-L inflate error {rc})"))
    }

    impl<R: BufRead> Read for MultiGzDecoder<R> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if out.is_empty() {
                return Ok(0);
            }
            let out_len = out.len().min(u32::MAX as usize);
            loop {
                if self.member_finished() {
                    // Another member, or the end of the stream.
                    if self.input.fill_buf()?.is_empty() {
                        return Ok(0);
                    }
                    // SAFETY: the state was set up by `isal_inflate_init`.
                    unsafe { sys::isal_inflate_reset(&mut *self.state) };
                    self.state.crc_flag = sys::ISAL_GZIP;
                }
                let input = self.input.fill_buf()?;
                let at_end = input.is_empty();
                let in_len = input.len().min(u32::MAX as usize);
                let state = &mut *self.state;
                // isal_inflate only reads through next_in (the C API is not const-correct).
                state.next_in = input.as_ptr().cast_mut();
                state.avail_in = in_len as u32;
                state.next_out = out.as_mut_ptr();
                state.avail_out = out_len as u32;
                // SAFETY: next_in/avail_in describe `input` and next_out/avail_out `out`, both
                // borrowed for this call; isal_inflate reads and writes only within them and
                // its own state (what it must keep of the input, it copies there).
                let rc = unsafe { sys::isal_inflate(state) };
                let consumed = in_len - state.avail_in as usize;
                let produced = out_len - state.avail_out as usize;
                state.next_in = std::ptr::null_mut();
                state.avail_in = 0;
                state.next_out = std::ptr::null_mut();
                state.avail_out = 0;
                self.input.consume(consumed);
                if rc < 0 {
                    return Err(error(rc));
                }
                if produced > 0 {
                    return Ok(produced);
                }
                if self.member_finished() {
                    continue;
                }
                if at_end {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the gzip stream ends inside a member (truncated)",
                    ));
                }
                // Only headers were read: go on with more input.
            }
        }
    }
}

/// Reads `input` to its end through [`decoder`], for tests.
#[cfg(test)]
fn decode_all(input: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    decoder(input).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::{self, Write};

    use super::*;

    fn gzip(data: &[u8], level: u32) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    /// Data that compresses in every way deflate can: literals, long matches, stored blocks.
    fn sample(len: usize) -> Vec<u8> {
        let mut x: u32 = 12345;
        (0..len)
            .map(|i| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if (i / 4096) % 3 == 0 {
                    (x >> 16) as u8
                } else {
                    b"layer data "[i % 11]
                }
            })
            .collect()
    }

    #[test]
    fn one_member_at_every_level() {
        let data = sample(1 << 20);
        for level in [0, 1, 6, 9] {
            assert_eq!(decode_all(&gzip(&data, level)).unwrap(), data, "level {level}");
        }
    }

    #[test]
    fn empty_member_and_empty_stream() {
        assert_eq!(decode_all(&gzip(b"", 6)).unwrap(), b"");
        // No member at all is not a gzip stream (as for gzip(1), Go's gzip.Reader and flate2).
        assert_eq!(decode_all(b"").unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn members_concatenate() {
        let (a, b) = (sample(300_000), sample(70_000));
        let mut blob = gzip(&a, 1);
        blob.extend(gzip(b"", 6));
        blob.extend(gzip(&b, 9));
        let mut want = a.clone();
        want.extend(&b);
        assert_eq!(decode_all(&blob).unwrap(), want);
        // Also when the input arrives a byte at a time (member boundaries inside a read).
        let mut out = Vec::new();
        decoder(io::BufReader::with_capacity(1, blob.as_slice())).read_to_end(&mut out).unwrap();
        assert_eq!(out, want);
    }

    #[test]
    fn header_fields_are_skipped() {
        let data = sample(10_000);
        let mut gz = flate2::GzBuilder::new()
            .filename("layer.tar")
            .comment("a comment")
            .extra(vec![1, 2, 3, 4])
            .mtime(1_700_000_000)
            .write(Vec::new(), flate2::Compression::default());
        gz.write_all(&data).unwrap();
        assert_eq!(decode_all(&gz.finish().unwrap()).unwrap(), data);
    }

    fn rejected(blob: &[u8]) -> io::Error {
        decode_all(blob).expect_err("accepted a bad gzip stream")
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let blob = gzip(&sample(200_000), 6);
        for cut in [1, 5, 10, 11, blob.len() / 2, blob.len() - 8, blob.len() - 1] {
            let e = rejected(&blob[..cut]);
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}: {e}");
        }
    }

    #[test]
    fn bad_crc_and_isize_are_errors() {
        let blob = gzip(&sample(50_000), 6);
        let n = blob.len();
        for at in [n - 8, n - 5, n - 4, n - 1] {
            let mut bad = blob.clone();
            bad[at] ^= 0x40;
            let e = rejected(&bad);
            // A data error (flate2 says InvalidInput, ISA-L InvalidData), not a truncation.
            assert_ne!(e.kind(), io::ErrorKind::UnexpectedEof, "byte {at}: {e}");
            #[cfg(feature = "isal")]
            assert!(e.to_string().contains("CRC-32"), "{e}");
        }
    }

    #[test]
    fn trailing_garbage_is_an_error() {
        let data = sample(20_000);
        for tail in [&b"garbage!"[..], &[0u8; 16][..], &[0x1f][..]] {
            let mut blob = gzip(&data, 6);
            blob.extend_from_slice(tail);
            assert!(decode_all(&blob).is_err(), "tail {tail:?}");
        }
    }

    #[test]
    fn not_gzip_and_corrupt_data_are_errors() {
        assert_ne!(rejected(b"plain tar bytes, not gzip at all").kind(), io::ErrorKind::UnexpectedEof);
        let mut blob = gzip(&sample(100_000), 6);
        for b in &mut blob[20..60] {
            *b = !*b;
        }
        assert!(decode_all(&blob).is_err());
    }
}
