//! The `wsbridge` binary: flags, config, logging, the open-files limit and metrics, then
//! [`wsbridge::run`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use wsbridge::config::{Config, LogFormat};

const USAGE: &str = "usage: wsbridge [--config PATH]
       wsbridge --check-config PATH

Runs one wsbridge replica. Without --config, config/wsbridge.toml is read when present,
else built-in defaults. Every key can be overridden by environment variables:
WSBRIDGE__SECTION__KEY=value (e.g. WSBRIDGE__REDIS__URL=redis://127.0.0.1:6379).

--check-config PATH validates PATH with the environment overrides, exactly as at start, and
exits: 0 with one line \"ok: ...\" when valid, 2 with the error naming the key otherwise. It
neither connects to Redis nor binds a port.";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    // `--check-config` wins over `--config` in any order: the image's entrypoint already
    // passes `--config`, and `docker run IMAGE --check-config FILE` must check FILE.
    let mut check = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => path = Some(PathBuf::from(p)),
                None => return usage_error("--config needs a path"),
            },
            "--check-config" => match args.next() {
                Some(p) => check = Some(PathBuf::from(p)),
                None => return usage_error("--check-config needs a path"),
            },
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--version" | "-V" => {
                println!("wsbridge {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            other => return usage_error(&format!("unknown argument `{other}`")),
        }
    }
    if check.is_some() {
        path = check.clone();
    }
    let config = match Config::load(path.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wsbridge: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(checked) = check {
        // `Config::load` is the whole of start-up's validation (auth key files included); what
        // remains at start is connecting and binding, which a check must not do.
        println!("ok: {} is a valid wsbridge config", checked.display());
        return ExitCode::SUCCESS;
    }
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.level.clone());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    wsbridge::heap::set_allocator(wsbridge::heap::Allocator {
        stats: glibc::stats,
        trim: glibc::trim,
    });
    // Before anything opens files or binds: every WebSocket connection is one open file.
    wsbridge::open_files::raise();
    let prometheus = match wsbridge::metrics::install() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("wsbridge: cannot install metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.server.worker_threads > 0 {
        runtime.worker_threads(config.server.worker_threads);
    }
    let runtime = runtime.enable_all().build().expect("tokio runtime");
    match runtime.block_on(wsbridge::run(config, prometheus, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsbridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("wsbridge: {message}\n{USAGE}");
    ExitCode::from(2)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// glibc's allocator: its figures (`mallinfo2`, glibc 2.33 and later, summed over its arenas)
/// and `malloc_trim`, for `wsbridge::heap`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    /// `struct mallinfo2` of malloc.h: ten `size_t` fields.
    #[repr(C)]
    #[allow(dead_code)]
    struct MallInfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }

    extern "C" {
        fn mallinfo2() -> MallInfo2;
        fn malloc_trim(pad: usize) -> i32;
    }

    pub fn stats() -> wsbridge::heap::Heap {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; it reads the
        // allocator's state under the allocator's own locks, so any thread may call it.
        let m = unsafe { mallinfo2() };
        wsbridge::heap::Heap {
            // Small and large (mmapped) allocations in use; the arenas plus the mmapped ones held.
            in_use: (m.uordblks + m.hblkhd) as u64,
            held: (m.arena + m.hblkhd) as u64,
        }
    }

    pub fn trim() {
        // SAFETY: malloc_trim takes a plain integer and works under the allocator's own locks;
        // it only releases pages no allocation uses.
        unsafe { malloc_trim(0) };
    }
}
