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
            let name = crate::http::admin::parse_name(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
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

/// A consistent copy of the live database through SQLite's online backup API, which copies
/// page by page and restarts if a writer changes pages underneath it.
pub fn backup(config: &Config, dest: &std::path::Path) -> anyhow::Result<()> {
    let src = rusqlite::Connection::open_with_flags(
        &config.db_path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .with_context(|| format!("cannot open {}", config.db_path.display()))?;
    src.busy_timeout(std::time::Duration::from_secs(5))?;
    if dest.exists() {
        anyhow::bail!(
            "{} already exists; refusing to overwrite it",
            dest.display()
        );
    }
    let mut dst = rusqlite::Connection::open(dest)
        .with_context(|| format!("cannot create {}", dest.display()))?;
    {
        let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
        backup.run_to_completion(256, std::time::Duration::from_millis(5), None)?;
    }
    let check: String = dst.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if check != "ok" {
        anyhow::bail!("the copy failed its integrity check: {check}");
    }
    println!(
        "backed up {} to {}",
        config.db_path.display(),
        dest.display()
    );
    Ok(())
}
