//! The `clawdforge` binary: parse settings, set up logging, dispatch the subcommand.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use clawdforge::config::{Cli, Command, Config, LogFormat};

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: `docker logs` and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers there is nothing to wait for; run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.settings.log_format);
    let config = Config::from_settings(cli.settings);
    let result = match cli.command {
        None | Some(Command::Serve) => serve(config),
        Some(Command::Tokens(cmd)) => clawdforge::cli::tokens(&config, cmd),
        Some(Command::Backup { path }) => clawdforge::cli::backup(&config, &path),
        Some(Command::Doctor { json }) => {
            tokio_runtime().and_then(|rt| rt.block_on(clawdforge::doctor::run(&config, json)))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clawdforge: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn serve(config: Config) -> anyhow::Result<()> {
    let rt = tokio_runtime()?;
    rt.block_on(async move {
        let addr = config.settings.listen;
        // Bind first so a taken port fails fast, but announce only once start-up
        // (reconciliation, first probe) is done and requests are really served.
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("CLAWDFORGE_LISTEN: cannot bind {addr}: {e}"))?;
        let addr = listener.local_addr().unwrap_or(addr);
        let data_dir = config.settings.data_dir.display().to_string();
        let app = clawdforge::App::start(config).await?;
        tracing::info!(%addr, %data_dir, "listening");
        app.serve(listener, shutdown_signal()).await
    })
}
