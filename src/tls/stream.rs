//! The client stream over TLS: rustls's `ServerConnection` over monoio's `TcpStream`, with the
//! operations the connection loop needs (`http::server::Connection`): owned-buffer reads and
//! writes, a cancellable read, and a wait for readability that holds no buffer.
//!
//! Written here rather than taken from monoio-rustls, which has neither a cancellable read nor
//! a buffer-less readiness wait. The rules this adapter keeps:
//!
//! - Ciphertext is never dropped. Apart from [`TlsStream::cancelable_read`], the socket is read
//!   with non-blocking `recv` calls after a readiness wait (readiness holds no data, so a
//!   future dropped anywhere loses nothing). The cancellable read posts a real read into the
//!   adapter's own buffer; whatever it returns, also when it raced the cancel, is kept and fed
//!   to rustls.
//! - "Readable" means plaintext (or the end of the stream) is there: a partial record or a
//!   post-handshake message (a key update, a ticket) is processed and waited past, so the read
//!   that follows a wait never blocks. Plaintext already buffered is ready at once.
//! - What rustls has to send (alerts, key-update answers, session tickets) goes out before the
//!   adapter waits for the peer.

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut, RawBuf, SliceMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, CancelHandle, CancelableAsyncReadRent};
use monoio::net::TcpStream;
use rustls::ServerConnection;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

/// Ciphertext a cancellable read asks for (as much as a request head read on plain TCP).
const CIPHERTEXT_READ: usize = 4096;

/// A server-side TLS connection on a worker.
pub struct TlsStream {
    tcp: TcpStream,
    tls: ServerConnection,
    /// Ciphertext read from the socket but not yet taken by rustls, from `taken` on.
    pending: Vec<u8>,
    taken: usize,
    /// The socket has reached end of stream (told to rustls).
    eof: bool,
}

