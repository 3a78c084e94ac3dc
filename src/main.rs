#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Like `Cli::parse()`, plus `pipelined serve --config FILE`.
    pipelined::cli::main(pipelined::config::parse()).await
}
