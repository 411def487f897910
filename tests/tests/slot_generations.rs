//! Slot generations (issue 18.9): the steering program reads a service's generation,
//! then one slot of it, and tries twice. The writer used to delete the old generation
//! right after the swap, so a reader delayed across two swaps missed both tries and
//! refused the connect. Retired tables now stay ~1 s (`writer::RETIRE`) and the next
//! swap overwrites them in place. Run as root.

use std::time::{Duration, Instant};

use hitless_agent::desired::{from_registry, DesiredService};
use hitless_agent::registry::Registry;
use hitless_agent::writer::{names, Maps, Writer, RETIRE};
use hitless_tests::{connects, serve, Node};

fn registry(services: &[(&str, &str, &[&str])]) -> String {
    let mut text = String::from("services:\n");
    for (name, vip, backends) in services {
        let b: Vec<String> = backends.iter().map(|a| format!("{{ address: \"{a}\" }}")).collect();
        text.push_str(&format!("  - name: {name}\n    vips: [\"{vip}\"]\n    backends: [{}]\n", b.join(", ")));
    }
    text
}

fn wanted(text: &str) -> Vec<DesiredService> {
    from_registry(&Registry::parse(text).expect("registry"))
}

fn slot_keys(maps: &Maps) -> usize {
    maps.fill().into_iter().find(|(n, _, _)| *n == names::SLOTS).map(|(_, n, _)| n).expect("hl_slots")
}

/// Takes over a node's maps: starts its agent on `text` (load, pin, first apply),
/// kills it, and returns a writer of those maps.
fn take_over(node: &mut Node, text: &str) -> Writer {
    node.write_registry(text);
    node.start_agent();
    node.kill_agent();
    Writer::new(Maps::open(&node.pin_dir).expect("maps")).expect("writer")
}

#[test]
fn a_swap_keeps_the_retired_table_until_it_is_trimmed() {
    let mut node = Node::new("slots-retire");
    let (a, b, c) = ("127.139.10.1:8080", "127.139.10.2:8080", "127.139.10.3:8080");
    let two = registry(&[("cart", "127.76.10.1:8080", &[a, b])]);
    let three = registry(&[("cart", "127.76.10.1:8080", &[a, b, c])]);
    let mut w = take_over(&mut node, &two);
    assert_eq!(slot_keys(w.maps()), 4, "2 backends: 2 slots in each family's table");
    let rev = w.maps().revision().expect("revision");

    // The swap to 3 backends keeps the 2-slot tables: a reader that read the service
    // before the swap still finds its slot (before: deleted at once, 6 keys).
    w.apply(&wanted(&three), rev + 1).expect("apply");
    assert_eq!(slot_keys(w.maps()), 4 + 6, "the retired generation stays");
    // A second swap within the second overwrites the retired tables in place: a reader
    // that read the service two swaps ago still finds a slot too.
    w.apply(&wanted(&two), rev + 2).expect("apply");
    assert_eq!(slot_keys(w.maps()), 4 + 6, "written over in place, nothing deleted");
    assert_eq!(w.trim_retired().expect("trim"), 0, "too early to trim");
    std::thread::sleep(RETIRE);
    assert_eq!(w.trim_retired().expect("trim"), 1);
    assert_eq!(slot_keys(w.maps()), 4, "only the tables in force after a second");
    // A restarted writer finds retired keys and trims them a second after its start.
    w.apply(&wanted(&three), rev + 3).expect("apply");
    let mut w = Writer::new(Maps::open(&node.pin_dir).expect("maps")).expect("writer");
    assert_eq!(w.trim_retired().expect("trim"), 0);
    std::thread::sleep(RETIRE);
    assert_eq!(w.trim_retired().expect("trim"), 1);
    assert_eq!(slot_keys(w.maps()), 6);
}

#[test]
fn retired_tables_never_cost_an_apply_that_used_to_fit() {
    let mut node = Node::new("slots-tight");
    node.agent_args(&["--max-slots", "16"]);
    let (a1, a2, a3) = ("127.139.11.1:8080", "127.139.11.2:8080", "127.139.11.3:8080");
    let (b1, b2, b3) = ("127.139.11.4:8080", "127.139.11.5:8080", "127.139.11.6:8080");
    let (va, vb) = ("127.76.11.1:8080", "127.76.11.2:8080");
    let start = registry(&[("a", va, &[a1, a2]), ("b", vb, &[b1, b2])]);
    let mut w = take_over(&mut node, &start);
    let rev = w.maps().revision().expect("revision");
    w.apply(&wanted(&registry(&[("a", va, &[a1, a2, a3]), ("b", vb, &[b1, b2])])), rev + 1).expect("a swaps");
    assert_eq!(slot_keys(w.maps()), 14, "a's retired table kept: there is room");
    // Keeping a's and b's retired tables would take 20 keys: the apply deletes them at
    // the swap instead, as before, and fits (peak 16: b's two tables for a moment).
    w.apply(&wanted(&registry(&[("a", va, &[a1, a2, a3]), ("b", vb, &[b1, b2, b3])])), rev + 2).expect("b swaps");
    assert_eq!(slot_keys(w.maps()), 12);
}

/// Applies in a tight loop (every one a swap) under a connect loop to the VIP: every
/// connect finds a backend. The race needs a reader delayed across two swaps; on an
/// idle 2-core VM it may never happen, so this test may pass on the old writer too.
#[test]
fn swaps_in_a_tight_loop_refuse_no_connect() {
    let mut node = Node::new("slots-loop");
    let backends = ["127.139.12.1:8080", "127.139.12.2:8080", "127.139.12.3:8080"];
    let vip = "127.76.12.1:8080";
    let _srv = serve(Some(&node.cgroup), &backends, &[]);
    let two = wanted(&registry(&[("cart", vip, &backends[..2])]));
    let three = wanted(&registry(&[("cart", vip, &backends)]));
    let mut w = take_over(&mut node, &registry(&[("cart", vip, &backends[..2])]));
    let rev = w.maps().revision().expect("revision");
    let (s, applies) = std::thread::scope(|scope| {
        let probe = scope.spawn(|| connects(Some(&node.cgroup), vip, 20_000));
        let mut n = 0u64;
        let started = Instant::now();
        while !probe.is_finished() {
            n += 1;
            let next = if n % 2 == 1 { &three } else { &two };
            w.apply(next, rev + n).expect("apply");
            assert!(started.elapsed() < Duration::from_secs(120), "probe never finished");
        }
        (probe.join().expect("probe"), n)
    });
    eprintln!("{applies} swaps during 20,000 connects: {s:?}");
    assert!(applies > 100, "only {applies} swaps happened during the connects");
    assert_eq!((s.ok, s.failed), (20_000, 0), "{applies} swaps: {s:?}");
}
