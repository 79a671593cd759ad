"""The command line end to end at toy size: train -> sample -> info -> decompose -> assemble ->
transfer (KIND and a baseline) -> evaluate, and the errors a user sees."""

import json
import re

import numpy as np
import pytest
import torch

from cli_options import SHORT, TOY, TRANSFER_SHORT, TRANSFER_TOY
from kind.cli import info
from kind.cli.main import build_parser, main
from kind.store.modeldir import save_model_dir
from kind.store.parts import load_parts
from kind.transfer.kind import kind_budget


def cli(command: str, *paths) -> None:
    """`kind-dit` with the words of `command`, `{}` filled with `paths` in order."""
    main(command.format(*map(str, paths)).split())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    main(["train", "--data", "mnist:0-2", "--size", "tiny", "--steps", "3", "--batch-size", "8",
          "--out", str(out), *TOY])  # fmt: skip
    return out


def test_train_writes_a_run(run):
    assert (run / "model" / "model.json").is_file()
    assert len((run / "metrics.csv").read_text().splitlines()) == 4  # header + 3 steps


def test_sample_is_reproducible_and_writes_png_and_npz(run, tmp_path):
    for name in ("a", "b"):
        cli("sample {} --classes 0,1 --n 3 --steps 2 --seed 0 --out {}", run, tmp_path / name)
    a, b = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert a["arr_0"].shape == (6, 28, 28, 1) and a["arr_0"].dtype == np.uint8
    assert np.array_equal(a["arr_0"], b["arr_0"])
    assert [str(a["class_names"][i]) for i in a["labels"]] == ["0"] * 3 + ["1"] * 3
    assert (tmp_path / "a" / "samples.png").stat().st_size > 0


