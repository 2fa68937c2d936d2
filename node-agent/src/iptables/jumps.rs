//! The jumps from the built-in chains (`PREROUTING`, `INPUT`, ...) to ours, shared
//! by both backends. They live outside our chains, so `iptables-restore --noflush`
//! cannot own them: each is checked and inserted first in its chain, one rule at a
//! time, as kube-proxy's `EnsureChain` + `EnsureRule(Prepend)` do.

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
/// Runs on the blocking pool (the `iptables` crate forks the tools).
///
/// # Errors
/// The iptables tool fails; the message names the table and chain.
pub async fn ensure(
    family: IpFamily,
    chains: Vec<(&'static str, String)>,
    jumps: Vec<Jump>,
) -> Result<(), String> {
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut ipt = iptables::new(family == IpFamily::V6).map_err(|e| e.to_string())?;
        ipt.set_numeric(true);
        let wanted = chains
            .iter()
            .map(|(table, chain)| (*table, chain.as_str()))
            .chain(jumps.iter().map(|j| (j.table, j.target.as_str())));
        for (table, chain) in wanted {
            if !ipt.chain_exists(table, chain).map_err(|e| e.to_string())? {
                ipt.new_chain(table, chain)
                    .map_err(|e| format!("{table} {chain}: {e}"))?;
            }
        }
        for j in &jumps {
            if !ipt
                .exists(j.table, j.chain, &j.rule)
                .map_err(|e| e.to_string())?
            {
                ipt.insert(j.table, j.chain, &j.rule, 1)
                    .map_err(|e| format!("{} {}: {e}", j.table, j.chain))?;
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}
