"""`QuantizeOnForward`: train a student whose every forward is quantized (DQ-BART's distillation-aware
quantization), as a Lightning callback around `dq_lightning.quant`."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from dq_lightning.errors import UserError
from dq_lightning.quant import (QuantConfig, collect_stats, convert, in_form_of, is_converted, is_prepared, prepare,
                                quant_config_of, set_observe, set_quantization_enabled)


class QuantizeOnForward(pl.Callback):
    """Quantize the student on every forward; the optimizer keeps updating its full-precision latent weights.

    - setup: `prepare(student, config)`, in place and idempotently (a student already prepared, e.g. on
      resume, is left alone), before the optimizer is built; parameters are reused, so the optimizer sees
      the latent weights.
    - warm-up: quantization is off while `trainer.global_step < warmup_steps` (training and validation
      alike), so it depends only on the step counter and resumes correctly.
    - statistics: every `log_every_n_steps` optimizer steps, the quantizers record the mean scale and the
      share of values clipped during one batch, logged as `quant/<layer>/<role>_scale` and
      `..._clipped_frac` (with `per_layer_stats`) and as aggregates `quant/{weight,embedding,act,
      attention}/{scale_mean,clipped_frac_mean,clipped_frac_max}`. The student's size and compression ratio
      against the teacher (DQ-BART's accounting, see `dq_lightning.size`) are logged once, as
      `quant/size_mb` and `quant/compression`.
    - end of fit: with `convert_on_fit_end`, `convert(student)` bakes int8 codes and scales, so a following
      `trainer.test` evaluates the deployable model.
    - loading a checkpoint: `restore` puts the student in the checkpoint's form first (Lightning calls a
      callback's own `on_load_checkpoint` only when fitting, and after the weights are loaded, so the
      LightningModule's hook calls `restore`).
    """

    def __init__(self, config: QuantConfig | str = "8-8-8", student_attr: str = "student", warmup_steps: int = 0,
                 log_every_n_steps: int = 100, per_layer_stats: bool = True, convert_on_fit_end: bool = True,
                 teacher_attr: str | None = "teacher"):
        """
        Args:
            config: a `QuantConfig`, or the paper's W-E-A notation ("2-2-8") for its defaults.
            student_attr: attribute of the LightningModule holding the student (a transformers
                `*ForConditionalGeneration`).
            warmup_steps: optimizer steps trained in full precision before quantization starts.
            log_every_n_steps: how often quantization statistics are recorded and logged (0: never).
            per_layer_stats: log every layer's statistics, not only the aggregates.
            convert_on_fit_end: convert the student to integer codes when fit ends.
            teacher_attr: attribute holding the FP32 teacher, the baseline of the logged compression ratio;
                None or a missing attribute compares with the student's own architecture in FP32.
        """
        if isinstance(config, str):
            config = QuantConfig.from_notation(config)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise UserError(f"warmup_steps={warmup_steps!r} must be a non-negative integer")
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 0:
            raise UserError(f"log_every_n_steps={log_every_n_steps!r} must be a non-negative integer")
        self.config = config
        self.student_attr, self.teacher_attr = student_attr, teacher_attr
        self.warmup_steps, self.log_every_n_steps = warmup_steps, log_every_n_steps
        self.per_layer_stats, self.convert_on_fit_end = per_layer_stats, convert_on_fit_end
        self._enabled = self._log_now = self._observing = False
        self._size_metrics: dict[str, float] | None = None

    # -- preparing ------------------------------------------------------------------------------------------
    def student(self, pl_module: pl.LightningModule) -> nn.Module | None:
        return getattr(pl_module, self.student_attr, None)

    def prepare_student(self, pl_module: pl.LightningModule) -> bool:
        """Prepare the student if it exists and is not prepared yet; True once it is prepared. A
        LightningModule that builds its student late (in `configure_model`) can call this right after."""
        if not hasattr(pl_module, self.student_attr):
            raise UserError(f"QuantizeOnForward: the LightningModule has no attribute {self.student_attr!r} "
                            "(set student_attr to the attribute holding the student model)")
        student = self.student(pl_module)
        if student is None:
            return False
        if not is_prepared(student):
            prepare(student, self.config)
            rank_zero_info(f"QuantizeOnForward: student prepared for W-E-A {self.config.notation}")
        elif quant_config_of(student) != self.config:
            raise UserError(f"QuantizeOnForward: the student is already prepared for "
                            f"{quant_config_of(student).notation} with other settings than this callback's "
                            f"{self.config.notation}")
        return True

    def restore(self, pl_module: pl.LightningModule, state: dict, fresh_student) -> None:
        """Before `state` (a checkpoint's state dict, keys prefixed with `student_attr`) is loaded: the student
        prepared, or converted if the state holds integer codes. Testing the best checkpoint right after fit
        meets a student converted by `on_fit_end` and latent weights in the file: `fresh_student()` builds the
        new student that takes them."""
        prefix = f"{self.student_attr}."
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        student = self.student(pl_module)
        restored = in_form_of(student, self.config, state, fresh_student)
        if restored is not student:
            restored.to(next(student.parameters()).device)
            restored.generation_config = student.generation_config
            setattr(pl_module, self.student_attr, restored)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.prepare_student(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The optimizer exists by now; parameters are shared, so a late prepare still trains the latent
        # weights, but LSQ's new step parameters would be missing from the optimizer.
        student = self.student(pl_module)
        late = student is not None and not is_prepared(student)
        if not self.prepare_student(pl_module):
            raise UserError(f"QuantizeOnForward: pl_module.{self.student_attr} is still None when fit starts")
        if late and self.config.learns_steps:
            raise UserError("QuantizeOnForward: learned step sizes (LSQ, elastic) need the student prepared "
                            "before the optimizer is built; build it in the LightningModule's __init__ or call "
                            "prepare_student in configure_model")
        self._size_metrics = self._size(pl_module)

    def _size(self, pl_module: pl.LightningModule) -> dict[str, float] | None:
        from dq_lightning.size import model_size

        student = self.student(pl_module)
        teacher = getattr(pl_module, self.teacher_attr, None) if self.teacher_attr else None
        if not hasattr(student, "config") or (teacher is not None and not hasattr(teacher, "config")):
            return None
        report = model_size(student, self.config, teacher=teacher)
        return {"quant/size_mb": report.size_mb, "quant/compression": report.compression}

    # -- training -------------------------------------------------------------------------------------------
    def _gate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        student = self.student(pl_module)
        if student is None or is_converted(student):
            return False
        enabled = trainer.global_step >= self.warmup_steps
        set_quantization_enabled(student, enabled)
        return enabled

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._enabled = self._gate(trainer, pl_module)
        self._log_now = self.log_every_n_steps > 0 and trainer.global_step % self.log_every_n_steps == 0
        # Recording costs a few reductions per quantizer, so it is done only on the batches that log.
        self._observing = self._log_now and self._enabled
        if self._observing:
            set_observe(self.student(pl_module), True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        metrics: dict[str, float] = {}
        if self._observing:
            student = self.student(pl_module)
            set_observe(student, False)
            metrics.update(collect_stats(student, per_layer=self.per_layer_stats))
            self._observing = False
        if self._size_metrics is not None:
            metrics.update(self._size_metrics)
            self._size_metrics = None
        if self._log_now or metrics:
            metrics["quant/enabled"] = float(self._enabled)
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._gate(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        student = self.student(pl_module)
        if self.convert_on_fit_end and student is not None and not is_converted(student):
            set_quantization_enabled(student, True)
            convert(student)
            rank_zero_info("QuantizeOnForward: student converted to integer codes and scales")
