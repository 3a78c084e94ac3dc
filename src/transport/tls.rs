//! TLS for the server, with rustls (ring, the provider already in the tree):
//! a certificate that follows its files without a restart, optional client
//! certificates (mutual TLS), and an accept loop that hands tonic finished
//! TLS connections.
//!
//! The certificate and key are re-read when they change: a handshake checks
//! the files at most once a second (reading two small files), and SIGHUP
//! checks them at once. A change that does not load (a half-written file, a
//! key that does not match the certificate) keeps the certificate in use and
//! logs a warning; the next change is tried again. The client CA bundle is
//! read at start.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::Stream;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How often a handshake may look at the certificate files.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long a client may take over its handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server's TLS material lives (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to; `Some`
    /// requires every client to present one (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// A TLS acceptor for `config`, and its certificate to reload on SIGHUP.
/// Fails when a file is missing or unusable.
pub fn acceptor(config: &TlsConfig) -> anyhow::Result<(TlsAcceptor, Arc<ReloadingCert>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = Arc::new(ReloadingCert::load(
        config.cert.clone(),
        config.key.clone(),
        provider.clone(),
    )?);
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs(path)? {
                roots.add(ca).with_context(|| {
                    format!("{} holds a certificate that cannot be a CA", path.display())
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .with_context(|| format!("cannot verify clients with {}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_cert_resolver(cert.clone());
    // gRPC is HTTP/2; gRPC-Web from browsers may come over HTTP/1.1.
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(server)), cert))
}

/// TLS connections accepted on `listener`. Handshakes run concurrently, each
/// in its own task with a time limit, so a slow or silent client delays
/// nobody; one that fails is logged at debug level and dropped. Dropping the
/// stream closes the listener and abandons handshakes in progress.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> impl Stream<Item = io::Result<TlsStream<TcpStream>>> + Send + 'static {
    let handshakes: JoinSet<Option<TlsStream<TcpStream>>> = JoinSet::new();
    futures::stream::unfold(
        (listener, acceptor, handshakes),
        |(listener, acceptor, mut handshakes)| async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, peer)) => {
                            // Without TCP_NODELAY a call's trailers, written
                            // after its data, wait for the client's delayed
                            // ACK: 40 ms per call.
                            let _ = tcp.set_nodelay(true);
                            let acceptor = acceptor.clone();
                            handshakes.spawn(async move {
                                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                    Ok(Ok(tls)) => Some(tls),
                                    Ok(Err(error)) => {
                                        tracing::debug!(%peer, %error, "TLS handshake failed");
                                        None
                                    }
                                    Err(_) => {
                                        tracing::debug!(%peer, "TLS handshake timed out");
                                        None
                                    }
                                }
                            });
                        }
                        Err(error) => {
                            // Out of file descriptors, say: wait a little
                            // rather than spin.
                            tracing::warn!(%error, "cannot accept a connection");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                    Some(done) = handshakes.join_next() => {
                        if let Ok(Some(tls)) = done {
                            return Some((Ok(tls), (listener, acceptor, handshakes)));
                        }
                    }
                }
            }
        },
    )
}

/// The server certificate, re-read from its files when they change.
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<State>,
}

struct State {
    current: Arc<CertifiedKey>,
    /// The files' contents last looked at: those of `current`, or newer ones
    /// that did not load (not tried again until they change).
    seen: Files,
    /// Why the files could not be read last time, to warn once per reason.
    unreadable: Option<String>,
    checked: Instant,
}

#[derive(PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// What a look at the files found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Reloaded,
    /// The files changed but cannot be used; the old certificate stays.
    Failed(String),
}

impl ReloadingCert {
    /// Loads the certificate and key; an error names the file at fault.
    pub fn load(
        cert_path: PathBuf,
        key_path: PathBuf,
        provider: Arc<CryptoProvider>,
    ) -> anyhow::Result<Self> {
        let files = read_files(&cert_path, &key_path)?;
        let current = certified(&files, &cert_path, &key_path, &provider)?;
        Ok(Self {
            cert_path,
            key_path,
            provider,
            state: Mutex::new(State {
                current: Arc::new(current),
                seen: files,
                unreadable: None,
                checked: Instant::now(),
            }),
        })
    }

