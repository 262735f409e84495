//! Typed refusals between peers: a stale generation (the caller was fenced
//! off by a promotion) and split-brain (both sides took writes as primary
//! since they split). They travel as a gRPC status with the kind in the
//! `ember-error` metadata key, so neither side parses messages.

use tonic::Status;
use tonic::metadata::MetadataValue;

const KIND: &str = "ember-error";
const GENERATION: &str = "ember-generation";

/// A refusal a primary must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The other side holds the volume at a newer `generation`.
    StaleGeneration { generation: u64 },
    /// Both sides diverged; an admin must name the loser.
    SplitBrain,
}

/// The status for a caller whose `theirs` generation is older than `ours`.
pub(crate) fn stale_generation(volume: &str, theirs: u64, ours: u64) -> Status {
    let mut status = Status::failed_precondition(format!(
        "stale generation: volume {volume} is at generation {ours} here, the caller at {theirs}; \
         it was promoted elsewhere and the caller must not act as its primary"
    ));
    status
        .metadata_mut()
        .insert(KIND, MetadataValue::from_static("stale-generation"));
    status.metadata_mut().insert(
        GENERATION,
        MetadataValue::try_from(ours.to_string()).expect("digits are valid metadata"),
    );
    status
}

/// The status for split-brain on `volume`.
pub(crate) fn split_brain(volume: &str, detail: &str) -> Status {
    let mut status = Status::failed_precondition(format!(
        "split-brain on volume {volume}: {detail}; run `emberctl replica demote {volume} --discard-local` \
         on the site whose writes should be discarded"
    ));
    status
        .metadata_mut()
        .insert(KIND, MetadataValue::from_static("split-brain"));
    status
}

/// Reads a typed refusal out of a status, if it is one.
pub(crate) fn refusal(status: &Status) -> Option<Refusal> {
    match status.metadata().get(KIND)?.to_str().ok()? {
        "stale-generation" => {
            let generation = status
                .metadata()
                .get(GENERATION)?
                .to_str()
                .ok()?
                .parse()
                .ok()?;
            Some(Refusal::StaleGeneration { generation })
        }
        "split-brain" => Some(Refusal::SplitBrain),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_round_trip_and_plain_statuses_are_not_refusals() {
        assert_eq!(
            refusal(&stale_generation("v", 3, 4)),
            Some(Refusal::StaleGeneration { generation: 4 })
        );
        assert_eq!(refusal(&split_brain("v", "x")), Some(Refusal::SplitBrain));
        assert_eq!(
            refusal(&Status::failed_precondition("stale generation")),
            None
        );
    }
}
