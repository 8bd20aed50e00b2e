//! Endpoint resolution for the SSO-OIDC service.
//!
//! This is a hand-written equivalent of the service's Smithy endpoint rule set
//! (`tests/fixtures/spec/endpoint-rule-set-1.json`, identical to the
//! `smithy.rules#endpointRuleSet` trait in the service model). The decision
//! tree, in order:
//!
//! 1. An explicit endpoint wins, but cannot be combined with FIPS or
//!    dual-stack.
//! 2. Without an explicit endpoint a region is required.
//! 3. The region picks a partition (the `aws.partition` function); the
//!    FIPS / dual-stack flags then pick the host name from the partition's DNS
//!    suffixes. `aws-us-gov` is special: its FIPS endpoint is the plain
//!    `oidc.{region}.amazonaws.com` host.
//!
//! One deliberate deviation from the AWS SDKs: they send any region that
//! matches no partition to the `aws` partition. Here a region that cannot be a
//! DNS label is [`EndpointError::MalformedRegion`] and a well-formed region that
//! matches no partition is [`EndpointError::UnknownRegion`], so a typo fails
//! fast instead of producing a host that does not exist.

use http::Uri;

/// Inputs of the endpoint rule set.
///
/// The fields map one-to-one onto the rule-set parameters `Region`, `UseFIPS`,
/// `UseDualStack` and `Endpoint`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointParams {
    /// The AWS region, e.g. `us-east-1` (`Region`).
    pub region: Option<String>,
    /// Use the FIPS-compliant endpoint (`UseFIPS`).
    pub use_fips: bool,
    /// Use the dual-stack (IPv4 + IPv6) endpoint (`UseDualStack`).
    pub use_dual_stack: bool,
    /// A custom endpoint URL that replaces the computed one (`Endpoint`).
    pub endpoint: Option<String>,
}

impl EndpointParams {
    /// Parameters for `region`, with FIPS and dual-stack off and no custom
    /// endpoint.
    pub fn region(region: impl Into<String>) -> Self {
        Self {
            region: Some(region.into()),
            ..Self::default()
        }
    }

    /// Turns the FIPS endpoint on or off.
    #[must_use]
    pub fn with_fips(mut self, use_fips: bool) -> Self {
        self.use_fips = use_fips;
        self
    }

    /// Turns the dual-stack endpoint on or off.
    #[must_use]
    pub fn with_dual_stack(mut self, use_dual_stack: bool) -> Self {
        self.use_dual_stack = use_dual_stack;
        self
    }

    /// Sets a custom endpoint URL, e.g. `https://oidc.example.internal`.
    #[must_use]
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }
}

/// Why no endpoint could be resolved.
///
/// The messages of the variants that come straight from the rule set are
/// reproduced verbatim, so they can be compared with the published test
/// vectors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// A custom endpoint was combined with FIPS.
    #[error("Invalid Configuration: FIPS and custom endpoint are not supported")]
    FipsWithCustomEndpoint,
    /// A custom endpoint was combined with dual-stack.
    #[error("Invalid Configuration: Dualstack and custom endpoint are not supported")]
    DualStackWithCustomEndpoint,
    /// The custom endpoint is not an absolute `http`/`https` URL with a host.
    #[error(
        "invalid custom endpoint {endpoint:?}: {problem}; \
         use an absolute http:// or https:// URL such as https://oidc.us-east-1.amazonaws.com"
    )]
    InvalidEndpoint {
        /// The endpoint as given, with any `user:password@` part masked.
        endpoint: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// Neither a custom endpoint nor a region was given.
    #[error("Invalid Configuration: Missing Region")]
    MissingRegion,
    /// The region cannot be a DNS label.
    #[error(
        "malformed region {region:?}: a region is a single DNS label of lowercase \
         letters, digits and inner hyphens, such as us-east-1"
    )]
    MalformedRegion {
        /// The region as given.
        region: String,
    },
    /// The region is well formed but belongs to no known AWS partition.
    #[error(
        "unknown region {region:?}: it matches no AWS partition; \
         use a region such as us-east-1, cn-north-1 or us-gov-west-1"
    )]
    UnknownRegion {
        /// The region as given.
        region: String,
    },
    /// FIPS and dual-stack were both requested, but the partition lacks one of
    /// them.
    #[error("FIPS and DualStack are enabled, but this partition does not support one or both")]
    FipsAndDualStackUnsupported {
        /// The requested region.
        region: String,
        /// The partition the region belongs to.
        partition: &'static str,
    },
    /// FIPS was requested, but the partition has no FIPS endpoints.
    #[error("FIPS is enabled but this partition does not support FIPS")]
    FipsUnsupported {
        /// The requested region.
        region: String,
        /// The partition the region belongs to.
        partition: &'static str,
    },
    /// Dual-stack was requested, but the partition has no dual-stack
    /// endpoints.
    #[error("DualStack is enabled but this partition does not support DualStack")]
    DualStackUnsupported {
        /// The requested region.
        region: String,
        /// The partition the region belongs to.
        partition: &'static str,
    },
}

