"""The API of ``openledger.io/v1alpha1``: the one source of truth for the CRDs.

``openledger crds generate`` writes ``crds/*.yaml`` from ``crd_documents()``; a
unit test fails when the committed YAML differs from what this module produces.
Every field carries a description (``kubectl explain model.spec.scaling`` teaches
the API), bounds, enums, defaults and patterns; cross-field rules are CEL
``x-kubernetes-validations`` so the API server itself rejects a bad manifest
with a message naming the field.

Money is a decimal string of whole tokens (``openledger.money.MONEY_PATTERN``);
the controllers convert it to ``int`` base units with ``to_base_units``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from openledger.money import MONEY_PATTERN

GROUP = "openledger.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "openledger"

ADDRESS_PATTERN = r"^0x[0-9a-fA-F]{40}$"
# Kubernetes resource.Quantity, as the upstream CRDs spell it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
STORAGE_URI_PATTERN = r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^\s]+$"
HEX32_PATTERN = r"^0x[0-9a-fA-F]{64}$"
# KServe derives longer child names (<name>-predictor-00001, …) from the
# InferenceService name, which must be a DNS-1035 label; 45 leaves room for them.
MODEL_NAME_MAX = 45

Schema = dict[str, Any]


# ----------------------------------------------------------------- builders


def _string(description: str, **extra: Any) -> Schema:
    return {"type": "string", "description": description, **extra}


def _integer(description: str, **extra: Any) -> Schema:
    return {"type": "integer", "description": description, **extra}


def _boolean(description: str, **extra: Any) -> Schema:
    return {"type": "boolean", "description": description, **extra}


def _object(
    description: str,
    properties: dict[str, Schema],
    *,
    required: list[str] | None = None,
    rules: list[Schema] | None = None,
    **extra: Any,
) -> Schema:
    schema: Schema = {"type": "object", "description": description, "properties": properties, **extra}
    if required:
        schema["required"] = required
    if rules:
        schema["x-kubernetes-validations"] = rules
    return schema


def _money(description: str, **extra: Any) -> Schema:
    return _string(
        description + ' A decimal string of whole tokens, e.g. "0.000001" (never a float).',
        pattern=MONEY_PATTERN,
        maxLength=80,
        **extra,
    )


def _address(description: str) -> Schema:
    return _string(description + " An EVM address: 0x followed by 40 hex digits.", pattern=ADDRESS_PATTERN)


def _quantity(description: str) -> Schema:
    return {
        "description": description,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": QUANTITY_PATTERN,
        "x-kubernetes-int-or-string": True,
    }


def _rule(rule: str, message: str, field_path: str | None = None) -> Schema:
    out: Schema = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def _decimals_rule(field: str) -> Schema:
    """The money string ``field`` has no more fraction digits than ``decimals``."""
    return _rule(
        f"!has(self.{field}) || self.{field}.indexOf('.') < 0 || "
        f"size(self.{field}) - self.{field}.indexOf('.') - 1 <= self.decimals",
        f"{field} has more decimal places than decimals allows",
        f".{field}",
    )


def conditions_schema(types: list[str]) -> Schema:
    """``status.conditions``: the standard Kubernetes condition shape."""
    return {
        "type": "array",
        "description": "Current state, one entry per condition type (" + ", ".join(types) + ").",
        "maxItems": 16,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": _object(
            "One observation of the object's state.",
            {
                "type": _string("Condition type: " + ", ".join(types) + ".", maxLength=64),
                "status": _string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
                "reason": _string("Machine-readable CamelCase reason for the last transition.", maxLength=128),
                "message": _string("Human-readable details about the last transition.", maxLength=4096),
                "lastTransitionTime": _string("When status last changed.", format="date-time"),
                "observedGeneration": _integer(
                    "The .metadata.generation the condition was computed from.", format="int64", minimum=0
                ),
            },
            required=["type", "status"],
        ),
    }


def _observed_generation() -> Schema:
    return _integer("The .metadata.generation the controller last acted on.", format="int64", minimum=0)


def _secret_key_ref(description: str) -> Schema:
    return _object(
        description,
        {
            "name": _string(
                "Name of the Secret in the RewardPool's namespace.", pattern=DNS_SUBDOMAIN_PATTERN, maxLength=253
            ),
            "key": _string("Key inside the Secret's data.", minLength=1, maxLength=253, pattern=r"^[-._a-zA-Z0-9]+$"),
        },
        required=["name", "key"],
    )


def _label_selector(description: str) -> Schema:
    return _object(
        description,
        {
            "matchLabels": {
                "type": "object",
                "description": "Labels a Model must carry (all of them) to be selected.",
                "additionalProperties": {"type": "string"},
                "maxProperties": 32,
            },
            "matchExpressions": {
                "type": "array",
                "description": "Set-based requirements, all of which must hold.",
                "maxItems": 32,
                "items": _object(
                    "One requirement on a label.",
                    {
                        "key": _string("The label key.", minLength=1, maxLength=317),
                        "operator": _string(
                            "How key relates to values.", enum=["In", "NotIn", "Exists", "DoesNotExist"]
                        ),
                        "values": {
                            "type": "array",
                            "description": "Values for In and NotIn; empty for Exists and DoesNotExist.",
                            "maxItems": 64,
                            "items": {"type": "string", "maxLength": 63},
                        },
                    },
                    required=["key", "operator"],
                    rules=[
                        _rule(
                            "self.operator in ['Exists', 'DoesNotExist'] ? !has(self.values) || size(self.values) == 0"
                            " : has(self.values) && size(self.values) > 0",
                            "values must be set for In/NotIn and empty for Exists/DoesNotExist",
                            ".values",
                        )
                    ],
                ),
            },
        },
    )


# -------------------------------------------------------------------- Model

MODEL_PHASES = ["Pending", "Deploying", "Ready", "Degraded", "Failed"]
MODEL_CONDITIONS = ["Ready", "InferenceServiceReady", "Priced", "ScalingSupported"]


# What KServe can scale on in each deployment mode (read from KServe's webhook and
# reconcilers): Knative's Pod Autoscaler knows concurrency and rps; Standard mode's HPA
# knows only cpu and memory (any other scaleMetric leaves the HPA without metrics, and
# Kubernetes then scales on CPU); KEDA (autoscalerClass keda) takes Prometheus queries.
SCALE_METRICS_BY_MODE: dict[str, tuple[str, ...]] = {
    "Knative": ("concurrency", "rps"),
    "Standard": ("cpu", "memory", "inflight"),
}
SCALE_METRICS = ("concurrency", "rps", "cpu", "memory", "inflight")
DEFAULT_SCALE_METRIC = {"Knative": "concurrency", "Standard": "cpu"}
URL_PATTERN = r"^https?://[^\s/]+(/[^\s]*)?$"


def model_scaling_schema() -> Schema:
    return _object(
        "Replica bounds and the autoscaling signal. What KServe can use depends on deploymentMode: Knative"
        " scales on concurrency or rps (Knative Pod Autoscaler) and to zero; Standard scales on cpu or memory"
        " (HPA), or on inflight, the in-flight requests the gateway reports for this Model (KEDA with a"
        " Prometheus query), which can also scale to zero.",
        {
            "minReplicas": _integer(
                "Fewest replicas; 0 scales to zero when idle (needs deploymentMode Knative, or metric inflight).",
                minimum=0,
                maximum=1000,
                default=1,
            ),
            "maxReplicas": _integer(
                "Most replicas; at least minReplicas (unset: KServe's default, which for the Standard mode HPA is"
                " minReplicas, i.e. no autoscaling). Required with metric inflight.",
                minimum=1,
                maximum=1000,
            ),
            "metric": _string(
                "Autoscaling metric. Knative: concurrency or rps (requests per replica). Standard: cpu or memory"
                " (utilisation percent, HPA) or inflight (gateway in-flight requests per replica, KEDA)."
                " Unset: concurrency in Knative, cpu in Standard.",
                enum=list(SCALE_METRICS),
            ),
            "target": _integer(
                "Target value of metric per replica: in-flight requests (concurrency, inflight), requests/s (rps),"
                " or percent of the request (cpu, memory: 1-100). Required with memory and inflight.",
                minimum=1,
                maximum=100000,
            ),
            "prometheus": _object(
                "The Prometheus KEDA queries for metric inflight (the one that scrapes the gateway).",
                {
                    "serverAddress": _string(
                        "Prometheus HTTP API base URL, e.g. http://prometheus-operated.monitoring.svc:9090.",
                        pattern=URL_PATTERN,
                        maxLength=2048,
                    ),
                },
                required=["serverAddress"],
            ),
        },
        rules=[
            _rule(
                "!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
                "minReplicas must be less than or equal to maxReplicas",
                ".minReplicas",
            ),
            _rule(
                "!has(self.prometheus) || (has(self.metric) && self.metric == 'inflight')",
                "prometheus is only used with metric inflight",
                ".prometheus",
            ),
            _rule(
                "!has(self.metric) || self.metric != 'inflight' || has(self.prometheus)",
                "metric inflight needs prometheus.serverAddress (where KEDA reads the gateway's metric)",
                ".prometheus",
            ),
            _rule(
                "!has(self.metric) || !(self.metric in ['inflight', 'memory']) || has(self.target)",
                "metric inflight or memory needs target (KServe sets no default for either)",
                ".target",
            ),
            _rule(
                "!has(self.metric) || self.metric != 'inflight' || has(self.maxReplicas)",
                "metric inflight needs maxReplicas (KEDA would otherwise keep minReplicas)",
                ".maxReplicas",
            ),
        ],
        default={},
    )


def model_scaling_rules() -> list[Schema]:
    """Spec-level rules: what ``scaling`` may ask for depends on ``deploymentMode``."""
    return [
        _rule(
            "self.scaling.minReplicas > 0 || self.deploymentMode == 'Knative' ||"
            " (has(self.scaling.metric) && self.scaling.metric == 'inflight')",
            "scaling.minReplicas 0 (scale to zero) needs deploymentMode Knative or scaling.metric inflight (KEDA)",
            ".scaling.minReplicas",
        ),
        _rule(
            "self.deploymentMode != 'Knative' || !has(self.scaling.metric) ||"
            " self.scaling.metric in ['concurrency', 'rps']",
            "scaling.metric: deploymentMode Knative scales on concurrency or rps (Knative Pod Autoscaler);"
            " cpu, memory and inflight need deploymentMode Standard",
            ".scaling.metric",
        ),
        _rule(
            "self.deploymentMode != 'Standard' || !has(self.scaling.metric) ||"
            " self.scaling.metric in ['cpu', 'memory', 'inflight']",
            "scaling.metric: deploymentMode Standard scales on cpu or memory (HPA) or inflight (KEDA);"
            " KServe's HPA ignores concurrency and rps (they need deploymentMode Knative)",
            ".scaling.metric",
        ),
        _rule(
            "self.deploymentMode != 'Standard' || !has(self.scaling.target) ||"
            " (has(self.scaling.metric) && self.scaling.metric == 'inflight') || self.scaling.target <= 100",
            "scaling.target is a utilisation percentage (1-100) for cpu and memory",
            ".scaling.target",
        ),
    ]


def model_spec_schema() -> Schema:
    return _object(
        "Desired state of a Model: what to serve, how to scale it, what it costs and who is paid.",
        {
            "format": _object(
                "The model's format; chooses the KServe ServingRuntime when runtime is not set.",
                {
                    "name": _string(
                        "Format name, e.g. huggingface, sklearn, pytorch, onnx, triton.", minLength=1, maxLength=63
                    ),
                    "version": _string('Format version, e.g. "1".', maxLength=63),
                },
                required=["name"],
            ),
            "runtime": _string(
                "Name of the ServingRuntime or ClusterServingRuntime to use (optional; KServe picks one by format).",
                pattern=DNS_SUBDOMAIN_PATTERN,
                maxLength=253,
            ),
            "storageUri": _string(
                "Where the model artifacts live: hf://org/model, s3://…, gs://…, pvc://…, oci://…, https://….",
                pattern=STORAGE_URI_PATTERN,
                maxLength=2048,
            ),
            "protocol": _string(
                "Inference protocol the model speaks: v1 (KServe V1), v2 (Open Inference Protocol) or openai.",
                enum=["openai", "v1", "v2"],
                default="v1",
            ),
            "deploymentMode": _string(
                "KServe deployment mode: Standard (Deployment + HPA) or Knative (serverless: scale to zero, canary).",
                enum=["Standard", "Knative"],
                default="Standard",
            ),
            "resources": _object(
                "Compute for each replica.",
                {
                    "gpus": _integer(
                        "NVIDIA GPUs per replica (nvidia.com/gpu limit); 0 for CPU-only.",
                        minimum=0,
                        maximum=16,
                        default=0,
                    ),
                    "gpuProduct": _string(
                        "GPU product to schedule on (node label nvidia.com/gpu.product), e.g. NVIDIA-H100-80GB-HBM3.",
                        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
                        maxLength=63,
                    ),
                    "cpu": _quantity('CPU per replica (requests = limits), e.g. "4" or 500m.'),
                    "memory": _quantity("Memory per replica (requests = limits), e.g. 32Gi."),
                },
                rules=[
                    _rule(
                        "!has(self.gpuProduct) || self.gpus > 0",
                        "gpuProduct needs gpus greater than 0",
                        ".gpuProduct",
                    )
                ],
                default={},
            ),
            "scaling": model_scaling_schema(),
            "canary": _object(
                "A canary rollout: the new storageUri gets trafficPercent of the requests (KServe keeps the last"
                " rolled-out revision for the rest). Needs deploymentMode Knative.",
                {
                    "storageUri": _string(
                        "Artifacts of the canary version.", pattern=STORAGE_URI_PATTERN, maxLength=2048
                    ),
                    "trafficPercent": _integer(
                        "Share of requests for the canary, 0-100.", minimum=0, maximum=100, default=10
                    ),
                },
                required=["storageUri"],
            ),
            "pricing": _object(
                "What one request costs the calling Agent, in whole tokens (decimal strings).",
                {
                    "token": _string("Symbol of the settlement token.", pattern=r"^[A-Za-z0-9]{1,16}$", default="OPEN"),
                    "decimals": _integer(
                        "Decimals of the token (base units per whole token = 10^decimals).",
                        minimum=0,
                        maximum=36,
                        default=18,
                    ),
                    "perRequest": _money("Flat price of every request.", default="0"),
                    "perInputToken": _money("Price of each input (prompt) token.", default="0"),
                    "perOutputToken": _money("Price of each output (completion) token.", default="0"),
                },
                rules=[_decimals_rule(f) for f in ("perRequest", "perInputToken", "perOutputToken")],
                default={},
            ),
            "owner": _address("Payee of the model's revenue (what is left after the fee and the contributors)."),
            "contributors": {
                "type": "array",
                "description": "Attribution: data or fine-tune contributors and their share of revenue in basis"
                " points; the shares sum to at most 10000.",
                "maxItems": 64,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["account"],
                "items": _object(
                    "One contributor and its share.",
                    {
                        "account": _address("Payee account of the contributor."),
                        "shareBps": _integer("Share of revenue in basis points (1-10000).", minimum=1, maximum=10000),
                        "role": _string(
                            "What the contributor gave.",
                            enum=["data", "fine-tune", "evaluation", "other"],
                            default="data",
                        ),
                    },
                    required=["account", "shareBps"],
                ),
            },
        },
        required=["format", "storageUri", "owner"],
        rules=[
            *model_scaling_rules(),
            _rule(
                "!has(self.canary) || self.deploymentMode == 'Knative'",
                "canary needs deploymentMode Knative (KServe supports canary rollouts only in Knative mode)",
                ".canary",
            ),
            _rule(
                "!has(self.canary) || self.canary.storageUri != self.storageUri",
                "canary.storageUri must differ from storageUri",
                ".canary.storageUri",
            ),
            _rule(
                "!has(self.contributors) || self.contributors.map(c, c.shareBps).sum() <= 10000",
                "contributors shareBps must sum to at most 10000",
                ".contributors",
            ),
        ],
    )


def model_status_schema() -> Schema:
    return _object(
        "Observed state of a Model, mirrored from its InferenceService.",
        {
            "phase": _string("Summary: " + ", ".join(MODEL_PHASES) + ".", enum=MODEL_PHASES),
            "url": _string("The InferenceService URL (empty until KServe reports one).", maxLength=2048),
            "inferenceService": _string("Name of the child InferenceService.", maxLength=253),
            "replicas": _integer("Replicas KServe reports for the predictor.", minimum=0, format="int32"),
            "observedGeneration": _observed_generation(),
            "conditions": conditions_schema(MODEL_CONDITIONS),
        },
    )


# -------------------------------------------------------------------- Agent

AGENT_PHASES = ["Pending", "Ready", "Throttled", "OverBudget", "Degraded", "Failed"]
AGENT_CONDITIONS = ["Ready", "CredentialsIssued", "LimitsApplied"]


def agent_spec_schema() -> Schema:
    return _object(
        "Desired state of an Agent: who pays, which Models it may call, and its limits, budget and queue.",
        {
            "account": _address("Payer account; its ledger account is debited for every request."),
            "models": {
                "type": "array",
                "description": "Names of the Models in the same namespace this Agent may call.",
                "minItems": 1,
                "maxItems": 256,
                "x-kubernetes-list-type": "set",
                "items": {"type": "string", "pattern": DNS_LABEL_PATTERN, "maxLength": 63},
            },
            "limits": _object(
                "Rate and concurrency limits, enforced at the gateway (GCRA in Redis).",
                {
                    "requestsPerSecond": _integer("Sustained request rate.", minimum=1, maximum=1000000, default=10),
                    "burst": _integer(
                        "Requests allowed at once above the sustained rate.", minimum=1, maximum=1000000, default=20
                    ),
                    "tokensPerMinute": _integer(
                        "Input plus output tokens per minute.", minimum=1, maximum=1000000000, default=100000
                    ),
                    "maxConcurrency": _integer("Requests in flight at once.", minimum=1, maximum=100000, default=8),
                },
                default={},
            ),
            "budget": _object(
                "Spending cap per period; Hard rejects requests over it, Soft only reports.",
                {
                    "amount": _money("Most the Agent may spend in one period."),
                    "period": _string("Length of a budget period.", enum=["Hour", "Day", "Month"], default="Day"),
                    "enforcement": _string(
                        "Hard: reject over budget (402). Soft: allow, mark OverBudget and emit an Event.",
                        enum=["Hard", "Soft"],
                        default="Hard",
                    ),
                },
                required=["amount"],
            ),
            "queue": _object(
                "The bounded queue requests wait in when the Agent is at maxConcurrency.",
                {
                    "maxDepth": _integer(
                        "Most requests waiting; beyond it 429.", minimum=0, maximum=100000, default=1000
                    ),
                    "maxWaitSeconds": _integer(
                        "Longest a request waits before 429 with Retry-After.", minimum=0, maximum=3600, default=30
                    ),
                },
                default={},
            ),
            "credentialsSecretName": _string(
                "Secret that receives the API key (key apiKey); default <agent name>-credentials.",
                pattern=DNS_SUBDOMAIN_PATTERN,
                maxLength=253,
            ),
        },
        required=["account", "models"],
    )


def agent_status_schema() -> Schema:
    return _object(
        "Observed state of an Agent.",
        {
            "phase": _string("Summary: " + ", ".join(AGENT_PHASES) + ".", enum=AGENT_PHASES),
            "secretName": _string("The Secret holding the API key (never the key itself).", maxLength=253),
            "queueDepth": _integer("Requests waiting in the Agent's queue.", minimum=0, format="int64"),
            "inFlight": _integer("Requests in flight.", minimum=0, format="int64"),
            "rateLimited": _integer(
                "Requests the gateway rejected for this Agent's rate or token limits.", minimum=0, format="int64"
            ),
            "spentThisPeriod": _money("Spent in the current budget period."),
            "budgetRemaining": _money("Left of the budget in the current period."),
            "periodStart": _string("Start of the current budget period.", format="date-time"),
            "observedGeneration": _observed_generation(),
            "conditions": conditions_schema(AGENT_CONDITIONS),
        },
    )


# --------------------------------------------------------------- RewardPool

REWARDPOOL_PHASES = ["Pending", "Ready", "Settling", "Paused", "Degraded", "Failed"]
REWARDPOOL_CONDITIONS = ["Ready", "ChainReachable", "Settled", "ModelsBound"]


_MIGRATE = (
    "the pool's settlement state (epochs, payouts, claims) belongs to one contract, and another one would pay"
    " its cumulative history again; to settle elsewhere create a new RewardPool with another name"
)


def _immutable(schema: Schema, field: str) -> Schema:
    """``schema`` that the API server refuses to change after creation (CEL ``self == oldSelf``)."""
    out = dict(schema)
    out["description"] = schema["description"] + " Immutable: " + _MIGRATE + "."
    out["x-kubernetes-validations"] = [_rule("self == oldSelf", f"{field} is immutable: {_MIGRATE}")]
    return out


def rewardpool_spec_schema() -> Schema:
    return _object(
        "Desired state of a RewardPool: which Models' revenue it settles, how often, and on which chain.",
        {
            "modelSelector": _label_selector(
                "Models (same namespace) whose revenue this pool settles. A Model belongs to at most one pool:"
                " one that an older pool already selects is refused (condition ModelsBound, Event ModelRefused)."
            ),
            "protocolFeeBps": _integer(
                "Protocol fee taken first from each request's cost, in basis points; the Model's contributors"
                " share the rest by their shareBps and the owner gets what remains.",
                minimum=0,
                maximum=10000,
                default=0,
            ),
            "epochSeconds": _immutable(
                _integer(
                    "Length of a settlement epoch in seconds (epoch numbers are unix time / epochSeconds,"
                    " and the contract needs them to increase).",
                    minimum=1,
                    maximum=2592000,
                    default=3600,
                ),
                "epochSeconds",
            ),
            "minPayout": _money("Accounts owed less than this are carried to a later epoch.", default="0"),
            "chain": _object(
                "The EVM chain the pool settles on.",
                {
                    "chainId": _immutable(_integer("EIP-155 chain id.", minimum=1, format="int64"), "chain.chainId"),
                    "rpcUrlSecretRef": _secret_key_ref("Secret key holding the JSON-RPC URL."),
                    "signerKeySecretRef": _secret_key_ref("Secret key holding the settlement signer's private key."),
                    "tokenAddress": _immutable(_address("ERC-20 token paid out."), "chain.tokenAddress"),
                    "tokenDecimals": _integer(
                        "Decimals of the token (base units per whole token = 10^decimals); unset means 18."
                        " A Model whose pricing.decimals differs is not bound to the pool (condition"
                        " ModelsBound). May be set once on a pool created without it (no default, so pools"
                        " from before this field can declare their token's decimals); immutable once set: "
                        + _MIGRATE
                        + ".",
                        minimum=0,
                        maximum=36,
                    ),
                    "distributorAddress": _immutable(
                        _address("The cumulative Merkle distributor contract; it serves this pool only."),
                        "chain.distributorAddress",
                    ),
                    "confirmations": _integer(
                        "Blocks on top of a settlement before it counts as final.", minimum=0, maximum=1000, default=2
                    ),
                },
                required=["chainId", "rpcUrlSecretRef", "signerKeySecretRef", "tokenAddress", "distributorAddress"],
                rules=[
                    _rule(
                        "!has(oldSelf.tokenDecimals) || (has(self.tokenDecimals)"
                        " && self.tokenDecimals == oldSelf.tokenDecimals)",
                        f"chain.tokenDecimals is immutable once set: {_MIGRATE}",
                        ".tokenDecimals",
                    )
                ],
            ),
            "paused": _boolean("Stop settling (usage keeps accruing; nothing is lost).", default=False),
        },
        required=["modelSelector", "chain"],
    )


def rewardpool_status_schema() -> Schema:
    return _object(
        "Observed state of a RewardPool.",
        {
            "phase": _string("Summary: " + ", ".join(REWARDPOOL_PHASES) + ".", enum=REWARDPOOL_PHASES),
            "currentEpoch": _integer("The epoch now accruing.", minimum=0, format="int64"),
            "lastSettledEpoch": _integer("The last epoch settled on chain.", minimum=0, format="int64"),
            "lastRoot": _string("Merkle root of the last settlement.", pattern=HEX32_PATTERN),
            "lastTxHash": _string("Transaction of the last settlement.", pattern=HEX32_PATTERN),
            "lastSettledAt": _string("When the last settlement was confirmed.", format="date-time"),
            "nextEpochAt": _string("When the current epoch closes.", format="date-time"),
            "pendingAmount": _money("Accrued and not yet settled."),
            "settledTotal": _money("Settled since the pool was created."),
            "models": _integer(
                "Models bound to this pool (selected and not refused; see condition ModelsBound).",
                minimum=0,
                format="int32",
            ),
            "observedGeneration": _observed_generation(),
            "conditions": conditions_schema(REWARDPOOL_CONDITIONS),
        },
    )


# --------------------------------------------------------------------- CRDs


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    description: str
    spec: Schema
    status: Schema
    columns: tuple[Schema, ...]
    root_rules: tuple[Schema, ...] = ()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


def _ready_column() -> Schema:
    return {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'}


def _column(name: str, json_path: str, type_: str = "string", priority: int = 0, description: str = "") -> Schema:
    col: Schema = {"name": name, "type": type_, "jsonPath": json_path}
    if priority:
        col["priority"] = priority
    if description:
        col["description"] = description
    return col


_AGE = _column("Age", ".metadata.creationTimestamp", "date")

KINDS: tuple[Kind, ...] = (
    Kind(
        kind="Model",
        plural="models",
        singular="model",
        short_names=("mdl",),
        description="A model served on KServe that earns for its owner and contributors per request.",
        spec=model_spec_schema(),
        status=model_status_schema(),
        columns=(
            _column("Phase", ".status.phase"),
            _ready_column(),
            _column("URL", ".status.url"),
            _column("Replicas", ".status.replicas", "integer"),
            _column("Format", ".spec.format.name", priority=1),
            _column("GPUs", ".spec.resources.gpus", "integer", priority=1),
            _column("Owner", ".spec.owner", priority=1),
            _AGE,
        ),
        root_rules=(
            _rule(
                "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
                f" && size(self.metadata.name) <= {MODEL_NAME_MAX}",
                f"metadata.name must start with a letter, hold only a-z, 0-9 and '-', and be at most {MODEL_NAME_MAX}"
                " characters (it names the InferenceService)",
            ),
        ),
    ),
    Kind(
        kind="Agent",
        plural="agents",
        singular="agent",
        short_names=("agt",),
        description="A caller of Models with credentials, rate limits, a budget and a queue; it pays per request.",
        spec=agent_spec_schema(),
        status=agent_status_schema(),
        columns=(
            _column("Phase", ".status.phase"),
            _ready_column(),
            _column("Queue", ".status.queueDepth", "integer"),
            _column("Spent", ".status.spentThisPeriod"),
            _column("Budget", ".spec.budget.amount", priority=1),
            _column("Account", ".spec.account", priority=1),
            _AGE,
        ),
    ),
    Kind(
        kind="RewardPool",
        plural="rewardpools",
        singular="rewardpool",
        short_names=("rwp",),
        description="Settles the revenue of the selected Models on an EVM chain, one Merkle root per epoch.",
        spec=rewardpool_spec_schema(),
        status=rewardpool_status_schema(),
        columns=(
            _column("Phase", ".status.phase"),
            _ready_column(),
            _column("Settled Epoch", ".status.lastSettledEpoch", "integer"),
            _column("Pending", ".status.pendingAmount"),
            _column("Settled Total", ".status.settledTotal", priority=1),
            _column("Paused", ".spec.paused", "boolean", priority=1),
            _AGE,
        ),
    ),
)

KINDS_BY_NAME: dict[str, Kind] = {k.kind: k for k in KINDS}


def crd(kind: Kind) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind (a fresh dict each call)."""
    root: Schema = {
        "type": "object",
        "description": kind.description,
        "properties": {
            "apiVersion": _string("Versioned schema of this representation of an object."),
            "kind": _string("REST resource this object represents."),
            "metadata": {"type": "object"},
            "spec": kind.spec,
            "status": kind.status,
        },
        "required": ["spec"],
    }
    if kind.root_rules:
        root["x-kubernetes-validations"] = list(kind.root_rules)
    return copy.deepcopy(
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {
                "name": kind.crd_name,
                "labels": {"app.kubernetes.io/name": "openledger", "app.kubernetes.io/part-of": "openledger"},
            },
            "spec": {
                "group": GROUP,
                "scope": "Namespaced",
                "names": {
                    "kind": kind.kind,
                    "listKind": kind.kind + "List",
                    "plural": kind.plural,
                    "singular": kind.singular,
                    "shortNames": list(kind.short_names),
                    "categories": [CATEGORY],
                },
                "versions": [
                    {
                        "name": VERSION,
                        "served": True,
                        "storage": True,
                        "schema": {"openAPIV3Schema": root},
                        "subresources": {"status": {}},
                        "additionalPrinterColumns": list(kind.columns),
                    }
                ],
            },
        }
    )


