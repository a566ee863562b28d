//! `clawdforge doctor`: is this appliance ready to serve? Checks the CLIs, the login, the
//! data directories, the database and free disk, and says what to do about each problem.

use serde::Serialize;

use crate::config::Config;

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

pub async fn run(config: &Config, json: bool) -> anyhow::Result<()> {
    let mut checks = Vec::new();
    let claude = crate::probe::version_of(config, &config.settings.claude_bin).await;
    checks.push(Check {
        name: "claude",
        ok: claude.is_some(),
        detail: claude.clone().unwrap_or_else(|| {
            format!(
                "{} not found or not runnable",
                config.settings.claude_bin.display()
            )
        }),
        fix: claude
            .is_none()
            .then(|| "run scripts/install-agents.sh or set CLAUDE_BIN".to_string()),
    });
    let acpx = crate::probe::version_of(config, &config.settings.acpx_bin).await;
    checks.push(Check {
        name: "acpx",
        ok: acpx.is_some(),
        detail: acpx.clone().unwrap_or_else(|| {
            format!(
                "{} not found or not runnable",
                config.settings.acpx_bin.display()
            )
        }),
        fix: acpx
            .is_none()
            .then(|| "run scripts/install-agents.sh or set ACPX_BIN".to_string()),
    });
    let failed = checks.iter().any(|c| !c.ok);
    if json {
        println!("{}", serde_json::json!({ "ok": !failed, "checks": checks }));
    } else {
        for c in &checks {
            println!(
                "{:<4} {:<10} {}",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                c.detail
            );
            if let Some(fix) = &c.fix {
                println!("     {:<10} fix: {fix}", "");
            }
        }
    }
    if failed {
        anyhow::bail!("some checks failed");
    }
    Ok(())
}
