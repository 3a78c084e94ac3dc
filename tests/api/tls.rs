//! Transport security and configuration: TLS with certificates made here
//! (rcgen), mutual TLS, a certificate replaced while serving, the refusal to
//! serve plaintext beyond loopback, the configuration file, and the CLI
//! against a TLS server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pipelined::proto::v1 as pb;
use pipelined::transport::tls::TlsConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::helpers::*;
use crate::process::{SERVING, listen_address};

/// A certificate authority made for one test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses) and its key, PEM.
    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    fn server(&self) -> (String, String) {
        self.issue(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self, name: &str) -> (String, String) {
        self.issue(&[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn client_identity(&self, name: &str) -> Identity {
        let (cert, key) = self.client(name);
        Identity::from_pem(cert, key)
    }

    /// A client configuration that trusts this CA and nothing else.
    fn trusted_by_client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.pem))
    }
}

/// The server's certificate and key files, and CA files for clients.
struct Files {
    dir: TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: TempDir::new().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn path_str(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// Writes a server certificate from `ca` to `server.crt`/`server.key`.
    fn write_server_cert(&self, ca: &Ca) {
        let (cert, key) = ca.server();
        self.write("server.crt", &cert);
        self.write("server.key", &key);
    }

    fn tls(&self, client_ca: Option<PathBuf>) -> TlsConfig {
        TlsConfig {
            cert: self.path("server.crt"),
            key: self.path("server.key"),
            client_ca,
        }
    }
}

/// Lists the pipelines' names over a new TLS connection made with
/// `client_tls`; the error if the connection or the call fails.
async fn list_with(app: &TestApp, client_tls: ClientTlsConfig) -> Result<Vec<String>, String> {
    tokio::time::timeout(PATIENCE, async {
        let channel = tls_channel(app.addr, client_tls)
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        list(channel).await
    })
    .await
    .expect("the call ends in time")
}

async fn list(channel: Channel) -> Result<Vec<String>, String> {
    list_pipelines(Client::new(channel)).await
}

async fn list_pipelines(mut client: Client) -> Result<Vec<String>, String> {
    let pipelines = client
        .list_pipelines(pb::ListPipelinesRequest {
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .map_err(|status| format!("call: {status:?}"))?
        .into_inner()
        .pipelines;
    Ok(pipelines.into_iter().map(|p| p.name).collect())
}

const HELLO: &str = "name: hello\nsteps:\n- {name: greet, set: {values: {greeting: hi}}}\n";

#[tokio::test]
async fn a_client_trusting_the_ca_calls_over_tls_and_plaintext_or_untrusting_clients_fail() {
    let ca = Ca::new("test CA");
    let files = Files::new();
    files.write_server_cert(&ca);
    let app = spawn_tls_app(files.tls(None), ca.trusted_by_client()).await;

    // A client that connects and never says a word holds up no one else's
    // handshake.
    let _silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();

    // The helper's client speaks TLS, trusting the CA.
    app.create(HELLO).await;
    let execution = app.run("hello", serde_json::json!({})).await;
    let finished = app.finish(&execution.id).await;
    assert_eq!(status(&finished), pb::ExecutionStatus::Succeeded);
    assert_eq!(
        list_with(&app, ca.trusted_by_client()).await.unwrap(),
        ["hello"]
    );

    // Plaintext gRPC to the TLS port gets nothing.
    let plaintext = tokio::time::timeout(PATIENCE, async {
        let channel = Channel::from_shared(format!("http://{}", app.addr))
            .unwrap()
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        list(channel).await
    })
    .await
    .expect("the plaintext attempt ends in time");
    assert!(plaintext.is_err(), "plaintext got an answer: {plaintext:?}");

    // A client that trusts another CA refuses the server; failed handshakes
    // stop nothing (the calls below are made after them).
    let stranger = Ca::new("another CA");
    let refused = list_with(&app, stranger.trusted_by_client()).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("UnknownIssuer")),
        "{refused:?}"
    );

    // gRPC-Web over HTTP/1.1 (as browsers speak it) works over TLS too: the
    // server offers both h2 and http/1.1.
    let web = reqwest::Client::builder()
        .http1_only()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let response = web
        .post(format!(
            "{}/pipeline.v1.PipelineService/ListPipelines",
            app.endpoint()
        ))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await
        .expect("a gRPC-Web call over TLS");
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let body = response.bytes().await.unwrap();
    let body = String::from_utf8_lossy(&body).replace(' ', "");
    assert!(body.contains("grpc-status:0"), "{body:?}");
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let other_ca = Ca::new("some other CA");
    let files = Files::new();
    files.write_server_cert(&server_ca);
    let client_ca_file = files.write("clients.pem", &client_ca.pem);
    let app = spawn_tls_app(
        files.tls(Some(client_ca_file)),
        server_ca
            .trusted_by_client()
            .identity(client_ca.client_identity("alice")),
    )
    .await;
    app.create(HELLO).await;

    let without_certificate = list_with(&app, server_ca.trusted_by_client()).await;
    assert!(
        without_certificate
            .as_ref()
            .is_err_and(|e| e.contains("CertificateRequired")),
        "a client without a certificate got in: {without_certificate:?}"
    );
    let wrongly_signed = list_with(
        &app,
        server_ca
            .trusted_by_client()
            .identity(other_ca.client_identity("mallory")),
    )
    .await;
    assert!(
        wrongly_signed
            .as_ref()
            .is_err_and(|e| e.contains("UnknownCA")),
        "a certificate from another CA got in: {wrongly_signed:?}"
    );
    let signed = list_with(
        &app,
        server_ca
            .trusted_by_client()
            .identity(client_ca.client_identity("bob")),
    )
    .await;
    assert_eq!(signed.unwrap(), ["hello"]);
}

#[tokio::test]
async fn new_connections_get_a_replaced_certificate_without_a_restart() {
    let first = Ca::new("first CA");
    let files = Files::new();
    files.write_server_cert(&first);
    let app = spawn_tls_app(files.tls(None), first.trusted_by_client()).await;
    app.create(HELLO).await;

    // The certificate is renewed by another CA, files overwritten in place.
    let second = Ca::new("second CA");
    files.write_server_cert(&second);

    // The server looks at the files at most once a second: new connections
    // trusting only the second CA get in once it has.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match list_with(&app, second.trusted_by_client()).await {
            Ok(names) => {
                assert_eq!(names, ["hello"]);
                break;
            }
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the new certificate was never served: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let old = list_with(&app, first.trusted_by_client()).await;
    assert!(
        old.as_ref().is_err_and(|e| e.contains("UnknownIssuer")),
        "the old certificate is still served: {old:?}"
    );
    // The connection opened before the change goes on.
    let names = list_pipelines(app.client.clone()).await;
    assert_eq!(names.unwrap(), ["hello"]);
}

// ----- the real binary -----

/// `pipelined` with no `PIPELINED_*` variable from the test's environment,
/// its output appended to `log`.
fn binary(log: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pipelined"));
    for (name, _) in std::env::vars() {
        if name.starts_with("PIPELINED_") {
            command.env_remove(name);
        }
    }
    let output = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    command
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(output.try_clone().unwrap())
        .stderr(output)
        .kill_on_drop(true);
    command
}

/// A `pipelined serve` process started by a test.
struct Served {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Served {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts `command` and waits until it logs the address it serves on; the
/// log if it exits first.
async fn serving(mut command: Command, log: &Path) -> Served {
    let mut child = command.spawn().expect("start pipelined");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let output = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(addr) = output
            .lines()
            .filter(|line| line.contains(SERVING))
            .find_map(listen_address)
        {
            return Served {
                child,
                addr,
                log: log.to_path_buf(),
            };
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("pipelined exited with {status} before serving:\n{output}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pipelined did not serve in time:\n{output}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `pipelined serve` with a fresh data directory in `dir` and `args`.
async fn serve_command(dir: &Path, log: &Path, args: &[&str]) -> Command {
    let mut command = binary(log);
    command.arg("serve").arg("--data-dir").arg(dir.join("data"));
    if let Some(url) = test_database(dir).await {
        command.args(["--database-url", &url]);
    }
    command.args(args);
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the CLI with `args` and `envs` (no other `PIPELINED_*` variables).
async fn cli(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pipelined"));
    for (name, _) in std::env::vars() {
        if name.starts_with("PIPELINED_") {
            command.env_remove(name);
        }
    }
    tokio::time::timeout(
        PATIENCE,
        command.args(args).envs(envs.iter().copied()).output(),
    )
    .await
    .expect("the CLI ends in time")
    .expect("run the CLI")
}

#[tokio::test]
async fn plaintext_beyond_loopback_is_refused_unless_allowed_or_tls() {
    let dir = TempDir::new().unwrap();
    let log = dir.path().join("refused.log");
    let mut refused = serve_command(dir.path(), &log, &["--listen", "0.0.0.0:0"]).await;
    let status = tokio::time::timeout(PATIENCE, refused.status())
        .await
        .expect("exits in time")
        .unwrap();
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("refusing to serve plaintext gRPC on 0.0.0.0:0"),
        "{output}"
    );
    assert!(output.contains("--tls-cert"), "{output}");
    assert!(output.contains("--insecure-plaintext"), "{output}");
    assert!(!output.contains(SERVING), "{output}");

    // Allowed: it serves plaintext on every address, loopback included.
    let log = dir.path().join("allowed.log");
    let allowed = serve_command(
        dir.path(),
        &log,
        &["--listen", "0.0.0.0:0", "--insecure-plaintext"],
    )
    .await;
    let server = serving(allowed, &log).await;
    assert!(server.addr.ip().is_unspecified(), "{}", server.addr);
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", server.addr.port()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(list(channel).await.unwrap(), Vec::<String>::new());
    drop(server);

    // The same through the environment.
    let log = dir.path().join("allowed-env.log");
    let mut allowed = serve_command(dir.path(), &log, &["--listen", "0.0.0.0:0"]).await;
    allowed.env("PIPELINED_INSECURE_PLAINTEXT", "true");
    let server = serving(allowed, &log).await;
    assert!(server.addr.ip().is_unspecified(), "{}", server.addr);
}

#[tokio::test]
async fn the_cli_talks_to_a_mutual_tls_server_and_sighup_reloads_the_certificate() {
    let first = Ca::new("first CA");
    let client_ca = Ca::new("client CA");
    let files = Files::new();
    files.write_server_cert(&first);
    files.write("first-ca.pem", &first.pem);
    files.write("clients.pem", &client_ca.pem);
    let (cert, key) = client_ca.client("cli");
    files.write("cli.crt", &cert);
    files.write("cli.key", &key);
    let pipeline = files.write("hello.yaml", HELLO);

    // TLS satisfies the bind policy on a non-loopback address.
    let log = files.path("server.log");
    let command = serve_command(
        files.dir.path(),
        &log,
        &[
            "--listen",
            "0.0.0.0:0",
            "--tls-cert",
            &files.path_str("server.crt"),
            "--tls-key",
            &files.path_str("server.key"),
            "--tls-client-ca",
            &files.path_str("clients.pem"),
        ],
    )
    .await;
    let server = serving(command, &log).await;
    let url = format!("https://localhost:{}", server.addr.port());
    let client_files = [
        ("PIPELINED_CLIENT_CERT", files.path_str("cli.crt")),
        ("PIPELINED_CLIENT_KEY", files.path_str("cli.key")),
    ];
    let client_env: Vec<(&str, &str)> = client_files
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let first_ca = files.path_str("first-ca.pem");

    let applied = cli(
        &[
            "apply",
            "-f",
            pipeline.to_str().unwrap(),
            "--server",
            &url,
            "--ca-cert",
            &first_ca,
        ],
        &client_env,
    )
    .await;
    assert!(applied.status.success(), "{}", text(&applied.stderr));
    let run = cli(
        &[
            "run",
            "hello",
            "--watch",
            "-o",
            "json",
            "--server",
            &url,
            "--ca-cert",
            &first_ca,
        ],
        &client_env,
    )
    .await;
    assert!(run.status.success(), "{}", text(&run.stderr));
    let id = text(&run.stdout)
        .lines()
        .find_map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|event| event["execution_id"].as_str().map(str::to_string))
        })
        .expect("events name the execution");
    let got = cli(
        &["get", &id, "--server", &url, "--ca-cert", &first_ca],
        &client_env,
    )
    .await;
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert!(
        text(&got.stdout).contains("succeeded"),
        "{}",
        text(&got.stdout)
    );

    // Without the CA the server is not trusted; without a client
    // certificate the server refuses.
    let untrusted = cli(&["pipelines", "--server", &url], &client_env).await;
    assert!(!untrusted.status.success());
    assert!(
        text(&untrusted.stderr).contains("trusting the public web CAs only; --ca-cert FILE"),
        "{}",
        text(&untrusted.stderr)
    );
    let anonymous = cli(
        &["pipelines", "--server", &url, "--ca-cert", &first_ca],
        &[],
    )
    .await;
    assert!(!anonymous.status.success(), "{}", text(&anonymous.stdout));
    // TLS options with a plaintext address are a mistake, said so.
    let mixed = cli(
        &[
            "pipelines",
            "--server",
            "http://127.0.0.1:1",
            "--ca-cert",
            &first_ca,
        ],
        &[],
    )
    .await;
    assert!(
        text(&mixed.stderr).contains("give the server as https://127.0.0.1:1"),
        "{}",
        text(&mixed.stderr)
    );

    // A renewed certificate, then SIGHUP: no handshake happens in between,
    // so the reload is SIGHUP's doing.
    let second = Ca::new("second CA");
    files.write_server_cert(&second);
    files.write("second-ca.pem", &second.pem);
    kill(
        Pid::from_raw(server.child.id().unwrap() as i32),
        Signal::SIGHUP,
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !server.log().contains("TLS certificate reloaded") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reload after SIGHUP:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = cli(
        &[
            "pipelines",
            "--server",
            &url,
            "--ca-cert",
            &files.path_str("second-ca.pem"),
        ],
        &client_env,
    )
    .await;
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    assert!(
        text(&listed.stdout).contains("hello"),
        "{}",
        text(&listed.stdout)
    );
}

#[tokio::test]
async fn the_configuration_file_is_overridden_by_the_environment_and_flags() {
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("pipelined.toml");
    std::fs::write(
        &config,
        "# where to listen\nlisten = \"127.0.0.2:0\"\nallow-command = [\"sh\"]\nshutdown-grace = \"1s\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let ip_of = async |name: &str, args: &[&str], envs: &[(&str, &str)]| {
        let log = dir.path().join(format!("{name}.log"));
        let mut command = serve_command(dir.path(), &log, args).await;
        command.envs(envs.iter().copied());
        serving(command, &log).await.addr.ip().to_string()
    };
    // The file's value beats the default.
    assert_eq!(ip_of("file", &["--config", config], &[]).await, "127.0.0.2");
    // The file named by the environment.
    assert_eq!(
        ip_of("file-env", &[], &[("PIPELINED_CONFIG", config)]).await,
        "127.0.0.2"
    );
    // The environment beats the file.
    assert_eq!(
        ip_of(
            "env",
            &["--config", config],
            &[("PIPELINED_LISTEN", "127.0.0.3:0")]
        )
        .await,
        "127.0.0.3"
    );
    // A flag beats both.
    assert_eq!(
        ip_of(
            "flag",
            &["--config", config, "--listen", "127.0.0.4:0"],
            &[("PIPELINED_LISTEN", "127.0.0.3:0")]
        )
        .await,
        "127.0.0.4"
    );

    // An unknown key stops the server, naming the key and the file.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:0\"\nlisten-address = \"::1\"\n").unwrap();
    let log = dir.path().join("bad.log");
    let mut command = serve_command(dir.path(), &log, &["--config", bad.to_str().unwrap()]).await;
    let status = tokio::time::timeout(PATIENCE, command.status())
        .await
        .expect("exits in time")
        .unwrap();
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{output}");
    assert!(output.contains("unknown key 'listen-address'"), "{output}");
    assert!(output.contains(bad.to_str().unwrap()), "{output}");
}
