"""What each experiment job returns, typed: the contract between the jobs, the report and the
ablations. Each result is written as `results/<job>.json` when its job finishes and read back by
later invocations (a resumed demo, `--report-only`, the ablations)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class EvalSummary:
    """One evaluation of a sample set against the task's test split."""

    fid: float
    precision: float
    recall: float
    class_accuracy: float | None
    per_class_accuracy: dict[str, float] | None
    num_samples: int
    feature_net: str


@dataclass
class GuidancePoint:
    """One evaluation at one classifier-free guidance scale (a point of a guidance sweep)."""

    cfg_scale: float
    fid: float
    precision: float
    recall: float
    class_accuracy: float | None
    num_samples: int


@dataclass
class CurvePoint:
    """FID of one kept checkpoint's EMA weights, for FID-against-steps curves."""

    step: int
    fid: float
    class_accuracy: float | None


@dataclass
class RunResult:
    """A pre-training or transfer run, evaluated. `task`, `seed`, `budget` and `detail` are set
    for transfers; `rank_tailor` for a KIND transfer at another tailor rank than the source's;
    `budget_scale` for a run at a multiple of KIND's budget (a budget curve), `null_tailor` for a
    KIND transfer whose null class has its own tailor; `sweep` for runs evaluated at several
    guidance scales. `source` names the pre-training setting (`presets.SOURCES`)."""

    run: str
    method: str
    train_seconds: float
    steps: int
    trainable: int
    deployed: int
    eval: EvalSummary
    curve: list[CurvePoint]
    curve_seconds: float
    grid: str
    task: str | None = None
    seed: int | None = None
    budget: int | None = None
    detail: str = ""
    rank_tailor: float | None = None
    source: str = "digits"
    budget_scale: float = 1.0
    null_tailor: bool = False
    sweep: list[GuidancePoint] = field(default_factory=list)
    job_seconds: float = 0.0

    @property
    def variant(self) -> str:
        """The method with its options: 'kind', 'kind+null', 'lora@x4', 'kind+null@x0.25'."""
        scale = "" if self.budget_scale == 1 else f"@x{self.budget_scale:g}"
        return f"{self.method}{'+null' if self.null_tailor else ''}{scale}"

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        return cls(**(d | {"eval": EvalSummary(**d["eval"]),
                           "curve": [CurvePoint(**p) for p in d["curve"]],
                           "sweep": [GuidancePoint(**p) for p in d.get("sweep", [])]}))  # fmt: skip


@dataclass
class DeployVariant:
    """A model assembled (or merged) from the parts, compared with the full model."""

    variant: str
    classes: list[str]
    params: int
    bytes: int
    max_rel_diff: float
    same_samples: bool


@dataclass
class SizeRow:
    part: str
    params: int
    bytes: int | None


@dataclass
class DeployResult:
    """Decomposition of the pre-trained KIND model, its assembled variants and part sizes."""

    parts: str
    variants: list[DeployVariant]
    size_table: list[SizeRow]
    orthogonality_error: float
    job_seconds: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> DeployResult:
        return cls(**(d | {"variants": [DeployVariant(**v) for v in d["variants"]],
                           "size_table": [SizeRow(**r) for r in d["size_table"]]}))  # fmt: skip


Result = RunResult | DeployResult


def to_dict(result: Result) -> dict:
    return asdict(result)


def from_dict(d: dict) -> Result:
    """A result read back from its JSON: a deploy result has variants, every other a run."""
    return DeployResult.from_dict(d) if "variants" in d else RunResult.from_dict(d)
