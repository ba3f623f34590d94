"""Loading manifests: the examples, round trips, path resolution and file-level problems."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sana_ray.manifest import Manifest, ManifestError, dump_manifest, load_manifest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [REPO / "manifests" / "quickstart.yaml", REPO / "manifests" / "sana-1600m-1024.yaml"]

VALID = """\
apiVersion: sana-ray/v1
kind: TrainingRun
metadata:
  name: test-run
spec:
  model:
    pretrained: tiny
  datasets:
    - name: shapes
      path: data/shapes
      resolution: 64
  training:
    steps: 10
    batch_size: 2
  output:
    dir: out
"""


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path, overrides=()) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, overrides)
    return info.value


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_manifests_validate_and_round_trip(path, tmp_path):
    manifest = load_manifest(path)
    assert isinstance(manifest, Manifest)

    dumped = dump_manifest(manifest)
    assert "max_grad_norm" in dumped  # defaults are filled in
    assert "keep_checkpoints" in dumped
    again = load_manifest(write(tmp_path, dumped, "sub/dumped.yaml"))
    assert again == manifest


def test_quickstart_is_the_tiny_cpu_run():
    m = load_manifest(EXAMPLES[0])
    assert m.metadata.name == "quickstart"
    assert m.spec.model.pretrained == "tiny"
    assert not m.spec.hardware.use_gpu and m.spec.hardware.num_workers == 2
    assert m.spec.training.optimizer.lr == pytest.approx(1e-3)
    assert m.spec.datasets[0].path == REPO / "manifests" / "data" / "shapes"
    assert m.spec.output.dir == REPO / "runs"
    assert "RANDOM" in EXAMPLES[0].read_text()


def test_sana_1600m_example_is_a_4_gpu_bf16_finetune():
    m = load_manifest(EXAMPLES[1])
    assert m.spec.model.pretrained == "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
    assert m.spec.hardware.num_workers == 4 and m.spec.hardware.use_gpu
    assert m.spec.training.mixed_precision == "bf16"
    assert m.spec.training.gradient_checkpointing
    assert m.spec.training.optimizer.lr == pytest.approx(1e-5)
    assert m.spec.training.flow_shift == 3.0
    assert m.spec.datasets[0].resolution == 1024


def test_dump_keeps_schema_key_order(tmp_path):
    dumped = dump_manifest(load_manifest(write(tmp_path, VALID)))
    top = [line.split(":")[0] for line in dumped.splitlines() if line and not line.startswith(" ")]
    assert top == ["apiVersion", "kind", "metadata", "spec"]
    order = [dumped.index(f"\n  {k}:") for k in ("model", "datasets", "training", "validation", "hardware", "tracking", "output")]
    assert order == sorted(order)


def test_relative_paths_resolve_against_the_manifest_folder_not_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "manifests"
    path = write(folder, VALID.replace("dir: out", "dir: ../runs\n    cache_dir: ~/sana-cache"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    m = load_manifest(os.path.relpath(path, elsewhere))
    assert m.spec.datasets[0].path == folder / "data" / "shapes"
    assert m.spec.output.dir == tmp_path / "project" / "runs"
    assert m.spec.output.cache_dir == Path("~/sana-cache").expanduser()
    assert m.spec.model.pretrained == "tiny"


@pytest.mark.parametrize(
    ("pretrained", "expected"),
    [
        ("tiny", "tiny"),
        ("Efficient-Large-Model/Sana_1600M_1024px_diffusers", "Efficient-Large-Model/Sana_1600M_1024px_diffusers"),
        ("./weights/sana", "{folder}/weights/sana"),
        ("../weights", "{parent}/weights"),
        ("/abs/weights", "/abs/weights"),
    ],
)
def test_local_pretrained_folders_resolve_but_hub_ids_do_not(tmp_path, pretrained, expected):
    path = write(tmp_path / "m", VALID.replace("pretrained: tiny", f"pretrained: {pretrained}"))
    m = load_manifest(path)
    assert m.spec.model.pretrained == expected.format(folder=tmp_path / "m", parent=tmp_path)


def test_absolute_paths_are_kept(tmp_path):
    data = tmp_path / "elsewhere" / "data"
    m = load_manifest(write(tmp_path, VALID.replace("path: data/shapes", f"path: {data}")))
    assert m.spec.datasets[0].path == data


# --- file-level problems -------------------------------------------------------------


def test_missing_file_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = error_of("manifests/nope.yaml")
    text = str(err)
    assert text.startswith("manifests/nope.yaml: file not found")
    assert "Traceback" not in text
    assert text.splitlines()[-1] == "1 problem in manifests/nope.yaml; fix it and run `sana-ray validate manifests/nope.yaml`"


def test_folder_instead_of_file(tmp_path):
    assert "folder" in str(error_of(tmp_path))


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = write(tmp_path, VALID.replace("    steps: 10", "    steps: [10"))
    err = error_of(path)
    (problem,) = err.problems
    assert "YAML syntax error" in problem.message
    assert problem.line is not None and 13 <= problem.line <= 14
    assert str(err).startswith(f"{path}:{problem.line}:{problem.column}: YAML syntax error")


def test_bad_indentation_points_at_the_line(tmp_path):
    path = write(tmp_path, VALID.replace("    batch_size: 2", "   batch_size: 2"))
    (problem,) = error_of(path).problems
    assert problem.line == 14


def test_duplicate_key_is_an_error_with_its_line(tmp_path):
    path = write(tmp_path, VALID.replace("    batch_size: 2", "    batch_size: 2\n    steps: 20"))
    (problem,) = error_of(path).problems
    assert problem.line == 15
    assert problem.path == "spec.training.steps"
    assert "duplicate key 'steps'" in problem.message and "line 13" in problem.message


def test_empty_file(tmp_path):
    err = error_of(write(tmp_path, "# only a comment\n"))
    assert "empty" in err.problems[0].message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    (problem,) = error_of(write(tmp_path, text)).problems
    assert "top level must be a mapping" in problem.message
    assert problem.line == 1


def test_unsafe_yaml_tags_are_refused(tmp_path):
    path = write(tmp_path, VALID.replace("name: test-run", "name: !!python/object/apply:os.system [echo hacked]"))
    (problem,) = error_of(path).problems
    assert problem.line == 4
    assert "unsupported YAML" in problem.message


def test_several_documents_are_refused(tmp_path):
    (problem,) = error_of(write(tmp_path, VALID + "---\n" + VALID)).problems
    assert "more than one YAML document" in problem.message


def test_not_utf8(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_bytes(b"apiVersion: \xff\xfe\n")
    assert "UTF-8" in str(error_of(path))


def test_anchors_and_merge_keys_work(tmp_path):
    text = VALID.replace(
        "    - name: shapes\n      path: data/shapes\n      resolution: 64\n",
        "    - &base\n      name: shapes\n      path: data/shapes\n      resolution: 64\n"
        "    - <<: *base\n      name: shapes2\n",
    )
    m = load_manifest(write(tmp_path, text))
    assert [d.name for d in m.spec.datasets] == ["shapes", "shapes2"]
    assert m.spec.datasets[1].resolution == 64
