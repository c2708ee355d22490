//! CHECK: the pod's capture state, compared whole with what ADD would install now (the
//! engine measures the drift; this turns it into CNI's answer).

use super::{code, CniError};
use crate::config::Config;
use crate::engine::Engine;

/// How many differences a report lists before it only counts the rest: a pod with 10,000
/// excluded CIDRs whose chain was flushed should not produce a megabyte of JSON.
const LISTED: usize = 20;

/// Compares the pod's state (the current namespace) with `config`'s plan. `Ok(())` when
/// nothing of meshinit's differs; otherwise error 101 naming each difference.
pub fn check(config: &Config) -> Result<(), CniError> {
    let drift = Engine::of(&config.run)
        .drift(config)
        .map_err(|err| CniError::new(code::APPLY_FAILED, err.what(), err.cause()))?;
    if drift.is_empty() {
        return Ok(());
    }
    let total = drift.len();
    let mut details: Vec<String> = drift.iter().take(LISTED).map(ToString::to_string).collect();
    if total > LISTED {
        details.push(format!("and {} more", total - LISTED));
    }
    Err(CniError::new(
        code::DRIFT,
        format!(
            "capture rules drifted ({total} difference{} from the plan)",
            if total == 1 { "" } else { "s" }
        ),
        details.join("; "),
    ))
}
