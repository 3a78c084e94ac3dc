//! The command line client, run as a real process against a real server.

use std::process::Output;

use serde_json::Value;

use crate::helpers::*;

async fn pipelined(app: &TestApp, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_pipelined"))
        .args(args)
        .env("PIPELINED_SERVER", app.endpoint())
        .output()
        .await
        .expect("run the CLI")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn apply_run_watch_get_list_cancel_retry_from_the_terminal() {
    let app = spawn_app().await;
    let file = app.path("hello.yaml");
    std::fs::write(
        &file,
        "name: hello\nsteps:\n- {name: greet, set: {values: {greeting: hi}}}\n- {name: nap, needs: [greet], sleep: {duration: 50ms}}\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();

    let applied = pipelined(&app, &["apply", "-f", file]).await;
    assert!(applied.status.success(), "{}", stderr(&applied));
    assert_eq!(
        stdout(&applied).trim(),
        "pipeline hello created (version 1)"
    );
    let again = pipelined(&app, &["apply", "-f", file]).await;
    assert_eq!(
        stdout(&again).trim(),
        "pipeline hello unchanged (version 1)"
    );

    let run = pipelined(
        &app,
        &["run", "hello", "--input", r#"{"who":"you"}"#, "--watch"],
    )
    .await;
    assert!(run.status.success(), "{}{}", stdout(&run), stderr(&run));
    let text = stdout(&run);
    assert!(text.contains("execution_succeeded"), "{text}");
    assert!(
        text.contains(r#"execution_data: {"greeting":"hi","who":"you"}"#),
        "{text}"
    );
    let id = text
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();

    let get = pipelined(&app, &["get", &id, "--output", "json"]).await;
    let execution: Value = serde_json::from_slice(&get.stdout).expect("get --output json is JSON");
    assert_eq!(execution["status"], "succeeded");
    assert_eq!(execution["execution_data"]["greeting"], "hi");
    assert_eq!(execution["steps"][1]["name"], "nap");

    let list = pipelined(&app, &["list", "--status", "succeeded"]).await;
    assert!(stdout(&list).contains(&id), "{}", stdout(&list));

    let watch = pipelined(&app, &["watch", &id, "--after", "4", "-o", "json"]).await;
    let sequences: Vec<i64> = stdout(&watch)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["sequence"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(sequences, [5, 6]);

    let refused = pipelined(&app, &["retry", &id]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("FailedPrecondition"),
        "{}",
        stderr(&refused)
    );

    let failing = pipelined(&app, &["run", "nope"]).await;
    assert!(
        stderr(&failing).contains("NotFound"),
        "{}",
        stderr(&failing)
    );
}

#[tokio::test]
async fn a_bad_file_is_reported_with_its_field() {
    let app = spawn_app().await;
    let file = app.path("bad.yaml");
    std::fs::write(
        &file,
        "name: bad\nsteps:\n- {name: a, needs: [b], noop: {}}\n- {name: b, needs: [a], noop: {}}\n",
    )
    .unwrap();
    let output = pipelined(&app, &["apply", "-f", file.to_str().unwrap()]).await;
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("InvalidArgument"), "{err}");
    assert!(
        err.contains("pipeline.steps[0].needs: dependency cycle: a -> b -> a"),
        "{err}"
    );

    std::fs::write(&file, "name: bad\nsteps:\n- {name: a, teleport: {}}\n").unwrap();
    let output = pipelined(&app, &["apply", "-f", file.to_str().unwrap()]).await;
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("unknown field `teleport`"),
        "{}",
        stderr(&output)
    );
}
