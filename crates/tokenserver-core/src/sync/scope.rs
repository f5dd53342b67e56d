//! FxA OAuth scope matching, by FxA's rules (not Mozilla's Rust server's comma split).
//!
//! A JWT's `scope` claim is whitespace-separated. A granted URL scope implies a required one when
//! it has the same origin and its path equals the required path or is a parent of it at a `/`
//! boundary (`https://identity.mozilla.com/apps` implies `.../apps/oldsync`). A granted scope with
//! a fragment implies only itself. Short scopes (`profile`) match exactly.

fn split_url_scope(scope: &str) -> Option<(&str, &str, Option<&str>)> {
    let rest = scope.strip_prefix("https://")?;
    let (rest, fragment) = match rest.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (rest, None),
    };
    let (origin, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    Some((origin, path, fragment))
}

/// Does one granted scope imply the required one?
pub fn scope_implies(granted: &str, required: &str) -> bool {
    if granted == required {
        return true;
    }
    let (Some((g_origin, g_path, g_frag)), Some((r_origin, r_path, _))) =
        (split_url_scope(granted), split_url_scope(required))
    else {
        return false;
    };
    if g_frag.is_some() || !g_origin.eq_ignore_ascii_case(r_origin) {
        return false;
    }
    let g_path = g_path.trim_end_matches('/');
    r_path.strip_prefix(g_path).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Does any of the granted scopes imply the required one?
pub fn scopes_grant<'a>(granted: impl IntoIterator<Item = &'a str>, required: &str) -> bool {
    granted.into_iter().any(|g| scope_implies(g, required))
}

/// Splits a JWT `scope` claim on whitespace.
pub fn split_scope_claim(claim: &str) -> impl Iterator<Item = &str> {
    claim.split_whitespace()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::SYNC_SCOPE;

    #[test]
    fn fxa_rules() {
        let yes = [
            "https://identity.mozilla.com/apps/oldsync",
            "profile https://identity.mozilla.com/apps/oldsync",
            "https://identity.mozilla.com/apps/oldsync\tprofile:email",
            "https://identity.mozilla.com/apps",
            "https://identity.mozilla.com/apps/",
            "https://identity.mozilla.com",
        ];
        for s in yes {
            assert!(scopes_grant(split_scope_claim(s), SYNC_SCOPE), "{s}");
        }
        let no = [
            "",
            "profile",
            "bad_scope",
            "unrelated scopes",
            "https://identity.mozilla.com/apps/oldsyncX",
            "https://identity.mozilla.com/app",
            "https://identity.mozilla.com/apps/oldsync/extra",
            "https://identity.mozilla.com/apps#frag",
            "https://evil.example.com/apps/oldsync",
            "http://identity.mozilla.com/apps/oldsync",
            "profile,https://identity.mozilla.com/apps/oldsync",
        ];
        for s in no {
            assert!(!scopes_grant(split_scope_claim(s), SYNC_SCOPE), "{s}");
        }
    }
}
