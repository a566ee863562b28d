//! The subcommands that work on the data directory without a server: `tokens`, `backup`.

use std::io::Write;

use anyhow::Context;

use crate::auth::tokens::{self, Rotation};
use crate::config::{Config, TokensCommand};
use crate::governance::policy::Policy;
use crate::store;

pub fn tokens(config: &Config, cmd: TokensCommand) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.settings.data_dir)
        .with_context(|| format!("cannot create {}", config.settings.data_dir.display()))?;
    let mut conn = store::open_blocking(&config.db_path)
        .with_context(|| format!("cannot open {}", config.db_path.display()))?;
    let mut out = std::io::stdout().lock();
    match cmd {
        TokensCommand::Mint {
            name,
            cidrs,
            policy,
            json,
        } => {
            let name =
                crate::auth::tokens::parse_name(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut p = Policy::default();
            policy
                .into_patch(cidrs)
                .apply(&mut p)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (record, token) = tokens::mint(&mut conn, &name, &p, "cli")?;
            print_secret(&mut out, &record, token, json, "minted")?;
        }
        TokensCommand::Rotate { id, json } => match tokens::rotate(&mut conn, &id, "cli")? {
            Rotation::Rotated(record, token) => {
                print_secret(&mut out, &record, token, json, "rotated")?
            }
            Rotation::Revoked => anyhow::bail!("{id} is revoked; mint a new token instead"),
            Rotation::Missing => anyhow::bail!("no token with id {id}"),
        },
        TokensCommand::List { json } => {
            let list = tokens::list(&conn)?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&list)?)?;
            } else {
                writeln!(
                    out,
                    "{:<26} {:<24} {:<25} {:<25} {:<25} CIDRS",
                    "ID", "NAME", "CREATED", "LAST USED", "REVOKED"
                )?;
                for t in list {
                    writeln!(
                        out,
                        "{:<26} {:<24} {:<25} {:<25} {:<25} {}",
                        t.id,
                        t.name,
                        tokens::show_time(Some(t.created_at)),
                        tokens::show_time(t.last_used_at),
                        tokens::show_time(t.revoked_at),
                        t.policy.ip_cidrs.join(",")
                    )?;
                }
            }
        }
        TokensCommand::Revoke { id } => match tokens::revoke(&mut conn, &id, "cli")? {
            Some(_) => writeln!(out, "revoked {id}")?,
            None => anyhow::bail!("no token with id {id}"),
        },
    }
    Ok(())
}

/// Prints a new plaintext once: bare (details on stderr) or inside the record's JSON.
fn print_secret(
    out: &mut impl Write,
    record: &tokens::TokenRecord,
    token: String,
    json: bool,
    what: &str,
) -> anyhow::Result<()> {
    if json {
        let mut v = serde_json::to_value(record)?;
        v["token"] = serde_json::Value::String(token);
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "{token}")?;
        eprintln!(
            "{what} {} ({}); the token above is shown only once",
            record.id, record.name
        );
    }
    Ok(())
}

/// A consistent copy of the live database through SQLite's online backup API, safe while
/// the server writes.
///
/// The copy is taken in one backup step, i.e. inside one read transaction: under WAL the
/// server's writes go on meanwhile, and the copy is the database as of that transaction's
/// start. (Copying in small steps, the usual advice for rollback-journal databases, would
/// restart whenever the server writes between two steps, and never finish on a busy one.)
/// It is written to a temp file beside `dest` and renamed into place only once complete
/// and verified, so `dest` is either a whole, checked copy or absent; an existing `dest` is
/// never overwritten.
pub fn backup(config: &Config, dest: &std::path::Path) -> anyhow::Result<()> {
    if !config.db_path.exists() {
        anyhow::bail!(
            "{} does not exist: nothing to back up (is CLAWDFORGE_DATA_DIR right?)",
            config.db_path.display()
        );
    }
    if dest.exists() {
        anyhow::bail!(
            "{} already exists; refusing to overwrite it",
            dest.display()
        );
    }
    let src = rusqlite::Connection::open_with_flags(
        &config.db_path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .with_context(|| format!("cannot open {}", config.db_path.display()))?;
    src.busy_timeout(std::time::Duration::from_secs(5))?;

    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let partial = tempfile::Builder::new()
        .prefix(".clawdforge-backup-")
        .suffix(".partial")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    {
        let mut dst = rusqlite::Connection::open(partial.path())
            .with_context(|| format!("cannot open {}", partial.path().display()))?;
        copy_all(&src, &mut dst)?;
        // The copy inherits WAL mode from the live database; switch it back so the backup
        // is one self-contained file (the server turns WAL on again when it opens it).
        dst.pragma_update(None, "journal_mode", "DELETE")?;
        let check: String = dst.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if check != "ok" {
            anyhow::bail!("the copy failed its integrity check: {check}");
        }
    }
    partial.as_file().sync_all()?;
    partial
        .persist_noclobber(dest)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot move the copy to {}", dest.display()))?;
    println!(
        "backed up {} to {}",
        config.db_path.display(),
        dest.display()
    );
    Ok(())
}

/// Copies every page of `src` into `dst` in one step, retrying while a writer holds a lock
/// the read transaction has to wait for.
fn copy_all(src: &rusqlite::Connection, dst: &mut rusqlite::Connection) -> anyhow::Result<()> {
    use rusqlite::backup::{Backup, StepResult};
    let backup = Backup::new(src, dst)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match backup.step(-1)? {
            StepResult::Done => return Ok(()),
            StepResult::More | StepResult::Busy | StepResult::Locked
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            _ => anyhow::bail!("the database stayed locked for a minute; try again"),
        }
    }
}
