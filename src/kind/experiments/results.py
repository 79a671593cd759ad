"""What each experiment job returns, typed: the contract between the jobs, the report and the
ablations. Each result is written as `results/<job>.json` when its job finishes and read back by
later invocations (a resumed demo, `--report-only`, the ablations)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path


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
    guidance scales. `source` names the pre-training setting (`presets.SOURCES`).

    The KIND-ify comparison (`Preset.kindify_steps`) sets `pretraining` on its runs and on the
    transfers from their parts: "kindify" (KIND pre-training started from the dense DiT) or
    "scratch" (KIND from scratch at the same total steps); "" is the source's own pre-training.
    Its runs also hold `draws` (FID at the preset's guidance over sample draws of seeds
    EVAL_SEED + i, draw 0 being `eval`'s: the sampling noise of the evaluation), `step_flops`
    (one training step at the run's batch, counted by torch.utils.flop_counter) and, for a
    KIND-ify run, `init_steps` and `init_step_flops` of the dense run it started from."""

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
    pretraining: str = ""
    draws: list[float] = field(default_factory=list)
    step_flops: float | None = None
    init_steps: int | None = None
    init_step_flops: float | None = None
    job_seconds: float = 0.0

    @property
    def variant(self) -> str:
        """The method with its options: 'kind', 'kind+null', 'lora@x4', 'kind+null@x0.25'."""
        scale = "" if self.budget_scale == 1 else f"@x{self.budget_scale:g}"
        return f"{self.method}{'+null' if self.null_tailor else ''}{scale}"

    def moved_to(self, run: Path) -> RunResult:
        """This result with its paths under `run`, where its run now is: the job wrote them as
        its `--out` was typed, relative to where the demo was started, and a demo is continued
        or reported from other folders, or copied."""
        grid = run / Path(self.grid).relative_to(self.run)
        return replace(self, run=str(run), grid=str(grid))

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


@dataclass
class SizePoint:
    """One model of a size curve: the KIND model or the dense DiT truncated to a parameter budget
    (`kind.store.parts.shrink_to_budget`), evaluated over sample draws (seeds EVAL_SEED + i)."""

    model: str  # "kind" or "dense"
    target: int  # the budget asked, in parameters
    params: int  # what the model has (≤ target)
    form: str  # "full" (not truncated), "truncated"; the dense DiT: "dense" or "SVD, truncated"
    kept: float  # fraction of the learngene (for the dense DiT: SVD) components kept
    gflops: float  # one forward pass of one sample (kind.store.parts.forward_flops)
    evals: list[EvalSummary]  # one per draw, at the preset's guidance

    @property
    def fids(self) -> list[float]:
        return [e.fid for e in self.evals]


@dataclass
class SizeCurveResult:
    """FID against size for one source: its KIND model for all source classes and the dense DiT,
    both truncated by the same budget rule (`kind.store.parts.BUDGET_RULE`) to the same counts;
    the dense DiT through its exact SVD form (`svd_params` parameters at full rank, its outputs
    within `svd_max_rel_diff` of the dense model's), or itself where it fits the budget whole.
    `*_floor`: the fewest parameters the rule reaches (one learngene component a layer)."""

    source: str
    kind_params: int
    kind_floor: int
    dense_params: int
    svd_params: int
    dense_floor: int
    svd_max_rel_diff: float
    unreachable: list[int]  # budgets (parameters) neither model reaches
    points: list[SizePoint]
    job_seconds: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> SizeCurveResult:
        points = [SizePoint(**(p | {"evals": [EvalSummary(**e) for e in p["evals"]]}))
                  for p in d["points"]]  # fmt: skip
        return cls(**(d | {"points": points}))


Result = RunResult | DeployResult | SizeCurveResult


def to_dict(result: Result) -> dict:
    return asdict(result)


def from_dict(d: dict) -> Result:
    """A result read back from its JSON: a deploy result has variants, a size curve points, every
    other is a run."""
    if "variants" in d:
        return DeployResult.from_dict(d)
    return SizeCurveResult.from_dict(d) if "points" in d else RunResult.from_dict(d)