    /// Looks at the files now and loads them if they changed.
    pub fn reload(&self) -> Reload {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut state)
    }

    fn refresh(&self, state: &mut State) -> Reload {
        state.checked = Instant::now();
        let files = match read_files(&self.cert_path, &self.key_path) {
            Ok(files) => files,
            Err(error) => {
                let error = format!("{error:#}");
                if state.unreadable.as_ref() != Some(&error) {
                    tracing::warn!(%error, "cannot reload the TLS certificate; still serving the previous one");
                    state.unreadable = Some(error.clone());
                }
                return Reload::Failed(error);
            }
        };
        state.unreadable = None;
        if files == state.seen {
            return Reload::Unchanged;
        }
        let outcome = match certified(&files, &self.cert_path, &self.key_path, &self.provider) {
            Ok(key) => {
                state.current = Arc::new(key);
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                Reload::Reloaded
            }
            Err(error) => {
                let error = format!("{error:#}");
                tracing::warn!(%error, "cannot reload the TLS certificate; still serving the previous one");
                Reload::Failed(error)
            }
        };
        state.seen = files;
        outcome
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= CHECK_EVERY {
            self.refresh(&mut state);
        }
        Some(state.current.clone())
    }
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

fn read_files(cert: &Path, key: &Path) -> anyhow::Result<Files> {
    Ok(Files {
        cert: std::fs::read(cert)
            .with_context(|| format!("cannot read the TLS certificate {}", cert.display()))?,
        key: std::fs::read(key)
            .with_context(|| format!("cannot read the TLS key {}", key.display()))?,
    })
}

fn certified(
    files: &Files,
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> anyhow::Result<CertifiedKey> {
    let chain = parse_certs(&files.cert, cert_path)?;
    let key = PrivateKeyDer::from_pem_slice(&files.key)
        .with_context(|| format!("no usable PEM private key in {}", key_path.display()))?;
    CertifiedKey::from_der(chain, key, provider).with_context(|| {
        format!(
            "the key in {} does not go with the certificate in {}",
            key_path.display(),
            cert_path.display()
        )
    })
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read the client CA bundle {}", path.display()))?;
    parse_certs(&pem, path)
}

fn parse_certs(pem: &[u8], path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!("no PEM certificate in {}", path.display());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    /// A self-signed certificate for `name` and its key, PEM.
    fn certificate(name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn leaf(cert: &ReloadingCert) -> Vec<u8> {
        let state = cert.state.lock().unwrap();
        state.current.cert[0].to_vec()
    }

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_change_that_does_not_load_keeps_the_certificate_until_a_good_one_comes() {
        let dir = tempfile::TempDir::new().unwrap();
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (first, first_key) = certificate("first.example");
        std::fs::write(&cert_path, &first).unwrap();
        std::fs::write(&key_path, &first_key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = ReloadingCert::load(cert_path.clone(), key_path.clone(), provider).unwrap();
        assert_eq!(cert.reload(), Reload::Unchanged);

        // A new certificate whose key has not been written yet.
        let (second, second_key) = certificate("second.example");
        std::fs::write(&cert_path, &second).unwrap();
        let Reload::Failed(error) = cert.reload() else {
            panic!("a key that does not match loaded");
        };
        assert!(
            error.contains("does not go with the certificate"),
            "{error}"
        );
        assert_eq!(leaf(&cert), der(&first));
        // Not tried again until the files change.
        assert_eq!(cert.reload(), Reload::Unchanged);

        std::fs::write(&key_path, &second_key).unwrap();
        assert_eq!(cert.reload(), Reload::Reloaded);
        assert_eq!(leaf(&cert), der(&second));

        // A missing or garbled file keeps the certificate too.
        std::fs::remove_file(&key_path).unwrap();
        let Reload::Failed(error) = cert.reload() else {
            panic!("a missing key loaded");
        };
        assert!(error.contains("cannot read the TLS key"), "{error}");
        std::fs::write(&key_path, "not a key").unwrap();
        let Reload::Failed(error) = cert.reload() else {
            panic!("a garbled key loaded");
        };
        assert!(error.contains("no usable PEM private key"), "{error}");
        assert_eq!(leaf(&cert), der(&second));
    }

    #[test]
    fn unusable_files_are_refused_at_start_naming_the_file() {
        let dir = tempfile::TempDir::new().unwrap();
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (cert, key) = certificate("example");
        std::fs::write(&cert_path, "no certificate here").unwrap();
        std::fs::write(&key_path, &key).unwrap();
        let config = TlsConfig {
            cert: cert_path.clone(),
            key: key_path.clone(),
            client_ca: None,
        };
        let error = format!("{:#}", acceptor(&config).err().expect("refused"));
        assert!(error.contains("no PEM certificate in"), "{error}");
        assert!(error.contains("tls.crt"), "{error}");

        std::fs::write(&cert_path, &cert).unwrap();
        acceptor(&config).expect("good files");
        let config = TlsConfig {
            client_ca: Some(dir.path().join("missing-ca.pem")),
            ..config
        };
        let error = format!("{:#}", acceptor(&config).err().expect("refused"));
        assert!(
            error.contains("cannot read the client CA bundle"),
            "{error}"
        );
    }
}
