"""Command-line options that keep a test's `kind-dit train` / `transfer` run tiny and quick
(imported by the test modules that drive the CLI end to end). A transfer takes its model from
its source, so its options set no `model.*` (its tailor rank is --rank-tailor)."""

TRANSFER_TOY = (
    "--set train.threads=1 --set train.sample_every=0 --set sample.steps=2 "
    "--set sample.per_class=1 --set train.log_every=1"
).split()
TOY = ["--set", "model.rank_tailor=2", *TRANSFER_TOY]
SHORT = ["--steps", "2", "--batch-size", "8", *TOY]  # a two-step run of batch 8
TRANSFER_SHORT = ["--steps", "2", "--batch-size", "8", *TRANSFER_TOY]
