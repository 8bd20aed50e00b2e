//! Scripted faults: what the emulator answers instead of (or before) the
//! normal handling of an operation.

use std::{fmt, time::Duration};

use serde::{
    Deserialize, Deserializer, Serialize, Serializer, de::Error as _, ser::SerializeMap as _,
};

use crate::oidc::ServiceErrorKind;

/// One fault the emulator plays back instead of handling a call normally.
///
/// On the admin route a fault is written as a string — any
/// [`ServiceErrorKind`] name (`"SlowDown"`, `"InternalServer"`, also with the
/// `Exception` suffix), `"Html502"` or `"Malformed200"` — or as an object:
/// `{"empty_body": 503}` or `{"delay_ms": 500}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer this modelled error, shaped exactly like the real service's.
    Error(ServiceErrorKind),
    /// Answer `502 Bad Gateway` with an HTML page (`content-type: text/html`)
    /// and no `x-amzn-ErrorType` header, as a load balancer would.
    Html502,
    /// Answer this status with an empty body. Statuses outside `200..=999`
    /// are answered as `500`.
    EmptyBody(u16),
    /// Answer `200 OK` with truncated JSON: `{"accessToken": 5`.
    Malformed200,
    /// Wait this long, then handle the call normally.
    Delay(Duration),
}

impl Fault {
    /// The label the fault is counted under in
    /// [`Counters::errors_by_kind`](super::Counters::errors_by_kind), or
    /// `None` for [`Fault::Delay`], which is not an error by itself.
    pub(crate) fn error_label(self) -> Option<&'static str> {
        match self {
            Self::Error(kind) => Some(kind.name()),
            Self::Html502 => Some("Html502"),
            Self::EmptyBody(_) => Some("EmptyBody"),
            Self::Malformed200 => Some("Malformed200"),
            Self::Delay(_) => None,
        }
    }
}

impl From<ServiceErrorKind> for Fault {
    fn from(kind: ServiceErrorKind) -> Self {
        Self::Error(kind)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Error(kind) => f.write_str(kind.name()),
            Self::Html502 => f.write_str("Html502"),
            Self::EmptyBody(status) => write!(f, "EmptyBody({status})"),
            Self::Malformed200 => f.write_str("Malformed200"),
            Self::Delay(d) => write!(f, "Delay({}ms)", d.as_millis()),
        }
    }
}

impl Serialize for Fault {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Error(kind) => serializer.serialize_str(kind.name()),
            Self::Html502 => serializer.serialize_str("Html502"),
            Self::Malformed200 => serializer.serialize_str("Malformed200"),
            Self::EmptyBody(status) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("empty_body", status)?;
                map.end()
            }
            Self::Delay(d) => {
                let millis = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("delay_ms", &millis)?;
                map.end()
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBodyRepr {
    empty_body: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelayRepr {
    delay_ms: u64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FaultRepr {
    Name(String),
    EmptyBody(EmptyBodyRepr),
    Delay(DelayRepr),
}

const EXPECTED: &str = "a ServiceErrorKind name such as \"SlowDown\", \"Html502\", \"Malformed200\", \
                        {\"empty_body\": STATUS} or {\"delay_ms\": N}";

impl<'de> Deserialize<'de> for Fault {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let repr = FaultRepr::deserialize(deserializer)
            .map_err(|_| D::Error::custom(format!("invalid fault; expected {EXPECTED}")))?;
        match repr {
            FaultRepr::Name(name) => match name.as_str() {
                "Html502" => Ok(Self::Html502),
                "Malformed200" => Ok(Self::Malformed200),
                other => ServiceErrorKind::from_type_name(other)
                    .map(Self::Error)
                    .ok_or_else(|| {
                        D::Error::custom(format!("unknown fault {other:?}; expected {EXPECTED}"))
                    }),
            },
            FaultRepr::EmptyBody(EmptyBodyRepr { empty_body }) => {
                if (200..=999).contains(&empty_body) {
                    Ok(Self::EmptyBody(empty_body))
                } else {
                    Err(D::Error::custom(format!(
                        "empty_body status {empty_body} is outside 200..=999"
                    )))
                }
            }
            FaultRepr::Delay(DelayRepr { delay_ms }) => {
                Ok(Self::Delay(Duration::from_millis(delay_ms)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_round_trip_through_their_admin_form() {
        let mut all: Vec<Fault> = ServiceErrorKind::ALL
            .into_iter()
            .map(Fault::Error)
            .collect();
        all.extend([
            Fault::Html502,
            Fault::Malformed200,
            Fault::EmptyBody(503),
            Fault::Delay(Duration::from_millis(250)),
        ]);
        for fault in all {
            let text = serde_json::to_string(&fault).unwrap();
            let back: Fault = serde_json::from_str(&text).unwrap();
            assert_eq!(back, fault, "{text}");
        }
    }

    #[test]
    fn admin_spellings_parse() {
        let parsed: Vec<Fault> = serde_json::from_str(
            r#"["SlowDown","InternalServerException","Html502","Malformed200",{"empty_body":503},{"delay_ms":500}]"#,
        )
        .unwrap();
        assert_eq!(
            parsed,
            vec![
                Fault::Error(ServiceErrorKind::SlowDown),
                Fault::Error(ServiceErrorKind::InternalServer),
                Fault::Html502,
                Fault::Malformed200,
                Fault::EmptyBody(503),
                Fault::Delay(Duration::from_millis(500)),
            ]
        );
        assert_eq!(
            serde_json::to_string(&Fault::EmptyBody(503)).unwrap(),
            r#"{"empty_body":503}"#
        );
        assert_eq!(
            serde_json::to_string(&Fault::Delay(Duration::from_millis(500))).unwrap(),
            r#"{"delay_ms":500}"#
        );
    }

    #[test]
    fn bad_faults_are_rejected() {
        for bad in [
            r#""NoSuchThing""#,
            r#"{"empty_body":42}"#,
            r#"{"delay_ms":"x"}"#,
            r#"{"other":1}"#,
            "7",
        ] {
            assert!(serde_json::from_str::<Fault>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels() {
        assert_eq!(
            Fault::Error(ServiceErrorKind::SlowDown).error_label(),
            Some("SlowDown")
        );
        assert_eq!(Fault::EmptyBody(500).error_label(), Some("EmptyBody"));
        assert_eq!(Fault::Delay(Duration::ZERO).error_label(), None);
    }
}
