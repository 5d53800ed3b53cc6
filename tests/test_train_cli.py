"""Hostile input to the main job, ``python -m experiments.train`` (issue 14).

Every bad flag is a usage error (exit status 2, ``argument --flag: ...`` with
the allowed range) raised before any data is loaded; run ids depend only on
the hyperparameters their method reads; diverged runs are reported (strict
JSON, a table that says "diverged", plots); damaged checkpoint folders give
one clear error naming the folder and ``--fresh``.
"""

import json
import math
import os
import pathlib
import shutil

import pytest

from experiments import train
from experiments.core import checkpoint as ckpt_lib
from experiments.core import data as data_lib
from experiments.core import methods
from experiments.core.config import ConfigError
from experiments.train import checks, report, study, trainer
from experiments.train.config import MAX_SEED, TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = str(ROOT / "data_cache")
# The smallest study: 2 steps of 32 examples, a 4-channel 1-D CNN, 32 test examples.
TINY = ["--quick", "--no-progress", "--data-dir", DATA_DIR, "--width", "4", "--train-subset", "64"]
TINY += ["--test-subset", "32"]


@pytest.fixture
def no_data(monkeypatch):
  """Fails the test if the study loads data (so a check that passes it came too late)."""

  def refuse(*args, **kwargs):
    raise AssertionError("the study loaded data before rejecting its configuration")

  monkeypatch.setattr(data_lib, "load_dataset", refuse)
  monkeypatch.setattr(study, "run_study", refuse)


def _usage_error(argv, capsys):
  with pytest.raises(SystemExit) as info:
    train.main(argv)
  err = capsys.readouterr().err
  assert info.value.code == 2, err
  return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
  ("argv", "flag", "says"),
  [
    # item 1: caught late before (after training SGD, SAM, ...)
    (["--rho", "-1"], "--rho", "must be a finite number > 0, got '-1'"),
    (["--alphas", "nan,1"], "--alphas", "comma-separated finite numbers"),
    (["--num-steps", "0"], "--num-steps", "must be an integer >= 1, got 0"),
    (["--probe-batch-size", "0"], "--probe-batch-size", "an integer >= 1, none or auto"),
    # item 2: raw Python errors, silent acceptance or a wrong message before
    (["--epochs", "0"], "--epochs", "must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size", "must be an integer >= 1, got 0"),
    (["--batch-size", "-5"], "--batch-size", "must be an integer >= 1, got -5"),
    (["--seeds", "0"], "--seeds", "must be an integer in [1, 10000], got 0"),
    (["--methods", ",,,"], "--methods", "expected comma-separated method names"),
    (["--width", "0"], "--width", "must be an integer >= 1, got 0"),
    (["--test-subset", "0"], "--test-subset", "must be an integer >= 1 or none, got 0"),
    (["--train-subset", "-3"], "--train-subset", "must be an integer >= 1 or none, got -3"),
    (["--alpha-update-period", "0"], "--alpha-update-period", "must be an integer >= 1 or none, got 0"),
    (["--momentum", "5"], "--momentum", "must be a finite number in [0, 1), got '5'"),
    (["--momentum", "1"], "--momentum", "in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay", "must be a finite number >= 0, got '-1'"),
    (["--lr", "0"], "--lr", "must be a finite number > 0"),
    (["--lr", "inf"], "--lr", "must be a finite number > 0"),
    (["--lr", "nan"], "--lr", "must be a finite number > 0"),
    (["--rho-max", "0"], "--rho-max", "must be a finite number > 0 or none"),
    (["--checkpoint-every", "-1"], "--checkpoint-every", "must be an integer >= 0"),
    (["--stop-after-epochs", "0"], "--stop-after-epochs", "must be an integer >= 1 or none"),
    (["--seed0", "-1"], "--seed0", f"must be an integer in [0, {MAX_SEED}], got -1"),
    (["--seed0", str(MAX_SEED), "--seeds", "2"], "--seeds", f"largest seed {MAX_SEED}"),
    (["--seeds", "100000000000000000000"], "--seeds", "must be an integer in [1, 10000]"),  # no OverflowError
    (["--seeds", "1000000000"], "--seeds", "must be an integer in [1, 10000]"),  # no list of a billion seeds
    (["--methods", "sgd,,sam"], "--methods", "with none empty"),
    (["--model", "vgg"], "--model", "must be one of mlp, cnn1d, cnn2d, resnet18"),
    (["--model", "cnn2d"], "--model", "mnist1d holds 1-D series: use mlp or cnn1d"),
    (["--dataset", "digits", "--model", "cnn1d"], "--model", "digits holds images"),
    (["--method", ""], "--method", "expected a method name"),
    (["--method", "nosuch"], "--method", "unknown method 'nosuch'"),
    (["--method", "ascent"], "--method", "unknown method 'ascent'"),  # an xsam_jax function, not a method
    (["--methods", "sgd,sam,sgd"], "--methods", "'sgd' is listed twice"),
    (["--quick", "--batch-size", "1000"], "--batch-size", "1000 exceeds the 512 training examples"),
    (["--batch-size", "5000"], "--batch-size", "5000 exceeds the 4000 training examples"),
    (["--output-dir", ""], "--output-dir", "must be a folder path"),
    # checked by building XSAM's transformation: the library rejects it
    (["--alphas", "2,1", "--alpha-refinement", "parabola"], "--alphas", "must be strictly increasing"),
  ],
)
def test_bad_flag_is_a_usage_error_before_any_data(argv, flag, says, no_data, capsys, tmp_path):
  line = _usage_error([*argv, "--no-progress", "--workdir", str(tmp_path / "w")], capsys)
  assert line.startswith(f"python -m experiments.train: error: argument {flag}: "), line
  assert says in line
  assert not (tmp_path / "w").exists()