/// Resolves the SSO-OIDC endpoint for `params`.
///
/// # Errors
///
/// See [`EndpointError`]: conflicting options, a missing, malformed or unknown
/// region, an invalid custom endpoint, or a FIPS / dual-stack request that the
/// region's partition cannot serve.
pub fn resolve_endpoint(params: &EndpointParams) -> Result<Uri, EndpointError> {
    if let Some(endpoint) = &params.endpoint {
        if params.use_fips {
            return Err(EndpointError::FipsWithCustomEndpoint);
        }
        if params.use_dual_stack {
            return Err(EndpointError::DualStackWithCustomEndpoint);
        }
        return parse_custom_endpoint(endpoint);
    }

    let region = params
        .region
        .as_deref()
        .ok_or(EndpointError::MissingRegion)?;
    if !is_well_formed_region(region) {
        return Err(EndpointError::MalformedRegion {
            region: region.to_owned(),
        });
    }
    let partition = partition_of(region).ok_or_else(|| EndpointError::UnknownRegion {
        region: region.to_owned(),
    })?;

    let name = partition.name;
    let url = match (params.use_fips, params.use_dual_stack) {
        (true, true) => {
            if !(partition.supports_fips && partition.supports_dual_stack) {
                return Err(EndpointError::FipsAndDualStackUnsupported {
                    region: region.to_owned(),
                    partition: name,
                });
            }
            format!(
                "https://oidc-fips.{region}.{}",
                partition.dual_stack_dns_suffix
            )
        }
        (true, false) => {
            if !partition.supports_fips {
                return Err(EndpointError::FipsUnsupported {
                    region: region.to_owned(),
                    partition: name,
                });
            }
            if name == "aws-us-gov" {
                format!("https://oidc.{region}.amazonaws.com")
            } else {
                format!("https://oidc-fips.{region}.{}", partition.dns_suffix)
            }
        }
        (false, true) => {
            if !partition.supports_dual_stack {
                return Err(EndpointError::DualStackUnsupported {
                    region: region.to_owned(),
                    partition: name,
                });
            }
            format!("https://oidc.{region}.{}", partition.dual_stack_dns_suffix)
        }
        (false, false) => format!("https://oidc.{region}.{}", partition.dns_suffix),
    };

    // The region was checked to be a DNS label and the suffixes are constants,
    // so this parse cannot fail; map a failure anyway rather than panic.
    Uri::try_from(url).map_err(|_| EndpointError::MalformedRegion {
        region: region.to_owned(),
    })
}

