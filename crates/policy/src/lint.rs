//! Semantic checks over a loaded policy set, on top of the schema and reference checks the
//! loader already made. Every check has a stable code listed in [`CODES`].

use crate::diag::Severity;

/// A lint code: stable, documented in docs/policy.md.
#[derive(Debug, Clone, Copy)]
pub struct Code {
    pub code: &'static str,
    pub name: &'static str,
    pub severity: Severity,
    pub summary: &'static str,
}

/// Every code the loader and the linter emit.
pub const CODES: &[Code] = &[
    Code {
        code: "MW101",
        name: "YamlSyntax",
        severity: Severity::Error,
        summary: "the file is not valid YAML",
    },
    Code {
        code: "MW102",
        name: "UnknownField",
        severity: Severity::Error,
        summary: "a field the schema does not know (often a typo)",
    },
    Code {
        code: "MW103",
        name: "InvalidValue",
        severity: Severity::Error,
        summary: "a value of the wrong type or out of range",
    },
    Code {
        code: "MW104",
        name: "MissingField",
        severity: Severity::Error,
        summary: "a required field is missing",
    },
    Code {
        code: "MW105",
        name: "UnknownKind",
        severity: Severity::Error,
        summary: "an unknown kind or apiVersion",
    },
    Code {
        code: "MW106",
        name: "Duplicate",
        severity: Severity::Error,
        summary: "two resources (or rules) with the same name",
    },
    Code {
        code: "MW107",
        name: "MalformedIdentity",
        severity: Severity::Error,
        summary: "a malformed SPIFFE ID, identity pattern or trust domain",
    },
    Code {
        code: "MW108",
        name: "MalformedMatcher",
        severity: Severity::Error,
        summary: "a malformed path, host, method or header matcher",
    },
    Code {
        code: "MW109",
        name: "Unreadable",
        severity: Severity::Error,
        summary: "a file or directory that cannot be read",
    },
    Code {
        code: "MW201",
        name: "UnknownWorkload",
        severity: Severity::Error,
        summary: "a reference to a workload that does not exist",
    },
    Code {
        code: "MW202",
        name: "UnknownService",
        severity: Severity::Error,
        summary: "a reference to a service that does not exist",
    },
    Code {
        code: "MW203",
        name: "UnknownNamespace",
        severity: Severity::Warning,
        summary: "a namespace no workload runs in",
    },
    Code {
        code: "MW204",
        name: "MeshMissing",
        severity: Severity::Error,
        summary: "no `Mesh` resource, or more than one",
    },
    Code {
        code: "MW205",
        name: "UnknownIdentity",
        severity: Severity::Warning,
        summary: "an exact identity no workload has, in the mesh's own trust domain",
    },
    Code {
        code: "MW206",
        name: "UnfederatedTrustDomain",
        severity: Severity::Warning,
        summary: "a foreign trust domain with no `TrustDomainFederation`",
    },
    Code {
        code: "MW207",
        name: "UnknownAttribute",
        severity: Severity::Warning,
        summary: "an attribute key no workload declares",
    },
    Code {
        code: "MW301",
        name: "NeverMatches",
        severity: Severity::Error,
        summary: "a rule that can never match any request",
    },
    Code {
        code: "MW302",
        name: "ShadowedByDeny",
        severity: Severity::Warning,
        summary: "an ALLOW rule whose every request a DENY rule denies first",
    },
    Code {
        code: "MW303",
        name: "IneffectiveAllow",
        severity: Severity::Warning,
        summary: "an ALLOW rule a higher tier never allows",
    },
    Code {
        code: "MW304",
        name: "HttpOnTcp",
        severity: Severity::Error,
        summary: "HTTP conditions on a port that carries plain TCP",
    },
    Code {
        code: "MW305",
        name: "OverrideNoExpiry",
        severity: Severity::Error,
        summary: "an override without `expiresAt`",
    },
    Code {
        code: "MW306",
        name: "OverrideTooLong",
        severity: Severity::Error,
        summary: "an override longer than the mesh allows",
    },
    Code {
        code: "MW307",
        name: "DryRunLeftOn",
        severity: Severity::Warning,
        summary: "a policy in dry-run mode",
    },
    Code {
        code: "MW308",
        name: "OverrideExpired",
        severity: Severity::Warning,
        summary: "an override that has expired and can be removed",
    },
    Code {
        code: "MW309",
        name: "AllowsPlaintext",
        severity: Severity::Warning,
        summary: "an ALLOW rule that also admits plaintext (unauthenticated) sources",
    },
    Code {
        code: "MW310",
        name: "DefaultAllow",
        severity: Severity::Warning,
        summary: "the mesh default action is ALLOW",
    },
    Code {
        code: "MW311",
        name: "TargetsNothing",
        severity: Severity::Warning,
        summary: "a policy whose target matches no workload",
    },
    Code {
        code: "MW312",
        name: "TierScope",
        severity: Severity::Error,
        summary: "a policy's target does not fit its tier",
    },
    Code {
        code: "MW313",
        name: "ConflictingAttributes",
        severity: Severity::Error,
        summary: "workloads sharing an identity declare different attributes",
    },
];
