"""torch.export archives traced into TorchScript (worker.engines.exported): zoo models convert and
agree with their exported programs at other batch sizes and survive the engines; control flow, a
static batch and non-tensor inputs are refused with a code; hostile sample inputs never run; a
teacher and a student from .pt2 files go through a job."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import exported, zoo
from worker.cpu_share import cpu_share
from worker.engines.errors import EngineError
from worker.engines.exported import exported_to_torchscript, is_exported_archive, load_exported_program
from worker.engines.modules import load_model, module_kind, save_model
from worker.runner import execute_job

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _saved(tmp_path: Path, content: bytes, name: str = "model.pt2") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _tokens(batch: int, vocab: int = 500, length: int = 12) -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, vocab, (batch, length)),)


def _ids_and_mask(batch: int) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(0, 500, (batch, 16))
    mask = torch.ones_like(ids)
    mask[::2, 8:] = 0
    return ids, mask


# (model, inputs at a batch size): sizes read in the graph (an LSTM's initial state, attention
# reshapes) must follow the batch, not keep the sample's
ZOO = {
    "cnn": (zoo.SequentialCNN, lambda b: (torch.rand(b, 1, 32, 32),)),
    "resnet": (zoo.TinyResNet, lambda b: (torch.rand(b, 1, 32, 32),)),
    "inception": (zoo.InceptionNet, lambda b: (torch.rand(b, 1, 32, 32),)),
    "fixed_view": (zoo.FixedViewNet, lambda b: (torch.rand(b, 1, 32, 32),)),
    "transformer_mlp": (zoo.TransformerMLP, lambda b: (torch.rand(b, 64),)),
    "lstm": (zoo.LSTMClassifier, _tokens),
    "encoder": (zoo.TinyEncoder, _tokens),
    "two_inputs": (zoo.TwoInputEncoder, _ids_and_mask),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_convert_and_agree_with_the_eager_model_at_any_batch(tmp_path, name):
    make, inputs = ZOO[name]
    torch.manual_seed(0)
    model = make().eval()
    path = _saved(tmp_path, exported.export_bytes(model, *inputs(2)))

    converted = load_model(path)

    assert isinstance(converted, torch.jit.ScriptModule) and is_exported_archive(path)
    save_model(converted, tmp_path / "converted.pt")
    reloaded = torch.jit.load(str(tmp_path / "converted.pt"))
    for batch in (1, 7):
        example = inputs(batch)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(*example), model(*example), rtol=1e-4, atol=1e-5)


def test_layers_keep_their_names_and_kinds(tmp_path):
    converted = load_model(_saved(tmp_path, exported.exported_cnn()))

    kinds = {name: module_kind(module) for name, module in converted.named_modules() if name}
    assert kinds["features.0"] == "Conv2d" and kinds["features.1"] == "BatchNorm2d" and kinds["fc1"] == "Linear"
    assert "_guards_fn" not in kinds


def test_a_torchscript_archive_is_not_taken_for_an_exported_one(tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.save(zoo.trace(zoo.SequentialCNN(), torch.rand(1, 1, 32, 32)), str(path))

    assert not is_exported_archive(path)


def test_data_dependent_control_flow_is_refused_with_a_reason(tmp_path):
    program = load_exported_program(_saved(tmp_path, exported.exported_branching()))

    with pytest.raises(EngineError) as refused:
        exported_to_torchscript(program)
    assert refused.value.code == "export_not_traceable" and "control flow (cond" in refused.value.message


def test_a_static_batch_is_refused_naming_the_input_and_the_fix(tmp_path):
    content = exported.export_bytes(zoo.SequentialCNN(), torch.rand(1, 1, 32, 32), dynamic_batch=False)

    with pytest.raises(EngineError) as refused:
        load_model(_saved(tmp_path, content))
    assert refused.value.code == "export_static_batch"
    assert "'x'" in refused.value.message and "Dim('batch')" in refused.value.message


def test_a_program_exported_in_training_mode_with_dropout_is_refused_saying_so(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    program = torch.export.export(model, (torch.rand(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))

    with pytest.raises(EngineError) as refused:
        exported_to_torchscript(program)
    assert refused.value.code == "export_not_traceable" and "model.eval()" in refused.value.message


class _KeywordFlag(torch.nn.Module):
    def forward(self, x, *, scale: float = 2.0):
        return x * scale


def test_keyword_inputs_are_refused(tmp_path):
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        _KeywordFlag(), (torch.rand(2, 3),), {"scale": 3.0}, dynamic_shapes=({0: batch}, None)
    )

    with pytest.raises(EngineError) as refused:
        exported_to_torchscript(program)
    assert refused.value.code == "export_not_traceable" and "positional tensors" in refused.value.message


def test_hostile_sample_inputs_are_refused_and_never_run(tmp_path):
    """torch.export.load itself would unpickle these unrestricted, and create the marker."""
    marker = tmp_path / "ran"
    path = _saved(tmp_path, exported.with_hostile_sample_inputs(exported.exported_cnn(), marker))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(EngineError) as refused:
            load_model(path)
    assert refused.value.code == "export_pickle_refused"
    assert not marker.exists()


def test_a_pt2_teacher_and_a_pt2_student_go_through_a_job(tmp_path):
    """execute_job, as the sandboxed child runs it: the baseline is the traced teacher, saved as
    TorchScript in the job's output, and a distill step's student may be a .pt2 too."""
    teacher = _saved(tmp_path, exported.exported_cnn(), "teacher.pt2")
    student = _saved(tmp_path, exported.export_bytes(zoo.SequentialCNN(width=8), torch.rand(2, 1, 32, 32)), "s.pt2")
    x, y, _, _ = zoo.digits()
    np.savez(tmp_path / "digits.npz", input=x[:64].numpy(), label=y[:64].numpy())
    spec = {
        "steps": [{"op": "distill", "student_model_id": "student", "epochs": 1, "batch_size": 16}],
        "benchmark": {"device": "cpu", "batch_sizes": [1], "warmup": 0, "iterations": 3, "measure_memory": False},
        "seed": 0,
    }
    files = {
        "model": str(teacher),
        "calibration": str(tmp_path / "digits.npz"),
        "evaluation": None,
        "students": {"student": str(student)},
        "output_dir": str(tmp_path),
    }

    result = execute_job(lambda event: None, spec, files, cpu=cpu_share(1, override=1).describe(), extra_time_s=0)

    artifact = torch.jit.load(result["artifact_path"])
    assert sum(p.numel() for p in artifact.parameters()) == result["report"]["result"]["parameters"]
    assert result["report"]["result"]["parameters"] < result["report"]["baseline"]["parameters"]
    assert result["report"]["baseline"]["size_bytes"] == (tmp_path / "baseline.pt").stat().st_size
