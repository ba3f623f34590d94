"""`kind: Sweep` manifests: loading, expansion checks, overrides, and the pure Tune/grid helpers (no Ray run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sana_ray.manifest import Manifest, ManifestError, Sweep, load_document, load_manifest

REPO = Path(__file__).resolve().parents[2]


def _doc(**search) -> dict:
    return {
        "apiVersion": "sana-ray/v1",
        "kind": "Sweep",
        "metadata": {"name": "s"},
        "spec": {
            "template": {
                "model": {"pretrained": "tiny"},
                "datasets": [{"name": "d", "path": "data", "resolution": 64}],
                "training": {"steps": 10, "checkpoint_every": 5},
            },
            "search": {"space": {"training.optimizer.lr": {"loguniform": [1e-6, 1e-4]}}} | search,
        },
    }


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_quickstart_sweep_loads_and_training_manifests_still_load():
    sweep = load_document(REPO / "manifests" / "sweep-quickstart.yaml")
    assert isinstance(sweep, Sweep)
    assert sweep.spec.search.scheduler.name == "asha" and sweep.spec.search.metric == "loss"
    assert sweep.spec.template.datasets[0].path.is_absolute()  # relative to the manifest, like a TrainingRun
    template = sweep.template_manifest()
    assert isinstance(template, Manifest) and template.metadata.name == "sweep-quickstart"
    assert isinstance(load_document(REPO / "manifests" / "quickstart.yaml"), Manifest)
    assert isinstance(load_manifest(REPO / "manifests" / "quickstart.yaml"), Manifest)


def test_overrides_apply_to_the_template(tmp_path):
    path = _write(tmp_path, _doc())
    sweep = load_document(path, ["training.steps=3", "spec.search.num_samples=5"])
    assert sweep.spec.template.training.steps == 3 and sweep.spec.search.num_samples == 5


@pytest.mark.parametrize(
    "space, fragment",
    [
        ({"training.flow_shift": {"uniform": [-1.0, 3.0]}}, "spec.search.space.training.flow_shift: uniform value -1.0"),
        ({"training.optimizer.lrr": {"choice": [1e-4]}}, "did you mean 'lr'?"),
        ({"training.steps": {"randint": [0, 5]}}, "spec.search.space.training.steps: randint value 0"),
        ({"model.pretrained": {"choice": ["x"]}}, "'model.pretrained' cannot be searched"),
        ({"training.optimizer.lr": {"loguniform": [0, 1e-4]}}, "low must be > 0"),
        ({"training.optimizer.lr": {"uniform": [1e-4, 1e-5]}}, "must be below high"),
        ({"training.optimizer.lr": {"uniform": [1e-5, 1e-4], "choice": [1]}}, "give exactly one of"),
    ],
)
def test_every_bound_is_validated_before_anything_starts(tmp_path, space, fragment):
    doc = _doc()
    doc["spec"]["search"]["space"] = space
    with pytest.raises(ManifestError) as error:
        load_document(_write(tmp_path, doc))
    assert fragment in str(error.value)
    assert str(tmp_path / "sweep.yaml") + ":" in str(error.value)  # names the file and line


def test_algorithms_check_their_domains(tmp_path):
    with pytest.raises(ManifestError, match="algorithm grid needs choice or grid_search"):
        load_document(_write(tmp_path, _doc(algorithm="grid")))
    doc = _doc(algorithm="optuna")
    doc["spec"]["search"]["space"] = {"training.flow_shift": {"grid_search": [1, 3]}}
    with pytest.raises(ManifestError, match="optuna does not take grid_search"):
        load_document(_write(tmp_path, doc))


def test_param_space_scheduler_and_search_alg(tmp_path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    from sana_ray.launch.sweep import make_scheduler, make_search_alg, param_space

    doc = _doc()
    doc["spec"]["search"]["space"] = {
        "training.optimizer.lr": {"loguniform": [1e-6, 1e-4]},
        "training.flow_shift": {"choice": [1, 3, 6]},
        "training.seed": {"randint": [0, 10]},
        "training.max_grad_norm": {"uniform": [0.5, 2.0]},
        "training.optimizer.weight_decay": {"grid_search": [0.0, 0.01]},
    }
    sweep = load_document(_write(tmp_path, doc))
    space = param_space(sweep)
    assert isinstance(space["training.optimizer.lr"], tune.search.sample.Float)
    assert space["training.optimizer.weight_decay"] == {"grid_search": [0.0, 0.01]}
    assert isinstance(space["training.flow_shift"], tune.search.sample.Categorical)
    assert isinstance(space["training.seed"], tune.search.sample.Integer)
    scheduler = make_scheduler(sweep)
    assert isinstance(scheduler, ASHAScheduler) and scheduler._time_attr == "step" and scheduler._max_t == 10
    from ray.tune.schedulers import TrialScheduler

    class _Trial:  # ASHA stops a trial at max_t; a trial at its final step must be left to export
        trial_id = "t"

    assert scheduler.on_trial_result(None, _Trial(), {"step": 10, "loss": 1.0}) == TrialScheduler.CONTINUE
    assert isinstance(make_scheduler(sweep.model_copy(update={"spec": sweep.spec.model_copy(update={
        "search": sweep.spec.search.model_copy(update={"scheduler": sweep.spec.search.scheduler.model_copy(update={"name": "fifo"})})})})), FIFOScheduler)
    sweep.spec.search.scheduler.name = "median"
    assert isinstance(make_scheduler(sweep), MedianStoppingRule)
    sweep.spec.search.space.pop("training.optimizer.weight_decay")
    sweep.spec.search.algorithm = "optuna"
    assert type(make_search_alg(sweep)).__name__ == "OptunaSearch"


def test_grid_algorithm_tries_every_choice(tmp_path):
    from sana_ray.launch.sweep import param_space

    doc = _doc(algorithm="grid")
    doc["spec"]["search"]["space"] = {"training.flow_shift": {"choice": [1, 3, 6]}}
    assert param_space(load_document(_write(tmp_path, doc))) == {"training.flow_shift": {"grid_search": [1, 3, 6]}}


def test_trial_manifest_and_labels():
    from sana_ray.launch.sweep import trial_name, value_label
    from sana_ray.manifest.sweep import trial_manifest_data

    template = {"apiVersion": "sana-ray/v1", "kind": "TrainingRun", "metadata": {"name": "t"},
                "spec": {"training": {"steps": 1, "optimizer": {"lr": 1.0}}}}
    data = trial_manifest_data(template, {"training.optimizer.lr": 1e-5, "training.flow_shift": 6})
    assert data["spec"]["training"] == {"steps": 1, "optimizer": {"lr": 1e-5}, "flow_shift": 6}
    assert template["spec"]["training"]["optimizer"]["lr"] == 1.0  # the template is not changed
    assert value_label("training.optimizer.lr", 1e-5) == "lr=1e-05"
    assert value_label("training.flow_shift", 3.0) == "flow_shift=3"
    assert trial_name("A1b2c_00003") == "a1b2c_00003"


def test_grid_layout(tmp_path):
    from PIL import Image

    from sana_ray.launch.grid import Column, grid_size, make_grid

    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "red").save(image)
    columns = [Column(["lr=1e-03", "flow_shift=3"], [image, image]), Column(["lr=1e-07", "flow_shift=1"], None, "stopped at 2")]
    out = make_grid(columns, prompts=2, resolution=64, out=tmp_path / "grid.png")
    with Image.open(out) as grid:
        assert grid.size == grid_size(2, 2, 64, 2) == (256, 6 + 24 + 256)
        assert grid.getpixel((10, 40)) == (255, 0, 0)  # first trial, first prompt
        assert grid.getpixel((250, 200)) == (200, 200, 200)  # a trial without images: grey


def test_cli_validate_prints_a_sweep_without_heavy_imports(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from sana_ray.cli import main; rc = main(['validate', sys.argv[1]]); "
        "heavy = [m for m in ('torch', 'ray', 'mlflow', 'diffusers') if m in sys.modules]; "
        "print('HEAVY', heavy, file=sys.stderr); raise SystemExit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(REPO / "manifests" / "sweep-quickstart.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "kind: Sweep" in result.stdout and "HEAVY []" in result.stderr


def _with_eval(doc: dict, **evaluation) -> dict:
    template = doc["spec"]["template"]
    template["datasets"].append({"name": "held", "path": "held", "resolution": 64, "dataset_type": "eval"})
    if evaluation:
        template["evaluation"] = evaluation
    return doc


def test_default_metric_is_eval_loss_with_eval_data_else_loss(tmp_path):
    from sana_ray.launch.sweep import metric_note

    plain = load_document(_write(tmp_path, _doc()))
    assert plain.spec.search.metric == "loss"
    assert "dataset_type: eval" in metric_note(plain)  # apply says why the metric is the noisy one
    evaluated = load_document(_write(tmp_path, _with_eval(_doc())))
    assert evaluated.spec.search.metric == "eval_loss" and metric_note(evaluated) is None
    assert load_document(_write(tmp_path, _with_eval(_doc(), enabled=False))).spec.search.metric == "loss"
    # the resolved metric is what `validate` prints and what a resumed sweep reloads
    assert Sweep.model_validate(evaluated.model_dump(mode="json")).spec.search.metric == "eval_loss"
    explicit = load_document(_write(tmp_path, _with_eval(_doc(metric="loss"))))
    assert explicit.spec.search.metric == "loss"
    per_dataset = load_document(_write(tmp_path, _with_eval(_doc(metric="eval_loss/held"))))
    assert per_dataset.spec.search.metric == "eval_loss/held"


@pytest.mark.parametrize(
    "doc, fragment",
    [
        (_doc(metric="eval_loss"), "search.metric is 'eval_loss' but the template does not evaluate: no enabled dataset has dataset_type: eval (add a held-out"),
        (_with_eval(_doc(metric="eval_loss"), enabled=False), "does not evaluate: evaluation.enabled is false (remove template.evaluation.enabled: false, or set search.metric: loss)"),
        (_with_eval(_doc(metric="eval_loss/other")), "search.metric 'eval_loss/other' names no eval dataset (use 'eval_loss' or one of 'eval_loss/held')"),
        (_with_eval(_doc(), every_steps=3), "template.evaluation.every_steps (3) must divide template.training.checkpoint_every (5)"),
    ],
)
def test_eval_metrics_the_trials_could_not_report_are_refused(tmp_path, doc, fragment):
    with pytest.raises(ManifestError) as error:
        load_document(_write(tmp_path, doc))
    assert fragment in str(error.value)
    assert str(tmp_path / "sweep.yaml") + ":" in str(error.value)


def test_eval_settings_are_part_of_an_eval_loss_sweeps_identity(tmp_path):
    from sana_ray.launch.sweep import sweep_fingerprint

    def fingerprint(doc: dict) -> str:
        return sweep_fingerprint(load_document(_write(tmp_path, doc)))

    assert fingerprint(_with_eval(_doc(), num_timesteps=8)) != fingerprint(_with_eval(_doc(), num_timesteps=4))
    # compared on the training loss, the eval settings do not matter to the trials
    assert fingerprint(_with_eval(_doc(metric="loss"), num_timesteps=8)) == fingerprint(_with_eval(_doc(metric="loss"), num_timesteps=4))
