//! Small owned-buffer I/O helpers over monoio's rent traits.

use monoio::buf::SliceMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use std::io;

/// Reads into the spare capacity of `buf` (growing it by at least `min_spare`), appending.
/// Returns the byte count (0 = end of stream) and the buffer.
pub async fn read_append<S: AsyncReadRent>(
    stream: &mut S,
    mut buf: Vec<u8>,
    min_spare: usize,
) -> (io::Result<usize>, Vec<u8>) {
    if buf.capacity() - buf.len() < min_spare {
        buf.reserve(min_spare);
    }
    let len = buf.len();
    let cap = buf.capacity();
    let (res, slice) = stream.read(SliceMut::new(buf, len, cap)).await;
    (res, slice.into_inner())
}

/// Writes all of `buf`, handing it back cleared for reuse.
pub async fn write_all<S: AsyncWriteRent>(
    stream: &mut S,
    buf: Vec<u8>,
) -> (io::Result<()>, Vec<u8>) {
    let (res, mut buf) = stream.write_all(buf).await;
    buf.clear();
    (res.map(|_| ()), buf)
}
