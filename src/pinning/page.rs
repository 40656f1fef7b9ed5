//! The page scope: a `tools/list` answer's pin decisions are made against one snapshot and
//! published together (one compare-and-swap per answer, not one per tool), and decided again
//! when publishing shows an earlier decision no longer holds; plus each worker's cache of tool
//! digests by the tool's raw bytes, so an unchanged list costs one hash per tool.

use super::canon;
use super::store::MAX_DEFINITION;
use super::{PinSettings, Pins, Staged};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

/// Most passes over one answer. A pass after the first follows a publish that changed what
/// the answer was decided on (another worker pinned the same tool first, or a later copy of a
/// name changed the fate of an earlier one); past this the answer is refused.
const MAX_PASSES: usize = 4;

/// Most bytes of raw tools one worker's digest cache holds (then it starts again).
const CACHE_BYTES: usize = 16 << 20;
/// Longest raw tool cached.
const CACHE_ENTRY: usize = 64 << 10;

thread_local! {
    static PAGE: RefCell<Option<Vec<Staged>>> = const { RefCell::new(None) };
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

/// Clears the page if a pass unwinds, so the thread's next answer starts clean.
struct Reset;

impl Drop for Reset {
    fn drop(&mut self) {
        PAGE.with_borrow_mut(|p| *p = None);
    }
}

/// Runs `pass` (one decision over a whole answer) inside a page scope and publishes what it
/// staged; runs it again when an earlier decision no longer holds. `None` when the answer
/// could not be settled (the caller refuses it). Nested scopes join the outer one.
pub fn run<R>(mut pass: impl FnMut() -> R) -> Option<R> {
    if PAGE.with_borrow(|p| p.is_some()) {
        return Some(pass());
    }
    let _reset = Reset;
    for _ in 0..MAX_PASSES {
        PAGE.with_borrow_mut(|p| *p = Some(Vec::new()));
        let out = pass();
        let staged = PAGE.with_borrow_mut(Option::take).unwrap_or_default();
        let mut settled = true;
        for st in staged {
            settled &= st.commit();
        }
        if settled {
            return Some(out);
        }
    }
    None
}

/// `f` on the open page's staging area for (`pins`, `server`); `None` outside a page.
pub(super) fn with_staged<R>(
    pins: &Arc<Pins>,
    settings: &PinSettings,
    server: &str,
    f: impl FnOnce(&mut Staged) -> R,
) -> Option<R> {
    PAGE.with_borrow_mut(|page| {
        let page = page.as_mut()?;
        let i = match page
            .iter()
            .position(|s| Arc::ptr_eq(&s.pins, pins) && s.server == server)
        {
            Some(i) => i,
            None => {
                page.push(pins.stage(settings, server));
                page.len() - 1
            }
        };
        Some(f(&mut page[i]))
    })
}

/// What pinning needs to know of a tool's raw definition.
#[derive(Debug, Clone)]
pub(super) struct Facts {
    /// Its digest (of the raw bytes when it has no canonical form).
    pub digest: String,
    /// It holds hidden text.
    pub hidden: bool,
    /// Why it can never be pinned: `unparseable`, `too_large`.
    pub hard: Option<&'static str>,
}

#[derive(Default)]
struct Cache {
    /// Keyed per process: a server cannot aim collisions at it (and a hit compares the bytes).
    hasher: std::collections::hash_map::RandomState,
    map: HashMap<u64, (Box<str>, Facts)>,
    bytes: usize,
}

fn compute(raw: &str) -> Facts {
    match canon::definition(raw) {
        Some(d) => Facts {
            hidden: canon::hidden_text(&d.value).is_some(),
            hard: (d.text.len() > MAX_DEFINITION).then_some("too_large"),
            digest: d.digest,
        },
        None => Facts {
            digest: canon::digest_of(raw.as_bytes()),
            hidden: false,
            hard: Some("unparseable"),
        },
    }
}

/// The facts of the tool whose raw JSON is `raw`, from this worker's cache when it met the
/// same bytes before.
pub(super) fn facts(raw: &str) -> Facts {
    CACHE.with_borrow_mut(|c| {
        let key = c.hasher.hash_one(raw);
        if let Some((seen, f)) = c.map.get(&key)
            && **seen == *raw
        {
            return f.clone();
        }
        let f = compute(raw);
        if raw.len() <= CACHE_ENTRY {
            if c.bytes + raw.len() > CACHE_BYTES {
                c.map.clear();
                c.bytes = 0;
            }
            c.bytes += raw.len();
            if let Some((old, _)) = c.map.insert(key, (raw.into(), f.clone())) {
                c.bytes -= old.len();
            }
        }
        f
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_answers_what_computing_does() {
        for raw in [
            r#"{"name":"t","description":"a"}"#,
            r#"{"name":"t","description":"a\u200Bb"}"#,
            r#"{"name":"t","name":"u"}"#,
        ] {
            let a = facts(raw);
            let b = facts(raw);
            let c = compute(raw);
            assert_eq!((&a.digest, a.hidden, a.hard), (&c.digest, c.hidden, c.hard));
            assert_eq!((&b.digest, b.hidden, b.hard), (&c.digest, c.hidden, c.hard));
        }
    }
}
