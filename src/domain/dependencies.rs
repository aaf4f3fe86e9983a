//! Dependencies between systems, and the one rule they must keep: no cycle.
//!
//! A system that depends on another which is already down is most likely
//! down because of it; its transition names that dependency so a notifier can
//! page once for the root cause. A cycle would make every system of it the
//! cause of the others, so one is refused when it is configured.

use std::collections::{BTreeMap, BTreeSet};

/// The most systems one system may depend on: each is read when the system
/// becomes worse, and all of them travel in its transitions.
pub const MAX_DEPENDENCIES: u32 = 32;

/// The cycle that `system` depending on `depends_on` would close, given the
/// other systems' dependencies (`edges`: system -> what it depends on; the
/// entry of `system` itself is ignored, since it is being replaced), as the
/// path from `system` back to itself; `None` when there is none.
///
/// The search visits each system once, so it is linear in the edges read.
pub fn find_cycle(system: &str, depends_on: &[String], edges: &BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    // Depth-first from each new dependency, remembering how each system was
    // reached so that the path can be rebuilt.
    let mut reached_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut stack: Vec<&str> = Vec::new();
    for dependency in depends_on {
        if seen.insert(dependency.as_str()) {
            reached_from.insert(dependency.as_str(), system);
            stack.push(dependency.as_str());
        }
    }
    while let Some(current) = stack.pop() {
        if current == system {
            let mut path = vec![system.to_owned()];
            let mut at = reached_from.get(system).copied();
            while let Some(node) = at {
                path.push(node.to_owned());
                if node == system {
                    break;
                }
                at = reached_from.get(node).copied();
            }
            path.reverse();
            return Some(path);
        }
        let Some(next) = edges.get(current) else { continue };
        for n in next {
            if seen.insert(n.as_str()) {
                reached_from.insert(n.as_str(), current);
                stack.push(n.as_str());
            }
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn edges(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(from, to)| ((*from).to_owned(), to.iter().map(|s| (*s).to_owned()).collect()))
            .collect()
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_chain_is_no_cycle_and_closing_it_is_one_named_from_the_system_back_to_itself() {
        // web -> api -> db
        let graph = edges(&[("web", &["api"]), ("api", &["db"])]);
        assert_eq!(find_cycle("web", &ids(&["api"]), &graph), None);
        assert_eq!(
            find_cycle("db", &ids(&["web"]), &graph),
            Some(ids(&["db", "web", "api", "db"]))
        );
    }

    #[test]
    fn depending_on_itself_is_a_cycle_of_one() {
        assert_eq!(
            find_cycle("db", &ids(&["db"]), &BTreeMap::new()),
            Some(ids(&["db", "db"]))
        );
    }

    #[test]
    fn the_systems_own_old_dependencies_do_not_count() {
        let graph = edges(&[("db", &["web"]), ("web", &["api"])]);
        // db's old edge to web is replaced: api -> ... never reaches db.
        assert_eq!(find_cycle("db", &ids(&["api"]), &graph), None);
    }

    /// A graph on nodes 0..n with edges only from a higher to a lower number
    /// never has a cycle.
    fn descending(n: usize, picks: &[(usize, usize)]) -> BTreeMap<String, Vec<String>> {
        let mut graph: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (a, b) in picks {
            let (hi, lo) = ((*a).max(*b) % n, (*a).min(*b) % n);
            if hi > lo {
                graph.entry(hi.to_string()).or_default().push(lo.to_string());
            }
        }
        graph
    }

    proptest! {
        #[test]
        fn edges_that_only_descend_never_form_a_cycle_and_an_edge_back_up_a_path_always_does(
            picks in proptest::collection::vec((0usize..12, 0usize..12), 0..40),
        ) {
            let graph = descending(12, &picks);
            for system in 0..12usize {
                let deps = graph.get(&system.to_string()).cloned().unwrap_or_default();
                prop_assert_eq!(find_cycle(&system.to_string(), &deps, &graph), None);
            }
            // For every edge hi -> lo, lo depending on hi closes a cycle
            // whose path starts and ends at lo and follows real edges.
            for (hi, los) in &graph {
                for lo in los {
                    let cycle = find_cycle(lo, std::slice::from_ref(hi), &graph);
                    let cycle = cycle.expect("an edge back closes a cycle");
                    prop_assert_eq!(cycle.first(), Some(lo));
                    prop_assert_eq!(cycle.last(), Some(lo));
                    prop_assert_eq!(&cycle[1], hi);
                    for pair in cycle[1..].windows(2) {
                        prop_assert!(graph.get(&pair[0]).is_some_and(|next| next.contains(&pair[1])));
                    }
                }
            }
        }
    }
}
