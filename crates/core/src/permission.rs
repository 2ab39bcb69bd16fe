//! Permission requests: an agent asks before it runs a tool call, and a
//! policy or the user answers, exactly once.
//!
//! What lives here is the pure part: the policies ([`PermissionPolicy`]),
//! which option a static policy picks ([`policy_choice`]), and how an answer
//! posted by a user is judged against what the store holds ([`judge`]) — a
//! first answer is recorded, an identical retry replays the original, and
//! anything else (another option, a second answer, an answer after the turn
//! ended) is refused with the request's state.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{PermissionInfo, PermissionOptionInfo, Seq};

/// What an agent's permission requests get.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PermissionPolicy {
    /// Approve (once) every tool call the agent asks about.
    Allow,
    /// Refuse every one (the default: an unattended server grants nothing).
    #[default]
    Deny,
    /// Store the request, stream it, and wait for the user's answer
    /// (`POST /v1/sessions/{id}/permissions/{request_id}`).
    Ask,
}

impl PermissionPolicy {
    /// The name stored in the database and shown on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Ask => "ask",
        }
    }
}

impl fmt::Display for PermissionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PermissionPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            "ask" => Ok(Self::Ask),
            _ => Err(format!(
                "permission policy must be allow, deny or ask, not {s:?}"
            )),
        }
    }
}

/// The option a static policy picks among `options`: the first `allow_once`
/// (else `allow_always`) for `allow`, the first `reject_once` (else
/// `reject_always`) for `deny`. `None` for `ask`, or when no option fits
/// (the request is then answered `cancelled`).
pub fn policy_choice(
    policy: PermissionPolicy,
    options: &[PermissionOptionInfo],
) -> Option<&PermissionOptionInfo> {
    let wanted: &[&str] = match policy {
        PermissionPolicy::Allow => &["allow_once", "allow_always"],
        PermissionPolicy::Deny => &["reject_once", "reject_always"],
        PermissionPolicy::Ask => &[],
    };
    wanted
        .iter()
        .find_map(|k| options.iter().find(|o| o.kind == *k))
}

/// Where a permission request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PermissionState {
    /// Stored and streamed; the turn waits for an answer.
    Pending,
    /// An option was chosen (by the user or a policy).
    Answered,
    /// Closed without a choice: timed out, or its turn ended or was
    /// cancelled first.
    Cancelled,
}

impl PermissionState {
    /// The name stored in the database and shown on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Answered => "answered",
            Self::Cancelled => "cancelled",
        }
    }

    /// The inverse of [`PermissionState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "answered" => Self::Answered,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    /// The state a decision puts its request in.
    pub fn of_decision(decision: &PermissionInfo) -> Self {
        if decision.option_id.is_some() {
            Self::Answered
        } else {
            Self::Cancelled
        }
    }
}

/// A request's state as a refused answer reports it (`409`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PermissionStatus {
    pub request_id: String,
    pub state: PermissionState,
    /// The chosen option, when answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub option_id: Option<String>,
    /// `policy`, `user:<owner>`, `timeout`, `turn_end` or `shutdown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// The `permission_decision` entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_seq: Option<Seq>,
}

/// What to do with a user's answer, given what the store holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// The first answer: record it.
    Record,
    /// The same answer by the same user again: return the original.
    Replay,
    /// `option_id` is not one the request offered (`400`).
    UnknownOption,
    /// Already answered otherwise, or closed (`409`).
    Closed,
}

/// Judges `option_id` answered by `decided_by` for `request`, whose recorded
/// decision (if any) is `decision`. An unknown option is refused first,
/// whatever the state, so a malformed answer never reads as a conflict.
pub fn judge(
    request: &PermissionInfo,
    decision: Option<&PermissionInfo>,
    option_id: &str,
    decided_by: &str,
) -> Judgement {
    if !request.options.iter().any(|o| o.option_id == option_id) {
        return Judgement::UnknownOption;
    }
    match decision {
        None => Judgement::Record,
        Some(d)
            if d.option_id.as_deref() == Some(option_id)
                && d.decided_by.as_deref() == Some(decided_by) =>
        {
            Judgement::Replay
        }
        Some(_) => Judgement::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(id: &str, kind: &str) -> PermissionOptionInfo {
        PermissionOptionInfo {
            option_id: id.into(),
            name: id.into(),
            kind: kind.into(),
        }
    }

    fn request() -> PermissionInfo {
        PermissionInfo::request(
            Some("call-1".into()),
            Some("write file".into()),
            vec![
                option("yes", "allow_once"),
                option("always", "allow_always"),
                option("no", "reject_once"),
            ],
        )
    }

    #[test]
    fn static_policies_pick_the_first_option_of_their_kind() {
        let r = request();
        let pick = |p| policy_choice(p, &r.options).map(|o| o.option_id.as_str());
        assert_eq!(pick(PermissionPolicy::Allow), Some("yes"));
        assert_eq!(pick(PermissionPolicy::Deny), Some("no"));
        assert_eq!(pick(PermissionPolicy::Ask), None);
        let only_always = [option("a", "reject_always")];
        assert_eq!(
            policy_choice(PermissionPolicy::Deny, &only_always).map(|o| o.option_id.as_str()),
            Some("a")
        );
        assert_eq!(policy_choice(PermissionPolicy::Allow, &only_always), None);
    }

    #[test]
    fn an_answer_is_recorded_once_replayed_identically_and_refused_otherwise() {
        let r = request();
        assert_eq!(judge(&r, None, "yes", "user:a"), Judgement::Record);
        assert_eq!(judge(&r, None, "maybe", "user:a"), Judgement::UnknownOption);
        let d = r.decision(Some("yes".into()), "user:a");
        assert_eq!(judge(&r, Some(&d), "yes", "user:a"), Judgement::Replay);
        assert_eq!(judge(&r, Some(&d), "no", "user:a"), Judgement::Closed);
        assert_eq!(judge(&r, Some(&d), "yes", "user:b"), Judgement::Closed);
        assert_eq!(
            judge(&r, Some(&d), "maybe", "user:a"),
            Judgement::UnknownOption
        );
        let cancelled = r.decision(None, "timeout");
        assert_eq!(
            judge(&r, Some(&cancelled), "yes", "user:a"),
            Judgement::Closed
        );
        assert_eq!(
            PermissionState::of_decision(&cancelled),
            PermissionState::Cancelled
        );
        assert_eq!(PermissionState::of_decision(&d), PermissionState::Answered);
    }

    #[test]
    fn policies_and_states_round_trip_their_names() {
        for p in [
            PermissionPolicy::Allow,
            PermissionPolicy::Deny,
            PermissionPolicy::Ask,
        ] {
            assert_eq!(p.as_str().parse::<PermissionPolicy>(), Ok(p));
        }
        assert!("sometimes".parse::<PermissionPolicy>().is_err());
        for s in [
            PermissionState::Pending,
            PermissionState::Answered,
            PermissionState::Cancelled,
        ] {
            assert_eq!(PermissionState::parse(s.as_str()), Some(s));
        }
    }
}