def crd_documents() -> dict[str, dict[str, Any]]:
    """File name (under ``crds/``) → CRD document, for every kind."""
    return {f"{GROUP}_{k.plural}.yaml": crd(k) for k in KINDS}


def apply_defaults(schema: Schema, value: Any) -> Any:
    """``value`` with the schema's ``default``s filled in, as the API server's structural defaulting does.

    The builders read specs through this, so each default is written once (in the
    schema above) and a spec that did not pass the API server (a unit test, a
    dry run) is read exactly as the server would have stored it.
    """
    if isinstance(value, Mapping) and schema.get("type") == "object":
        out = dict(value)
        for name, prop in (schema.get("properties") or {}).items():
            if name not in out and "default" in prop:
                out[name] = copy.deepcopy(prop["default"])
            if name in out:
                out[name] = apply_defaults(prop, out[name])
        return out
    if isinstance(value, (list, tuple)) and schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def defaulted_spec(kind: str, spec: Any) -> dict[str, Any]:
    """A ``kind``'s spec with its CRD defaults applied (a missing or non-object spec counts as empty)."""
    result: dict[str, Any] = apply_defaults(KINDS_BY_NAME[kind].spec, spec if isinstance(spec, Mapping) else {})
    return result


def render_yaml(document: dict[str, Any]) -> str:
    import yaml

    header = "# Generated by `openledger crds generate` from controllers/api.py; do not edit.\n"
    return header + yaml.safe_dump(document, sort_keys=False, width=120, allow_unicode=True)
