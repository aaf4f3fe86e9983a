//! Namespaces: the systems or lock keys one caller may touch, as the auth
//! file writes them (exact names and `prefix*` patterns).
//!
//! They live here rather than with authentication because listings filter
//! by them where they read (a query, the lock inventory), so that a page is
//! full of what its caller may see and never resumes from what it may not.

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
            Some(list) => list
                .iter()
                .map(|p| Pattern::parse(p))
                .collect::<Result<_, _>>()
                .map(Namespace::Only),
        }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
