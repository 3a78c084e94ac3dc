//! A database outage in the middle of a run, with a PostgreSQL server of
//! the test's own that it stops and starts again (the shared test server
//! cannot be stopped under the other tests). Runs in the PostgreSQL pass of
//! the test command (`PIPELINED_TEST_POSTGRES_URL` set); on SQLite there is
//! no server to stop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pipelined::proto::v1 as pb;
use serde_json::json;
use tempfile::TempDir;
use tokio_stream::StreamExt;

use crate::helpers::*;
use crate::process::ServerProcess;

/// A PostgreSQL cluster in a temporary directory, from the machine's
/// PostgreSQL binaries, run as the `postgres` user when the tests run as
/// root (initdb refuses root). Stopped and removed on drop.
struct PrivatePostgres {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL binaries under /usr/lib/postgresql")
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("an initdb");
        let dir = TempDir::new().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = Self { dir, bin, port };
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        cluster.up();
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn up(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-o",
                &options,
                "start",
            ],
        );
    }

    fn down(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program)
            .args(args)
            .output()
            .expect("run a PostgreSQL tool");
        assert!(
            output.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl PrivatePostgres {
    /// A PostgreSQL tool, run as `postgres` when we are root.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        let root = std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false);
        if root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}

fn gate_script(gate: &Path) -> String {
    format!(
        "while [ ! -e {} ]; do sleep 0.02; done; echo ''{{\"waited\": true}}''",
        gate.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restart_mid_run_loses_nothing_and_rpcs_say_unavailable_meanwhile() {
    if std::env::var(POSTGRES_ENV).is_err() {
        eprintln!("needs PostgreSQL: runs in the PostgreSQL pass of the test command");
        return;
    }
    let postgres = PrivatePostgres::start();
    let dir = TempDir::new().unwrap();
    let gate = dir.path().join("gate");
    let server = ServerProcess::start(
        &dir.path().join("data"),
        &["--database-url", &postgres.url()],
    )
    .await;
    let mut client = server.client();
    client
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline: Some(pipeline(&format!(
                "name: outage\nsteps:\n\
                 - {{name: before, set: {{values: {{before: true}}}}}}\n\
                 - {{name: held, needs: [before], command: {{program: sh, args: [-c, '{}']}}}}\n\
                 - {{name: after, needs: [held], set: {{values: {{after: true}}}}}}\n",
                gate_script(&gate)
            ))),
        })
        .await
        .unwrap();
    let execution = client
        .run_pipeline(pb::RunPipelineRequest {
            pipeline_name: "outage".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    let id = execution.id.clone();
    let get = |client: &mut Client| {
        let mut client = client.clone();
        let id = id.clone();
        async move {
            client
                .get_execution(pb::GetExecutionRequest { execution_id: id })
                .await
        }
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = get(&mut client)
            .await
            .unwrap()
            .into_inner()
            .execution
            .unwrap();
        if step_status(step(&now, "held")) == pb::StepStatus::Running {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "held never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    postgres.down();
    let refused = get(&mut client).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("database is unavailable"),
        "{refused:?}"
    );
    // The step finishes while the database is down; its end is recorded
    // once the database is back.
    std::fs::write(&gate, "").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    postgres.up();

    let mut stream = client
        .watch_execution(pb::WatchExecutionRequest {
            execution_id: id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.next().await {
            if let Some(event) = message.expect("watch").event {
                events.push(event);
            }
        }
    })
    .await
    .expect("the execution ends after the database is back");
    assert_gapless(&events, 1);
    assert_eq!(
        event_type(events.last().unwrap()),
        pb::EventType::ExecutionSucceeded
    );
    let done = get(&mut client)
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(
        step(&done, "held").attempt,
        1,
        "the step that finished during the outage is not run again"
    );
    assert_eq!(
        to_json(&done.execution_data),
        json!({"before": true, "waited": true, "after": true})
    );
}
