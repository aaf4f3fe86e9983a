//! Namespaces: the systems or lock keys one caller may touch, as the auth
//! file writes them (exact names and `prefix*` patterns).
//!
//! They live here rather than with authentication because listings filter
//! by them where they read (a query, the lock inventory), so that a page is
//! full of what its caller may see and never resumes from what it may not.
//! A query reads a namespace as [`Span`]s: disjoint runs of names in byte
//! order, each of which an index can range over, so that a page costs what
//! it shows, not what the caller may not see.

/// Most patterns one list may hold: a listing reads each as a range.
pub const MAX_PATTERNS: usize = 64;

/// One entry of a namespace: an exact name, or every name with a prefix
/// (written with a trailing `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// This name only.
    Exact(String),
    /// Every name starting with this.
    Prefix(String),
}

impl Pattern {
    fn parse(raw: &str) -> Result<Pattern, String> {
        if raw.chars().any(char::is_control) {
            return Err(format!("{raw:?}: a pattern has no control characters"));
        }
        match raw.strip_suffix('*') {
            Some(prefix) if prefix.contains('*') => Err(format!("{raw:?}: `*` may only end a pattern")),
            Some(prefix) => Ok(Pattern::Prefix(prefix.to_owned())),
            None if raw.contains('*') => Err(format!("{raw:?}: `*` may only end a pattern")),
            None if raw.is_empty() => Err("an empty pattern matches nothing".into()),
            None => Ok(Pattern::Exact(raw.to_owned())),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => name == exact,
            Pattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
        }
    }
}

/// The systems or lock keys a principal may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespace {
    /// No list in the file: every name.
    All,
    /// The names matching one of these.
    Only(Vec<Pattern>),
}

impl Namespace {
    /// The namespace an auth file's list describes (`None`: the list is
    /// absent), or why a pattern is wrong.
    pub fn parse(raw: Option<Vec<String>>) -> Result<Namespace, String> {
        match raw {
            None => Ok(Namespace::All),
            Some(list) if list.len() > MAX_PATTERNS => Err(format!("at most {MAX_PATTERNS} patterns")),
            Some(list) => list
                .iter()
                .map(|p| Pattern::parse(p))
                .collect::<Result<_, _>>()
                .map(Namespace::Only),
        }
    }

    /// The names of this namespace that start with `prefix`, as disjoint
    /// spans in byte order (none: no such name).
    pub fn spans<'a>(&'a self, prefix: &'a str) -> Vec<Span<'a>> {
        let Namespace::Only(patterns) = self else {
            return vec![Span::Prefix(prefix)];
        };
        let mut prefixes: Vec<&str> = patterns
            .iter()
            .filter_map(|p| match p {
                // The narrower of the two prefixes, if one extends the other.
                Pattern::Prefix(p) if p.starts_with(prefix) => Some(p.as_str()),
                Pattern::Prefix(p) if prefix.starts_with(p.as_str()) => Some(prefix),
                _ => None,
            })
            .collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        // A prefix that extends another kept one adds nothing (sorted, the
        // shorter comes first).
        let mut kept: Vec<&str> = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            if !kept.last().is_some_and(|k| p.starts_with(k)) {
                kept.push(p);
            }
        }
        let mut spans: Vec<Span<'a>> = patterns
            .iter()
            .filter_map(|p| match p {
                Pattern::Exact(name) if name.starts_with(prefix) && !kept.iter().any(|k| name.starts_with(k)) => {
                    Some(Span::Name(name.as_str()))
                }
                _ => None,
            })
            .chain(kept.iter().copied().map(Span::Prefix))
            .collect();
        spans.sort_unstable_by_key(|s| s.start());
        spans.dedup();
        spans
    }

    /// The namespace as two lists, for a query to filter by: exact names and
    /// prefixes; `None` for every name.
    pub fn exact_and_prefixes(&self) -> Option<(Vec<&str>, Vec<&str>)> {
        match self {
            Namespace::All => None,
            Namespace::Only(patterns) => {
                let (mut exact, mut prefixes) = (Vec::new(), Vec::new());
                for pattern in patterns {
                    match pattern {
                        Pattern::Exact(name) => exact.push(name.as_str()),
                        Pattern::Prefix(prefix) => prefixes.push(prefix.as_str()),
                    }
                }
                Some((exact, prefixes))
            }
        }
    }

    /// Whether `name` is in this namespace.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Namespace::All => true,
            Namespace::Only(patterns) => patterns.iter().any(|p| p.matches(name)),
        }
    }
}