/// Non-blocking reads and writes on the socket itself, for rustls's `read_tls`/`write_tls`.
struct Socket(RawFd);

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a valid, writable slice of `buf.len()` bytes for the whole call.
        #[allow(unsafe_code)]
        let n = unsafe {
            libc::recv(
                self.0,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a valid, readable slice of `buf.len()` bytes for the whole call.
        #[allow(unsafe_code)]
        let n = unsafe {
            libc::send(
                self.0,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Whether `e` means "try again once the socket is ready".
fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl TlsStream {
    /// Runs the server handshake on `tcp`. The caller bounds it in time (a client that stalls
    /// mid-handshake is a slowloris like any other); the worker is never blocked meanwhile.
    pub async fn accept(
        tcp: TcpStream,
        config: std::sync::Arc<rustls::ServerConfig>,
    ) -> io::Result<TlsStream> {
        let tls = ServerConnection::new(config).map_err(tls_error)?;
        let mut stream = TlsStream {
            tcp,
            tls,
            pending: Vec::new(),
            taken: 0,
            eof: false,
        };
        while stream.tls.is_handshaking() {
            stream.flush_tls().await?;
            if !stream.tls.is_handshaking() {
                break;
            }
            if stream.eof {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            stream.read_ciphertext().await?;
            stream.process()?;
        }
        // The server's last flight (and TLS 1.3 tickets) go out now, not with the first reply.
        stream.flush_tls().await?;
        Ok(stream)
    }

    /// The verified client certificate chain (end entity first), when the client presented
    /// one.
    pub fn client_chain(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.tls.peer_certificates().filter(|c| !c.is_empty())
    }

    /// The negotiated ALPN protocol, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.tls.alpn_protocol()
    }

    fn fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }

    /// Processes what rustls holds, handing it the ciphertext it has not taken yet, until
    /// plaintext is ready or nothing is left to hand over. Stops feeding while plaintext waits to
    /// be read, so rustls's plaintext buffer never overflows. An error (a bad record, a failed
    /// handshake) sends its alert, best effort, and ends the stream.
    fn process(&mut self) -> io::Result<rustls::IoState> {
        loop {
            let state = match self.tls.process_new_packets() {
                Ok(state) => state,
                Err(e) => {
                    // The alert rustls queued for the peer, best effort: the stream ends here.
                    let mut socket = Socket(self.fd());
                    let _ = self.tls.write_tls(&mut socket);
                    return Err(tls_error(e));
                }
            };
            if state.plaintext_bytes_to_read() > 0 || self.taken == self.pending.len() {
                if self.taken == self.pending.len() && self.pending.capacity() > 0 {
                    // Drained: an idle connection holds no ciphertext buffer.
                    self.pending = Vec::new();
                    self.taken = 0;
                }
                return Ok(state);
            }
            let mut rest = &self.pending[self.taken..];
            match self.tls.read_tls(&mut rest)? {
                0 => return Ok(state),
                n => self.taken += n,
            }
        }
    }

    /// Reads more ciphertext without holding an operation in flight: non-blocking `recv`,
    /// waiting for readiness (which holds no data) when there is none. Dropped at any point,
    /// nothing is lost. Called only once rustls has taken everything in `pending`.
    async fn read_ciphertext(&mut self) -> io::Result<()> {
        loop {
            let mut socket = Socket(self.fd());
            match self.tls.read_tls(&mut socket) {
                Ok(0) => {
                    // rustls has noted the end of stream too (a close without close_notify).
                    self.eof = true;
                    return Ok(());
                }
                Ok(_) => return Ok(()),
                Err(e) if would_block(&e) => self.tcp.readable(false).await?,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends everything rustls has queued, waiting for the socket to take it.
    async fn flush_tls(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            let mut socket = Socket(self.fd());
            match self.tls.write_tls(&mut socket) {
                Ok(_) => {}
                Err(e) if would_block(&e) => self.tcp.writable(false).await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends what rustls has queued as far as the socket takes it now, without waiting.
    fn try_flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            let mut socket = Socket(self.fd());
            match self.tls.write_tls(&mut socket) {
                Ok(_) => {}
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Plaintext bytes ready to read, or `None` at the end of the stream (close_notify, or the
    /// socket closed).
    fn ready(&mut self) -> io::Result<Option<usize>> {
        let state = self.process()?;
        if state.plaintext_bytes_to_read() > 0 {
            return Ok(Some(state.plaintext_bytes_to_read()));
        }
        if state.peer_has_closed() || self.eof {
            return Ok(None);
        }
        Ok(Some(0))
    }

    /// Completes once plaintext, or the end of the stream, can be read without waiting.
    async fn wait_plaintext(&mut self) -> io::Result<()> {
        loop {
            match self.ready()? {
                Some(0) => {}
                _ => return Ok(()),
            }
            self.flush_tls().await?;
            self.read_ciphertext().await?;
        }
    }

    /// Copies buffered plaintext into `dst` (at most `ready` bytes, all initialised first);
    /// 0 at the end of the stream.
    fn take_plaintext(&mut self, dst: *mut u8, cap: usize) -> io::Result<usize> {
        let ready = match self.ready()? {
            None => return Ok(0),
            Some(n) => n.min(cap),
        };
        if ready == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // SAFETY: the caller's buffer has `cap` writable bytes at `dst`; the first `ready` of
        // them are initialised here before a slice is made of them.
        #[allow(unsafe_code)]
        let out = unsafe {
            std::ptr::write_bytes(dst, 0, ready);
            std::slice::from_raw_parts_mut(dst, ready)
        };
        match self.tls.reader().read(out) {
            Ok(n) => Ok(n),
            // The peer closed the socket without close_notify: for a server reading requests
            // with explicit framing, that is just the end of the connection.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            Err(e) => Err(e),
        }
    }

    async fn read_into(&mut self, dst: *mut u8, cap: usize) -> io::Result<usize> {
        if cap == 0 {
            return Ok(0);
        }
        loop {
            self.wait_plaintext().await?;
            match self.take_plaintext(dst, cap) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    /// Encrypts `src` (as much as rustls buffers at once) and sends it; the count taken.
    async fn write_from(&mut self, src: &[u8]) -> io::Result<usize> {
        if src.is_empty() {
            return Ok(0);
        }
        let n = self.tls.writer().write(src)?;
        self.flush_tls().await?;
        Ok(n)
    }

    /// The TCP socket under the session (`http::server::Connection::socket`).
    pub fn tcp_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.tcp)
    }

    /// Completes when plaintext (or the end of the stream) is ready to read: what
    /// `http::server::Connection::wait_readable` means for TLS. Holds no buffer while it waits
    /// for the socket, and loses nothing when dropped.
    pub async fn wait_readable(&mut self) -> io::Result<()> {
        self.wait_plaintext().await
    }
}

impl Drop for TlsStream {
    /// Closes the TLS session properly (close_notify), best effort and without waiting, so a
    /// client can tell the end of the connection from a truncation.
    fn drop(&mut self) {
        if !self.tls.is_handshaking() {
            self.tls.send_close_notify();
            let _ = self.try_flush();
        }
    }
}

impl AsyncReadRent for TlsStream {
    async fn read<T: IoBufMut>(&mut self, mut buf: T) -> monoio::BufResult<usize, T> {
        let (dst, cap) = (buf.write_ptr(), buf.bytes_total());
        let res = self.read_into(dst, cap).await;
        if let Ok(n) = res {
            // SAFETY: `n` bytes at the start of the buffer's writable part were written.
            #[allow(unsafe_code)]
            unsafe {
                buf.set_init(n)
            };
        }
        (res, buf)
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> monoio::BufResult<usize, T> {
        // SAFETY: the iovecs of `buf` stay valid while `buf` is held here.
        #[allow(unsafe_code)]
        let first = unsafe { RawBuf::new_from_iovec_mut(&mut buf) };
        let res = match first {
            Some(mut raw) => {
                let (dst, cap) = (raw.write_ptr(), raw.bytes_total());
                self.read_into(dst, cap).await
            }
            None => Ok(0),
        };
        if let Ok(n) = res {
            // SAFETY: `n` bytes of the first iovec were written.
            #[allow(unsafe_code)]
            unsafe {
                buf.set_init(n)
            };
        }
        (res, buf)
    }
}

impl CancelableAsyncReadRent for TlsStream {
    /// Plaintext already buffered is returned at once; otherwise one real read of ciphertext is
    /// posted (cancellable through `c`) into the adapter's own buffer, and whatever it brought
    /// is kept for rustls, also when the read was cancelled.
    async fn cancelable_read<T: IoBufMut>(
        &mut self,
        mut buf: T,
        c: CancelHandle,
    ) -> monoio::BufResult<usize, T> {
        let (dst, cap) = (buf.write_ptr(), buf.bytes_total());
        let res = loop {
            match self.take_plaintext(dst, cap) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => break other,
            }
            // Without waiting: only the read is cancellable, and a client that does not read
            // must not hold the idle wait past its cancel. What stays queued goes out with the
            // next write.
            if let Err(e) = self.try_flush() {
                break Err(e);
            }
            let mut cipher = std::mem::take(&mut self.pending);
            let at = cipher.len();
            cipher.reserve(CIPHERTEXT_READ);
            let end = cipher.capacity();
            let (got, slice) = self
                .tcp
                .cancelable_read(SliceMut::new(cipher, at, end), c.clone())
                .await;
            self.pending = slice.into_inner();
            match got {
                Ok(0) => {
                    self.eof = true;
                    // rustls learns of the end of stream too.
                    let _ = self.tls.read_tls(&mut io::empty());
                }
                Ok(_) => {}
                // Cancelled: bytes that raced the cancel are in `pending` already and are
                // processed below; plaintext they completed is returned rather than the error.
                Err(e) => match self.take_plaintext(dst, cap) {
                    Err(w) if w.kind() == io::ErrorKind::WouldBlock => break Err(e),
                    other => break other,
                },
            }
        };
        if let Ok(n) = res {
            // SAFETY: `n` bytes at the start of the buffer's writable part were written.
            #[allow(unsafe_code)]
            unsafe {
                buf.set_init(n)
            };
        }
        (res, buf)
    }

    async fn cancelable_readv<T: IoVecBufMut>(
        &mut self,
        buf: T,
        _c: CancelHandle,
    ) -> monoio::BufResult<usize, T> {
        // Nothing reads vectored and cancellable from a client connection; a plain read is
        // correct, only not cancellable.
        self.readv(buf).await
    }
}

impl AsyncWriteRent for TlsStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        // SAFETY: an `IoBuf` has `bytes_init` readable bytes at `read_ptr` while it is held.
        #[allow(unsafe_code)]
        let src = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let res = self.write_from(src).await;
        (res, buf)
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        // SAFETY: the iovecs of `buf` stay valid and readable while `buf` is held here.
        #[allow(unsafe_code)]
        let first = unsafe { RawBuf::new_from_iovec(&buf) };
        let res = match first {
            Some(raw) => {
                #[allow(unsafe_code)]
                let src = unsafe { std::slice::from_raw_parts(raw.read_ptr(), raw.bytes_init()) };
                self.write_from(src).await
            }
            None => Ok(0),
        };
        (res, buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.flush_tls().await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.tls.send_close_notify();
        self.flush_tls().await?;
        self.tcp.shutdown().await
    }
}
