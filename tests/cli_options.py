"""Command-line options that keep a test's `kind-dit train` / `transfer` run tiny and quick
(imported by the test modules that drive the CLI end to end)."""

TOY = (
    "--set model.rank_tailor=2 --set train.threads=1 --set train.sample_every=0 "
    "--set sample.steps=2 --set sample.per_class=1 --set train.log_every=1"
).split()
SHORT = ["--steps", "2", "--batch-size", "8", *TOY]  # a two-step run of batch 8
