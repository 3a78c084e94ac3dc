/// mimalloc rather than glibc's malloc, whose locking and consolidation were
/// about a fifth of the server's CPU time under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Like `Cli::parse()`, plus `pipelined serve --config FILE`.
    pipelined::cli::main(pipelined::config::parse()).await
}
