//! The subscription index: which connections want a change to an entity.
//!
//! Three kinds of pattern: an exact id, a prefix (`acme/*`, `acme/site-3/*`, any depth, or any
//! text followed by `*`), and `*` (everything). Matching an id costs one hash lookup for exact
//! subscriptions and one per *distinct prefix length* in use for prefixes — never a look at
//! subscriptions that cannot match. The all-set is not walked per change: those connections
//! read the hub's stream, and a match skips them. A connection is reported once per id even
//! when several of its subscriptions match.

use std::collections::BTreeMap;
use std::sync::Arc;

use hashbrown::{HashMap, HashSet};

use crate::connection::Connection;

/// A parsed subscription pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    All,
    Prefix(Box<str>),
    Exact(Box<str>),
}

impl Pattern {
    pub fn parse(text: &str) -> Pattern {
        match text.strip_suffix('*') {
            Some("") => Pattern::All,
            Some(prefix) => Pattern::Prefix(prefix.into()),
            None => Pattern::Exact(text.into()),
        }
    }
}

#[derive(Default)]
pub struct Index {
    exact: HashMap<Box<str>, Vec<Arc<Connection>>>,
    prefixes: HashMap<Box<str>, Vec<Arc<Connection>>>,
    /// Distinct prefix lengths in use → how many prefixes have that length.
    prefix_lengths: BTreeMap<usize, usize>,
    all: Vec<Arc<Connection>>,
    subscriptions: usize,
}

impl Index {
    pub fn subscriptions(&self) -> usize {
        self.subscriptions
    }

    /// Adds `connection` under `pattern`; false if it was already there.
    pub fn insert(&mut self, pattern: &Pattern, connection: &Arc<Connection>) -> bool {
        let list = match pattern {
            Pattern::All => &mut self.all,
            Pattern::Exact(id) => self.exact.entry(id.clone()).or_default(),
            Pattern::Prefix(prefix) => {
                if !self.prefixes.contains_key(&**prefix) {
                    *self.prefix_lengths.entry(prefix.len()).or_default() += 1;
                }
                self.prefixes.entry(prefix.clone()).or_default()
            }
        };
        if list.iter().any(|c| c.id == connection.id) {
            return false;
        }
        list.push(connection.clone());
        self.subscriptions += 1;
        true
    }

    /// Removes the connection `id` from `pattern`; false if it was not there.
    pub fn remove(&mut self, pattern: &Pattern, id: u64) -> bool {
        let (list, key) = match pattern {
            Pattern::All => (Some(&mut self.all), None),
            Pattern::Exact(k) => (self.exact.get_mut(&**k), None),
            Pattern::Prefix(k) => (self.prefixes.get_mut(&**k), Some(k)),
        };
        let Some(list) = list else { return false };
        let Some(at) = list.iter().position(|c| c.id == id) else {
            return false;
        };
        list.swap_remove(at);
        self.subscriptions -= 1;
        if list.is_empty() {
            match pattern {
                Pattern::All => self.all = Vec::new(),
                Pattern::Exact(k) => {
                    self.exact.remove(&**k);
                }
                Pattern::Prefix(_) => {
                    if let Some(k) = key {
                        self.prefixes.remove(&**k);
                        if let Some(n) = self.prefix_lengths.get_mut(&k.len()) {
                            *n -= 1;
                            if *n == 0 {
                                self.prefix_lengths.remove(&k.len());
                            }
                        }
                    }
                }
            }
        }
        true
    }

    /// Connections subscribed to `*`.
    pub fn all(&self) -> &[Arc<Connection>] {
        &self.all
    }

    /// Calls `visit` once for every connection subscribed to `id` by an exact id or a prefix,
    /// except connections subscribed to `*` too (they read the hub's stream instead).
    pub fn for_each_match<'a>(&'a self, id: &str, mut visit: impl FnMut(&'a Arc<Connection>)) {
        let exact = self.exact.get(id);
        let mut prefixed: Vec<&Vec<Arc<Connection>>> = Vec::new();
        for &len in self.prefix_lengths.keys() {
            if len > id.len() {
                break;
            }
            if id.is_char_boundary(len)
                && let Some(list) = self.prefixes.get(&id[..len])
            {
                prefixed.push(list);
            }
        }
        let sources = usize::from(exact.is_some()) + prefixed.len();
        let lists = exact.into_iter().chain(prefixed);
        let mut visit = |c: &'a Arc<Connection>| {
            if !c.is_streaming() {
                visit(c);
            }
        };
        if sources <= 1 {
            lists.flatten().for_each(&mut visit);
            return;
        }
        // Several subscriptions may belong to one connection: report it once.
        let mut seen: HashSet<u64> = HashSet::new();
        for connection in lists.flatten() {
            if seen.insert(connection.id) {
                visit(connection);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(index: &Index, id: &str) -> Vec<u64> {
        let mut ids = Vec::new();
        index.for_each_match(id, |c| ids.push(c.id));
        ids.sort_unstable();
        ids
    }

    #[test]
    fn exact_prefix_and_all_match_once_per_connection() {
        let mut index = Index::default();
        let (a, b, c) = (
            Arc::new(Connection::new(1)),
            Arc::new(Connection::new(2)),
            Arc::new(Connection::new(3)),
        );
        assert!(index.insert(&Pattern::parse("acme/site-3/pump-1"), &a));
        assert!(index.insert(&Pattern::parse("acme/*"), &a));
        assert!(!index.insert(&Pattern::parse("acme/*"), &a));
        assert!(index.insert(&Pattern::parse("acme/site-3/*"), &b));
        // `*` subscribers read the stream: the index keeps them but a match never visits them,
        // even through another of their subscriptions.
        assert!(index.insert(&Pattern::parse("*"), &c));
        assert!(index.insert(&Pattern::parse("acme/*"), &c));
        c.start_stream(0);
        assert_eq!(index.all().len(), 1);
        assert_eq!(matches(&index, "acme/site-3/pump-1"), [1, 2]);
        assert_eq!(matches(&index, "acme/site-4/x"), [1]);
        assert_eq!(matches(&index, "acme2/x"), Vec::<u64>::new());
        assert!(index.remove(&Pattern::parse("acme/*"), 1));
        assert!(!index.remove(&Pattern::parse("acme/*"), 1));
        assert_eq!(matches(&index, "acme/site-4/x"), Vec::<u64>::new());
        assert_eq!(matches(&index, "acme/site-3/pump-1"), [1, 2]);
        assert!(index.remove(&Pattern::parse("*"), 3));
        c.stop_stream(&crate::stream::Stream::default());
        assert_eq!(matches(&index, "acme/site-4/x"), [3], "no longer streaming");
        assert!(index.remove(&Pattern::parse("acme/*"), 3));
        assert!(index.remove(&Pattern::parse("acme/site-3/*"), 2));
        assert!(index.remove(&Pattern::parse("acme/site-3/pump-1"), 1));
        assert_eq!(index.subscriptions(), 0);
        assert!(
            index.prefix_lengths.is_empty() && index.prefixes.is_empty() && index.exact.is_empty()
        );
    }

    #[test]
    fn prefixes_respect_utf8_boundaries() {
        let mut index = Index::default();
        let a = Arc::new(Connection::new(1));
        index.insert(&Pattern::parse("é*"), &a);
        index.insert(&Pattern::parse("x*"), &a);
        assert_eq!(matches(&index, "éa"), [1]);
        assert_eq!(matches(&index, "ü"), Vec::<u64>::new());
    }
}
