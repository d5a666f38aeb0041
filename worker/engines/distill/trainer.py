"""The distillation training loop: soft targets from a frozen teacher, validation every epoch,
the best checkpoint kept, early stopping, a cosine learning-rate schedule and masked updates."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.engines.data import ModelData
from worker.engines.distill.batching import (
    BatchSize,
    TeacherTargets,
    amp_dtype,
    autocast,
    gather_inputs,
    gather_labels,
)
from worker.engines.distill.batchnorm import make_batchnorm_mode_aware
from worker.engines.distill.config import DistillConfig
from worker.engines.distill.outputs import (
    DistillationLoss,
    ValidationMeter,
    check_student_output,
    choose_loss,
    flatten_output,
    validation_metric_name,
)
from worker.engines.distill.quantization_aware import LatentWeights
from worker.engines.distill.sparsity import SparsityMasks
from worker.engines.errors import EngineError, model_text
from worker.engines.measure.quality import output_leaves
from worker.engines.modules import clone_model, module_kind
from worker.engines.prune.regularization import bn_scale_penalty

ProgressFn = Callable[[float, str], None]


@dataclass
class DistillResult:
    """The trained student (best validation checkpoint, eval mode) and JSON-safe details."""

    model: torch.jit.ScriptModule
    details: dict[str, Any] = field(default_factory=dict)


class _Diverged(Exception):
    """The training loss stopped being finite."""


def distill(
    teacher: torch.jit.ScriptModule,
    student: torch.jit.ScriptModule,
    train_data: ModelData,
    eval_data: ModelData,
    config: DistillConfig,
    *,
    device: torch.device | str = "cpu",
    progress: ProgressFn = lambda fraction, message: None,
    seed: int = 0,
) -> DistillResult:
    """Train `student` to imitate `teacher` on `train_data`, validating on `eval_data` each epoch.

    The teacher is only read (eval mode, no gradients); the student is trained (in place, or on a
    copy when its traced BatchNorm graphs had to be made train/eval aware) and returned at its
    best validation epoch (epoch 0, the student as given, counts too, so the result
    is never worse on validation than the input). Runs identically on CPU and CUDA; on CUDA with
    autocast mixed precision and a batch size that halves on out-of-memory.

    Args:
        teacher: the reference model (TorchScript).
        student: the model to train (TorchScript, traced or scripted); same output structure.
        train_data: inputs (and optional labels) to learn from.
        eval_data: inputs (and optional labels) for the per-epoch validation score.
        config: temperature, alpha, epochs, lr, batch size, patience, loss, regularisation.
        device: where to compute; both models are moved or copied there.
        progress: `progress(fraction, message)`, called after every batch.
        seed: seeds shuffling and any randomness inside the student (reproducible on CPU).

    Returns:
        DistillResult with the student and details (loss per output, history, timings, masks).

    Raises:
        EngineError("student_mismatch") when the student's outputs differ from the teacher's.

    Example:
        result = distill(teacher, student, ModelData((x,), y), ModelData((x_val,), y_val),
                         DistillConfig(epochs=3))
        accuracy_model = result.model
    """
    device = torch.device(device)
    # Unoptimised TorchScript execution: every op then runs through eager autograd and eager
    # autocast (the JIT's own autodiff graphs ignore autocast's casts), and profiling a graph that
    # keeps changing requires_grad/mode is wasted work (training is no slower on CPU without it).
    with _rng_scope(device, seed), _eval_mode(teacher), torch.jit.optimized_execution(False):
        student, batchnorm = make_batchnorm_mode_aware(student.to(device))
        run = _DistillRun(
            _on_device(teacher, device), student, batchnorm, train_data, eval_data, config, device, progress, seed
        )
        return run.fit()


class _DistillRun:
    """State of one distillation: models, targets, optimiser, schedule and history."""

    def __init__(
        self,
        teacher: torch.jit.ScriptModule,
        student: torch.jit.ScriptModule,
        batchnorm: dict,
        train_data: ModelData,
        eval_data: ModelData,
        config: DistillConfig,
        device: torch.device,
        progress: ProgressFn,
        seed: int,
    ):
        self.teacher, self.student, self.batchnorm = teacher, student, batchnorm
        self.train_data, self.eval_data = train_data, eval_data
        self.config, self.device, self.report = config, device, progress
        self.seed = seed
        self.latents = LatentWeights.from_model(student)
        # the quantized tensors are written from their latents, never stepped themselves
        quantized = set(self.latents.tensor_names()) if self.latents else set()
        self.params = [
            p for name, p in student.named_parameters() if p.dtype.is_floating_point and name not in quantized
        ]
        if not self.params and self.latents is None:
            raise EngineError("student_not_trainable", "the student has no floating-point parameters to train")
        for param in self.params:
            param.requires_grad_(True)
        teacher_leaves = self._check_structure()
        kinds = tuple(choose_loss(leaf, config.loss) for leaf in teacher_leaves)
        if all(kind is None for kind in kinds):
            raise EngineError("not_distillable", "the teacher has no floating-point output to distill on")
        self.skipped = [
            {"module": f"output[{i}]", "reason": "non-floating output: not differentiable"}
            for i, kind in enumerate(kinds)
            if kind is None
        ]
        self.train_loss = DistillationLoss(
            kinds, config.temperature, config.alpha, _uses_labels(train_data, kinds, teacher_leaves)
        )
        self.val_loss = dataclasses.replace(self.train_loss, use_labels=_uses_labels(eval_data, kinds, teacher_leaves))
        self.batch_size = BatchSize(min(config.batch_size, train_data.num_samples), device)
        self.masks = SparsityMasks.from_model(student, exclude=quantized)
        trained = self.params + (self.latents.parameters() if self.latents else [])
        self.optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
        self.generator = torch.Generator().manual_seed(seed)
        self.total_samples = config.epochs * train_data.num_samples
        self.samples_done = 0
        self.epoch = 0
        self.last_score: float | None = None
        self.history: list[dict[str, Any]] = []

    def fit(self) -> DistillResult:
        self.train_targets = TeacherTargets(
            self.teacher, self.train_data, self.device, self.batch_size, lambda message: self.report(0.0, message)
        )
        self.eval_targets = (
            self.train_targets
            if self.eval_data is self.train_data
            else TeacherTargets(
                self.teacher, self.eval_data, self.device, self.batch_size, lambda message: self.report(0.0, message)
            )
        )
        started = time.perf_counter()
        validation_started = time.perf_counter()
        score, val_loss = self._validate()
        self._record(None, 0.0, score, val_loss, time.perf_counter() - validation_started)
        best_key, best_epoch, best_state = (score, -val_loss), 0, self._snapshot()
        stop_reason = "completed"
        for epoch in range(1, self.config.epochs + 1):
            self.epoch = epoch
            epoch_started = time.perf_counter()
            try:
                train_loss = self._train_epoch()
            except _Diverged as exc:
                stop_reason = f"diverged: {exc}"
                break
            train_seconds = time.perf_counter() - epoch_started
            validation_started = time.perf_counter()
            score, val_loss = self._validate()
            self._record(train_loss, train_seconds, score, val_loss, time.perf_counter() - validation_started)
            if (score, -val_loss) > best_key:
                best_key, best_epoch, best_state = (score, -val_loss), self.epoch, self._snapshot()
            elif self.epoch - best_epoch >= self.config.patience:
                stop_reason = f"early stopping: no better validation score for {self.config.patience} epoch(s)"
                break
        self._restore(best_state)
        if self.latents:
            self.latents.finish()
        self.student.eval()
        self.optimizer.zero_grad(set_to_none=True)
        self.report(1.0, f"done: best epoch {best_epoch} val {best_key[0]:.4f}")
        return DistillResult(
            self.student, self._details(best_epoch, best_key[0], stop_reason, time.perf_counter() - started)
        )

    def _check_structure(self) -> list[torch.Tensor]:
        """Run both models on two samples; refuse a student whose outputs differ from the teacher's."""
        indices = torch.arange(min(2, self.train_data.num_samples))
        inputs = gather_inputs(self.train_data, indices, self.device)
        self.student.eval()
        with torch.inference_mode():
            teacher_output = self.teacher(*inputs)
            try:
                student_output = self.student(*inputs)
            except RuntimeError as exc:
                message = f"the student cannot run on the teacher's inputs: {model_text(exc)}"
                raise EngineError("student_mismatch", message) from None
        check_student_output(teacher_output, student_output, len(indices))
        leaves = flatten_output(teacher_output, len(indices))[1]
        _check_sample_axis(output_leaves(teacher_output), len(indices))
        return leaves

    def _train_epoch(self) -> float:
        self.student.train()
        loss_sum, seen = 0.0, 0
        num_samples = self.train_data.num_samples
        order = torch.randperm(num_samples, generator=self.generator)

        def step(indices: torch.Tensor) -> None:
            nonlocal loss_sum, seen
            if len(indices) < 2:
                # batch statistics of a single sample are degenerate (zero variance)
                return
            loss = self._train_step(indices)
            loss_sum += loss * len(indices)
            seen += len(indices)
            self.samples_done += len(indices)
            batches = math.ceil(num_samples / self.batch_size.value)
            batch = math.ceil(seen / self.batch_size.value)
            val = f" val {self.last_score:.4f}" if self.last_score is not None else ""
            self.report(
                min(self.samples_done / self.total_samples, 0.99),
                f"epoch {self.epoch}/{self.config.epochs} batch {batch}/{batches} loss {loss_sum / seen:.4f}{val}",
            )

        self.batch_size.run(order, step)
        return loss_sum / max(seen, 1)

    def _train_step(self, indices: torch.Tensor) -> float:
        self._set_lr()
        inputs = gather_inputs(self.train_data, indices, self.device)
        labels = gather_labels(self.train_data, indices, self.device)
        teacher_leaves = self.train_targets.get(indices)
        self.optimizer.zero_grad(set_to_none=True)
        if self.latents:
            self.latents.quantize_into_model()
        with autocast(self.device):
            _, student_leaves = flatten_output(self.student(*inputs), len(indices))
        loss = self.train_loss(student_leaves, teacher_leaves, labels)
        if self.config.sparsity_regularization > 0:
            loss = loss + self.config.sparsity_regularization * bn_scale_penalty(self.student)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise _Diverged(f"loss {value} at epoch {self.epoch}; try a lower lr")
        self.scaler.scale(loss).backward()
        if self.latents:
            self.latents.pass_gradients()
        self.masks.mask_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.masks.apply()
        return value

    def _set_lr(self) -> None:
        # cosine decay over every sample of the planned epochs, so a batch-size back-off keeps the shape
        lr = 0.5 * self.config.lr * (1.0 + math.cos(math.pi * self.samples_done / self.total_samples))
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _validate(self) -> tuple[float, float]:
        self.student.eval()
        if self.latents:
            self.latents.quantize_into_model()
        meter = ValidationMeter(self.val_loss)

        def step(indices: torch.Tensor) -> None:
            inputs = gather_inputs(self.eval_data, indices, self.device)
            labels = gather_labels(self.eval_data, indices, self.device)
            with torch.inference_mode(), autocast(self.device):
                _, student_leaves = flatten_output(self.student(*inputs), len(indices))
            with torch.inference_mode():
                meter.update(student_leaves, self.eval_targets.get(indices), labels)

        self.batch_size.run(torch.arange(self.eval_data.num_samples), step)
        score, val_loss = meter.result()
        self.last_score = score
        self.report(
            min(self.samples_done / self.total_samples, 0.99),
            f"epoch {self.epoch}/{self.config.epochs} validation {score:.4f}",
        )
        return score, (val_loss if math.isfinite(val_loss) else math.inf)

    def _record(
        self, train_loss: float | None, train_seconds: float, score: float, val_loss: float, val_seconds: float
    ) -> None:
        self.history.append(
            {
                "epoch": self.epoch,
                "train_loss": None if train_loss is None else round(train_loss, 6),
                "val_score": round(score, 6),
                "val_loss": round(val_loss, 6) if math.isfinite(val_loss) else None,
                "lr_end": self.optimizer.param_groups[0]["lr"] if train_loss is not None else None,
                "train_seconds": round(train_seconds, 3),
                "val_seconds": round(val_seconds, 3),
                "batch_size": self.batch_size.value,
            }
        )

    def _snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model = {name: tensor.detach().clone() for name, tensor in _state(self.student)}
        return model, (self.latents.state() if self.latents else {})

    @torch.no_grad()
    def _restore(self, state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> None:
        model, latents = state
        for name, tensor in _state(self.student):
            tensor.copy_(model[name])
        if self.latents:
            self.latents.load_state(latents)

    def _details(self, best_epoch: int, best_score: float, stop_reason: str, seconds: float) -> dict[str, Any]:
        masked = {entry["parameter"]: entry["zero_fraction"] for entry in self.masks.describe()}
        layers = []
        for name, module in self.student.named_modules():
            own = [(f"{name}.{p}" if name else p, t) for p, t in module.named_parameters(recurse=False)]
            if not own:
                continue
            layer = {"module": name, "kind": module_kind(module), "parameters": sum(t.numel() for _, t in own)}
            zero_fractions = [masked[p] for p, _ in own if p in masked]
            if zero_fractions:
                layer["kept_zero_fraction"] = max(zero_fractions)
            layers.append(layer)
        amp = amp_dtype(self.device)
        return {
            "layers": layers,
            "skipped": self.skipped,
            "losses": [kind for kind in self.train_loss.kinds],
            "hard_labels": self.train_loss.use_labels,
            "temperature": self.config.temperature,
            "alpha": self.config.alpha if self.train_loss.use_labels else None,
            "validation_metric": validation_metric_name(self.val_loss.kinds, self.val_loss.use_labels),
            "initial_val_score": self.history[0]["val_score"],
            "best_val_score": round(best_score, 6),
            "best_epoch": best_epoch,
            "epochs_run": self.history[-1]["epoch"],
            "stop_reason": stop_reason,
            "history": self.history,
            "epoch_seconds": [round(h["train_seconds"] + h["val_seconds"], 3) for h in self.history[1:]],
            "total_seconds": round(seconds, 3),
            "batch_size": self.batch_size.value,
            "batch_size_backoffs": self.batch_size.backoffs,
            "train_samples": self.train_data.num_samples,
            "eval_samples": self.eval_data.num_samples,
            "teacher_targets": "cached" if self.train_targets.cached else "recomputed per batch",
            "batchnorm": self.batchnorm,
            "sparsity_masks": self.masks.describe(),
            "quantization_aware": {
                "estimator": "straight-through",
                "tensors": self.latents.describe(),
            }
            if self.latents
            else None,
            "sparsity_regularization": self.config.sparsity_regularization,
            "device": str(self.device),
            "mixed_precision": None if amp is None else str(amp).removeprefix("torch."),
            "seed": self.seed,
        }


def _uses_labels(data: ModelData, kinds: tuple[str | None, ...], teacher_leaves: list[torch.Tensor]) -> bool:
    """Whether `data`'s labels are class ids of the first output (then CE and top-1 apply)."""
    if data.labels is None or kinds[0] != "kl" or teacher_leaves[0].dim() != 2:
        return False
    classes = int(teacher_leaves[0].shape[1])
    if data.num_samples and (int(data.labels.min()) < 0 or int(data.labels.max()) >= classes):
        raise EngineError(
            "labels_mismatch", f"dataset labels must be class ids in [0, {classes}) for a model with {classes} outputs"
        )
    return True


def _state(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _on_device(model: torch.jit.ScriptModule, device: torch.device) -> torch.jit.ScriptModule:
    """`model` itself when it already lives on `device`, else a copy there (the original stays put)."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    if tensor is None or tensor.device == device or (device.type == tensor.device.type and device.index is None):
        return model
    return clone_model(model).to(device)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _rng_scope(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the global generators for the student's own randomness, restoring them afterwards."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_sample_axis(leaves: list[tuple[str, torch.Tensor]], samples: int) -> None:
    """Targets are cached and paired per sample: every output needs the samples on its first axis.

    A model that folds samples together (FixedViewNet's `view(-1, 4096)` gives 4 rows per sample)
    has no per-sample output to pair, and the losses would fail on mismatched sizes.
    """
    for path, leaf in leaves:
        if leaf.dim() == 0 or leaf.shape[0] != samples:
            where = f"the model's output {path}" if path else "the model's output"
            raise EngineError(
                "not_distillable",
                f"distillation pairs outputs sample by sample, but {where} has "
                f"shape {list(leaf.shape)} for {samples} samples: its first dimension is not the sample axis "
                "(a reshape such as view(-1, N) folds samples together); distill needs one output row per sample",
            )
