//! Test support for the fuzz tests: real inputs (seeds) changed the way
//! broken or hostile peers change them, as proptest strategies, so a failure
//! shrinks to a small seed and few edits. The bounded runs are part of the
//! test suite; the long ones (`cargo test --release -- --ignored fuzz`) take
//! their case count from `MAILBRIDGE_FUZZ_CASES` (default 1,000,000).

use proptest::{prelude::*, test_runner::Config};

/// One edit of an input; positions are taken modulo its length.
#[derive(Clone, Debug)]
pub enum Edit {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    /// Inserts a token with meaning to the parser (a boundary, an encoded
    /// word, a literal's length, a quote).
    InsertToken(usize, usize),
    Delete(usize, usize),
    Truncate(usize),
    /// Repeats a span of the input at another place.
    Copy(usize, usize, usize),
}

fn edit(tokens: usize) -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Flip(at, byte)),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(at, bytes)| Edit::Insert(at, bytes)),
        (any::<usize>(), 0..tokens.max(1)).prop_map(|(at, token)| Edit::InsertToken(at, token)),
        (any::<usize>(), 1usize..64).prop_map(|(at, len)| Edit::Delete(at, len)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), 1usize..256, any::<usize>())
            .prop_map(|(from, len, to)| Edit::Copy(from, len, to)),
    ]
}

/// A seed (by index) and up to `max_edits` edits of it.
pub fn edited(
    seeds: usize,
    tokens: usize,
    max_edits: usize,
) -> impl Strategy<Value = (usize, Vec<Edit>)> {
    (
        0..seeds,
        proptest::collection::vec(edit(tokens), 0..max_edits),
    )
}

/// `seed` with `edits` applied in order.
pub fn apply(seed: &[u8], edits: &[Edit], tokens: &[&[u8]]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for edit in edits {
        let len = bytes.len();
        let at = |position: usize| if len == 0 { 0 } else { position % (len + 1) };
        match edit {
            Edit::Flip(position, byte) => {
                if len > 0 {
                    bytes[position % len] ^= byte | 1;
                }
            }
            Edit::Insert(position, inserted) => {
                let at = at(*position);
                bytes.splice(at..at, inserted.iter().copied());
            }
            Edit::InsertToken(position, token) => {
                if let Some(token) = tokens.get(*token) {
                    let at = at(*position);
                    bytes.splice(at..at, token.iter().copied());
                }
            }
            Edit::Delete(position, count) => {
                let start = at(*position).min(len);
                let end = (start + count).min(len);
                bytes.drain(start..end);
            }
            Edit::Truncate(position) => bytes.truncate(at(*position)),
            Edit::Copy(from, count, to) => {
                let start = at(*from).min(len);
                let end = (start + count).min(len);
                let span = bytes[start..end].to_vec();
                let to = at(*to).min(bytes.len());
                bytes.splice(to..to, span);
            }
        }
    }
    bytes
}

/// Cases for a long run: `MAILBRIDGE_FUZZ_CASES`, else a million.
pub fn long_run() -> Config {
    let cases = std::env::var("MAILBRIDGE_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    Config {
        cases,
        // Failures are reported, not stored beside the sources.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Cases for the suite's bounded run.
pub fn bounded(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Runs `check` on `cases` edited seeds (a long run), panicking with the
/// first failure; returns how many cases ran.
pub fn run_long(
    seeds: &[&[u8]],
    tokens: &[&[u8]],
    max_edits: usize,
    check: impl Fn(&[u8]) -> Result<(), proptest::test_runner::TestCaseError>,
) -> u32 {
    let config = long_run();
    let cases = config.cases;
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let started = std::time::Instant::now();
    let result = runner.run(
        &edited(seeds.len(), tokens.len(), max_edits),
        |(seed, edits)| check(&apply(seeds[seed], &edits, tokens)),
    );
    if let Err(failure) = result {
        panic!("{failure}");
    }
    eprintln!("{cases} cases in {:?}, no failure", started.elapsed());
    cases
}