/// Checks a custom endpoint and turns it into a [`Uri`].
fn parse_custom_endpoint(endpoint: &str) -> Result<Uri, EndpointError> {
    let invalid = |problem| EndpointError::InvalidEndpoint {
        endpoint: mask_userinfo(endpoint),
        problem,
    };
    if endpoint.is_empty() {
        return Err(invalid("it is empty"));
    }
    let uri = Uri::try_from(endpoint).map_err(|_| invalid("it is not a valid URL"))?;
    match uri.scheme_str() {
        Some(scheme)
            if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("http") => {}
        Some(_) => return Err(invalid("the scheme must be http or https")),
        None => return Err(invalid("it has no scheme")),
    }
    let Some(authority) = uri.authority() else {
        return Err(invalid("it has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(invalid("it must not carry credentials"));
    }
    if authority.host().is_empty() {
        return Err(invalid("it has no host"));
    }
    Ok(uri)
}

/// Replaces a `user:password@` part of a URL-like string with `***@`, so that
/// error messages never echo credentials.
fn mask_userinfo(endpoint: &str) -> String {
    let authority_start = endpoint.find("://").map_or(0, |i| i + 3);
    let rest = &endpoint[authority_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_len].rfind('@') {
        Some(at) => format!(
            "{}***{}",
            &endpoint[..authority_start],
            &endpoint[authority_start + at..]
        ),
        None => endpoint.to_owned(),
    }
}

/// Whether `region` can be used as one DNS label: 1 to 63 characters of
/// lowercase ASCII letters, digits and hyphens, not starting or ending with a
/// hyphen.
fn is_well_formed_region(region: &str) -> bool {
    (1..=63).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !region.starts_with('-')
        && !region.ends_with('-')
}

/// One row of the partition table used by `aws.partition`.
#[derive(Debug)]
struct Partition {
    /// Partition id, e.g. `aws-us-gov`.
    name: &'static str,
    /// The pseudo-region that names the whole partition, e.g. `aws-global`.
    global_region: &'static str,
    /// Alternatives for `P` in the partition's region pattern
    /// `^P-\w+-\d+$`.
    region_prefixes: &'static [&'static str],
    /// Suffix of the regular host names.
    dns_suffix: &'static str,
    /// Suffix of the dual-stack host names.
    dual_stack_dns_suffix: &'static str,
    /// Whether FIPS endpoints exist.
    supports_fips: bool,
    /// Whether dual-stack endpoints exist.
    supports_dual_stack: bool,
}

/// The partitions known to the resolver (values from the AWS SDKs'
/// `partitions.json`).
///
/// The region patterns cannot overlap: `\w` does not match `-`, so the `aws`
/// pattern `^us-\w+-\d+$` has exactly three dash-separated parts and can never
/// match `us-gov-west-1` or `us-iso-east-1`.
static PARTITIONS: &[Partition] = &[
    Partition {
        name: "aws",
        global_region: "aws-global",
        region_prefixes: &["us", "eu", "ap", "sa", "ca", "me", "af", "il", "mx"],
        dns_suffix: "amazonaws.com",
        dual_stack_dns_suffix: "api.aws",
        supports_fips: true,
        supports_dual_stack: true,
    },
    Partition {
        name: "aws-cn",
        global_region: "aws-cn-global",
        region_prefixes: &["cn"],
        dns_suffix: "amazonaws.com.cn",
        dual_stack_dns_suffix: "api.amazonwebservices.com.cn",
        supports_fips: true,
        supports_dual_stack: true,
    },
    Partition {
        name: "aws-us-gov",
        global_region: "aws-us-gov-global",
        region_prefixes: &["us-gov"],
        dns_suffix: "amazonaws.com",
        dual_stack_dns_suffix: "api.aws",
        supports_fips: true,
        supports_dual_stack: true,
    },
    Partition {
        name: "aws-iso",
        global_region: "aws-iso-global",
        region_prefixes: &["us-iso"],
        dns_suffix: "c2s.ic.gov",
        dual_stack_dns_suffix: "c2s.ic.gov",
        supports_fips: true,
        supports_dual_stack: false,
    },
    Partition {
        name: "aws-iso-b",
        global_region: "aws-iso-b-global",
        region_prefixes: &["us-isob"],
        dns_suffix: "sc2s.sgov.gov",
        dual_stack_dns_suffix: "sc2s.sgov.gov",
        supports_fips: true,
        supports_dual_stack: false,
    },
    Partition {
        name: "aws-iso-e",
        global_region: "aws-iso-e-global",
        region_prefixes: &["eu-isoe"],
        dns_suffix: "cloud.adc-e.uk",
        dual_stack_dns_suffix: "cloud.adc-e.uk",
        supports_fips: true,
        supports_dual_stack: false,
    },
    Partition {
        name: "aws-iso-f",
        global_region: "aws-iso-f-global",
        region_prefixes: &["us-isof"],
        dns_suffix: "csp.hci.ic.gov",
        dual_stack_dns_suffix: "csp.hci.ic.gov",
        supports_fips: true,
        supports_dual_stack: false,
    },
    Partition {
        name: "aws-eusc",
        global_region: "aws-eusc-global",
        region_prefixes: &["eusc-de"],
        dns_suffix: "amazonaws.eu",
        dual_stack_dns_suffix: "amazonaws.eu",
        supports_fips: true,
        supports_dual_stack: false,
    },
];

/// The `aws.partition` function, minus the SDKs' fallback to `aws`: a global
/// pseudo-region names its partition, otherwise the first partition whose
/// region pattern matches wins.
fn partition_of(region: &str) -> Option<&'static Partition> {
    PARTITIONS
        .iter()
        .find(|p| p.global_region == region)
        .or_else(|| PARTITIONS.iter().find(|p| p.matches_pattern(region)))
}

