//! What every agent child process shares: an environment rebuilt from an allowlist, so the
//! admin bearer, callers' tokens and anything else the server was given never reach it.

use crate::config::Config;

/// Names passed through as they are.
const EXACT: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "TZ",
    "TMPDIR",
    "IS_SANDBOX",
    "USER",
    "LOGNAME",
];
/// Prefixes passed through (`LC_ALL`, `ANTHROPIC_BASE_URL`, `CLAUDE_CONFIG_DIR`, ...).
const PREFIXES: &[&str] = &["LC_", "ANTHROPIC_", "CLAUDE_", "DISABLE_", "NODE_"];

fn allowed(name: &str, extra: &[String]) -> bool {
    EXACT.contains(&name)
        || PREFIXES.iter().any(|p| name.starts_with(p))
        || extra.iter().any(|e| e == name)
}

/// The environment a child starts with: allowlisted server variables plus the names in
/// `CLAWDFORGE_CHILD_ENV`, then the config's overrides. `ADMIN_BOOTSTRAP_TOKEN` is never
/// passed, even if an operator lists it.
pub fn child_env(config: &Config) -> Vec<(String, String)> {
    let extra = &config.settings.child_env;
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| allowed(k, extra) && k != "ADMIN_BOOTSTRAP_TOKEN")
        .collect();
    for (k, v) in &config.child_env_overrides {
        env.retain(|(name, _)| name != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist() {
        let extra = vec!["MY_PROXY".to_string()];
        for ok in [
            "PATH",
            "HOME",
            "LC_ALL",
            "ANTHROPIC_API_KEY",
            "CLAUDE_CONFIG_DIR",
            "NODE_OPTIONS",
            "MY_PROXY",
            "IS_SANDBOX",
        ] {
            assert!(allowed(ok, &extra), "{ok}");
        }
        for no in [
            "ADMIN_BOOTSTRAP_TOKEN_X",
            "AWS_SECRET_ACCESS_KEY",
            "CLAWDFORGE_LISTEN",
            "SSH_AUTH_SOCK",
        ] {
            assert!(!allowed(no, &extra), "{no}");
        }
    }
}
