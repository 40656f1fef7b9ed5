//! TLS for the `tls` scenario: one throw-away certificate per run, written where nginx and
//! mcp-guard read it, and the load generator's client side (rustls over a monoio socket, driven
//! by hand: the generator only ever writes a request and reads until its response is complete).

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The certificate both TLS-terminating targets serve, and the client configuration that
/// trusts it.
pub struct TlsMaterial {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub client: Arc<rustls::ClientConfig>,
}

impl TlsMaterial {
    /// A self-signed ECDSA P-256 certificate for 127.0.0.1 / localhost, written under `dir`.
    ///
    /// The client offers TLS 1.3 with AES-128-GCM only, so both targets run the same cipher
    /// (OpenSSL and rustls would otherwise each pick by their own preference order) and the
    /// comparison is of the proxies, not of two ciphers.
    pub fn generate(dir: &Path) -> Result<TlsMaterial, String> {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let certified = rcgen::generate_simple_self_signed(names)
            .map_err(|e| format!("cannot generate the TLS certificate: {e}"))?;
        let cert_path = dir.join("tls-cert.pem");
        let key_path = dir.join("tls-key.pem");
        std::fs::write(&cert_path, certified.cert.pem())
            .and_then(|()| std::fs::write(&key_path, certified.signing_key.serialize_pem()))
            .map_err(|e| format!("cannot write the TLS certificate: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(certified.cert.der().to_vec()))
            .map_err(|e| format!("cannot trust the generated certificate: {e}"))?;
        let mut provider = rustls::crypto::ring::default_provider();
        provider
            .cipher_suites
            .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("cannot configure TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsMaterial {
            cert_path,
            key_path,
            client: Arc::new(client),
        })
    }
}

/// A client TLS session over a load connection.
pub struct ClientTls {
    conn: rustls::ClientConnection,
    /// Ciphertext read from the socket and not yet given to rustls.
    incoming: Vec<u8>,
}

impl ClientTls {
    /// Runs the handshake on `stream`.
    pub async fn connect(
        stream: &mut TcpStream,
        config: &Arc<rustls::ClientConfig>,
    ) -> std::io::Result<ClientTls> {
        let name = ServerName::try_from("127.0.0.1").expect("an IP address is a server name");
        let conn = rustls::ClientConnection::new(config.clone(), name).map_err(other)?;
        let mut tls = ClientTls {
            conn,
            incoming: Vec::with_capacity(16 * 1024),
        };
        while tls.conn.is_handshaking() {
            tls.flush(stream).await?;
            if tls.conn.is_handshaking() && tls.conn.wants_read() {
                tls.receive(stream).await?;
            }
        }
        tls.flush(stream).await?;
        Ok(tls)
    }

    /// Encrypts `plain` and sends it.
    pub async fn write_all(&mut self, stream: &mut TcpStream, plain: &[u8]) -> std::io::Result<()> {
        self.conn.writer().write_all(plain)?;
        self.flush(stream).await
    }

    /// Appends the next decrypted bytes to `out`; `Ok(0)`: the peer closed.
    pub async fn read_more(
        &mut self,
        stream: &mut TcpStream,
        out: &mut Vec<u8>,
    ) -> std::io::Result<usize> {
        loop {
            let before = out.len();
            match self.conn.reader().read_to_end(out) {
                Ok(_) => return Ok(out.len() - before), // close_notify: the rest was read
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if out.len() > before {
                        return Ok(out.len() - before);
                    }
                }
                Err(e) => return Err(e),
            }
            if self.receive(stream).await? == 0 {
                return Ok(0);
            }
            // A key update or session ticket needs no answer from a TLS 1.3 client, but
            // whatever rustls queued (an alert) goes out now.
            self.flush(stream).await?;
        }
    }

    /// Reads ciphertext from the socket into rustls; the byte count (0: EOF).
    async fn receive(&mut self, stream: &mut TcpStream) -> std::io::Result<usize> {
        let mut buf = std::mem::take(&mut self.incoming);
        buf.clear();
        let capacity = buf.capacity();
        let (res, slice) = stream.read(buf.slice_mut(0..capacity)).await;
        let buf = slice.into_inner();
        let n = res?;
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            self.conn.read_tls(&mut pending)?;
            self.conn.process_new_packets().map_err(other)?;
        }
        self.incoming = buf;
        Ok(n)
    }

    /// Sends whatever rustls has queued.
    async fn flush(&mut self, stream: &mut TcpStream) -> std::io::Result<()> {
        if !self.conn.wants_write() {
            return Ok(());
        }
        let mut out = Vec::new();
        while self.conn.wants_write() {
            self.conn.write_tls(&mut out)?;
        }
        let (res, _) = stream.write_all(out).await;
        res.map(|_| ())
    }
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}
