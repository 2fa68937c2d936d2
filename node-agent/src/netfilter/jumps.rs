//! The jumps from the built-in chains (`PREROUTING`, `INPUT`, ...) to ours, shared
//! by both backends. They live outside our chains, so `iptables-restore --noflush`
//! cannot own them: each is checked and inserted first in its chain, one rule at a
//! time, as kube-proxy's `EnsureChain` + `EnsureRule(Prepend)` do.

use super::Runner;
use crate::proxy::IpFamily;

/// A jump from a built-in chain to ours (kube-proxy's `iptablesJumpChain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub table: &'static str,
    pub chain: &'static str,
    pub target: String,
    /// The rule without `-A <chain>`, as `iptables -C/-I` take it.
    pub rule: String,
}

impl Jump {
    /// `extra` matches come first, then the comment (left out when empty), then `-j`.
    pub fn new(
        table: &'static str,
        chain: &'static str,
        target: &str,
        comment: &str,
        extra: &str,
    ) -> Self {
        let mut rule = String::new();
        if !extra.is_empty() {
            rule.push_str(extra);
            rule.push(' ');
        }
        if !comment.is_empty() {
            rule.push_str(&format!("-m comment --comment \"{comment}\" "));
        }
        rule.push_str("-j ");
        rule.push_str(target);
        Self {
            table,
            chain,
            target: target.to_string(),
            rule,
        }
    }
}

/// Creates `chains` (table, name) and each jump's target chain if missing, then
/// inserts each jump at the head of its built-in chain unless it is already there.
///
/// # Errors
/// The iptables tool fails; the message names the table and chain.
pub async fn ensure(
    runner: &Runner,
    family: IpFamily,
    chains: Vec<(&'static str, String)>,
    jumps: Vec<Jump>,
) -> Result<(), String> {
    let wanted = chains
        .iter()
        .map(|(table, chain)| (*table, chain.as_str()))
        .chain(jumps.iter().map(|j| (j.table, j.target.as_str())));
    for (table, chain) in wanted {
        if !chain_exists(runner, family, table, chain).await? {
            iptables(runner, family, table, &["-N", chain])
                .await
                .map_err(|e| format!("{table} {chain}: {e}"))?;
        }
    }
    for j in &jumps {
        if !rule_exists(runner, family, j.table, j.chain, &j.rule).await? {
            let words = split_rule(&j.rule);
            let mut args = vec!["-I", j.chain, "1"];
            args.extend(words.iter().map(String::as_str));
            iptables(runner, family, j.table, &args)
                .await
                .map_err(|e| format!("{} {}: {e}", j.table, j.chain))?;
        }
    }
    Ok(())
}

/// Whether `chain` exists in `table`.
///
/// # Errors
/// The tool cannot be run.
pub async fn chain_exists(
    runner: &Runner,
    family: IpFamily,
    table: &str,
    chain: &str,
) -> Result<bool, String> {
    check(runner, family, table, &["-S", chain]).await
}

/// Whether `rule` (without `-A <chain>`) is in `chain` (`iptables -C`).
///
/// # Errors
/// The tool cannot be run.
pub async fn rule_exists(
    runner: &Runner,
    family: IpFamily,
    table: &str,
    chain: &str,
    rule: &str,
) -> Result<bool, String> {
    let words = split_rule(rule);
    let mut args = vec!["-C", chain];
    args.extend(words.iter().map(String::as_str));
    check(runner, family, table, &args).await
}

fn program(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "iptables",
        IpFamily::V6 => "ip6tables",
    }
}

async fn check(
    runner: &Runner,
    family: IpFamily,
    table: &str,
    args: &[&str],
) -> Result<bool, String> {
    let mut all = vec!["-w", "-t", table];
    all.extend_from_slice(args);
    let out = runner
        .run(program(family), &all, None)
        .await
        .map_err(|e| e.to_string())?;
    Ok(out.success)
}

async fn iptables(
    runner: &Runner,
    family: IpFamily,
    table: &str,
    args: &[&str],
) -> Result<(), String> {
    let mut all = vec!["-w", "-t", table];
    all.extend_from_slice(args);
    runner
        .output(program(family), &all, None)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Splits a rule into arguments at spaces, keeping `"quoted text"` as one argument
/// (without the quotes), as a shell would for our rules.
pub fn split_rule(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in rule.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::{FakeRunner, ToolOutput};

    #[test]
    fn rules_split_like_a_shell() {
        let j = Jump::new(
            "nat",
            "OUTPUT",
            "KUBE-SERVICES",
            "kubernetes service portals",
            "-m conntrack --ctstate NEW",
        );
        assert_eq!(
            split_rule(&j.rule),
            [
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-m",
                "comment",
                "--comment",
                "kubernetes service portals",
                "-j",
                "KUBE-SERVICES"
            ]
        );
    }

    #[tokio::test]
    async fn missing_chains_and_jumps_are_created_present_ones_kept() {
        // The canary chain exists; the jump's target does not; the jump is absent.
        let fake = FakeRunner::new(|c| {
            let present =
                c.args.contains(&"-S".to_string()) && c.args.contains(&"KUBE-CANARY".to_string());
            if c.args.contains(&"-C".to_string())
                || (c.args.contains(&"-S".to_string()) && !present)
            {
                ToolOutput::failed("No chain/target/match by that name.")
            } else {
                ToolOutput::ok("")
            }
        });
        let jump = Jump::new(
            "nat",
            "OUTPUT",
            "KUBE-SERVICES",
            "kubernetes service portals",
            "",
        );
        ensure(
            &Runner::Fake(fake.clone()),
            IpFamily::V6,
            vec![("nat", "KUBE-CANARY".into())],
            vec![jump],
        )
        .await
        .unwrap();
        let calls: Vec<String> = fake
            .calls()
            .iter()
            .map(|c| format!("{} {}", c.program, c.args.join(" ")))
            .collect();
        assert_eq!(
            calls,
            [
                "ip6tables -w -t nat -S KUBE-CANARY",
                "ip6tables -w -t nat -S KUBE-SERVICES",
                "ip6tables -w -t nat -N KUBE-SERVICES",
                "ip6tables -w -t nat -C OUTPUT -m comment --comment kubernetes service portals -j KUBE-SERVICES",
                "ip6tables -w -t nat -I OUTPUT 1 -m comment --comment kubernetes service portals -j KUBE-SERVICES",
            ]
        );
    }
}