/// A run of names in byte order that one index range covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span<'a> {
    /// This name.
    Name(&'a str),
    /// Every name starting with this: from it (included) to
    /// [`prefix_end`] of it (excluded).
    Prefix(&'a str),
}

impl<'a> Span<'a> {
    /// Its first name.
    pub fn start(&self) -> &'a str {
        match self {
            Span::Name(s) | Span::Prefix(s) => s,
        }
    }
}

/// The first string after every string starting with `prefix`, in byte
/// order (which for UTF-8 is code point order); `None` when there is none
/// (`prefix` is empty or all U+10FFFF). A name starts with `prefix` exactly
/// when it is at least `prefix` and less than this.
pub fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        // The next scalar value, skipping the surrogates.
        let next = match u32::from(last) {
            0xD7FF => Some('\u{E000}'),
            n => n.checked_add(1).and_then(char::from_u32),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ns(patterns: &[&str]) -> Namespace {
        Namespace::parse(Some(patterns.iter().map(|p| (*p).to_owned()).collect())).unwrap()
    }

    #[test]
    fn spans_are_the_patterns_within_the_prefix_without_overlap_in_byte_order() {
        let n = ns(&["b/*", "a", "b/x/*", "b/y", "c*", "ab", "d/1", "*"]);
        assert_eq!(n.spans("zz"), [Span::Prefix("zz")], "`*` covers everything");
        let n = ns(&["b/*", "a", "b/x/*", "b/y", "c*", "ab"]);
        assert_eq!(
            n.spans(""),
            [Span::Name("a"), Span::Name("ab"), Span::Prefix("b/"), Span::Prefix("c")]
        );
        assert_eq!(n.spans("b/x/1"), [Span::Prefix("b/x/1")]);
        assert_eq!(n.spans("c"), [Span::Prefix("c")]);
        assert_eq!(n.spans("a"), [Span::Name("a"), Span::Name("ab")]);
        assert!(n.spans("d").is_empty());
        assert_eq!(Namespace::All.spans("p"), [Span::Prefix("p")]);
    }

    #[test]
    fn the_end_of_a_prefix_is_the_next_string_after_all_its_extensions() {
        assert_eq!(prefix_end("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("\u{10FFFF}"), None);
    }

    #[test]
    fn control_characters_and_too_many_patterns_are_refused() {
        assert!(Namespace::parse(Some(vec!["a\u{0}*".into()])).is_err());
        assert!(Namespace::parse(Some(vec!["x".into(); MAX_PATTERNS + 1])).is_err());
        assert!(Namespace::parse(Some(vec!["x".into(); MAX_PATTERNS])).is_ok());
    }

    fn name() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![Just('a'), Just('b'), Just('\u{D7FF}'), Just('\u{10FFFF}')],
            0..4,
        )
        .prop_map(|c| c.into_iter().collect())
    }

    fn pattern() -> impl Strategy<Value = String> {
        (name(), any::<bool>())
            .prop_map(|(n, prefix)| if prefix { format!("{n}*") } else { n })
            .prop_filter("an empty exact name is refused", |p| !p.is_empty())
    }

    proptest! {
        #[test]
        fn a_name_is_in_exactly_one_span_when_it_is_in_the_namespace_and_has_the_prefix(
            patterns in prop::collection::vec(pattern(), 0..6),
            prefix in name(),
            names in prop::collection::vec(name(), 1..20),
        ) {
            let n = Namespace::parse(Some(patterns)).unwrap();
            let spans = n.spans(&prefix);
            for s in spans.windows(2) {
                prop_assert!(s[0].start() < s[1].start());
            }
            for name in names {
                let inside = |s: &Span<'_>| match s {
                    Span::Name(x) => name == *x,
                    // As a query reads a prefix span: a range.
                    Span::Prefix(p) => name.as_str() >= *p && prefix_end(p).is_none_or(|end| name < end),
                };
                let wanted = n.contains(&name) && name.starts_with(prefix.as_str());
                prop_assert_eq!(spans.iter().filter(|s| inside(s)).count(), usize::from(wanted), "{}", name);
            }
        }
    }

    #[test]
    fn a_namespace_splits_into_the_exact_names_and_prefixes_it_matches() {
        let ns = Namespace::parse(Some(vec!["a".into(), "b/*".into(), "c*".into()])).unwrap();
        assert_eq!(ns.exact_and_prefixes(), Some((vec!["a"], vec!["b/", "c"])));
        assert!(ns.contains("a") && ns.contains("b/x") && ns.contains("cd"));
        assert!(!ns.contains("ab") && !ns.contains("b"));
        assert_eq!(Namespace::parse(None).unwrap().exact_and_prefixes(), None);
        assert!(Namespace::parse(Some(vec!["a*b".into()])).is_err());
    }
}