impl Partition {
    /// Whether `region` matches `^(prefix1|prefix2|...)-\w+-\d+$`, with `\w`
    /// and `\d` taken as their ASCII classes.
    fn matches_pattern(&self, region: &str) -> bool {
        self.region_prefixes.iter().any(|prefix| {
            let Some(rest) = region
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('-'))
            else {
                return false;
            };
            let Some((word, digits)) = rest.split_once('-') else {
                return false;
            };
            !word.is_empty()
                && word.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resolves and renders without the trailing `/` that `Uri` adds.
    fn url(params: &EndpointParams) -> String {
        let uri = resolve_endpoint(params).unwrap_or_else(|e| panic!("{params:?}: {e}"));
        uri.to_string().trim_end_matches('/').to_owned()
    }

    fn err(params: &EndpointParams) -> EndpointError {
        match resolve_endpoint(params) {
            Ok(uri) => panic!("{params:?} resolved to {uri}, expected an error"),
            Err(e) => e,
        }
    }

    fn p(region: &str, fips: bool, dual_stack: bool) -> EndpointParams {
        EndpointParams::region(region)
            .with_fips(fips)
            .with_dual_stack(dual_stack)
    }

    #[test]
    fn builder_sets_fields() {
        let params = EndpointParams::region("eu-west-1")
            .with_fips(true)
            .with_dual_stack(true)
            .with_endpoint("https://example.com");
        assert_eq!(
            params,
            EndpointParams {
                region: Some("eu-west-1".into()),
                use_fips: true,
                use_dual_stack: true,
                endpoint: Some("https://example.com".into()),
            }
        );
        assert_eq!(EndpointParams::default().region, None);
    }

    #[test]
    fn aws_all_four_combinations() {
        assert_eq!(
            url(&p("us-east-1", false, false)),
            "https://oidc.us-east-1.amazonaws.com"
        );
        assert_eq!(
            url(&p("us-east-1", true, false)),
            "https://oidc-fips.us-east-1.amazonaws.com"
        );
        assert_eq!(
            url(&p("us-east-1", false, true)),
            "https://oidc.us-east-1.api.aws"
        );
        assert_eq!(
            url(&p("us-east-1", true, true)),
            "https://oidc-fips.us-east-1.api.aws"
        );
        assert_eq!(
            url(&p("mx-central-1", false, false)),
            "https://oidc.mx-central-1.amazonaws.com"
        );
        assert_eq!(
            url(&p("il-central-1", false, false)),
            "https://oidc.il-central-1.amazonaws.com"
        );
    }

    #[test]
    fn china_all_four_combinations() {
        assert_eq!(
            url(&p("cn-north-1", false, false)),
            "https://oidc.cn-north-1.amazonaws.com.cn"
        );
        assert_eq!(
            url(&p("cn-north-1", true, false)),
            "https://oidc-fips.cn-north-1.amazonaws.com.cn"
        );
        assert_eq!(
            url(&p("cn-north-1", false, true)),
            "https://oidc.cn-north-1.api.amazonwebservices.com.cn"
        );
        assert_eq!(
            url(&p("cn-north-1", true, true)),
            "https://oidc-fips.cn-north-1.api.amazonwebservices.com.cn"
        );
    }

    #[test]
    fn gov_cloud_fips_uses_plain_host() {
        assert_eq!(
            url(&p("us-gov-west-1", false, false)),
            "https://oidc.us-gov-west-1.amazonaws.com"
        );
        assert_eq!(
            url(&p("us-gov-west-1", true, false)),
            "https://oidc.us-gov-west-1.amazonaws.com"
        );
        assert_eq!(
            url(&p("us-gov-east-1", false, true)),
            "https://oidc.us-gov-east-1.api.aws"
        );
        assert_eq!(
            url(&p("us-gov-east-1", true, true)),
            "https://oidc-fips.us-gov-east-1.api.aws"
        );
    }

    #[test]
    fn iso_partitions() {
        assert_eq!(
            url(&p("us-iso-east-1", false, false)),
            "https://oidc.us-iso-east-1.c2s.ic.gov"
        );
        assert_eq!(
            url(&p("us-iso-east-1", true, false)),
            "https://oidc-fips.us-iso-east-1.c2s.ic.gov"
        );
        assert_eq!(
            err(&p("us-iso-east-1", false, true)),
            EndpointError::DualStackUnsupported {
                region: "us-iso-east-1".into(),
                partition: "aws-iso"
            }
        );
        assert_eq!(
            err(&p("us-iso-east-1", true, true)),
            EndpointError::FipsAndDualStackUnsupported {
                region: "us-iso-east-1".into(),
                partition: "aws-iso"
            }
        );

        assert_eq!(
            url(&p("us-isob-east-1", false, false)),
            "https://oidc.us-isob-east-1.sc2s.sgov.gov"
        );
        assert_eq!(
            url(&p("us-isob-east-1", true, false)),
            "https://oidc-fips.us-isob-east-1.sc2s.sgov.gov"
        );
        assert!(matches!(
            err(&p("us-isob-east-1", false, true)),
            EndpointError::DualStackUnsupported {
                partition: "aws-iso-b",
                ..
            }
        ));

        assert_eq!(
            url(&p("eu-isoe-west-1", false, false)),
            "https://oidc.eu-isoe-west-1.cloud.adc-e.uk"
        );
        assert_eq!(
            url(&p("us-isof-south-1", true, false)),
            "https://oidc-fips.us-isof-south-1.csp.hci.ic.gov"
        );
    }

    #[test]
    fn unsupported_error_messages_match_rule_set() {
        assert_eq!(
            err(&p("us-iso-east-1", true, true)).to_string(),
            "FIPS and DualStack are enabled, but this partition does not support one or both"
        );
        assert_eq!(
            err(&p("us-iso-east-1", false, true)).to_string(),
            "DualStack is enabled but this partition does not support DualStack"
        );
        // Every listed partition supports FIPS, so the FIPS-only error is not
        // reachable through the table; check its text directly.
        assert!(PARTITIONS.iter().all(|p| p.supports_fips));
        assert_eq!(
            EndpointError::FipsUnsupported {
                region: "x-y-1".into(),
                partition: "aws"
            }
            .to_string(),
            "FIPS is enabled but this partition does not support FIPS"
        );
    }

    #[test]
    fn global_pseudo_regions() {
        assert_eq!(
            url(&p("aws-global", false, false)),
            "https://oidc.aws-global.amazonaws.com"
        );
        assert_eq!(
            url(&p("aws-cn-global", false, false)),
            "https://oidc.aws-cn-global.amazonaws.com.cn"
        );
        assert_eq!(
            url(&p("aws-us-gov-global", true, false)),
            "https://oidc.aws-us-gov-global.amazonaws.com"
        );
        assert_eq!(
            url(&p("aws-iso-global", false, false)),
            "https://oidc.aws-iso-global.c2s.ic.gov"
        );
        assert_eq!(
            url(&p("aws-iso-b-global", false, false)),
            "https://oidc.aws-iso-b-global.sc2s.sgov.gov"
        );
        assert_eq!(
            url(&p("aws-iso-e-global", false, false)),
            "https://oidc.aws-iso-e-global.cloud.adc-e.uk"
        );
        assert_eq!(
            url(&p("aws-iso-f-global", false, false)),
            "https://oidc.aws-iso-f-global.csp.hci.ic.gov"
        );
    }

    #[test]
    fn every_region_matches_exactly_one_partition() {
        for (region, partition) in [
            ("us-east-1", "aws"),
            ("us-gov-west-1", "aws-us-gov"),
            ("us-iso-east-1", "aws-iso"),
            ("us-isob-east-1", "aws-iso-b"),
            ("us-isof-east-1", "aws-iso-f"),
            ("eu-isoe-west-1", "aws-iso-e"),
            ("eu-west-1", "aws"),
            ("cn-northwest-1", "aws-cn"),
        ] {
            let hits: Vec<_> = PARTITIONS
                .iter()
                .filter(|p| p.matches_pattern(region))
                .map(|p| p.name)
                .collect();
            assert_eq!(hits, [partition], "{region}");
        }
    }

    #[test]
    fn pattern_matching_follows_the_regex() {
        let aws = &PARTITIONS[0];
        assert!(aws.matches_pattern("us-east-1"));
        assert!(aws.matches_pattern("ap-southeast-12"));
        assert!(aws.matches_pattern("eu-a_b-1"));
        assert!(!aws.matches_pattern("us-east"));
        assert!(!aws.matches_pattern("us-east-1a"));
        assert!(!aws.matches_pattern("us--1"));
        assert!(!aws.matches_pattern("us-east-"));
        assert!(!aws.matches_pattern("xx-east-1"));
        assert!(!aws.matches_pattern("use-east-1"));
        assert!(!aws.matches_pattern("us-gov-west-1"));
    }

    #[test]
    fn malformed_regions() {
        for region in [
            "",
            "US-EAST-1",
            "us east 1",
            "us-east-1.",
            "us.east.1",
            "-us-east-1",
            "us-east-1-",
            "us_east_1",
            "us-east-1\n",
            "us-east-1/x",
            "ü-east-1",
            &"a".repeat(64),
        ] {
            let e = err(&EndpointParams::region(region));
            assert_eq!(
                e,
                EndpointError::MalformedRegion {
                    region: region.to_owned()
                },
                "{region:?}"
            );
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            assert!(msg.contains("us-east-1"), "{msg}");
        }
        let msg = err(&EndpointParams::region("Us-East-1")).to_string();
        assert!(msg.starts_with("malformed region \"Us-East-1\""), "{msg}");
    }

    #[test]
    fn eusc_partition() {
        assert_eq!(
            url(&p("eusc-de-east-1", false, false)),
            "https://oidc.eusc-de-east-1.amazonaws.eu"
        );
        assert_eq!(
            url(&p("eusc-de-east-1", true, false)),
            "https://oidc-fips.eusc-de-east-1.amazonaws.eu"
        );
        assert!(matches!(
            err(&p("eusc-de-east-1", false, true)),
            EndpointError::DualStackUnsupported { .. }
        ));
    }

    #[test]
    fn unknown_regions() {
        for region in [
            "mars-east-1",
            "us-east",
            "useast1",
            "fips-us-east-1",
            "us-east-1-fips",
            "eusc-fr-east-1",
        ] {
            let e = err(&EndpointParams::region(region).with_fips(true));
            assert_eq!(
                e,
                EndpointError::UnknownRegion {
                    region: region.to_owned()
                }
            );
            let msg = e.to_string();
            assert!(msg.contains(&format!("{region:?}")), "{msg}");
            assert!(msg.contains("us-east-1"), "{msg}");
        }
    }

    #[test]
    fn missing_region() {
        let e = err(&EndpointParams::default());
        assert_eq!(e, EndpointError::MissingRegion);
        assert_eq!(e.to_string(), "Invalid Configuration: Missing Region");
        assert_eq!(
            err(&EndpointParams::default()
                .with_fips(true)
                .with_dual_stack(true)),
            EndpointError::MissingRegion
        );
    }

    #[test]
    fn custom_endpoint() {
        let params = EndpointParams::region("us-east-1").with_endpoint("https://example.com");
        assert_eq!(url(&params), "https://example.com");
        // Region is not needed, nor checked, when an endpoint is given.
        let params = EndpointParams::default().with_endpoint("http://localhost:8080/oidc");
        assert_eq!(url(&params), "http://localhost:8080/oidc");
        let params = EndpointParams::region("NOT A REGION").with_endpoint("https://example.com");
        assert_eq!(url(&params), "https://example.com");
    }

    #[test]
    fn custom_endpoint_conflicts() {
        let base = EndpointParams::region("us-east-1").with_endpoint("https://example.com");
        let e = err(&base.clone().with_fips(true));
        assert_eq!(e, EndpointError::FipsWithCustomEndpoint);
        assert_eq!(
            e.to_string(),
            "Invalid Configuration: FIPS and custom endpoint are not supported"
        );
        let e = err(&base.clone().with_dual_stack(true));
        assert_eq!(e, EndpointError::DualStackWithCustomEndpoint);
        assert_eq!(
            e.to_string(),
            "Invalid Configuration: Dualstack and custom endpoint are not supported"
        );
        // FIPS is checked first, as in the rule set.
        assert_eq!(
            err(&base.with_fips(true).with_dual_stack(true)),
            EndpointError::FipsWithCustomEndpoint
        );
    }

    #[test]
    fn custom_endpoint_must_be_absolute_http_url() {
        for (endpoint, problem) in [
            ("", "it is empty"),
            ("not a url", "it is not a valid URL"),
            ("example.com", "it has no scheme"),
            ("/oidc", "it has no scheme"),
            ("ftp://example.com", "the scheme must be http or https"),
            ("https://", "it is not a valid URL"),
        ] {
            let e = err(&EndpointParams::default().with_endpoint(endpoint));
            assert_eq!(
                e,
                EndpointError::InvalidEndpoint {
                    endpoint: endpoint.to_owned(),
                    problem
                },
                "{endpoint:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains(&format!("{endpoint:?}")), "{msg}");
            assert!(msg.contains("https://"), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn custom_endpoint_credentials_are_rejected_and_masked() {
        let e =
            err(&EndpointParams::default().with_endpoint("https://alice:hunter2@example.com/x"));
        assert_eq!(
            e,
            EndpointError::InvalidEndpoint {
                endpoint: "https://***@example.com/x".into(),
                problem: "it must not carry credentials"
            }
        );
        assert!(!e.to_string().contains("hunter2"));
        // Masking also applies when the value does not even parse.
        assert_eq!(mask_userinfo("https://a b:c@host"), "https://***@host");
        assert_eq!(mask_userinfo("user:pw@host/p@th"), "***@host/p@th");
        assert_eq!(mask_userinfo("https://host/p@th"), "https://host/p@th");
    }
}
