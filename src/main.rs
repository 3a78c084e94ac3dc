use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pipelined::cli::main(pipelined::cli::Cli::parse()).await
}