def test_sample_compiled_draws_what_eager_draws(run, tmp_path, monkeypatch):
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # no graph of another test's model in the count
    counters.clear()
    eager_compile = torch.compile  # aot_eager: dynamo's trace without inductor's code generation
    monkeypatch.setattr(torch, "compile", lambda m: eager_compile(m, backend="aot_eager"))
    for name, flag in (("eager", ""), ("compiled", "--compile")):
        cli(f"sample {{}} --classes 0,2 --n 2 --steps 2 {flag} --out {{}}", run, tmp_path / name)
    a, b = (
        np.load(tmp_path / n / "samples.npz")["arr_0"].astype(int) for n in ("eager", "compiled")
    )
    assert np.abs(a - b).max() <= 1  # the static route's fp32 rounding against the folded one
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_sample_refuses_to_overwrite_and_unknown_classes(run, tmp_path, capsys):
    main(["sample", str(run), "--n", "1", "--steps", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["sample", str(run), "--n", "1", "--steps", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        main(["sample", str(run), "--classes", "7", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "'7'" in capsys.readouterr().err
    for bad in (",", ""):  # a list that names no class
        with pytest.raises(SystemExit) as e:
            main(["sample", str(run), "--classes", bad, "--out", str(tmp_path / "x")])
        assert e.value.code == 2 and "names nothing" in capsys.readouterr().err
    # an evaluation of the samples: --overwrite replaces them and removes it, as it is stale
    (tmp_path / "samples.eval.json").write_text("{}")
    main(["sample", str(run), "--n", "1", "--steps", "1", "--out", str(tmp_path), "--overwrite"])
    assert not (tmp_path / "samples.eval.json").exists()
    (tmp_path / "samples.eval.json").write_text("{}")
    (tmp_path / "samples.npz").unlink()
    (tmp_path / "samples.png").unlink()
    with pytest.raises(SystemExit):  # without --overwrite, even alone it is kept and refused
        main(["sample", str(run), "--n", "1", "--steps", "1", "--out", str(tmp_path)])
    assert (tmp_path / "samples.eval.json").read_text() == "{}"
    parts = tmp_path / "parts"
    main(["decompose", str(run), "--out", str(parts)])
    model, diffusion, _ = load_parts(parts, [])  # learngenes only: a model holding no class
    save_model_dir(tmp_path / "none", model, diffusion)
    with pytest.raises(SystemExit) as e:
        main(["sample", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "holds no class to sample" in capsys.readouterr().err


def test_a_stopped_sampling_continues_with_resume_and_draws_only_what_is_missing(
    run, tmp_path, capsys, monkeypatch
):
    """A preempted FID job keeps its finished chunks: --resume draws the rest, to the samples an
    uninterrupted job writes; other settings are refused by name; --overwrite starts again."""
    import kind.core.sampling as sampling

    argv = ["sample", str(run), "--classes", "0,1,2", "--n", "3", "--steps", "2",
            "--batch-size", "4", "--out"]  # fmt: skip
    main([*argv, str(tmp_path / "straight")])
    drawn, calls = sampling.generate, []

    def preempted_after(chunks: int):
        def draw(model, diffusion, labels, **kwargs):
            if len(calls) == chunks:
                raise RuntimeError("preempted")
            calls.append(len(labels))
            return drawn(model, diffusion, labels, **kwargs)

        return draw

    out = tmp_path / "job"
    monkeypatch.setattr(sampling, "generate", preempted_after(1))
    with pytest.raises(SystemExit):
        main([*argv, str(out)])
    partial = out / ".samples.partial"
    assert sorted(p.name for p in partial.iterdir()) == ["chunk_000000.safetensors", "job.json",
                                                         "lock"]  # fmt: skip
    capsys.readouterr()
    for extra, message in (([], "unfinished sampling (1 of 3 chunks of 3 samples drawn): pass "
                                "--resume"),
                           (["--resume", "--seed", "1"], "seed 0 (now 1)"),
                           (["--resume", "--batch-size", "2"], "batch_size 4 (now 2)")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main([*argv, str(out), *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(sampling, "generate", preempted_after(10))
    main([*argv, str(out), "--resume"])
    assert calls == [3, 3]  # chunks 1 and 2 drawn; chunk 0 read
    a, b = (np.load(d / "samples.npz") for d in (tmp_path / "straight", out))
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert not partial.exists()  # its chunks are in samples.npz
    calls.clear()
    monkeypatch.setattr(sampling, "generate", preempted_after(1))
    with pytest.raises(SystemExit):
        main([*argv, str(tmp_path / "again")])
    calls.clear()
    monkeypatch.setattr(sampling, "generate", preempted_after(10))
    main([*argv, str(tmp_path / "again"), "--overwrite"])  # starts again: every chunk drawn
    assert calls == [3, 3, 3]
    # a requeued --resume of the finished job draws nothing; one stopped while writing its
    # files (a kill, a full disk) or an --overwrite job stopped early continue
    capsys.readouterr()
    main([*argv, str(out), "--resume"])
    assert "already holds this job's samples" in capsys.readouterr().out
    (tmp_path / "again" / "samples.eval.json").write_text("{}")  # it scored the old samples
    monkeypatch.setattr(sampling, "generate", preempted_after(len(calls) + 1))
    with pytest.raises(SystemExit):
        main([*argv, str(tmp_path / "again"), "--overwrite", "--seed", "3"])
    monkeypatch.setattr(sampling, "generate", drawn)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("kind.core.images.save_npz", full_disk)
    with pytest.raises(SystemExit):
        main([*argv, str(tmp_path / "again"), "--resume", "--seed", "3"])
    monkeypatch.undo()
    main([*argv, str(tmp_path / "again"), "--resume", "--seed", "3"])
    c = np.load(tmp_path / "again" / "samples.npz")
    assert int(c["seed"]) == 3 and not (tmp_path / "again" / "samples.eval.json").exists()
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["samples.npz",
                                                                      "samples.png"]  # fmt: skip


def test_sample_refuses_bad_guidance_options_before_sampling(run, tmp_path, capsys):
    for argv, message in (
        (["--guided-channels", "2"], "give at most 1"),  # a 1-channel model
        (["--unconditional", "--classes", "0"], "drop --classes"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["sample", str(run), "--n", "1", "--out", str(tmp_path / "x"), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "sampling" not in err
    assert not (tmp_path / "x").exists()


def test_decompose_assemble_and_sample_from_parts(run, tmp_path, capsys):
    parts = tmp_path / "parts"
    main(["decompose", str(run), "--out", str(parts)])
    table = capsys.readouterr().out
    assert "learngene" in table and "tailor 2 (2)" in table and "dense DiT" in table
    main(["assemble", str(parts), "--classes", "1", "--out", str(tmp_path / "one")])
    main(["assemble", str(parts), "--merge", "1", "--out", str(tmp_path / "merged")])
    outs = {}
    for src in ("run", "parts", "one", "merged"):
        path = run if src == "run" else tmp_path / src
        cli("sample {} --classes 1 --n 2 --steps 2 --sampler ddpm --out {}", path,
            tmp_path / f"s_{src}")  # fmt: skip
        outs[src] = np.load(tmp_path / f"s_{src}" / "samples.npz")["arr_0"].astype(int)
    assert np.array_equal(outs["run"], outs["parts"]) and np.array_equal(outs["run"], outs["one"])
    assert np.abs(outs["run"] - outs["merged"]).max() <= 2  # fp32 rounding of the folded weights
    for src in ("run", "parts"):  # from parts: the learngenes alone, no tailor assembled
        cli("sample {} --unconditional --n 2 --steps 2 --out {}", run if src == "run" else parts,
            tmp_path / f"u_{src}")  # fmt: skip
    a, b = (np.load(tmp_path / f"u_{s}" / "samples.npz") for s in ("run", "parts"))
    assert (
        np.array_equal(a["arr_0"], b["arr_0"]) and str(b["class_names"][b["labels"][0]]) == "<null>"
    )


def test_transfer_with_kind_and_a_matched_baseline_then_evaluate(run, tmp_path, capsys):
    parts, dense = tmp_path / "parts", tmp_path / "dense"
    short = TRANSFER_SHORT
    main(["decompose", str(run), "--out", str(parts)])
    main(["transfer", str(parts), "--data", "mnist:6,7", "--null-tailor", "--out",
          str(tmp_path / "kind"), *short])  # fmt: skip
    main(["train", "--model", "dense", "--data", "mnist:0-2", "--out", str(dense), *SHORT])
    # matched to the KIND run as it ran: its null tailor is a third tailor the parts' defaults
    # leave out, which a baseline (no --null-tailor) cannot be told
    main(["transfer", str(dense), "--method", "lora", "--match-kind", str(tmp_path / "kind"),
          "--data", "mnist:6,7", "--out", str(tmp_path / "lora"), *short])  # fmt: skip
    kind_meta = json.loads((tmp_path / "kind" / "run.json").read_text())["transfer"]
    lora_meta = json.loads((tmp_path / "lora" / "run.json").read_text())["transfer"]
    assert lora_meta["budget"] == kind_meta["trainable_params"] > kind_budget(parts, ["6", "7"])
    assert abs(lora_meta["trainable_params"] - lora_meta["budget"]) < 0.1 * lora_meta["budget"]
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a KIND run to other classes is no budget for these
        main(["transfer", str(dense), "--method", "lora", "--match-kind", str(tmp_path / "kind"),
              "--data", "mnist:6", "--out", str(tmp_path / "lora6"), *short])  # fmt: skip
    assert "transferred to the classes ['6', '7']" in capsys.readouterr().err
    main(["sample", str(tmp_path / "lora"), "--n", "4", "--steps", "2", "--out",
          str(tmp_path / "s")])  # fmt: skip
    capsys.readouterr()
    main(["evaluate", str(tmp_path / "s" / "samples.npz"), "--ref", "mnist:6,7"])
    result = json.loads((tmp_path / "s" / "samples.eval.json").read_text())
    assert result["num_samples"] == 8 and result["fid"] > 0 and result["generation"]["steps"] == 2


def test_baseline_from_a_kind_source_is_refused(run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "transfer",
                str(run),
                "--method",
                "lora",
                "--data",
                "mnist:6",
                "--out",
                str(tmp_path / "x"),
                *TRANSFER_TOY,
            ]
        )
    assert "dense" in capsys.readouterr().err


def test_transfer_refuses_settings_it_would_ignore(run, tmp_path, capsys):
    """A transfer's model and diffusion come from its source, and a KIND transfer's size from
    its tailors: settings that would be dropped are refused before anything is written."""
    parts = tmp_path / "parts"
    main(["decompose", str(run), "--out", str(parts)])
    for extra, phrase in ((["--set", "model.rank_tailor=4"], "model settings from SOURCE"),
                          (["--set", "diffusion.num_timesteps=50"], "diffusion settings"),
                          (["--budget", "1000"], "a baseline's adapter")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(["transfer", str(parts), "--data", "mnist:6", "--out", str(tmp_path / "t"),
                  *TRANSFER_SHORT, *extra])  # fmt: skip
        assert e.value.code == 2 and phrase in capsys.readouterr().err
        assert not (tmp_path / "t").exists()


def test_transfer_takes_its_data_from_the_config_and_resumes_with_its_tailor_rank(
    run, tmp_path, capsys
):
    """configs/domain-shift/*.yaml name the data and their commands give no --data; a transfer
    with --rank-tailor (saved as 4.0) resumes (it failed: "expects a int, got 4.0")."""
    parts, cfg = tmp_path / "parts", tmp_path / "target.yaml"
    main(["decompose", str(run), "--out", str(parts)])
    cfg.write_text("data: mnist:6,7\n")
    args = ["transfer", str(parts), "--config", str(cfg), "--rank-tailor", "2",
            "--out", str(tmp_path / "t"), *TRANSFER_SHORT]  # fmt: skip
    main(args)
    assert json.loads((tmp_path / "t" / "config.json").read_text())["data"] == "mnist:6,7"
    main([*args, "--steps", "3", "--resume"])
    assert "(3 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # another tailor rank: named, not a shape error
        main([*args[:5], "1", *args[6:], "--steps", "4", "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "started with other options: trainable_params" in err
    with pytest.raises(SystemExit) as e:  # neither --data nor a config that sets it
        main(["transfer", str(parts), "--out", str(tmp_path / "u"), *TRANSFER_SHORT])
    assert e.value.code == 2 and "give the target classes: --data" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


def test_a_transfer_resume_compares_what_the_run_recorded(tmp_path):
    """Keys an older run did not record are not compared (its resume goes on); a budget it did
    not have, or another method, is named."""
    from kind.transfer.run import _check_same_transfer

    (tmp_path / "run.json").write_text(json.dumps({"transfer": {"method": "kind"}}))
    now = {"method": "kind", "null_tailor": False, "train_learngenes": False,
           "trainable_params": 5}  # fmt: skip
    _check_same_transfer(tmp_path, now)
    for changed, named in (({"method": "lora"}, "method 'kind' (now 'lora')"),
                           ({"budget": 10}, "budget None (now 10)")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(named)):
            _check_same_transfer(tmp_path, now | changed)


def test_auto_resume_serves_a_jobs_first_start_and_its_restarts(run, tmp_path, caplog):
    """One command line for a job torchrun or a scheduler may start again: the first start trains
    from nothing, a start after a crash continues from the last checkpoint, to the same weights."""
    import shutil

    from kind.io import read_tensors

    argv = ["train", "--data", "mnist:0-2", "--size", "tiny", "--steps", "4", "--batch-size", "8",
            *TOY, "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=4",
            "--auto-resume", "--out"]  # fmt: skip
    main([*argv, str(tmp_path / "straight")])
    shutil.copytree(tmp_path / "straight", tmp_path / "crashed")
    for gone in ("checkpoints/step_0000003", "checkpoints/step_0000004", "model"):
        shutil.rmtree(tmp_path / "crashed" / gone)  # as if killed after step 2's checkpoint
    caplog.set_level("INFO")
    main([*argv, str(tmp_path / "crashed")])
    assert "resumed" in caplog.text and "at step 2" in caplog.text
    for name in ("model", "ema"):
        a, b = (read_tensors(tmp_path / r / "checkpoints/step_0000004" / f"{name}.safetensors")
                for r in ("straight", "crashed"))  # fmt: skip
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    rows = (tmp_path / "crashed" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    cli("decompose {} --out {}", run, tmp_path / "parts")
    for _ in range(2):  # a transfer too: started, then started again once finished
        cli("transfer {} --data mnist:3-4 --auto-resume --out {} " + " ".join(TRANSFER_SHORT),
            tmp_path / "parts", tmp_path / "t")  # fmt: skip
    assert (tmp_path / "t" / "model" / "model.json").is_file()


def test_wrong_config_key_names_the_known_keys(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "r"), "--set", "train.learning_rate=1"])
    err = capsys.readouterr().err
    assert "learning_rate" in err and "lr" in err


def test_every_option_has_help():
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        text = sub.format_help()
        assert "(default: None)" not in text and "(default: [])" not in text, name
    # a default the help text leaves out is shown; one it states is not shown twice
    sample = " ".join(subparsers["sample"].format_help().split())
    assert "same seed, same samples (default: 0)" in sample
    assert "(default: the run's sample.steps) --cfg-scale" in sample
    evaluate = " ".join(subparsers["evaluate"].format_help().split())
    assert "(default: 3)" in evaluate and "auto (default: a GPU when there is one)" in evaluate


def test_unexpected_errors_print_one_line_and_verbose_shows_the_traceback(monkeypatch, capsys):
    """An error the library does not anticipate ends in one line that names the command and the
    exception, exit 1 (a user error is exit 2); -v re-raises it with its traceback."""

    def unchecked(args):
        raise KeyError("sha256")

    monkeypatch.setattr(info, "run", unchecked)
    with pytest.raises(SystemExit) as e:
        main(["info", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert err.startswith("error: kind-dit info stopped on KeyError: 'sha256'") and " -v " in err
    with pytest.raises(KeyError):
        main(["-v", "info", "x"])


def test_one_process_commands_refuse_torchrun(run, tmp_path, monkeypatch, capsys):
    """Under torchrun every rank would run a one-process command whole, into one --out."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(["decompose", str(run), "--out", str(tmp_path / "parts")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "runs as one process, not under torchrun (2 ranks)" in err
    assert "train, transfer, sample" in err and not (tmp_path / "parts").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")
    main(["decompose", str(run), "--out", str(tmp_path / "parts")])
    assert (tmp_path / "parts").is_dir()


def test_a_port_out_of_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "parts", "--port", "70000"])
    assert e.value.code == 2 and "from 0 to 65535" in capsys.readouterr().err


def test_bad_device_or_methods_are_refused_before_anything_is_written(tmp_path, capsys):
    for device in ("bogus", "cuda:0" if not torch.cuda.is_available() else "nope"):
        with pytest.raises(SystemExit) as e:
            main(["demo", "--out", str(tmp_path / "d"), "--device", device])
        err = capsys.readouterr().err
        assert e.value.code == 2 and device in err and "--set" not in err
        assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "d"), "--methods", ","])
    assert e.value.code == 2 and "--methods ',' names nothing" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
