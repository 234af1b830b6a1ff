//! `inference-pio`: run Hugging Face models through dynamically loaded plugins.

fn main() {
    // The discovery probe re-executes this binary; it must not go through clap or print
    // anything but its one JSON line.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 3 && args[1] == "__probe" {
        std::process::exit(inference_pio_host::discovery::probe_main(std::path::Path::new(&args[2])));
    }
    // Security levels `high`/`maximum`: the worker process speaks the socket protocol only.
    if args.len() == 2 && args[1] == "__worker" {
        std::process::exit(inference_pio_host::worker::worker_main());
    }
    // Log lines (a sandboxed plugin's labelled output among them) go to stderr as they are.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).without_time().with_target(false).with_level(false).with_env_filter(filter).init();
    if let Err(error) = inference_pio_host::cli::main() {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
