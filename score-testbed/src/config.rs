//! The agents' configuration files on the test bed: the full S-CORE one
//! (node, topology, peer, policy, backend), or only its flow-counting part.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    guests::QEMU_MIGRATION_TIMEOUT,
    plan::{AGENT_HTTP, Host, VM_NETNS_PREFIX},
    state::State,
};

/// UDP port of the peer protocol between agents (the agent's default).
pub const PEER_PORT: u16 = 7760;

/// How the agents are run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentOptions {
    /// The score-agent binary.
    pub binary: PathBuf,
    /// Token policy: round-robin, global, distributed or load-aware.
    pub policy: String,
    /// How long a host holds the token for one VM.
    pub token_hold: String,
    /// Candidate hosts of a decision: paper, peer-racks, peer-pods or all.
    #[serde(default = "paper_candidates")]
    pub candidates: String,
    /// Swaps with full hosts, with one VM of headroom per host.
    #[serde(default)]
    pub swaps: bool,
    /// Ejection chains when a VM would stay (`[policy] chains`).
    #[serde(default)]
    pub chains: bool,
    /// Three-VM rotations between full hosts when a VM would stay
    /// (`[policy] rotations`; each host gets one VM of headroom).
    #[serde(default)]
    pub rotations: bool,
    /// Group moves when a VM would stay (`[policy] groups`).
    #[serde(default)]
    pub groups: bool,
}

fn paper_candidates() -> String {
    "paper".to_string()
}

impl AgentOptions {
    /// The paper's decisions: its candidates, no swaps.
    pub fn paper(binary: PathBuf, policy: String, token_hold: String) -> AgentOptions {
        AgentOptions {
            binary,
            policy,
            token_hold,
            candidates: paper_candidates(),
            swaps: false,
            chains: false,
            rotations: false,
            groups: false,
        }
    }
}

/// One agent's configuration: the full S-CORE one, or (`full == false`)
/// only its flow-counting part, for an agent that predates the rest.
pub fn agent_config(state: &State, host: &Host, opts: &AgentOptions, full: bool) -> String {
    let (policy, token_hold) = (opts.policy.as_str(), opts.token_hold.as_str());
    let pin = Path::new(&state.bpffs).join(&host.name);
    let mut s = format!(
        "# score-agent on {name} ({addr}), written by `cargo xtask testbed up`.\n\
         interfaces = [\"vif*\"]\n\
         drain_interval = \"500ms\"\n\
         rate_window = \"10s\"\n\
         idle_timeout = \"60s\"\n\
         pin_path = \"{pin}\"\n\
         http_listen = \"{AGENT_HTTP}\"\n",
        name = host.name,
        addr = host.address,
        pin = pin.display(),
    );
    if !full {
        return s;
    }
    let slots = state.sizes.slots;
    // A swap between full hosts needs one VM of headroom on one of them
    // while its first migration is under way, and the memory for it; a
    // rotation on two of them (docs/PROTOCOL.md, "Rotations").
    let headroom = u32::from(opts.swaps || opts.rotations);
    s.push_str(&format!(
        "\n[node]\n\
         address = \"{addr}\"\n\
         vm_slots = {slots}\n\
         memory_mib = {mem}\n\
         vm_memory_mib = {vm_mem}\n\
         migration_headroom = {headroom}\n\
         \n[topology]\n\
         file = \"{topo}\"\n\
         \n[peer]\n\
         port = {PEER_PORT}\n\
         key_file = \"{key}\"\n\
         {coordinator}\
         \n[policy]\n\
         kind = \"{policy}\"\n\
         token_hold = \"{token_hold}\"\n\
         candidates = \"{candidates}\"\n\
         swaps = {swaps}\n\
         chains = {chains}\n\
         rotations = {rotations}\n\
         groups = {groups}\n\
         \n[backend]\n\
         {backend}\
         \n[backend.hosts]\n",
        addr = host.address,
        vm_mem = state.vm_memory_mib(),
        mem = (slots + headroom) * state.vm_memory_mib(),
        candidates = opts.candidates,
        swaps = opts.swaps,
        chains = opts.chains,
        rotations = opts.rotations,
        groups = opts.groups,
        backend = backend_config(state, host),
        topo = state.topology_file.display(),
        key = state.key_file.display(),
        // The global policy's coordinator runs beside the first host's
        // agent (`score-agent run --coordinator`, see `spawn_agent`).
        coordinator = if policy == "global" {
            format!("coordinator = \"{}\"\n", state.hosts[0].address)
        } else {
            String::new()
        },
    ));
    for h in &state.hosts {
        s.push_str(&format!("\"{}\" = \"{}\"\n", h.address, h.name));
    }
    s
}

