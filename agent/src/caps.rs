//! The capabilities the agent needs, checked before anything is loaded: without one of
//! them the kernel refuses a later step with a message that does not say which (a map
//! create's EPERM, or a verifier listing ending "prohibited for !root").

/// One capability the agent needs, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// Its name, `CAP_BPF`.
    pub name: &'static str,
    /// Its bit in `CapEff` (`include/uapi/linux/capability.h`).
    pub bit: u32,
    /// What the agent does with it.
    pub why: &'static str,
}

/// `CAP_SYS_ADMIN`: the kernel accepts it in place of `CAP_BPF` and `CAP_PERFMON`.
const SYS_ADMIN: u32 = 21;

/// What the agent needs, in the order it is named.
pub const NEEDED: [Need; 3] = [
    Need { name: "CAP_BPF", bit: 39, why: "to create the BPF maps and load the programs" },
    Need { name: "CAP_NET_ADMIN", bit: 12, why: "to attach the programs to the cgroup" },
    Need {
        name: "CAP_PERFMON",
        bit: 38,
        why: "for the sock_ops program's pointer reads of socket fields, which the verifier allows only with it",
    },
];

/// The capabilities of [`NEEDED`] missing from the effective set `eff` (a `CapEff` mask).
pub fn missing(eff: u64) -> Vec<Need> {
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    NEEDED
        .into_iter()
        // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON (bpf_capable, perfmon_capable).
        .filter(|n| {
            let held = has(n.bit) || (n.name != "CAP_NET_ADMIN" && has(SYS_ADMIN));
            !held
        })
        .collect()
}

/// The process's effective capabilities, from `CapEff:` in `/proc/self/status`.
pub fn effective() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    parse_cap_eff(&status).ok_or_else(|| std::io::Error::other("no readable CapEff: line in /proc/self/status"))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The refusal for `missing` (not empty): each capability and why it is needed.
pub fn refusal(missing: &[Need]) -> String {
    let each: Vec<String> = missing.iter().map(|n| format!("{} ({})", n.name, n.why)).collect();
    let names: Vec<&str> = missing.iter().map(|n| n.name.trim_start_matches("CAP_")).collect();
    format!(
        "the agent lacks {}; nothing was loaded. Give it {} (in Kubernetes: securityContext.capabilities.add: [{}], as deploy/kubernetes/base/agent.yaml does), or run it as root",
        each.join(" and "),
        if missing.len() == 1 { "that capability" } else { "those capabilities" },
        names.join(", ")
    )
}

/// Refuses to go on when a needed capability is missing (the refusal names each).
pub fn check() -> Result<(), String> {
    let eff = effective().map_err(|e| format!("reading the agent's capabilities from /proc/self/status: {e}"))?;
    let gone = missing(eff);
    if gone.is_empty() {
        Ok(())
    } else {
        Err(refusal(&gone))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL3: u64 = (1 << 39) | (1 << 12) | (1 << 38);

    #[test]
    fn names_each_missing_capability_and_accepts_sys_admin_for_bpf_and_perfmon() {
        assert!(missing(ALL3).is_empty());
        assert!(missing(u64::MAX).is_empty(), "root");
        let names = |eff| missing(eff).iter().map(|n| n.name).collect::<Vec<_>>();
        assert_eq!(names(ALL3 & !(1 << 38)), ["CAP_PERFMON"]);
        assert_eq!(names(ALL3 & !(1 << 39)), ["CAP_BPF"]);
        assert_eq!(names(0), ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]);
        assert_eq!(names((1 << SYS_ADMIN) | (1 << 12)), Vec::<&str>::new());
        assert_eq!(names(1 << SYS_ADMIN), ["CAP_NET_ADMIN"]);
    }

    #[test]
    fn the_refusal_says_what_each_is_for() {
        let text = refusal(&missing(ALL3 & !(1 << 38)));
        assert!(text.starts_with("the agent lacks CAP_PERFMON (for the sock_ops program's pointer reads"), "{text}");
        assert!(text.contains("capabilities.add: [PERFMON]"), "{text}");
    }

    #[test]
    fn reads_cap_eff() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000001000\n";
        assert_eq!(parse_cap_eff(status), Some(ALL3));
    }
}