def test_unknown_dataset_names_the_builtin_ones(no_data, capsys):
  line = _usage_error(["--dataset", "nosuch", "--no-checkpoints"], capsys)
  assert "argument --dataset: 'nosuch' is not a built-in data set (mnist1d, digits)" in line
  assert "tensorflow-datasets, which does not know this one" in line
  assert "abstract_reasoning" not in line  # not tensorflow-datasets' list of 300 names


def test_dataset_errors_of_the_data_module():
  data_lib.check_dataset_name("mnist1d")
  data_lib.check_dataset_name("digits")
  with pytest.raises(data_lib.DatasetError, match=r"'nosuch' is not a built-in data set \(mnist1d, digits\)"):
    data_lib.check_dataset_name("nosuch")
  pytest.importorskip("tensorflow_datasets")
  data_lib.check_dataset_name("cifar10")
  data_lib.check_dataset_name("cifar10:3.0.2")
  with pytest.raises(data_lib.DatasetError, match="mnist1d, digits"):
    data_lib.load_dataset("nosuch", None)


def test_unwritable_folders_are_usage_errors(no_data, capsys, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  for flag in ("--output-dir", "--workdir"):
    line = _usage_error(["--no-progress", flag, str(blocker / "sub")], capsys)
    assert f"argument {flag}: cannot write into the folder" in line
    line = _usage_error(["--no-progress", flag, str(blocker)], capsys)
    assert f"argument {flag}: '{blocker}' is a file, not a folder" in line
  if os.geteuid() != 0:  # root writes anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = _usage_error(["--no-progress", "--output-dir", str(locked)], capsys)
    assert "argument --output-dir: cannot write into the folder" in line


@pytest.mark.parametrize(
  ("changes", "field", "says"),
  [
    (dict(rho=-1.0), "rho", "must be a finite number > 0, got -1.0"),
    (dict(num_steps=0), "num_steps", "must be an integer >= 1, got 0"),
    (dict(alpha_update_period=0), "alpha_update_period", "must be an integer >= 1 or None, got 0"),
    (dict(alphas=(float("nan"), 1.0)), "alphas", "must be a tuple of finite numbers or None, got (nan, 1.0)"),
    (dict(probe_batch_size=0), "probe_batch_size", "must be an integer >= 1, None or 'auto', got 0"),
    (dict(rho_max=-2.0), "rho_max", "must be a finite number > 0 or None, got -2.0"),
    (dict(momentum=1), "momentum", "must be a finite number in [0, 1), got 1"),
    (dict(epochs=2.0), "epochs", "must be an integer >= 1, got 2.0"),
    (dict(model="vgg"), "model", "must be one of mlp, cnn1d, cnn2d, resnet18 or None, got 'vgg'"),
  ],
)
def test_config_built_in_code_is_range_checked(changes, field, says):
  """A TrainConfig made in code is checked like the flags: a ValueError naming the field and its range."""
  with pytest.raises(ConfigError) as info:
    TrainConfig.default().replace(**changes)
  assert info.value.field == field
  assert str(info.value) == f"{field} {says}"


def test_library_checks_map_to_config_fields():
  """check_method builds the transformation; the library's error names the field (and so the flag)."""
  base = TrainConfig.default()
  with pytest.raises(ConfigError, match="strictly increasing") as info:
    checks.check_method(base.replace(method="xsam", alphas=(2.0, 1.0), alpha_refinement="parabola"))
  assert info.value.field == "alphas"
  checks.check_method(base.replace(method="sgd", alphas=(2.0, 1.0), alpha_refinement="parabola"))  # SGD reads none
  with pytest.raises(ConfigError, match="unknown method") as info:
    checks.check_study(base, ["sgd", "nosuch"])
  assert info.value.field == "method"


def test_alpha_update_period_zero_is_not_one_epoch():
  """resolve() used to turn 0 (falsy) into one epoch; only None means one epoch."""
  digits = data_lib.load_digits()
  config = TrainConfig.quick().replace(method="xsam", batch_size=32)
  assert checks.resolve(config, digits).alpha_update_period == 1437 // 32
  assert checks.resolve(config.replace(alpha_update_period=1), digits).alpha_update_period == 1
  with pytest.raises(ConfigError, match="alpha_update_period must be an integer >= 1 or None, got 0"):
    config.replace(alpha_update_period=0)  # and 0 is no longer a value at all
  with pytest.raises(ConfigError) as info:
    checks.resolve(config.replace(batch_size=2000), digits)
  assert info.value.field == "batch_size"
  assert "2000 exceeds the 1437 training examples" in str(info.value)


def test_run_ids_depend_only_on_what_the_method_reads():
  base = TrainConfig.default()
  xsam_only = dict(rho_max=0.5, alpha_update_period=7, probe_batch_size=None, alphas=(0.0, 1.0))
  xsam_only.update(alpha_refinement="parabola")
  sgd, sam, xsam = (base.replace(method=m) for m in ("sgd", "sam", "xsam"))
  # SGD: no rho, no K, none of XSAM's settings
  assert trainer.run_name(sgd) == trainer.run_name(sgd.replace(rho=0.7, num_steps=3, **xsam_only))
  assert trainer.run_name(sgd).startswith("sgd_seed0_")
  # SAM: rho and K, not XSAM's settings
  assert trainer.run_name(sam) == trainer.run_name(sam.replace(**xsam_only))
  assert trainer.run_name(sam) != trainer.run_name(sam.replace(rho=0.7))
  assert trainer.run_name(sam.replace(num_steps=3)).startswith("sam_k3_seed0_")
  # XSAM: everything; its run ids are those of earlier versions (their checkpoints still resume)
  for key, value in dict(rho=0.7, num_steps=3, **xsam_only).items():
    assert trainer.run_name(xsam) != trainer.run_name(xsam.replace(**{key: value})), key
  assert trainer.run_name(xsam) == "xsam_k1_seed0_da65149922"
  # fields every method reads still count
  for name in ("sgd", "sam", "xsam", "vasso"):
    config = base.replace(method=name)
    assert trainer.run_name(config) != trainer.run_name(config.replace(learning_rate=0.01)), name
  assert methods.used_fields("vasso") == {"rho"}
  assert methods.unused_fields("sgd") == set(methods.METHOD_FIELDS)


def test_sgd_is_not_retrained_for_another_rho(tmp_path):
  mnist1d = data_lib.load_mnist1d(DATA_DIR)
  config = TrainConfig.quick().replace(method="sgd", width=4, train_subset=64, test_subset=32)
  first = trainer.train_and_evaluate(config, str(tmp_path), data=mnist1d, progress=False)
  again = trainer.train_and_evaluate(config.replace(rho=0.3), str(tmp_path), data=mnist1d, progress=False)
  assert len(os.listdir(tmp_path)) == 1
  assert again.history == first.history  # reloaded from the checkpoint, time_s included: not retrained


def _strict_json(path):
  def refuse(token):
    raise AssertionError(f"{path} holds the non-JSON token {token}")

  return json.loads(pathlib.Path(path).read_text(), parse_constant=refuse)


def test_diverged_study_is_reported(tmp_path, capsys):
  out, work = tmp_path / "out", tmp_path / "work"
  argv = [*TINY, "--methods", "sgd", "--lr", "1e6", "--output-dir", str(out), "--workdir", str(work)]
  for _ in range(2):  # the second run reuses the diverged run's checkpoint
    assert train.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| sgd | diverged | 1 | diverged |" in printed
    doc = _strict_json(out / "results.json")
    assert doc["methods"]["sgd"]["diverged"] == [True]
    assert None in doc["methods"]["sgd"]["histories"][0]["test_loss"]  # NaN written as null
    assert (out / "accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_report_of_partly_and_wholly_diverged_methods(tmp_path):
  nan = float("nan")

  def history(loss, alpha):
    h = dict(epoch=[1, 2], train_loss=[3e19, loss], train_accuracy=[0.1, 0.1], test_loss=[nan, loss])
    h.update(test_accuracy=[0.1, 0.5 if math.isfinite(loss) else 0.09], learning_rate=[1.0, 0.0], time_s=[1.0, 2.0])
    if alpha:
      h.update(alpha=[1.0, 0.0], alpha_min=[0.0, 0.0], alpha_max=[2.0, 0.0], grad_norm=[nan, nan])
      h.update(theta=[nan, nan], theta_min=[nan, nan], theta_max=[nan, nan])
      h.update(perturbed_loss=[2.0, nan], sharpness=[0.5, nan])
    return h

  def entry(losses, alpha=False):
    hs = [history(loss, alpha) for loss in losses]
    accs = [h["test_accuracy"][-1] for h in hs]
    return dict(config={}, seeds=[0, 1], final_test_accuracy=accs, train_time_s=[1.0, 1.0], histories=hs)

  runs = dict(sgd=entry([nan, nan]), xsam=entry([nan, 1.0], alpha=True), sam=entry([0.5, float("inf")]))
  for e in runs.values():
    e["summary"] = study.summarize(e["final_test_accuracy"])
  out = report.write_report({"methods": runs, "wall_time_s": 1.0, "completed": True}, str(tmp_path))
  assert "| sgd | diverged | 2 | diverged, diverged |" in out["table"]
  assert "| xsam | 50.00 ± 0.00 (1 of 2 diverged) | 2 | diverged, 50.0 |" in out["table"]
  assert "xsam - sgd: n/a" in out["paired_differences"]
  assert "sam - xsam: n/a" in out["paired_differences"]
  assert "theta not finite (diverged)" in out["alpha_summary"]
  doc = _strict_json(out["json"])
  assert doc["methods"]["sam"]["diverged"] == [False, True]
  assert doc["methods"]["sam"]["histories"][1]["train_loss"] == [3e19, None]
  for png in out["pngs"]:
    assert pathlib.Path(png).read_bytes().startswith(b"\x89PNG")
  assert len(out["pngs"]) == 3  # accuracy, xsam's alpha and theta, sharpness
  assert "xsam: L(w + d) - L(w) 0.5000 in the first epoch, nan in the last" in out["sharpness_summary"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """The workdir of one finished tiny SGD run made by the CLI, and its argv."""
  base = tmp_path_factory.mktemp("finished")
  argv = [*TINY, "--methods", "sgd", "--workdir", str(base / "work"), "--output-dir", str(base / "out")]
  assert train.main(argv) == 0
  (run,) = os.listdir(base / "work")
  return base / "work", run, argv


def _damage(run_dir, mode):
  step = run_dir / "2"
  if mode == "meta_bytes":
    (step / "meta" / "metadata").write_bytes(b"\xff\xfe\x00 not utf-8")
  elif mode == "meta_truncated":
    (step / "meta" / "metadata").write_text('{"step": 2, "hist')
  elif mode == "meta_empty":
    (step / "meta" / "metadata").write_text("{}")
  elif mode == "meta_other_step":
    meta = json.loads((step / "meta" / "metadata").read_text())
    (step / "meta" / "metadata").write_text(json.dumps({**meta, "step": 1000}))
  elif mode == "state_metadata":
    (step / "state" / "_METADATA").write_bytes(b"\xff garbage")
  elif mode == "arrays":
    for path in (step / "state").rglob("*"):
      if path.is_file() and path.parent.name == "d":
        path.write_bytes(b"garbage")
  elif mode == "no_state":
    shutil.rmtree(step / "state")
  elif mode == "run_is_a_file":
    shutil.rmtree(run_dir)
    run_dir.write_text("x")


DAMAGES = ["meta_bytes", "meta_truncated", "meta_empty", "meta_other_step", "state_metadata", "arrays", "no_state"]


@pytest.mark.parametrize("mode", [*DAMAGES, "run_is_a_file"])
def test_damaged_checkpoint_is_a_clear_error(mode, finished_run, tmp_path, capfd):
  work, run, _ = finished_run
  shutil.copytree(work, tmp_path / "work")
  _damage(tmp_path / "work" / run, mode)
  mnist1d = data_lib.load_mnist1d(DATA_DIR)
  config = TrainConfig.quick().replace(method="sgd", width=4, train_subset=64, test_subset=32)
  assert trainer.run_name(checks.resolve(config, mnist1d.subset(64, 32))) == run
  with pytest.raises(ckpt_lib.CheckpointError) as info:
    trainer.train_and_evaluate(config, str(tmp_path / "work"), data=mnist1d, progress=False)
  assert info.value.directory == str(tmp_path / "work" / run)
  assert f"the checkpoint folder {tmp_path / 'work' / run} is unreadable" in str(info.value)
  assert "--fresh" in str(info.value)
  assert "Event loop is closed" not in capfd.readouterr().err
  # resume=False (--fresh) deletes the damaged folder and trains the run again
  again = trainer.train_and_evaluate(config, str(tmp_path / "work"), data=mnist1d, progress=False, resume=False)
  assert again.completed


def test_damaged_checkpoint_of_a_later_method_is_found_before_any_training(finished_run, tmp_path, capsys):
  """`--methods sam,sgd` with sgd's checkpoint damaged: the study stops before sam trains."""
  work, run, argv = finished_run
  shutil.copytree(work, tmp_path / "work")
  _damage(tmp_path / "work" / run, "meta_truncated")
  i = argv.index("--methods")
  argv = [*argv[:i], "--methods", "sam,sgd", *argv[i + 2 : -4]]
  argv += ["--workdir", str(tmp_path / "work"), "--output-dir", str(tmp_path / "out")]
  with pytest.raises(SystemExit) as info:
    train.main(argv)
  assert info.value.code == 1
  assert f"the checkpoint folder {tmp_path / 'work' / run} is unreadable" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path / "work")) == [run]  # sam never started


def test_damaged_checkpoint_stops_the_cli_until_fresh(finished_run, tmp_path, capsys):
  work, run, argv = finished_run
  shutil.copytree(work, tmp_path / "work")
  _damage(tmp_path / "work" / run, "meta_truncated")
  argv = [*argv[:-4], "--workdir", str(tmp_path / "work"), "--output-dir", str(tmp_path / "out")]
  with pytest.raises(SystemExit) as info:
    train.main(argv)
  assert info.value.code == 1
  err = capsys.readouterr().err
  assert f"error: the checkpoint folder {tmp_path / 'work' / run} is unreadable (JSONDecodeError" in err
  assert "Delete that folder" in err
  assert "--fresh" in err
  assert train.main([*argv, "--fresh"]) == 0
  assert "--fresh" in train.build_parser().format_help()