/// The `[backend]` keys of one agent: netns, or qemu for real guests (the
/// guests' monitors under [`QEMU_DIR`]/HOST, the launcher as incoming
/// helper).
fn backend_config(state: &State, host: &Host) -> String {
    match &state.guests {
        None => format!("kind = \"netns\"\nvm_netns_prefix = \"{VM_NETNS_PREFIX}\"\n"),
        Some(g) => format!(
            "kind = \"qemu\"\n\
             qmp_sockets = \"{dir}/{host}/*.qmp\"\n\
             incoming_helper = [\"{launcher}\", \"--dir\", \"{dir}\", \"incoming\"]\n\
             timeout = \"{QEMU_MIGRATION_TIMEOUT}\"\n",
            dir = g.dir.display(),
            host = host.name,
            launcher = g.launcher.display(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guests::{
        GUEST_MEMORY_MIB, QEMU_DIR, QemuGuests, VM_MEMORY_MIB, guest_rate, peers_arg,
    };
    use crate::plan::Sizes;
    use crate::state::planned_state;

    #[test]
    fn real_guests_rates_peers_and_agent_config() {
        // 1442-byte frames carry 1400 bytes of iperf3 payload.
        assert_eq!(guest_rate(1442 * 100), 1400 * 100 * 8);
        let s = Sizes {
            pods: 2,
            racks_per_pod: 1,
            hosts_per_rack: 2,
            vms_per_host: 2,
            slots: 4,
        };
        let mut state = planned_state(&s);
        let flows = crate::traffic::plan(
            &state,
            &crate::traffic::Rates {
                pattern: crate::traffic::Pattern::Pairs,
                group_size: 4,
                chatty: 200_000,
                background: 0,
                background_peers: 0,
            },
        );
        let v1 = state.vms[0].address;
        let arg = peers_arg(v1, &flows).unwrap();
        // VM 1 (dc-h1, pod 1) chats with VM 3 (dc-h3, pod 2).
        assert_eq!(
            arg,
            format!("score.peers=198.18.1.3:{}", guest_rate(200_000))
        );
        assert_eq!(peers_arg(v1, &[]), None);
        state.guests = Some(QemuGuests {
            dir: PathBuf::from(QEMU_DIR),
            launcher: PathBuf::from("/x/qemu-vm"),
            memory_mib: GUEST_MEMORY_MIB,
            boot_seconds: 0.0,
        });
        let opts = AgentOptions::paper("score-agent".into(), "distributed".into(), "1s".into());
        let c = agent_config(&state, &state.hosts[1], &opts, true);
        for line in [
            "vm_memory_mib = 256",
            "memory_mib = 1024",
            "kind = \"qemu\"",
            "qmp_sockets = \"/run/score-testbed/qemu/dc-h2/*.qmp\"",
            "incoming_helper = [\"/x/qemu-vm\", \"--dir\", \"/run/score-testbed/qemu\", \"incoming\"]",
            "\"198.18.0.4\" = \"dc-h4\"",
        ] {
            assert!(c.lines().any(|l| l == line), "{line} missing:\n{c}");
        }
        assert!(!c.contains("netns"), "{c}");
        // The state file of a testbed without guests still reads.
        let mut json: serde_json::Value = serde_json::to_value(planned_state(&s)).unwrap();
        json.as_object_mut().unwrap().remove("guests");
        let old: State = serde_json::from_value(json).unwrap();
        assert!(old.guests.is_none());
        assert_eq!(old.vm_memory_mib(), VM_MEMORY_MIB);
    }
}
